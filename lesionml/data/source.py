"""Find a HAM10000 release on disk, map every image_id to its bytes, and validate the whole.

Accepted layouts (all real ways the release is distributed or unpacked):
- a folder with HAM10000_metadata.csv and the images flat beside it or in subfolders
  (HAM10000_images_part_1/ + HAM10000_images_part_2/, or images/);
- a folder with HAM10000_metadata.csv and the official zips
  HAM10000_images_part_1.zip + HAM10000_images_part_2.zip (read in place, never extracted).

The result is a manifest (one row per metadata row: its metadata, where its image lives
and the image's sha256) plus a release fingerprint that changes when any image or any
metadata value changes, and only then.
"""

from __future__ import annotations

import errno
import hashlib
import os
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Self

import pandas as pd

from lesionml.data.metadata import METADATA_FILE, is_safe_id, read_metadata
from lesionml.errors import DataError, summarize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class ImageLocation:
    """Where one image's bytes are: a file, or a member of a zip archive."""

    file: str
    member: str = ""

    def describe(self) -> str:
        return describe_location(self.file, self.member)


def describe_location(file: str, member: str = "") -> str:
    """How every error names an image: its file in the release (and zip member), then the
    link's target when that file is a link, so the user can tell which release file to fix."""
    where = f"{file}:{member}" if member else file
    return f"{where} (a link to {os.path.realpath(file)})" if os.path.islink(file) else where


class ImageReader:
    """Reads image bytes by (file, zip member), opening each archive once, not once per image.

    Every failure becomes a DataError naming the file (and member).
    """

    def __init__(self) -> None:
        self._archives: dict[str, zipfile.ZipFile] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for zf in self._archives.values():
            zf.close()
        self._archives.clear()

    def read(self, file: str, member: str = "") -> bytes:
        try:
            if not member:
                return Path(file).read_bytes()
            if file not in self._archives:
                self._archives[file] = zipfile.ZipFile(file)
            return self._archives[file].read(member)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:  # KeyError: no such member
            raise DataError(f"{describe_location(file, member)}: cannot read ({exc})") from None


def _link_target(path: Path) -> Path:
    """Where the link at `path` finally leads; a DataError naming it when that is nowhere."""
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError as exc:
        problem = (
            "loops back on itself"
            if exc.errno == errno.ELOOP
            else f"points to {os.readlink(path)}, which does not exist"
        )
        raise DataError(f"{path}: a link that {problem}") from None


def _release_files(source: Path, allow_external_links: bool) -> list[Path]:
    """Every visible file of the release at `source`, named by its path in the release.

    Hidden files and folders are skipped. A link inside the release is fine (a link to a
    folder inside it is skipped: its files are found at their own place); a link out of it
    is refused unless `allow_external_links`, and then each outside folder is read once,
    so a link loop cannot make the walk endless.
    """
    root = source.resolve()
    seen, pending, files, refused = {root}, [source], [], []
    while pending:
        folder = pending.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as exc:
            raise DataError(f"{folder}: cannot list the folder ({exc.strerror})") from None
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            target = _link_target(path) if entry.is_symlink() else None
            # A release that someone else fills could otherwise make ingest read any file this
            # user can (another project's images, another patient's) and train on it unseen.
            if target is not None and not (allow_external_links or target.is_relative_to(root)):
                refused.append(f"{path} -> {target}")
                continue
            if target is not None and target.is_dir():
                if target not in seen and not target.is_relative_to(root):
                    seen.add(target)
                    pending.append(path)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(path)
            else:
                files.append(path)
    if refused:
        raise DataError(
            f"{source}: {summarize('links out of the release folder', refused, limit=3)}; refusing them "
            "(data.allow_external_links: true follows links out of the release)"
        )
    return sorted(files)


