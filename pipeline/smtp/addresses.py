"""SMTP paths and parameters as the ingress reads them (RFC 5321 4.1.2, RFC 6531).

Pure functions: the command's argument in, an address and parameters (or a reply) out.
Addresses are compared and stored normalised, so that every spelling of one address reaches
one mailbox: the domain as IDNA (UTS #46 mapping: case, fullwidth forms, ideographic full
stops) after NFC, the local part NFC. Control characters (NUL included) and invisible ones
(zero-width, soft hyphen, bidirectional marks: Unicode format characters) are refused before
IDNA could quietly drop them, so no lookalike reaches a mailbox no user reads.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import idna

# RFC 5321 4.5.3.1.3: a path is at most 256 octets.
MAX_PATH = 256
# Unicode categories an address must not contain: controls (NUL, CR, LF, ESC...) and format
# characters, the invisible ones (zero-width space and joiners, soft hyphen, bidirectional
# marks, the byte-order mark). IDNA would quietly drop some of them, so they are refused first.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf"})


class PathError(Exception):
    """A path or its parameters cannot be taken; ``reply`` is the SMTP answer."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class Path:
    address: str  # "" for the null reverse-path <>
    params: dict[str, str | None]  # upper-case keyword -> value (None: a keyword without value)


def invisible_or_control(text: str) -> bool:
    if text.isascii():
        return any(c < " " or c == "\x7f" for c in text)
    return any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in text)


def normalize_domain(domain: str) -> str | None:
    """The lower-case ASCII form of a domain (NFC, then IDNA with UTS #46 mapping: fullwidth
    letters and ideographic full stops become what they look like), or None when it cannot be
    one of ours (a literal, invisible or control characters, not a valid IDNA name)."""
    d = domain.strip()
    if not d or d.startswith("[") or invisible_or_control(d):  # address literals are never local here
        return None
    if d.isascii():
        d = d.lower().rstrip(".")
        if d and all(label and len(label) <= 63 for label in d.split(".")) and not d.startswith("xn--"):
            return d  # the common case, without the IDNA tables
    try:
        return idna.encode(unicodedata.normalize("NFC", d), uts46=True).decode("ascii").rstrip(".")
    except (idna.IDNAError, UnicodeError):
        return None


def parse(arg: bytes, keyword: bytes, smtputf8_allowed: bool) -> Path:
    """``FROM:<path> params`` (or ``TO:``) of a MAIL or RCPT command. Raises :class:`PathError`.

    The address must be ASCII unless the parameters (MAIL) or the transaction (decided by the
    caller for RCPT: ``smtputf8_allowed``) carry SMTPUTF8; UTF-8 that does not decode is refused."""
    bad = "5.1.7" if keyword == b"FROM:" else "5.1.3"  # RFC 3463: bad sender's / destination syntax
    head = arg[:len(keyword)]
    if head.upper() != keyword:
        raise PathError(f"501 5.5.4 syntax: {keyword.decode()}<address>")
    rest = arg[len(keyword):].lstrip(b" ")
    if rest.startswith(b"<"):
        end = rest.find(b">")
        if end < 0:
            raise PathError("501 5.1.3 syntax: the address has no closing '>'")
        raw_path, raw_params = rest[1:end], rest[end + 1:]
    else:  # lenient: a bare address, as some clients send it
        raw_path, _, raw_params = rest.partition(b" ")
    if raw_params and not raw_params.startswith(b" "):
        raise PathError("501 5.5.4 syntax: parameters must follow the address after a space")
    params: dict[str, str | None] = {}
    for item in raw_params.split():
        key, eq, value = item.partition(b"=")
        try:
            params[key.decode("ascii").upper()] = value.decode("ascii") if eq else None
        except UnicodeDecodeError:
            raise PathError("501 5.5.4 parameters must be ASCII") from None
    if b":" in raw_path and raw_path.startswith(b"@"):  # a source route (RFC 5321 4.1.2): ignored
        raw_path = raw_path.split(b":", 1)[1]
    if len(raw_path) > MAX_PATH:
        raise PathError("501 5.1.3 the address is longer than 256 octets")
    try:
        address = raw_path.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("553 5.1.3 address is not valid UTF-8") from None
    if invisible_or_control(address):
        raise PathError(f"553 {bad} address has control or invisible characters")
    if not address.isascii() and not (smtputf8_allowed or "SMTPUTF8" in params):
        raise PathError("553 5.6.7 non-ASCII address without the SMTPUTF8 parameter")
    local, at, domain = address.rpartition("@")
    quoted = len(local) >= 2 and local.startswith('"') and local.endswith('"')
    if address and not (at and local and domain) and address.lower() != "postmaster":
        raise PathError(f"553 {bad} malformed address")
    if " " in domain or (" " in local and not quoted):
        raise PathError(f"553 {bad} malformed address")
    return Path(address if address.isascii() else unicodedata.normalize("NFC", address), params)
