"""Against a real Prefect server (PREFECT_API_URL), not the temporary one: a pipeline run,
and the scheduled-retraining deployment served by `lesionml schedule`."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import SAMPLE, write_params

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
TINY = {
    "data": {"image_size": [32, 40]},
    "models": {"enabled": ["cnn"], "cnn": {"filters": [8, 16], "dense_units": 16}},
    "train": {"epochs": 1, "batch_size": 64},
    "evaluate": {"bootstrap": 100},
    "registry": {"bootstrap": 100},
}


def _api(url: str, path: str, body: dict | None = None, method: str = "POST", attempts: int = 6):
    """One Prefect REST call, retried like Prefect's own client does on 429/502/503.

    The server answers 503 when its SQLite database is busy (a write from the serve process
    or a background service holds the lock); the request did not happen and is safe to repeat.
    """
    data = None if method == "GET" else json.dumps(body or {}).encode()
    for attempt in range(attempts):
        req = urllib.request.Request(f"{url}{path}", data=data, headers={"Content-Type": "application/json"}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code not in (429, 502, 503) or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def _client_env(server: str, tmp_path: Path) -> dict:
    return {**os.environ, "PREFECT_API_URL": server, "PREFECT_HOME": str(tmp_path / "client-home")}


def test_data_flow_runs_against_a_real_server(prefect_server, tmp_path):
    params = write_params(tmp_path, SAMPLE)
    done = subprocess.run(
        [str(BIN / "lesionml"), "run", "--only", "data", "--params", str(params)],
        env=_client_env(prefect_server, tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Starting temporary server" not in done.stderr + done.stdout

    runs = [r for r in _api(prefect_server, "/flow_runs/filter") if r["parameters"].get("params_file") == str(params)]
    assert [run["state_type"] for run in runs] == ["COMPLETED"]
    tasks = _api(prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
    assert {t["name"].rsplit("-", 1)[0] for t in tasks} == {"ingest", "preprocess", "split", "normalize", "augment"}


def _wait_for_run(server: str, run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(server, f"/flow_runs/{run_id}", method="GET")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    pytest.fail(f"flow run {run_id} did not finish in {timeout} s")


def _logs(server: str, run_id: str, expect: str = "") -> str:
    """The run's log messages, waiting a little for `expect` (logs reach the API in batches)."""
    deadline = time.monotonic() + 15
    while True:
        logs = _api(server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200})
        text = "\n".join(entry["message"] for entry in logs)
        if expect in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_schedule_serves_a_cron_deployment_that_retrains_then_stops_early(prefect_server, tmp_path):
    params = write_params(tmp_path, SAMPLE, **TINY)
    served_log = tmp_path / "serve.log"  # a file, not a pipe: nobody drains a pipe while the test waits
    with served_log.open("w") as out:
        serve = subprocess.Popen(
            [str(BIN / "lesionml"), "schedule", "--cron", "0 3 * * 1", "--params", str(params)],
            env={**_client_env(prefect_server, tmp_path), "PREFECT_LOGGING_LEVEL": "INFO"},  # the runs' prints reach the API
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None:
            found = _api(prefect_server, "/deployments/filter", {"deployments": {"name": {"any_": ["scheduled"]}}})
            deployment = found[0] if found else None
            if serve.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no deployment was served:\n{served_log.read_text()[-3000:]}")
            time.sleep(1)
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 1"]
        assert deployment["parameters"]["params_file"] == str(params)

        first = _api(prefect_server, f"/deployments/{deployment['id']}/create_flow_run", {})
        run = _wait_for_run(prefect_server, first["id"])
        assert run["state_type"] == "COMPLETED", _logs(prefect_server, first["id"])[-3000:]
        expect = "retraining: no successful run has identity"
        assert expect in _logs(prefect_server, first["id"], expect)

        second = _api(prefect_server, f"/deployments/{deployment['id']}/create_flow_run", {})
        started = time.monotonic()
        assert _wait_for_run(prefect_server, second["id"])["state_type"] == "COMPLETED"
        early = time.monotonic() - started
        expect = "nothing changed since MLflow run"
        assert expect in _logs(prefect_server, second["id"], expect)
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=60)

    # MLflow recorded exactly one pipeline run (the second retraining stopped before starting one).
    with sqlite3.connect(tmp_path / "mlruns.db") as db:
        runs = db.execute("select status from runs where name = 'pipeline'").fetchall()
        versions = db.execute("select count(*) from model_versions").fetchone()[0]
    assert runs == [("FINISHED",)]
    assert versions == 1
    print(f"retraining run that stopped early: {early:.1f} s")
