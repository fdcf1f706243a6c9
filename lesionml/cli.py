"""The `lesionml` command: pipeline commands run the Prefect flows, the rest call the library.

Every error lesionml raises on purpose is printed as one line (`lesionml: error: ...`)
with a non-zero exit code; a traceback means a bug in lesionml, not in the user's input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lesionml.errors import LesionMLError


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
    ingest = sub.add_parser("ingest", help="validate a HAM10000 release and record its manifest and fingerprint")
    _common(ingest)
    ui = sub.add_parser("ui", help="open the MLflow UI on the project's tracking store (127.0.0.1 only)")
    ui.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: not reachable from other machines)")
    return parser


def _ui(args: argparse.Namespace) -> None:
    import subprocess

    from lesionml.config import load_params
    from lesionml.tracking import tracking_uri

    uri = tracking_uri(load_params(args.params).tracking)
    print(f"MLflow UI for {uri} on http://{args.host}:{args.port} (Ctrl-C stops it)")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    raise SystemExit(subprocess.call(cmd))


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if getattr(args, "source", None):
        # Resolved here: a --source given on the command line is relative to the cwd.
        overrides.append(f"data.source={Path(args.source).resolve()}")
    return overrides


def _quiet_environment() -> None:
    """Defaults for noisy libraries; anything the user set explicitly wins."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _print_summary(result: dict, seconds: float) -> None:
    import pandas as pd

    from lesionml.data.split import split_counts

    arts = result["artifacts"]
    release = json.loads(Path(arts["ingest.release"]["path"]).read_text())
    print(f"\nrelease  {release['source']}")
    print(f"         {release['images']} images of {release['lesions']} lesions, fingerprint {release['fingerprint'][:16]}")
    if "split.split" in arts:
        table = split_counts(pd.read_csv(arts["split.split"]["path"]))
        print("\nimages per class and split:")
        print(table.to_string())
    if "preprocess.images" in arts:
        import numpy as np

        with np.load(arts["preprocess.images"]["path"]) as npz:
            shape = npz["images"].shape
        print(f"\nimage array  {shape[0]} x {shape[1]}x{shape[2]}x{shape[3]} uint8 (N x height x width x RGB)")
    _print_model_results(arts)
    if result.get("mlflow_run_id"):
        print(f"mlflow run   {result['mlflow_run_id']} in {result['tracking_uri']}  (browse: lesionml ui)")
    stages = ", ".join(f"{s} ({'cached' if hit else 'ran'})" for s, hit in result["cached"].items())
    print(f"stages       {stages}")
    print(f"outputs      {result['workspace']}")
    for name, art in arts.items():
        print(f"  {name:<20} {art['path']}")
    print(f"done in {seconds:.1f} s")


def _print_model_results(arts: dict) -> None:
    rows = []
    for key, art in arts.items():
        if key.startswith("evaluate.") and key.endswith(".metrics"):
            name = key.split(".")[1]
            metrics = json.loads(Path(art["path"]).read_text())
            summary = json.loads(Path(arts[f"train.{name}.summary"]["path"]).read_text())
            for split in ("val", "test"):
                m = metrics[split]
                rows.append(
                    f"  {name:<9} {split:<5} {m['accuracy']:>8.3f} {m['balanced_accuracy']:>9.3f} {m['macro_f1']:>8.3f} "
                    f"{m.get('roc_auc_macro', float('nan')):>8.3f} {m['mel_sensitivity']:>8.3f}   "
                    f"{summary['epochs_run']} epochs (best {summary['best_epoch']}), {summary['train_seconds']:.0f} s"
                )
    if rows:
        print("\nmodel     split  accuracy  bal.acc  macro-F1  AUC     mel.sens  training")
        print("\n".join(rows))


def _run_pipeline(args: argparse.Namespace, until: str) -> None:
    from lesionml.config import load_params

    overrides = _overrides(args)
    load_params(args.params, overrides)  # fail on bad params before any Prefect start-up cost
    _quiet_environment()
    from flows.pipeline import pipeline

    started = time.perf_counter()
    result = pipeline(params_file=str(Path(args.params).resolve()), overrides=overrides, until=until)
    _print_summary(result, time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            _run_pipeline(args, until="augment" if args.only == "data" else "evaluate")
        elif args.command == "ingest":
            _run_pipeline(args, until="ingest")
        elif args.command == "ui":
            _ui(args)
    except LesionMLError as exc:
        print(f"lesionml: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lesionml: interrupted; finished outputs are kept, partial ones were discarded", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
