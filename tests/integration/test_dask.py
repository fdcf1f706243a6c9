"""Training spread over workers: `lesionml run --runner dask://HOST:PORT` on a real two-worker
Dask cluster on loopback trains the two models at the same time, one per worker, through to
evaluated, registered models in the run's own MLflow store, bit for bit the models of the
sequential run."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from tests.helpers import SAMPLE, run_lesionml, write_params

pytestmark = pytest.mark.integration
MODELS = ("cnn", "cnn_lstm")
TWO_TINY_MODELS = {
    "data": {"image_size": [32, 40]},
    "models": {
        "enabled": list(MODELS),
        "cnn": {"filters": [8, 16], "dense_units": 16},
        "cnn_lstm": {"filters": [8, 16], "lstm_units": 8, "dense_units": 16},
    },
    "train": {"epochs": 1, "batch_size": 64, "deterministic": True},
    "evaluate": {"bootstrap": 100},
    "registry": {"bootstrap": 100},
}


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as local,
        Client(local) as client,
    ):
        client.get_task_stream()  # the scheduler records task timings and workers from here on
        yield client


def _run(tmp: Path, prefect_server: str, *args: str) -> tuple[Path, str]:
    """`lesionml run` on the sample in a fresh project folder (own workspace and MLflow store)."""
    params = write_params(tmp, SAMPLE, **TWO_TINY_MODELS)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp / "prefect-home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = run_lesionml("run", "--params", str(params), *args, env=env, timeout=1800)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return tmp / "ws", done.stdout


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_models_train_at_once_on_two_workers(cluster, prefect_server, tmp_path):
    started = time.time()
    ws, out = _run(
        tmp_path / "dask", prefect_server, "--runner", f"dask://{cluster.scheduler.address.removeprefix('tcp://')}"
    )

    stages = next(line for line in out.splitlines() if line.startswith("stages"))
    assert all(f"train.{m} (ran)" in stages and f"evaluate.{m} (ran)" in stages for m in MODELS), stages
    trains = [t for t in cluster.get_task_stream(start=started) if t["key"].startswith("train-")]
    assert len(trains) == 2, [t["key"] for t in cluster.get_task_stream(start=started)]
    assert trains[0]["worker"] != trains[1]["worker"]
    spans = [next((s["start"], s["stop"]) for s in t["startstops"] if s["action"] == "compute") for t in trains]
    assert max(start for start, _ in spans) < min(stop for _, stop in spans), f"no overlap: {spans}"
    # The workers logged to the run's store (told by the flow), and the flow registered both models.
    decision = json.loads((ws / "register" / "decision.json").read_text())
    assert sorted(decision["versions"]) == sorted(MODELS) and decision["promote"] is True
    for m in MODELS:
        run_id = json.loads((ws / "train" / m / "summary.json").read_text())["run_id"]
        assert run_id in (tmp_path / "dask" / "mlruns.db").read_bytes().decode("latin-1"), m

    # The same bits as the sequential run of the same params (train.deterministic: true): the
    # same probabilities for every val and test image, so the same metrics and the same decision.
    alone, _ = _run(tmp_path / "sequential", prefect_server)
    for m in MODELS:
        assert _sha(ws / "evaluate" / m / "predictions.csv") == _sha(alone / "evaluate" / m / "predictions.csv"), m
    assert json.loads((alone / "register" / "decision.json").read_text()) == decision  # each store: versions 1, 2


def test_a_mistyped_runner_is_one_line_before_anything_runs(tmp_path, capsys):
    from cli.main import main

    params = write_params(tmp_path, SAMPLE, **TWO_TINY_MODELS)
    assert main(["run", "--params", str(params), "--runner", "tcp://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("lesionml: error: runner 'tcp://127.0.0.1:1': expected dask://HOST:PORT")
    assert not (tmp_path / "ws").exists()
