"""Honest evaluation: class-balanced metrics next to accuracy, all from scikit-learn.

On HAM10000 always answering "nv" scores about 0.67 accuracy, so accuracy alone says
little; balanced accuracy (mean per-class recall), macro-F1, per-class recall and
melanoma sensitivity say whether a model learned the rare, dangerous classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from lesionml.data.metadata import CLASSES

MELANOMA = CLASSES.index("mel")


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
    for k, c in enumerate(CLASSES):  # one-vs-rest AUC, defined when the class is present and not alone
        if 0 < (y_true == k).sum() < len(y_true):
            out["per_class"][c]["roc_auc"] = float(skm.roc_auc_score(y_true == k, proba[:, k]))
    return out


def predictions_table(rows: pd.DataFrame, proba: np.ndarray) -> pd.DataFrame:
    """image_id, lesion_id, true and predicted class and the 7 probabilities, one row per image."""
    out = rows[["image_id", "lesion_id", "dx"]].rename(columns={"dx": "true"}).reset_index(drop=True)
    out["predicted"] = [CLASSES[i] for i in proba.argmax(axis=1)]
    for k, c in enumerate(CLASSES):
        out[f"p_{c}"] = proba[:, k]
    return out


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE: |accuracy - confidence| averaged over equal-width confidence bins.

    scikit-learn has the per-bin curve (calibration_curve) but not this scalar, so the
    binning is sklearn's and only the weighted average is computed here.
    """
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)


def _lesion_resamples(lesions: np.ndarray, n: int, seed: int) -> Iterator[np.ndarray]:
    """Image indices of `n` resamples that draw whole lesions with replacement."""
    rng = np.random.default_rng(seed)
    codes, groups = np.unique(lesions, return_inverse=True)
    members = [np.flatnonzero(groups == g) for g in range(len(codes))]
    for _ in range(n):
        yield np.concatenate([members[g] for g in rng.integers(0, len(codes), len(codes))])


def lesion_bootstrap(
    y_true: np.ndarray, proba: np.ndarray, lesions: np.ndarray, n: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% intervals of the headline metrics, resampling lesions (not images).

    Images of one lesion are correlated; resampling them independently would understate
    the uncertainty, so whole lesions are drawn with replacement. The AUC interval uses
    the resamples in which every class is present (where macro AUC is defined).
    """
    labels = list(range(len(CLASSES)))
    y_pred = proba.argmax(axis=1)
    scores: dict[str, list[float]] = {k: [] for k in ("accuracy", "balanced_accuracy", "macro_f1", "mel_sensitivity",
                                                      "roc_auc_macro")}
    with warnings.catch_warnings():  # a resample may miss a rare class; that is expected
        warnings.simplefilter("ignore", UserWarning)
        for idx in _lesion_resamples(lesions, n, seed):
            t, p = y_true[idx], y_pred[idx]
            scores["accuracy"].append(skm.accuracy_score(t, p))
            scores["balanced_accuracy"].append(skm.balanced_accuracy_score(t, p))
            scores["macro_f1"].append(skm.f1_score(t, p, labels=labels, average="macro", zero_division=0))
            if (t == MELANOMA).any():
                scores["mel_sensitivity"].append(((p == MELANOMA) & (t == MELANOMA)).sum() / (t == MELANOMA).sum())
            if len(np.unique(t)) == len(labels):
                scores["roc_auc_macro"].append(
                    skm.roc_auc_score(t, proba[idx], multi_class="ovr", average="macro", labels=labels)
                )
    return {k: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for k, v in scores.items() if v}


def paired_bootstrap(
    y_true: np.ndarray, pred_new: np.ndarray, pred_old: np.ndarray, lesions: np.ndarray,
    metric: str = "balanced_accuracy", n: int = 1000, seed: int = 0,
) -> tuple[float, float]:
    """(observed metric(new) - metric(old), one-sided p-value that new is not better).

    Both models are scored on the same resampled lesions each time, so the comparison
    is paired: the noise that is common to both (which lesions happen to be in the test
    split) cancels out.
    """
    score = {
        "accuracy": skm.accuracy_score,
        "balanced_accuracy": skm.balanced_accuracy_score,
        "macro_f1": lambda t, p: skm.f1_score(t, p, average="macro", zero_division=0),
    }[metric]
    observed = score(y_true, pred_new) - score(y_true, pred_old)
    not_better = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for idx in _lesion_resamples(lesions, n, seed):
            if score(y_true[idx], pred_new[idx]) - score(y_true[idx], pred_old[idx]) <= 0:
                not_better += 1
    return float(observed), (not_better + 1) / (n + 1)
