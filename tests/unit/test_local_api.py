"""flows/local_api.py starts Prefect's temporary server itself, by copying the command and the
private switches (PREFECT__SERVER_EPHEMERAL, ...) of Prefect's SubprocessASGIServer. A Prefect
upgrade that changes either must fail here, loudly, not make the CLI's server subtly different."""

from __future__ import annotations

import subprocess

from flows import local_api


def test_the_launched_server_is_exactly_prefects_own_temporary_server(monkeypatch):
    from prefect.server.api import server

    seen: dict = {}
    popen = subprocess.Popen

    def record(args, env=None, **kwargs):  # what Prefect would start, instead of starting it
        seen.update(args=list(args), env=dict(env or {}))
        return popen(["true"])

    monkeypatch.setattr(server.subprocess, "Popen", record)
    prefects = server.SubprocessASGIServer(port=43210)
    try:
        prefects._run_uvicorn_command()
    finally:
        server.SubprocessASGIServer._instances.pop(43210, None)  # a per-port singleton
    assert seen["args"] == local_api.server_command(43210)
    switches = {k: v for k, v in seen["env"].items() if k.startswith(("PREFECT__", "PREFECT_UI_ENABLED"))}
    assert switches == local_api.SERVER_SWITCHES
    assert local_api.server_env().items() >= local_api.SERVER_SWITCHES.items()


def test_prefects_server_app_still_reads_the_private_switches():
    """The switches work only because create_app reads them from the environment."""
    import inspect

    from prefect.server.api import server

    source = inspect.getsource(server.create_app)
    for key in local_api.SERVER_SWITCHES:
        if key.startswith("PREFECT__"):
            assert f'os.getenv("{key}")' in source, f"Prefect's create_app no longer reads {key}"
