"""Cross-corpus evaluation: a model trained on the SpamAssassin corpus (2002), scored on mail it
never saw the like of (issue 21).

The set is ``modern-mail.tar.gz`` (2,000 messages 2019-2026: 1,000 posts to one technical mailing
list as ham, 1,000 phishing messages from one honeypot as spam; see its README). It is for
evaluation only: never trained on, never copied into the project. It is looked for at
``$FLOODGATE_MODERN_CORPUS`` (the tarball or its unpacked ``modern/`` folder; ``off`` to skip it),
then beside the project root (``../shared/corpora/modern-mail.tar.gz``); when it is in neither place
:func:`evaluate` says so and measures nothing.

Every ham is a list post and every spam comes from one honeypot, so a model that reads the
source rather than the content looks better on it than it is: the set is scored twice, raw and
*list-stripped* (:mod:`models.liststrip`: everything a mailing list adds removed, every message
alike). Reported per view, with the model's own threshold (chosen on its training data):

* ham FP and spam recall at that threshold (what a deployment would see);
* ROC AUC, and recall at <= 0.1 % ham FPR with the threshold chosen on this set (a ranking
  measure: with 1,000 ham it is set by the second-highest ham, so +-3-5 points is noise).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models import liststrip, metrics
from models.corpus import Message

ENV = "FLOODGATE_MODERN_CORPUS"
TARBALL = "modern-mail.tar.gz"
LABELS = "labels.tsv"  # "ham/00001.eml<TAB>ham" per line
TARGET_FPR = 0.001  # the ranking measure's ham FPR, as the time split's oracle


def locate(root: Path, env: dict[str, str] | None = None) -> Path | None:
    """Where the modern set is: ``$FLOODGATE_MODERN_CORPUS``, else ``<root>/../shared/corpora/``;
    None when absent. A named path that does not exist is an error, not a silent fallback."""
    env = os.environ if env is None else env
    named = env.get(ENV)
    if named == "off":
        return None
    if named:
        path = Path(named).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{ENV}={named}: no such file or folder")
        return path
    beside = Path(root).resolve().parent / "shared" / "corpora" / TARBALL
    return beside if beside.is_file() else None


def _from_pairs(pairs: Sequence[tuple[str, bytes]], labels_text: str, where: str) -> list[Message]:
    files = dict(pairs)
    out: list[Message] = []
    for line in labels_text.splitlines():
        if not line.strip():
            continue
        name, _, label = line.partition("\t")
        label = label.strip()
        if label not in ("ham", "spam") or name not in files:
            raise ValueError(f"{where}: bad line in {LABELS}: {line!r}")
        out.append(Message(files[name], label, "modern-" + label, name))
    if not out:
        raise ValueError(f"{where}: {LABELS} lists no messages")
    return out


def load(path: Path) -> list[Message]:
    """The labelled messages of the set, from its tarball (read in memory) or its unpacked folder."""
    path = Path(path)
    if path.is_dir():
        base = path / "modern" if (path / "modern" / LABELS).is_file() else path
        text = (base / LABELS).read_text()
        names = [line.partition("\t")[0] for line in text.splitlines() if line.strip()]
        return _from_pairs([(n, (base / n).read_bytes()) for n in names if (base / n).is_file()], text, str(path))
    pairs: list[tuple[str, bytes]] = []
    text = ""
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            rel = member.name.split("/", 1)[1] if member.name.startswith("modern/") else member.name
            f = tar.extractfile(member)
            if f is None:
                continue
            data = f.read()
            if rel == LABELS:
                text = data.decode()
            else:
                pairs.append((rel, data))
    return _from_pairs(pairs, text, str(path))


def measure(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    m = metrics.metrics(y, scores, threshold, TARGET_FPR)
    c = m["confusion"]
    return {"n_ham": m["n_ham"], "n_spam": m["n_spam"], "ham_fp": c["fp"], "ham_fpr": m["ham_fpr"],
            "spam_recall": m["spam_recall"], "roc_auc": m["roc_auc"],
            "recall_at_fpr_0.001": m[f"oracle_recall_at_fpr_{TARGET_FPR:g}"]}


def evaluate(model: Any, root: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``model``: a :class:`models.registry.LoadedModel`. ``{"absent": reason}`` when the set is not
    there; else where it was read, and the measures above for ``raw`` and ``list_stripped``."""
    try:
        path = locate(root, env)
    except FileNotFoundError as e:
        return {"absent": str(e)}
    if path is None:
        if (os.environ if env is None else env).get(ENV) == "off":
            return {"absent": f"{ENV}=off: cross-corpus evaluation skipped"}
        return {"absent": f"no {TARBALL} beside the project ({Path(root).resolve().parent / 'shared' / 'corpora'}) "
                          f"and {ENV} is not set: cross-corpus evaluation skipped"}
    msgs = load(path)
    y = np.array([m.label == "spam" for m in msgs])
    raws = [m.raw for m in msgs]
    stripped = [liststrip.strip(r, strict=True) for r in raws]
    return {"path": str(path), "messages": len(msgs), "threshold": model.threshold,
            "raw": measure(y, model.score(raws), model.threshold),
            "list_stripped": measure(y, model.score(stripped), model.threshold)}


def render(report: dict[str, Any]) -> list[str]:
    if "absent" in report:
        return [f"cross-corpus (modern mail): {report['absent']}"]
    lines = [f"cross-corpus: modern mail ({report['messages']} messages, {report['path']}; trained on none of it)"]
    for key, name in (("raw", "raw"), ("list_stripped", "list-stripped")):
        m = report[key]
        lines.append(f"  {name:<13} at the threshold: ham FP {m['ham_fp']}/{m['n_ham']} ({100 * m['ham_fpr']:.1f}%)  "
                     f"spam recall {100 * m['spam_recall']:.1f}%   ROC AUC {m['roc_auc']:.4f}   "
                     f"recall at <=0.1% FPR (threshold on this set) {100 * m['recall_at_fpr_0.001']:.1f}%")
    return lines
