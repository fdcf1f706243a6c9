"""Figures people look at instead of reading numbers; each written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lesionml.io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def figure_grid(rows: int, cols: int, figsize: tuple[float, float]):
    """A figure of image panels, axes off, `axes` always 2-D: the layout of every image grid."""
    plt = _pyplot()
    fig, axes = plt.subplots(rows, cols, figsize=figsize, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes


def training_curves(history: pd.DataFrame, title: str, path: Path, best_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch, train vs validation (the seed notebook's plot), best epoch marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("loss", "accuracy"), strict=True):
        ax.plot(history.epoch, history[metric], "o-", label=f"train {metric}")
        ax.plot(history.epoch, history[f"val_{metric}"], "o-", label=f"validation {metric}")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def confusion_matrices(y_true, y_pred, classes, title: str, path: Path) -> None:
    """Counts and row-normalised (recall per true class) side by side."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    labels = list(range(len(classes)))
    for ax, normalize, fmt, name in (
        (axes[0], None, "d", "counts"),
        (axes[1], "true", ".2f", "row-normalised (recall)"),
    ):
        ConfusionMatrixDisplay.from_predictions(
            y_true,
            y_pred,
            labels=labels,
            display_labels=classes,
            normalize=normalize,
            values_format=fmt,
            ax=ax,
            colorbar=False,
            cmap="Blues",
        )
        ax.set_title(name)
    fig.suptitle(title)
    save_figure(fig, path)


def roc_curves(y_true, proba, classes, title: str, path: Path) -> None:
    """One-vs-rest ROC curve per class, AUC in the legend."""
    from sklearn.metrics import RocCurveDisplay

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for k, name in enumerate(classes):
        if 0 < (y_true == k).sum() < len(y_true):
            RocCurveDisplay.from_predictions(y_true == k, proba[:, k], name=name, ax=ax, plot_chance_level=k == 0)
    ax.set_title(title)
    save_figure(fig, path)


def reliability_diagram(y_true, proba, title: str, path: Path, bins: int = 15) -> None:
    """Top-label confidence against accuracy: how far the probabilities can be trusted."""
    from sklearn.calibration import calibration_curve

    plt = _pyplot()
    correct = (proba.argmax(axis=1) == y_true).astype(int)
    accuracy, confidence = calibration_curve(correct, proba.max(axis=1), n_bins=bins, strategy="uniform")
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    ax.plot(confidence, accuracy, "o-", label="model")
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.set_title(title)
    save_figure(fig, path)


def confident_mistakes(images, true, predicted, confidence, title: str, path: Path, n: int = 16) -> None:
    """The wrong predictions the model was surest of: where to look first."""
    wrong = np.flatnonzero(np.asarray(true) != np.asarray(predicted))
    order = wrong[np.argsort(-np.asarray(confidence)[wrong])][:n]
    cols = 4
    rows = max(1, int(np.ceil(len(order) / cols)))
    fig, axes = figure_grid(rows, cols, (cols * 2.6, rows * 2.3))
    for ax, i in zip(axes.ravel(), order, strict=False):
        ax.imshow(images[i])
        ax.set_title(f"true {true[i]}, said {predicted[i]} ({confidence[i]:.2f})", fontsize=7)
    fig.suptitle(title)
    save_figure(fig, path)
