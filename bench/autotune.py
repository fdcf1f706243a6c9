"""Epoch times of `model.fit` on lesionml's training dataset with the tf.data autotuner on
(TensorFlow's default) and off (what `lesionml.data.augment.make_dataset` does).

Why it exists: on 2 cores, epochs of identical work randomly took much longer with the
autotuner on (docs/benchmarks.md). The sides alternate epoch by epoch, each
side with its own model, so a drift in machine speed weighs on both.

    .venv/bin/python bench/autotune.py [--images 2048] [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per side; the first is reported but not averaged")
    args = ap.parse_args()

    import keras
    import tensorflow as tf

    from lesionml.config import load_params
    from lesionml.data.augment import make_dataset
    from lesionml.data.metadata import CLASSES
    from lesionml.data.normalize import fit_stats
    from lesionml.models import build_model
    from lesionml.training import seed_everything

    params = load_params(ROOT / "params.yaml")
    rng = np.random.default_rng(0)
    height, width = params.data.image_size
    images = rng.integers(0, 256, (args.images, height, width, 3), dtype=np.uint8)  # speed does not depend on content
    labels = rng.integers(0, len(CLASSES), args.images)
    stats = fit_stats(images)
    autotune_on = tf.data.Options()
    autotune_on.autotune.enabled = True

    def model():
        seed_everything(0)
        m = build_model("cnn", params.models.cnn, (height, width), stats, len(CLASSES))
        m.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
        return m

    models = {"autotune on (TF default)": model(), "autotune off (lesionml)": model()}
    times: dict[str, list[float]] = {side: [] for side in models}
    print(
        f"{args.images} random images {height}x{width}, cnn, batch {params.train.batch_size}, {args.epochs} epochs per side"
    )
    for epoch in range(args.epochs):
        for side, m in models.items():
            ds = make_dataset(
                images, labels, params.train.batch_size, n_classes=len(CLASSES), augment=params.augment, seed=epoch
            )
            if side.startswith("autotune on"):
                ds = ds.with_options(autotune_on)
            started = time.perf_counter()
            m.fit(ds, epochs=1, shuffle=False, verbose=0)  # the dataset shuffles
            times[side].append(time.perf_counter() - started)
            print(f"  epoch {epoch + 1}  {side:<26} {times[side][-1]:6.2f} s", flush=True)
    mean = {side: float(np.mean(t[1:])) for side, t in times.items()}
    for side, t in times.items():
        print(f"{side:<26} epochs 2-{args.epochs}: mean {mean[side]:.2f} s, min {min(t[1:]):.2f}, max {max(t[1:]):.2f}")
    on, off = mean.values()
    print(f"ratio off/on speed: {on / off:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
