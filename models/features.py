"""Raw RFC 5322 bytes -> one line of feature tokens, fast and total (it never raises on any bytes).

:class:`MailText` is the first step of the model pipeline (see :mod:`models.pipeline`). For each
message it emits space-separated tokens that the hashing vectorizer then counts:

* words of the subject (``s:word``) and of every text part (plain words; HTML reduced to its text),
* structure that a sender cannot fake cheaply or that describes the mail itself:
  ``from:<domain>`` / ``fromreg:<registered domain>`` / ``fromtld:<tld>``, ``url:<host>`` /
  ``urlreg:<registered domain>`` / ``urltld:<tld>`` and ``up:<word>`` for the words of a URL's path
  (time-split AUC 0.9991 -> 0.9993),
  ``email:<domain>``, ``ct:<mime type>``, ``cs:<charset>``, ``cte:<encoding>``, ``att:<extension>``,
  ``tag:<html tag>``, ``mime:<shape>``, ``xm:<mailer>``, ``h:<header>`` / ``h:no-<header>`` for the
  presence of a few headers the sender's software writes (Message-ID, In-Reply-To, X-Priority, …;
  time-split AUC 0.9988 -> 0.9990) and a few counts in buckets;
* since version 4, the shape of what the sender's software wrote and of the text (each measured
  with 3 x 5-fold cross-validation on the time split's training groups, see :mod:`models.pipeline`):
  ``mid:<shape>@<where>`` (Message-ID: ``9a9a$9a9$9a9@bare`` is Outlook's form, ``9.9@from`` sendmail's on
  the sender's domain), ``xm2:``/``xmv:`` (mailer family and exact build), ``fromlocal:<shape>``,
  ``body:upper_*`` / ``body:excl_*`` (capitals and exclamation marks per text part),
  ``html:imgs_*`` / ``html:tags_*`` / ``html:text_*`` (images, markup, text share), HTML sent as
  ``text/plain`` (reduced to its text, ``mime:html_in_plain``), ``num:percent_*`` /
  ``num:toll_free`` and subject marks (``s:__excl``, ``s:__money``, ``s:__trailing_id``);
* since version 7 (issue 21): ``mime:html_only`` (HTML with no text alternative),
  ``text:space_*`` (white-space share of the text: table layouts), links whose visible text names
  another site (``html:link_names_other_*``) or that show only an image (``html:image_links_*``),
  ``url:sites_*`` (distinct linked sites) and ``url:from_site`` / ``url:no_from_site`` (whether
  any link goes to the sender's own site); XML namespace and DTD hosts are not links
  (:data:`MARKUP_HOSTS`); text and subject are NFKC-folded with invisible characters dropped
  (:func:`_plain`: ``𝐅𝐑𝐄𝐄`` and ``ver\u200bify`` read as words).

:class:`MailText` emits, per message, the tokens, then :data:`VIEW_SEP`, then the *character view*:
the subject and the text as written (lower case, links and addresses kept, list footers cut), its
first :data:`CHAR_VIEW_CHARS`. :func:`split_tokens` reads the tokens; :class:`ByteGrams` hashes
the view's byte 4-grams (see :mod:`models.pipeline`). The view holds nothing the tokens' sources
do not (subject, body): :func:`verdict_key` covers it as it is.

What it leaves out on purpose:

* verdicts of other filters (``X-Spam-*``, ``X-Barracuda-*``, any header not read below, and
  subject tags such as ``[SPAM]``): senders can forge them, so they must not decide anything;
* the SpamAssassin corpus's collection artefacts, which leak labels in-corpus and do not transfer:
  routing headers (``Received``, ``Delivered-To``, ``Return-Path``, ``To``/``Cc``, dates), the
  collector's hosts (:data:`ARTEFACT_DOMAINS`), mailing-list footers (:data:`_FOOTERS`), bracketed
  list tags in subjects, and bare numbers (the year 2002 above all).

Speed: this runs once per message on the classify path (≥ 2,000 msg/s per core is the goal). So
no ``email`` package parsing: headers are unfolded with one regex, MIME parts are cut at their
boundary's delimiter lines by hand (:func:`_delimited`), transfer encodings use :mod:`binascii` (C),
and only the first :data:`MAX_PART_BYTES` of each part and :data:`MAX_TEXT_CHARS` of text per
message are tokenized.
"""

from __future__ import annotations

import binascii
import hashlib
import html
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, TransformerMixin

# Bump whenever the tokens for the same bytes change: a model is only valid with the features it
# was trained on, so the registry refuses an artifact recorded with another version.
# 6: MIME parts cut only at whole delimiter lines (RFC 2046 5.1.1, _delimited)
# 7: MailText emits the character view after the tokens (VIEW_SEP); mime:html_only, text:space_*;
#    NFKC and invisible characters dropped (_plain); links: html:link_names_other_*, html:image_links_*,
#    url:sites_*, url:from_site / url:no_from_site; XML namespace and DTD hosts are not links (MARKUP_HOSTS)
FEATURE_VERSION = 7

# Spam shows its hand early; the tail of a long part costs time and adds little (measured on the corpus).
MAX_PART_BYTES = 12_000
MAX_TEXT_CHARS = 12_000
MAX_PARTS = 24  # MIME parts looked at per message; a bomb of thousands of parts costs no more
MAX_DEPTH = 4  # nesting of multiparts / message/rfc822
# Only this much of a message is looked at (headers and the first parts); a bigger message is
# mostly attachment, and the cap bounds the cost of any input, 10 MiB attachment bombs included.
MAX_MESSAGE_BYTES = 256_000
MAX_HEAD_BYTES = 32_000  # a header block beyond this is garbage or an attack; the rest is body
MAX_HEADER_CHARS = 1_000  # of a Subject or From value: a longer one is an attack, its start says enough
# The character view (hashed byte 4-grams, ByteGrams): subject and text as written, this much of it.
CHAR_VIEW_CHARS = 3_000
VIEW_SEP = "\x00"  # between the tokens and the character view in MailText's output; never in a token

