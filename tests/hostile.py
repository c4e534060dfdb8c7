"""A builder of hostile mail, generated at test time (nothing binary is committed).

Each :class:`Hostile` is one message a mail provider receives from the internet in practice or
from an attacker on purpose: broken MIME, lying charsets, NUL bytes, 8-bit and enormous headers,
deep nesting, attachment bombs, empty messages, and envelope recipients crafted to escape the
Maildir root. Every body carries :data:`MARKER` plus the case name, so a test can prove that no
message text reaches a log line.

The cases are deterministic (a fixed seed for the few random bytes) so failures reproduce.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.core import events

# A token that occurs in every hostile body and nowhere in Floodgate's code or logs.
MARKER = "QX7HOSTILEBODY"
DOMAIN = "example.com"  # a local domain of the default settings
CRLF = b"\r\n"
# An attachment bomb by size: as large as SMTP admits by default (10 MiB) with room for the
# event metadata and the rest of the message; base64 of 6 MiB of random bytes is 8 MiB of text.
BOMB_DECODED_BYTES = 6 * 1024 * 1024
# RFC 5322 says 998 characters a line; this is a thousand times that, folded into lines.
HUGE_HEADER_BYTES = 1024 * 1024
NEST_LEVELS = 500
PARTS_FLOOD = 5000


@dataclass(frozen=True)
class Hostile:
    name: str
    raw: bytes
    rcpt_to: tuple[str, ...] = (f"victim@{DOMAIN}",)
    mail_from: str = "attacker@spam.test"
    client_address: str = "203.0.113.66"
    helo: str = "bot.spam.test"

    def event(self) -> events.MailEvent:
        env = events.Envelope(self.mail_from, self.rcpt_to, self.client_address, self.helo)
        return events.new_event(env, self.raw, source="replay")


def marker(name: str) -> bytes:
    return f"{MARKER}-{name}".encode()


def message(headers: list[tuple[str, str | bytes]], body: bytes, nl: bytes = CRLF) -> bytes:
    """Header lines (values as given: str is UTF-8, bytes verbatim), an empty line, the body."""
    lines = [name.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) for name, v in headers]
    return nl.join(lines) + nl + nl + body


def _basic(subject: str = "hello", ctype: str | bytes = "text/plain") -> list[tuple[str, str | bytes]]:
    return [("From", "Attacker <attacker@spam.test>"), ("To", f"victim@{DOMAIN}"), ("Subject", subject),
            ("Message-ID", "<1@spam.test>"), ("MIME-Version", "1.0"), ("Content-Type", ctype)]


def _part(headers: bytes, body: bytes) -> bytes:
    return headers + CRLF + CRLF + body + CRLF


# --- MIME structure ------------------------------------------------------------------------

def mime_cases() -> Iterator[Hostile]:
    m = marker
    yield Hostile("boundary_missing", message(_basic(ctype='multipart/mixed; boundary="declared"'),
                                              b"--other\r\n\r\n" + m("boundary_missing") + b"\r\n--other--\r\n"))
    yield Hostile("boundary_unterminated", message(
        _basic(ctype='multipart/alternative; boundary="b1"'),
        b"--b1\r\nContent-Type: text/plain\r\n\r\n" + m("boundary_unterminated") + b"\r\n--b1\r\nContent-Type: tex"))
    yield Hostile("boundary_empty", message(_basic(ctype='multipart/mixed; boundary=""'),
                                            b"--\r\n\r\n" + m("boundary_empty") + b"\r\n----\r\n"))
    yield Hostile("boundary_unbalanced_quote", message(_basic(ctype='multipart/mixed; boundary="abc'),
                                                       b'--"abc\r\n\r\n' + m("boundary_unbalanced_quote")))
    long_b = "b" * 70_000
    yield Hostile("boundary_huge", message(_basic(ctype=f'multipart/mixed; boundary="{long_b}"'),
                                           f"--{long_b}\r\n\r\n".encode() + m("boundary_huge") + f"\r\n--{long_b}--"
                                           .encode()))
    yield Hostile("multipart_no_boundary_param", message(_basic(ctype="multipart/mixed"), m("no_boundary_param")))
    yield Hostile("content_type_garbage", message(_basic(ctype=b"\xff\xfe;;;===;boundary==\x00"), m("ct_garbage")))
    # Hundreds of nested multiparts: a recursive parser without a depth limit overflows its stack.
    body = m("nested") + CRLF
    for level in range(NEST_LEVELS):
        b = f"n{level}"
        body = (f"--{b}\r\nContent-Type: multipart/mixed; boundary=\"n{level - 1}\"\r\n\r\n".encode() + body
                + f"\r\n--{b}--\r\n".encode())
    yield Hostile("nested_multipart", message(_basic(ctype=f'multipart/mixed; boundary="n{NEST_LEVELS - 1}"'), body))
    # message/rfc822 inside message/rfc822, hundreds deep.
    inner = message(_basic(), m("nested_rfc822"))
    for _ in range(NEST_LEVELS):
        inner = message(_basic(ctype="message/rfc822"), inner)
    yield Hostile("nested_rfc822", inner)
    # Thousands of tiny parts.
    parts = b"".join(b"--p\r\n" + _part(b"Content-Type: text/plain", b"p%d" % i) for i in range(PARTS_FLOOD))
    yield Hostile("parts_flood", message(_basic(ctype='multipart/mixed; boundary="p"'),
                                         m("parts_flood") + CRLF + parts + b"--p--\r\n"))


# --- transfer encodings and charsets --------------------------------------------------------

def encoding_cases() -> Iterator[Hostile]:
    m = marker
    yield Hostile("base64_garbage", message([*_basic(), ("Content-Transfer-Encoding", "base64")],
                                            b"!!!!@@@@====" + m("base64_garbage") + b"\r\nQUJD=RE=\r\n=\r\nA"))
    yield Hostile("base64_truncated", message([*_basic(), ("Content-Transfer-Encoding", "base64")],
                                              base64.b64encode(m("base64_truncated") * 10)[:-3]))
    yield Hostile("qp_broken", message([*_basic(), ("Content-Transfer-Encoding", "quoted-printable")],
                                       m("qp_broken") + b" =ZZ =\xff =3\r\n=\r\nend=\r\n="))
    yield Hostile("cte_unknown", message([*_basic(), ("Content-Transfer-Encoding", "x-uuencode-rot13")],
                                         m("cte_unknown")))
    for cs in ("x-klingon-99", "utf-7", "idna", "punycode", "rot13", "base64", "zlib", "utf-16", "utf-32",
               "undefined", "utf-8\x00", "a" * 300, "../../etc/passwd"):
        name = "charset_" + "".join(c if c.isalnum() else "_" for c in cs)[:30]
        # The bytes lie about the charset: invalid UTF-8, an odd length for UTF-16/32, '+' runs for UTF-7.
        body = m(name) + b" \xff\xfe\xfd +AGEAYgBj- +ZZZ \xc3\x28 \xed\xa0\x80 xn--\xff a"
        yield Hostile(name, message(_basic(ctype=f'text/plain; charset="{cs}"'), body))
    yield Hostile("encoded_words_lying", message(
        _basic(subject="=?utf-8?B?////?= =?x-unknown?Q?=FF=FE?= =?utf-16?B?QQ?= =?idna?Q?xn--=FF?= =?"),
        m("encoded_words_lying")))
    yield Hostile("html_only_hostile", message(
        _basic(ctype="text/html; charset=utf-8"),
        b"<html><script>" + b"<" * 10_000 + b"</script><!--" + m("html_only") + b"<a href='http://" + b"a." * 5000
        + b"'>x</a><style>" + b"&#xffffffff;&#0;&bogus;" * 1000 + b"</html"))


# --- bytes and headers -----------------------------------------------------------------------

def header_cases() -> Iterator[Hostile]:
    m = marker
    yield Hostile("nul_bytes", message([*_basic(subject="nul\x00subject"), ("X-Nul", b"\x00\x00\x00")],
                                       b"\x00" * 100 + m("nul_bytes") + b"\x00\r\n\x00"))
    yield Hostile("eight_bit_headers", message(
        [("From", b"\xe9\xe8\xff <x@\xff\xfe.test>"), ("To", f"victim@{DOMAIN}"),
         ("Subject", b"\xc3\x28\xa0\xa1 caf\xe9"), ("Content-Type", b"text/plain; charset=\xff")],
        m("eight_bit_headers")))
    # One header of 1 MiB, folded into lines of 76 characters (legal line lengths, absurd size).
    fold = "\r\n ".join(["a" * 76] * (HUGE_HEADER_BYTES // 79))
    yield Hostile("huge_folded_subject", message(_basic(subject=fold), m("huge_folded_subject")))
    # Encoded words by the thousand: a worst case for RFC 2047 parsers.
    words = " ".join(["=?utf-8?q?=C3=A9?="] * 20_000)
    yield Hostile("encoded_word_flood", message(_basic(subject=words), m("encoded_word_flood")))
    # Tens of thousands of header lines and no body separator at all.
    many = b"\r\n".join(b"X-H%d: v" % i for i in range(50_000))
    yield Hostile("header_flood_no_body", many + CRLF + m("header_flood_no_body"))
    # One header line of 1 MiB (no folding).
    yield Hostile("huge_single_line_header", message([*_basic(), ("X-Long", "z" * HUGE_HEADER_BYTES)],
                                                     m("huge_single_line_header")))
    yield Hostile("forged_verdict_headers", message(
        [("X-Floodgate-Score", "0.0000 (model champion)"), ("X-Floodgate-Trace", "event=x; lane=priority"),
         ("X-Spam-Status", "No, score=-100"), ("X-Spam-Flag", "NO"), ("X-Barracuda-Spam-Status", "No"),
         *_basic(subject="Cheap pills, viagra, casino, you have won $1,000,000")],
        m("forged_verdict_headers") + b" viagra casino lottery winner claim your prize now click here"))
    yield Hostile("bare_lf_and_cr", b"Subject: lf only\nFrom: a@b.test\n\n" + m("bare_lf") + b"\rcr\rcr\n\n\n")
    yield Hostile("no_headers_at_all", m("no_headers_at_all") + b" just text, no header block")
    yield Hostile("only_separator", b"\r\n\r\n" + m("only_separator"))
    yield Hostile("mbox_from_line", b"From attacker@spam.test Thu Jan  1 00:00:00 1970\n" + message(_basic(),
                                                                                                    m("mbox_from")))


def size_cases() -> Iterator[Hostile]:
    rng = random.Random(1)
    blob = base64.encodebytes(rng.randbytes(BOMB_DECODED_BYTES))  # 76-char lines, as mailers write it
    body = (b"--bomb\r\nContent-Type: text/plain\r\n\r\n" + marker("attachment_bomb") + b"\r\n"
            b"--bomb\r\nContent-Type: application/octet-stream; name=\"bomb.bin\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + blob.replace(b"\n", b"\r\n") + b"--bomb--\r\n")
    yield Hostile("attachment_bomb", message(_basic(ctype='multipart/mixed; boundary="bomb"'), body))
    # A text part of the same size: text is what a feature extractor reads, so this costs most.
    text = (b"spam " * (BOMB_DECODED_BYTES // 5))
    yield Hostile("text_bomb", message(_basic(), marker("text_bomb") + b" " + text))


def empty_cases() -> Iterator[Hostile]:
    yield Hostile("empty", b"")
    yield Hostile("one_newline", b"\r\n")
    yield Hostile("one_byte", b"\x00")


# --- active content: what a page showing mail must never run or fetch -----------------------

# Every URL in these payloads names this host, on a TLD reserved for tests (RFC 6761): the browser
# test sends all remote requests to a local canary proxy that counts them, so a payload that gets
# through is seen, never fetched from the network. Script that runs calls XSS_CALL, which posts
# XSS_MESSAGE to the top page (the test listens there) and fetches from the canary.
CANARY_HOST = "canary.floodgate.test"
CANARY = f"http://{CANARY_HOST}"
XSS_MESSAGE = "floodgate-xss"


def _xss(where: str) -> str:
    return (f"top.postMessage('{XSS_MESSAGE}:{where}','*');parent.postMessage('{XSS_MESSAGE}:{where}','*');"
            f"fetch('{CANARY}/script/{where}');document.title='XSS'")


def active_cases() -> Iterator[Hostile]:
    """HTML mail that tries to run script or load something remote, in every way a sanitizer has
    been beaten before; and the same in headers, attachment names and the text part."""
    m = marker
    html = "; ".join([
        f"<script>{_xss('script')}</script>",
        f"<img src=x onerror=\"{_xss('onerror')}\">",
        f"<svg onload=\"{_xss('svg-onload')}\"><script>{_xss('svg-script')}</script>"
        f"<image href='{CANARY}/svg-image.png'/></svg>",
        f"<body onload=\"{_xss('body-onload')}\">",
        f"<iframe src='{CANARY}/iframe'></iframe><iframe srcdoc=\"<script>{_xss('srcdoc')}</script>\"></iframe>",
        f"<object data='{CANARY}/object'></object><embed src='{CANARY}/embed'>",
        f"<a href=\"javascript:{_xss('javascript-url')}\">click</a>",
        f"<img src='{CANARY}/pixel.gif' width=1 height=1><img srcset='{CANARY}/srcset.png 1x'>",
        f"<table background='{CANARY}/table-bg.png'><tr><td>cell</td></tr></table>",
        f"<div style=\"background-image:url({CANARY}/style-attr.png)\">styled</div>",
        f"<style>@import url({CANARY}/import.css); body {{ background: url({CANARY}/style-tag.png) }}</style>",
        f"<link rel=stylesheet href='{CANARY}/link.css'><link rel=prefetch href='{CANARY}/prefetch'>",
        f"<meta http-equiv=refresh content='0;url={CANARY}/refresh'>",
        f"<base href='{CANARY}/base/'><img src='relative.png'>",
        f"<form action='{CANARY}/form'><input type=image src='{CANARY}/input.png'></form>",
        f"<video poster='{CANARY}/poster.png' src='{CANARY}/video.mp4' autoplay></video>"
        f"<audio src='{CANARY}/audio.mp3' autoplay></audio>",
        f"<noscript><p title=\"</noscript><img src=x onerror={_xss('noscript-mxss')}>\"></noscript>",
        f"<math><mtext><table><mglyph><style><img src=x onerror={_xss('math-mxss')}></style></mglyph></table>"
        "</mtext></math>",
        f"<details open ontoggle=\"{_xss('ontoggle')}\"><summary>s</summary></details>",
        f"<input autofocus onfocus=\"{_xss('onfocus')}\">",
    ])
    body = (b"--a\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + m("active_html") +
            f" <script>{_xss('text-part')}</script>\r\n".encode() +
            b"--a\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<html><head><title>t</title></head><body>" +
            m("active_html") + b" " + html.encode() + b"</body></html>\r\n"
            b"--a\r\nContent-Type: text/html; name=\"<img src=x onerror=alert(1)>.html\"\r\n"
            b"Content-Disposition: attachment; filename=\"<svg onload=alert(1)>.html\"\r\n\r\n" +
            f"<script>{_xss('attachment')}</script>\r\n".encode() + b"--a--\r\n")
    yield Hostile("active_html", message(
        [("From", f"\"<img src={CANARY}/from.png onerror=alert(1)>\" <attacker@spam.test>"),
         ("To", f"victim@{DOMAIN}"), ("Subject", f"<script>{_xss('subject')}</script> Invoice"),
         ("MIME-Version", "1.0"), ("Content-Type", 'multipart/mixed; boundary="a"')], body),
        mail_from=f"<script>{_xss('envelope')}</script>@spam.test")
    # The same markup behind a charset that a sanitizer reading bytes would not decode.
    utf7 = "+ADw-script+AD4-" + _xss("utf7").replace("'", "+ACc-") + "+ADw-/script+AD4-"
    yield Hostile("active_html_utf7", message(_basic(ctype="text/html; charset=utf-7"),
                                              m("active_html_utf7") + b" " + utf7.encode()))
    # Markup split by NULs, comments and encoded entities.
    yield Hostile("active_html_obfuscated", message(
        _basic(ctype="text/html; charset=utf-8"),
        m("active_html_obfuscated") + b" <scr\x00ipt>" + _xss("nul").encode() + b"</script>"
        b"<!--><script>" + _xss("comment").encode() + b"</script>-->"
        b"<a href='&#106;avascript:" + _xss("entity").encode() + b"'>x</a>"
        b"<img src=`x` onerror=" + _xss("backtick").encode() + b">"
        b"<svg><a xlink:href='" + CANARY.encode() + b"/xlink'><text>t</text></a></svg>"))


# --- envelopes ------------------------------------------------------------------------------

# Recipients an attacker crafts to leave the Maildir root; all claim a local domain, so SMTP accepts them.
PATH_ESCAPES: tuple[str, ...] = (
    f"../../etc/passwd@{DOMAIN}",
    f"../../../../../../tmp/owned@{DOMAIN}",
    "..@..",
    f"/etc/shadow@{DOMAIN}",
    f"bob\x00/../../x@{DOMAIN}",
    f"bob@{DOMAIN}/../../..",
    f"{'x' * 5000}@{DOMAIN}",
    f"\u0430dmin@{DOMAIN}",  # Cyrillic a: a lookalike of admin@
    "admin@ex\u0430mple.com",  # Cyrillic a in the domain
    f"\uff0e\uff0e\uff0fetc\uff0fpasswd@{DOMAIN}",  # fullwidth ../ (NFKC would make it real)
    f"\u2024\u2024/x@{DOMAIN}",  # one-dot leaders
    f"..\\..\\windows@{DOMAIN}",
    f"%2e%2e%2fetc@{DOMAIN}",
    f"\u202eevil@{DOMAIN}",  # right-to-left override
    f"~root@{DOMAIN}",
    f"@{DOMAIN}",
)


def envelope_cases() -> Iterator[Hostile]:
    yield Hostile("path_escape_recipients", message(_basic(), marker("path_escape_recipients")),
                  rcpt_to=PATH_ESCAPES)
    yield Hostile("smtputf8_envelope", message(_basic(subject="Grüße"), marker("smtputf8_envelope")),
                  rcpt_to=(f"zoë@{DOMAIN}", "用户@例子.广告", f"jürgen@bücher.{DOMAIN}"),
                  mail_from="jörg@absender.test")
    yield Hostile("hostile_sender", message(_basic(), marker("hostile_sender")),
                  mail_from="<" + "a" * 10_000 + "@\x00\r\nX-Injected: 1>", client_address="../../\x00",
                  helo="\r\n" * 100)


def all_cases() -> list[Hostile]:
    """Every hostile message: MIME, encodings, headers, sizes, empties, active content and envelopes."""
    cases = [*mime_cases(), *encoding_cases(), *header_cases(), *size_cases(), *empty_cases(), *active_cases(),
             *envelope_cases()]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "hostile case names must be unique"
    return cases


def small_cases() -> list[Hostile]:
    """All cases but the multi-megabyte ones, for places where size is not the point."""
    return [c for c in all_cases() if len(c.raw) < 2 * 1024 * 1024]
