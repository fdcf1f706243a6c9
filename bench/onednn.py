"""Training speed of the default CNN with TensorFlow's oneDNN kernels on (what lesionml
asks for) and off (TensorFlow's own choice on a CPU without AVX-512 VNNI/BF16 or AMX).

Why it exists: TensorFlow turns oneDNN on by itself only on CPUs with those features. On
AVX2-only CPUs its fallback, the Eigen kernels, trains the CNN far more slowly, most of the
step in the convolutions' weight gradients (docs/benchmarks.md). `lesionml/__init__.py` therefore sets
TF_ENABLE_ONEDNN_OPTS=1 unless the environment already says otherwise.

The switch is read when TensorFlow is imported, so each side is its own subprocess: the
same model (params.yaml's CNN and image size), the same random images, `model.fit` on
in-memory batches, one untimed warm-up epoch and then --epochs timed ones; the sides run
twice in ABBA order so a drift in machine speed weighs on both.

    .venv/bin/python bench/onednn.py [--images 1024] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = {"1": "oneDNN on (lesionml's choice)", "0": "oneDNN off"}

SIDE = """
import json, sys, time
import numpy as np
import keras
import tensorflow as tf
from lesionml.config import load_params
from lesionml.data.metadata import CLASSES
from lesionml.data.normalize import fit_stats
from lesionml.models import build_model
from lesionml.training import seed_everything

params_path, n, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
params = load_params(params_path)
height, width = params.data.image_size
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (n, height, width, 3), dtype=np.uint8)
labels = keras.utils.to_categorical(rng.integers(0, len(CLASSES), n), len(CLASSES))
seed_everything(0)
model = build_model("cnn", params.models.cnn, (height, width), fit_stats(images), len(CLASSES))
model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
batches = tf.data.Dataset.from_tensor_slices((images.astype("float32"), labels)).batch(params.train.batch_size)
model.fit(batches, epochs=1, verbose=0)
rates = []
for _ in range(epochs):
    started = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0)
    rates.append(n / (time.perf_counter() - started))
print(json.dumps({"rates": rates}))
"""


def cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo ("" where there is none: not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def run_side(flag: str, args: argparse.Namespace) -> list[float]:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": flag, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", SIDE, str(args.params), str(args.images), str(args.epochs)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench/onednn.py: the side with TF_ENABLE_ONEDNN_OPTS={flag} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["rates"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--images", type=int, default=1024, help="random training images per epoch")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per side and round")
    args = ap.parse_args()
    if args.images < 1 or args.epochs < 1:
        print("bench/onednn.py: --images and --epochs must be >= 1", file=sys.stderr)
        return 2

    flags = set(cpuinfo("flags").split())
    own_choice = bool(flags & {"avx512_vnni", "avx512_bf16", "amx_bf16"})
    print(
        f"machine   {os.cpu_count()} CPUs, {cpuinfo('model name') or 'unknown CPU'}; AVX2 {'avx2' in flags}, AVX-512 {'avx512f' in flags}, "
        f"AMX {'amx_bf16' in flags}: TensorFlow's own choice here is oneDNN {'on' if own_choice else 'off'}"
    )
    print(
        f"work      params.yaml's CNN, {args.images} random images, {args.epochs} timed epochs per side and round, "
        "ABBA order\n"
    )
    rates: dict[str, list[float]] = {flag: [] for flag in SIDES}
    for flag in ("1", "0", "0", "1"):
        side = run_side(flag, args)
        rates[flag] += side
        print(f"  {SIDES[flag]:<30} " + "  ".join(f"{r:6.1f}" for r in side) + " img/s", flush=True)
    mean = {flag: sum(r) / len(r) for flag, r in rates.items()}
    print()
    for flag, label in SIDES.items():
        print(f"{label:<30} mean {mean[flag]:6.1f} img/s")
    print(f"ratio on/off: {mean['1'] / mean['0']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
