"""Normalization statistics and the augmentation input pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lesionml.config import AugmentConfig
from lesionml.data.augment import augment_batch, describe, make_dataset, transformations
from lesionml.data.normalize import NormStats, fit_stats
from tests.helpers import config

ALL = ["horizontal_flip", "vertical_flip", "rotation", "zoom", "shift", "brightness", "contrast"]


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (37, 16, 20, 3), dtype=np.uint8)


# --- normalization -------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1024, 5, 1])
def test_fit_stats_equals_numpy(pixels, chunk):
    stats = fit_stats(pixels, chunk=chunk)
    flat = pixels.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(stats.mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.std, flat.std(axis=0), rtol=1e-9)
    assert stats.n_images == 37


def test_fit_stats_is_per_channel():
    x = np.zeros((4, 5, 6, 3), np.uint8)
    x[..., 0], x[..., 1] = 10, 200
    x[::2, ..., 2] = 100  # half the images 100, half 0
    stats = fit_stats(x)
    np.testing.assert_allclose(stats.mean, (10, 200, 50))
    np.testing.assert_allclose(stats.std, (1e-6, 1e-6, 50), atol=1e-5)  # constant channel: no division by 0


def test_fit_stats_refuses_zero_images():
    with pytest.raises(ValueError, match="zero training images"):
        fit_stats(np.zeros((0, 4, 4, 3), np.uint8))


def test_norm_stats_round_trip_through_json(pixels):
    stats = fit_stats(pixels)
    back = NormStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert back == stats
    assert isinstance(back.mean, tuple) and isinstance(back.std, tuple)


def test_apply_standardises_as_float32(pixels):
    stats = fit_stats(pixels)
    z = stats.apply(pixels)
    assert z.dtype == np.float32 and z.shape == pixels.shape
    np.testing.assert_allclose(z.reshape(-1, 3).mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z.reshape(-1, 3).std(axis=0), 1, atol=1e-4)


# --- augmentation ----------------------------------------------------------------------

ON = {
    "seed": 42,
    "horizontal_flip": True,
    "vertical_flip": True,
    "rotation_degrees": 180,
    "shift_fraction": 0.1,
    "zoom_fraction": 0.1,
    "brightness": 0.1,
    "contrast": 0.1,
}
OFF = {
    "horizontal_flip": False,
    "vertical_flip": False,
    "rotation_degrees": 0,
    "shift_fraction": 0,
    "zoom_fraction": 0,
    "brightness": 0,
    "contrast": 0,
}


def _only(**switches) -> AugmentConfig:
    return config("augment", **{**OFF, **switches})


def _on(**switches) -> AugmentConfig:
    return config("augment", **{**ON, **switches})


def _augment(x: np.ndarray, cfg: AugmentConfig, seed=(1, 0)) -> np.ndarray:
    import tensorflow as tf

    return np.asarray(augment_batch(tf.constant(x, tf.float32), tf.constant(seed, tf.int64), cfg))


def test_every_switch_on_gives_every_transformation_and_describe_lists_them():
    assert transformations(_on()) == ALL
    spec = describe(_on())
    assert spec["transformations"] == ALL and spec["params"]["seed"] == 42
    json.dumps(spec)  # written as spec.json
    assert transformations(_only()) == []


@pytest.mark.parametrize(
    "switch,name",
    [
        ({"horizontal_flip": False}, "horizontal_flip"),
        ({"vertical_flip": False}, "vertical_flip"),
        ({"rotation_degrees": 0}, "rotation"),
        ({"zoom_fraction": 0}, "zoom"),
        ({"shift_fraction": 0}, "shift"),
        ({"brightness": 0}, "brightness"),
        ({"contrast": 0}, "contrast"),
    ],
)
def test_each_switch_removes_exactly_its_transformation(switch, name):
    assert transformations(_on(**switch)) == [t for t in ALL if t != name]


def test_everything_off_is_the_identity(pixels):
    np.testing.assert_array_equal(_augment(pixels, _only()), pixels.astype(np.float32))


@pytest.mark.parametrize("h,v", [(True, False), (False, True), (True, True)])
def test_flips_give_exact_mirror_images_in_the_enabled_directions_only(pixels, h, v):
    out = _augment(pixels, _only(horizontal_flip=h, vertical_flip=v))
    x = pixels.astype(np.float32)
    allowed = {
        (False, False): x,
        (True, False): x[:, :, ::-1],
        (False, True): x[:, ::-1],
        (True, True): x[:, ::-1, ::-1],
    }
    views = {k: v_ for k, v_ in allowed.items() if (not k[0] or h) and (not k[1] or v)}
    seen = set()
    for i in range(len(x)):
        match = [k for k, view in views.items() if np.array_equal(out[i], view[i])]
        assert match, f"image {i} is not a mirror image allowed by the params"
        seen.add(match[0])
    assert len(seen) > 1, "some images must be flipped and some not"


def test_geometry_keeps_shape_and_range_and_changes_pixels(pixels):
    out = _augment(pixels, _only(rotation_degrees=180, zoom_fraction=0.2, shift_fraction=0.2))
    assert out.shape == pixels.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, pixels)


@pytest.fixture(scope="module")
def mid_grey_batch() -> np.ndarray:
    """Many images with values in 50-200, so a 10% change is never clipped at 0 or 255."""
    return np.random.default_rng(2).uniform(50, 200, (400, 8, 8, 3)).astype(np.float32)


def test_contrast_goes_both_ways(mid_grey_batch):
    x = mid_grey_batch
    y = _augment(x, _only(contrast=0.1))
    spread = lambda a: (a - a.mean(axis=(1, 2, 3), keepdims=True)).std(axis=(1, 2, 3))
    ratio = spread(y) / spread(x)
    assert 0.899 <= ratio.min() < 0.95, "contrast must also be lowered, by up to 10%"
    assert 1.05 < ratio.max() <= 1.101, "contrast must also be raised, by up to 10%"


def test_brightness_goes_both_ways(mid_grey_batch):
    x = mid_grey_batch
    shift = (_augment(x, _only(brightness=0.1)) - x).mean(axis=(1, 2, 3))
    assert -25.6 <= shift.min() < -12 and 12 < shift.max() <= 25.6  # 10% of 0-255, either way


def test_a_seed_gives_the_same_views_and_another_seed_other_views(pixels):
    a, b = _augment(pixels, _on(), (3, 0)), _augment(pixels, _on(), (3, 0))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, _augment(pixels, _on(), (4, 0)))
    assert not np.allclose(a, _augment(pixels, _on(), (3, 1)))


# --- the tf.data pipeline ------------------------------------------------------------


def test_make_dataset_yields_float32_batches_of_the_right_shape(pixels):
    labels = np.arange(len(pixels))
    batches = [(np.asarray(x), np.asarray(y)) for x, y in make_dataset(pixels, labels, 8)]
    assert [x.shape for x, _ in batches] == [(8, 16, 20, 3)] * 4 + [(5, 16, 20, 3)]
    assert all(x.dtype == np.float32 for x, _ in batches)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), pixels.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)


def test_images_only_one_hot_labels_and_weights(pixels):
    x = np.concatenate([np.asarray(b) for b in make_dataset(pixels, batch_size=8)])
    np.testing.assert_array_equal(x, pixels.astype(np.float32))
    labels = np.arange(len(pixels)) % 7
    weights = np.linspace(0.5, 2, len(pixels))
    _, y, w = (
        np.concatenate([np.asarray(b[k]) for b in make_dataset(pixels, labels, 8, n_classes=7, sample_weights=weights)])
        for k in range(3)
    )
    np.testing.assert_array_equal(y.argmax(axis=1), labels)
    assert y.shape == (len(pixels), 7) and y.sum() == len(pixels)
    np.testing.assert_allclose(w, weights.astype(np.float32))


def test_shuffled_dataset_keeps_image_label_pairs(pixels):
    labels = np.arange(len(pixels))
    xs, ys = zip(*((np.asarray(x), np.asarray(y)) for x, y in make_dataset(pixels, labels, 8, seed=1)), strict=False)
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert sorted(y) == list(labels) and list(y) != list(labels)
    np.testing.assert_array_equal(x, pixels[y].astype(np.float32))


def _epoch(pixels: np.ndarray, seed: int) -> list[np.ndarray]:
    ds = make_dataset(pixels, np.arange(len(pixels)), 8, augment=_on(seed=3), seed=seed)
    return [np.asarray(x) for x, _ in ds]


def test_augmented_epochs_are_repeatable_per_seed_and_fresh_across_seeds(pixels):
    a, b = _epoch(pixels, 5), _epoch(pixels, 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert a[0].shape == (8, 16, 20, 3) and not np.allclose(a[0], a[1][: len(a[0])])
    c = _epoch(pixels, 6)
    assert not np.allclose(np.concatenate(a), np.concatenate(c)), "another epoch seed gives other views"


def test_iterating_one_dataset_twice_gives_the_same_epoch(pixels):
    """The order and the views belong to the dataset's seed, not to how often it was read."""
    ds = make_dataset(pixels, np.arange(len(pixels)), 8, augment=_on(seed=3), seed=5)
    first, second = ([np.asarray(x) for x, _ in ds] for _ in range(2))
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)


def test_augmentation_without_a_seed_is_refused(pixels):
    with pytest.raises(ValueError, match="needs a seed"):
        make_dataset(pixels, np.arange(len(pixels)), 8, augment=config("augment"))
