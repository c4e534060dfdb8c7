"""People correcting the classifier and the sender reputation: quarantine releases by operators,
spam/ham reports by users, operators revoking and restoring a sender's known-good standing.

Releases and reports end as a feedback event (the mail event with its true ``label``) on the
feedback topic, kept for retraining and counted by the reputation worker (as votes: one
reporter is one vote, see :mod:`pipeline.reputation`). A release also re-injects the event into
the ham topic with the same event id (``source="release"``), so ``floodgate deliver`` delivers
it once however often it arrives.

Revocation: ``revoke``/``restore`` write an operator decision
(:class:`pipeline.core.senders.Decision`) on the same feedback topic, keyed by sender key,
authorised like a release. The reputation worker keeps it in the sender's table entry and
publishes the standing with it to the reputation topic, where admission reads it; the command
waits until it sees that record (``DECISION_WAIT_S``). :func:`standings` reads that topic for
``floodgate senders list|show``.

One release, one feedback record. A release first *claims* the row (a conditional UPDATE in
SQLite, :meth:`pipeline.sinks.quarantine.Quarantine.claim`): of any number of concurrent
releases of one message, in any number of processes, exactly one gets the claim; the others
answer that the message is being released, or was, and produce nothing. The claimant produces
both records, waits for the broker's acknowledgement, then marks the row released (only while
it still holds the claim). The claim is a lease of ``RELEASE_LEASE_S``, longer than a release
can take, so a release that died holding it blocks the next one for that long, not forever.

Crash safety, step by step:

* crash before the claim: nothing happened;
* crash after the claim, before producing: nothing was sent; the row is held until the lease
  runs out, then any release takes it over;
* the broker refuses or does not answer: the claim is given back at once (``unclaim``) and the
  row stays unreleased; one of the records, or after a timeout both, may still have reached
  the topic, so a retry can repeat them (harmless, as below);
* crash after the broker acknowledged, before marking: the mail is on its way, the row looks
  unreleased; after the lease a second release repeats both records. Harmless for the mail
  (delivery is idempotent on the event id) and for the sender's standing (the operator's vote
  counts once however often it is cast: the reputation worker counts distinct reporters),
  retraining keeps the last label per event id; only the feedback topic holds the record twice.

Marking first could lose the mail instead. A release that outlives its lease (the process was
stopped for minutes between claiming and marking) may see another release take the row over;
then both produce, with the same harmless repeat as above.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from pipeline import kafka
from pipeline.core import authres, events, senders
from pipeline.core.config import Settings
from pipeline.core.events import Envelope, MailEvent
from pipeline.sinks import SCORE_HEADER, TRACE_HEADER, from_iso, iso, maildir, parse_trace, unstamp
from pipeline.sinks.quarantine import Quarantine

TOKEN_ENV = "FLOODGATE_ADMIN_TOKEN"
LABELS = ("spam", "ham")
ACK_TIMEOUT_S = 30.0
# A release's claim on a quarantined message: four times what its slowest step (waiting
# ACK_TIMEOUT_S for the broker) may take, so a live release always marks the row before its
# claim could be taken over, and a release that died holding it blocks another for two minutes.
RELEASE_LEASE_S = 4 * ACK_TIMEOUT_S
# How long revoke/restore wait to see the reputation worker publish the decision. It takes about
# a second (two of the worker's half-second batches); ten leave room for a busy worker. A
# decision not seen by then is still recorded on the feedback topic and applied when the worker
# gets to it; the command says so.
DECISION_WAIT_S = 10.0
# Reading the whole compacted reputation topic (floodgate senders list|show).
STANDINGS_TIMEOUT_S = 60.0


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
    _produce(settings, [(topic, event.key, events.encode(event)) for topic, event in records])


def _produce(settings: Settings, records: list[tuple[str, bytes, bytes]]) -> None:
    """Produce (topic key, record key, value) records and wait until the broker has every one."""
    producer = kafka.producer(settings)
    errors: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: object) -> None:
        if err is not None:
            errors.append(err)

    for topic, key, value in records:
        producer.produce(settings.topic(topic), key=key, value=value, on_delivery=on_delivery)
    if producer.flush(ACK_TIMEOUT_S) > 0:
        raise FeedbackError("the broker did not acknowledge in time; nothing was marked, try again")
    if errors:
        raise FeedbackError(f"the broker refused: {errors[0]}; nothing was marked, try again")


def release(settings: Settings, event_id: str, operator: str, token: str | None = None,
            env: Mapping[str, str] | None = None, lease_s: float = RELEASE_LEASE_S) -> MailEvent:
    """Send a quarantined message on to delivery and tell the model it was ham (once; see the
    module docstring)."""
    authorize(operator, token, env)
    store = _open_quarantine(settings)
    try:
        event = store.event(event_id)
        if event is None:
            raise FeedbackError(f"no quarantined message with event id {event_id!r}")
        claim = store.claim(event_id, operator, lease_s)
        if claim is None:
            raise FeedbackError(_not_claimed(store, event_id, lease_s))
        ham = replace(event, verdict="ham", source="release", extra={**event.extra, "released_by": operator})
        feedback = replace(event, label="ham", extra={"feedback": senders.RELEASE_FEEDBACK, "by": operator,
                                                      **_verification(event)})
        try:
            publish(settings, [("ham", ham), ("feedback", feedback)])
        except BaseException:
            store.unclaim(event_id, claim)  # not acknowledged: the next release need not wait
            raise
        # False only if this release outlived its lease and another took the row over (the
        # module docstring): the mail was released either way.
        store.mark_released(event_id, operator, claim=claim)
        return ham
    finally:
        store.close()


def _not_claimed(store: Quarantine, event_id: str, lease_s: float) -> str:
    """Why a release could not claim a message that is there."""
    entry = store.entry(event_id)
    if entry is None:
        return f"no quarantined message with event id {event_id!r}"
    if entry.released_at is not None:
        return (f"{event_id} was already released by {entry.released_by} at {iso(entry.released_at)}; "
                "not releasing it again")
    if entry.claimed_at is None:  # the release that held it failed and gave it back just now
        return f"{event_id} was being released by another process, which failed; try again"
    since = entry.claimed_at
    return (f"{event_id} is being released by {entry.claimed_by} since {iso(since)}; not releasing it twice "
            f"(if that release died, it can be released again after {iso(since + lease_s)})")


def revoke(settings: Settings, key: str, operator: str, token: str | None = None,
           env: Mapping[str, str] | None = None,
           wait_s: float = DECISION_WAIT_S) -> tuple[senders.Decision, senders.Standing | None]:
    """Take a sender key's known-good standing away until it is restored; the decision, and the
    standing the reputation worker published with it (None if not seen within ``wait_s``)."""
    return decide(settings, key, senders.REVOKE, operator, token, env, wait_s)


def restore(settings: Settings, key: str, operator: str, token: str | None = None,
            env: Mapping[str, str] | None = None,
            wait_s: float = DECISION_WAIT_S) -> tuple[senders.Decision, senders.Standing | None]:
    """Lift a revocation: the standing rule decides the key's standing again."""
    return decide(settings, key, senders.RESTORE, operator, token, env, wait_s)


