"""Sender keys and the sender-reputation record: the contract between reputation and admission.

The reputation worker publishes one record per change of a sender's standing to the compacted
``reputation`` topic; admission (and anyone else) reads that topic from the beginning, and the
latest value per key is the standing. This module is that record format and nothing else, so
that both stages depend on it and not on each other.

Sender keys (strings; the Kafka key is their UTF-8 bytes):

* ``addr:<envelope sender, lowercased>``   e.g. ``addr:alice@example.org``
* ``domain:<its domain, lowercased>``      e.g. ``domain:example.org``
* ``client:<envelope client address>``     e.g. ``client:192.0.2.7``

The null sender (``<>``, bounces) has no ``addr:`` or ``domain:`` key.

Proven keys: when the SMTP ingress verified a message (SPF, DKIM, DMARC; ``extra["auth"]``,
:mod:`pipeline.core.authres`), the ``addr:`` and ``domain:`` keys that count are those of names
the message proved (:func:`proven_keys`), not the names it claims: admission exempts, and the
reputation worker counts verdicts for, those only.

Record value (orjson)::

    {"key": "domain:example.org", "good": true, "ham": 31, "spam": 0,
     "feedback_ham": 1, "feedback_spam": 0, "updated_at": 1790000000.0}

and, only when they are set (so a record without reports or operator decisions is exactly the
format above, and a record written before these fields existed reads as having none of them):

    "ham_reporters": 3, "ham_operators": 1, "spam_reporters": 0, "reports_span_s": 5400.0,
    "decision": "revoke", "decision_by": "ops", "decision_at": 1790000100.0

``ham_reporters``/``spam_reporters`` are the distinct reporters of ham and spam feedback the
worker keeps (at most ``pipeline.reputation.REPORTERS_KEPT`` a side), ``ham_operators`` how many
of the ham reporters were operators releasing from the quarantine, ``reports_span_s`` the time
from the first to the latest new ham reporter; ``decision`` is an operator's last ``revoke`` or
``restore`` of the key (a revoked key is never good). Readers use ``good``; the rest is for
operators (``floodgate senders``). The counts are those of the last published change.

A null value (a tombstone) removes the key: the sender has no standing.

Operator decisions (:class:`Decision`) travel on the feedback topic, keyed by sender key, beside
the feedback events (record value, orjson, no newline, so it is never read as a mail event)::

    {"record": "sender-decision", "key": "domain:example.org", "decision": "revoke",
     "by": "ops", "at": 1790000100.0}
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import orjson

ADDR = "addr:"
DOMAIN = "domain:"
CLIENT = "client:"
PREFIXES = (ADDR, DOMAIN, CLIENT)
_COUNTS = ("ham", "spam", "feedback_ham", "feedback_spam")
# Fields added after the first format: written only when they differ from these defaults.
_REPORT_COUNTS = ("ham_reporters", "ham_operators", "spam_reporters")
REVOKE, RESTORE = "revoke", "restore"
DECISIONS = (REVOKE, RESTORE)
DECISION_RECORD = "sender-decision"
# A feedback event's ``extra["feedback"]`` when an operator released it from the quarantine
# (pipeline/feedback.py); the reputation worker counts it as that operator's vote.
RELEASE_FEEDBACK = "quarantine-release"
# An operator's name is recorded with a decision and printed to other operators: one line, this long.
OPERATOR_MAX = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def normalise_address(mail_from: str) -> str:
    """The envelope sender as a key part: no angle brackets or blanks, lowercased."""
    return mail_from.strip().strip("<>").strip().lower()


def addr_key(mail_from: str) -> str | None:
    addr = normalise_address(mail_from)
    return ADDR + addr if addr else None


def domain_key(mail_from: str) -> str | None:
    addr = normalise_address(mail_from)
    local, at, domain = addr.rpartition("@")
    domain = domain.rstrip(".")
    return DOMAIN + domain if at and local and domain else None


def client_key(client_address: str) -> str | None:
    client = client_address.strip().lower()
    return CLIENT + client if client else None


def keys(mail_from: str, client_address: str) -> list[str]:
    """Every key a message counts towards: ``addr:``, ``domain:``, ``client:`` (those that exist)."""
    keys = (addr_key(mail_from), domain_key(mail_from), client_key(client_address))
    return [k for k in keys if k]


def proven_keys(mail_from: str, client_address: str, proven_domains: Iterable[str]) -> list[str]:
    """The keys a message has proved it may claim: ``domain:`` for each domain sender
    authentication proved (:func:`pipeline.core.authres.proven_domains`: the DMARC-aligned From
    domain, the MAIL FROM domain when SPF passed, each passing DKIM ``d=``), ``addr:`` for the
    envelope sender when its domain is among them, and the ``client:`` address (the TCP peer, or
    what a trusted relay forwarded: nothing a sender can claim). Known-good standing applies to
    these only, and reputation is kept for these only when a message was verified."""
    proven = {d.strip().rstrip(".").lower() for d in proven_domains if isinstance(d, str) and d.strip()}
    out = [DOMAIN + d for d in sorted(proven)]
    dk = domain_key(mail_from)
    if dk and dk[len(DOMAIN):] in proven:
        out.append(ADDR + normalise_address(mail_from))
    ck = client_key(client_address)
    if ck:
        out.append(ck)
    return out


def trusted_keys(mail_from: str, client_address: str, proven_domains: Iterable[str] | None) -> list[str]:
    """The keys standing applies to for one event: :func:`proven_keys` when ingress verified the
    sender (``proven_domains`` a list, possibly empty), else every claimed key (:func:`keys`:
    ``floodgate replay`` or verification off, where nothing was checked either way)."""
    if proven_domains is None:
        return keys(mail_from, client_address)
    return proven_keys(mail_from, client_address, proven_domains)


def normalise_key(key: str) -> str | None:
    """A sender key as an operator typed it, in the form the keys above have; None if it is none."""
    key = key.strip().lower()
    prefix = next((p for p in PREFIXES if key.startswith(p)), None)
    if prefix is None or not key[len(prefix):].strip() or _CONTROL.search(key):
        return None
    return key


@dataclass(frozen=True, slots=True)
class Standing:
    key: str
    good: bool
    ham: int = 0
    spam: int = 0
    feedback_ham: int = 0
    feedback_spam: int = 0
    updated_at: float = 0.0
    ham_reporters: int = 0
    ham_operators: int = 0
    spam_reporters: int = 0
    reports_span_s: float = 0.0
    decision: str = ""
    decision_by: str = ""
    decision_at: float = 0.0

    @property
    def revoked(self) -> bool:
        return self.decision == REVOKE


_OPTIONAL = {name: default for name, default in (
    *((n, 0) for n in _REPORT_COUNTS), ("reports_span_s", 0.0), ("decision", ""), ("decision_by", ""),
    ("decision_at", 0.0))}


def encode_standing(standing: Standing) -> tuple[bytes, bytes]:
    """The Kafka key and value of a standing (the later fields only when set)."""
    data = asdict(standing)
    for name, default in _OPTIONAL.items():
        if data[name] == default:
            del data[name]
    return standing.key.encode(), orjson.dumps(data)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def decode_standing(value: bytes | None) -> Standing | None:
    """The standing in a record value; None for a tombstone or a value that cannot be read."""
    if not value:
        return None
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    key, good = data.get("key"), data.get("good")
    if not isinstance(key, str) or not key or not isinstance(good, bool):
        return None
    counts = {name: data.get(name, 0) for name in (*_COUNTS, *_REPORT_COUNTS)}
    if not all(_count(n) for n in counts.values()):
        return None
    times = {name: data.get(name, 0.0) for name in ("updated_at", "reports_span_s", "decision_at")}
    if not all(_time(t) for t in times.values()):
        return None
    decision, decision_by = data.get("decision", ""), data.get("decision_by", "")
    if decision not in ("", *DECISIONS) or not isinstance(decision_by, str):
        return None
    return Standing(key=key, good=good, decision=decision, decision_by=decision_by,
                    **{name: float(t) for name, t in times.items()}, **counts)


def latest(records: Iterable[tuple[bytes | None, bytes | None]]) -> dict[str, Standing]:
    """The latest readable standing per key, from records in topic order (tombstones remove a
    key; unreadable records are skipped, the key keeps its last readable standing)."""
    out: dict[str, Standing] = {}
    for key, value in records:
        if not key:
            continue
        name = key.decode(errors="replace")
        if value is None:
            out.pop(name, None)
            continue
        standing = decode_standing(value)
        if standing is not None:
            out[name] = standing
    return out


def good_senders(records: Iterable[tuple[bytes | None, bytes | None]]) -> set[str]:
    """The keys whose latest record says good, from records in topic order.

    Tombstones (null values) remove a key; records without a key or that do not decode are
    skipped (a reader must not fail on one bad record of a compacted topic).
    """
    return {name for name, standing in latest(records).items() if standing.good}


@dataclass(frozen=True, slots=True)
class Decision:
    """An operator's revocation or restoration of a sender key's known-good standing."""

    key: str
    decision: str  # REVOKE or RESTORE
    by: str
    at: float


def operator_name(by: str) -> str:
    """An operator's name as recorded: one printable line of at most OPERATOR_MAX characters."""
    return _CONTROL.sub("?", by.strip())[:OPERATOR_MAX]


def encode_decision(decision: Decision) -> tuple[bytes, bytes]:
    """The Kafka key (the sender key) and value of an operator decision."""
    return decision.key.encode(), orjson.dumps({"record": DECISION_RECORD, "key": decision.key,
                                                "decision": decision.decision, "by": decision.by,
                                                "at": decision.at})


def decode_decision(value: bytes | None) -> Decision | None:
    """The decision in a record value; None for anything else (a mail event, garbage)."""
    if not value or not value.startswith(b"{") or b"\n" in value:
        return None
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("record") != DECISION_RECORD:
        return None
    key, decision, by, at = data.get("key"), data.get("decision"), data.get("by"), data.get("at")
    if not isinstance(key, str) or normalise_key(key) != key or decision not in DECISIONS:
        return None
    if not isinstance(by, str) or not operator_name(by) or not _time(at):
        return None
    return Decision(key=key, decision=decision, by=operator_name(by), at=float(at))
