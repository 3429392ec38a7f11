"""The fine-tuning metrics against hand counts (accuracy and macro F1, Pearson and MSE), their edges (a class only
predicted, a constant side, non-finite predictions), and which evaluation is kept as the best."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttl_core.finetune import classification_metrics, improves, regression_metrics


def test_metrics_against_hand_counts():
    m = classification_metrics([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], 3)
    # class 0: tp 1, predicted 2, actual 2 -> 0.5; class 1: tp 1, 1, 2 -> 2/3; class 2: tp 2, 3, 2 -> 0.8
    assert m["accuracy"] == pytest.approx(4 / 6) and m["f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=50), rng.normal(size=50)
    r = regression_metrics(p.tolist(), t.tolist())
    assert r["pearson"] == pytest.approx(np.corrcoef(p, t)[0, 1]) and r["mse"] == pytest.approx(np.mean((p - t) ** 2))


def test_metrics_count_a_class_that_is_only_predicted_and_handle_constant_sides():
    """Macro F1 averages over the classes in the predictions or the labels: a class predicted but never true
    scores 0 and counts; one in neither is left out. Pearson is 0, not a ZeroDivisionError, when either the
    predictions or the targets are constant."""
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 1], 4)
    # class 0: tp 1, predicted 1, actual 1 -> 1; class 1: tp 1, 1, 3 -> 0.5; class 2: tp 0, 2, 0 -> 0; class 3: none
    assert m["accuracy"] == pytest.approx(0.5) and m["f1"] == pytest.approx(1.5 / 3)
    varied = [0.3, -1.2, 2.5, 0.7]
    for p, t in ((varied, [1.5] * 4), ([1.5] * 4, varied)):
        r = regression_metrics(p, t)
        assert r["pearson"] == 0.0 and r["mse"] == pytest.approx(np.mean((np.array(p) - np.array(t)) ** 2))


def test_a_diverged_evaluation_is_never_kept_over_a_real_one():
    """Non-finite predictions score NaN, not the 0 of a constant prediction (which would beat a negative
    Pearson); a NaN score beats no best, and any score beats a NaN best (else no later epoch could be kept)."""
    for bad in (math.nan, math.inf):
        r = regression_metrics([0.3, bad, 2.5], [1.0, 2.0, 3.0])
        assert math.isnan(r["pearson"]) and math.isnan(r["mse"])
    assert improves(0.5, None, higher_is_better=True) and improves(-0.2, math.nan, higher_is_better=True)
    assert improves(3.0, math.nan, higher_is_better=False)
    assert not improves(math.nan, -0.2, higher_is_better=True) and not improves(math.nan, 3.0, higher_is_better=False)
    assert improves(0.6, 0.5, higher_is_better=True) and not improves(0.5, 0.5, higher_is_better=True)
    assert improves(0.9, 1.0, higher_is_better=False) and not improves(1.1, 1.0, higher_is_better=False)
