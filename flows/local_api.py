"""Prefect's temporary API server, launched as the CLI starts instead of when a flow first asks.

With no API URL configured, Prefect starts a temporary server (its own API app, uvicorn, the
database in PREFECT_HOME) the moment a flow first needs a client: it imports its whole server
module (FastAPI, SQLAlchemy: seconds) into the CLI's process just to launch a child, then waits
for the child to boot (seconds more), while this process does nothing. In a run where every
stage is a verified cache hit that wait is most of the wall time. Launched here, before Prefect
is even imported, the child boots on the other core while this process imports the flows, and
this process never imports the server module at all.

The child is the same command, app and settings as Prefect's own temporary server
(`prefect.server.api.server.SubprocessASGIServer`), so the runs land in the same database and
the Prefect UI of a later `prefect server start` shows them. That copy relies on Prefect's
private switches (PREFECT__SERVER_EPHEMERAL, PREFECT__SERVER_FINAL): tests/unit/test_local_api.py
compares it with what Prefect's own launcher would start and fails on any difference after an
upgrade. Nothing here imports Prefect at module level: `launch()` must cost milliseconds.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from lesionml.errors import LesionMLError
from lesionml.tether import GRACE_SECONDS, tethered

_STARTUP_FAILED = 3  # uvicorn's exit code when it could not bind its port (or the app failed to start)


# Prefect's private switches for the server it launches itself (SubprocessASGIServer): no UI,
# and "I am the temporary server". tests/unit/test_local_api.py fails when Prefect changes them.
SERVER_SWITCHES = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def server_command(port: int) -> list[str]:
    """The command line of Prefect's own temporary server, on `port`."""
    app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent  # site-packages, as Prefect's own
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
            "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]  # fmt: skip


def server_env() -> dict[str, str]:
    return {**os.environ, **SERVER_SWITCHES}


class LocalAPI:
    """One temporary server process: launched at once, waited for only when a flow needs it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.ready = False
        self._launch()
        # Registered before Prefect starts any of its services: atexit runs handlers last-in
        # first-out, and Prefect drains its log and event workers even earlier (at thread
        # shutdown), so the server stops only after the last log line has reached it.
        atexit.register(self.stop)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _launch(self) -> None:
        with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        # Tethered: a `kill -9` of this process (which skips `stop`) must not leave the server running.
        command = tethered(server_command(self.port))
        self.process = subprocess.Popen(command, env=server_env(), stdin=subprocess.DEVNULL)

    def wait(self, timeout: float) -> str:
        """Block until the launched (not stopped) server answers its health check; its API URL."""
        assert self.process is not None, "wait() on a stopped server"
        deadline = time.monotonic() + timeout
        relaunches = 1
        while not self.ready:
            code = self.process.poll()
            if code == _STARTUP_FAILED and relaunches:  # most likely the port, taken since we chose it
                relaunches -= 1
                self._launch()
                continue
            if code is not None:
                raise LesionMLError(
                    f"Prefect's temporary server (port {self.port}) exited with code {code} before it was ready; "
                    "its output is above. Start a server with `prefect server start` and set PREFECT_API_URL to use it"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    self.ready = response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if not self.ready:
                if time.monotonic() > deadline:
                    self.stop()
                    raise LesionMLError(
                        f"Prefect's temporary server did not answer on port {self.port} within {timeout:.0f} s "
                        "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); a busy machine may need more"
                    )
                time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        if self.process is None:
            return
        process, self.process, self.ready = self.process, None, False
        process.terminate()  # the tether stops the server, then exits
        try:
            process.wait(timeout=GRACE_SECONDS + 5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_launched: LocalAPI | None = None


def launch() -> None:
    """Start booting the temporary server, unless the environment names a server to use.

    Once per process: in-process callers (tests calling the CLI's main() many times) share it.
    A profile that sets an API URL is only visible once Prefect is imported; `serving()` then
    stops the server unused.
    """
    global _launched
    if os.environ.get("PREFECT_API_URL", "").strip() or (_launched and _launched.alive):
        return
    _launched = LocalAPI()


@contextlib.contextmanager
def serving() -> Iterator[None]:
    """Point Prefect at the launched server, for flows run inside this block.

    Does nothing where Prefect would not start a temporary server itself: an API URL from the
    environment or the active profile, or the temporary server turned off (then Prefect's own
    error about the missing URL stands).
    """
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    settings = get_current_settings()
    if _launched is None or _launched.process is None or settings.api.url or not settings.server.ephemeral.enabled:
        if _launched is not None:
            _launched.stop()
        yield
        return
    url = _launched.wait(settings.server.ephemeral.startup_timeout_seconds)
    print(
        f"Prefect: temporary server on {url.removesuffix('/api')} for this command "
        "(set PREFECT_API_URL to use a running one)",
        file=sys.stderr,
        flush=True,
    )
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield
