"""The hard deadline on the transactional producer's calls (pipeline/kafka/loop.py): librdkafka
can block in send_offsets_to_transaction past its own timeout (librdkafka#5456, #5511), so the
loop runs those calls on a helper thread and gives up on one that outlives its deadline."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from pipeline.kafka import loop


def test_a_call_that_returns_in_time_gives_its_result_and_its_timeout():
    assert loop.call_with_deadline("t", lambda timeout: ("ok", timeout), timeout=0.5, grace=0.5) == ("ok", 0.5)


def test_a_call_that_raises_raises_in_the_caller():
    def fails(_timeout: float) -> None:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "timed out", retriable=True))

    with pytest.raises(KafkaException) as e:
        loop.call_with_deadline("t", fails, timeout=0.5, grace=0.5)
    assert e.value.args[0].retriable()


def test_a_call_blocked_past_its_deadline_is_abandoned_and_may_return_later(caplog):
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(loop.ProducerStuck):
        loop.call_with_deadline("send_offsets_to_transaction", lambda _t: release.wait(10), timeout=0.2, grace=0.2)
    assert 0.35 < time.monotonic() - start < 2.0  # its deadline, not the call's own 10 s
    with caplog.at_level("WARNING", logger="floodgate"):
        release.set()
        deadline = time.monotonic() + 5
        while "an abandoned Kafka call returned" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "an abandoned Kafka call returned" in caplog.text
