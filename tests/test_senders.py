"""The sender-key helpers and the reputation record format shared by reputation and triage."""

from __future__ import annotations

import orjson
import pytest

from pipeline.core import senders
from pipeline.core.senders import Standing


def test_sender_keys_are_lowercased_and_skip_what_is_missing():
    assert senders.keys("<Alice@Example.ORG>", "192.0.2.7") == [
        "addr:alice@example.org", "domain:example.org", "client:192.0.2.7"]
    assert senders.keys("", "192.0.2.7") == ["client:192.0.2.7"]  # null sender (bounce)
    assert senders.keys("<>", "") == []
    assert senders.domain_key("postmaster") is None  # no domain part
    assert senders.domain_key("a@Example.org.") == "domain:example.org"
    assert senders.domain_key("we\"ird@x\"@mail.example.net") == "domain:mail.example.net"


def test_record_round_trips():
    s = Standing(key="domain:example.org", good=True, ham=31, spam=1, feedback_ham=2, updated_at=1.5)
    key, value = senders.encode_standing(s)
    assert key == b"domain:example.org"
    assert senders.decode_standing(value) == s
    assert orjson.loads(value) == {"key": "domain:example.org", "good": True, "ham": 31, "spam": 1,
                                   "feedback_ham": 2, "feedback_spam": 0, "updated_at": 1.5}


@pytest.mark.parametrize("value", [None, b"", b"nope", b"[]", b'{"key":"a"}', b'{"key":"a","good":1}',
                                   b'{"key":"a","good":true,"ham":-1}', b'{"key":"a","good":true,"spam":"2"}',
                                   b'{"key":"","good":true}', b'{"key":"a","good":true,"updated_at":"x"}'])
def test_bad_records_read_as_no_standing(value):
    assert senders.decode_standing(value) is None


def test_good_senders_latest_value_per_key_wins():
    def rec(key: str, good: bool) -> tuple[bytes, bytes]:
        return senders.encode_standing(Standing(key=key, good=good))

    records = [
        rec("domain:a.example", True),
        rec("domain:b.example", True),
        rec("domain:a.example", False),        # a lost its standing
        rec("addr:c@c.example", True),
        (b"addr:c@c.example", b"garbage"),     # skipped: c keeps its last readable standing
        rec("client:192.0.2.1", True),
        (b"client:192.0.2.1", None),           # tombstone
        (None, b"{}"),                         # no key
    ]
    assert senders.good_senders(records) == {"domain:b.example", "addr:c@c.example"}


def test_report_and_decision_fields_round_trip_and_are_left_out_when_unset():
    s = Standing(key="addr:a@x.example", good=False, ham=3, feedback_ham=4, updated_at=2.0, ham_reporters=3,
                 ham_operators=1, spam_reporters=1, reports_span_s=3600.0, decision="revoke",
                 decision_by="ops", decision_at=1.5)
    _key, value = senders.encode_standing(s)
    assert senders.decode_standing(value) == s and s.revoked
    # A record written before these fields existed reads as having no reporters and no decision.
    old = b'{"key":"domain:a.example","good":true,"ham":20,"spam":0,"feedback_ham":0,"feedback_spam":0,' \
          b'"updated_at":1.0}'
    assert senders.decode_standing(old) == Standing(key="domain:a.example", good=True, ham=20, updated_at=1.0)
    assert "decision" not in orjson.loads(senders.encode_standing(Standing(key="a", good=True))[1])


@pytest.mark.parametrize("value", [b'{"key":"a","good":true,"ham_reporters":-1}',
                                   b'{"key":"a","good":true,"decision":"grant"}',
                                   b'{"key":"a","good":true,"decision_by":3}',
                                   b'{"key":"a","good":true,"reports_span_s":"long"}'])
def test_bad_new_fields_read_as_no_standing(value):
    assert senders.decode_standing(value) is None


def test_latest_standing_per_key():
    first = Standing(key="domain:a.example", good=True, ham=20)
    revoked = Standing(key="domain:a.example", good=False, ham=20, decision="revoke", decision_by="ops")
    records = [senders.encode_standing(first), senders.encode_standing(revoked), (b"domain:a.example", b"junk"),
               senders.encode_standing(Standing(key="client:192.0.2.1", good=True)), (b"client:192.0.2.1", None)]
    assert senders.latest(records) == {"domain:a.example": revoked}


def test_sender_keys_typed_by_operators():
    assert senders.normalise_key(" Domain:Example.ORG ") == "domain:example.org"
    assert senders.normalise_key("addr:a@b.example") == "addr:a@b.example"
    assert senders.normalise_key("client:192.0.2.7") == "client:192.0.2.7"
    for bad in ("example.org", "domain:", "domain:  ", "user:x", "", "domain:a\x1b[2Jb"):
        assert senders.normalise_key(bad) is None, bad


def test_decisions_round_trip_and_nothing_else_reads_as_one():
    d = senders.Decision(key="domain:x.example", decision="revoke", by="ops", at=1.25)
    key, value = senders.encode_decision(d)
    assert key == b"domain:x.example" and b"\n" not in value
    assert senders.decode_decision(value) == d
    # A mail event is not one (a metadata line, a newline, the message), nor is anything malformed.
    from pipeline.core import events
    ev = events.new_event(events.Envelope("a@x.example", ("b@example.com",)), b"Subject: x\r\n\r\n")
    good = {"record": "sender-decision", "key": "domain:x", "decision": "revoke", "by": "o", "at": 1}
    assert senders.decode_decision(orjson.dumps(good)) is not None
    wrong = [{"decision": "grant"}, {"key": "Domain:X"}, {"by": " "}, {"at": "now"}, {"record": "event"}]
    for bad in (events.encode(ev), None, b"", b"{}", b"[]", b"nope",
                *(orjson.dumps(good | w) for w in wrong), orjson.dumps({k: v for k, v in good.items() if k != "at"})):
        assert senders.decode_decision(bad) is None, bad
    # An operator's name is one printable line.
    assert senders.operator_name(" ops\x1b[2J\n ") == "ops?[2J"
    assert len(senders.operator_name("x" * 1000)) == senders.OPERATOR_MAX
