"""Bring a release given from outside the project under DVC, so a team shares its bytes.

DVC's pipeline hashes the release it reads, but a hash is not the data: a teammate's clone
needs the images themselves. A release folder outside the project is imported with
`dvc import-url` into `data/releases/<folder name>`: DVC copies it into the project and its
cache, `dvc push` sends it to the remote and `dvc pull` brings it to any clone, and the
`.dvc` file records where it came from and the hash of what was taken, so
`dvc update data/releases/<name>.dvc` (or the same `--source` again) brings in a changed
release as a new version, while a clone where that origin does not exist still pulls it
(an import is frozen: nothing re-reads the origin unless asked). A release already inside
the project (the bundled sample, tracked by git) is used in place, and so is any release
when the project is not a DVC repository.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

from lesionml.errors import DataError
from lesionml.io import write_text

RELEASES = Path("data") / "releases"


def _dvc(project: Path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise DataError(f"dvc {' '.join(args)} failed in {project}: {lines[-1] if lines else done.returncode}")


def imported_from(dvc_file: Path) -> str | None:
    """The origin a `dvc import-url` file records (None if it is not one)."""
    try:
        stage = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
        return str(stage["deps"][0]["path"])
    except (OSError, yaml.YAMLError, KeyError, IndexError, TypeError):
        return None


@contextlib.contextmanager
def tracked_release(source: Path, project: Path) -> Iterator[Path]:
    """Yield the release folder the run should read: the DVC-tracked copy of `source`.

    If the body raises a DataError (the release was refused), the import is undone: a new
    one is removed, an updated one is put back at its previous version, so a refused
    release changes nothing in the project, as it changes nothing in the workspace.
    """
    source, project = Path(source).resolve(), Path(project).resolve()
    if source.is_relative_to(project) or not (project / ".dvc").is_dir():
        yield source
        return
    if not source.is_dir():
        raise DataError(f"{source}: data source folder not found")
    dest = project / RELEASES / source.name
    dvc_file = dest.with_name(f"{dest.name}.dvc")
    rel = dvc_file.relative_to(project).as_posix()
    before = dvc_file.read_text(encoding="utf-8") if dvc_file.is_file() else None
    if before is None:
        if dest.exists():
            raise DataError(f"{dest}: exists and is not a DVC import; move it away or pass --set data.source={source}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _dvc(project, "import-url", str(source), dest.relative_to(project).as_posix())
    elif imported_from(dvc_file) != str(source):
        raise DataError(
            f"{rel}: imports {imported_from(dvc_file)}, not {source}; rename the release folder "
            f"or pass --set data.source={source} to read it in place"
        )
    else:
        _dvc(project, "update", rel)  # a no-op when the origin is unchanged
    try:
        yield dest
    except DataError:
        if before is None:
            _dvc(project, "remove", "--outs", rel)
        elif dvc_file.read_text(encoding="utf-8") != before:
            write_text(dvc_file, before)
            _dvc(project, "checkout", "--force", rel)
        raise
