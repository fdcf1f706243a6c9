"""What every stage task shares: its cache key, its retry rule, and verified cache hits.

Cache key = task name + the source of the task and of the library modules doing the work
+ the task's inputs (upstream artifacts' sha256, the params section it reads). So changing
`split.seed` changes the split key and everything downstream of the new split file, but
never ingest or preprocess; editing lesionml/data/split.py re-runs split too.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from prefect import Task
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.task_runners import TaskRunner

from lesionml.errors import LesionMLError
from lesionml.io import Artifact

# Inputs that change how a stage runs but not what it produces.
NOT_IN_KEY = frozenset({"workers"})


def stage_cache_key(
    *code: ModuleType | Callable[..., Any], select: Callable[[dict[str, Any]], dict[str, Any]] | None = None
) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """Key = task + the source of `code` (whole modules, or single functions where a module
    holds several stages, so that editing one stage never invalidates its neighbours) +
    the inputs `select` picks (default: all but NOT_IN_KEY)."""
    digest = hashlib.sha256()
    for obj in code:
        digest.update(inspect.getsource(obj).encode())
    code_digest = digest.hexdigest()

    def key(ctx: TaskRunContext, inputs: dict[str, Any]) -> str:
        h = hashlib.sha256()
        h.update(ctx.task.name.encode())
        h.update(inspect.getsource(ctx.task.fn).encode())
        h.update(code_digest.encode())
        kept = select(inputs) if select else {k: v for k, v in inputs.items() if k not in NOT_IN_KEY}
        h.update(json.dumps(kept, sort_keys=True, default=str).encode())
        return f"{ctx.task.name}-{h.hexdigest()[:32]}"

    return key


def retry_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups; never retry a LesionMLError, which is a verdict on the input,
    unless it says it is `transient` (the tracking server stopped answering: it may be back
    by the retry, and a retried training resumes from its last checkpoint)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, LesionMLError) or getattr(exc, "transient", False)


def as_dicts(artifacts: dict[str, Artifact]) -> dict[str, dict[str, str]]:
    return {name: a.to_dict() for name, a in artifacts.items()}


def _final_state(task: Task, task_runner: TaskRunner | None, inputs: dict[str, Any]) -> State:
    """Run the task here, or on `task_runner` (another process, maybe another host) and wait."""
    if task_runner is None:
        return task(**inputs, return_state=True)
    future = task_runner.submit(task, parameters=inputs)
    future.wait()
    if not future.state.is_final():
        future.wrapped_future.result()  # raises what the runner knows (a lost worker, a dropped connection)
    return future.state


def run_stage(
    task: Task, workspace: Path, task_runner: TaskRunner | None = None, /, **inputs: Any
) -> tuple[dict[str, Artifact], bool]:
    """Run `task` (here, or on `task_runner`), returning its artifacts and whether they came from the cache.

    A cache hit is trusted only if every file it names still holds the recorded bytes;
    otherwise (deleted or edited output) the stage is recomputed.
    """
    storage = workspace / ".prefect" / "results"  # a Path: Prefect stores locally, no block needed
    bound = task.with_options(result_storage=storage, persist_result=True, result_serializer="json")
    state = _final_state(bound, task_runner, inputs)
    artifacts = {k: Artifact(**v) for k, v in state.result().items()}
    cached = state.is_completed() and state.name == "Cached"
    if cached and not all(a.is_intact() for a in artifacts.values()):
        state = _final_state(bound.with_options(refresh_cache=True), task_runner, inputs)
        artifacts = {k: Artifact(**v) for k, v in state.result().items()}
        cached = False
    return artifacts, cached
