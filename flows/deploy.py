"""The retraining deployment on a process work pool: the server's scheduler creates the runs,
any worker polling the pool executes them.

Made with `retrain.to_deployment(..., entrypoint_type=MODULE_PATH).apply()` rather than a
`prefect.yaml` read by `prefect deploy`, because:
- the schedule (cron, timezone) lives in params.yaml, the project's one config source; a
  prefect.yaml would repeat it, and `lesionml schedule` would have to rewrite that file;
- the flow is imported by module path (`flows.retrain.retrain`) from the lesionml package
  installed beside each worker, so the deployment has no pull step and no storage: nothing
  in it names a folder of the machine that deployed it;
- the run starts in the worker's working directory (`working_dir: "."`), and `params_file`
  is relative to it, so a worker on any host with the checkout (at any path) and the data
  runs the same deployment.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.workers.process import ProcessWorker

from flows.retrain import retrain
from lesionml.errors import LesionMLError

DESCRIPTION = "Re-ingest the configured release; retrain, evaluate and register unless nothing changed."


def ensure_process_pool(name: str) -> bool:
    """Create the process work pool `name` if it is missing; True if it was created."""
    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                ),
                overwrite=False,
            )
            return True
    if pool.type != "process":
        raise LesionMLError(
            f"work pool '{name}' exists with type '{pool.type}', not 'process': pick another with --pool "
            "(lesionml deploys to process pools; see docs/team-stack.md for other pool types)"
        )
    return False


def deploy_retrain(name: str, pool: str, schedule: Any, params_file: str, overrides: list[str]) -> UUID:
    """Create or update `lesionml-retrain/<name>` on `pool`; its id.

    At most one run at a time (runs share one workspace); a firing while one runs is
    cancelled rather than queued: the running one already retrains on the newest data, and
    queued firings would pile up behind a long training only to stop early one by one.
    """
    ensure_process_pool(pool)
    deployment = retrain.to_deployment(
        name=name,
        schedules=[schedule],
        parameters={"params_file": params_file, "overrides": overrides},
        description=DESCRIPTION,
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW),
        work_pool_name=pool,
        job_variables={"working_dir": "."},
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    deployment._path = None  # the module path is the whole address of the code
    return deployment.apply(work_pool_name=pool)
