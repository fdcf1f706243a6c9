"""Everything MLflow, behind one module: the rest of the library never imports mlflow.

Runs are addressed by id through `MlflowClient`, not through mlflow's thread-local
"active run", because Prefect may execute tasks on worker threads.
Default store: a local SQLite database plus an artifact folder, so `mlflow ui` shows the
runs with no server; MLFLOW_TRACKING_URI, when set, is used unchanged.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lesionml.config import Params, TrackingConfig
from lesionml.errors import LesionMLError

if TYPE_CHECKING:
    import keras
    import numpy as np
    from mlflow import MlflowClient

PARAM_VALUE_LIMIT = 500  # older MLflow servers reject longer param values


class TrackingError(LesionMLError):
    """The tracking store cannot be used; raised before any expensive work starts."""


@dataclass(frozen=True)
class RunContext:
    """Where a stage opens its own run: the experiment, the pipeline's parent run, common tags."""

    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]


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
    mlflow.set_tracking_uri(uri)
    try:
        with _fail_fast():
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is not None:
                return experiment.experiment_id
            local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
            location = Path(cfg.artifacts).resolve().as_uri() if local else None
            return client.create_experiment(cfg.experiment, artifact_location=location)
    except Exception as exc:  # mlflow raises many unrelated types for "cannot reach"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"MLflow tracking store {uri} cannot be used ({first[:200]}); "
            "start the server or fix MLFLOW_TRACKING_URI / tracking.uri"
        ) from None


def client() -> "MlflowClient":
    import mlflow
    from mlflow import MlflowClient

    return MlflowClient(mlflow.get_tracking_uri())


def git_commit(root: Path) -> str:
    """HEAD of the code that ran, '+dirty' when it had uncommitted changes; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def start_run(experiment_id: str, name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client().create_run(experiment_id, run_name=name, tags=all_tags)
    return run.info.run_id


def end_run(run_id: str, ok: bool = True) -> None:
    client().set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def log_params(run_id: str, params: Params, extra: dict[str, Any] | None = None) -> None:
    from mlflow.entities import Param

    flat = {**params.flat(), **(extra or {})}
    batch = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in sorted(flat.items())]
    for i in range(0, len(batch), 100):
        client().log_batch(run_id, params=batch[i : i + 100])


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v == v]  # drop NaN
    if batch:
        client().log_batch(run_id, metrics=batch)


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def log_artifact(run_id: str, path: Path | str, folder: str | None = None) -> None:
    client().log_artifact(run_id, str(path), folder)


def log_text(run_id: str, text: str, name: str) -> None:
    client().log_text(run_id, text, name)


def log_dict(run_id: str, obj: Any, name: str) -> None:
    client().log_dict(run_id, obj, name)


def model_summary(model: "keras.Model") -> str:
    buf = io.StringIO()
    model.summary(print_fn=lambda line, **_: buf.write(line + "\n"))
    return buf.getvalue()


def log_keras_model(run_id: str, model: "keras.Model", example: "np.ndarray") -> str:
    """Log in MLflow's Keras flavor with signature and input example; returns the model URI."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    signature = infer_signature(example, model.predict(example, verbose=0))
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


def log_classifier(run_id: str, keras_file: Path, example_image: bytes, tta: bool) -> str:
    """Log the servable pyfunc (image bytes in, classes out) beside the Keras model; returns its URI.

    `tta` travels in the model's config, so the served model predicts exactly as it was evaluated.
    """
    import base64

    import keras
    import mlflow
    import pandas as pd
    import tensorflow as tf
    from mlflow.models import infer_signature

    from lesionml import serving_model
    from lesionml.data.metadata import CLASSES

    example = pd.DataFrame({"image": [base64.b64encode(example_image).decode("ascii")]})
    output = pd.DataFrame([{"predicted": "nv", "name": "Melanocytic nevi", "error": "", **{f"p_{c}": 0.0 for c in CLASSES}}])
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="classifier",
            python_model=serving_model.__file__,  # model from code: nothing pickled
            artifacts={"keras_model": str(keras_file)},
            model_config={"tta": tta},
            signature=infer_signature(example, output),
            input_example=example,
            pip_requirements=[f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}", "pillow", "pandas"],
        )
    return info.model_uri


def register(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """A new version of registered model `name`; returns the version number."""
    import mlflow

    c = client()
    try:
        c.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        c.create_registered_model(name, description="HAM10000 skin-lesion classifiers trained by lesionml")
    return str(mlflow.register_model(model_uri, name, tags=tags).version)


def describe_version(name: str, version: str, description: str) -> None:
    client().update_model_version(name, version, description=description)


def alias_version(name: str, alias: str):
    """The ModelVersion behind `name@alias`, or None."""
    import mlflow

    try:
        return client().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model ({} when the model does not exist)."""
    import mlflow

    try:
        return dict(client().get_registered_model(name).aliases)
    except mlflow.exceptions.MlflowException:
        return {}


def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


def load_pyfunc(uri: str):
    import mlflow

    return mlflow.pyfunc.load_model(uri)


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
