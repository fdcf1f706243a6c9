"""Prefect tasks for the data stages; each calls exactly one library function."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from tqdm import tqdm

from lesionml.config import AugmentConfig, DataConfig, SplitConfig
from lesionml.data import augment, images, metadata, normalize, source, split, stages
from lesionml.io import Artifact
from lesionml.workspace import Workspace
from tasks._stage import as_dicts, retry_transient, stage_cache_key

_RETRY = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_transient}


@task(name="ingest", cache_key_fn=stage_cache_key(source, metadata, stages.ingest, stages.write_csv), **_RETRY)
def ingest(source_dir: str, signature: str, workspace: str, max_archive_bytes: int) -> dict:
    """`signature` (names/sizes/mtimes) is in the key so a changed release re-ingests."""
    ws = Workspace(Path(workspace))
    return as_dicts(stages.ingest(Path(source_dir), ws, max_archive_bytes))


@task(
    name="preprocess",
    cache_key_fn=stage_cache_key(images, metadata, stages.preprocess, stages.write_csv, stages.read_csv),
    **_RETRY,
)
def preprocess(manifest: dict, workspace: str, data: dict, workers: int) -> dict:
    cfg = DataConfig(**{**data, "workers": workers})
    n = len(pd.read_csv(manifest["path"], usecols=["image_id"]))
    with tqdm(total=n, desc="preprocess", unit="img", mininterval=1.0) as bar:
        out = stages.preprocess(Artifact(**manifest), Workspace(Path(workspace)), cfg, bar.update)
    return as_dicts(out)


@task(name="split", cache_key_fn=stage_cache_key(split, stages.split, stages.write_csv, stages.read_csv), **_RETRY)
def split_task(metadata_csv: dict, workspace: str, params: dict) -> dict:
    ws = Workspace(Path(workspace))
    return as_dicts(stages.split(Artifact(**metadata_csv), ws, SplitConfig(**params)))


@task(name="normalize", cache_key_fn=stage_cache_key(normalize, stages.normalize, stages.load_split_images), **_RETRY)
def normalize_task(images_npz: dict, split_csv: dict, workspace: str) -> dict:
    ws = Workspace(Path(workspace))
    return as_dicts(stages.normalize(Artifact(**images_npz), Artifact(**split_csv), ws))


@task(name="augment", cache_key_fn=stage_cache_key(augment, stages.augment, stages.load_split_images), **_RETRY)
def augment_task(images_npz: dict, split_csv: dict, workspace: str, params: dict) -> dict:
    ws = Workspace(Path(workspace))
    return as_dicts(stages.augment(Artifact(**images_npz), Artifact(**split_csv), ws, AugmentConfig(**params)))
