"""A quarantined message made safe to show: every byte of it was written by an attacker.

What a page gets (:func:`view`): the header block as text, the first ``text/plain`` part as
text, the first ``text/html`` part *sanitized* (nh3, Ammonia's allow-list: no script, no style,
no event handler, no form, no image, no URL-bearing attribute at all: no link to follow and no
pixel to fetch), and a list of the attachments by name, type and size — never their contents.
The templates escape all text (Jinja2 autoescape); the sanitized HTML is served only as the
body of a sandboxed iframe under its own content-security policy (:mod:`pipeline.web.app`), so
even a sanitizer bug runs no script and loads nothing.

Parsing is bounded: the stdlib parser (compat32, no RFC 2047 decoding on access: its decoder
is quadratic) takes the whole message, up to 0.6 s for the hostile corpus's 8 MiB attachment
bomb; the walk stops after ``MAX_PARTS`` parts or ``MAX_DEPTH`` levels, and at most
``MAX_TEXT_CHARS`` of a part are decoded. Charsets that are not text encodings (``rot13``,
``zlib``, ``base64``…) or that fail fall back to UTF-8 with replacement characters.
"""

from __future__ import annotations

import codecs
import email
import email.policy
import re
from dataclasses import dataclass, field
from email.message import Message

import nh3

from pipeline.sinks.quarantine import header_block

MAX_PARTS = 200  # parts walked; the hostile corpus has a 5,000-part message
MAX_DEPTH = 30  # multipart / message/rfc822 nesting followed; it has a 500-deep one
MAX_TEXT_CHARS = 200_000  # of a text or HTML part shown (a 6 MiB text bomb is cut here)
MAX_ATTACHMENTS = 100  # listed; more are counted
NAME_MAX = 200  # of an attachment's name as listed
# Shown as text, these look like something else or hide text: C0/C1 controls but tab and line
# ends, and the bidirectional overrides and isolates that reorder what follows them (a subject
# or file name "gpj.exe" shown as "exe.jpg").
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Ammonia's allow-list less everything that fetches or navigates: images and image maps, and
# every attribute holding a URL (a link keeps its text, not its target).
HTML_TAGS = nh3.ALLOWED_TAGS - {"img", "area", "map"}
URL_ATTRIBUTES = frozenset({"href", "src", "cite", "longdesc", "srcset", "background", "action", "poster"})
HTML_ATTRIBUTES = {tag: set(attrs) - URL_ATTRIBUTES for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()
                   if tag in HTML_TAGS}


def visible(text: str) -> str:
    """``text`` with control and bidi-override characters shown as U+FFFD, never acted on."""
    return _INVISIBLE.sub("\ufffd", text)


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    size: int  # bytes as transferred (before decoding base64 and the like)


@dataclass
class View:
    headers: str
    text: str | None = None
    html: str | None = None  # sanitized
    attachments: list[Attachment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was left out, and why


def sanitize(html: str) -> str:
    """HTML with only the allow-listed tags and attributes (see the module docstring)."""
    return nh3.clean(html, tags=HTML_TAGS, attributes=HTML_ATTRIBUTES, url_schemes=set(), strip_comments=True)


def _decode(data: bytes, charset: str | None) -> str:
    name = (charset or "utf-8").strip().lower()
    try:
        info = codecs.lookup(name)
        if not getattr(info, "_is_text_encoding", True):  # rot13, zlib, base64: transforms, not charsets
            raise LookupError(name)
        return data.decode(info.name, errors="replace")
    except Exception:  # unknown, lying or broken charsets: anything can be raised
        return data.decode("utf-8", errors="replace")


def _raw(part: Message) -> str:
    """A leaf part's body as parsed (bytes as ASCII with surrogate escapes). Not ``get_payload()``:
    it decodes with the part's own charset and lets a lying one raise (``idna`` with errors=replace)."""
    raw = part._payload  # compat32's storage: a str for a leaf part
    return raw if isinstance(raw, str) else ""


def _payload(part: Message, notes: list[str]) -> bytes:
    """A part's body, transfer-decoded, cut to what is shown."""
    raw = _raw(part)
    if len(raw) > MAX_TEXT_CHARS * 2:  # encoded text is at most ~1.4x the decoded (base64)
        raw = raw[:MAX_TEXT_CHARS * 2]
        notes.append(f"a text part was cut to its first {MAX_TEXT_CHARS:,} characters")
    cut = Message()
    cte = part.get("content-transfer-encoding")
    if cte is not None:
        cut["Content-Transfer-Encoding"] = str(cte)
    cut.set_payload(raw)
    try:
        data = cut.get_payload(decode=True)
    except Exception:
        data = raw.encode("utf-8", errors="replace")
    return data if isinstance(data, bytes) else b""


def _text(part: Message, notes: list[str]) -> str:
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    return _decode(_payload(part, notes), charset)[:MAX_TEXT_CHARS]


def _name(part: Message) -> str:
    try:
        name = part.get_filename() or part.get_param("name") or ""
    except Exception:
        name = ""
    if isinstance(name, tuple):  # an undecoded RFC 2231 value
        name = str(name[2])
    return visible(str(name))[:NAME_MAX] or "(no name)"


def view(raw: bytes) -> View:
    """What a page may show of ``raw`` (see the module docstring)."""
    out = View(headers=visible(header_block(raw).decode("utf-8", errors="replace")))
    try:
        root = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception:  # the parser is lenient; this is for what it still refuses
        out.notes.append("the message could not be parsed; only its headers are shown")
        return out
    stack: list[tuple[Message, int]] = [(root, 0)]
    seen = 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > MAX_PARTS:
            out.notes.append(f"only the first {MAX_PARTS} parts were looked at")
            break
        try:
            ctype = part.get_content_type()
            disposition = (part.get_content_disposition() or "").lower()
        except Exception:
            ctype, disposition = "application/octet-stream", "attachment"
        if part.is_multipart():  # multipart, message/rfc822: a list of parts
            if depth >= MAX_DEPTH:
                out.notes.append(f"parts nested deeper than {MAX_DEPTH} levels are not shown")
                continue
            children = part.get_payload()
            stack.extend((p, depth + 1) for p in reversed(children) if isinstance(p, Message))
            continue
        if ctype == "text/plain" and disposition != "attachment" and out.text is None:
            out.text = visible(_text(part, out.notes))
        elif ctype == "text/html" and disposition != "attachment" and out.html is None:
            out.html = sanitize(_text(part, out.notes))
        else:
            if len(out.attachments) < MAX_ATTACHMENTS:
                out.attachments.append(Attachment(_name(part), visible(ctype)[:100], len(_raw(part))))
            elif len(out.attachments) == MAX_ATTACHMENTS:
                out.notes.append(f"only the first {MAX_ATTACHMENTS} attachments are listed")
    return out
