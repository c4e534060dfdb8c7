"""The quarantine store, releases and reports (feedback on the real broker), and the operator commands."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time
import uuid
from dataclasses import replace
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from pipeline import deliver, feedback, kafka
from pipeline.cli import app
from pipeline.core import config, events
from pipeline.sinks import maildir, stamp
from pipeline.sinks.quarantine import DAY_S, Quarantine, Search, subject_of
from tests.kafka_helpers import consume_n, wait_for
from tests.worker_helpers import classified, delivered_files, end_offsets, event_ids, group_lag, running

NOW = 1_800_000_000.0


def _read(settings, topic_key: str, n: int) -> list[events.MailEvent]:
    consumer = kafka.consumer(settings, f"read-{uuid.uuid4().hex}")
    consumer.subscribe([settings.topic(topic_key)])
    try:
        return [events.decode(m.value()) for m in consume_n(consumer, n)]
    finally:
        consumer.close()


@pytest.fixture
def store(tmp_path):
    q = Quarantine(tmp_path / "q.sqlite3")
    yield q
    q.close()


def test_add_is_idempotent_and_purge_removes_old_rows_only(store):
    old = [classified("spam", i) for i in range(3)]
    new = [classified("spam", i) for i in range(3, 5)]
    assert store.add(old, now=NOW - 31 * DAY_S) == {e.id for e in old}
    assert store.add(new + old, now=NOW) == {e.id for e in new}
    assert store.count() == 5
    assert store.purge(30, now=NOW) == 3
    assert {e.event_id for e in store.entries()} == {e.id for e in new}
    assert store.purge(30, now=NOW) == 0


def test_a_claim_gives_a_message_to_one_release_for_its_lease(store):
    event, other = classified("spam", 1), classified("spam", 2)
    store.add([event, other])
    first = store.claim(event.id, "ops", 120, now=NOW)
    assert first and store.entry(event.id).claimed_by == "ops"
    assert store.claim(event.id, "lead", 120, now=NOW + 119) is None  # held
    # The first release died: once its lease is over, another takes the message over...
    second = store.claim(event.id, "lead", 120, now=NOW + 120)
    assert second and second != first
    # ...and the first can neither mark it nor give it back any more.
    assert not store.mark_released(event.id, "ops", now=NOW + 121, claim=first)
    assert not store.unclaim(event.id, first)
    assert store.mark_released(event.id, "lead", now=NOW + 121, claim=second)
    assert store.entry(event.id).released_by == "lead"
    assert store.claim(event.id, "ops", 120, now=NOW + 10_000) is None  # released: never again
    # A release that failed gives its claim back: the next need not wait for the lease.
    failed = store.claim(other.id, "ops", 120, now=NOW)
    assert failed and store.unclaim(other.id, failed)
    assert store.claim(other.id, "ops", 120, now=NOW + 1)
    assert store.claim("0" * 32, "ops", 120) is None


# Version 1 of the schema: the raw message inside the summary table; ``claims`` adds the columns
# of releases' claims (a file from before them lacks them).
V1_SCHEMA = """
CREATE TABLE quarantine (event_id TEXT PRIMARY KEY, accepted_at REAL NOT NULL, quarantined_at REAL NOT NULL,
    mail_from TEXT NOT NULL, rcpt_to TEXT NOT NULL, client_address TEXT NOT NULL, score REAL, model_version TEXT,
    subject TEXT NOT NULL, size INTEGER NOT NULL, meta BLOB NOT NULL, raw BLOB NOT NULL, released_at REAL,
    released_by TEXT{claims});
