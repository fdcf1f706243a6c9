"""The workspace: one fixed path per stage output, so DVC can declare them as outs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
