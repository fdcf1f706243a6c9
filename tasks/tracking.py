"""The tracking-store check as a Prefect task, so an unattended run rides out a brief outage."""

from __future__ import annotations

from prefect import task
from prefect.tasks import exponential_backoff

from lesionml import tracking
from lesionml.config import TrackingConfig


@task(
    name="connect-tracking",
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
)
def connect(cfg: dict) -> str:
    """Experiment id of the store; retried with backoff (5, 10, 20, 40 s) while it is unreachable.

    Unlike the pipeline's own fail-fast check (a person is waiting), a scheduled run has
    nobody to restart it: a server restarting at 03:00 should delay it, not fail it.
    """
    return tracking.connect(TrackingConfig(**cfg))
