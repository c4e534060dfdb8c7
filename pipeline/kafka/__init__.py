"""Kafka plumbing, written once: client configuration, producers, consumers, admin.

Every worker gets its clients here so that security settings, acknowledgements and
isolation levels are decided in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.core.config import Settings

# Accepted mail is never lost: wait for all in-sync replicas, and let the idempotent
# producer retry without creating duplicates.
DURABLE_PRODUCER = {
    "acks": "all",
    "enable.idempotence": True,
    "compression.type": "zstd",  # mail text compresses ~3x; spares broker disk and network
    "linger.ms": 2,  # a little batching without adding latency a human could notice
    "message.max.bytes": 16 * 1024 * 1024,
}


# How every client rides out a broker outage (a restart, a node lost). Measured on a single
# broker SIGKILLed for 40 s (issue 18):
RECOVERY = {
    # The reconnect backoff doubles per failed attempt up to this; at librdkafka's 10 s a client
    # could sleep up to 10 s after the broker came back before it even tried to reconnect.
    "reconnect.backoff.max.ms": 1000,
    # With every known broker unreachable, librdkafka (2.10+) re-bootstraps by default: it
    # decommissions each broker it knew, the group coordinator included, and starts over from
    # bootstrap.servers, 20 times a second while the outage lasts. A coordinator request parked
    # on the decommissioned coordinator is then never woken (librdkafka#5511, unfixed in 2.16):
    # send_offsets_to_transaction hung for good after 1 of 3 restarts, whereas without
    # re-bootstrap the client keeps its brokers and reconnects to them, which is what a restart
    # brings back. The cost: a client whose brokers ALL move to new addresses at once has to be
    # restarted (their names are still re-resolved at every connection attempt).
    "metadata.recovery.strategy": "none",
}


def client_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """The connection part shared by producers, consumers and admin clients."""
    k = settings.kafka
    conf: dict[str, Any] = {
        "bootstrap.servers": k.bootstrap_servers,
        "security.protocol": k.security_protocol,
        **RECOVERY,
    }
    if k.sasl_mechanism:
        conf |= {"sasl.mechanism": k.sasl_mechanism, "sasl.username": k.sasl_username,
                 "sasl.password": k.sasl_password}
    for key, value in (("ssl.ca.location", k.ssl_ca_location),
                       ("ssl.certificate.location", k.ssl_certificate_location),
                       ("ssl.key.location", k.ssl_key_location)):
        if value:
            conf[key] = value
    return conf | overrides


def producer(settings: Settings, transactional_id: str | None = None, **overrides: Any) -> Producer:
    conf = client_config(settings, **DURABLE_PRODUCER)
    if transactional_id:
        conf["transactional.id"] = transactional_id
    return Producer(conf | overrides)


class LaneProducer:
    """An ingress's producer: one durable producer per lane topic, behind the calls of one.

    librdkafka sends a connection's requests in order and the broker serves each connection one
    request at a time, so with a single producer a ham message's produce request queued behind
    the flood's batches (``make bench-flood``: ham accepted-to-acknowledged p99 during the flood
    0.19 s with one producer, 0.10 s with one per lane). Separate producers have separate
    connections, queues and in-flight windows: the bulk lane's backlog never sits in front of
    the priority lane's mail, not even inside the client.
    """

    def __init__(self, settings: Settings, topics: Mapping[str, dict[str, Any]], **overrides: Any) -> None:
        """``topics``: each lane topic with its own producer settings; ``overrides`` apply to all."""
        self._by_topic = {t: producer(settings, **(own | overrides)) for t, own in topics.items()}
        self._all = list(self._by_topic.values())

    def produce(self, topic: str, **kwargs: Any) -> None:
        try:
            p = self._by_topic[topic]
        except KeyError:
            raise KafkaException(f"{topic!r} is not a lane topic of this producer") from None
        p.produce(topic, **kwargs)

    def poll(self, timeout: float = 0) -> int:
        return sum(p.poll(timeout / len(self._all)) for p in self._all)

    def flush(self, timeout: float = -1) -> int:
        deadline = None if timeout < 0 else time.monotonic() + timeout
        left = 0
        for p in self._all:
            left += p.flush(-1 if deadline is None else max(0.0, deadline - time.monotonic()))
        return left

    def purge(self) -> None:
        for p in self._all:
            p.purge()

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        """Cluster metadata, as any of the lane producers sees it."""
        return self._all[0].list_topics(topic, timeout)

    def __len__(self) -> int:
        return sum(len(p) for p in self._all)


# The bulk lane's producer waits up to 50 ms to fill a batch. A flood puts thousands of messages
# a second into that lane: with the durable producer's 2 ms the ingress sent ~940 produce
# requests a second of 1-3 records each, and the broker, which the priority lane shares, took
# each one through its request threads. At 50 ms it sends ~100 a second, the broker used ~13 %
# less CPU over a shortened flood run, and the flood-phase ham p99 fell (make bench-flood,
# BENCHMARKS.md). Flood mail waits up to 50 ms longer: the bulk lane's latency is not the one
# that matters. The priority lane keeps the 2 ms.
BULK_LINGER_MS = 50


def lane_configs(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each lane topic's own producer settings. A client id per lane lets an operator single the
    bulk lane out at the broker: its request metrics, or a produce quota
    (``kafka-configs --entity-type clients --entity-name floodgate-ingress-bulk``)."""
    return {
        settings.topic("inbound"): {"client.id": "floodgate-ingress-priority"},
        settings.topic("bulk"): {"client.id": "floodgate-ingress-bulk", "linger.ms": BULK_LINGER_MS},
    }


