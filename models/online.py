"""Online learning: the model keeps learning from verdicts, one message (or batch) at a time.

The shipped update rule, :func:`update`, is *rehearsal*: each new labelled message is learned with
``partial_fit`` together with :data:`REHEARSE` messages drawn (seeded) from what the model learned
before, so a single verdict nudges the model without dragging it towards that one message, and
the SGD step sizes stay those of a fit over a mixed sample. Both users of the rule use it as is:

* :func:`learn` (``make retrain ARGS=--online``) updates the champion from feedback verdicts in
  their order, drawing from the champion's own training data (:func:`memory_for`) and from the
  verdicts learned before them;
* :func:`trec_evaluate` (``make online-eval``) is the TREC spam track's online protocol: messages
  in arrival (Date) order, each classified first, then its true label learned with :func:`update`
  from an empty model, drawing from the messages seen so far; filters are ranked by (1-ROCA)%
  over all scores.

Measured on the corpus in Date order (features v7; (1-ROCA)% on the served score / on the margin):
plain ``partial_fit`` of the shipped modified Huber model 1.90 / 0.73 (the served probability is
the margin clipped to [-1, 1]: most scores tie at 0 or 1); the same with log loss 0.24;
train-on-near-error (skip messages beyond the margin) 0.61; updating again while a message is
misclassified 0.73; rehearsal with 4 / 8 / 16 / 24 / 32 earlier messages 0.25 / 0.18 / 0.12 / 0.10 /
0.13 on the margin in an exploration (one seed each: +-0.02 is noise); as shipped (16, numpy's
seeded draw) ``make online-eval`` gives 0.128 on the served score, 0.129 on the margin: rehearsal
also ends the ties. Other seeds of the same rule: 0.118-0.135; drawing hard messages (by their
loss when they arrived) more often, two passes per update: 0.116, 0.132 (within that noise).
The TREC target (0.05 %) is not met, and no update rule will meet it alone: the batch model
trained on the whole training part ranks the time split at 0.105 (1-ROCA)%; the errors that remain
are hard_ham newsletters scored as spam and spam_2 offers scored as ham, as in the batch model.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.pipeline import Pipeline

from models import metrics
from models import pipeline as model_pipeline
from models.corpus import Message

_DATE = re.compile(rb"^Date:[ \t]*([^\r\n]*)", re.M | re.I)
CLASSES = np.array([0, 1])


REHEARSE = 16  # earlier messages learned with each new one (4: 0.25, 8: 0.18, 16: 0.12, 32: 0.13 (1-ROCA)%)
SEED = 0  # which earlier messages are drawn: fixed, so an update is reproducible


def update(clf: Any, x_new: Any, y_new: np.ndarray, memory_x: Any, memory_y: np.ndarray,
           rng: np.random.Generator, n_memory: int | None = None) -> None:
    """The shipped online update rule: learn ``x_new`` (one message, or a few) with ``partial_fit``
    together with :data:`REHEARSE` earlier messages per new one, drawn without replacement from
    the first ``n_memory`` rows (default: all) of ``memory_x`` / ``memory_y``: what the model
    learned before (may be none). Rows are drawn in place, never sliced: a stream's memory grows."""
    n_mem = 0 if memory_x is None else memory_x.shape[0] if n_memory is None else n_memory
    if n_mem:
        k = min(REHEARSE * x_new.shape[0], n_mem)
        idx = rng.choice(n_mem, size=k, replace=False) if n_mem > 4 * k else rng.permutation(n_mem)[:k]
        x_new = sp.vstack([x_new, memory_x[idx]], format="csr")
        y_new = np.concatenate([y_new, memory_y[idx]])
    clf.partial_fit(x_new, y_new, classes=CLASSES)


def memory_for(card: dict[str, Any], data_dir: Any) -> list[Message]:
    """The messages a registered model was trained on, as far as they can be read again: the
    SpamAssassin time split's training part when the base corpus trained it, and the training
    part of each operator corpus its card names (:mod:`models.corpora`)."""
    from models import corpora, splits
    from models.corpus import load_spamassassin

    spec = card.get("evaluation_set") or {"base": True, "corpora": []}
    base_all = list(load_spamassassin(data_dir)) if spec.get("base", True) or spec.get("corpora") else []
    out = splits.time_split(base_all)[0] if spec.get("base", True) else []
    if spec.get("corpora"):
        for c in corpora.read_all([corpora.Spec.parse(x) for x in spec["corpora"]], spec.get("folder_labels", {}),
                                  base=base_all, conflicts=spec.get("conflicts", "error")):
            out += corpora.holdout_split(c.messages, spec.get("holdout", corpora.HOLDOUT))[0]
    return out


def learn(pipe: Pipeline, messages: Sequence[Message], memory: Sequence[Message] = ()) -> int:
    """Update a fitted pipeline in place from labelled messages, one at a time in order, with
    :func:`update` drawing from ``memory`` (the model's training data) and the messages learned
    before; return how many were learned."""
    labelled = [m for m in messages if m.label in ("ham", "spam")]
    if not labelled:
        return 0
    clf = pipe.named_steps["clf"]
    if not hasattr(clf, "partial_fit"):
        raise TypeError(f"{type(clf).__name__} cannot learn incrementally (no partial_fit)")
    mem = [m for m in memory if m.label in ("ham", "spam")]
    x = pipe[:-1].transform([m.raw for m in [*mem, *labelled]]).tocsr()
    y = np.array([m.label == "spam" for m in [*mem, *labelled]], dtype=np.int64)
    rng = np.random.default_rng(SEED)
    for i in range(len(mem), len(mem) + len(labelled)):
        update(clf, x[i:i + 1], y[i:i + 1], x, y, rng, n_memory=i)
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
    """Classify each message in order with what was learned so far, then learn its true label with
    :func:`update` (drawing from the messages before it).

    Starts from an empty model (the first message scores 0.5). ``batch`` > 1 feeds labels back in
    groups (faster; the TREC protocol proper is 1). ``loss`` overrides the pipeline's SGD loss (an
    experiment: the shipped rule is the pipeline's own).
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
    rng = np.random.default_rng(SEED)
    x = x.tocsr()
    start = time.process_time()
    for lo in range(0, len(msgs), batch):
        hi = min(lo + batch, len(msgs))
        if lo:
            scores[lo:hi] = clf.predict_proba(x[lo:hi])[:, 1]
            margins[lo:hi] = clf.decision_function(x[lo:hi])
        else:
            scores[lo:hi] = 0.5
        update(clf, x[lo:hi], y[lo:hi], x, y, rng, n_memory=lo)
    report = metrics.metrics(y, scores, threshold)
    # modified Huber's probability is the margin clipped to [-1, 1]: most scores tie at 0 or 1, and
    # the ROC area then measures the clipping. The margin ranks the same messages without ties.
    auc = metrics.roc_auc(y, margins)
    report["one_minus_roca_pct_margin"] = 100.0 * (1.0 - auc) if auc == auc else float("nan")
    report.update(protocol=f"TREC online: classify, then learn the true label (batch {batch}, {clf.loss} loss, "
                           f"rehearsal of {REHEARSE} earlier messages per new one)",
                  order="Date header", learn_cpu_seconds=round(time.process_time() - start, 2))
    return report
