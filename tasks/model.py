"""Prefect tasks for the model stages: train one model, evaluate one model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from lesionml import evaluation, inference, model_card, model_stages, models, plots, training
from lesionml.config import EvaluateConfig, Params
from lesionml.data import augment, stages
from lesionml.io import Artifact
from lesionml.tracking import RunContext
from lesionml.workspace import Workspace
from tasks._stage import as_dicts, retry_transient, stage_cache_key


def _train_key_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """Only what defines the trained weights; tracking and unrelated params stay out of the key."""
    p = inputs["params"]
    return {
        "name": inputs["name"],
        "artifacts": [inputs["images_npz"], inputs["split_csv"], inputs["stats_json"]],
        "workspace": inputs["workspace"],
        "model": p["models"][inputs["name"]],
        # What this model trains with (its own settings applied), by the rule training itself uses.
        "train": Params.model_validate(p).train_for(inputs["name"]).model_dump(mode="json"),
        "augment": p["augment"],
    }


@task(
    name="train",
    cache_key_fn=stage_cache_key(
        model_stages.train,
        model_stages._train,
        model_stages._labels,
        stages.load_split_images,
        stages.read_stats,
        augment,
        models,
        training,
        *models.modules(),
        select=_train_key_inputs,
    ),
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
    return as_dicts(out)


@task(
    name="evaluate",
    cache_key_fn=stage_cache_key(
        model_stages.evaluate,
        model_stages._decision_rule,
        model_stages._labels,
        stages.load_split_images,
        evaluation,
        plots,
        inference.predict_proba,
        inference.adjust_probabilities,
        inference.log_probabilities,
    ),
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
        EvaluateConfig(**params),
    )
    return as_dicts(out)


def _register_key_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The evaluated artifacts and the registry rule; the commit and other params stay out."""
    keep = ("models", "manifest_csv", "release_json", "split_csv", "workspace")
    return {**{k: inputs[k] for k in keep}, "registry": inputs["params"]["registry"]}


@task(
    name="register",
    cache_key_fn=stage_cache_key(model_stages.register, model_card, select=_register_key_inputs),
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
    return as_dicts(out)
