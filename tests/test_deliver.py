"""``floodgate deliver`` on the real broker: once per event, contained paths, dead letters, LMTP, independence."""

from __future__ import annotations

import os
import signal
import urllib.request
import uuid
from dataclasses import replace

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP
from prometheus_client import REGISTRY

from pipeline import cleanup, deliver, kafka
from pipeline.core import events
from pipeline.kafka.loop import TransientError
from pipeline.sinks import lmtp, stamp
from pipeline.sinks.quarantine import Quarantine
from tests.kafka_helpers import consume_n, wait_for
from tests.test_maildir import HOSTILE
from tests.worker_helpers import (
    classified,
    delivered_files,
    event_ids,
    free_port,
    group_lag,
    process,
    produce,
    running,
)

pytestmark = pytest.mark.kafka


def _e2e_count(verdict: str, lane: str = "priority") -> float:
    return REGISTRY.get_sample_value("floodgate_end_to_end_latency_seconds_count",
                                     {"lane": lane, "verdict": verdict}) or 0.0


def _dead_letters(settings, n: int) -> list:
    consumer = kafka.consumer(settings, f"dl-{uuid.uuid4().hex}")
    consumer.subscribe([settings.topic("dead_letter")])
    try:
        return consume_n(consumer, n)
    finally:
        consumer.close()


def test_each_ham_event_is_delivered_once_even_when_consumed_twice(topic_settings):
    s = topic_settings
    root = s.paths.maildir_root
    batch = [classified("ham", i, rcpt=(f"user{i % 5}@example.com",)) for i in range(40)]
    sent = sorted(e.id for e in batch)
    before = _e2e_count("ham")
    produce(s, "ham", batch)
    with running(s, deliver.build, "deliver"):
        wait_for(lambda: len(delivered_files(root)) >= len(batch), what="all ham delivered")
        wait_for(lambda: group_lag(s, s.group("deliver"), "ham") == 0, what="offsets committed")
    assert sorted(event_ids(delivered_files(root))) == sent
    assert _e2e_count("ham") - before == len(batch)
    # Mail clients move what they have seen to cur/ with flags; a replay must find those too.
    for path in delivered_files(root)[:10]:
        os.rename(path, path.parent.parent / "cur" / f"{path.name}:2,S")

    # The same records once more, read from the start by a second worker with a new group.
    again = replace(s, kafka=replace(s.kafka, group_prefix=s.kafka.group_prefix + "-again"))
    with running(again, deliver.build, "deliver-again"):
        wait_for(lambda: group_lag(again, again.group("deliver"), "ham") == 0, what="replay consumed")
    files = delivered_files(root)
    assert sorted(event_ids(files)) == sent
    assert len(files) == len(batch)
    # Each recipient's mailbox holds exactly its own messages, with the trace headers on top.
    one = batch[7]
    [path] = [p for p in files if one.id in p.name]
    assert path.read_bytes() == stamp(one)
    assert len({p.parent.parent for p in files}) == 5


def _batch_seconds_count(stage: str, phase: str) -> float:
    return REGISTRY.get_sample_value("floodgate_batch_seconds_count", {"stage": stage, "phase": phase}) or 0.0


def test_each_batch_is_timed_by_phase_and_a_slow_one_is_logged(topic_settings, caplog):
    # A threshold of 0 makes every batch "slow": each one is logged with its phases.
    s = replace(topic_settings, worker=replace(topic_settings.worker, slow_batch_s=0.0, batch_size=10))
    batch = [classified("ham", i) for i in range(30)]
    before = {phase: _batch_seconds_count("deliver", phase) for phase in ("handle", "publish", "commit")}
    produce(s, "ham", batch)
    with caplog.at_level("WARNING", logger="floodgate"), running(s, deliver.build, "deliver") as loop:
        wait_for(lambda: loop.processed == len(batch), what="all ham processed")
    slow = [r for r in caplog.records if r.getMessage() == "slow batch"]
    assert sum(r.records for r in slow) == len(batch)
    for r in slow:
        assert r.seconds >= r.handle_s + r.publish_s + r.commit_s - 0.002  # the phases are parts of the whole
        assert r.handle_s > 0  # a Maildir write and fsync is never free
    for phase, count in before.items():
        assert _batch_seconds_count("deliver", phase) - count == len(slow), phase


def test_hostile_recipients_through_kafka_stay_inside_the_root(topic_settings):
    s = topic_settings
    root = s.paths.maildir_root
    root.mkdir(parents=True)
    outside = set(root.parent.iterdir())
    hostile = [a for a in HOSTILE if a.isascii() or a.encode(errors="ignore").decode() == a]  # JSON-encodable
    event = classified("ham", 1, rcpt=hostile)
    produce(s, "ham", [event])
    boxes = {deliver.maildir.mailbox_path(root, r) for r in hostile}
    with running(s, deliver.build, "deliver"):
        wait_for(lambda: len(delivered_files(root)) >= len(boxes), what="copies in every mailbox")
        wait_for(lambda: group_lag(s, s.group("deliver"), "ham") == 0, what="offsets committed")
    files = delivered_files(root)
    assert len(files) == len(boxes)
    assert all(p.resolve().is_relative_to(root.resolve()) for p in files)
    assert set(root.parent.iterdir()) == outside  # nothing written beside the root


