"""Everything MLflow, behind one module: the rest of the library never imports mlflow.

The stages (lesionml/model_stages.py) compute and return results; the functions here log
them (`log_training`, `log_evaluation`) and own the registry (`register_versions`,
`champion_predictions`, `log_registration`), as Kedro's hooks do around its nodes.
Runs are addressed by id through `MlflowClient`, not through mlflow's thread-local
"active run", because Prefect may execute tasks on worker threads.
Default store: a local SQLite database plus an artifact folder, so `mlflow ui` shows the
runs with no server; MLFLOW_TRACKING_URI, when set, is used unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lesionml.config import Params, TrackingConfig
from lesionml.errors import LesionMLError

if TYPE_CHECKING:
    import keras
    import numpy as np
    import pandas as pd
    from mlflow import MlflowClient

    from lesionml.model_stages import EvalResult, RegisterResult, Registration, TrainResult

PARAM_VALUE_LIMIT = 500  # older MLflow servers reject longer param values

# MLflow's own defaults retry a failing HTTP request 7 times with backoff factor 2 and a
# 120 s timeout: a tracking server that goes away mid-run hangs every call for ~4 minutes
# (it is tuned for rate-limited hosted services). 3 retries with factor 1 still ride out a
# server restart of a few seconds (waits 0, 2, 4 s), then the run fails with a clear
# message; Prefect's task retry gives a longer outage a second chance. Explicit settings
# in the environment win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}


_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """`scheme://user:password@host` -> `scheme://***@host`, wherever a URI sits in `text`.

    Tracking and database URIs may carry credentials; what lesionml logs to MLflow or
    prints (params, tags, error messages, summaries) never shows them.
    """
    return _CREDENTIALS.sub(r"\g<scheme>***@", text)


class TrackingError(LesionMLError):
    """The tracking store cannot be used; checked before any expensive work starts."""


class TrackingUnavailable(TrackingError):
    """The tracking store stopped answering during the run (server down, network gone).

    `transient`: a stage failing with it is worth one retry (tasks/_stage.py), unlike
    other LesionMLErrors, which are verdicts on the input.
    """

    transient = True


def _network_failure(exc: BaseException) -> str | None:
    """'Connection refused'-style reason when `exc` comes from a store that does not answer.

    MLflow wraps requests/urllib3 errors in a plain MlflowException (INTERNAL_ERROR), so the
    chain of causes is what tells "server gone" from "the server said no".
    """
    import requests

    seen: BaseException | None = exc
    network = False
    while seen is not None:
        if isinstance(
            seen,
            (
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
                requests.exceptions.RetryError,
                ConnectionError,
                TimeoutError,
            ),
        ):
            network = True
        if network and isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    if not network:
        return None
    found = re.search(r"\[Errno \d+\] ([^'\")]+)|(timed out|Max retries exceeded[^(]*)", str(exc))
    return (found.group(1) or found.group(2)).strip() if found else "no answer"


def _store_call(fn: Callable) -> Callable:
    """Turn "the tracking server went away" inside `fn` into a one-line TrackingUnavailable.

    Without this, a server that dies mid-run surfaces as a MlflowException holding a
    page of urllib3 text; errors the store answered with pass through unchanged.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TrackingError:
            raise
        except Exception as exc:
            reason = _network_failure(exc)
            if reason is None:
                raise
            import mlflow

            raise TrackingUnavailable(
                f"MLflow tracking store {redact(mlflow.get_tracking_uri())} stopped answering during "
                f"{fn.__name__} ({reason}); this run did not finish: start the server (or fix "
                "MLFLOW_TRACKING_URI / tracking.uri) and run again, finished stages are reused"
            ) from None

    return wrapper


# What the MLflow UI calls the splits (the dataset contexts it shows and filters by).
CONTEXTS = {"train": "train", "val": "validation", "test": "test"}

# Seconds between system metric samples (CPU, memory, disk, network) of a training run: short
# enough that a training of a few seconds records some. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
# overrides it (MLflow's own setting).
SYSTEM_METRICS_INTERVAL = 2.0


