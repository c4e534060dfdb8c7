"""The broker itself, the topic spec, and the confluent-kafka plumbing."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import NewTopic

from pipeline import kafka
from pipeline.core import events
from pipeline.kafka import topics
from tests.kafka_helpers import consume_n, wait_for

pytestmark = pytest.mark.kafka


def test_produce_consume_round_trip(settings):
    admin = kafka.admin(settings)
    name = settings.topic("inbound") + "-roundtrip"
    admin.create_topics([NewTopic(name, 3, 1)])["" + name].result(30)
    event = events.new_event(events.Envelope("a@example.org", ("b@example.com",)), b"Subject: hi\r\n\r\nbody\r\n")
    producer = kafka.producer(settings)
    acks = []
    for i in range(30):
        producer.produce(name, key=f"k{i}", value=events.encode(event),
                         on_delivery=lambda err, msg: acks.append(err))
    assert producer.flush(30) == 0
    assert acks == [None] * 30
    consumer = kafka.consumer(settings, group=f"g-{uuid.uuid4().hex}")
    consumer.subscribe([name])
    try:
        got = consume_n(consumer, 30)
    finally:
        consumer.close()
    assert sorted(m.key() for m in got) == sorted(f"k{i}".encode() for i in range(30))
    assert {m.partition() for m in got} == {0, 1, 2}
    decoded = events.decode(got[0].value())
    assert decoded == event
    admin.delete_topics([name])


def test_topic_spec_applied_twice_changes_nothing(settings):
    admin = kafka.admin(settings)
    first = topics.apply(settings, admin)
    try:
        assert any(line.startswith("create ") for line in first)
        assert len([line for line in first if line.startswith("create ")]) == len(topics.desired(settings))
        assert topics.apply(settings, admin) == []
        # Drift: a config changed behind our back is put back; a second run is quiet again.
        inbound = settings.topic("inbound")
        from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource
        res = ConfigResource(ConfigResource.Type.TOPIC, inbound, incremental_configs=[
            ConfigEntry("retention.ms", "1000", incremental_operation=AlterConfigOpType.SET)])
        for fut in admin.incremental_alter_configs([res]).values():
            fut.result(30)

        def drifted() -> bool:  # config changes reach describe_configs a moment after the ack
            found = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, inbound)])
            return next(iter(found.values())).result(30)["retention.ms"].value == "1000"

        wait_for(drifted, timeout=30, what="the changed retention to be visible")
        fixed = topics.apply(settings, admin)
        assert fixed == [f"set {inbound} retention.ms=604800000 (was 1000)"]
        # The fix, too, reaches describe_configs a moment after its ack: then nothing is left to do.
        wait_for(lambda: not drifted(), timeout=30, what="the restored retention to be visible")
        assert topics.apply(settings, admin) == []
    finally:
        topics.delete(settings, admin)


def test_delete_takes_the_stream_apps_topics_and_nothing_of_another_deployment(settings):
    """What the reputation app made under the deployment's group prefix goes with the spec's
    topics; another deployment's topics stay, and an unprefixed deployment is refused."""
    admin = kafka.admin(settings)
    topics.apply(settings, admin)
    app_made = f"{settings.group('reputation')}-senders-changelog"
    neighbour = f"{settings.group('reputation')}x-observations"  # another deployment's prefix
    for fut in admin.create_topics([NewTopic(app_made, 1, 1), NewTopic(neighbour, 1, 1)]).values():
        fut.result(30)
    wait_for(lambda: {app_made, neighbour} <= set(admin.list_topics(timeout=10).topics), timeout=30,
             what="the created topics in the metadata")
    try:
        topics.delete(settings, admin)

        def gone() -> bool:
            existing = admin.list_topics(timeout=10).topics
            return not any(t.name in existing for t in topics.desired(settings)) and app_made not in existing

        wait_for(gone, timeout=30, what="the deployment's topics to be deleted")
        assert neighbour in admin.list_topics(timeout=10).topics
        shared = replace(settings, kafka=replace(settings.kafka, topic_prefix=""))
        with pytest.raises(ValueError, match="without a topic prefix"):
            topics.delete(shared, admin)
    finally:
        admin.delete_topics([neighbour], operation_timeout=30)[neighbour].result(30)


def test_topics_dry_run_changes_nothing(settings):
    admin = kafka.admin(settings)
    planned = topics.apply(settings, admin, dry_run=True)
    assert len(planned) == len(topics.desired(settings))
    existing = admin.list_topics(timeout=10).topics
    assert not any(t.name in existing for t in topics.desired(settings))


def test_lane_configs_batch_the_bulk_lane_and_name_each_lane(settings):
    configs = kafka.lane_configs(settings)
    inbound, bulk = configs[settings.topic("inbound")], configs[settings.topic("bulk")]
    # Flood mail is batched longer than the priority lane's, which keeps the durable producer's linger.
    assert bulk["linger.ms"] > kafka.DURABLE_PRODUCER["linger.ms"]
    assert "linger.ms" not in inbound
    # A client id per lane, so that the broker can tell the bulk lane's requests apart.
    assert inbound["client.id"] != bulk["client.id"]
    assert set(configs) == {settings.topic("inbound"), settings.topic("bulk")}


def test_lane_producer_sends_each_lane_on_its_own_producer(topic_settings):
    settings = topic_settings
    inbound, bulk = settings.topic("inbound"), settings.topic("bulk")
    producer = kafka.lane_producer(settings)
    acks: list[tuple[str, object]] = []
    for i in range(20):
        producer.produce(inbound if i % 4 else bulk, key=f"k{i}", value=b"x",
                         on_delivery=lambda err, msg: acks.append((msg.topic(), err)))
    assert producer.flush(30) == 0
    assert len(producer) == 0
    assert sorted(acks) == sorted([(bulk, None)] * 5 + [(inbound, None)] * 15)
    # The lanes do not share a client, so one lane's queue never holds the other's mail.
    assert producer._by_topic[inbound] is not producer._by_topic[bulk]
    with pytest.raises(KafkaException, match="not a lane topic"):
        producer.produce(settings.topic("ham"), key="k", value=b"x")
