"""The lesionml pipeline as a Prefect flow of cached stage tasks.

The flow takes the params file and overrides as its parameters (not a parsed config),
so a run in the Prefect UI shows exactly what was asked for and can be re-run as is. (No `from __future__ import annotations` here: Prefect builds the
flow's parameter schema from the annotations, and a served deployment loads this module by
file path, where postponed annotations such as `Stage` cannot be resolved.)
"""

import json
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from prefect import flow

from flows import report
from lesionml import tracking
from lesionml.config import Params, load_params
from lesionml.data.source import source_signature
from lesionml.data.split import split_counts
from lesionml.errors import ConfigError, DataError
from lesionml.provenance import run_identity
from lesionml.workspace import STAGES, Stage, Workspace
from tasks import data
from tasks._stage import run_stage

IDENTITY_TAG = "lesionml.identity"


@flow(name="lesionml-pipeline", log_prints=True)
def pipeline(
    params_file: str = "params.yaml",
    overrides: list[str] | None = None,
    until: Stage = "register",
    models: list[str] | None = None,
    runner: str | None = None,
) -> dict:
    """ingest -> preprocess -> split -> normalize -> augment -> (train -> evaluate per model) -> register.

    Runs every stage up to `until`, for the `models` given (default: models.enabled).
    Upstream stages are verified cache hits when their inputs are unchanged, which is what
    lets `lesionml stage <name>` (one DVC stage) run through this same flow at little cost.
    Returns the artifacts and which stages were cache hits. With training included, the
    tracking store is checked first: an unreachable MLflow fails the run in seconds, not
    after the data stages and an hour of training. `runner` (`dask://HOST:PORT`) runs each
    model's train -> evaluate chain at the same time on that Dask cluster (flows/runners.py);
    by default they run here, one after the other.
    """
    if runner is not None:
        from flows.runners import parse_runner

        parse_runner(runner)  # a mistyped runner fails before any stage runs
    params = load_params(params_file, overrides or [])
    chosen = list(models or params.models.enabled)
    unknown = sorted(set(chosen) - set(params.models.enabled))
    if unknown:
        raise ConfigError(f"models {unknown} are not in models.enabled {list(params.models.enabled)}")
    reach = STAGES.index(until)
    experiment_id = tracking.connect(params.tracking) if reach >= STAGES.index("train") else None
    ws = Workspace(params.data.workspace)
    # A run refused for its input (bad release, bad params) leaves the last good outputs as they were.
    with ws.lock(f"pipeline until {until}"), ws.rollback_on(DataError, ConfigError):
        result = _pipeline(params, params_file, experiment_id, reach, chosen, runner)
    report.publish(result)
    return result


