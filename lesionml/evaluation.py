"""Honest evaluation: class-balanced metrics next to accuracy.

Point metrics come from scikit-learn; the lesion bootstraps compute the same definitions
as weighted matrix products (tested equal to scikit-learn resample by resample).

On HAM10000 always answering "nv" scores about 0.67 accuracy, so accuracy alone says
little; balanced accuracy (mean per-class recall), macro-F1, per-class recall and
melanoma sensitivity say whether a model learned the rare, dangerous classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from lesionml.data.metadata import CLASSES
from lesionml.errors import LesionMLError
from lesionml.inference import adjust_probabilities, log_probabilities

MELANOMA = CLASSES.index("mel")


def log_loss(y_true: np.ndarray, proba: np.ndarray) -> float:
    """Mean cross-entropy of the true class, probabilities clipped at 1e-7.

    Computed directly: scikit-learn's version warns whenever a clipped row no longer sums
    to exactly 1, which every confident model triggers.
    """
    return float(-np.log(np.clip(proba[np.arange(len(y_true)), y_true], 1e-7, 1.0)).mean())


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """Scalar metrics plus a per-class table for one split."""
    labels = list(range(len(CLASSES)))
    y_pred = proba.argmax(axis=1)
    report = skm.classification_report(
        y_true, y_pred, labels=labels, target_names=list(CLASSES), output_dict=True, zero_division=0
    )
    mel_true, mel_pred = y_true == MELANOMA, y_pred == MELANOMA
    out: dict[str, Any] = {
        "n": len(y_true),
        "loss": log_loss(y_true, proba),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "mel_sensitivity": float(skm.recall_score(mel_true, mel_pred, zero_division=0)),
        "mel_specificity": float(skm.recall_score(~mel_true, ~mel_pred, zero_division=0)),
    }
    present = np.unique(y_true)
    if len(present) == len(CLASSES):
        out["roc_auc_macro"] = float(
            skm.roc_auc_score(y_true, proba, multi_class="ovr", average="macro", labels=labels)
        )
    out["per_class"] = {
        c: {k: float(report[c][k]) for k in ("precision", "recall", "f1-score", "support")} for c in CLASSES
    }
    for k, c in enumerate(CLASSES):  # one-vs-rest AUC, defined when the class is present and not alone
        if 0 < (y_true == k).sum() < len(y_true):
            out["per_class"][c]["roc_auc"] = float(skm.roc_auc_score(y_true == k, proba[:, k]))
    return out


def fit_temperature(y_val: np.ndarray, proba_val: np.ndarray) -> float:
    """The temperature T whose softmax(log p / T) has the lowest validation log loss.

    Label smoothing trains a model to stop short of 1 where it is sure, and class weights
    inflate the rare classes, so raw probabilities say less about how often the model is
    right than a user reading them as risks would assume. One scalar fitted on validation
    (Guo et al., ICML 2017) repairs most of that and cannot change an argmax: the same T
    divides every log-probability, so each row keeps its order and, without a prior
    correction, every decision and decision metric is unchanged. One-vs-rest AUC can move
    a little: it ranks one class's probability across images, and tempering reorders rows
    whose other classes differ. T < 1 sharpens (an underconfident model), T > 1 softens.
    """
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    logp = log_probabilities(proba_val)
    true = logp[np.arange(len(y_val)), y_val]

    def loss(log_t: float) -> float:  # the exact log loss of softmax(logp / T): convex in 1/T
        inv_t = float(np.exp(-log_t))
        return float(np.mean(logsumexp(logp * inv_t, axis=1) - true * inv_t))

    # Bounded on log T: 0.05-20 spans every plausible miscalibration. A validation set the
    # model separates perfectly has no finite optimum; it ends near the sharp end.
    best = minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(best.x))


# Negative tau multiplies the prior *in* (decisions lean further toward nv), which only an
# accuracy objective can want; ordered by |tau| so every tie goes to the smaller change.
PRIOR_TAUS = np.array(sorted(np.round(np.arange(-1.0, 1.501, 0.05), 2), key=lambda t: (abs(t), t)))


def tune_prior_correction(
    y_val: np.ndarray, proba_val: np.ndarray, train_prior: np.ndarray, min_balanced_accuracy: float | None = None
) -> tuple[float, np.ndarray, bool]:
    """How much of the training class prior to divide out of the decisions, chosen on validation.

    A model trained on 67% nv learns that prior into its probabilities, and argmax then
    favours nv; dividing the probabilities by prior**tau (logit adjustment, Menon et al.,
    ICLR 2021) moves decisions toward the rare classes (tau > 0) or toward nv (tau < 0).
    Class weights already pushed the model toward the rare classes, so where it lands
    between accuracy and balanced accuracy is an operating point, and this picks it:

    - `min_balanced_accuracy` None: the tau with the best validation balanced accuracy;
    - a floor: the best validation accuracy among the taus whose validation balanced
      accuracy is at least the floor (a requirement such as "balanced accuracy >= 0.65",
      otherwise as often right as possible). Where no tau reaches it, tau = 0, plain argmax,
      and the third return value says the floor was missed: a model that cannot meet the
      requirement keeps its own decisions rather than buying a little balanced accuracy with
      much accuracy (docs/evaluation.md; what it did on the full data: docs/results.md).

    One scalar from `PRIOR_TAUS` (ties: the smaller |tau|) is little to overfit with the
    full copy's validation split; tau = 0 is plain argmax. Returns tau, the log-offsets
    (-tau * log prior) to add at serving, and whether the floor was met (True without one).
    """
    log_prior = np.log(np.clip(np.asarray(train_prior, dtype=np.float64), 1e-12, None))
    present = np.unique(y_val)
    scores = []
    for tau in PRIOR_TAUS:
        pred = adjust_probabilities(proba_val, offsets=-tau * log_prior).argmax(axis=1)  # as served
        scores.append(
            (float(np.mean([(pred[y_val == c] == c).mean() for c in present])), float(np.mean(pred == y_val)))
        )
    balanced, accuracy = np.array(scores).T
    if min_balanced_accuracy is None:
        best, floor_met = int(np.argmax(balanced)), True  # np.argmax: the first, smallest |tau|, of ties
    else:
        allowed = balanced >= min_balanced_accuracy - 1e-12
        floor_met = bool(allowed.any())
        best = int(np.argmax(np.where(allowed, accuracy, -1.0))) if floor_met else 0  # PRIOR_TAUS[0] is 0
    tau = float(PRIOR_TAUS[best])
    return tau, -tau * log_prior, floor_met


def tune_melanoma_offset(y_val: np.ndarray, proba_val: np.ndarray, target: float) -> float:
    """The offset on melanoma's log-probability giving validation melanoma sensitivity >= `target`
    with the fewest other images called melanoma: a threshold on one score, chosen on validation.

    An image is called melanoma once the offset exceeds how far its melanoma log-probability
    is below its best other class. The offset is the smallest that calls enough validation
    melanomas, moved halfway to the next image that would flip: every offset in that gap makes
    the same validation decisions, and the middle is the farthest from both. It may be
    negative: a model that already finds more melanomas than asked calls fewer, for specificity.
    """
    if not (y_val == MELANOMA).any():
        raise LesionMLError(
            "evaluate.operating_point melanoma_sensitivity: the validation split has no melanoma "
            "to choose the melanoma threshold on"
        )
    logp = log_probabilities(proba_val)
    need = np.delete(logp, MELANOMA, axis=1).max(axis=1) - logp[:, MELANOMA]
    melanomas = np.sort(need[y_val == MELANOMA])
    threshold = melanomas[int(np.ceil(target * len(melanomas) - 1e-9)) - 1]
    beyond = need[need > threshold]
    return float((threshold + beyond.min()) / 2 if len(beyond) else threshold + 1.0)


def paired_changes(
    y_true: np.ndarray, pred_new: np.ndarray, pred_old: np.ndarray, lesions: np.ndarray, n: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """new - old of each headline decision metric: observed and its paired lesion-bootstrap 95% interval.

    Paired like `paired_bootstrap`: both decisions are scored on the same resampled lesions,
    so the interval is that of the change itself, narrower than the two metrics' own intervals.
    """
    weights = np.vstack([np.ones((1, len(y_true))), lesion_resample_weights(lesions, n, seed)])
    new, old = (_scores(_confusions(y_true, p, weights)) for p in (pred_new, pred_old))
    out = {}
    for metric in new:
        delta = new[metric] - old[metric]
        resampled = delta[1:][~np.isnan(delta[1:])]
        out[metric] = {
            "change": float(delta[0]),
            "ci95": (float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))),
        }
    return out


def melanoma_operating_point(
    y: dict[str, np.ndarray], proba: dict[str, np.ndarray], test_lesions: np.ndarray, target: float, n: int = 1000
) -> dict[str, Any]:
    """The melanoma-sensitivity operating point on top of a base rule, and what it costs.

    `proba` holds each split's probabilities under the base rule (tempered, prior-corrected).
    The offset is chosen on val only (`tune_melanoma_offset`); the record keeps the base
    rule's decision metrics on both splits and, on test, the paired change of each metric with
    its lesion-bootstrap interval: the melanomas gained and the accuracy and specificity paid.
    """
    offset = tune_melanoma_offset(y["val"], proba["val"], target)
    shift = np.zeros(len(CLASSES))
    shift[MELANOMA] = offset
    pred = {s: adjust_probabilities(p, offsets=shift).argmax(axis=1) for s, p in proba.items()}
    keys = ("accuracy", "balanced_accuracy", "mel_sensitivity", "mel_specificity")
    base = {s: {k: classification_metrics(y[s], p)[k] for k in keys} for s, p in proba.items()}
    change = paired_changes(y["test"], pred["test"], proba["test"].argmax(axis=1), test_lesions, n)
    return {
        "melanoma_offset": offset,
        "mel_sensitivity_target": target,
        "base": base,
        "test_change": {k: change[k] for k in keys},
    }


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


def lesion_resample_weights(lesions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, images) counts: how often each image is in each of `n` resamples of whole lesions.

    Resample r draws as many lesions as there are, with replacement; an image counts as
    often as its lesion was drawn. Metrics of a resample are then weighted sums, which is
    what lets every bootstrap below run as a few matrix products instead of a scikit-learn
    call per resample (much faster, same numbers: integer weights are repeated images;
    docs/benchmarks.md).
    """
    rng = np.random.default_rng(seed)
    _, groups = np.unique(lesions, return_inverse=True)
    k = int(groups.max()) + 1 if len(groups) else 0
    draws = rng.integers(0, k, (n, k)) + np.arange(n)[:, None] * k
    counts = np.bincount(draws.ravel(), minlength=n * k).reshape(n, k)
    return counts[:, groups].astype(np.float64)


