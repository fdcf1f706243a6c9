"""Prefect tasks for the model stages: train one model, evaluate one model, register them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from lesionml import model_stages
from lesionml.config import Params
from lesionml.io import Artifact
from lesionml.provenance import model_identity
from lesionml.tracking import RunContext
from lesionml.workspace import Workspace
from tasks._stage import as_dicts, retry_transient, stage_cache_key


def _trained_model(inputs: dict[str, Any]) -> str:
    """The train key: what defines the trained weights, by the rule its resume folder uses too."""
    shas = (inputs[k]["sha256"] for k in ("images_npz", "split_csv", "stats_json"))
    return model_identity(inputs["name"], Params.model_validate(inputs["params"]), *shas)


@task(
    name="train",
    cache_key_fn=stage_cache_key("train", select=_trained_model),
    retries=1,
    retry_delay_seconds=10,
    retry_condition_fn=retry_transient,
)
def train(
    name: str, images_npz: dict, split_csv: dict, stats_json: dict, workspace: str, params: dict, run: dict | None
) -> dict:
    out = model_stages.train(
        name,
        Artifact(**images_npz),
        Artifact(**split_csv),
        Artifact(**stats_json),
        Workspace(Path(workspace)),
        Params.model_validate(params),
        RunContext(**run) if run else None,
    )
    return as_dicts(out, workspace)


@task(
    name="evaluate",
    cache_key_fn=stage_cache_key("evaluate"),
    retries=1,
    retry_condition_fn=retry_transient,
)
def evaluate(
    name: str, model_keras: dict, summary_json: dict, images_npz: dict, split_csv: dict, workspace: str, params: dict
) -> dict:
    out = model_stages.evaluate(
        name,
        Artifact(**model_keras),
        Artifact(**summary_json),
        Artifact(**images_npz),
        Artifact(**split_csv),
        Workspace(Path(workspace)),
        Params.model_validate(params).evaluate,
    )
    return as_dicts(out, workspace)


@task(
    name="register",
    cache_key_fn=stage_cache_key("register", ignore=("git_commit",)),
    retries=1,
    retry_condition_fn=retry_transient,
)
def register(
    models: dict, manifest_csv: dict, release_json: dict, split_csv: dict, workspace: str, params: dict, git_commit: str
) -> dict:
    """Cached on the evaluated artifacts: re-running an unchanged pipeline registers nothing new."""
    out = model_stages.register(
        {name: {k: Artifact(**a) for k, a in arts.items()} for name, arts in models.items()},
        Artifact(**manifest_csv),
        Artifact(**release_json),
        Artifact(**split_csv),
        Workspace(Path(workspace)),
        Params.model_validate(params),
        git_commit,
    )
    return as_dicts(out, workspace)
