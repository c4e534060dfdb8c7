"""``floodgate lag``: consumer-group lag in messages and in seconds, with Burrow-style status.

Each :meth:`LagMonitor.sample` asks the cluster, per group, for the committed offsets (read by
a consumer of that group that never joins it: see :meth:`LagMonitor._committed`), the group's
live members and their partitions (``describe_consumer_groups``) and the end offsets
(``list_offsets`` at read_committed isolation, i.e. the last stable offset). Then, for each
partition behind:

* lag in seconds = now − the timestamp of the record at the committed offset, read with a
  consumer that assigns itself (joins no group, commits nothing). Exact whenever that record
  can be read; otherwise (deleted by retention, or behind an open transaction) it falls back
  to interpolating in this monitor's history of (time, end offset) samples, the way
  kafka-lag-exporter does.
* a partition whose only records past the committed offset are transaction markers (or
  aborted records) has nothing to consume: its lag is 0. Consumers that commit
  ``offset + 1`` of their last record sit one marker behind on transactional topics, and
  counting that marker would keep every caught-up group from ever showing lag zero.

Status per partition and group comes from :mod:`pipeline.lag.status` (Burrow's rules).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import orjson
from confluent_kafka import (
    Consumer,
    IsolationLevel,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import OffsetSpec
from rich.table import Table

from pipeline import kafka
from pipeline.core import metrics
from pipeline.core.config import Settings
from pipeline.kafka import topics
from pipeline.lag.status import DEFAULT_WINDOW, Status, Window, worst

# Floodgate's consumer groups (settings.group(name)) and the topic keys each one consumes.
GROUP_INPUTS: dict[str, tuple[str, ...]] = {
    "classify-priority": ("inbound",),
    "classify-bulk": ("bulk",),
    "deliver": ("ham",),
    "deliver-bulk": ("bulk_ham",),
    "cleanup": ("spam", "bulk_spam"),
    "reputation": ("feedback", "ham", "spam"),  # Faust; its internal topics show up via their commits
}
# Admin requests answer in milliseconds on a healthy cluster; a sample that cannot finish in
# this long reports an error rather than hanging the monitor.
REQUEST_TIMEOUT_S = 10.0
# A partition's leader can move (elections, new topics): retry its offsets a few times.
OFFSET_ATTEMPTS = 4
OFFSET_RETRY_S = 0.25
# How long a sample waits to read the records at the committed offsets (lag in seconds); it
# returns as soon as every partition answered. Past it, lag seconds fall back to interpolation.
PROBE_TIMEOUT_S = 5.0
# End-offset history per partition for the interpolation fallback: an hour at 5 s samples.
HISTORY = 720
# The probe reads one record per lagging partition: small fetches and no prefetching, so that
# sampling a flood's backlog does not pull megabytes of mail per partition. (A record larger
# than the fetch size still comes back whole.) EOF events tell "only markers left".
PROBE = {
    "enable.partition.eof": True,
    "max.partition.fetch.bytes": 64 * 1024,
    "fetch.max.bytes": 1024 * 1024,
    "queued.min.messages": 1,
    "queued.max.messages.kbytes": 1024,
    # With the queue this small its thresholds are always met, and librdkafka then waits this
    # long before fetching a partition again (default 1000 ms: a 1 s sample for 36 partitions).
    "fetch.queue.backoff.ms": 10,
    "fetch.wait.max.ms": 100,  # at the end of a partition, say so soon (the EOF event)
}


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: never committed; lag counts from the log start
    end_offset: int  # last stable offset (what a read_committed consumer can reach)
    lag: int  # records waiting
    lag_seconds: float | None  # None: behind, but no estimate yet
    owned: bool  # a live member of the group holds this partition
    status: Status
    time: float

    def as_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["status"] = self.status.name
        return d


def floodgate_groups(settings: Settings) -> list[str]:
    return [settings.group(name) for name in GROUP_INPUTS]


def interpolate_time(history: Sequence[tuple[float, int]], offset: int) -> float | None:
    """When the end offset passed ``offset`` (the record at ``offset`` was written), from
    (time, end offset) samples in time order: linear between the samples around it; the first
    sample's time if it was already past (a lower bound on the age); None if not yet written."""
    ends = [end for _, end in history]
    i = bisect.bisect_right(ends, offset)  # first sample whose end offset is beyond ``offset``
    if i == len(history):
        return None
    if i == 0:
        return history[0][0]
    (t0, e0), (t1, e1) = history[i - 1], history[i]
    return t0 + (t1 - t0) * (offset - e0 + 1) / (e1 - e0)


