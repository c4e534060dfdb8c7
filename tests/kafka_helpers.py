"""Waiting on Kafka in tests: conditions with deadlines, never sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from confluent_kafka import Consumer, Message

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
