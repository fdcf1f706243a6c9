"""The lesionml pipeline as a Prefect flow of cached stage tasks.

The flow takes the params file and overrides as its parameters (not a parsed config),
so a run in the Prefect UI shows exactly what was asked for and can be re-run as is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import flow

from lesionml.config import load_params
from lesionml.data.source import source_signature
from tasks import data
from tasks._stage import run_stage

DATA_STAGES = ("ingest", "preprocess", "split", "normalize", "augment")


@flow(name="lesionml-pipeline", log_prints=True)
def pipeline(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    until: Literal["ingest", "augment"] = "augment",
) -> dict:
    """ingest -> preprocess -> split -> normalize -> augment; returns artifacts and cache hits."""
    params = load_params(params_file, overrides or [])
    cfg = params.data
    ws = cfg.workspace
    workspace = str(ws)
    artifacts: dict[str, dict[str, str]] = {}
    cached: dict[str, bool] = {}

    def record(stage: str, result: tuple) -> dict:
        outs, hit = result
        cached[stage] = hit
        artifacts.update({f"{stage}.{k}": a.to_dict() for k, a in outs.items()})
        return {k: a.to_dict() for k, a in outs.items()}

    ingested = record(
        "ingest",
        run_stage(
            data.ingest,
            ws,
            source_dir=str(cfg.source),
            signature=source_signature(cfg.source),
            workspace=workspace,
            max_archive_bytes=cfg.max_archive_bytes,
        ),
    )
    if until == "ingest":
        return {"cached": cached, "artifacts": artifacts, "workspace": workspace}
    prep = record(
        "preprocess",
        run_stage(
            data.preprocess,
            ws,
            manifest=ingested["manifest"],
            workspace=workspace,
            data={"image_size": list(cfg.image_size), "max_image_pixels": cfg.max_image_pixels},
            workers=cfg.workers,
        ),
    )
    split = record(
        "split",
        run_stage(data.split_task, ws, metadata_csv=prep["metadata"], workspace=workspace, params=params.section("split")),
    )
    record("normalize", run_stage(data.normalize_task, ws, images_npz=prep["images"], split_csv=split["split"], workspace=workspace))
    record(
        "augment",
        run_stage(
            data.augment_task,
            ws,
            images_npz=prep["images"],
            split_csv=split["split"],
            workspace=workspace,
            params=params.section("augment"),
        ),
    )
    return {"cached": cached, "artifacts": artifacts, "workspace": workspace}
