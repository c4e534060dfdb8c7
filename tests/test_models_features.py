"""MailText: what it reads, what it must ignore, and that no bytes make it raise."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.features import MailText, _delimited, message_tokens
from tests import hostile


def tokens(raw: bytes) -> list[str]:
    return message_tokens(raw).split()


PLAIN = (b"From: Alice Example <alice@mail.example.org>\r\nTo: bob@example.net\r\nSubject: Lunch on Friday\r\n"
         b"Content-Type: text/plain; charset=us-ascii\r\n\r\nShall we meet at noon? See http://www.cafe.example.ie/menu\r\n")


def test_plain_message_tokens() -> None:
    got = tokens(PLAIN)
    for t in ("s:lunch", "s:friday", "shall", "meet", "noon", "ct:text/plain", "cs:us-ascii",
              "from:mail.example.org", "fromreg:example.org", "fromname:alice", "url:cafe.example.ie",
              "urlreg:example.ie"):
        assert t in got, t
    assert "http" not in got and "www" not in got  # URLs become host tokens, not words


def test_verdicts_of_other_filters_are_ignored() -> None:
    forged = (b"X-Spam-Flag: YES\r\nX-Spam-Status: Yes, score=99.0\r\nX-Spam-Level: ***************\r\n"
              b"X-Barracuda-Spam-Status: Yes\r\nX-Barracuda-Spam-Score: 9.9\r\n") + PLAIN
    assert message_tokens(forged) == message_tokens(PLAIN)
    for tag in (b"[SPAM] ", b"***SPAM*** ", b"[Spam?] ", b"{Spam?} ", b"Re: [SAtalk] "):
        tagged = PLAIN.replace(b"Subject: ", b"Subject: " + tag)
        assert message_tokens(tagged) == message_tokens(PLAIN), tag


def test_collection_artefacts_are_ignored() -> None:
    routed = (b"From exmh-workers-admin@redhat.com  Thu Aug 22 12:36:23 2002\n"
              b"Return-Path: <exmh-workers-admin@spamassassin.taint.org>\nDelivered-To: zzzz@localhost.netnoteinc.com\n"
              b"Received: from listman.spamassassin.taint.org by dogma.slashnull.org; Thu, 22 Aug 2002 12:36:16\n"
              b"Date: Thu, 22 Aug 2002 12:36:16 +0100\n") + PLAIN.replace(b"\r\n", b"\n")
    footer = (b"\n\n_______________________________________________\nExmh-workers mailing list\n"
              b"Exmh-workers@spamassassin.taint.org\nhttps://listman.spamassassin.taint.org/mailman/listinfo/exmh-workers\n")
    got = tokens(routed + b"It was 2002 then, write to zzzz@spamassassin.taint.org" + footer)
    joined = " ".join(got)
    for artefact in ("taint", "netnoteinc", "slashnull", "zzzz", "2002", "listinfo", "mailman", "mailing", "delivered"):
        assert artefact not in joined, artefact
    assert "shall" in got and "url:cafe.example.ie" in got


def test_html_and_transfer_encodings() -> None:
    html = b"<html><style>p {color:red}</style><body><p>Cheap <b>meds</b> &amp; more <a href='http://x.biz/a'>here</a>"
    raw = (b"From: a@b.example\r\nSubject: =?utf-8?B?" + base64.b64encode("Grüße".encode()) + b"?=\r\n"
           b"Content-Type: multipart/alternative; boundary=\"XX\"\r\n\r\n"
           b"--XX\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
           b"Caf=E9 cr=E8me\r\n"
           b"--XX\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.encodebytes(html)
           + b"--XX\r\nContent-Type: application/pdf; name=\"invoice.pdf\"\r\n\r\nJVBERi0=\r\n"
           b"--XX--\r\n")
    got = tokens(raw)
    for t in ("s:grüße", "café", "crème", "cheap", "meds", "more", "url:x.biz", "tag:a", "tag:p",
              "ct:multipart/alternative", "ct:text/html", "cte:base64", "cte:quoted-printable", "att:pdf"):
        assert t in got, t
    assert "color" not in got and "href" not in got  # style sheets and markup are not text


def test_cjk_is_tokenized_by_character() -> None:
    raw = "Subject: 你好\r\nContent-Type: text/plain; charset=gb2312\r\n\r\n".encode() + "野蛮女友".encode("gb2312")
    got = tokens(raw)
    assert {"野", "蛮", "女", "友", "s:你", "cs:gb2312"} <= set(got)


def test_every_hostile_message_gives_features() -> None:
    cases = hostile.all_cases()
    out = MailText().transform([c.raw for c in cases])
    assert len(out) == len(cases)
    for case, doc in zip(cases, out, strict=True):
        assert isinstance(doc, str) and doc, case.name
        assert doc != "mime:unparsable", case.name  # the fallback exists, but no known case should need it


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_any_bytes_give_a_string(raw: bytes) -> None:
    assert isinstance(message_tokens(raw), str)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"Content-Type: multipart/mixed; boundary=b\r\n", b"--b\r\n", b"--b--\r\n",
                                 b"Content-Transfer-Encoding: base64\r\n", b"Content-Type: text/html\r\n",
                                 b"Content-Type: message/rfc822\r\n", b"\r\n", b"<a href=http://", b"=?utf-8?q?=",
                                 b"\xff\xfe", b"Subject: x\r\n", b"@", b"&#x", b"\x00"]), max_size=60))
def test_mime_shaped_garbage_gives_a_string(pieces: list[bytes]) -> None:
    assert isinstance(message_tokens(b"".join(pieces)), str)


def _nested(outer: bytes, inner: bytes, pad: bytes = b"", filler: bytes = b"") -> bytes:
    """multipart/mixed (``outer``) holding a multipart/alternative (``inner``), then a text part."""
    return (b"From: a@b.example\r\nSubject: Hello\r\nContent-Type: multipart/mixed; boundary=\"" + outer
            + b"\"\r\n\r\n" + filler
            + b"--" + outer + pad + b"\r\nContent-Type: multipart/alternative; boundary=\"" + inner + b"\"\r\n\r\n"
            b"--" + inner + b"\r\nContent-Type: text/plain\r\n\r\nrefinance mortgage\r\n"
            b"--" + inner + b"\r\nContent-Type: text/html\r\n\r\n<p>lowest rates</p>\r\n"
            b"--" + inner + b"--\r\n"
            b"--" + outer + pad + b"\r\nContent-Type: text/plain\r\n\r\nunsubscribe anytime\r\n"
            b"--" + outer + b"--" + pad + b"\r\n")


def _assert_all_parts_read(got: list[str]) -> None:
    for t in ("refinance", "mortgage", "lowest", "rates", "unsubscribe", "anytime",
              "ct:multipart/mixed", "ct:multipart/alternative", "ct:text/html"):
        assert t in got, t
    assert got.count("ct:text/plain") == 2
    assert "mime:boundary_missing" not in got and "aa" not in got


# "--XAA" and "--X--AA" start with "--X" but are not delimiters of X (RFC 2046 5.1.1): cutting
# there made junk parts ("aa", a part with no boundary), and "--X--AA" read as X's close delimiter
# hid every part after it.
@pytest.mark.parametrize("inner", [b"XAA", b"X--AA", b"X_inner"])
def test_nested_boundary_that_extends_its_parents_keeps_the_inner_parts(inner: bytes) -> None:
    _assert_all_parts_read(tokens(_nested(b"X", inner)))


def test_transport_padded_delimiters_still_split() -> None:
    _assert_all_parts_read(tokens(_nested(b"X", b"Y", pad=b" \t ")))


def test_close_delimiter_ends_the_multipart() -> None:
    raw = _nested(b"X", b"Y") + b"epilogue words\r\n--X\r\nContent-Type: text/plain\r\n\r\nafter close\r\n"
    got = tokens(raw)
    _assert_all_parts_read(got)
    assert "epilogue" not in got and "after" not in got and "close" not in got
    # padded, or cut off at the end of the bytes (a message truncated by MAX_MESSAGE_BYTES)
    for close in (b"--X-- \t\r\nepilogue words", b"--X--"):
        got = tokens(PLAIN.split(b"Content-Type")[0] + b"Content-Type: multipart/mixed; boundary=X\r\n\r\n"
                     b"--X\r\n\r\nfirst part\r\n" + close)
        assert "first" in got and "epilogue" not in got, close


def test_boundary_inside_a_line_is_text() -> None:
    # A "--X--" inside a line is not a close delimiter: it must not hide the parts after it.
    raw = _nested(b"X", b"Y").replace(b"refinance mortgage", b"refinance --X-- mortgage")
    _assert_all_parts_read(tokens(raw))


def test_many_lines_that_only_start_like_a_delimiter_hide_nothing() -> None:
    # Hostile: enough such lines that the rest of the body is scanned by a regex (_delimited).
    filler = b"--XAA decoy\r\n" * 500
    _assert_all_parts_read(tokens(_nested(b"X", b"XAA", filler=filler)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([b"--X", b"--XAA", b"--X--", b"\r\n", b"\n", b"\r", b" ", b"\t", b"-", b"X", b"a"]),
                max_size=80))
def test_delimiter_cuts_lose_nothing(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    chunks = _delimited(body, b"X")
    assert b"--X".join(chunks) == body  # each cut removes exactly one "--X": no byte lost or added
    for i, chunk in enumerate(chunks[:-1]):  # each cut is a whole line: "--X", maybe "--", padding, line end
        assert chunk.endswith(b"\n") or (i == 0 and chunk == b""), chunks
        assert i == 0 or chunk[:1] in (b"\r", b"\n", b" ", b"\t"), chunks


# --- features v7 (issue 21): the character view, de-obfuscation, link structure ---------------------

def _reference_grams(text: str, n: int, n_features: int, max_bytes: int) -> dict[int, float]:
    """ByteGrams spelled out in Python for one text: counts of hashed byte n-grams, unit length."""
    data = text.encode("utf-8", "surrogatepass")[:max_bytes]
    bits = n_features.bit_length() - 1
    counts: dict[int, float] = {}
    for i in range(len(data) - n + 1):
        g = int.from_bytes(data[i:i + n], "little")
        col = ((g * 2654435761) & 0xFFFFFFFF) >> (32 - bits)
        counts[col] = counts.get(col, 0.0) + 1.0
    norm = sum(c * c for c in counts.values()) ** 0.5
    return {c: v / norm for c, v in counts.items()}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=60), max_size=7), st.sampled_from([1, 3, 4]))
def test_byte_grams_match_their_definition(texts: list[str], n: int) -> None:
    from models.features import VIEW_SEP, ByteGrams

    bg = ByteGrams(n=n, n_features=2**10, max_bytes=50)
    x = bg.transform([f"tok{VIEW_SEP}{t}" for t in texts])
    assert x.shape == (len(texts), 2**10)
    for i, t in enumerate(texts):
        row = x.getrow(i)
        assert dict(zip(row.indices.tolist(), row.data.tolist(), strict=True)) == pytest.approx(
            _reference_grams(t, n, 2**10, 50))


def test_byte_grams_read_only_the_view_and_any_batch_size() -> None:
    from models.features import ByteGrams

    docs = MailText().transform([PLAIN] * 600)  # more documents than one sorting chunk
    x = ByteGrams().transform(docs)
    assert x.shape[0] == 600 and x.getrow(0).nnz > 0
    assert (x.getrow(599) != x.getrow(0)).nnz == 0
    assert ByteGrams().transform(["no view here", ""]).nnz == 0


def test_document_holds_tokens_then_the_view() -> None:
    from models.features import VIEW_SEP, split_tokens

    [doc] = MailText().transform([PLAIN])
    _tokens, view = doc.split(VIEW_SEP)
    assert split_tokens(doc) == list(dict.fromkeys(message_tokens(PLAIN).split()))
    assert view.startswith("lunch on friday\n") and "http://www.cafe.example.ie/menu" in view


def test_obfuscated_spellings_read_as_the_words_they_show() -> None:
    raw = ("Subject: 𝐅𝐑𝐄𝐄 ｃａｓｈ\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
           "Ver\u200bify your acc\u00adount").encode()
    got = tokens(raw)
    assert {"s:free", "s:cash", "verify", "your", "account"} <= set(got)


def test_links_that_show_another_site() -> None:
    raw = (b"From: Bank <service@bank.com>\r\nSubject: check\r\nContent-Type: text/html\r\n\r\n"
           b"<html xmlns:o=\"urn:schemas-microsoft-com\"><body><a href=\"http://evil.example.ru/x\">"
           b"https://www.bank.com/login</a> <a href=\"http://img.example.net/\"><img src=a.png></a>"
           b"<p>see http://schemas.microsoft.com/office/2004/12/omml</p></body></html>")
    got = tokens(raw)
    assert {"html:link_names_other_1", "html:image_links_1", "mime:html_only", "url:from_site"} <= set(got)
    assert not any("microsoft" in t for t in got)  # a namespace, not a link
    elsewhere = tokens(PLAIN.replace(b"alice@mail.example.org", b"alice@shop.example.com"))
    assert "url:no_from_site" in elsewhere and "url:sites_1" in elsewhere


def test_anchor_scan_is_bounded_on_hostile_markup() -> None:
    from models.features import MAX_ANCHORS, _anchor_links

    assert _anchor_links('<a href="http://a.example/">x</a>' * (MAX_ANCHORS + 50)) == [("a.example", "x")] * MAX_ANCHORS
    assert _anchor_links("<a href=http://a" * 2000) == []  # no ">": nothing, and no quadratic rescan
    assert _anchor_links("<abbr href=http://a.example>x</a>") == []
    assert _anchor_links("<a href=http://a.example>no close") == [("a.example", "")]
    for body in (b"<a href=http://a" * 1000, b"<a <a <a href=http://b.c>" * 500):
        assert "mime:unparsable" not in tokens(b"Content-Type: text/html\r\n\r\n<html><body>" + body)


def test_the_sequential_union_gives_feature_unions_matrix() -> None:
    from sklearn.pipeline import FeatureUnion

    from models import pipeline

    docs = MailText().transform([PLAIN, b"", b"Subject: x\r\n\r\n<html>\xff\xfe</html>"])
    union = pipeline.build().named_steps["hash"]
    assert isinstance(union, pipeline.SequentialUnion)
    got, want = union.transform(docs), FeatureUnion(union.transformer_list).transform(docs).tocsr()
    assert got.format == "csr" and got.shape == want.shape and (got != want).nnz == 0
