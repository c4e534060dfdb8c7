"""Maildir sink: contained paths for hostile addresses, the tmp→new protocol, idempotence, trace headers."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core import events
from pipeline.sinks import maildir, parse_trace, stamp, unstamp
from tests.worker_helpers import classified

HOSTILE = [
    "../../etc/passwd@example.com",
    "bob@../../etc",
    "../..@..",
    "..@example.com",
    ".@.",
    "@example.com",
    "@",
    "",
    "   ",
    "/etc/shadow",
    "bob@/etc",
    "a/b/c@d/e/f",
    "bob\x00@example.com",
    "bob@exa\x00mple.com",
    "\\..\\..\\windows@example.com",
    "bob@example.com/../../..",
    "x" * 5000 + "@example.com",
    "bob@" + "d" * 5000 + ".com",
    "jürgen@bücher.example",
    "用户@例子.广告",
    "<bob@example.com>",
    "bob@example.com\r\nX-Injected: yes",
    "~root@localhost",
    "$(rm -rf /)@example.com",
    "%2e%2e%2f@example.com",
    "\u202ebob@example.com",
    "bob@\udcff.com",
]


@pytest.mark.parametrize("address", HOSTILE)
def test_hostile_addresses_stay_inside_the_root(tmp_path, address):
    root = tmp_path / "maildirs"
    box = maildir.mailbox_path(root, address)
    assert box.parent.parent == root.resolve()
    assert box.is_relative_to(root.resolve())
    for part in (box.parent.name, box.name):
        assert part not in ("", ".", "..")
        assert len(part.encode()) <= 255
        assert part.isascii() and "/" not in part and "\x00" not in part


@given(st.text(max_size=300))
@settings(max_examples=300, deadline=None)
def test_any_text_as_an_address_stays_inside_the_root(address):
    root = Path("/srv/mail/root")
    box = maildir.mailbox_path(root, address)
    assert box.parent.parent == root


def test_distinct_addresses_get_distinct_mailboxes_and_case_does_not_matter(tmp_path):
    same = {maildir.mailbox_path(tmp_path, a) for a in ("Bob@Example.COM", "bob@example.com", " <bob@example.com> ")}
    assert len(same) == 1
    # These filter to the same readable name; the hash of the original keeps them apart.
    apart = {maildir.mailbox_path(tmp_path, a) for a in ("a/b@example.com", "a_b@example.com", "a\x00b@example.com")}
    assert len(apart) == 3


def test_delivery_writes_once_durably_named_by_event(tmp_path):
    event = classified("ham", 1)
    box = maildir.mailbox_path(tmp_path, "bob@example.com")
    name = maildir.file_name(event)
    assert name == f"{int(event.accepted_at)}.{event.id}.floodgate"
    assert maildir.deliver(box, name, stamp(event)) is True
    assert maildir.deliver(box, name, stamp(event)) is False
    assert [p.name for p in (box / "new").iterdir()] == [name]
    assert list((box / "tmp").iterdir()) == []
    assert {d.name for d in box.iterdir()} == {"tmp", "new", "cur"}
    assert oct((box / "new" / name).stat().st_mode & 0o777) == oct(maildir.FILE_MODE)


@pytest.mark.parametrize("seen_name", ["{name}:2,S", "{name}:2,", "{name}:2,RS", "{name}"])
def test_a_message_a_client_moved_to_cur_is_not_delivered_again(tmp_path, seen_name):
    event = classified("ham", 2)
    box = maildir.mailbox_path(tmp_path, "bob@example.com")
    name = maildir.file_name(event)
    assert maildir.deliver(box, name, stamp(event))
    os.rename(box / "new" / name, box / "cur" / seen_name.format(name=name))
    assert maildir.deliver(box, name, stamp(event)) is False
    assert list((box / "new").iterdir()) == []
    assert maildir.find(tmp_path, event.id) == [box / "cur" / seen_name.format(name=name)]


def test_hostile_event_ids_are_refused_as_file_names():
    for bad in ("../../x", "a/b", "", "a\x00b", "x" * 200):
        with pytest.raises(ValueError):
            maildir.file_name(replace(classified("ham"), id=bad))
    for bad_time in (float("inf"), float("nan")):
        with pytest.raises(ValueError):
            maildir.file_name(replace(classified("ham"), accepted_at=bad_time))
    assert maildir.find(Path("/"), "../../etc") == []


def test_stamp_prepends_two_headers_and_keeps_the_original_bytes():
    event = replace(classified("ham", 3), model_version="v7\r\nX-Evil: 1", lane="priority")
    data = stamp(event)
    assert data.endswith(event.raw)
    head = data[: len(data) - len(event.raw)]
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"X-Floodgate-Score: 0.0400 (model v7??X-Evil: 1)")
    assert lines[1].startswith(f"X-Floodgate-Trace: event={event.id}; lane=priority; accepted=".encode())
    assert b"classified=" in lines[1] and lines[2] == b""
    headers, raw = unstamp(data)
    assert raw == event.raw
    trace = parse_trace(headers["x-floodgate-trace"])
    assert trace["event"] == event.id and trace["lane"] == "priority"


def test_stamp_follows_the_messages_own_line_endings():
    lf = replace(classified("ham"), raw=b"Subject: x\n\nbody\n")
    data = stamp(lf)
    assert b"\r" not in data and data.endswith(lf.raw)


def test_unstamp_leaves_a_senders_forged_header_alone():
    forged = b"Subject: x\r\nX-Floodgate-Score: 0.0 (model forged)\r\n\r\nbody\r\n"
    assert unstamp(forged) == ({}, forged)
    event = replace(classified("ham"), raw=b"X-Floodgate-Score: 0.0 (model forged)\r\n\r\nbody\r\n")
    headers, raw = unstamp(stamp(event))
    assert raw == event.raw and headers["x-floodgate-score"].startswith("0.0400")


def test_events_round_trip_through_the_maildir_find(tmp_path):
    event = classified("ham", 4, rcpt=("a@example.com", "b@example.com"))
    for r in event.envelope.rcpt_to:
        maildir.deliver(maildir.mailbox_path(tmp_path, r), maildir.file_name(event), stamp(event))
    copies = maildir.find(tmp_path, event.id)
    assert len(copies) == 2
    assert unstamp(copies[0].read_bytes())[1] == event.raw
    assert events.decode(events.encode(event)) == event


def test_deliver_many_writes_a_batch_once_and_reports_the_first_error_after_the_rest(tmp_path):
    batch = [classified("ham", i, rcpt=(f"u{i % 3}@example.com",)) for i in range(12)]
    items = [(maildir.mailbox_path(tmp_path, e.envelope.rcpt_to[0]), maildir.file_name(e), stamp(e)) for e in batch]
    with ThreadPoolExecutor(maildir.PARALLEL_WRITES) as pool:
        twice = items + items[:4]  # the same event twice in one batch (a re-injected release, a replay)
        assert sorted(maildir.deliver_many(twice, pool)) == [False] * 4 + [True] * 12
        assert maildir.deliver_many(items, pool) == [False] * 12
        blocked = tmp_path / "blocked"
        blocked.write_bytes(b"a file where a mailbox directory would go")
        late = classified("ham", 99)
        with pytest.raises(OSError):
            maildir.deliver_many([(blocked / "box", "x.floodgate", b"x"),
                                  (items[0][0], maildir.file_name(late), stamp(late))], pool)
    assert len(maildir.find(tmp_path, late.id)) == 1  # the good item of the failed batch is in place
    assert sum(len(maildir.find(tmp_path, e.id)) for e in batch) == 12
