from __future__ import annotations

import numpy as np
import pytest

from lesionml.config import AugmentConfig
from lesionml.data.augment import build_augmenter, make_dataset
from lesionml.data.normalize import NormStats, fit_stats
from lesionml.training import seed_everything


def test_fit_stats_matches_numpy_and_round_trips():
    x = np.random.default_rng(0).integers(0, 255, (37, 9, 11, 3), dtype=np.uint8)
    stats = fit_stats(x, chunk=5)
    np.testing.assert_allclose(stats.mean, x.reshape(-1, 3).mean(axis=0))
    np.testing.assert_allclose(stats.std, x.reshape(-1, 3).std(axis=0))
    assert NormStats.from_dict(stats.to_dict()) == stats
    z = stats.apply(x)
    np.testing.assert_allclose(z.reshape(-1, 3).mean(axis=0), 0, atol=1e-4)


def test_fit_stats_refuses_empty():
    with pytest.raises(ValueError, match="zero training images"):
        fit_stats(np.zeros((0, 4, 4, 3), np.uint8))


def test_augmenter_has_only_the_switched_on_layers():
    names = [type(layer).__name__ for layer in build_augmenter(AugmentConfig()).layers]
    assert names == ["RandomFlip", "RandomRotation", "RandomTranslation", "RandomZoom", "RandomBrightness", "RandomContrast"]
    off = AugmentConfig(horizontal_flip=False, vertical_flip=False, rotation_degrees=0, brightness=0, contrast=0)
    assert [type(layer).__name__ for layer in build_augmenter(off).layers] == ["RandomTranslation", "RandomZoom"]


def test_dataset_batches_and_augmentation_is_seeded():
    x = np.random.default_rng(1).integers(0, 255, (10, 16, 20, 3), dtype=np.uint8)
    y = np.arange(10)
    batches = list(make_dataset(x, y, 4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0][0].dtype.name == "float32"
    np.testing.assert_array_equal(np.asarray(batches[0][0]), x[:4].astype(np.float32))

    def first_batch(seed):
        seed_everything(seed)  # what training does first: one seed for Python, NumPy, TF
        ds = make_dataset(x, y, 4, augmenter=build_augmenter(AugmentConfig(seed=seed)), shuffle_seed=seed)
        return np.asarray(next(iter(ds))[0])

    a, b = first_batch(3), first_batch(3)
    np.testing.assert_allclose(a, b)
    assert not np.allclose(a, first_batch(4))
