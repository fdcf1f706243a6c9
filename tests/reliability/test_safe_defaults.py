"""Safe defaults, checked on the code itself (parsed with `ast`, never by running a server):

- servers the project starts or documents (README, docs/, bench/) bind 127.0.0.1 unless the
  user says otherwise;
- Keras models load with safe_mode=True, arrays with np.load(..., allow_pickle=False);
- nothing read from disk or network is unpickled or evaluated (no pickle, eval, exec,
  unsafe yaml);
- no secret (credentials in the tracking URI) is logged to MLflow as a param or tag.

Each checker is itself tested on small snippets that break the rule, so a checker that
silently matches nothing cannot pass.
"""

from __future__ import annotations

import ast
import contextlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ROOT, SAMPLE, project_params, write_params

# Everything the project runs: the library, the Prefect tasks and flows, the CLI, and its scripts.
CODE_DIRS = ("lesionml", "tasks", "flows", "cli", "scripts", "bench")
LOOPBACK = "127.0.0.1"


def _project_files() -> list[Path]:
    files = sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20 and ROOT / "cli" / "main.py" in files
    return files


def _doc_files() -> list[Path]:
    """Every page that documents commands: the README, docs/ and bench/."""
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/*.md not found: the scan would check nothing there"
    return [ROOT / "README.md", *pages, *sorted((ROOT / "bench").glob("*.md"))]


# --- a small resolver: which function does each call name? ------------------------------


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name, from every import in the module (including function-level ones)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    names[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _calls(source: str) -> list[tuple[str, ast.Call]]:
    """(resolved dotted name, call) for every call whose callee is a plain name or attribute chain."""
    tree = ast.parse(source)
    aliases = _aliases(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (name := _dotted(node.func)):
            head, _, rest = name.partition(".")
            resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
            out.append((resolved, node))
    return out


def _keyword(call: ast.Call, name: str) -> object:
    """The constant value of keyword `name`, or a marker when absent / not a constant."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ast.unparse(kw.value)
    return "<absent>"


UNSAFE = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "dill.load",
    "dill.loads",
    "cloudpickle.load",
    "cloudpickle.loads",
    "joblib.load",
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "pandas.read_pickle",
    "torch.load",
    "eval",
    "exec",
    "yaml.unsafe_load",
    "yaml.full_load",
    "yaml.unsafe_load_all",
    "keras.config.enable_unsafe_deserialization",
}
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")
# MLflow's pyfunc loader runs the model *code* logged from lesionml/serving_model.py (nothing
# pickled); that code loads the Keras weights with safe_mode=True, which the rule checks.
ALLOWED_LOAD_MODEL = {"mlflow.pyfunc.load_model"}


def _violations(source: str) -> list[str]:
    found = []
    for name, call in _calls(source):
        where = f"line {call.lineno}: {ast.unparse(call)[:100]}"
        last = name.rsplit(".", 1)[-1]
        if name in UNSAFE:
            found.append(f"{where}: {name} runs or unpickles what it reads")
        elif name in ("numpy.load", "numpy.lib.npyio.load") and _keyword(call, "allow_pickle") is not False:
            found.append(f"{where}: np.load without allow_pickle=False")
        elif last == "load_model" and name not in ALLOWED_LOAD_MODEL and _keyword(call, "safe_mode") is not True:
            found.append(f"{where}: load_model without safe_mode=True")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _keyword(call, "Loader")
            if loader == "<absent>" and len(call.args) > 1:
                loader = ast.unparse(call.args[1])
            if not (isinstance(loader, str) and loader.endswith(SAFE_YAML_LOADERS)):
                found.append(f"{where}: yaml.load without a safe Loader")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import numpy as np\nnp.load(path)",
        "import numpy\nnumpy.load(path, allow_pickle=True)",
        "from numpy import load\nload(path, mmap_mode='r')",
        "import keras\nkeras.saving.load_model(path)",
        "import keras\nkeras.models.load_model(path, safe_mode=False)",
        "import tensorflow as tf\ntf.keras.models.load_model(path)",
        "from keras.saving import load_model\nload_model(path, compile=False)",
        "import mlflow\nmlflow.tensorflow.load_model(uri)",
        "import pickle\npickle.loads(data)",
        "def f():\n    from pickle import load as l\n    return l(fh)",
        "import joblib\njoblib.load(path)",
        "import pandas as pd\npd.read_pickle(path)",
        "eval(text)",
        "exec(compile(text, 'x', 'exec'))",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "import keras\nkeras.config.enable_unsafe_deserialization()",
    ],
)
def test_the_checker_catches_each_unsafe_load(snippet):
    assert _violations(snippet), f"not flagged:\n{snippet}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import numpy as np\nnp.load(path, allow_pickle=False)",
        "import keras\nkeras.saving.load_model(path, safe_mode=True)",
        "import mlflow\nmlflow.pyfunc.load_model(uri)",
        "import yaml\nyaml.safe_load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
        "model.evaluate(x)",  # a method named like a builtin is not the builtin
    ],
)
def test_the_checker_accepts_the_safe_forms(snippet):
    assert not _violations(snippet)


def test_no_unsafe_load_anywhere_in_the_project():
    problems = [f"{p.relative_to(ROOT)}: {v}" for p in _project_files() for v in _violations(p.read_text())]
    assert not problems, "\n".join(problems)


def test_the_project_does_load_arrays_and_models_the_safe_way():
    """The rule above is not vacuous: the project has such calls, and they are the safe form."""
    calls = [name for p in _project_files() for name, _ in _calls(p.read_text())]
    assert calls.count("numpy.load") >= 2, "np.load calls moved? update the checker"
    assert "keras.saving.load_model" in calls


# --- servers bind 127.0.0.1 ---------------------------------------------------------------


def test_lesionml_ui_defaults_to_loopback():
    from cli.main import build_parser

    args = build_parser().parse_args(["ui"])
    assert args.host == LOOPBACK
    assert build_parser().parse_args(["ui", "--host", "0.0.0.0"]).host == "0.0.0.0", "the user may choose otherwise"


def test_lesionml_ui_passes_the_host_to_mlflow(tmp_path, monkeypatch, capsys):
    from cli.main import main

    started = []

    class Recorded(contextlib.nullcontext):
        def __init__(self, cmd, *args, **kwargs):
            super().__init__(self)
            started.append(cmd)

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["ui", "--params", str(write_params(tmp_path, SAMPLE))])
    assert done.value.code == 0
    [cmd] = started
    assert cmd[cmd.index("--") - 3 : cmd.index("--") - 1] == ["-m", "lesionml.tether"], "dies with the command"
    assert cmd[cmd.index("ui") - 1 :][:2] == ["mlflow", "ui"]
    assert cmd[cmd.index("--host") + 1] == LOOPBACK
    assert f"http://{LOOPBACK}:5000" in capsys.readouterr().out


SERVER_COMMAND = re.compile(r"\b(mlflow\s+(?:ui|server|models\s+serve)|prefect\s+server\s+start)\b")


def _doc_commands(text: str) -> list[tuple[int, str]]:
    """(line, command) for each server command in a fenced block line or an inline code span."""
    found = []
    for block in re.finditer(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        start = text.count("\n", 0, block.start(1)) + 1
        for k, line in enumerate(block.group(1).replace("\\\n", " ").splitlines()):
            if SERVER_COMMAND.search(line):
                found.append((start + k, line.strip()))
    prose = re.sub(
        r"^```[^\n]*\n.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.DOTALL | re.MULTILINE
    )
    for span in re.finditer(r"`([^`]+)`", prose):
        if SERVER_COMMAND.search(span.group(1)):
            found.append((prose.count("\n", 0, span.start()) + 1, " ".join(span.group(1).split())))
    return found


def test_doc_command_finder_sees_blocks_and_inline_spans():
    text = "x\n```bash\nmlflow ui --port 1\n```\nrun `prefect server\n start` now\n"
    assert _doc_commands(text) == [(3, "mlflow ui --port 1"), (5, "prefect server start")]


def test_documented_server_commands_bind_loopback():
    commands = [
        (doc, line, cmd) for doc in _doc_files() for line, cmd in _doc_commands(doc.read_text(encoding="utf-8"))
    ]
    assert len(commands) >= 3, "docs/ documents mlflow models serve and prefect server start (more than once)"
    missing = [
        f"{doc.relative_to(ROOT)}:{line}: {cmd}"
        for doc, line, cmd in commands
        if not re.search(rf"--host[ =]{re.escape(LOOPBACK)}\b", cmd)
    ]
    assert not missing, "server commands without --host 127.0.0.1:\n" + "\n".join(missing)


def test_nothing_binds_all_interfaces():
    texts = {p: p.read_text(encoding="utf-8") for p in [*_project_files(), *_doc_files(), ROOT / "Makefile"]}
    bad = [
        f"{p.relative_to(ROOT)}:{t.count(chr(10), 0, m.start()) + 1}"
        for p, t in texts.items()
        for m in re.finditer(r"0\.0\.0\.0|PREFECT_SERVER_API_HOST|\[::\]", t)
    ]
    assert not bad, bad


# --- no secret logged to MLflow ------------------------------------------------------------


SECRET = "s3cret-Pa55"


@pytest.mark.parametrize(
    "uri",
    [f"http://alice:{SECRET}@127.0.0.1:5999", f"postgresql://mlflow:{SECRET}@db.internal:5432/mlflow"],
    ids=["http-basic-auth", "database"],
)
def test_tracking_credentials_are_never_logged_as_params(uri, monkeypatch):
    """log_params is what the pipeline run and every model run log their params with."""
    from lesionml import tracking

    logged: list = []

    class Client:
        def log_batch(self, run_id, metrics=(), params=(), tags=()):
            logged.extend([*params, *tags])

    monkeypatch.setattr(tracking, "client", Client)
    params = project_params(f"tracking.uri={uri}")
    tracking.log_params("run", params, {"model.name": "cnn"})
    assert logged, "nothing logged: the fake client is not the one used"
    leaked = sorted(f"{p.key}={p.value}" for p in logged if SECRET in f"{p.key}={p.value}")
    assert not leaked, f"credentials logged to MLflow: {leaked}"
