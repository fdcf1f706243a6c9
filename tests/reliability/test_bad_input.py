"""The CLI on broken input, end to end: every bad release or bad params file is refused with
one line naming the file, row or key and the problem, the documented exit code, no
traceback, and no output of the previous good run changed or deleted.

One project (params file + workspace in a temp dir) has a good run first; each case then
points the same project at a broken copy of its release (`--source`) or at bad params and
runs `lesionml run --only data` again, in-process (one Prefect temporary server for all).
Library-level details of each check are in tests/unit/test_ingest.py, test_images.py and
test_config.py; this module checks what the user of the command sees.

Input refused by preprocess or split (a bad image, too few lesions) comes after ingest (and
preprocess) succeeded on it: the workspace's rollback must put their earlier outputs back.
"""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cli.main import main
from lesionml.data.images import load_image_array
from tests.helpers import METADATA, SAMPLE, sample_metadata, write_params

pytestmark = pytest.mark.integration

STAGES = ("ingest", "preprocess", "split", "normalize", "augment")
PARTS = ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip")
BOM = b"\xef\xbb\xbf"
RED, BLUE = (255, 0, 0), (0, 0, 255)


# --- the good release: real sample images plus one of each awkward-but-valid kind -------


def _good_rows() -> pd.DataFrame:
    """The first 3 lesions of every class (31 real images): the least every class needs to split."""
    meta = sample_metadata()
    lesions = meta.drop_duplicates("lesion_id").groupby("dx").head(3).lesion_id
    return meta[meta.lesion_id.isin(lesions)].reset_index(drop=True)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    """Stored 450 wide x 600 tall with a red top quarter, EXIF orientation 6 (shown rotated clockwise)."""
    pixels = np.zeros((600, 450, 3), np.uint8)
    pixels[:] = BLUE
    pixels[:150] = RED
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)