def decide(settings: Settings, key: str, decision: str, operator: str, token: str | None = None,
           env: Mapping[str, str] | None = None,
           wait_s: float = DECISION_WAIT_S) -> tuple[senders.Decision, senders.Standing | None]:
    """Record an operator decision on a sender key and wait to see it published."""
    authorize(operator, token, env)
    sender = senders.normalise_key(key)
    if sender is None:
        raise FeedbackError(f"{key!r} is not a sender key: addr:ADDRESS, domain:DOMAIN or client:ADDRESS")
    made = senders.Decision(key=sender, decision=decision, by=senders.operator_name(operator), at=time.time())
    topic = settings.topic("reputation")
    try:
        start = kafka.end_offsets(settings, topic)  # the worker's record of this decision comes after
    except KafkaException as e:
        raise FeedbackError(f"cannot read {topic}: {e}; nothing was recorded") from None
    _produce(settings, [("feedback", *senders.encode_decision(made))])
    if wait_s <= 0:
        return made, None

    def applied(record: kafka.Record) -> bool:
        standing = senders.decode_standing(record[1])
        # The worker has the decision's time from a record timestamp: in whole milliseconds.
        return (record[0] == sender.encode() and standing is not None and standing.decision == decision
                and standing.decision_by == made.by and abs(standing.decision_at - made.at) < 0.002)

    try:
        found = kafka.read(settings, topic, start, wait_s, until=applied)
    except TimeoutError:
        return made, None
    return made, senders.decode_standing(found[-1][1])


def standings(settings: Settings, timeout_s: float = STANDINGS_TIMEOUT_S) -> dict[str, senders.Standing]:
    """Every sender key's latest published standing (the compacted reputation topic, read to its end)."""
    topic = settings.topic("reputation")
    try:
        return senders.latest(kafka.read(settings, topic, timeout_s=timeout_s))
    except (KafkaException, TimeoutError) as e:
        raise FeedbackError(f"cannot read {topic}: {e}") from None


def report(settings: Settings, event_id: str, label: str, by: str = "") -> MailEvent:
    """A user says a message is spam or ham: a feedback event with that label."""
    if label not in LABELS:
        raise FeedbackError(f"label must be one of {LABELS}, not {label!r}")
    event = find(settings, event_id)
    if event is None:
        raise FeedbackError(f"event {event_id!r} is neither in the quarantine nor in any Maildir under "
                          f"{settings.paths.maildir_root}")
    feedback = replace(event, label=label, extra={"feedback": "user-report", "by": by, **_verification(event)})
    publish(settings, [("feedback", feedback)])
    return feedback


def _verification(event: MailEvent) -> dict[str, Any]:
    """The sender verification ingress recorded, carried into a feedback event: the reputation
    worker then counts the report for the names the message proved, not those it claimed."""
    rec = authres.verified(event.extra)
    return {authres.AUTH: rec} if rec is not None else {}


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
