"""Campaign fingerprints: the same spam sent to many people hashes to the same value.

A fingerprint is a short hash of the message's subject and body, ignoring the headers that
change per copy (Received, Message-ID, Date, To, ...) and all whitespace. Spam
campaigns are near-duplicates; exact-body copies are the common case in a flood and cost one
hash here instead of a parse and a scan. (Fuzzy hashing of varied copies is not built.)
"""

from __future__ import annotations

import hashlib
import re

# Enough of the body to tell campaigns apart; hashing more only costs time.
BODY_BYTES = 16 * 1024
# Whitespace is dropped, not folded: bytes.translate deletes it in one C pass (16 µs a message
# on the corpus, where splitting and re-joining took 44 µs; every message at ingress pays it).
_WHITESPACE = b" \t\r\n\x0b\x0c"
_SUBJECT = re.compile(rb"^subject:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)


def split(raw: bytes) -> tuple[bytes, bytes]:
    """Header block and body, split at the first empty line (CRLF or LF)."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return raw[:i], raw[i + len(sep):]
    return raw, b""


def fingerprint(raw: bytes) -> str:
    head, body = split(raw)
    m = _SUBJECT.search(head)
    subject = m.group(1) if m else b""
    h = hashlib.blake2b(digest_size=12)
    h.update(subject.translate(None, _WHITESPACE).lower())
    h.update(b"\0")
    h.update(body[:BODY_BYTES].translate(None, _WHITESPACE))
    return h.hexdigest()
