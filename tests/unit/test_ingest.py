"""Ingest on real sample images: every release layout, and each kind of broken release."""

from __future__ import annotations

import shutil
import zipfile

import pytest
from conftest import SAMPLE, make_release

from lesionml.data.source import build_manifest, release_fingerprint
from lesionml.data.stages import ingest
from lesionml.errors import DataError
from lesionml.workspace import Workspace

LIMIT = 10**9


def _error(source) -> str:
    with pytest.raises(DataError) as err:
        build_manifest(source, LIMIT)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("layout", ["flat", "parts", "zips"])
def test_every_layout_gives_the_same_fingerprint(tmp_path, small_rows, layout):
    reference = release_fingerprint(build_manifest(make_release(tmp_path / "ref", small_rows), LIMIT))
    manifest = build_manifest(make_release(tmp_path / layout, small_rows, layout), LIMIT)
    assert len(manifest) == len(small_rows)
    assert list(manifest.image_id) == list(small_rows.image_id)
    assert release_fingerprint(manifest) == reference
    if layout == "zips":
        assert manifest.member.str.endswith(".jpg").all()


def test_bundled_sample_layout_with_images_subfolder(tmp_path):
    out = ingest(SAMPLE, Workspace(tmp_path), LIMIT)
    assert out["manifest"].is_intact() and out["release"].is_intact()


def test_fingerprint_changes_when_one_image_changes(release):
    before = release_fingerprint(build_manifest(release, LIMIT))
    victim = sorted(release.glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert release_fingerprint(build_manifest(release, LIMIT)) != before


def test_missing_image(release, small_rows):
    (release / f"{small_rows.image_id[3]}.jpg").unlink()
    assert f"1 rows whose image file is missing: {small_rows.image_id[3]}" in _error(release)


def test_image_without_metadata_row(release):
    shutil.copy(next(release.glob("*.jpg")), release / "ISIC_9999999.jpg")
    assert "1 image files with no metadata row" in _error(release) and "ISIC_9999999" in _error(release)


def test_duplicate_image_id(release, small_rows):
    rows = small_rows.copy()
    rows.loc[5, "image_id"] = rows.image_id[4]
    rows.to_csv(release / "HAM10000_metadata.csv", index=False)
    assert "1 duplicate image_id rows: line 7" in _error(release)


def test_unknown_dx(release, small_rows):
    rows = small_rows.copy()
    rows.loc[0, "dx"] = "melanomaa"
    rows.to_csv(release / "HAM10000_metadata.csv", index=False)
    assert "rows with a dx outside akiec, bcc, bkl, df, mel, nv, vasc: line 2 ('melanomaa')" in _error(release)


def test_missing_column(release, small_rows):
    small_rows.drop(columns="dx").to_csv(release / "HAM10000_metadata.csv", index=False)
    assert "missing column(s) dx" in _error(release)


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "/etc/passwd", "a/b", "..", ""])
def test_image_id_holding_a_path(release, small_rows, bad_id):
    rows = small_rows.copy()
    rows.loc[2, "image_id"] = bad_id
    rows.to_csv(release / "HAM10000_metadata.csv", index=False)
    assert "rows whose image_id is not a plain file name: line 4" in _error(release)


@pytest.mark.parametrize("age,ok", [("", True), ("45.0", True), ("-3", False), ("old", False), ("130", False)])
def test_age_validation(release, small_rows, age, ok):
    rows = small_rows.copy()
    rows.loc[1, "age"] = age
    rows.to_csv(release / "HAM10000_metadata.csv", index=False)
    if ok:
        build_manifest(release, LIMIT)
    else:
        assert "age that is not a number from 0 to 120: line 3" in _error(release)


def test_empty_and_header_only_csv(release, small_rows):
    (release / "HAM10000_metadata.csv").write_text("")
    assert "metadata file is empty" in _error(release)
    small_rows.iloc[:0].to_csv(release / "HAM10000_metadata.csv", index=False)
    assert "has a header but no rows" in _error(release)


def test_bom_is_accepted_other_encodings_are_named(release):
    csv = release / "HAM10000_metadata.csv"
    text = csv.read_text()
    csv.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(build_manifest(release, LIMIT)) == text.count("\n") - 1
    csv.write_bytes(text.replace("scalp", "sc\xe4lp").encode("utf-16"))
    assert "not UTF-8 text" in _error(release)


def test_metadata_file_missing(release):
    (release / "HAM10000_metadata.csv").unlink()
    assert "metadata file not found" in _error(release)


def test_zero_byte_image(release, small_rows):
    (release / f"{small_rows.image_id[0]}.jpg").write_bytes(b"")
    assert "image file is empty (0 bytes)" in _error(release)


def test_same_image_in_two_places(release, small_rows):
    (release / "images").mkdir()
    shutil.copy(release / f"{small_rows.image_id[0]}.jpg", release / "images")
    assert "1 images found in more than one place" in _error(release)


def test_zip_entry_escaping_its_folder(tmp_path, small_rows):
    rel = make_release(tmp_path / "z", small_rows, "zips")
    with zipfile.ZipFile(rel / "HAM10000_images_part_1.zip", "a") as zf:
        zf.writestr("../evil.jpg", b"x")
    assert "1 entries escaping the archive folder: ../evil.jpg" in _error(rel)


def test_zip_bomb_refused_by_size_limit(tmp_path, small_rows):
    rel = make_release(tmp_path / "z", small_rows, "zips")
    with pytest.raises(DataError, match=r"over the limit of 1,000 \(data.max_archive_bytes\); refusing a possible zip bomb"):
        build_manifest(rel, 1000)


def test_corrupt_zip(tmp_path, small_rows):
    rel = make_release(tmp_path / "z", small_rows, "zips")
    (rel / "HAM10000_images_part_2.zip").write_bytes(b"PK\x03\x04 definitely not a zip")
    assert "not a readable zip archive" in _error(rel)


def test_source_folder_missing(tmp_path):
    assert "data source folder not found" in _error(tmp_path / "nowhere")