# Where the SpamAssassin corpus was collected: these hosts appear in its ham and spam for reasons
# unrelated to spamminess (list servers, the collector's own domains and mail relay (webnote.net:
# it wrote the Message-ID of 131 spam and 5 ham that came without one), anonymised addresses).
ARTEFACT_DOMAINS = ("taint.org", "netnoteinc.com", "jmason.org", "slashnull.org", "webnote.net", "example.com")

_FOLD = re.compile(r"\r?\n[ \t]+")
# The only headers read; everything else (routing, dates, other filters' verdicts) is ignored.
_HEADER = re.compile(r"^(subject|from|reply-to|content-type|content-transfer-encoding|content-disposition"
                     r"|x-mailer|user-agent|x-priority|x-msmail-priority|in-reply-to|references|organization"
                     r"|mime-version|message-id)[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.M | re.I)
_HEADER_FIRST = frozenset("sfrcxuiomSFRCXUIOM")  # the first letters of the names _HEADER reads
# Headers whose presence or absence is recorded: what the sender's software wrote, not routing.
_PRESENCE = ("x-mailer", "user-agent", "x-priority", "x-msmail-priority", "in-reply-to", "references",
             "organization", "mime-version", "message-id", "reply-to")
_PARAM = {name: re.compile(name + r'\*?\s*=\s*(?:"([^"]*)"|([^\s;]+))', re.I)
          for name in ("boundary", "charset", "name", "filename")}
_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?\s]*)\?=")
_SUBJECT_TAG = re.compile(r"^\s*(?:(?:re|fw|fwd|aw)\s*:\s*|\[[^\]]{0,40}\]\s*|\(?\*{0,3}\s*spam\s*\*{0,3}\)?:?\s*"
                          r"|\{[^}]{0,40}\}\s*)+", re.I)
_ADDR_DOMAIN = re.compile(r"@([a-z0-9.-]+\.[a-z]{2,})", re.I)
# These run on lower-cased text: case-insensitive patterns cost several times more.
_URL = re.compile(r"(?:https?://|www\.)([a-z0-9.-]+)([^\s\"'<>]*)")
_EMAIL_DOMAIN = re.compile(r"@([a-z0-9-]+(?:\.[a-z0-9-]+)+)")  # anchored on '@': a fast scan, no backtracking
_LOCAL_PART_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._+-=")
_IP = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
# Words: letters then letters, digits, ' or $; money amounts; each CJK character on its own (those
# scripts do not separate words with spaces). Bare numbers are left out.
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_WORDS = re.compile(rf"[a-z\u00c0-\u2e7f][a-z0-9'$\u00c0-\u2e7f]{{1,24}}|[{_CJK}]|\$\d[\d,.]*")
_HTML_DROP = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->", re.S)
_HTML_TAG = re.compile(r"<\s*/?([a-z][a-z0-9]*)[^>]*>")
# In an <a ...> tag (lower case): where it links; its label is searched for a host name it shows
_HREF = re.compile(r"href\s*=\s*[\"']?https?://([a-z0-9.-]+)")
MAX_ANCHORS = 100  # links looked at per HTML part
_HOST_IN_TEXT = re.compile(r"(?:https?://|www\.)?((?:[a-z0-9-]+\.)+(?:com|net|org|info|biz|[a-z]{2}))\b")
_TAGS_KEPT = frozenset({"img", "a", "table", "font", "form", "input", "script", "iframe", "map", "center", "b", "br",
                        "p", "div", "style", "object", "embed", "body"})
# Footers that mailing-list software appends (Yahoo! Groups, SourceForge, Irish LUG; Mailman in
# _cut_footer): everything from the marker on is the list's, not the sender's. Plain substrings:
# str.find is far cheaper than a regex alternation over the whole text.
_FOOTER_MARKS = ("yahoo! groups sponsor", "\nthis sf.net email is sponsored", "\nto unsubscribe from this group,",
                 "\nirish linux users' group", "\nto unsubscribe, e-mail:")
_MAILMAN_RULE = "\n" + "_" * 40
# What may follow "--" + boundary at the start of a line for it to be a delimiter line (RFC 2046
# 5.1.1): "--" for the close delimiter, then only transport padding (spaces, tabs) to the line's end.
# Anything else ("--XAA" under boundary "X": a nested part's longer boundary) is part of the content.
_DELIMITER_TAIL = re.compile(rb"(?:--)?[ \t]*(?:\r|\n|\Z)")
_MISSES_BEFORE_REGEX = 64  # false delimiter candidates checked in Python before one regex scans the rest
_NOT_B64 = re.compile(rb"[^A-Za-z0-9+/]+")
_NOT_UPPER = bytes(i for i in range(256) if not 0x41 <= i <= 0x5A)  # bytes.translate deletes all but A-Z
_PERCENT = re.compile(r"\d%")
_TOLL_FREE = re.compile(r"\b1?[ (.-]*8[0-8]{2}[ ).-]+\d{3}[ .-]?\d{4}\b")  # 1-800-555-1234, (888) 555 1234
# What every _TOLL_FREE match contains; it starts with a literal, so it scans at memchr speed and
# spares the full pattern (which tries every word boundary: ~40 us a message) most texts.
_TOLL_FREE_CORE = re.compile(r"8[0-8]{2}[ ).-]+\d{3}[ .-]?\d{4}\b")
# Subjects that end in a tracking id: "Great offer   8273" or "... hello x7kq2"
_SUBJECT_ID = re.compile(r"\s{3,}\S+\s*$|\s(?=[a-z]*\d)(?=\d*[a-z])[a-z0-9]{4,}\s*$", re.I)
_RUN = re.compile(r"[a-z]+|[A-Z]+|[0-9]+")
_LOCAL_PART = re.compile(r"([A-Za-z0-9._%+=-]{1,64})@")
_MESSAGE_ID = re.compile(r"<?([^@<>]{0,120})@([^>\s]{0,120})")