def _confusions(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, k, k) weighted confusion matrices, rows = true class, one per row of `weights`."""
    k = len(CLASSES)
    pair = np.zeros((len(y_true), k * k))
    pair[np.arange(len(y_true)), y_true * k + y_pred] = 1.0
    return (weights @ pair).reshape(-1, k, k)


def _scores(conf: np.ndarray) -> dict[str, np.ndarray]:
    """Per-resample accuracy, balanced accuracy, macro-F1 (all 7 classes, 0 where undefined),
    melanoma sensitivity (NaN where a resample has no melanoma) and specificity (NaN where it has
    nothing else), as scikit-learn defines them."""
    tp = np.diagonal(conf, axis1=1, axis2=2)
    support, predicted = conf.sum(axis=2), conf.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
        return {
            "accuracy": tp.sum(axis=1) / conf.sum(axis=(1, 2)),
            "balanced_accuracy": np.nanmean(recall, axis=1),  # over the classes present
            "macro_f1": f1.mean(axis=1),
            "mel_sensitivity": recall[:, MELANOMA],
            # melanoma vs rest: the share of non-melanomas not called melanoma
            "mel_specificity": 1
            - (predicted[:, MELANOMA] - tp[:, MELANOMA]) / (conf.sum(axis=(1, 2)) - support[:, MELANOMA]),
        }


def _macro_auc(y_true: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per-resample one-vs-rest macro ROC AUC (Mann-Whitney, ties count half); NaN where a
    resample lacks a class."""
    aucs = []
    for c in range(proba.shape[1]):
        order = np.argsort(proba[:, c], kind="stable")
        score = proba[order, c]
        starts = np.flatnonzero(np.r_[True, score[1:] != score[:-1]])  # tied scores form one group
        pos = (y_true[order] == c).astype(np.float64)
        w = weights[:, order]
        pos_w = np.add.reduceat(w * pos, starts, axis=1)
        neg_w = np.add.reduceat(w * (1 - pos), starts, axis=1)
        below = np.cumsum(neg_w, axis=1) - neg_w
        with np.errstate(invalid="ignore", divide="ignore"):
            aucs.append((pos_w * (below + 0.5 * neg_w)).sum(axis=1) / (pos_w.sum(axis=1) * neg_w.sum(axis=1)))
    return np.mean(aucs, axis=0)


