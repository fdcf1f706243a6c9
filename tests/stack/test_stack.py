"""The team stack for real: PostgreSQL, the MLflow server and the Prefect server on it, and a
process worker, all started by `lesionml stack up` (tests/stack/conftest.py).

The end-to-end test creates no run by hand: the Prefect server's scheduler creates them from
the deployment `lesionml schedule` made, and the stack's worker executes them. The bad-setup
tests come after it; the last one stops the shared stack's Prefect server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from datetime import datetime
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.helpers import LESIONML, auto_scheduled_runs, flow_run_logs, free_port, prefect_api

pytestmark = pytest.mark.integration
INTERVAL = 20
FINISHED = ("COMPLETED", "FAILED", "CRASHED")


def _one_line_error(done, expect: str) -> None:
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lesionml: error: "), done.stderr
    assert expect in lines[0], lines[0]


def _finished_runs(stack, deployment_id: str, n: int, timeout: float = 420) -> list[dict]:
    """The first `n` scheduled runs that finished, waiting without touching anything; firings
    the deployment's concurrency limit cancelled (one was still running) are skipped."""
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in auto_scheduled_runs(stack.prefect, deployment_id) if r["state_type"] != "CANCELLED"]
        done = [r for r in runs if r["state_type"] in FINISHED]
        if len(done) >= n and all(r["state_type"] in FINISHED for r in runs[:n]):
            return runs[:n]
        if time.monotonic() > deadline:
            worker = (stack.folder / "logs" / "worker.log").read_text()[-3000:]
            pytest.fail(f"no {n} finished scheduled runs: {[(r['name'], r['state_name']) for r in runs[:n]]}\n{worker}")
        time.sleep(1)


def _mlflow_db(stack) -> dict:
    """What the MLflow server stored in PostgreSQL: pipeline runs, their model runs, versions, aliases."""
    with psycopg.connect(stack.database_url("lesionml_mlflow")) as db:
        pipelines = db.execute("select run_uuid, status from runs where name = 'pipeline'").fetchall()
        models = db.execute(
            "select r.name, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key = 'mlflow.parentRunId'"
        ).fetchall()
        versions = db.execute("select version from model_versions order by version").fetchall()
        aliases = dict(db.execute("select alias, version from registered_model_aliases").fetchall())
        location = db.execute("select artifact_location from experiments where name = 'lesionml'").fetchone()[0]
    return {"pipelines": pipelines, "models": models, "versions": versions, "aliases": aliases, "location": location}


def test_the_scheduler_fires_retraining_the_worker_runs_it_and_mlflow_on_postgresql_keeps_it(stack):
    done = stack.lesionml("schedule", "--interval", str(INTERVAL), "--params", "params.yaml")
    assert done.returncode == 0, done.stderr
    [deployment] = prefect_api(stack.prefect, "/deployments/filter", {"deployments": {"name": {"any_": ["scheduled"]}}})
    try:
        # Nothing in the deployment names this checkout's path: a worker elsewhere runs it from its own.
        assert deployment["parameters"]["params_file"] == "params.yaml"
        assert deployment["entrypoint"] == "flows.retrain.retrain" and not deployment["pull_steps"]
        assert deployment["path"] is None and deployment["job_variables"] == {"working_dir": "."}
        assert deployment["work_pool_name"] == "lesionml"
        assert deployment["global_concurrency_limit"]["limit"] == 1
        [schedule] = deployment["schedules"]
        assert schedule["schedule"]["interval"] == INTERVAL and schedule["active"]

        first, *_ = _finished_runs(stack, deployment["id"], 1)
        after_first = _mlflow_db(stack)
        first, second = _finished_runs(stack, deployment["id"], 2)
    finally:  # no more firings for the tests that follow
        prefect_api(stack.prefect, f"/deployments/{deployment['id']}", method="DELETE")

    created = datetime.fromisoformat(deployment["created"])
    anchor = datetime.fromisoformat(schedule["schedule"]["anchor_date"])
    [worker] = prefect_api(stack.prefect, "/work_pools/lesionml/workers/filter")
    worker_log = (stack.folder / "logs" / "worker.log").read_text()
    for run in (first, second):
        assert run["state_type"] == "COMPLETED", flow_run_logs(stack.prefect, run["id"])[-3000:]
        assert run["auto_scheduled"]
        expected = datetime.fromisoformat(run["expected_start_time"])
        assert expected >= created and (expected - anchor).total_seconds() % INTERVAL == 0, (expected, anchor)
        # Executed by the stack's worker, from the pool: its log names the run it submitted.
        assert run["work_pool_name"] == "lesionml"
        assert f"Worker '{worker['name']}' submitting flow run '{run['id']}'" in worker_log
    expect = "retraining: no successful run has identity"
    assert expect in flow_run_logs(stack.prefect, first["id"], expect)
    expect = "nothing changed since MLflow run"
    assert expect in flow_run_logs(stack.prefect, second["id"], expect)

    # MLflow on PostgreSQL: one pipeline run and its model run, a registered version with the
    # champion alias, artifacts stored through the server; the second firing added none of it.
    stored = _mlflow_db(stack)
    [(pipeline, status)] = stored["pipelines"]
    assert status == "FINISHED"
    assert stored["models"] == [("cnn", pipeline)]
    [(version,)] = stored["versions"]
    assert stored["aliases"]["champion"] == version
    assert stored["location"].startswith("mlflow-artifacts:")
    assert any((stack.folder / "mlflow-artifacts").rglob("MLmodel")), "the server stored no model artifacts"
    assert stored == after_first

    def seconds(run: dict, start: str, end: str) -> float:
        return (datetime.fromisoformat(run[end]) - datetime.fromisoformat(run[start])).total_seconds()

    print(
        f"\nfiring to start: {seconds(first, 'expected_start_time', 'start_time'):.1f} s, "
        f"{seconds(second, 'expected_start_time', 'start_time'):.1f} s; retraining run "
        f"{seconds(first, 'start_time', 'end_time'):.1f} s; no-change run {seconds(second, 'start_time', 'end_time'):.1f} s"
    )


