"""The lesionml pipeline as a Prefect flow of cached stage tasks.

The flow takes the params file and overrides as its parameters (not a parsed config),
so a run in the Prefect UI shows exactly what was asked for and can be re-run as is.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import pandas as pd
from prefect import flow

from lesionml import tracking
from lesionml.config import load_params
from lesionml.data.source import source_signature
from lesionml.data.split import split_counts
from tasks import data
from tasks._stage import run_stage

@flow(name="lesionml-pipeline", log_prints=True)
def pipeline(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    until: Literal["ingest", "augment", "evaluate"] = "evaluate",
) -> dict:
    """ingest -> preprocess -> split -> normalize -> augment -> (train -> evaluate per model) -> register.

    Returns the artifacts and which stages were cache hits. With training included, the
    tracking store is checked first: an unreachable MLflow fails the run in seconds, not
    after the data stages and an hour of training.
    """
    params = load_params(params_file, overrides or [])
    experiment_id = tracking.connect(params.tracking) if until == "evaluate" else None
    cfg = params.data
    ws = cfg.workspace
    workspace = str(ws)
    artifacts: dict[str, dict[str, str]] = {}
    cached: dict[str, bool] = {}

    def stage(label: str, task, /, **inputs) -> dict:
        """Run one stage task (cache-verified), remember its outputs and whether it was a hit."""
        outs, hit = run_stage(task, ws, workspace=workspace, **inputs)
        cached[label] = hit
        artifacts.update({f"{label}.{k}": a.to_dict() for k, a in outs.items()})
        return {k: a.to_dict() for k, a in outs.items()}

    ingested = stage(
        "ingest",
        data.ingest,
        source_dir=str(cfg.source),
        signature=source_signature(cfg.source),
        max_archive_bytes=cfg.max_archive_bytes,
    )
    if until == "ingest":
        return {"cached": cached, "artifacts": artifacts, "workspace": workspace}
    prep = stage(
        "preprocess",
        data.preprocess,
        manifest=ingested["manifest"],
        data={"image_size": list(cfg.image_size), "max_image_pixels": cfg.max_image_pixels},
        workers=cfg.workers,
    )
    split = stage("split", data.split_task, metadata_csv=prep["metadata"], params=params.section("split"))
    norm = stage("normalize", data.normalize_task, images_npz=prep["images"], split_csv=split["split"])
    aug = stage(
        "augment", data.augment_task, images_npz=prep["images"], split_csv=split["split"], params=params.section("augment")
    )
    result = {"cached": cached, "artifacts": artifacts, "workspace": workspace}
    if until != "evaluate":
        return result
    from tasks import model  # imported here: scikit-learn, Keras and MLflow cost seconds a data-only run never needs

    commit = tracking.git_commit(Path(params_file).parent)
    parent = _start_pipeline_run(experiment_id, params, ingested, split, norm, aug, commit)
    ok = False
    evaluated: dict[str, dict] = {}
    try:
        for name in params.models.enabled:
            trained = stage(
                f"train.{name}",
                model.train,
                name=name,
                images_npz=prep["images"],
                split_csv=split["split"],
                stats_json=norm["stats"],
                params=params.model_dump(mode="json"),
                run=asdict(tracking.RunContext(experiment_id, parent, {"lesionml.model": name})),
            )
            evaluated[name] = {"model": trained["model"], "summary": trained["summary"]}
            evaluated[name] |= stage(
                f"evaluate.{name}",
                model.evaluate,
                name=name,
                model_keras=trained["model"],
                summary_json=trained["summary"],
                images_npz=prep["images"],
                split_csv=split["split"],
                params=params.section("evaluate"),
            )
        registered = stage(
            "register",
            model.register,
            models=evaluated,
            manifest_csv=ingested["manifest"],
            release_json=ingested["release"],
            split_csv=split["split"],
            params=params.model_dump(mode="json"),
            git_commit=commit,
        )
        decision = json.loads(Path(registered["decision"]["path"]).read_text())
        tracking.set_tags(parent, {"lesionml.promoted": str(decision["promote"]).lower(),
                                   "lesionml.registry_decision": decision["reason"]})
        ok = True
    finally:
        model_stages = [s for s in cached if s.startswith(("train.", "evaluate.", "register"))]
        tracking.set_tags(parent, {"lesionml.all_cached": str(all(cached.get(s, False) for s in model_stages)).lower()})
        tracking.end_run(parent, ok=ok)
    result["mlflow_run_id"] = parent
    result["tracking_uri"] = tracking.tracking_uri(params.tracking)
    return result


def _start_pipeline_run(experiment_id, params, ingested, split, norm, aug, commit: str) -> str:
    """The parent MLflow run: params, data fingerprint, split sizes, code version, data artifacts."""
    release = json.loads(Path(ingested["release"]["path"]).read_text())
    counts = split_counts(pd.read_csv(split["split"]["path"]))
    tags = {"lesionml.data_fingerprint": release["fingerprint"], "git_commit": commit}
    run_id = tracking.start_run(experiment_id, "pipeline", tags)
    extra = {f"split.n_{s}": int(counts.loc["total", s]) for s in counts.columns}
    extra.update({"data.fingerprint": release["fingerprint"], "data.n_images": release["images"]})
    tracking.log_params(run_id, params, extra)
    tracking.log_artifact(run_id, aug["preview"]["path"], "data")
    tracking.log_artifact(run_id, norm["stats"]["path"], "data")
    tracking.log_text(run_id, counts.to_string(), "data/split_counts.txt")
    return run_id
