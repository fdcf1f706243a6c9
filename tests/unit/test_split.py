"""Lesion-grouped, class-stratified split on real metadata and on any table Hypothesis makes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import sample_metadata
from hypothesis import given, settings
from hypothesis import strategies as st

from lesionml.data.split import SPLITS, split_by_lesion, split_counts
from lesionml.errors import DataError


def _check(meta: pd.DataFrame, out: pd.DataFrame, val: float, test: float) -> None:
    assert list(out.image_id) == list(meta.image_id)
    assert out.groupby("lesion_id").split.nunique().max() == 1, "a lesion is in two splits"
    lesions = out.drop_duplicates("lesion_id")
    for dx, group in lesions.groupby("dx"):
        n = len(group)
        counts = group.split.value_counts()
        assert set(counts.index) == set(SPLITS), f"{dx} missing from a split"
        for split, frac in (("val", val), ("test", test)):
            assert abs(counts[split] - frac * n) <= 1, (dx, split, counts[split], frac * n)


def test_real_sample_split_is_grouped_stratified_and_seeded():
    meta = sample_metadata()
    a = split_by_lesion(meta, 0.15, 0.15, seed=1)
    _check(meta, a, 0.15, 0.15)
    pd.testing.assert_frame_equal(a, split_by_lesion(meta, 0.15, 0.15, seed=1))
    assert not a.split.equals(split_by_lesion(meta, 0.15, 0.15, seed=2).split)
    table = split_counts(a)
    assert table.loc["total"].sum() == len(meta) and list(table.columns) == list(SPLITS)


def test_class_with_too_few_lesions_is_named():
    meta = sample_metadata()
    df_lesions = meta[meta.dx == "df"].lesion_id.unique()
    meta = meta[(meta.dx != "df") | meta.lesion_id.isin(df_lesions[:2])]
    with pytest.raises(DataError, match=r"too few lesions to split: df has 2 \(each class needs at least 3"):
        split_by_lesion(meta, 0.15, 0.15, seed=0)


@st.composite
def metadata_tables(draw):
    rows = []
    n_classes = draw(st.integers(1, 7))
    for c in range(n_classes):
        for lesion in range(draw(st.integers(3, 40))):
            for image in range(draw(st.integers(1, 4))):
                rows.append((f"L{c}_{lesion}", f"I{c}_{lesion}_{image}", f"c{c}"))
    order = draw(st.permutations(range(len(rows))))
    return pd.DataFrame([rows[i] for i in order], columns=["lesion_id", "image_id", "dx"])


@settings(max_examples=60, deadline=None)
@given(meta=metadata_tables(), val=st.floats(0.05, 0.4), test=st.floats(0.05, 0.4), seed=st.integers(0, 2**32 - 1))
def test_property_any_table(meta, val, test, seed):
    _check(meta, split_by_lesion(meta, val, test, seed), val, test)
