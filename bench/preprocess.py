"""Preprocessing throughput: lesionml's decoder against the seed notebook's plain loop.

Both turn every JPEG of a HAM10000 release into one uint8 array of --size (height x width;
default 75x100, the seed notebook's size and params.yaml's default):
- plain: `df.path.map(lambda p: np.asarray(Image.open(p).resize((100, 75))))` then
  `np.stack`, one process, one thread, full-size decode (what the seed notebook did);
- pipeline: `lesionml.data.images.load_images(locations, (75, 100), max_pixels, workers=N)`,
  libjpeg-turbo (simplejpeg) decoding at the smallest DCT scale (M/8) covering the target,
  then OpenCV's resize, in a pool of N threads.

Before timing, every image file is read once (OS page cache warm) and each side is run
once, untimed, on a few images (imports, plugin set-up), so both sides measure decoding,
not the disk or first-call costs. The sides alternate order on each repeat. Best and median
of --repeats are printed; the ratio uses the best times.

    python bench/preprocess.py [--source ../shared/data/ham10000] [--repeats 3] [--workers 2]
                               [--size 96 128] [--limit N] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import PIL
import simplejpeg
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "ham10000"
METADATA = "HAM10000_metadata.csv"
MAX_PIXELS = 40_000_000  # params.yaml data.max_image_pixels
GOAL = 2.0


def plain_loop(paths: pd.Series, size: tuple[int, int]) -> np.ndarray:
    """The seed notebook's preprocessing, verbatim apart from the stack and the size."""
    return np.stack(paths.map(lambda p: np.asarray(Image.open(p).resize((size[1], size[0])))).tolist())


