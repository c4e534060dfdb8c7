"""Property-based fuzzing (hypothesis) of everything that reads bytes from the internet or the broker.

* :func:`pipeline.core.events.decode` raises nothing but :class:`EventError`, whatever the record;
* :func:`pipeline.admission.fingerprint.fingerprint` and the model's feature extraction
  (:class:`models.features.MailText`) never raise, and the extractor never needs its catch-all
  fallback (``mime:unparsable``), on arbitrary bytes or on structured-but-broken MIME;
* the trained model scores any bytes with a finite probability in [0, 1];
* :func:`pipeline.sinks.maildir.mailbox_path` stays inside the root for any string;
* a delivered copy unstamps to the exact original, quarantine subjects stay short and printable,
  and flood admission takes any envelope.

Example counts are modest so the module runs in seconds; the strategies aim at the shapes real
parsers trip over (boundaries, encodings, charsets, nesting) rather than at uniform noise.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models import features, registry
from pipeline.admission import Admission
from pipeline.admission.fingerprint import fingerprint
from pipeline.core import config, events
from pipeline.sinks import maildir, parse_trace, stamp, unstamp
from pipeline.sinks.quarantine import subject_of

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ------------------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
                | st.text(max_size=40) | st.sampled_from(["nan", "inf", "-1e999", "", "0x10"]))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=20)
META_KEYS = ("v", "id", "accepted_at", "source", "envelope", "label", "lane", "verdict", "score",
             "model_version", "classified_at", "extra")


@st.composite
def metadata(draw: st.DrawFn) -> bytes:
    """A metadata line close to a real one: the right keys with values of any JSON type."""
    meta = {k: draw(json_values) for k in draw(st.lists(st.sampled_from(META_KEYS), unique=True))}
    if draw(st.booleans()):
        meta["v"] = events.SCHEMA_VERSION
    if draw(st.booleans()):
        meta["envelope"] = draw(st.dictionaries(
            st.sampled_from(["mail_from", "rcpt_to", "client_address", "helo"]), json_values))
    return orjson.dumps(meta, option=orjson.OPT_NON_STR_KEYS)


records = (st.binary(max_size=300)
           | st.builds(lambda m, raw: m + b"\n" + raw, metadata(), st.binary(max_size=100))
           | st.builds(lambda m, cut: m[:cut] + b"\n", metadata(), st.integers(0, 200)))

# Pieces a MIME parser reads; combined at random they give mail that is almost right.
HEADER_NAMES = ["Content-Type", "Content-Transfer-Encoding", "Content-Disposition", "Subject", "From",
                "Reply-To", "MIME-Version", "X-Mailer", "content-type", "CONTENT-TYPE", "Content-Type "]
CTYPES = ["multipart/mixed", "multipart/alternative", "multipart/related", "message/rfc822", "text/plain",
          "text/html", "application/octet-stream", "multipart/", "/", "", "text/plain/extra", "multipart/mixed;"]
PARAMS = ['boundary="{b}"', "boundary={b}", 'boundary="{b}', "boundary*={b}", 'boundary=""', 'charset="{c}"',
          "charset={c}", 'name="{n}"', 'filename="{n}"', ";;;", "=", 'boundary="{b}"; boundary="other"']
CHARSETS = ["utf-8", "us-ascii", "iso-8859-1", "utf-16", "utf-32", "utf-7", "idna", "punycode", "rot13", "base64",
            "zlib", "x-unknown", "", "utf-8\x00", "cp1252", "koi8-r", "shift_jis", "gb2312", "../../x"]
ENCODINGS = ["base64", "quoted-printable", "7bit", "8bit", "binary", "x-uue", "", "BASE64", "Quoted-Printable"]
TEXT_BYTES = st.binary(max_size=120) | st.sampled_from([
    b"=?utf-8?B?w6k=?=", b"=?x?Q?=FF?=", b"=ZZ=", b"=\r\n", b"QUJD", b"QQ=", b"====", b"<html><a href='http://",
    b"\x00", b"\xff\xfe", b"+AGE-", b"\r\n\r\n", b"\n", b"--", b"&#xffffffff;", b"www.", b"@x.y", b"\r", b" \t"])
BOUNDARIES = st.sampled_from(["b", "bound", "", "=_x", '"', "--", "a" * 200, "\xff"]) | st.text(max_size=12)


@st.composite
def mime(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Structured-but-broken MIME: headers from real names and values, bodies that may be multipart."""
    boundary = draw(BOUNDARIES)
    headers = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(HEADER_NAMES))
        if name.lower().startswith("content-type"):
            params = "; ".join(draw(st.sampled_from(PARAMS)).format(b=boundary, c=draw(st.sampled_from(CHARSETS)),
                                                                   n=draw(st.text(max_size=8)))
                               for _ in range(draw(st.integers(0, 3))))
            value = (draw(st.sampled_from(CTYPES)) + "; " + params).encode("utf-8", "surrogateescape")
        elif name.lower().startswith("content-transfer"):
            value = draw(st.sampled_from(ENCODINGS)).encode()
        else:
            value = draw(TEXT_BYTES)
        headers.append(name.encode() + draw(st.sampled_from([b": ", b":", b" : ", b"\r\n : "])) + value)
    nl = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    if depth < 3 and draw(st.booleans()):
        delim = b"--" + boundary.encode("utf-8", "surrogateescape")
        parts = [delim + nl + draw(mime(depth + 1)) for _ in range(draw(st.integers(0, 3)))]
        body = draw(TEXT_BYTES) + nl + nl.join(parts) + (delim + b"--" if draw(st.booleans()) else b"")
    else:
        body = b"".join(draw(st.lists(TEXT_BYTES, max_size=5)))
    return nl.join(headers) + nl * draw(st.integers(0, 2)) + body


