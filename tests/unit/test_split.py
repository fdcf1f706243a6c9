"""Lesion-grouped, class-stratified split: on the real sample, and on any table Hypothesis makes."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lesionml.data.split import MIN_LESIONS_PER_CLASS, SPLITS, split_by_lesion, split_counts
from lesionml.errors import DataError
from tests.helpers import sample_metadata


def _lesion_splits(out: pd.DataFrame) -> pd.Series:
    """lesion_id -> its split; fails if any lesion sits in two splits."""
    per_lesion = out.groupby("lesion_id").split.unique()
    overlapping = per_lesion[per_lesion.map(len) > 1]
    assert overlapping.empty, f"lesions in two splits: {overlapping.head().to_dict()}"
    return per_lesion.map(lambda s: s[0])


def _lesion_counts(out: pd.DataFrame) -> pd.DataFrame:
    """Lesions per class (rows) and split (columns)."""
    lesions = out.drop_duplicates("lesion_id")
    return pd.crosstab(lesions.dx, lesions.split).reindex(columns=list(SPLITS), fill_value=0)


# --- the real sample -----------------------------------------------------------------


@pytest.fixture(scope="module")
def meta() -> pd.DataFrame:
    return sample_metadata()


def test_sample_split_covers_every_row_once_in_order(meta):
    out = split_by_lesion(meta, 0.15, 0.15, seed=42)
    assert list(out.columns) == ["image_id", "lesion_id", "dx", "split"]
    assert list(out.image_id) == list(meta.image_id)
    assert set(out.split) == set(SPLITS) and out.split.notna().all()


def test_sample_split_has_no_lesion_in_two_splits(meta):
    out = split_by_lesion(meta, 0.15, 0.15, seed=42)
    splits = _lesion_splits(out)
    assert len(splits) == meta.lesion_id.nunique()
    # The sample does have multi-image lesions, so this is a real check.
    assert (meta.lesion_id.value_counts() > 1).sum() > 50
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(out.lesion_id[out.split == a]) & set(out.lesion_id[out.split == b])


def test_sample_split_has_every_class_in_every_split_within_one_lesion(meta):
    out = split_by_lesion(meta, 0.15, 0.15, seed=42)
    counts = _lesion_counts(out)
    assert (counts > 0).all().all(), counts
    n = counts.sum(axis=1)
    for split, frac in (("val", 0.15), ("test", 0.15), ("train", 0.70)):
        off = (counts[split] - frac * n).abs()
        assert (off <= 1).all(), f"{split}: {off.to_dict()}"


def test_sample_split_is_deterministic_for_a_seed_and_differs_for_another(meta):
    a = split_by_lesion(meta, 0.15, 0.15, seed=42)
    pd.testing.assert_frame_equal(a, split_by_lesion(meta, 0.15, 0.15, seed=42))
    b = split_by_lesion(meta, 0.15, 0.15, seed=7)
    assert (a.split != b.split).sum() > 20
    # Same sizes per class: only which lesions go where changes.
    pd.testing.assert_frame_equal(_lesion_counts(a), _lesion_counts(b))


def test_split_does_not_depend_on_row_order(meta):
    a = split_by_lesion(meta, 0.15, 0.15, seed=3)
    shuffled = meta.sample(frac=1, random_state=0).reset_index(drop=True)
    b = split_by_lesion(shuffled, 0.15, 0.15, seed=3)
    assert a.set_index("image_id").split.sort_index().equals(b.set_index("image_id").split.sort_index())


def test_split_counts_table(meta):
    table = split_counts(split_by_lesion(meta, 0.2, 0.1, seed=1))
    assert list(table.columns) == list(SPLITS)
    assert list(table.index) == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc", "total"]
    assert table.loc["total"].sum() == len(meta)
    assert table.loc["nv", "train"] > table.loc["nv", "val"] > table.loc["nv", "test"] > 0


@pytest.mark.parametrize("keep", [0, 1, 2])
def test_class_with_too_few_lesions_is_named_with_its_count(meta, keep):
    df_lesions = meta[meta.dx == "df"].lesion_id.unique()
    few = meta[(meta.dx != "df") | meta.lesion_id.isin(df_lesions[:keep])]
    if keep == 0:
        split_by_lesion(few, 0.15, 0.15, seed=0)  # an absent class is not a small class
        return
    with pytest.raises(DataError) as err:
        split_by_lesion(few, 0.15, 0.15, seed=0)
    assert str(err.value) == (f"too few lesions to split: df has {keep} (each class needs at least 3, one per split)")


def test_every_small_class_is_named(meta):
    lesions = meta.drop_duplicates("lesion_id")
    keep = set(lesions.lesion_id[lesions.dx.isin(["akiec", "bcc", "bkl", "mel", "nv"])])
    keep |= set(lesions.lesion_id[lesions.dx == "df"][:2]) | set(lesions.lesion_id[lesions.dx == "vasc"][:1])
    with pytest.raises(DataError, match=r"too few lesions to split: df has 2, vasc has 1 \("):
        split_by_lesion(meta[meta.lesion_id.isin(keep)], 0.15, 0.15, seed=0)


def test_three_lesions_get_one_per_split_even_with_a_large_test_fraction():
    meta = pd.DataFrame({"lesion_id": ["L1", "L2", "L3"], "image_id": ["I1", "I2", "I3"], "dx": ["df", "df", "df"]})
    for val, test in ((0.15, 0.15), (0.05, 0.5), (0.01, 0.9), (0.9, 0.05)):
        out = split_by_lesion(meta, val, test, seed=0)
        assert sorted(out.split) == ["test", "train", "val"], (val, test)


# --- any table -----------------------------------------------------------------------


@st.composite
def metadata_tables(draw):
    """Random HAM10000-like tables: 1-7 classes, 1-40 lesions each, 1-5 images per lesion."""
    rows = []
    for c in range(draw(st.integers(1, 7))):
        for lesion in range(draw(st.integers(1, 40))):
            for image in range(draw(st.integers(1, 5))):
                rows.append((f"HAM_{c}_{lesion}", f"ISIC_{c}_{lesion}_{image}", f"class{c}"))
    order = draw(st.permutations(range(len(rows))))
    return pd.DataFrame([rows[i] for i in order], columns=["lesion_id", "image_id", "dx"])


fractions = st.floats(0.01, 0.98, allow_nan=False)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=metadata_tables(), val=fractions, test=fractions, seed=st.integers(0, 2**32 - 1))
def test_property_any_table(meta, val, test, seed):
    assume(val + test < 1)  # what SplitConfig accepts
    lesions_per_class = meta.drop_duplicates("lesion_id").dx.value_counts()
    small = lesions_per_class[lesions_per_class < MIN_LESIONS_PER_CLASS]
    if not small.empty:
        with pytest.raises(DataError) as err:
            split_by_lesion(meta, val, test, seed)
        for dx, n in small.items():
            assert f"{dx} has {n}" in str(err.value)
        return

    out = split_by_lesion(meta, val, test, seed)
    assert list(out.image_id) == list(meta.image_id)
    _lesion_splits(out)  # no lesion in two splits
    counts = _lesion_counts(out)
    assert (counts > 0).all().all(), f"a class is missing from a split:\n{counts}"
    # Within one lesion of the requested fraction, wherever that request can be met
    # while every split keeps a lesion: it cannot, e.g., for 3 lesions and val=0.7.
    if val <= 0.66 and test <= 0.66 and val + test < 0.8:
        n = counts.sum(axis=1)
        for split, frac in (("val", val), ("test", test)):
            off = (counts[split] - frac * n).abs()
            assert (off <= 1).all(), f"{split} fraction {frac}: lesions off by {off.to_dict()}"
