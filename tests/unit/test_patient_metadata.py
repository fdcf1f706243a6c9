"""Patient metadata as model inputs: train-only encoding inside the model, withholding, the
withheld path, unchanged image-only models, one-line errors, and a branch the model uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lesionml.config import MetadataConfig, load_params
from lesionml.data.normalize import NormStats
from lesionml.errors import DataError
from lesionml.inference import predict_proba
from lesionml.models import build_model
from lesionml.models.patient import PRESENT, PatientStats, patient_inputs, uses_metadata, withhold_metadata
from lesionml.training import WITHHELD_COLUMNS, fit, seed_everything, seeded_construction
from tests.helpers import ROOT, config

STATS = NormStats((120.0, 100.0, 90.0), (40.0, 35.0, 30.0), 10)
SIZE = (16, 20)
PARAMS = load_params(ROOT / "params.yaml")
META = MetadataConfig(enabled=True, dense_units=8, withhold=0.3)
# Every architecture key given, so the project's params.yaml values do not matter here.
CNN = config(
    "models.cnn", filters=(4, 8), convs_per_block=1, kernel_size=3, dropout=0.0, head="global_average",
    dense_units=8, dense_dropout=0.0, metadata=META,
)  # fmt: skip
LSTM = config(
    "models.cnn_lstm", filters=(4, 8), kernel_size=3, dropout=0.0, lstm_units=4, bidirectional=True,
    dense_units=4, dense_dropout=0.0, metadata=META,
)  # fmt: skip
OFF = MetadataConfig(enabled=False, dense_units=8, withhold=0.3)


def _train_cfg(**changes):
    base = {"epochs": 2, "batch_size": 16, "learning_rate": 0.01, "warmup_epochs": 0, "ema_decay": 0.0, "seed": 3}
    return PARAMS.train.model_copy(update=base | changes)


def _patients(n: int, seed: int, sites=("back", "face")) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """Images whose class (0-3) is decided by the patient's sex and lesion site alone."""
    rng = np.random.default_rng(seed)
    sex = rng.choice(["male", "female"], n)
    site = rng.choice(list(sites), n)
    rows = pd.DataFrame(
        {
            "image_id": [f"ISIC_{seed:02d}{i:05d}" for i in range(n)],
            "age": rng.uniform(20, 80, n).round(),
            "sex": sex,
            "localization": site,
        }
    )
    labels = 2 * (sex == "male") + (site == sites[0])
    images = np.full((n, *SIZE, 3), 128, np.uint8)  # one picture for all: it says nothing of the class
    return images, rows, labels.astype(np.int64)


