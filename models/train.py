"""Training: fit the pipeline, pick the decision threshold for a target ham FPR, register the model.

The threshold comes from out-of-fold scores on the training set (k-fold cross-validation, repeated
with different fold seeds), so it is not tuned on the evaluation set. MailText is stateless, so
messages are tokenized once and only the hashing + classifier steps are refitted per fold.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats.mstats import hdquantiles
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline

from models import gates, metrics, registry, splits
from models import pipeline as model_pipeline
from models.corpus import Message

TARGET_FPR = 0.001  # at most 1 ham in 1,000 called spam on the training folds
FOLDS = 5
# At 0.1 % the threshold is set by the few highest out-of-fold ham scores (of 2,750 training ham: the
# 3rd-highest, hard_ham newsletters), and which fold such a newsletter lands in moves its score: one
# 5-fold split gave 0.55-0.73 over 300 fold seeds (sd 0.037). The ham scores of REPEATS splits
# (fold seeds 0..REPEATS-1) are pooled and the quantile is the Harrell-Davis estimate (a weighted
# mean of the top order statistics, not one of them): sd 0.016 over 100 seed sets, the same mean
# level; 5 repeats were no steadier. Costs REPEATS x the cross-validation time (BENCHMARKS.md).
REPEATS = 3
# Never call spam what the model itself finds more likely ham. On cleanly separable training data
# the highest out-of-fold ham score can be ~0.0001, and a threshold just above it would flag new ham.
MIN_THRESHOLD = 0.5


@dataclass
class Trained:
    pipeline: Pipeline
    threshold: float
    cv: dict[str, Any]  # out-of-fold metrics at the chosen threshold, the repeats pooled (counts x REPEATS)
    fingerprint: dict[str, Any]
    seconds: float


def labelled(messages: Iterable[Message]) -> list[Message]:
    return [m for m in messages if m.label in ("ham", "spam")]


def targets(messages: Sequence[Message]) -> np.ndarray:
    return np.array([m.label == "spam" for m in messages], dtype=np.int64)


def threshold_for(ham_scores: np.ndarray, target_fpr: float) -> float:
    """The Harrell-Davis estimate of the ham scores' 1 - ``target_fpr`` quantile, raised where needed
    so that at most ``target_fpr`` of them reach it (:func:`metrics.threshold_for_fpr`: on a small
    set the estimate falls below the highest ham), and never below MIN_THRESHOLD."""
    smooth = float(hdquantiles(np.asarray(ham_scores, dtype=np.float64), prob=[1 - target_fpr])[0])
    return max(smooth, metrics.threshold_for_fpr(ham_scores, target_fpr), MIN_THRESHOLD)


def fit(messages: Iterable[Message], *, target_fpr: float = TARGET_FPR, folds: int = FOLDS,
        repeats: int = REPEATS, alpha: float = model_pipeline.ALPHA) -> Trained:
    """Fit on the labelled messages; threshold from the out-of-fold scores of ``repeats`` k-fold
    splits, pooled (:func:`threshold_for`). Needs 2+ ham and 2+ spam."""
    start = time.perf_counter()
    msgs = labelled(messages)
    y = targets(msgs)
    n_spam, n_ham = int(y.sum()), int(len(y) - y.sum())
    if min(n_spam, n_ham) < 2:
        raise ValueError(f"need at least 2 ham and 2 spam to train, got {n_ham} ham and {n_spam} spam")
    pipe = model_pipeline.build(alpha=alpha)
    mail, rest = pipe.steps[0][1], Pipeline(pipe.steps[1:])
    docs = mail.fit(None).transform([m.raw for m in msgs])
    k = min(folds, n_spam, n_ham)
    oof = np.concatenate([
        cross_val_predict(rest, docs, y, cv=StratifiedKFold(n_splits=k, shuffle=True, random_state=seed),
                          method="predict_proba")[:, 1]
        for seed in range(repeats)])
    y_oof = np.tile(y, repeats)  # every message once per repeat
    threshold = threshold_for(oof[y_oof == 0], target_fpr)
    rest.fit(docs, y)  # the same estimator objects as in `pipe`: the whole pipeline is now fitted
    return Trained(pipe, threshold, metrics.metrics(y_oof, oof, threshold, target_fpr), splits.fingerprint(msgs),
                   time.perf_counter() - start)


def score(pipe: Pipeline, messages: Sequence[Message]) -> np.ndarray:
    return pipe.predict_proba([m.raw for m in messages])[:, list(pipe.classes_).index(1)]


def library_versions() -> dict[str, str]:
    import numpy
    import scipy
    import sklearn
    import skops

    return {"python": platform.python_version(), "scikit-learn": sklearn.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "skops": skops.__version__}


DIGEST_HEX = 12  # per training message on the card: 48 bits, no accidental match among millions


def training_digests(messages: Iterable[Message]) -> str:
    """What the card keeps to tell later whether a message was trained on (:func:`models.corpora.digest`
    prefixes, space-separated, sorted): ``evaluate --corpus`` leaves such messages out."""
    from models.corpora import digest

    return " ".join(sorted({digest(m.raw)[:DIGEST_HEX] for m in messages}))


def card_for(trained: Trained, target_fpr: float, **extra: Any) -> dict[str, Any]:
    return {
        "threshold": trained.threshold,
        "target_fpr": target_fpr,
        "threshold_from": f"Harrell-Davis {1 - target_fpr:g} quantile of the ham's {FOLDS}-fold out-of-fold scores "
                          f"on the training set, {REPEATS} repeats (fold seeds 0-{REPEATS - 1}) pooled",
        "training_data": trained.fingerprint,
        "metrics": {"cross_validation": trained.cv},
        "features": model_pipeline.settings(trained.pipeline),
        "libraries": library_versions(),
        "train_seconds": round(trained.seconds, 2),
        **extra,
    }


def train_and_register(messages: Iterable[Message], registry_dir: Path, *, promote: bool = False,
                       target_fpr: float = TARGET_FPR) -> str:
    """Train on ``messages`` (unlabelled ones are skipped), register, optionally promote; return the version.

    A few hundred messages train in a few seconds: tests use this to make a real model.
    """
    trained = fit(messages, target_fpr=target_fpr)
    version = registry.register(trained.pipeline, card_for(trained, target_fpr), Path(registry_dir))
    if promote:
        registry.promote(Path(registry_dir), version)
    return version


def _usable_champion(registry_dir: Path) -> bool:
    """Is there a champion that loads (checksums, trusted types, this code's feature version)?"""
    try:
        registry.load_champion(registry_dir)
    except (registry.ModelNotFound, registry.ModelIntegrityError):
        return False
    return True


def recorded_metrics(registry_dir: Path, version: str, eval_sha: str | None = None,
                     base_sha: str | None = None) -> dict[str, Any] | None:
    """The metrics ``version``'s card recorded on an evaluation set (default: the time split's test
    part; see :func:`models.gates.recorded`), without loading the model (one this code cannot load
    still tells them); None if it recorded none for that set or is damaged."""
    try:
        return gates.recorded(registry.read_card(registry_dir, version), eval_sha, base_sha)
    except (registry.ModelNotFound, registry.ModelIntegrityError):  # a damaged artifact records nothing trustworthy
        return None


def _refusals(registry_dir: Path, time_eval: dict[str, Any], eval_sha: str | None = None,
              base_sha: str | None = None) -> list[str]:
    """Why a new model must not replace an unusable champion: the gates against the metrics the
    champion's card recorded on the same evaluation set (none when there is no champion at all, or
    it recorded nothing: then there is nothing in service to protect)."""
    version = registry.champion_version(registry_dir)
    reference = recorded_metrics(registry_dir, version, eval_sha, base_sha) if version else None
    if reference is None:
        return []
    return [f"{r} ({version}, as its card recorded)" for r in gates.check(time_eval, reference, gates.Limits())]


def train_corpus(data_dir: Path, registry_dir: Path, *, target_fpr: float = TARGET_FPR,
                 promote_if_first: bool = True) -> tuple[str, dict[str, Any], bool, list[str]]:
    """``make train``: fit on the time split's training part, measure on its test part, record a random
    split too, register; promote when there is no usable champion (none, or one this code cannot
    load, e.g. trained on an older feature version, if the new model passes the gates against the
    metrics that champion's card recorded). Returns (version, card, promoted, reasons refused)."""
    from models.corpus import load_spamassassin

    corpus = list(load_spamassassin(data_dir))
    train, test = splits.time_split(corpus)
    trained = fit(train, target_fpr=target_fpr)
    time_eval = metrics.metrics(targets(test), score(trained.pipeline, test), trained.threshold, target_fpr)
    r_train, r_test = splits.random_split(corpus)
    r_trained = fit(r_train, target_fpr=target_fpr)
    random_eval = metrics.metrics(targets(r_test), score(r_trained.pipeline, r_test), r_trained.threshold, target_fpr)
    test_sha = splits.fingerprint(test)["sha256"]
    card = card_for(trained, target_fpr, split={
        "name": "time", "train_groups": list(splits.TIME_TRAIN_GROUPS), "test_groups": list(splits.TIME_TEST_GROUPS)},
        corpora=[], evaluation_set={"base": True, "corpora": [], "sha256": test_sha, "messages": len(test),
                                    "description": "the SpamAssassin time split's test part (easy_ham_2 + spam_2)"},
        training_digests=training_digests(train))
    card["metrics"]["time_split_test"] = time_eval
    card["metrics"]["evaluation_set"] = time_eval
    card["metrics"]["random_split"] = {
        "note": "a separate fit on a stratified random 70 % (seed fixed), measured on the other 30 %",
        "test_fraction": splits.RANDOM_TEST_FRACTION, "seed": splits.RANDOM_SEED,
        "training_data": r_trained.fingerprint, **random_eval}
    return _register(trained, card, registry_dir, time_eval, test_sha, test_sha, promote_if_first)


def _register(trained: Trained, card: dict[str, Any], registry_dir: Path, eval_metrics: dict[str, Any],
              eval_sha: str, base_sha: str | None, promote_if_first: bool
              ) -> tuple[str, dict[str, Any], bool, list[str]]:
    version = registry.register(trained.pipeline, card, registry_dir)
    refused: list[str] = []
    promoted = promote_if_first and not _usable_champion(registry_dir)
    if promoted:
        refused = _refusals(registry_dir, eval_metrics, eval_sha, base_sha)
        promoted = not refused
    if promoted:
        registry.promote(registry_dir, version)
    return version, registry.load(registry_dir, version).card, promoted, refused


def train_corpora(specs: Sequence[Any], data_dir: Path, registry_dir: Path, *, with_base: bool = True,
                  folder_labels: dict[str, str] | None = None, holdout: float | None = None,
                  conflicts: str = "error", target_fpr: float = TARGET_FPR, promote_if_first: bool = True,
                  echo: Any = print) -> tuple[str, dict[str, Any], bool, list[str]]:
    """``make train CORPUS=...``: fit on the operator's corpora (:mod:`models.corpora`, each less its
    newest ``holdout`` by Date) and, ``with_base``, the time split's training part; measure on the
    evaluation set (the held-out parts, and the time split's test part with the base); register;
    promote as :func:`train_corpus` does. Raises :class:`models.corpora.CorpusError` with the reason
    for a corpus that cannot be used; prints counted warnings through ``echo``."""
    from models import corpora as oc
    from models.corpus import load_spamassassin

    holdout = oc.HOLDOUT if holdout is None else holdout
    if not 0 <= holdout < 1:
        raise oc.CorpusError(f"--holdout must be in [0, 1), got {holdout}")
    base_all = list(load_spamassassin(data_dir)) if with_base else []
    base_train, base_test = splits.time_split(base_all)
    read = oc.read_all(specs, folder_labels, base=base_all, conflicts=conflicts)
    for line in oc.warnings_text(read):
        echo(line)
    train_msgs, held_msgs = list(base_train), list(base_test)
    records: list[dict[str, Any]] = []
    held_by: dict[str, list[Message]] = {}
    for c in read:
        tr, held = oc.holdout_split(c.messages, holdout)
        train_msgs += tr
        held_msgs += held
        held_by[str(c.spec)] = held
        records.append({**c.summary(), "trained_on": len(tr), "held_out": len(held)})
    operator = [m for c in read for m in c.messages]
    if not operator:
        raise oc.CorpusError("no message of the corpora is left to train on: " + "; ".join(oc.warnings_text(read)))
    if not with_base:
        oc.require_both_labels(operator, "the operator corpora (--no-base)")
    elif {m.label for m in operator} != {"ham", "spam"}:
        echo(f"warning: the corpora given hold only {operator[0].label}: the other label comes from the "
             "base corpus alone")
    oc.require_both_labels(train_msgs, "the training set")
    if not held_msgs:
        raise oc.CorpusError("nothing to measure the model on: --holdout 0 with --no-base leaves no evaluation set")
    trained = fit(train_msgs, target_fpr=target_fpr)
    y_eval = targets(held_msgs)
    s_eval = score(trained.pipeline, held_msgs)
    eval_metrics = metrics.metrics(y_eval, s_eval, trained.threshold, target_fpr)
    eval_sha = splits.fingerprint(held_msgs)["sha256"]
    base_sha = splits.fingerprint(base_test)["sha256"] if with_base else None
    parts = (["the SpamAssassin time split's test part"] if with_base else []) + [
        f"{spec}: newest {100 * holdout:.0f} % by Date ({len(h)})" for spec, h in held_by.items()]
    card = card_for(trained, target_fpr, corpora=records,
                    base={"corpus": "spamassassin", "groups": list(splits.TIME_TRAIN_GROUPS)} if with_base else None,
                    evaluation_set={"base": with_base, "corpora": [str(c.spec) for c in read],
                                    "folder_labels": dict(folder_labels or {}), "holdout": holdout,
                                    "conflicts": conflicts, "sha256": eval_sha, "messages": len(held_msgs),
                                    "description": "; ".join(parts)},
                    training_digests=training_digests(train_msgs))
    card["metrics"]["evaluation_set"] = eval_metrics
    per: dict[str, Any] = {}
    at = 0
    if with_base:
        card["metrics"]["time_split_test"] = metrics.metrics(y_eval[:len(base_test)], s_eval[:len(base_test)],
                                                             trained.threshold, target_fpr)
        at = len(base_test)
    for spec, held in held_by.items():
        per[spec] = metrics.metrics(y_eval[at:at + len(held)], s_eval[at:at + len(held)], trained.threshold,
                                    target_fpr) if held else None
        at += len(held)
    card["metrics"]["held_out"] = per
    return _register(trained, card, registry_dir, eval_metrics, eval_sha, base_sha, promote_if_first)