class LagMonitor:
    """Samples lag of consumer groups; keeps the Burrow windows and end-offset history."""

    def __init__(self, settings: Settings, groups: Sequence[str] | None = None, window: int = DEFAULT_WINDOW,
                 clock: Callable[[], float] = time.time, probe_timeout: float = PROBE_TIMEOUT_S) -> None:
        self.settings = settings
        self.groups = list(groups) if groups else floodgate_groups(settings)
        self.window_size = window
        self.clock = clock
        self.probe_timeout = probe_timeout
        self.admin = kafka.admin(settings)
        self._probe = kafka.consumer(settings, settings.group("lag-probe"), **PROBE)
        self._readers: dict[str, Consumer] = {}  # a committed-offset reader per group
        self._spec_topics = {t.name for t in topics.desired(settings)}
        self._windows: dict[tuple[str, str, int], Window] = {}
        self._history: dict[tuple[str, int], deque[tuple[float, int]]] = {}
        self._inputs = {settings.group(name): [settings.topic(k) for k in keys] for name, keys in GROUP_INPUTS.items()}
        self.last: list[PartitionLag] = []

    # -- cluster reads -------------------------------------------------------------------
    def _committed(self, group: str, existing: set[str]) -> dict[tuple[str, int], int | None]:
        """The group's committed offsets: on its input topics (None where it never committed),
        and wherever else it committed among the spec's topics and those named after it
        (Faust's internal ``<group>-…`` topics).

        Read by a consumer of the group that never subscribes, so it never joins the group
        (the chaos run's way). Not ``AdminClient.list_consumer_group_offsets``: in librdkafka
        2.16 an admin client's OffsetFetch answered NOT_COORDINATOR, the coordinator moving in
        a broker restart, dereferences a NULL consumer-group handle and kills the process —
        the monitor an operator watches during exactly such a fault."""
        inputs = self._inputs.get(group, [])
        candidates = set(inputs) | {t for t in existing if t.startswith(f"{group}-")}
        if group not in self._inputs:
            candidates |= self._spec_topics & existing
        reader = self._readers.get(group)
        if reader is None:
            reader = self._readers[group] = kafka.consumer(self.settings, group)
        tps = [TopicPartition(t, p) for t in sorted(candidates) for p in self._partitions(t)]
        found: dict[tuple[str, int], int | None] = {}
        for tp in reader.committed(tps, timeout=REQUEST_TIMEOUT_S) if tps else []:
            if tp.error:
                continue
            if tp.offset >= 0:
                found[(tp.topic, tp.partition)] = tp.offset
            elif tp.topic in inputs:
                found[(tp.topic, tp.partition)] = None
        return found

    def _partitions(self, topic: str) -> list[int]:
        meta = self.admin.list_topics(topic, timeout=REQUEST_TIMEOUT_S).topics.get(topic)
        if meta is None or meta.error is not None:
            return []
        return sorted(meta.partitions)

    def _owned(self) -> dict[str, set[tuple[str, int]]]:
        owned: dict[str, set[tuple[str, int]]] = {g: set() for g in self.groups}
        futures = self.admin.describe_consumer_groups(self.groups, request_timeout=REQUEST_TIMEOUT_S)
        for group, future in futures.items():
            try:
                description = future.result()
            except KafkaException:
                continue  # a group the coordinator does not know has no members
            for member in description.members or []:
                for tp in (member.assignment.topic_partitions if member.assignment else []) or []:
                    owned[group].add((tp.topic, tp.partition))
        return owned

    def _offsets(self, tps: set[tuple[str, int]], spec: OffsetSpec) -> dict[tuple[str, int], int]:
        """Offsets by ``spec``; a partition that keeps failing (its leader is moving) is left
        out of this sample rather than failing it."""
        found: dict[tuple[str, int], int] = {}
        todo = set(tps)
        for attempt in range(OFFSET_ATTEMPTS):
            if not todo:
                break
            if attempt:
                time.sleep(OFFSET_RETRY_S)  # let the client refresh its metadata
            request = {TopicPartition(t, p): spec for t, p in todo}
            futures = self.admin.list_offsets(request, isolation_level=IsolationLevel.READ_COMMITTED,
                                              request_timeout=REQUEST_TIMEOUT_S)
            for tp, f in futures.items():
                try:
                    found[(tp.topic, tp.partition)] = f.result().offset
                    todo.discard((tp.topic, tp.partition))
                except KafkaException as e:
                    if not e.args[0].retriable() and attempt == OFFSET_ATTEMPTS - 1:
                        raise
        return found

    def _read_at(self, wanted: set[tuple[str, int, int]]) -> dict[tuple[str, int, int], float | None]:
        """For each (topic, partition, offset): the timestamp (s) of the first readable record
        from that offset on; None when the partition ends before any (only transaction markers
        or aborted records). Missing: no answer within the probe timeout."""
        by_partition: dict[tuple[str, int], list[int]] = {}
        for t, p, o in sorted(wanted):
            by_partition.setdefault((t, p), []).append(o)
        found: dict[tuple[str, int, int], float | None] = {}
        # A consumer holds a partition once, so groups at different offsets of one partition
        # (deliver and reputation both read ham) are read in successive rounds.
        for i in range(max((len(v) for v in by_partition.values()), default=0)):
            positions = {tp: offs[i] for tp, offs in by_partition.items() if len(offs) > i}
            for tp, ts in self._read_round(positions).items():
                found[(*tp, positions[tp])] = ts
        return found

    def _read_round(self, positions: dict[tuple[str, int], int]) -> dict[tuple[str, int], float | None]:
        self._probe.assign([TopicPartition(t, p, o) for (t, p), o in positions.items()])
        found: dict[tuple[str, int], float | None] = {}
        deadline = time.monotonic() + self.probe_timeout
        try:
            while len(found) < len(positions) and time.monotonic() < deadline:
                for msg in self._probe.consume(len(positions), timeout=0.1):
                    key = (msg.topic(), msg.partition())
                    if key in found:
                        continue
                    err = msg.error()
                    if err is None:
                        found[key] = msg.timestamp()[1] / 1000
                    elif err.code() == KafkaError._PARTITION_EOF:
                        found[key] = None
        finally:
            self._probe.unassign()
        return found

    # -- the sample ----------------------------------------------------------------------
    def sample(self) -> list[PartitionLag]:
        now = self.clock()
        existing = set(self.admin.list_topics(timeout=REQUEST_TIMEOUT_S).topics)
        committed = {g: self._committed(g, existing) for g in self.groups}
        owned = self._owned()
        wanted = {tp for offsets in committed.values() for tp in offsets}
        ends = self._offsets(wanted, OffsetSpec.latest())
        never = {tp for offsets in committed.values() for tp, o in offsets.items() if o is None}
        starts = self._offsets(never, OffsetSpec.earliest())
        for tp, end in ends.items():
            history = self._history.setdefault(tp, deque(maxlen=HISTORY))
            if not history or end != history[-1][1]:
                history.append((now, end))

        position: dict[tuple[str, str, int], int] = {}
        for group, offsets in committed.items():
            for tp, off in offsets.items():
                if tp in ends:
                    position[(group, *tp)] = off if off is not None else starts.get(tp, 0)
        read = self._read_at({(t, p, pos) for (_, t, p), pos in position.items() if ends[(t, p)] > pos})

        out: list[PartitionLag] = []
        for (group, topic, part), pos in sorted(position.items()):
            tp = (topic, part)
            end = ends[tp]
            lag = max(0, end - pos)
            seconds: float | None = 0.0
            at = (topic, part, pos)
            if lag and at in read and read[at] is None:
                lag = 0  # nothing but transaction markers past the committed offset
            elif lag:
                written = read.get(at)
                if written is None:
                    written = interpolate_time(list(self._history[tp]), pos)
                seconds = max(0.0, now - written) if written is not None else None
            window = self._windows.setdefault((group, topic, part), Window(self.window_size))
            is_owned = tp in owned.get(group, set())
            window.observe(now, pos, lag, is_owned)
            out.append(PartitionLag(group, topic, part, committed[group][tp], end, lag, seconds, is_owned,
                                    window.status(now), now))
        self.last = out
        return out

    def status(self, samples: Sequence[PartitionLag] | None = None) -> dict[str, Status]:
        """Each group's status: the worst of its partitions (OK for a group with none)."""
        rows = self.last if samples is None else samples
        return {g: worst(r.status for r in rows if r.group == g) for g in self.groups}

    def publish(self, samples: Sequence[PartitionLag] | None = None) -> None:
        """Set the Prometheus gauges from a sample (the last one by default)."""
        rows = self.last if samples is None else samples
        for r in rows:
            labels = (r.group, r.topic, str(r.partition))
            metrics.LAG.labels(*labels).set(r.lag)
            if r.lag_seconds is not None:
                metrics.LAG_SECONDS.labels(*labels).set(r.lag_seconds)
        for group, current in self.status(rows).items():
            for s in Status:
                metrics.GROUP_STATUS.labels(group, s.name).set(1 if s is current else 0)

    def close(self) -> None:
        self._probe.close()
        for reader in self._readers.values():
            reader.close()