CREATE INDEX quarantine_by_time ON quarantine (quarantined_at);
"""
V1_CLAIMS = ", claim TEXT, claimed_at REAL, claimed_by TEXT"


@pytest.mark.parametrize("claims", ["", V1_CLAIMS], ids=["before-claims", "with-claims"])
def test_a_version_1_file_is_converted_with_every_message_and_its_state(tmp_path, claims):
    path = tmp_path / "v1.sqlite3"
    held, released = classified("spam", 1, rcpt=("Bob@Example.com", "carol@example.com")), classified("spam", 2)
    old = sqlite3.connect(path)
    old.executescript(V1_SCHEMA.format(claims=claims))
    for i, e in enumerate((held, released)):
        old.execute("INSERT INTO quarantine (event_id, accepted_at, quarantined_at, mail_from, rcpt_to, client_address,"
                    " score, model_version, subject, size, meta, raw, released_at, released_by)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (e.id, e.accepted_at, NOW + i, e.envelope.mail_from,
                     orjson.dumps(list(e.envelope.rcpt_to)).decode(), e.envelope.client_address, e.score,
                     e.model_version, subject_of(e.raw), len(e.raw),
                     events.encode(e).partition(b"\n")[0], e.raw, NOW + 9 if i else None, "ops" if i else None))
    old.commit()
    old.close()
    q = Quarantine(path)
    try:
        assert q.count() == 2 and q.event(held.id) == held and q.raw(released.id) == released.raw
        assert q.entry(released.id).released_by == "ops" and q.entry(held.id).released_at is None
        assert [e.event_id for e in q.search(Search(recipients=("bob@example.com",)), 10).entries] == [held.id]
        assert {r[0] for r in q.db.execute("SELECT name FROM sqlite_master")} >= {
            "quarantine", "quarantine_message", "quarantine_recipient", "quarantine_digest"}
        assert "raw" not in {r["name"] for r in q.db.execute("PRAGMA table_info(quarantine)")}
        assert q.claim(held.id, "ops", 120) and q.entry(held.id).claimed_by == "ops"
    finally:
        q.close()
    Quarantine(path).close()  # opened again: nothing left to convert


def test_search_filters_pages_and_counts(store):
    rows = []
    for i in range(30):
        e = classified("spam", i, rcpt=(f"user{i % 3}@example.com",), subject=f"offer {i} 100%_off")
        e = replace(e, envelope=replace(e.envelope, mail_from=f"s{i % 5}@spam.test"), score=i / 30,
                    model_version="v2" if i % 2 else "v1")
        store.add([e], now=NOW + i)
        rows.append(e)
    newest_first = [e.id for e in reversed(rows)]
    # Pages: keyset cursors, newest first, each row once, the last page says so.
    seen, after = [], None
    while True:
        page = store.search(Search(state="all"), 7, after)
        seen += [e.event_id for e in page.entries]
        if page.next is None:
            break
        after = page.next
    assert seen == newest_first

    def ids(**query) -> set[str]:
        return {e.event_id for e in store.search(Search(state="all", **query), 100).entries}

    assert ids(recipient="USER1@") == {e.id for i, e in enumerate(rows) if i % 3 == 1}
    assert ids(recipients=("User1@Example.com", "user2@example.com")) == {e.id for i, e in enumerate(rows) if i % 3}
    assert ids(sender="s4@") == {e.id for i, e in enumerate(rows) if i % 5 == 4}
    assert ids(subject="offer 2") == {rows[2].id, *(rows[i].id for i in range(20, 30))}
    assert ids(subject="100%_") == {e.id for e in rows} and ids(subject="100%x") == set()  # % and _ are literal
    assert ids(score_min=0.5, score_max=0.6) == {e.id for i, e in enumerate(rows) if 0.5 <= i / 30 <= 0.6}
    assert ids(model_version="v2") == {e.id for i, e in enumerate(rows) if i % 2}
    assert ids(since=NOW + 10, until=NOW + 12) == {rows[10].id, rows[11].id}
    assert store.model_versions() == ["v2", "v1"]
    assert store.mark_released(rows[0].id, "ops")
    assert rows[0].id not in {e.event_id for e in store.search(Search(), 100).entries}
    assert {e.event_id for e in store.search(Search(state="released"), 100).entries} == {rows[0].id}
    assert store.count(Search()) == 29 and store.count(Search(), cap=10) == 11 and store.count() == 30
    with pytest.raises(ValueError, match="state"):
        store.search(Search(state="nope"))


def test_delete_needs_the_claim_and_purge_empties_every_table(store):
    a, b = classified("spam", 1), classified("spam", 2)
    store.add([a], now=NOW - 31 * DAY_S)
    store.add([b], now=NOW)
    releasing = store.claim(b.id, "ops", 120, now=NOW)
    assert store.claim(b.id, "lead", 120, now=NOW + 1) is None  # a release holds it: no delete either
    assert not store.delete(b.id, "not-the-claim")
    assert store.delete(b.id, releasing) and store.entry(b.id) is None and store.event(b.id) is None
    assert store.purge(30, now=NOW) == 1
    for table in ("quarantine", "quarantine_message", "quarantine_recipient"):
        assert store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table


def test_a_digest_window_is_planned_once_per_recipient_and_period(store):
    e = classified("spam", 1, rcpt=("Bob@example.com", "carol@example.com"))
    store.add([e], now=NOW)
    assert store.digest_recipients(NOW - 1, NOW + 1) == ["bob@example.com", "carol@example.com"]
    assert store.digest_recipients(NOW + 1, NOW + 2) == []
    assert store.last_digest_until("bob@example.com", "2027-01-15") is None
    assert store.plan_digest("BOB@example.com", "2027-01-15", 0, NOW + 1) == (0, NOW + 1, False)
    # A second run of the period gets the first run's window, and learns when it was sent.
    assert store.plan_digest("bob@example.com", "2027-01-15", 0, NOW + 5) == (0, NOW + 1, False)
    store.mark_digest_sent("bob@example.com", "2027-01-15")
    assert store.plan_digest("bob@example.com", "2027-01-15", 0, NOW + 9) == (0, NOW + 1, True)
    assert store.last_digest_until("bob@example.com", "2027-01-16") == NOW + 1
    assert store.last_digest_until("carol@example.com", "2027-01-16") is None
    assert [x.event_id for x in store.held_for("bob@example.com", 0, NOW + 1, 10)] == [e.id]
    assert store.held_for("bob@example.com", NOW + 1, NOW + 9, 10) == []


def test_released_once_only(store):
    event = classified("spam")
    store.add([event])
    assert store.mark_released(event.id, "ops", now=NOW)
    assert not store.mark_released(event.id, "ops", now=NOW + 1)
    entry = store.entry(event.id)
    assert entry.released_at == NOW and entry.released_by == "ops"
    assert store.entries(include_released=False) == []


@pytest.mark.parametrize(("raw", "subject"), [
    (b"Subject: plain\r\n\r\nbody", "plain"),
    (b"Subject: =?iso-8859-1?b?UOJ0ZQ==?=\r\n\r\n", "P\xe2te"),
    (b"Subject: " + b"x" * 5000 + b"\r\n\r\n", "x" * 200),
    (b"Subject: a\x00b\x1bc\r\n\r\n", "a b c"),
    (b"no headers at all", ""),
    (b"", ""),
    (b"Subject: =?utf-8?q?broken", "=?utf-8?q?broken"),
])
def test_subjects_are_decoded_cleaned_and_truncated(raw, subject):
    assert subject_of(raw) == subject


def test_release_requires_an_operator_and_the_token_when_one_is_set():
    with pytest.raises(feedback.FeedbackError, match="operator name is required"):
        feedback.authorize("  ", None, env={})
    feedback.authorize("ops", None, env={})
    with pytest.raises(feedback.FeedbackError, match="not authorized"):
        feedback.authorize("ops", None, env={feedback.TOKEN_ENV: "s3cret"})
    with pytest.raises(feedback.FeedbackError, match="not authorized"):
        feedback.authorize("ops", "s3cre", env={feedback.TOKEN_ENV: "s3cret"})
    feedback.authorize("ops", "s3cret", env={feedback.TOKEN_ENV: "s3cret"})


@pytest.mark.kafka
def test_release_reinjects_into_ham_with_feedback_and_is_delivered_once(topic_settings):
    s = topic_settings
    event = classified("spam", 1, rcpt=("bob@example.com",))
    other = classified("spam", 2)
    q = Quarantine(s.paths.quarantine_db)
    q.add([event, other])
    q.close()
    env = {feedback.TOKEN_ENV: "s3cret"}
    with pytest.raises(feedback.FeedbackError, match="not authorized"):
        feedback.release(s, event.id, "ops", "wrong", env=env)
    assert end_offsets(s, "ham") == 0

    released = feedback.release(s, event.id, "ops", "s3cret", env=env)
    [ham] = _read(s, "ham", 1)
    [record] = _read(s, "feedback", 1)
    assert ham == released
    assert (ham.id, ham.verdict, ham.source, ham.raw) == (event.id, "ham", "release", event.raw)
    assert (record.id, record.label, record.verdict, record.raw) == (event.id, "ham", "spam", event.raw)
    assert record.extra == {"feedback": "quarantine-release", "by": "ops"}

    with pytest.raises(feedback.FeedbackError, match="already released by ops"):
        feedback.release(s, event.id, "ops", "s3cret", env=env)
    with pytest.raises(feedback.FeedbackError, match="no quarantined message"):
        feedback.release(s, "0" * 32, "ops", "s3cret", env=env)
    assert end_offsets(s, "ham") == 1 and end_offsets(s, "feedback") == 1

    # Re-injected twice (a release that crashed before marking, then ran again): delivered once.
    feedback.publish(s, [("ham", released)])
    e2e = {"lane": "priority", "verdict": "ham"}
    e2e_before = REGISTRY.get_sample_value("floodgate_end_to_end_latency_seconds_count", e2e) or 0.0
    with running(s, deliver.build, "deliver"):
        wait_for(lambda: group_lag(s, s.group("deliver"), "ham") == 0, what="released mail consumed")
    assert event_ids(delivered_files(s.paths.maildir_root)) == [event.id]
    [path] = delivered_files(s.paths.maildir_root)
    assert path.read_bytes() == stamp(released)
    # An operator's delay is not the pipeline's: releases stay out of the end-to-end latency.
    assert (REGISTRY.get_sample_value("floodgate_end_to_end_latency_seconds_count", e2e) or 0.0) == e2e_before


def test_a_failed_release_gives_its_claim_back_and_a_dead_one_blocks_only_for_its_lease(settings, monkeypatch):
    s = settings
    event, other = classified("spam", 1), classified("spam", 2)
    q = Quarantine(s.paths.quarantine_db)
    q.add([event, other])
    # A release that died between its claim and its mark a lease ago, and one that is still running.
    q.claim(event.id, "crashed", feedback.RELEASE_LEASE_S, now=time.time() - feedback.RELEASE_LEASE_S - 1)
    q.claim(other.id, "running", feedback.RELEASE_LEASE_S)
    sent: list[list[tuple[str, events.MailEvent]]] = []
    monkeypatch.setattr(feedback, "publish", lambda _s, records: sent.append(records))
    with pytest.raises(feedback.FeedbackError, match=r"being released by running since .*not releasing it twice"):
        feedback.release(s, other.id, "ops", env={})
    assert sent == []  # nothing produced for a message another release holds
    feedback.release(s, event.id, "ops", env={})
    assert [[(t, e.id) for t, e in records] for records in sent] == [[("ham", event.id), ("feedback", event.id)]]
    assert q.entry(event.id).released_by == "ops"

    def refused(_s: object, _records: object) -> None:
        raise feedback.FeedbackError("the broker refused")

    third = classified("spam", 3)
    q.add([third])
    monkeypatch.setattr(feedback, "publish", refused)
    with pytest.raises(feedback.FeedbackError, match="refused"):
        feedback.release(s, third.id, "ops", env={})
    entry = q.entry(third.id)
    assert (entry.released_at, entry.claimed_at) == (None, None)  # free for the next release at once
    q.close()


@pytest.mark.kafka
def test_a_bulk_release_claims_each_message_and_produces_them_together(topic_settings):
    s = topic_settings
    a, b, done = (classified("spam", i, rcpt=(f"u{i}@example.com",)) for i in range(3))
    q = Quarantine(s.paths.quarantine_db)
    q.add([a, b, done])
    q.mark_released(done.id, "lead")
    q.close()
    outcomes = feedback.release_many(s, [a.id, done.id, "0" * 32, b.id, a.id], "ops", env={})
    assert [(o.event_id, o.ok) for o in outcomes] == [(a.id, True), (done.id, False), ("0" * 32, False), (b.id, True)]
    assert "already released by lead" in outcomes[1].error and "no quarantined message" in outcomes[2].error
    assert sorted(e.id for e in _read(s, "ham", 2)) == sorted([a.id, b.id])
    assert {e.extra["feedback"] for e in _read(s, "feedback", 2)} == {"quarantine-release"}
    assert end_offsets(s, "ham") == 2 and end_offsets(s, "feedback") == 2  # one record each, no more


@pytest.mark.kafka
def test_a_recipients_own_release_is_their_report_and_delete_is_authorised_and_claimed(topic_settings):
    s = topic_settings
    mine, spam = classified("spam", 1, rcpt=("bob@example.com",)), classified("spam", 2)
    q = Quarantine(s.paths.quarantine_db)
    q.add([mine, spam])
    q.close()
    feedback.release(s, mine.id, "bob@example.com", env={}, by_recipient=True)
    [record] = _read(s, "feedback", 1)
    assert record.extra == {"feedback": feedback.USER_RELEASE_FEEDBACK, "by": "bob@example.com"}
    with pytest.raises(feedback.FeedbackError, match="not authorized"):
        feedback.delete(s, spam.id, "ops", "guess", env={feedback.TOKEN_ENV: "s3cret"})
    with pytest.raises(feedback.FeedbackError, match="already released"):
        feedback.delete(s, mine.id, "ops", env={})  # released mail is kept for the record until purged
    feedback.delete(s, spam.id, "ops", "s3cret", env={feedback.TOKEN_ENV: "s3cret"})
    q = Quarantine(s.paths.quarantine_db)
    assert q.entry(spam.id) is None and q.event(spam.id) is None and q.count() == 1
    q.close()
    with pytest.raises(feedback.FeedbackError, match="no quarantined message"):
        feedback.delete(s, spam.id, "ops", env={})
    assert end_offsets(s, "ham") == 1  # a delete produces nothing


def _release_racer(env: dict[str, str], event_ids: list[str], by: str, start: Any, results: Any) -> None:
    """One operator's process: at each start signal, ``floodgate quarantine release`` one message."""
    runner = CliRunner()
    for event_id in event_ids:
        start.wait(120)
        result = runner.invoke(app, ["quarantine", "release", event_id, "--by", by, "--token", "s3cret"], env=env)
        results.put((event_id, by, result.exit_code, result.stdout, result.output))


