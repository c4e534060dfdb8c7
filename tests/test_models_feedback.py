"""Feedback from the real feedback topic, online updates, and the TREC-style online evaluation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from models import online
from models import pipeline as model_pipeline
from models.corpus import Message
from models.feedback import read_feedback
from pipeline import kafka
from pipeline.core import config, events, senders
from tests.test_models_registry import synthetic


def _event(raw: bytes, label: str | None) -> events.MailEvent:
    return events.new_event(events.Envelope("a@b.example", ("c@example.com",)), raw, source="smtp", label=label)


@pytest.mark.kafka
def test_read_feedback_last_verdict_wins_and_bad_records_are_counted(topic_settings: config.Settings) -> None:
    first = _event(b"Subject: one\r\n\r\ncheap pills", "spam")
    second = _event(b"Subject: two\r\n\r\nminutes of the meeting", "ham")
    changed_mind = dataclasses.replace(first, label="ham")
    unlabelled = _event(b"Subject: three\r\n\r\nno verdict", None)
    topic = topic_settings.topic("feedback")
    producer = kafka.producer(topic_settings)
    for ev in (first, second, unlabelled, changed_mind):
        producer.produce(topic, key=ev.key, value=events.encode(ev))
    producer.produce(topic, key=b"junk", value=b"not an event")
    assert producer.flush(30) == 0

    got = read_feedback(topic_settings, timeout_s=30)
    assert got.records == 5
    assert got.skipped == {"unlabelled": 1, "undecodable": 1}
    assert [(m.name, m.label, m.raw) for m in got.messages] == [
        (second.id, "ham", second.raw), (first.id, "ham", first.raw)]


@pytest.mark.kafka
def test_operator_decisions_on_the_feedback_topic_are_not_training_data(topic_settings: config.Settings) -> None:
    report = _event(b"Subject: four\r\n\r\nlunch on friday", "ham")
    revoke = senders.Decision(key="domain:b.example", decision="revoke", by="ops", at=1.0)
    producer = kafka.producer(topic_settings)
    producer.produce(topic_settings.topic("feedback"), key=report.key, value=events.encode(report))
    key, value = senders.encode_decision(revoke)
    producer.produce(topic_settings.topic("feedback"), key=key, value=value)
    assert producer.flush(30) == 0

    got = read_feedback(topic_settings, timeout_s=30)
    assert (got.records, got.skipped) == (2, {"sender_decision": 1})
    assert [m.name for m in got.messages] == [report.id]


@pytest.mark.kafka
def test_read_feedback_on_an_empty_topic(topic_settings: config.Settings) -> None:
    got = read_feedback(topic_settings, timeout_s=30)
    assert (got.records, got.messages) == (0, [])


def test_learn_moves_scores_toward_the_verdicts() -> None:
    msgs = synthetic(20)
    pipe = model_pipeline.build()
    pipe.fit([m.raw for m in msgs], np.array([m.label == "spam" for m in msgs]))
    novel = b"From: x@new.example\r\nSubject: zorblax quarnite\r\n\r\nzorblax quarnite velbrook zorblax\r\n"
    before = pipe.predict_proba([novel])[0, 1]
    verdict = "ham" if before >= 0.5 else "spam"  # the user says the opposite of what the model thinks
    learned = online.learn(pipe, [Message(novel, verdict, "feedback", f"n{i}") for i in range(5)]
                           + [Message(b"x", None, "feedback", "unlabelled")])
    assert learned == 5
    after = pipe.predict_proba([novel])[0, 1]
    assert (after < before - 0.1) if verdict == "ham" else (after > before + 0.1)


def test_chronological_order_by_date_header() -> None:
    def msg(name: str, date: str | None) -> Message:
        head = f"Date: {date}\r\n" if date else ""
        return Message(f"{head}Subject: {name}\r\n\r\nx".encode(), "ham", "g", name)

    msgs = [msg("c", "Wed, 02 Oct 2002 10:00:00 +0000"), msg("c2", None), msg("a", "Tue, 01 Oct 2002 10:00:00 +0000"),
            msg("b", "Tue, 01 Oct 2002 12:00:00 +0200"), msg("bad", "not a date")]
    assert [m.name for m in online.chronological(msgs)] == ["a", "b", "bad", "c", "c2"]


def test_trec_online_evaluation_learns_as_it_goes() -> None:
    stream = synthetic(60, seed=5)
    report = online.trec_evaluate(stream)
    assert report["n_ham"] == 60 and report["n_spam"] == 60
    assert report["roc_auc"] > 0.95  # after a handful of labels the filter separates the two kinds
    assert report["one_minus_roca_pct"] == pytest.approx(100 * (1 - report["roc_auc"]))
