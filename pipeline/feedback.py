"""People correcting the classifier: quarantine releases by operators, spam/ham reports by users.

Both end as a feedback event (the mail event with its true ``label``) on the feedback topic,
kept for retraining. A release also re-injects the event into the ham topic with the same event
id (``source="release"``), so ``floodgate deliver`` delivers it once however often it arrives.

Order of a release: produce both records and wait for the broker's acknowledgement, then mark
the row released. A crash in between leaves the row unreleased and a second release harmless
(delivery is idempotent on the event id); marking first could lose the mail instead.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from dataclasses import replace

from confluent_kafka import KafkaError

from pipeline import kafka
from pipeline.core import events
from pipeline.core.config import Settings
from pipeline.core.events import Envelope, MailEvent
from pipeline.sinks import SCORE_HEADER, TRACE_HEADER, from_iso, iso, maildir, parse_trace, unstamp, unstamp_delivered
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


def content_id(raw: bytes) -> str:
    """The event id of a reported message that carries none (Floodgate never stamped it: a
    client saved it into Junk itself, or it came another way): a hash of its content, line endings
    aside, so that reports of one message share an id (retraining keeps the last verdict per id)
    whether it was read over IMAP (CRLF) or from a Maildir (LF). 32 hex digits, like every id."""
    return hashlib.blake2b(raw.replace(b"\r\n", b"\n"), digest_size=16).hexdigest()


def from_delivered(settings: Settings, data: bytes, label: str, by: str = "",
                   extra: Mapping[str, str] | None = None, now: float | None = None) -> MailEvent:
    """The feedback event for a user's verdict on a copy read back from the mail store: what a
    Dovecot IMAPSieve pipe hands ``floodgate-report`` when the user moves a message into Junk or
    out of it (the store's own Return-Path/Delivered-To/Received lines on top, then our stamp).

    The event id comes from the ``X-Floodgate-Trace`` header; the message is the content under
    our headers, byte for byte what Floodgate received. An id the quarantine knows (a released
    message) gives the quarantine's event, with the envelope Floodgate recorded. Otherwise the
    envelope stays empty, as for a Maildir copy in :func:`find`: the store's Return-Path is not
    Floodgate's record, and a client can write anything into a message it saves itself, so
    sender reputation (which needs an envelope sender) is not moved by it; retraining is. A
    message without our headers is reported by content, under :func:`content_id`.
    """
    if label not in LABELS:
        raise FeedbackError(f"label must be one of {LABELS}, not {label!r}")
    headers, raw = unstamp_delivered(data)
    trace = parse_trace(headers.get(TRACE_HEADER.decode().lower(), ""))
    event_id = trace.get("event", "")
    if not maildir.EVENT_ID.fullmatch(event_id):
        event_id = ""
    event = _quarantined(settings, event_id) if event_id else None
    if event is None:
        score_text, _, model = headers.get(SCORE_HEADER.decode().lower(), "").partition(" (model ")
        try:
            score: float | None = float(score_text)
        except ValueError:
            score = None
        lane = trace.get("lane")
        event = MailEvent(id=event_id or content_id(raw),
                          accepted_at=from_iso(trace.get("accepted", "")) or (time.time() if now is None else now),
                          envelope=Envelope("", ()), raw=raw, source="smtp" if event_id else "report",
                          lane=lane if lane not in (None, "unknown") else None,
                          verdict="ham" if event_id else None, score=score,
                          model_version=model.rstrip(")") or None, classified_at=from_iso(trace.get("classified", "")))
    return replace(event, label=label, extra={"feedback": "user-report", "by": by, **(extra or {})})


def _quarantined(settings: Settings, event_id: str) -> MailEvent | None:
    if not settings.paths.quarantine_db.exists():
        return None
    store = Quarantine(settings.paths.quarantine_db)
    try:
        return store.event(event_id)
    finally:
        store.close()


def _open_quarantine(settings: Settings) -> Quarantine:
    if not settings.paths.quarantine_db.exists():
        raise FeedbackError(f"no quarantine at {settings.paths.quarantine_db}")
    return Quarantine(settings.paths.quarantine_db)
