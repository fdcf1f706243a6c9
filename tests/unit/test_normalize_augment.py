"""Normalization statistics and the augmentation input pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lesionml.config import AugmentConfig
from lesionml.data.augment import build_augmenter, describe, make_dataset
from lesionml.data.normalize import NormStats, fit_stats

ALL_LAYERS = ["RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom", "RandomBrightness", "RandomContrast"]


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


# --- augmentation layers -------------------------------------------------------------


def _layers(**switches) -> list[str]:
    return [type(layer).__name__ for layer in build_augmenter(AugmentConfig(**switches)).layers]


def test_default_augmenter_has_every_layer_in_order():
    assert _layers() == ALL_LAYERS


@pytest.mark.parametrize(
    "switches,absent",
    [
        ({"horizontal_flip": False, "vertical_flip": False}, "RandomFlip"),
        ({"rotation_degrees": 0}, "RandomRotation"),
        ({"shift_fraction": 0}, "RandomTranslation"),
        ({"zoom_fraction": 0}, "RandomZoom"),
        ({"brightness": 0}, "RandomBrightness"),
        ({"contrast": 0}, "RandomContrast"),
    ],
)
def test_each_switch_removes_exactly_its_layer(switches, absent):
    assert _layers(**switches) == [name for name in ALL_LAYERS if name != absent]


@pytest.mark.parametrize(
    "h,v,mode", [(True, True, "horizontal_and_vertical"), (True, False, "horizontal"), (False, True, "vertical")]
)
def test_flip_directions(h, v, mode):
    flip = build_augmenter(AugmentConfig(horizontal_flip=h, vertical_flip=v)).layers[0]
    assert type(flip).__name__ == "RandomFlip" and flip.mode == mode


def test_layer_strengths_follow_the_params():
    cfg = AugmentConfig(rotation_degrees=90, shift_fraction=0.2, zoom_fraction=0.3, brightness=0.25, contrast=0.4)
    config = {type(layer).__name__: layer.get_config() for layer in build_augmenter(cfg).layers}
    assert tuple(config["RandomRotation"]["factor"]) == (-0.25, 0.25)  # 90 degrees either way: a quarter turn
    assert config["RandomTranslation"]["height_factor"] == config["RandomTranslation"]["width_factor"] == 0.2
    assert config["RandomZoom"]["height_factor"] == 0.3
    assert tuple(config["RandomBrightness"]["factor"]) == (-0.25, 0.25)
    assert tuple(config["RandomContrast"]["factor"]) == (0.4, 0.4)
    assert tuple(config["RandomBrightness"]["value_range"]) == tuple(config["RandomContrast"]["value_range"]) == (0, 255)
    seeds = [c["seed"] for c in config.values()]
    assert len(set(seeds)) == len(seeds), "each layer draws from its own seed"


def _only(**switches) -> AugmentConfig:
    off = dict(horizontal_flip=False, vertical_flip=False, rotation_degrees=0, shift_fraction=0, zoom_fraction=0,
               brightness=0, contrast=0)
    return AugmentConfig(**{**off, **switches})


@pytest.fixture(scope="module")
def mid_grey_batch() -> np.ndarray:
    """Many images with values in 50-200, so a 10% change is never clipped at 0 or 255."""
    return np.random.default_rng(2).uniform(50, 200, (400, 8, 8, 3)).astype(np.float32)


def test_contrast_goes_both_ways(mid_grey_batch):
    x = mid_grey_batch
    y = np.asarray(build_augmenter(_only(contrast=0.1))(x, training=True))
    spread = lambda a: (a - a.mean(axis=(1, 2), keepdims=True)).std(axis=(1, 2, 3))  # noqa: E731
    ratio = spread(y) / spread(x)
    assert 0.899 <= ratio.min() < 0.95, "contrast must also be lowered, by up to 10%"
    assert 1.05 < ratio.max() <= 1.101, "contrast must also be raised, by up to 10%"


def test_brightness_goes_both_ways(mid_grey_batch):
    x = mid_grey_batch
    y = np.asarray(build_augmenter(_only(brightness=0.1))(x, training=True))
    shift = (y - x).mean(axis=(1, 2, 3))
    assert -25.6 <= shift.min() < -12 and 12 < shift.max() <= 25.6  # 10% of 0-255, either way


def test_everything_off_is_an_empty_augmenter_and_describe_lists_the_layers():
    off = AugmentConfig(
        horizontal_flip=False, vertical_flip=False, rotation_degrees=0, shift_fraction=0, zoom_fraction=0,
        brightness=0, contrast=0,
    )
    assert build_augmenter(off).layers == []
    assert describe(off)["layers"] == []
    spec = describe(AugmentConfig())
    assert len(spec["layers"]) == 6 and spec["params"]["seed"] == 42
    json.dumps(spec)  # written as spec.json


# --- the tf.data pipeline ------------------------------------------------------------


def test_make_dataset_yields_float32_batches_of_the_right_shape(pixels):
    labels = np.arange(len(pixels))
    batches = [(np.asarray(x), np.asarray(y)) for x, y in make_dataset(pixels, labels, 8)]
    assert [x.shape for x, _ in batches] == [(8, 16, 20, 3)] * 4 + [(5, 16, 20, 3)]
    assert all(x.dtype == np.float32 for x, _ in batches)
    np.testing.assert_array_equal(np.concatenate([x for x, _ in batches]), pixels.astype(np.float32))
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), labels)


def test_shuffled_dataset_keeps_image_label_pairs(pixels):
    labels = np.arange(len(pixels))
    xs, ys = zip(*((np.asarray(x), np.asarray(y)) for x, y in make_dataset(pixels, labels, 8, shuffle_seed=1)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert sorted(y) == list(labels) and list(y) != list(labels)
    np.testing.assert_array_equal(x, pixels[y].astype(np.float32))


def test_augmented_batches_keep_shape_and_change_pixels(pixels):
    labels = np.arange(len(pixels))
    ds = make_dataset(pixels, labels, 8, augmenter=build_augmenter(AugmentConfig(seed=1)))
    x, y = next(iter(ds))
    x = np.asarray(x)
    assert x.shape == (8, 16, 20, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(y), labels[:8])
    assert not np.allclose(x, pixels[:8].astype(np.float32))


def _first_batches(pixels: np.ndarray, seed: int) -> list[np.ndarray]:
    ds = make_dataset(pixels, np.arange(len(pixels)), 8, augmenter=build_augmenter(AugmentConfig(seed=seed)))
    return [np.asarray(x) for x, _ in ds]


def test_augmentation_is_repeatable_for_a_seed(pixels):
    """Two augmenters built with the same seed give the same views of the same batches."""
    a, b = _first_batches(pixels, 3), _first_batches(pixels, 3)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    c = _first_batches(pixels, 4)
    assert not np.allclose(a[0], c[0]), "another seed gives other views"


def test_direct_call_is_repeatable_for_a_seed(pixels):
    batch = pixels[:8].astype(np.float32)
    a = np.asarray(build_augmenter(AugmentConfig(seed=5))(batch, training=True))
    b = np.asarray(build_augmenter(AugmentConfig(seed=5))(batch, training=True))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, batch)


def test_each_epoch_draws_fresh_views(pixels):
    ds = make_dataset(pixels, np.arange(len(pixels)), 8, augmenter=build_augmenter(AugmentConfig(seed=3)))
    first, second = (np.asarray(next(iter(ds))[0]) for _ in range(2))
    assert not np.allclose(first, second)
