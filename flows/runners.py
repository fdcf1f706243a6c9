"""Where the model stages run: in the flow's process one after another (the default), or on
a Dask cluster, each model's train -> evaluate chain at the same time on its own worker.

The two models' chains share nothing but their inputs, so on a cluster with two workers they
take the time of the slower one instead of the sum. Workers run the same tasks as the flow
would: same cache keys, same Prefect result storage, same MLflow store, and with
`train.deterministic: true` the same bits (`training.seeded_construction` keeps the worker's
other threads out of the models' initial weights). What it needs of the machines: every worker imports this checkout's
code and reads and writes the workspace at the same path as the flow (one host, or a shared
filesystem mounted at one path on all of them), and reaches the Prefect API and the MLflow
store the flow uses (a temporary local Prefect server is on loopback: other hosts need a
real one).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from distributed import WorkerPlugin

from lesionml.errors import ConfigError, LesionMLError

SCHEME = "dask://"


def parse_runner(runner: str | None) -> str | None:
    """`dask://HOST:PORT` -> the scheduler address `tcp://HOST:PORT`; None -> None (sequential)."""
    if runner is None:
        return None
    parts = urlsplit(runner)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "dask" or not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"runner {runner!r}: expected {SCHEME}HOST:PORT, the address of a Dask scheduler")
    return f"tcp://{parts.hostname}:{port}"


class _TrackingStore(WorkerPlugin):
    """Dask worker plugin: the flow's MLflow store for every task on the worker, present or
    joining later (a worker's own environment may name another store, or none)."""

    name = "lesionml-tracking-store"

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def setup(self, worker: Any) -> None:
        os.environ.update(self.env)


@contextlib.contextmanager
def dask_runner(address: str, tracking_env: dict[str, str]) -> Iterator[Any]:
    """A started DaskTaskRunner connected to the scheduler at `address`, its workers told
    which MLflow store the run uses; a scheduler that cannot be reached is one line."""
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=address, client_kwargs={"timeout": "20s"})
    with runner:
        try:
            client = runner.client
        except OSError as exc:
            raise LesionMLError(f"Dask scheduler at {address} cannot be reached ({exc})") from None
        client.register_plugin(_TrackingStore(tracking_env))
        yield runner


def run_each(fn: Callable[[str], None], names: list[str]) -> None:
    """fn(name) for every name at the same time, each in a thread that carries the flow's
    Prefect context (its task runs then belong to this flow run); the first error is raised
    after all have ended, so no chain is abandoned half-way."""
    with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="model-chain") as pool:
        futures = [pool.submit(contextvars.copy_context().run, fn, name) for name in names]
    for future in futures:
        future.result()
