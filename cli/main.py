"""The `lesionml` command: pipeline commands run the Prefect flows, the rest call the library.

Every error lesionml raises on purpose is printed as one line (`lesionml: error: ...`)
with a non-zero exit code; a traceback means a bug in lesionml, not in the user's input.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from lesionml.errors import LesionMLError
from lesionml.workspace import STAGES

if TYPE_CHECKING:
    from flows.report import ModelResult


def _common(p: argparse.ArgumentParser, source: bool = True) -> None:
    p.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one param for this run; repeatable (e.g. --set split.seed=7)",
    )
    p.add_argument(
        "--profile",
        metavar="NAME",
        help="apply the overlay profiles.NAME of the params file (e.g. thorough); --set still wins over it",
    )
    if source:
        p.add_argument("--source", help="HAM10000 release folder (default: data.source, the bundled sample)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lesionml",
        description="Train and serve skin-lesion classifiers on HAM10000 with Prefect, MLflow and DVC.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the pipeline as a Prefect flow of cached stages")
    _common(run)
    run.add_argument("--only", choices=["data"], help="run only part of the pipeline (data: ingest .. augment)")
    run.add_argument(
        "--runner",
        metavar="dask://HOST:PORT",
        help="train and evaluate the models at the same time on this Dask cluster (default: one after the other here)",
    )
    ingest = sub.add_parser("ingest", help="validate a HAM10000 release and record its manifest and fingerprint")
    _common(ingest)
    stage = sub.add_parser(
        "stage",
        help="run the pipeline up to one stage (what each dvc.yaml stage calls; upstream stages are cache hits)",
    )
    stage.add_argument("name", choices=STAGES)
    stage.add_argument(
        "--model", action="append", help="train/evaluate only this model (repeatable; default: models.enabled)"
    )
    _common(stage)
    retrain = sub.add_parser(
        "retrain", help="one scheduled-retraining run now: stop early if data, code and params are unchanged"
    )
    _common(retrain, source=False)
    schedule = sub.add_parser(
        "schedule",
        help="deploy the retraining flow to a Prefect work pool on a cron schedule (needs PREFECT_API_URL)",
    )
    _common(schedule, source=False)
    when = schedule.add_mutually_exclusive_group()
    when.add_argument("--cron", help="5-field cron expression (default: schedule.cron in params)")
    when.add_argument(
        "--interval",
        type=int,
        metavar="SECONDS",
        help="fire every SECONDS instead of on a cron schedule (for trying it out, and tests)",
    )
    schedule.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    schedule.add_argument(
        "--pool", default="lesionml", help="process work pool, created if missing (default: lesionml)"
    )
    schedule.add_argument(
        "--serve", action="store_true", help="run the scheduled runs in this process until Ctrl-C (no worker needed)"
    )
    from cli.stack import add_parser as add_stack_parser

    add_stack_parser(sub)
    predict = sub.add_parser(
        "predict",
        help="classify image files or folders with a registered model",
        description="Classify image files or folders with a registered model. Each call starts a process that "
        "imports TensorFlow and MLflow and loads the model: seconds and most of a GB before the first image, "
        "fine for a folder, slow for one image at a time. The low-latency path is to serve the model once: "
        "mlflow models serve -m models:/lesionml@champion --env-manager local (docs/evaluation.md).",
    )
    predict.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    predict.add_argument("--model", help="NAME@ALIAS (default: <registry.model_name>@champion)")
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument(
        "--explain",
        metavar="OUT_DIR",
        help="also write a Grad-CAM overlay PNG per image into OUT_DIR: where the model saw the class it answered",
    )
    predict.add_argument(
        "--metadata",
        metavar="FILE.csv",
        help="the patients' image_id, age, sex, localization (HAM10000's columns), for a model that takes "
        "them; an image is matched by its file name without extension, one without a row goes without",
    )
    predict.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    compare = sub.add_parser("compare", help="table of the models of the last run(s), logged to MLflow too")
    compare.add_argument("--last", type=int, default=1, help="pipeline runs to include (default 1)")
    compare.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    ui = sub.add_parser("ui", help="open the MLflow UI on the project's tracking store (127.0.0.1 only)")
    ui.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: not reachable from other machines)"
    )
    return parser


def _retrain(args: argparse.Namespace) -> None:
    from lesionml.config import load_params

    load_params(args.params, args.overrides)
    _quiet_environment()
    from flows import local_api

    local_api.launch()
    from flows.retrain import retrain

    started = time.perf_counter()
    with local_api.serving():
        result = retrain(params_file=str(Path(args.params).resolve()), overrides=list(args.overrides))
    verdict = "retrained" if result["retrained"] else "nothing changed: stopped early"
    print(
        f"{verdict}; identity {result['identity']}, MLflow run {result['mlflow_run_id']}; "
        f"{time.perf_counter() - started:.1f} s"
    )


def _ui(args: argparse.Namespace) -> None:
    import signal
    import subprocess

    from lesionml.config import load_params
    from lesionml.tether import tethered
    from lesionml.tracking import redact, tracking_uri

    uri = tracking_uri(load_params(args.params).tracking)
    print(f"MLflow UI for {redact(uri)} on http://{args.host}:{args.port} (Ctrl-C stops it)")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--workers",
        "1",  # one person browsing; MLflow's default of 4 server processes is for a team's server
    ]
    # Tethered: however this process ends (Ctrl-C, SIGTERM, kill -9), `mlflow ui` and the uvicorn
    # it starts end with it instead of living on, re-parented, holding the port.
    # MLflow's job runner (a pool of huey consumers for server-side jobs) has no work in a UI session.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with subprocess.Popen(tethered(cmd), env=env) as ui:
        while True:
            try:
                raise SystemExit(ui.wait())
            except KeyboardInterrupt:
                ui.send_signal(signal.SIGINT)  # the tether stops the UI's whole process group; wait for it


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "source", None):
        # Resolved here: a --source given on the command line is relative to the cwd.
        overrides.append(f"data.source={Path(args.source).resolve()}")
    return overrides


@contextlib.contextmanager
def _source_under_dvc(args: argparse.Namespace) -> Iterator[list[str]]:
    """The run's overrides, with a --source from outside the project read from its DVC-tracked copy."""
    if not getattr(args, "source", None):
        yield _overrides(args)
        return
    from lesionml.data.versioning import tracked_release

    project = Path(args.params).resolve().parent
    with tracked_release(Path(args.source), project) as source:
        if source != Path(args.source).resolve():
            print(
                f"release {args.source} is tracked by DVC as {source.relative_to(project)} "
                f"(git add {source.relative_to(project)}.dvc; dvc push shares it; "
                f"data.source: {source.relative_to(project)} in params.yaml makes dvc repro use it)",
                flush=True,
            )
        yield [*args.overrides, f"data.source={source}"]


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failing task's exception with its traceback; for a LesionMLError (a
    verdict on the user's input, printed by main() as one line) that traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, LesionMLError)


