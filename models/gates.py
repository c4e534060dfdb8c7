"""Promotion gates: a candidate replaces the champion only if it is no worse on the fixed evaluation set.

The evaluation set is the one the candidate's card names (:func:`models.evaluate.eval_set_for`):
the time split's test part for a model trained on the base corpus, plus the held-out newest part
of each operator corpus it was trained with (:mod:`models.corpora`). Candidate and champion are
judged on the same messages, each with its own decision threshold. A champion this code can
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


def recorded(card: dict[str, Any], eval_sha256: str | None = None, base_sha256: str | None = None
             ) -> dict[str, Any] | None:
    """The metrics a model card recorded on an evaluation set, or None if it has none for it (an
    online update's card copies its parent's, which still counts).

    ``eval_sha256``: the fingerprint of the set asked about (:func:`models.evaluate.eval_set_for`);
    ``base_sha256``: that of the time split's test part. A card answers with its
    ``evaluation_set`` metrics when its own set has that fingerprint, and with its
    ``time_split_test`` metrics when the time split's test part is asked about (or nothing is said)."""
    m = card.get("metrics", {})
    if eval_sha256 is not None and card.get("evaluation_set", {}).get("sha256") == eval_sha256:
        found = m.get("evaluation_set")
    elif eval_sha256 is None or eval_sha256 == base_sha256:
        found = m.get("time_split_test")
    else:
        found = None
    if isinstance(found, dict) and "ham_fpr" in found and "spam_recall" in found:
        return found
    return None