def test_bad_records_go_to_dead_letter_and_the_worker_carries_on(topic_settings):
    s = topic_settings
    good = classified("ham", 1)
    spam_on_ham = classified("spam", 2)
    no_rcpt = replace(classified("ham", 3), envelope=events.Envelope("a@example.org", ()))
    produce(s, "ham", [b"this is not an event", b'{"v":99}\nraw', spam_on_ham, no_rcpt])
    produce(s, "ham", [good])
    with running(s, deliver.build, "deliver"):
        wait_for(lambda: len(delivered_files(s.paths.maildir_root)) == 1, what="the good event delivered")
        wait_for(lambda: group_lag(s, s.group("deliver"), "ham") == 0, what="offsets committed")
    assert event_ids(delivered_files(s.paths.maildir_root)) == [good.id]
    dead = _dead_letters(s, 4)
    reasons = sorted(dict(m.headers())["floodgate-reason"].decode() for m in dead)
    assert reasons == sorted([
        "deliver: event has no recipients",
        "deliver: not a mail event: no metadata line",
        "deliver: not a mail event: unknown schema version 99",
        "deliver: verdict 'spam' on the ham topic",
    ])
    assert all(dict(m.headers())["floodgate-stage"] == b"deliver" for m in dead)
    assert {m.value() for m in dead} >= {b"this is not an event", events.encode(spam_on_ham)}


def test_ham_is_delivered_while_cleanup_is_stopped(topic_settings):
    """The product's reason to exist: a spam backlog does not hold ham back."""
    s = topic_settings
    spam = [classified("spam", i, lane="bulk") for i in range(300)]
    ham = [classified("ham", i) for i in range(20)]
    produce(s, "spam", spam[:150])
    produce(s, "ham", ham[:10])
    produce(s, "spam", spam[150:])
    produce(s, "ham", ham[10:])
    with running(s, deliver.build, "deliver"):
        wait_for(lambda: len(delivered_files(s.paths.maildir_root)) == len(ham), what="all ham delivered")
        spam_lag = group_lag(s, s.group("cleanup"), "spam")
    assert spam_lag == len(spam)  # not one spam message handled, and every ham message delivered
    assert sorted(event_ids(delivered_files(s.paths.maildir_root))) == sorted(e.id for e in ham)
    assert not s.paths.quarantine_db.exists() or Quarantine(s.paths.quarantine_db).count() == 0
    # Cleanup catches up on its own once it runs.
    with running(s, cleanup.build, "cleanup"):
        wait_for(lambda: group_lag(s, s.group("cleanup"), "spam") == 0, what="spam backlog drained")
    assert Quarantine(s.paths.quarantine_db).count() == len(spam)


# -- delivery to a downstream server over LMTP -------------------------------------------------

class Recorder:
    """An LMTP server's mailbox: rejects ``reject*`` recipients for good, defers all when told to."""

    def __init__(self) -> None:
        self.delivered: list[tuple[str, str, bytes]] = []
        self.attempts = 0
        self.defer = False
        self.defer_rcpts: set[str] = set()

    async def handle_DATA(self, server, session, envelope) -> str:
        self.attempts += 1
        rcpt = envelope.rcpt_tos[0]
        if len(envelope.rcpt_tos) != 1:
            return "503 5.5.1 one recipient per transaction expected"
        if rcpt.startswith("reject"):
            return f"550 5.1.1 <{rcpt}>: no such user"
        if self.defer or rcpt in self.defer_rcpts:
            return "451 4.3.0 mailbox temporarily unavailable"
        self.delivered.append((envelope.mail_from, rcpt, envelope.original_content))
        return "250 2.0.0 delivered"


