"""On-the-fly augmentation: Keras preprocessing layers inside a tf.data input pipeline.

Augmenting in the input pipeline (instead of writing augmented copies to disk) gives
every epoch fresh views of each training image at no storage cost, and runs on the
tf.data thread pool in parallel with training. Every random layer is seeded, so a run
is repeatable (given the global seed that training sets first).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lesionml.config import AugmentConfig
from lesionml.io import atomic_path

if TYPE_CHECKING:
    import keras
    import tensorflow as tf

VARIANTS_PER_IMAGE = 5  # augmented views drawn next to each original in the preview


def build_augmenter(cfg: AugmentConfig) -> "keras.Sequential":
    """The augmentation layers params.yaml turns on, in a fixed order, each with its own seed."""
    import keras

    seed = cfg.seed
    layers: list[keras.layers.Layer] = []
    flip = {(True, True): "horizontal_and_vertical", (True, False): "horizontal", (False, True): "vertical"}
    mode = flip.get((cfg.horizontal_flip, cfg.vertical_flip))
    if mode:
        layers.append(keras.layers.RandomFlip(mode, seed=seed))
    if cfg.rotation_degrees:
        layers.append(keras.layers.RandomRotation(cfg.rotation_degrees / 360.0, fill_mode="reflect", seed=seed + 1))
    if cfg.shift_fraction:
        s = cfg.shift_fraction
        layers.append(keras.layers.RandomTranslation(s, s, fill_mode="reflect", seed=seed + 2))
    if cfg.zoom_fraction:
        layers.append(keras.layers.RandomZoom(cfg.zoom_fraction, fill_mode="reflect", seed=seed + 3))
    if cfg.brightness:
        layers.append(keras.layers.RandomBrightness(cfg.brightness, value_range=(0, 255), seed=seed + 4))
    if cfg.contrast:
        # A (lower, upper) pair: Keras 3 reads a single float c as factors in [1, 1 + c] only.
        c = cfg.contrast
        layers.append(keras.layers.RandomContrast((c, c), value_range=(0, 255), seed=seed + 5))
    return keras.Sequential(layers, name="augment")


def describe(cfg: AugmentConfig) -> dict:
    """What the pipeline does, as data: written by the augment stage for people and tracking."""
    return {"params": cfg.model_dump(mode="json"), "layers": [layer.name for layer in build_augmenter(cfg).layers]}


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    augmenter: "keras.Sequential | None" = None,
    shuffle_seed: int | None = None,
) -> "tf.data.Dataset":
    """uint8 images -> batches of float32 pixels (0-255), augmented when `augmenter` is given.

    Augmentation runs on whole batches (vectorised), and the next batches are
    prefetched while the model trains on the current one.
    """
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter is not None and augmenter.layers:
        # One map call at a time: the layers draw from stateful seed generators, and
        # batches augmented concurrently would take the random draws in a racy order,
        # making a seeded run unrepeatable. Each call is vectorised over the batch and
        # uses TensorFlow's intra-op threads, and prefetch overlaps it with training.
        ds = ds.map(lambda x, y: (augmenter(x, training=True), y))
    return ds.prefetch(tf.data.AUTOTUNE)


def write_preview(
    path: Path, images: np.ndarray, captions: Sequence[str], cfg: AugmentConfig
) -> None:
    """A grid: each row one training image, then VARIANTS_PER_IMAGE augmented views of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    augmenter = build_augmenter(cfg)
    rows = len(images)
    cols = VARIANTS_PER_IMAGE + 1
    h, w = images.shape[1:3]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6 * w / h, rows * 1.6), squeeze=False)
    batch = np.repeat(images, VARIANTS_PER_IMAGE, axis=0).astype(np.float32)
    views = np.asarray(augmenter(batch, training=True)) if augmenter.layers else batch
    views = np.clip(views, 0, 255).astype(np.uint8).reshape(rows, VARIANTS_PER_IMAGE, h, w, 3)
    for r in range(rows):
        axes[r, 0].imshow(images[r])
        axes[r, 0].set_title(f"{captions[r]} (original)", fontsize=7)
        for c in range(VARIANTS_PER_IMAGE):
            axes[r, c + 1].imshow(views[r, c])
        for ax in axes[r]:
            ax.axis("off")
    fig.suptitle("Augmented training images: what the model sees", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
