"""The registered model: an MLflow pyfunc whose input is images, logged as "model from code".

Logged from this file (not pickled): MLflow stores the source and runs it at load time,
so loading or serving a registered model never unpickles anything. The Keras weights
are an artifact loaded with `safe_mode=True`.

Input: a DataFrame with one row per image and a column `image` holding the image bytes
(or base64 text of them, which is what JSON requests carry) or a column `path`, and
optionally the patient's `age`, `sex` and `localization` (HAM10000's values) for a model
with the metadata branch: a row with none of them takes the model's withheld path.
Output: one row per image: predicted class, its full name, the 7 probabilities (after the
temperature and decision rule fitted at evaluation, if any: prior correction, melanoma
operating point; `rule` in the model config names it), error, and `metadata`: "used" or
"withheld" for a model with the metadata branch, empty for an image-only model.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from lesionml.data.metadata import CLASSES, PATIENT_COLUMNS


def _as_bytes(value) -> bytes | None:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
    return None


class LesionClassifier(PythonModel):
    def load_context(self, context) -> None:
        import keras

        self.model = keras.saving.load_model(context.artifacts["keras_model"], safe_mode=True)
        # Test-time augmentation, temperature and prior correction as the model was evaluated
        # with them (set at registration; versions registered before either have none).
        config = context.model_config or {}
        self.tta = bool(config.get("tta", False))
        self.temperature = float(config.get("temperature", 1.0))
        self.offsets = config.get("offsets")
        # In words, the rule those offsets are (prior correction, melanoma operating point).
        self.rule = config.get("rule") or "not recorded (registered before rules were named)"

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from lesionml.inference import predict_images, read_files

        if "image" in model_input.columns:
            items = [(f"image[{k}]", _as_bytes(v)) for k, v in enumerate(model_input["image"])]
        elif "path" in model_input.columns:
            items = read_files([Path(p) for p in model_input["path"]])
        else:
            raise ValueError("input needs a column 'image' (bytes or base64) or 'path'")
        given = [c for c in PATIENT_COLUMNS if c in model_input.columns]
        patient = model_input[given].reset_index(drop=True) if given else None
        rows = []
        for r in predict_images(
            self.model, items, self.tta, temperature=self.temperature, offsets=self.offsets, metadata=patient
        ):
            row = {"predicted": r.predicted or "", "name": r.name or "", "error": r.error or ""}
            row["metadata"] = r.metadata or ""
            row.update({f"p_{c}": r.probabilities.get(c, float("nan")) for c in CLASSES})
            rows.append(row)
        return pd.DataFrame(rows)


set_model(LesionClassifier())
