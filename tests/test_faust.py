"""faust-streaming (on aiokafka) against the real Kafka 4 broker: an agent consumes and produces."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import NewTopic

from pipeline import kafka
from tests.kafka_helpers import consume_n

pytestmark = pytest.mark.kafka
APP = Path(__file__).with_name("faust_counter_app.py")


def test_faust_agent_counts_words_through_the_broker(settings, tmp_path):
    run = uuid.uuid4().hex[:8]
    in_topic, out_topic = f"faust-in-{run}", f"faust-out-{run}"
    admin = kafka.admin(settings)
    for fut in admin.create_topics([NewTopic(in_topic, 1, 1), NewTopic(out_topic, 1, 1)]).values():
        fut.result(30)
    env = os.environ | {"APP_ID": f"faust-test-{run}", "BOOTSTRAP": settings.kafka.bootstrap_servers,
                        "IN_TOPIC": in_topic, "OUT_TOPIC": out_topic}
    log = (tmp_path / "faust.log").open("wb")
    worker = subprocess.Popen([sys.executable, str(APP), "--datadir", str(tmp_path), "worker", "-l", "info"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        producer = kafka.producer(settings)
        sent = [b"ham", b"spam", b"spam", b"eggs", b"spam"]
        for w in sent:
            producer.produce(in_topic, key=w, value=w)
        assert producer.flush(30) == 0
        consumer = kafka.consumer(settings, group=f"check-{run}", **{"isolation.level": "read_uncommitted"})
        consumer.subscribe([out_topic])
        try:
            got = [m.value() for m in consume_n(consumer, len(sent), timeout=90)]
        finally:
            consumer.close()
        assert got == [b"ham:1", b"spam:1", b"spam:2", b"eggs:1", b"spam:3"]
        assert worker.poll() is None, "the Faust worker died"
        changelog = f"faust-test-{run}-counts-changelog"
        assert changelog in admin.list_topics(timeout=10).topics
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        print((tmp_path / "faust.log").read_text(errors="replace")[-3000:])
        # This run's topics, the app's own (changelog, assignor) included: left behind, they
        # pile up on a long-lived broker and cost it work in every later run.
        mine = [t for t in admin.list_topics(timeout=10).topics if run in t]
        for fut in admin.delete_topics(mine).values():
            fut.result(30)
