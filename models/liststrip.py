"""List-stripping: a message as its author sent it, before a mailing list touched it (for evaluation).

The modern evaluation set's ham are all posts to one Mailman list (usrp-users); its spam come from
one honeypot. A list leaves marks that say "list post", not "ham", and a model that reads them
looks better on that set than it is. :func:`strip` undoes, in every message (ham and spam alike),
what list software adds or rewrites, and nothing else. Edits are made on the raw bytes: every
header field and MIME part that is not edited stays byte-identical (re-serialising with the
``email`` package refolds headers and changes what a parser sees, so it is not used).

1. header fields a list adds: ``List-*`` (Id, Post, Unsubscribe, Unsubscribe-Post, Subscribe,
   Help, Owner, Archive), ``Precedence``, ``X-Mailman-*``, ``X-BeenThere``, ``Archived-At``,
   ``Message-ID-Hash``, ``X-Message-ID-Hash``, ``X-MailFrom``, ``Errors-To``, ``X-List-*``,
   ``Mailing-List``, ``X-Loop``, and ``Sender`` when it names the list;
2. DMARC From-munging: ``From: Name via List <list@host>`` goes back to the author's address,
   which the list put in ``Reply-To`` (that Reply-To is then removed: the author did not write it);
3. the list's subject tag (``[USRP-users] ``);
4. list footers in the body, in every text part (plain or HTML; 7bit, 8bit, quoted-printable or
   base64, decoded, cut, encoded again), also where a reply quotes an earlier post's footer
   (``> ____`` lines): a rule line of 20+ underscores and the following lines (at most 8) up to the
   last one naming the list (``mailing list``, ``unsubscribe``, ``listinfo``, the list's address
   or host), when ``mailing list`` is among them; a MIME part left empty (Mailman's separate
   footer part) is dropped with its delimiter.

Left alone on purpose: the delivery path (``Received``, ``Return-Path``, ``Delivered-To``,
``X-Original-To``, DKIM/ARC/Authentication-Results), which Floodgate's features never read, and
quoted text of earlier posts with its attribution lines (``X via USRP-users <usrp-users@...> wrote:``),
which the authors wrote. ``strict=True`` also removes every mention of the list's address and
every link to the list's host (``lists.ettus.com``) from the text parts: quoted attributions and
archive links name the list, and a character n-gram view can read them. :func:`residue` tells
whether a list's host is still in a message.

Used by :mod:`models.crosscorpus` (``make evaluate``); ``tests/test_models_crosscorpus.py`` checks it.
"""

from __future__ import annotations

import base64
import binascii
import email.header
import quopri
import re

from models.features import _delimited, _headers, _param, header_end

_LIST_FIELD = re.compile(rb"^(list-[a-z-]+|precedence|x-mailman-[a-z-]+|x-beenthere|archived-at|message-id-hash"
                         rb"|x-message-id-hash|x-mailfrom|errors-to|x-list-[a-z-]+|mailing-list|x-loop)$", re.I)


def _split(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """Header block, the separator, body (as features._split, keeping the separator bytes)."""
    nl, body = header_end(raw)
    if nl < 0:
        return raw, b"", b""
    return raw[:nl + 1], raw[nl + 1:body], raw[body:]


def _fields(head: bytes) -> list[bytes]:
    out: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if out and line[:1] in (b" ", b"\t"):
            out[-1] += line
        else:
            out.append(line)
    return out


def _name(field: bytes) -> bytes:
    return field.split(b":", 1)[0].strip().lower() if b":" in field else b""


def _value(field: bytes) -> bytes:
    return field.split(b":", 1)[1] if b":" in field else b""


def _text(value: bytes) -> str:
    s = value.decode("latin-1")
    if "=?" in s:
        try:
            return str(email.header.make_header(email.header.decode_header(s)))
        except Exception:
            return s
    return s


def list_address(raw: bytes) -> str | None:
    """The list's posting address from List-Post (``mailto:``), else from List-Id; None for no list."""
    head = _split(raw)[0]
    for field in _fields(head):
        if _name(field) == b"list-post":
            m = re.search(rb"mailto:([^>\s]+)", field)
            if m:
                return m.group(1).decode("latin-1").lower()
    for field in _fields(head):
        if _name(field) == b"list-id":
            m = re.search(rb"<([^>.]+)\.([^>]+)>", field)
            if m:
                return (m.group(1) + b"@" + m.group(2)).decode("latin-1").lower()
    return None


_UNDERSCORES = re.compile(r"_{20,}")
_LINE_END = re.compile(r"\n|<br\s*/?>|</p>|</div>", re.I)


def _cut_footers(text: str, marks: tuple[str, ...]) -> tuple[str, int]:
    """Cut each footer: from a run of 20+ underscores, when "mailing list" follows within 300
    characters, to the end of the line (or HTML line break) holding the last list mark (address,
    host, unsubscribe, listinfo) within 500 characters of it. Plain, HTML and quoted alike."""
    out: list[str] = []
    pos = cut = 0
    for m in _UNDERSCORES.finditer(text):
        if m.start() < pos:
            continue
        window = text[m.end():m.end() + 500].lower()
        if "mailing list" not in window[:300]:
            continue
        last = max((window.rfind(mk) + len(mk) for mk in marks if mk in window), default=-1)
        if last < 0:
            continue
        stop = _LINE_END.search(text, m.end() + last)
        end = stop.end() if stop else len(text)
        out.append(text[pos:m.start()])
        pos = end
        cut += 1
    out.append(text[pos:])
    return "".join(out), cut


def _leaf(head: bytes, body: bytes, marks: tuple[str, ...], strict: bool = False) -> tuple[bytes, int]:
    h = _headers(head)
    ctype = h.get("content-type", "text/plain").split(";", 1)[0].strip().lower() or "text/plain"
    if not ctype.startswith("text/"):
        return body, 0
    cte = h.get("content-transfer-encoding", "").strip().lower()
    try:
        data = (base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body) + b"==") if cte == "base64"
                else binascii.a2b_qp(body) if cte == "quoted-printable" else body)
    except (binascii.Error, ValueError):
        return body, 0
    charset = _param(h.get("content-type", ""), "charset").lower().strip("'\"") or "latin-1"
    try:
        text = data.decode(charset, "surrogateescape")
    except LookupError:
        charset = "latin-1"
        text = data.decode(charset)
    new, n = _cut_footers(text, marks)
    if strict and len(marks) > 3:  # marks[0], marks[1]: the list's address and host
        host_or_address = (r"(?:https?://|www\.)?" + re.escape(marks[1]) + r"[^\s\"'<>]*|(?:mailto:)?"
                           + re.escape(marks[0]))
        new, k = re.subn(host_or_address,
                         "", new, flags=re.I)
        n += k
    if not n:
        return body, 0
    try:
        out = new.encode(charset, "surrogateescape")
    except (LookupError, UnicodeEncodeError):
        out = new.encode("utf-8", "surrogateescape")
    nl = b"\r\n" if b"\r\n" in body else b"\n"
    if cte == "base64":
        out = base64.encodebytes(out).replace(b"\n", nl)
    elif cte == "quoted-printable":
        out = quopri.encodestring(out).replace(b"\n", nl)
    if out and not out.endswith(nl):
        out += nl
    return out, n


