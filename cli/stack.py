"""`lesionml stack up | down | status`: the team services on one machine.

PostgreSQL (in a folder of its own, unless --database-url / LESIONML_DATABASE_URL names a
server), the MLflow tracking server on it with proxied artifacts, the Prefect server on it,
and one process worker polling the `lesionml` work pool from the checkout `stack up` runs in.
Everything binds 127.0.0.1 unless --host says otherwise; each service logs to
<stack folder>/logs, and <stack folder>/stack.json records what runs (pids, ports, URLs) for
`down` and `status`. See docs/team-stack.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from lesionml import io
from lesionml.errors import LesionMLError

PG_BIN = Path(os.environ.get("LESIONML_PG_BIN", "/usr/lib/postgresql/15/bin"))
DATABASES = {"mlflow": "lesionml_mlflow", "prefect": "lesionml_prefect"}
SERVICES = ("mlflow", "prefect", "worker")  # started in this order, stopped in reverse
NAMES = {"postgres": "PostgreSQL", "mlflow": "MLflow server", "prefect": "Prefect server", "worker": "worker"}
# Imported by every `lesionml` command (the parser): nothing heavy at module level.
QUIET = {  # no usage reports from any of the services
    "DO_NOT_TRACK": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}
STARTUP_SECONDS = 240  # a Prefect server can take 30 s to answer health on a busy 2-core machine


def add_parser(sub: argparse._SubParsersAction) -> None:
    stack = sub.add_parser("stack", help="start, stop or inspect the team services on this machine")
    actions = stack.add_subparsers(dest="action", required=True, metavar="ACTION")
    up = actions.add_parser("up", help="start PostgreSQL, the MLflow and Prefect servers and a worker")
    down = actions.add_parser("down", help="stop the stack's services")
    status = actions.add_parser("status", help="which of the stack's services run")
    for p in (up, down, status):
        p.add_argument("--dir", default=".stack", help="the stack folder: state, logs, databases (default: .stack)")
    up.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the MLflow and Prefect servers bind (default 127.0.0.1; anything else exposes them)",
    )
    up.add_argument("--mlflow-port", type=int, default=5000, help="(default 5000)")
    up.add_argument("--prefect-port", type=int, default=4200, help="(default 4200)")
    up.add_argument("--postgres-port", type=int, default=5433, help="for the stack's own PostgreSQL (default 5433)")
    up.add_argument(
        "--database-url",
        default=os.environ.get("LESIONML_DATABASE_URL"),
        help="postgresql://USER:PASSWORD@HOST:PORT/DB of a server to use instead of the stack's own "
        "(default: $LESIONML_DATABASE_URL); the databases lesionml_mlflow and lesionml_prefect are created in it",
    )
    up.add_argument("--pool", default="lesionml", help="the work pool the worker polls (default: lesionml)")


def stack(args: argparse.Namespace) -> None:
    folder = Path(args.dir).resolve()
    {"up": up, "down": down, "status": status}[args.action](args, folder)


# ---------------------------------------------------------------------------------------
# Processes


def _alive(pid: int | None) -> bool:
    """The process exists and is not a zombie (a server whose parent, `stack up`, is gone
    is reaped by init; until then /proc still lists it)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _stop(*pids: int, seconds: float = 30) -> None:
    """SIGTERM the process groups together, SIGKILL those that outlive `seconds`."""
    for sig, wait in ((signal.SIGTERM, seconds), (signal.SIGKILL, 10)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        pids = tuple(pid for pid in pids if _alive(pid))
        if not pids:
            return


def _answers(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200
    return False


def _last_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else "(empty)"
    return "(no log)"


def _launch(argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> int:
    """Start a service in its own session (one signal stops it and what it forks), detached
    from this command; its output goes to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        ).pid


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------------------------------
# PostgreSQL


def _as_postgres(argv: list[str]) -> list[str]:
    """initdb and pg_ctl refuse to run as root: as root, run them as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _pg(argv: list[str], what: str, log: Path) -> None:
    done = subprocess.run(_as_postgres(argv), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        message = " ".join(line.strip() for line in (done.stderr or done.stdout).strip().splitlines())
        raise LesionMLError(f"PostgreSQL {what} failed: {message[-300:] or done.returncode} (see {log})")


def _start_postgres(folder: Path, port: int, log: Path) -> str:
    """Initialise (first time) and start the stack's own PostgreSQL; its admin URL.

    The cluster accepts only password (SCRAM) logins over TCP on 127.0.0.1; the password is
    generated once and kept in <stack folder>/postgres/password, readable by its owner only.
    """
    if not (PG_BIN / "pg_ctl").exists():
        raise LesionMLError(
            f"PostgreSQL binaries not found in {PG_BIN} (set LESIONML_PG_BIN), or give a server with --database-url"
        )
    home, data = folder / "postgres", folder / "postgres" / "data"
    secret = home / "password"
    root = os.geteuid() == 0
    if not (data / "PG_VERSION").exists():
        home.mkdir(parents=True, exist_ok=True)
        home.chmod(0o700)
        io.write_text(secret, secrets.token_urlsafe(24))
        secret.chmod(0o600)
        if root:
            shutil.chown(home, "postgres", "postgres")
            shutil.chown(secret, "postgres", "postgres")
            probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-x", str(home)], check=False)
            if probe.returncode != 0:
                raise LesionMLError(
                    f"PostgreSQL runs as user postgres, which cannot enter {home}: "
                    "put the stack folder (--dir) where that user can reach it, or give --database-url"
                )
        _pg(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "lesionml",
                f"--pwfile={secret}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "-E",
                "UTF8",
            ],
            "initdb",
            log,
        )
    log.touch()
    if root:
        shutil.chown(log, "postgres", "postgres")  # pg_ctl's server writes it as that user
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {data}"
    _pg(
        [str(PG_BIN / "pg_ctl"), "start", "-D", str(data), "-l", str(log), "-w", "-t", "120", "-o", options],
        "start",
        log,
    )
    password = secret.read_text().strip()
    return f"postgresql://lesionml:{password}@127.0.0.1:{port}/postgres"


def _stop_postgres(data: Path) -> None:
    if (data / "postmaster.pid").exists():
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "stop", "-D", str(data), "-m", "fast", "-w", "-t", "60"]),
            capture_output=True,
            check=False,
        )


