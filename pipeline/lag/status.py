"""Consumer status the way LinkedIn's Burrow judges it: no thresholds, only the shape of a window.

Each partition keeps a sliding window of its last N committed-offset observations
(:class:`Entry`: when, which offset, the lag then). :func:`evaluate` applies Burrow's rules
in Burrow's order (``core/internal/evaluator``):

1. the current lag is zero, or the lag was zero at any point in the window → OK;
2. the committed offset ever goes backwards within the window → REWIND;
3. the time since the last entry is longer than the window's span (last − first entry)
   → STOP: the consumer has stopped committing;
4. the committed offset never changes across the window → STALL: alive, but stuck;
5. the offset advances but the lag never falls from one entry to the next → WARN;
6. otherwise → OK.

Two differences, both for partitions Burrow cannot see well:

* rules 4 and 5 need two entries (Burrow would call a lone lagging entry STALL until rule 3
  turns it into STOP a moment later);
* rule 3 is checked before rule 1 when no live member owns the partition. Entries keep the
  lag they had when written, so a consumer that was caught up and then died leaves a window
  full of zero lag, and Burrow's rule 1 calls it OK forever while its backlog grows. With
  nobody consuming, a backlog older than the window's span is STOP whatever the window holds.

A group takes the worst status of its partitions. Burrow reads every commit from
``__consumer_offsets``; :class:`Window` instead takes polled samples and decides which of
them count as commits (see :meth:`Window.observe`). This module does no I/O.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Burrow's default: ten offsets per partition in the window.
DEFAULT_WINDOW = 10


class Status(enum.IntEnum):
    """Ordered by severity: a group takes the worst (highest) of its partitions."""

    OK = 0
    WARN = 1
    STALL = 2
    STOP = 3
    REWIND = 4


@dataclass(frozen=True)
class Entry:
    time: float  # seconds (any clock, the same for every entry and for ``now``)
    offset: int  # committed offset
    lag: int  # log end offset − committed offset at that time


def evaluate(entries: Sequence[Entry], current_lag: int, now: float, owned: bool = True) -> Status:
    """Burrow's partition status for a window of entries, oldest first; ``owned``: a live
    member of the group holds the partition."""
    if not entries or current_lag <= 0:
        return Status.OK
    first, last = entries[0], entries[-1]
    silent = now - last.time > last.time - first.time
    if not owned and silent:
        return Status.STOP
    if any(e.lag == 0 for e in entries):
        return Status.OK
    pairs = list(itertools.pairwise(entries))
    if any(b.offset < a.offset for a, b in pairs):
        return Status.REWIND
    if silent:
        return Status.STOP
    # A trend needs two entries: one entry alone shows neither a stall nor a slow consumer.
    if pairs and all(b.offset == a.offset for a, b in pairs):
        return Status.STALL
    if pairs and all(b.lag >= a.lag for a, b in pairs):
        return Status.WARN
    return Status.OK


def worst(statuses: Iterable[Status]) -> Status:
    return max(statuses, default=Status.OK)


class Window:
    """The last ``size`` commit observations of one partition, built from polled samples.

    Polling the group's committed offsets cannot see a commit that repeats the previous
    offset, so a sample becomes an entry when the committed offset moved since the last entry
    (a commit certainly happened), or when a live member of the group owns the partition (a
    consumer is there and answering its coordinator: Burrow's "committing the same offset").
    A partition nobody owns whose offset does not move adds nothing, so the window ages and
    rule 3 (STOP) fires once the silence outlasts the window's span.
    """

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 2:
            raise ValueError("a window needs at least two entries to show a trend")
        self.entries: deque[Entry] = deque(maxlen=size)
        self.current_lag = 0
        self.owned = False

    def observe(self, time: float, offset: int, lag: int, owned: bool) -> None:
        self.current_lag = lag
        self.owned = owned
        moved = not self.entries or self.entries[-1].offset != offset
        if moved or owned:
            self.entries.append(Entry(time, offset, lag))

    def status(self, now: float) -> Status:
        return evaluate(list(self.entries), self.current_lag, now, self.owned)
