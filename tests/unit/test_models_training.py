"""Model builders, class weights, best-weights restore, resume after interruption, determinism."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from lesionml.config import MODEL_NAMES
from lesionml.data.normalize import NormStats
from lesionml.models import _builders, build_model
from lesionml.training import Checkpoint, WeightAverage, class_weights, fit, learning_rate
from tests.helpers import config

STATS = NormStats((120.0, 100.0, 90.0), (40.0, 35.0, 30.0), 10)
TINY_CNN = config("models.cnn", filters=(4, 8), convs_per_block=1, dense_units=8)
TINY_LSTM = config("models.cnn_lstm", filters=(4, 8), lstm_units=4, dense_units=4)


def test_registry_builds_exactly_the_configurable_models():
    assert tuple(_builders()) == MODEL_NAMES
    with pytest.raises(KeyError, match="unknown model 'resnet'"):
        build_model("resnet", TINY_CNN, (32, 40), STATS, 7)


@pytest.mark.parametrize("name,cfg", [("cnn", TINY_CNN), ("cnn_lstm", TINY_LSTM)])
def test_models_map_raw_pixels_to_class_probabilities(name, cfg):
    model = build_model(name, cfg, (32, 40), STATS, 7)
    assert model.input_shape == (None, 32, 40, 3)
    proba = np.asarray(model(np.full((2, 32, 40, 3), 128.0, np.float32)))
    assert proba.shape == (2, 7)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    norm = model.get_layer("zscore_train_stats")
    np.testing.assert_allclose(np.asarray(norm.mean).ravel(), STATS.mean)


def test_cnn_blocks_take_their_own_conv_counts():
    model = build_model(
        "cnn", config("models.cnn", filters=(4, 8, 8), convs_per_block=(1, 1, 3), dense_units=8), (32, 40), STATS, 7
    )
    convs = [layer.name for layer in model.layers if "_conv" in layer.name]
    assert convs == ["b0_conv0", "b1_conv0", "b2_conv0", "b2_conv1", "b2_conv2"]


@pytest.mark.parametrize("name,cfg", [("cnn", TINY_CNN), ("cnn_lstm", TINY_LSTM)])
def test_mixed_bfloat16_computes_in_bfloat16_but_z_scores_and_outputs_float32(name, cfg, tmp_path):
    import keras

    model = build_model(name, cfg, (32, 40), STATS, 7, precision="mixed_bfloat16")
    assert keras.config.dtype_policy().name == "float32", "the global policy is restored after building"
    policies = {layer.name: layer.dtype_policy.name for layer in model.layers}
    assert policies["zscore_train_stats"] == policies["probabilities"] == "float32"
    assert policies["b0_bn"] == "mixed_bfloat16"
    assert all(v.dtype == "float32" for v in model.weights), "weights stay float32"
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 40, 3)).astype(np.float32)
    proba = np.asarray(model(x))
    assert proba.dtype == np.float32
    # the saved model computes as the trained one did: the policy travels with each layer
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("b0_bn").dtype_policy.name == "mixed_bfloat16"
    np.testing.assert_array_equal(np.asarray(loaded(x)), proba)
    # bfloat16 rounds, but the model still says the same thing as its float32 twin
    twin = build_model(name, cfg, (32, 40), STATS, 7)
    twin.set_weights(model.get_weights())
    np.testing.assert_allclose(np.asarray(twin(x)), proba, atol=0.05)


def test_cnn_lstm_reads_the_feature_map_row_by_row():
    model = build_model("cnn_lstm", TINY_LSTM, (32, 40), STATS, 7)
    seq = model.get_layer("rows_as_sequence").output.shape
    # two 2x poolings: 32x40 -> 8x10 map of 8 channels -> 8 steps (rows) of 10*8 features
    assert tuple(seq) == (None, 8, 80)


def test_class_weights_are_balanced_and_cover_absent_classes():
    labels = np.array([5] * 60 + [4] * 30 + [0] * 10)
    w = class_weights(labels, 7)
    assert set(w) == set(range(7))
    assert w[0] == pytest.approx(100 / (3 * 10))
    assert w[5] == pytest.approx(100 / (3 * 60))
    assert w[1] == 1.0  # absent from training: neutral


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_class_weight_power_interpolates_and_keeps_the_mean_weight_at_one(power):
    labels = np.array([5] * 60 + [4] * 30 + [0] * 10)
    w = class_weights(labels, 7, power)
    assert np.mean([w[c] for c in labels]) == pytest.approx(1.0)
    assert w[0] / w[5] == pytest.approx(6.0**power)  # 6x rarer -> 6^power times the weight


def test_cosine_schedule_warms_up_then_decays_to_zero_and_plateau_is_stateful():
    cfg = config("train", epochs=5, learning_rate=0.1, warmup_epochs=1, lr_schedule="cosine")
    rates = [learning_rate(cfg, e, 0.0) for e in range(5)]
    assert rates[0] == pytest.approx(0.05)  # half-way up during the one warm-up epoch
    assert rates[1] == pytest.approx(0.1)
    assert rates == sorted(rates[:2]) + sorted(rates[2:], reverse=True)
    assert rates[-1] > 0 and rates[-1] < 0.02
    single = config(
        "train", epochs=1, learning_rate=0.1, warmup_epochs=3, lr_schedule="cosine"
    )  # warm-up never eats the only epoch
    assert learning_rate(single, 0, 0.0) == pytest.approx(0.1)
    assert learning_rate(config("train", lr_schedule="plateau"), 7, 0.004) == 0.004


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 255, (n, 32, 40, 3)).astype(np.uint8)
    y = rng.integers(0, 7, n).astype(np.int64)
    return x, y


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_fit_restores_best_epoch_and_writes_complete_model(tmp_path, precision):
    import keras

    x, y = _data()
    cfg = config("train", epochs=3, batch_size=16, early_stopping_patience=5, precision=precision, monitor="val_loss")
    model = build_model("cnn", TINY_CNN, (32, 40), STATS, 7, precision)
    result = fit(model, (x, y), (x[:16], y[:16]), cfg, tmp_path / "work", tmp_path / "model.keras", n_classes=7)
    history = pd.read_csv(result.history_path)
    assert list(history.epoch) == [1, 2, 3]
    assert result.best_epoch == int(history.val_loss.idxmin()) + 1
    assert result.best_value == pytest.approx(history.val_loss.min())
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x[:16], verbose=0), model.predict(x[:16], verbose=0), rtol=1e-5)
    assert not list(tmp_path.glob(".*tmp*")), "no temp files left behind"


def test_interrupted_training_resumes_from_last_epoch(tmp_path):
    x, y = _data()
    cfg = config("train", epochs=3, batch_size=16)

    def crash_after_second_epoch(epoch: int, metrics: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt  # like Ctrl-C, after epoch 2's history row was written

    def train(hook):  # a fresh model each time, as a restarted process would build it
        model = build_model("cnn", TINY_CNN, (32, 40), STATS, 7)
        work, out = tmp_path / "work", tmp_path / "model.keras"
        return fit(model, (x, y), (x[:16], y[:16]), cfg, work, out, n_classes=7, epoch_hooks=[hook])

    with pytest.raises(KeyboardInterrupt):
        train(crash_after_second_epoch)
    assert not (tmp_path / "model.keras").exists(), "an interrupted run must not leave a model file"
    first = pd.read_csv(tmp_path / "work" / "history.csv")
    assert list(first.epoch) == [1, 2]

    seen: list[int] = []
    result = train(lambda e, m: seen.append(e))
    assert seen == [3], "the resumed run trains only the epoch it had not finished"
    history = pd.read_csv(result.history_path)
    assert list(history.epoch) == [1, 2, 3]
    pd.testing.assert_frame_equal(history.iloc[:2], first)
    assert result.best_epoch == int(history.val_loss.idxmin()) + 1


def test_weight_average_starts_short_then_keeps_its_decay_and_swaps_in_and_out():
    model = build_model("cnn", TINY_CNN, (32, 40), STATS, 7)
    average = WeightAverage(model, 0.9, [], steps=0)
    floats = [v for v in model.variables if "float" in str(v.dtype)]
    assert average.variables == floats and len(floats) < len(model.variables), "seed states are not averaged"
    start = [np.array(v) for v in floats]
    for v in floats:
        v.assign(np.ones(v.shape, np.float32))
    average.update()  # step 0: decay (1 + 0) / (10 + 0) = 0.1, not 0.9
    for a, s in zip(average.averages, start, strict=False):
        np.testing.assert_allclose(a, 0.1 * s + 0.9, rtol=1e-6)
    average.steps = 1000
    before = [a.copy() for a in average.averages]
    average.update()  # long past the warm-up: the configured decay
    for a, b in zip(average.averages, before, strict=False):
        np.testing.assert_allclose(a, 0.9 * b + 0.1, rtol=1e-6)
    with average.applied():
        for v, a in zip(floats, average.averages, strict=False):
            np.testing.assert_array_equal(np.asarray(v), a)
    for v in floats:
        np.testing.assert_array_equal(np.asarray(v), 1.0)


def test_with_weight_averaging_the_saved_model_holds_the_average_not_the_live_weights(tmp_path):
    import keras

    x, y = _data()
    cfg = config("train", epochs=1, batch_size=8, ema_decay=0.9)  # one epoch: it is the best epoch
    model = build_model("cnn", TINY_CNN, (32, 40), STATS, 7)
    fit(model, (x, y), (x[:16], y[:16]), cfg, tmp_path / "work", tmp_path / "model.keras", n_classes=7)
    with np.load(tmp_path / "work" / "checkpoint.npz") as npz:
        live = [npz[f"m{i}"] for i in range(len(model.variables))]
        averages = [npz[k] for k in sorted((k for k in npz.files if k[0] == "a"), key=lambda k: int(k[1:]))]
        assert json.loads(str(npz["state"]))["averaged_steps"] == 6, "48 images / batch 8: 6 steps averaged"
    saved = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    floats = [k for k, v in enumerate(saved.variables) if "float" in str(v.dtype)]
    assert len(averages) == len(floats)
    for k, average in zip(floats, averages, strict=False):
        np.testing.assert_array_equal(np.asarray(saved.variables[k]), average)
    assert any(not np.array_equal(live[k], a) for k, a in zip(floats, averages, strict=False)), (
        "the average is not the live weights"
    )


def test_a_checkpoint_of_another_architecture_is_not_loaded(tmp_path, capsys):
    x, y = _data()
    cfg = config("train", epochs=1, batch_size=16)
    fit(
        build_model("cnn", TINY_CNN, (32, 40), STATS, 7),
        (x, y),
        (x[:16], y[:16]),
        cfg,
        tmp_path,
        tmp_path / "a.keras",
        n_classes=7,
    )
    other = build_model("cnn", config("models.cnn", filters=(4, 8, 16), dense_units=8), (32, 40), STATS, 7)
    other.compile(optimizer="adamw", loss="categorical_crossentropy")
    other.optimizer.build(other.trainable_variables)
    assert Checkpoint(tmp_path).load(other) is None
    assert "does not match this model" in capsys.readouterr().out


DETERMINISM_SCRIPT = """
import sys, numpy as np
from tests.helpers import config
from lesionml.data.normalize import NormStats
from lesionml.models import build_model
from lesionml.training import fit, seed_everything
seed_everything(7, deterministic=True)
rng = np.random.default_rng(0)
x = rng.integers(0, 255, (32, 24, 24, 3)).astype(np.uint8); y = rng.integers(0, 7, 32)
model = build_model("cnn", config("models.cnn", filters=(4,), convs_per_block=1, dense_units=4), (24, 24),
                    NormStats((0.,0.,0.), (1.,1.,1.), 1), 7)
