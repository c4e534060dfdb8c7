"""The model on the real corpus: it must not lean on collection artefacts or forgeable verdicts.

Needs the SpamAssassin corpus (`make data`); skipped with that reason when it is absent.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import Pipeline

from models import explain, splits
from models import pipeline as model_pipeline
from models.corpus import Message, load_spamassassin
from pipeline.core import config

# The corpus's collection artefacts (anonymised addresses, the collector's hosts, list software,
# routing headers, the year it was collected): none may be among the strongest features.
ARTEFACTS = re.compile(r"taint|zzzz|netnoteinc|jmason|slashnull|2002|delivered|received|listinfo|mailman"
                       r"|return-path|x-spam|barracuda")


@pytest.fixture(scope="module")
def corpus() -> list[Message]:
    data = config.load().paths.data
    try:
        return list(load_spamassassin(data))
    except FileNotFoundError:
        pytest.skip(f"the SpamAssassin corpus is not in {data}: run `make data`")


@pytest.fixture(scope="module")
def fitted(corpus: list[Message]) -> Pipeline:
    train, _ = splits.time_split(corpus)
    pipe = model_pipeline.build()
    pipe.fit([m.raw for m in train], np.array([m.label == "spam" for m in train], dtype=int))
    return pipe


def test_time_split_ranks_well(corpus: list[Message], fitted: Pipeline) -> None:
    _, test = splits.time_split(corpus)
    scores = fitted.predict_proba([m.raw for m in test])[:, 1]
    assert roc_auc_score([m.label == "spam" for m in test], scores) > 0.995


def test_top_features_are_not_collection_artefacts(corpus: list[Message], fitted: Pipeline) -> None:
    train, _ = splits.time_split(corpus)
    top = explain.top_features(fitted, [m.raw for m in train], n=50)
    strongest = [tok for side in ("spam", "ham") for tok, _ in top[side]]
    assert len(strongest) == 100
    leaked = [t for t in strongest if ARTEFACTS.search(t)]
    assert leaked == []


def test_forged_verdicts_do_not_change_scores(corpus: list[Message], fitted: Pipeline) -> None:
    _, test = splits.time_split(corpus)
    sample = test[::50]
    raws = [m.raw for m in sample]
    forged_yes = [b"X-Spam-Flag: YES\nX-Spam-Status: Yes, score=42.0\nX-Barracuda-Spam-Status: Yes\n" + r
                  for r in raws]
    forged_no = [b"X-Spam-Flag: NO\nX-Spam-Status: No, score=-99\nX-Barracuda-Spam-Score: 0.00\n" + r for r in raws]
    tagged = [re.sub(rb"(?m)^Subject: ?", b"Subject: [SPAM] ", r, count=1) for r in raws]
    base = fitted.predict_proba(raws)[:, 1]
    for variant in (forged_yes, forged_no, tagged):
        assert np.array_equal(fitted.predict_proba(variant)[:, 1], base)