@pytest.mark.kafka
def test_concurrent_releases_of_one_message_release_it_once(topic_settings):
    s = topic_settings
    held = [classified("spam", i, rcpt=("bob@example.com",)) for i in range(3)]
    q = Quarantine(s.paths.quarantine_db)
    q.add(held)
    q.close()
    env = config.environment(s) | {feedback.TOKEN_ENV: "s3cret"}
    ids = [e.id for e in held]
    # Three processes, each releasing every message, all three at once (a barrier per message).
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(3), ctx.Queue()
    racers = [ctx.Process(target=_release_racer, args=(env, ids, f"ops{i}", start, results)) for i in range(3)]
    for p in racers:
        p.start()
    answers = [results.get(timeout=180) for _ in range(3 * len(ids))]
    for p in racers:
        p.join(30)
        assert p.exitcode == 0
    raced = 0
    for event_id in ids:
        mine = [a for a in answers if a[0] == event_id]
        released = [a for a in mine if a[2] == 0]
        assert len(released) == 1, mine
        assert released[0][3].startswith(f"released {event_id} to delivery")
        for _id, _by, _code, _stdout, output in (a for a in mine if a[2] != 0):
            assert "being released by" in output or "already released by" in output, output
            raced += "being released by" in output
        # The row names the one release that did it.
        q = Quarantine(s.paths.quarantine_db)
        assert q.entry(event_id).released_by == released[0][1]
        q.close()
    print(f"{raced} of {2 * len(ids)} refused releases met a release in progress")
    # One ham record and one feedback record per message.
    assert end_offsets(s, "ham") == len(ids) and end_offsets(s, "feedback") == len(ids)
    assert sorted(e.id for e in _read(s, "feedback", len(ids))) == sorted(ids)
    assert sorted(e.id for e in _read(s, "ham", len(ids))) == sorted(ids)


