"""``floodgate reputation``: the standing rule, and the Faust worker on the real broker.

The worker runs as a subprocess (``python -m pipeline.cli reputation``) with the test's private
topic and group prefixes; the test reads the compacted reputation topic as triage would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import TopicPartition

from pipeline import events, kafka, senders
from pipeline.config import ROOT, Settings
from pipeline.reputation import GOOD_MIN_HAM, is_good, observations, tally
from tests.kafka_helpers import wait_for

# Faust's worker starts in a few seconds here, but creating internal topics, joining the group
# and recovering tables can take much longer on a loaded machine.
START_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 60.0


# -- the rule, pure ---------------------------------------------------------------------------

def test_verdicts_make_a_sender_good_after_enough_ham_with_little_spam():
    assert not is_good(GOOD_MIN_HAM - 1, 0, 0, 0)
    assert is_good(GOOD_MIN_HAM, 0, 0, 0)
    assert is_good(100, 5, 0, 0)          # 4.8 % spam
    assert not is_good(100, 6, 0, 0)      # 5.7 % spam
    assert not is_good(3, 30, 0, 0)


def test_feedback_outranks_verdicts():
    assert is_good(0, 50, 1, 0)           # a release makes a sender good whatever the classifier said
    assert is_good(0, 0, 2, 2)            # spam reports must outnumber ham reports
    assert not is_good(0, 0, 1, 2)
    assert not is_good(1000, 0, 0, 1)     # a spam report outranks any number of ham verdicts


def _event(mail_from: str, client: str = "192.0.2.10", *, label: str | None = None,
           verdict: str | None = None) -> events.MailEvent:
    ev = events.new_event(events.Envelope(mail_from, ("bob@example.com",), client, "mx.test"),
                          b"Subject: hi\r\n\r\nhello\r\n", label=label)
    return ev.classified(verdict, 0.5, "test") if verdict else ev


def test_observations_per_key():
    assert observations(_event("A@News.Example", verdict="ham"), feedback=False) == [
        ("addr:a@news.example", "ham"), ("domain:news.example", "ham"), ("client:192.0.2.10", "ham")]
    # Feedback never vouches for a client address: it is shared by everyone behind it.
    assert observations(_event("a@news.example", label="ham"), feedback=True) == [
        ("addr:a@news.example", "feedback_ham"), ("domain:news.example", "feedback_ham")]
    assert observations(_event("a@news.example"), feedback=True) == "no_label"
    assert observations(_event("a@news.example"), feedback=False) == "no_verdict"
    assert observations(_event("", client="", verdict="spam"), feedback=False) == "no_sender"


def test_tally_counts_and_keeps_the_published_standing():
    entry, good = tally({}, "feedback_ham")
    assert good and entry["feedback_ham"] == 1 and entry["good"] is False  # not yet published
    entry["good"] = good
    entry, good = tally(entry, "feedback_spam")
    entry, good = tally(entry, "feedback_spam")
    assert not good and entry["good"] is True and entry["feedback_spam"] == 2


# -- the worker on the real broker ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """The reputation worker as a subprocess, and a reader of the reputation topic."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.port = _free_port()
        env = os.environ | {
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "FLOODGATE_KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "FLOODGATE_KAFKA_TOPIC_PREFIX": settings.kafka.topic_prefix,
            "FLOODGATE_KAFKA_GROUP_PREFIX": settings.kafka.group_prefix,
        }
        self.log_path = tmp_path / "reputation.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "reputation", "--web-port", str(self.port),
             "--partitions", "2", "--datadir", str(tmp_path / "faust")],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)
        self.records: list[tuple[bytes | None, bytes | None]] = []
        self.reader = kafka.consumer(settings, group=f"check-{uuid.uuid4().hex[:8]}")
        self.reader.assign([TopicPartition(settings.topic("reputation"), 0, 0)])
        self.producer = kafka.producer(settings)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return orjson.loads(r.read())

    def try_get(self, path: str) -> Any:
        try:
            return self.get(path)
        except OSError:
            return None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.alive(), "the reputation worker died"
            return self.try_get("/reputation/stats/") is not None

        wait_for(ready, START_TIMEOUT_S, interval=0.5, what="the worker's web endpoint")

    def send(self, topic_key: str, values: list[bytes]) -> None:
        for v in values:
            self.producer.produce(self.settings.topic(topic_key), key=uuid.uuid4().hex.encode(), value=v)
        assert self.producer.flush(30) == 0

    def poll_records(self) -> list[tuple[bytes | None, bytes | None]]:
        for m in self.reader.consume(500, 0.2):
            assert not m.error(), m.error()
            self.records.append((m.key(), m.value()))
        return self.records

    def standings(self, key: str) -> list[bool]:
        """Every published standing of one key, in order."""
        self.poll_records()
        return [s.good for k, v in self.records if k == key.encode() and (s := senders.decode_standing(v))]

    def good(self) -> set[str]:
        return senders.good_senders(self.poll_records())

    def stop(self) -> int | None:
        self.reader.close()
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = None
        self._log.close()
        print(self.log_path.read_text(errors="replace")[-4000:])
        return code


