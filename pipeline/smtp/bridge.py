"""The ingress's hand-off to Kafka: produce from asyncio and await the broker's acknowledgement.

``produce`` is called from the event loop, a thread serves ``poll()``, and each delivery callback
resolves its asyncio future through ``loop.call_soon_threadsafe``. (``confluent_kafka.aio.AIOProducer``
builds its own producer and buffers up to a second in Python before producing; this keeps the one
producer configuration of :mod:`pipeline.kafka` and adds no latency.) librdkafka batches what the
sessions produce meanwhile (``linger.ms``), so a busy ingress sends few, full requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from pipeline import kafka
from pipeline.core import metrics
from pipeline.core.config import Settings
from pipeline.kafka import topics
from pipeline.kafka.health import ClientHealth, first_problem

STAGE = "smtp"
log = logging.getLogger("floodgate.smtp")
# librdkafka scans for timed-out messages about once a second: give its own verdict (the
# authoritative one) that long to arrive before the asyncio side gives up on the ack.
ACK_GRACE_S = 1.0
POLL_INTERVAL_S = 0.1
# Readiness. After a message the broker did not acknowledge (a 451), the ingress is not ready
# until one is acknowledged again or this long has passed; from then on the broker's metadata
# decides, looked at every METADATA_CHECK_S: every partition of both lane topics has a leader
# and at least min.insync.replicas in sync, the condition for acks=all to succeed.
TEMPFAIL_HOLD_S = 10.0
METADATA_CHECK_S = 2.0


class DeliveryFailed(Exception):
    """The broker did not acknowledge an event (unreachable, timeout, local queue full)."""


class KafkaBridge:
    """Produce from asyncio and await the broker's acknowledgement."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.ack_timeout_s = settings.smtp.ack_timeout_s
        self._fatal = threading.Event()
        self.lanes = {settings.topic("inbound"): "priority", settings.topic("bulk"): "bulk"}
        self.health = {t: ClientHealth(f"{lane} lane producer") for t, lane in self.lanes.items()}
        self.min_isr = {t.name: int(t.config["min.insync.replicas"]) for t in topics.desired(settings)
                        if t.name in self.lanes}
        self.last_ack: float | None = None
        self.last_tempfail: float | None = None
        self.metadata_problem: str | None = "the lane topics' metadata not read yet"
        self.producer = self._new_producer()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="smtp-kafka-poll", daemon=True)
        self._thread.start()
        self._meta_thread = threading.Thread(target=self._watch_metadata, name="smtp-kafka-metadata", daemon=True)
        self._meta_thread.start()

    def _new_producer(self) -> Any:
        def on_error(err: KafkaError) -> None:
            if err.fatal():
                self._fatal.set()
            log.warning("kafka error", extra={"error": str(err), "fatal": err.fatal()})

        # librdkafka gives up on a message after the same timeout, so that a message we
        # answered 451 for is rarely still in flight behind our back (see ``resolve``).
        return kafka.lane_producer(self.settings, {t: h.config() for t, h in self.health.items()},
                                   **{"message.timeout.ms": max(1, int(self.ack_timeout_s * 1000)),
                                      "error_cb": on_error})

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._fatal.is_set():
                self._replace_producer()
            self.producer.poll(POLL_INTERVAL_S)

    def _watch_metadata(self) -> None:
        while not self._stop.wait(METADATA_CHECK_S if self.metadata_problem is None else METADATA_CHECK_S / 4):
            try:
                found = self.producer.list_topics(timeout=METADATA_CHECK_S)
            except KafkaException as e:
                self.metadata_problem = f"no metadata from the broker: {e.args[0]}"
                continue
            self.metadata_problem = None
            for topic, min_isr in self.min_isr.items():
                meta = found.topics.get(topic)
                if meta is None or meta.error is not None:
                    self.metadata_problem = f"topic {topic} unknown to the broker"
                    break
                weak = [p for p in meta.partitions.values() if p.leader < 0 or len(p.isrs) < min_isr]
                if weak:
                    self.metadata_problem = (f"{topic}: {len(weak)} partition(s) without a leader or with fewer "
                                             f"than {min_isr} in-sync replicas")
                    break

    def problem(self) -> str | None:
        """Why a message sent now would get 451, or None (``/readyz``)."""
        now = time.monotonic()
        if (self.last_tempfail is not None and (self.last_ack is None or self.last_ack < self.last_tempfail)
                and now - self.last_tempfail < TEMPFAIL_HOLD_S):
            return "the broker did not acknowledge the last message: answering 451"
        return first_problem([h.problem for h in self.health.values()] + [lambda: self.metadata_problem])

    def _replace_producer(self) -> None:
        """An idempotent producer that hit a fatal error (e.g. a sequence gap after broker data
        loss) refuses everything from then on: start a new one rather than 451 all mail forever."""
        self._fatal.clear()
        old, self.producer = self.producer, self._new_producer()
        metrics.ERRORS.labels(STAGE, "producer_fatal").inc()
        log.error("producer hit a fatal error; replaced it")
        old.purge()  # its undelivered events fail now, and their sessions get 451
        old.flush(0)

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        event_id = key.decode()

        def resolve(err: KafkaError | None) -> None:
            if fut.done():  # the SMTP side already gave up and answered 451
                if err is None:
                    metrics.ERRORS.labels(STAGE, "late_ack").inc()
                    log.warning("event acknowledged after its 451; the sender's retry will duplicate it",
                                extra={"event_id": event_id})
                return
            if err is None:
                self.last_ack = time.monotonic()
                fut.set_result(None)
            else:
                fut.set_exception(DeliveryFailed(str(err)))

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown: nobody waits
                self.loop.call_soon_threadsafe(resolve, err)

        try:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
            except BufferError:
                raise DeliveryFailed("local producer queue full") from None
            except KafkaException as e:
                raise DeliveryFailed(str(e)) from None
            try:
                await asyncio.wait_for(fut, self.ack_timeout_s + ACK_GRACE_S)
            except TimeoutError:
                raise DeliveryFailed(f"no acknowledgement within {self.ack_timeout_s:g}s") from None
        except DeliveryFailed:
            self.last_tempfail = time.monotonic()
            raise

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join()
        self._meta_thread.join()
        self.producer.flush(timeout_s)
