"""Prefect servers: a real one (PREFECT_API_URL) for a pipeline run and the scheduled-retraining
deployment served by `lesionml schedule`; and the temporary server the CLI launches itself
when none is configured (flows/local_api.py), which must hold every record and log line of
the run and be gone when the CLI exits."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import SAMPLE, write_params

from flows.local_api import LocalAPI
from lesionml.errors import LesionMLError

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


def test_cli_launches_its_own_temporary_server_and_stops_it_after_the_last_log_line(tmp_path):
    params = write_params(tmp_path, SAMPLE)
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([str(BIN / "lesionml"), "run", "--only", "data", "--params", str(params)],
                          env=env, capture_output=True, text=True, timeout=300)
    out = done.stderr + done.stdout
    assert done.returncode == 0, out[-2000:]
    assert "Starting temporary server" not in out  # Prefect did not start a second one of its own
    assert "Error logging to API" not in out and "Traceback" not in out, out[-2000:]
    port = int(out.split("temporary server on http://127.0.0.1:", 1)[1].split()[0])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the temporary server outlived the CLI"

    with sqlite3.connect(home / "prefect.db") as db:
        runs = db.execute("select id, state_type from flow_run").fetchall()
        tasks = db.execute("select count(*) from task_run where state_type = 'COMPLETED'").fetchone()[0]
        logs = [m for (m,) in db.execute("select message from log where flow_run_id = ?", (runs[0][0],))]
    assert [state for _, state in runs] == ["COMPLETED"]
    assert tasks == 5  # ingest, preprocess, split, normalize, augment
    assert any("Finished in state Completed" in m for m in logs), logs  # the flow's last lines reached it


def test_an_api_url_from_the_active_profile_wins_over_the_temporary_server(prefect_server, tmp_path):
    params = write_params(tmp_path, SAMPLE)
    profiles = tmp_path / "profiles.toml"
    profiles.write_text(f'active = "remote"\n\n[profiles.remote]\nPREFECT_API_URL = "{prefect_server}"\n')
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "client-home"), "PREFECT_PROFILES_PATH": str(profiles)}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([str(BIN / "lesionml"), "run", "--only", "data", "--params", str(params)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "temporary server" not in (done.stderr + done.stdout).lower()
    runs = [r for r in _api(prefect_server, "/flow_runs/filter") if r["parameters"].get("params_file") == str(params)]
    assert [run["state_type"] for run in runs] == ["COMPLETED"]


def test_a_temporary_server_that_cannot_start_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/missing/dir/prefect.db")
    api = LocalAPI()
    try:
        with pytest.raises(LesionMLError, match=r"temporary server \(port \d+\) exited with code 3 before it was ready"):
            api.wait(timeout=120)
    finally:
        api.stop()
    assert api.process is None


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
