"""``floodgate report-drain``: users' spooled Junk moves → the feedback topic.

Guarantee: at least once, in order. Reports are taken from the spool's ``new/`` in name order
(the time they were spooled), a batch at a time; each becomes the feedback event of
:func:`pipeline.feedback.from_delivered` (the event id from the message's trace header, or its
content hash; the label the move gave it; ``extra`` names the user, ``via: imap`` and the report's
spool name as ``report_id``) and the batch is produced to the feedback topic keyed by event id
(so one message's reports stay in order on one partition). Only once the broker has acknowledged
every record of the batch are its files removed. A broker that is down or slow costs nothing but
time: the reports wait in the spool and the drain retries with a doubling backoff. A crash
between the acknowledgement and the removal publishes those reports again; a consumer that must
count each once deduplicates on ``extra.report_id`` (retraining keeps the last verdict per event
id anyway). A spool file that can never be published (not a report, a message above the record
limit) is moved to ``bad/`` with the reason and logged: set aside, never dropped.

Runs where the mail store writes the spool (the Dovecot host), as a user that may read and remove
its files (the mail user, or one in the spool's group); ``floodgate run -w report-drain`` or the
systemd unit in ``infra/dovecot/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pipeline import feedback
from pipeline.core import events, metrics
from pipeline.core import log as logs
from pipeline.core.config import Settings
from pipeline.core.events import MailEvent
from pipeline.core.service import Service
from pipeline.kafka.loop import RECORD_MAX
from pipeline.reports.spool import Spool, SpoolError

STAGE = "report-drain"
log = logs.get(STAGE)
# How often an empty spool is looked at: a report reaches the topic within about this long. A
# listdir of an empty directory twice a second costs nothing.
POLL_S = 0.5
# Reports published with one producer and one wait for the acknowledgements: a user who moves a
# few hundred messages at once is drained in a few round trips, not one producer per report.
BATCH = 200
# After a batch the broker did not acknowledge: wait, doubling up to the maximum, then retry.
RETRY_S = 1.0
RETRY_MAX_S = 30.0


class Drain:
    def __init__(self, settings: Settings, spool: Spool | None = None) -> None:
        self.settings = settings
        self.spool = spool or Spool(settings.paths.report_spool)
        self.spool.ensure()
        self.failing_since: float | None = None
        self.last_error = ""

    def problem(self) -> str | None:
        """Why reports are not reaching the topic now (``/readyz``), or None."""
        if not os.access(self.spool.root / "new", os.R_OK | os.W_OK | os.X_OK):
            return f"cannot read and remove reports in {self.spool.root / 'new'}"
        if self.failing_since is not None:
            return f"the last batch was not published: {self.last_error}"
        return None

    def once(self, limit: int = BATCH) -> int:
        """Publish up to ``limit`` waiting reports; how many were published (0: none waiting).
        Raises :class:`feedback.FeedbackError` when the broker did not acknowledge them all
        (then none is removed)."""
        batch: list[tuple[Path, MailEvent]] = []
        for path in self.spool.pending(limit):
            try:
                report = self.spool.read(path)
            except FileNotFoundError:  # another drain took it
                continue
            except (SpoolError, OSError) as e:
                self._set_aside(path, str(e))
                continue
            if report.truncated:
                self._set_aside(path, f"message larger than {len(report.data)} bytes: above the feedback "
                                      "topic's record limit")
                continue
            event = feedback.from_delivered(self.settings, report.data, report.label, report.user,
                                            extra={"via": "imap", "report_id": report.name}, now=report.reported_at)
            if len(events.encode(event)) + len(event.key) > RECORD_MAX:
                self._set_aside(path, f"the feedback event would be above the record limit ({RECORD_MAX} bytes)")
                continue
            batch.append((path, event))
        if not batch:
            return 0
        feedback.publish(self.settings, [("feedback", event) for _, event in batch])
        for path, event in batch:
            self.spool.remove(path)
            metrics.MESSAGES.labels(STAGE, "", f"reported_{event.label}").inc()
        return len(batch)

    def _set_aside(self, path: Path, reason: str) -> None:
        bad = self.spool.set_aside(path, reason)
        metrics.MESSAGES.labels(STAGE, "", "set_aside").inc()
        metrics.ERRORS.labels(STAGE, "bad_report").inc()
        log.error("report set aside", extra={"file": str(bad), "reason": reason})

    def run(self, service: Service) -> None:
        """Drain until ``service.stopping`` is set."""
        backoff = RETRY_S
        while not service.stopping.is_set():
            try:
                published = self.once()
            except Exception as e:  # the broker (FeedbackError), the spool's disk, the quarantine: retry
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                self.last_error = str(e)
                metrics.ERRORS.labels(STAGE, "broker" if isinstance(e, feedback.FeedbackError) else "spool").inc()
                service.log.warning("reports not published; retrying",
                                    extra={"error": repr(e), "retry_in_s": backoff})
                service.stopping.wait(backoff)
                backoff = min(2 * backoff, RETRY_MAX_S)
                continue
            if published:
                if self.failing_since is not None:
                    service.log.info("reports published again",
                                     extra={"after_s": round(time.monotonic() - self.failing_since, 1)})
                self.failing_since = None
                backoff = RETRY_S
                service.log.info("reports published", extra={"reports": published})
                continue  # there may be more waiting
            self.failing_since = None
            service.stopping.wait(POLL_S)


def serve(service: Service) -> None:
    drain = Drain(service.settings)
    service.checks.append(drain.problem)
    service.log.info("draining reports", extra={"spool": str(drain.spool.root),
                                                "topic": service.settings.topic("feedback")})
    service.ready.set()
    try:
        drain.run(service)
    finally:
        service.close()
