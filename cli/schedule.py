"""`lesionml schedule`: the retraining deployment on the Prefect server named by PREFECT_API_URL.

By default the deployment goes to a process work pool and `prefect worker start --pool
lesionml`, run in a checkout on any machine, executes its runs (flows/deploy.py). `--serve`
keeps the single-process way for a laptop: this command serves the flow itself until Ctrl-C.
"""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from pathlib import Path

from lesionml.config import load_params
from lesionml.errors import LesionMLError
from lesionml.tracking import redact


def checkout_relative(params: Path) -> str:
    """`params` as the worker will open it: relative to this (the checkout's) folder when it lies
    inside, so workers whose checkout sits at another path find their own copy; else absolute."""
    path = params.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def prefect_api() -> str:
    """The configured Prefect API URL, checked to answer: a one-line error instead of a stack of
    connection retries when the server is down or the URL is wrong."""
    from prefect.settings import get_current_settings

    api = get_current_settings().api.url
    if not api:
        raise LesionMLError(
            "scheduling needs a running Prefect server: `lesionml stack up` starts one (or `prefect server start "
            "--host 127.0.0.1`); then export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=30) as response:
            if response.status == 200:
                return api
            reason = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        reason = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = str(getattr(exc, "reason", exc))
    raise LesionMLError(
        f"the Prefect server at {redact(api)} does not answer ({reason}): start it (`lesionml stack up`) "
        "or fix PREFECT_API_URL"
    )


def schedule(args: argparse.Namespace) -> None:
    params = load_params(args.params, args.overrides)
    from cli.main import _quiet_environment

    _quiet_environment()
    from prefect.schedules import Cron, Interval

    api = prefect_api()
    if args.interval is not None:
        if args.interval < 10:
            raise LesionMLError(f"--interval {args.interval}: fire at most every 10 seconds")
        when, every = Interval(args.interval, timezone=params.schedule.timezone), f"every {args.interval} s"
    else:
        cron = args.cron or params.schedule.cron
        try:
            when = Cron(cron, timezone=params.schedule.timezone)
        except ValueError as exc:
            raise LesionMLError(f"cron schedule '{cron}' is invalid: {exc}") from None
        every = f"cron '{cron}' ({params.schedule.timezone})"
    if args.serve:
        from flows.deploy import DESCRIPTION
        from flows.retrain import retrain

        print(
            f"deployment lesionml-retrain/{args.name} on {api}: {every}; Ctrl-C stops serving (the schedule is paused)",
            flush=True,
        )
        retrain.serve(
            name=args.name,
            schedules=[when],
            parameters={"params_file": str(Path(args.params).resolve()), "overrides": list(args.overrides)},
            description=DESCRIPTION,
            limit=1,  # one retraining at a time: a run that outlasts the interval is not overlapped
            print_starting_message=False,
        )
        return
    from flows.deploy import deploy_retrain

    params_file = checkout_relative(Path(args.params))
    deployment_id = deploy_retrain(args.name, args.pool, when, params_file, list(args.overrides))
    print(
        f"deployment lesionml-retrain/{args.name} ({deployment_id}) on {api}: {every}, work pool '{args.pool}', "
        f"params {params_file}\nruns start when a worker polls the pool: `prefect worker start --pool {args.pool}` "
        "in a checkout with the data (`lesionml stack up` starts one)"
    )