def _database_urls(admin_url: str) -> dict[str, str]:
    """Check the server answers and takes the credentials; create the two databases if missing.

    One line for each way this usually fails: nothing listening, a wrong password or user, no
    right to create databases.
    """
    import psycopg2
    from psycopg2 import sql

    from lesionml.tracking import redact

    parts = urlsplit(admin_url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise LesionMLError(f"database URL {redact(admin_url)}: expected postgresql://USER:PASSWORD@HOST:PORT/DB")
    try:
        conn = psycopg2.connect(admin_url, connect_timeout=10)
    except psycopg2.Error as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        reason = next((line for line in lines if "FATAL" in line), lines[0] if lines else type(exc).__name__)
        raise LesionMLError(
            f"database {redact(admin_url)} cannot be used: {redact(reason)}; check the URL "
            "(--database-url / LESIONML_DATABASE_URL), that the server runs and the password"
        ) from None
    conn.autocommit = True
    urls = {}
    try:
        with conn.cursor() as cur:
            for service, name in DATABASES.items():
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    try:
                        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    except psycopg2.Error as exc:
                        raise LesionMLError(
                            f"database {name} is missing on {redact(admin_url)} and cannot be created "
                            f"({str(exc).strip().splitlines()[0]}): create it, or grant CREATEDB"
                        ) from None
                urls[service] = urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        conn.close()
    return urls


def _driver(url: str, driver: str) -> str:
    return url.replace("postgresql://", f"postgresql+{driver}://", 1).replace(
        "postgres://", f"postgresql+{driver}://", 1
    )


# ---------------------------------------------------------------------------------------
# State


def _state_file(folder: Path) -> Path:
    return folder / "stack.json"


def _read_state(folder: Path) -> dict | None:
    path = _state_file(folder)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LesionMLError(f"{path} is unreadable ({exc}): stop the services by hand and delete it") from None


def _write_state(folder: Path, state: dict) -> None:
    io.write_json(_state_file(folder), state)


def _running(state: dict) -> dict[str, int]:
    running = {name: state[name]["pid"] for name in SERVICES if name in state and _alive(state[name]["pid"])}
    data = state.get("postgres", {}).get("data")
    if data and (Path(data) / "postmaster.pid").exists():
        with contextlib.suppress(OSError, ValueError):
            pid = int((Path(data) / "postmaster.pid").read_text().split()[0])
            if _alive(pid):
                running["postgres"] = pid
    return running


# ---------------------------------------------------------------------------------------
# Commands


def up(args: argparse.Namespace, folder: Path) -> None:
    from lesionml.tracking import redact  # credentials in a --database-url are never printed

    state = _read_state(folder)
    if state and (running := _running(state)):
        which = ", ".join(f"{NAMES[n]} (pid {p})" for n, p in running.items())
        raise LesionMLError(
            f"a stack already runs from {folder}: {which}; `lesionml stack down --dir {args.dir}` stops it"
        )
    managed = not args.database_url
    ports = {"mlflow": (args.host, args.mlflow_port), "prefect": (args.host, args.prefect_port)}
    if managed:
        ports["postgres"] = ("127.0.0.1", args.postgres_port)
    for name, (host, port) in ports.items():
        if not _port_free(host, port):
            option = f"--{name}-port"
            raise LesionMLError(
                f"port {port} on {host} for the {NAMES[name]} is already taken: stop what holds it or choose "
                f"another with {option}"
            )
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        folder.chmod(0o755)  # PostgreSQL runs as `postgres` and must enter the folder
        logs.chmod(0o755)
    state = {"host": args.host, "pool": args.pool, "postgres": {"managed": managed}}
    started: list[int] = []
    try:
        if managed:
            data = folder / "postgres" / "data"
            state["postgres"].update(data=str(data), port=args.postgres_port)
            admin = _start_postgres(folder, args.postgres_port, logs / "postgres.log")
        else:
            admin = args.database_url
        urls = _database_urls(admin)
        base = {**os.environ, **QUIET}
        base.pop("PREFECT_API_URL", None)
        base.pop("MLFLOW_TRACKING_URI", None)
        bin_dir = Path(sys.executable).parent
        mlflow_url = f"http://{_client_host(args.host)}:{args.mlflow_port}"
        prefect_url = f"http://{_client_host(args.host)}:{args.prefect_port}"
        (folder / "mlflow-artifacts").mkdir(exist_ok=True)
        mlflow_argv = [
            str(bin_dir / "mlflow"),
            "server",
            "--backend-store-uri",
            _driver(urls["mlflow"], "psycopg2"),
            "--serve-artifacts",
            "--artifacts-destination",
            str(folder / "mlflow-artifacts"),
            "--host",
            args.host,
            "--port",
            str(args.mlflow_port),
            "--workers",
            "1",
        ]
        mlflow_env = {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        pid = _launch(mlflow_argv, mlflow_env, logs / "mlflow.log")
        started.append(pid)
        state["mlflow"] = {"pid": pid, "url": mlflow_url, "health": f"{mlflow_url}/health"}
        prefect_env = {
            **base,
            "PREFECT_HOME": str(folder / "prefect-home"),
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": _driver(urls["prefect"], "asyncpg"),
        }
        prefect_argv = [
            str(bin_dir / "prefect"),
            "server",
            "start",
            "--host",
            args.host,
            "--port",
            str(args.prefect_port),
        ]
        pid = _launch(prefect_argv, prefect_env, logs / "prefect.log")
        started.append(pid)
        state["prefect"] = {"pid": pid, "url": prefect_url, "health": f"{prefect_url}/api/health"}
        _write_state(folder, state)
        for name in ("mlflow", "prefect"):
            _wait_healthy(name, state[name], logs / f"{name}.log")
        worker_env = {
            **base,
            "PREFECT_HOME": str(folder / "prefect-home"),
            "PREFECT_API_URL": f"{prefect_url}/api",
            "MLFLOW_TRACKING_URI": mlflow_url,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            # The worker's log is the operator's record of what ran; the runs' prints reach the API.
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        worker_argv = [str(bin_dir / "prefect"), "worker", "start", "--pool", args.pool, "--type", "process"]
        pid = _launch(worker_argv, worker_env, logs / "worker.log", cwd=Path.cwd())
        started.append(pid)
        state["worker"] = {"pid": pid, "cwd": str(Path.cwd())}
        _write_state(folder, state)
        _wait_worker(f"{prefect_url}/api", args.pool, pid, logs / "worker.log")
    except BaseException:
        _stop(*started)
        if managed and "data" in state["postgres"]:
            _stop_postgres(Path(state["postgres"]["data"]))
        _state_file(folder).unlink(missing_ok=True)
        raise
    env = {"MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": f"{prefect_url}/api"}
    io.write_text(folder / "env", "".join(f"export {k}={v}\n" for k, v in env.items()))
    where = f"own, in {state['postgres']['data']}" if managed else redact(admin)
    print(f"stack up in {folder} (logs in {logs})")
    print(f"  PostgreSQL   {where}")
    print(f"  MLflow UI    {mlflow_url}")
    print(f"  Prefect UI   {prefect_url}")
    print(f"  worker       pool '{args.pool}', runs flows in {Path.cwd()}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"  note: the MLflow and Prefect servers listen on {args.host}, reachable beyond this machine")
    print("export these (or `source " + str(folder / "env") + "`):")
    for key, value in env.items():
        print(f"  export {key}={value}")
    print("then `lesionml schedule` deploys scheduled retraining to the pool; `lesionml stack down` stops it all")


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host` (all interfaces: loopback)."""
    try:
        unspecified = not host or ipaddress.ip_address(host).is_unspecified
    except ValueError:  # a host name
        unspecified = False
    return "127.0.0.1" if unspecified else host


def _wait_healthy(name: str, service: dict, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while not _answers(service["health"]):
        if not _alive(service["pid"]):
            raise LesionMLError(f"the {NAMES[name]} exited while starting: {_last_line(log)} (see {log})")
        if time.monotonic() > deadline:
            raise LesionMLError(f"the {NAMES[name]} did not answer within {STARTUP_SECONDS} s (see {log})")
        time.sleep(0.5)


def _wait_worker(api: str, pool: str, pid: int, log: Path) -> None:
    """Until the worker has registered with the pool: only then can a scheduled run start."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        request = urllib.request.Request(
            f"{api}/work_pools/{pool}/workers/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(request, timeout=10) as response:
            if any(w["status"] == "ONLINE" for w in json.loads(response.read())):
                return
        if not _alive(pid):
            raise LesionMLError(f"the worker exited while starting: {_last_line(log)} (see {log})")
        if time.monotonic() > deadline:
            raise LesionMLError(f"the worker did not join pool '{pool}' within {STARTUP_SECONDS} s (see {log})")
        time.sleep(1)


def down(args: argparse.Namespace, folder: Path) -> None:
    state = _read_state(folder)
    if state is None:
        raise LesionMLError(f"no stack in {folder} (no stack.json): nothing to stop")
    # The worker first, so it does not try to reach servers that are going away; then both servers.
    for names in (("worker",), ("mlflow", "prefect")):
        running = [name for name in names if name in state and _alive(state[name]["pid"])]
        _stop(*(state[name]["pid"] for name in running))
        for name in running:
            print(f"stopped {NAMES[name]} (pid {state[name]['pid']})")
    data = state.get("postgres", {}).get("data")
    if data and (Path(data) / "postmaster.pid").exists():
        _stop_postgres(Path(data))
        print(f"stopped PostgreSQL ({data}; its data stays for the next `stack up`)")
    _state_file(folder).unlink(missing_ok=True)
    (folder / "env").unlink(missing_ok=True)


def status(args: argparse.Namespace, folder: Path) -> None:
    """One line per service; a stack that is only partly up (a service stopped, or a server
    whose process lives but does not answer) is an error naming what is wrong."""
    state = _read_state(folder)
    if state is None:
        print(f"no stack in {folder}")
        return
    running = _running(state)
    problems = {}
    for name in ("postgres", *SERVICES):
        if name == "postgres" and not state["postgres"].get("managed"):
            print(f"  {NAMES[name]:<15} external")
            continue
        if name not in running:
            problems[name] = "stopped"
            print(f"  {NAMES[name]:<15} not running")
            continue
        service = state.get(name, {})
        health = service.get("health")
        answer = ""
        if health:
            answer = " answers" if _answers(health) else " does not answer"
            if answer == " does not answer":
                problems[name] = "does not answer"
        where = service.get("url") or service.get("cwd") or state["postgres"].get("data")
        print(f"  {NAMES[name]:<15} pid {running[name]:<7} {where}{answer}")
    if problems and running:
        logs = folder / "logs"
        which = ", ".join(
            f"the {NAMES[n]} {problem} ({logs / (n + '.log')}: {_last_line(logs / (n + '.log'))})"
            for n, problem in problems.items()
        )
        worker = (
            " while the worker runs: scheduled runs cannot start"
            if "prefect" in problems and "worker" in running
            else ""
        )
        raise LesionMLError(
            f"stack in {folder} is only partly up: {which}{worker}; "
            f"`lesionml stack down --dir {args.dir}` then `up` restarts it"
        )
