"""Grad-CAM: where in an image a model looked for the class it answered.

Grad-CAM (Selvaraju et al., ICCV 2017) weighs each channel of the last convolutional feature
map by the mean gradient of the class's logit over that map, sums the channels, keeps the
positive part and upsamples it to the input image. Written here with `tf.GradientTape`
because the maintained libraries lag Keras 3. The same function explains both models: the
CNN's map reaches the logit through pooling and dense layers, the CNN+LSTM's through the
LSTM reading its rows, and the gradient follows either path.

The logit, not the probability, is differentiated: a confident softmax has a near-zero
gradient, which would leave the map of the images the model is surest of mostly noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lesionml.data.metadata import CLASSES
from lesionml.errors import LesionMLError
from lesionml.plots import figure_grid, save_figure

if TYPE_CHECKING:
    import keras
    import pandas as pd


def last_conv_layer(model: keras.Model) -> keras.layers.Layer:
    """The model's last 2-D convolution in graph order: the finest map that already sees
    the classes, and the one whose channels Grad-CAM weighs. Found by type, so it holds for
    any depth or block layout the params give."""
    import keras

    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    if not convs:
        raise LesionMLError(f"model '{model.name}' has no Conv2D layer: Grad-CAM needs a convolutional feature map")
    return convs[-1]


def _softmax_head(model: keras.Model) -> keras.layers.Dense:
    import keras

    head = model.layers[-1]
    if not (isinstance(head, keras.layers.Dense) and head.activation is keras.activations.softmax):
        raise LesionMLError(
            f"model '{model.name}' does not end in a softmax Dense layer ('{head.name}'): Grad-CAM needs its logits"
        )
    return head


def _probe(model: keras.Model) -> tuple[keras.Model, keras.layers.Dense]:
    """A model from the input to (the last conv's map, the softmax layer's input), and that layer.

    A functional model's layers each hold the one call that built it, so their tensors wire
    the probe directly. A Sequential model rebuilds its graph at every `add` (and when it is
    loaded), so its layers' first tensors belong to stale partial graphs, whose map does not
    reach the head; a Sequential is a chain, so the probe calls its layers again in order.
    """
    import keras

    conv, head = last_conv_layer(model), _softmax_head(model)
    if not isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, [conv.output, head.input]), head
    x = inputs = keras.Input(shape=model.input_shape[1:])
    for layer in model.layers[:-1]:
        x = layer(x)
        if layer is conv:
            feature_map = x
    return keras.Model(inputs, [feature_map, x]), head


def gradcam(
    model: keras.Model,
    images: np.ndarray,
    classes: Sequence[int],
    batch_size: int = 32,
    metadata: pd.DataFrame | None = None,
) -> np.ndarray:
    """Heatmaps (N, H, W) in [0, 1] of uint8 images (N, H, W, 3) for one class index each.

    Each map is scaled to its own maximum (all zeros where no location raises the logit),
    at the input image's size, so it overlays the image the model saw pixel for pixel.
    A model with the metadata branch is given `metadata` (one row per image; None: withheld),
    so the map explains the answer it gave with the inputs it was given. An ensemble's map is
    the mean of its members' maps: it answers with the mean of their probabilities.
    """
    import tensorflow as tf

    from lesionml.models import ensemble_members
    from lesionml.models.patient import patient_inputs, uses_metadata

    members = ensemble_members(model)
    if len(members) > 1:
        return _unit_peak(np.mean([gradcam(m, images, classes, batch_size, metadata) for m in members], axis=0))
    extra = patient_inputs(metadata, len(images)) if uses_metadata(model) else None
    probe, head = _probe(model)
    kernel = tf.cast(head.kernel, tf.float32)
    bias = tf.cast(head.bias, tf.float32)
    height, width = images.shape[1:3]
    out = np.zeros(images.shape[:3], np.float32)
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start : start + batch_size], tf.float32)
        if extra is not None:
            x = {"image": x, **{k: tf.convert_to_tensor(v[start : start + batch_size]) for k, v in extra.items()}}
        chosen = tf.one_hot(np.asarray(classes[start : start + batch_size], np.int64), kernel.shape[1])
        with tf.GradientTape() as tape:
            feature_map, features = probe(x, training=False)
            logits = tf.matmul(tf.cast(features, tf.float32), kernel) + bias
            score = tf.reduce_sum(logits * chosen)  # each image's logit depends on its own map only
        grads = tf.cast(tape.gradient(score, feature_map), tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(feature_map, tf.float32), axis=-1, keepdims=True))
        cam = tf.image.resize(cam, (height, width), method="bilinear")[..., 0].numpy()
        out[start : start + len(cam)] = _unit_peak(cam)
    return out


def _unit_peak(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum (all zeros stay zeros)."""
    peak = maps.max(axis=(1, 2), keepdims=True)
    return np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)


