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

from lesionml import explain, model_card, plots, tracking
from lesionml.config import EvaluateConfig, Params
from lesionml.data.metadata import CLASS_NAMES, CLASSES
from lesionml.data.source import ImageReader
from lesionml.data.stages import load_split_images, read_csv, read_stats, write_csv
from lesionml.evaluation import (
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    lesion_bootstrap,
    melanoma_operating_point,
    paired_bootstrap,
    predictions_table,
    tune_prior_correction,
)
from lesionml.inference import adjust_probabilities, predict_proba
from lesionml.io import Artifact, write_json, write_text
from lesionml.models import build_model
from lesionml.provenance import params_digest
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
    except BaseException as exc:
        # Not when the store just stopped answering: that would only wait out its retries
        # again and then report end_run instead of the call that actually failed.
        if run_id and not isinstance(exc, tracking.TrackingUnavailable):
            tracking.end_run(run_id, ok=False)
        raise


def _train(
    name: str, images: Artifact, split: Artifact, stats: Artifact, ws: Workspace, params: Params, run_id: str | None
) -> dict[str, Artifact]:
    train_cfg = params.train_for(name)
    seed_everything(train_cfg.seed, train_cfg.deterministic)
    (train_x, train_rows), (val_x, val_rows) = load_split_images(images, split, "train", "val")
    norm = read_stats(stats)
    image_size = (int(train_x.shape[1]), int(train_x.shape[2]))
    model_cfg = getattr(params.models, name)
    model = build_model(name, model_cfg, image_size, norm, len(CLASSES), train_cfg.precision)
    # Resumable state lives in a folder keyed by everything that defines the training run.
    key = hashlib.sha256(
        json.dumps(
            [
                name,
                images.sha256,
                split.sha256,
                stats.sha256,
                model_cfg.model_dump(mode="json"),
                train_cfg.model_dump(mode="json"),
                params.section("augment"),
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    out = ws.model_dir(name)
    workdir = out / ".work" / key
    hooks = [lambda epoch, m: tracking.log_metrics(run_id, m, step=epoch)] if run_id else []
    print(
        f"training {name}: {len(train_x)} train / {len(val_x)} val images of {image_size[0]}x{image_size[1]}, "
        f"{model.count_params():,} parameters, up to {train_cfg.epochs} epochs"
    )
    result = fit(
        model,
        (train_x, _labels(train_rows)),
        (val_x, _labels(val_rows)),
        train_cfg,
        workdir,
        ws.model_file(name),
        augment=params.augment,
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
        f"best_{train_cfg.monitor}": result.best_value,
        "train_seconds": round(result.seconds, 2),
        "train_images_per_second": round(result.train_images_per_second, 1),
    }
    write_json(out / "summary.json", summary)
    if run_id:
        # The train settings this model actually used. No `evaluate` params: a cached model is
        # re-evaluated in this same run, and a param cannot change; evaluation sets tags instead.
        extra = {"model.name": name, "model.parameters": summary["parameters"]}
        tracking.log_params(run_id, params.model_copy(update={"train": train_cfg}), extra, skip=("evaluate",))
        tracking.log_metrics(
            run_id,
            {
                k: v
                for k, v in summary.items()
                if k in ("epochs_run", "best_epoch", "train_seconds", "train_images_per_second")
            },
        )
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
    name: str,
    model_file: Artifact,
    summary: Artifact,
    images: Artifact,
    split: Artifact,
    ws: Workspace,
    cfg: EvaluateConfig,
) -> dict[str, Artifact]:
    """Metrics and predictions of one trained model on the validation and test splits."""
    import keras

    model = keras.saving.load_model(model_file.path, safe_mode=True)
    out = ws.eval_dir(name)
    metrics: dict[str, dict] = {}
    tables = []
    figures = []
    splits = dict(zip(("val", "test"), load_split_images(images, split, "val", "test"), strict=True))
    # Evaluation prints nothing else until it is done, which can take minutes on the full data.
    print(
        f"evaluating {name} on {len(splits['val'][0])} val and {len(splits['test'][0])} test images "
        f"({'with' if cfg.tta else 'no'} test-time augmentation, {cfg.bootstrap} bootstrap resamples)",
        flush=True,
    )
    raw = {which: predict_proba(model, x, cfg.tta) for which, (x, _) in splits.items()}
    labels = {which: _labels(rows) for which, (_, rows) in splits.items()}
    decision = _decision_rule(cfg, read_csv(split), labels, raw)
    for which, (x, rows) in splits.items():
        proba = adjust_probabilities(raw[which], decision["temperature"], decision["offsets"])
        y = labels[which]
        m = classification_metrics(y, proba)
        m["ece"] = expected_calibration_error(y, proba)
        m["ci95"] = lesion_bootstrap(y, proba, rows.lesion_id.to_numpy(), cfg.bootstrap)
        metrics[which] = m
        table = predictions_table(rows, proba)
        tables.append(table.assign(split=which))
        label = f"{name}, {which} split ({len(y)} images)"
        plots.confusion_matrices(y, proba.argmax(axis=1), CLASSES, label, out / f"{which}_confusion.png")
        plots.roc_curves(y, proba, CLASSES, f"ROC one-vs-rest: {label}", out / f"{which}_roc.png")
        plots.reliability_diagram(
            y, proba, f"Reliability: {label}, ECE {m['ece']:.3f}", out / f"{which}_reliability.png"
        )
        plots.confident_mistakes(
            x,
            table.true.tolist(),
            table.predicted.tolist(),
            proba.max(axis=1),
            f"Most confident mistakes: {label}",
            out / f"{which}_mistakes.png",
        )
        figures += [f"{which}_{kind}.png" for kind in ("confusion", "roc", "reliability", "mistakes")]
        figures += explain.evaluation_figures(model, x, y, proba, label, which, out)  # Grad-CAM
    if cfg.temperature_scaling:
        print(
            f"temperature scaling: T {decision['temperature']:.3f} (fitted on val log loss; val ECE "
            f"{decision['raw_ece']['val']:.3f} -> {metrics['val']['ece']:.3f})",
            flush=True,
        )
    write_json(out / "metrics.json", {**metrics, "decision": decision})
    write_csv(out / "predictions.csv", pd.concat(tables, ignore_index=True))
    run_id = json.loads(Path(summary.path).read_text()).get("run_id")
    if run_id:
        # eval_ prefix: Keras already logs per-epoch val_loss/val_accuracy curves under those names.
        flat = {f"eval_{s}_{k}": v for s, m in metrics.items() for k, v in m.items() if isinstance(v, float)}
        for c, m in metrics["test"]["per_class"].items():
            flat.update({f"eval_test_{k}_{c}": m[k] for k in ("recall", "roc_auc") if k in m})
        flat.update(
            {
                f"eval_{s}_{k}_ci95_{end}": v
                for s, m in metrics.items()
                for k, ci in m["ci95"].items()
                for end, v in zip(("low", "high"), ci, strict=True)
            }
        )
        flat["eval_prior_tau"] = decision["tau"]
        flat["eval_temperature"] = decision["temperature"]
        flat.update({f"eval_{s}_ece_raw": v for s, v in decision["raw_ece"].items()})
        flat.update({f"eval_{s}_{k}_argmax": v for s, m in decision.get("argmax", {}).items() for k, v in m.items()})
        tracking.log_metrics(run_id, flat)
        tracking.set_tags(run_id, {f"evaluate.{k}": str(v).lower() for k, v in cfg.model_dump(mode="json").items()})
        for f in ("metrics.json", "predictions.csv", *figures):
            tracking.log_artifact(run_id, out / f, "evaluation")
    return {"metrics": Artifact.of(out / "metrics.json"), "predictions": Artifact.of(out / "predictions.csv")}


def _decision_rule(
    cfg: EvaluateConfig, split_rows: pd.DataFrame, labels: dict[str, np.ndarray], raw: dict[str, np.ndarray]
) -> dict:
    """How the served model turns its raw probabilities into answers, fitted on val.

    First a temperature (identity when off), so the probabilities are calibrated; then the
    prior correction (off: plain argmax), tuned on the tempered probabilities the served
    model will actually have. Records the uncalibrated ECE, and with the prior correction
    what plain argmax scored, so what each step changed is on the record beside it.
    """
    temperature = round(fit_temperature(labels["val"], raw["val"]), 6) if cfg.temperature_scaling else 1.0
    raw_ece = {which: expected_calibration_error(labels[which], p) for which, p in raw.items()}
    rule = {"temperature": temperature, "raw_ece": raw_ece}
    if not cfg.prior_correction:
        rule = {**rule, "prior_correction": False, "tau": 0.0, "offsets": None, "rule": "the most probable class"}
        return _operating_point(cfg, split_rows, labels, raw, rule)
    prior = split_rows[split_rows.split == "train"].dx.value_counts(normalize=True).reindex(CLASSES, fill_value=0)
    floor = cfg.min_balanced_accuracy
    tau, offsets, floor_met = tune_prior_correction(
        labels["val"], adjust_probabilities(raw["val"], temperature), prior.to_numpy(), floor
    )
    argmax = {
        which: {k: classification_metrics(labels[which], p)[k] for k in ("accuracy", "balanced_accuracy")}
        for which, p in raw.items()
    }
    objective = _objective(floor, floor_met)
    print(
        f"prior correction: tau {tau:.2f}, {objective} (plain argmax: val accuracy "
        f"{argmax['val']['accuracy']:.3f}, balanced accuracy {argmax['val']['balanced_accuracy']:.3f})",
        flush=True,
    )
    rule = {
        **rule,
        "prior_correction": True,
        "tau": tau,
        "offsets": [round(float(o), 6) for o in offsets],
        "min_balanced_accuracy": floor,
        "floor_met": floor_met,
        "objective": objective,
        "train_prior": {c: round(float(v), 6) for c, v in prior.items()},
        "argmax": argmax,
        "rule": f"prior correction tau {tau:.2f}, {objective}",
    }
    return _operating_point(cfg, split_rows, labels, raw, rule)


def _operating_point(
    cfg: EvaluateConfig, split_rows: pd.DataFrame, labels: dict[str, np.ndarray], raw: dict[str, np.ndarray], rule: dict
) -> dict:
    """`rule` as it is, or with the melanoma-sensitivity operating point added on top of it.

    `rule["rule"]` says in words what the served model applies: the model card, the registered
    version's tags and the served model's config carry that sentence.
    """
    if cfg.operating_point != "melanoma_sensitivity":
        return {**rule, "operating_point": cfg.operating_point}
    base = {which: adjust_probabilities(p, rule["temperature"], rule["offsets"]) for which, p in raw.items()}
    test_lesions = split_rows[split_rows.split == "test"].lesion_id.to_numpy()  # the order load_split_images keeps
    point = melanoma_operating_point(labels, base, test_lesions, cfg.mel_sensitivity_target, cfg.bootstrap)
    offsets = np.zeros(len(CLASSES)) if rule["offsets"] is None else np.array(rule["offsets"])
    offsets[CLASSES.index("mel")] += point["melanoma_offset"]
    change = point["test_change"]
    print(
        f"melanoma operating point: offset {point['melanoma_offset']:+.3f} for val melanoma sensitivity >= "
        f"{cfg.mel_sensitivity_target:.2f}; on test, melanoma sensitivity {change['mel_sensitivity']['change']:+.3f}, "
        f"specificity {change['mel_specificity']['change']:+.3f}, accuracy {change['accuracy']['change']:+.3f}",
        flush=True,
    )
    return {
        **rule,
        **point,
        "operating_point": "melanoma_sensitivity",
        "offsets": [round(float(o), 6) for o in offsets],
        "rule": f"{rule['rule']}; then melanoma log-probability offset {point['melanoma_offset']:+.3f}, "
        f"chosen for validation melanoma sensitivity >= {cfg.mel_sensitivity_target:.2f}",
    }


def _objective(floor: float | None, floor_met: bool) -> str:
    """What the tuned tau was chosen for, in words, kept in the decision record so the log, the run
    summary and the model card say the same (and the CLI need not import this module to say it)."""
    if floor is None:
        return "chosen for the best validation balanced accuracy"
    if floor_met:
        return f"chosen for the best validation accuracy at validation balanced accuracy >= {floor:.2f}"
    return f"no tau reached validation balanced accuracy {floor:.2f}, so plain argmax"


def register(
    models: dict[str, dict[str, Artifact]],
    manifest: Artifact,
    release: Artifact,
    split: Artifact,
    ws: Workspace,
    params: Params,
    git_commit: str,
) -> dict[str, Artifact]:
    """Register every evaluated model; move `challenger`, and `champion` only on evidence.

    `models[name]` holds that model's `model`, `summary`, `metrics` and `predictions`.
    The run's challenger is its best model on the *validation* promotion metric (test is
    kept for the champion decision). It replaces the champion only if it beats it on the
    same test images by more than chance (one-sided paired lesion bootstrap at
    `registry.alpha`). Moving `champion` is the very last action, so a run that fails
    before it never changes who is champion.
    """
    reg = params.registry
    out = ws.root / "register"
    rel = json.loads(Path(release.path).read_text())
    split_rows = read_csv(split)
    table = split_rows.groupby(["dx", "split"]).size().unstack(fill_value=0).to_string()
    locations = read_csv(manifest).set_index("image_id")[["file", "member"]]
    test_rows = split_rows[split_rows.split == "test"].reset_index(drop=True)
    with ImageReader() as reader:
        test_bytes = [reader.read(*locations.loc[i]) for i in test_rows.image_id]
    params_hash = params_digest(params)

    versions: dict[str, str] = {}
    val_scores: dict[str, float] = {}
    for name, arts in models.items():
        summary = json.loads(Path(arts["summary"].path).read_text())
        metrics = json.loads(Path(arts["metrics"].path).read_text())
        val_scores[name] = metrics["val"][reg.promotion_metric]
        uri = tracking.log_classifier(
            summary["run_id"],
            Path(arts["model"].path),
            test_bytes[0],
            params.evaluate.tta,
            metrics["decision"]["temperature"],
            metrics["decision"]["offsets"],
            metrics["decision"]["rule"],
        )
        facts = {
            "architecture": name,
            "MLflow run": summary["run_id"],
            "git commit": git_commit,
            "params hash": params_hash,
            "data fingerprint": rel["fingerprint"],
            "decision rule": metrics["decision"]["rule"],
        }
        tags = {
            **facts,
            **{
                f"test_{k}": f"{metrics['test'][k]:.4f}"
                for k in ("accuracy", "balanced_accuracy", "macro_f1", "mel_sensitivity")
            },
        }
        version = tracking.register(uri, reg.model_name, tags)
        card = model_card.render(
            reg.model_name, version, summary, metrics, rel, table, facts, params.train_for(name).ema_decay
        )
        write_text(out / f"model_card_{name}.md", card)
        tracking.log_artifact(summary["run_id"], out / f"model_card_{name}.md", "model_card")
        tracking.describe_version(reg.model_name, version, card)
        versions[name] = version

    best = max(val_scores, key=val_scores.get)
    tracking.set_alias(reg.model_name, "challenger", versions[best])
    decision = {
        "challenger": {"model": best, "version": versions[best]},
        "versions": versions,
        "metric": reg.promotion_metric,
        "alpha": reg.alpha,
    }
    champion = tracking.alias_version(reg.model_name, "champion")
    if champion is None:
        decision.update(promote=True, reason="no champion yet: the first model becomes champion")
    else:
        y = _labels(test_rows)
        new = read_csv(models[best]["predictions"])
        new = new[new.split == "test"].set_index("image_id").loc[test_rows.image_id, "predicted"]
        old = tracking.load_pyfunc(f"models:/{reg.model_name}/{champion.version}").predict(
            pd.DataFrame({"image": test_bytes})
        )
        index = {c: i for i, c in enumerate(CLASSES)}
        delta, p = paired_bootstrap(
            y,
            new.map(index).to_numpy(),
            old.predicted.map(index).to_numpy(),
            test_rows.lesion_id.to_numpy(),
            reg.promotion_metric,
            reg.bootstrap,
            params.split.seed,
        )
        promote = delta > 0 and p < reg.alpha
        verdict = "beats" if promote else "does not beat"
        decision.update(
            champion={"version": str(champion.version)},
            delta=delta,
            p_value=p,
            promote=promote,
            reason=f"challenger v{versions[best]} {verdict} champion v{champion.version} on test "
            f"{reg.promotion_metric}: {delta:+.3f}, one-sided p={p:.3f} (alpha {reg.alpha})",
        )
    write_json(out / "decision.json", decision)
    if decision["promote"]:
        tracking.set_alias(reg.model_name, "champion", versions[best])  # last step
    print(f"registry: {decision['reason']}")
    return {"decision": Artifact.of(out / "decision.json")}
