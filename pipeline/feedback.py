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

import hashlib
import hmac
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from pipeline import kafka
from pipeline.core import authres, events, senders
from pipeline.core.config import Settings
from pipeline.core.events import Envelope, MailEvent
from pipeline.sinks import SCORE_HEADER, TRACE_HEADER, from_iso, iso, maildir, parse_trace, unstamp, unstamp_delivered
from pipeline.sinks.quarantine import Quarantine

TOKEN_ENV = "FLOODGATE_ADMIN_TOKEN"
LABELS = ("spam", "ham")
# The feedback kind of a release by the message's own recipient (the web worker's user view): a
# user's report to the reputation worker (one ``u:`` vote), where an operator's release
# (``senders.RELEASE_FEEDBACK``) is the operator's.
USER_RELEASE_FEEDBACK = "user-release"
USER_REPORT_FEEDBACK = "user-report"
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


@dataclass(frozen=True)
class Outcome:
    """What became of one message of :func:`release_many`."""

    event_id: str
    released: MailEvent | None  # the event re-injected into the ham topic
    error: str | None  # why it was not released

    @property
    def ok(self) -> bool:
        return self.error is None


def release(settings: Settings, event_id: str, operator: str, token: str | None = None,
            env: Mapping[str, str] | None = None, lease_s: float = RELEASE_LEASE_S,
            by_recipient: bool = False) -> MailEvent:
    """Send a quarantined message on to delivery and tell the model it was ham (once; see the
    module docstring). :class:`FeedbackError` says why not."""
    (outcome,) = release_many(settings, [event_id], operator, token, env, lease_s, by_recipient)
    if outcome.released is None:
        raise FeedbackError(outcome.error)
    return outcome.released


def release_many(settings: Settings, event_ids: Sequence[str], operator: str, token: str | None = None,
                 env: Mapping[str, str] | None = None, lease_s: float = RELEASE_LEASE_S,
                 by_recipient: bool = False) -> list[Outcome]:
    """:func:`release` for several messages (an operator's bulk release): each claimed on its
    own, the records of all that were claimed produced together and acknowledged in one wait,
    then each marked. One outcome per distinct id, in order.

    ``by_recipient``: the release is a recipient's own (the web worker's user view, which has
    checked that every recipient of the message is theirs), so its feedback record is that
    user's report (:data:`USER_RELEASE_FEEDBACK`, one user's vote), not an operator's release."""
    authorize(operator, token, env)
    wanted = list(dict.fromkeys(event_ids))
    store = _open_quarantine(settings)
    try:
        outcomes: dict[str, Outcome] = {}
        claimed: list[tuple[str, str, MailEvent, MailEvent]] = []  # (event id, claim, ham, feedback)
        kind = USER_RELEASE_FEEDBACK if by_recipient else senders.RELEASE_FEEDBACK
        for event_id in wanted:
            event = store.event(event_id)
            if event is None:
                outcomes[event_id] = Outcome(event_id, None, f"no quarantined message with event id {event_id!r}")
                continue
            claim = store.claim(event_id, operator, lease_s)
            if claim is None:
                outcomes[event_id] = Outcome(event_id, None, _not_claimed(store, event_id, lease_s))
                continue
            ham = replace(event, verdict="ham", source="release", extra={**event.extra, "released_by": operator})
            vote = replace(event, label="ham", extra={"feedback": kind, "by": operator, **_verification(event)})
            claimed.append((event_id, claim, ham, vote))
        if claimed:
            try:
                publish(settings, [r for _, _, ham, fb in claimed for r in (("ham", ham), ("feedback", fb))])
            except FeedbackError as e:
                for event_id, claim, _, _ in claimed:
                    store.unclaim(event_id, claim)  # not acknowledged: the next release need not wait
                    outcomes[event_id] = Outcome(event_id, None, str(e))
                claimed = []
            except BaseException:
                for event_id, claim, _, _ in claimed:
                    store.unclaim(event_id, claim)
                raise
        for event_id, claim, ham, _ in claimed:
            # False only if this release outlived its lease and another took the row over (the
            # module docstring): the mail was released either way.
            store.mark_released(event_id, operator, claim=claim)
            outcomes[event_id] = Outcome(event_id, ham, None)
        return [outcomes[i] for i in wanted]
    finally:
        store.close()


def delete(settings: Settings, event_id: str, operator: str, token: str | None = None,
           env: Mapping[str, str] | None = None, lease_s: float = RELEASE_LEASE_S) -> None:
    """Delete a quarantined message for good (it was spam): authorised like a release, and under
    the same claim, so a message being released is never deleted under the release."""
    authorize(operator, token, env)
    store = _open_quarantine(settings)
    try:
        claim = store.claim(event_id, operator, lease_s)
        if claim is None:
            raise FeedbackError(_not_claimed(store, event_id, lease_s))
        if not store.delete(event_id, claim):  # its lease ran out between the two statements
            raise FeedbackError(f"{event_id} was taken over by another release or delete; not deleted")
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
    feedback = replace(event, label=label, extra={"feedback": USER_REPORT_FEEDBACK, "by": by, **_verification(event)})
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
