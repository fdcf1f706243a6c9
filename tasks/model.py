"""Prefect tasks for the model stages: each runs a library stage and hands its result to the
tracking layer (lesionml/tracking.py), which logs it; the stages never talk to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from lesionml import model_stages, tracking
from lesionml.config import Params
from lesionml.io import Artifact
from lesionml.models.patient import enabled
from lesionml.provenance import model_identity
from lesionml.workspace import Workspace
from tasks._stage import as_dicts, retry_transient, stage_cache_key


def _trained_model(inputs: dict[str, Any]) -> str:
    """The train key: what defines the trained weights, by the rule its resume folder uses too
    (the patient table counts only for a model with the metadata branch)."""
    params = Params.model_validate(inputs["params"])
    shas = (inputs[k]["sha256"] for k in ("images_npz", "split_csv", "stats_json"))
    metadata = inputs["metadata_csv"]["sha256"] if enabled(getattr(params.models, inputs["name"])) else None
    return model_identity(inputs["name"], params, *shas, metadata)


@task(
    name="train",
    cache_key_fn=stage_cache_key("train", select=_trained_model),
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
)
def train(
    name: str,
    images_npz: dict,
    split_csv: dict,
    stats_json: dict,
    metadata_csv: dict,
    workspace: str,
    params: dict,
    run: dict | None,
) -> dict:
    with tracking.model_run(tracking.RunContext.from_dict(run) if run else None, name) as run_id:
        result = model_stages.train(
            name,
            Artifact(**images_npz),
            Artifact(**split_csv),
            Artifact(**stats_json),
            Workspace(Path(workspace)),
            Params.model_validate(params),
            run_id,
            on_epoch=tracking.epoch_logger(run_id) if run_id else None,
            on_trained=(lambda trained: tracking.log_training(run_id, trained)) if run_id else None,
            metadata=Artifact(**metadata_csv),
        )
    return as_dicts(result.artifacts, workspace)


@task(
    name="evaluate",
    cache_key_fn=stage_cache_key("evaluate"),
    retries=1,
    retry_condition_fn=retry_transient,
)
def evaluate(
    name: str,
    model_keras: dict,
    summary_json: dict,
    images_npz: dict,
    split_csv: dict,
    metadata_csv: dict,
    workspace: str,
    params: dict,
) -> dict:
    result = model_stages.evaluate(
        name,
        Artifact(**model_keras),
        Artifact(**summary_json),
        Artifact(**images_npz),
        Artifact(**split_csv),
        Workspace(Path(workspace)),
        Params.model_validate(params).evaluate,
        metadata=Artifact(**metadata_csv),
    )
    tracking.log_evaluation(result)
    return as_dicts(result.artifacts, workspace)


@task(
    name="register",
    cache_key_fn=stage_cache_key("register", ignore=("git_commit",)),
    retries=1,
    retry_condition_fn=retry_transient,
)
def register(
    models: dict,
    manifest_csv: dict,
    release_json: dict,
    split_csv: dict,
    metadata_csv: dict,
    workspace: str,
    params: dict,
    git_commit: str,
) -> dict:
    """Register every evaluated model; move `challenger`, and `champion` only on evidence.

    Cached on the evaluated artifacts: re-running an unchanged pipeline registers nothing
    new. The champion is asked for its test predictions before anything is registered, and
    the aliases move last, so a run that fails on the way changes neither.
    """
    p = Params.model_validate(params)
    name = p.registry.model_name
    offer = model_stages.registration(
        {model: {k: Artifact(**a) for k, a in arts.items()} for model, arts in models.items()},
        Artifact(**manifest_csv),
        Artifact(**release_json),
        Artifact(**split_csv),
        p,
        git_commit,
        metadata=Artifact(**metadata_csv),
    )
    champion = tracking.champion_predictions(name, offer.test.images, offer.test.patient)
    versions = tracking.register_versions(offer, name, p.evaluate.tta)
    result = model_stages.register(offer, versions, champion, Workspace(Path(workspace)), p)
    tracking.log_registration(name, offer, result)
    print(f"registry: {result.decision['reason']}")
    return as_dicts(result.artifacts, workspace)
