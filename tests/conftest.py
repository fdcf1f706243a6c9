"""Shared test set-up: an isolated Prefect home, real sample data, releases built in temp dirs.

Nothing here imports prefect, tensorflow or lesionml at module level: the environment set
in `pytest_configure` must be in place before the first of them is imported (Prefect reads
its settings, TensorFlow its log level, once at import time).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import METADATA, SAMPLE, build_release, free_port, whole_lesion_rows, write_params


@pytest.hookimpl(trylast=True)  # after pytest's tmpdir plugin has set up tmp_path_factory
def pytest_configure(config: pytest.Config) -> None:
    factory = getattr(config, "_tmp_path_factory", None)
    home = factory.mktemp("prefect-home", numbered=True) if factory else Path(tempfile.mkdtemp(prefix="prefect-home-"))
    # A private Prefect home: its temporary server's database and any profile live here,
    # never in ~/.prefect, so a developer's own Prefect state cannot leak into the tests.
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # Prefect's default 20 s for its temporary server to come up is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    # A non-empty PREFECT_API_URL is a deliberate choice (run the tests against that
    # server): keep it. An empty one is not; without it Prefect starts a temporary server.
    if not os.environ.get("PREFECT_API_URL", "").strip():
        os.environ.pop("PREFECT_API_URL", None)


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled sample release (data/sample: CSV + images/), read-only."""
    assert (SAMPLE / METADATA).is_file() and (SAMPLE / "images").is_dir(), f"bundled sample missing at {SAMPLE}"
    return SAMPLE


@pytest.fixture
def make_release(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_release(n=40, layout="flat", rows=None, name=None) -> release folder.

    Copies `n` real sample images (whole lesions, every class) or exactly `rows`, with
    their CSV rows, into tmp_path/<name> in the chosen layout.
    """

    def make(n: int = 40, layout: str = "flat", rows: pd.DataFrame | None = None, name: str | None = None) -> Path:
        rows = whole_lesion_rows(n) if rows is None else rows
        return build_release(tmp_path / (name or f"release-{layout}"), rows, layout)

    return make


@pytest.fixture
def params_file(tmp_path: Path) -> Callable[..., Path]:
    """Factory: params_file(source, name="project", **sections) -> a params.yaml under tmp_path.

    Workspace and tracking store are under the same temp folder, never in the repo.
    """

    def make(source: Path = SAMPLE, name: str = "project", **sections: dict) -> Path:
        return write_params(tmp_path / name, Path(source), **sections)

    return make


ServerStarter = Callable[[list[str], str, dict[str, str], Path], tuple[subprocess.Popen, str]]


@pytest.fixture(scope="session")
def start_server() -> Iterator[ServerStarter]:
    """Start a server command on a free loopback port; return once it answers its health check.

    `start(argv, health_path, env, log)` puts the port where `argv` or a value of `env` says
    `{port}` and returns the process and its base URL. The server runs in its own process
    group, so one signal stops it and any worker it forks, and writes to `log`, whose end is
    the failure message if it does not come up. Servers still running at the end of the
    session are stopped; a test may stop one sooner (a server going away is what some of
    them test).
    """
    started: list[subprocess.Popen] = []

    def start(argv: list[str], health_path: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log, "ab") as out:  # the child holds its own copy of the descriptor
            proc = subprocess.Popen(
                [arg.format(port=port) for arg in argv],
                env={k: v.replace("{port}", str(port)) for k, v in env.items()},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(proc)
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(url + health_path, timeout=2) as response:
                if response.status == 200:
                    return proc, url
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop_group(proc, signal.SIGKILL)  # not left running, half up, for the rest of the session
                pytest.fail(f"{Path(argv[0]).name} did not come up on {url}:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)

    yield start
    for proc in started:
        _stop_group(proc, signal.SIGTERM)


def _stop_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory, start_server) -> str:
    """A real `prefect server start` on a free loopback port for the session; its API URL.

    Shared by the tests that need a real server (deployments, schedules), by those that
    run many CLI processes (each would otherwise start its own temporary server), and by the
    browser tests of its UI, which is on: the UI is told the port, which `--port` alone
    does not do (it would call the API on the default 4200).
    """
    home = tmp_path_factory.mktemp("prefect-server-home")
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_API_URL": "http://127.0.0.1:{port}/api",
    }
    env.pop("PREFECT_API_URL", None)
    argv = [
        str(Path(sys.executable).parent / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
    ]
    _, url = start_server(argv, "/api/health", env, home / "server.log")
    return f"{url}/api"
