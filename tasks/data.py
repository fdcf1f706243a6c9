"""Prefect tasks for the data stages; each calls exactly one library function.

Every task gets the whole params dump: its cache key keeps only the params its stage
declares (lesionml/stage_spec.py), so speed-only settings such as `data.workers` reach the
work without reaching the key.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import task
from tqdm import tqdm

from lesionml.config import Params
from lesionml.data import stages
from lesionml.io import Artifact
from lesionml.workspace import Workspace
from tasks._stage import as_dicts, retry_transient, stage_cache_key

_RETRY = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": retry_transient}


@task(name="ingest", cache_key_fn=stage_cache_key("ingest"), **_RETRY)
def ingest(signature: str, workspace: str, params: dict) -> dict:
    """`signature` (names/sizes/mtimes) is in the key so a changed release re-ingests."""
    data = Params.model_validate(params).data
    out = stages.ingest(data.source, Workspace(Path(workspace)), data.max_archive_bytes, data.allow_external_links)
    return as_dicts(out, workspace)


@task(name="preprocess", cache_key_fn=stage_cache_key("preprocess"), **_RETRY)
def preprocess(manifest: dict, workspace: str, params: dict) -> dict:
    n = len(pd.read_csv(manifest["path"], usecols=["image_id"]))
    with tqdm(total=n, desc="preprocess", unit="img", mininterval=1.0) as bar:
        cfg = Params.model_validate(params).data
        out = stages.preprocess(Artifact(**manifest), Workspace(Path(workspace)), cfg, bar.update)
    return as_dicts(out, workspace)


@task(name="split", cache_key_fn=stage_cache_key("split"), **_RETRY)
def split_task(metadata_csv: dict, workspace: str, params: dict) -> dict:
    cfg = Params.model_validate(params).split
    return as_dicts(stages.split(Artifact(**metadata_csv), Workspace(Path(workspace)), cfg), workspace)


@task(name="normalize", cache_key_fn=stage_cache_key("normalize"), **_RETRY)
def normalize_task(images_npz: dict, split_csv: dict, workspace: str, params: dict) -> dict:
    ws = Workspace(Path(workspace))
    return as_dicts(stages.normalize(Artifact(**images_npz), Artifact(**split_csv), ws), workspace)


@task(name="augment", cache_key_fn=stage_cache_key("augment"), **_RETRY)
def augment_task(images_npz: dict, split_csv: dict, workspace: str, params: dict) -> dict:
    ws, cfg = Workspace(Path(workspace)), Params.model_validate(params).augment
    return as_dicts(stages.augment(Artifact(**images_npz), Artifact(**split_csv), ws, cfg), workspace)
