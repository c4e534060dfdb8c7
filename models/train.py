"""Training: fit the pipeline, pick the decision threshold for a target ham FPR, register the model.

The threshold comes from out-of-fold scores on the training set (k-fold cross-validation), so it
is not tuned on the evaluation set. MailText is stateless, so messages are tokenized once and only
the hashing + classifier steps are refitted per fold.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline

from models import gates, metrics, registry, splits
from models import pipeline as model_pipeline
from models.corpus import Message

TARGET_FPR = 0.001  # at most 1 ham in 1,000 called spam on the training folds
FOLDS = 5
# Never call spam what the model itself finds more likely ham. On cleanly separable training data
# the highest out-of-fold ham score can be ~0.0001, and a threshold just above it would flag new ham.
MIN_THRESHOLD = 0.5


@dataclass
class Trained:
    pipeline: Pipeline
    threshold: float
    cv: dict[str, Any]  # out-of-fold metrics on the training set at the chosen threshold
    fingerprint: dict[str, Any]
    seconds: float


def labelled(messages: Iterable[Message]) -> list[Message]:
    return [m for m in messages if m.label in ("ham", "spam")]


def targets(messages: Sequence[Message]) -> np.ndarray:
    return np.array([m.label == "spam" for m in messages], dtype=np.int64)


def fit(messages: Iterable[Message], *, target_fpr: float = TARGET_FPR, folds: int = FOLDS,
        alpha: float = model_pipeline.ALPHA) -> Trained:
    """Fit on the labelled messages; threshold from out-of-fold scores. Needs 2+ ham and 2+ spam."""
    start = time.perf_counter()
    msgs = labelled(messages)
    y = targets(msgs)
    n_spam, n_ham = int(y.sum()), int(len(y) - y.sum())
    if min(n_spam, n_ham) < 2:
        raise ValueError(f"need at least 2 ham and 2 spam to train, got {n_ham} ham and {n_spam} spam")
    pipe = model_pipeline.build(alpha=alpha)
    mail, rest = pipe.steps[0][1], Pipeline(pipe.steps[1:])
    docs = mail.fit(None).transform([m.raw for m in msgs])
    cv = StratifiedKFold(n_splits=min(folds, n_spam, n_ham), shuffle=True, random_state=0)
    oof = cross_val_predict(rest, docs, y, cv=cv, method="predict_proba")[:, 1]
    threshold = max(metrics.threshold_for_fpr(oof[y == 0], target_fpr), MIN_THRESHOLD)
    rest.fit(docs, y)  # the same estimator objects as in `pipe`: the whole pipeline is now fitted
    return Trained(pipe, threshold, metrics.metrics(y, oof, threshold, target_fpr), splits.fingerprint(msgs),
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


def card_for(trained: Trained, target_fpr: float, **extra: Any) -> dict[str, Any]:
    return {
        "threshold": trained.threshold,
        "target_fpr": target_fpr,
        "threshold_from": f"{FOLDS}-fold out-of-fold scores on the training set",
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


def recorded_metrics(registry_dir: Path, version: str) -> dict[str, Any] | None:
    """The metrics ``version``'s card recorded on the fixed evaluation set, without loading the
    model (one this code cannot load still tells them); None if it recorded none or is damaged."""
    try:
        return gates.recorded(registry.read_card(registry_dir, version))
    except (registry.ModelNotFound, registry.ModelIntegrityError):  # a damaged artifact records nothing trustworthy
        return None


def _refusals(registry_dir: Path, time_eval: dict[str, Any]) -> list[str]:
    """Why a new model must not replace an unusable champion: the gates against the metrics the
    champion's card recorded on the same evaluation set (none when there is no champion at all, or
    it recorded nothing: then there is nothing in service to protect)."""
    version = registry.champion_version(registry_dir)
    reference = recorded_metrics(registry_dir, version) if version else None
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
    card = card_for(trained, target_fpr, split={
        "name": "time", "train_groups": list(splits.TIME_TRAIN_GROUPS), "test_groups": list(splits.TIME_TEST_GROUPS)})
    card["metrics"]["time_split_test"] = time_eval
    card["metrics"]["random_split"] = {
        "note": "a separate fit on a stratified random 70 % (seed fixed), measured on the other 30 %",
        "test_fraction": splits.RANDOM_TEST_FRACTION, "seed": splits.RANDOM_SEED,
        "training_data": r_trained.fingerprint, **random_eval}
    version = registry.register(trained.pipeline, card, registry_dir)
    refused: list[str] = []
    promoted = promote_if_first and not _usable_champion(registry_dir)
    if promoted:
        refused = _refusals(registry_dir, time_eval)
        promoted = not refused
    if promoted:
        registry.promote(registry_dir, version)
    return version, registry.load(registry_dir, version).card, promoted, refused