def _quiet_environment() -> None:
    """Defaults for noisy libraries; anything the user set explicitly wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server may need more than Prefect's default 20 s on a busy small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackForUserErrors) for f in logger.filters):  # main() may run many times
            logger.addFilter(_NoTracebackForUserErrors())


def _print_summary(result: dict, seconds: float) -> None:
    from flows.report import read_run

    arts = result["artifacts"]
    report = read_run(result)  # the same files, read the same way, as the run's Prefect artifacts
    release = report.release
    print(f"\nrelease  {release['source']}")
    print(
        f"         {release['images']} images of {release['lesions']} lesions, fingerprint {release['fingerprint'][:16]}"
    )
    if report.counts is not None:
        print("\nimages per class and split:")
        print(report.counts.to_string())
    if "preprocess.images" in arts:
        from lesionml.data.images import image_array_shape

        shape = image_array_shape(arts["preprocess.images"]["path"])
        print(f"\nimage array  {shape[0]} x {shape[1]}x{shape[2]}x{shape[3]} uint8 (N x height x width x RGB)")
    _print_model_results(report.models)
    if result.get("mlflow_run_id"):
        from lesionml.tracking import redact

        print(f"mlflow run   {result['mlflow_run_id']} in {redact(result['tracking_uri'])}  (browse: lesionml ui)")
    stages = ", ".join(f"{s} ({'cached' if hit else 'ran'})" for s, hit in result["cached"].items())
    print(f"stages       {stages}")
    print(f"outputs      {result['workspace']}")
    for name, art in arts.items():
        print(f"  {name:<20} {art['path']}")
    print(f"done in {seconds:.1f} s")


def _print_model_results(models: list[ModelResult]) -> None:
    rows, notes = [], []
    for model in models:
        name, metrics, summary = model.name, model.metrics, model.summary
        for split in ("val", "test"):
            m = metrics[split]
            rows.append(
                f"  {name:<9} {split:<5} {m['accuracy']:>8.3f} {m['balanced_accuracy']:>9.3f} {m['macro_f1']:>8.3f} "
                f"{m.get('roc_auc_macro', float('nan')):>8.3f} {m['mel_sensitivity']:>8.3f}   "
                f"{summary['epochs_run']} epochs (best {summary['best_epoch']}), {summary['train_seconds']:.0f} s"
            )
        decision = metrics.get("decision", {})
        if decision.get("temperature", 1.0) != 1.0:
            notes.append(
                f"  {name}: probabilities temperature-scaled, T {decision['temperature']:.3f} (fitted on "
                f"val); test ECE {decision['raw_ece']['test']:.3f} -> {metrics['test']['ece']:.3f}"
            )
        if decision.get("prior_correction"):
            plain = decision["argmax"]["test"]
            notes.append(
                f"  {name}: prior correction tau {decision['tau']:.2f} ({decision['objective']}); plain "
                f"argmax on test: accuracy {plain['accuracy']:.3f}, bal.acc {plain['balanced_accuracy']:.3f}"
            )
    if rows:
        print("\nmodel     split  accuracy  bal.acc  macro-F1  AUC     mel.sens  training")
        print("\n".join(rows + notes))


def _run_pipeline(args: argparse.Namespace, until: str, models: list[str] | None = None) -> None:
    from lesionml.config import load_params

    overrides = _overrides(args)
    load_params(args.params, overrides)  # fail on bad params before any Prefect start-up cost
    if getattr(args, "runner", None):
        from flows.runners import parse_runner

        parse_runner(args.runner)
    _quiet_environment()
    from flows import local_api

    local_api.launch()  # boots on the other core while the flow's modules import
    from flows.pipeline import pipeline

    if STAGES.index(until) >= STAGES.index("train"):
        # What a training flow imports first (seconds), imported while the server still boots.
        import mlflow  # noqa: F401

        import tasks.model  # noqa: F401
    started = time.perf_counter()
    with _source_under_dvc(args) as overrides, local_api.serving():
        result = pipeline(
            params_file=str(Path(args.params).resolve()),
            overrides=overrides,
            until=until,
            models=models,
            runner=getattr(args, "runner", None),
        )
    _print_summary(result, time.perf_counter() - started)


def _predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from lesionml import tracking
    from lesionml.config import load_params
    from lesionml.data.metadata import CLASS_NAMES, CLASSES
    from lesionml.inference import expand_inputs, read_files

    params = load_params(args.params)
    tracking.connect(params.tracking)
    name, _, alias = (args.model or f"{params.registry.model_name}@champion").partition("@")
    alias = alias or "champion"
    if tracking.alias_version(name, alias) is None:
        known = tracking.aliases(name)
        have = (
            ", ".join(f"{name}@{a} (v{v})" for a, v in sorted(known.items()))
            or f"none: '{name}' has no aliased version"
        )
        raise LesionMLError(f"model {name}@{alias} does not exist; aliases that do: {have}")
    files = expand_inputs(args.inputs)
    if not files:
        raise LesionMLError(f"no image files in {' '.join(args.inputs)}")
    # Read before the model loads: a bad value stops here, naming the line, in a second.
    patient = None
    if args.metadata:
        from lesionml.data.metadata import PATIENT_COLUMNS, read_patient_table

        table = read_patient_table(Path(args.metadata))
        # Images without a row get empty values: the withheld path.
        patient = table.reindex([f.stem for f in files]).reset_index(drop=True)
        patient[["sex", "localization"]] = patient[["sex", "localization"]].fillna("")
        patient = patient[list(PATIENT_COLUMNS)]
    _quiet_environment()
    model = tracking.load_pyfunc(f"models:/{name}@{alias}")
    items = read_files(files)
    request = pd.DataFrame({"image": [data if data is not None else b"" for _, data in items]})
    out = model.predict(request if patient is None else pd.concat([request, patient], axis=1))
    served = model.unwrap_python_model()  # the registered LesionClassifier: its Keras model and rule
    print(f"{name}@{alias}: decision rule: {served.rule}", file=sys.stderr)
    if patient is not None and "metadata" in out.columns and not out.metadata.any():
        print(f"{name}@{alias} takes no patient metadata: --metadata is ignored", file=sys.stderr)
    explained = [None] * len(items)
    if args.explain:
        from lesionml.explain import explain_files

        answers = [row.predicted if not row.error else None for row in out.itertuples(index=False)]
        explained = explain_files(served.model, items, answers, Path(args.explain), metadata=patient)
    failed = 0
    for (source, data), row, overlay in zip(items, out.itertuples(index=False), explained, strict=True):
        error = row.error.replace("image[", "").split("]: ", 1)[-1] if row.error else ""
        if data is None:
            error = "cannot read file"
        if error:
            failed += 1
            print(
                json.dumps({"source": source, "error": error}) if args.json else f"{source}: error: {error}",
                file=sys.stdout if args.json else sys.stderr,
            )
            continue
        proba = {c: float(getattr(row, f"p_{c}")) for c in CLASSES}
        used = getattr(row, "metadata", "")  # "used"/"withheld" for a model with metadata inputs
        if args.json:
            print(
                json.dumps(
                    {
                        "source": source,
                        "predicted": row.predicted,
                        "name": CLASS_NAMES[row.predicted],
                        "probabilities": proba,
                        **({"metadata": used} if used else {}),
                        **({"explanation": str(overlay)} if overlay else {}),
                    }
                )
            )
        else:
            ranked = "  ".join(f"{c} {p:.3f}" for c, p in sorted(proba.items(), key=lambda kv: -kv[1]))
            note = {"used": "  |  metadata used", "withheld": "  |  (no metadata: withheld path)"}.get(used, "")
            print(
                f"{source}: {row.predicted} ({CLASS_NAMES[row.predicted]}, {proba[row.predicted]:.1%})  |  {ranked}{note}"
            )
    if args.explain:
        print(f"Grad-CAM overlays: {sum(p is not None for p in explained)} in {args.explain}", file=sys.stderr)
    if failed:
        print(f"lesionml: {failed} of {len(items)} files could not be predicted", file=sys.stderr)
    return 1 if failed else 0


def _compare(args: argparse.Namespace) -> None:
    from lesionml import tracking
    from lesionml.config import load_params

    params = load_params(args.params)
    experiment_id = tracking.connect(params.tracking)
    runs = tracking.model_runs(experiment_id, args.last)
    if runs.empty:
        raise LesionMLError(f"no trained models in experiment '{params.tracking.experiment}' yet; run `lesionml run`")

    def num(value, digits: int = 3) -> str:
        return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    def ci(row, key):
        lo, hi = row.get(f"metrics.eval_test_{key}_ci95_low"), row.get(f"metrics.eval_test_{key}_ci95_high")
        return f"{num(row.get(f'metrics.eval_test_{key}'))} [{num(lo)}-{num(hi)}]"

    lines = [
        (
            "| run | model | test accuracy [95% CI] | balanced accuracy [95% CI] | macro-F1 | AUC | mel sens. | ECE "
            "| prior tau | train s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, row in runs.iterrows():
        cells = [
            num(row.get(f"metrics.eval_{k}"))
            for k in ("test_macro_f1", "test_roc_auc_macro", "test_mel_sensitivity", "test_ece", "prior_tau")
        ]
        lines.append(
            f"| {row.run_id[:8]} | {row['tags.mlflow.runName']} | {ci(row, 'accuracy')} | {ci(row, 'balanced_accuracy')} "
            f"| {' | '.join(cells)} | {num(row.get('metrics.train_seconds'), 0)} |"
        )
    # Evaluation settings are tags (a cached model is re-evaluated in its training run).
    param_cols = [
        c for c in runs.columns if c.startswith(("params.", "tags.evaluate.")) and runs[c].nunique(dropna=False) > 1
    ]
    differ = ["", "Params that differ:", ""] + [
        f"- {c.split('.', 1)[1]}: " + ", ".join(f"{r[:8]}={v}" for r, v in zip(runs.run_id, runs[c], strict=True))
        for c in param_cols
        if c != "params.model.parameters"
    ]
    text = "\n".join(lines + (differ if len(differ) > 3 else ["", "All params equal (other than the model)."]))
    print(text)
    parent = runs["tags.mlflow.parentRunId"].iloc[0]
    tracking.log_text(parent, text, "comparison.md")
    print(f"\n(logged as comparison.md in MLflow run {parent})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "profile", None):  # one path for every consumer of the overrides: flows, deployments
        args.overrides.append(f"profile={args.profile}")
    try:
        if args.command == "run":
            _run_pipeline(args, until="augment" if args.only == "data" else "register")
        elif args.command == "ingest":
            _run_pipeline(args, until="ingest")
        elif args.command == "stage":
            _run_pipeline(args, until=args.name, models=args.model)
        elif args.command == "retrain":
            _retrain(args)
        elif args.command == "schedule":
            from cli.schedule import schedule

            schedule(args)
        elif args.command == "stack":
            from cli.stack import stack

            stack(args)
        elif args.command == "ui":
            _ui(args)
        elif args.command == "predict":
            return _predict(args)
        elif args.command == "compare":
            _compare(args)
    except LesionMLError as exc:
        print(f"lesionml: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lesionml: interrupted; finished outputs are kept, partial ones were discarded", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
