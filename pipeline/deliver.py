"""``floodgate deliver``: classified ham from the ham topic into Maildirs, or to a downstream server.

The worker commits its offsets only after the handler returns, that is after every message of
the batch is durably in its Maildirs (or accepted by the downstream server). A replayed record
is harmless: each event has one deterministic file name per mailbox and is found again.

Per record: not a mail event, not ham, or no recipients → dead-letter with the reason; a disk
error or an unavailable downstream → :class:`TransientError` (the batch is retried later, nothing
committed); a permanent downstream rejection → dead-letter with the server's reply.

Downstream delivery cannot look into the server's mailboxes: within one worker a retried batch
skips recipients already accepted, but a worker that dies after the server's 250 and before its
offset commit makes its successor send that message again. The ``X-Floodgate-Trace`` header
carries the event id for a downstream that wants to deduplicate.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from confluent_kafka import Message

from pipeline.core import metrics
from pipeline.core.config import Settings
from pipeline.core.events import MailEvent
from pipeline.core.service import Service
from pipeline.kafka import loop
from pipeline.kafka.loop import Handler, Loop, Output, TransientError
from pipeline.sinks import lmtp, maildir, stamp

STAGE = "deliver"
OWN_SOURCES = ("release", "digest")  # events Floodgate made itself (pipeline/feedback.py, pipeline/digest.py)
# Recipients a downstream server accepted, remembered so that a batch retried after one
# recipient was deferred does not hand the others their copy again. Bounded: a batch is at most
# a few hundred events; this covers many batches.
SENT_MEMORY = 100_000
# A crashed worker keeps its partitions until the broker gives up on it (librdkafka's default
# session timeout is 45 s): 45 s of undelivered ham. 6 s, the brokers' minimum
# (group.min.session.timeout.ms), hands them over sooner, and bounds the rejoin wait after a
# broker restart (see pipeline.kafka.consumer); heartbeats come from librdkafka's own thread, so
# slow batches do not count against it.
CONSUMER = {"session.timeout.ms": 6_000, "heartbeat.interval.ms": 2_000}


class Deliverer:
    def __init__(self, settings: Settings) -> None:
        self.root = settings.paths.maildir_root
        self.dead_letter_topic = settings.topic("dead_letter")
        mode = settings.delivery.mode
        if mode != "maildir" and mode not in lmtp.MODES:
            raise ValueError(f"delivery mode {mode!r} is not maildir, lmtp or smtp")
        self.downstream = lmtp.Downstream(settings.delivery) if mode in lmtp.MODES else None
        self._sent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.pool = ThreadPoolExecutor(maildir.PARALLEL_WRITES, thread_name_prefix="maildir")

    def close(self) -> None:
        self.pool.shutdown()
        if self.downstream:
            self.downstream.close()

    def handle(self, msgs: Sequence[Message]) -> list[Output]:
        decoded, outputs = loop.decode_batch(msgs, STAGE, self.dead_letter_topic, verdict="ham")
        todo: list[tuple[MailEvent, list[tuple[Path, str, bytes]]]] = []
        for m, event in decoded:
            if not event.envelope.rcpt_to:
                outputs.append(self._dead(m, "no_recipients", "event has no recipients"))
                continue
            if self.downstream is not None:
                try:
                    self._done(event, self._send(event, stamp(event)))
                except lmtp.Rejected as e:
                    outputs.append(self._dead(m, "rejected", str(e)))
                continue
            try:
                name = maildir.file_name(event)
                boxes = dict.fromkeys(maildir.mailbox_path(self.root, r) for r in event.envelope.rcpt_to)
            except ValueError as e:  # an event id or address no file name can carry
                outputs.append(self._dead(m, "unsafe", str(e)))
                continue
            data = stamp(event)
            todo.append((event, [(box, name, data) for box in boxes]))
        if todo:
            items = [item for _, its in todo for item in its]
            try:
                written = iter(maildir.deliver_many(items, self.pool))
            except OSError as e:  # disk full, permissions, I/O error: a sink problem, not the messages'
                raise TransientError(f"maildir: {e}") from e
            for event, its in todo:
                self._done(event, any([next(written) for _ in its]))
        return outputs

    def _done(self, event: MailEvent, fresh: bool) -> None:
        lane = metrics.lane_label(event.lane)
        if fresh:
            # A released message waited for an operator, and a digest was made by us, not by the
            # pipeline: keep both out of the latency that tells whether ham is being held back.
            if event.source not in OWN_SOURCES:
                metrics.END_TO_END.labels(lane, "ham").observe(max(0.0, time.time() - event.accepted_at))
            metrics.MESSAGES.labels(STAGE, lane, "delivered").inc()
        else:
            metrics.MESSAGES.labels(STAGE, lane, "duplicate").inc()

    def _send(self, event: MailEvent, data: bytes) -> bool:
        assert self.downstream is not None
        fresh = False
        for rcpt in dict.fromkeys(event.envelope.rcpt_to):
            key = (event.id, rcpt)
            if key in self._sent:
                continue
            self.downstream.send(event.envelope.mail_from, rcpt, data)
            self._sent[key] = None
            if len(self._sent) > SENT_MEMORY:
                self._sent.popitem(last=False)
            fresh = True
        return fresh

    def _dead(self, m: Message, kind: str, reason: str) -> Output:
        return loop.reject(self.dead_letter_topic, m, STAGE, kind, reason)


# Each lane's ham topic and consumer group: the bulk lane's ham (flood mail the model let
# through, mostly) is delivered by its own group and never queues in front of priority ham.
LANES = {"priority": ("ham", STAGE), "bulk": ("bulk_ham", f"{STAGE}-bulk")}


def paced(handle: Handler, rate: float, stopping: threading.Event) -> Handler:
    """``handle``, held to ``rate`` records a second on average (the bulk lane's delivery)."""
    if rate <= 0:
        return handle
    next_free = time.monotonic()

    def paced_handle(msgs: Sequence[Message]) -> list[Output]:
        nonlocal next_free
        stopping.wait(max(0.0, next_free - time.monotonic()))  # pacing, not synchronisation
        next_free = max(next_free, time.monotonic()) + len(msgs) / rate
        return handle(msgs)

    return paced_handle


def build(service: Service, lane: str = "priority") -> tuple[Loop, Deliverer]:
    s = service.settings
    topic, group = LANES[lane]
    deliverer = Deliverer(s)
    handle = deliverer.handle if lane == "priority" else paced(deliverer.handle, s.worker.bulk_delivery_rate,
                                                               service.stopping)
    worker = Loop(service, STAGE, s.group(group), [s.topic(topic)], handle, transactional=False,
                  consumer_overrides=CONSUMER)
    return worker, deliverer


def serve(service: Service, lane: str = "priority") -> None:
    """Run the worker until ``service.stopping`` is set (SIGTERM or SIGINT), then release its sinks."""
    worker, deliverer = build(service, lane)
    s = service.settings
    service.log.info("delivering", extra={"mode": s.delivery.mode, "topic": s.topic(LANES[lane][0]),
                                          "maildir_root": str(s.paths.maildir_root)})
    try:
        worker.run()
    finally:
        deliverer.close()
        service.close()
