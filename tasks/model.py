"""Prefect tasks for the model stages: each runs a library stage and hands its result to the
tracking layer (lesionml/tracking.py), which logs it; the stages never talk to MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from lesionml import evaluation, inference, model_card, model_stages, models, plots, tracking, training
from lesionml.config import EvaluateConfig, Params
from lesionml.data import augment, stages
from lesionml.io import Artifact
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
        )
    return as_dicts(result.artifacts)


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
    result = model_stages.evaluate(
        name,
        Artifact(**model_keras),
        Artifact(**summary_json),
        Artifact(**images_npz),
        Artifact(**split_csv),
        Workspace(Path(workspace)),
        EvaluateConfig(**params),
    )
    tracking.log_evaluation(result)
    return as_dicts(result.artifacts)


def _register_key_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The evaluated artifacts and the registry rule; the commit and other params stay out."""
    keep = ("models", "manifest_csv", "release_json", "split_csv", "workspace")
    return {**{k: inputs[k] for k in keep}, "registry": inputs["params"]["registry"]}


@task(
    name="register",
    cache_key_fn=stage_cache_key(
        model_stages.registration,
        model_stages.register,
        model_stages.decide_promotion,
        model_stages.class_indices,
        model_card,
        select=_register_key_inputs,
    ),
    retries=1,
    retry_condition_fn=retry_transient,
)
def register(
    models: dict, manifest_csv: dict, release_json: dict, split_csv: dict, workspace: str, params: dict, git_commit: str
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
    )
    champion = tracking.champion_predictions(name, offer.test.images)
    versions = tracking.register_versions(offer, name, p.evaluate.tta)
    result = model_stages.register(offer, versions, champion, Workspace(Path(workspace)), p)
    tracking.log_registration(name, offer, result)
    print(f"registry: {result.decision['reason']}")
    return as_dicts(result.artifacts)