mail_bytes = st.binary(max_size=2000) | mime()


# --- properties --------------------------------------------------------------------------------

@given(records)
@FUZZ
def test_decode_raises_only_event_error(value: bytes) -> None:
    try:
        event = events.decode(value)
    except events.EventError:
        return
    # Whatever it accepted re-encodes and decodes to itself: a valid event is a fixed point.
    assert events.decode(events.encode(event)) == event


@given(st.builds(lambda head, raw: head + b"\n" + raw, st.binary(max_size=200), st.binary(max_size=50)))
@FUZZ
def test_decode_of_arbitrary_metadata_bytes_raises_only_event_error(value: bytes) -> None:
    with contextlib.suppress(events.EventError):
        events.decode(value)


@given(mail_bytes)
@FUZZ
def test_fingerprint_is_total(raw: bytes) -> None:
    fp = fingerprint(raw)
    assert len(fp) == 24 and int(fp, 16) >= 0


@given(mail_bytes)
@FUZZ
def test_feature_extraction_never_falls_back(raw: bytes) -> None:
    # message_tokens catches any exception and answers "mime:unparsable": the property is that
    # the parser itself never needs that net, so a parser bug shows here and not in production.
    [tokens] = features.MailText().transform([raw])
    assert isinstance(tokens, str)
    assert tokens != "mime:unparsable"


@pytest.fixture(scope="module")
def champion(trained_registry: Path) -> registry.LoadedModel:
    return registry.load_champion(trained_registry)


@given(raws=st.lists(mail_bytes, min_size=1, max_size=4))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
def test_model_scores_any_bytes_as_a_probability(champion: registry.LoadedModel, raws: list[bytes]) -> None:
    scores = champion.score(raws)
    assert len(scores) == len(raws)
    assert all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in scores)
    assert [v for v, _ in champion.verdicts(raws)] == ["spam" if s >= champion.threshold else "ham" for s in scores]


# Any code point, lone surrogates included (aiosmtpd hands undecodable bytes over as surrogates).
address_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=300) | st.builds(
    lambda parts: "".join(parts), st.lists(st.sampled_from(["..", "/", "\\", "\x00", "@", ".", "~", "%2e", "\uff0e",
                                                            "\uff0f", "\u2024", "example.com", " ", "<", ">"]),
                                           max_size=30))


@given(address_text)
@FUZZ
def test_mailbox_path_stays_inside_the_root(address: str) -> None:
    root = Path("/srv/floodgate/maildirs")
    box = maildir.mailbox_path(root, address)
    assert box.parent.parent == root
    for part in (box.parent.name, box.name):
        assert part not in ("", ".", "..") and part.isascii() and "/" not in part and "\x00" not in part
        assert len(part.encode()) <= 255


@given(raw=mail_bytes, model_version=st.text(max_size=60), lane=st.text(max_size=20),
       score=st.floats(0, 1) | st.none(), event_id=st.text("0123456789abcdef", min_size=32, max_size=32))
