"""Thresholds for a target FPR, the metrics dict, and the promotion gates."""

from __future__ import annotations

import numpy as np
import pytest

from models import gates, metrics


def test_threshold_for_fpr_flags_at_most_the_allowed_ham() -> None:
    ham = np.linspace(0, 1, 1000)
    for target in (0.0, 0.001, 0.01, 0.1):
        t = metrics.threshold_for_fpr(ham, target)
        assert np.sum(ham >= t) <= int(target * 1000)
        assert np.sum(ham >= t) == int(target * 1000)  # and no stricter than needed
    assert metrics.threshold_for_fpr(np.array([0.2, 0.2, 0.2]), 0.0) > 0.2


def test_metrics() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.9, 0.4, 0.8, 0.95, 0.99])
    m = metrics.metrics(y, s, threshold=0.5)
    assert m["confusion"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert m["ham_fpr"] == pytest.approx(0.25) and m["spam_recall"] == pytest.approx(0.75)
    assert m["roc_auc"] == pytest.approx(14 / 16) and m["one_minus_roca_pct"] == pytest.approx(12.5)


def _m(fpr: float, recall: float) -> dict[str, float]:
    return {"ham_fpr": fpr, "spam_recall": recall}


def test_gates() -> None:
    limits = gates.Limits(max_fpr=0.001)
    assert gates.check(_m(0.0, 0.90), None, limits) == []
    assert gates.check(_m(0.0, 0.90), _m(0.0, 0.89), limits) == []
    worse_recall = gates.check(_m(0.0, 0.88), _m(0.0, 0.89), limits)
    assert len(worse_recall) == 1 and "recall" in worse_recall[0]
    worse_fpr = gates.check(_m(0.0007, 0.95), _m(0.0, 0.89), limits)
    assert len(worse_fpr) == 1 and "FPR" in worse_fpr[0]
    assert "ceiling" in gates.check(_m(0.002, 0.99), None, limits)[0]
    tolerant = gates.Limits(max_fpr=0.001, fpr_tolerance=0.001, recall_tolerance=0.02)
    assert gates.check(_m(0.0007, 0.88), _m(0.0, 0.89), tolerant) == []
    assert "floor" in gates.check(_m(0.0, 0.5), None, gates.Limits(min_recall=0.9))[0]


def test_recorded_metrics_of_a_card() -> None:
    card = {"metrics": {"time_split_test": {**_m(0.0, 0.86), "auc": 0.999}, "cross_validation": _m(0.001, 0.9)}}
    assert gates.recorded(card) == {**_m(0.0, 0.86), "auc": 0.999}
    assert gates.recorded({"metrics": {"cross_validation": _m(0.0, 0.9)}}) is None
    assert gates.recorded({}) is None
