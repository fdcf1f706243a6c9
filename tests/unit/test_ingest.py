"""Ingest on real sample images: every release layout, and each kind of broken release.

Every broken release is built in a temp dir from real sample images and must stop
ingest with a DataError whose one-line message names the offending file, row or value.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from lesionml.data.source import build_manifest, release_fingerprint
from lesionml.data.stages import ingest, read_csv
from lesionml.errors import DataError
from lesionml.io import Artifact, sha256_file
from lesionml.workspace import Workspace
from tests.helpers import LAYOUTS, METADATA, full_data_or_skip

LIMIT = 10**9  # max archive bytes: far above any test release


def _fingerprint(source: Path) -> str:
    return release_fingerprint(build_manifest(source, LIMIT))


def _error(source: Path, limit: int = LIMIT) -> str:
    with pytest.raises(DataError) as err:
        build_manifest(source, limit)
    message = str(err.value)
    assert "\n" not in message, "a data error is one line"
    return message


def _rows(release: Path) -> pd.DataFrame:
    return pd.read_csv(release / METADATA, dtype=str, keep_default_na=False)


def _save(release: Path, rows: pd.DataFrame) -> None:
    rows.to_csv(release / METADATA, index=False)


def _image(release: Path, image_id: str) -> Path:
    return next(release.rglob(f"{image_id}.jpg"))


def _archive_of(release: Path, image_id: str) -> Path:
    for archive in sorted(release.glob("*.zip")):
        with zipfile.ZipFile(archive) as zf:
            if f"{image_id}.jpg" in zf.namelist():
                return archive
    raise AssertionError(f"{image_id} in no archive")


def _rewrite_zip(archive: Path, replace: dict[str, bytes | None]) -> None:
    """Rewrite `archive` with members replaced (bytes) or dropped (None)."""
    with zipfile.ZipFile(archive) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    with zipfile.ZipFile(archive, "w") as zf:
        for name, data in {**members, **replace}.items():
            if data is not None:
                zf.writestr(name, data)


# --- layouts and fingerprint ---------------------------------------------------------


@pytest.fixture
def releases(make_release):
    """The same 40 real images in each of the three real layouts."""
    return {layout: make_release(40, layout) for layout in LAYOUTS}


def test_every_layout_gives_the_same_manifest_rows_and_fingerprint(releases):
    manifests = {layout: build_manifest(src, LIMIT) for layout, src in releases.items()}
    flat = manifests["flat"]
    assert len(flat) >= 40 and flat.dx.nunique() == 7
    for layout, manifest in manifests.items():
        assert list(manifest.image_id) == list(flat.image_id), layout
        assert list(manifest.sha256) == list(flat.sha256), layout
    prints = {layout: release_fingerprint(m) for layout, m in manifests.items()}
    assert len(set(prints.values())) == 1, prints
    # Where the bytes live differs, and the manifest records it.
    assert (manifests["flat"].member == "").all() and (manifests["parts"].member == "").all()
    assert manifests["parts"].file.str.contains("HAM10000_images_part_[12]/", regex=True).all()
    assert manifests["zips"].file.str.endswith(("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")).all()
    assert manifests["zips"].member.str.fullmatch(r"ISIC_\d{7}\.jpg").all()


def test_stage_ingest_records_the_same_fingerprint_for_every_layout(releases, tmp_path):
    recorded = {}
    for layout, src in releases.items():
        out = ingest(src, Workspace(tmp_path / f"ws-{layout}"), LIMIT, False)
        assert out["manifest"].is_intact() and out["release"].is_intact()
        release = json.loads(Path(out["release"].path).read_text())
        assert release["source"] == src.name and release["images"] == len(_rows(src))
        recorded[layout] = release["fingerprint"]
    assert len(set(recorded.values())) == 1, recorded


def test_ingest_records_name_no_checkout_and_survive_a_move(releases, tmp_path):
    """Files relative to the release, the release relative to the project: a moved (or
    cloned) project re-ingests to the same bytes, and its manifest still finds the images."""
    project = tmp_path / "project"
    shutil.copytree(releases["parts"], project / "data" / "release")
    out = ingest(project / "data" / "release", Workspace(project / "ws"), LIMIT, False)
    stored = pd.read_csv(out["manifest"].path, keep_default_na=False)
    assert stored.file.str.fullmatch(r"HAM10000_images_part_[12]/ISIC_\d{7}\.jpg").all()
    assert json.loads(Path(out["release"].path).read_text())["source"] == "data/release"
    assert str(tmp_path) not in Path(out["manifest"].path).read_text() + Path(out["release"].path).read_text()

    moved = tmp_path / "elsewhere" / "project"
    shutil.move(project, moved)
    table = read_csv(Artifact.of(moved / "ws" / "ingest" / "manifest.csv"))
    assert all(Path(f).is_file() and Path(f).is_relative_to(moved) for f in table.file)
    again = ingest(moved / "data" / "release", Workspace(moved / "ws"), LIMIT, False)
    assert {k: a.sha256 for k, a in again.items()} == {k: a.sha256 for k, a in out.items()}


def test_release_outside_the_project_is_recorded_by_absolute_path(releases, tmp_path):
    out = ingest(releases["flat"], Workspace(tmp_path / "project" / "ws"), LIMIT, False)
    assert json.loads(Path(out["release"].path).read_text())["source"] == str(releases["flat"].resolve())
    assert (read_csv(out["manifest"]).file.map(lambda f: Path(f).parent) == releases["flat"].resolve()).all()


def test_manifest_hashes_are_the_image_file_hashes(releases):
    manifest = build_manifest(releases["flat"], LIMIT)
    for _, row in manifest.head(5).iterrows():
        assert row.sha256 == sha256_file(row.file)


def test_bundled_sample_with_images_subfolder(sample_dir, tmp_path):
    out = ingest(sample_dir, Workspace(tmp_path), LIMIT, False)
    release = json.loads(Path(out["release"].path).read_text())
    assert release["images"] == 444 and release["lesions"] == 305
    assert Workspace(tmp_path).manifest.is_file() and not (sample_dir / "ingest").exists()


def test_fingerprint_changes_when_one_image_changes(make_release):
    src = make_release(20)
    before = _fingerprint(src)
    victim = _image(src, _rows(src).image_id[3])
    data = victim.read_bytes()
    victim.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])  # same size, one byte differs
    assert _fingerprint(src) != before
    victim.write_bytes(data)
    assert _fingerprint(src) == before, "restoring the bytes restores the fingerprint"


def test_fingerprint_changes_when_one_metadata_value_changes(make_release):
    src = make_release(20)
    before = _fingerprint(src)
    rows = _rows(src)
    rows.loc[0, "age"] = "5.0" if rows.age[0] != "5.0" else "10.0"
    _save(src, rows)
    assert _fingerprint(src) != before


def test_fingerprint_ignores_row_order_file_times_and_unrelated_files(make_release):
    src = make_release(20)
    before = _fingerprint(src)
    _save(src, _rows(src).iloc[::-1])
    for image in src.glob("*.jpg"):
        image.touch()
    (src / "README.txt").write_text("notes")
    assert _fingerprint(src) == before


def test_full_data_copy_ingests(tmp_path):
    full = full_data_or_skip()
    manifest = build_manifest(full, LIMIT)
    assert len(manifest) == 8517 and manifest.dx.nunique() == 7


# --- broken releases: each with its own message ---------------------------------------


def test_metadata_file_missing(make_release):
    src = make_release(10)
    (src / METADATA).unlink()
    assert _error(src) == f"{src / METADATA}: metadata file not found"


def test_source_folder_missing(tmp_path):
    assert _error(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'}: data source folder not found"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_image(make_release, layout):
    src = make_release(20, layout)
    rows = _rows(src)
    gone = rows.image_id[4]
    if layout == "zips":
        _rewrite_zip(_archive_of(src, gone), {f"{gone}.jpg": None})
    else:
        _image(src, gone).unlink()
    assert _error(src) == f"{src / METADATA}: 1 rows whose image file is missing: {gone}"


def test_many_missing_images_are_counted_and_the_first_named(make_release):
    src = make_release(20)
    rows = _rows(src)
    for image_id in rows.image_id[:8]:
        _image(src, image_id).unlink()
    message = _error(src)
    assert "8 rows whose image file is missing: " in message
    assert ", ".join(rows.image_id[:5]) in message and "(and 3 more)" in message


def test_extra_image_without_metadata_row(make_release):
    src = make_release(10)
    stray = src / "ISIC_9999999.jpg"
    shutil.copy(next(src.glob("*.jpg")), stray)
    assert _error(src) == f"{src}: 1 image files with no metadata row: {stray}"


def test_extra_image_inside_a_zip(make_release):
    src = make_release(10, "zips")
    with zipfile.ZipFile(src / "HAM10000_images_part_2.zip", "a") as zf:
        zf.writestr("ISIC_9999999.jpg", b"\xff\xd8 a stray image")
    message = _error(src)
    assert (
        message == f"{src}: 1 image files with no metadata row: {src / 'HAM10000_images_part_2.zip'}:ISIC_9999999.jpg"
    )


def test_duplicate_image_id(make_release):
    src = make_release(10)
    rows = _rows(src)
    rows.loc[5, "image_id"] = rows.image_id[4]
    _save(src, rows)
    assert _error(src) == f"{src / METADATA}: 1 duplicate image_id rows: line 7 ({rows.image_id[4]!r})"


def test_unknown_dx(make_release):
    src = make_release(10)
    rows = _rows(src)
    rows.loc[0, "dx"] = "melanomaa"
    _save(src, rows)
    assert _error(src) == (
        f"{src / METADATA}: 1 rows with a dx outside akiec, bcc, bkl, df, mel, nv, vasc: line 2 ('melanomaa')"
    )


@pytest.mark.parametrize("column", ["dx", "lesion_id", "image_id"])
def test_missing_column(make_release, column):
    src = make_release(10)
    _save(src, _rows(src).drop(columns=column))
    message = _error(src)
    assert f"{src / METADATA}: missing column(s) {column}; found " in message
    assert column not in message.split("found ", 1)[1].split(", ")


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "/etc/passwd", "images/ISIC_0024315", "..", "ISIC_1.jpg", ""])
def test_image_id_holding_a_path_is_refused(make_release, bad_id):
    src = make_release(10)
    rows = _rows(src)
    rows.loc[2, "image_id"] = bad_id
    _save(src, rows)
    assert _error(src) == f"{src / METADATA}: 1 rows whose image_id is not a plain file name: line 4 ({bad_id!r})"


@pytest.mark.parametrize("entry", ["../evil.jpg", "HAM10000_images_part_1/../../evil.jpg", "/evil.jpg", "..\\evil.jpg"])
def test_zip_entry_escaping_its_folder(make_release, entry):
    src = make_release(10, "zips")
    archive = src / "HAM10000_images_part_1.zip"
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(zipfile.ZipInfo(entry), b"x")  # ZipInfo keeps the name as given
    assert _error(src) == f"{archive}: 1 entries escaping the archive folder: {entry}"


def test_zip_over_the_size_limit_is_refused_as_a_bomb(make_release):
    src = make_release(10, "zips")
    message = _error(src, limit=1000)
    assert "members inflate to " in message
    assert "over the limit of 1,000 (data.max_archive_bytes); refusing a possible zip bomb" in message


@pytest.mark.parametrize("layout", ["flat", "zips"])
def test_zero_byte_image(make_release, layout):
    src = make_release(10, layout)
    victim = _rows(src).image_id[0]
    if layout == "flat":
        path = _image(src, victim)
        path.write_bytes(b"")
        assert _error(src) == f"{path}: image file is empty (0 bytes)"
    else:
        archive = _archive_of(src, victim)
        _rewrite_zip(archive, {f"{victim}.jpg": b""})
        assert _error(src) == f"{archive}:{victim}.jpg: image file is empty (0 bytes)"


@pytest.mark.parametrize("garbage", [b"PK\x03\x04 definitely not a zip", b"", b"just text"])
def test_corrupt_zip(make_release, garbage):
    src = make_release(10, "zips")
    archive = src / "HAM10000_images_part_2.zip"
    archive.write_bytes(garbage)
    assert _error(src).startswith(f"{archive}: not a readable zip archive (")


def test_truncated_zip(make_release):
    src = make_release(10, "zips")
    archive = src / "HAM10000_images_part_1.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    assert _error(src).startswith(f"{archive}: not a readable zip archive (")


def test_empty_csv(make_release):
    src = make_release(10)
    (src / METADATA).write_text("")
    assert _error(src) == f"{src / METADATA}: metadata file is empty"
    (src / METADATA).write_text("  \n\n")
    assert _error(src) == f"{src / METADATA}: metadata file is empty"


def test_header_only_csv(make_release):
    src = make_release(10)
    _save(src, _rows(src).iloc[:0])
    assert _error(src) == f"{src / METADATA}: has a header but no rows"


def test_csv_with_bom_works_and_gives_the_same_fingerprint(make_release):
    src = make_release(10)
    before = _fingerprint(src)
    csv = src / METADATA
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_bytes())
    manifest = build_manifest(src, LIMIT)
    assert list(manifest.columns[:2]) == ["lesion_id", "image_id"], "the BOM is not part of the first column name"
    assert release_fingerprint(manifest) == before


def test_csv_with_crlf_line_ends_and_padded_values_works(make_release):
    src = make_release(10)
    before = _fingerprint(src)
    csv = src / METADATA
    text = csv.read_text().replace(",", " , ").replace("\n", "\r\n")
    csv.write_bytes(text.encode())
    assert _fingerprint(src) == before


def test_non_utf8_csv_names_the_byte(make_release):
    src = make_release(10)
    csv = src / METADATA
    text = csv.read_text()
    latin = text.replace("male", "m\xe4le", 1).encode("latin-1")
    csv.write_bytes(latin)
    offset = latin.index(b"\xe4")
    assert _error(src) == f"{csv}: not UTF-8 text (byte 0xe4 at offset {offset}); save it as UTF-8"


def test_non_utf8_csv_with_bom_names_the_right_byte(make_release):
    src = make_release(10)
    csv = src / METADATA
    data = b"\xef\xbb\xbf" + csv.read_text().replace("male", "m\xe4le", 1).encode("latin-1")
    csv.write_bytes(data)
    offset = data.index(b"\xe4")
    assert f"(byte 0xe4 at offset {offset})" in _error(src)


def test_utf16_csv_is_refused(make_release):
    src = make_release(10)
    csv = src / METADATA
    csv.write_bytes(csv.read_text().encode("utf-16"))
    assert _error(src).startswith(f"{csv}: not UTF-8 text (byte 0xff at offset 0)")


def test_ragged_csv_is_refused(make_release):
    src = make_release(10)
    csv = src / METADATA
    lines = csv.read_text().splitlines()
    lines[3] += ",extra,fields"
    csv.write_text("\n".join(lines) + "\n")
    message = _error(src)
    assert message.startswith(f"{csv}: not a readable CSV (") and "line 4" in message


@pytest.mark.parametrize("age", ["-3", "old", "130", "nan"])
def test_bad_age(make_release, age):
    src = make_release(10)
    rows = _rows(src)
    rows.loc[1, "age"] = age
    _save(src, rows)
    assert _error(src) == f"{src / METADATA}: 1 rows with an age that is not a number from 0 to 120: line 3 ({age!r})"


@pytest.mark.parametrize("age", ["", "0", "45.0", "120"])
def test_good_or_unknown_age(make_release, age):
    src = make_release(10)
    rows = _rows(src)
    rows.loc[1, "age"] = age
    _save(src, rows)
    assert len(build_manifest(src, LIMIT)) == len(rows)


def test_unknown_sex_value_and_mixed_dx_in_one_lesion(make_release):
    src = make_release(10)
    rows = _rows(src)
    bad = rows.copy()
    bad.loc[0, "sex"] = "x"
    _save(src, bad)
    assert "1 rows with a sex outside male, female, unknown: line 2 ('x')" in _error(src)
    lesion = rows.lesion_id.value_counts().index[0]  # a lesion with several images
    assert (rows.lesion_id == lesion).sum() > 1
    mixed = rows.copy()
    first = mixed.index[mixed.lesion_id == lesion][0]
    mixed.loc[first, "dx"] = "mel" if mixed.dx[first] != "mel" else "nv"
    _save(src, mixed)
    assert _error(src) == f"{src / METADATA}: 1 lesions with images of different dx: {lesion}"


def test_same_image_in_two_folders(make_release):
    src = make_release(10, "parts")
    image_id = _rows(src).image_id.iloc[-1]
    first = _image(src, image_id)
    (src / "images").mkdir()
    second = src / "images" / first.name
    shutil.copy(first, second)
    message = _error(src)
    assert message.startswith(f"{src}: 1 images found in more than one place: {image_id} (")
    assert str(first) in message and str(second) in message


def test_same_image_in_a_zip_and_a_folder(make_release):
    """The official zips with one of them unpacked beside it: every image of it twice."""
    src = make_release(10, "zips")
    archive = src / "HAM10000_images_part_1.zip"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(src / "HAM10000_images_part_1")
        count = len(zf.namelist())
    message = _error(src)
    assert f"{count} images found in more than one place: " in message
    assert f"{archive}:" in message and str(src / "HAM10000_images_part_1") in message


def test_same_image_twice_in_one_zip(make_release):
    src = make_release(10, "zips")
    archive = src / "HAM10000_images_part_1.zip"
    with zipfile.ZipFile(archive) as zf:
        name = zf.namelist()[0]
        data = zf.read(name)
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(f"sub/{name}", data)
    assert _error(src) == f"{archive}: image {Path(name).stem} appears twice ({name}, sub/{name})"


def test_hidden_files_and_mac_resource_forks_are_ignored(make_release):
    src = make_release(10, "zips")
    before = _fingerprint(src)
    with zipfile.ZipFile(src / "HAM10000_images_part_1.zip", "a") as zf:
        zf.writestr("__MACOSX/._ISIC_0000000.jpg", b"\0\5\26\7")
    (src / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (src / ".trash").mkdir()
    (src / ".trash" / "ISIC_1234567.jpg").write_bytes(b"old")
    assert _fingerprint(src) == before


# --- links ----------------------------------------------------------------------------
# A release someone else fills may hold links: one out of it is refused unless allowed,
# one inside it is fine, and a broken one is named, never hung on or followed blindly.

OUT_HINT = "(data.allow_external_links: true follows links out of the release)"


def _link_out(src: Path, tmp_path: Path) -> tuple[Path, Path]:
    """One image of `src` moved out of the release and replaced by a link to it."""
    victim = next(p for p in sorted(src.glob("*.jpg")))
    outside = tmp_path / "elsewhere" / victim.name
    outside.parent.mkdir(exist_ok=True)
    shutil.move(victim, outside)
    victim.symlink_to(outside)
    return victim, outside


def test_link_out_of_the_release_is_refused_naming_the_file_and_its_target(make_release, tmp_path):
    src = make_release(10)
    link, outside = _link_out(src, tmp_path)
    assert _error(src) == f"{src}: 1 links out of the release folder: {link} -> {outside}; refusing them {OUT_HINT}"


def test_metadata_csv_linked_out_of_the_release_is_refused(make_release, tmp_path):
    src = make_release(10)
    outside = tmp_path / "elsewhere.csv"
    shutil.move(src / METADATA, outside)
    (src / METADATA).symlink_to(outside)
    assert (
        _error(src)
        == f"{src}: 1 links out of the release folder: {src / METADATA} -> {outside}; refusing them {OUT_HINT}"
    )


def test_links_out_are_followed_when_allowed_and_give_the_copy_s_fingerprint(make_release, tmp_path):
    src = make_release(10)
    before = _fingerprint(src)
    link, _ = _link_out(src, tmp_path)
    (src / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a folder link out: read once
    with pytest.raises(DataError, match="images found in more than one place"):
        build_manifest(src, LIMIT, allow_external_links=True)
    (src / "more").unlink()
    manifest = build_manifest(src, LIMIT, allow_external_links=True)
    assert release_fingerprint(manifest) == before
    assert str(link) in set(manifest.file), "the manifest names the file in the release, not the link's target"


def test_links_inside_the_release_are_accepted(make_release, tmp_path):
    src = make_release(10)
    before = _fingerprint(src)
    (src / "store").mkdir()
    victim = next(p for p in sorted(src.glob("*.jpg")))
    shutil.move(victim, src / "store" / "kept.bin")  # not an image name: found only through the link
    victim.symlink_to(Path("store") / "kept.bin")  # relative, as a user's `ln -s` makes it
    (src / "again").symlink_to(src / "store", target_is_directory=True)  # its files are read at their own place
    assert _fingerprint(src) == before
    out = ingest(src, Workspace(tmp_path / "ws"), LIMIT, False)
    assert victim.name in set(pd.read_csv(out["manifest"].path).file), "recorded by its name in the release"


def test_dangling_link_is_named(make_release):
    src = make_release(10)
    victim = next(p for p in sorted(src.glob("*.jpg")))
    victim.unlink()
    victim.symlink_to(src / "gone.jpg")
    assert _error(src) == f"{victim}: a link that points to {src / 'gone.jpg'}, which does not exist"


def test_link_loops_are_named_or_walked_once(make_release, tmp_path):
    src = make_release(10)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "back").symlink_to(tmp_path / "outside", target_is_directory=True)
    (src / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    (src / "self").symlink_to(src, target_is_directory=True)
    assert len(build_manifest(src, LIMIT, allow_external_links=True)) == 10  # folder loops: each folder once
    (src / "a.jpg").symlink_to(src / "b.jpg")
    (src / "b.jpg").symlink_to(src / "a.jpg")
    assert _error(src) in {f"{src / name}: a link that loops back on itself" for name in ("a.jpg", "b.jpg")}
