"""The lanes at a glance: each consumer group's lag and Burrow-style status, for the operator view.

The sampling is :class:`pipeline.lag.LagMonitor`'s (the one home of lag); the web worker runs one
in a background thread, every ``INTERVAL_S`` while operators look and not at all when nobody
has for ``IDLE_S``, so an unwatched web worker costs the broker nothing. A page never waits
for a sample: it shows the last one, with its age, or why there is none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.core import log as logs
from pipeline.core.config import Settings

log = logs.get("web")

INTERVAL_S = 10.0  # a sample every so often while someone looks (the lag worker's is 5 s)
IDLE_S = 300.0  # no page asked for five minutes: stop sampling (and close the monitor's clients)
# The groups by the lane they serve, in the order an operator reads them: ham first.
LANES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("priority lane", ("classify-priority", "deliver")),
    ("bulk lane", ("classify-bulk", "deliver-bulk")),
    ("spam side", ("cleanup",)),
    ("reputation", ("reputation",)),
)


@dataclass(frozen=True)
class GroupRow:
    lane: str
    worker: str
    status: str  # OK, WARN, STALL, STOP, REWIND
    lag: int  # messages behind, all partitions
    lag_seconds: float | None  # the partition furthest behind; None: behind, no estimate yet


@dataclass(frozen=True)
class Snapshot:
    at: float | None  # when the sample was taken; None: none yet
    rows: list[GroupRow] = field(default_factory=list)
    error: str | None = None


class LaneStatus:
    def __init__(self, settings: Settings, monitor_factory: Callable[[Settings], object] | None = None,
                 interval_s: float = INTERVAL_S, idle_s: float = IDLE_S) -> None:
        self.settings = settings
        self.interval_s, self.idle_s = interval_s, idle_s
        self._factory = monitor_factory
        self._lock = threading.Lock()
        self._snapshot = Snapshot(None)
        self._asked = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def snapshot(self) -> Snapshot:
        """The last sample; asking keeps (or starts) the sampling."""
        with self._lock:
            self._asked = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="web-lag", daemon=True)
                self._thread.start()
            return self._snapshot

    def close(self) -> None:
        self._stop.set()

    def _monitor(self) -> object:
        if self._factory is not None:
            return self._factory(self.settings)
        from pipeline.lag import LagMonitor  # the Kafka clients: only once someone looks

        return LagMonitor(self.settings)

    def _run(self) -> None:
        monitor = None
        try:
            while not self._stop.is_set() and time.monotonic() - self._asked < self.idle_s:
                try:
                    if monitor is None:
                        monitor = self._monitor()
                    snapshot = self._sample(monitor)
                except Exception as e:  # the broker down, a group missing: say so on the page
                    snapshot = Snapshot(time.time(), error=f"{type(e).__name__}: {e}"[:300])
                    log.warning("lag sample failed", extra={"error": snapshot.error})
                with self._lock:
                    self._snapshot = snapshot
                self._stop.wait(self.interval_s)
        finally:
            if monitor is not None:
                monitor.close()  # type: ignore[attr-defined]

    def _sample(self, monitor: object) -> Snapshot:
        samples = monitor.sample()  # type: ignore[attr-defined]
        statuses = monitor.status(samples)  # type: ignore[attr-defined]
        rows = []
        for lane, workers in LANES:
            for worker in workers:
                group = self.settings.group(worker)
                mine = [s for s in samples if s.group == group]
                seconds = [s.lag_seconds for s in mine if s.lag_seconds is not None]
                status = statuses.get(group)
                rows.append(GroupRow(lane, worker, status.name if status is not None else "OK",
                                     sum(s.lag for s in mine), max(seconds) if seconds else None))
        return Snapshot(time.time(), rows)
