"""Figures people look at instead of reading numbers; each written atomically as PNG."""

from __future__ import annotations

from pathlib import Path

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


def training_curves(history: pd.DataFrame, title: str, path: Path, best_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch, train vs validation (the seed notebook's plot), best epoch marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric in zip(axes, ("loss", "accuracy")):
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
