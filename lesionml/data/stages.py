"""The data stages as file-to-file functions: what `tasks/` wraps and `flows/` chains.

Each stage reads its inputs from files, writes its outputs atomically into the
workspace and returns them as `Artifact`s (path + sha256). Passing small records instead
of arrays keeps orchestration cheap and lets every consumer verify it reads exactly the
bytes its producer wrote.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from lesionml.config import AugmentConfig, DataConfig, SplitConfig
from lesionml.data import augment as aug
from lesionml.data.images import load_image_array, load_images, save_image_array
from lesionml.data.metadata import clean_metadata
from lesionml.data.normalize import NormStats, fit_stats
from lesionml.data.source import build_manifest, release_fingerprint
from lesionml.data.split import split_by_lesion
from lesionml.errors import DataError
from lesionml.io import Artifact, atomic_path, write_json
from lesionml.workspace import Workspace

Progress = Callable[[int], None]


def write_csv(path: Path, df: pd.DataFrame) -> Artifact:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return Artifact.of(path)


def read_csv(artifact: Artifact) -> pd.DataFrame:
    """A stage's CSV output; a manifest's image files come back as absolute paths (see `ingest`)."""
    if not artifact.is_intact():
        raise DataError(f"{artifact.path}: changed or missing since it was produced; re-run the pipeline")
    table = pd.read_csv(artifact.path, keep_default_na=False, dtype={"member": str})
    if "file" in table.columns:
        release = release_folder(Workspace(Path(artifact.path).parent.parent))
        table["file"] = [str(release / f) for f in table.file]
    return table


def release_folder(ws: Workspace) -> Path:
    """The release folder the ingest record names (relative to the folder holding the workspace)."""
    try:
        source = json.loads(ws.release.read_text())["source"]
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{ws.release}: no readable release record ({exc}); re-run ingest") from None
    return (ws.root.parent / source).resolve()


def _portable(path: Path, base: Path) -> str:
    """`path` relative to `base` when it lies inside it (it moves with it), else absolute."""
    path, base = path.resolve(), base.resolve()
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


def ingest(source: Path, ws: Workspace, max_archive_bytes: int, allow_external_links: bool) -> dict[str, Artifact]:
    """Validate the release at `source` and record its manifest and fingerprint.

    Nothing recorded names the checkout: the manifest's files are relative to the release
    folder, and release.json names that folder relative to the folder holding the
    workspace (the project) when it lies inside it. So a second clone that pulls the
    workspace and the release from a DVC remote, or re-ingests them, holds byte-identical
    records, and every stage after ingest stays valid there.
    """
    source = Path(source).resolve()
    manifest = build_manifest(source, max_archive_bytes, allow_external_links)
    # Named by their place in the release, a link by itself, never by where it leads.
    manifest["file"] = [Path(f).relative_to(source).as_posix() for f in manifest.file]
    out = {"manifest": write_csv(ws.manifest, manifest)}
    write_json(
        ws.release,
        {
            "source": _portable(source, ws.root.parent),
            "images": len(manifest),
            "lesions": int(manifest.lesion_id.nunique()),
            "fingerprint": release_fingerprint(manifest),
        },
    )
    out["release"] = Artifact.of(ws.release)
    return out


def preprocess(
    manifest: Artifact, ws: Workspace, cfg: DataConfig, progress: Progress | None = None
) -> dict[str, Artifact]:
    """Clean metadata and decode every image to cfg.image_size, in manifest order."""
    table = read_csv(manifest)
    metadata = clean_metadata(table)
    locations = list(zip(table.file, table.member, strict=True))
    images = load_images(locations, tuple(cfg.image_size), cfg.max_image_pixels, cfg.workers, progress)
    save_image_array(ws.images, images, metadata.image_id.tolist())
    return {"metadata": write_csv(ws.metadata, metadata), "images": Artifact.of(ws.images)}


def split(metadata: Artifact, ws: Workspace, cfg: SplitConfig) -> dict[str, Artifact]:
    assignment = split_by_lesion(read_csv(metadata), cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return {"split": write_csv(ws.split, assignment)}


def load_split_images(images: Artifact, split: Artifact, *which: str) -> list[tuple[np.ndarray, pd.DataFrame]]:
    """(images, split rows) of each split named in `which`, aligned by image_id.

    The array file is verified and read once however many splits are asked for.
    """
    if not images.is_intact():
        raise DataError(f"{images.path}: changed or missing since it was produced; re-run the pipeline")
    pixels, ids = load_image_array(images.path)
    all_rows = read_csv(split)
    index = pd.Series(np.arange(len(ids)), index=ids)
    missing = all_rows.image_id[~all_rows.image_id.isin(index.index)]
    if len(missing):
        raise DataError(f"{split.path}: {len(missing)} image_ids not in {images.path}, e.g. {missing.iloc[0]}")
    out = []
    for name in which:
        rows = all_rows[all_rows.split == name].reset_index(drop=True)
        out.append((pixels[index[rows.image_id].to_numpy()], rows))
    return out


def normalize(images: Artifact, split: Artifact, ws: Workspace) -> dict[str, Artifact]:
    [(train, _)] = load_split_images(images, split, "train")
    write_json(ws.stats, fit_stats(train).to_dict())
    return {"stats": Artifact.of(ws.stats)}


def read_stats(stats: Artifact) -> NormStats:
    return NormStats.from_dict(json.loads(Path(stats.path).read_text()))


def augment(images: Artifact, split: Artifact, ws: Workspace, cfg: AugmentConfig) -> dict[str, Artifact]:
    """Record the augmentation spec and draw the preview grid from training images."""
    [(train, rows)] = load_split_images(images, split, "train")
    rng = np.random.default_rng(cfg.seed)
    # One image per class first, so the preview shows every diagnosis when it can.
    firsts = rows.groupby("dx").head(1).index.to_numpy()
    rest = np.setdiff1d(np.arange(len(rows)), firsts)
    pick = np.concatenate([rng.permutation(firsts), rng.permutation(rest)])[: cfg.preview_images]
    aug.write_preview(ws.augment_preview, train[pick], rows.dx.iloc[pick].tolist(), cfg)
    write_json(ws.augment_spec, aug.describe(cfg))
    return {"spec": Artifact.of(ws.augment_spec), "preview": Artifact.of(ws.augment_preview)}
