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


# --- one message: why this score (floodgate model score) ----------------------------------------------

MAX_SHOWN_CHARS = 40  # of a piece of the character view named in an explanation


def _word_contributions(hv: Any, doc: str, x: Any, coef: np.ndarray) -> dict[str, float]:
    """Per word/structure token (tokens sharing a column together, joined by ``|``): its weight
    times its value in the message's vector."""
    from models.features import split_tokens

    tokens = split_tokens(doc)
    if not tokens:
        return {}
    cols = hv.transform(tokens).tocsr().indices
    by_col: dict[int, list[str]] = {}
    for col, tok in zip(cols, tokens, strict=True):
        by_col.setdefault(int(col), []).append(tok)
    row = x.tocsr()
    value = dict(zip(row.indices.tolist(), row.data.tolist(), strict=True))
    return {"|".join(toks): float(coef[c] * value.get(c, 0.0)) for c, toks in by_col.items()}


def _char_contributions(bg: Any, doc: str, x: Any, coef: np.ndarray) -> dict[str, float]:
    """The character view's byte n-grams, attributed to the piece of text (a run between white
    space) each starts in, and summed per distinct piece: ``"verify"`` +0.12. Only the view's
    first ``max_bytes`` are read, as ByteGrams reads them."""
    from models.features import byte_gram_columns, view_bytes

    data = view_bytes(doc, int(bg.max_bytes))
    cols = byte_gram_columns(data, int(bg.n), int(bg.n_features))
    if cols.size == 0:
        return {}
    row = x.tocsr()
    counts = dict(zip(row.indices.tolist(), row.data.tolist(), strict=True))
    occurrences = np.bincount(cols, minlength=int(bg.n_features))
    # each occurrence of a column carries an equal share of that column's value x weight
    per_gram = np.array([coef[c] * counts.get(int(c), 0.0) / occurrences[c] for c in cols])
    pieces: list[tuple[int, bytes]] = []  # (start, text) of each run between white space
    start = 0
    for piece in data.split():
        at = data.index(piece, start)
        pieces.append((at, piece))
        start = at + len(piece)
    out: dict[str, float] = {}
    for i, (at, piece) in enumerate(pieces):
        # a piece owns the n-grams that start in it or in the white space after it (the first
        # piece also those before it): every n-gram is counted once
        lo = 0 if i == 0 else at
        hi = pieces[i + 1][0] if i + 1 < len(pieces) else cols.size
        name = '"' + piece[:MAX_SHOWN_CHARS].decode("utf-8", "replace") + '"'
        out[name] = out.get(name, 0.0) + float(per_gram[lo:hi].sum())
    if not pieces:
        out['" "'] = float(per_gram.sum())
    return out


def explain(model: Any, raw: bytes, n: int = 8) -> dict[str, Any]:
    """Why ``model`` (a :class:`models.registry.LoadedModel`) scores ``raw`` as it does: the verdict,
    the score and threshold, the margin split by feature view, and the ``n`` features that pushed
    it most towards spam and towards ham.

    The classifier is linear: the margin is the sum over the message's features of weight x value
    (no intercept), and the score a monotone function of it, so these contributions add up to the
    margin exactly. Word and structure tokens are named as such; the character view's byte 4-grams
    are named by the piece of text they start in (``"verify"``); a view that names nothing (a future
    one) is shown as its total."""
    from models.pipeline import views

    pipe = model.pipeline
    doc = pipe.named_steps["mail"].transform([raw])[0]
    coef = np.asarray(pipe.named_steps["clf"].coef_[0], dtype=np.float64)
    intercept = float(np.asarray(pipe.named_steps["clf"].intercept_).ravel()[0])
    contributions: dict[str, float] = {}
    by_view: dict[str, float] = {}
    offset = 0
    for name, view in views(pipe):
        x = view.transform([doc])
        width = x.shape[1]
        w = coef[offset:offset + width]
        offset += width
        total = float(x.dot(w)[0])
        by_view[name] = total
        if name == "words":
            found = _word_contributions(view, doc, x, w)
        elif name == "chars":
            found = {f"text:{k}": v for k, v in _char_contributions(view, doc, x, w).items()}
        else:
            found = {f"view:{name}": total}
        for k, v in found.items():
            contributions[k] = contributions.get(k, 0.0) + v
    score = float(model.score([raw])[0])
    ranked = sorted(((k, v) for k, v in contributions.items() if v), key=lambda kv: kv[1])
    return {
        "verdict": "spam" if score >= model.threshold else "ham",
        "score": score,
        "threshold": model.threshold,
        "model_version": model.version,
        "margin": intercept + sum(by_view.values()),
        "intercept": intercept,
        "views": by_view,
        "towards_spam": [(k, v) for k, v in reversed(ranked) if v > 0][:n],
        "towards_ham": [(k, v) for k, v in ranked if v < 0][:n],
    }


def render(name: str, e: dict[str, Any]) -> str:
    """``spamassassin -t`` / ``rspamc symbols`` for one message, in a few lines."""
    views = " ".join(f"{k} {v:+.3f}" for k, v in e["views"].items())
    lines = [f"{name}: {e['verdict'].upper()}  score {e['score']:.4f}  threshold {e['threshold']:.4f}  "
             f"model {e['model_version']}",
             f"  margin {e['margin']:+.3f} = {views}" + (f" intercept {e['intercept']:+.3f}" if e["intercept"] else "")]
    for key, title in (("towards_spam", "towards spam"), ("towards_ham", "towards ham ")):
        shown = ", ".join(f"{k} {v:+.3f}" for k, v in e[key]) or "nothing"
        lines.append(f"  {title}: {shown}")
    return "\n".join(lines)