def fail(message: str) -> int:
    print(f"bench/preprocess.py: {message}", file=sys.stderr)
    return 2


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"HAM10000 folder (default {DEFAULT_SOURCE})")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side (default 3)")
    ap.add_argument("--workers", type=int, default=2, help="load_images threads (default 2)")
    ap.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(75, 100),
        metavar=("H", "W"),
        help="output height and width (default 75 100, the seed's)",
    )
    ap.add_argument("--limit", type=int, help="use only the first N images of the metadata")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args()
    size = (args.size[0], args.size[1])
    if args.repeats < 1:
        return fail("--repeats must be >= 1")
    if args.limit is not None and args.limit < 1:
        return fail("--limit must be >= 1")

    source = args.source.resolve()
    if not source.is_dir():
        return fail(f"source folder not found: {source} (pass --source PATH to a HAM10000 release folder)")
    if not (source / METADATA).is_file():
        return fail(f"{source} has no {METADATA}; not a HAM10000 release folder")

    from lesionml.data.images import load_images
    from lesionml.data.source import find_images

    meta = pd.read_csv(source / METADATA, dtype=str, keep_default_na=False)
    if args.limit:
        meta = meta.iloc[: args.limit]
    where = find_images(source, 10**12)
    missing = [i for i in meta.image_id if i not in where]
    if missing:
        return fail(f"{len(missing)} metadata rows have no image file under {source} (first: {missing[0]})")
    locations = [(where[i].file, where[i].member) for i in meta.image_id]
    if any(member for _, member in locations):
        return fail("needs unpacked images: the plain loop cannot read zip members")
    paths = pd.Series([file for file, _ in locations])
    n = len(paths)

    # Warm the page cache: both sides then read from memory.
    started = time.perf_counter()
    cached_bytes = sum(len(Path(p).read_bytes()) for p in paths)
    warm_s = time.perf_counter() - started

    def plain() -> np.ndarray:
        return plain_loop(paths, size)

    def pipeline() -> np.ndarray:
        return load_images(locations, size, MAX_PIXELS, workers=args.workers)

    sides = {"plain": plain, "pipeline": pipeline}
    # Untimed first calls on a few images (plugin imports, thread-pool code paths).
    plain_loop(paths.iloc[:64], size)
    load_images(locations[:64], size, MAX_PIXELS, workers=args.workers)

    print(f"source    {source}")
    print(f"images    {n} JPEGs ({cached_bytes / 1e6:.1f} MB) -> {size[0]}x{size[1]} uint8 RGB")
    print(
        f"machine   {os.cpu_count()} CPUs, Python {platform.python_version()}, Pillow {PIL.__version__}, "
        f"simplejpeg {simplejpeg.__version__}, OpenCV {cv2.__version__}, NumPy {np.__version__}"
    )
    print(
        f"warm-up   OS file cache warmed once before timing (read all {n} files in {warm_s:.2f} s); "
        f"each side run once untimed on 64 images"
    )
    print(f"timing    {args.repeats} repeat(s) per side, alternating order; best and median reported\n")

    timings: dict[str, list[float]] = {name: [] for name in sides}
    results: dict[str, np.ndarray] = {}
    for r in range(args.repeats):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            results.pop(name, None)  # free the previous array before the next run
            t0 = time.perf_counter()
            results[name] = sides[name]()
            timings[name].append(time.perf_counter() - t0)

    a, b = results["plain"], results["pipeline"]
    expected = (n, *size, 3)
    if a.shape != b.shape or a.dtype != b.dtype:
        return fail(f"arrays differ: plain {a.shape} {a.dtype}, pipeline {b.shape} {b.dtype}")
    shape_ok = a.shape == expected
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    mad, max_diff = float(diff.mean()), int(diff.max())
    identical = float((diff == 0).mean())

    labels = {
        "plain": "seed plain loop (1 thread, full decode)",
        "pipeline": f"lesionml load_images ({args.workers} threads, scaled decode)",
    }
    rows: dict[str, dict] = {}
    header = f"{'side':<46} {'best s':>8} {'median s':>9} {'best img/s':>11} {'median img/s':>13}"
    print(header)
    print("-" * len(header))
    for name in sides:
        best, median = min(timings[name]), statistics.median(timings[name])
        rows[name] = {
            "label": labels[name],
            "seconds": timings[name],
            "best_s": best,
            "median_s": median,
            "best_images_per_s": n / best,
            "median_images_per_s": n / median,
        }
        print(f"{labels[name]:<46} {best:>8.2f} {median:>9.2f} {n / best:>11.0f} {n / median:>13.0f}")
    ratio = rows["plain"]["best_s"] / rows["pipeline"]["best_s"]
    ratio_median = rows["plain"]["median_s"] / rows["pipeline"]["median_s"]

    print(f"\nshape     both {a.shape} {a.dtype}{'' if shape_ok else f'  (EXPECTED {expected})'}")
    print(
        f"pixels    mean absolute difference {mad:.2f} (max {max_diff}, {identical:.1%} of values equal); "
        "expected: Pillow's bicubic resize of the full decode vs a DCT-scaled decode (the smallest M/8 "
        "scale covering the target) + OpenCV's bilinear resize"
    )
    print(f"median    ratio of medians {ratio_median:.1f}x")
    print(f"ratio pipeline/plain: {ratio:.1f}x (goal >= {GOAL:g}x)")

    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "source": str(source),
                    "images": n,
                    "size_hw": list(size),
                    "workers": args.workers,
                    "repeats": args.repeats,
                    "cpu_count": os.cpu_count(),
                    "python": platform.python_version(),
                    "pillow": PIL.__version__,
                    "simplejpeg": simplejpeg.__version__,
                    "opencv": cv2.__version__,
                    "page_cache_warmed": True,
                    "sides": rows,
                    "shape": list(a.shape),
                    "shape_as_expected": shape_ok,
                    "mean_abs_diff": mad,
                    "max_abs_diff": max_diff,
                    "ratio_best": ratio,
                    "ratio_median": ratio_median,
                    "goal": GOAL,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"results written to {args.json}")
    return 0 if shape_ok else 1


if __name__ == "__main__":
    sys.exit(main())
