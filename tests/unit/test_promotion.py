"""The promotion rule as a pure function of test predictions: no MLflow, no registry."""

from __future__ import annotations

import numpy as np
import pytest

from lesionml.config import RegistryConfig
from lesionml.model_stages import Contender, decide_promotion

RULE = RegistryConfig(model_name="lesionml", promotion_metric="balanced_accuracy", alpha=0.05, bootstrap=1000)
LABELS = np.repeat(np.arange(7), 10)  # 7 classes, 10 lesions each, one image per lesion
LESIONS = np.array([f"HAM_{i:04d}" for i in range(len(LABELS))])
PERFECT = LABELS.copy()


def weak(wrong_per_class: int) -> np.ndarray:
    """The labels with the first `wrong_per_class` images of every class called the next class."""
    pred = LABELS.copy()
    for c in range(7):
        at = np.flatnonzero(LABELS == c)[:wrong_per_class]
        pred[at] = (c + 1) % 7
    return pred


def decide(challenger: np.ndarray, champion: np.ndarray | None, rule: RegistryConfig = RULE) -> dict:
    return decide_promotion(
        LABELS,
        LESIONS,
        Contender("3", challenger),
        None if champion is None else Contender("1", champion),
        rule,
        seed=42,
    )


def test_the_first_model_becomes_champion():
    d = decide(weak(5), None)
    assert d == {
        "metric": "balanced_accuracy",
        "alpha": 0.05,
        "promote": True,
        "reason": "no champion yet: the first model becomes champion",
    }


def test_a_clearly_better_challenger_is_promoted():
    d = decide(PERFECT, weak(5))
    assert d["promote"] is True
    assert d["delta"] == pytest.approx(0.5)
    assert d["p_value"] < 0.01 and d["champion"] == {"version": "1"}
    assert d["reason"] == (
        f"challenger v3 beats champion v1 on test balanced_accuracy: +0.500, one-sided p={d['p_value']:.3f} (alpha 0.05)"
    )


def test_an_equal_challenger_is_not_promoted():
    d = decide(weak(2), weak(2))
    assert d["promote"] is False and d["delta"] == 0.0 and d["p_value"] == 1.0
    assert d["reason"].startswith("challenger v3 does not beat champion v1 on test balanced_accuracy: +0.000")


def test_a_worse_challenger_is_not_promoted():
    d = decide(weak(5), PERFECT)
    assert d["promote"] is False and d["delta"] == pytest.approx(-0.5) and d["p_value"] > 0.99


def test_a_better_score_within_the_noise_is_not_promoted():
    """One more test image right is a higher score, not evidence: the bootstrap says so."""
    champion = weak(1)
    challenger = champion.copy()
    challenger[0] = LABELS[0]
    d = decide(challenger, champion)
    assert d["delta"] > 0 and d["p_value"] >= 0.05 and d["promote"] is False


def test_the_rule_judges_on_its_configured_metric_and_alpha():
    """Seven more test images right out of 70: significant at 0.05, not at 0.001."""
    by_accuracy = RULE.model_copy(update={"promotion_metric": "accuracy"})
    loose = decide(weak(3), weak(4), by_accuracy)
    strict = decide(weak(3), weak(4), by_accuracy.model_copy(update={"alpha": 0.001}))
    assert loose["metric"] == "accuracy" and loose["delta"] == pytest.approx(0.1)
    assert loose["p_value"] == strict["p_value"] and 0.001 < loose["p_value"] < 0.05
    assert loose["promote"] is True and strict["promote"] is False
