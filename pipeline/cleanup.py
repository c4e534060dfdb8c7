"""``floodgate cleanup``: classified spam from the spam topic into the quarantine.

Each batch goes into SQLite in one committed transaction before the handler returns, and only
then does the worker commit its offsets; a replayed record is ignored by the primary key. The
worker shares nothing with ``floodgate deliver`` but the broker: when a flood makes it fall
behind, ham is not delayed.

Retention: once an hour the worker purges rows older than
``worker.quarantine_retention_days``; ``floodgate quarantine purge`` does the same on demand.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from confluent_kafka import Message

from pipeline.core import log, metrics
from pipeline.core.config import Settings
from pipeline.core.events import MailEvent
from pipeline.core.service import Service
from pipeline.kafka import loop
from pipeline.kafka.loop import Loop, Output, TransientError
from pipeline.sinks.quarantine import Quarantine

STAGE = "cleanup"
PURGE_INTERVAL_S = 3600.0  # retention is counted in days; hourly is precise enough and cheap


class Cleanup:
    def __init__(self, settings: Settings) -> None:
        self.store = Quarantine(settings.paths.quarantine_db)
        self.retention_days = settings.worker.quarantine_retention_days
        self.dead_letter_topic = settings.topic("dead_letter")
        self.log = log.get(STAGE)
        self._next_purge = 0.0

    def close(self) -> None:
        self.store.close()

    def handle(self, msgs: Sequence[Message]) -> list[Output]:
        decoded, outputs = loop.decode_batch(msgs, STAGE, self.dead_letter_topic, verdict="spam")
        batch: list[MailEvent] = [event for _, event in decoded]
        try:
            added = self.store.add(batch) if batch else set()
            self._purge_if_due()
        except sqlite3.OperationalError as e:  # locked past the busy timeout, disk full, I/O error
            raise TransientError(f"quarantine: {e}") from e
        now = time.time()
        for event in batch:
            lane = metrics.lane_label(event.lane)
            if event.id in added:
                metrics.END_TO_END.labels(lane, "spam").observe(max(0.0, now - event.accepted_at))
                metrics.MESSAGES.labels(STAGE, lane, "quarantined").inc()
            else:
                metrics.MESSAGES.labels(STAGE, lane, "duplicate").inc()
        return outputs

    def _purge_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_purge:
            return
        self._next_purge = now + PURGE_INTERVAL_S
        gone = self.store.purge(self.retention_days)
        if gone:
            self.log.info("purged quarantine", extra={"rows": gone, "older_than_days": self.retention_days})


def build(service: Service) -> tuple[Loop, Cleanup]:
    s = service.settings
    cleanup = Cleanup(s)
    # Both lanes' spam: the quarantine is one store, and it may fall behind either.
    topics = [s.topic("spam"), s.topic("bulk_spam")]
    return Loop(service, STAGE, s.group(STAGE), topics, cleanup.handle, transactional=False), cleanup


def serve(service: Service) -> None:
    """Run the worker until ``service.stopping`` is set (SIGTERM or SIGINT), then release its sinks."""
    worker, cleanup = build(service)
    s = service.settings
    service.log.info("quarantining", extra={"topic": s.topic("spam"), "quarantine_db": str(s.paths.quarantine_db)})
    try:
        worker.run()
    finally:
        cleanup.close()
        service.close()
