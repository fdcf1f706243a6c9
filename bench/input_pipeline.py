"""Training input throughput: lesionml's training loop (`lesionml.training.fit`: a tf.data
pipeline per epoch with on-the-fly augmentation, class weights, one-hot labels) against a
bare `model.fit` on in-memory arrays without augmentation (same model, same batch).

The question it answers: does augmenting on the fly slow training down? A ratio near 1
means the augmentation work hides behind the model's own compute. Both sides count
training images per second of the timed epochs only (lesionml's per-epoch validation is
excluded: the bare side has none).

    .venv/bin/python bench/input_pipeline.py [--source ../shared/data/ham10000] [--images 2048] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--images", type=int, default=2048, help="training images per epoch")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per side (after one warm-up epoch)")
    ap.add_argument("--model", default="cnn", choices=["cnn", "cnn_lstm"])
    args = ap.parse_args()

    import keras

    from lesionml.config import load_params
    from lesionml.data.images import load_images
    from lesionml.data.metadata import CLASSES, read_metadata
    from lesionml.data.normalize import fit_stats
    from lesionml.data.source import find_images
    from lesionml.models import build_model
    from lesionml.training import fit, seed_everything

    if not (args.source / "HAM10000_metadata.csv").is_file():
        print(f"no HAM10000 release at {args.source}", file=sys.stderr)
        return 2
    params = load_params(ROOT / "params.yaml")
    meta = read_metadata(args.source / "HAM10000_metadata.csv").iloc[: args.images]
    where = find_images(args.source, params.data.max_archive_bytes)
    locs = [(where[i].file, where[i].member) for i in meta.image_id]
    images = load_images(locs, tuple(params.data.image_size), params.data.max_image_pixels, params.data.workers)
    labels = meta.dx.map({c: i for i, c in enumerate(CLASSES)}).to_numpy(np.int64)
    stats = fit_stats(images)
    batch = params.train.batch_size
    print(
        f"{len(images)} images {images.shape[1]}x{images.shape[2]}, model {args.model}, batch {batch}, "
        f"{args.epochs} timed epochs per side after 1 warm-up epoch"
    )

    def fresh_model():
        seed_everything(0)
        return build_model(args.model, getattr(params.models, args.model), images.shape[1:3], stats, len(CLASSES))

    floats = images.astype(np.float32)
    cfg = params.train.model_copy(update={"epochs": args.epochs + 1})

    def bare() -> float:
        model = fresh_model()
        model.compile(
            optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        model.fit(floats, labels, batch_size=batch, epochs=1, verbose=0)  # warm-up: graph tracing, allocations
        started = time.perf_counter()
        model.fit(floats, labels, batch_size=batch, epochs=args.epochs, shuffle=True, verbose=0)
        return len(images) * args.epochs / (time.perf_counter() - started)

    def pipeline() -> float:
        with tempfile.TemporaryDirectory() as work:
            result = fit(
                fresh_model(),
                (images, labels),
                (images[:batch], labels[:batch]),
                cfg,
                Path(work),
                Path(work) / "model.keras",
                augment=params.augment,
                n_classes=len(CLASSES),
            )
            seconds = pd.read_csv(result.history_path).seconds.iloc[1:]  # epoch 1 is the warm-up
        return len(images) * len(seconds) / seconds.sum()

    # ABBA order, two measurements per side: Keras' own array pipeline (the bare side) keeps
    # tf.data's autotuner on, whose epochs randomly take up to twice as long (bench/autotune.py);
    # a slow stretch then weighs on both sides alike instead of on whichever ran during it.
    rates: dict[str, list[float]] = {"bare": [], "pipeline": []}
    for side in ("bare", "pipeline", "pipeline", "bare"):
        rates[side].append(bare() if side == "bare" else pipeline())
        print(f"  {side:<8} {rates[side][-1]:8.1f} img/s", flush=True)
    bare_rate, pipeline_rate = (float(np.mean(rates[k])) for k in ("bare", "pipeline"))
    print(f"{'bare model.fit on in-memory arrays, no augmentation':<58} {bare_rate:8.1f} img/s (mean of 2)")
    print(f"{'lesionml training loop with on-the-fly augmentation':<58} {pipeline_rate:8.1f} img/s (mean of 2)")
    print(f"ratio pipeline/bare: {pipeline_rate / bare_rate:.2f}x (goal >= 0.9x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
