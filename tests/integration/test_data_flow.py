"""The data stages as a real Prefect flow: cache hits, what a param change re-runs, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_release, sample_metadata, write_params

from flows.pipeline import pipeline
from lesionml.cli import main

pytestmark = pytest.mark.integration
DATA_STAGES = ["ingest", "preprocess", "split", "normalize", "augment"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("data-flow")
    meta = sample_metadata()
    rows = meta[meta.lesion_id.isin(meta.groupby("dx").lesion_id.apply(lambda s: list(dict.fromkeys(s))[:6]).explode())]
    source = make_release(tmp / "release", rows.reset_index(drop=True), "parts")
    return write_params(tmp, source, augment={"preview_images": 3})


def _run(params: Path, *overrides: str) -> dict:
    return pipeline(params_file=str(params), overrides=list(overrides), until="augment")


def test_second_run_is_all_cache_hits_and_seed_change_reruns_split_onwards(project):
    first = _run(project)
    assert first["cached"] == {s: False for s in DATA_STAGES}
    assert _run(project)["cached"] == {s: True for s in DATA_STAGES}

    reseeded = _run(project, "split.seed=7")
    assert reseeded["cached"] == {"ingest": True, "preprocess": True, "split": False, "normalize": False, "augment": False}
    assert reseeded["artifacts"]["split.split"]["sha256"] != first["artifacts"]["split.split"]["sha256"]


def test_deleted_output_is_recomputed_not_trusted(project):
    result = _run(project)
    Path(result["artifacts"]["normalize.stats"]["path"]).unlink()
    again = _run(project)
    assert again["cached"]["normalize"] is False and again["cached"]["split"] is True
    assert Path(again["artifacts"]["normalize.stats"]["path"]).is_file()


def test_changed_image_is_a_new_data_version(project, tmp_path):
    result = _run(project)
    victim = next(Path(result["artifacts"]["ingest.manifest"]["path"]).parent.parent.parent.glob("release/*/*.jpg"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    changed = _run(project)
    assert changed["cached"]["ingest"] is False and changed["cached"]["preprocess"] is False
    assert changed["artifacts"]["ingest.release"]["sha256"] != result["artifacts"]["ingest.release"]["sha256"]


def test_cli_run_only_data_prints_summary(project, capsys):
    assert main(["run", "--only", "data", "--params", str(project)]) == 0
    out = capsys.readouterr().out
    assert "images per class and split" in out and "total" in out
    assert "image array" in out and "x 75x100x3 uint8" in out
    assert "augment.preview" in out


def test_cli_ingest_broken_release_is_one_line_error(tmp_path, capsys):
    meta = sample_metadata().iloc[:20]
    source = make_release(tmp_path / "broken", meta)
    (source / f"{meta.image_id.iloc[0]}.jpg").unlink()
    params = write_params(tmp_path, source)
    assert main(["ingest", "--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lesionml: error: ") and "1 rows whose image file is missing" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_bad_params_fail_before_any_work(tmp_path, capsys):
    params = write_params(tmp_path, tmp_path)
    assert main(["run", "--params", str(params), "--set", "train.epochs=-1"]) == 2
    assert "train.epochs: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_unreachable_tracking_server_fails_before_any_work(tmp_path, capsys, monkeypatch):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    params = write_params(tmp_path, Path(__file__).resolve().parents[2] / "data" / "sample")
    started = time.perf_counter()
    assert main(["run", "--params", str(params)]) == 1
    assert time.perf_counter() - started < 60
    err = capsys.readouterr().err
    assert f"MLflow tracking store http://127.0.0.1:{port} cannot be used" in err
    assert not (tmp_path / "ws").exists(), "no stage may run when tracking is unreachable"
