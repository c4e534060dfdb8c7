"""Running sink workers in tests: a worker loop in a thread, classified events, group lag."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from pipeline import kafka
from pipeline.core import config, events
from pipeline.core.config import Settings
from pipeline.core.events import Envelope, MailEvent
from pipeline.core.service import Service
from pipeline.kafka.loop import Loop
from pipeline.node import free_port
from tests.kafka_helpers import wait_for

RAW = (b"From: sender@example.org\r\nTo: {rcpt}\r\nSubject: {subject}\r\nMessage-ID: <{n}@example.org>\r\n"
       b"\r\nHello number {n}.\r\n")


def classified(verdict: str, n: int = 0, rcpt: Iterable[str] = ("bob@example.com",), lane: str = "priority",
               subject: str = "hello") -> MailEvent:
    rcpts = tuple(rcpt)
    raw = (RAW.replace(b"{rcpt}", ", ".join(rcpts).encode(errors="replace"))
           .replace(b"{subject}", subject.encode()).replace(b"{n}", str(n).encode()))
    event = events.new_event(Envelope("sender@example.org", rcpts, "192.0.2.7", "mx.example.org"), raw)
    score = 0.93 if verdict == "spam" else 0.04
    return replace(event.classified(verdict, score, "test-1"), lane=lane)


def produce(settings: Settings, topic_key: str, records: Iterable[MailEvent | bytes]) -> None:
    """Produce events (or raw record values) and wait for every acknowledgement."""
    producer = kafka.producer(settings)
    errors: list[object] = []
    for r in records:
        key, value = (r.key, events.encode(r)) if isinstance(r, MailEvent) else (b"bad", r)
        producer.produce(settings.topic(topic_key), key=key, value=value,
                         on_delivery=lambda err, _m: errors.append(err) if err else None)
    assert producer.flush(30) == 0
    assert errors == []


@contextmanager
def running(settings: Settings, build: Callable[[Service], tuple[Loop, object]], name: str) -> Iterator[Loop]:
    """A worker loop in a thread; stopped through its service when the block ends."""
    service = Service(name, settings)
    loop, sink = build(service)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            loop.run()
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        wait_for(service.ready.is_set, 30, what=f"{name} ready")
        yield loop
    finally:
        service.stopping.set()
        thread.join(30)
        getattr(sink, "close", lambda: None)()
    assert not thread.is_alive(), f"{name} did not stop"
    assert not errors, f"{name} died: {errors[0]!r}"


def _watermarks(consumer: Consumer, tp: TopicPartition) -> tuple[int, int]:
    """Watermarks, waiting out a freshly created topic whose partitions have no leader yet."""
    def ask() -> tuple[int, int] | None:
        try:
            return consumer.get_watermark_offsets(tp, timeout=10)
        except KafkaException as e:
            if e.args[0].retriable() or e.args[0].code() == KafkaError.NOT_LEADER_FOR_PARTITION:
                return None
            raise
    return wait_for(ask, 30, interval=0.1, what=f"a leader for {tp.topic}/{tp.partition}")


def partition_lags(settings: Settings, group: str, topic_key: str) -> dict[int, int]:
    """Per partition of the topic, the offsets the group has not committed yet (all of them if
    it never committed; transaction markers count, as they do for any consumer's position)."""
    topic = settings.topic(topic_key)
    consumer = kafka.consumer(settings, group)
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        lags = {}
        for tp in committed:
            low, high = _watermarks(consumer, TopicPartition(topic, tp.partition))
            lags[tp.partition] = high - (tp.offset if tp.offset >= 0 else low)
        return lags
    finally:
        consumer.close()


def group_lag(settings: Settings, group: str, topic_key: str) -> int:
    """Records on the topic that the group has not committed yet (all of them if it never committed)."""
    return sum(partition_lags(settings, group, topic_key).values())


def end_offsets(settings: Settings, topic_key: str) -> int:
    """How many records the topic holds (the sum of its partitions' end offsets)."""
    topic = settings.topic(topic_key)
    consumer = kafka.consumer(settings, f"{settings.kafka.group_prefix}.probe")
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(_watermarks(consumer, TopicPartition(topic, p))[1] for p in parts)
    finally:
        consumer.close()


def delivered_files(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for sub in ("new", "cur") for p in root.glob(f"*/*/{sub}/*.floodgate*")]


def event_ids(files: Iterable[Path]) -> list[str]:
    return [p.name.split(".")[1] for p in files]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A worker's /metrics, read over HTTP as Prometheus would: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(m.name, tuple(sorted(m.labels.items()))): m.value
            for family in text_string_to_metric_families(text) for m in family.samples}


def settings_env(settings: Settings, metrics_port: int) -> dict[str, str]:
    """The environment in which ``floodgate`` loads exactly these settings (and no floodgate.toml)."""
    return {**os.environ, **config.environment(settings), "FLOODGATE_WORKER_METRICS_PORT": str(metrics_port)}


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


@contextmanager
def process(settings: Settings, command: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """``floodgate <command>`` as its own process, ready to work; killed if the block does not stop it."""
    port = free_port()
    log_path = settings.paths.quarantine_db.parent / f"{command}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", command], env=settings_env(settings, port),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ready(port) or proc.poll() is not None, 60, what=f"floodgate {command} ready")
        assert proc.poll() is None, log_path.read_text()
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