@dataclass(frozen=True)
class SplitDataset:
    """One split of the release as an MLflow dataset input: the UI's dataset column and lineage.

    `digest` is the release fingerprint cut to the 36 characters MLflow stores, so runs on the
    same release show the same dataset; `images` is how many of its images this split holds.
    """

    name: str
    digest: str
    source: str  # the release folder
    context: str  # train, validation or test
    images: int
    fingerprint: str


def release_datasets(source: Path, fingerprint: str, images: dict[str, int]) -> tuple[SplitDataset, ...]:
    """The release's splits as dataset inputs; `images` maps each split (train/val/test) to its size.

    One dataset per split, named after the release folder and the split: MLflow keeps one
    input per (name, digest) and run, so a single dataset could not carry three contexts.
    """
    folder = Path(source).resolve()
    return tuple(
        SplitDataset(f"{folder.name}-{CONTEXTS[split]}", fingerprint[:36], str(folder), CONTEXTS[split], n, fingerprint)
        for split, n in images.items()
    )


@dataclass(frozen=True)
class RunContext:
    """Where a stage opens its own run: the experiment, the pipeline's parent run, common tags,
    and the datasets the run uses."""

    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]
    datasets: tuple[SplitDataset, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> RunContext:
        """Back from `dataclasses.asdict`, the form a Prefect task receives it in."""
        return cls(**{**d, "datasets": tuple(SplitDataset(**x) for x in d.get("datasets", ()))})


def tracking_uri(cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """A short timeout and no retries while probing, so an absent server fails in seconds."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(cfg: TrackingConfig) -> str:
    """Point mlflow at the store, prove it answers, and return the experiment id."""
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(cfg)
    users = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    # MLflow also exports the URI to the environment, where tracking_uri() would take it for
    # the user's choice: a later run in this process with other params would be pinned to
    # this store. Keep the environment as the user left it.
    if users is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = users
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        with _fail_fast():
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is not None:
                return experiment.experiment_id
            local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
            location = Path(cfg.artifacts).resolve().as_uri() if local else None
            return client.create_experiment(cfg.experiment, artifact_location=location)
    except Exception as exc:  # noqa: BLE001 - mlflow raises many unrelated types for "cannot reach"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"MLflow tracking store {redact(uri)} cannot be used ({redact(first[:200])}); "
            "start the server or fix MLFLOW_TRACKING_URI / tracking.uri"
        ) from None


def client() -> MlflowClient:
    import mlflow
    from mlflow import MlflowClient

    return MlflowClient(mlflow.get_tracking_uri())


def git_commit(root: Path) -> str:
    """HEAD of the code that ran, '+dirty' when it had uncommitted changes; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@_store_call
def start_run(experiment_id: str, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client().create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


@_store_call
def end_run(run_id: str, ok: bool = True) -> None:
    client().set_terminated(run_id, status="FINISHED" if ok else "FAILED")


@_store_call
def log_params(run_id: str, params: Params, extra: dict[str, Any] | None = None, skip: tuple[str, ...] = ()) -> None:
    """Params are write-once in MLflow: `skip` leaves out sections that may change later in the run's life."""
    from mlflow.entities import Param

    flat = {k: v for k, v in params.flat().items() if k.split(".", 1)[0] not in skip}
    flat.update(extra or {})
    batch = [Param(k, redact(str(v))[:PARAM_VALUE_LIMIT]) for k, v in sorted(flat.items())]
    for i in range(0, len(batch), 100):
        client().log_batch(run_id, params=batch[i : i + 100])


@_store_call
def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if not math.isnan(float(v))]  # drop NaN
    if batch:
        client().log_batch(run_id, metrics=batch)


@_store_call
def set_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client().log_batch(run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])


@_store_call
def log_artifact(run_id: str, path: Path | str, folder: str | None = None) -> None:
    client().log_artifact(run_id, str(path), folder)


@_store_call
def log_text(run_id: str, text: str, name: str) -> None:
    client().log_text(run_id, text, name)


@_store_call
def log_dict(run_id: str, obj: Any, name: str) -> None:
    client().log_dict(run_id, obj, name)


def model_summary(model: keras.Model) -> str:
    buf = io.StringIO()
    model.summary(print_fn=lambda line, **_: buf.write(line + "\n"))
    return buf.getvalue()


@_store_call
def log_keras_model(run_id: str, model: keras.Model, example: np.ndarray | dict[str, np.ndarray]) -> str:
    """Log in MLflow's Keras flavor with signature and input example (a dict of every input by
    name for a model with metadata inputs); returns the model URI."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    # A metadata model's example is a dict holding string arrays, which Keras reads as tensors only.
    inputs = {k: tf.convert_to_tensor(v) for k, v in example.items()} if isinstance(example, dict) else example
    signature = infer_signature(example, model.predict(inputs, verbose=0))
    with mlflow.start_run(run_id=run_id):
        info = mlflow.tensorflow.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            # Explicit requirements: inferring them re-imports and scans the environment.
            pip_requirements=[f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}"],
        )
    return info.model_uri


@_store_call
def log_classifier(
    run_id: str,
    keras_file: Path,
    example_image: bytes,
    tta: bool,
    temperature: float = 1.0,
    offsets: list[float] | None = None,
    rule: str = "",
) -> str:
    """Log the servable pyfunc (image bytes in, classes out) beside the Keras model; returns its URI.

    `tta`, the fitted `temperature` and the decision rule's `offsets` travel in the model's
    config, so the served model predicts exactly as it was evaluated; `rule` says in words
    which decision rule those offsets are.
    """
    import base64
    from importlib.metadata import version

    import keras
    import mlflow
    import pandas as pd
    import tensorflow as tf
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    from lesionml import serving_model
    from lesionml.data.metadata import CLASSES

    example = pd.DataFrame({"image": [base64.b64encode(example_image).decode("ascii")]})
    output = pd.DataFrame(
        [
            {
                "predicted": "nv",
                "name": "Melanocytic nevi",
                "error": "",
                **{f"p_{c}": 0.0 for c in CLASSES},
                "metadata": "used",
            }
        ]
    )
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=serving_model.__file__,  # model from code: nothing pickled
            artifacts={"keras_model": str(keras_file)},
            model_config={"tta": tta, "temperature": temperature, "offsets": offsets, "rule": rule},
            # Either column: `image` (bytes, or base64 text in JSON) or `path` (files the server can read);
            # the patient's values are optional, used by a model with the metadata branch.
            signature=ModelSignature(
                inputs=Schema(
                    [
                        ColSpec("string", "image", required=False),
                        ColSpec("string", "path", required=False),
                        ColSpec("double", "age", required=False),
                        ColSpec("string", "sex", required=False),
                        ColSpec("string", "localization", required=False),
                    ]
                ),
                outputs=infer_signature(example, output).outputs,
            ),
            input_example=example,
            # The decoder's libraries, pinned: their scaling and resize are what the model was trained on.
            pip_requirements=[
                f"tensorflow-cpu=={tf.__version__}",
                f"keras=={keras.__version__}",
                "pillow",
                "pandas",
                *(f"{dist}=={version(dist)}" for dist in ("simplejpeg", "opencv-python-headless")),
            ],
        )
    return info.model_uri


@_store_call
def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """A new version of registered model `name`; returns the version number."""
    import mlflow

    c = client()
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        c.create_registered_model(name, description="HAM10000 skin-lesion classifiers trained by lesionml")
    return str(mlflow.register_model(model_uri, name, tags=tags).version)


@_store_call
def describe_version(name: str, version: str, description: str) -> None:
    client().update_model_version(name, version, description=description)


# What the store answers for a registered model or alias that does not exist.
_NOT_FOUND = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


@_store_call
def alias_version(name: str, alias: str):
    """The ModelVersion behind `name@alias`, or None when the model or the alias does not exist.

    Only the store's "not found" answers mean None: any other failure (server gone, no
    permission) raises, or a flaky store would read as "no champion yet" and the register
    stage would crown a model without comparing it.
    """
    import mlflow

    try:
        return client().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise


@_store_call
def aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model ({} when the model does not exist)."""
    import mlflow

    try:
        return dict(client().get_registered_model(name).aliases)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return {}
        raise


