"""The spam model: one scikit-learn Pipeline, readable at a glance.

    raw RFC 5322 bytes --MailText--> feature tokens --HashingVectorizer--> sparse binary vector
                       --LogisticRegression--> spam probability

Why these parts (measured on the SpamAssassin time split, see ``make evaluate``):

* hashing instead of a vocabulary: stateless, fixed memory, nothing to refit when new words appear,
  and fast. The corpus has ~67,000 distinct tokens; 2**18 buckets measured as well as 2**20 (AUC
  0.9988 on the time split) with a quarter of the model size (2 MB) and fit time;
* binary term presence with l2 norm: spam repeats words; presence measured better than counts
  (AUC 0.9985 vs 0.9977);
* logistic regression: best ranking of the linear models tried (SGD log-loss 0.9978, modified
  Huber 0.965, ComplementNB 0.939, MultinomialNB 0.936) and calibrated-enough probabilities, so a
  threshold picked for a target false-positive rate means something. liblinear fits the time split
  in ~1 s; lbfgs needs ~5 s for the same AUC.
"""

from __future__ import annotations

from typing import Any

from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from models.features import MailText, split_tokens

N_FEATURES = 2**18
C = 100.0  # inverse regularisation: 100 beat 10 and 30 on both splits (time-split AUC 0.9991), 300 no better


def build(c: float = C, n_features: int = N_FEATURES) -> Pipeline:
    return Pipeline([
        ("mail", MailText()),
        ("hash", HashingVectorizer(n_features=n_features, analyzer=split_tokens, alternate_sign=False,
                                   binary=True, norm="l2")),
        ("clf", LogisticRegression(C=c, solver="liblinear", max_iter=1000)),
    ])


def settings(pipeline: Pipeline) -> dict[str, Any]:
    """The feature and model settings worth recording on a model card."""
    from models import features

    hv, clf = pipeline.named_steps["hash"], pipeline.named_steps["clf"]
    return {
        "feature_version": features.FEATURE_VERSION,
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