def lane_producer(settings: Settings, per_lane: Mapping[str, dict[str, Any]] | None = None,
                  **overrides: Any) -> LaneProducer:
    """The producer for an ingress: a connection per lane topic (``inbound`` and ``bulk``);
    ``per_lane`` adds settings to one lane topic's producer only."""
    configs = lane_configs(settings)
    return LaneProducer(settings, {t: own | dict((per_lane or {}).get(t, {})) for t, own in configs.items()},
                        **overrides)


def consumer(settings: Settings, group: str, **overrides: Any) -> Consumer:
    """A consumer that commits only what the worker says is done, and sees only committed records."""
    conf = client_config(
        settings,
        **{
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "partition.assignment.strategy": "cooperative-sticky",
            # A SIGKILLed worker keeps its partitions until the broker gives up on it, and the
            # restarted worker's join waits for that: with librdkafka's 45 s default a killed
            # classifier stalled its lane for ~50 s (make chaos). A broker restart costs the
            # same wait: after an outage longer than this the consumer has dropped its member
            # id, the restarted coordinator reloads the group with the old member in it, and
            # every rejoin waits until that member's session expires (issue 18: 10 s of the
            # 12-14 s from broker answering to ham delivered). 6 s is the brokers' minimum
            # (group.min.session.timeout.ms); heartbeats come from librdkafka's own thread every
            # 2 s, so slow batches do not count against it, only a process frozen for 6 s.
            "session.timeout.ms": 6_000,
            "heartbeat.interval.ms": 2_000,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
        },
    )
    return Consumer(conf | overrides)


def admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def check(err: Any) -> None:
    """Raise a delivery or consume error as an exception."""
    if err is not None:
        raise KafkaException(err)


# Reading a whole topic (operator commands): the wait for each fetch, and for the partitions of
# a topic to appear in the metadata.
READ_POLL_S = 0.5
Record = tuple[bytes | None, bytes | None]


def end_offsets(settings: Settings, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """The end offset of every partition of ``topic`` (KafkaException if there is no such topic)."""
    reader = consumer(settings, group=settings.group("reader"))
    try:
        return _ends(reader, topic, timeout_s)
    finally:
        reader.close()


# A topic created a moment ago may have no partition leader yet: these clear up by themselves.
TRANSIENT = frozenset({KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError._TIMED_OUT})


def _ends(reader: Consumer, topic: str, timeout_s: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    meta = reader.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise KafkaException(meta.error if meta is not None and meta.error else f"no topic {topic}")
    ends: dict[int, int] = {}
    for p in meta.partitions:
        while p not in ends:
            try:
                ends[p] = reader.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
            except KafkaException as e:
                if e.args[0].code() not in TRANSIENT or time.monotonic() > deadline:
                    raise
                time.sleep(READ_POLL_S / 5)  # the broker is electing a leader: ask again shortly
    return ends


def read(settings: Settings, topic: str, start: Mapping[int, int] | None = None, timeout_s: float = 30.0,
         until: Callable[[Record], bool] | None = None) -> list[Record]:
    """(key, value) of the records of ``topic`` from ``start`` (offsets per partition; default
    the beginning) to its end offsets when reading began, or, with ``until``, up to the first
    record ``until`` accepts, however long after that end it comes (TimeoutError after
    ``timeout_s`` either way). Commits nothing: how operator commands read a compacted topic's
    state, or wait for a record a worker will publish."""
    reader = consumer(settings, group=settings.group("reader"))
    try:
        deadline = time.monotonic() + timeout_s
        ends = _ends(reader, topic, timeout_s)
        begin = {p: (start or {}).get(p, OFFSET_BEGINNING) for p in ends}
        pending = {p for p in ends if until is not None or ends[p] > max(begin[p], 0)}
        reader.assign([TopicPartition(topic, p, begin[p]) for p in pending])
        out: list[Record] = []
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {len(out)} records of {topic}; not done within {timeout_s:.0f} s")
            for m in reader.consume(500, READ_POLL_S):
                if m.error():
                    if m.error().code() == KafkaError._PARTITION_EOF:
                        continue
                    raise KafkaException(m.error())
                if until is None and m.offset() >= ends[m.partition()]:
                    continue  # written after reading began
                out.append((m.key(), m.value()))
                if until is not None and until(out[-1]):
                    return out
            if until is None:  # position() moves past transaction markers, never delivered as records
                for tp in reader.position([TopicPartition(topic, p) for p in list(pending)]):
                    if tp.offset >= ends[tp.partition]:
                        pending.discard(tp.partition)
        return out
    finally:
        reader.close()
