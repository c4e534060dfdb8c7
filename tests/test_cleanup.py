"""``floodgate cleanup`` on the real broker: spam into the quarantine once, dead letters, independence."""

from __future__ import annotations

import signal
import uuid
from dataclasses import replace

import orjson
import pytest
from prometheus_client import REGISTRY

from pipeline import cleanup, deliver, kafka
from pipeline.sinks.quarantine import Quarantine
from tests.kafka_helpers import consume_n, wait_for
from tests.worker_helpers import classified, delivered_files, group_lag, process, produce, running

pytestmark = pytest.mark.kafka


def _rows(settings) -> int:
    if not settings.paths.quarantine_db.exists():
        return 0
    store = Quarantine(settings.paths.quarantine_db)
    try:
        return store.count()
    finally:
        store.close()


def test_spam_is_quarantined_once_even_when_consumed_twice(topic_settings):
    s = topic_settings
    spam = [classified("spam", i, lane="bulk", rcpt=(f"u{i}@example.com", "x@example.net"),
                       subject="=?utf-8?q?Gr=C3=BC=C3=9Fe?= from\r\n the\x07 folded header")
            for i in range(50)]
    before = REGISTRY.get_sample_value("floodgate_end_to_end_latency_seconds_count",
                                       {"lane": "bulk", "verdict": "spam"}) or 0.0
    produce(s, "spam", spam)
    with running(s, cleanup.build, "cleanup"):
        wait_for(lambda: group_lag(s, s.group("cleanup"), "spam") == 0, what="spam consumed")
    assert _rows(s) == len(spam)
    assert REGISTRY.get_sample_value("floodgate_end_to_end_latency_seconds_count",
                                     {"lane": "bulk", "verdict": "spam"}) - before == len(spam)

    again = replace(s, kafka=replace(s.kafka, group_prefix=s.kafka.group_prefix + "-again"))
    with running(again, cleanup.build, "cleanup-again"):
        wait_for(lambda: group_lag(again, again.group("cleanup"), "spam") == 0, what="replay consumed")
    assert _rows(s) == len(spam)

    store = Quarantine(s.paths.quarantine_db)
    try:
        one = spam[3]
        entry = store.entry(one.id)
        assert entry is not None
        assert entry.rcpt_to == ["u3@example.com", "x@example.net"]
        assert entry.mail_from == "sender@example.org" and entry.client_address == "192.0.2.7"
        assert entry.score == pytest.approx(0.93) and entry.model_version == "test-1"
        assert entry.subject == "Grüße from the  folded header"
        assert entry.size == len(one.raw) and entry.released_at is None
        assert store.event(one.id) == one  # the very event, for a release
        assert {e.event_id for e in store.entries(limit=100)} == {e.id for e in spam}
        mode = store.db.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        store.close()


def test_bad_records_on_spam_go_to_dead_letter_and_cleanup_carries_on(topic_settings):
    s = topic_settings
    good = classified("spam", 1)
    produce(s, "spam", [b"\xff\xfe garbage", classified("ham", 2)])
    produce(s, "spam", [good])
    with running(s, cleanup.build, "cleanup"):
        wait_for(lambda: group_lag(s, s.group("cleanup"), "spam") == 0, what="spam consumed")
    assert _rows(s) == 1
    consumer = kafka.consumer(s, f"dl-{uuid.uuid4().hex}")
    consumer.subscribe([s.topic("dead_letter")])
    try:
        dead = consume_n(consumer, 2)
    finally:
        consumer.close()
    reasons = sorted(dict(m.headers())["floodgate-reason"].decode() for m in dead)
    assert reasons == ["cleanup: not a mail event: no metadata line", "cleanup: verdict 'ham' on the spam topic"]


def test_spam_is_quarantined_while_deliver_is_stopped(topic_settings):
    """The other way round: a stuck delivery does not stop the quarantine either."""
    s = topic_settings
    ham = [classified("ham", i) for i in range(30)]
    spam = [classified("spam", i, lane="bulk") for i in range(60)]
    produce(s, "ham", ham[:15])
    produce(s, "spam", spam)
    produce(s, "ham", ham[15:])
    with running(s, cleanup.build, "cleanup"):
        wait_for(lambda: _rows(s) == len(spam), what="all spam quarantined")
        ham_lag = group_lag(s, s.group("deliver"), "ham")
    assert ham_lag == len(ham)
    assert delivered_files(s.paths.maildir_root) == []
    with running(s, deliver.build, "deliver"):
        wait_for(lambda: len(delivered_files(s.paths.maildir_root)) == len(ham), what="ham backlog delivered")


def test_rcpt_to_is_stored_as_json(tmp_path):
    store = Quarantine(tmp_path / "q.sqlite3")
    try:
        event = classified("spam", rcpt=('we"ird@example.com', "b@example.com"))
        assert store.add([event]) == {event.id}
        raw = store.db.execute("SELECT rcpt_to FROM quarantine").fetchone()[0]
        assert orjson.loads(raw) == ['we"ird@example.com', "b@example.com"]
    finally:
        store.close()


def test_the_cleanup_command_quarantines_and_exits_0_on_sigterm(topic_settings):
    s = topic_settings
    produce(s, "spam", [classified("spam", i) for i in range(3)])
    with process(s, "cleanup") as (proc, _port):
        wait_for(lambda: _rows(s) == 3, what="quarantined by the process")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
