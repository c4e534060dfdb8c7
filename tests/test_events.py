"""The mail event wire format (pure functions)."""

from __future__ import annotations

import pytest

from pipeline.core import events


def sample(**kw) -> events.MailEvent:
    env = events.Envelope("s@example.org", ("a@example.com", "b@example.com"), "192.0.2.1", "mx.example.org")
    return events.new_event(env, b"Subject: x\r\n\r\nline one\nline two\n\x00\xff", **kw)


def test_round_trip_keeps_raw_bytes_exactly():
    e = sample(label="spam").classified("spam", 0.97, "v3")
    assert events.decode(events.encode(e)) == e


@pytest.mark.parametrize("value,reason", [
    (b"", "empty"), (b"no newline at all", "no metadata"), (b"{not json\nbody", "not JSON"),
    (b'{"v":99,"id":"x"}\nbody', "unknown schema"), (b'{"v":1,"id":"x"}\nbody', "bad metadata"),
    (b"[1,2]\nbody", "not an object"),
    (b'{"v":1,"id":"x","accepted_at":"nan","envelope":{"mail_from":"","rcpt_to":[]}}\n', "not a finite time"),
    (b'{"v":1,"id":"x","accepted_at":"1e999","envelope":{"mail_from":"","rcpt_to":[]}}\n', "not a finite time"),
    (b'{"v":1,"id":"x","accepted_at":1,"envelope":{"mail_from":"","rcpt_to":"bob@example.com"}}\n', "not a list"),
])
def test_bad_records_raise_event_error_with_reason(value, reason):
    with pytest.raises(events.EventError, match=reason):
        events.decode(value)
