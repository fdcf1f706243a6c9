"""The promotion rule's two branches through the real flow (Prefect's temporary server, an
MLflow SQLite store, Keras): a clearly weak champion is replaced by a clearly stronger
challenger, and that champion is not replaced by an equal one.

The bundled sample's test split is too small for either outcome to be certain, so these
runs use synthetic releases whose class is only a coloured square (tests.helpers): a small
CNN trained a few epochs is near perfect on them. The weak champion is trained on the same
pictures with three pairs of classes swapped in the CSV, so on the true labels it is wrong
on six classes of seven.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, build_patch_release, write_params

pytestmark = pytest.mark.integration

SWAPPED = {"akiec": "bcc", "bcc": "akiec", "bkl": "df", "df": "bkl", "mel": "nv", "nv": "mel"}


@pytest.fixture(scope="module")
def promotions(tmp_path_factory):
    """Three pipeline runs on one store: weak (swapped labels), strong, and equal (the strong
    run's settings with another training seed); each run's decision, aliases and metrics."""
    from mlflow import MlflowClient

    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("promotion")
    honest = build_patch_release(tmp / "honest", per_class=40, size=(48, 64))
    swapped = build_patch_release(tmp / "swapped", per_class=40, size=(48, 64), flip=SWAPPED)
    models = yaml.safe_load((ROOT / "params.yaml").read_text())["models"]
    models.update(enabled=["cnn"])
    models["cnn"].update(filters=[8, 16], dense_units=16, dense_dropout=0.0)
    params_file = write_params(
        tmp / "project",
        honest,
        data={"image_size": [32, 40]},
        train={"epochs": 10, "batch_size": 16, "learning_rate": 0.005, "warmup_epochs": 0, "ema_decay": 0.0},
        # The class is the square's colour: no colour jitter, and no rotation, shift or zoom that
        # could carry a square near the border out of the picture (and its label with it).
        augment={"rotation_degrees": 0, "shift_fraction": 0, "zoom_fraction": 0, "brightness": 0, "contrast": 0},
        models=models,
        evaluate={"tta": False, "bootstrap": 200},
        registry={"promotion_metric": "balanced_accuracy", "alpha": 0.05, "bootstrap": 1000},
    )
    params = yaml.safe_load(params_file.read_text())
    client = MlflowClient(params["tracking"]["uri"])
    runs = {}
    for label, overrides in (("weak", [f"data.source={swapped}"]), ("strong", []), ("equal", ["train.seed=7"])):
        start = time.monotonic()
        result = pipeline(params_file=str(params_file), overrides=overrides)
        runs[label] = {
            "seconds": time.monotonic() - start,
            "decision": json.loads(Path(result["artifacts"]["register.decision"]["path"]).read_text()),
            "metrics": json.loads(Path(result["artifacts"]["evaluate.cnn.metrics"]["path"]).read_text()),
            "aliases": {a: str(v) for a, v in client.get_registered_model("lesionml").aliases.items()},
            "tags": client.get_run(result["mlflow_run_id"]).data.tags,
        }
    for label, run in runs.items():  # shown with -s: how clear the margins are, and what each run cost
        d = run["decision"]
        print(
            f"{label}: {run['seconds']:.1f} s, test balanced accuracy {run['metrics']['test']['balanced_accuracy']:.3f}, "
            f"delta {d.get('delta', float('nan')):+.3f}, p {d.get('p_value', float('nan')):.3f}"
        )
    return runs


def test_the_weak_model_is_champion_first(promotions):
    weak = promotions["weak"]
    assert weak["decision"]["promote"] is True and "first model becomes champion" in weak["decision"]["reason"]
    assert weak["aliases"] == {"champion": weak["decision"]["challenger"]["version"], "challenger": "1"}


def test_a_clearly_stronger_challenger_replaces_the_weak_champion(promotions):
    weak, strong = promotions["weak"], promotions["strong"]
    d = strong["decision"]
    assert strong["metrics"]["test"]["balanced_accuracy"] >= 0.9, "the square's colour is the class"
    assert d["champion"]["version"] == weak["decision"]["challenger"]["version"]
    assert d["delta"] > 0.5 and d["p_value"] < d["alpha"] and d["promote"] is True
    assert d["reason"].startswith(
        f"challenger v{d['challenger']['version']} beats champion v{d['champion']['version']}"
    )
    assert strong["aliases"] == {"champion": d["challenger"]["version"], "challenger": d["challenger"]["version"]}
    assert strong["tags"]["lesionml.promoted"] == "true" and strong["tags"]["lesionml.registry_decision"] == d["reason"]


def test_an_equal_challenger_does_not_replace_the_champion(promotions):
    strong, equal = promotions["strong"], promotions["equal"]
    d = equal["decision"]
    assert equal["metrics"]["test"]["balanced_accuracy"] >= 0.9, "as strong as the champion"
    assert d["champion"]["version"] == strong["decision"]["challenger"]["version"]
    assert abs(d["delta"]) < 0.1 and d["p_value"] >= d["alpha"] and d["promote"] is False
    assert "does not beat" in d["reason"]
    assert equal["aliases"] == {"champion": d["champion"]["version"], "challenger": d["challenger"]["version"]}
    assert equal["tags"]["lesionml.promoted"] == "false"
