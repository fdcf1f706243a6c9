"""The model stages as file-to-file functions: train one model, evaluate one model, and
prepare and decide a registration.

The stages compute and return what they did (TrainResult, EvalResult, Registration,
RegisterResult); they never talk to MLflow. lesionml/tracking.py logs those results and
owns the registry, so the promotion rule here is a pure function of predictions.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from lesionml import explain, model_card, plots
from lesionml.config import EvaluateConfig, Params, RegistryConfig
from lesionml.data.metadata import CLASSES, PATIENT_COLUMNS, check_patient
from lesionml.data.source import ImageReader
from lesionml.data.stages import load_split_images, read_csv, read_stats, write_csv
from lesionml.errors import DataError
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
from lesionml.models import build_model, ensemble
from lesionml.models.patient import PatientStats, enabled, patient_inputs, uses_metadata
from lesionml.provenance import model_identity, params_digest
from lesionml.training import EpochHook, fit, save_model, seed_everything, seeded_construction
from lesionml.workspace import Workspace

if TYPE_CHECKING:
    import keras


def _labels(rows: pd.DataFrame) -> np.ndarray:
    return class_indices(rows.dx)


def patient_rows(metadata: Artifact, rows: pd.DataFrame) -> pd.DataFrame:
    """The preprocessed age, sex and localization of `rows`' images, in their order, with
    image_id (which names a bad row): what a model with the metadata branch is given."""
    table = read_csv(metadata).set_index("image_id")
    missing = rows.image_id[~rows.image_id.isin(table.index)]
    if len(missing):
        raise DataError(f"{metadata.path}: {len(missing)} image_ids of the split are missing, e.g. {missing.iloc[0]}")
    return table.loc[rows.image_id, list(PATIENT_COLUMNS)].reset_index()


def class_indices(names) -> np.ndarray:
    """Class names (dx codes) -> their indices in CLASSES."""
    return pd.Series(names).map({c: i for i, c in enumerate(CLASSES)}).to_numpy(dtype=np.int64)


@dataclass(frozen=True)
class TrainResult:
    """What one training produced: the model and the settings it was trained with, what it
    measured, and the files it wrote (the stage's outputs and the training record)."""

    name: str
    params: Params  # the project's params with this model's own train settings applied
    summary: dict  # what summary.json holds
    model: keras.Model
    example: np.ndarray | dict[str, np.ndarray]  # two validation images (and their metadata inputs)
    normalization: dict
    metadata_encoding: dict | None  # PatientStats fitted on train, for a model with the metadata branch
    record: tuple[Path, ...]  # curves, history and summary: what a person reads about this training
    artifacts: dict[str, Artifact]


def train(
    name: str,
    images: Artifact,
    split: Artifact,
    stats: Artifact,
    ws: Workspace,
    params: Params,
    run_id: str | None = None,
    on_epoch: EpochHook | None = None,
    on_trained: Callable[[TrainResult], None] | None = None,
    metadata: Artifact | None = None,
) -> TrainResult:
    """Train model `name` on the train split, choosing the best epoch on validation.

    `run_id` (the tracking run this training belongs to) is only recorded in summary.json,
    so the evaluate stage can report to the same run. `on_trained` sees the result while the
    resumable state is still on disk: if it fails (the tracking store went away while the
    result was being logged), the next attempt resumes after the last epoch instead of
    training again from scratch. `metadata` (preprocess's patient table) is read only by a
    model whose `metadata.enabled` is on, which needs it.
    """
    train_cfg = params.train_for(name)
    seed_everything(train_cfg.seed, train_cfg.deterministic)
    (train_x, train_rows), (val_x, val_rows) = load_split_images(images, split, "train", "val")
    norm = read_stats(stats)
    image_size = (int(train_x.shape[1]), int(train_x.shape[2]))
    model_cfg = getattr(params.models, name)
    meta_cfg = enabled(model_cfg)
    meta_rows, patient = None, None
    if meta_cfg:
        if metadata is None:
            raise ValueError(f"{name}: metadata is enabled, so training needs preprocess's metadata table")
        meta_rows = (patient_rows(metadata, train_rows), patient_rows(metadata, val_rows))
        patient = PatientStats.fit(meta_rows[0])
    # Resumable state lives in a folder keyed by everything that defines the trained model.
    out = ws.model_dir(name)
    identity = model_identity(
        name, params, images.sha256, split.sha256, stats.sha256, metadata.sha256 if meta_rows else None
    )
    workdir = out / ".work" / identity
    n = model_cfg.ensemble
    members, fits, histories = [], [], []
    for k in range(n):
        # Member k trains exactly as a single model of seed train.seed + k would: the same
        # seeding, construction and epoch seeds, so member 1 is the single model of the run's seed.
        member_cfg = train_cfg.model_copy(update={"seed": train_cfg.seed + k})
        if k:
            seed_everything(member_cfg.seed, member_cfg.deterministic)
        with seeded_construction(member_cfg.seed):
            model = build_model(name, model_cfg, image_size, norm, len(CLASSES), train_cfg.precision, patient=patient)
        which = f" (member {k + 1} of {n}, seed {member_cfg.seed})" if n > 1 else ""
        print(
            f"training {name}{which}: {len(train_x)} train / {len(val_x)} val images of "
            f"{image_size[0]}x{image_size[1]}, {model.count_params():,} parameters, up to {train_cfg.epochs} epochs"
        )
        hook = on_epoch if n == 1 or on_epoch is None else _member_hook(on_epoch, k + 1)
        fitted = fit(
            model,
            (train_x, _labels(train_rows)),
            (val_x, _labels(val_rows)),
            member_cfg,
            workdir if n == 1 else workdir / f"member_{k + 1}",
            ws.model_file(name) if n == 1 else workdir / f"member_{k + 1}" / "model.keras",
            augment=params.augment,
            n_classes=len(CLASSES),
            epoch_hooks=[hook] if hook else [],
            metadata=meta_rows,
            withhold=meta_cfg.withhold if meta_cfg else 0.0,
        )
        members.append(model)
        fits.append(fitted)
        histories.append(pd.read_csv(fitted.history_path))
    model = ensemble(members)
    if n > 1:
        save_model(model, ws.model_file(name))
    history = histories[0] if n == 1 else pd.concat([h.assign(member=k) for k, h in enumerate(histories, 1)])
    write_csv(out / "history.csv", history)
    curves = [out / "curves.png"] + [out / f"curves_member_{k}.png" for k in range(2, n + 1)]
    for k, (path, h, fitted) in enumerate(zip(curves, histories, fits, strict=True), 1):
        title = f"{name}: training curves" + (f", member {k} of {n}" if n > 1 else "")
        plots.training_curves(h, title, path, fitted.best_epoch)
    summary = {
        "model": name,
        "run_id": run_id,
        "image_size": list(image_size),
        "n_train": len(train_x),
        "n_val": len(val_x),
        "parameters": int(model.count_params()),
        "epochs_run": sum(f.epochs_run for f in fits),
        "best_epoch": fits[0].best_epoch if n == 1 else [f.best_epoch for f in fits],
        f"best_{train_cfg.monitor}": fits[0].best_value if n == 1 else [f.best_value for f in fits],
        "train_seconds": round(sum(f.seconds for f in fits), 2),
        "train_images_per_second": round(sum(f.train_images_per_second for f in fits) / n, 1),
        "metadata": bool(meta_cfg),
        "seeds": [train_cfg.seed + k for k in range(n)],
    }
    write_json(out / "summary.json", summary)
    result = TrainResult(
        name=name,
        params=params.model_copy(update={"train": train_cfg}),
        summary=summary,
        model=model,
        example=_example(val_x[:2], meta_rows[1][:2] if meta_rows else None),
        normalization=norm.to_dict(),
        metadata_encoding=patient.to_dict() if patient else None,
        record=(*curves, out / "history.csv", out / "summary.json"),
        artifacts={
            "model": Artifact.of(ws.model_file(name)),
            "history": Artifact.of(out / "history.csv"),
            "summary": Artifact.of(out / "summary.json"),
        },
    )
    if on_trained:
        on_trained(result)
    shutil.rmtree(out / ".work", ignore_errors=True)
    return result


def _member_hook(hook: EpochHook, member: int) -> EpochHook:
    """Per-epoch metrics of ensemble member `member` under names of its own (`member2_val_loss`):
    each member's epochs restart at 1, so shared names would overwrite each other's curves."""
    return lambda epoch, metrics: hook(epoch, {f"member{member}_{k}": v for k, v in metrics.items()})


def _example(images: np.ndarray, rows: pd.DataFrame | None) -> np.ndarray | dict[str, np.ndarray]:
    """The logged model's input example: the images, or a dict of every input by name for a
    model with the metadata branch."""
    pixels = images.astype(np.float32)
    return pixels if rows is None else {"image": pixels, **patient_inputs(rows, len(images))}


@dataclass(frozen=True)
class EvalResult:
    """What evaluating one model measured and wrote, and the run it was trained in (None: untracked)."""

    name: str
    run_id: str | None
    settings: EvaluateConfig
    metrics: dict  # per split, as metrics.json holds them beside the decision rule
    decision: dict
    record: tuple[Path, ...]  # metrics.json, predictions.csv and the figures
    artifacts: dict[str, Artifact]


def evaluate(
    name: str,
    model_file: Artifact,
    summary: Artifact,
    images: Artifact,
    split: Artifact,
    ws: Workspace,
    cfg: EvaluateConfig,
    metadata: Artifact | None = None,
) -> EvalResult:
    """Metrics and predictions of one trained model on the validation and test splits.

    A model with the metadata branch is evaluated with each image's patient values from
    `metadata` (preprocess's table), as it is served with them, and the decision rule is
    fitted on those probabilities; the same rule applied with every image's metadata
    withheld is reported too (`val_withheld`, `test_withheld`): how it answers images that
    come without it.
    """
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
    if uses_metadata(model) and metadata is None:
        raise ValueError(f"{name} has metadata inputs: evaluation needs preprocess's metadata table")
    patient = {
        which: patient_rows(metadata, rows) if uses_metadata(model) else None for which, (_, rows) in splits.items()
    }
    raw = {which: predict_proba(model, x, cfg.tta, metadata=patient[which]) for which, (x, _) in splits.items()}
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
        figures += explain.evaluation_figures(model, x, y, proba, label, which, out, metadata=patient[which])
    if cfg.temperature_scaling:
        print(
            f"temperature scaling: T {decision['temperature']:.3f} (fitted on val log loss; val ECE "
            f"{decision['raw_ece']['val']:.3f} -> {metrics['val']['ece']:.3f})",
            flush=True,
        )
    if uses_metadata(model):
        for which, (x, _) in splits.items():
            withheld = adjust_probabilities(
                predict_proba(model, x, cfg.tta), decision["temperature"], decision["offsets"]
            )
            metrics[f"{which}_withheld"] = classification_metrics(labels[which], withheld)
        print(
            f"metadata withheld (the same rule): val balanced accuracy {metrics['val_withheld']['balanced_accuracy']:.3f} "
            f"(with metadata {metrics['val']['balanced_accuracy']:.3f}), test "
            f"{metrics['test_withheld']['balanced_accuracy']:.3f} ({metrics['test']['balanced_accuracy']:.3f})",
            flush=True,
        )
    write_json(out / "metrics.json", {**metrics, "decision": decision})
    write_csv(out / "predictions.csv", pd.concat(tables, ignore_index=True))
    return EvalResult(
        name=name,
        # A cached model re-evaluated (other evaluation settings) reports to the run it was trained in.
        run_id=json.loads(Path(summary.path).read_text()).get("run_id"),
        settings=cfg,
        metrics=metrics,
        decision=decision,
        record=tuple(out / f for f in ("metrics.json", "predictions.csv", *figures)),
        artifacts={"metrics": Artifact.of(out / "metrics.json"), "predictions": Artifact.of(out / "predictions.csv")},
    )


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


@dataclass(frozen=True)
class Candidate:
    """One evaluated model offered to the registry: what its version is made of and tagged with."""

    name: str
    run_id: str
    model_file: Path
    summary: dict
    metrics: dict  # metrics.json: per split, and the decision rule the served model applies
    facts: dict[str, str]  # what the model is: architecture, run, commit, params hash, data
    tags: dict[str, str]  # the version's tags: the facts and the headline test metrics


@dataclass(frozen=True)
class TestSet:
    """The test split as the champion decision sees it, images in their encoded form: the
    registered models take what a user would send them."""

    image_ids: list[str]
    labels: np.ndarray
    lesion_ids: np.ndarray
    images: list[bytes]
    patient: pd.DataFrame | None  # age, sex, localization per image (cleaned): what a metadata model is sent


@dataclass(frozen=True)
class Registration:
    """Everything the register stage decides on, read from the evaluated artifacts."""

    candidates: dict[str, Candidate]
    challenger: str  # the best model on the *validation* promotion metric; test is kept for the decision
    predicted: np.ndarray  # the challenger's class (index) for each test image, as it was evaluated
    test: TestSet
    release: dict
    split_table: str  # images per class and split, for the model cards


@dataclass(frozen=True)
class Contender:
    """A registered version and its predicted class (index) for every test image."""

    version: str
    predicted: np.ndarray


@dataclass(frozen=True)
class RegisterResult:
    decision: dict  # what decision.json holds
    cards: dict[str, Path]  # model name -> its model card, the version's description
    artifacts: dict[str, Artifact]


def registration(
    models: dict[str, dict[str, Artifact]],
    manifest: Artifact,
    release: Artifact,
    split: Artifact,
    params: Params,
    git_commit: str,
    metadata: Artifact | None = None,
) -> Registration:
    """What to register: every evaluated model (`models[name]` holds its `model`, `summary`,
    `metrics` and `predictions`), the run's challenger, and the test images to judge it on,
    with their patient values from `metadata` (preprocess's table) when given."""
    reg = params.registry
    rel = json.loads(Path(release.path).read_text())
    split_rows = read_csv(split)
    locations = read_csv(manifest).set_index("image_id")[["file", "member"]]
    test_rows = split_rows[split_rows.split == "test"].reset_index(drop=True)
    with ImageReader() as reader:
        test_bytes = [reader.read(*locations.loc[i]) for i in test_rows.image_id]
    params_hash = params_digest(params)
    candidates: dict[str, Candidate] = {}
    for name, arts in models.items():
        summary = json.loads(Path(arts["summary"].path).read_text())
        metrics = json.loads(Path(arts["metrics"].path).read_text())
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
        candidates[name] = Candidate(name, summary["run_id"], Path(arts["model"].path), summary, metrics, facts, tags)
    val_scores = {name: c.metrics["val"][reg.promotion_metric] for name, c in candidates.items()}
    best = max(val_scores, key=val_scores.get)
    table = read_csv(models[best]["predictions"])
    predicted = table[table.split == "test"].set_index("image_id").loc[test_rows.image_id, "predicted"]
    return Registration(
        candidates=candidates,
        challenger=best,
        predicted=class_indices(predicted),
        test=TestSet(
            image_ids=test_rows.image_id.tolist(),
            labels=_labels(test_rows),
            lesion_ids=test_rows.lesion_id.to_numpy(),
            images=test_bytes,
            patient=None
            if metadata is None
            else check_patient(patient_rows(metadata, test_rows), str(metadata.path), test_rows.image_id.tolist()),
        ),
        release=rel,
        split_table=split_rows.groupby(["dx", "split"]).size().unstack(fill_value=0).to_string(),
    )


def register(
    offer: Registration,
    versions: dict[str, str],
    champion: tuple[str, list[str]] | None,
    ws: Workspace,
    params: Params,
) -> RegisterResult:
    """Model cards for the registered `versions` and the champion decision (decision.json).

    `champion` is the current champion's version and its predicted class for each test
    image (None: there is none yet). The challenger replaces it only if it beats it on the
    same test images by more than chance (`decide_promotion`).
    """
    reg = params.registry
    out = ws.root / "register"
    cards = {}
    for name, c in offer.candidates.items():
        card = model_card.render(
            reg.model_name,
            versions[name],
            c.summary,
            c.metrics,
            offer.release,
            offer.split_table,
            c.facts,
            params.train_for(name).ema_decay,
        )
        cards[name] = out / f"model_card_{name}.md"
        write_text(cards[name], card)
    best = offer.challenger
    decision = {
        "challenger": {"model": best, "version": versions[best]},
        "versions": versions,
        **decide_promotion(
            offer.test.labels,
            offer.test.lesion_ids,
            Contender(versions[best], offer.predicted),
            None if champion is None else Contender(champion[0], class_indices(champion[1])),
            reg,
            params.split.seed,
        ),
    }
    write_json(out / "decision.json", decision)
    return RegisterResult(decision, cards, {"decision": Artifact.of(out / "decision.json")})


def decide_promotion(
    labels: np.ndarray,
    lesion_ids: np.ndarray,
    challenger: Contender,
    champion: Contender | None,
    cfg: RegistryConfig,
    seed: int,
) -> dict:
    """Whether the challenger becomes champion, and why, as the decision record says it.

    The first model becomes champion. After that the challenger must beat the champion on
    the same test images by more than chance: the observed difference in
    `cfg.promotion_metric` is positive and a one-sided paired bootstrap over lesions (so the
    noise of which lesions happen to be in the test split cancels) gives p < `cfg.alpha`.
    """
    rule = {"metric": cfg.promotion_metric, "alpha": cfg.alpha}
    if champion is None:
        return {**rule, "promote": True, "reason": "no champion yet: the first model becomes champion"}
    delta, p = paired_bootstrap(
        labels, challenger.predicted, champion.predicted, lesion_ids, cfg.promotion_metric, cfg.bootstrap, seed
    )
    promote = delta > 0 and p < cfg.alpha
    verdict = "beats" if promote else "does not beat"
    return {
        **rule,
        "champion": {"version": str(champion.version)},
        "delta": delta,
        "p_value": p,
        "promote": promote,
        "reason": f"challenger v{challenger.version} {verdict} champion v{champion.version} on test "
        f"{cfg.promotion_metric}: {delta:+.3f}, one-sided p={p:.3f} (alpha {cfg.alpha})",
    }
