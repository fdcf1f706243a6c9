"""Preprocessing throughput: lesionml's decoder against the seed notebook's plain loop.

Both turn every JPEG of a HAM10000 release into a uint8 array of 75x100 (height x width):
- plain: `df.path.map(lambda p: np.asarray(Image.open(p).resize((100, 75))))`, one process,
  full-size decode (what the seed notebook did);
- pipeline: `lesionml.data.images.load_images`, reduced-size JPEG decoding (`draft`) in a
  pool of worker processes.
The files are read once before timing so both sides run from the OS page cache.

    .venv/bin/python bench/preprocess.py [--source ../shared/data/ham10000] [--repeats 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZE = (75, 100)


def plain_loop(paths: pd.Series) -> np.ndarray:
    return np.stack(paths.map(lambda p: np.asarray(Image.open(p).resize((SIZE[1], SIZE[0])))).tolist())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "ham10000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, help="use only the first N images")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from lesionml.data.images import load_images
    from lesionml.data.source import find_images

    if not (args.source / "HAM10000_metadata.csv").is_file():
        print(f"bench/preprocess.py: no HAM10000 release at {args.source}", file=sys.stderr)
        return 2
    meta = pd.read_csv(args.source / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    if args.limit:
        meta = meta.iloc[: args.limit]
    where = find_images(args.source, 10**12)
    locations = [(where[i].file, where[i].member) for i in meta.image_id]
    if any(member for _, member in locations):
        print("bench/preprocess.py: needs unpacked images (the plain loop cannot read zips)", file=sys.stderr)
        return 2
    paths = pd.Series([file for file, _ in locations])
    for p in paths:  # warm the page cache: both sides then measure decoding, not the disk
        Path(p).read_bytes()
    n = len(paths)
    print(f"{n} images from {args.source} -> {SIZE[0]}x{SIZE[1]} uint8; page cache warmed; best and median of {args.repeats}")

    timings: dict[str, list[float]] = {"plain": [], "pipeline": []}
    results = {}
    for _ in range(args.repeats):
        for name, run in (
            ("plain", lambda: plain_loop(paths)),
            ("pipeline", lambda: load_images(locations, SIZE, 40_000_000, workers=args.workers)),
        ):
            started = time.perf_counter()
            results[name] = run()
            timings[name].append(time.perf_counter() - started)

    assert results["plain"].shape == results["pipeline"].shape == (n, *SIZE, 3)
    diff = np.abs(results["plain"].astype(np.int16) - results["pipeline"]).mean()
    rows = {}
    for name, label in (("plain", "seed's plain loop (1 process, full decode)"),
                        ("pipeline", f"lesionml load_images ({args.workers} workers, draft decode)")):
        best, median = min(timings[name]), statistics.median(timings[name])
        rows[name] = {"best_s": best, "median_s": median, "images_per_s": n / best}
        print(f"  {label:<48} best {best:6.2f} s  median {median:6.2f} s  {n / best:8.0f} img/s")
    ratio = rows["plain"]["best_s"] / rows["pipeline"]["best_s"]
    print(f"  mean absolute pixel difference between the two arrays: {diff:.2f} (resampling differs slightly)")
    print(f"ratio pipeline/plain: {ratio:.1f}x (goal >= 2x)")
    if args.json:
        args.json.write_text(json.dumps({"images": n, "sides": rows, "ratio": ratio, "mean_abs_diff": float(diff)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