def _decode(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset or "latin-1", "replace")
    except (LookupError, ValueError):  # unknown or bogus charset name
        return data.decode("latin-1")


# Invisible characters that split a word for a filter but not for a reader (zero-width space, joiners,
# word joiner, byte order mark, soft hyphen): dropped before tokenizing.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad\u034f\u180e]+")  # (a regex: str.translate
# with a table costs ~0.5 ms on a long text)


def _plain(text: str) -> str:
    """Unicode compatibility forms folded (NFKC: mathematical bold letters, full-width forms and
    ligatures to plain letters) and invisible characters dropped: the spellings that dodge word
    filters read as the words they show. ASCII text (str.isascii is O(1)) is returned as it is."""
    if text.isascii():
        return text
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words (``=?utf-8?B?…?=``) in a header value, leniently."""
    if "=?" not in value:
        return value

    def one(m: re.Match[str]) -> str:
        charset, enc, text = m.group(1).split("*")[0], m.group(2).lower(), m.group(3)
        try:
            if enc == "b":
                data = binascii.a2b_base64(text + "=" * (-len(text) % 4))
            else:
                data = binascii.a2b_qp(text.replace("_", " ").encode("latin-1", "replace"), header=True)
        except (binascii.Error, ValueError):
            return text
        return _decode(data, charset)

    return _ENCODED_WORD.sub(one, value)


def _b64(data: bytes) -> bytes:
    """Lenient base64: only alphabet characters, cut to whole quanta (the payload may be truncated)."""
    data = _NOT_B64.sub(b"", data)
    return binascii.a2b_base64(data[: len(data) - len(data) % 4])


def _headers(head: bytes) -> dict[str, str]:
    head = head[:MAX_HEAD_BYTES]
    try:
        text = head.decode("utf-8")  # raw UTF-8 headers (RFC 6532) are common; fails fast when not
    except UnicodeDecodeError:
        text = head.decode("latin-1")
    out: dict[str, str] = {}
    # _HEADER can only match at a line start whose first character begins one of its names (in
    # either case, or any non-ASCII character, which re.IGNORECASE may fold: "\u017f" is an "s"):
    # trying only those lines finds what _HEADER.findall(text) finds, at a third of the cost.
    pos = 0
    while pos >= 0:
        first = text[pos:pos + 1]
        if first in _HEADER_FIRST or (first and not first.isascii()):
            m = _HEADER.match(text, pos)
            if m:
                key = m.group(1).lower()
                if key not in out:
                    out[key] = _FOLD.sub(" ", m.group(2)).strip()
        pos = text.find("\n", pos) + 1 or -1
    return out


def _cut_footer(text: str) -> str:
    """``text`` (lower case) without a mailing list's footer."""
    cut = len(text)
    for mark in _FOOTER_MARKS:
        i = text.find(mark)
        if 0 <= i < cut:
            cut = i
    i = text.rfind(_MAILMAN_RULE)
    if 0 <= i < cut and ("mailing list" in text[i:i + 200] or "listinfo" in text[i:i + 300]):
        cut = i
    return text[:cut]


def header_end(raw: bytes, limit: int | None = None) -> tuple[int, int]:
    """Where the header block ends, at its first empty line (LF or CRLF endings, even mixed) within
    ``raw[:limit]``: ``(i, j)`` with ``raw[i]`` the newline ending the last header line and
    ``raw[j:]`` the body; ``(-1, -1)`` when there is none. bytes.find is a memchr-speed scan; a
    regex here cost 10 times more."""
    limit = len(raw) if limit is None else limit
    lf = raw.find(b"\n\n", 0, limit)
    crlf = raw.find(b"\n\r\n", 0, lf + 2 if lf >= 0 else limit)  # one that starts before lf, if any
    if crlf >= 0:
        return crlf, crlf + 3
    return (lf, lf + 2) if lf >= 0 else (-1, -1)


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """Header block (without its last line break) and body, split at the first empty line."""
    pos, end = header_end(raw, MAX_HEAD_BYTES)
    if pos < 0:
        return raw, b""
    if pos > 0 and raw[pos - 1] == 13:  # the \r of the last header line's \r\n
        pos -= 1
    return raw[:pos], raw[end:]


