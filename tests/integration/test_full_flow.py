"""The whole pipeline on the bundled sample with real Prefect, MLflow and Keras (1 epoch, tiny images)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import ROOT, SAMPLE, write_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("full")
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    models["cnn"].update(filters=[8, 16], dense_units=16)
    models["cnn_lstm"].update(filters=[8, 16], lstm_units=8, dense_units=8, train={"epochs": 1})  # its own schedule
    params_file = write_params(
        tmp,
        SAMPLE,
        data={"image_size": [32, 40]},
        train={"epochs": 2, "batch_size": 32},
        models=models,
        # A 2-epoch model on 32x40 images misses the default balanced-accuracy floor, which means plain
        # argmax and zero offsets; without the floor tau is tuned for balanced accuracy, so serving is
        # tested with real offsets (the floor's choice is unit-tested in test_evaluation).
        evaluate={"min_balanced_accuracy": None},
    )
    params = yaml.safe_load(params_file.read_text())
    first = pipeline(params_file=str(params_file))
    second = pipeline(params_file=str(params_file))
    return params, first, second


def test_every_stage_ran_then_everything_was_cached(full_run):
    _, first, second = full_run
    assert set(first["cached"]) == {
        "ingest",
        "preprocess",
        "split",
        "normalize",
        "augment",
        "train.cnn",
        "evaluate.cnn",
        "train.cnn_lstm",
        "evaluate.cnn_lstm",
        "register",
    }
    assert not any(first["cached"].values())
    assert all(second["cached"].values()), second["cached"]


def test_a_copy_of_the_workspace_at_another_path_is_all_cache_hits(full_run, tmp_path):
    """Train and register keys hold content, not the workspace path: a second clone reuses the models."""
    from flows.pipeline import pipeline

    params, first, _ = full_run
    clone = tmp_path / "clone"
    shutil.copytree(first["workspace"], clone / "ws")
    (clone / "params.yaml").write_text(yaml.safe_dump({**params, "data": {**params["data"], "workspace": "ws"}}))
    again = pipeline(params_file=str(clone / "params.yaml"))
    assert all(again["cached"].values()), again["cached"]
    for name, art in again["artifacts"].items():
        assert Path(art["path"]).is_relative_to(clone / "ws"), name
        assert art["sha256"] == first["artifacts"][name]["sha256"], name


def test_mlflow_records_parent_and_nested_model_runs(full_run):
    import mlflow
    from mlflow import MlflowClient

    params, first, second = full_run
    client = MlflowClient(params["tracking"]["uri"])
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "2"
    assert parent.data.params["data.fingerprint"] == parent.data.tags["lesionml.data_fingerprint"]
    assert int(parent.data.params["split.n_train"]) > 0
    assert parent.data.tags["lesionml.all_cached"] == "false"
    assert client.get_run(second["mlflow_run_id"]).data.tags["lesionml.all_cached"] == "true"

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["cnn", "cnn_lstm"]
    for run in children:
        summary = json.loads(Path(first["artifacts"][f"train.{run.info.run_name}.summary"]["path"]).read_text())
        assert summary["run_id"] == run.info.run_id
        epochs = {"cnn": 2, "cnn_lstm": 1}[run.info.run_name]  # the cnn_lstm's models.cnn_lstm.train.epochs wins
        assert summary["epochs_run"] == epochs and run.data.params["train.epochs"] == str(epochs)
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, summary["epochs_run"] + 1))
        for metric in ("loss", "accuracy", "val_accuracy", "learning_rate"):
            assert len(client.get_metric_history(run.info.run_id, metric)) == summary["epochs_run"]
        for metric in (
            "eval_test_accuracy",
            "eval_test_balanced_accuracy",
            "eval_val_macro_f1",
            "eval_test_recall_mel",
            "eval_test_roc_auc_mel",
            "eval_test_ece",
            "eval_test_balanced_accuracy_ci95_low",
        ):
            assert metric in run.data.metrics
        assert run.data.tags["evaluate.prior_correction"] == "true"
        assert not [k for k in run.data.params if k.startswith("evaluate.")], "evaluation settings are tags"
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"model_summary.txt", "training", "evaluation", "preprocessing"} <= names
        training = {a.path for a in client.list_artifacts(run.info.run_id, "training")}
        assert "training/curves.png" in training
        evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        gradcam = {f"evaluation/{s}_gradcam_{k}.png" for s in ("val", "test") for k in ("mel", "nv", "mistakes")}
        assert gradcam <= evaluation, "Grad-CAM grids per class and of the mistakes, logged with the other figures"

        model = mlflow.tensorflow.load_model(f"runs:/{run.info.run_id}/model")
        images = np.random.default_rng(0).integers(0, 255, (3, 32, 40, 3)).astype(np.float32)
        proba = np.asarray(model.predict(images, verbose=0))
        assert proba.shape == (3, 7)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-4)


def test_workspace_model_file_is_complete_and_metrics_written(full_run):
    import keras

    _, first, _ = full_run
    for name in ("cnn", "cnn_lstm"):
        model = keras.saving.load_model(first["artifacts"][f"train.{name}.model"]["path"], safe_mode=True)
        assert model.input_shape == (None, 32, 40, 3)
        metrics = json.loads(Path(first["artifacts"][f"evaluate.{name}.metrics"]["path"]).read_text())
        for split in ("val", "test"):
            assert 0.0 <= metrics[split]["balanced_accuracy"] <= 1.0
            assert set(metrics[split]["per_class"]) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}


def test_registry_has_versions_with_tags_card_and_aliases(full_run):
    from mlflow import MlflowClient

    params, first, _second = full_run
    client = MlflowClient(params["tracking"]["uri"])
    name = params["registry"]["model_name"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2, "one version per model; the cached second run registers nothing"
    decision = json.loads(Path(first["artifacts"]["register.decision"]["path"]).read_text())
    assert decision["promote"] is True and "first model becomes champion" in decision["reason"]
    aliases = client.get_registered_model(name).aliases
    assert str(aliases["champion"]) == str(aliases["challenger"]) == decision["challenger"]["version"]
    v = client.get_model_version(name, aliases["champion"])
    assert {"architecture", "git commit", "params hash", "data fingerprint", "test_balanced_accuracy"} <= set(v.tags)
    assert "Not a medical device" in v.description and "melanoma sensitivity" in v.description
    assert v.tags["decision rule"].startswith("prior correction tau")
    assert f"The served model applies: {v.tags['decision rule']}." in v.description
    assert "temperature-scaled" in v.description


def test_served_champion_decides_exactly_as_it_was_evaluated(full_run):
    """Same test images through the registered pyfunc (TTA, temperature and prior correction
    from its config) and through evaluation: the same classes and probabilities."""
    import pandas as pd
    from mlflow import MlflowClient

    from lesionml import tracking
    from lesionml.config import TrackingConfig
    from lesionml.evaluation import PRIOR_TAUS

    params, first, _ = full_run
    name = params["registry"]["model_name"]
    client = MlflowClient(params["tracking"]["uri"])
    architecture = client.get_model_version_by_alias(name, "champion").tags["architecture"]
    metrics = json.loads(Path(first["artifacts"][f"evaluate.{architecture}.metrics"]["path"]).read_text())
    decision = metrics["decision"]
    assert decision["prior_correction"] is True and decision["tau"] in PRIOR_TAUS and len(decision["offsets"]) == 7
    assert set(decision["argmax"]) == {"val", "test"}
    assert decision["min_balanced_accuracy"] is None and decision["floor_met"] is True
    assert decision["objective"] == "chosen for the best validation balanced accuracy"
    # Temperature scaling is on by default: fitted on val, it travels with the served model.
    assert 0.05 < decision["temperature"] < 20 and abs(np.log(decision["temperature"])) > 0.01
    assert set(decision["raw_ece"]) == {"val", "test"}

    table = pd.read_csv(first["artifacts"][f"evaluate.{architecture}.predictions"]["path"])
    test = table[table.split == "test"].head(12)
    tracking.connect(TrackingConfig(**params["tracking"]))  # not mlflow.set_tracking_uri: it leaks into the env
    served = tracking.load_pyfunc(f"models:/{name}@champion").predict(
        pd.DataFrame({"path": [str(SAMPLE / "images" / f"{i}.jpg") for i in test.image_id]})
    )
    assert served.predicted.tolist() == test.predicted.tolist()
    columns = [c for c in test.columns if c.startswith("p_")]
    np.testing.assert_allclose(served[columns].to_numpy(), test[columns].to_numpy(), atol=1e-5)


def test_a_later_run_is_judged_by_the_rule_on_the_champions_served_predictions(full_run):
    """Whichever way a 1-epoch challenger on the sample goes, the decision is the promotion rule's
    on the champion's served test predictions, and the aliases follow it. (Both outcomes for
    certain: test_promotion_flow.py, on releases built for them.)"""
    import pandas as pd
    from mlflow import MlflowClient

    from flows.pipeline import pipeline
    from lesionml import tracking
    from lesionml.config import RegistryConfig, TrackingConfig
    from lesionml.model_stages import Contender, class_indices, decide_promotion

    params, first, _ = full_run
    params_file = Path(first["workspace"]).parent / "params.yaml"
    third = pipeline(params_file=str(params_file), overrides=["train.seed=5", "train.epochs=1"])
    decision = json.loads(Path(third["artifacts"]["register.decision"]["path"]).read_text())
    name = params["registry"]["model_name"]
    champion = decision["champion"]["version"]
    client = MlflowClient(params["tracking"]["uri"])
    crowned = client.get_run(client.get_model_version(name, champion).run_id)
    assert crowned.data.tags["mlflow.parentRunId"] == first["mlflow_run_id"], "the champion the first run crowned"

    split = pd.read_csv(third["artifacts"]["split.split"]["path"])
    test = split[split.split == "test"].reset_index(drop=True)
    images = [(SAMPLE / "images" / f"{i}.jpg").read_bytes() for i in test.image_id]
    tracking.connect(TrackingConfig(**params["tracking"]))
    served = tracking.load_pyfunc(f"models:/{name}/{champion}").predict(pd.DataFrame({"image": images}))
    table = pd.read_csv(third["artifacts"][f"evaluate.{decision['challenger']['model']}.predictions"]["path"])
    challenger = table[table.split == "test"].set_index("image_id").loc[test.image_id, "predicted"]
    expected = decide_promotion(
        class_indices(test.dx),
        test.lesion_id.to_numpy(),
        Contender(decision["challenger"]["version"], class_indices(challenger)),
        Contender(champion, class_indices(served.predicted)),
        RegistryConfig(**params["registry"]),
        params["split"]["seed"],
    )
    assert {k: decision[k] for k in expected} == expected

    aliases = client.get_registered_model(name).aliases
    assert str(aliases["challenger"]) == decision["challenger"]["version"]
    assert str(aliases["champion"]) == (decision["challenger"]["version"] if decision["promote"] else champion)
    parent = client.get_run(third["mlflow_run_id"])
    assert parent.data.tags["lesionml.registry_decision"] == decision["reason"]


def test_runs_use_the_release_splits_as_datasets_and_trainings_record_system_metrics(full_run):
    """The MLflow UI's dataset column and lineage: the pipeline run and each model run use the
    release's train, validation and test splits; a training run's system metrics show CPU and
    memory over its course."""
    from mlflow import MlflowClient

    params, first, _ = full_run
    client = MlflowClient(params["tracking"]["uri"])
    release = json.loads(Path(first["artifacts"]["ingest.release"]["path"]).read_text())
    parent = client.get_run(first["mlflow_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    sizes = {"train": "split.n_train", "validation": "split.n_val", "test": "split.n_test"}
    for run in [parent, *children]:
        inputs = {}
        for i in run.inputs.dataset_inputs:
            tags = {t.key: t.value for t in i.tags}
            inputs[tags["mlflow.data.context"]] = (i.dataset, tags)
        assert set(inputs) == {"train", "validation", "test"}, run.info.run_name
        for context, (dataset, tags) in inputs.items():
            assert dataset.name == f"sample-{context}"
            assert dataset.digest == release["fingerprint"][:36]
            assert dataset.source_type == "local" and json.loads(dataset.source) == {"uri": str(SAMPLE.resolve())}
            assert json.loads(dataset.profile) == {"release_fingerprint": release["fingerprint"]}
            assert tags["lesionml.images"] == parent.data.params[sizes[context]]

    assert not [k for k in parent.data.metrics if k.startswith("system/")], "only training runs are sampled"
    for run in children:
        cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
        memory = client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
        assert cpu and memory, f"{run.info.run_name}: no system metrics"
        assert all(0 <= m.value <= 100 for m in cpu) and all(m.value > 0 for m in memory)


def test_predict_cli_good_and_bad_files(full_run, tmp_path, capsys):
    from cli.main import main

    _params, first, _ = full_run
    params_file = str(Path(first["workspace"]).parent / "params.yaml")
    folder = tmp_path / "mixed"
    folder.mkdir()
    for src in sorted((SAMPLE / "images").glob("*.jpg"))[:3]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "notes.jpg").write_text("not an image")
    assert main(["predict", str(folder), "--json", "--params", params_file]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    good = [line for line in lines if "predicted" in line]
    bad = [line for line in lines if "error" in line]
    assert len(good) == 3 and len(bad) == 1
    assert bad[0]["source"].endswith("notes.jpg") and "not an image Pillow can read" in bad[0]["error"]
    assert all(abs(sum(g["probabilities"].values()) - 1) < 1e-3 and g["name"] for g in good)

    # --explain: one Grad-CAM overlay per image predicted, named after it; none for the broken file
    out = tmp_path / "explained"
    assert main(["predict", str(folder), "--json", "--explain", str(out), "--params", params_file]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(g["source"]).stem + ".png" for g in good)
    assert all(Path(line["explanation"]).is_file() for line in lines if "predicted" in line)
    assert "decision rule: prior correction tau" in captured.err and f"Grad-CAM overlays: 3 in {out}" in captured.err

    assert main(["predict", str(folder), "--model", "lesionml@nope", "--params", params_file]) == 1
    err = capsys.readouterr().err
    assert "model lesionml@nope does not exist; aliases that do: lesionml@challenger" in err
    assert "lesionml@champion" in err


def test_served_model_answers_over_http(full_run, tmp_path):
    import base64
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    params, _, _ = full_run
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent  # mlflow starts `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": params["tracking"]["uri"],
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.Popen(
        [
            str(bin_dir / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{params['registry']['model_name']}@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        image = min((SAMPLE / "images").glob("*.jpg")).read_bytes()
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}})
        deadline = time.monotonic() + 120
        while True:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/invocations",
                    data=body.encode(),
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=30) as r:
                    answer = json.loads(r.read())
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow models serve did not answer")
                time.sleep(1)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    row = answer["predictions"][0]
    assert row["predicted"] in {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"} and row["error"] == ""
    assert abs(sum(row[f"p_{c}"] for c in ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")) - 1) < 1e-3


def test_compare_prints_and_logs_the_table(full_run, capsys):
    from mlflow import MlflowClient

    from cli.main import main

    params, first, _ = full_run
    params_file = str(Path(first["workspace"]).parent / "params.yaml")
    assert main(["compare", "--last", "5", "--params", params_file]) == 0
    out = capsys.readouterr().out
    assert "| cnn |" in out and "| cnn_lstm |" in out and "balanced accuracy [95% CI]" in out
    assert "n/a" not in out.split("Params that differ")[0], "every model row has its metrics and intervals"
    assert "Params that differ:" in out and "train.seed" in out  # the seed=5 run differs
    parent = out.strip().rsplit("MLflow run ", 1)[1].rstrip(")")
    names = {a.path for a in MlflowClient(params["tracking"]["uri"]).list_artifacts(parent)}
    assert "comparison.md" in names


def test_re_evaluating_a_cached_model_updates_its_runs_evaluation_tags(full_run):
    from mlflow import MlflowClient

    from flows.pipeline import pipeline

    params, first, _ = full_run
    params_file = Path(first["workspace"]).parent / "params.yaml"
    # The same training params as the last run (the champion test's), so its model is the cached one.
    again = pipeline(params_file=str(params_file), overrides=["train.seed=5", "train.epochs=1", "evaluate.tta=false"])
    assert again["cached"]["train.cnn"] and not again["cached"]["evaluate.cnn"]
    client = MlflowClient(params["tracking"]["uri"])
    summary = json.loads(Path(again["artifacts"]["train.cnn.summary"]["path"]).read_text())
    run = client.get_run(summary["run_id"])
    assert run.data.tags["evaluate.tta"] == "false", "the run says which settings its latest metrics came from"