def lesion_bootstrap(
    y_true: np.ndarray, proba: np.ndarray, lesions: np.ndarray, n: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """95% intervals of the headline metrics, resampling lesions (not images).

    Images of one lesion are correlated; resampling them independently would understate
    the uncertainty, so whole lesions are drawn with replacement. Melanoma sensitivity and
    macro AUC use the resamples where they are defined (a melanoma present; every class).
    """
    weights = lesion_resample_weights(lesions, n, seed)
    scores = _scores(_confusions(y_true, proba.argmax(axis=1), weights))
    scores["roc_auc_macro"] = _macro_auc(y_true, proba, weights)
    out = {}
    for name, values in scores.items():
        values = values[~np.isnan(values)]
        if len(values):
            out[name] = (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
    return out


def paired_bootstrap(
    y_true: np.ndarray,
    pred_new: np.ndarray,
    pred_old: np.ndarray,
    lesions: np.ndarray,
    metric: str = "balanced_accuracy",
    n: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """(observed metric(new) - metric(old), one-sided p-value that new is not better).

    Both models are scored on the same resampled lesions each time, so the comparison
    is paired: the noise that is common to both (which lesions happen to be in the test
    split) cancels out.
    """
    observed_weights = np.ones((1, len(y_true)))
    weights = lesion_resample_weights(lesions, n, seed)

    def score(pred: np.ndarray, w: np.ndarray) -> np.ndarray:
        return _scores(_confusions(y_true, pred, w))[metric]

    observed = score(pred_new, observed_weights)[0] - score(pred_old, observed_weights)[0]
    not_better = int((score(pred_new, weights) - score(pred_old, weights) <= 0).sum())
    return float(observed), (not_better + 1) / (n + 1)
