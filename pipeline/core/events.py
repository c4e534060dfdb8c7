"""The mail event: the one record format on every Floodgate topic.

Wire format (schema version 1), one Kafka record value::

    {"v":1,"id":"…","accepted_at":…,"envelope":{…},…}\\n<raw RFC 5322 bytes>

A single orjson line of metadata, a newline, then the message exactly as received. orjson
never writes a newline inside compact JSON, so the first ``\\n`` ends the metadata; the
message bytes are carried verbatim (no base64: no 33 % growth, no decode on the hot path).

Metadata fields:

========================  ==================================================================
``v``                     schema version (int); readers refuse versions they do not know
``id``                    event id (32 hex chars, uuid4): the idempotency key of every sink
``accepted_at``           unix time (float seconds) when ingress had the broker's ack
``source``                ``smtp`` | ``replay`` | ``release`` (re-injected from quarantine) | ``digest``
``envelope``              ``mail_from``, ``rcpt_to`` (list), ``client_address``, ``helo``
``label``                 optional ground truth (``ham``/``spam``) for replayed corpora
``lane``                  ``priority`` | ``bulk``: the lane admission chose (set by classify)
``verdict``               ``ham`` | ``spam`` once classified
``score``                 spam probability from the model
``model_version``         the registry version that scored it
``classified_at``         unix time of classification
========================  ==================================================================

Keys: the event id, so load spreads evenly over partitions whatever the sender does (a
flooding client must not pin one partition).

Size: one record holds a message up to the topics' ``max.message.bytes`` (16 MiB); SMTP
refuses mail above its limit (10 MiB by default) with 552 before it reaches Kafka, so no
message is ever truncated. A deployment that must accept larger mail would store the body
out of band and carry a reference instead (a claim check); that is not built.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

SCHEMA_VERSION = 1


class EventError(ValueError):
    """A record that is not a valid mail event; it belongs on the dead-letter topic."""


@dataclass(frozen=True, slots=True)
class Envelope:
    mail_from: str
    rcpt_to: tuple[str, ...]
    client_address: str = ""
    helo: str = ""


@dataclass(frozen=True, slots=True)
class MailEvent:
    id: str
    accepted_at: float
    envelope: Envelope
    raw: bytes
    source: str = "smtp"
    label: str | None = None
    lane: str | None = None
    verdict: str | None = None
    score: float | None = None
    model_version: str | None = None
    classified_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> bytes:
        return self.id.encode()

    def classified(self, verdict: str, score: float, model_version: str) -> MailEvent:
        return replace(self, verdict=verdict, score=score, model_version=model_version,
                       classified_at=time.time())


def new_event(envelope: Envelope, raw: bytes, source: str = "smtp", label: str | None = None,
              accepted_at: float | None = None, extra: dict[str, Any] | None = None,
              event_id: str | None = None) -> MailEvent:
    """A new event; its id random (uuid4) unless the caller derives one (``event_id``)."""
    return MailEvent(id=event_id or uuid.uuid4().hex, accepted_at=time.time() if accepted_at is None else accepted_at,
                     envelope=envelope, raw=raw, source=source, label=label, extra=extra or {})


def encode(event: MailEvent) -> bytes:
    meta: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "id": event.id,
        "accepted_at": event.accepted_at,
        "source": event.source,
        "envelope": {
            "mail_from": event.envelope.mail_from,
            "rcpt_to": list(event.envelope.rcpt_to),
            "client_address": event.envelope.client_address,
            "helo": event.envelope.helo,
        },
    }
    for name in ("label", "lane", "verdict", "score", "model_version", "classified_at"):
        value = getattr(event, name)
        if value is not None:
            meta[name] = value
    if event.extra:
        meta["extra"] = event.extra
    return orjson.dumps(meta) + b"\n" + event.raw


def decode(value: bytes | None) -> MailEvent:
    if not value:
        raise EventError("empty record")
    head, sep, raw = value.partition(b"\n")
    if not sep:
        raise EventError("no metadata line")
    try:
        meta = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise EventError(f"metadata is not JSON: {e}") from None
    if not isinstance(meta, dict):
        raise EventError("metadata is not an object")
    if meta.get("v") != SCHEMA_VERSION:
        raise EventError(f"unknown schema version {meta.get('v')!r}")
    try:
        env = meta["envelope"]
        accepted_at = float(meta["accepted_at"])
        if not math.isfinite(accepted_at):  # "nan" or "1e999" as a string: no time, no file name
            raise ValueError(f"accepted_at {meta['accepted_at']!r} is not a finite time")
        if not isinstance(env["rcpt_to"], list):  # a string would become one recipient per character
            raise TypeError("envelope.rcpt_to is not a list")
        return MailEvent(
            id=str(meta["id"]),
            accepted_at=accepted_at,
            envelope=Envelope(
                mail_from=str(env["mail_from"]),
                rcpt_to=tuple(str(r) for r in env["rcpt_to"]),
                client_address=str(env.get("client_address", "")),
                helo=str(env.get("helo", "")),
            ),
            raw=raw,
            source=str(meta.get("source", "smtp")),
            label=meta.get("label"),
            lane=meta.get("lane"),
            verdict=meta.get("verdict"),
            score=meta.get("score"),
            model_version=meta.get("model_version"),
            classified_at=meta.get("classified_at"),
            extra=meta.get("extra") or {},
        )
    except (KeyError, TypeError, ValueError) as e:
        raise EventError(f"bad metadata: {e!r}") from None


def peek_id(value: bytes | None) -> str | None:
    """The event id of a record, if it can be read at all (for dead-letter reports)."""
    try:
        return decode(value).id
    except EventError:
        return None
