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
