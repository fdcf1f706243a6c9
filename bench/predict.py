"""Prediction throughput: `lesionml predict` over image files against `model.predict` on
arrays that are already decoded and resized (same model, same images), and against the
served arithmetic on those arrays (the 4-view test-time augmentation, when the model is
served with it).

The gap to the served arithmetic is the price of the real path: reading files, decoding
and resizing, the pyfunc wrapper, and the CLI's start-up (imports, registry lookup, model
load); the gap between the two array lines is the price of test-time augmentation. The
one-image line is that start-up alone, paid by every call: what `mlflow models serve`
(one process, model loaded once) saves a caller who sends images one at a time.

    .venv/bin/python bench/predict.py --params PARAMS [--model lesionml@champion] [--images 1000]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]


def _predict_cli(inputs: list[str], args: argparse.Namespace) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of one whole `lesionml predict` process on `inputs`."""
    command = [str(Path(sys.executable).parent / "lesionml"), "predict", *inputs, "--json"]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, "--model", args.model, "--params", args.params], capture_output=True, text=True, check=False
    )
    return time.perf_counter() - started, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--model", default="lesionml@champion")
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000" / "images")
    ap.add_argument("--images", type=int, default=1000)
    args = ap.parse_args()

    import numpy as np

    from lesionml import tracking
    from lesionml.config import load_params
    from lesionml.data.images import load_images
    from lesionml.inference import image_size, predict_proba

    files = sorted(args.source.glob("*.jpg"))[: args.images]
    if len(files) < args.images:
        print(f"bench/predict.py: only {len(files)} images in {args.source}", file=sys.stderr)
        return 2
    params = load_params(args.params)
    tracking.connect(params.tracking)
    with tempfile.TemporaryDirectory() as tmp:
        for f in files:
            shutil.copy(f, tmp)
        # One image first, the way a user tries it: what a single call costs before any work,
        # and its peak memory (the children's high-water mark is still this call's alone).
        one, first = _predict_cli([str(Path(tmp) / files[0].name)], args)
        one_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        cli, done = _predict_cli([tmp], args)
    for call in (first, done):
        if call.returncode != 0:
            print(call.stderr[-2000:], file=sys.stderr)
            return 1
    assert len(first.stdout.splitlines()) == 1 and len(done.stdout.splitlines()) == len(files)

    served = tracking.load_pyfunc(f"models:/{args.model}").unwrap_python_model()
    model = served.model
    size = image_size(model)
    arrays = load_images([(str(f), "") for f in files], size, 40_000_000).astype(np.float32)
    model.predict(arrays[:64], verbose=0)  # warm-up: graph tracing
    started = time.perf_counter()
    model.predict(arrays, batch_size=64, verbose=0)
    bare = time.perf_counter() - started
    # The served model averages 4 mirror views when it was evaluated so (evaluate.tta):
    # the same arithmetic on arrays separates that cost from the CLI's own.
    started = time.perf_counter()
    predict_proba(model, arrays, tta=served.tta, batch_size=64)
    same_work = time.perf_counter() - started
    n = len(files)
    print(
        f"{n} images, model {args.model}, input {size[0]}x{size[1]}, test-time augmentation {'on' if served.tta else 'off'}"
    )
    print(f"  {'lesionml predict, one image (whole CLI process)':<56} {one:7.2f} s  peak {one_rss:,.0f} MB")
    print(f"  {'lesionml predict (files -> classes, whole CLI process)':<56} {cli:7.2f} s  {n / cli:8.1f} img/s")
    print(f"  {'the served arithmetic (TTA as served) on arrays':<56} {same_work:7.2f} s  {n / same_work:8.1f} img/s")
    print(f"  {'model.predict on decoded, resized arrays':<56} {bare:7.2f} s  {n / bare:8.1f} img/s")
    print(
        f"ratio predict CLI / served arithmetic on arrays: {same_work / cli:.2f}x; / bare model.predict: {bare / cli:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
