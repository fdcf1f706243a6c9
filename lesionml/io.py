"""File primitives every stage uses: atomic writes and content fingerprints.

A stage writes to a temporary file in the destination folder and renames it into place,
so an interrupted run leaves either the previous file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lesionml.errors import StorageError

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


@contextlib.contextmanager
def atomic_path(dest: Path | str) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success fsync and rename it over `dest`.

    A write that runs out of space (or hits a read-only folder) becomes a StorageError
    naming `dest`: the previous `dest`, if any, is untouched and the temp file removed.
    """
    dest = Path(dest)
    tmp_path: Path | None = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, dest)
    except OSError as exc:
        if exc.errno not in _NO_SPACE:
            raise
        raise StorageError(
            f"{dest}: could not be written ({os.strerror(exc.errno)}); the previous version, if any, is unchanged"
        ) from exc
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def write_text(dest: Path | str, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(dest: Path | str, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A stage output as tasks pass it around: where it is and what its bytes hash to."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: Path | str) -> Artifact:
        return cls(str(Path(path).resolve()), sha256_file(path))

    def is_intact(self) -> bool:
        """True when the file still holds exactly the bytes it was produced with."""
        return Path(self.path).is_file() and sha256_file(self.path) == self.sha256

    def to_dict(self) -> dict[str, str]:
        return asdict(self)
