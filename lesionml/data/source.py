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
        return f"{self.file}:{self.member}" if self.member else self.file


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
        where = f"{file}:{member}" if member else file
        try:
            if not member:
                return Path(file).read_bytes()
            if file not in self._archives:
                self._archives[file] = zipfile.ZipFile(file)
            return self._archives[file].read(member)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:  # KeyError: no such member
            raise DataError(f"{where}: cannot read ({exc})") from None


def _visible(path: Path) -> bool:
    return not any(part.startswith(".") for part in path.parts)


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


def find_images(source: Path, max_archive_bytes: int) -> dict[str, ImageLocation]:
    """image_id -> location for every image file and zip member under `source`."""
    places: dict[str, list[ImageLocation]] = defaultdict(list)
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(root) / name
            suffix = path.suffix.lower()
            if name.startswith(".") or not _visible(path.relative_to(source)):
                continue
            if suffix in IMAGE_SUFFIXES:
                places[path.stem].append(ImageLocation(str(path.resolve())))
            elif suffix == ".zip":
                for stem, loc in _zip_images(path.resolve(), max_archive_bytes).items():
                    places[stem].append(loc)
    twice = [f"{stem} ({', '.join(p.describe() for p in locs)})" for stem, locs in places.items() if len(locs) > 1]
    if twice:
        raise DataError(f"{source}: {summarize('images found in more than one place', twice, limit=3)}")
    return {stem: locs[0] for stem, locs in places.items()}


def source_signature(source: Path) -> str:
    """Cheap change detector (names, sizes, mtimes): decides whether ingest must re-hash."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: data source folder not found")
    h = hashlib.sha256()
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            st = (Path(root) / name).stat()
            h.update(f"{Path(root, name).relative_to(source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _hash_images(manifest: pd.DataFrame) -> list[str]:
    digests: list[str] = []
    with ImageReader() as reader:
        for file, member in zip(manifest.file, manifest.member, strict=True):
            data = reader.read(file, member)
            if not data:
                raise DataError(f"{file}{':' + member if member else ''}: image file is empty (0 bytes)")
            digests.append(hashlib.sha256(data).hexdigest())
    return digests


def build_manifest(source: Path, max_archive_bytes: int) -> pd.DataFrame:
    """Validate a release and return its manifest; raises DataError naming every problem kind."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: data source folder not found")
    meta_path = source / METADATA_FILE
    metadata = read_metadata(meta_path)
    images = find_images(source, max_archive_bytes)
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
