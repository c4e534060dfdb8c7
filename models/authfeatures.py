"""Sender authentication as model features: Floodgate's own Authentication-Results header.

The SMTP ingress verifies every message (SPF, DKIM, ARC, DMARC: :mod:`pipeline.smtp.auth`) and
prepends one ``Authentication-Results`` field with Floodgate's authserv-id, after removing any
field that claims that id (``floodgate replay`` removes them too). So within Floodgate a field
with our id was written by us, and this view reads that one only — the topmost with our id —
never another server's (anyone can write ``dmarc=pass`` under another name).

Tokens, in the model's token space (they join :class:`models.features.MailText`'s tokens before
the hashing vectorizer), one per fact:

* ``ar:spf:<result>`` (MAIL FROM), ``ar:helo:<result>``, ``ar:dkim:<result>`` (each distinct
  result of the signatures; ``none`` when unsigned), ``ar:arc:<result>``, ``ar:dmarc:<result>``;
* ``ar:dmarc:p:<policy>`` (the policy that applied), and alignment with the From domain:
  ``ar:aligned:spf``, ``ar:aligned:dkim`` (a passing identity in the From domain or a parent or
  child of it: relaxed alignment without the public suffix list, good enough for a feature), or
  ``ar:aligned:none`` when From has a domain and nothing passing aligns.

A message without our field gives no token at all, so on mail that never passed our ingress (the
public corpora: every message reads "none") the vectors, and a model trained on them, are exactly
those of the text features alone: the public figures cannot move. The model learns from these
tokens once it is trained on mail that carries the stamp (the operator's own mail, from its
Maildirs, where delivery keeps the field).

How it plugs in (one step, stateless, in the scikit-learn pipeline): :class:`MailWithAuth` wraps
the text step and keeps its name, so ``named_steps["mail"]`` (training, explain, bench) still
gives one token string per message::

    ("mail", MailWithAuth(MailText(), authserv_id))    # models.pipeline.build

It must be in the registry's trusted types (``models.authfeatures.MailWithAuth``), and the
classifier's verdict cache must key on these tokens too (:func:`cache_key_part`), or a cached
verdict for a copy that passed DMARC would answer for a forged copy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from sklearn.base import BaseEstimator, TransformerMixin

from models.features import VIEW_SEP, header_end

VERSION = 1  # bump when the tokens for the same bytes change
DEFAULT_AUTHSERV_ID = "floodgate.localdomain"  # pipeline.core.config: smtp.hostname's default
MAX_HEAD_BYTES = 64_000  # our field is first: never look further than a header block can honestly be
_NAME = b"authentication-results"
_FIELD = re.compile(rb"^authentication-results[ \t]*:((?:[^\r\n]*)(?:\r?\n[ \t][^\r\n]*)*)", re.I | re.M)
_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)")
_RESINFO = re.compile(r"([a-z]+)\s*=\s*([a-z]+)")
_PROP = re.compile(r"(smtp\.mailfrom|smtp\.helo|header\.d|header\.from)\s*=\s*\"?([^\s;\"]*)")
_POLICY = re.compile(r"p=(none|quarantine|reject)")
_RESULTS = frozenset({"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"})
METHODS = frozenset({"spf", "dkim", "dmarc", "arc"})


def _authserv_id(value: str) -> str:
    value = _COMMENT.sub(" ", value).strip()
    if value.startswith('"'):
        end = value.find('"', 1)
        ident = value[1:end if end > 0 else None]
    else:
        ident = re.split(r"[\s;]", value, maxsplit=1)[0]
    return ident.strip().rstrip(".").lower()


def ours(raw: bytes, authserv_id: str) -> str | None:
    """The value of the topmost Authentication-Results field with ``authserv_id``, unfolded."""
    head = bytes(raw[:MAX_HEAD_BYTES])
    end = header_end(head)[0]
    if end >= 0:
        head = head[:end]
    if _NAME not in head.lower():
        return None
    want = authserv_id.strip().rstrip(".").lower()
    for m in _FIELD.finditer(head):
        value = re.sub(r"\r?\n[ \t]", " ", m.group(1).decode("utf-8", "replace"))
        if _authserv_id(value) == want:
            return value
    return None


def _aligned(a: str, from_domain: str) -> bool:
    return bool(a and from_domain) and (a == from_domain or a.endswith("." + from_domain)
                                        or from_domain.endswith("." + a))


def tokens(raw: bytes, authserv_id: str = DEFAULT_AUTHSERV_ID) -> list[str]:
    """The feature tokens of our Authentication-Results field in ``raw`` (none without one)."""
    value = ours(raw, authserv_id)
    if value is None:
        return []
    out: list[str] = []
    policy = _POLICY.search(value)  # in the dmarc result's comment
    body = _COMMENT.sub(" ", value.lower())
    passing: list[str] = []
    from_domain = ""
    for part in body.split(";")[1:]:  # the first is the authserv-id
        m = _RESINFO.search(part)
        if m is None or m.group(1) not in METHODS or m.group(2) not in _RESULTS:
            continue
        method, result = m.groups()
        props = dict(_PROP.findall(part))
        if method == "spf" and "smtp.helo" in props:
            method = "helo"
        out.append(f"ar:{method}:{result}")
        if method == "dmarc":
            from_domain = props.get("header.from", "")
        elif result == "pass" and method == "spf":
            passing.append("spf:" + props.get("smtp.mailfrom", "").rpartition("@")[2])
        elif result == "pass" and method == "dkim":
            passing.append("dkim:" + props.get("header.d", ""))
    if policy is not None:
        out.append(f"ar:dmarc:p:{policy.group(1)}")
    if from_domain:
        aligned = sorted({p.partition(":")[0] for p in passing if _aligned(p.partition(":")[2], from_domain)})
        out += [f"ar:aligned:{a}" for a in aligned] or ["ar:aligned:none"]
    return list(dict.fromkeys(out))


class MailWithAuth(TransformerMixin, BaseEstimator):
    """Stateless: the text step's tokens, followed by :func:`tokens` of our Authentication-Results."""

    def __init__(self, mail: Any = None, authserv_id: str = DEFAULT_AUTHSERV_ID, version: int = VERSION) -> None:
        self.mail = mail
        self.authserv_id = authserv_id
        self.version = version

    def fit(self, X: Iterable[bytes], y: object = None) -> MailWithAuth:
        return self

    def transform(self, X: Sequence[bytes]) -> list[str]:
        if self.version != VERSION:
            raise ValueError(f"auth features version {self.version}, this code makes {VERSION}: retrain")
        docs = self.mail.transform(X)
        out = []
        for doc, raw in zip(docs, X, strict=True):
            extra = tokens(raw, self.authserv_id)
            if extra:  # among the word tokens, before the character view (VIEW_SEP), never in it
                words, sep, view = doc.partition(VIEW_SEP)
                doc = words + " " + " ".join(extra) + sep + view
            out.append(doc)
        return out

    def __sklearn_tags__(self):  # type: ignore[no-untyped-def]
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags


def cache_key_part(pipeline: Any, raw: bytes) -> str:
    """What a verdict cache key must add for a model that reads our Authentication-Results: its
    tokens (the same for every copy of a campaign from the same sources), or "" for a model that
    does not."""
    steps = getattr(pipeline, "named_steps", {})
    mail = steps.get("mail") if hasattr(steps, "get") else None
    if not isinstance(mail, MailWithAuth):
        return ""
    return "|" + " ".join(tokens(raw, mail.authserv_id))


def default_authserv_id() -> str:
    """The authserv-id the SMTP ingress stamps with, from the settings (``auth.authserv_id``, else
    ``smtp.hostname``): a model must read the id the ingress writes and removes."""
    from pipeline.core import config

    s = config.load()
    return s.auth.authserv_id or s.smtp.hostname
