"""Where classified mail ends up: Maildirs or a downstream LMTP/SMTP server (ham), the quarantine (spam).

This module holds the trace headers that delivery prepends to every message: the only change
Floodgate ever makes to the bytes it received. :func:`unstamp` takes them off again, so a
delivered message can be fed back (``floodgate report``) exactly as it arrived.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pipeline.core.events import MailEvent

SCORE_HEADER = b"X-Floodgate-Score"
TRACE_HEADER = b"X-Floodgate-Trace"
# Header values come from event metadata; nothing outside printable ASCII (no CR/LF that could
# smuggle in a header of the sender's choosing) and nothing longer than a header line should be.
_UNSAFE = re.compile(r"[^\x20-\x7e]")
VALUE_MAX = 200


def _clean(value: object) -> str:
    return _UNSAFE.sub("?", str(value))[:VALUE_MAX]


def iso(ts: float | None) -> str:
    if ts is None:
        return "unknown"
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def from_iso(value: str) -> float | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def newline_of(raw: bytes) -> bytes:
    """The line ending the message itself uses (CRLF as received over SMTP, LF from a Maildir)."""
    end = raw.find(b"\n")
    return b"\r\n" if end > 0 and raw[end - 1:end] == b"\r" else b"\n"


def stamp(event: MailEvent) -> bytes:
    """The message with the score and trace headers on top; the original bytes follow unchanged."""
    nl = newline_of(event.raw)
    score = "unknown" if event.score is None else f"{float(event.score):.4f}"
    lines = [
        SCORE_HEADER + f": {score} (model {_clean(event.model_version or 'unknown')})".encode(),
        TRACE_HEADER + (f": event={_clean(event.id)}; lane={_clean(event.lane or 'unknown')}; "
                        f"accepted={iso(event.accepted_at)}; classified={iso(event.classified_at)}").encode(),
    ]
    return nl.join(lines) + nl + event.raw


def unstamp(data: bytes) -> tuple[dict[str, str], bytes]:
    """Our two headers (by name, lowercased) and the original message under them.

    Only the first two lines are ours, and only if they carry our names in our order: a sender's
    forged ``X-Floodgate-*`` header further down is part of the original message and stays.
    """
    found: dict[str, str] = {}
    rest = data
    for name in (SCORE_HEADER, TRACE_HEADER):
        if rest[:len(name) + 1].lower() != name.lower() + b":":
            break
        line, nl, tail = rest.partition(b"\n")
        if not nl:
            break
        found[name.decode().lower()] = line[len(name) + 1:].strip().decode(errors="replace")
        rest = tail
    return found, rest


# Header fields a mail store puts above the message it was handed on delivery: Dovecot's LMTP
# adds Return-Path (always), Delivered-To and Received; Postfix's local delivery X-Original-To.
DELIVERY_HEADERS = (b"return-path", b"delivered-to", b"received", b"x-original-to")


def unstamp_delivered(data: bytes) -> tuple[dict[str, str], bytes]:
    """Like :func:`unstamp`, for a copy read back from a mail store (an IMAPSieve pipe, an IMAP
    FETCH): the fields the store added on top (:data:`DELIVERY_HEADERS`, folded lines included)
    are skipped, then our two headers are taken off. Only when our headers follow them directly:
    a message Floodgate never stamped comes back whole, its own Received lines and all, and a
    sender's ``X-Floodgate-*`` further down is never taken for ours."""
    pos = 0
    while True:
        end = data.find(b"\n", pos)
        if end < 0:
            return {}, data
        name = data[pos:end].split(b":", 1)[0].strip().lower()
        if name not in DELIVERY_HEADERS:
            break
        pos = end + 1
        while data[pos:pos + 1] in (b" ", b"\t"):  # a folded continuation of the same field
            end = data.find(b"\n", pos)
            if end < 0:
                return {}, data
            pos = end + 1
    found, rest = unstamp(data[pos:])
    return (found, rest) if found else ({}, data)


def parse_trace(value: str) -> dict[str, str]:
    """``event=…; lane=…; accepted=…`` → a dict."""
    out: dict[str, str] = {}
    for part in value.split(";"):
        key, eq, val = part.strip().partition("=")
        if eq:
            out[key] = val
    return out
