"""User and operator verdicts from the feedback topic, as labelled training messages.

Every record on ``feedback`` is a MailEvent whose ``label`` is the verdict (``ham``/``spam``),
except operators' decisions on a sender's standing (``floodgate senders revoke|restore``,
:class:`pipeline.core.senders.Decision`), which say nothing about a message and are skipped.
Retraining reads the whole topic (it is kept forever) from the beginning up to the end offsets
seen when reading starts; it commits nothing, so reading is repeatable. When a user changes
their mind about a message, the last verdict for an event id wins.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import TopicMetadata

from models.corpus import Message
from pipeline import kafka
from pipeline.core import events, senders
from pipeline.core.config import Settings


@dataclass
class FeedbackRead:
    messages: list[Message]
    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (undecodable, unlabelled, ...)


# A topic created moments ago may have no partition leader yet; these clear up by themselves.
_TRANSIENT = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_TOPIC_OR_PART,
              KafkaError._TIMED_OUT}


METADATA_WAIT_S = 10.0  # a topic created a moment ago shows up within this; one that does not, is missing


def _topic(consumer: Consumer, topic: str, deadline: float) -> TopicMetadata:
    while True:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is not None and meta.error is None and meta.partitions:
            return meta
        if time.monotonic() > deadline:
            raise RuntimeError(f"feedback topic {topic} is not there: run `make topics`")
        time.sleep(0.2)  # metadata of a new topic is still propagating: ask again shortly


def _end_offset(consumer: Consumer, tp: TopicPartition, deadline: float) -> int:
    while True:
        try:
            return consumer.get_watermark_offsets(tp, timeout=10)[1]
        except KafkaException as e:
            if e.args[0].code() not in _TRANSIENT or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the broker is electing a leader: ask again shortly


def read_feedback(settings: Settings, timeout_s: float = 60.0) -> FeedbackRead:
    """Every verdict on the feedback topic so far, deduplicated by event id (last wins)."""
    topic = settings.topic("feedback")
    consumer = kafka.consumer(settings, group=settings.group("retrain"))
    try:
        deadline = time.monotonic() + timeout_s
        meta = _topic(consumer, topic, min(deadline, time.monotonic() + METADATA_WAIT_S))
        ends = {p: _end_offset(consumer, TopicPartition(topic, p), deadline) for p in meta.partitions}
        pending = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        latest: dict[str, Message] = {}
        out = FeedbackRead([])
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {out.records} feedback records; partitions {sorted(pending)} "
                                   f"did not reach their end offsets within {timeout_s:.0f} s")
            for record in consumer.consume(500, timeout=0.5):
                if record.error():
                    if record.error().code() == KafkaError._PARTITION_EOF or record.error().code() in _TRANSIENT:
                        continue  # end of a partition, or a leader election the client rides out
                    raise RuntimeError(f"feedback read failed: {record.error()}")
                out.records += 1
                if senders.decode_decision(record.value()) is not None:
                    out.skipped["sender_decision"] = out.skipped.get("sender_decision", 0) + 1
                    continue
                try:
                    event = events.decode(record.value())
                except events.EventError:
                    out.skipped["undecodable"] = out.skipped.get("undecodable", 0) + 1
                    continue
                if event.label not in ("ham", "spam"):
                    out.skipped["unlabelled"] = out.skipped.get("unlabelled", 0) + 1
                    continue
                latest.pop(event.id, None)  # re-insert: keeps the order of the last verdicts
                latest[event.id] = Message(event.raw, event.label, "feedback", event.id)
            # position() moves past transaction markers too, which are never delivered as records
            for tp in consumer.position([TopicPartition(topic, p) for p in list(pending)]):
                if tp.offset >= ends[tp.partition]:
                    pending.discard(tp.partition)
        out.messages = list(latest.values())
        return out
    finally:
        consumer.close()