@pytest.mark.kafka
def test_reports_find_the_message_in_the_quarantine_or_the_maildirs(topic_settings):
    s = topic_settings
    spam = classified("spam", 1)
    q = Quarantine(s.paths.quarantine_db)
    q.add([spam])
    q.close()
    ham = classified("ham", 2, rcpt=("bob@example.com",))
    maildir.deliver(maildir.mailbox_path(s.paths.maildir_root, "bob@example.com"), maildir.file_name(ham), stamp(ham))

    feedback.report(s, spam.id, "ham", by="bob@example.com")
    feedback.report(s, ham.id, "spam", by="bob@example.com")
    with pytest.raises(feedback.FeedbackError, match="neither in the quarantine nor in any Maildir"):
        feedback.report(s, "f" * 32, "spam")
    with pytest.raises(feedback.FeedbackError, match="label must be"):
        feedback.report(s, ham.id, "phishing")
    got = {e.id: e for e in _read(s, "feedback", 2)}
    assert got[spam.id].label == "ham" and got[spam.id].raw == spam.raw
    from_maildir = got[ham.id]
    assert from_maildir.label == "spam" and from_maildir.raw == ham.raw  # our headers taken off again
    assert from_maildir.extra == {"feedback": "user-report", "by": "bob@example.com"}
    assert (from_maildir.score, from_maildir.model_version, from_maildir.lane) == (0.04, "test-1", "priority")
    assert from_maildir.accepted_at == pytest.approx(ham.accepted_at, abs=0.001)


