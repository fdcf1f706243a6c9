"""Metrics (scikit-learn based), calibration, lesion bootstrap, and the evaluation plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lesionml import plots
from lesionml.data.metadata import CLASSES
from lesionml.evaluation import (
    PRIOR_TAUS,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    lesion_bootstrap,
    melanoma_operating_point,
    paired_changes,
    predictions_table,
    tune_melanoma_offset,
    tune_prior_correction,
)
from lesionml.inference import adjust_probabilities
from tests.helpers import config


def _proba(y, hit_rate, seed=0):
    rng = np.random.default_rng(seed)
    pred = np.where(rng.random(len(y)) < hit_rate, y, rng.integers(0, 7, len(y)))
    p = np.full((len(y), 7), 0.05)
    p[np.arange(len(y)), pred] = 0.7
    return p / p.sum(axis=1, keepdims=True)


def test_always_nv_scores_majority_accuracy_but_chance_balanced_accuracy():
    y = np.array([CLASSES.index("nv")] * 67 + list(range(7)) * 4 + [0] * 5)
    proba = np.zeros((len(y), 7))
    proba[:, CLASSES.index("nv")] = 1.0
    m = classification_metrics(y, proba)
    assert m["accuracy"] == pytest.approx(71 / 100)
    assert m["balanced_accuracy"] == pytest.approx(1 / 7)
    assert m["mel_sensitivity"] == 0.0 and m["mel_specificity"] == 1.0
    assert m["per_class"]["nv"]["recall"] == 1.0 and m["per_class"]["mel"]["recall"] == 0.0
    assert m["roc_auc_macro"] == pytest.approx(0.5)
    assert all(m["per_class"][c]["roc_auc"] == pytest.approx(0.5) for c in CLASSES)


def test_perfect_predictions_and_zero_calibration_error():
    y = np.repeat(np.arange(7), 5)
    proba = np.eye(7)[y]
    m = classification_metrics(y, proba)
    assert m["accuracy"] == m["balanced_accuracy"] == m["macro_f1"] == m["roc_auc_macro"] == 1.0
    assert expected_calibration_error(y, proba) == pytest.approx(0.0)


def test_overconfident_model_has_large_calibration_error():
    y = np.repeat(np.arange(7), 20)
    proba = np.full((len(y), 7), 0.001)
    proba[:, 0] = 0.994  # says akiec, sure of it, right 1 time in 7
    assert expected_calibration_error(y, proba) == pytest.approx(0.994 - 1 / 7, abs=1e-6)


def test_lesion_bootstrap_interval_brackets_the_estimate_and_grows_with_correlation():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 7, 400)
    pred = np.where(rng.random(400) < 0.7, y, (y + 1) % 7)
    independent = lesion_bootstrap(y, np.eye(7)[pred], np.arange(400), n=400)
    lo, hi = independent["accuracy"]
    assert lo < (pred == y).mean() < hi
    assert set(independent) == {
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "mel_sensitivity",
        "mel_specificity",
        "roc_auc_macro",
    }
    for low, high in independent.values():
        assert 0 <= low < high <= 1
    # The same 400 predictions, but 8 images per lesion, all right or all wrong together:
    lesions = np.repeat(np.arange(50), 8)
    y2, pred2 = np.repeat(y[:50], 8), np.repeat(pred[:50], 8)
    grouped = lesion_bootstrap(y2, np.eye(7)[pred2], lesions, n=400)
    assert np.diff(grouped["accuracy"])[0] > np.diff(independent["accuracy"])[0] * 1.5


def test_predictions_table_columns():
    rows = pd.DataFrame({"image_id": ["a", "b"], "lesion_id": ["L1", "L2"], "dx": ["mel", "nv"]})
    table = predictions_table(rows, np.eye(7)[[4, 4]])
    assert list(table.columns) == ["image_id", "lesion_id", "true", "predicted", *[f"p_{c}" for c in CLASSES]]
    assert list(table.predicted) == ["mel", "mel"]


def test_evaluation_plots_are_real_pngs(tmp_path):
    y = np.repeat(np.arange(7), 6)
    proba = _proba(y, 0.6)
    pred = proba.argmax(axis=1)
    images = np.random.default_rng(0).integers(0, 255, (len(y), 30, 40, 3), dtype=np.uint8)
    plots.confusion_matrices(y, pred, CLASSES, "t", tmp_path / "cm.png")
    plots.roc_curves(y, proba, CLASSES, "t", tmp_path / "roc.png")
    plots.reliability_diagram(y, proba, "t", tmp_path / "rel.png")
    names = [CLASSES[i] for i in y]
    plots.confident_mistakes(images, names, [CLASSES[i] for i in pred], proba.max(axis=1), "t", tmp_path / "mis.png")
    for f in ("cm", "roc", "rel", "mis"):
        with Image.open(tmp_path / f"{f}.png") as im:
            assert im.format == "PNG" and im.width > 300


def test_vectorised_bootstrap_equals_scikit_learn_on_each_resample():
    """The weighted-matrix bootstrap must give scikit-learn's numbers on the repeated images."""
    import warnings

    from sklearn import metrics as skm

    from lesionml.evaluation import _confusions, _macro_auc, _scores, lesion_resample_weights

    rng = np.random.default_rng(3)
    n = 300
    y = rng.integers(0, 7, n)
    # 21 probability rows, 3 leaning to each class; images share rows, so scores tie a lot.
    patterns = rng.dirichlet(np.ones(7), 21) + np.repeat(np.eye(7), 3, axis=0)
    patterns /= patterns.sum(axis=1, keepdims=True)
    choice = np.where(rng.random(n) < 0.7, y * 3 + rng.integers(0, 3, n), rng.integers(0, 21, n))
    proba = patterns[choice]
    lesions = rng.integers(0, 120, n)
    weights = lesion_resample_weights(lesions, 25, seed=5)
    assert (weights.sum(axis=1) > 0).all()
    pred = proba.argmax(axis=1)
    scores = _scores(_confusions(y, pred, weights))
    auc = _macro_auc(y, proba, weights)
    labels = list(range(7))
    for r, w in enumerate(weights):
        idx = np.repeat(np.arange(n), w.astype(int))
        t, p = y[idx], pred[idx]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            expect = {
                "accuracy": skm.accuracy_score(t, p),
                "balanced_accuracy": skm.balanced_accuracy_score(t, p),
                "macro_f1": skm.f1_score(t, p, labels=labels, average="macro", zero_division=0),
                "mel_sensitivity": skm.recall_score(t, p, labels=[4], average="macro", zero_division=0),
                "mel_specificity": skm.recall_score(t != 4, p != 4, zero_division=0),
            }
        for name, value in expect.items():
            assert scores[name][r] == pytest.approx(value), (name, r)
        if len(np.unique(t)) == 7:
            assert auc[r] == pytest.approx(skm.roc_auc_score(t, proba[idx], multi_class="ovr", labels=labels))
        else:
            assert np.isnan(auc[r])