def _delimited(body: bytes, boundary: bytes) -> list[bytes]:
    """``body`` cut at the boundary's delimiter lines: the preamble, then what follows each delimiter
    (after a close delimiter that is ``--`` and the epilogue, and the cutting stops).

    Only a whole line is a delimiter (RFC 2046 5.1.1): ``--boundary`` at a line's start, then ``--`` or
    nothing, then only spaces or tabs to the line's end. A line that merely starts with it, such as a
    nested part's ``--XAA`` under ``X``, or ``--X--AA``, which would read as the close delimiter and
    hide every part after it, is content. At most ``MAX_PARTS + 1`` delimiters are cut (the walk reads
    no more parts than that); the rest stays in the last chunk.

    Candidates are found with ``bytes.find`` (C speed) and checked one by one; a body with more than
    :data:`_MISSES_BEFORE_REGEX` lines that start like a delimiter but are not one is hostile, and
    the rest of it is scanned by a regex compiled for this boundary (~70 us to compile: too dear for
    every message, cheap against a quarter-megabyte of such lines checked in Python).
    """
    delim = b"--" + boundary
    after_lf = b"\n" + delim
    chunks: list[bytes] = []
    start = 0  # where the current chunk begins
    misses = 0
    scan: re.Pattern[bytes] | None = None
    pos = 0 if body.startswith(delim) else body.find(after_lf) + 1 or -1  # a candidate's first byte, or -1
    while pos >= 0:
        end = pos + len(delim)
        tail = _DELIMITER_TAIL.match(body, end)
        if tail:
            chunks.append(body[start:pos])
            start = end
            if tail.group().startswith(b"--") or len(chunks) > MAX_PARTS:
                break
        else:
            misses += 1
            if misses == _MISSES_BEFORE_REGEX:
                scan = re.compile(b"\n" + re.escape(delim) + rb"(?=" + _DELIMITER_TAIL.pattern + rb")")
        if scan is None:
            pos = body.find(after_lf, end) + 1 or -1
        else:
            m = scan.search(body, end)
            pos = m.start() + 1 if m else -1
    chunks.append(body[start:])
    return chunks


def _param(value: str, name: str) -> str:
    m = _PARAM[name].search(value)
    return (m.group(1) if m.group(1) is not None else m.group(2)).strip() if m else ""


def _registered(host: str) -> str:
    """A cheap guess at the registered domain: the last two labels, three under ``co.uk``-like suffixes."""
    labels = host.split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in {"co", "com", "net", "org", "ac", "gov", "ne",
                                                                       "or", "edu"}:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _is_artefact(host: str) -> bool:
    return host.endswith(ARTEFACT_DOMAINS)


# Hosts that HTML names as XML namespaces and document types (xmlns, DOCTYPE), not links: Outlook
# writes schemas.microsoft.com into every HTML mail, and w3.org heads many a page.
MARKUP_HOSTS = ("w3.org", "schemas.microsoft.com", "schemas.openxmlformats.org", "purl.org")


def _ratio(part: int, whole: int) -> str:
    r = part / whole if whole else 0.0
    return "0" if r < 0.02 else "low" if r < 0.08 else "mid" if r < 0.2 else "high" if r < 0.5 else "most"


def _run_class(m: re.Match[str]) -> str:
    """One character for a run of lower-case letters (a), capitals (A) or digits (9)."""
    c = m.group(0)[0]
    return "9" if c.isdigit() else "a" if c.islower() else "A"


def _shape(text: str, n: int) -> str:
    """The shape of an identifier: runs of letters or digits as one character, punctuation kept, cut to ``n``."""
    return _RUN.sub(_run_class, text[:200])[:n]


def _message_id_shape(headers: dict[str, str]) -> str:
    """``<shape>@<where>`` for the Message-ID: the sender's software writes it (Outlook's
    ``<hex$hex$hex@host>``, sendmail's ``<digits.digits@host>``, spamware's fakes), and whether its
    host is the sender's domain. Never the value itself: per-copy ids must not split a campaign."""
    value = headers.get("message-id", "")
    m = _MESSAGE_ID.search(value)
    if not m:
        return "bad" if value else ""
    host = m.group(2).lower().strip(".")
    sender = _ADDR_DOMAIN.search(headers.get("from", "")[:MAX_HEADER_CHARS])
    if _is_artefact(host):
        return ""  # written by the corpus collector's own mail server: not the sender's software
    if not host:
        where = "none"
    elif _IP.match(host) or "." not in host:
        where = "bare"
    elif sender and _registered(host) == _registered(sender.group(1).lower()):
        where = "from"
    else:
        where = "other"
    return _shape(m.group(1), 10) + "@" + where


def _anchor_links(text: str) -> list[tuple[str, str]]:
    """``(host, label)`` of the first :data:`MAX_ANCHORS` ``<a href="http(s)://host...">label</a>``.
    A scan with str.find, not one regex: on hostile markup (thousands of ``<a`` with no ``>`` or no
    ``</a>``) a regex retries every start and costs tens of milliseconds; this stays linear."""
    links: list[tuple[str, str]] = []
    pos = 0
    while len(links) < MAX_ANCHORS:
        start = text.find("<a", pos)
        if start < 0:
            break
        end = text.find(">", start, start + 1_200)
        if end < 0:
            pos = start + 2
            continue
        pos = end + 1
        if text[start + 2:start + 3] not in (" ", "\t", "\r", "\n"):
            continue  # <abbr>, <area>, ...
        m = _HREF.search(text, start, end)
        if not m:
            continue
        close = text.find("</a", end, end + 400)
        links.append((m.group(1), text[end + 1:close] if close >= 0 else ""))
    return links


def _bucket(n: int) -> str:
    return "0" if n == 0 else "1" if n == 1 else "2-4" if n < 5 else "5-19" if n < 20 else "20+"