def document(monitor: LagMonitor, samples: Sequence[PartitionLag]) -> dict[str, object]:
    """One JSON document per sample."""
    return {
        "time": samples[0].time if samples else monitor.clock(),
        "groups": {g: s.name for g, s in monitor.status(samples).items()},
        "partitions": [r.as_dict() for r in samples],
    }


def table(monitor: LagMonitor, samples: Sequence[PartitionLag], caption: str | None = None) -> Table:
    """The live view: one row per partition, group status in the first column."""
    groups = monitor.status(samples)
    t = Table(title=f"consumer lag at {time.strftime('%H:%M:%S', time.localtime(monitor.clock()))}",
              caption=caption or (None if samples else "no partitions: no such group, or its topics are missing"))
    for name, justify in (("group", "left"), ("status", "left"), ("topic", "left"), ("part", "right"),
                          ("committed", "right"), ("end", "right"), ("lag", "right"), ("lag s", "right"),
                          ("partition status", "left")):
        t.add_column(name, justify=justify)  # type: ignore[arg-type]
    for r in samples:
        t.add_row(r.group, groups[r.group].name, r.topic, str(r.partition),
                  "-" if r.committed is None else str(r.committed), str(r.end_offset), str(r.lag),
                  "-" if r.lag_seconds is None else f"{r.lag_seconds:.1f}",
                  f"[{STYLE[r.status]}]{r.status.name}[/]" + ("" if r.owned else " (no member)"))
    return t


