"""Promotion gates: a candidate replaces the champion only if it is no worse on the fixed evaluation set.

The fixed set is the time split's test part (:func:`models.evaluate.fixed_eval_set`): every
model is judged on the same messages, with its own decision threshold. A champion this code can
no longer load (trained on an older feature version) is judged by the metrics its card recorded
on that same set when it was trained (:func:`recorded`), so a feature change never skips the gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    max_fpr: float = 0.001  # absolute ceiling on ham FPR: 1 in 1,000 ham quarantined is already costly
    fpr_tolerance: float = 0.0  # how much worse than the champion's FPR a candidate may be
    recall_tolerance: float = 0.0  # how much lower than the champion's spam recall a candidate may be
    min_recall: float = 0.0  # absolute floor on spam recall


def check(candidate: dict[str, Any], champion: dict[str, Any] | None, limits: Limits) -> list[str]:
    """Reasons to refuse the candidate (empty: promote). Metrics dicts as from :func:`models.metrics.metrics`."""
    reasons = []
    fpr, recall = candidate["ham_fpr"], candidate["spam_recall"]
    if fpr > limits.max_fpr:
        reasons.append(f"ham FPR {100 * fpr:.3f}% is above the ceiling {100 * limits.max_fpr:.3f}%")
    if recall < limits.min_recall:
        reasons.append(f"spam recall {100 * recall:.2f}% is below the floor {100 * limits.min_recall:.2f}%")
    if champion is not None:
        if fpr > champion["ham_fpr"] + limits.fpr_tolerance:
            reasons.append(f"ham FPR {100 * fpr:.3f}% is worse than the champion's {100 * champion['ham_fpr']:.3f}%"
                           f" (tolerance {100 * limits.fpr_tolerance:.3f}%)")
        if recall < champion["spam_recall"] - limits.recall_tolerance:
            reasons.append(f"spam recall {100 * recall:.2f}% is worse than the champion's "
                           f"{100 * champion['spam_recall']:.2f}% (tolerance {100 * limits.recall_tolerance:.2f}%)")
    return reasons


def recorded(card: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics a model card recorded on the fixed evaluation set (the time split's test part),
    or None if it has none (an online update's card copies its parent's, which still counts)."""
    found = card.get("metrics", {}).get("time_split_test")
    if isinstance(found, dict) and "ham_fpr" in found and "spam_recall" in found:
        return found
    return None
