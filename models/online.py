"""Online learning: the model keeps learning from verdicts, one message (or batch) at a time.

* :func:`learn` feeds labelled messages to a fitted pipeline's classifier with ``partial_fit``
  (the hashing vectorizer is stateless, so nothing else needs refitting);
* :func:`trec_evaluate` is the TREC spam track's online protocol: messages in arrival order, each
  classified first, then its true label fed back; filters are ranked by (1-ROCA)% over all scores.
  Measured on the corpus in Date order: (1-ROCA) 0.25 % with log loss, 1.33 % with the batch
  model's modified Huber loss (its clipped scores tie a lot while the model is young), hence the
  ``loss`` option. Features v7 (issue 21: word tokens + byte 4-grams): 0.24 % with log loss; with
  modified Huber 1.90 % on the clipped probability (most scores tie at 0 or 1) and 0.73 % on the
  margin (``one_minus_roca_pct_margin``: the same model, ranked without ties). The TREC target
  (0.05 %) is not met: the errors that remain after the first thousand messages are hard_ham
  newsletters scored as spam and spam scored as ham, as in the batch model.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from models import metrics
from models import pipeline as model_pipeline
from models.corpus import Message

_DATE = re.compile(rb"^Date:[ \t]*([^\r\n]*)", re.M | re.I)
CLASSES = np.array([0, 1])


def learn(pipe: Pipeline, messages: Sequence[Message]) -> int:
    """Update a fitted pipeline in place from labelled messages; return how many were learned."""
    labelled = [m for m in messages if m.label in ("ham", "spam")]
    if not labelled:
        return 0
    clf = pipe.named_steps["clf"]
    if not hasattr(clf, "partial_fit"):
        raise TypeError(f"{type(clf).__name__} cannot learn incrementally (no partial_fit)")
    x = pipe[:-1].transform([m.raw for m in labelled])
    clf.partial_fit(x, np.array([m.label == "spam" for m in labelled], dtype=np.int64), classes=CLASSES)
    return len(labelled)


def arrival_time(raw: bytes) -> float | None:
    """The message's Date header as a unix time, or None when absent or unparseable."""
    m = _DATE.search(raw, 0, 32_000)
    if not m:
        return None
    try:
        return parsedate_to_datetime(m.group(1).decode("latin-1").strip()).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def chronological(messages: Sequence[Message]) -> list[Message]:
    """Messages by Date header; an undated message keeps the time of the one before it in corpus order."""
    keyed = []
    last = float("-inf")
    for i, m in enumerate(messages):
        t = arrival_time(m.raw)
        last = t if t is not None else last
        keyed.append((last, i, m))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [m for _, _, m in keyed]


def trec_evaluate(messages: Sequence[Message], batch: int = 1, threshold: float = 0.5,
                  loss: str | None = None) -> dict[str, Any]:
    """Classify each message in order with what was learned so far, then learn its true label.

    Starts from an empty model (the first message scores 0.5). ``batch`` > 1 feeds labels back in
    groups (faster; the TREC protocol proper is 1). ``loss`` overrides the pipeline's SGD loss.
    """
    msgs = [m for m in messages if m.label in ("ham", "spam")]
    pipe = model_pipeline.build()
    x = pipe[:-1].transform([m.raw for m in msgs])  # stateless steps: all at once, then learn in order
    y = np.array([m.label == "spam" for m in msgs], dtype=np.int64)
    clf = pipe.named_steps["clf"]
    if loss:
        clf.set_params(loss=loss)
    scores = np.empty(len(msgs))
    margins = np.zeros(len(msgs))
    start = time.process_time()
    for lo in range(0, len(msgs), batch):
        hi = min(lo + batch, len(msgs))
        if lo:
            scores[lo:hi] = clf.predict_proba(x[lo:hi])[:, 1]
            margins[lo:hi] = clf.decision_function(x[lo:hi])
        else:
            scores[lo:hi] = 0.5
        clf.partial_fit(x[lo:hi], y[lo:hi], classes=CLASSES)
    report = metrics.metrics(y, scores, threshold)
    # modified Huber's probability is the margin clipped to [-1, 1]: most scores tie at 0 or 1, and
    # the ROC area then measures the clipping. The margin ranks the same messages without ties.
    auc = metrics.roc_auc(y, margins)
    report["one_minus_roca_pct_margin"] = 100.0 * (1.0 - auc) if auc == auc else float("nan")
    report.update(protocol=f"TREC online: classify, then learn the true label (batch {batch}, {clf.loss} loss)",
                  order="Date header", learn_cpu_seconds=round(time.process_time() - start, 2))
    return report
