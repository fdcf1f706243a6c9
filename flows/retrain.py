"""Scheduled retraining: re-ingest, stop early if nothing changed, else run the pipeline.

"Nothing changed" means the same run identity (data fingerprint + code + params, see
lesionml.provenance) as the newest successfully finished pipeline run in MLflow. Any
change runs the whole pipeline, whose cached stages redo only what the change affects,
and whose register stage lets the promotion rule decide whether the champion moves. A
run that fails anywhere moves no alias: aliases move last, inside register.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows import report
from flows.pipeline import IDENTITY_TAG, pipeline
from lesionml import tracking
from lesionml.config import load_params
from lesionml.provenance import run_identity
from tasks.tracking import connect


@flow(name="lesionml-retrain", log_prints=True)
def retrain(params_file: str = "params.yaml", overrides: list[str] | None = None) -> dict:
    """One retraining run; returns whether it stopped early, the identity, and the MLflow run.

    Either way it publishes what it did and why as an artifact (flows/report.py), so the
    Prefect UI answers "did Monday's run retrain?" without reading logs.
    """
    params = load_params(params_file, overrides or [])
    experiment_id = connect(params.section("tracking"))
    ingested = pipeline(params_file=params_file, overrides=overrides, until="ingest")
    release = json.loads(Path(ingested["artifacts"]["ingest.release"]["path"]).read_text())
    identity = run_identity(params, release["fingerprint"])
    previous = tracking.last_finished_run(experiment_id, IDENTITY_TAG, identity)
    uri = tracking.tracking_uri(params.tracking)
    if previous:
        why = (
            f"nothing changed since MLflow run {previous} (data {release['fingerprint'][:12]}, "
            f"identity {identity}): not retraining"
        )
        print(why)
        report.publish_retrain(False, why, None, uri, experiment_id, previous)
        return {"retrained": False, "identity": identity, "mlflow_run_id": previous}
    why = f"retraining: no successful run has identity {identity} (data, code or params changed, or first run)"
    print(why)
    result = pipeline(params_file=params_file, overrides=overrides, until="register")
    report.publish_retrain(True, why, result, uri, experiment_id, result["mlflow_run_id"])
    return {"retrained": True, "identity": identity, "mlflow_run_id": result["mlflow_run_id"]}