def mass_inside(heatmaps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image, the share of the heatmap's total that lies inside the mask (0 for an empty map)."""
    total = heatmaps.sum(axis=(1, 2))
    inside = (heatmaps * masks).sum(axis=(1, 2))
    return np.divide(inside, total, out=np.zeros_like(total, dtype=np.float64), where=total > 0)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The image with the heatmap blended over it in the jet colour map (uint8 RGB)."""
    from matplotlib import colormaps

    colour = colormaps["jet"](heatmap)[..., :3] * 255.0
    return np.clip((1 - alpha) * image + alpha * colour, 0, 255).astype(np.uint8)


def write_overlay(image: np.ndarray, heatmap: np.ndarray, title: str, path: Path) -> None:
    """The image beside its overlay, titled with the answer being explained, as one PNG."""
    fig, axes = figure_grid(1, 2, (5.6, 2.6))
    axes[0, 0].imshow(image)
    axes[0, 0].set_title("image", fontsize=8)
    axes[0, 1].imshow(overlay(image, heatmap))
    axes[0, 1].set_title("Grad-CAM", fontsize=8)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def _mosaic(images: np.ndarray, heatmaps: np.ndarray, cols: int, gap: int) -> np.ndarray:
    """(image, overlay) pairs tiled `cols` pairs a row, `gap` white pixels above each row for
    its titles: one array drawn with one imshow, many times faster than a subplot per image."""
    height, width = images.shape[1:3]
    rows = max(1, int(np.ceil(len(images) / cols)))
    out = np.full((rows * (height + gap), cols * (2 * width + gap), 3), 255, np.uint8)
    for k, (image, heatmap) in enumerate(zip(images, heatmaps, strict=True)):
        top, left = (k // cols) * (height + gap) + gap, (k % cols) * (2 * width + gap)
        out[top : top + height, left : left + width] = image
        out[top : top + height, left + width : left + 2 * width] = overlay(image, heatmap)
    return out


def _grid(images: np.ndarray, heatmaps: np.ndarray, titles: list[str], title: str, path: Path, cols: int = 4) -> None:
    """Each image beside its overlay, titled; a figure that says so when there is nothing to show."""
    gap = max(8, images.shape[1] // 6)
    mosaic = _mosaic(images, heatmaps, cols, gap)
    scale = 1.6 / 100  # inches per pixel: small images stay readable
    fig, axes = figure_grid(1, 1, (max(4.0, mosaic.shape[1] * scale), max(1.5, mosaic.shape[0] * scale + 0.4)))
    ax = axes[0, 0]
    ax.imshow(mosaic, interpolation="nearest")
    height, width = images.shape[1:3]
    for k, text in enumerate(titles):
        ax.text((k % cols) * (2 * width + gap), (k // cols) * (height + gap) + gap - 2, text, fontsize=6, va="bottom")
    if not titles:
        ax.text(0, mosaic.shape[0] / 2, "none in this split", fontsize=9)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def evaluation_figures(
    model: keras.Model,
    images: np.ndarray,
    y_true: np.ndarray,
    proba: np.ndarray,
    label: str,
    prefix: str,
    out: Path,
    per_class: int = 8,
    mistakes: int = 12,
    metadata: pd.DataFrame | None = None,
) -> list[str]:
    """Grad-CAM figures of one split; returns their file names in `out`.

    One grid per class of its most confidently right images (what the model looks at when
    it is right), and one of the most confident mistakes, each explained for the class the
    model wrongly answered (what misled it). `proba` are the decisions as served, made with
    `metadata` (one row per image) for a model with the metadata branch.
    """
    predicted = proba.argmax(axis=1)
    confidence = proba.max(axis=1)
    by_confidence = np.argsort(-confidence, kind="stable")
    wrong = by_confidence[predicted[by_confidence] != y_true[by_confidence]]
    groups = {
        f"{prefix}_gradcam_{c}.png": (
            by_confidence[(y_true[by_confidence] == k) & (predicted[by_confidence] == k)][:per_class],
            f"Grad-CAM, correctly classified {c}: {label}",
        )
        for k, c in enumerate(CLASSES)
    }
    groups[f"{prefix}_gradcam_mistakes.png"] = (wrong[:mistakes], f"Grad-CAM of the most confident mistakes: {label}")
    picked = np.concatenate([indices for indices, _ in groups.values()])
    rows = None if metadata is None else metadata.iloc[picked].reset_index(drop=True)
    maps = gradcam(model, images[picked], predicted[picked], metadata=rows)
    heatmaps = dict(zip(picked.tolist(), maps, strict=True))
    for name, (indices, title) in groups.items():
        titles = [f"{CLASSES[y_true[i]]}->{CLASSES[predicted[i]]} {confidence[i]:.2f}" for i in indices]
        maps = np.array([heatmaps[i] for i in indices]).reshape(len(indices), *images.shape[1:3])
        _grid(images[indices], maps, titles, title, out / name)
    return list(groups)


def explain_files(
    model: keras.Model,
    items: Sequence[tuple[str, bytes | None]],
    answers: Sequence[str | None],
    out_dir: Path,
    metadata: pd.DataFrame | None = None,
) -> list[Path | None]:
    """One overlay PNG in `out_dir` per (name, bytes) item, explaining the class it was answered
    (`answers`, None for an item that could not be predicted, which gets no file).

    Files are named after the image (`<stem>.png`, `<stem>-2.png` for a second image of that
    name), so a folder of explanations reads like the folder of images it explains.
    `metadata` (one row per item, as predicted with) goes to a model with the metadata branch.
    """
    from lesionml.inference import decode_items, image_size

    wanted = [(name, data if answer else None) for (name, data), answer in zip(items, answers, strict=True)]
    images, ok, _ = decode_items(wanted, image_size(model))
    rows = None if metadata is None else metadata.iloc[ok].reset_index(drop=True)
    heatmaps = gradcam(model, images, [CLASSES.index(answers[k]) for k in ok], metadata=rows)
    paths: list[Path | None] = [None] * len(items)
    taken: set[str] = set()
    for k, image, heatmap in zip(ok, images, heatmaps, strict=True):
        stem = Path(items[k][0]).stem
        name, n = f"{stem}.png", 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name)
        paths[k] = out_dir / name
        write_overlay(image, heatmap, f"{Path(items[k][0]).name}: where the model saw {answers[k]}", paths[k])
    return paths
