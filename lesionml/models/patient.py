"""Patient metadata (age, sex, lesion site) as model inputs, encoded inside the model.

The encoding's state (the age scaling, the sex and site vocabularies) is fitted on the
train split only (`PatientStats.fit`) and built into standard Keras layers: a
Normalization for age with a missing-age indicator, a StringLookup one-hot per category
whose out-of-vocabulary column is the `unknown` level (missing, or a valid value never seen
in training). A saved model therefore carries its scaling and category lists, and a caller
passes raw values.

`metadata_present` is an input of its own: 0 sends an image down the withheld path, where
the metadata features are multiplied by 0, so what the model answers there does not depend
on any value passed with it. Training withholds the metadata of a random share of images
each epoch so that this path is trained too, and an image that comes without metadata
(every value missing) takes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lesionml.config import MetadataConfig
from lesionml.data.metadata import check_patient
from lesionml.errors import DataError

if TYPE_CHECKING:
    import keras

PRESENT = "metadata_present"
INPUTS = ("age", "sex", "localization", PRESENT)
UNKNOWN = "unknown"


def enabled(cfg: Any) -> MetadataConfig | None:
    """A model section's metadata settings when its branch is on, else None."""
    meta = getattr(cfg, "metadata", None)
    return meta if meta is not None and meta.enabled else None


def uses_metadata(model: keras.Model) -> bool:
    return PRESENT in {t.name for t in model.inputs}


def _row_names(rows: pd.DataFrame) -> list[str]:
    if "image_id" in rows.columns:
        return [str(v) for v in rows.image_id]
    return [f"row {i + 1}" for i in range(len(rows))]


@dataclass(frozen=True)
class PatientStats:
    """The metadata encoding's state, fitted on training rows: what the model's layers hold."""

    age_mean: float
    age_variance: float
    sexes: tuple[str, ...]  # seen in training, sorted, without `unknown`
    localizations: tuple[str, ...]

    @classmethod
    def fit(cls, rows: pd.DataFrame) -> PatientStats:
        """From the train split's rows only, so validation and test values stay unseen.

        The variance has a floor of 1 year^2: a train split of one age would otherwise scale
        any other age to thousands of standard deviations.
        """
        clean = check_patient(rows, "train split", _row_names(rows))
        vocabularies = {c: tuple(sorted(set(clean[c]) - {UNKNOWN})) for c in ("sex", "localization")}
        for column, known in vocabularies.items():
            if not known:  # a one-hot of `unknown` alone says nothing, and Keras refuses an empty vocabulary
                raise DataError(f"train split: no image has a known {column}; turn the model's metadata off")
        ages = clean.age.dropna()
        return cls(
            age_mean=float(ages.mean()) if len(ages) else 0.0,
            age_variance=max(float(ages.var(ddof=0)), 1.0) if len(ages) > 1 else 1.0,
            sexes=vocabularies["sex"],
            localizations=vocabularies["localization"],
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def patient_inputs(rows: pd.DataFrame | None, n: int, origin: str = "metadata") -> dict[str, np.ndarray]:
    """The model's metadata inputs for `n` images from `rows` (age, sex, localization; None: none).

    Rows align with the images. Values are validated (a bad one is a DataError naming
    `origin` and the row, by image_id when there is that column). A row whose three values are
    all missing, and every row when `rows` is None, goes down the withheld path.
    """
    if rows is None:
        clean = pd.DataFrame({"age": [np.nan] * n, "sex": [UNKNOWN] * n, "localization": [UNKNOWN] * n})
    else:
        if len(rows) != n:
            raise ValueError(f"{origin}: {len(rows)} metadata rows for {n} images")
        clean = check_patient(rows.reset_index(drop=True), origin, _row_names(rows))
    present = ~(clean.age.isna() & (clean.sex == UNKNOWN) & (clean.localization == UNKNOWN))
    return {
        "age": clean.age.to_numpy(np.float32).reshape(-1, 1),
        "sex": clean.sex.to_numpy(object).reshape(-1, 1),
        "localization": clean.localization.to_numpy(object).reshape(-1, 1),
        PRESENT: present.to_numpy(np.float32).reshape(-1, 1),
    }


def withhold_metadata(inputs: dict[str, np.ndarray], fraction: float, seed: int) -> dict[str, np.ndarray]:
    """A copy with the metadata of round(fraction * n) images, drawn by `seed`, withheld."""
    n = len(inputs[PRESENT])
    rows = np.random.default_rng(seed).permutation(n)[: round(fraction * n)]
    out = {k: v.copy() for k, v in inputs.items()}
    out["age"][rows] = np.nan
    out["sex"][rows] = UNKNOWN
    out["localization"][rows] = UNKNOWN
    out[PRESENT][rows] = 0.0
    return out


def metadata_branch(stats: PatientStats, units: int) -> tuple[list[keras.KerasTensor], keras.KerasTensor]:
    """The metadata inputs and their features (gated dense block + presence flag) for fusion."""
    import keras
    from keras import layers, ops

    age = keras.Input(shape=(1,), name="age", dtype="float32")
    sex = keras.Input(shape=(1,), name="sex", dtype="string")
    site = keras.Input(shape=(1,), name="localization", dtype="string")
    present = keras.Input(shape=(1,), name=PRESENT, dtype="float32")
    missing = ops.isnan(age)
    scaled = layers.Normalization(
        mean=[stats.age_mean], variance=[stats.age_variance], name="age_zscore_train_stats", dtype="float32"
    )(ops.where(missing, stats.age_mean, age))  # a missing age sits at the train mean, flagged below
    encoded = layers.Concatenate(name="metadata_encoded", dtype="float32")(
        [
            scaled,
            ops.cast(missing, "float32"),
            _one_hot("sex", stats.sexes)(sex),
            _one_hot("localization", stats.localizations)(site),
        ]
    )
    dense = layers.Dense(units, activation="relu", name="metadata_dense")(encoded)
    gated = layers.Multiply(name="metadata_gate")([dense, present])
    return [age, sex, site, present], layers.Concatenate(name="metadata_features")([gated, present])


def _one_hot(name: str, vocabulary: Sequence[str]) -> keras.layers.Layer:
    """Column 0 is the out-of-vocabulary level: `unknown`, missing, or unseen in training."""
    from keras import layers

    return layers.StringLookup(
        vocabulary=list(vocabulary),
        num_oov_indices=1,
        output_mode="one_hot",
        name=f"{name}_onehot_train_vocabulary",
        dtype="float32",
    )
