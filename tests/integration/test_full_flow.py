"""The whole pipeline on the bundled sample with real Prefect, MLflow and Keras (1 epoch, tiny images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, SAMPLE, write_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("full")
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    models["cnn"].update(filters=[8, 16], dense_units=16)
    models["cnn_lstm"].update(filters=[8, 16], lstm_units=8, dense_units=8)
    params_file = write_params(
        tmp, SAMPLE, data={"image_size": [32, 40]}, train={"epochs": 2, "batch_size": 32}, models=models
    )
    params = yaml.safe_load(params_file.read_text())
    first = pipeline(params_file=str(params_file))
    second = pipeline(params_file=str(params_file))
    return params, first, second


def test_every_stage_ran_then_everything_was_cached(full_run):
    _, first, second = full_run
    assert set(first["cached"]) == {
        "ingest", "preprocess", "split", "normalize", "augment",
        "train.cnn", "evaluate.cnn", "train.cnn_lstm", "evaluate.cnn_lstm",
    }
    assert not any(first["cached"].values())
    assert all(second["cached"].values()), second["cached"]


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

    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.info.run_name for r in children) == ["cnn", "cnn_lstm"]
    for run in children:
        summary = json.loads(Path(first["artifacts"][f"train.{run.info.run_name}.summary"]["path"]).read_text())
        assert summary["run_id"] == run.info.run_id
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, summary["epochs_run"] + 1))
        for metric in ("loss", "accuracy", "val_accuracy", "learning_rate"):
            assert len(client.get_metric_history(run.info.run_id, metric)) == summary["epochs_run"]
        for metric in ("eval_test_accuracy", "eval_test_balanced_accuracy", "eval_val_macro_f1", "eval_test_recall_mel"):
            assert metric in run.data.metrics
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"model_summary.txt", "training", "evaluation", "preprocessing"} <= names
        training = {a.path for a in client.list_artifacts(run.info.run_id, "training")}
        assert "training/curves.png" in training

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
