"""The workspace: one fixed path per stage output, so DVC can declare them as outs."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from lesionml.errors import LesionMLError

# The pipeline's stages in run order; train and evaluate run once per model.
Stage = Literal["ingest", "preprocess", "split", "normalize", "augment", "train", "evaluate", "register"]
STAGES: tuple[Stage, ...] = get_args(Stage)


class WorkspaceBusy(LesionMLError):
    """Another lesionml run holds the workspace."""

    exit_code = 3


@dataclass(frozen=True)
class Workspace:
    """Where each stage's outputs live under `root` (params: data.workspace)."""

    root: Path

    @property
    def manifest(self) -> Path:
        return self.root / "ingest" / "manifest.csv"

    @property
    def release(self) -> Path:
        return self.root / "ingest" / "release.json"

    @property
    def metadata(self) -> Path:
        return self.root / "preprocess" / "metadata.csv"

    @property
    def images(self) -> Path:
        return self.root / "preprocess" / "images.npz"

    @property
    def split(self) -> Path:
        return self.root / "split" / "split.csv"

    @property
    def stats(self) -> Path:
        return self.root / "normalize" / "stats.json"

    @property
    def augment_spec(self) -> Path:
        return self.root / "augment" / "spec.json"

    @property
    def augment_preview(self) -> Path:
        return self.root / "augment" / "preview.png"

    def model_dir(self, name: str) -> Path:
        return self.root / "train" / name

    def model_file(self, name: str) -> Path:
        return self.model_dir(name) / "model.keras"

    def eval_dir(self, name: str) -> Path:
        return self.root / "evaluate" / name

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @contextlib.contextmanager
    def lock(self, what: str) -> Iterator[None]:
        """Hold the workspace for one run; a second run on it is refused, naming the holder.

        Two runs writing the same stage outputs would each trust the other's half of them.
        The lock is an OS file lock (flock), so it dies with its process: a run killed
        with -9 leaves no stale lock behind, and the file's content is only a label.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_file, "a+", encoding="utf-8") as fh:  # closing it releases the lock
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "unknown"
                raise WorkspaceBusy(
                    f"workspace {self.root} is in use by another lesionml run ({holder}); "
                    "wait for it to finish or set data.workspace to another folder"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "run": what, "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
            fh.flush()
            yield

    @contextlib.contextmanager
    def rollback_on(self, *errors: type[BaseException]) -> Iterator[None]:
        """Undo every write of the run inside if it ends in one of `errors`.

        A release refused at preprocess (a truncated JPEG) has by then replaced the ingest
        outputs with its own: a refusal must leave the last good outputs as they were.
        Every output is hard-linked aside first, which copies nothing: atomic writes
        replace a file by renaming over it, so the old bytes live on in the link. On a
        refusal the links are renamed back and files the run added are removed. Other
        failures (a crash, a lost tracking server) keep what finished: the next run
        resumes from it instead of redoing it.
        """
        saved = self.root / ".rollback"
        shutil.rmtree(saved, ignore_errors=True)  # left by a run that was killed
        before = set()
        for path in self._outputs():
            rel = path.relative_to(self.root)
            (saved / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, saved / rel)
            except OSError:  # a filesystem without hard links
                shutil.copy2(path, saved / rel)
            before.add(rel)
        try:
            yield
        except errors:
            for path in self._outputs():
                if path.relative_to(self.root) not in before:
                    path.unlink()
            for rel in before:
                os.replace(saved / rel, self.root / rel)
            raise
        finally:
            shutil.rmtree(saved, ignore_errors=True)

    def _outputs(self) -> list[Path]:
        """Every stage output file (not Prefect's records, the lock or the rollback copies)."""
        if not self.root.is_dir():
            return []
        skip = {".prefect", ".rollback", self.lock_file.name}
        return [p for p in self.root.rglob("*") if p.is_file() and p.relative_to(self.root).parts[0] not in skip]
