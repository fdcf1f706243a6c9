"""`dvc repro` of the real pipeline in a temp copy of the project (git + DVC, real Prefect and MLflow).

One cold repro, then: nothing to redo, `lesionml run` finds everything cached, a changed
`split.seed` re-runs split and what follows only, a changed image is a new data version,
metrics and plots show, and a fresh clone pulls every output from the DVC remote.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
DATA_STAGES = ["ingest", "preprocess", "split", "normalize", "augment"]
ALL_STAGES = [*DATA_STAGES, "train@cnn", "evaluate@cnn", "register"]


def _sh(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{out[-4000:]}"
    return out


def _ran(out: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", out)


@pytest.fixture(scope="module")
def project(tmp_path_factory, prefect_server):
    """A git + DVC copy of the project (tiny models, 1 epoch) after one cold `dvc repro`."""
    tmp = tmp_path_factory.mktemp("dvc")
    root = tmp / "project"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if f.startswith(("tests/", "bench/")) or not (ROOT / f).is_file():
            continue
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, root / f)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["data"]["image_size"] = [32, 40]
    params["models"]["enabled"] = ["cnn"]
    params["models"]["cnn"].update(filters=[8, 16], dense_units=16)
    params["train"].update(epochs=1, batch_size=64)
    params["evaluate"]["bootstrap"] = params["registry"]["bootstrap"] = 100
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # dvc.yaml's metrics and plots follow models.enabled when regenerated from the stage declaration.
    dvc_yaml = subprocess.run(
        [sys.executable, "-m", "lesionml.stage_spec"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "evaluate/cnn/metrics.json" in dvc_yaml and "evaluate/cnn_lstm/" not in dvc_yaml
    (root / "dvc.yaml").write_text(dvc_yaml)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root),  # the copy's code, not the checkout the venv was installed from
        "PREFECT_API_URL": prefect_server,  # one real server instead of a temporary one per stage command
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    remote = tmp / "dvc-remote"
    _sh(["git", "init", "-q"], root, env)
    _sh([str(BIN / "dvc"), "remote", "modify", "local", "url", str(remote)], root, env)
    _sh(["git", "add", "-A"], root, env)
    _sh(["git", "commit", "-qm", "project"], root, env)
    cold = _sh([str(BIN / "dvc"), "repro"], root, env)
    return root, env, cold


def test_cold_repro_runs_every_stage_once_in_order(project):
    _, _, cold = project
    assert _ran(cold) == ALL_STAGES


def test_second_repro_has_nothing_to_do(project):
    root, env, _ = project
    again = _sh([str(BIN / "dvc"), "repro"], root, env)
    assert _ran(again) == []
    assert "Data and pipelines are up to date" in _sh([str(BIN / "dvc"), "status"], root, env)


def test_lesionml_run_after_dvc_repro_recomputes_nothing(project):
    root, env, _ = project
    out = _sh([str(BIN / "lesionml"), "run"], root, env)
    stages = next(line for line in out.splitlines() if line.startswith("stages"))
    assert "(ran)" not in stages and stages.count("(cached)") == len(ALL_STAGES), stages


def test_metrics_and_plots_show(project):
    root, env, _ = project
    metrics = _sh([str(BIN / "dvc"), "metrics", "show"], root, env)
    assert "test.balanced_accuracy" in metrics and "workspace/evaluate/cnn/metrics.json" in metrics
    _sh([str(BIN / "dvc"), "plots", "show", "-o", "plots"], root, env)
    html = (root / "plots" / "index.html").read_text()
    assert "val_balanced_accuracy" in html and "predicted" in html


def test_changed_image_is_a_new_data_version_for_dvc(project):
    root, env, _ = project
    image = next((root / "data" / "sample" / "images").glob("*.jpg"))
    original = image.read_bytes()
    try:
        image.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        status = _sh([str(BIN / "dvc"), "status", "ingest"], root, env)
        assert "changed deps" in status and "data/sample" in status
    finally:
        image.write_bytes(original)
    assert "up to date" in _sh([str(BIN / "dvc"), "status", "ingest"], root, env)


def test_changed_split_seed_reruns_split_and_later_stages_only(project):
    root, env, _ = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["split"]["seed"] = 7
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert re.search(r"split\.seed\s+42\s+7", _sh([str(BIN / "dvc"), "params", "diff"], root, env))
    out = _sh([str(BIN / "dvc"), "repro"], root, env)
    assert _ran(out) == ALL_STAGES[2:]
    assert "Stage 'ingest' didn't change" in out and "Stage 'preprocess' didn't change" in out


def test_fresh_clone_pulls_every_output_from_the_remote(project, tmp_path):
    root, env, _ = project
    _sh(["git", "add", "-A"], root, env)
    _sh(["git", "commit", "-qm", "results"], root, env)
    _sh([str(BIN / "dvc"), "push"], root, env)
    clone = tmp_path / "clone"
    _sh(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    assert not (clone / "workspace").exists()
    _sh([str(BIN / "dvc"), "pull"], clone, {**env, "PYTHONPATH": str(clone)})
    for out in ("ingest/release.json", "preprocess/images.npz", "train/cnn/model.keras", "evaluate/cnn/metrics.json"):
        assert (clone / "workspace" / out).read_bytes() == (root / "workspace" / out).read_bytes(), out
    assert "up to date" in _sh([str(BIN / "dvc"), "status"], clone, {**env, "PYTHONPATH": str(clone)})