def _prior_learning_model(n: int, prior: np.ndarray, seed: int, learned: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from `prior` and the probabilities of a model that folded `learned` times
    the log prior into its noisy evidence: 1, as a model trained on imbalanced data does; less,
    as one trained with class weights does."""
    rng = np.random.default_rng(seed)
    y = rng.choice(7, size=n, p=prior)
    evidence = rng.normal(0.0, 1.0, (n, 7))
    evidence[np.arange(n), y] += 1.5
    logits = evidence + learned * np.log(prior)
    proba = np.exp(logits - logits.max(axis=1, keepdims=True))
    return y, proba / proba.sum(axis=1, keepdims=True)


def _accuracy_and_balanced(y, proba):
    m = classification_metrics(y, proba)
    return m["accuracy"], m["balanced_accuracy"]


def test_prior_correction_tuned_on_val_raises_balanced_accuracy_on_unseen_test():
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    y_val, p_val = _prior_learning_model(1300, prior, seed=1)
    y_test, p_test = _prior_learning_model(1300, prior, seed=2)
    tau, offsets, floor_met = tune_prior_correction(y_val, p_val, prior)
    assert floor_met  # no floor asked for
    assert 0.5 <= tau <= 1.5  # the model carries the whole prior: about all of it should come out
    np.testing.assert_allclose(offsets, -tau * np.log(prior))
    tuned_acc, tuned_bal = _accuracy_and_balanced(y_test, adjust_probabilities(p_test, offsets=offsets))
    plain_acc, plain_bal = _accuracy_and_balanced(y_test, p_test)
    assert tuned_bal > plain_bal + 0.05
    assert tuned_acc < plain_acc  # the price, recorded beside the gain


def test_prior_correction_is_plain_argmax_when_the_prior_is_uniform():
    y, p = _prior_learning_model(500, np.full(7, 1 / 7), seed=3)
    tau, offsets, _ = tune_prior_correction(y, p, np.full(7, 1 / 7), min_balanced_accuracy=0.0)
    assert tau == 0.0  # every tau gives the same decisions; ties go to the smallest |tau|
    np.testing.assert_array_equal(adjust_probabilities(p, offsets=offsets).argmax(axis=1), p.argmax(axis=1))


def test_prior_correction_with_a_floor_buys_accuracy_and_keeps_balanced_accuracy_above_it():
    # A model that learned only a fifth of the prior (strong class weights) leans to the rare
    # classes; a floor below its balanced accuracy leaves room to lean back toward nv.
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    y_val, p_val = _prior_learning_model(3000, prior, seed=4, learned=0.2)
    y_test, p_test = _prior_learning_model(3000, prior, seed=5, learned=0.2)
    acc_val, bal_val = _accuracy_and_balanced(y_val, p_val)
    floor = bal_val - 0.05
    tau, offsets, floor_met = tune_prior_correction(y_val, p_val, prior, min_balanced_accuracy=floor)
    assert floor_met and tau < 0  # multiplied in: toward nv
    tuned_val = _accuracy_and_balanced(y_val, adjust_probabilities(p_val, offsets=offsets))
    assert tuned_val[1] >= floor and tuned_val[0] > acc_val + 0.01
    # no allowed tau is more accurate on val than the one chosen
    log_prior = np.log(prior)
    for t in PRIOR_TAUS:
        acc, bal = _accuracy_and_balanced(y_val, adjust_probabilities(p_val, offsets=-t * log_prior))
        assert bal < floor or acc <= tuned_val[0] + 1e-12, t
    assert (
        _accuracy_and_balanced(y_test, adjust_probabilities(p_test, offsets=offsets))[0]
        > _accuracy_and_balanced(y_test, p_test)[0]
    )  # the accuracy holds on unseen images


def test_prior_correction_floor_out_of_reach_keeps_plain_argmax_and_says_so():
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    y_val, p_val = _prior_learning_model(1300, prior, seed=1)
    assert tune_prior_correction(y_val, p_val, prior)[0] > 0.5  # without the floor it would move far
    tau, offsets, floor_met = tune_prior_correction(y_val, p_val, prior, min_balanced_accuracy=0.99)
    assert not floor_met and tau == 0.0
    np.testing.assert_array_equal(offsets, np.zeros(7))


def test_adjust_probabilities_renormalizes_and_defaults_are_identity():
    p = _proba(np.arange(7).repeat(3), 0.8)
    assert adjust_probabilities(p) is p
    shifted = adjust_probabilities(p, offsets=np.log([1, 1, 1, 1, 1, 1e-6, 1]))
    np.testing.assert_allclose(shifted.sum(axis=1), 1.0)
    assert (shifted.argmax(axis=1) != CLASSES.index("nv")).all()
    # The same as multiplying by exp(offsets) and renormalizing, which is what a prior correction means.
    offsets = np.log([2.0, 1, 1, 0.5, 1, 1, 3])
    expected = p * np.exp(offsets)
    np.testing.assert_allclose(adjust_probabilities(p, offsets=offsets), expected / expected.sum(1, keepdims=True))
    # T divides the log-probabilities (T = 0.5 squares them), and the offsets come after it.
    squared = p**2 / (p**2).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(adjust_probabilities(p, 0.5), squared)
    both = squared * np.exp(offsets)
    np.testing.assert_allclose(adjust_probabilities(p, 0.5, offsets), both / both.sum(1, keepdims=True))


def test_a_perfectly_separated_validation_set_gets_a_very_sharp_finite_temperature():
    y = np.arange(7).repeat(5)
    p = _proba(y, 1.0)  # always right, at 0.7 confidence: sharper is always better
    assert 0.05 <= fit_temperature(y, p) < 0.1


def _calibrated(n, seed):
    """Probabilities that are right exactly as often as they say: labels drawn from them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, 7))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = (proba.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return y, proba


@pytest.mark.parametrize("miscalibration", [0.5, 1.0, 2.5])
def test_fitted_temperature_undoes_a_known_miscalibration_without_changing_decisions(miscalibration):
    """A model whose log-probabilities are the calibrated ones divided by m (m < 1: too sharp,
    m > 1: too soft, as label smoothing leaves a model) gets T close to 1/m, which restores
    calibration on unseen data and keeps every argmax."""
    y_val, p_val = _calibrated(4000, seed=1)
    y_test, p_test = _calibrated(4000, seed=2)
    model_val = adjust_probabilities(p_val, miscalibration)
    model_test = adjust_probabilities(p_test, miscalibration)
    t = fit_temperature(y_val, model_val)
    assert t == pytest.approx(1 / miscalibration, rel=0.1)
    fixed = adjust_probabilities(model_test, t)
    np.testing.assert_array_equal(fixed.argmax(axis=1), model_test.argmax(axis=1))
    assert expected_calibration_error(y_test, fixed) < 0.03
    if miscalibration != 1.0:
        assert expected_calibration_error(y_test, model_test) > 0.06


MEL = CLASSES.index("mel")


def _mel_rates(y, proba):
    pred = proba.argmax(axis=1)
    return float((pred[y == MEL] == MEL).mean()), float((pred[y != MEL] != MEL).mean())


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
def test_melanoma_offset_reaches_the_target_on_val_with_the_fewest_false_melanomas(target):
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    y, p = _prior_learning_model(2000, prior, seed=6)
    plain_sensitivity = _mel_rates(y, p)[0]
    assert plain_sensitivity < 0.5  # the prior hides melanomas: the target needs a real move
    offset = tune_melanoma_offset(y, p, target)
    shift = np.eye(7)[MEL]
    sensitivity, specificity = _mel_rates(y, adjust_probabilities(p, offsets=offset * shift))
    assert sensitivity >= target
    # the least melanoma-leaning offset that does it: any smaller one misses the target or
    # decides every validation image the same way (it lies in the same gap between images)
    chosen = adjust_probabilities(p, offsets=offset * shift).argmax(axis=1)
    for t in np.linspace(offset - 2, offset, 200, endpoint=False):
        smaller = adjust_probabilities(p, offsets=t * shift)
        assert _mel_rates(y, smaller)[0] < target or (smaller.argmax(axis=1) == chosen).all(), t
    assert specificity < 1.0


def test_melanoma_offset_can_be_negative_when_the_model_already_finds_more_than_asked():
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    y, p = _prior_learning_model(2000, prior, seed=7)
    p = adjust_probabilities(p, offsets=3.0 * np.eye(7)[MEL])  # a model that calls melanoma freely
    before = _mel_rates(y, p)
    assert before[0] > 0.6
    offset = tune_melanoma_offset(y, p, 0.5)
    after = _mel_rates(y, adjust_probabilities(p, offsets=offset * np.eye(7)[MEL]))
    assert offset < 0 and 0.5 <= after[0] < before[0] and after[1] > before[1]  # specificity bought back


def test_melanoma_offset_without_validation_melanomas_is_a_one_line_error():
    from lesionml.errors import LesionMLError

    y = np.array([0, 5, 5, 6])
    with pytest.raises(LesionMLError, match="operating_point melanoma_sensitivity: the validation split has no mel"):
        tune_melanoma_offset(y, np.full((4, 7), 1 / 7), 0.8)


def test_melanoma_operating_point_chosen_on_val_holds_on_test_and_reports_its_cost():
    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    y_val, p_val = _prior_learning_model(3000, prior, seed=8)
    y_test, p_test = _prior_learning_model(3000, prior, seed=9)
    lesions = np.arange(3000) // 2  # two images per lesion
    point = melanoma_operating_point({"val": y_val, "test": y_test}, {"val": p_val, "test": p_test}, lesions, 0.8, 300)
    assert point["mel_sensitivity_target"] == 0.8
    shifted = adjust_probabilities(p_test, offsets=point["melanoma_offset"] * np.eye(7)[MEL])
    sensitivity, specificity = _mel_rates(y_test, shifted)
    assert sensitivity > 0.7  # chosen on val; unseen test lands near the target
    base = point["base"]["test"]
    assert base["mel_sensitivity"] == pytest.approx(_mel_rates(y_test, p_test)[0])
    change = point["test_change"]
    assert change["mel_sensitivity"]["change"] == pytest.approx(sensitivity - base["mel_sensitivity"])
    assert change["mel_specificity"]["change"] == pytest.approx(specificity - base["mel_specificity"])
    assert change["accuracy"]["change"] < 0  # the price: more nv called melanoma
    for key in ("mel_sensitivity", "mel_specificity", "accuracy", "balanced_accuracy"):
        lo, hi = change[key]["ci95"]
        assert lo <= change[key]["change"] <= hi


def test_paired_changes_of_identical_decisions_are_exactly_zero():
    y = np.arange(7).repeat(20)
    pred = np.where(np.arange(len(y)) % 3 == 0, 5, y)
    changes = paired_changes(y, pred, pred, np.arange(len(y)), n=200)
    assert all(c["change"] == 0 and c["ci95"] == (0.0, 0.0) for c in changes.values())


def test_the_melanoma_operating_point_is_served_and_stated_in_the_model_card():
    """The stage's rule record end to end: offsets the served model applies reach the target on val,
    and the model card says which rule it is, with the test cost and its intervals."""
    import pandas as pd

    from lesionml import model_card
    from lesionml.model_stages import _decision_rule

    prior = np.array([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02])
    labels, raw = {}, {}
    for which, seed in (("train", 10), ("val", 11), ("test", 12)):
        labels[which], raw[which] = _prior_learning_model(1500, prior, seed=seed)
    rows = pd.DataFrame(
        {
            "split": np.repeat(["train", "val", "test"], 1500),
            "dx": [CLASSES[k] for k in np.concatenate(list(labels.values()))],
            "lesion_id": np.arange(4500) // 2,
        }
    )
    del labels["train"], raw["train"]
    cfg = config(
        "evaluate",
        bootstrap=200,
        prior_correction=True,
        temperature_scaling=True,
        min_balanced_accuracy=0.65,
        operating_point="melanoma_sensitivity",
        mel_sensitivity_target=0.8,
    )
    decision = _decision_rule(cfg, rows, labels, raw)
    served = {s: adjust_probabilities(p, decision["temperature"], decision["offsets"]) for s, p in raw.items()}
    assert _mel_rates(labels["val"], served["val"])[0] >= 0.8
    assert decision["operating_point"] == "melanoma_sensitivity" and decision["prior_correction"]
    assert decision["rule"].startswith(f"prior correction tau {decision['tau']:.2f}")
    assert "chosen for validation melanoma sensitivity >= 0.80" in decision["rule"]

    metrics = {"decision": decision}
    for which, p in served.items():
        lesions = rows[rows.split == which].lesion_id.to_numpy()
        metrics[which] = {
            **classification_metrics(labels[which], p),
            "ece": expected_calibration_error(labels[which], p),
            "ci95": lesion_bootstrap(labels[which], p, lesions, 200),
        }
    summary = {"model": "cnn", "parameters": 1000, "image_size": [75, 100], "epochs_run": 3, "best_epoch": 2}
    release = {"images": 4500, "lesions": 2250, "fingerprint": "f" * 16}
    card = model_card.render("lesionml", "3", summary, metrics, release, "", {"architecture": "cnn"})
    assert "**Operating point: melanoma sensitivity.**" in card
    assert f"melanoma sensitivity {metrics['test']['mel_sensitivity']:.3f} (95% CI" in card
    assert f"accuracy {decision['test_change']['accuracy']['change']:+.3f} (95% CI" in card
    assert f"The served model applies: {decision['rule']}." in card
