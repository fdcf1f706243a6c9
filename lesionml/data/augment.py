"""On-the-fly augmentation: one fused random transform per batch inside a tf.data pipeline.

Augmenting in the input pipeline (instead of writing augmented copies to disk) gives
every epoch fresh views of each training image at no storage cost.

Speed: flips, rotation, zoom and shift are composed into ONE affine matrix per image and
applied by a single `ImageProjectiveTransformV3` op (bilinear, reflected borders);
brightness and contrast are two arithmetic ops. Keras' preprocessing layers (one op
chain per layer, stateful seed generators) augmented more slowly than the CNN trains on
2 cores, so they would have held training back; the fused transform keeps well ahead of
it (docs/benchmarks.md).

Reproducibility: every batch draws from a stateless RNG keyed by (seed, batch index), so
batches can be augmented in parallel and a given seed always gives the same views,
whatever ran before (training derives one seed per epoch, so a resumed run sees exactly
what an uninterrupted one would have).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lesionml.config import AugmentConfig
from lesionml.io import atomic_path

if TYPE_CHECKING:
    import tensorflow as tf

VARIANTS_PER_IMAGE = 5  # augmented views drawn next to each original in the preview


def transformations(cfg: AugmentConfig) -> list[str]:
    """The transformations params.yaml turns on, in the order they are applied."""
    on = {
        "horizontal_flip": cfg.horizontal_flip,
        "vertical_flip": cfg.vertical_flip,
        "rotation": cfg.rotation_degrees > 0,
        "zoom": cfg.zoom_fraction > 0,
        "shift": cfg.shift_fraction > 0,
        "brightness": cfg.brightness > 0,
        "contrast": cfg.contrast > 0,
    }
    return [name for name, enabled in on.items() if enabled]


def describe(cfg: AugmentConfig) -> dict:
    """What the pipeline does, as data: written by the augment stage for people and tracking."""
    return {"params": cfg.model_dump(mode="json"), "transformations": transformations(cfg)}


def augment_batch(images: tf.Tensor, seed: tf.Tensor, cfg: AugmentConfig) -> tf.Tensor:
    """Random views of a float32 batch (B, H, W, 3) of 0-255 pixels; `seed` is two int64s.

    Each image gets its own flips, rotation in [-r, r] degrees, zoom in [1-z, 1+z], shift of
    up to a fraction of its sides, brightness change of up to a fraction of 255 and contrast
    factor in [1-c, 1+c] around its mean; the result is clipped to 0-255.
    """
    import tensorflow as tf

    n = tf.shape(images)[0]
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    keys = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 8)

    def uniform(k: int, low: float, high: float) -> tf.Tensor:
        return tf.random.stateless_uniform([n], keys[k], low, high)

    def sign(k: int, enabled: bool) -> tf.Tensor:
        return tf.where(uniform(k, 0.0, 1.0) < 0.5, -1.0, 1.0) if enabled else tf.ones([n])

    flip_x, flip_y = sign(0, cfg.horizontal_flip), sign(1, cfg.vertical_flip)
    angle = uniform(2, -cfg.rotation_degrees, cfg.rotation_degrees) * (math.pi / 180)
    scale = uniform(3, 1 - cfg.zoom_fraction, 1 + cfg.zoom_fraction)
    shift_x = uniform(4, -cfg.shift_fraction, cfg.shift_fraction) * width
    shift_y = uniform(5, -cfg.shift_fraction, cfg.shift_fraction) * height
    # Output pixel -> input pixel: about the image centre, flip, rotate, scale; then shift.
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    a00, a01, a10, a11 = cos * flip_x, -sin * flip_y, sin * flip_x, cos * flip_y
    cx, cy = (width - 1) / 2, (height - 1) / 2
    zeros = tf.zeros([n])
    matrix = tf.stack(
        [a00, a01, cx + shift_x - a00 * cx - a01 * cy, a10, a11, cy + shift_y - a10 * cx - a11 * cy, zeros, zeros],
        axis=1,
    )
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=matrix,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )
    if cfg.contrast:
        factor = uniform(6, 1 - cfg.contrast, 1 + cfg.contrast)[:, None, None, None]
        mean = tf.reduce_mean(out, axis=[1, 2, 3], keepdims=True)
        out = (out - mean) * factor + mean
    if cfg.brightness:
        out = out + uniform(7, -cfg.brightness, cfg.brightness)[:, None, None, None] * 255.0
    return tf.clip_by_value(out, 0.0, 255.0)


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 32,
    *,
    n_classes: int | None = None,
    sample_weights: np.ndarray | None = None,
    augment: AugmentConfig | None = None,
    seed: int | None = None,
    inputs: dict[str, np.ndarray] | None = None,
) -> tf.data.Dataset:
    """uint8 images -> batches of float32 pixels (0-255), in a fixed order or shuffled by `seed`.

    Yields `x` alone when there are no labels (prediction), else `(x, y)` (y one-hot when
    `n_classes` is given: what label smoothing needs), plus per-image weights when given.
    With `inputs` (more model inputs by name, one row per image, such as the patient
    metadata), `x` is a dict of them with the pixels under "image". With `augment` (which
    needs `seed`), batch i is augmented with the key (augment.seed, seed, i). Batches are
    prepared in parallel and prefetched while the model trains on the current one.
    """
    import tensorflow as tf

    if augment is not None and seed is None:
        raise ValueError("augmentation needs a seed")
    x_parts = images if inputs is None else {"image": images, **inputs}
    parts: tuple = (x_parts,) if labels is None else (x_parts, labels)
    if sample_weights is not None:
        parts += (np.asarray(sample_weights, dtype=np.float32),)
    ds = tf.data.Dataset.from_tensor_slices(parts)
    if seed is not None:
        # One fixed order per dataset: training builds a dataset per epoch with its own
        # seed, so the order of epoch k does not depend on how many epochs ran before.
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=False)
    key = None if augment is None else (augment.seed * 1_000_003 + seed) % (2**31 - 1)

    def prepare(index, batch):
        x, *rest = batch if isinstance(batch, tuple) else (batch,)
        pixels = tf.cast(x["image"] if inputs is not None else x, tf.float32)
        if key is not None:
            pixels = augment_batch(pixels, tf.stack([tf.constant(key, tf.int64), index]), augment)
        x = {**x, "image": pixels} if inputs is not None else pixels
        if rest and n_classes is not None:
            rest[0] = tf.one_hot(rest[0], n_classes)
        return (x, *rest) if rest else x

    # Fixed parallelism, autotuner off: with it on, epochs of the same work on 2 cores randomly
    # took much longer; off, every epoch takes the same time (docs/benchmarks.md, bench/autotune.py).
    options = tf.data.Options()
    options.autotune.enabled = False
    workers = min(4, os.cpu_count() or 1)
    ds = ds.batch(batch_size).enumerate().map(prepare, num_parallel_calls=workers).prefetch(2)
    return ds.with_options(options)


def write_preview(path: Path, images: np.ndarray, captions: Sequence[str], cfg: AugmentConfig) -> None:
    """A grid: each row one training image, then VARIANTS_PER_IMAGE augmented views of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tensorflow as tf

    rows = len(images)
    cols = VARIANTS_PER_IMAGE + 1
    h, w = images.shape[1:3]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6 * w / h, rows * 1.6), squeeze=False)
    batch = np.repeat(images, VARIANTS_PER_IMAGE, axis=0).astype(np.float32)
    views = np.asarray(augment_batch(tf.constant(batch), tf.constant([cfg.seed, 0], tf.int64), cfg))
    views = views.round().astype(np.uint8).reshape(rows, VARIANTS_PER_IMAGE, h, w, 3)
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
