"""The model stages as file-to-file functions: train one model, evaluate one model.

Tracking is optional (`run_id=None` logs nothing), so the stages run and test without
an MLflow store; with a run id they log everything a person needs to judge the run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from lesionml import plots, tracking
from lesionml.config import Params
from lesionml.data.augment import build_augmenter
from lesionml.data.metadata import CLASS_NAMES, CLASSES
from lesionml.data.stages import load_split_images, read_stats, write_csv
from lesionml.evaluation import classification_metrics, predict_proba, predictions_table
from lesionml.io import Artifact, write_json
from lesionml.models import build_model
from lesionml.training import fit, seed_everything
from lesionml.workspace import Workspace


def _labels(rows: pd.DataFrame) -> np.ndarray:
    return rows.dx.map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=np.int64)


def train(
    name: str,
    images: Artifact,
    split: Artifact,
    stats: Artifact,
    ws: Workspace,
    params: Params,
    run: tracking.RunContext | None = None,
) -> dict[str, Artifact]:
    """Train model `name` on the train split, choosing the best epoch on validation.

    With `run`, a nested MLflow run is opened for this model and closed (FAILED if
    training raises); its id is recorded in summary.json for the evaluate stage.
    """
    run_id = tracking.start_run(run.experiment_id, name, run.tags, run.parent_run_id) if run else None
    try:
        return _train(name, images, split, stats, ws, params, run_id)
    except BaseException:
        if run_id:
            tracking.end_run(run_id, ok=False)
        raise


def _train(
    name: str, images: Artifact, split: Artifact, stats: Artifact, ws: Workspace, params: Params, run_id: str | None
) -> dict[str, Artifact]:
    seed_everything(params.train.seed, params.train.deterministic)
    train_x, train_rows = load_split_images(images, split, "train")
    val_x, val_rows = load_split_images(images, split, "val")
    norm = read_stats(stats)
    image_size = (int(train_x.shape[1]), int(train_x.shape[2]))
    model_cfg = getattr(params.models, name)
    model = build_model(name, model_cfg, image_size, norm, len(CLASSES))
    # Resumable state lives in a folder keyed by everything that defines the training run.
    key = hashlib.sha256(
        json.dumps(
            [name, images.sha256, split.sha256, stats.sha256, model_cfg.model_dump(mode="json"),
             params.section("train"), params.section("augment")],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    out = ws.model_dir(name)
    workdir = out / ".work" / key
    hooks = [lambda epoch, m: tracking.log_metrics(run_id, m, step=epoch)] if run_id else []
    print(f"training {name}: {len(train_x)} train / {len(val_x)} val images of {image_size[0]}x{image_size[1]}, "
          f"{model.count_params():,} parameters, up to {params.train.epochs} epochs")
    result = fit(
        model,
        (train_x, _labels(train_rows)),
        (val_x, _labels(val_rows)),
        params.train,
        workdir,
        ws.model_file(name),
        augmenter=build_augmenter(params.augment),
        n_classes=len(CLASSES),
        epoch_hooks=hooks,
    )
    history = pd.read_csv(result.history_path)
    write_csv(out / "history.csv", history)
    plots.training_curves(history, f"{name}: training curves", out / "curves.png", result.best_epoch)
    summary = {
        "model": name,
        "run_id": run_id,
        "image_size": list(image_size),
        "n_train": len(train_x),
        "n_val": len(val_x),
        "parameters": int(model.count_params()),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        f"best_{params.train.monitor}": result.best_value,
        "train_seconds": round(result.seconds, 2),
        "train_images_per_second": round(result.train_images_per_second, 1),
    }
    write_json(out / "summary.json", summary)
    if run_id:
        tracking.log_params(run_id, params, {"model.name": name, "model.parameters": summary["parameters"]})
        tracking.log_metrics(run_id, {k: v for k, v in summary.items() if k in (
            "epochs_run", "best_epoch", "train_seconds", "train_images_per_second")})
        tracking.log_text(run_id, tracking.model_summary(model), "model_summary.txt")
        tracking.log_dict(run_id, norm.to_dict(), "preprocessing/normalization_stats.json")
        tracking.log_dict(run_id, {"classes": list(CLASSES), "names": CLASS_NAMES}, "preprocessing/classes.json")
        for f in ("curves.png", "history.csv", "summary.json"):
            tracking.log_artifact(run_id, out / f, "training")
        tracking.log_keras_model(run_id, model, val_x[:2].astype(np.float32))
        tracking.end_run(run_id)
    shutil.rmtree(out / ".work", ignore_errors=True)
    return {
        "model": Artifact.of(ws.model_file(name)),
        "history": Artifact.of(out / "history.csv"),
        "summary": Artifact.of(out / "summary.json"),
    }


def evaluate(
    name: str, model_file: Artifact, summary: Artifact, images: Artifact, split: Artifact, ws: Workspace
) -> dict[str, Artifact]:
    """Metrics and predictions of one trained model on the validation and test splits."""
    import keras

    model = keras.saving.load_model(model_file.path, safe_mode=True)
    out = ws.eval_dir(name)
    metrics: dict[str, dict] = {}
    tables = []
    for which in ("val", "test"):
        x, rows = load_split_images(images, split, which)
        proba = predict_proba(model, x)
        metrics[which] = classification_metrics(_labels(rows), proba)
        tables.append(predictions_table(rows, proba).assign(split=which))
    write_json(out / "metrics.json", metrics)
    write_csv(out / "predictions.csv", pd.concat(tables, ignore_index=True))
    run_id = json.loads(Path(summary.path).read_text()).get("run_id")
    if run_id:
        # eval_ prefix: Keras already logs per-epoch val_loss/val_accuracy curves under those names.
        flat = {f"eval_{s}_{k}": v for s, m in metrics.items() for k, v in m.items() if isinstance(v, float)}
        flat.update({f"eval_test_recall_{c}": m["recall"] for c, m in metrics["test"]["per_class"].items()})
        tracking.log_metrics(run_id, flat)
        tracking.log_artifact(run_id, out / "metrics.json", "evaluation")
        tracking.log_artifact(run_id, out / "predictions.csv", "evaluation")
    return {"metrics": Artifact.of(out / "metrics.json"), "predictions": Artifact.of(out / "predictions.csv")}
