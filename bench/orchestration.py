"""Orchestration overhead: the full `lesionml run` on the bundled sample against a plain
Python script that calls the same library stage functions in the same order, with the
same params and the same MLflow tracking, but no Prefect, no caching and no CLI.

Both sides run cold, as fresh subprocesses (imports included), each in its own temp
folder with its own workspace and tracking store; the sides alternate over `--repeats`
rounds so that machine noise hits both. Overhead = (lesionml - plain) / plain.

    .venv/bin/python bench/orchestration.py [--repeats 2] [--set train.epochs=2 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# The plain side: the library's file -> file stage functions, one after the other.
PLAIN = """
import sys
from pathlib import Path
from lesionml import model_stages, tracking
from lesionml.config import load_params
from lesionml.data import stages
from lesionml.workspace import Workspace

params = load_params(sys.argv[1])
ws = Workspace(params.data.workspace)
experiment = tracking.connect(params.tracking)
ingested = stages.ingest(params.data.source, ws, params.data.max_archive_bytes)
prep = stages.preprocess(ingested["manifest"], ws, params.data)
split = stages.split(prep["metadata"], ws, params.split)
norm = stages.normalize(prep["images"], split["split"], ws)
stages.augment(prep["images"], split["split"], ws, params.augment)
parent = tracking.start_run(experiment, "pipeline", {})
tracking.log_params(parent, params)
evaluated = {}
for name in params.models.enabled:
    run = tracking.RunContext(experiment, parent, {"lesionml.model": name})
    trained = model_stages.train(name, prep["images"], split["split"], norm["stats"], ws, params, run)
    evaluated[name] = trained | model_stages.evaluate(
        name, trained["model"], trained["summary"], prep["images"], split["split"], ws)
model_stages.register(evaluated, ingested["manifest"], ingested["release"], split["split"], ws, params, "bench")
tracking.end_run(parent)
"""


def setup(folder: Path, params_src: Path, overrides: list[str]) -> Path:
    params = yaml.safe_load(params_src.read_text())
    params["data"].update(source=str(ROOT / "data" / "sample"), workspace=str(folder / "workspace"))
    params["tracking"].update(uri=f"sqlite:///{folder / 'mlruns.db'}", artifacts=str(folder / "artifacts"))
    for item in overrides:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        params[section][name] = yaml.safe_load(value)
    folder.mkdir(parents=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def timed(cmd: list[str], env: dict[str, str], log: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
    if done.returncode != 0:
        raise SystemExit(f"bench/orchestration.py: {cmd[0]} exited {done.returncode}; log: {log}")
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="lesionml-orchestration-"))
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    script = tmp / "plain_pipeline.py"
    script.write_text(PLAIN)
    times: dict[str, list[float]] = {"lesionml run (Prefect flow, CLI)": [], "plain script, same functions": []}
    print(f"bundled sample, params {args.params} {' '.join(args.overrides)}; {args.repeats} rounds, temp {tmp}")
    for k in range(args.repeats):
        for label in (list(times) if k % 2 == 0 else list(times)[::-1]):
            folder = tmp / f"{'flow' if label.startswith('lesionml') else 'plain'}{k}"
            params = setup(folder, args.params, args.overrides)
            cmd = ([str(BIN / "lesionml"), "run", "--params", str(params)] if label.startswith("lesionml")
                   else [sys.executable, str(script), str(params)])
            times[label].append(timed(cmd, {**env, "PYTHONPATH": str(ROOT)}, folder / "run.log"))
            print(f"  round {k + 1}: {label:<34} {times[label][-1]:7.1f} s", flush=True)
    flow, plain = (statistics.median(v) for v in times.values())
    print(f"\n{'side':<34} {'median s':>9} {'best s':>8}")
    for label, values in times.items():
        print(f"{label:<34} {statistics.median(values):9.1f} {min(values):8.1f}")
    overhead = (flow - plain) / plain
    print(f"\noverhead of orchestration: {flow - plain:+.1f} s = {overhead:+.1%} of the plain script (goal <= 10%)")
    print(f"ratio lesionml/plain: {flow / plain:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"times": times, "overhead": overhead}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
