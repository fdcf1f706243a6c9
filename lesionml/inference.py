"""Predict new images with a trained model, applying exactly the training preprocessing.

The model's input size comes from the model itself and its normalization statistics are
its first layer, so the only preprocessing here is the same decode + resize the
preprocess stage uses (`decode_image`). A file that cannot be read or decoded yields an
error for that file only; the others are still predicted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lesionml.data.images import decode_image
from lesionml.data.metadata import CLASS_NAMES, CLASSES
from lesionml.errors import DataError

if TYPE_CHECKING:
    import keras
    import pandas as pd

MAX_PIXELS = 40_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")


@dataclass
class Prediction:
    source: str
    predicted: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    metadata: str | None = None  # "used" or "withheld" for a model with the metadata branch, else None

    @property
    def name(self) -> str | None:
        return CLASS_NAMES.get(self.predicted) if self.predicted else None

    def to_dict(self) -> dict:
        if self.error:
            return {"source": self.source, "error": self.error}
        return {
            "source": self.source,
            "predicted": self.predicted,
            "name": self.name,
            "probabilities": self.probabilities,
        } | ({"metadata": self.metadata} if self.metadata else {})


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders become the image files directly inside them, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out


def image_size(model: keras.Model) -> tuple[int, int]:
    """(height, width) of the model's image input: the only 4-D one, whatever order its inputs come in
    (a model taking them by name, as an ensemble with the metadata branch does, sorts them by name)."""
    return next(tuple(int(d) for d in t.shape[1:3]) for t in model.inputs if len(t.shape) == 4)


def predict_proba(
    model: keras.Model,
    images: np.ndarray,
    tta: bool = False,
    batch_size: int = 128,
    metadata: pd.DataFrame | None = None,
) -> np.ndarray:
    """Class probabilities of uint8 images (N, H, W, 3), as float64 rows summing to 1.

    With `tta`, the average over the image and its three mirror images (horizontal,
    vertical, both): dermoscopy has no "up" or "left", so all four are equally valid views,
    and averaging them removes some of the model's orientation noise. Evaluation, the
    registry's champion re-run, `lesionml predict` and the served model all come here, so
    reported metrics are those of what is deployed.

    `metadata`: for a model with the metadata branch, one row per image (age, sex,
    localization; image_id, when present, names a bad row), every view getting its image's
    row. None, or a row with every value missing, takes the withheld path. A model without
    the branch ignores it.
    """
    from lesionml.data.augment import make_dataset
    from lesionml.models.patient import patient_inputs, uses_metadata

    inputs = patient_inputs(metadata, len(images)) if uses_metadata(model) else None
    views = [images] + ([images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]] if tta else [])
    proba = sum(
        np.asarray(
            model.predict(make_dataset(np.ascontiguousarray(v), batch_size=batch_size, inputs=inputs), verbose=0),
            dtype=np.float64,
        )
        for v in views
    )
    return proba / proba.sum(axis=1, keepdims=True)  # also: a float32 softmax sums to 1 only within 1e-7


def log_probabilities(proba: np.ndarray) -> np.ndarray:
    """log p with exact zeros floored at 1e-300: one floor for fitting, evaluating and serving."""
    return np.log(np.clip(proba, 1e-300, None))


def adjust_probabilities(
    proba: np.ndarray, temperature: float = 1.0, offsets: Sequence[float] | None = None
) -> np.ndarray:
    """softmax(log p / temperature + offsets): the fitted temperature, then the tuned prior correction.

    Evaluation and serving both decide through here, so the served model answers exactly
    as the evaluated one did. Dividing every log-probability by one temperature keeps each
    row's order, so without offsets no decision changes; with them, the temperature sets
    how strongly the offsets act, which is why the prior correction is tuned after it.
    """
    if temperature == 1.0 and offsets is None:
        return proba
    logits = log_probabilities(proba) / temperature
    if offsets is not None:
        logits = logits + np.asarray(offsets, dtype=np.float64)
    adjusted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return adjusted / adjusted.sum(axis=1, keepdims=True)


def decode_items(
    items: Sequence[tuple[str, bytes | None]], size: tuple[int, int]
) -> tuple[np.ndarray, list[int], dict[int, str]]:
    """(name, bytes) pairs -> the decoded images (N, H, W, 3) at `size`, the indices of the items
    they are, and an error per item that could not be read or decoded."""
    arrays: list[np.ndarray] = []
    ok: list[int] = []
    errors: dict[int, str] = {}
    for k, (name, data) in enumerate(items):
        if data is None:
            errors[k] = f"{name}: cannot read file"
            continue
        try:
            arrays.append(decode_image(data, tuple(size), MAX_PIXELS, name))
            ok.append(k)
        except DataError as exc:
            errors[k] = str(exc)
    return (np.stack(arrays) if arrays else np.empty((0, *size, 3), np.uint8)), ok, errors


def predict_images(
    model: keras.Model,
    items: Sequence[tuple[str, bytes | None]],
    tta: bool = False,
    batch_size: int = 64,
    temperature: float = 1.0,
    offsets: Sequence[float] | None = None,
    metadata: pd.DataFrame | None = None,
) -> list[Prediction]:
    """(name, bytes) pairs -> one Prediction each, in order; bytes=None means unreadable.

    `metadata`: age, sex and localization, one row per item (None: none for any). A model
    with the metadata branch uses an item's row, or takes the withheld path when all three
    are missing, and each Prediction says which; a bad value is a DataError naming the item.
    """
    from lesionml.models.patient import PRESENT, patient_inputs, uses_metadata

    results = [Prediction(source=name) for name, _ in items]
    arrays, ok, errors = decode_items(items, image_size(model))
    for k, error in errors.items():
        results[k].error = error
    if ok:
        rows = None
        if metadata is not None and uses_metadata(model):
            rows = metadata.iloc[ok].reset_index(drop=True).assign(image_id=[items[k][0] for k in ok])
        proba = adjust_probabilities(predict_proba(model, arrays, tta, batch_size, metadata=rows), temperature, offsets)
        present = patient_inputs(rows, len(ok))[PRESENT][:, 0] if uses_metadata(model) else None
        for j, (k, p) in enumerate(zip(ok, proba, strict=True)):
            results[k].predicted = CLASSES[int(p.argmax())]
            results[k].probabilities = {c: round(float(v), 6) for c, v in zip(CLASSES, p, strict=True)}
            if present is not None:
                results[k].metadata = "used" if present[j] else "withheld"
    return results


def read_files(paths: Sequence[Path]) -> list[tuple[str, bytes | None]]:
    items: list[tuple[str, bytes | None]] = []
    for p in paths:
        try:
            items.append((str(p), p.read_bytes()))
        except OSError:
            items.append((str(p), None))
    return items
