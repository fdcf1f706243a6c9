"""The data stages as a real Prefect flow on real sample images: what runs, what is a
verified cache hit, what a param change re-runs; and the CLI around it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cli.main import main
from flows.pipeline import pipeline
from lesionml.config import load_params
from lesionml.data.source import build_manifest, release_fingerprint
from tests.helpers import SAMPLE, build_release, whole_lesion_rows, write_params

pytestmark = pytest.mark.integration
STAGES = ("ingest", "preprocess", "split", "normalize", "augment")


def _run(params: Path, *overrides: str) -> dict:
    return pipeline(params_file=str(params), overrides=list(overrides), until="augment")


def _cached(*hits: bool) -> dict[str, bool]:
    return dict(zip(STAGES, hits, strict=True))


def _sha(result: dict, artifact: str) -> str:
    return result["artifacts"][artifact]["sha256"]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """About 120 real sample images (whole lesions, every class), as the official part folders."""
    rows = whole_lesion_rows(120)
    assert rows.groupby("dx").lesion_id.nunique().min() >= 3, "every class must be splittable"
    return build_release(tmp_path_factory.mktemp("data-flow") / "release", rows, "parts")


@pytest.fixture(scope="module")
def project(release, tmp_path_factory) -> Path:
    return write_params(tmp_path_factory.mktemp("project"), release, augment={"preview_images": 3})


def test_cache_hits_param_changes_and_deleted_outputs(project, release):
    first = _run(project)
    assert first["cached"] == _cached(False, False, False, False, False), "a fresh workspace runs every stage"
    workspace = Path(first["workspace"])
    assert workspace == project.parent / "ws"
    for name, art in first["artifacts"].items():
        assert Path(art["path"]).is_file() and Path(art["path"]).is_relative_to(workspace), name
    stored = json.loads(Path(first["artifacts"]["ingest.release"]["path"]).read_text())
    assert stored["fingerprint"] == release_fingerprint(build_manifest(release, 10**9))
    assert stored["images"] == len(pd.read_csv(release / "HAM10000_metadata.csv"))

    second = _run(project)
    assert second["cached"] == _cached(True, True, True, True, True), "nothing changed: every stage is a cache hit"
    assert second["artifacts"] == first["artifacts"]

    # A split param re-runs split and what reads the split file, never ingest or preprocess.
    reseeded = _run(project, "split.seed=7")
    assert reseeded["cached"] == _cached(True, True, False, False, False)
    assert _sha(reseeded, "split.split") != _sha(first, "split.split")
    assert _sha(reseeded, "preprocess.images") == _sha(first, "preprocess.images")
    assert _run(project, "split.seed=7")["cached"] == _cached(True, True, True, True, True)

    # A cache hit whose output file is gone is not trusted: split re-runs and rewrites it.
    split_csv = Path(reseeded["artifacts"]["split.split"]["path"])
    split_csv.unlink()
    rerun = _run(project, "split.seed=7")
    assert rerun["cached"]["split"] is False
    assert rerun["cached"] == _cached(True, True, False, True, True), "same split bytes: downstream stays cached"
    assert split_csv.is_file() and _sha(rerun, "split.split") == _sha(reseeded, "split.split")

    # Back to seed 42: its cache entries exist, but the files now hold seed 7's outputs.
    back = _run(project)
    assert back["cached"] == _cached(True, True, False, False, False)
    for name in ("split.split", "normalize.stats"):
        assert _sha(back, name) == _sha(first, name), f"{name}: same params give the same bytes"


def test_a_copy_of_the_workspace_at_another_path_is_all_cache_hits(project, tmp_path):
    """No absolute path in a key or a cached result: a second clone with the same outputs reuses them."""
    first = _run(project)
    tree = yaml.safe_load(project.read_text())
    clone = tmp_path / "elsewhere"
    shutil.copytree(first["workspace"], clone / "ws")
    tree["data"]["workspace"] = "ws"
    (clone / "params.yaml").write_text(yaml.safe_dump(tree))
    again = _run(clone / "params.yaml")
    assert again["cached"] == _cached(True, True, True, True, True)
    for name, art in again["artifacts"].items():
        assert Path(art["path"]).is_relative_to(clone / "ws"), name
        assert art["sha256"] == first["artifacts"][name]["sha256"], name


def _fingerprint(result: dict) -> str:
    return json.loads(Path(result["artifacts"]["ingest.release"]["path"]).read_text())["fingerprint"]


def test_changed_image_is_a_new_data_version(tmp_path):
    src = build_release(tmp_path / "release", whole_lesion_rows(40), "flat")
    params = write_params(tmp_path / "project", src)
    first = pipeline(params_file=str(params), until="ingest")
    assert first["cached"] == {"ingest": False}
    before = _fingerprint(first)
    assert pipeline(params_file=str(params), until="ingest")["cached"] == {"ingest": True}
    victim = min(src.glob("*.jpg"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    changed = pipeline(params_file=str(params), until="ingest")
    assert changed["cached"] == {"ingest": False}
    assert _fingerprint(changed) != before


def test_cli_run_only_data_prints_the_summary(release, tmp_path, capsys):
    params = write_params(tmp_path / "project", release, augment={"preview_images": 2})
    assert main(["run", "--only", "data", "--params", str(params)]) == 0
    out = capsys.readouterr().out
    n = len(pd.read_csv(release / "HAM10000_metadata.csv"))
    fingerprint = release_fingerprint(build_manifest(release, 10**9))
    assert f"release  {release.resolve()}" in out
    assert f"{n} images of " in out and f"fingerprint {fingerprint[:16]}" in out
    assert "images per class and split:" in out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert sum(int(v) for v in total.split()[1:]) == n
    height, width = load_params(params).data.image_size
    assert f"image array  {n} x {height}x{width}x3 uint8" in out
    assert "stages       ingest (ran), preprocess (ran), split (ran), normalize (ran), augment (ran)" in out
    assert f"outputs      {tmp_path / 'project' / 'ws'}" in out
    for artifact in ("ingest.manifest", "preprocess.images", "split.split", "normalize.stats", "augment.preview"):
        assert f"  {artifact}" in out
    assert "done in " in out


def test_cli_run_prints_each_stage_as_it_starts_and_ends(release, prefect_server, tmp_path):
    """Stage k of n as it starts and as it ends, with its time and the time into the run, in
    the order they happen, as the person running it reads them (a real process, at the log
    level a person has). (Cache hits say `cached`: tests/integration/test_ui.py.)"""
    params = write_params(tmp_path / "project", release, augment={"preview_images": 2})
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "run", "--only", "data", "--params", str(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = re.findall(
        r"(\[\d/\d\] \w+ (?:\.\.\.|ran|cached)) \((?:\d+\.\d s; )?(\d+):(\d\d) into the run\)", done.stderr
    )
    assert [line for line, _, _ in lines] == [
        f"[{k}/{len(STAGES)}] {stage} {word}" for k, stage in enumerate(STAGES, 1) for word in ("...", "ran")
    ], done.stderr[-3000:]
    into = [int(minutes) * 60 + int(seconds) for _, minutes, seconds in lines]
    assert into == sorted(into)


@pytest.fixture
def broken_release(tmp_path) -> tuple[Path, str]:
    """A release whose CSV names an image that is not there."""
    src = build_release(tmp_path / "broken", whole_lesion_rows(20), "flat")
    gone = min(src.glob("*.jpg"))
    gone.unlink()
    return src, gone.stem


def _expected_error(broken_release) -> str:
    src, gone = broken_release
    return f"lesionml: error: {src / 'HAM10000_metadata.csv'}: 1 rows whose image file is missing: {gone}"


def test_cli_ingest_of_a_broken_release_fails_with_one_error_line(broken_release, tmp_path, capsys):
    src, _ = broken_release
    params = write_params(tmp_path / "project", tmp_path / "not-this-one")  # --source wins
    assert main(["ingest", "--source", str(src), "--params", str(params)]) == 1
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("lesionml:")]
    assert ours == [_expected_error(broken_release)], err[-2000:]
    assert not (tmp_path / "project" / "ws" / "ingest" / "manifest.csv").exists()


def test_cli_ingest_of_a_broken_release_prints_no_traceback(broken_release, tmp_path):
    """The CLI's promise: an error lesionml raises on purpose is one line, never a traceback.

    Run as a real process: in-process, where Prefect's log handler writes depends on
    which test first started a flow run, so capsys cannot be relied on to see it.
    """
    src, _ = broken_release
    params = write_params(tmp_path / "project", tmp_path / "not-this-one")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "ingest", "--source", str(src), "--params", str(params)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert _expected_error(broken_release) in done.stderr.splitlines()
    traceback = "Traceback (most recent call last)" in done.stderr
    head = "\n".join(done.stderr.splitlines()[:6])
    assert not traceback, f"a user error printed a traceback; stderr begins:\n{head}"


def test_cli_bad_params_fail_before_any_work(release, tmp_path, capsys):
    params = write_params(tmp_path / "project", release)
    assert main(["run", "--only", "data", "--params", str(params), "--set", "split.sead=7"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("unknown key 'split.sead'") and err.startswith("lesionml: error: ")
    assert not (tmp_path / "project" / "ws").exists()


def test_unreachable_tracking_server_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    params = write_params(tmp_path, SAMPLE)
    started = time.perf_counter()
    assert main(["run", "--params", str(params)]) == 1
    assert time.perf_counter() - started < 60
    err = capsys.readouterr().err
    assert f"MLflow tracking store http://127.0.0.1:{port} cannot be used" in err
    assert not (tmp_path / "ws").exists(), "no stage may run when tracking is unreachable"
