"""``floodgate lag`` against the real broker: a real consumer group falls behind, stalls, stops
and catches up, and the monitor (and its /metrics endpoint) says so."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from typer.testing import CliRunner

from pipeline import kafka
from pipeline.cli import app
from pipeline.core import config
from pipeline.core.config import Settings
from pipeline.core.service import Service
from pipeline.lag import LagMonitor, PartitionLag, interpolate_time
from pipeline.lag.status import Status
from tests.kafka_helpers import wait_for
from tests.worker_helpers import scrape

pytestmark = pytest.mark.kafka
# The probe returns as soon as every partition answered; a loaded machine must not turn a slow
# first fetch into a wrong answer.
PROBE_S = 30.0


class Clock:
    """Wall time plus an offset the test can advance (to let a window age without waiting)."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.time() + self.skew


def produce(settings: Settings, topic: str, partition: int, n: int, transactional: bool = False) -> None:
    p = kafka.producer(settings, transactional_id=f"{topic}-test" if transactional else None)
    if transactional:
        p.init_transactions(30)
        p.begin_transaction()
    for i in range(n):
        p.produce(topic, key=f"k{i}".encode(), value=b"x", partition=partition)
    if transactional:
        p.commit_transaction(30)
    assert p.flush(30) == 0


def row(rows: list[PartitionLag], topic: str, partition: int) -> PartitionLag:
    return next(r for r in rows if r.topic == topic and r.partition == partition)


def join(settings: Settings, group: str, topic: str, want: int) -> tuple[Consumer, int]:
    """A subscribed consumer of the group that has received ``want`` records of partition 0;
    returns it and the offset after the last of them."""
    c = kafka.consumer(settings, group)
    c.subscribe([topic])
    got: list[int] = []

    def received() -> bool:
        for m in c.consume(100, timeout=0.2):
            assert m.error() is None, m.error()
            if m.partition() == 0:
                got.append(m.offset())
        return len(got) >= want

    wait_for(received, what=f"{want} records of {topic}[0]")
    return c, got[want - 1] + 1


@pytest.fixture
def monitor(topic_settings: Settings) -> Iterator[tuple[LagMonitor, Clock]]:
    clock = Clock()
    m = LagMonitor(topic_settings, [topic_settings.group("deliver")], window=3, clock=clock, probe_timeout=PROBE_S)
    yield m, clock
    m.close()


def test_lag_moves_through_stall_stop_and_back_to_ok(topic_settings: Settings,
                                                     monitor: tuple[LagMonitor, Clock]) -> None:
    s = topic_settings
    mon, clock = monitor
    group, ham = s.group("deliver"), s.topic("ham")
    before = time.time()
    produce(s, ham, 0, 20)
    after = time.time()

    consumer, _ = join(s, group, ham, 10)
    consumer.commit(offsets=[TopicPartition(ham, 0, 10)], asynchronous=False)
    consumer.pause(consumer.assignment())

    rows = wait_for(lambda: (r := mon.sample()) and row(r, ham, 0).owned and r, what="a member owning ham[0]")
    p0 = row(rows, ham, 0)
    assert (p0.committed, p0.end_offset, p0.lag) == (10, 20, 10)
    # The record at offset 10 was written between before and after: its age is the lag in seconds.
    assert p0.lag_seconds is not None
    assert p0.time - after - 0.01 <= p0.lag_seconds <= p0.time - before + 0.01
    others = [r for r in rows if r.partition != 0]
    assert len(others) == 5 and all(r.committed is None and r.lag == 0 and r.status is Status.OK for r in others)

    # Paused: the member is alive, its committed offset does not move, and the lag grows.
    produce(s, ham, 0, 5)
    rows = mon.sample()
    assert row(rows, ham, 0).lag == 15
    assert row(rows, ham, 0).status is Status.STALL
    assert mon.status()[group] is Status.STALL

    # The consumer goes away: no more commits; once the silence outlasts the window, STOP.
    consumer.close()
    wait_for(lambda: not row(mon.sample(), ham, 0).owned, what="the member to leave")
    clock.skew += 3600
    rows = mon.sample()
    assert row(rows, ham, 0).status is Status.STOP
    assert mon.status()[group] is Status.STOP

    # Metrics, scraped over HTTP as Prometheus would.
    mon.publish()
    service = Service("lag", s)
    port = service.serve_http(port=0)
    try:
        samples = scrape(port)
    finally:
        service.close()
    assert samples[("kafka_consumergroup_lag",
                    (("consumergroup", group), ("partition", "0"), ("topic", ham)))] == 15
    assert samples[("floodgate_consumergroup_status", (("consumergroup", group), ("status", "STOP")))] == 1
    assert samples[("floodgate_consumergroup_status", (("consumergroup", group), ("status", "OK")))] == 0

    # A consumer comes back, reads everything and commits: lag zero, OK.
    consumer, end = join(s, group, ham, 15)
    assert end == 25
    consumer.commit(offsets=[TopicPartition(ham, 0, end)], asynchronous=False)
    try:
        wait_for(lambda: row(mon.sample(), ham, 0).lag == 0, what="lag zero")
        assert mon.status()[group] is Status.OK
    finally:
        consumer.close()