@pytest.mark.kafka
def test_operator_commands(topic_settings, tmp_path):
    s = topic_settings
    big = classified("spam", 1, subject="Cheap pills")
    big = events.MailEvent(**{**{f: getattr(big, f) for f in big.__dataclass_fields__},
                              "raw": b"X-Evil: \x1b]0;owned\x07\x1b[2J\r\n" + big.raw + b"BODYLINE\r\n" * 20_000})
    small = classified("spam", 2, subject="Old news")
    q = Quarantine(s.paths.quarantine_db)
    q.add([small], now=time.time() - 40 * DAY_S)  # longer ago than the retention
    q.add([big])
    q.close()
    env = config.environment(s) | {feedback.TOKEN_ENV: "s3cret"}
    runner = CliRunner()

    def run(*args: str, code: int = 0):
        result = runner.invoke(app, list(args), env=env)
        assert result.exit_code == code, result.output
        return result

    listed = [orjson.loads(line) for line in run("quarantine", "list", "--json").stdout.splitlines()]
    assert [e["event_id"] for e in listed] == [big.id, small.id]
    assert listed[0]["subject"] == "Cheap pills" and "raw" not in listed[0]
    assert "2 message(s)" in run("quarantine", "list").stdout

    shown = run("quarantine", "show", big.id).stdout
    assert "Subject: Cheap pills" in shown and shown.splitlines()[0].split() == ["event:", big.id]
    assert "BODYLINE" not in shown and "body not shown" in shown
    assert "X-Evil: ?]0;owned??[2J" in shown  # no terminal escape reaches the operator's screen
    assert run("quarantine", "show", big.id, "--raw").stdout_bytes == big.raw
    assert "no quarantined message" in run("quarantine", "show", "nope", code=1).output

    assert "--token does not match" in run("quarantine", "release", big.id, "--by", "ops", code=1).output
    assert "released" in run("quarantine", "release", big.id, "--by", "ops", "--token", "s3cret").stdout
    assert "already released" in run("quarantine", "release", big.id, "--by", "ops", "--token", "s3cret",
                                      code=1).output
    assert end_offsets(s, "ham") == 1

    assert "purged 1 message(s)" in run("quarantine", "purge").stdout  # retention: 30 days by default
    assert [e["event_id"] for e in map(orjson.loads, run("quarantine", "list", "--json").stdout.splitlines())] == [
        big.id]
    assert "purged 0 message(s)" in run("quarantine", "purge", "--older-than", "1").stdout

    assert "reported" in run("report", "spam", big.id, "--by", "carol").stdout
    assert end_offsets(s, "feedback") == 2  # the release's and the report's
