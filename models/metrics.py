"""Spam filter metrics: ham false-positive rate, spam recall, ROC AUC, (1-ROCA)%, and thresholds.

A false positive (ham called spam) costs far more than a missed spam, so the decision threshold
is chosen for a target ham false-positive rate, not left at 0.5.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score


def threshold_for_fpr(ham_scores: np.ndarray, target_fpr: float) -> float:
    """The lowest threshold at which at most ``target_fpr`` of these ham scores reach it (score >= t)."""
    ham = np.sort(np.asarray(ham_scores, dtype=np.float64))[::-1]
    if ham.size == 0:
        return 0.5
    allowed = math.floor(target_fpr * ham.size + 1e-9)  # how many ham may be flagged
    if allowed >= ham.size:
        return 0.0
    return float(np.nextafter(ham[allowed], np.inf))


def recall_at_fpr(y: np.ndarray, scores: np.ndarray, target_fpr: float) -> float:
    """Spam recall with the threshold chosen on this very set (an oracle: an upper bound, for comparison)."""
    y = np.asarray(y).astype(bool)
    t = threshold_for_fpr(scores[~y], target_fpr)
    return float(np.mean(scores[y] >= t)) if y.any() else math.nan


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC area, or NaN when ``y`` holds one class only."""
    y = np.asarray(y).astype(bool)
    return float(roc_auc_score(y, scores)) if y.any() and (~y).any() else math.nan


def metrics(y: np.ndarray, scores: np.ndarray, threshold: float, target_fpr: float = 0.001) -> dict[str, Any]:
    """``y``: 1/True for spam. All rates are fractions in [0, 1]; ``one_minus_roca_pct`` is a percentage."""
    y = np.asarray(y).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    flagged = scores >= threshold
    tp = int(np.sum(flagged & y))
    fp = int(np.sum(flagged & ~y))
    fn = int(np.sum(~flagged & y))
    tn = int(np.sum(~flagged & ~y))
    both = bool(y.any() and (~y).any())
    auc = float(roc_auc_score(y, scores)) if both else math.nan
    return {
        "n_ham": tn + fp,
        "n_spam": tp + fn,
        "threshold": threshold,
        "ham_fpr": fp / (tn + fp) if tn + fp else math.nan,
        "spam_recall": tp / (tp + fn) if tp + fn else math.nan,
        "roc_auc": auc,
        "one_minus_roca_pct": 100.0 * (1.0 - auc) if both else math.nan,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        f"oracle_recall_at_fpr_{target_fpr:g}": recall_at_fpr(y, scores, target_fpr) if both else math.nan,
    }


def summary(m: dict[str, Any]) -> str:
    c = m["confusion"]
    return (f"ham FPR {100 * m['ham_fpr']:.3f}% ({c['fp']}/{m['n_ham']})  spam recall {100 * m['spam_recall']:.2f}% "
            f"({c['tp']}/{m['n_spam']})  ROC AUC {m['roc_auc']:.5f}  (1-ROCA) {m['one_minus_roca_pct']:.3f}%  "
            f"threshold {m['threshold']:.4f}")