# image file suffix, bytes, and what its decoded 75x100 array must look like
AWKWARD: dict[str, tuple[str, Callable[[], bytes], Callable[[np.ndarray], bool]]] = {
    "png-alpha": (
        ".png",
        lambda: _encode(Image.new("RGBA", (200, 150), (255, 0, 0, 128)), "PNG"),
        lambda a: abs(int(a[..., 0].mean()) - 128) <= 2 and a[..., 1:].max() == 0,  # composited on black
    ),
    "grayscale": (".png", lambda: _encode(Image.new("L", (200, 150), 200), "PNG"), lambda a: (a == 200).all()),
    "cmyk-jpeg": (
        ".jpg",
        lambda: _encode(Image.new("CMYK", (200, 150), (0, 255, 255, 0)), "JPEG", quality=95),
        lambda a: a[..., 0].mean() > 240 and a[..., 1:].mean() < 15,
    ),
    "16-bit-png": (
        ".png",
        lambda: _encode(Image.fromarray(np.full((150, 200), 40000, np.uint16)), "PNG"),
        lambda a: (np.abs(a.astype(int) - 40000 * 255 // 65535) <= 1).all(),  # scaled, not clipped
    ),
    "exif-rotated": (
        ".jpg",
        _exif_rotated,
        # rotated before resizing: the red quarter is on the right, not squeezed at the top
        lambda a: a[:, 80:, 0].mean() > 200 and a[:, 80:, 2].mean() < 50 and a[:, :70, 2].mean() > 200,
    ),
}


def _build_good_release(dest: Path, rows: pd.DataFrame) -> dict[str, str]:
    """Real sample images, the first rows' images replaced by AWKWARD ones, and a CSV with a BOM.

    Returns kind -> image_id of the awkward images.
    """
    dest.mkdir(parents=True)
    (dest / METADATA).write_bytes(BOM + rows.to_csv(index=False).encode("utf-8"))
    awkward = dict(zip(AWKWARD, rows.image_id, strict=False))
    for image_id in rows.image_id:
        shutil.copy2(SAMPLE / "images" / f"{image_id}.jpg", dest / f"{image_id}.jpg")
    for kind, image_id in awkward.items():
        suffix, make, _ = AWKWARD[kind]
        (dest / f"{image_id}.jpg").unlink()
        (dest / f"{image_id}{suffix}").write_bytes(make())
    return awkward


# --- the project and its good run ------------------------------------------------------


def _outputs(workspace: Path) -> dict[str, str]:
    """relative path -> sha256 of every file in the workspace but `.lock` (a label each run rewrites)."""
    return {
        p.relative_to(workspace).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(workspace.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@dataclass
class Project:
    root: Path
    params: Path
    release: Path
    rows: pd.DataFrame
    awkward: dict[str, str]
    baseline: dict[str, str]

    @property
    def workspace(self) -> Path:
        return self.params.parent / "ws"

    def run(self, *args: str) -> int:
        return main(["run", "--only", "data", "--params", str(self.params), *args])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[Project]:
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    root = tmp_path_factory.mktemp("bad-input")
    rows = _good_rows()
    release = root / "good"
    awkward = _build_good_release(release, rows)
    # 75x100: the AWKWARD checks name pixel columns of that size.
    params = write_params(root / "project", release, data={"image_size": [75, 100]}, augment={"preview_images": 2})
    # Heartbeats detect crashed flow runs; at its end every flow run waits up to 1 s for the
    # heartbeat thread to stop: ~25 s over this module's runs. No run here may crash.
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        code = main(["run", "--only", "data", "--params", str(params)])
        assert code == 0, "the good release must run"
        ws = params.parent / "ws"
        yield Project(root, params, release, rows, awkward, _outputs(ws))


# --- a valid release with every awkward kind of file: runs, and decodes as it should ------


def test_good_release_with_bom_csv_and_awkward_images_runs(project):
    """A CSV with a BOM, PNG with alpha, grayscale, CMYK JPEG, 16-bit PNG, EXIF-rotated JPEG."""
    assert (project.release / METADATA).read_bytes().startswith(BOM)
    pixels, ids = load_image_array(project.workspace / "preprocess" / "images.npz")
    assert pixels.shape == (len(project.rows), 75, 100, 3) and pixels.dtype == np.uint8
    assert list(ids) == list(project.rows.image_id), "every row kept, in order (the BOM is not in a column name)"
    for kind, image_id in project.awkward.items():
        check = AWKWARD[kind][2]
        assert check(pixels[list(ids).index(image_id)]), f"{kind} image {image_id} decoded wrongly"
    manifest = pd.read_csv(project.workspace / "ingest" / "manifest.csv")
    assert list(manifest.columns[:2]) == ["lesion_id", "image_id"]
    for path in (
        "ingest/manifest.csv",
        "preprocess/images.npz",
        "split/split.csv",
        "normalize/stats.json",
        "augment/preview.png",
    ):
        assert path in project.baseline, path


# --- checking one refused run ------------------------------------------------------------


def _matches(expected: str, line: str) -> bool:
    """`expected` is the whole line; '…' in it stands for any text (an OS or library detail)."""
    return re.fullmatch(".*".join(re.escape(part) for part in expected.split("…")), line) is not None


def _check_refusal(project: Project, capsys, caplog, code: int, expected_code: int, expected: str, stage: str) -> None:
    out, err = capsys.readouterr()
    ours = [line for line in err.splitlines() if line.startswith("lesionml:")]
    assert len(ours) == 1 and _matches(f"lesionml: error: {expected}", ours[0]), (
        f"expected one line\n  lesionml: error: {expected}\ngot\n  " + "\n  ".join(ours or err.splitlines()[-5:])
    )
    assert code == expected_code, ours[0]
    assert "Traceback" not in out + err, err[-3000:]
    # Prefect's console handler may write to a stream captured before this test; its
    # records (what that handler prints) are checked here instead.
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, tracebacks
    _check_outputs_kept(project, stage)


def _check_outputs_kept(project: Project, stage: str) -> None:
    """Every output of the good run byte-identical, none deleted, none added, whichever stage
    refused the input (`stage` names it in failure messages). Prefect may add records of the
    failed task runs."""
    after = _outputs(project.workspace)
    before = project.baseline
    assert not set(before) - set(after), f"outputs deleted: {sorted(set(before) - set(after))}"
    added = sorted(p for p in set(after) - set(before) if not p.startswith(".prefect/"))
    assert not added, f"new outputs: {added}"
    changed = sorted(p for p in before if after[p] != before[p] and not p.startswith(".prefect/"))
    assert not changed, f"a run refused at {stage} changed outputs of the good run: {changed}"


# --- broken releases ----------------------------------------------------------------------


def _rows(src: Path) -> pd.DataFrame:
    return pd.read_csv(src / METADATA, dtype=str, keep_default_na=False, encoding="utf-8-sig")


def _save(src: Path, rows: pd.DataFrame) -> None:
    rows.to_csv(src / METADATA, index=False)


def _image(src: Path, image_id: str) -> Path:
    [path] = src.glob(f"{image_id}.*")
    return path


def _real_image(src: Path, k: int = -1) -> Path:
    """A real sample JPEG of the release (the awkward ones are the first rows)."""
    return src / f"{_rows(src).image_id.iloc[k]}.jpg"


def _edit(**changes: dict[int, str]) -> Callable[[Path], dict]:
    """Set column values by row index, e.g. _edit(age={1: "old"}); lines are rows + 2."""

    def make(src: Path) -> dict:
        rows = _rows(src)
        for column, values in changes.items():
            for i, v in values.items():
                rows.loc[i, column] = v
        _save(src, rows)
        return {}

    return make


def _missing_csv(src: Path) -> dict:
    (src / METADATA).unlink()
    return {}


def _empty_csv(src: Path) -> dict:
    (src / METADATA).write_bytes(b"")
    return {}


def _renamed_column(src: Path) -> dict:
    _save(src, _rows(src).rename(columns={"dx": "diagnosis"}))
    return {}


def _duplicate_row(src: Path) -> dict:
    rows = _rows(src)
    _save(src, pd.concat([rows, rows.iloc[[4]]], ignore_index=True))  # e.g. two exports concatenated
    return {"line": len(rows) + 2, "id": rows.image_id[4]}


def _row_without_image(src: Path) -> dict:
    victim = _real_image(src, 10)
    victim.unlink()
    return {"id": victim.stem}


def _image_without_row(src: Path) -> dict:
    stray = src / "ISIC_9999999.jpg"
    shutil.copy(_real_image(src), stray)
    return {"stray": stray}


def _latin1_csv(src: Path) -> dict:
    rows = _rows(src)
    rows.loc[0, "localization"] = "r\xfccken"  # edited in a spreadsheet that saves Latin-1
    data = rows.to_csv(index=False).encode("latin-1")
    (src / METADATA).write_bytes(data)
    return {"offset": data.index(b"\xfc")}


def _utf16_csv(src: Path) -> dict:
    (src / METADATA).write_bytes(_rows(src).to_csv(index=False).encode("utf-16"))
    return {}


def _keep_rows(select: Callable[[pd.DataFrame], pd.Series]) -> Callable[[Path], dict]:
    """Keep only the selected rows and their images."""

    def make(src: Path) -> dict:
        rows = _rows(src)
        keep = select(rows)
        for image_id in rows.image_id[~keep]:
            _image(src, image_id).unlink()
        _save(src, rows[keep])
        return {"dx": rows.dx[keep].iloc[0]}

    return make


def _drop_one_df_lesion(rows: pd.DataFrame) -> pd.Series:
    return rows.lesion_id != rows.lesion_id[rows.dx == "df"].iloc[0]


def _zero_bytes(src: Path) -> dict:
    victim = _real_image(src)
    victim.write_bytes(b"")
    return {"path": victim}


def _truncated(src: Path) -> dict:
    victim = _real_image(src)
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # an interrupted download
    return {"path": victim}


def _text_as_jpg(src: Path) -> dict:
    victim = _real_image(src)
    victim.write_text("<html><body>404 Not Found</body></html>\n")  # a failed download saved as .jpg
    return {"path": victim}


def _link_to_passwd(src: Path) -> dict:
    victim = _real_image(src)
    victim.unlink()
    victim.symlink_to("/etc/passwd")  # any readable file on the machine: never ingested unasked
    return {"path": victim}


def _link_to_a_non_image(src: Path) -> dict:
    victim = _real_image(src)
    (src / "notes.txt").write_text("not a picture\n")
    victim.unlink()
    victim.symlink_to("notes.txt")  # inside the release: followed, and named with its target on error
    return {"path": victim, "target": src / "notes.txt"}


def _png_bilevel(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of one colour: 20000x20000 compresses to ~50 kB and is 400 M pixels."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _huge_image(src: Path) -> dict:
    victim = _real_image(src)
    victim.unlink()
    path = victim.with_suffix(".png")
    path.write_bytes(_png_bilevel(20_000, 20_000))
    return {"path": path}


def _zipped(src: Path) -> None:
    """The release's images moved into the two official zips."""
    images = sorted(p for p in src.iterdir() if p.name != METADATA)
    for name, part in zip(PARTS, (images[: len(images) // 2], images[len(images) // 2 :]), strict=False):
        with zipfile.ZipFile(src / name, "w", zipfile.ZIP_STORED) as zf:
            for p in part:
                zf.write(p, p.name)
                p.unlink()


def _zip_escaping(src: Path) -> dict:
    _zipped(src)
    with zipfile.ZipFile(src / PARTS[0], "a") as zf:
        zf.writestr(zipfile.ZipInfo("../../evil.jpg"), b"\xff\xd8\xff")  # ZipInfo keeps the name as given
    return {"zip": src / PARTS[0]}


def _zip_bomb(src: Path) -> dict:
    _zipped(src)
    with zipfile.ZipFile(src / PARTS[1], "a", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ISIC_9999999.jpg", bytes(30_000_000))  # 30 MB inflating from ~30 kB
    with zipfile.ZipFile(src / PARTS[0]) as zf:
        ok = sum(i.file_size for i in zf.infolist())
    with zipfile.ZipFile(src / PARTS[1]) as zf:
        total = sum(i.file_size for i in zf.infolist())
    assert ok < 20_000_000 < total
    return {"zip": src / PARTS[1], "total": f"{total:,}"}


def _corrupt_zip(src: Path) -> dict:
    _zipped(src)
    archive = src / PARTS[1]
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # an interrupted download
    return {"zip": archive}


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], dict]  # breaks the copy of the good release at its path; returns names for `message`
    message: str  # the line after "lesionml: error: ", with {src}, {csv} and make's names; '…' = any text
    code: int = 1  # DataError
    stage: str = "ingest"  # the stage that refuses it
    args: tuple[str, ...] = ()  # more CLI arguments


CLASS_LIST = "akiec, bcc, bkl, df, mel, nv, vasc"
CASES = [
    # metadata
    Case("metadata-missing", _missing_csv, "{csv}: metadata file not found"),
    Case("metadata-empty", _empty_csv, "{csv}: metadata file is empty"),
    Case(
        "column-renamed",
        _renamed_column,
        "{csv}: missing column(s) dx; found lesion_id, image_id, diagnosis, dx_type, age, sex, localization",
    ),
    Case("duplicate-image_id", _duplicate_row, "{csv}: 1 duplicate image_id rows: line {line} ('{id}')"),
    Case(
        "dx-unknown",
        _edit(dx={3: "melanoma"}),
        f"{{csv}}: 1 rows with a dx outside {CLASS_LIST}: line 5 ('melanoma')",
    ),
    Case(
        "age-non-numeric-or-negative",
        _edit(age={1: "old", 2: "-5"}),
        "{csv}: 2 rows with an age that is not a number from 0 to 120: line 3 ('old'), line 4 ('-5')",
    ),
    Case("row-without-image", _row_without_image, "{csv}: 1 rows whose image file is missing: {id}"),
    Case("image-without-row", _image_without_row, "{src}: 1 image files with no metadata row: {stray}"),
    Case(
        "image_id-holding-a-path",
        _edit(image_id={0: "../x", 1: "/etc/passwd", 2: "a/b"}),
        "{csv}: 3 rows whose image_id is not a plain file name: "
        "line 2 ('../x'), line 3 ('/etc/passwd'), line 4 ('a/b')",
    ),
    Case("csv-latin-1", _latin1_csv, "{csv}: not UTF-8 text (byte 0xfc at offset {offset}); save it as UTF-8"),
    Case(
        "csv-utf-16",
        _utf16_csv,
        "{csv}: not UTF-8 text (byte 0xff at offset 0); it is UTF-16 (byte order mark FF FE); save it as UTF-8",
    ),
    Case(
        "one-row-dataset",
        _keep_rows(lambda rows: rows.index == 0),
        "too few lesions to split: {dx} has 1 (each class needs at least 3, one per split)",
        stage="split",
    ),
    Case(
        "class-with-too-few-lesions",
        _keep_rows(_drop_one_df_lesion),
        "too few lesions to split: df has 2 (each class needs at least 3, one per split)",
        stage="split",
    ),
    # images
    Case("image-zero-bytes", _zero_bytes, "{path}: image file is empty (0 bytes)"),
    Case(
        "image-truncated-jpeg",
        _truncated,
        "{path}: cannot decode image (image file is truncated (… bytes not processed))",
        stage="preprocess",
    ),
    Case("image-text-named-jpg", _text_as_jpg, "{path}: not an image Pillow can read", stage="preprocess"),
    Case(
        "image-linked-out-of-the-release",
        _link_to_passwd,
        "{src}: 1 links out of the release folder: {path} -> /etc/passwd; refusing them "
        "(data.allow_external_links: true follows links out of the release)",
    ),
    Case(
        "image-linked-to-a-non-image",
        _link_to_a_non_image,
        "{path} (a link to {target}): not an image Pillow can read",
        stage="preprocess",
    ),
    Case(
        "image-20000x20000-pixels",
        _huge_image,
        "{path}: 20000x20000 pixels is over the limit of 40,000,000 (data.max_image_pixels); "
        "refusing a possible decompression bomb",
        stage="preprocess",
    ),
    # archives
    Case("zip-entry-escaping", _zip_escaping, "{zip}: 1 entries escaping the archive folder: ../../evil.jpg"),
    Case(
        "zip-bomb",
        _zip_bomb,
        "{zip}: members inflate to {total} bytes, over the limit of 20,000,000 (data.max_archive_bytes); "
        "refusing a possible zip bomb",
        args=("--set", "data.max_archive_bytes=20000000"),
    ),
    Case("zip-corrupt", _corrupt_zip, "{zip}: not a readable zip archive (…)"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_broken_release_is_refused(project, case, tmp_path, capsys, caplog):
    src = tmp_path / "release"
    shutil.copytree(project.release, src)
    names = case.make(src) or {}
    message = case.message.format(src=src, csv=src / METADATA, **names)
    capsys.readouterr()
    code = project.run("--source", str(src), *case.args)
    _check_refusal(project, capsys, caplog, code, case.code, message, case.stage)


# --- bad params ---------------------------------------------------------------------------


def _params_file(project: Project, **sections: dict) -> Path:
    """A copy of the project's params with some values changed, beside it (same workspace)."""
    tree = yaml.safe_load(project.params.read_text())
    for section, values in sections.items():
        tree[section].update(values)
    path = project.params.with_name("edited-params.yaml")
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


PARAM_CASES = [
    # (id, params file edits or None for the project's own file, --set overrides, message with {params})
    ("unknown-key", {"train": {"epoch": 3}}, (), "{params}: unknown key 'train.epoch'"),
    (
        "wrong-type",
        None,
        ("split.seed=seven",),
        (
            "{params} with --set split.seed=seven: split.seed: Input should be a valid integer, "
            "unable to parse string as an integer (got 'seven')"
        ),
    ),
    (
        "negative-epochs",
        None,
        ("train.epochs=-1",),
        "{params} with --set train.epochs=-1: train.epochs: Input should be greater than or equal to 1 (got -1)",
    ),
    (
        "fractions-not-below-1",
        {"split": {"val_fraction": 0.6, "test_fraction": 0.4}},
        (),
        "{params}: split: val_fraction + test_fraction must be below 1 to leave a training split, got 0.6 + 0.4",
    ),
    (
        "unknown-model",
        None,
        ("models.enabled=[cnn, resnet50]",),
        (
            "{params} with --set models.enabled=[cnn, resnet50]: models: unknown model 'resnet50'; "
            "known models: cnn, cnn_lstm"
        ),
    ),
]


@pytest.mark.parametrize("edits,overrides,expected", [pytest.param(*c[1:], id=c[0]) for c in PARAM_CASES])
def test_bad_params_are_refused(project, edits, overrides, expected, capsys, caplog):
    params = _params_file(project, **edits) if edits else project.params
    args = [a for o in overrides for a in ("--set", o)]
    capsys.readouterr()
    code = main(["run", "--only", "data", "--params", str(params), *args])
    _check_refusal(project, capsys, caplog, code, 2, expected.format(params=params), "ingest")
