"""The fixed splits of the SpamAssassin corpus, and a fingerprint of any training set.

* time split: train on the older groups, test on the newer ``_2`` groups (collected later): the
  honest estimate of how a model does on mail it has not seen the like of;
* random split: 30 % of every group held out (seeded): the usual, optimistic estimate.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from models.corpus import Message

TIME_TRAIN_GROUPS = ("easy_ham", "hard_ham", "spam")
TIME_TEST_GROUPS = ("easy_ham_2", "spam_2")
RANDOM_TEST_FRACTION = 0.3
RANDOM_SEED = 20021010  # fixed: every run and every model is measured on the same held-out messages


def time_split(messages: Iterable[Message]) -> tuple[list[Message], list[Message]]:
    train, test = [], []
    for m in messages:
        if m.group in TIME_TRAIN_GROUPS:
            train.append(m)
        elif m.group in TIME_TEST_GROUPS:
            test.append(m)
    return train, test


def random_split(messages: Sequence[Message], test_fraction: float = RANDOM_TEST_FRACTION,
                 seed: int = RANDOM_SEED) -> tuple[list[Message], list[Message]]:
    """Stratified by group; deterministic for a given corpus and seed."""
    by_group: dict[str, list[Message]] = {}
    for m in messages:
        by_group.setdefault(m.group, []).append(m)
    rng = random.Random(seed)
    train, test = [], []
    for group in sorted(by_group):
        items = sorted(by_group[group], key=lambda m: m.name)
        rng.shuffle(items)
        cut = round(len(items) * test_fraction)
        test.extend(items[:cut])
        train.extend(items[cut:])
    return train, test


def fingerprint(messages: Iterable[Message]) -> dict[str, Any]:
    """Identifies a training set: sha256 over the sorted (message sha256, label) pairs, plus counts."""
    digests = []
    groups: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    for m in messages:
        digests.append(hashlib.sha256(m.raw).hexdigest() + ":" + str(m.label))
        groups[m.group] += 1
        labels[str(m.label)] += 1
    h = hashlib.sha256("\n".join(sorted(digests)).encode()).hexdigest()
    return {"sha256": h, "messages": len(digests), "labels": dict(sorted(labels.items())),
            "groups": dict(sorted(groups.items()))}
