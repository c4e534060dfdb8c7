"""floodgate digest: one mail per recipient and period with signed links, delivered by Floodgate's
own delivery, once however often it runs."""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline import deliver, digest, feedback, reputation
from pipeline.core import config, events
from pipeline.sinks import unstamp
from pipeline.sinks.quarantine import Quarantine
from pipeline.web.security import Signer
from tests.kafka_helpers import wait_for
from tests.worker_helpers import classified, delivered_files, end_offsets, group_lag, running

DAY = datetime(2027, 1, 15, 7, 30, tzinfo=UTC).timestamp()  # a Friday morning
SECRET = "digest-test-secret-" + "y" * 32
LINK = re.compile(r"http://127\.0\.0\.1:8025/u/([A-Za-z0-9_.-]+)")


def with_secret(s: config.Settings) -> config.Settings:
    return replace(s, web=replace(s.web, secret_key=SECRET))


def test_periods_are_utc_days_hours_and_iso_weeks() -> None:
    day = digest.period_of("day", DAY)
    assert (day.name, day.end - day.start) == ("2027-01-15", 86_400)
    assert datetime.fromtimestamp(day.start, UTC) == datetime(2027, 1, 15, tzinfo=UTC)
    assert digest.period_of("hour", DAY).name == "2027-01-15T07"
    week = digest.period_of("week", DAY)
    assert week.name == "2027-W02" and datetime.fromtimestamp(week.start, UTC) == datetime(2027, 1, 11, tzinfo=UTC)
    with pytest.raises(digest.DigestError, match="period"):
        digest.period_of("fortnight", DAY)
    assert digest.event_id("bob@example.com", "2027-01-15") == digest.event_id("bob@example.com", "2027-01-15")
    assert digest.event_id("bob@example.com", "2027-01-16") != digest.event_id("bob@example.com", "2027-01-15")


def test_a_digest_lists_the_held_mail_as_text_with_links_the_web_worker_accepts(tmp_path: Path) -> None:
    s = with_secret(config.private(config.load(env={}), "d", tmp_path))
    hostile_subject = "Verify\r\nBcc: everyone@example.com\x1b[2J\u202eevil " + "x" * 300
    held = classified("spam", 1, subject="ok")
    held = replace(held, envelope=replace(held.envelope, mail_from="phish@\r\nX-Injected: 1"))
    store = Quarantine(s.paths.quarantine_db)
    store.add([held], now=DAY - 60)
    [entry] = store.held_for("bob@example.com", 0, DAY, 10)
    entry = replace(entry, subject=hostile_subject)
    store.close()
    signer = Signer(s.web, SECRET)
    link = signer.link(["bob@example.com"])
    raw = digest.compose(s, "bob@example.com", digest.period_of("day", DAY), [entry], 3, link, DAY + 7 * 86_400)
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "3 messages held for you (2027-01-15)" and msg["To"] == "bob@example.com"
    assert msg["Auto-Submitted"] == "auto-generated" and msg["Bcc"] is None and msg["X-Injected"] is None
    body = msg.get_content()
    assert "\x1b" not in body and "\u202e" not in body and "\r" not in body.replace("\r\n", "")
    assert "… and 2 more." in body and "subject: Verify Bcc: everyone@example.com" in body
    assert max(len(line) for line in body.splitlines() if line.startswith("  subject:")) < 110
    tokens = LINK.findall(body)
    assert tokens and {signer.addresses(t.split("/")[0]) for t in tokens} == {("bob@example.com",)}
    assert f"/m/{held.id}" in body


def test_digest_needs_the_secret_key(tmp_path: Path) -> None:
    s = config.private(config.load(env={}), "d", tmp_path)
    with pytest.raises(digest.DigestError, match="secret_key"):
        digest.run(s, now=DAY)


def test_a_digest_never_counts_towards_a_senders_standing() -> None:
    event = events.MailEvent(id=digest.event_id("bob@example.com", "p"), accepted_at=DAY,
                             envelope=events.Envelope("", ("bob@example.com",)), raw=b"x", source=digest.SOURCE,
                             verdict="ham")
    assert reputation.observations(event, feedback=False) == "no_sender"


@pytest.mark.kafka
def test_digests_are_delivered_once_per_recipient_and_period(topic_settings: config.Settings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    s = with_secret(topic_settings)
    bob = [classified("spam", i, rcpt=("bob@example.com",)) for i in range(3)]
    carol = classified("spam", 9, rcpt=("carol@example.com",))
    gone = classified("spam", 10, rcpt=("dave@example.com",))
    store = Quarantine(s.paths.quarantine_db)
    store.add([*bob, carol, gone], now=DAY - 3600)
    store.mark_released(gone.id, "ops")  # dave has nothing held: no digest
    store.close()

    # The broker refuses the first run: nothing is marked sent, the plans stay.
    def refused(_s: object, _records: object) -> None:
        raise feedback.FeedbackError("the broker refused")

    monkeypatch.setattr(feedback, "publish", refused)
    with pytest.raises(digest.DigestError, match="next run"):
        digest.run(s, now=DAY)
    monkeypatch.undo()
    # More spam for bob after that run: the next run of the day sends the planned window, the same digest.
    store = Quarantine(s.paths.quarantine_db)
    late = classified("spam", 11, rcpt=("bob@example.com",))
    store.add([late], now=DAY + 60)
    store.close()
    first = digest.run(s, now=DAY + 120)
    assert (first.period, first.sent, first.already, first.messages) == ("2027-01-15", 2, 0, 4)
    again = digest.run(s, now=DAY + 3600)
    assert (again.sent, again.already) == (0, 2)
    assert end_offsets(s, "ham") == 2
    with running(s, deliver.build, "deliver"):
        wait_for(lambda: len(delivered_files(s.paths.maildir_root)) == 2, what="digests delivered")
        # The same digest produced again (a run that died after the acknowledgement): still one copy.
        feedback.publish(s, [("ham", events.MailEvent(
            id=digest.event_id("carol@example.com", "2027-01-15"), accepted_at=digest.period_of("day", DAY).start,
            envelope=events.Envelope("", ("carol@example.com",)), raw=b"Subject: again\r\n\r\nagain\r\n",
            source=digest.SOURCE, lane="priority", verdict="ham"))])
        wait_for(lambda: group_lag(s, s.group("deliver"), "ham") == 0, what="repeat consumed")
    files = delivered_files(s.paths.maildir_root)
    assert len(files) == 2
    by_rcpt = {f.parent.parent.name.split(".")[0]: email.message_from_bytes(unstamp(f.read_bytes())[1],
                                                                            policy=email.policy.default)
               for f in files}
    assert set(by_rcpt) == {"bob", "carol"}
    bob_body = by_rcpt["bob"].get_content()
    assert all(e.id in bob_body for e in bob) and late.id not in bob_body  # the planned window, not a new one
    assert by_rcpt["carol"]["Subject"] == "1 message held for you (2027-01-15)"
    # The next day: bob's window starts where his last digest ended, so only the late message.
    next_day = digest.run(s, now=DAY + 86_400)
    assert (next_day.period, next_day.sent, next_day.messages) == ("2027-01-16", 1, 1)