def _fit_on_patients(model, folder: Path, **metadata):
    """`model` fitted 8 epochs on the sex/site-decided classes (train seed 1, validation seed 2)."""
    train_x, _, train_y = _patients(256, 1)
    val_x, _, val_y = _patients(96, 2)
    seed_everything(0)
    work, out = folder / "work", folder / "model.keras"
    return fit(model, (train_x, train_y), (val_x, val_y), _train_cfg(epochs=8), work, out, n_classes=4, **metadata)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny CNN with the metadata branch trained (with withholding) on sex/site-decided classes."""
    _, train_rows, _ = _patients(256, 1)
    val_x, val_rows, val_y = _patients(96, 2)
    with seeded_construction(0):  # the same initial weights whichever tests ran before
        model = build_model("cnn", CNN, SIZE, STATS, 4, patient=PatientStats.fit(train_rows))
    folder = tmp_path_factory.mktemp("patient")
    result = _fit_on_patients(model, folder, metadata=(train_rows, val_rows), withhold=META.withhold)
    return model, result, (val_x, val_rows, val_y)


def test_the_encoding_is_fitted_on_train_rows_only_and_unseen_values_are_unknown():
    train = pd.DataFrame({"age": [30.0, 50.0, np.nan], "sex": ["male", "female", "unknown"]})
    train["localization"] = ["back", "face", "unknown"]
    stats = PatientStats.fit(train)
    assert (stats.age_mean, stats.age_variance) == (40.0, 100.0)
    assert stats.sexes == ("female", "male") and stats.localizations == ("back", "face")
    with pytest.raises(DataError, match="^train split: no image has a known localization; turn"):
        PatientStats.fit(train.assign(localization="unknown"))
    model = build_model("cnn", CNN, SIZE, STATS, 7, patient=stats)
    sites = model.get_layer("localization_onehot_train_vocabulary")
    assert sites.get_vocabulary() == ["[UNK]", "back", "face"]
    # "scalp" is a valid site seen only outside train: it lands on the unknown column, as "unknown" does
    onehot = np.asarray(sites(np.array([["scalp"], ["unknown"], ["back"], ["face"]])))
    np.testing.assert_array_equal(onehot, [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    age = model.get_layer("age_zscore_train_stats")
    np.testing.assert_allclose(np.asarray(age(np.array([[60.0]], np.float32))), [[2.0]])


def test_training_reports_withheld_validation_and_the_saved_model_predicts_as_trained(trained, tmp_path):
    import keras

    model, result, (val_x, val_rows, _) = trained
    history = pd.read_csv(result.history_path)
    assert set(WITHHELD_COLUMNS) <= set(history.columns) and history[list(WITHHELD_COLUMNS)].notna().all().all()
    loaded = keras.saving.load_model(result.model_path, safe_mode=True)
    assert uses_metadata(loaded)
    for tta in (False, True):
        for rows in (val_rows, None):
            np.testing.assert_array_equal(
                predict_proba(loaded, val_x, tta, metadata=rows), predict_proba(model, val_x, tta, metadata=rows)
            )
    # a row without any value takes the withheld path, whatever else is in the table
    empty = val_rows.assign(age=np.nan, sex="", localization=None)
    np.testing.assert_array_equal(predict_proba(loaded, val_x, metadata=empty), predict_proba(loaded, val_x))
    assert not np.allclose(predict_proba(loaded, val_x, metadata=val_rows), predict_proba(loaded, val_x))


def test_the_cnn_lstm_takes_the_branch_too_and_keeps_it_through_save_and_load_in_bfloat16(tmp_path):
    import keras

    x, rows, _ = _patients(6, 5)
    model = build_model("cnn_lstm", LSTM, SIZE, STATS, 7, "mixed_bfloat16", PatientStats.fit(rows))
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    assert uses_metadata(loaded) and loaded.get_layer("age_zscore_train_stats").dtype_policy.name == "float32"
    for metadata in (rows, None):
        proba = predict_proba(loaded, x, metadata=metadata)
        np.testing.assert_array_equal(proba, predict_proba(model, x, metadata=metadata))
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_withholding_is_seeded_and_hides_exactly_the_configured_share():
    _, rows, _ = _patients(200, 4)
    inputs = patient_inputs(rows, 200)
    assert inputs[PRESENT].all()
    first, again, other = (
        withhold_metadata(inputs, 0.3, 11),
        withhold_metadata(inputs, 0.3, 11),
        withhold_metadata(inputs, 0.3, 12),
    )
    hidden = first[PRESENT][:, 0] == 0
    assert hidden.sum() == 60
    np.testing.assert_array_equal(hidden, again[PRESENT][:, 0] == 0)
    assert not np.array_equal(hidden, other[PRESENT][:, 0] == 0)
    assert np.isnan(first["age"][hidden]).all() and (first["sex"][hidden] == "unknown").all()
    assert (first["localization"][hidden] == "unknown").all()
    np.testing.assert_array_equal(first["sex"][~hidden], inputs["sex"][~hidden])
    assert inputs[PRESENT].all(), "the epoch's copy is withheld, not the inputs"
    assert withhold_metadata(inputs, 0.0, 11)[PRESENT].all()


@pytest.mark.parametrize(
    "name,cfg,expected",
    [
        # parameter counts of these configs as built before the metadata branch existed
        ("cnn", CNN.model_copy(update={"metadata": OFF}), 591),
        ("cnn", CNN.model_copy(update={"metadata": None, "head": "flatten", "convs_per_block": (1, 2)}), 2391),
        ("cnn_lstm", LSTM.model_copy(update={"metadata": OFF}), 1967),
    ],
)
def test_a_model_without_metadata_keeps_its_architecture(name, cfg, expected):
    patient = PatientStats(40.0, 100.0, ("female", "male"), ("back", "face"))
    model = build_model(name, cfg, SIZE, STATS, 7, patient=patient)
    assert model.count_params() == expected and not uses_metadata(model)
    assert model.input_shape == (None, *SIZE, 3)
    on = build_model(name, cfg.model_copy(update={"metadata": META}), SIZE, STATS, 7, patient=patient)
    # on top: the metadata dense layer (age, missing flag, 3 + 3 one-hot columns in) and the
    # wider input of the head's dense layer (8 gated features + the presence flag)
    assert on.count_params() - expected == (8 + 1) * META.dense_units + (META.dense_units + 1) * cfg.dense_units
    with pytest.raises(ValueError, match="needs the train split's PatientStats"):
        build_model(name, cfg.model_copy(update={"metadata": META}), SIZE, STATS, 7)


@pytest.mark.parametrize(
    "column,value,problem",
    [
        ("age", 300, "rows with an age that is not a number from 0 to 120"),
        ("age", "old", "rows with an age that is not a number from 0 to 120"),
        ("sex", "x", "rows with a sex outside male, female, unknown"),
        ("localization", "belly", "rows with a localization outside the release's sites"),
    ],
)
def test_a_bad_value_is_a_one_line_error_naming_the_row(trained, tmp_path, column, value, problem):
    model, _, (val_x, val_rows, val_y) = trained
    bad = val_rows.astype({column: object})
    bad.loc[5, column] = value
    with pytest.raises(DataError) as err:
        fit(
            model,
            (val_x, val_y),
            (val_x, val_y),
            _train_cfg(),
            tmp_path / "work",
            tmp_path / "m.keras",
            n_classes=4,
            metadata=(bad, val_rows),
        )
    message = str(err.value)
    assert message.startswith(f"train split: 1 {problem}") and f"{val_rows.image_id[5]} ({str(value)!r})" in message
    assert "\n" not in message and not (tmp_path / "work").exists(), "refused before training"
    with pytest.raises(DataError, match=rf"^metadata: 1 {problem}.*: row 6 "):
        predict_proba(model, val_x, metadata=bad.drop(columns="image_id"))


def test_the_model_learns_from_the_metadata_a_model_without_it_cannot(trained, tmp_path):
    """Classes decided by sex and site alone: pixel noise carries no signal."""
    _, result, _ = trained
    best = pd.read_csv(result.history_path).iloc[result.best_epoch - 1]
    assert best.val_accuracy >= 0.9
    assert best.val_accuracy_withheld <= 0.45, "without the metadata the class is a guess (4 classes)"
    with seeded_construction(0):
        image_only = build_model("cnn", CNN.model_copy(update={"metadata": OFF}), SIZE, STATS, 4)
    fitted = _fit_on_patients(image_only, tmp_path)
    assert pd.read_csv(fitted.history_path).val_accuracy.max() <= 0.45


def test_predicted_files_say_whether_their_metadata_was_used_and_gradcam_takes_it(trained):
    import io

    from PIL import Image

    from lesionml.explain import gradcam
    from lesionml.inference import image_size, predict_images

    _, _, (val_x, val_rows, _) = trained
    model = build_model("cnn", CNN, SIZE, STATS, 7, patient=PatientStats.fit(val_rows))  # served: 7 classes
    assert image_size(model) == SIZE
    items = []
    for k in range(3):
        buf = io.BytesIO()
        Image.fromarray(val_x[k]).save(buf, format="PNG")
        items.append((f"img{k}.png", buf.getvalue()))
    rows = val_rows.head(3)[["age", "sex", "localization"]].astype(object).reset_index(drop=True)
    rows.loc[2, ["age", "sex", "localization"]] = [np.nan, "", ""]
    answers = predict_images(model, items, metadata=rows)
    assert [a.metadata for a in answers] == ["used", "used", "withheld"]
    expected = predict_proba(model, val_x[:3], metadata=rows)
    got = np.array([[a.probabilities[c] for c in a.probabilities] for a in answers])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [a.metadata for a in predict_images(model, items)] == ["withheld"] * 3
    with pytest.raises(DataError, match=r"^metadata: 1 rows with an age .*: img1.png \('300'\)$"):
        predict_images(model, items, metadata=rows.assign(age=["40", "300", ""]))
    maps = gradcam(model, val_x[:3], [0, 1, 2], metadata=rows)
    assert maps.shape == (3, *SIZE) and np.isfinite(maps).all()


def test_a_users_patient_table_is_validated_naming_the_file_and_line(tmp_path):
    from lesionml.data.metadata import read_patient_table

    path = tmp_path / "patients.csv"
    path.write_text("image_id,age,sex,localization,dx\nISIC_1,45,Male,back,nv\nISIC_2,,,,mel\n")
    table = read_patient_table(path)
    assert table.loc["ISIC_1"].tolist() == [45.0, "male", "back"]
    assert np.isnan(table.loc["ISIC_2", "age"]) and table.loc["ISIC_2", "sex"] == "unknown"
    for line, problem in (("ISIC_2,300,male,back", "an age"), ("ISIC_2,40,male,belly", "a localization")):
        path.write_text(f"image_id,age,sex,localization\nISIC_1,45,male,back\n{line}\n")
        with pytest.raises(DataError) as err:
            read_patient_table(path)
        assert str(err.value).startswith(f"{path}: 1 rows with {problem}") and "line 3 (ISIC_2)" in str(err.value)
    path.write_text("image_id,age\nISIC_1,45\nISIC_1,50\n")
    with pytest.raises(DataError, match="image_id 'ISIC_1' is on more than one line"):
        read_patient_table(path)
    path.write_text("image_id,dx\nISIC_1,nv\n")
    with pytest.raises(DataError, match="none of the columns age, sex, localization"):
        read_patient_table(path)


def test_the_training_identity_holds_the_patient_table_only_when_given():
    from lesionml.provenance import model_identity

    image_only = model_identity("cnn", PARAMS, "a", "b", "c")
    assert model_identity("cnn", PARAMS, "a", "b", "c", None) == image_only
    assert model_identity("cnn", PARAMS, "a", "b", "c", "d") not in (
        image_only,
        model_identity("cnn", PARAMS, "a", "b", "c", "e"),
    )
