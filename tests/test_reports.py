"""Users' Junk moves as feedback, without the mail programs: reading a copy back from the mail
store, the report spool and its pipe program, the drain on the real broker.
(tests/test_mailsystem.py runs the same path with Dovecot's IMAPSieve in front.)"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from pipeline import feedback, kafka
from pipeline.core import events
from pipeline.core.config import Settings
from pipeline.core.events import Envelope
from pipeline.reports import spool as spool_mod
from pipeline.reports.drain import Drain
from pipeline.reports.spool import Spool, SpoolError
from pipeline.sinks import stamp, unstamp_delivered
from pipeline.sinks.quarantine import Quarantine
from tests.kafka_helpers import consume_n
from tests.worker_helpers import classified

RAW = (b"Received: from mail.sender.test (unknown [192.0.2.7])\r\n"
       b"\tby mx.floodgate.test (Postfix) with ESMTP id 4Xyz\r\n"
       b"From: Alice <alice@sender.test>\r\nTo: bob@example.com\r\nSubject: hello\r\n"
       b"X-Floodgate-Trace: event=00000000000000000000000000000000; lane=forged\r\n\r\nHi Bob.\r\n")
# What Dovecot's LMTP puts on top of what it was handed (lmtp_add_received_header, lmtp_hdr_delivery_address).
DOVECOT = (b"Return-Path: <alice@sender.test>\r\nDelivered-To: bob@example.com\r\n"
           b"Received: from floodgate.localdomain ([127.0.0.1])\r\n\tby mail with LMTP\r\n"
           b"\tid 2GhNEtQpEWuHLwAAg+zDdQ\r\n"
           b"\t(envelope-from <alice@sender.test>)\r\n\tfor <bob@example.com>; Thu, 03 Dec 2026 08:35:32 +0000\r\n")


def _ham() -> events.MailEvent:
    event = events.new_event(Envelope("alice@sender.test", ("bob@example.com",), "192.0.2.7", "mail.sender.test"), RAW)
    return replace(event.classified("ham", 0.0123, "m-7"), lane="priority")


# --- reading a delivered copy back ------------------------------------------------------------------


@pytest.mark.parametrize("on_top", [DOVECOT, b"", DOVECOT.replace(b"\r\n", b"\n")], ids=["dovecot", "maildir", "lf"])
def test_a_copy_read_back_gives_our_headers_and_the_exact_original(on_top: bytes) -> None:
    event = _ham()
    stamped = stamp(event)
    if b"\n" in on_top and b"\r\n" not in on_top:
        stamped = stamped.replace(b"\r\n", b"\n")
    headers, raw = unstamp_delivered(on_top + stamped)
    assert raw == (event.raw if on_top != DOVECOT.replace(b"\r\n", b"\n") else event.raw.replace(b"\r\n", b"\n"))
    assert f"event={event.id}" in headers["x-floodgate-trace"]  # ours, not the sender's forged one below


def test_a_message_floodgate_never_stamped_comes_back_whole() -> None:
    forged = DOVECOT + b"X-Floodgate-Score: 0.0 (model x)\r\nSubject: no trace below the score\r\n\r\nbody\r\n"
    unstamped = DOVECOT + RAW
    assert unstamp_delivered(unstamped) == ({}, unstamped)
    # a score line alone is taken off (as unstamp does), never a sender's trace further down
    headers, _ = unstamp_delivered(forged)
    assert "x-floodgate-trace" not in headers
    assert unstamp_delivered(b"Return-Path: <a@b>") == ({}, b"Return-Path: <a@b>")  # no line end at all


def test_feedback_from_a_delivered_copy_carries_the_event_id_and_the_original(settings: Settings) -> None:
    event = _ham()
    fb = feedback.from_delivered(settings, DOVECOT + stamp(event), "spam", "bob@example.com", extra={"via": "imap"})
    assert (fb.id, fb.label, fb.raw, fb.verdict, fb.score, fb.model_version, fb.lane) == (
        event.id, "spam", event.raw, "ham", 0.0123, "m-7", "priority")
    assert fb.extra == {"feedback": "user-report", "by": "bob@example.com", "via": "imap"}
    # The mail store's Return-Path is not Floodgate's record: no envelope, so no sender standing moves.
    assert fb.envelope == Envelope("", ())
    assert abs(fb.accepted_at - event.accepted_at) < 0.001
    with pytest.raises(feedback.FeedbackError):
        feedback.from_delivered(settings, stamp(event), "maybe")


def test_feedback_on_a_message_without_our_headers_is_by_content(settings: Settings) -> None:
    fb = feedback.from_delivered(settings, RAW, "spam", "bob@example.com", now=1234.5)
    assert fb.id == feedback.content_id(RAW) == feedback.content_id(RAW.replace(b"\r\n", b"\n"))
    assert (fb.raw, fb.source, fb.verdict, fb.accepted_at) == (RAW, "report", None, 1234.5)
    assert len(fb.id) == 32 and fb.id != feedback.content_id(RAW + b"x")


def test_feedback_on_a_released_message_takes_the_quarantines_envelope(settings: Settings) -> None:
    spam = classified("spam")
    store = Quarantine(settings.paths.quarantine_db)
    try:
        store.add([spam])
    finally:
        store.close()
    fb = feedback.from_delivered(settings, DOVECOT + stamp(spam), "ham", "bob@example.com")
    assert (fb.id, fb.envelope, fb.raw, fb.label) == (spam.id, spam.envelope, spam.raw, "ham")


# --- the spool and its pipe program ------------------------------------------------------------------


def test_the_spool_keeps_reports_in_order_durably_and_readable_by_the_group(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "spool")
    first = sp.write("spam", "bob@example.com", b"one")
    second = sp.write("ham", "bob@example.com", b"two")
    assert sp.pending() == [first, second] and sp.pending(1) == [first]
    assert not list((sp.root / "tmp").iterdir())
    assert stat.S_IMODE(first.stat().st_mode) == spool_mod.FILE_MODE
    assert stat.S_IMODE((sp.root / "new").stat().st_mode) == spool_mod.DIR_MODE
    report = sp.read(second)
    assert (report.label, report.user, report.data, report.truncated) == ("ham", "bob@example.com", b"two", False)
    (sp.root / "new" / "zz-garbage").write_bytes(b"not a report\n")
    with pytest.raises(SpoolError):
        sp.read(sp.root / "new" / "zz-garbage")
    cut = sp.write("spam", "", b"whole")
    cut.write_bytes(cut.read_bytes()[:-2])  # a report whose end is missing
    with pytest.raises(SpoolError, match="incomplete"):
        sp.read(cut)


def test_the_pipe_program_runs_on_the_standard_library_alone_and_fast(tmp_path: Path) -> None:
    """What Dovecot runs as the mail user: the spool module as a file under an isolated Python
    (-I -S: no site-packages, no Floodgate installed), the message on stdin."""
    sp = Spool(tmp_path / "spool")
    message = DOVECOT + stamp(_ham())
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-I", "-S", spool_mod.__file__, "spam", "bob@example.com",
                           "--spool", str(sp.root)], input=message, capture_output=True, timeout=30)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    [path] = sp.pending()
    assert sp.read(path).data == message and path.name.endswith(".spam")
    # Tens of milliseconds on a quiet machine; the user's MOVE waits for it, Dovecot for at most 10 s.
    assert took < 5.0, f"the pipe program took {took:.2f}s; the user's MOVE waits for it"
    # A spool it cannot write: exit 75 (EX_TEMPFAIL) with the reason, which Dovecot logs.
    blocked = tmp_path / "file"
    blocked.write_text("")
    proc = subprocess.run([sys.executable, "-I", "-S", spool_mod.__file__, "ham", "--spool", str(blocked)],
                          input=b"x", capture_output=True, timeout=30)
    assert proc.returncode == spool_mod.EX_TEMPFAIL and b"could not spool the ham report" in proc.stderr


def test_a_message_above_the_record_limit_is_spooled_marked_and_set_aside(tmp_path: Path, settings: Settings,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_mod, "SPOOL_MAX_BYTES", 10)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"0123456789abcdef")))
    sp = Spool(tmp_path / "spool")
    assert spool_mod.main(["spam", "bob", "--spool", str(sp.root)]) == 0
    [path] = sp.pending()
    assert sp.read(path).truncated and sp.read(path).data == b"0123456789"
    drain = Drain(replace(settings, paths=replace(settings.paths, report_spool=sp.root)))
    assert drain.once() == 0  # nothing published, nothing waiting any more
    [bad] = sp.bad()
    assert bad.name == path.name and "record limit" in (sp.root / "bad" / (bad.name + ".reason")).read_text()


# --- the drain, on the real broker ------------------------------------------------------------------


def _feedback(settings: Settings, n: int) -> list[events.MailEvent]:
    c = kafka.consumer(settings, settings.group("test-reports"))
    topic = settings.topic("feedback")
    c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        return [events.decode(m.value()) for m in consume_n(c, n)]
    finally:
        c.close()


@pytest.mark.kafka
def test_the_drain_publishes_in_order_and_removes_only_what_the_broker_acknowledged(
        topic_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = replace(topic_settings, paths=replace(topic_settings.paths, report_spool=tmp_path / "spool"))
    sp = Spool(settings.paths.report_spool)
    ham = _ham()
    sp.write("spam", "bob@example.com", DOVECOT + stamp(ham))
    sp.write("ham", "bob@example.com", DOVECOT + stamp(ham))
    sp.write("spam", "carol@example.net", RAW)
    (sp.root / "new" / "zz-not-a-report").write_bytes(b"junk")
    names = [p.name for p in sp.pending()][:3]

    # The broker away: nothing is removed, the drain says why it is not ready.
    monkeypatch.setattr(feedback, "ACK_TIMEOUT_S", 1.0)
    away = replace(settings, kafka=replace(settings.kafka, bootstrap_servers="127.0.0.1:1"))
    drain = Drain(away, sp)
    with pytest.raises(feedback.FeedbackError):
        drain.once()
    assert [p.name for p in sp.pending()] == names  # the junk file went to bad/, the reports wait
    assert [p.name for p in sp.bad()] == ["zz-not-a-report"]

    monkeypatch.undo()
    drain = Drain(settings, sp)
    assert drain.once() == 3 and sp.pending() == [] and drain.problem() is None
    got = _feedback(settings, 3)
    assert [(e.id, e.label, e.extra["by"], e.extra["report_id"]) for e in got] == [
        (ham.id, "spam", "bob@example.com", names[0]), (ham.id, "ham", "bob@example.com", names[1]),
        (feedback.content_id(RAW), "spam", "carol@example.net", names[2])]
    assert all(e.raw == RAW and e.extra["via"] == "imap" for e in got)


def test_floodgate_report_is_installed_as_a_console_script() -> None:
    script = Path(sys.executable).parent / "floodgate-report"
    assert script.exists() and os.access(script, os.X_OK)
