"""Where did every message go? Maildirs, the quarantine and the dead-letter topic, by event id.

The one check behind the product's promise — every accepted message ends in exactly one of
a recipient's mailbox, the quarantine or the dead-letter topic, and none twice — used by the
demo, the benchmarks, the chaos run and the end-to-end tests.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import TopicPartition

from pipeline import kafka
from pipeline.core import events
from pipeline.core.config import Settings
from pipeline.sinks import maildir


@dataclass
class Found:
    delivered: dict[str, list[float]] = field(default_factory=dict)  # event id -> write time per copy
    quarantined: dict[str, float] = field(default_factory=dict)  # event id -> quarantined_at
    accepted: dict[str, float] = field(default_factory=dict)  # event id -> accepted_at (as the sinks saw it)
    dead: dict[str, str] = field(default_factory=dict)  # event id (or origin) -> reason
    dead_records: int = 0

    def where(self, event_id: str) -> list[str]:
        places = ["mailbox"] * len(self.delivered.get(event_id, []))
        places += ["quarantine"] if event_id in self.quarantined else []
        places += ["dead-letter"] if event_id in self.dead else []
        return places


def scan_maildirs(root: Path, found: Found) -> None:
    if not root.is_dir():
        return
    for sub in ("new", "cur"):
        for path in root.glob(f"*/*/{sub}/*{maildir.SUFFIX}*"):
            parts = path.name.split(".")
            if len(parts) < 3:
                continue
            event_id = parts[1]
            # ctime, not mtime: the link into new/ sets it, after the message's data is fsynced
            # (mtime is the write, before), and new/ is fsynced right after the link.
            found.delivered.setdefault(event_id, []).append(path.stat().st_ctime)
            found.accepted.setdefault(event_id, float(parts[0]))


def scan_quarantine(db: Path, found: Found) -> None:
    if not db.exists():
        return
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        for event_id, accepted_at, quarantined_at in conn.execute(
                "SELECT event_id, accepted_at, quarantined_at FROM quarantine"):
            found.quarantined[event_id] = quarantined_at
            found.accepted[event_id] = accepted_at


def scan_dead_letters(settings: Settings, found: Found, timeout: float = 30.0) -> None:
    topic = settings.topic("dead_letter")
    consumer = kafka.consumer(settings, group=f"{settings.kafka.group_prefix}.accounting-{uuid.uuid4().hex[:8]}")
    try:
        meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if meta is None or meta.error is not None:
            return
        ends = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)
            if high > low:
                ends[p] = high
        assignment = [TopicPartition(topic, p, 0) for p in ends]
        consumer.assign(assignment)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = consumer.consume(500, 0.5)
            for m in msgs:
                if m.error():
                    continue
                found.dead_records += 1
                headers = dict(m.headers() or [])
                reason = headers.get("floodgate-reason", b"").decode(errors="replace")
                event_id = events.peek_id(m.value()) or headers.get("floodgate-origin", b"?").decode()
                found.dead[event_id] = reason
            # Done once nothing more comes and every partition is at its end (a transaction's
            # commit marker may occupy the last offset, so one short of it counts).
            if not msgs and all(tp.offset >= ends[tp.partition] - 1 for tp in consumer.position(assignment)):
                break
    finally:
        consumer.close()


POLL_S = 0.5


def wait_accounted(settings: Settings, ids: set[str], timeout: float) -> Found | None:
    """Until every id is in a Maildir, the quarantine or the dead-letter topic; None at the deadline."""
    deadline = time.monotonic() + timeout
    last_dead = 0.0
    dead: dict[str, str] = {}
    while time.monotonic() < deadline:
        found = Found()
        scan_maildirs(settings.paths.maildir_root, found)
        scan_quarantine(settings.paths.quarantine_db, found)
        missing = ids - set(found.delivered) - set(found.quarantined)
        if missing and time.monotonic() - last_dead > 10:  # the topic read costs a second or so
            d = Found()
            scan_dead_letters(settings, d)
            dead, last_dead = d.dead, time.monotonic()
        if not missing - set(dead):
            return found
        time.sleep(POLL_S)  # polling interval of a deadline-bounded wait
    return None


def scan(settings: Settings, dead_letters: bool = True) -> Found:
    found = Found()
    scan_maildirs(settings.paths.maildir_root, found)
    scan_quarantine(settings.paths.quarantine_db, found)
    if dead_letters:
        scan_dead_letters(settings, found)
    return found


@dataclass
class Ledger:
    """Sent event ids checked against what was found."""

    expected: int
    placed: Counter  # place -> events that ended there exactly once
    lost: list[str]
    duplicated: list[str]
    unexpected: int

    @property
    def ok(self) -> bool:
        return not self.lost and not self.duplicated

    def summary(self) -> str:
        places = ", ".join(f"{k}={v}" for k, v in sorted(self.placed.items()))
        return (f"{self.expected} sent: {places}; lost={len(self.lost)} duplicated={len(self.duplicated)}"
                f" unexpected={self.unexpected}")


def reconcile(sent_ids: Iterable[str], found: Found, copies: dict[str, int] | None = None) -> Ledger:
    """``copies``: mailbox copies expected per event (its recipient count), 1 by default."""
    ids = set(sent_ids)
    placed: Counter = Counter()
    lost, duplicated = [], []
    for event_id in ids:
        where = found.where(event_id)
        want = (copies or {}).get(event_id, 1)
        if not where:
            lost.append(event_id)
        elif where == ["mailbox"] * want and want > 0:
            placed["mailbox"] += 1
        elif len(where) == 1:
            placed[where[0]] += 1
        else:
            duplicated.append(event_id)
    known = set(found.delivered) | set(found.quarantined) | set(found.dead)
    return Ledger(len(ids), placed, sorted(lost), sorted(duplicated), len(known - ids))
