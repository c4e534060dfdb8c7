"""``floodgate digest``: mail each recipient a summary of what was held for them, with links.

The web worker's companion: its links are :class:`pipeline.web.security.Signer`'s, which the web
worker verifies. Run once a period (a timer or cron job: ``make digest``, daily by default). For each recipient
with messages still held, it writes one plain-text mail listing those quarantined since their
last digest (or all, the first time), each with a link to the message in the web worker and one
to the whole list: a signed link naming that address only, good for ``web.link_max_age_days``
(:class:`pipeline.web.security.Signer`). A link opens a page; releasing takes a button there (a
POST with its CSRF token), so a mail scanner that follows every link releases nothing.

Delivery is Floodgate's own: the digest is a ham event produced to the ham topic and delivered
by ``floodgate deliver`` to the Maildir or the LMTP/SMTP server like any message, with the null
envelope sender (RFC 3834's auto-generated mail; no sender key, so it never counts towards a
sender's standing) and ``Auto-Submitted: auto-generated``.

Once per period, also across crashes: the digest's event id is a hash of (recipient, period),
its accepted time the period's start, so the same digest is the same event and a Maildir holds
it once. Its window is *planned* in the quarantine file before anything is produced
(``quarantine_digest``) and marked sent after the broker's acknowledgement; a run that died in
between leaves a plan that the next run of the period sends again, identical. A run in a later
period starts each recipient's window where their last digest's ended.

What a digest shows of a message is what a spammer wrote (sender, subject), so it is cut short,
made printable, and kept out of the digest's own headers.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

from pipeline import feedback
from pipeline.core.config import Settings
from pipeline.core.events import Envelope, MailEvent
from pipeline.sinks.quarantine import Entry, Quarantine, Search

SOURCE = "digest"  # the events' source (deliver keeps them out of the pipeline's latency)
PERIODS = {"hour": 3600, "day": 86_400, "week": 7 * 86_400}
LISTED_MAX = 100  # messages listed in one digest; the link shows the rest
SUBJECT_SHOWN = 90  # characters of a held message's subject (a spammer's text)
SENDER_SHOWN = 80
BATCH = 200  # digests produced per acknowledgement wait


class DigestError(Exception):
    """A digest run that cannot start; the message says why."""


@dataclass(frozen=True)
class Period:
    name: str  # 2026-05-01 (day), 2026-05-01T07 (hour), 2026-W18 (week)
    start: float
    end: float


def period_of(kind: str, now: float) -> Period:
    """The period of ``kind`` that ``now`` falls in (UTC)."""
    if kind not in PERIODS:
        raise DigestError(f"digest period must be one of {sorted(PERIODS)}, not {kind!r}")
    at = datetime.fromtimestamp(now, UTC)
    if kind == "hour":
        start = at.replace(minute=0, second=0, microsecond=0)
        name = start.strftime("%Y-%m-%dT%H")
    elif kind == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        name = start.strftime("%Y-%m-%d")
    else:
        day = at.replace(hour=0, minute=0, second=0, microsecond=0)
        start = datetime.fromtimestamp(day.timestamp() - day.weekday() * 86_400, UTC)
        year, week, _ = start.isocalendar()
        name = f"{year}-W{week:02d}"
    return Period(name, start.timestamp(), start.timestamp() + PERIODS[kind])


def event_id(rcpt: str, period: str) -> str:
    """The digest's event id: the same for the same recipient and period, a valid Maildir name."""
    return hashlib.sha256(f"floodgate-digest\0{rcpt}\0{period}".encode()).hexdigest()[:32]


def _short(text: str, n: int) -> str:
    from pipeline.web.message import visible

    text = " ".join(visible(text).split())
    return text if len(text) <= n else text[:n - 1] + "…"


