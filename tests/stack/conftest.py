"""One service stack for the session, started and stopped by `lesionml stack up | down`.

The fixture drives the product's own command rather than a fixture library's PostgreSQL
(pytest-postgresql): what the tests must prove is that `stack up` initialises and starts
PostgreSQL as the `postgres` user, creates the databases and starts the servers and the
worker on it, so a second way of starting PostgreSQL would only test itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import LESIONML, SAMPLE, TINY, free_port, write_params

QUIET = {
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


@dataclass(frozen=True)
class Stack:
    folder: Path  # the stack folder (--dir)
    checkout: Path  # where `stack up` ran: the worker's working directory, holding params.yaml
    mlflow: str
    prefect: str  # API URL
    postgres_port: int

    def env(self) -> dict[str, str]:
        """A client's environment: what `stack up` tells the user to export."""
        return {**os.environ, **QUIET, "MLFLOW_TRACKING_URI": self.mlflow, "PREFECT_API_URL": self.prefect}

    def lesionml(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
        return subprocess.run(
            [LESIONML, *args],
            cwd=self.checkout,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def database_url(self, database: str, password: str | None = None) -> str:
        password = password or (self.folder / "postgres" / "password").read_text().strip()
        return f"postgresql://lesionml:{password}@127.0.0.1:{self.postgres_port}/{database}"


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    # Not under pytest's tmp folder: that is mode 0700, and PostgreSQL runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="lesionml-stack-"))
    root.chmod(0o755)
    checkout = root / "checkout"
    write_params(checkout, SAMPLE, **TINY)
    ports = {"mlflow": free_port(), "prefect": free_port(), "postgres": free_port()}
    up = subprocess.run(
        [
            LESIONML,
            "stack",
            "up",
            "--dir",
            str(root / "stack"),
            "--mlflow-port",
            str(ports["mlflow"]),
            "--prefect-port",
            str(ports["prefect"]),
            "--postgres-port",
            str(ports["postgres"]),
        ],
        cwd=checkout,
        env={**os.environ, **QUIET},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    stack = Stack(
        folder=root / "stack",
        checkout=checkout,
        mlflow=f"http://127.0.0.1:{ports['mlflow']}",
        prefect=f"http://127.0.0.1:{ports['prefect']}/api",
        postgres_port=ports["postgres"],
    )
    try:
        if up.returncode != 0:
            pytest.fail(f"lesionml stack up failed:\n{up.stdout}\n{up.stderr}")
        assert f"export PREFECT_API_URL={stack.prefect}" in up.stdout, up.stdout
        assert f"export MLFLOW_TRACKING_URI={stack.mlflow}" in up.stdout, up.stdout
        yield stack
    finally:
        down = stack.lesionml("stack", "down", "--dir", str(stack.folder))
        shutil.rmtree(root, ignore_errors=True)
    assert down.returncode == 0, down.stderr