fit(model, (x, y), (x, y), config("train", epochs=2, batch_size=8, seed=7, deterministic=True),
    __import__("pathlib").Path(sys.argv[1]), __import__("pathlib").Path(sys.argv[2]), n_classes=7)
np.save(sys.argv[3], np.concatenate([w.ravel() for w in model.get_weights()]))
"""


RESUME_SCRIPT = """
import sys, numpy as np
from pathlib import Path
from tests.helpers import config
from lesionml.data.normalize import NormStats
from lesionml.models import build_model
from lesionml.training import fit, seed_everything
work, interrupt, out, ema = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], float(sys.argv[4])
rng = np.random.default_rng(0)
x = rng.integers(0, 255, (32, 24, 24, 3)).astype(np.uint8); y = rng.integers(0, 7, 32)
cfg = config("train", epochs=3, batch_size=8, seed=7, deterministic=True, label_smoothing=0.1, class_weight_power=0.5,
                  ema_decay=ema)
def model():
    seed_everything(7, deterministic=True)
    return build_model("cnn", config("models.cnn", filters=(4,), convs_per_block=1, dense_units=4, dropout=0.3), (24, 24),
                       NormStats((0.,0.,0.), (1.,1.,1.), 1), 7)
def crash(epoch, metrics):
    if epoch == 2:
        raise KeyboardInterrupt