def test_stack_up_twice_is_a_one_line_error(stack):
    done = stack.lesionml("stack", "up", "--dir", str(stack.folder))
    _one_line_error(done, f"a stack already runs from {stack.folder}")


def test_a_taken_port_is_a_one_line_error_and_starts_nothing(stack, tmp_path):
    port = int(stack.mlflow.rsplit(":", 1)[1])
    done = stack.lesionml("stack", "up", "--dir", str(tmp_path / "other"), "--mlflow-port", str(port))
    _one_line_error(done, f"port {port} on 127.0.0.1 for the MLflow server is already taken")
    assert not (tmp_path / "other" / "stack.json").exists()


@pytest.mark.parametrize("problem", ["wrong password", "nothing listens"])
def test_an_unusable_database_is_a_one_line_error(stack, tmp_path, problem):
    if problem == "wrong password":
        url, expect = stack.database_url("postgres", password="not-the-password"), "password authentication failed"
    else:
        url, expect = f"postgresql://lesionml:x@127.0.0.1:{free_port()}/postgres", "Connection refused"
    ports = ["--mlflow-port", str(free_port()), "--prefect-port", str(free_port())]
    done = stack.lesionml("stack", "up", "--dir", str(tmp_path / "other"), "--database-url", url, *ports)
    _one_line_error(done, expect)
    assert "not-the-password" not in done.stderr  # credentials are redacted
    assert not (tmp_path / "other" / "stack.json").exists()


def test_the_prefect_server_down_while_the_worker_runs_is_a_one_line_error(stack):
    """Last: it stops the session's Prefect server (the fixture's `stack down` copes)."""
    state = json.loads((stack.folder / "stack.json").read_text())
    os.killpg(state["prefect"]["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", urlsplit(stack.prefect).port)) != 0:
                break
        assert time.monotonic() < deadline, "the Prefect server did not stop"
        time.sleep(0.5)
    done = stack.lesionml("stack", "status", "--dir", str(stack.folder))
    _one_line_error(done, "the Prefect server")
    assert "while the worker runs" in done.stderr
    assert "MLflow server" in done.stdout and "answers" in done.stdout  # the rest is reported, line by line
    done = stack.lesionml("schedule", "--params", "params.yaml")
    _one_line_error(done, f"the Prefect server at {stack.prefect} does not answer")


def test_stopping_a_stack_that_is_not_there_is_a_one_line_error(tmp_path):
    done = subprocess.run(
        [LESIONML, "stack", "down", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    _one_line_error(done, f"no stack in {tmp_path}")
