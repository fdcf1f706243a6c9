"""Faults a real run meets, on the real CLI, Prefect, MLflow and Keras (tiny models, sample data).

- kill -9 during preprocessing, training and evaluation: no file a later run trusts is ever
  half-written, training resumes from its last checkpoint, and the run that finishes the
  job produces what an uninterrupted run produces (deterministic training, same seeds);
- the MLflow tracking server going away mid-run: a bounded, one-line failure, a retry of the
  interrupted stage, no registry alias moved (unreachable at start: tests/integration/
  test_data_flow.py::test_unreachable_tracking_server_fails_before_any_work);
- a full disk while writing an output: a one-line error naming the file, previous outputs intact;
- two runs on one workspace: the second is refused, naming the first, which is unharmed.

Runs that get killed are separate processes in their own session, run as `lesionml run` runs
out of the box (Prefect's temporary server is their child), and killed with SIGKILL: the first
kill hits the CLI alone (a scheduler, an OOM killer), after which nothing it started may live
on; the others hit the whole process group (a machine losing power). The other CLI
runs share the test session's Prefect server (tests/conftest.py), which saves each of them the
temporary server's start-up (the Prefect UI set-up of docs/architecture.md).
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.helpers import (
    ROOT,
    SAMPLE,
    build_release,
    free_port,
    sample_metadata,
    start_mlflow_server,
    whole_lesion_rows,
    write_params,
)

pytestmark = pytest.mark.integration


BIN = Path(sys.executable).parent
EPOCHS = 3
DATA_STAGE_FILES = (
    "ingest/manifest.csv",
    "ingest/release.json",
    "preprocess/metadata.csv",
    "preprocess/images.npz",
    "split/split.csv",
    "normalize/stats.json",
    "augment/spec.json",
    "augment/preview.png",
)


def _tiny_sections() -> dict:
    """Small enough for seconds per epoch on 2 busy cores; deterministic so runs compare exactly."""
    models = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["models"]
    models["enabled"] = ["cnn"]
    models["cnn"].update(filters=[8, 16], dense_units=16)
    return {
        "data": {"image_size": [32, 40]},
        "augment": {"preview_images": 3},
        "models": models,
        "train": {"epochs": EPOCHS, "batch_size": 64, "deterministic": True},
        "evaluate": {"bootstrap": 100},
        "registry": {"bootstrap": 100},
    }


def _project(folder: Path, source: Path = SAMPLE, **extra: dict) -> Path:
    sections = _tiny_sections()
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    return write_params(folder, source, **sections)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _snapshot(ws: Path) -> dict[str, str]:
    """sha256 of every file in the workspace but the lock's label (it names the last holder)."""
    return {str(p.relative_to(ws)): _sha(p) for p in sorted(ws.rglob("*")) if p.is_file() and p.name != ".lock"}


def _load_completely(path: Path) -> None:
    """Read `path` the way its consumer does; raises if it is not a whole file of its kind."""
    if path.suffix in (".csv", ".json", ".md"):
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n"), "does not end with a newline"
        if path.suffix == ".json":
            json.loads(text)
        elif path.suffix == ".csv":
            pd.read_csv(path)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                npz[key]
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    elif path.suffix == ".keras":
        import keras

        keras.saving.load_model(path, safe_mode=True)
    else:
        raise AssertionError("a file of a kind this check does not know")


def _incomplete_files(ws: Path) -> list[str]:
    """Every output in the workspace that a later run could read and that is not complete.

    Skipped: temp files (`.name.XXXX.tmp`, hidden, never opened by name: atomic_path renames
    them into place or nobody sees them), the lock's label, and Prefect's own result
    records under .prefect/ (Prefect treats an unreadable record as a cache miss).
    """
    problems = []
    for path in sorted(ws.rglob("*")):
        rel = path.relative_to(ws)
        if not path.is_file() or path.name.startswith(".") or rel.parts[0] == ".prefect":
            continue
        try:
            _load_completely(path)
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            problems.append(f"{rel}: {type(exc).__name__}: {exc}")
    return problems


