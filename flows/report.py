"""What a run leaves for a person in the Prefect UI: artifacts built from the run's own files.

The terminal summary (cli/main.py) and the artifacts read the same files through `read_run`,
so the Artifacts page, the flow run's page and the terminal cannot disagree: every number is
taken from `metrics.json`, `summary.json`, `release.json`, `split.csv` and `decision.json`,
never recomputed. The builders are pure (files in, text or rows out); only `publish` and
`publish_retrain` talk to Prefect, from inside a flow run, which the artifacts are linked to.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from lesionml.data.split import split_counts

SUMMARY_KEY = "lesionml-summary"
METRICS_KEY = "lesionml-metrics"
RETRAIN_KEY = "lesionml-retrain"
# Where `lesionml ui` serves a local (SQLite or file) tracking store by default.
LOCAL_UI = "http://127.0.0.1:5000"
# Headline metrics, in the order every summary shows them, with their column titles.
METRICS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro-F1",
    "roc_auc_macro": "ROC AUC",
    "mel_sensitivity": "mel. sensitivity",
}


@dataclass(frozen=True)
class ModelResult:
    name: str
    metrics: dict  # evaluate/<name>/metrics.json
    summary: dict  # train/<name>/summary.json


@dataclass(frozen=True)
class RunReport:
    release: dict  # ingest/release.json
    counts: pd.DataFrame | None  # images per class (rows) and split (columns), once split has run
    models: list[ModelResult]  # every evaluated model
    decision: dict | None  # register/decision.json, once register has run
    tracking_uri: str | None
    experiment_id: str | None
    mlflow_run_id: str | None  # the pipeline's parent run


def _read(path: str) -> dict:
    return json.loads(Path(path).read_text())


def read_run(result: dict) -> RunReport:
    """The files a pipeline result names, read once for every summary of the run."""
    arts = result["artifacts"]
    models = [
        ModelResult(name, _read(arts[f"evaluate.{name}.metrics"]["path"]), _read(art["path"]))
        for key, art in arts.items()
        if key.startswith("train.") and key.endswith(".summary")
        for name in [key.split(".")[1]]
        if f"evaluate.{name}.metrics" in arts
    ]
    return RunReport(
        release=_read(arts["ingest.release"]["path"]),
        counts=split_counts(pd.read_csv(arts["split.split"]["path"])) if "split.split" in arts else None,
        models=models,
        decision=_read(arts["register.decision"]["path"]) if "register.decision" in arts else None,
        tracking_uri=result.get("tracking_uri"),
        experiment_id=result.get("mlflow_experiment_id"),
        mlflow_run_id=result.get("mlflow_run_id"),
    )


def mlflow_ui(tracking_uri: str) -> tuple[str, str]:
    """Base URL of the MLflow UI for a tracking store, and what a reader must do to open it.

    A tracking server serves its own UI; a local store has none until `lesionml ui` starts
    one. Credentials in the URI never reach an artifact.
    """
    if tracking_uri.startswith(("http://", "https://")):
        return re.sub(r"//[^/@\s]+@", "//", tracking_uri).rstrip("/"), ""
    return LOCAL_UI, " (start it with `lesionml ui`)"


def run_url(tracking_uri: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    """The run's page in the MLflow UI (None without a tracked run).

    In MLflow's "Model training" view, where the experiment's runs and the model registry
    are; a first visit would otherwise land in its GenAI view.
    """
    if not (tracking_uri and experiment_id and run_id):
        return None
    base = mlflow_ui(tracking_uri)[0]
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def metric_rows(report: RunReport, digits: int = 4) -> list[dict]:
    """One row per model and split: each headline metric with its 95% interval, the ECE, the
    training and the MLflow run. Values are the files' numbers rounded to `digits`."""
    rows = []
    for model in report.models:
        for split in ("val", "test"):
            m = model.metrics[split]
            row: dict = {"model": model.name, "split": split}
            for key in METRICS:
                low, high = m["ci95"].get(key, (None, None))
                row[key] = _round(m.get(key), digits)
                row[f"{key}_ci95_low"] = _round(low, digits)
                row[f"{key}_ci95_high"] = _round(high, digits)
            row["ece"] = _round(m["ece"], digits)
            row["epochs_run"] = model.summary["epochs_run"]
            row["best_epoch"] = model.summary["best_epoch"]
            row["mlflow_run_id"] = model.summary["run_id"]
            rows.append(row)
    return rows


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def summary_markdown(report: RunReport) -> str:
    """The run on one page: release, images per class and split, each model's test metrics with
    95% intervals, the registry decision and its reason, and links to the MLflow runs."""
    release = report.release
    lines = [
        "# lesionml pipeline run",
        "",
        (
            f"**Release** `{release['source']}`: {release['images']} images of {release['lesions']} lesions, "
            f"fingerprint `{release['fingerprint']}`"
        ),
    ]
    if report.counts is not None:
        counts = report.counts
        lines += ["", "## Images per class and split", ""]
        lines += _markdown_table(
            ["class", *counts.columns],
            [[str(dx), *(str(int(v)) for v in row)] for dx, row in counts.iterrows()],
        )
    if report.models:
        lines += ["", "## Test metrics", "", "Each with its 95% interval (lesion bootstrap) in brackets.", ""]
        table = []
        for row in metric_rows(report, digits=3):
            if row["split"] != "test":
                continue
            url = run_url(report.tracking_uri, report.experiment_id, row["mlflow_run_id"])
            run = f"[{row['mlflow_run_id'][:8]}]({url})" if url else str(row["mlflow_run_id"])
            table.append(
                [
                    row["model"],
                    *(
                        f"{_cell(row[k])} [{_cell(row[f'{k}_ci95_low'])}, {_cell(row[f'{k}_ci95_high'])}]"
                        for k in METRICS
                    ),
                    _cell(row["ece"]),
                    f"{row['epochs_run']} (best {row['best_epoch']})",
                    run,
                ]
            )
        lines += _markdown_table(["model", *METRICS.values(), "ECE", "epochs", "MLflow run"], table)
    if report.decision is not None:
        d = report.decision
        challenger = d["challenger"]
        verdict = "**promoted to champion**" if d["promote"] else "**not promoted**; the champion stays"
        lines += [
            "",
            "## Registry decision",
            "",
            f"Challenger: {challenger['model']} (version {challenger['version']}), {verdict}.",
            "",
            f"Reason: {d['reason']}",
        ]
    url = run_url(report.tracking_uri, report.experiment_id, report.mlflow_run_id)
    if url:
        lines += ["", _run_link("Pipeline run in MLflow", report.mlflow_run_id, url, report.tracking_uri)]
    return "\n".join(lines) + "\n"


