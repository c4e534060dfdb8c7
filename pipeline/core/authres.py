"""Authentication-Results (RFC 8601) and the event's ``extra["auth"]``: what ingress proved.

The contract between the SMTP ingress, which verifies senders (:mod:`pipeline.smtp.auth`) and
records the results in two places, and everyone who reads them:

* the message gets one ``Authentication-Results`` field with Floodgate's authserv-id as its first
  line (``settings.auth.authserv_id``, else ``smtp.hostname``); any field claiming that id that
  came with the message is removed first (RFC 8601 section 5: a forgery, or a stale copy), so
  within Floodgate a field with our id was written by us. ``floodgate replay``, which does not
  verify, removes them too;
* the event's metadata gets ``extra["auth"]``::

      {"spf": {"mailfrom": {...}, "helo": {...} | null}, "dkim": [{...}, ...], "dmarc": {...},
       "arc": {...} | null, "proven": ["example.org", ...], "elapsed_ms": 1.2, "timed_out": false}

  ``proven`` is what admission and the reputation worker read (:func:`proven_domains`): the
  domains the message proved it may speak for — the DMARC-aligned From domain, the MAIL FROM
  domain when SPF passed, each passing DKIM ``d=``. A HELO name is the client's, never a sender's.

This module is the parsing both sides share (standard library only): header fields as bytes,
the authserv-id of a field, removal of our fields.
"""

from __future__ import annotations

import re
from typing import Any

AUTH = "auth"  # the key in an event's extra
NAME = b"authentication-results"
_HEADER_END = re.compile(rb"\n\r?\n")
_LINE = re.compile(rb"[^\n]*\n|[^\n]+")
_ID = re.compile(rb"[^\s;()\"]*")
# A proven name as metadata carries it: a DNS name (ASCII, IDNA for internationalised ones).
_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*")
MAX_PROVEN = 16  # more than a message can honestly prove (max_signatures + 2); a forged event is cut here


def split_message(raw: bytes) -> tuple[bytes, bytes]:
    """(header block up to and including its last line end, the rest from the empty line on)."""
    if raw.startswith((b"\r\n", b"\n")):
        return b"", raw
    m = _HEADER_END.search(raw)
    if m is None:
        return raw, b""
    return raw[:m.start() + 1], raw[m.start() + 1:]


def header_fields(head: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """(name, value, the field's raw bytes) for each field of a header block. Continuation lines
    (starting with SP/HTAB) belong to the field before; a line without a colon is its own field
    with an empty name (kept as it is)."""
    fields: list[list[bytes]] = []
    for line in _LINE.findall(head):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    out = []
    for lines in fields:
        rawf = b"".join(lines)
        name, colon, value = rawf.partition(b":")
        if not colon or lines[0][:1] in (b" ", b"\t"):
            out.append((b"", b"", rawf))
        else:
            out.append((name.rstrip(b" \t"), value, rawf))
    return out


def _skip_cfws(s: bytes, i: int) -> int:
    """Past folding whitespace and (nested) comments; an unclosed comment runs to the end."""
    n = len(s)
    while i < n:
        c = s[i:i + 1]
        if c in b" \t\r\n":
            i += 1
        elif c == b"(":
            depth = 0
            while i < n:
                c = s[i:i + 1]
                if c == b"\\":
                    i += 2
                    continue
                if c == b"(":
                    depth += 1
                elif c == b")":
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        else:
            break
    return i


def authserv_id_of(value: bytes) -> str:
    """The authserv-id of an Authentication-Results value: a token or quoted-string after CFWS,
    lowercased, without a trailing dot (how it is compared)."""
    i = _skip_cfws(value, 0)
    if value[i:i + 1] == b'"':
        out = bytearray()
        i += 1
        while i < len(value):
            c = value[i]
            if c == 0x5C and i + 1 < len(value):
                out.append(value[i + 1])
                i += 2
                continue
            if c == 0x22:
                break
            if c not in (0x0D, 0x0A):
                out.append(c)
            i += 1
        ident = bytes(out)
    else:
        m = _ID.match(value, i)
        ident = m.group(0) if m else b""
    return ident.decode("utf-8", "replace").strip().rstrip(".").lower()


def normalise_id(authserv_id: str) -> str:
    return authserv_id.strip().rstrip(".").lower()


def strip_ours(raw: bytes, authserv_id: str) -> tuple[bytes, int]:
    """The message without any Authentication-Results field carrying ``authserv_id``; other
    fields and the body byte for byte. Returns it and how many fields were removed."""
    ours = normalise_id(authserv_id)
    head, rest = split_message(raw)
    if NAME not in head.lower():
        return raw, 0
    kept, removed = [], 0
    for name, value, rawf in header_fields(head):
        if name.lower() == NAME and authserv_id_of(value) == ours:
            removed += 1
            continue
        kept.append(rawf)
    if not removed:
        return raw, 0
    return b"".join(kept) + rest, removed


def ours(raw: bytes, authserv_id: str) -> bytes | None:
    """The value of the topmost Authentication-Results field with ``authserv_id`` (ingress puts
    its own first and removes any other), or None."""
    head, _ = split_message(raw)
    if NAME not in head.lower():
        return None
    want = normalise_id(authserv_id)
    for name, value, _raw in header_fields(head):
        if name.lower() == NAME and authserv_id_of(value) == want:
            return value
    return None


def verified(extra: Any) -> dict[str, Any] | None:
    """The event's verification record (``extra["auth"]``), or None when ingress did not verify."""
    rec = extra.get(AUTH) if isinstance(extra, dict) else None
    return rec if isinstance(rec, dict) else None


def proven_domains(extra: Any) -> list[str] | None:
    """The domains an event proved, lowercased (possibly none); None when it carries no
    verification (``floodgate replay``, verification off): then nothing was checked either way.
    A malformed record proves nothing."""
    rec = verified(extra)
    if rec is None:
        return None
    names = rec.get("proven")
    if not isinstance(names, list):
        return []
    out = []
    for d in names[:MAX_PROVEN]:
        if isinstance(d, str):
            d = d.strip().rstrip(".").lower()
            if len(d) <= 253 and _DOMAIN.fullmatch(d):
                out.append(d)
    return list(dict.fromkeys(out))
