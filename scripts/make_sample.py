"""Rebuild data/sample/ from the development copy of HAM10000 (how the bundled sample was made).

Whole lesions are drawn per class with a fixed seed, so the sample keeps the release's
structure (several images per lesion) and every class has enough lesions for a
lesion-grouped train/val/test split.

    python scripts/make_sample.py ../shared/data/ham10000 data/sample
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# Lesions drawn per class: rare classes get proportionally more so all 7 can be learned at all.
LESIONS = {"nv": 110, "mel": 45, "bkl": 45, "bcc": 35, "akiec": 30, "vasc": 20, "df": 20}
SEED = 20261124
NOTICE = """# HAM10000 sample: license and attribution

The images in `images/` and the rows of `HAM10000_metadata.csv` are a subset of
HAM10000 (downscaled to 200x150), built by `scripts/make_sample.py`.

Tschandl P., Rosendahl C., Kittler H. *The HAM10000 dataset, a large collection of
multi-source dermatoscopic images of common pigmented skin lesions.* Sci. Data 5, 180161
(2018), doi:10.1038/sdata.2018.161; data at doi:10.7910/DVN/DBW86T.

License: CC BY-NC 4.0 (non-commercial use, with attribution).
Attribution: "HAM10000 Dataset: (c) by ViDIR Group, Department of Dermatology, Medical
University of Vienna".
"""


def main(src: Path, dst: Path) -> None:
    meta = pd.read_csv(src / "HAM10000_metadata.csv", dtype=str, keep_default_na=False)
    rng = np.random.default_rng(SEED)
    lesions = meta.groupby("lesion_id").dx.first()
    chosen: list[str] = []
    for dx, n in LESIONS.items():
        ids = np.sort(lesions.index[lesions == dx].to_numpy())
        chosen.extend(rng.choice(ids, size=n, replace=False))
    sample = meta[meta.lesion_id.isin(chosen)]
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "images").mkdir(parents=True)
    for image_id in sample.image_id:
        shutil.copy2(src / "images" / f"{image_id}.jpg", dst / "images" / f"{image_id}.jpg")
    sample.to_csv(dst / "HAM10000_metadata.csv", index=False)
    (dst / "LICENSE.md").write_text(NOTICE)
    print(f"{len(sample)} images of {sample.lesion_id.nunique()} lesions -> {dst}")
    print(sample.dx.value_counts().to_string())


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
