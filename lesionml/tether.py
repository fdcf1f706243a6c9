"""Run a server that dies with the process that started it, however that process ends.

`kill -9`, an OOM kill or a lost SSH session ends a process without running its exit
handlers, so a server it started (Prefect's temporary API, `mlflow ui`) is re-parented to
PID 1 and keeps its port, its database handle and its memory until someone kills it by
hand. A tether sits between the two: it starts the server in a process group of its own and
ends that whole group (the server and whatever it started, such as `mlflow ui`'s uvicorn)
as soon as its own parent is gone, or when it is asked to stop. It watches its parent by
polling instead of relying on Linux's parent-death signal, so it works the same on macOS.

    python -m lesionml.tether PARENT_PID -- COMMAND [ARG ...]

It exits with the server's exit code (128 + N for a server ended by signal N).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.2  # how soon a dead parent is noticed
GRACE_SECONDS = 5.0  # how long the server may take to stop before it is killed


def tethered(command: list[str]) -> list[str]:
    """`command` wrapped so that it ends with the calling process."""
    return [sys.executable, "-m", "lesionml.tether", str(os.getpid()), "--", *command]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed user: still there
        return True
    return True


def _stop(server: subprocess.Popen[bytes], signum: int) -> None:
    """Signal the server's whole group, wait for the server, then kill what is left of the group."""
    with_signal = signal.SIGTERM if signum == signal.SIGHUP else signum
    try:
        os.killpg(server.pid, with_signal)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + GRACE_SECONDS
    try:
        server.wait(timeout=GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    while _group_alive(server.pid) and time.monotonic() < deadline:  # its own children, now orphans
        time.sleep(0.05)
    if _group_alive(server.pid):
        os.killpg(server.pid, signal.SIGKILL)
    server.wait()


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m lesionml.tether PARENT_PID -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    parent = int(argv[0])
    asked: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda n, _frame: asked.append(n))
    server = subprocess.Popen(argv[2:], start_new_session=True)
    while True:
        try:
            code = server.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            if asked or os.getppid() != parent:  # asked to stop, or re-parented: the parent is gone
                _stop(server, asked[0] if asked else signal.SIGTERM)
                code = server.returncode
            else:
                continue
        if _group_alive(server.pid):  # the server left children behind
            _stop(server, signal.SIGTERM)
        return 128 - code if code < 0 else code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
