"""Orchestration overhead: the whole `lesionml run` on the bundled sample against a plain
Python script calling the same library functions in the same order, and the wall time
of a second `lesionml run` with nothing changed.

- lesionml run: `lesionml run --params P` as a subprocess, cold: a fresh workspace and a
  fresh MLflow store in a temp folder, no PREFECT_API_URL (so Prefect starts its
  temporary server, as for a user) and no MLFLOW_TRACKING_URI. PREFECT_HOME is a temp
  folder whose database the warm-up has already created, as on a machine where Prefect
  has run before; --fresh-prefect-home gives each run a new one instead (first use on a
  new machine: the run also pays for creating Prefect's database).
- plain script: this file re-invoked as `python bench/overhead.py --plain P` in its own
  fresh temp folder: lesionml.data.stages ingest, preprocess, split, normalize, augment,
  then lesionml.model_stages train + evaluate per enabled model and register, with the
  same MLflow tracking as the flow (parent run with params, fingerprint, split sizes and
  data artifacts; one nested run per model; registry tags; run ended). No Prefect, no
  cache keys, no result records, no cache-hit verification, no workspace lock/rollback.
- no-change run: the same `lesionml run` again on the first run's workspace and store;
  every stage should be a verified cache hit.

Both cold sides are whole subprocesses, so Python start-up and imports count on both.
Before timing, one untimed subprocess imports the heavy libraries (TensorFlow, MLflow,
Prefect, the flow) and runs an empty Prefect flow, so the OS file cache is warm for
whichever side runs first and the shared PREFECT_HOME has its database. With
--repeats N the two cold sides alternate order each round and medians are reported.

The params file is the project's params.yaml with only data.workspace, tracking.uri and
tracking.artifacts pointed into the temp folder (and data.source made absolute: the
same folder, since relative paths resolve against the params file's own folder).
--set is passed through to both sides unchanged (e.g. --set train.epochs=1 for a quick
check); the defaults (params.yaml's epochs, both models) are the real measurement.

    python bench/overhead.py [--set train.epochs=1 ...] [--repeats 1] [--keep] [--json bench/results/overhead.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "lesionml"
OVERHEAD_GOAL = 0.10  # of the plain script's wall time
NO_CHANGE_GOAL_S = 15.0
WARM_UP = (
    "import tensorflow, keras, mlflow, prefect, sklearn, lesionml.model_stages, flows.pipeline, tasks.model\n"
    "prefect.flow(name='warm-up')(lambda: None)()"
)


def fail(message: str) -> int:
    print(f"bench/overhead.py: {message}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------- the plain side (--plain)


def plain_pipeline(params_file: Path, overrides: list[str]) -> int:
    """The pipeline without Prefect: library stage functions one after the other.

    Prints `plain-step<TAB>name<TAB>seconds` per step for the parent to collect. Imports are
    made where the flow makes them (model libraries only once the data stages are done).
    """
    steps: dict[str, float] = {}
    clock = time.perf_counter()

    def step(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        steps[name] = now - clock
        clock = now

    import pandas as pd

    from lesionml import tracking
    from lesionml.config import load_params
    from lesionml.data import stages
    from lesionml.data.split import split_counts
    from lesionml.workspace import Workspace

    step("import data libraries")
    params = load_params(params_file, overrides)
    cfg, ws = params.data, Workspace(params.data.workspace)
    experiment = tracking.connect(params.tracking)  # first, as in the flow: fail before any work
    step("connect tracking")
    ingested = stages.ingest(cfg.source, ws, cfg.max_archive_bytes, cfg.allow_external_links)
    step("ingest")
    prep = stages.preprocess(ingested["manifest"], ws, cfg)
    step("preprocess")
    split = stages.split(prep["metadata"], ws, params.split)
    step("split")
    norm = stages.normalize(prep["images"], split["split"], ws)
    step("normalize")
    aug = stages.augment(prep["images"], split["split"], ws, params.augment)
    step("augment")

    from lesionml import model_stages
    from lesionml.provenance import run_identity

    step("import model libraries")
    # The parent run as flows/pipeline.py:_start_pipeline_run logs it (that function lives in
    # a module importing Prefect, so it cannot be called from here).
    commit = tracking.git_commit(params_file.parent)
    release = json.loads(Path(ingested["release"].path).read_text())
    counts = split_counts(pd.read_csv(split["split"].path))
    parent = tracking.start_run(
        experiment, "pipeline", {"lesionml.data_fingerprint": release["fingerprint"], "git_commit": commit}
    )
    sizes = {s: int(counts.loc["total", s]) for s in counts.columns}
    extra = {f"split.n_{s}": n for s, n in sizes.items()}
    extra.update({"data.fingerprint": release["fingerprint"], "data.n_images": release["images"]})
    tracking.log_params(parent, params, extra)
    datasets = tracking.release_datasets(cfg.source, release["fingerprint"], sizes)
    tracking.log_datasets(parent, datasets)
    tracking.log_artifact(parent, aug["preview"].path, "data")
    tracking.log_artifact(parent, norm["stats"].path, "data")
    tracking.log_text(parent, counts.to_string(), "data/split_counts.txt")
    step("start MLflow parent run")

    # Each stage and its logging composed as tasks/model.py composes them.
    evaluated = {}
    for name in params.models.enabled:
        run = tracking.RunContext(experiment, parent, {"lesionml.model": name}, datasets)
        with tracking.model_run(run, name) as run_id:
            trained = model_stages.train(
                name,
                prep["images"],
                split["split"],
                norm["stats"],
                ws,
                params,
                run_id,
                on_epoch=tracking.epoch_logger(run_id),
                on_trained=functools.partial(tracking.log_training, run_id),
                metadata=prep["metadata"],
            )
        step(f"train.{name}")
        model, summary = trained.artifacts["model"], trained.artifacts["summary"]
        result = model_stages.evaluate(
            name, model, summary, prep["images"], split["split"], ws, params.evaluate, metadata=prep["metadata"]
        )
        tracking.log_evaluation(result)
        evaluated[name] = {"model": model, "summary": summary} | result.artifacts
        step(f"evaluate.{name}")
    model_name = params.registry.model_name
    offer = model_stages.registration(
        evaluated, ingested["manifest"], ingested["release"], split["split"], params, commit, prep["metadata"]
    )
    champion = tracking.champion_predictions(model_name, offer.test.images, offer.test.patient)
    versions = tracking.register_versions(offer, model_name, params.evaluate.tta)
    registered = model_stages.register(offer, versions, champion, ws, params)
    tracking.log_registration(model_name, offer, registered)
    step("register")
    decision = registered.decision
    tracking.set_tags(
        parent,
        {
            "lesionml.promoted": str(decision["promote"]).lower(),
            "lesionml.registry_decision": decision["reason"],
            "lesionml.identity": run_identity(params, release["fingerprint"]),
            "lesionml.all_cached": "false",
        },
    )
    tracking.end_run(parent)
    step("end MLflow parent run")
    for name, seconds in steps.items():
        print(f"plain-step\t{name}\t{seconds:.3f}")
    return 0


# ---------------------------------------------------------------- the benchmark


def write_params(folder: Path, base: Path) -> Path:
    import yaml

    params = yaml.safe_load(base.read_text())
    params["data"]["source"] = str((base.parent / params["data"]["source"]).resolve())
    params["data"]["workspace"] = str(folder / "workspace")
    params["tracking"]["uri"] = f"sqlite:///{folder / 'mlruns.db'}"
    params["tracking"]["artifacts"] = str(folder / "mlartifacts")
    folder.mkdir(parents=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def timed(cmd: list[str], cwd: Path, env: dict[str, str], log: Path, timeout: float) -> dict:
    """Run `cmd`; its wall time, CPU time (user + system, with its own child processes such as
    Prefect's server), launch time of day, stdout and stderr."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched, started = time.time(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SystemExit(fail(f"{' '.join(cmd[:3])} ... took over {timeout:.0f} s; logs in {log.parent}")) from None
    seconds = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(fail(f"{' '.join(cmd[:3])} ... exited with {proc.returncode}; log kept: {log}"))
    return {"wall_s": seconds, "cpu_s": cpu, "launched": launched, "stdout": proc.stdout, "stderr": proc.stderr}


def cli_done_in(stdout: str) -> float | None:
    m = re.search(r"^done in ([\d.]+) s", stdout, re.MULTILINE)
    return float(m.group(1)) if m else None


def cli_stages(stdout: str) -> dict[str, str]:
    for line in stdout.splitlines():
        if line.startswith("stages"):
            return dict(re.findall(r"([\w.]+) \((cached|ran)\)", line))
    return {}


def plain_steps(stdout: str) -> dict[str, float]:
    return {
        m.group(1): float(m.group(2)) for m in re.finditer(r"^plain-step\t([^\t]+)\t([\d.]+)$", stdout, re.MULTILINE)
    }


def flow_stage_seconds(stderr: str, stages: list[str], launched: float, wall: float) -> dict[str, float]:
    """Per-stage seconds of a `lesionml run` from Prefect's log timestamps (best effort).

    A stage's time runs from the previous task's "Finished" line (the first: from "Beginning
    flow run") to its own, so it includes Prefect's per-task work and whatever the flow does
    between tasks (connecting to MLflow before ingest, opening the parent run before the
    first train). "outside" is the rest of the wall time: start-up, imports, Prefect's
    temporary server, closing the parent run, summary and shutdown. {} if the log has no
    such lines (another log format)."""
    stamp = r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| \w+ +\| "
    begin = re.search(stamp + r"Flow run '[^']+' - Beginning flow run", stderr, re.MULTILINE)
    ends = list(re.finditer(stamp + r"Task run '[^']+' - Finished in state", stderr, re.MULTILINE))
    if not begin or len(ends) != len(stages):
        return {}
    day = time.localtime(launched)
    midnight = time.mktime((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0, 0, 0, -1))

    def at(m: re.Match) -> float:
        h, mi, sec, ms = (int(g) for g in m.groups()[:4])
        t = midnight + h * 3600 + mi * 60 + sec + ms / 1000
        return t + 86400 if t < launched - 1 else t  # a run past midnight

    out, previous = {}, at(begin)
    for name, m in zip(stages, ends, strict=False):
        out[name] = at(m) - previous
        previous = at(m)
    out["outside"] = wall - sum(out.values())
    return out


def plain_stage_seconds(steps: dict[str, float], stages: list[str], wall: float) -> dict[str, float]:
    """The plain script's steps grouped like the flow's stages: connecting to MLflow counts
    towards ingest, importing the model libraries and opening the parent run towards the
    first train, as in the flow's log; imports, start-up and shutdown are "outside"."""
    out, pending = {}, 0.0
    for name, seconds in steps.items():  # in run order
        if name == "import data libraries":
            continue
        pending += seconds
        if name in stages:
            out[name], pending = pending, 0.0
    if out:
        out["outside"] = wall - sum(out.values())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="base params file (default: the repo's)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="passed to both sides (repeatable), e.g. --set train.epochs=1 for a quick check",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="rounds of the two cold sides, alternating order (default 1)"
    )
    ap.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the untimed warm-up (heavy imports and an empty flow: OS file cache, Prefect's database)",
    )
    ap.add_argument(
        "--fresh-prefect-home",
        action="store_true",
        help="a new PREFECT_HOME for each cold lesionml run (it then also creates Prefect's database)",
    )
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per subprocess (default 3600)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (params, workspaces, stores, logs)")
    ap.add_argument("--json", type=Path, help="also write the results here (e.g. bench/results/overhead.json)")
    ap.add_argument("--plain", type=Path, metavar="PARAMS", help=argparse.SUPPRESS)  # the plain side itself
    args = ap.parse_args()
    if args.plain:
        return plain_pipeline(args.plain.resolve(), args.overrides)
    if args.repeats < 1:
        return fail("--repeats must be >= 1")
    if not CLI.is_file():
        return fail(f"no lesionml console script at {CLI}; run with the project venv's python")
    base = args.params.resolve()
    if not base.is_file():
        return fail(f"params file not found: {base}")

    tmp = Path(tempfile.mkdtemp(prefix="lesionml-overhead-"))
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    for var in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # a temporary Prefect server; our own stores only
        env.pop(var, None)
    sets = [x for item in args.overrides for x in ("--set", item)]
    print(f"base params  {base} {' '.join(args.overrides)}")
    print(f"temp         {tmp}")
    print(
        f"machine      {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min)"
    )

    if not args.no_warmup:
        started = time.perf_counter()
        warm = subprocess.run(
            [sys.executable, "-c", WARM_UP],
            cwd=ROOT,
            env={**env, "PREFECT_HOME": str(tmp / "prefect")},
            capture_output=True,
            text=True,
            check=False,
        )
        if warm.returncode != 0:
            print(warm.stderr[-3000:], file=sys.stderr)
            return fail(f"warm-up failed (exit {warm.returncode}); temp folder kept: {tmp}")
        print(f"warm-up      heavy imports and an empty Prefect flow, untimed ({time.perf_counter() - started:.1f} s)")
    print(f"PREFECT_HOME {'a new one per cold lesionml run' if args.fresh_prefect_home else tmp / 'prefect'}")
    print()

    rows: dict[str, list[dict]] = {"plain": [], "flow": [], "nochange": []}
    for k in range(args.repeats):
        order = ("flow", "plain") if k % 2 == 0 else ("plain", "flow")
        folders = {}
        for side in order:
            folder = tmp / f"{side}{k + 1}"
            params = write_params(folder, base)
            folders[side] = (folder, params)
            side_env = {**env, "PREFECT_HOME": str((folder if args.fresh_prefect_home else tmp) / "prefect")}
            if side == "flow":
                cmd = [str(CLI), "run", "--params", str(params), *sets]
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--plain", str(params), *sets]
            run = timed(cmd, folder, side_env, folder / "run.log", args.timeout)
            row = {"wall_s": run["wall_s"], "cpu_s": run["cpu_s"]}
            if side == "flow":
                stages = cli_stages(run["stdout"])
                row.update(
                    in_flow_s=cli_done_in(run["stdout"]),
                    stages=stages,
                    stage_s=flow_stage_seconds(run["stderr"], list(stages), run["launched"], run["wall_s"]),
                )
            else:
                row.update(steps=plain_steps(run["stdout"]))
            rows[side].append(row)
            label = "lesionml run (cold)" if side == "flow" else "plain script"
            print(f"  round {k + 1}: {label:<24} {run['wall_s']:8.1f} s wall {run['cpu_s']:8.1f} s CPU", flush=True)
        folder, params = folders["flow"]
        cmd = [str(CLI), "run", "--params", str(params), *sets]
        prefect_home = (folder if args.fresh_prefect_home else tmp) / "prefect"
        run = timed(cmd, folder, {**env, "PREFECT_HOME": str(prefect_home)}, folder / "run-nochange.log", args.timeout)
        stages = cli_stages(run["stdout"])
        rows["nochange"].append(
            {
                "wall_s": run["wall_s"],
                "cpu_s": run["cpu_s"],
                "in_flow_s": cli_done_in(run["stdout"]),
                "stages": stages,
                "all_cached": bool(stages) and all(v == "cached" for v in stages.values()),
                "stage_s": flow_stage_seconds(run["stderr"], list(stages), run["launched"], run["wall_s"]),
            }
        )
        print(
            f"  round {k + 1}: {'lesionml run (no change)':<24} {run['wall_s']:8.1f} s wall {run['cpu_s']:8.1f} s CPU",
            flush=True,
        )

    def med(side: str, key: str = "wall_s") -> float:
        values = [r[key] for r in rows[side] if r.get(key) is not None]
        return statistics.median(values) if values else float("nan")

    plain, flow, nochange = med("plain"), med("flow"), med("nochange")
    plain_cpu, flow_cpu, nochange_cpu = med("plain", "cpu_s"), med("flow", "cpu_s"), med("nochange", "cpu_s")
    overhead, overhead_cpu = flow - plain, flow_cpu - plain_cpu
    share, share_cpu = overhead / plain, overhead_cpu / plain_cpu
    all_cached = all(r["all_cached"] for r in rows["nochange"])
    what = f"median of {args.repeats} rounds" if args.repeats > 1 else "one round"

    print(f"\n{'':<32} {'wall s':>8} {'CPU s':>8}   ({what}; whole subprocess incl. start-up and imports;")
    print(f"{'':<32} {'':>8} {'':>8}    CPU = user + system of it and its children, e.g. Prefect's server)")
    print("-" * 110)
    print(f"{'plain script (same functions)':<32} {plain:>8.1f} {plain_cpu:>8.1f}")
    print(
        f"{'lesionml run (cold)':<32} {flow:>8.1f} {flow_cpu:>8.1f}   'done in' (flow call to summary) "
        f"{med('flow', 'in_flow_s'):.1f} s"
    )
    print(
        f"{'overhead':<32} {overhead:>+8.1f} {overhead_cpu:>+8.1f}   wall {share:+.1%} of the plain script "
        f"(goal <= {OVERHEAD_GOAL:.0%}: {'met' if share <= OVERHEAD_GOAL else 'NOT met'}); CPU {share_cpu:+.1%}"
    )
    print(
        f"{'lesionml run (nothing changed)':<32} {nochange:>8.1f} {nochange_cpu:>8.1f}   goal <= {NO_CHANGE_GOAL_S:g} s: "
        f"{'met' if nochange <= NO_CHANGE_GOAL_S else 'NOT met'}; 'done in' {med('nochange', 'in_flow_s'):.1f} s; "
        f"every stage cached: {'yes' if all_cached else 'NO'}"
    )

    # Where the difference is: the last round's stages side by side.
    flow_row, plain_row, nochange_row = rows["flow"][-1], rows["plain"][-1], rows["nochange"][-1]
    names = list(flow_row["stages"])
    by_flow = flow_row["stage_s"]
    by_plain = plain_stage_seconds(plain_row["steps"], names, plain_row["wall_s"])
    by_nochange = nochange_row["stage_s"]
    if by_flow and by_plain:
        print("\nseconds per stage, last round (lesionml: from Prefect's log timestamps; plain: timed in the script)")
        print(f"  {'stage':<22} {'plain':>8} {'lesionml':>9} {'diff':>8} {'no change':>10}")
        for name in [*names, "outside"]:
            a, b, c = (
                by_plain.get(name, float("nan")),
                by_flow.get(name, float("nan")),
                by_nochange.get(name, float("nan")),
            )
            print(f"  {name:<22} {a:>8.1f} {b:>9.1f} {b - a:>+8.1f} {c:>10.1f}")
        print(
            '  (ingest includes connecting to MLflow, the first train opening the parent run; "outside" is '
            "start-up, imports, Prefect's server, summary, shutdown)"
        )
    steps = plain_row["steps"]
    if steps:
        print("\nplain script, seconds per step (last round):")
        for name, seconds in sorted(steps.items(), key=lambda kv: -kv[1]):
            print(f"  {name:<28} {seconds:8.2f}  {seconds / plain_row['wall_s']:6.1%}")
    if not all_cached:
        last = nochange_row["stages"]
        print(
            f"\nno-change run re-ran: {', '.join(s for s, v in last.items() if v != 'cached') or '? (no stages line)'}"
        )

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "base_params": str(base),
                    "overrides": args.overrides,
                    "repeats": args.repeats,
                    "cpu_count": os.cpu_count(),
                    "runs": rows,
                    "plain_s": plain,
                    "flow_s": flow,
                    "overhead_s": overhead,
                    "overhead_share": share,
                    "plain_cpu_s": plain_cpu,
                    "flow_cpu_s": flow_cpu,
                    "overhead_cpu_s": overhead_cpu,
                    "nochange_cpu_s": nochange_cpu,
                    "overhead_goal": OVERHEAD_GOAL,
                    "nochange_s": nochange,
                    "nochange_goal_s": NO_CHANGE_GOAL_S,
                    "nochange_all_cached": all_cached,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"results written to {args.json}")
    if args.keep:
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all_cached else 1


if __name__ == "__main__":
    sys.exit(main())
