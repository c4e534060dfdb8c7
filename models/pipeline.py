"""The spam model: one scikit-learn Pipeline, readable at a glance.

    raw RFC 5322 bytes --MailText--> feature tokens --HashingVectorizer--> sparse binary vector
                       --SGDClassifier(modified Huber)--> spam score in [0, 1]

Why these parts (measured on the SpamAssassin time split, see ``make evaluate``):

* hashing instead of a vocabulary: stateless, fixed memory, nothing to refit when new words appear,
  and fast. The corpus has ~67,000 distinct tokens; 2**18 buckets measured as well as 2**20 (AUC
  0.9988 on the time split) with a quarter of the model size (2 MB) and fit time;
* binary term presence with l2 norm: spam repeats words; presence measured better than counts
  (AUC 0.9985 vs 0.9977);
* a linear model trained by SGD with the modified Huber loss (``SGDClassifier``): at the operating
  point it beat logistic loss on both splits (time split: recall 82.4 % vs 78.4 % at 0 false
  positives in 1,400 ham, same AUC 0.9993; random split: 84.7 % vs 77.7 %); batch
  LogisticRegression ranked like log-loss SGD, ComplementNB (AUC 0.939) and MultinomialNB (0.936)
  worse. It gives scores in [0, 1] (``predict_proba``: the margin clipped to [-1, 1], rescaled),
  fits the corpus in ~0.2 s, and keeps learning from feedback one message at a time
  (``partial_fit``: the online mode, :mod:`models.online`).
"""

from __future__ import annotations

from typing import Any

from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline

from models.features import MailText, split_tokens

N_FEATURES = 2**18
LOSS = "modified_huber"
ALPHA = 1e-4  # L2 penalty: 1e-4 best at the operating point; 3e-5 and 3e-4 lost recall on one split each
EPOCHS = 30  # passes over the training set; fixed (tol=None) so that a fit is reproducible


def build(alpha: float = ALPHA, n_features: int = N_FEATURES) -> Pipeline:
    return Pipeline([
        ("mail", MailText()),
        ("hash", HashingVectorizer(n_features=n_features, analyzer=split_tokens, alternate_sign=False,
                                   binary=True, norm="l2")),
        ("clf", SGDClassifier(loss=LOSS, alpha=alpha, max_iter=EPOCHS, tol=None, random_state=0)),
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
        "alpha": clf.alpha,
        "loss": clf.loss,
        "max_part_bytes": features.MAX_PART_BYTES,
        "max_text_chars": features.MAX_TEXT_CHARS,
        "max_parts": features.MAX_PARTS,
        "artefact_domains": list(features.ARTEFACT_DOMAINS),
    }
