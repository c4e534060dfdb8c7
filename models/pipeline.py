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

The operating point (ham FPR <= 0.1 %, threshold from out-of-fold scores on the training groups)
is where the model falls short: the threshold sits just above the 3rd-highest out-of-fold score of
2,750 training ham, and those are hard_ham newsletters; the newer spam_2 scores lower than the
training spam. Measured with 3 x 5-fold cross-validation on the time split's training groups
(recall at 0.1 % FPR, averaged; about +-1 point is noise) and then on the test groups at the
training threshold (features v5, :mod:`models.features`):

* the v4/v5 structure tokens (Message-ID shape, mailer build, capitals, HTML share, ...): CV 91.3
  -> 91.7 %, time-split test recall 82.4 -> 86.2 % at 0/1,400 ham FP, AUC 0.99926 -> 0.99941,
  oracle recall 94.1 -> 95.2 % (v4 measured 92.6 % / 86.7 % until v5 dropped Message-IDs written
  by the corpus collector's relay, an artefact);
* no better within the noise, so not taken: alpha 5e-5 / 2e-4, class weights (balanced, ham x2,
  x4), averaged SGD, 2**20 buckets, separately normalised structure and word blocks, TF-IDF (binary
  or sublinear counts), subject character 4-grams (90.6 %), dropping the sender/URL host tokens;
  worse (with the v3 features): word bigrams (CV 88.6 %, test 78.4 %), log loss (87.9 %), a soft vote with MultinomialNB
  (84.1 %: its probabilities saturate at 1.0, so they tie where the threshold falls);
* the threshold rule hardly matters: 10 folds, or the mean threshold of 3 seeds of 5 folds, moved
  test recall by under 1 point either way.
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