class LMTPController(Controller):
    def factory(self) -> LMTP:
        return LMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def lmtp_server():
    recorder = Recorder()
    controller = LMTPController(recorder, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield recorder, controller.port
    controller.stop()


def test_lmtp_delivery_retries_deferrals_and_dead_letters_rejections(topic_settings, lmtp_server):
    recorder, port = lmtp_server
    s = replace(topic_settings, delivery=replace(topic_settings.delivery, mode="lmtp", port=port, timeout_s=10))
    first = classified("ham", 1, rcpt=("alice@example.com",))
    recorder.defer = True
    produce(s, "ham", [first])
    with running(s, deliver.build, "deliver-lmtp"):
        wait_for(lambda: recorder.attempts >= 2, what="a deferred delivery retried")
        assert recorder.delivered == []
        assert group_lag(s, s.group("deliver"), "ham") == 1  # nothing committed while deferred
        recorder.defer = False
        wait_for(lambda: len(recorder.delivered) == 1, what="delivery once the server accepts")
        rejected = classified("ham", 2, rcpt=("reject-me@example.com",))
        several = classified("ham", 3, rcpt=("bob@example.com", "carol@example.com"))
        produce(s, "ham", [rejected, several])
        wait_for(lambda: group_lag(s, s.group("deliver"), "ham") == 0, what="all offsets committed")
    assert [(f, r) for f, r, _ in recorder.delivered] == [
        ("sender@example.org", "alice@example.com"),
        ("sender@example.org", "bob@example.com"),
        ("sender@example.org", "carol@example.com"),
    ]
    assert recorder.delivered[0][2] == stamp(first)  # CRLF on the wire, exactly as stamped
    [dead] = _dead_letters(s, 1)
    assert dead.key() == rejected.key
    assert "550 5.1.1 <reject-me@example.com>: no such user" in dict(dead.headers())["floodgate-reason"].decode()
    assert events.peek_id(dead.value()) == rejected.id


def test_a_partly_deferred_event_is_not_sent_twice_to_the_recipients_that_took_it(settings, lmtp_server):
    recorder, port = lmtp_server
    s = replace(settings, delivery=replace(settings.delivery, mode="lmtp", port=port, timeout_s=10))
    deliverer = deliver.Deliverer(s)
    event = classified("ham", 1, rcpt=("a@example.com", "b@example.com", "c@example.com"))
    recorder.defer_rcpts = {"b@example.com"}
    try:
        with pytest.raises(TransientError, match="451"):
            deliverer._send(event, stamp(event))
        recorder.defer_rcpts = set()
        assert deliverer._send(event, stamp(event)) is True
        assert deliverer._send(event, stamp(event)) is False
    finally:
        deliverer.close()
    assert [r for _, r, _ in recorder.delivered] == ["a@example.com", "b@example.com", "c@example.com"]


def test_a_downstream_that_is_down_is_transient(topic_settings):
    s = replace(topic_settings.delivery, mode="smtp", port=free_port(), timeout_s=2)
    with pytest.raises(TransientError, match="unavailable"):
        lmtp.Downstream(s).send("a@example.org", "b@example.com", b"Subject: x\r\n\r\nbody\r\n")


def test_the_deliver_command_delivers_serves_metrics_and_exits_0_on_sigterm(topic_settings):
    s = topic_settings
    event = classified("ham", 1)
    produce(s, "ham", [event])
    with process(s, "deliver") as (proc, port):
        wait_for(lambda: len(delivered_files(s.paths.maildir_root)) == 1, what="delivered by the process")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            exposed = r.read().decode()
        assert 'floodgate_messages_total{lane="priority",outcome="delivered",stage="deliver"} 1.0' in exposed
        assert 'floodgate_end_to_end_latency_seconds_count{lane="priority",verdict="ham"} 1.0' in exposed
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert event_ids(delivered_files(s.paths.maildir_root)) == [event.id]


def test_a_killed_deliver_process_loses_nothing_and_duplicates_nothing(topic_settings):
    s = replace(topic_settings, worker=replace(topic_settings.worker, batch_size=20))
    root = s.paths.maildir_root
    ham = [classified("ham", i, rcpt=(f"user{i % 7}@example.com",)) for i in range(400)]
    produce(s, "ham", ham)
    with process(s, "deliver") as (proc, _port):
        wait_for(lambda: len(delivered_files(root)) > 0, what="delivery under way")
        proc.kill()  # SIGKILL: no batch finished, no offsets committed on the way out
        proc.wait(30)
    killed_at = len(delivered_files(root))
    with process(s, "deliver") as (proc, _port):
        wait_for(lambda: group_lag(s, s.group("deliver"), "ham") == 0, 120, what="the rest delivered")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    ids = event_ids(delivered_files(root))
    assert sorted(ids) == sorted(e.id for e in ham), f"killed after {killed_at} files"


def test_bulk_lane_delivery_is_paced_to_its_rate():
    """Pure: batches of 100 at 100 records/s must each wait for about a second of budget."""
    import threading

    from pipeline.deliver import paced

    waits: list[float] = []

    class Recorder(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:  # records the pause, does not sleep
            waits.append(timeout or 0.0)
            return False

    calls: list[int] = []
    handle = paced(lambda msgs: calls.append(len(msgs)) or [], rate=100.0, stopping=Recorder())
    for _ in range(3):
        handle([object()] * 100)  # type: ignore[list-item]
    assert calls == [100, 100, 100]
    # Nothing really slept, so the budget accumulates: 0 s, then ~1 s, then ~2 s behind.
    assert waits[0] == 0.0 and 0.9 < waits[1] <= 1.0 and 1.9 < waits[2] <= 2.0
    unpaced = paced(lambda msgs: [], rate=0, stopping=Recorder())
    assert unpaced([]) == [] and waits[3:] == []  # rate 0: never waits
