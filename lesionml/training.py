"""Compile and fit a model: seeds, class weights, learning-rate schedule, resumable checkpoints.

Design points:
- An explicit loop over epochs, one `model.fit(epochs=1)` each, instead of Keras callbacks:
  every piece of training state (weights, optimizer moments, dropout seed states, the
  best epoch so far and its weights, the early-stopping and plateau counters, the history)
  lives in ONE checkpoint file written atomically at every epoch end. A run killed at any
  moment resumes from its last finished epoch, and never from a half-written state.
- Epoch k shuffles and augments with a seed derived from (train.seed, k), so what epoch k
  sees does not depend on whether the run was interrupted before it: with
  `train.deterministic: true` a resumed run ends with the same weights as an
  uninterrupted one.
- The best epoch (by `train.monitor`) is what gets saved and evaluated, never simply the
  last one. Validation metrics are computed here, unweighted, so `val_loss` means the
  same thing whatever the class weights or label smoothing.
- The model file is written to a temp name and renamed: a later stage never loads a
  half-written model.
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lesionml.config import AugmentConfig, TrainConfig
from lesionml.data.augment import make_dataset
from lesionml.io import atomic_path

if TYPE_CHECKING:
    import keras

HISTORY_COLUMNS = (
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "val_balanced_accuracy",
    "learning_rate",
    "seconds",
)
# Validation with every image's metadata withheld, for models with the metadata branch: how
# the model answers an image that comes without it.
WITHHELD_COLUMNS = ("val_loss_withheld", "val_accuracy_withheld", "val_balanced_accuracy_withheld")
EpochHook = Callable[[int, dict[str, float]], None]
CHECKPOINT = "checkpoint.npz"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """One seed for Python, NumPy and TensorFlow (and op determinism when asked)."""
    import keras
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


_CONSTRUCTING = threading.Lock()


@contextmanager
def seeded_construction(seed: int) -> Iterator[None]:
    """Build a model inside this block for initial weights fixed by `seed` alone, whatever else runs.

    Keras draws the seed of every initializer and dropout layer built without one from the
    process-wide `random` generator. In a Dask worker other threads draw from it too (the
    worker's event loop, Prefect's clients) between `seed_everything` and the model's
    construction, so the same seed gave other initial weights on every try there. Inside
    this block Keras draws from a generator of its own, seeded as `random.seed(seed)` leaves
    the shared one: a run in which nothing else drew (the flow's own process) builds exactly
    the weights it built before. Keras keeps that generator in a private module attribute;
    tests/unit/test_models_training.py fails if a Keras upgrade moves it.
    """
    from keras.src.random import seed_generator

    with _CONSTRUCTING:
        shared = seed_generator.python_random
        seed_generator.python_random = random.Random(seed)
        try:
            yield
        finally:
            seed_generator.python_random = shared


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffling/augmentation seed of one epoch: fixed by (run seed, epoch) alone."""
    return (seed * 1_000_003 + epoch) % (2**31 - 1)


def class_weights(labels: np.ndarray, n_classes: int, power: float = 1.0) -> dict[int, float]:
    """Balanced weights n / (k * count) raised to `power`, rescaled to average 1 per image.

    power 1 is scikit-learn's 'balanced' (a mistake on a rare class costs as much in total as
    one on nv); 0 is no weighting; in between softens the trade. Rescaling keeps the loss,
    and so the useful learning rate, on the same scale whatever the power. Classes absent
    from `labels` get weight 1.
    """
    present, counts = np.unique(labels, return_counts=True)
    raw = (len(labels) / (len(present) * counts)) ** power
    raw = raw / (raw * counts).sum() * len(labels)
    out = {int(c): 1.0 for c in range(n_classes)}
    out.update({int(c): float(w) for c, w in zip(present, raw, strict=True)})
    return out


def learning_rate(cfg: TrainConfig, epoch: int, plateau_lr: float) -> float:
    """The rate for 0-based `epoch`: linear warm-up then cosine to 0, or the plateau rule's rate."""
    if cfg.lr_schedule == "plateau":
        return plateau_lr
    warmup = min(cfg.warmup_epochs, cfg.epochs - 1)
    if epoch < warmup:
        return cfg.learning_rate * (epoch + 1) / (warmup + 1)
    progress = (epoch - warmup) / max(1, cfg.epochs - warmup)
    return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def _validation_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    from sklearn import metrics as skm

    from lesionml.evaluation import log_loss

    proba = proba / proba.sum(axis=1, keepdims=True)  # a float32 softmax sums to 1 only within 1e-7
    pred = proba.argmax(axis=1)
    with warnings.catch_warnings():  # a class predicted but absent from val is fine here
        warnings.simplefilter("ignore", UserWarning)
        balanced = skm.balanced_accuracy_score(y, pred)
    return {
        "val_loss": log_loss(y, proba),
        "val_accuracy": float((pred == y).mean()),
        "val_balanced_accuracy": float(balanced),
    }


class Checkpoint:
    """Everything a resumed run needs, in one file replaced atomically at every epoch end.

    Arrays: the model's variables (weights, batch-norm statistics, dropout seed states),
    the optimizer's variables (step, moments), the best epoch's model variables and, with
    `train.ema_decay`, the running averages of the float variables; plus the loop state
    (epochs done, best score, counters, averaged steps, history rows) as JSON text.
    Nothing is pickled.
    """

    def __init__(self, folder: Path):
        self.path = folder / CHECKPOINT

    def save(
        self, model: keras.Model, best: list[np.ndarray], state: dict[str, Any], averages: list[np.ndarray]
    ) -> None:
        arrays = {f"m{i}": np.asarray(v) for i, v in enumerate(model.variables)}
        arrays |= {f"o{i}": np.asarray(v) for i, v in enumerate(model.optimizer.variables)}
        arrays |= {f"b{i}": w for i, w in enumerate(best)}
        arrays |= {f"a{i}": w for i, w in enumerate(averages)}
        with atomic_path(self.path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, state=np.asarray(json.dumps(state)), **arrays)

    def load(self, model: keras.Model) -> tuple[list[np.ndarray], dict[str, Any], list[np.ndarray]] | None:
        """Restore model and optimizer in place; None if there is no usable checkpoint.

        Returns the best epoch's variables, the loop state and the weight averages (empty
        when the run does not average)."""
        if not self.path.exists():
            return None
        with np.load(self.path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        targets = [("m", model.variables), ("o", model.optimizer.variables)]
        if any(
            len(variables) != sum(k.startswith(p) and k[1:].isdigit() for k in arrays)
            or any(tuple(v.shape) != arrays[f"{p}{i}"].shape for i, v in enumerate(variables))
            for p, variables in targets
        ):
            print(f"{self.path}: checkpoint does not match this model (the code changed); starting afresh")
            return None
        for p, variables in targets:
            for i, v in enumerate(variables):
                v.assign(arrays[f"{p}{i}"])
        best = [arrays[f"b{i}"] for i in range(len(model.variables))]
        averages = [arrays[f"a{i}"] for i in range(sum(k.startswith("a") and k[1:].isdigit() for k in arrays))]
        return best, json.loads(str(arrays["state"])), averages


class WeightAverage:
    """An exponential moving average of a model's float variables, updated after every step.

    Why: late in a run the weights wander around a minimum with the noise of each batch;
    their average sits nearer its centre than any one step's weights, and generalizes
    better (Polyak averaging, as in SWA and the EMA of modern training recipes). Batch-norm
    statistics are averaged with the weights, so the averaged weights run with statistics
    gathered along the same path. The first steps use a shorter memory ((1 + n) / (10 + n)),
    so the average does not start as a long memory of the random initialization.
    Validation, the best-epoch choice and the saved model all use the average; training
    steps use the live weights.
    """

    def __init__(self, model: keras.Model, decay: float, averages: list[np.ndarray], steps: int):
        self.variables = [v for v in model.variables if "float" in str(v.dtype)]
        self.decay = decay
        self.averages = averages or [np.array(v, dtype=np.float32) for v in self.variables]
        self.steps = steps

    def update(self) -> None:
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for average, variable in zip(self.averages, self.variables, strict=True):
            average *= decay
            average += (1 - decay) * np.asarray(variable)
        self.steps += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the averages inside the block, its live weights again after it."""
        live = [np.array(v) for v in self.variables]
        for variable, average in zip(self.variables, self.averages, strict=True):
            variable.assign(average)
        try:
            yield
        finally:
            for variable, weights in zip(self.variables, live, strict=True):
                variable.assign(weights)


@dataclass(frozen=True)
class FitResult:
    model_path: Path
    history_path: Path
    epochs_run: int
    best_epoch: int
    best_value: float
    seconds: float  # wall time of all epochs (training + validation), across resumes
    train_images_per_second: float


def _improved(monitor: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value < best if monitor.endswith("loss") else value > best


def save_model(model: keras.Model, path: Path) -> None:
    """A complete .keras file at `path`, atomically: a later stage never loads a half-written model."""
    with atomic_path(path.with_suffix(".keras")) as tmp:
        keras_tmp = tmp.with_suffix(".keras")  # Keras insists on the suffix
        try:
            model.save(keras_tmp)
            keras_tmp.replace(tmp)
        finally:  # a failed save (disk full) must not leave its partial file behind
            keras_tmp.unlink(missing_ok=True)


def fit(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    cfg: TrainConfig,
    workdir: Path,
    out_model: Path,
    *,
    augment: AugmentConfig | None = None,
    n_classes: int,
    epoch_hooks: list[EpochHook] | None = None,
    metadata: tuple[pd.DataFrame, pd.DataFrame] | None = None,
    withhold: float = 0.0,
) -> FitResult:
    """Train `model` and save its best-epoch weights as a complete .keras file at `out_model`.

    `workdir` holds the checkpoint and history of this training run: a later call with the
    same workdir resumes after the last finished epoch.

    A model with the metadata branch needs `metadata`: the train and val rows (age, sex,
    localization; image_id names a bad row), aligned with the images and validated before
    the first epoch. Each epoch withholds the metadata of a `withhold` share of the training
    images, drawn with the epoch's seed; the best epoch is chosen with metadata, and the
    history also records validation with all metadata withheld. Other models ignore both.
    """
    import keras

    from lesionml.models.patient import patient_inputs, uses_metadata, withhold_metadata

    meta = None
    if uses_metadata(model):
        if metadata is None:
            raise ValueError("the model has metadata inputs: pass the train and val rows as `metadata`")
        meta = (
            patient_inputs(metadata[0], len(train[0]), "train split"),
            patient_inputs(metadata[1], len(val[0]), "val split"),
        )
    workdir.mkdir(parents=True, exist_ok=True)
    model.compile(
        optimizer=keras.optimizers.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )
    model.optimizer.build(model.trainable_variables)
    checkpoint = Checkpoint(workdir)
    restored = checkpoint.load(model)
    if restored:
        best_weights, state, averages = restored
        print(f"resuming after epoch {state['epoch']} from {checkpoint.path}")
    else:
        best_weights, averages = [np.asarray(v) for v in model.variables], []
        state = {
            "epoch": 0,
            "best": None,
            "best_epoch": 0,
            "wait": 0,
            "plateau_wait": 0,
            "plateau_lr": cfg.learning_rate,
            "rows": [],
            "wall_seconds": 0.0,
            "averaged_steps": 0,
        }
    average = WeightAverage(model, cfg.ema_decay, averages, state["averaged_steps"]) if cfg.ema_decay else None
    callbacks = (
        [keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: average.update())] if average else []
    )
    weight_of = class_weights(train[1], n_classes, cfg.class_weight_power)
    sample_weights = np.array([weight_of[int(c)] for c in train[1]], dtype=np.float32)
    val_ds = make_dataset(val[0], batch_size=cfg.batch_size, inputs=meta and meta[1])
    val_withheld_ds = (
        make_dataset(val[0], batch_size=cfg.batch_size, inputs=patient_inputs(None, len(val[0]))) if meta else None
    )
    columns = list(HISTORY_COLUMNS) + (list(WITHHELD_COLUMNS) if meta else [])
    history = workdir / "history.csv"
    hooks = epoch_hooks or []
    for epoch in range(state["epoch"], cfg.epochs):
        if cfg.early_stopping_patience and state["wait"] >= cfg.early_stopping_patience:
            print(f"early stop: {cfg.monitor} has not improved for {state['wait']} epochs")
            break
        lr = learning_rate(cfg, epoch, state["plateau_lr"])
        model.optimizer.learning_rate.assign(lr)
        seed = epoch_seed(cfg.seed, epoch)
        train_ds = make_dataset(
            train[0],
            train[1],
            cfg.batch_size,
            n_classes=n_classes,
            sample_weights=sample_weights,
            augment=augment,
            seed=seed,
            inputs=meta and withhold_metadata(meta[0], withhold, seed),
        )
        tick = time.perf_counter()
        # The dataset shuffles; the callbacks average the weights.
        logs = model.fit(train_ds, epochs=1, shuffle=False, verbose=0, callbacks=callbacks).history
        seconds = time.perf_counter() - tick
        with average.applied() if average else nullcontext():
            val_metrics = _validation_metrics(val[1], np.asarray(model.predict(val_ds, verbose=0), dtype=np.float64))
            value = val_metrics[cfg.monitor]
            improved = _improved(cfg.monitor, value, state["best"])
            if meta:
                without = np.asarray(model.predict(val_withheld_ds, verbose=0), dtype=np.float64)
                val_metrics |= {f"{k}_withheld": v for k, v in _validation_metrics(val[1], without).items()}
            if improved:
                best_weights = [np.array(v) for v in model.variables]
        row = {
            "epoch": epoch + 1,
            "loss": float(logs["loss"][0]),
            "accuracy": float(logs["accuracy"][0]),
            **val_metrics,
            "learning_rate": lr,
            "seconds": seconds,
        }
        if improved:
            state.update(best=value, best_epoch=epoch + 1, wait=0, plateau_wait=0)
        else:
            state["wait"] += 1
            state["plateau_wait"] += 1
            if state["plateau_wait"] >= cfg.lr_patience:
                state.update(plateau_lr=max(state["plateau_lr"] * cfg.lr_factor, cfg.min_lr), plateau_wait=0)
        state["epoch"] = epoch + 1
        state["rows"].append(row)
        state["wall_seconds"] += time.perf_counter() - tick
        state["averaged_steps"] = average.steps if average else 0
        checkpoint.save(model, best_weights, state, average.averages if average else [])
        with atomic_path(history) as tmp:
            pd.DataFrame(state["rows"], columns=columns).to_csv(tmp, index=False)
        without = f" (withheld {row['val_balanced_accuracy_withheld']:.4f})" if meta else ""
        print(
            f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}  |  "
            f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  "
            f"val_bal_acc {row['val_balanced_accuracy']:.4f}{without}  |  lr {lr:.2e}  |  "
            f"{seconds:.1f} s, {len(train[0]) / seconds:.0f} img/s",
            flush=True,
        )
        for hook in hooks:
            hook(epoch + 1, {k: v for k, v in row.items() if k != "epoch"})
    for v, w in zip(model.variables, best_weights, strict=True):
        v.assign(w)
    save_model(model, out_model)
    rows = pd.DataFrame(state["rows"])
    epoch_seconds = float(rows.seconds.sum())
    return FitResult(
        model_path=out_model,
        history_path=history,
        epochs_run=len(rows),
        best_epoch=int(state["best_epoch"]),
        best_value=float(state["best"]),
        seconds=float(state["wall_seconds"]),
        train_images_per_second=len(train[0]) * len(rows) / epoch_seconds if epoch_seconds else 0.0,
    )
