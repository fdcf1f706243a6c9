"""A CNN with the patient metadata branch, as an ensemble of two seeded copies (the thorough
profile's kind of model), through the real flow on the bundled sample: trained, evaluated
with and without metadata, explained, registered, re-scored as champion and predicted by the
CLI with the inputs it was evaluated with."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers import ROOT, SAMPLE, TINY, write_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def meta_run(tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("meta")
    sections = copy.deepcopy(TINY)
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    models["cnn"].update(sections["models"]["cnn"])
    models["cnn"]["metadata"]["enabled"] = True
    models["cnn"]["ensemble"] = 2
    sections["models"] = {**models, "enabled": ["cnn"]}
    params_file = write_params(tmp, SAMPLE, **sections)
    return params_file, pipeline(params_file=str(params_file))


def _sample_rows() -> pd.DataFrame:
    return pd.read_csv(next(SAMPLE.glob("*.csv")), dtype=str, keep_default_na=False).set_index("image_id")


def test_the_model_is_the_mean_of_two_seeded_copies(meta_run):
    import keras

    from lesionml.models import ENSEMBLE_AVERAGE, ensemble_members

    _, result = meta_run
    summary = json.loads(Path(result["artifacts"]["train.cnn.summary"]["path"]).read_text())
    assert summary["seeds"] == [42, 43] and len(summary["best_epoch"]) == 2
    model = keras.saving.load_model(result["artifacts"]["train.cnn.model"]["path"])
    members = ensemble_members(model)
    assert len(members) == 2 and model.layers[-1].name == ENSEMBLE_AVERAGE
    assert not all((a == b).all() for a, b in zip(members[0].get_weights(), members[1].get_weights(), strict=True)), (
        "two seeds, two different models"
    )
    evaluated = Path(result["artifacts"]["evaluate.cnn.metrics"]["path"]).parent
    assert len(list(evaluated.glob("test_gradcam_*.png"))) >= 2, "Grad-CAM grids of the ensemble"


def test_evaluation_reports_metrics_with_metadata_withheld(meta_run):
    import mlflow
    from mlflow import MlflowClient

    _, result = meta_run
    metrics = json.loads(Path(result["artifacts"]["evaluate.cnn.metrics"]["path"]).read_text())
    for split in ("val", "test"):
        assert 0 <= metrics[f"{split}_withheld"]["balanced_accuracy"] <= 1
    mlflow.set_tracking_uri(result["tracking_uri"])
    client = MlflowClient()
    [run] = client.search_runs(
        [result["mlflow_experiment_id"]], f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'"
    )
    logged = run.data.metrics
    assert logged["eval_test_withheld_balanced_accuracy"] == pytest.approx(
        metrics["test_withheld"]["balanced_accuracy"]
    )
    encoding = json.loads(
        Path(client.download_artifacts(run.info.run_id, "preprocessing/metadata_encoding.json")).read_text()
    )
    assert "male" in encoding["sexes"] and encoding["localizations"]


def test_the_champion_is_rescored_with_the_test_rows_metadata(meta_run):
    """register's re-scoring sends the test rows' age, sex and site: the served champion
    answers what evaluation measured."""
    from lesionml import model_stages, tracking
    from lesionml.config import load_params
    from lesionml.io import Artifact

    params_file, result = meta_run
    arts = {k: Artifact(**v) for k, v in result["artifacts"].items()}
    model = {k: arts[f"{stage}.cnn.{k}"] for stage, k in [("train", "model"), ("train", "summary")]}
    model |= {k: arts[f"evaluate.cnn.{k}"] for k in ("metrics", "predictions")}
    params = load_params(params_file)
    offer = model_stages.registration(
        {"cnn": model},
        arts["ingest.manifest"],
        arts["ingest.release"],
        arts["split.split"],
        params,
        "test",
        metadata=arts["preprocess.metadata"],
    )
    tracking.connect(params.tracking)
    _, predicted = tracking.champion_predictions(params.registry.model_name, offer.test.images, offer.test.patient)
    assert predicted == [model_stages.CLASSES[i] for i in offer.predicted]


def test_predict_with_metadata_gives_the_evaluated_probabilities(meta_run, tmp_path, capsys):
    from cli.main import main

    params_file, result = meta_run
    table = pd.read_csv(result["artifacts"]["evaluate.cnn.predictions"]["path"])
    test = table[table.split == "test"].head(4).set_index("image_id")
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id in test.index:
        (folder / f"{image_id}.jpg").write_bytes((SAMPLE / "images" / f"{image_id}.jpg").read_bytes())
    rows = _sample_rows().loc[test.index[:3], ["age", "sex", "localization"]].reset_index()
    csv = tmp_path / "patients.csv"
    rows.to_csv(csv, index=False)  # the fourth image has no row

    explained = tmp_path / "explained"
    argv = ["predict", str(folder), "--json", "--metadata", str(csv), "--explain", str(explained)]
    assert main([*argv, "--params", str(params_file)]) == 0
    answers = {Path(a["source"]).stem: a for a in map(json.loads, capsys.readouterr().out.splitlines())}
    assert sorted(p.stem for p in explained.iterdir()) == sorted(test.index)  # Grad-CAM with the same inputs
    probabilities = [c for c in test.columns if c.startswith("p_")]
    for image_id in test.index[:3]:
        assert answers[image_id]["metadata"] == "used"
        served = [answers[image_id]["probabilities"][c[2:]] for c in probabilities]
        assert served == pytest.approx(test.loc[image_id, probabilities].tolist(), abs=1e-5)
    assert answers[test.index[3]]["metadata"] == "withheld"

    assert main(["predict", str(folder), "--params", str(params_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.endswith("(no metadata: withheld path)") for line in out)

    for column, value in (("age", "300"), ("localization", "belly")):
        bad = rows.copy()
        bad.loc[1, column] = value
        bad.to_csv(csv, index=False)
        assert main(["predict", str(folder), "--metadata", str(csv), "--params", str(params_file)]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"lesionml: error: {csv}: 1 rows with ") and "\n" not in err
        assert f"line 3 ({rows.image_id[1]}) ('{value}')" in err
