"""Grad-CAM: the maps point at what decided the class, for both architectures, and the figures
and overlay files evaluation and `lesionml predict --explain` write from them."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
from PIL import Image

from lesionml.data.metadata import CLASSES
from lesionml.data.normalize import NormStats
from lesionml.explain import evaluation_figures, explain_files, gradcam, last_conv_layer, mass_inside
from lesionml.models import build_model
from lesionml.training import fit, seed_everything, seeded_construction
from tests.helpers import config, patch_images

SIZE = (40, 50)
PATCH = 0.10  # the largest square the check allows: the share of the image that decides the class
STATS = NormStats((150.0, 120.0, 110.0), (50.0, 45.0, 45.0), 10)
# Tiny but able to find a coloured square: the CNN's last conv map is 20x25; the CNN+LSTM's one
# block keeps its map at 40x50, since its LSTM mixes columns and rows, which coarser maps blur.
TINY = {
    "cnn": config(
        "models.cnn",
        filters=(8, 16),
        convs_per_block=1,
        kernel_size=3,
        dropout=0.1,
        head="flatten",
        dense_units=16,
        dense_dropout=0.0,
    ),
    "cnn_lstm": config(
        "models.cnn_lstm",
        filters=(16,),
        kernel_size=3,
        lstm_units=16,
        bidirectional=False,
        dense_units=16,
        dropout=0.0,
        dense_dropout=0.0,
    ),
}
# Weight decay pulls to zero the weights on background features, which carry no label and
# would otherwise keep their random start: without it the maps keep a haze over the background.
TRAIN = config(
    "train",
    epochs=30,
    batch_size=16,
    learning_rate=3e-3,
    weight_decay=0.9,
    class_weight_power=0.0,
    label_smoothing=0.0,
    lr_schedule="cosine",
    warmup_epochs=1,
    monitor="val_loss",
    early_stopping_patience=0,
    ema_decay=0.0,
    precision="float32",
)


@pytest.fixture(scope="module")
def patch_task():
    """Images whose class is only a small coloured square (10% of the image), train and held-out."""
    train_labels = [c for c in CLASSES for _ in range(40)]
    held_labels = [c for c in CLASSES for _ in range(8)]
    x, _ = patch_images(train_labels, SIZE, PATCH, seed=0)
    x_held, masks = patch_images(held_labels, SIZE, PATCH, seed=1)
    y = np.array([CLASSES.index(c) for c in train_labels])
    y_held = np.array([CLASSES.index(c) for c in held_labels])
    return x, y, x_held, y_held, masks


@pytest.fixture(scope="module")
def trained(patch_task, tmp_path_factory):
    """trained(name, shuffled) -> the model fitted once per module, loaded back from its file as
    evaluation and serving load it; `shuffled` trains on a permutation of the labels."""
    import keras

    x, y, x_held, y_held, _ = patch_task
    seconds = {}

    @functools.cache
    def train(name: str, shuffled: bool):
        started = time.perf_counter()
        seed_everything(0)
        labels = np.random.default_rng(0).permutation(y) if shuffled else y
        tmp = tmp_path_factory.mktemp(f"{name}-{'shuffled' if shuffled else 'true'}")
        with seeded_construction(0):  # the same initial weights whichever tests ran before
            model = build_model(name, TINY[name], SIZE, STATS, len(CLASSES))
        fit(model, (x, labels), (x_held, y_held), TRAIN, tmp / "work", tmp / "model.keras", n_classes=len(CLASSES))
        seconds[name, shuffled] = time.perf_counter() - started
        return keras.saving.load_model(tmp / "model.keras", safe_mode=True)

    yield train
    print("\ntraining seconds: " + ", ".join(f"{n}{' shuffled' if s else ''} {t:.1f}" for (n, s), t in seconds.items()))


def _mass_on_patch(model, images, masks) -> tuple[float, np.ndarray]:
    predicted = np.asarray(model.predict(images, verbose=0)).argmax(axis=1)
    return float(mass_inside(gradcam(model, images, predicted), masks).mean()), predicted


@pytest.mark.parametrize("name", ["cnn", "cnn_lstm"])
def test_heatmap_mass_falls_on_the_patch_that_decides_the_class(name, trained, patch_task):
    *_, x_held, y_held, masks = patch_task
    model = trained(name, False)
    mass, predicted = _mass_on_patch(model, x_held, masks)
    print(f"\n{name}: {mass:.2f} of the heatmap on the patch, accuracy {(predicted == y_held).mean():.2f}")
    assert (predicted == y_held).mean() >= 0.9, "the model learned the patch task"
    assert mass >= 0.5, f"{name}: only {mass:.2f} of the heatmap on the 10% of the image that decides the class"


@pytest.mark.parametrize("name", ["cnn", "cnn_lstm"])
def test_a_model_trained_on_shuffled_labels_fails_the_patch_check(name, trained, patch_task):
    *_, x_held, y_held, masks = patch_task
    model = trained(name, True)
    mass, predicted = _mass_on_patch(model, x_held, masks)
    print(f"\n{name} on shuffled labels: {mass:.2f} of the heatmap on the patch")
    assert (predicted == y_held).mean() < 0.5, "nothing to learn from shuffled labels"
    assert mass < 0.5, f"{name}: {mass:.2f} of the heatmap on the patch without having learned it"


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_last_conv_layer_and_map_shape_for_each_architecture(precision):
    cnn = build_model(
        "cnn", config("models.cnn", filters=(4, 8), convs_per_block=(1, 2), dense_units=4), SIZE, STATS, 7, precision
    )
    lstm = build_model(
        "cnn_lstm", config("models.cnn_lstm", filters=(4, 8), lstm_units=4, dense_units=4), SIZE, STATS, 7, precision
    )
    assert last_conv_layer(cnn).name == "b1_conv1"
    assert last_conv_layer(lstm).name == "b1_conv0"
    images = np.random.default_rng(0).integers(0, 255, (3, *SIZE, 3)).astype(np.uint8)
    for model in (cnn, lstm):
        maps = gradcam(model, images, [0, 3, 6])
        assert maps.shape == (3, *SIZE) and maps.dtype == np.float32
        assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1


def test_a_model_without_a_convolution_is_refused_in_one_line():
    import keras

    from lesionml.errors import LesionMLError

    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(7, activation="softmax")], name="dense_only")
    with pytest.raises(LesionMLError, match="model 'dense_only' has no Conv2D layer"):
        gradcam(dense, np.zeros((1, 4)), [0])


def test_evaluation_figures_and_overlay_files_are_real_pngs(tmp_path):
    model = build_model("cnn", config("models.cnn", filters=(4, 8), dense_units=4), SIZE, STATS, 7)
    labels = [c for c in CLASSES for _ in range(3)]
    images, _ = patch_images(labels, SIZE, seed=2)
    y = np.array([CLASSES.index(c) for c in labels])
    proba = np.full((len(y), 7), 0.01)
    proba[np.arange(len(y)), np.where(y == 3, 5, y)] = 0.9  # every df called nv: df has no right answers
    names = evaluation_figures(model, images, y, proba, "tiny, test split", "test", tmp_path)
    assert names == [f"test_gradcam_{c}.png" for c in CLASSES] + ["test_gradcam_mistakes.png"]
    for name in names:
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 100

    png = (tmp_path / "test_gradcam_bcc.png").read_bytes()
    items = [("a/x.jpg", png), ("b/x.jpg", png), ("broken.jpg", b"not an image"), ("gone.jpg", None)]
    paths = explain_files(model, items, ["mel", "nv", None, None], tmp_path / "out")
    assert [p.name if p else None for p in paths] == ["x.png", "x-2.png", None, None]
    with Image.open(paths[0]) as im:
        assert im.format == "PNG"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x-2.png", "x.png"]
