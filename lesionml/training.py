"""Compile and fit a model: seeds, class weights, callbacks, resumable checkpoints.

Design points:
- The best epoch (by `train.monitor`) is what gets saved and evaluated, never simply
  the last one; the best weights and the score they reached are persisted on disk, so
  that a resumed run still knows its best from before the interruption.
- BackupAndRestore writes the training state at every epoch end: a killed run resumes
  from its last finished epoch. The backup folder is keyed by the training inputs, so a
  run with different params never resumes someone else's half-trained weights.
- The model file is written to a temp name and renamed: a later stage never loads a
  half-written model.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from lesionml.config import TrainConfig
from lesionml.data.augment import make_dataset
from lesionml.io import atomic_path, write_json

if TYPE_CHECKING:
    import keras

HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")
EpochHook = Callable[[int, dict[str, float]], None]


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """One seed for Python, NumPy and TensorFlow (and op determinism when asked)."""
    import keras
    import tensorflow as tf

    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def class_weights(labels: np.ndarray, n_classes: int) -> dict[int, float]:
    """'balanced' weights, n_samples / (n_classes_present * count): rare classes count more."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    out = {int(c): 1.0 for c in range(n_classes)}
    out.update({int(c): float(w) for c, w in zip(present, weights)})
    return out


def _keras_callbacks():
    import keras

    class EpochLog(keras.callbacks.Callback):
        """One line per epoch, a history CSV rewritten atomically each epoch, and hooks."""

        def __init__(self, path: Path, epochs: int, n_train: int, hooks: list[EpochHook]):
            super().__init__()
            self.path, self.epochs, self.n_train, self.hooks = path, epochs, n_train, hooks
            self.rows: list[dict[str, float]] = []

        def on_train_begin(self, logs=None):
            if self.path.exists():
                self.rows = pd.read_csv(self.path).to_dict("records")

        def on_epoch_begin(self, epoch, logs=None):
            self.rows = [r for r in self.rows if r["epoch"] <= epoch]  # drop epochs being redone
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            logs = dict(logs or {})
            seconds = time.perf_counter() - self.started
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            row = {k: float(logs.get(k, np.nan)) for k in HISTORY_COLUMNS[1:5]}
            row.update(epoch=epoch + 1, learning_rate=lr, seconds=seconds)
            self.rows.append(row)
            with atomic_path(self.path) as tmp:
                pd.DataFrame(self.rows, columns=list(HISTORY_COLUMNS)).to_csv(tmp, index=False)
            print(
                f"epoch {epoch + 1:>3}/{self.epochs}  loss {row['loss']:.4f}  acc {row['accuracy']:.4f}  |  "
                f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.4f}  |  lr {lr:.2e}  |  "
                f"{seconds:.1f} s, {self.n_train / seconds:.0f} img/s",
                flush=True,
            )
            for hook in self.hooks:
                hook(epoch + 1, {k: v for k, v in row.items() if k != "epoch"})

    class BestWeights(keras.callbacks.Callback):
        """Keep the best epoch's weights on disk (with its score) and restore them at the end."""

        def __init__(self, folder: Path, monitor: str):
            super().__init__()
            self.weights = folder / "best.weights.h5"
            self.state = folder / "best.json"
            self.monitor = monitor
            self.sign = -1.0 if monitor.endswith("loss") else 1.0

        def on_train_begin(self, logs=None):
            self.best = json.loads(self.state.read_text()) if self.state.exists() else None

        def on_epoch_end(self, epoch, logs=None):
            value = float((logs or {})[self.monitor])
            if self.best is None or self.sign * value > self.sign * self.best["value"]:
                self.best = {"value": value, "epoch": epoch + 1}
                tmp = self.weights.with_name(f".tmp-{os.getpid()}.weights.h5")
                self.model.save_weights(tmp)
                os.replace(tmp, self.weights)
                write_json(self.state, self.best)

        def on_train_end(self, logs=None):
            if self.weights.exists():
                self.model.load_weights(self.weights)

    return EpochLog, BestWeights


@dataclass(frozen=True)
class FitResult:
    model_path: Path
    history_path: Path
    epochs_run: int
    best_epoch: int
    best_value: float
    seconds: float
    train_images_per_second: float


def fit(
    model: "keras.Model",
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    cfg: TrainConfig,
    workdir: Path,
    out_model: Path,
    *,
    augmenter: "keras.Sequential | None" = None,
    n_classes: int,
    epoch_hooks: list[EpochHook] | None = None,
) -> FitResult:
    """Train `model` and save its best-epoch weights as a complete .keras file at `out_model`."""
    import keras

    workdir.mkdir(parents=True, exist_ok=True)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    train_ds = make_dataset(train[0], train[1], cfg.batch_size, augmenter=augmenter, shuffle_seed=cfg.seed)
    val_ds = make_dataset(val[0], val[1], cfg.batch_size)
    EpochLog, BestWeights = _keras_callbacks()
    history = workdir / "history.csv"
    best = BestWeights(workdir, cfg.monitor)
    callbacks: list[Any] = [
        keras.callbacks.BackupAndRestore(str(workdir / "backup")),
        best,
        keras.callbacks.EarlyStopping(monitor=cfg.monitor, patience=cfg.early_stopping_patience),
        keras.callbacks.ReduceLROnPlateau(
            monitor=cfg.monitor, factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr, verbose=0
        ),
        EpochLog(history, cfg.epochs, len(train[0]), epoch_hooks or []),
    ]
    weights = class_weights(train[1], n_classes) if cfg.class_weighting else None
    started = time.perf_counter()
    model.fit(
        train_ds, validation_data=val_ds, epochs=cfg.epochs, class_weight=weights, callbacks=callbacks, shuffle=False, verbose=0
    )
    seconds = time.perf_counter() - started
    with atomic_path(out_model.with_suffix(".keras")) as tmp:
        keras_tmp = tmp.with_suffix(".keras")
        model.save(keras_tmp)
        os.replace(keras_tmp, tmp)
    rows = pd.read_csv(history)
    epoch_seconds = rows.seconds.sum()
    return FitResult(
        model_path=out_model,
        history_path=history,
        epochs_run=len(rows),
        best_epoch=int(best.best["epoch"]),
        best_value=float(best.best["value"]),
        seconds=seconds,
        train_images_per_second=len(train[0]) * len(rows) / epoch_seconds if epoch_seconds else 0.0,
    )