class Run:
    """`lesionml run` in its own process session; its output (stdout + stderr, split on
    newlines and tqdm's carriage returns) is read as it comes by a thread."""

    live: ClassVar[list[Run]] = []

    def __init__(self, params: Path, *args: str, env: dict[str, str], name: str = "run"):
        cmd = [sys.executable, "-m", "cli.main", "run", "--params", str(params), *args]
        self.log = params.parent / f"{name}.log"  # the whole output, for a post-mortem
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=params.parent
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        Run.live.append(self)

    def _read(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            pending += decoder.decode(chunk)
            *complete, pending = re.split(r"\r\n|\r|\n", pending)
            for line in complete:
                self.lines.append(line)
                self._queue.put(line)
        if pending:
            self.lines.append(pending)
            self._queue.put(pending)
        self.log.write_text(self.output + "\n", encoding="utf-8")
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def wait_for(self, pattern: str, timeout: float = 300) -> str:
        """The next output line matching `pattern`; fails if the run ends or times out first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)  # later waits see the end too
                pytest.fail(
                    f"run ended (exit {self.proc.wait()}) before printing {pattern!r}; output ends:\n{self.tail()}"
                )
            if rx.search(line):
                return line
        pytest.fail(f"no line matching {pattern!r} within {timeout} s; output ends:\n{self.tail()}")

    def kill(self, only_the_cli: bool = False) -> None:
        """SIGKILL to every process of the run at once (the CLI, the tether and Prefect's temporary
        server: a machine losing power), or to the CLI alone (a scheduler, an OOM killer, a lost
        SSH session)."""
        for pid in [self.proc.pid] if only_the_cli else process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        if not only_the_cli:  # else the server, if it outlived the CLI, holds the output pipe open
            self._reader.join(timeout=60)

    def finish(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run did not end within {timeout} s; output ends:\n{self.tail()}")
        self._reader.join(timeout=60)
        self.seconds = time.monotonic() - self.started
        return rc


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live (not zombie) process."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            if fields[0] != "Z":
                found[int(stat.parent.name)] = (int(fields[1]), cmdline)
    return found


def process_tree(root: int) -> dict[int, str]:
    """pid -> command line of `root` and everything it started (servers in sessions of their own too)."""
    table = _processes()
    tree, grew = {root: table[root][1]} if root in table else {}, True
    while grew:
        grew = False
        for pid, (ppid, cmdline) in table.items():
            if ppid in tree and pid not in tree:
                tree[pid], grew = cmdline, True
    return tree


def survivors(tree: dict[int, str], within: float) -> list[str]:
    """Those of `tree` still running (same pid, same command line) after up to `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        table = _processes()
        left = [f"{pid}: {cmd}" for pid, cmd in tree.items() if pid in table and table[pid][1] == cmd]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def _kill_all(lines: list[str]) -> None:
    for line in lines:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)


@pytest.fixture(scope="module", autouse=True)
def _no_stray_processes():
    yield
    for run in Run.live:
        if run.proc.poll() is None:
            run.kill()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def default_env(base) -> dict[str, str]:
    """`lesionml run` out of the box: a temporary Prefect server per process, in a Prefect home
    shared by every run of this module, as one user's ~/.prefect would be."""
    env = {
        **os.environ,
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # each project here names its own store
    env.pop("PREFECT_API_URL", None)
    return env


@pytest.fixture(scope="module")
def server_env(default_env, prefect_server) -> dict[str, str]:
    """CLI runs against the session's Prefect server (PREFECT_API_URL)."""
    return {**default_env, "PREFECT_API_URL": prefect_server}


def _lock_holder(ws: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads((ws / ".lock").read_text())["pid"]
    return None


# ---------------------------------------------------------------------------------------
# The uninterrupted reference run, and a second run started on its workspace meanwhile


@pytest.fixture(scope="module")
def reference(base, server_env):
    """Run A, uninterrupted; run B on the same workspace, started once A holds it."""
    params = _project(base / "reference")
    ws = params.parent / "ws"
    a = Run(params, env=server_env, name="a")
    deadline = time.monotonic() + 300
    while _lock_holder(ws) != a.proc.pid:
        if a.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"run A never took the workspace lock; output ends:\n{a.tail()}")
        time.sleep(0.2)
    b = Run(params, env=server_env, name="b")
    b_rc = b.finish(timeout=300)
    a_running_when_b_ended = a.proc.poll() is None
    a_rc = a.finish(timeout=600)
    return SimpleNamespace(
        params=params, ws=ws, a=a, a_rc=a_rc, b=b, b_rc=b_rc, a_running_when_b_ended=a_running_when_b_ended
    )


def test_a_second_run_on_a_busy_workspace_is_refused_and_the_first_is_unharmed(reference):
    a, b, ws = reference.a, reference.b, reference.ws
    assert reference.a_running_when_b_ended, "B must have met A's lock, not an idle workspace"
    assert reference.b_rc == 3, b.tail()
    assert b.seconds < 120, f"refused only after {b.seconds:.0f} s"
    errors = [line for line in b.lines if line.startswith("lesionml:")]
    assert len(errors) == 1, b.tail()
    assert errors[0].startswith(f"lesionml: error: workspace {ws} is in use by another lesionml run (")
    assert f'"pid": {a.proc.pid}, "run": "pipeline until ' in errors[0]
    assert errors[0].endswith("wait for it to finish or set data.workspace to another folder")
    assert "Traceback (most recent call last)" not in b.output
    assert not any("Task run" in line for line in b.lines), "B must not run a single stage"

    assert reference.a_rc == 0, a.tail()
    assert "stages       ingest (ran), preprocess (ran), split (ran)" in a.output
    assert _incomplete_files(ws) == []
    assert (ws / "train" / "cnn" / "model.keras").is_file() and (ws / "evaluate" / "cnn" / "metrics.json").is_file()
    assert not list(ws.rglob("*.tmp")), "a finished run leaves no temp file behind"


def test_a_lock_held_by_another_process_refuses_the_run_naming_it(base, server_env):
    from lesionml.workspace import Workspace

    params = _project(base / "held")
    ws = params.parent / "ws"
    with Workspace(ws).lock("a test holding the workspace"):
        run = Run(params, "--only", "data", env=server_env)
        rc = run.finish(timeout=300)
    assert rc == 3, run.tail()
    [error] = [line for line in run.lines if line.startswith("lesionml:")]
    assert error.startswith(f"lesionml: error: workspace {ws} is in use by another lesionml run (")
    assert f'"pid": {os.getpid()}' in error and "a test holding the workspace" in error
    assert [p.name for p in ws.iterdir()] == [".lock"], "nothing may be written by a refused run"


# ---------------------------------------------------------------------------------------
# kill -9 during training, then during evaluation, then a run to the end


@pytest.fixture(scope="module")
def killed_twice(base, default_env, server_env):
    """K1 killed after its first epoch; K2 (resumes) killed mid-evaluation; K3 runs to the end."""
    params = _project(base / "killed")
    ws = params.parent / "ws"
    facts = SimpleNamespace(params=params, ws=ws)

    k1 = Run(params, env=default_env, name="k1")
    k1.wait_for(rf"\bepoch\s+1/{EPOCHS}\s+loss")  # printed after the epoch's checkpoint is written
    started = process_tree(k1.proc.pid)  # the CLI, the tether, Prefect's temporary server
    k1.kill(only_the_cli=True)
    facts.k1 = k1
    facts.k1_started = started
    facts.k1_survivors = survivors(started, within=10)
    _kill_all(facts.k1_survivors)
    k1._reader.join(timeout=60)
    facts.after_training_kill = SimpleNamespace(
        incomplete=_incomplete_files(ws),
        checkpoints=sorted(p.relative_to(ws) for p in ws.glob("train/cnn/.work/*/checkpoint.npz")),
        model_written=(ws / "train" / "cnn" / "model.keras").exists(),
        holder=_lock_holder(ws),
    )

    k2 = Run(params, env=default_env, name="k2")
    facts.resumed = k2.wait_for(r"resuming after epoch|\bepoch\s+1/")
    k2.wait_for(r"evaluating cnn on \d+ val and \d+ test images")
    eval_dir = ws / "evaluate" / "cnn"
    deadline = time.monotonic() + 300
    while not (eval_dir.is_dir() and any(not p.name.startswith(".") for p in eval_dir.iterdir())):
        if k2.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"evaluation wrote nothing; output ends:\n{k2.tail()}")
        time.sleep(0.05)
    k2.kill()  # the first figure is written: evaluation is under way, metrics.json comes last
    facts.k2 = k2
    facts.after_evaluation_kill = SimpleNamespace(
        incomplete=_incomplete_files(ws),
        metrics_written=(eval_dir / "metrics.json").exists(),
        figures=sorted(p.name for p in eval_dir.iterdir() if not p.name.startswith(".")),
    )

    k3 = Run(params, env=server_env, name="k3")
    facts.k3_rc = k3.finish(timeout=600)
    facts.k3 = k3
    return facts


def test_kill_during_training_leaves_a_checkpoint_and_no_half_written_file(killed_twice):
    after = killed_twice.after_training_kill
    assert after.incomplete == []
    assert len(after.checkpoints) == 1, "one resumable training state, written whole"
    assert not after.model_written, "the kill landed before training finished"
    assert after.holder == killed_twice.k1.proc.pid, "the label names the dead run; its flock died with it"


def test_a_run_killed_alone_takes_its_temporary_server_with_it(killed_twice):
    assert any("prefect.server.api.server:create_app" in cmd for cmd in killed_twice.k1_started.values())
    assert killed_twice.k1_survivors == [], "still running after `kill -9` of the CLI:\n" + "\n".join(
        killed_twice.k1_survivors
    )


def test_the_next_run_is_not_refused_and_resumes_training_from_the_checkpoint(killed_twice):
    line = killed_twice.resumed
    assert re.search(r"resuming after epoch [1-9]\d* from .*/train/cnn/\.work/\w+/checkpoint\.npz$", line), (
        f"the run after a kill must resume training, not restart it: {line!r}"
    )
    assert "in use by another lesionml run" not in killed_twice.k2.output


def test_kill_during_evaluation_leaves_no_half_written_file(killed_twice):
    after = killed_twice.after_evaluation_kill
    assert after.incomplete == []
    assert after.figures and not after.metrics_written, f"the kill landed mid-evaluation: {after.figures}"


def test_the_run_after_the_kills_ends_as_an_uninterrupted_run(killed_twice, reference):
    import keras

    k3, ws, ref = killed_twice.k3, killed_twice.ws, reference.ws
    assert killed_twice.k3_rc == 0, k3.tail()
    assert "train.cnn (cached), evaluate.cnn (ran)" in k3.output, "training finished in K2; only evaluation re-runs"
    assert _incomplete_files(ws) == []
    for rel in DATA_STAGE_FILES:
        assert _sha(ws / rel) == _sha(ref / rel), f"{rel} differs from the uninterrupted run's"

    mine = keras.saving.load_model(ws / "train" / "cnn" / "model.keras", safe_mode=True).get_weights()
    theirs = keras.saving.load_model(ref / "train" / "cnn" / "model.keras", safe_mode=True).get_weights()
    assert len(mine) == len(theirs)
    for i, (w1, w2) in enumerate(zip(mine, theirs, strict=False)):
        np.testing.assert_array_equal(w1, w2, err_msg=f"weight {i}: resumed training ended elsewhere")
    history = pd.read_csv(ws / "train" / "cnn" / "history.csv").drop(columns="seconds")
    pd.testing.assert_frame_equal(history, pd.read_csv(ref / "train" / "cnn" / "history.csv").drop(columns="seconds"))
    assert list(history.epoch) == list(range(1, EPOCHS + 1)), "every epoch once, across the kill"

    metrics = json.loads((ws / "evaluate" / "cnn" / "metrics.json").read_text())
    assert metrics == json.loads((ref / "evaluate" / "cnn" / "metrics.json").read_text())
    assert _sha(ws / "evaluate" / "cnn" / "predictions.csv") == _sha(ref / "evaluate" / "cnn" / "predictions.csv")
    assert not (ws / "train" / "cnn" / ".work").exists(), "the finished training's checkpoint is cleaned up"


# ---------------------------------------------------------------------------------------
# kill -9 during preprocessing


# One thread, and a target that needs libjpeg-turbo's 4/8 scale (~4,400 images/s on one
# core): at the tiny runs' 32x40 the 2/8 scale decodes the release in about 1 s, too soon
# for the kill to land inside it.
PREPROCESS_KILL_DATA = {"workers": 1, "image_size": [75, 100]}


@pytest.fixture(scope="module")
def big_release(base) -> Path:
    """The sample 24 times over (10,656 images under new ids and lesion ids): preprocessing
    at PREPROCESS_KILL_DATA takes seconds even on an idle machine, long enough to be
    interrupted."""
    dest = base / "big-release"
    dest.mkdir()
    meta = sample_metadata()
    copies = []
    for r in range(24):
        copy = meta.assign(image_id=meta.image_id + f"_r{r}", lesion_id=meta.lesion_id + f"_r{r}")
        for old, new in zip(meta.image_id, copy.image_id, strict=False):
            (dest / f"{new}.jpg").write_bytes((SAMPLE / "images" / f"{old}.jpg").read_bytes())
        copies.append(copy)
    pd.concat(copies).to_csv(dest / "HAM10000_metadata.csv", index=False)
    return dest


def test_kill_during_preprocessing_then_the_next_run_equals_an_uninterrupted_one(
    base, default_env, server_env, big_release
):
    from flows.pipeline import pipeline

    params = _project(base / "preprocess-killed", big_release, data=PREPROCESS_KILL_DATA)
    ws = params.parent / "ws"
    run = Run(params, "--only", "data", env=default_env, name="p1")
    run.wait_for(r"^preprocess:\s+0%")  # tqdm's first line: decoding starts now
    time.sleep(0.3)  # into the decoding, which takes ~2.4 s on an idle Zen 5 core
    run.kill()
    assert not (ws / "preprocess" / "images.npz").exists(), f"the kill landed after preprocessing:\n{run.tail()}"
    assert _incomplete_files(ws) == []

    again = Run(params, "--only", "data", env=server_env, name="p2")
    assert again.finish(timeout=600) == 0, again.tail()
    assert "stages       ingest (cached), preprocess (ran)" in again.output
    assert _incomplete_files(ws) == []

    clean = _project(base / "preprocess-clean", big_release, data=PREPROCESS_KILL_DATA)
    expected = pipeline(params_file=str(clean), until="augment")["artifacts"]
    for rel in DATA_STAGE_FILES:
        key = next(k for k, a in expected.items() if a["path"].endswith(rel))
        assert _sha(ws / rel) == expected[key]["sha256"], f"{rel} differs from the uninterrupted run's"


# ---------------------------------------------------------------------------------------
# Disk full (in-process: the fault is injected by monkeypatching the lowest-level write)


def _no_space(dest) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dest))


@pytest.fixture(scope="module")
def disk_project(base) -> Path:
    """A project whose data stages ran once, completely (in-process)."""
    from cli.main import main

    release = build_release(base / "disk-release", whole_lesion_rows(120), "flat")
    params = _project(base / "disk", release)
    assert main(["run", "--only", "data", "--params", str(params)]) == 0
    return params


def test_disk_full_while_writing_the_split_is_one_error_line_and_nothing_changes(disk_project, monkeypatch, capfd):
    from cli.main import main

    ws = disk_project.parent / "ws"
    before = _snapshot(ws)
    capfd.readouterr()
    real_to_csv = pd.DataFrame.to_csv

    def to_csv(self, path_or_buf=None, *args, **kwargs):
        if isinstance(path_or_buf, (str, Path)) and Path(path_or_buf).parent == ws / "split":
            Path(path_or_buf).write_bytes(b"image_id,lesion_id,dx,spl")  # half a file, then no more space
            raise _no_space(path_or_buf)
        return real_to_csv(self, path_or_buf, *args, **kwargs)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    started = time.monotonic()
    assert main(["run", "--only", "data", "--params", str(disk_project), "--set", "split.seed=7"]) == 1
    assert time.monotonic() - started < 120, "a full disk is not retried"
    err = capfd.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("lesionml:")]
    assert ours == [
        (
            f"lesionml: error: {ws / 'split' / 'split.csv'}: could not be written (No space left on device); "
            "the previous version, if any, is unchanged"
        )
    ], err[-3000:]
    assert "Traceback (most recent call last)" not in err
    after = _snapshot(ws)
    assert {k: v for k, v in after.items() if k in before} == before, "every previous output byte-identical"
    new = set(after) - set(before)
    assert all(k.startswith(".prefect/") for k in new), f"no output, no temp file left, only Prefect's records: {new}"


def test_disk_full_while_writing_a_training_checkpoint_fails_the_run_cleanly(disk_project, monkeypatch, capfd):
    from mlflow import MlflowClient

    from cli.main import main

    ws = disk_project.parent / "ws"
    before = _snapshot(ws)
    capfd.readouterr()
    real_savez = np.savez

    def savez(file, *args, **kwargs):
        name = Path(str(getattr(file, "name", file)))
        if name.is_relative_to(ws / "train"):
            file.write(b"PK\x03\x04 half a checkpoint")
            raise _no_space(name)
        return real_savez(file, *args, **kwargs)

    monkeypatch.setattr(np, "savez", savez)
    assert main(["run", "--params", str(disk_project)]) == 1
    err = capfd.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("lesionml:")]
    assert len(ours) == 1 and re.fullmatch(
        rf"lesionml: error: {re.escape(str(ws))}/train/cnn/\.work/\w+/checkpoint\.npz: could not be written "
        r"\(No space left on device\); the previous version, if any, is unchanged",
        ours[0],
    ), err[-3000:]
    assert "Traceback (most recent call last)" not in err
    after = _snapshot(ws)
    assert {k: v for k, v in after.items() if k in before} == before, "previous outputs byte-identical"
    new = set(after) - set(before)
    assert all(k.startswith(".prefect/") for k in new), f"only cache records of the data stages are new: {new}"
    assert not (ws / "train" / "cnn" / "model.keras").exists() and not list(ws.rglob("*.tmp"))

    params = yaml.safe_load(disk_project.read_text())
    client = MlflowClient(params["tracking"]["uri"])
    runs = client.search_runs([client.get_experiment_by_name(params["tracking"]["experiment"]).experiment_id])
    assert {(r.info.run_name, r.info.status) for r in runs} == {("pipeline", "FAILED"), ("cnn", "FAILED")}
    assert client.search_registered_models() == [], "nothing registered"


# ---------------------------------------------------------------------------------------
# The MLflow tracking server going away mid-run


def test_a_store_that_does_not_answer_is_never_read_as_no_champion(monkeypatch):
    """register() crowns the first model when there is no champion: only the store's own
    "not found" may mean that; a store that stops answering is an error, never "none"."""
    import mlflow
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    from lesionml import tracking

    def refused() -> MlflowException:
        exc = MlflowException("API request to http://127.0.0.1:1/api/2.0/mlflow/registered-models/alias failed")
        exc.__context__ = requests.exceptions.ConnectionError("Max retries exceeded")
        exc.__context__.__context__ = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
        return exc

    class Store:
        def __init__(self, exc: Exception):
            self.exc = exc

        def get_model_version_by_alias(self, name, alias):
            raise self.exc

    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:1")
    for code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
        answer = MlflowException("not found", error_code=getattr(databricks_pb2, code))
        monkeypatch.setattr(tracking, "client", lambda answer=answer: Store(answer))
        assert tracking.alias_version("lesionml", "champion") is None
    denied = MlflowException("no", error_code=databricks_pb2.PERMISSION_DENIED)
    monkeypatch.setattr(tracking, "client", lambda: Store(denied))
    with pytest.raises(MlflowException):
        tracking.alias_version("lesionml", "champion")
    monkeypatch.setattr(tracking, "client", lambda: Store(refused()))
    with pytest.raises(
        tracking.TrackingUnavailable,
        match=re.escape(
            "MLflow tracking store http://127.0.0.1:1 stopped answering during alias_version (Connection refused)"
        ),
    ) as caught:
        tracking.alias_version("lesionml", "champion")
    assert caught.value.transient and caught.value.exit_code == 1


def _stop(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def test_tracking_server_going_away_mid_run_fails_clearly_and_moves_no_alias(base, server_env, start_server):
    from mlflow import MlflowClient

    store = base / "mlflow-server"
    store.mkdir()
    server, url = start_mlflow_server(store, start_server)
    try:
        # An existing champion, as on any server that has seen a run before.
        client = MlflowClient(url)
        seed = client.create_run(client.create_experiment("earlier"))
        client.log_text(seed.info.run_id, "an earlier model", "model/MLmodel")
        client.create_registered_model("lesionml")
        v1 = client.create_model_version("lesionml", f"{seed.info.artifact_uri}/model", seed.info.run_id)
        client.set_registered_model_alias("lesionml", "champion", v1.version)

        params = _project(base / "outage")
        run = Run(params, "--set", f"tracking.uri={url}", env=server_env)
        run.wait_for(rf"\bepoch\s+1/{EPOCHS}\s+loss")
        _stop(server)
        gone = time.monotonic()
        rc = run.finish(timeout=600)
        seconds = time.monotonic() - gone
    finally:
        _stop(server)

    assert rc == 1, run.tail()
    assert seconds < 180, f"the run took {seconds:.0f} s to give up on a dead tracking server"
    errors = [line for line in run.lines if line.startswith("lesionml:")]
    assert len(errors) == 1, run.tail()
    assert re.fullmatch(
        rf"lesionml: error: MLflow tracking store {re.escape(url)} stopped answering during \w+ \(Connection refused\); "
        r"this run did not finish: start the server \(or fix MLFLOW_TRACKING_URI / tracking.uri\) and run again, "
        r"finished stages are reused",
        errors[0],
    ), errors[0]
    assert "Traceback (most recent call last)" not in run.output, run.tail(80)
    assert re.search(
        r"Task run 'train-\w+' - Task run failed with exception: TrackingUnavailable.* - Retry 1/1 will start",
        run.output,
    ), "the interrupted training is retried once"
    ws = params.parent / "ws"
    assert len(list(ws.glob("train/cnn/.work/*/checkpoint.npz"))) == 1, "the next run resumes where this one stopped"
    assert _incomplete_files(ws) == []

    # The server's own store, read directly: what a restarted server would serve.
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    aliases = {alias: str(version) for alias, version in client.get_registered_model("lesionml").aliases.items()}
    assert aliases == {"champion": v1.version}, "no alias moved"
    assert [str(v.version) for v in client.search_model_versions("name = 'lesionml'")] == [v1.version], "no new version"


# ---------------------------------------------------------------------------------------
# `lesionml ui` sent SIGTERM


def test_ui_sent_sigterm_leaves_no_server_running(base, default_env):
    params = _project(base / "ui")
    port = free_port()
    ui = subprocess.Popen(
        [str(BIN / "lesionml"), "ui", "--params", str(params), "--port", str(port)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=default_env,
    )
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert ui.poll() is None and time.monotonic() < deadline, "the MLflow UI never answered"
                time.sleep(0.5)
        started = process_tree(ui.pid)
        assert sum("uvicorn" in cmd for cmd in started.values()) == 1, started  # mlflow ui's server, its grandchild
        ui.send_signal(signal.SIGTERM)
        ui.wait(timeout=30)
        left = survivors(started, within=10)
        assert left == [], "still running 10 s after SIGTERM to `lesionml ui`:\n" + "\n".join(left)
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        _kill_all(survivors(started or process_tree(ui.pid), within=0))
