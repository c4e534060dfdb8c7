"""The spam model: one scikit-learn Pipeline, readable at a glance.

    raw RFC 5322 bytes --MailText--> feature tokens --HashingVectorizer--> sparse binary vector
                       --LogisticRegression--> spam probability

Why these parts (measured on the SpamAssassin time split, see ``make evaluate``):

* hashing instead of a vocabulary: stateless, fixed memory, nothing to refit when new words appear,
  and fast; 2**20 buckets keep collisions rare for a few hundred thousand distinct tokens;
* binary term presence with l2 norm: spam repeats words; presence measured better than counts
  (AUC 0.9985 vs 0.9977);
* logistic regression: best ranking of the linear models tried (SGD log-loss 0.9978, modified
  Huber 0.965, ComplementNB 0.939, MultinomialNB 0.936) and calibrated-enough probabilities, so a
  threshold picked for a target false-positive rate means something; the newton-cg solver fits the
  2**20-wide problem in ~1.5 s where lbfgs takes ~6.5 s (same AUC).
"""

from __future__ import annotations

from typing import Any

from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from models.features import MailText, split_tokens

N_FEATURES = 2**20
C = 30.0  # inverse regularisation; 10-100 all measured within noise, 30 best on both splits


def build(c: float = C, n_features: int = N_FEATURES) -> Pipeline:
    return Pipeline([
        ("mail", MailText()),
        ("hash", HashingVectorizer(n_features=n_features, analyzer=split_tokens, alternate_sign=False,
                                   binary=True, norm="l2")),
        ("clf", LogisticRegression(C=c, solver="newton-cg", max_iter=1000)),
    ])


def settings(pipeline: Pipeline) -> dict[str, Any]:
    """The feature and model settings worth recording on a model card."""
    from models import features

    hv, clf = pipeline.named_steps["hash"], pipeline.named_steps["clf"]
    return {
        "steps": [name for name, _ in pipeline.steps],
        "n_features": hv.n_features,
        "binary": hv.binary,
        "norm": hv.norm,
        "classifier": type(clf).__name__,
        "C": clf.C,
        "max_part_bytes": features.MAX_PART_BYTES,
        "max_text_chars": features.MAX_TEXT_CHARS,
        "max_parts": features.MAX_PARTS,
        "artefact_domains": list(features.ARTEFACT_DOMAINS),
    }