def _run_link(label: str, run_id: str, url: str, tracking_uri: str) -> str:
    return f"{label}: [{run_id}]({url}){mlflow_ui(tracking_uri)[1]}"


def retrain_markdown(
    retrained: bool, why: str, decision: dict | None, tracking_uri: str, experiment_id: str, run_id: str
) -> str:
    """Whether a retraining run retrained or stopped early, and why; the registry decision when it
    retrained (from decision.json); the MLflow pipeline run it made, or the unchanged one it matched."""
    lines = ["# lesionml retraining: " + ("retrained" if retrained else "stopped early"), "", why]
    if decision is not None:
        moved = "yes" if decision["promote"] else "no"
        lines += ["", f"Registry decision: {decision['reason']} (champion moved: {moved})"]
    label = "Pipeline run in MLflow" if retrained else "Unchanged since MLflow run"
    url = run_url(tracking_uri, experiment_id, run_id)
    if url:
        lines += ["", _run_link(label, run_id, url, tracking_uri)]
    return "\n".join(lines) + "\n"


def publish(result: dict) -> None:
    """Publish the run's summary (markdown) and metrics (table) as keyed artifacts of this flow run.

    A run that only ingested (`lesionml ingest`, or the retraining flow checking its release)
    publishes nothing: under the summary key it would hide the last results behind a release.
    """
    if "split.split" not in result["artifacts"]:
        return
    report = read_run(result)
    create_markdown_artifact(
        summary_markdown(report), key=SUMMARY_KEY, description="lesionml run: data, test metrics, registry decision"
    )
    if report.models:
        create_table_artifact(
            metric_rows(report), key=METRICS_KEY, description="lesionml run: metrics per model and split, 95% intervals"
        )


def publish_retrain(
    retrained: bool, why: str, result: dict | None, tracking_uri: str, experiment_id: str, run_id: str
) -> None:
    """Publish whether this retraining run retrained or stopped early, and why, as a keyed artifact.

    `result` is the pipeline's when it retrained (its decision.json is quoted), None when it stopped.
    """
    decision = None
    if result is not None and "register.decision" in result["artifacts"]:
        decision = _read(result["artifacts"]["register.decision"]["path"])
    create_markdown_artifact(
        retrain_markdown(retrained, why, decision, tracking_uri, experiment_id, run_id),
        key=RETRAIN_KEY,
        description="lesionml scheduled retraining: retrained or stopped early, and why",
    )