@pytest.fixture
def worker(topic_settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    w = Worker(topic_settings, tmp_path)
    try:
        w.wait_ready()
        yield w
    finally:
        code = w.stop()
        admin = kafka.admin(topic_settings)
        faust_topics = [t for t in admin.list_topics(timeout=10).topics
                        if t.startswith(topic_settings.group("reputation"))]
        if faust_topics:
            for fut in admin.delete_topics(faust_topics, operation_timeout=30).values():
                fut.result(30)
    assert code == 0, f"the worker exited with {code} on SIGTERM"


@pytest.mark.kafka
def test_feedback_decides_standing_and_bad_records_are_skipped(worker: Worker):
    worker.send("feedback", [
        b"not a mail event",                                  # no metadata line
        b"",                                                  # empty
        b'{"v":99,"id":"x"}\nraw',                            # unknown schema version
        events.encode(_event("carol@nolabel.example")),       # feedback without a verdict
    ])
    worker.send("feedback", [events.encode(_event("Alice@Good.Example", label="ham"))])
    wait_for(lambda: worker.good() >= {"addr:alice@good.example", "domain:good.example"},
             STEP_TIMEOUT_S, what="alice's release to make her good")

    # A sender released once, then reported as spam twice: good, then no longer good.
    worker.send("feedback", [events.encode(_event("bob@fickle.example", label=label))
                             for label in ("ham", "spam", "spam")])
    wait_for(lambda: worker.standings("domain:fickle.example") == [True, False],
             STEP_TIMEOUT_S, what="bob's domain to lose its standing")
    assert worker.standings("addr:bob@fickle.example") == [True, False]

    assert worker.good() == {"addr:alice@good.example", "domain:good.example"}
    # Feedback never vouches for the client address.
    assert not any(k.startswith(b"client:") for k, _ in worker.records if k)
    stats = worker.get("/reputation/stats/")
    assert stats["skipped_undecodable"] == 3
    assert stats["skipped_no_label"] == 1
    assert worker.alive()
    # The table's view of one sender, routed by key.
    bob = worker.get("/reputation/senders/domain:fickle.example/")
    assert (bob["feedback_ham"], bob["feedback_spam"], bob["good"]) == (1, 2, False)


@pytest.mark.kafka
def test_verdicts_make_a_steady_ham_sender_good_and_a_spammer_not(worker: Worker):
    newsletter = [events.encode(_event(f"issue{i}@newsletter.example", "198.51.100.7", verdict="ham"))
                  for i in range(25)]
    spammer = [events.encode(_event(f"x{i}@spammy.example", "203.0.113.9", verdict="spam")) for i in range(30)]
    lucky = [events.encode(_event(f"y{i}@spammy.example", "203.0.113.9", verdict="ham")) for i in range(3)]
    worker.send("spam", spammer)
    worker.send("ham", newsletter + lucky)

    wait_for(lambda: "domain:newsletter.example" in worker.good(), STEP_TIMEOUT_S,
             what="the newsletter domain to become good")
    assert "client:198.51.100.7" in worker.good()
    assert not any(k.startswith("addr:") for k in worker.good())  # one message per address

    def spammy() -> dict[str, Any] | None:
        view = worker.try_get("/reputation/senders/domain:spammy.example/")
        return view if view and view.get("ham") == 3 and view.get("spam") == 30 else None

    view = wait_for(spammy, STEP_TIMEOUT_S, interval=0.2, what="all of the spammer's verdicts to be counted")
    assert view["good"] is False
    assert view["traffic_recent"] == 33
    assert worker.standings("domain:spammy.example") == []
    assert worker.standings("client:203.0.113.9") == []

    traffic = worker.get("/reputation/traffic/")
    busiest = {s["key"]: s["messages"] for s in traffic["senders"]}
    assert busiest["client:203.0.113.9"] == 33 and busiest["domain:newsletter.example"] == 25
    assert worker.alive()