def test_transaction_markers_are_not_lag(topic_settings: Settings, monitor: tuple[LagMonitor, Clock]) -> None:
    """A consumer that commits offset+1 of its last record sits before the commit marker."""
    s = topic_settings
    mon, _ = monitor
    group, ham = s.group("deliver"), s.topic("ham")
    produce(s, ham, 0, 5, transactional=True)
    consumer, end = join(s, group, ham, 5)
    try:
        assert end == 5
        consumer.commit(offsets=[TopicPartition(ham, 0, end)], asynchronous=False)
        p0 = row(mon.sample(), ham, 0)
        assert (p0.committed, p0.end_offset) == (5, 6)  # offset 5 is the transaction's commit marker
        assert p0.lag == 0 and p0.status is Status.OK
    finally:
        consumer.close()


def test_groups_at_different_offsets_of_one_partition(topic_settings: Settings) -> None:
    """deliver and reputation both read ham: each group's lag is its own."""
    s = topic_settings
    ham = s.topic("ham")
    produce(s, ham, 0, 5, transactional=True)
    caught_up, behind = s.group("deliver"), s.group("reputation")
    for group, offset in ((caught_up, 5), (behind, 2)):
        c = kafka.consumer(s, group)
        c.commit(offsets=[TopicPartition(ham, 0, offset)], asynchronous=False)
        c.close()
    mon = LagMonitor(s, [caught_up, behind], probe_timeout=PROBE_S)
    try:
        rows = [r for r in mon.sample() if r.topic == ham and r.partition == 0]
    finally:
        mon.close()
    by_group = {r.group: r for r in rows}
    assert by_group[caught_up].lag == 0  # only the commit marker is left
    assert by_group[behind].lag == 4 and by_group[behind].lag_seconds is not None  # 3 records + marker


def test_cli_json_and_table(topic_settings: Settings, tmp_path: Path) -> None:
    s = topic_settings
    ham, group = s.topic("ham"), s.group("deliver")
    produce(s, ham, 3, 7)
    c = kafka.consumer(s, group)
    c.commit(offsets=[TopicPartition(ham, 3, 2)], asynchronous=False)
    c.close()
    env = config.environment(s) | {"COLUMNS": "200"}
    result = CliRunner().invoke(app, ["lag", "--json", "-g", group], env=env)
    assert result.exit_code == 0, result.output
    (doc,) = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert doc["groups"] == {group: "OK"}
    p3 = next(p for p in doc["partitions"] if p["partition"] == 3)
    assert (p3["committed"], p3["end_offset"], p3["lag"], p3["status"]) == (2, 7, 5, "OK")
    result = CliRunner().invoke(app, ["lag", "-g", group], env=env)
    assert result.exit_code == 0, result.output
    cells = [[c.strip() for c in line.split("│")[4:8]] for line in result.stdout.splitlines()]
    assert ["3", "2", "7", "5"] in cells


@pytest.mark.parametrize(("history", "offset", "expected"), [
    ([(0.0, 0), (10.0, 10)], 4, 5.0),  # the 5th of 10 records written in 10 s
    ([(0.0, 10), (10.0, 20)], 5, 0.0),  # written before the first sample: its time bounds the age
    ([(0.0, 10), (10.0, 20)], 20, None),  # not written yet
    ([(0.0, 0), (10.0, 10), (20.0, 30)], 19, 15.0),  # the 10th of 20 written between 10 s and 20 s
])
def test_interpolate_time(history: list[tuple[float, int]], offset: int, expected: float | None) -> None:
    assert interpolate_time(history, offset) == expected
