"""Train / validation / test assignment grouped by lesion and stratified by diagnosis.

HAM10000 holds several images of many lesions; splitting by image puts near-identical
photos on both sides and flatters every metric. Here whole lesions are assigned, class
by class, so each split gets its share of every diagnosis (within one lesion of the
requested fraction) and no lesion appears in two splits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from lesionml.errors import DataError

SPLITS = ("train", "val", "test")
MIN_LESIONS_PER_CLASS = 3  # one lesion for each split


def split_by_lesion(metadata: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """image_id, lesion_id, dx, split for every row of `metadata`."""
    lesions = metadata.groupby("lesion_id", sort=True).dx.first()
    counts = lesions.value_counts()
    too_few = counts[counts < MIN_LESIONS_PER_CLASS]
    if not too_few.empty:
        detail = ", ".join(f"{dx} has {n}" for dx, n in too_few.items())
        raise DataError(
            f"too few lesions to split: {detail} (each class needs at least {MIN_LESIONS_PER_CLASS}, one per split)"
        )
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for dx in sorted(counts.index):
        ids = lesions.index[lesions == dx].to_numpy()
        ids = ids[rng.permutation(len(ids))]
        # At least one lesion per split: test may take all but one for val and one for train.
        n_test = min(max(1, round(test_fraction * len(ids))), len(ids) - 2)
        n_val = max(1, round(val_fraction * len(ids)))
        n_val = min(n_val, len(ids) - n_test - 1)
        for k, lesion in enumerate(ids):
            assignment[lesion] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    out = metadata[["image_id", "lesion_id", "dx"]].copy()
    out["split"] = out.lesion_id.map(assignment)
    return out.reset_index(drop=True)


def split_counts(split: pd.DataFrame) -> pd.DataFrame:
    """Images per class (rows) and split (columns), for summaries and reports."""
    table = pd.crosstab(split.dx, split.split).reindex(columns=list(SPLITS), fill_value=0)
    table.loc["total"] = table.sum()
    return table