def _zip_images(archive: Path, max_bytes: int) -> dict[str, ImageLocation]:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive}: not a readable zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        escaping = [
            i.filename
            for i in infos
            if i.filename.startswith(("/", "\\")) or ".." in PurePosixPath(i.filename.replace("\\", "/")).parts
        ]
        if escaping:
            raise DataError(f"{archive}: {summarize('entries escaping the archive folder', escaping)}")
        total = sum(i.file_size for i in infos)
        if total > max_bytes:
            raise DataError(
                f"{archive}: members inflate to {total:,} bytes, over the limit of {max_bytes:,} "
                f"(data.max_archive_bytes); refusing a possible zip bomb"
            )
        found: dict[str, ImageLocation] = {}
        for info in infos:
            name = PurePosixPath(info.filename)
            # macOS resource forks (__MACOSX/._x.jpg) carry no image data.
            if info.is_dir() or name.parts[0] == "__MACOSX" or name.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            found.setdefault(name.stem, ImageLocation(str(archive), info.filename))
            if found[name.stem].member != info.filename:
                raise DataError(
                    f"{archive}: image {name.stem} appears twice ({found[name.stem].member}, {info.filename})"
                )
        return found


def find_images(source: Path, max_archive_bytes: int, allow_external_links: bool = False) -> dict[str, ImageLocation]:
    """image_id -> location for every image file and zip member under `source`."""
    places: dict[str, list[ImageLocation]] = defaultdict(list)
    for path in _release_files(source, allow_external_links):
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            places[path.stem].append(ImageLocation(str(path)))
        elif suffix == ".zip":
            for stem, loc in _zip_images(path, max_archive_bytes).items():
                places[stem].append(loc)
    twice = [f"{stem} ({', '.join(p.describe() for p in locs)})" for stem, locs in places.items() if len(locs) > 1]
    if twice:
        raise DataError(f"{source}: {summarize('images found in more than one place', twice, limit=3)}")
    return {stem: locs[0] for stem, locs in places.items()}


def source_signature(source: Path, allow_external_links: bool = False) -> str:
    """Cheap change detector (names, sizes, mtimes of what links lead to): decides whether ingest must re-hash.

    It walks the release as ingest does, so a refused link is refused on every run, cached or not.
    """
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: data source folder not found")
    h = hashlib.sha256()
    for path in _release_files(source, allow_external_links):
        st = path.stat()
        h.update(f"{path.relative_to(source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _hash_images(manifest: pd.DataFrame) -> list[str]:
    digests: list[str] = []
    with ImageReader() as reader:
        for file, member in zip(manifest.file, manifest.member, strict=True):
            data = reader.read(file, member)
            if not data:
                raise DataError(f"{describe_location(file, member)}: image file is empty (0 bytes)")
            digests.append(hashlib.sha256(data).hexdigest())
    return digests


def build_manifest(source: Path, max_archive_bytes: int, allow_external_links: bool = False) -> pd.DataFrame:
    """Validate a release and return its manifest; raises DataError naming every problem kind."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: data source folder not found")
    images = find_images(source, max_archive_bytes, allow_external_links)  # refuses links out, the CSV's too
    meta_path = source / METADATA_FILE
    metadata = read_metadata(meta_path)
    ids = set(metadata.image_id)
    missing = [i for i in metadata.image_id if i not in images]
    if missing:
        raise DataError(f"{meta_path}: {summarize('rows whose image file is missing', missing)}")
    extra = sorted(i for i in images if i not in ids)
    if extra:
        unsafe = [images[i].describe() for i in extra if not is_safe_id(i)]
        shown = unsafe or [images[i].describe() for i in extra]
        raise DataError(f"{source}: {summarize('image files with no metadata row', shown)}")
    manifest = metadata.copy()
    manifest["file"] = [images[i].file for i in metadata.image_id]
    manifest["member"] = [images[i].member for i in metadata.image_id]
    manifest["sha256"] = _hash_images(manifest)
    return manifest


def release_fingerprint(manifest: pd.DataFrame) -> str:
    """Hash of metadata values and image contents, independent of where the files live."""
    cols = ["image_id", "lesion_id", "dx", "dx_type", "age", "sex", "localization", "sha256"]
    rows = manifest[cols].sort_values("image_id").to_csv(index=False)
    return hashlib.sha256(rows.encode()).hexdigest()
