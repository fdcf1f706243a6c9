"""One declaration of what each stage depends on: dvc.yaml is generated from it, and the
Prefect cache keys hash exactly its code and params, never a path."""

from __future__ import annotations

import copy
import shutil

import pytest

from lesionml.stage_spec import MODEL, SPEED_ONLY, STAGES, code_digest, render_dvc_yaml, stage_params
from lesionml.workspace import STAGES as RUN_ORDER
from tasks._stage import stage_cache_key
from tests.helpers import ROOT, project_params


def test_the_committed_dvc_yaml_is_the_one_the_declaration_generates():
    expected = render_dvc_yaml(project_params().models.enabled)
    assert (ROOT / "dvc.yaml").read_text(encoding="utf-8") == expected, (
        "dvc.yaml differs from lesionml/stage_spec.py: run `python -m lesionml.stage_spec > dvc.yaml`"
    )


def test_every_stage_is_declared_in_run_order_with_existing_code_and_params():
    assert tuple(STAGES) == RUN_ORDER
    dump = project_params().model_dump(mode="json")
    for name, spec in STAGES.items():
        assert all((ROOT / f).is_file() for f in spec.code), name
        for model in dump["models"]["enabled"] if spec.per_model else [None]:
            assert stage_params(name, dump, model).keys() == set(spec.params)
        declared = {p.replace(MODEL, m) for p in spec.params for m in ("cnn", "cnn_lstm")}
        assert not declared & SPEED_ONLY, f"{name} declares a speed-only setting"


# Library files no stage's result depends on: plumbing every stage shares, or not run by the pipeline.
NO_STAGE = {
    "lesionml/__init__.py",
    "lesionml/data/__init__.py",
    "lesionml/data/versioning.py",  # the CLI brings a release under DVC before a run; no stage reads it
    "lesionml/errors.py",
    "lesionml/io.py",
    "lesionml/stage_spec.py",
    "lesionml/tether.py",  # keeps the servers a command starts from outliving it; no stage reads it
    "lesionml/workspace.py",
}


def test_every_library_file_is_some_stages_code_or_known_plumbing():
    """A new module must be declared where it changes results, or it would change them unseen by both caches."""
    declared = {f for spec in STAGES.values() for f in spec.code}
    library = {str(p.relative_to(ROOT)) for p in (ROOT / "lesionml").rglob("*.py")}
    assert library - declared - NO_STAGE == set(), "declare it in lesionml/stage_spec.py or add it to NO_STAGE"
    assert not NO_STAGE & declared


def test_the_code_digest_follows_the_bytes_of_exactly_the_declared_files(tmp_path):
    for f in {f for spec in STAGES.values() for f in spec.code}:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, tmp_path / f)
    before = {s: code_digest(s, tmp_path) for s in STAGES}
    assert before == {s: code_digest(s) for s in STAGES}
    with open(tmp_path / "lesionml/data/split.py", "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    changed = {s for s in STAGES if code_digest(s, tmp_path) != before[s]}
    assert changed == {"split"}


def _artifact(root, name: str, sha: str) -> dict:
    return {"path": f"{root}/{name}", "sha256": sha}


def _preprocess_inputs(root: str = "/one/ws", **data) -> dict:
    dump = project_params().model_dump(mode="json")
    dump["data"] |= data
    return {"manifest": _artifact(root, "ingest/manifest.csv", "a" * 64), "workspace": root, "params": dump}


def test_a_key_holds_content_and_declared_params_not_paths_or_speed_settings():
    key = stage_cache_key("preprocess")
    base = key(None, _preprocess_inputs())
    assert key(None, _preprocess_inputs("/another/clone/ws")) == base, "the workspace's place is not in the key"
    assert key(None, _preprocess_inputs(workers=7)) == base, "speed-only settings are not in the key"
    moved = _preprocess_inputs()
    moved["manifest"]["sha256"] = "b" * 64
    assert key(None, moved) != base, "the input's content is"
    assert key(None, _preprocess_inputs(image_size=[32, 40])) != base, "declared params are"


@pytest.mark.parametrize("setting", ["train.epochs", "models.cnn.filters", "augment.seed"])
def test_the_train_key_follows_what_defines_the_model_and_not_where_it_lives(setting):
    from tasks.model import _trained_model  # imported here: it loads the model stages

    key = stage_cache_key("train", select=_trained_model)
    dump = project_params().model_dump(mode="json")
    inputs = _train_inputs("/one/ws", dump)
    base = key(None, inputs)
    elsewhere = copy.deepcopy(inputs) | {"workspace": "/two/ws"}
    for k in ("images_npz", "split_csv", "stats_json", "metadata_csv"):
        elsewhere[k]["path"] = elsewhere[k]["path"].replace("/one/", "/two/")
    elsewhere["params"]["data"]["workspace"] = "/two/ws"
    assert key(None, elsewhere) == base
    changed = copy.deepcopy(inputs)
    section, *path, leaf = setting.split(".")
    node = changed["params"][section]
    for part in path:
        node = node[part]
    node[leaf] = [4, 8] if leaf == "filters" else node[leaf] + 1
    assert key(None, changed) != base


def _train_inputs(ws: str, dump: dict) -> dict:
    """The train task's inputs for the CNN, its upstream artifacts in workspace `ws`."""
    return {
        "name": "cnn",
        "images_npz": _artifact(ws, "preprocess/images.npz", "1" * 64),
        "split_csv": _artifact(ws, "split/split.csv", "2" * 64),
        "stats_json": _artifact(ws, "normalize/stats.json", "3" * 64),
        "metadata_csv": _artifact(ws, "preprocess/metadata.csv", "4" * 64),
        "workspace": ws,
        "params": dump,
        "run": None,
    }


def test_the_patient_table_is_in_the_train_key_only_for_a_model_that_reads_it():
    from tasks.model import _trained_model  # imported here: it loads the model stages

    key = stage_cache_key("train", select=_trained_model)
    dump = project_params().model_dump(mode="json")
    dump["models"]["cnn"]["metadata"]["enabled"] = False
    inputs = _train_inputs("/ws", dump)
    edited = copy.deepcopy(inputs)
    edited["metadata_csv"]["sha256"] = "5" * 64
    assert key(None, edited) == key(None, inputs), "an image-only model's cache survives a new patient table"
    for case in (inputs, edited):
        case["params"]["models"]["cnn"]["metadata"]["enabled"] = True
    assert key(None, edited) != key(None, inputs)
