"""A run with nothing changed: `lesionml run` as it is against the same command at a baseline
commit whose CLI left the temporary Prefect server to Prefect, alternating, on one finished
workspace.

- lesionml: this checkout's `lesionml run`, which launches the temporary server as the CLI
  starts (flows/local_api.py), so it boots while the flow's modules import.
- baseline: the same console script in the same venv, importing lesionml/, tasks/ and
  flows/ from a git worktree of --baseline (first on PYTHONPATH). Left to itself, Prefect
  imports its server module into the CLI when the flow first asks for a client, and only
  then launches the server and waits for it. The default baseline, d1cd76e, is the last
  commit before the change; the cache keys (task + library source + inputs) are the same on
  both sides.

Every stage must be a verified cache hit on both sides, or the script stops: it times doing
nothing, as a user re-running an unchanged pipeline does. Neither side has PREFECT_API_URL.
One untimed run of each side first warms the OS file cache; then the sides alternate
order each round. Needs a finished run with the same --source/--set first.

    python bench/no_change.py [--source ../shared/data/ham10000] [--set KEY=VALUE ...] [--repeats 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "lesionml"
GOAL_S = 15.0
BASELINE = "d1cd76e"


@contextlib.contextmanager
def worktree(commit: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="lesionml-baseline-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), commit], check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False)


def timed_run(cmd: list[str], env: dict[str, str], side: str) -> tuple[float, float]:
    """Wall seconds of one whole CLI process, and the flow's own `done in` figure."""
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"bench/no_change.py: the {side} run failed:\n{done.stderr[-3000:]}")
    stages = re.search(r"^stages\s+(.*)$", done.stdout, re.MULTILINE)
    flow = re.search(r"^done in ([\d.]+) s$", done.stdout, re.MULTILINE)
    if not stages or not flow:
        raise SystemExit(f"bench/no_change.py: no run summary from the {side} run:\n{done.stdout[-2000:]}")
    if "(ran)" in stages.group(1):
        raise SystemExit(
            f"bench/no_change.py: the {side} run had work to do ({stages.group(1)}); "
            "finish a run with the same --source/--set first"
        )
    return wall, float(flow.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", help="release folder passed to `lesionml run --source` (default: params.yaml's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--repeats", type=int, default=4, help="timed rounds, each one run per side (default 4)")
    ap.add_argument("--baseline", default=BASELINE, help=f"commit of the baseline side (default {BASELINE})")
    args = ap.parse_args()

    cmd = [str(CLI), "run"]
    if args.source:
        cmd += ["--source", str(Path(args.source).resolve())]
    for override in args.overrides:
        cmd += ["--set", override]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    with worktree(args.baseline) as tree:
        envs = {
            "lesionml": env,
            "baseline": {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))},
        }
        print(f"{' '.join(cmd)}\nbaseline: commit {args.baseline}; warm-up run of each side (untimed)...", flush=True)
        for side, side_env in envs.items():
            timed_run(cmd, side_env, side)
        times: dict[str, list[tuple[float, float]]] = {side: [] for side in envs}
        for round_ in range(args.repeats):
            order = list(envs) if round_ % 2 else list(reversed(envs))
            for side in order:
                wall, flow = timed_run(cmd, envs[side], side)
                times[side].append((wall, flow))
                print(
                    f"  round {round_ + 1}  {side:<9} wall {wall:6.2f} s   (flow `done in` {flow:5.2f} s)", flush=True
                )

    medians = {side: statistics.median(w for w, _ in runs) for side, runs in times.items()}
    print("\nside       wall median  best     flow median")
    for side, runs in times.items():
        print(
            f"{side:<10} {medians[side]:8.2f} s  {min(w for w, _ in runs):6.2f} s  "
            f"{statistics.median(f for _, f in runs):8.2f} s"
        )
    verdict = "met" if medians["lesionml"] <= GOAL_S else "NOT met"
    print(
        f"ratio baseline/lesionml: {medians['baseline'] / medians['lesionml']:.2f}x; "
        f"goal <= {GOAL_S:.0f} s: {verdict} ({medians['lesionml']:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