def compose(settings: Settings, rcpt: str, period: Period, entries: list[Entry], total: int, link: str,
            expires: float) -> bytes:
    """The digest mail's bytes (RFC 5322, CRLF)."""
    base = f"{settings.web.public_url.rstrip('/')}/u/{link}"
    msg = EmailMessage(policy=SMTP)
    msg["From"] = f"Floodgate quarantine <{settings.web.digest_from}>"
    msg["To"] = rcpt
    msg["Subject"] = f"{total} message{'s' if total != 1 else ''} held for you ({period.name})"
    msg["Date"] = format_datetime(datetime.fromtimestamp(period.start, UTC))
    domain = settings.web.digest_from.partition("@")[2] or "floodgate"
    msg["Message-ID"] = f"<digest.{event_id(rcpt, period.name)}@{domain}>"
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to it
    lines = [f"{total} message{'s' if total != 1 else ''} addressed to {rcpt} looked like spam and "
             f"{'were' if total != 1 else 'was'} held back. If you expected one of them, open it and release it:",
             "it is then delivered to your mailbox.", ""]
    for e in entries:
        when = datetime.fromtimestamp(e.quarantined_at, UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines += [f"* {when}   sender: {_short(e.mail_from, SENDER_SHOWN) or '(none)'}",
                  f"  subject: {_short(e.subject, SUBJECT_SHOWN) or '(no subject)'}",
                  f"  {base}/m/{e.event_id}", ""]
    if total > len(entries):
        lines += [f"… and {total - len(entries)} more.", ""]
    expiry = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines += [f"All messages held for you: {base}", "",
              f"These links work until {expiry}. Nothing is released unless you press Release on its page.",
              "Messages are deleted from the quarantine after "
              f"{settings.worker.quarantine_retention_days} days."]
    msg.set_content("\n".join(lines) + "\n", charset="utf-8", cte="quoted-printable")
    return msg.as_bytes()


@dataclass(frozen=True)
class Result:
    period: str
    sent: int  # digests acknowledged by the broker in this run
    already: int  # recipients whose digest of this period had been sent before
    messages: int  # messages listed in the digests sent


def run(settings: Settings, now: float | None = None, period_kind: str | None = None,
        recipients: list[str] | None = None) -> Result:
    """Send this period's digests (see the module docstring); ``recipients`` limits the run."""
    from pipeline.web.security import DAY_S, Signer  # light: itsdangerous only

    if not settings.web.secret_key:
        raise DigestError("web.secret_key is not set (FLOODGATE_WEB_SECRET_KEY): the links would not verify")
    now = time.time() if now is None else now
    period = period_of(period_kind or settings.web.digest_period, now)
    if not settings.paths.quarantine_db.exists():
        return Result(period.name, 0, 0, 0)
    signer = Signer(settings.web, settings.web.secret_key)
    expires = now + settings.web.link_max_age_days * DAY_S
    store = Quarantine(settings.paths.quarantine_db)
    sent = already = listed = 0
    try:
        wanted = store.digest_recipients(0.0, now)
        if recipients is not None:
            keep = {r.strip().lower() for r in recipients}
            wanted = [r for r in wanted if r in keep]
        pending: list[tuple[str, MailEvent, int]] = []
        for rcpt in wanted:
            since = store.last_digest_until(rcpt, period.name) or 0.0
            entries = store.held_for(rcpt, since, now, LISTED_MAX)
            planned_since, planned_until, was_sent = (store.plan_digest(rcpt, period.name, since, now, now)
                                                      if entries else (since, now, False))
            if was_sent:
                already += 1
                continue
            if (planned_since, planned_until) != (since, now):  # a run that died planned it: the same again
                entries = store.held_for(rcpt, planned_since, planned_until, LISTED_MAX)
            if not entries:
                continue
            total = store.count(Search(recipients=(rcpt,), since=planned_since, until=planned_until))
            raw = compose(settings, rcpt, period, entries, total, signer.link([rcpt]), expires)
            event = MailEvent(id=event_id(rcpt, period.name), accepted_at=period.start,
                              envelope=Envelope("", (rcpt,)), raw=raw, source=SOURCE, lane="priority",
                              verdict="ham", classified_at=period.start)
            pending.append((rcpt, event, len(entries)))
            if len(pending) >= BATCH:
                sent, listed = _send(settings, store, period, pending, sent, listed)
                pending = []
        if pending:
            sent, listed = _send(settings, store, period, pending, sent, listed)
    finally:
        store.close()
    return Result(period.name, sent, already, listed)


def _send(settings: Settings, store: Quarantine, period: Period, pending: list[tuple[str, MailEvent, int]],
          sent: int, listed: int) -> tuple[int, int]:
    """Produce a batch of digests, wait for the broker, mark them sent."""
    try:
        feedback.publish(settings, [("ham", event) for _, event, _ in pending])
    except feedback.FeedbackError as e:
        raise DigestError(f"{e} (the digests planned are sent by the next run of this period)") from None
    for rcpt, _, n in pending:
        store.mark_digest_sent(rcpt, period.name)
        sent, listed = sent + 1, listed + n
    return sent, listed