@FUZZ
def test_delivered_copies_unstamp_to_the_exact_original(raw: bytes, model_version: str, lane: str,
                                                        score: float | None, event_id: str) -> None:
    """What `floodgate report` relies on: our two headers come off and the sender's bytes are intact."""
    env = events.Envelope("a@b.test", ("c@example.com",))
    ev = events.MailEvent(id=event_id, accepted_at=1.0, envelope=env, raw=raw, lane=lane, score=score,
                          model_version=model_version, verdict="ham")
    data = stamp(ev)
    assert b"\r" not in data[:len(data) - len(raw)].replace(b"\r\n", b"")  # no CR smuggled into our headers
    headers, original = unstamp(data)
    assert original == raw
    assert set(headers) == {"x-floodgate-score", "x-floodgate-trace"}
    assert parse_trace(headers["x-floodgate-trace"])["event"] == event_id


@given(mail_bytes)
@FUZZ
def test_quarantine_subject_is_total_short_and_printable(raw: bytes) -> None:
    subject = subject_of(raw)
    assert len(subject) <= 200 and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in subject)


@given(mail_from=address_text, client=st.text(max_size=60), raw=mail_bytes)
@FUZZ
def test_admission_takes_any_envelope(mail_from: str, client: str, raw: bytes) -> None:
    admission = Admission(config.load(env={}), follow_reputation=False)
    ev = events.new_event(events.Envelope(mail_from, ("a@example.com",), client), raw)
    assert admission.lane(ev) in ("priority", "bulk")


MUTATIONS = [
    lambda raw: b"Received: from bot by mx; Thu, 1 Jan 1970 00:00:00 +0000\r\n" + raw,  # ignored by the model
    lambda raw: b"To: someone@else.test\r\nMessage-ID: <1@x>\r\n" + raw,
    lambda raw: b"X-Bin: \xff\xfe\r\n" + raw,  # ignored, but makes the header block non-UTF-8
    lambda raw: b"Content-Transfer-Encoding: base64\r\n" + raw,
    lambda raw: b"From: other@domain.test\r\n" + raw,
    lambda raw: raw.replace(b"7bit", b"base64", 1),
    lambda raw: raw.swapcase(),
    lambda raw: raw + b"\r\n--b\r\nContent-Type: text/html\r\n\r\n<a href='http://spam.test/'>x</a>",
    lambda raw: raw[1:],
]


@given(mail_bytes, st.sampled_from(MUTATIONS))
@FUZZ
def test_a_shared_verdict_key_means_identical_features(raw: bytes, mutate) -> None:  # type: ignore[no-untyped-def]
    """classify reuses a cached verdict for an equal key: that must never score a different message."""
    other = mutate(raw)
    if features.verdict_key(raw) == features.verdict_key(other):  # the tokens and the character view
        assert features.message_document(raw) == features.message_document(other)


def test_campaign_copies_share_a_verdict_key() -> None:
    def copy(to: str, n: int) -> bytes:
        return (f"Received: from bot{n} by mx.example.com; {n}\r\nTo: {to}\r\nMessage-ID: <{n}@spam.test>\r\n"
                f"Date: Thu, {n} Jan 2026\r\nFrom: Deals <deals@shop.test>\r\nSubject: Cheap pills\r\n"
                "Content-Type: text/plain\r\n\r\nBuy now http://pills.test/\r\n").encode()

    assert len({features.verdict_key(copy(f"user{n}@example.com", n)) for n in range(5)}) == 1


def test_verdict_key_follows_every_header_the_extractor_reads() -> None:
    """Each header name the extractor reads, with two values: a shared key means shared tokens."""
    names = re.search(r"\^\(([^)]*)\)", features._HEADER.pattern).group(1).split("|")  # type: ignore[union-attr]
    base = b"Subject: hello\r\nContent-Type: text/plain\r\n\r\nsome words http://a.test/ here\r\n"
    values = ["<1@a.test>", "SHOUTING VALUE HERE", "1 (Highest)", "x@evil.test", "multipart/mixed; boundary=b",
              "base64", "attachment; filename=a.exe", "Outlook"]
    for name in names:
        variants = [f"{name}: {v}\r\n".encode() + base for v in values]
        by_key: dict[str, str] = {}
        for raw in variants:
            doc = features.message_document(raw)
            assert by_key.setdefault(features.verdict_key(raw), doc) == doc, name
