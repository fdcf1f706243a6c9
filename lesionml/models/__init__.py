"""Model builders by name: params.yaml's `models.enabled` picks from this registry.

Every builder returns an uncompiled Keras model whose input is raw RGB pixels (0-255,
float32, shape (H, W, 3)) and whose first layer z-scores them with the training split's
statistics. The statistics therefore ship inside every saved model, and inference needs
nothing but resizing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lesionml.data.normalize import NormStats

if TYPE_CHECKING:
    import keras

Builder = Callable[[Any, tuple[int, int], NormStats, int], "keras.Model"]


def _builders() -> dict[str, Builder]:
    from lesionml.models.cnn import build_cnn
    from lesionml.models.cnn_lstm import build_cnn_lstm

    return {"cnn": build_cnn, "cnn_lstm": build_cnn_lstm}


def modules() -> tuple:
    """The builder modules, whose source is part of the training cache key."""
    from lesionml.models import cnn, cnn_lstm

    return (cnn, cnn_lstm)


def build_model(name: str, cfg: Any, image_size: tuple[int, int], stats: NormStats, n_classes: int) -> "keras.Model":
    builders = _builders()
    if name not in builders:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(builders)}")
    return builders[name](cfg, image_size, stats, n_classes)


def normalization_layer(stats: NormStats) -> "keras.layers.Layer":
    import keras

    return keras.layers.Normalization(
        axis=-1, mean=list(stats.mean), variance=[s * s for s in stats.std], name="zscore_train_stats"
    )