@_store_call
def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


@_store_call
def load_pyfunc(uri: str):
    import mlflow

    return mlflow.pyfunc.load_model(uri)


@_store_call
def model_runs(experiment_id: str, last: int):
    """The nested model runs of the last `last` pipeline runs that trained or evaluated something."""
    import mlflow

    parents = mlflow.search_runs(
        [experiment_id],
        filter_string="tags.`lesionml.all_cached` = 'false' and attributes.run_name = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    if parents.empty:
        return parents
    import pandas as pd

    children = [
        mlflow.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
        for parent in parents.run_id
    ]
    return pd.concat(children, ignore_index=True)


def last_finished_run(experiment_id: str, tag: str, value: str) -> str | None:
    """The id of the newest successfully finished run tagged `tag`=`value`, or None."""
    import mlflow

    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return None if runs.empty else str(runs.run_id.iloc[0])


@_store_call
def log_datasets(run_id: str, datasets: tuple[SplitDataset, ...]) -> None:
    """The release's splits as the run's dataset inputs, each with its context tag."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = [
        DatasetInput(
            Dataset(
                name=d.name,
                digest=d.digest,
                source_type="local",  # and the source as MLflow's local dataset source writes it
                source=json.dumps({"uri": d.source}),
                profile=json.dumps({"release_fingerprint": d.fingerprint}),
            ),
            tags=[InputTag(MLFLOW_DATASET_CONTEXT, d.context), InputTag("lesionml.images", str(d.images))],
        )
        for d in datasets
    ]
    if inputs:
        client().log_inputs(run_id, datasets=inputs)


@contextlib.contextmanager
def model_run(run: RunContext | None, name: str) -> Iterator[str | None]:
    """The MLflow run of one model's training (None: untracked), open while the body runs.

    The release's splits are its dataset inputs and system metrics are sampled until the body
    ends. The run ends FINISHED when the body returns and FAILED when it raises, except when
    the store stopped answering: closing the run would only wait out its retries again and
    then report end_run instead of the call that actually failed.
    """
    if run is None:
        yield None
        return
    import mlflow
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its start/stop lines at INFO would interleave with the training's own progress lines.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    run_id = start_run(run.experiment_id, name, run.tags, run.parent_run_id)
    try:
        log_datasets(run_id, run.datasets)
        monitor = SystemMetricsMonitor(
            run_id, sampling_interval=SYSTEM_METRICS_INTERVAL, tracking_uri=mlflow.get_tracking_uri()
        )
        monitor.start()
        try:
            yield run_id
        finally:
            monitor.finish()
    except BaseException as exc:
        if not isinstance(exc, TrackingUnavailable):
            end_run(run_id, ok=False)
        raise
    end_run(run_id)


def epoch_logger(run_id: str) -> Callable[[int, dict[str, float]], None]:
    """Per-epoch training metrics (Keras' names: loss, val_loss, ...) logged at their epoch."""
    return lambda epoch, metrics: log_metrics(run_id, metrics, step=epoch)


TRAINING_METRICS = ("epochs_run", "best_epoch", "train_seconds", "train_images_per_second")


def log_training(run_id: str, result: TrainResult) -> None:
    """The trained model's params, training figures and record, and the model in Keras' flavor."""
    from lesionml.data.metadata import CLASS_NAMES, CLASSES

    # The train settings this model actually used. No `evaluate` params: a cached model is
    # re-evaluated in this same run, and a param cannot change; evaluation sets tags instead.
    extra = {"model.name": result.name, "model.parameters": result.summary["parameters"]}
    log_params(run_id, result.params, extra, skip=("evaluate",))
    figures = {k: result.summary[k] for k in TRAINING_METRICS}
    if isinstance(figures["best_epoch"], list):  # an ensemble: one best epoch per member
        figures |= {f"member{k}_best_epoch": e for k, e in enumerate(figures.pop("best_epoch"), 1)}
    log_metrics(run_id, figures)
    log_text(run_id, model_summary(result.model), "model_summary.txt")
    log_dict(run_id, result.normalization, "preprocessing/normalization_stats.json")
    log_dict(run_id, {"classes": list(CLASSES), "names": CLASS_NAMES}, "preprocessing/classes.json")
    if result.metadata_encoding:
        log_dict(run_id, result.metadata_encoding, "preprocessing/metadata_encoding.json")
    for f in result.record:
        log_artifact(run_id, f, "training")
    log_keras_model(run_id, result.model, result.example)


def log_evaluation(result: EvalResult) -> None:
    """Evaluation metrics, settings (as tags) and figures, in the run the model was trained in."""
    run_id, metrics, decision = result.run_id, result.metrics, result.decision
    if not run_id:
        return
    # eval_ prefix: Keras already logs per-epoch val_loss/val_accuracy curves under those names.
    flat = {f"eval_{s}_{k}": v for s, m in metrics.items() for k, v in m.items() if isinstance(v, float)}
    for c, m in metrics["test"]["per_class"].items():
        flat.update({f"eval_test_{k}_{c}": m[k] for k in ("recall", "roc_auc") if k in m})
    flat.update(
        {
            f"eval_{s}_{k}_ci95_{end}": v
            for s, m in metrics.items()
            for k, ci in m.get("ci95", {}).items()  # the withheld-metadata metrics have no intervals
            for end, v in zip(("low", "high"), ci, strict=True)
        }
    )
    flat["eval_prior_tau"] = decision["tau"]
    flat["eval_temperature"] = decision["temperature"]
    flat.update({f"eval_{s}_ece_raw": v for s, v in decision["raw_ece"].items()})
    flat.update({f"eval_{s}_{k}_argmax": v for s, m in decision.get("argmax", {}).items() for k, v in m.items()})
    log_metrics(run_id, flat)
    set_tags(run_id, {f"evaluate.{k}": str(v).lower() for k, v in result.settings.model_dump(mode="json").items()})
    for f in result.record:
        log_artifact(run_id, f, "evaluation")


def champion_predictions(
    model_name: str, images: list[bytes], patient: pd.DataFrame | None = None
) -> tuple[str, list[str]] | None:
    """The champion's version and its predicted class for each image, served as it is
    registered (None: no champion yet). `patient` (age, sex, localization per image) is sent
    with the images, so a champion with the metadata branch is scored as it was evaluated
    (an image-only one ignores the columns)."""
    import pandas as pd

    champion = alias_version(model_name, "champion")
    if champion is None:
        return None
    request = pd.DataFrame({"image": images})
    if patient is not None:
        request = pd.concat([request, patient.reset_index(drop=True)], axis=1)
    answers = load_pyfunc(f"models:/{model_name}/{champion.version}").predict(request)
    return str(champion.version), answers.predicted.tolist()


def register_versions(offer: Registration, model_name: str, tta: bool) -> dict[str, str]:
    """A servable classifier in each candidate's run and a registered version of it; no alias moves.

    Returns model name -> version.
    """
    versions = {}
    for name, c in offer.candidates.items():
        decision = c.metrics["decision"]
        uri = log_classifier(
            c.run_id,
            c.model_file,
            offer.test.images[0],
            tta,
            decision["temperature"],
            decision["offsets"],
            decision["rule"],
        )
        versions[name] = register(uri, model_name, c.tags)
    return versions


def log_registration(model_name: str, offer: Registration, result: RegisterResult) -> None:
    """Model cards on the runs and as the versions' descriptions; then the aliases, `champion`
    the very last: a run that fails before it never changes who is champion."""
    decision = result.decision
    for name, c in offer.candidates.items():
        log_artifact(c.run_id, result.cards[name], "model_card")
        describe_version(model_name, decision["versions"][name], result.cards[name].read_text(encoding="utf-8"))
    set_alias(model_name, "challenger", decision["challenger"]["version"])
    if decision["promote"]:
        set_alias(model_name, "champion", decision["challenger"]["version"])
