"""What a worker's Kafka client statistics say is wrong (pipeline/kafka/health.py): pure, fed with
statistics in librdkafka's own shape (STATISTICS.md) and a clock the test moves."""

from __future__ import annotations

import orjson

from pipeline.kafka.health import FETCH_STALL_S, ClientHealth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stats(fetch_states: dict[str, str], *, broker: str = "UP", join_state: str = "steady") -> str:
    """One statistics document: a broker, the group's state, topic ``t``'s partitions with the
    given fetch states (each assigned: ``desired``), and the unassigned pseudo-partition -1."""
    partitions = {p: {"partition": int(p), "desired": True, "fetch_state": state} for p, state in fetch_states.items()}
    partitions["-1"] = {"partition": -1, "desired": False, "fetch_state": "none"}
    return orjson.dumps({
        "brokers": {"127.0.0.1:9092/1": {"nodeid": 1, "state": broker}},
        "cgrp": {"join_state": join_state},
        "topics": {"t": {"partitions": partitions}},
    }).decode()


def test_an_assigned_partition_never_fetched_is_a_stall_after_its_grace() -> None:
    clock = Clock()
    h = ClientHealth("deliver consumer", group=True, clock=clock)
    h.on_stats(stats({"0": "active", "1": "offset-query"}))
    assert h.problem() is None and h.stalled() is None  # a fetcher starting: normal for a moment
    clock.now += FETCH_STALL_S - 1
    h.on_stats(stats({"0": "active", "1": "offset-query"}))
    assert h.stalled() is None
    clock.now += 2
    h.on_stats(stats({"0": "active", "1": "offset-wait"}))
    problem = h.stalled()
    assert problem is not None and "t [1]" in problem and "t [0]" not in problem
    assert h.problem() == problem  # /readyz says it too


def test_a_fetcher_that_starts_clears_it_and_a_later_stop_counts_from_then() -> None:
    clock = Clock()
    h = ClientHealth("cleanup consumer", group=True, clock=clock)
    h.on_stats(stats({"0": "offset-query"}))
    clock.now += FETCH_STALL_S / 2
    h.on_stats(stats({"0": "active"}))
    clock.now += FETCH_STALL_S / 2 + 1
    h.on_stats(stats({"0": "offset-query"}))
    assert h.stalled() is None  # not fetched since a moment ago, not since the first time


def test_no_stall_is_counted_while_the_fetcher_could_not_run() -> None:
    clock = Clock()
    h = ClientHealth("classify consumer", group=True, clock=clock)
    for _ in range(3):  # the broker away, then the group rebalancing: waiting is right
        h.on_stats(stats({"0": "offset-query"}, broker="DOWN"))
        clock.now += FETCH_STALL_S
    for _ in range(3):
        h.on_stats(stats({"0": "offset-query"}, join_state="wait-join"))
        clock.now += FETCH_STALL_S
    assert h.stalled() is None
    h.on_stats(stats({"0": "offset-query"}))  # both back: the grace starts now
    clock.now += FETCH_STALL_S
    h.on_stats(stats({"0": "offset-query"}))
    assert h.stalled() is not None