STYLE = {Status.OK: "green", Status.WARN: "yellow", Status.STALL: "red", Status.STOP: "bold red",
         Status.REWIND: "magenta"}


def run(settings: Settings, groups: Sequence[str], *, watch: bool, as_json: bool, serve: bool,
        interval: float, window: int) -> None:
    """The command: one sample (table or JSON), or a loop (``watch``/``serve``) until SIGTERM/SIGINT."""
    from rich.console import Console
    from rich.live import Live

    from pipeline.core.service import Service

    service = Service("lag", settings)
    monitor = LagMonitor(settings, groups or None, window=window)
    console = Console()
    loop = watch or serve
    try:
        if serve:
            service.install_signal_handlers()
            port = service.serve_http()
            service.log.info("serving", extra={"port": port, "groups": monitor.groups})
        live = Live(console=console, auto_refresh=False) if watch and not as_json else None
        if live:
            live.start()
        try:
            while True:
                try:
                    samples = monitor.sample()
                except KafkaException as e:
                    if not loop:
                        raise SystemExit(f"floodgate lag: cannot read the cluster: {e}") from e
                    # The cluster is unreachable or slow: say so, keep the last gauges, try again.
                    service.ready.clear()
                    metrics.ERRORS.labels(stage="lag", kind="kafka").inc()
                    service.log.warning("sample failed", extra={"error": str(e)})
                    if service.stopping.wait(interval):
                        break
                    continue
                monitor.publish(samples)
                service.ready.set()
                if as_json:
                    print(orjson.dumps(document(monitor, samples)).decode(), flush=True)
                elif live:
                    live.update(table(monitor, samples), refresh=True)
                elif not serve:
                    console.print(table(monitor, samples, caption="one sample: a status needs a window of "
                                                                  "samples over time (--watch)"))
                if not loop or service.stopping.wait(interval):
                    break
        except KeyboardInterrupt:
            pass
        finally:
            if live:
                live.stop()
    finally:
        monitor.close()
        service.close()
