"""Per-channel z-score statistics, fitted on the training split only.

The statistics travel with the data (stats.json) and later with every model, so that
validation, test and new images are scaled with the training set's numbers and no
information leaks from the evaluation images into preprocessing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class NormStats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_images: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> NormStats:
        return cls(tuple(d["mean"]), tuple(d["std"]), int(d["n_images"]))

    def apply(self, images: np.ndarray) -> np.ndarray:
        return ((images.astype(np.float32) - np.float32(self.mean)) / np.float32(self.std)).astype(np.float32)


def fit_stats(train_images: np.ndarray, chunk: int = 1024) -> NormStats:
    """Exact mean/std per RGB channel, accumulated in float64 chunk by chunk (bounded memory)."""
    if len(train_images) == 0:
        raise ValueError("cannot fit normalization statistics on zero training images")
    total = np.zeros(3)
    total_sq = np.zeros(3)
    for i in range(0, len(train_images), chunk):
        block = train_images[i : i + chunk].reshape(-1, 3).astype(np.float64)
        total += block.sum(axis=0)
        total_sq += np.square(block).sum(axis=0)
    n = train_images.shape[0] * train_images.shape[1] * train_images.shape[2]
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 1e-12))
    return NormStats(tuple(float(x) for x in mean), tuple(float(x) for x in std), len(train_images))
