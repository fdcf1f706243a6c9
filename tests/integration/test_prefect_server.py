"""Prefect servers: a real one (PREFECT_API_URL) for a pipeline run and the scheduled-retraining
deployment served by `lesionml schedule`; and the temporary server the CLI launches itself
when none is configured (flows/local_api.py), which must hold every record and log line of
the run and be gone when the CLI exits."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from flows.local_api import LocalAPI
from lesionml.errors import LesionMLError
from tests.helpers import SAMPLE, TINY, auto_scheduled_runs, flow_run_logs, prefect_api, write_params

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _client_env(server: str, tmp_path: Path) -> dict:
    return {**os.environ, "PREFECT_API_URL": server, "PREFECT_HOME": str(tmp_path / "client-home")}


def test_data_flow_runs_against_a_real_server(prefect_server, tmp_path):
    params = write_params(tmp_path, SAMPLE)
    done = subprocess.run(
        [str(BIN / "lesionml"), "run", "--only", "data", "--params", str(params)],
        env=_client_env(prefect_server, tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Starting temporary server" not in done.stderr + done.stdout

    runs = [
        r for r in prefect_api(prefect_server, "/flow_runs/filter") if r["parameters"].get("params_file") == str(params)
    ]
    assert [run["state_type"] for run in runs] == ["COMPLETED"]
    tasks = prefect_api(prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
    assert {t["name"].rsplit("-", 1)[0] for t in tasks} == {"ingest", "preprocess", "split", "normalize", "augment"}


def test_cli_launches_its_own_temporary_server_and_stops_it_after_the_last_log_line(tmp_path):
    params = write_params(tmp_path, SAMPLE)
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [str(BIN / "lesionml"), "run", "--only", "data", "--params", str(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
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
    done = subprocess.run(
        [str(BIN / "lesionml"), "run", "--only", "data", "--params", str(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "temporary server" not in (done.stderr + done.stdout).lower()
    runs = [
        r for r in prefect_api(prefect_server, "/flow_runs/filter") if r["parameters"].get("params_file") == str(params)
    ]
    assert [run["state_type"] for run in runs] == ["COMPLETED"]


def test_a_temporary_server_that_cannot_start_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.setenv(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/missing/dir/prefect.db"
    )
    api = LocalAPI()
    try:
        with pytest.raises(
            LesionMLError, match=r"temporary server \(port \d+\) exited with code 3 before it was ready"
        ):
            api.wait(timeout=120)
    finally:
        api.stop()
    assert api.process is None


def _wait_for_finished_auto_runs(
    server: str, deployment_id: str, n: int, serve: subprocess.Popen, log: Path, timeout: float = 600
) -> list[dict]:
    """Wait, touching nothing, until the scheduler's first `n` runs have finished."""
    deadline = time.monotonic() + timeout
    while True:
        runs = auto_scheduled_runs(server, deployment_id)[:n]
        if len(runs) == n and all(r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for r in runs):
            return runs
        if serve.poll() is not None or time.monotonic() > deadline:
            states = [(r["name"], r["state_name"]) for r in runs]
            pytest.fail(f"the scheduler's first {n} runs did not finish (have {states}):\n{log.read_text()[-3000:]}")
        time.sleep(1)


def test_the_servers_own_scheduler_fires_the_deployment_which_retrains_then_stops_early(prefect_server, tmp_path):
    """No run is created by hand: the Prefect server's scheduler makes them from the schedule."""
    params = write_params(tmp_path, SAMPLE, **TINY)
    served_log = tmp_path / "serve.log"  # a file, not a pipe: nobody drains a pipe while the test waits
    interval = 20
    with served_log.open("w") as out:
        serve = subprocess.Popen(
            [str(BIN / "lesionml"), "schedule", "--serve", "--interval", str(interval), "--params", str(params)],
            env={
                **_client_env(prefect_server, tmp_path),
                "PREFECT_LOGGING_LEVEL": "INFO",
            },  # the runs' prints reach the API
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None:
            found = prefect_api(
                prefect_server, "/deployments/filter", {"deployments": {"name": {"any_": ["scheduled"]}}}
            )
            deployment = found[0] if found else None
            if serve.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no deployment was served:\n{served_log.read_text()[-3000:]}")
            time.sleep(1)
        [schedule] = deployment["schedules"]
        assert schedule["schedule"]["interval"] == interval and schedule["active"]
        assert deployment["parameters"]["params_file"] == str(params)

        first, second = _wait_for_finished_auto_runs(prefect_server, deployment["id"], 2, serve, served_log)
        # Read before the serving process goes: a run's last log batch may still be on its way.
        retrained = flow_run_logs(prefect_server, first["id"], "retraining: no successful run has identity")
        stopped_early = flow_run_logs(prefect_server, second["id"], "nothing changed since MLflow run")
    finally:
        os.killpg(serve.pid, 15)
        serve.wait(timeout=60)
        if deployment:  # its ~100 runs scheduled ahead go too: the session's server is shared
            prefect_api(prefect_server, f"/deployments/{deployment['id']}", method="DELETE")

    created = datetime.fromisoformat(deployment["created"])
    anchor = datetime.fromisoformat(schedule["schedule"]["anchor_date"])
    for run in (first, second):
        assert run["state_type"] == "COMPLETED", flow_run_logs(prefect_server, run["id"])[-3000:]
        expected = datetime.fromisoformat(run["expected_start_time"])
        assert expected >= created, (expected, created)  # a tick of this deployment's schedule, not a backfill
        assert (expected - anchor).total_seconds() % interval == 0, (expected, anchor)
        # Executed by the serving process (`lesionml schedule`): the run's own log lines are in its output.
        assert f"/runs/flow-run/{run['id']}" in served_log.read_text()
    assert "retraining: no successful run has identity" in retrained
    assert "nothing changed since MLflow run" in stopped_early
    early = (datetime.fromisoformat(second["end_time"]) - datetime.fromisoformat(second["start_time"])).total_seconds()

    # MLflow recorded exactly one pipeline run (the second retraining stopped before starting one).
    with sqlite3.connect(tmp_path / "mlruns.db") as db:
        runs = db.execute("select status from runs where name = 'pipeline'").fetchall()
        versions = db.execute("select count(*) from model_versions").fetchone()[0]
    assert runs == [("FINISHED",)]
    assert versions == 1
    print(f"retraining run that stopped early: {early:.1f} s")