def _entity(head: bytes, body: bytes, marks: tuple[str, ...], depth: int = 0,
            strict: bool = False) -> tuple[bytes, int]:
    h = _headers(head)
    ctype_value = h.get("content-type", "")
    if not ctype_value.lower().lstrip().startswith("multipart/"):
        return _leaf(head, body, marks, strict)
    boundary = _param(ctype_value, "boundary")
    if not boundary or depth > 6:
        return body, 0
    delim = b"--" + boundary.encode("latin-1", "replace")
    chunks = _delimited(body, boundary.encode("latin-1", "replace"))
    cuts = 0
    out = [chunks[0]]
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):  # the close delimiter and the epilogue
            out.append(chunk)
            continue
        eol = chunk.find(b"\n") + 1
        if eol <= 0:
            out.append(chunk)
            continue
        first, rest = chunk[:eol], chunk[eol:]
        # the CRLF before the next delimiter belongs to that delimiter (RFC 2046)
        tail = b"\r\n" if rest.endswith(b"\r\n") else b"\n" if rest.endswith(b"\n") else b""
        rest = rest[:len(rest) - len(tail)]
        phead, sep, pbody = _split(rest)
        if not sep:
            out.append(chunk)
            continue
        new, n = _entity(phead, pbody, marks, depth + 1, strict)
        cuts += n
        if n and not _is_multipart(phead) and _decoded_empty(phead, new):
            continue  # a part that held only the list's footer: drop it with its delimiter
        out.append(first + phead + sep + new.rstrip(b"\r\n") + tail if n else chunk)
    return delim.join(out), cuts


def _is_multipart(head: bytes) -> bool:
    return _headers(head).get("content-type", "").lower().lstrip().startswith("multipart/")


def _decoded_empty(head: bytes, body: bytes) -> bool:
    cte = _headers(head).get("content-transfer-encoding", "").strip().lower()
    try:
        data = (base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", body) + b"==") if cte == "base64"
                else binascii.a2b_qp(body) if cte == "quoted-printable" else body)
    except (binascii.Error, ValueError):
        return False
    return not re.sub(rb"<[^>]*>|&nbsp;|\s", b"", data)


def strip(raw: bytes, strict: bool = False) -> bytes:
    """The message without what a mailing list added (see the module docstring)."""
    addr = list_address(raw)
    head, sep, body = _split(raw)
    fields = _fields(head)
    local, _, host = (addr or "").partition("@")
    kept: list[bytes] = []
    for f in fields:
        name = _name(f)
        if _LIST_FIELD.match(name):
            continue
        if name == b"sender" and addr and (addr.encode() in f.lower() or host.encode() in f.lower()):
            continue
        kept.append(f)
    if addr:
        frm = next((i for i, f in enumerate(kept) if _name(f) == b"from"), None)
        rto = next((i for i, f in enumerate(kept) if _name(f) == b"reply-to"), None)
        if frm is not None and rto is not None:
            value = _text(_value(kept[frm])).lower()
            if " via " in value and addr in value:
                kept[frm] = b"From:" + _value(kept[rto])
                del kept[rto]
        for i, f in enumerate(kept):
            if _name(f) == b"subject":
                kept[i] = re.sub(rb"\[" + re.escape(local.encode()) + rb"\]\s*", b"", f, flags=re.I)
        marks = (addr, host, "mailing list", "unsubscribe", "listinfo", local + "-leave", local + "-request")
    else:
        marks = ("mailing list", "unsubscribe", "listinfo")
    if sep:
        body, _ = _entity(head, body, marks, strict=strict)
    return b"".join(kept) + sep + body


def residue(raw: bytes, host: str) -> bool:
    """Does the list's host (e.g. ``lists.example.org``) still appear anywhere in the message?"""
    return host.lower().encode() in raw.lower()