if interrupt:
    try:
        fit(model(), (x, y), (x, y), cfg, work, work / "m.keras", augment=config("augment"), n_classes=7, epoch_hooks=[crash])
    except KeyboardInterrupt:
        pass
m = model()
fit(m, (x, y), (x, y), cfg, work, work / "m.keras", augment=config("augment"), n_classes=7)
np.save(out, np.concatenate([np.asarray(v).ravel() for v in m.weights]))
"""


@pytest.mark.parametrize("ema", ["0", "0.9"], ids=["live-weights", "weight-average"])
def test_interrupted_then_resumed_training_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, ema):
    """Per-epoch seeds + a checkpoint holding optimizer, dropout-seed and averaging state make resume exact."""
    weights = []
    for k, interrupt in enumerate(("0", "1")):
        out = tmp_path / f"w{k}.npy"
        done = subprocess.run(
            [sys.executable, "-c", RESUME_SCRIPT, str(tmp_path / f"work{k}"), interrupt, str(out), ema],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        if interrupt == "1":
            assert "resuming after epoch 2" in done.stdout
        weights.append(np.load(out))
    np.testing.assert_array_equal(weights[0], weights[1])


def test_same_seed_with_determinism_gives_identical_weights(tmp_path):
    weights = []
    for k in range(2):
        out = tmp_path / f"w{k}.npy"
        subprocess.run(
            [
                sys.executable,
                "-c",
                DETERMINISM_SCRIPT,
                str(tmp_path / f"work{k}"),
                str(tmp_path / f"m{k}.keras"),
                str(out),
            ],
            check=True,
            capture_output=True,
        )
        weights.append(np.load(out))
    np.testing.assert_array_equal(weights[0], weights[1])


def test_initial_weights_depend_on_the_seed_alone_while_other_threads_draw_random_numbers():
    """A Dask worker's other threads draw from Python's shared `random` generator while a task
    seeds and builds its model: under seeded_construction the weights are still the seed's."""
    import random
    import threading
    import time

    from lesionml.training import seed_everything, seeded_construction

    def initial_weights(drawing: bool) -> list[np.ndarray]:
        stop = threading.Event()

        def draw() -> None:
            while not stop.wait(0.001):
                random.random()

        busy = threading.Thread(target=draw, daemon=True)
        seed_everything(7)
        if drawing:
            busy.start()
            time.sleep(0.2)  # the task reads its data meanwhile
        with seeded_construction(7):
            model = build_model("cnn", TINY_CNN, (32, 40), STATS, 7)
        stop.set()
        return model.get_weights()

    quiet = initial_weights(drawing=False)
    for weights in (initial_weights(drawing=True), initial_weights(drawing=True)):
        assert all(np.array_equal(a, b) for a, b in zip(quiet, weights, strict=True))


def test_an_ensemble_answers_the_mean_of_its_members_and_survives_a_save(tmp_path):
    import keras

    from lesionml.explain import gradcam
    from lesionml.models import ensemble, ensemble_members
    from lesionml.training import save_model, seed_everything

    members = []
    for seed in (1, 2):
        seed_everything(seed)
        members.append(build_model("cnn", TINY_CNN, (32, 40), STATS, 7))
    model = ensemble(members)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 40, 3)).astype(np.float32)
    expected = np.mean([np.asarray(m(images)) for m in members], axis=0)
    np.testing.assert_allclose(np.asarray(model(images)), expected, rtol=1e-6)
    save_model(model, tmp_path / "ensemble.keras")
    loaded = keras.saving.load_model(tmp_path / "ensemble.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(images)), expected, rtol=1e-6)
    assert len(ensemble_members(loaded)) == 2 and ensemble_members(members[0]) == [members[0]]
    maps = gradcam(loaded, images.astype(np.uint8), [0, 1, 2])
    mean = np.mean([gradcam(m, images.astype(np.uint8), [0, 1, 2]) for m in members], axis=0)
    np.testing.assert_allclose(maps, mean / mean.max(axis=(1, 2), keepdims=True), atol=1e-5)  # members' mean map
