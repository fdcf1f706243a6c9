"""What every stage task shares: its cache key, its retry rule, and verified cache hits.

Cache key = stage name + the bytes of the stage's code files and the values of its params,
both as lesionml/stage_spec.py declares them (dvc.yaml is generated from the same
declaration) + the content of its inputs (upstream artifacts' sha256). So changing
`split.seed` changes the split key and everything downstream of the new split file, but
never ingest or preprocess; editing lesionml/data/split.py re-runs split too. No absolute
path is in a key, and cached results name their files relative to the workspace: a copy of
the workspace at another path (a second clone) is all cache hits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import Task
from prefect.context import TaskRunContext

from lesionml.errors import LesionMLError
from lesionml.io import Artifact
from lesionml.stage_spec import code_digest, stage_params

# Inputs that are not content: where the workspace is (cached results name files relative to
# it), and the whole params dump (the key takes the stage's declared params from it).
_PLACE_AND_PARAMS = frozenset({"workspace", "params"})


def _content(value: Any) -> Any:
    """An artifact as its sha256 (its bytes, wherever it lives); containers element by element."""
    if isinstance(value, dict):
        if set(value) == {"path", "sha256"}:
            return value["sha256"]
        return {k: _content(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_content(v) for v in value]
    return value


def stage_cache_key(
    stage: str, *, select: Callable[[dict[str, Any]], Any] | None = None, ignore: tuple[str, ...] = ()
) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """Key = `stage` + its declared code's bytes + what defines its result: `select(inputs)`,
    or by default its declared params (for model `name`, if it has one) and every other input
    but `ignore` (inputs that label a result without changing it) as content."""
    code = code_digest(stage)

    def key(ctx: TaskRunContext, inputs: dict[str, Any]) -> str:
        if select:
            kept = select(inputs)
        else:
            kept = {k: _content(v) for k, v in inputs.items() if k not in _PLACE_AND_PARAMS | set(ignore)}
            kept["params"] = stage_params(stage, inputs["params"], inputs.get("name"))
        h = hashlib.sha256(f"{stage}\0{code}\0".encode())
        h.update(json.dumps(kept, sort_keys=True, default=str).encode())
        return f"{stage}-{h.hexdigest()[:32]}"

    return key


def retry_transient(task: Task, task_run: Any, state: Any) -> bool:
    """Retry I/O hiccups; never retry a LesionMLError, which is a verdict on the input,
    unless it says it is `transient` (the tracking server stopped answering: it may be back
    by the retry, and a retried training resumes from its last checkpoint)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, LesionMLError) or getattr(exc, "transient", False)


def as_dicts(artifacts: dict[str, Artifact], workspace: str) -> dict[str, dict[str, str]]:
    """A task's result: each artifact's path relative to the workspace, so a moved workspace's cache still holds."""
    root = Path(workspace)
    return {name: {"path": str(Path(a.path).relative_to(root)), "sha256": a.sha256} for name, a in artifacts.items()}


def run_stage(task: Task, workspace: Path, /, **inputs: Any) -> tuple[dict[str, Artifact], bool]:
    """Run `task`, returning its artifacts (paths in `workspace`) and whether they came from the cache.

    A cache hit is trusted only if every file it names still holds the recorded bytes;
    otherwise (deleted or edited output) the stage is recomputed.
    """
    storage = workspace / ".prefect" / "results"  # a Path: Prefect stores locally, no block needed
    bound = task.with_options(result_storage=storage, persist_result=True, result_serializer="json")

    def artifacts_of(state: Any) -> dict[str, Artifact]:
        return {k: Artifact(str(workspace / v["path"]), v["sha256"]) for k, v in state.result().items()}

    state = bound(**inputs, return_state=True)
    artifacts = artifacts_of(state)
    cached = state.is_completed() and state.name == "Cached"
    if cached and not all(a.is_intact() for a in artifacts.values()):
        state = bound.with_options(refresh_cache=True)(**inputs, return_state=True)
        artifacts = artifacts_of(state)
        cached = False
    return artifacts, cached
