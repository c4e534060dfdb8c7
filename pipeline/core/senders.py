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

Record value (orjson)::

    {"key": "domain:example.org", "good": true, "ham": 31, "spam": 0,
     "feedback_ham": 1, "feedback_spam": 0, "updated_at": 1790000000.0}

A null value (a tombstone) removes the key: the sender has no standing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import orjson

ADDR = "addr:"
DOMAIN = "domain:"
CLIENT = "client:"
_COUNTS = ("ham", "spam", "feedback_ham", "feedback_spam")


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


@dataclass(frozen=True, slots=True)
class Standing:
    key: str
    good: bool
    ham: int = 0
    spam: int = 0
    feedback_ham: int = 0
    feedback_spam: int = 0
    updated_at: float = 0.0


def encode_standing(standing: Standing) -> tuple[bytes, bytes]:
    """The Kafka key and value of a standing."""
    return standing.key.encode(), orjson.dumps(asdict(standing))


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
    counts = {name: data.get(name, 0) for name in _COUNTS}
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()):
        return None
    updated_at = data.get("updated_at", 0.0)
    if not isinstance(updated_at, int | float) or isinstance(updated_at, bool):
        return None
    return Standing(key=key, good=good, updated_at=float(updated_at), **counts)


def good_senders(records: Iterable[tuple[bytes | None, bytes | None]]) -> set[str]:
    """The keys whose latest record says good, from records in topic order.

    Tombstones (null values) remove a key; records without a key or that do not decode are
    skipped (a reader must not fail on one bad record of a compacted topic).
    """
    latest: dict[str, bool] = {}
    for key, value in records:
        if not key:
            continue
        name = key.decode(errors="replace")
        if value is None:
            latest.pop(name, None)
            continue
        standing = decode_standing(value)
        if standing is not None:
            latest[name] = standing.good
    return {name for name, good in latest.items() if good}
