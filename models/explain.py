"""Which tokens weigh most in a fitted pipeline (the hashing vectorizer keeps no vocabulary, so
the tokens of a sample of messages are hashed again to name the columns)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def top_features(pipeline: Any, raws: Sequence[bytes], n: int = 20) -> dict[str, list[tuple[str, float]]]:
    """The ``n`` strongest spam and ham word/structure tokens seen in ``raws`` (byte n-grams of the
    character view are not named): ``{"spam": [(token, weight)], "ham": [...]}``.

    Tokens that share a hash bucket are shown together, joined by ``|``.
    """
    from models.features import split_tokens
    from models.pipeline import word_vectorizer

    docs = pipeline.named_steps["mail"].transform(raws)
    vocab = sorted({t for doc in docs for t in split_tokens(doc)})
    hv = word_vectorizer(pipeline)  # the word block comes first: its columns are the classifier's first
    cols = hv.transform(vocab).tocsr().indices  # one token per document: one column each, in order
    names: dict[int, list[str]] = {}
    for col, tok in zip(cols, vocab, strict=True):
        names.setdefault(int(col), []).append(tok)
    coef = pipeline.named_steps["clf"].coef_[0]
    seen = np.fromiter(names, dtype=np.int64)
    order = seen[np.argsort(coef[seen])]
    spam = [("|".join(names[int(c)]), float(coef[c])) for c in order[::-1][:n]]
    ham = [("|".join(names[int(c)]), float(coef[c])) for c in order[:n]]
    return {"spam": spam, "ham": ham}
