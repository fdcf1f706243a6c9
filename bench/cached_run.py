"""Wall time of a fully cached `lesionml run --only data` (ingest .. augment) on the bundled sample.

Runs the `lesionml` console script (from the same venv as this Python) twice as a
subprocess, in an isolated temp folder: a copy of params.yaml there with data.source set
to the bundled sample (absolute path) and data.workspace to a temp workspace, and
PREFECT_HOME set to a temp folder (so the first run also pays Prefect's one-off database
set-up, as on a fresh machine). The first run computes every data stage; the second
should hit the cache for all of them. Both wall times include process start-up and
imports, i.e. what a user waits for.

    python bench/cached_run.py [--sample data/sample] [--params params.yaml] [--keep] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "lesionml"


def fail(message: str) -> int:
    print(f"bench/cached_run.py: {message}", file=sys.stderr)
    return 2


def run_cli(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float) -> tuple[float, int, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return seconds, proc.returncode, proc.stdout


def stages_line(stdout: str) -> dict[str, str]:
    """'stages  ingest (ran), preprocess (cached), ...' -> {stage: 'ran'|'cached'}."""
    for line in stdout.splitlines():
        if line.startswith("stages"):
            return dict(re.findall(r"([\w.]+) \((cached|ran)\)", line))
    return {}


def reported_seconds(stdout: str) -> float | None:
    m = re.search(r"^done in ([\d.]+) s", stdout, re.M)
    return float(m.group(1)) if m else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", type=Path, default=ROOT / "data" / "sample", help="data source (default: the bundled sample)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="params file to copy (default: the repo's)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per run (default 900)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (params, workspace, logs) and print it")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args()

    sample, params_src = args.sample.resolve(), args.params.resolve()
    if not CLI.is_file():
        return fail(f"no lesionml console script at {CLI}; run with the project venv's python")
    if not sample.is_dir():
        return fail(f"sample folder not found: {sample}")
    if not params_src.is_file():
        return fail(f"params file not found: {params_src}")

    tmp = Path(tempfile.mkdtemp(prefix="lesionml-cached-run-"))
    params = yaml.safe_load(params_src.read_text())
    params["data"]["source"] = str(sample)
    params["data"]["workspace"] = str(tmp / "workspace")
    # tracking.uri / artifacts stay relative, so they resolve inside the temp folder too.
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"))
    env.pop("MLFLOW_TRACKING_URI", None)  # never touch a real tracking store
    cmd = [str(CLI), "run", "--only", "data", "--params", str(tmp / "params.yaml")]

    print(f"command   {' '.join(cmd)}")
    print(f"temp      {tmp} (params.yaml copy, workspace/, PREFECT_HOME=prefect/)")
    print(f"sample    {sample}\n")
    runs = []
    for k, label in ((1, "first run (cold: computes every stage)"), (2, "second run (everything cached)")):
        try:
            seconds, rc, out = run_cli(cmd, tmp, env, tmp / f"run{k}.log", args.timeout)
        except subprocess.TimeoutExpired:
            return fail(f"run {k} took over {args.timeout:.0f} s; logs in {tmp}")
        if rc != 0:
            print((tmp / f"run{k}.log").read_text(), file=sys.stderr)
            return fail(f"run {k} exited with {rc} (log above, kept in {tmp})")
        stages = stages_line(out)
        runs.append({"label": label, "wall_s": seconds, "cli_reported_s": reported_seconds(out), "stages": stages})

    header = f"{'run':<40} {'wall s':>8} {'CLI says s':>11}  stages"
    print(header)
    print("-" * (len(header) + 40))
    for r in runs:
        said = f"{r['cli_reported_s']:.1f}" if r["cli_reported_s"] is not None else "?"
        stages = ", ".join(f"{s}:{v}" for s, v in r["stages"].items()) or "?"
        print(f"{r['label']:<40} {r['wall_s']:>8.1f} {said:>11}  {stages}")
    second = runs[1]["stages"]
    all_cached = bool(second) and all(v == "cached" for v in second.values())
    print(f"\nsecond run fully cached: {'yes' if all_cached else 'NO: ' + ', '.join(s for s, v in second.items() if v != 'cached')}")
    print(f"second/first wall time: {runs[1]['wall_s'] / runs[0]['wall_s']:.2f}")

    if args.json:
        args.json.write_text(json.dumps({"command": cmd, "sample": str(sample), "runs": runs, "second_fully_cached": all_cached}, indent=2) + "\n")
        print(f"results written to {args.json}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all_cached else 1


if __name__ == "__main__":
    sys.exit(main())
