"""Whether a worker's Kafka clients can do their work: what ``/readyz`` reports.

librdkafka says it itself, once a second, in its statistics (``statistics.interval.ms``): the
state of every broker connection and, for a consumer, where its group membership stands
(STATISTICS.md: ``brokers.*.state``, ``cgrp.join_state``). :class:`ClientHealth` keeps the last
of them. The statistics are delivered from the client's own ``poll``/``consume``, so they also
say whether the worker's loop still polls: statistics that stop arriving are a problem too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

# One a second is cheap (a few KB of JSON) and answers a readiness probe within a couple of
# seconds of a broker going away or coming back.
STATS_INTERVAL_MS = 1000
# A loop that has not polled for this long is not working. Above the loop's longest deliberate
# pause (a transient error's backoff, up to 10 s, pipeline/kafka/loop.py), below a minute.
STALE_S = 20.0
# An assigned partition whose fetcher has not started for this long, with a broker up and the
# group steady, never will: librdkafka leaves a partition waiting for its committed offset for
# good when that OffsetFetch fails at the request level after a coordinator move (librdkafka
# #5586, open: the process alive, the partition assigned, its lag growing; a new consumer starts
# at once from the committed offset). Normally a fetcher starts within a second of the
# assignment; a coordinator still loading after a broker restart takes a few.
FETCH_STALL_S = 20.0


class ClientHealth:
    """The last statistics of one librdkafka client, and what they say is wrong."""

    def __init__(self, name: str, group: bool = False, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.group = group  # a consumer in a group: ready only once the group has assigned it
        self.clock = clock
        self.at: float | None = None
        self.brokers_up = 0
        self.join_state: str | None = None
        self._unfetched_since: dict[str, float] = {}  # "topic [partition]" -> first seen so

    def config(self) -> dict[str, Any]:
        """The client settings that deliver its statistics here."""
        return {"statistics.interval.ms": STATS_INTERVAL_MS, "stats_cb": self.on_stats}

    def on_stats(self, raw: str) -> None:
        stats = orjson.loads(raw)
        # Bootstrap entries (nodeid -1) are only the addresses it started from; the learned
        # brokers are the connections that carry requests.
        self.brokers_up = sum(1 for b in (stats.get("brokers") or {}).values()
                              if b.get("nodeid", -1) >= 0 and b.get("state") == "UP")
        cgrp = stats.get("cgrp") or {}
        self.join_state = cgrp.get("join_state")
        self.at = now = self.clock()
        # Assigned partitions whose fetcher is not running (fetch_state other than "active"),
        # counted only while it could run: a broker up and the group steady.
        unfetched: dict[str, float] = {}
        if self.brokers_up and (not self.group or self.join_state == "steady"):
            for topic, t in (stats.get("topics") or {}).items():
                for partition, p in (t.get("partitions") or {}).items():
                    if p.get("desired") and partition != "-1" and p.get("fetch_state") != "active":
                        key = f"{topic} [{partition}]"
                        unfetched[key] = self._unfetched_since.get(key, now)
        self._unfetched_since = unfetched

    def problem(self) -> str | None:
        """Why this client cannot do its work now, or None."""
        if self.at is None:
            return f"{self.name}: no statistics from the Kafka client yet"
        age = self.clock() - self.at
        if age > STALE_S:
            return f"{self.name}: the Kafka client has not been polled for {age:.0f} s"
        if not self.brokers_up:
            return f"{self.name}: no broker connection is up"
        if self.group and self.join_state != "steady":
            return f"{self.name}: consumer group membership is {self.join_state or 'unknown'}, not steady"
        return self.stalled()

    def stalled(self) -> str | None:
        """The assigned partitions no fetcher has read for :data:`FETCH_STALL_S` (see there), or
        None: a consumer that will not recover by itself."""
        now = self.clock()
        stuck = sorted(k for k, since in self._unfetched_since.items() if now - since >= FETCH_STALL_S)
        if not stuck:
            return None
        return (f"{self.name}: assigned but not fetched for {FETCH_STALL_S:.0f} s or more: "
                + ", ".join(stuck[:4]) + (f" and {len(stuck) - 4} more" if len(stuck) > 4 else ""))


def first_problem(checks: list[Callable[[], str | None]]) -> str | None:
    for check in checks:
        found = check()
        if found:
            return found
    return None
