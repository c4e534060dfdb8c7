"""People correcting the classifier: quarantine releases by operators, spam/ham reports by users.

Both end as a feedback event (the mail event with its true ``label``) on the feedback topic,
kept for retraining. A release also re-injects the event into the ham topic with the same event
id (``source="release"``), so ``floodgate deliver`` delivers it once however often it arrives.

Order of a release: produce both records and wait for the broker's acknowledgement, then mark
the row released. A crash in between leaves the row unreleased and a second release harmless
(delivery is idempotent on the event id); marking first could lose the mail instead.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from dataclasses import replace

from confluent_kafka import KafkaError

from pipeline import kafka
from pipeline.core import events
from pipeline.core.config import Settings
from pipeline.core.events import Envelope, MailEvent
from pipeline.sinks import SCORE_HEADER, TRACE_HEADER, from_iso, iso, maildir, parse_trace, unstamp
from pipeline.sinks.quarantine import Quarantine

TOKEN_ENV = "FLOODGATE_ADMIN_TOKEN"
LABELS = ("spam", "ham")
ACK_TIMEOUT_S = 30.0


class FeedbackError(Exception):
    """A release or report that cannot be done; the message says why."""


def authorize(operator: str, token: str | None, env: Mapping[str, str] | None = None) -> None:
    """An operator must name themselves; when an admin token is configured, they must present it."""
    if not operator.strip():
        raise FeedbackError("an operator name is required (--by NAME)")
    expected = (os.environ if env is None else env).get(TOKEN_ENV, "")
    if expected and not hmac.compare_digest((token or "").encode(), expected.encode()):
        raise FeedbackError(f"not authorized: --token does not match {TOKEN_ENV}")


def publish(settings: Settings, records: list[tuple[str, MailEvent]]) -> None:
    """Produce (topic key, event) records and wait until the broker has every one."""
    producer = kafka.producer(settings)
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    for topic, event in records:
        producer.produce(settings.topic(topic), key=event.key, value=events.encode(event), on_delivery=on_delivery)
    if producer.flush(ACK_TIMEOUT_S) > 0:
        raise FeedbackError("the broker did not acknowledge in time; nothing was marked, try again")
    if errors:
        raise FeedbackError(f"the broker refused: {errors[0]}; nothing was marked, try again")


def release(settings: Settings, event_id: str, operator: str, token: str | None = None,
            env: Mapping[str, str] | None = None) -> MailEvent:
    """Send a quarantined message on to delivery and tell the model it was ham."""
    authorize(operator, token, env)
    store = _open_quarantine(settings)
    try:
        entry = store.entry(event_id)
        if entry is None:
            raise FeedbackError(f"no quarantined message with event id {event_id!r}")
        if entry.released_at is not None:
            raise FeedbackError(f"{event_id} was already released by {entry.released_by} "
                              f"at {iso(entry.released_at)}; not releasing it again")
        event = store.event(event_id)
        assert event is not None
        ham = replace(event, verdict="ham", source="release", extra={**event.extra, "released_by": operator})
        feedback = replace(event, label="ham", extra={"feedback": "quarantine-release", "by": operator})
        publish(settings, [("ham", ham), ("feedback", feedback)])
        store.mark_released(event_id, operator)  # False only if a concurrent release won: same outcome
        return ham
    finally:
        store.close()


def report(settings: Settings, event_id: str, label: str, by: str = "") -> MailEvent:
    """A user says a message is spam or ham: a feedback event with that label."""
    if label not in LABELS:
        raise FeedbackError(f"label must be one of {LABELS}, not {label!r}")
    event = find(settings, event_id)
    if event is None:
        raise FeedbackError(f"event {event_id!r} is neither in the quarantine nor in any Maildir under "
                          f"{settings.paths.maildir_root}")
    feedback = replace(event, label=label, extra={"feedback": "user-report", "by": by})
    publish(settings, [("feedback", feedback)])
    return feedback


def find(settings: Settings, event_id: str) -> MailEvent | None:
    """The event from the quarantine, or rebuilt from a delivered copy in the Maildirs."""
    if settings.paths.quarantine_db.exists():
        store = Quarantine(settings.paths.quarantine_db)
        try:
            event = store.event(event_id)
        finally:
            store.close()
        if event is not None:
            return event
    copies = maildir.find(settings.paths.maildir_root, event_id)
    if not copies:
        return None
    headers, raw = unstamp(copies[0].read_bytes())
    trace = parse_trace(headers.get(TRACE_HEADER.decode().lower(), ""))
    score_text, _, model = headers.get(SCORE_HEADER.decode().lower(), "").partition(" (model ")
    try:
        score: float | None = float(score_text)
    except ValueError:
        score = None
    accepted = from_iso(trace.get("accepted", "")) or copies[0].stat().st_mtime
    # A Maildir copy no longer carries the envelope; the message itself is what feedback needs.
    return MailEvent(id=event_id, accepted_at=accepted, envelope=Envelope("", ()), raw=raw,
                     lane=trace.get("lane") if trace.get("lane") not in (None, "unknown") else None,
                     verdict="ham", score=score, model_version=model.rstrip(")") or None,
                     classified_at=from_iso(trace.get("classified", "")))


def _open_quarantine(settings: Settings) -> Quarantine:
    if not settings.paths.quarantine_db.exists():
        raise FeedbackError(f"no quarantine at {settings.paths.quarantine_db}")
    return Quarantine(settings.paths.quarantine_db)