class _Extractor:
    """Walks one message; collects text and structure tokens."""

    __slots__ = ("html_parts", "nparts", "nurls", "plain", "plain_parts", "sites", "text", "text_len", "tokens")

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.text: list[str] = []
        self.plain: list[str] = []  # the text as written, links and addresses included
        self.text_len = 0
        self.nparts = 0
        self.nurls = 0
        self.html_parts = 0  # text parts read as HTML, and as plain text
        self.plain_parts = 0
        self.sites: set[str] = set()  # registered domains of the links

    def part(self, headers: dict[str, str], body: bytes, depth: int) -> None:
        self.nparts += 1
        ctype_value = headers.get("content-type", "")
        ctype = ctype_value.split(";", 1)[0].strip().lower() or "text/plain"
        if len(ctype) > 60 or "/" not in ctype:
            ctype = "bogus"
        self.tokens.append("ct:" + ctype)
        disposition = headers.get("content-disposition", "")
        filename = _param(disposition, "filename") or _param(ctype_value, "name")
        if filename:
            ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else "none"
            self.tokens.append("att:" + ext[:10])
        if ctype.startswith("multipart/"):
            boundary = _param(ctype_value, "boundary")
            if boundary and depth < MAX_DEPTH:
                self.multipart(boundary.encode("latin-1", "replace"), body, depth + 1)
            else:
                self.tokens.append("mime:broken_multipart")
            return
        if ctype == "message/rfc822" and depth < MAX_DEPTH:
            head, inner = _split(body.lstrip(b"\r\n"))
            self.part(_headers(head), inner, depth + 1)
            return
        if not ctype.startswith("text/") and ctype != "bogus":
            return
        if filename and not ctype.startswith("text/html"):
            return  # a text attachment: a file, not what the sender wrote
        cte = headers.get("content-transfer-encoding", "").strip().lower()
        payload = body[:MAX_PART_BYTES]
        if cte and cte not in {"7bit", "8bit", "binary"}:
            self.tokens.append("cte:" + cte[:20])
        try:
            if cte == "base64":
                payload = _b64(payload)
            elif cte == "quoted-printable":
                payload = binascii.a2b_qp(payload)
        except (binascii.Error, ValueError):
            self.tokens.append("cte:undecodable")
        charset = _param(ctype_value, "charset").lower().strip("'\"")
        if charset:
            self.tokens.append("cs:" + charset[:20])
        if payload:
            self.tokens.append("body:upper_" + _ratio(len(payload.translate(None, _NOT_UPPER)), len(payload)))
            self.tokens.append("body:excl_" + _bucket(payload.count(b"!")))
        text = _plain(_decode(payload, charset)).lower()
        if ctype == "text/html" or (ctype == "bogus" and "<html" in text[:2000]):
            self.html_parts += 1
            text = self._html(text)
        elif "<html" in text[:2000] or "<body" in text[:2000]:  # HTML sent as plain text
            self.tokens.append("mime:html_in_plain")
            self.html_parts += 1
            text = self._html(text)
        else:
            self.plain_parts += 1
        self.add_text(text)

    def multipart(self, boundary: bytes, body: bytes, depth: int) -> None:
        chunks = _delimited(body, boundary)
        if len(chunks) < 2:
            self.tokens.append("mime:boundary_missing")
            self.add_text(_decode(body[:MAX_PART_BYTES], "").lower())
            return
        preamble_words = len(chunks[0].split())
        if preamble_words > 20:
            self.add_text(_decode(chunks[0][:MAX_PART_BYTES], "").lower())
        for chunk in chunks[1:]:
            if chunk.startswith(b"--") or self.nparts >= MAX_PARTS:
                break
            head, inner = _split(chunk.lstrip(b" \t").removeprefix(b"\r\n").removeprefix(b"\n"))
            if not inner and b":" not in head.split(b"\n", 1)[0]:
                head, inner = b"", head  # no part headers at all: text/plain by default
            self.part(_headers(head), inner, depth)

    def _html(self, text: str) -> str:
        """Lower-case HTML -> its text; links (inside tags) are collected first, tag names kept as tokens."""
        text = _HTML_DROP.sub(" ", text)
        if "<a" in text:
            self._anchors(text)
        text = _URL.sub(self._link, text)
        all_tags = _HTML_TAG.findall(text)
        tags = set(all_tags)
        self.tokens.append("html:imgs_" + _bucket(all_tags.count("img")))
        self.tokens.append("html:tags_" + _bucket(len(all_tags) // 10))
        self.tokens.extend("tag:" + t for t in sorted(tags & _TAGS_KEPT))
        size = len(text)
        text = _HTML_TAG.sub(" ", text)
        self.tokens.append("html:text_" + _ratio(len(text) - len(all_tags), size))  # markup-heavy or text-heavy
        return html.unescape(text) if "&" in text else text

    def _anchors(self, text: str) -> None:
        """Links whose visible text names another site than the one they go to (the phisher's
        "https://bank.example" pointing elsewhere), and links with no text but an image."""
        other = bare = 0
        for href, label in _anchor_links(text[:MAX_PART_BYTES]):
            shown = _HOST_IN_TEXT.search(_HTML_TAG.sub(" ", label))
            if shown:
                target = _registered(href.lower().strip(".").removeprefix("www."))
                if _registered(shown.group(1).strip(".").removeprefix("www.")) != target:
                    other += 1
            elif "<img" in label and not _HTML_TAG.sub("", label).strip():
                bare += 1
        if other:
            self.tokens.append("html:link_names_other_" + ("1" if other == 1 else "2+"))
        if bare:
            self.tokens.append("html:image_links_" + _bucket(bare))

    def _link(self, m: re.Match[str]) -> str:
        """For ``_URL.sub``: the link's tokens, and a space in its place (one pass over the text
        where findall and then sub took two)."""
        self._url(m.group(1), m.group(2))
        return " "

    def _url(self, host: str, path: str) -> None:
        if self._host("url", host):
            self.nurls += 1
            if path:
                self.tokens.extend("up:" + w for w in _WORDS.findall(path)[:8])

    def _host(self, kind: str, host: str) -> bool:
        """Tokens for a host name; False when it is ignored (an artefact domain or empty)."""
        host = host.lower().strip(".")
        if _IP.match(host):
            self.tokens.append(kind + ":ip")
            return True
        host = host.removeprefix("www.")
        if not host or _is_artefact(host) or (kind == "url" and host.endswith(MARKUP_HOSTS)):
            return False
        self.tokens.append(f"{kind}:{host[:60]}")
        self.tokens.append(f"{kind}tld:{host.rsplit('.', 1)[-1][:20]}")
        reg = _registered(host)
        if kind == "url":
            self.sites.add(reg)
        if reg != host:
            self.tokens.append(f"{kind}reg:{reg[:60]}")
        return True

    def add_text(self, text: str) -> None:
        """Lower-case text of one part: URLs and mail domains become tokens, the rest words."""
        room = MAX_TEXT_CHARS - self.text_len
        if room <= 0:
            return
        text = _cut_footer(text[:room])
        self.text_len += len(text)
        self.plain.append(text)
        if "http" in text or "www." in text:
            text = _URL.sub(self._link, text)
        if "@" in text:
            text = self._addresses(text)
        self.text.append(text)

    def _addresses(self, text: str) -> str:
        """Mail addresses -> ``email:<domain>`` tokens; the local part is dropped too (anonymised
        ``zzzz@`` in the corpus, personal names elsewhere). Scans back from each '@' by hand: a regex
        that starts at the local part backtracks at every word and costs 100 µs a message."""
        pieces = []
        pos = 0
        for m in _EMAIL_DOMAIN.finditer(text):
            self._host("email", m.group(1))
            start = m.start()
            floor = max(pos, start - 64)
            while start > floor and text[start - 1] in _LOCAL_PART_CHARS:
                start -= 1
            pieces.append(text[pos:start])
            pos = m.end()
        pieces.append(text[pos:])
        return " ".join(pieces)


def _space_share(text: str) -> str:
    """How much of the text is white space, in five buckets: text cut out of HTML laid out with
    tables and spacer cells is mostly white space (bulk mail); prose is about 15-20 %."""
    share = 1 - len("".join(text.split())) / len(text)
    return "0" if share < 0.2 else "1" if share < 0.35 else "2" if share < 0.5 else "3" if share < 0.7 else "4"


def _message_tokens(raw: bytes) -> str:
    return _message_views(raw)[0]


def _message_views(raw: bytes) -> tuple[str, str]:
    """(feature tokens, character view): the view is the subject and the text as written (lower
    case, links and addresses included, list footers cut), its first :data:`CHAR_VIEW_CHARS`."""
    raw = raw[:MAX_MESSAGE_BYTES]
    if raw.startswith(b"From "):  # an mbox separator line: envelope sender and date, not the message
        raw = raw[raw.find(b"\n") + 1:]
    head, body = _split(raw)
    headers = _headers(head)
    ex = _Extractor()
    if not body and not headers:
        ex.tokens.append("mime:no_headers")
        body = head
    ex.part(headers, body, 0)
    tokens = ex.tokens
    subject = _SUBJECT_TAG.sub("", _plain(_decode_words(headers.get("subject", "")[:MAX_HEADER_CHARS])))
    tokens.extend("s:" + w for w in _WORDS.findall(subject.lower()))
    if not subject:
        tokens.append("s:__empty")
    elif len(subject) > 8 and sum(map(str.isupper, subject)) > 0.6 * sum(map(str.isalpha, subject)):
        tokens.append("s:__shouting")
    if subject:
        if "!" in subject:
            tokens.append("s:__excl")
        if "$" in subject or "%" in subject:
            tokens.append("s:__money")
        if _SUBJECT_ID.search(subject):
            tokens.append("s:__trailing_id")
    sender = _decode_words(headers.get("from", "")[:MAX_HEADER_CHARS])
    m = _ADDR_DOMAIN.search(sender)
    if m:
        ex._host("from", m.group(1))
        from_site = _registered(m.group(1).lower().strip(".").removeprefix("www."))
        if ex.sites:  # links to the sender's own site, or only to others'
            tokens.append("url:from_site" if from_site in ex.sites else "url:no_from_site")
        local = _LOCAL_PART.search(sender, 0, m.start() + 1)
        if local:
            tokens.append("fromlocal:" + _shape(local.group(1).lower(), 8))
    else:
        tokens.append("from:__none")
    name = sender.split("<", 1)[0] if "<" in sender else sender[sender.find("(") + 1:] if "(" in sender else ""
    tokens.extend("fromname:" + w for w in _WORDS.findall(name.lower())[:4])
    m = _ADDR_DOMAIN.search(headers.get("reply-to", ""))
    if m:
        ex._host("replyto", m.group(1))
    for name in _PRESENCE:
        tokens.append(("h:" if name in headers else "h:no-") + name)
    prio = headers.get("x-priority", "")[:1]
    if prio:
        tokens.append("h:x-priority-" + prio)
    if "reply-to" in headers and headers.get("from", "").lower().rsplit("@", 1)[-1][:40] not in \
            headers["reply-to"].lower():
        tokens.append("h:replyto-differs")
    mailer = headers.get("x-mailer") or headers.get("user-agent")
    if mailer:
        words = _WORDS.findall(mailer.lower())
        tokens.append("xm:" + (words[0] if words else "other"))
        if len(words) > 1:
            tokens.append(f"xm2:{words[0]}_{words[1]}")
        tokens.append("xmv:" + "_".join(mailer.lower().split())[:60])  # the exact build: spamware fakes old ones
    mid = _message_id_shape(headers)
    if mid:
        tokens.append("mid:" + mid)
    text = " ".join(ex.text)
    words = _WORDS.findall(text)
    if "%" in text:
        tokens.append("num:percent_" + _bucket(len(_PERCENT.findall(text))))
    if _TOLL_FREE_CORE.search(text) and _TOLL_FREE.search(text):
        tokens.append("num:toll_free")
    tokens.append("body:excl_run" if "!!" in text else "body:no_excl_run")
    tokens.append("mime:parts_" + _bucket(ex.nparts))
    tokens.append("mime:words_" + _bucket(len(words) // 10))
    tokens.append("mime:urls_" + _bucket(ex.nurls))
    tokens.append("url:sites_" + _bucket(len(ex.sites)))
    if ex.html_parts and not ex.plain_parts:
        tokens.append("mime:html_only")  # no text alternative: how bulk senders write, rarely people
    view = (subject.lower() + "\n" + " ".join(ex.plain))[:CHAR_VIEW_CHARS]
    if len(view) > 1:
        tokens.append("text:space_" + _space_share(view))
    if words:
        tokens.extend(words)
    return " ".join(tokens).replace(VIEW_SEP, ""), view


# The headers whose values the tokens depend on; the other names _HEADER reads count by presence
# only (_PRESENCE), Message-ID by its shape (_message_id_shape). verdict_key relies on this: keep
# it true when the tokens change (a test in tests/test_fuzz.py varies every header _HEADER reads).
_VALUE_READ = frozenset({"subject", "from", "reply-to", "content-type", "content-transfer-encoding",
                         "content-disposition", "x-mailer", "user-agent", "x-priority"})


def verdict_key(raw: bytes) -> str:
    """A digest equal for two messages only when their features are (classify caches verdicts by it).

    The tokens depend on the header values :func:`_headers` reads and on the body, nothing else, so
    the key covers exactly those: header lines the extractor ignores (Received, To, Date, ...) and
    the values of headers it counts only by presence (Message-ID, ...) are left out, so the copies
    of a campaign share a key, while everything the model sees is in it. (A body-only campaign
    fingerprint is not enough: a sender could prime the cache with a copy declared 7bit, which
    scores as harmless noise, then send the campaign as base64 behind it; or vary From, Subject
    case, or a part beyond the fingerprint's window.)
    """
    try:
        raw = bytes(raw)[:MAX_MESSAGE_BYTES]
        if raw.startswith(b"From "):
            raw = raw[raw.find(b"\n") + 1:]
        head, body = _split(raw)
        headers = _headers(head)
        if not body and not headers:
            body = head
    except Exception:  # as in message_tokens: then key the message by all of its bytes
        headers, body = {"__raw__": ""}, bytes(raw)
    h = hashlib.blake2b(digest_size=16)
    for name, value in sorted(headers.items()):
        # Message-ID counts by its shape and the like by presence only: per-copy values must not
        # split a campaign.
        kept = value if name in _VALUE_READ else _message_id_shape(headers) if name == "message-id" else ""
        field = f"{name}\0{kept}".encode("utf-8", "surrogatepass")
        h.update(len(field).to_bytes(8, "big") + field)
    h.update(b"\1")
    h.update(body)
    return h.hexdigest()


def message_tokens(raw: bytes) -> str:
    """The feature tokens of one message, space-separated. Total: any bytes give a string."""
    try:
        return _message_tokens(bytes(raw))
    except Exception:  # a parser bug must cost one message's features, never the worker
        return "mime:unparsable"


def message_document(raw: bytes) -> str:
    """What :class:`MailText` emits for one message: the feature tokens, :data:`VIEW_SEP`, then the
    character view (see :func:`_message_views`). Total: any bytes give a string."""
    try:
        tokens, view = _message_views(bytes(raw))
    except Exception:  # a parser bug must cost one message's features, never the worker
        return "mime:unparsable"
    return tokens + VIEW_SEP + view


class MailText(TransformerMixin, BaseEstimator):
    """Stateless: raw RFC 5322 messages (bytes) -> feature token strings for a hashing vectorizer."""

    def fit(self, X: Iterable[bytes], y: object = None) -> MailText:
        return self

    def transform(self, X: Sequence[bytes]) -> list[str]:
        return [message_document(raw) for raw in X]

    def __sklearn_tags__(self):  # type: ignore[no-untyped-def]
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags


def split_tokens(doc: str) -> list[str]:
    """The hashing vectorizer's analyzer: MailText already produced the tokens, before
    :data:`VIEW_SEP` (a module-level function, so the model artifact can name it in its trusted list)."""
    # Each token once: the vectorizer is binary, so repeats change nothing but cost a hash each.
    return list(dict.fromkeys(doc.split(VIEW_SEP, 1)[0].split()))


KNUTH = 2654435761  # ByteGrams' multiplicative hash (Knuth): the top bits of n-gram x KNUTH mod 2**32


def byte_gram_columns(data: bytes, n: int, n_features: int) -> np.ndarray:
    """The column of each byte ``n``-gram of ``data`` in order (one per start position), as
    :class:`ByteGrams` hashes them: what :mod:`models.explain` uses to name a column by its text."""
    bits = int(n_features).bit_length() - 1
    buf = np.frombuffer(data, dtype=np.uint8).astype(np.uint32)
    total = buf.size - (n - 1)
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    g = buf[:total].copy()
    for k in range(1, n):
        g |= buf[k:k + total] << np.uint32(8 * k)
    return ((g * np.uint32(KNUTH)) >> np.uint32(32 - bits)).astype(np.int64)


def view_bytes(doc: str, max_bytes: int) -> bytes:
    """The bytes of a MailText document's character view that :class:`ByteGrams` reads."""
    return str(doc).partition(VIEW_SEP)[2].encode("utf-8", "surrogatepass")[:max_bytes]


# ByteGrams sorts a batch's columns by counting when it has at least n_features / this many n-grams
# (~25 messages at 2**18 columns); below, the column array costs more than one sort of all keys
COUNTING_SORT_SHARE = 4
CHUNK_DOCS = 256  # documents ByteGrams transforms at a time: in cache, and (document, column) fits 32 bits


class ByteGrams(TransformerMixin, BaseEstimator):
    """Stateless: MailText documents -> hashed byte ``n``-grams of their character view.

    The character view (after :data:`VIEW_SEP`) is encoded as UTF-8 and cut to ``max_bytes``; each
    run of ``n`` bytes is one feature, hashed (Knuth's multiplicative hash of the bytes read as one
    integer) into ``n_features`` columns; a message's vector holds the counts, scaled to unit
    length (like ``HashingVectorizer(analyzer="char", ngram_range=(n, n), norm="l2")`` on bytes,
    alternate_sign off, but about ten times faster: numpy over the whole batch, no Python loop per
    n-gram). Byte n-grams see what word tokens lose: spellings, obfuscation, punctuation and layout,
    scripts and languages (Sculley & Wachman's online filter on 4-grams led TREC 2007).
    """

    def __init__(self, n: int = 4, n_features: int = 2**20, max_bytes: int = CHAR_VIEW_CHARS) -> None:
        self.n = n
        self.n_features = n_features
        self.max_bytes = max_bytes

    def fit(self, X: Iterable[str], y: object = None) -> ByteGrams:
        return self

    def transform(self, X: Sequence[str]) -> Any:
        n, bits = int(self.n), int(self.n_features).bit_length() - 1
        if not 1 <= n <= 4 or not 1 <= bits <= 24 or 1 << bits != self.n_features:
            raise ValueError("ByteGrams needs 1 <= n <= 4 and n_features a power of two up to 2**24")
        docs = list(X)
        parts = [self._chunk(docs[i:i + CHUNK_DOCS], n, bits) for i in range(0, len(docs), CHUNK_DOCS)]
        if not parts:
            return sp.csr_matrix((0, self.n_features))
        return sp.vstack(parts, format="csr") if len(parts) > 1 else parts[0]

    def _chunk(self, docs: Sequence[str], n: int, bits: int) -> Any:
        cap = int(self.max_bytes)
        bufs = [view_bytes(d, cap) for d in docs]
        sizes = np.fromiter(map(len, bufs), dtype=np.int64, count=len(bufs))
        grams = np.maximum(sizes - (n - 1), 0)  # n-grams per document
        buf = np.frombuffer(b"".join(bufs), dtype=np.uint8).astype(np.uint32)
        total = buf.size - (n - 1)
        if total <= 0 or not grams.any():
            return sp.csr_matrix((len(docs), self.n_features))
        g = buf[:total].copy()
        for k in range(1, n):
            g |= buf[k:k + total] << np.uint32(8 * k)
        # an n-gram may not start in a document's last n - 1 bytes (it would run into the next one)
        ends = np.cumsum(sizes)
        inside = np.ones(buf.size, dtype=bool)
        for k in range(1, n):
            last = ends - k
            inside[last[last >= ends - sizes]] = False
        cols = (g[inside[:total]] * np.uint32(KNUTH)) >> np.uint32(32 - bits)
        rows = len(docs)
        if cols.size >= self.n_features // COUNTING_SORT_SHARE:
            # to columns and back: two counting sorts leave each row's columns in order, in time
            # linear in the n-grams plus the columns; then repeats of a column add up to its count
            indptr = np.zeros(rows + 1, dtype=np.int64)
            np.cumsum(grams, out=indptr[1:])
            m = sp.csr_matrix((np.ones(cols.size), cols.astype(np.int32), indptr), shape=(rows, self.n_features))
            m = m.tocsc().tocsr()
            m.sum_duplicates()
            counts, cols, indptr = m.data, m.indices, m.indptr
        else:
            # one sort of (document, column) keys, 32 bits each (CHUNK_DOCS and n_features allow it)
            keys = (np.repeat(np.arange(rows, dtype=np.uint32), grams) << np.uint32(bits)) | cols
            keys.sort()
            first = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
            counts = np.diff(np.append(first, keys.size)).astype(np.float64)
            keys = keys[first]
            indptr = np.zeros(rows + 1, dtype=np.int64)
            np.cumsum(np.bincount(keys >> np.uint32(bits), minlength=rows), out=indptr[1:])
            cols = (keys & np.uint32((1 << bits) - 1)).astype(np.int32)
        row = np.repeat(np.arange(rows), np.diff(indptr))
        norms = np.sqrt(np.bincount(row, weights=counts * counts, minlength=rows))
        return sp.csr_matrix((counts / norms[row], cols, indptr), shape=(rows, self.n_features))

    def __sklearn_tags__(self):  # type: ignore[no-untyped-def]
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        return tags