def _pipeline(
    params: Params, params_file: str, experiment_id: str | None, reach: int, chosen: list[str], runner: str | None
) -> dict:
    cfg = params.data
    ws = cfg.workspace
    workspace = str(ws)
    dump = params.model_dump(mode="json")  # every task gets all params; its cache key only its stage's
    artifacts: dict[str, dict[str, str]] = {}
    cached: dict[str, bool] = {}
    plan = _plan(reach, chosen)
    started = time.monotonic()

    def stage(label: str, task, task_runner=None, /, **inputs) -> dict:
        """Run one stage task (cache-verified), remember its outputs and whether it was a hit.

        Prints where the run is (stage k of n, time since it started) as the stage starts and
        as it ends, so a long training never looks hung, and shows which stages were cache hits.
        """
        step = f"[{plan.index(label) + 1}/{len(plan)}] {label}"
        print(f"{step} ... ({_clock(time.monotonic() - started)} into the run)", flush=True)
        began = time.monotonic()
        outs, hit = run_stage(task, ws, task_runner, workspace=workspace, params=dump, **inputs)
        now = time.monotonic()
        print(f"{step} {'cached' if hit else 'ran'} ({now - began:.1f} s; {_clock(now - started)} into the run)")
        cached[label] = hit
        artifacts.update({f"{label}.{k}": a.to_dict() for k, a in outs.items()})
        return {k: a.to_dict() for k, a in outs.items()}

    ingested = stage("ingest", data.ingest, signature=source_signature(cfg.source, cfg.allow_external_links))
    result = {"cached": cached, "artifacts": artifacts, "workspace": workspace}
    if reach < STAGES.index("preprocess"):
        return result
    prep = stage("preprocess", data.preprocess, manifest=ingested["manifest"])
    if reach < STAGES.index("split"):
        return result
    split = stage("split", data.split_task, metadata_csv=prep["metadata"])
    if reach < STAGES.index("normalize"):
        return result
    norm = stage("normalize", data.normalize_task, images_npz=prep["images"], split_csv=split["split"])
    if reach < STAGES.index("augment"):
        return result
    aug = stage("augment", data.augment_task, images_npz=prep["images"], split_csv=split["split"])
    if reach < STAGES.index("train"):
        return result
    from tasks import model  # imported here: scikit-learn, Keras and MLflow cost seconds a data-only run never needs

    commit = tracking.git_commit(Path(params_file).parent)
    parent, datasets = _start_pipeline_run(experiment_id, params, ingested, split, norm, aug, commit)
    ok = store_gone = False
    evaluated: dict[str, dict] = {}
    try:

        def chain(name: str, task_runner=None) -> None:
            """One model's train -> evaluate: independent of every other model's."""
            trained = stage(
                f"train.{name}",
                model.train,
                task_runner,
                name=name,
                images_npz=prep["images"],
                split_csv=split["split"],
                stats_json=norm["stats"],
                metadata_csv=prep["metadata"],
                run=asdict(tracking.RunContext(experiment_id, parent, {"lesionml.model": name}, datasets)),
            )
            evaluated[name] = {"model": trained["model"], "summary": trained["summary"]}
            if reach < STAGES.index("evaluate"):
                return
            evaluated[name] |= stage(
                f"evaluate.{name}",
                model.evaluate,
                task_runner,
                name=name,
                model_keras=trained["model"],
                summary_json=trained["summary"],
                images_npz=prep["images"],
                split_csv=split["split"],
                metadata_csv=prep["metadata"],
            )

        if runner is None:
            for name in chosen:
                chain(name)
        else:
            from flows import runners

            store = {"MLFLOW_TRACKING_URI": tracking.tracking_uri(params.tracking)}
            with runners.dask_runner(runners.parse_runner(runner), store) as task_runner:
                runners.run_each(lambda name: chain(name, task_runner), chosen)
            # Chains end in any order; registry versions are numbered in the order of `chosen`.
            evaluated = {name: evaluated[name] for name in chosen}
        if reach >= STAGES.index("register"):
            registered = stage(
                "register",
                model.register,
                models=evaluated,
                manifest_csv=ingested["manifest"],
                release_json=ingested["release"],
                split_csv=split["split"],
                metadata_csv=prep["metadata"],
                git_commit=commit,
            )
            decision = json.loads(Path(registered["decision"]["path"]).read_text())
            tracking.set_tags(
                parent,
                {
                    "lesionml.promoted": str(decision["promote"]).lower(),
                    "lesionml.registry_decision": decision["reason"],
                },
            )
            if chosen == list(params.models.enabled):
                # A complete run: what scheduled retraining compares with to stop early.
                fingerprint = json.loads(Path(ingested["release"]["path"]).read_text())["fingerprint"]
                tracking.set_tags(parent, {IDENTITY_TAG: run_identity(params, fingerprint)})
        ok = True
    except tracking.TrackingUnavailable:
        store_gone = True  # closing the run would only wait out the retries again
        raise
    finally:
        if not store_gone:
            model_stages = [s for s in cached if s.startswith(("train.", "evaluate.", "register"))]
            all_cached = all(cached.get(s, False) for s in model_stages)
            tracking.set_tags(parent, {"lesionml.all_cached": str(all_cached).lower()})
            tracking.end_run(parent, ok=ok)
    result["mlflow_run_id"] = parent
    result["mlflow_experiment_id"] = experiment_id
    result["tracking_uri"] = tracking.tracking_uri(params.tracking)
    return result


def _plan(reach: int, chosen: list[str]) -> list[str]:
    """The stages this run goes through, in order, as `stage()` labels them."""
    reached = STAGES[: reach + 1]
    per_model = [s for s in ("train", "evaluate") if s in reached]
    data_stages = [s for s in reached if s not in ("train", "evaluate", "register")]
    return data_stages + [f"{s}.{name}" for name in chosen for s in per_model] + [s for s in reached if s == "register"]


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def _start_pipeline_run(
    experiment_id, params, ingested, split, norm, aug, commit: str
) -> tuple[str, tuple[tracking.SplitDataset, ...]]:
    """The parent MLflow run: params, data fingerprint, split sizes, code version, data artifacts,
    and the release's splits as its dataset inputs (returned for the model runs to log too)."""
    release = json.loads(Path(ingested["release"]["path"]).read_text())
    counts = split_counts(pd.read_csv(split["split"]["path"]))
    tags = {"lesionml.data_fingerprint": release["fingerprint"], "git_commit": commit}
    run_id = tracking.start_run(experiment_id, "pipeline", tags)
    sizes = {s: int(counts.loc["total", s]) for s in counts.columns}
    extra = {f"split.n_{s}": n for s, n in sizes.items()}
    extra.update({"data.fingerprint": release["fingerprint"], "data.n_images": release["images"]})
    tracking.log_params(run_id, params, extra)
    datasets = tracking.release_datasets(params.data.source, release["fingerprint"], sizes)
    tracking.log_datasets(run_id, datasets)
    tracking.log_artifact(run_id, aug["preview"]["path"], "data")
    tracking.log_artifact(run_id, norm["stats"]["path"], "data")
    tracking.log_text(run_id, counts.to_string(), "data/split_counts.txt")
    return run_id, datasets
