"""Waiting on Kafka in tests: conditions with deadlines, never sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def consume_n(consumer: Consumer, n: int, timeout: float = 30.0) -> list[Message]:
    """Consume exactly ``n`` records (or fail at the deadline)."""
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"got {len(got)} of {n} records within {timeout:.0f}s")
        for msg in consumer.consume(n - len(got), timeout=0.5):
            if msg.error():
                raise AssertionError(f"consume error: {msg.error()}")
            got.append(msg)
    return got


def records_on(admin: AdminClient, topic: str, timeout: float = 30.0) -> int:
    """Records on ``topic`` (sum of its partitions' end offsets), in one ListOffsets request.

    Retries while a freshly created topic's partitions still elect their leaders.
    (``Consumer.get_watermark_offsets`` asks one partition at a time: ~0.5 s each.)
    """
    def count() -> list[int] | None:
        parts = admin.list_topics(topic, timeout=10).topics[topic].partitions
        futures = admin.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in parts},
                                     request_timeout=10)
        try:
            return [sum(f.result().offset for f in futures.values())]
        except KafkaException as e:
            if e.args[0].retriable() or e.args[0].code() == KafkaError.NOT_LEADER_FOR_PARTITION:
                return None
            raise

    return wait_for(count, timeout, what=f"end offsets of {topic}")[0]
