"""Honest evaluation: class-balanced metrics next to accuracy, all from scikit-learn.

On HAM10000 always answering "nv" scores about 0.67 accuracy, so accuracy alone says
little; balanced accuracy (mean per-class recall), macro-F1, per-class recall and
melanoma sensitivity say whether a model learned the rare, dangerous classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from lesionml.data.metadata import CLASSES

if TYPE_CHECKING:
    import keras

MELANOMA = CLASSES.index("mel")


def predict_proba(model: "keras.Model", images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    from lesionml.data.augment import make_dataset

    ds = make_dataset(images, np.zeros(len(images), dtype=np.int64), batch_size).map(lambda x, y: x)
    proba = np.asarray(model.predict(ds, verbose=0), dtype=np.float64)
    return proba / proba.sum(axis=1, keepdims=True)  # float32 softmax sums to 1 only within 1e-7


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """Scalar metrics plus a per-class table for one split."""
    labels = list(range(len(CLASSES)))
    y_pred = proba.argmax(axis=1)
    report = skm.classification_report(
        y_true, y_pred, labels=labels, target_names=list(CLASSES), output_dict=True, zero_division=0
    )
    mel_true, mel_pred = y_true == MELANOMA, y_pred == MELANOMA
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "loss": float(skm.log_loss(y_true, np.clip(proba, 1e-7, 1), labels=labels)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "mel_sensitivity": float(skm.recall_score(mel_true, mel_pred, zero_division=0)),
        "mel_specificity": float(skm.recall_score(~mel_true, ~mel_pred, zero_division=0)),
    }
    present = np.unique(y_true)
    if len(present) == len(CLASSES):
        out["roc_auc_macro"] = float(skm.roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=labels))
    out["per_class"] = {
        c: {k: float(report[c][k]) for k in ("precision", "recall", "f1-score", "support")} for c in CLASSES
    }
    return out


def predictions_table(rows: pd.DataFrame, proba: np.ndarray) -> pd.DataFrame:
    """image_id, lesion_id, true and predicted class and the 7 probabilities, one row per image."""
    out = rows[["image_id", "lesion_id", "dx"]].rename(columns={"dx": "true"}).reset_index(drop=True)
    out["predicted"] = [CLASSES[i] for i in proba.argmax(axis=1)]
    for k, c in enumerate(CLASSES):
        out[f"p_{c}"] = proba[:, k]
    return out
