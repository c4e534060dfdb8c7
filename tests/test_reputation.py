"""``floodgate reputation``: the standing rule, and the Faust worker on the real broker.

The worker runs as a subprocess (``python -m pipeline.cli reputation``) with the test's private
topic and group prefixes; the test reads the compacted reputation topic as triage would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import faust
import orjson
import pytest
from confluent_kafka import TopicPartition

from pipeline import kafka
from pipeline.core import config, events, senders
from pipeline.core.config import ROOT, Settings
from pipeline.node import free_port
from pipeline.reputation import (
    AGREEMENT_REPORTERS,
    AGREEMENT_SPAN_S,
    ANONYMOUS,
    GOOD_MIN_HAM,
    REPORTERS_KEPT,
    TRAFFIC_WINDOW_S,
    Agreement,
    Replays,
    aggregate,
    aggregate_reports,
    broker_credentials,
    decode_observation,
    encode_observation,
    internal_topics,
    is_good,
    observations,
    observations_topic,
    parse_observation,
    reporter_id,
    standing_of,
    store_url,
    tally,
)
from tests.kafka_helpers import consume_n, wait_for
from tests.worker_helpers import partition_lags

# Faust's worker starts in a few seconds here, but creating internal topics, joining the group
# and recovering tables can take much longer on a loaded machine.
START_TIMEOUT_S = 120.0
STEP_TIMEOUT_S = 60.0


# -- the rule, pure ---------------------------------------------------------------------------

def test_verdicts_make_a_sender_good_after_enough_ham_with_little_spam():
    assert not is_good(GOOD_MIN_HAM - 1, 0, 0, 0)
    assert is_good(GOOD_MIN_HAM, 0, 0, 0)
    assert is_good(100, 5, 0, 0)          # 4.8 % spam
    assert not is_good(100, 6, 0, 0)      # 5.7 % spam
    assert not is_good(3, 30, 0, 0)


def test_feedback_outranks_verdicts():
    # Agreed ham reports (from 3 reporters over an hour; before the agreement rule, one release)
    # make a sender good whatever the classifier said.
    assert is_good(0, 50, AGREEMENT_REPORTERS, 0, span_s=AGREEMENT_SPAN_S)
    # Ham reporters must outnumber spam reporters (before: spam reports must not outnumber ham
    # reports, so 2 against 2 was good; now 3 against 3 is not).
    assert is_good(0, 0, 3, 2, span_s=AGREEMENT_SPAN_S)
    assert not is_good(0, 0, 3, 3, span_s=AGREEMENT_SPAN_S)
    assert not is_good(0, 0, 1, 2)
    assert not is_good(1000, 0, 0, 1)     # a spam report outranks any number of ham verdicts


def test_ham_reports_count_only_in_agreement():
    h = AGREEMENT_SPAN_S
    assert not is_good(0, 0, 1, 0, span_s=10 * h)                      # one reporter, however long
    assert not is_good(0, 0, AGREEMENT_REPORTERS, 0, span_s=h - 1)     # enough reporters, too fast
    assert not is_good(0, 0, AGREEMENT_REPORTERS - 1, 0, span_s=h)     # too few reporters
    assert is_good(0, 0, AGREEMENT_REPORTERS, 0, span_s=h)
    # Reports short of agreement leave the verdicts to decide, neither helping nor hurting.
    assert is_good(GOOD_MIN_HAM, 0, 1, 0) and not is_good(GOOD_MIN_HAM - 1, 0, 2, 0, span_s=h)
    # A revoked sender is not good by anything.
    assert not is_good(10 * GOOD_MIN_HAM, 0, REPORTERS_KEPT, 0, span_s=10 * h, revoked=True)
    # The rule's numbers are parameters (a test's short span); they must make sense.
    assert is_good(0, 0, 2, 0, span_s=5, rule=Agreement(2, 5))
    with pytest.raises(ValueError):
        Agreement(0, 5)


def _reports(entry: dict[str, Any], who_at: list[tuple[str, float]], kind: str = "feedback_ham",
             rule: Agreement | None = None) -> tuple[dict[str, Any], bool]:
    """An entry after reports from (reporter, record time) pairs, and whether it is good."""
    good = False
    for who, at in who_at:
        entry, good = tally(entry, kind, 1, who, at, rule=rule or Agreement())
    return entry, good


def test_one_reporter_or_a_burst_of_reporters_is_no_agreement():
    h = AGREEMENT_SPAN_S
    # One user's report; the same user a hundred times over a day; anonymous reports over a day.
    assert not _reports({}, [("u:1", 0.0)])[1]
    entry, good = _reports({}, [("u:1", i * 900.0) for i in range(100)])
    assert not good and entry["feedback_ham"] == 100 and entry["ham_reporters"] == ["u:1"]
    entry, good = _reports({}, [("", i * 900.0) for i in range(100)])
    assert not good and entry["ham_reporters"] == [ANONYMOUS]
    # Ten reporters within ten seconds.
    assert not _reports({}, [(f"u:{i}", 1000.0 + i) for i in range(10)])[1]
    # Three reporters over an hour: agreement. The span runs from the first to the latest *new*
    # reporter: the first reporter speaking again an hour later adds nothing.
    assert not _reports({}, [("u:1", 0.0), ("u:2", 1.0), ("u:3", 2.0), ("u:1", h + 2)])[1]
    entry, good = _reports({}, [("u:1", 0.0), ("u:2", h / 2), ("u:3", h)])
    assert good and (entry["ham_first_at"], entry["ham_last_at"]) == (0.0, h)
    # ...and spam reporters as many as the ham reporters veto it.
    entry, good = _reports(entry, [("u:7", h), ("u:8", h), ("u:9", h)], kind="feedback_spam")
    assert not good and entry["spam_reporters"] == ["u:7", "u:8", "u:9"]


def test_reporters_kept_are_bounded_and_old_entries_read_as_having_none():
    entry, _ = _reports({}, [(f"u:{i}", float(i)) for i in range(10 * REPORTERS_KEPT)])
    assert len(entry["ham_reporters"]) == REPORTERS_KEPT and entry["feedback_ham"] == 10 * REPORTERS_KEPT
    # Both sides full: contested, not good by feedback.
    entry, good = _reports(entry, [(f"s:{i}", 1e6) for i in range(10 * REPORTERS_KEPT)], kind="feedback_spam")
    assert not good and len(entry["spam_reporters"]) == REPORTERS_KEPT
    # An entry from before reporters were kept: its feedback count alone makes nothing good.
    legacy = {"ham": 0, "spam": 0, "feedback_ham": 1, "feedback_spam": 0, "good": True}
    entry, good = tally(legacy, "spam", 1)
    assert not good and entry["feedback_ham"] == 1


def test_a_revocation_sticks_until_restored():
    h = AGREEMENT_SPAN_S
    entry, good = _reports({}, [("u:1", 0.0), ("u:2", h / 2), ("o:3", h)])
    assert good
    entry, good = tally(entry, "revoke", 1, "ops", 2 * h)
    assert not good and (entry["decision"], entry["decision_by"], entry["decision_at"]) == ("revoke", "ops", 2 * h)
    entry, good = _reports(entry, [(f"u:{i}", 3 * h + i * h) for i in range(4, 10)])
    entry, good = tally(entry, "ham", 10 * GOOD_MIN_HAM)
    assert not good
    entry, good = tally(entry, "restore", 1, "lead", 20 * h)
    assert good and entry["decision"] == "restore"
    standing = standing_of("domain:x.example", entry, good, 99.0)
    assert (standing.ham_reporters, standing.ham_operators, standing.spam_reporters) == (9, 1, 0)
    assert (standing.reports_span_s, standing.decision, standing.decision_by, standing.revoked) == (
        12 * h, "restore", "lead", False)  # first at 0, the latest new reporter at 3h + 9h


def test_reporter_ids_hash_the_name_and_tell_operators_from_users():
    def fb(by: object, kind: str = "user-report") -> events.MailEvent:
        return replace(_event("a@x.example", label="ham"), extra={"feedback": kind, "by": by})

    user = reporter_id(fb("Bob@Example.com"))
    assert user == reporter_id(fb(" bob@example.com ")) and user.startswith("u:") and len(user) == 18
    assert "bob" not in user
    assert reporter_id(fb("bob@example.com", "quarantine-release")).startswith("o:")
    for nobody in ("", "  ", None, 7, ["x"]):
        assert reporter_id(fb(nobody)) == ANONYMOUS
    assert reporter_id(replace(fb("x"), extra=["not", "a", "dict"])) == ANONYMOUS  # type: ignore[arg-type]


def test_feedback_and_decisions_are_aggregated_per_reporter_and_never_merged():
    found = [("domain:x", "feedback_ham", "u:1", 30.0), ("addr:a@x", "feedback_ham", "u:1", 30.0),
             ("domain:x", "feedback_ham", "u:1", 10.0), ("domain:x", "feedback_ham", "u:2", 20.0),
             ("domain:x", "revoke", "ops", 40.0), ("domain:x", "restore", "ops", 41.0),
             ("domain:x", "revoke", "ops", 42.0)]
    assert aggregate_reports(found) == [
        ("domain:x", "feedback_ham", 2, 10.0, "u:1"), ("addr:a@x", "feedback_ham", 1, 30.0, "u:1"),
        ("domain:x", "feedback_ham", 1, 20.0, "u:2"), ("domain:x", "revoke", 1, 40.0, "ops"),
        ("domain:x", "restore", 1, 41.0, "ops"), ("domain:x", "revoke", 1, 42.0, "ops")]


def test_observation_records_carry_their_reporter_or_operator():
    assert parse_observation(encode_observation("feedback_ham", 2, "u:0123456789abcdef")) == (
        "feedback_ham", 2, "u:0123456789abcdef")
    assert parse_observation(encode_observation("revoke", 1, "Ops: Jane")) == ("revoke", 1, "Ops: Jane")
    assert parse_observation(b"feedback_spam:3") == ("feedback_spam", 3, "")  # before reporters: anonymous
    assert decode_observation(b"feedback_ham:1:u:1") == ("feedback_ham", 1)
    for bad in (b"revoke", b"revoke:1", b"revoke:1:", b"restore:0:ops"):  # a decision needs its operator
        assert parse_observation(bad) is None, bad


def _event(mail_from: str, client: str = "192.0.2.10", *, label: str | None = None,
           verdict: str | None = None) -> events.MailEvent:
    ev = events.new_event(events.Envelope(mail_from, ("bob@example.com",), client, "mx.test"),
                          b"Subject: hi\r\n\r\nhello\r\n", label=label)
    return ev.classified(verdict, 0.5, "test") if verdict else ev


def _whole_second() -> float:
    """Now, in whole seconds: record times are whole milliseconds, so reporters' times made from
    it keep their exact distance (a span of 29.999 s would miss a 30 s threshold)."""
    return float(int(time.time()))


def _report(mail_from: str, label: str, by: str, *, release: bool = False) -> bytes:
    """A feedback record as pipeline.feedback writes it: a user's report, or an operator's release."""
    ev = replace(_event(mail_from, label=label), verdict="spam" if label == "ham" else "ham",
                 extra={"feedback": "quarantine-release" if release else "user-report", "by": by})
    return events.encode(ev)


def test_observations_per_key():
    assert observations(_event("A@News.Example", verdict="ham"), feedback=False) == [
        ("addr:a@news.example", "ham"), ("domain:news.example", "ham"), ("client:192.0.2.10", "ham")]
    # Feedback never vouches for a client address: it is shared by everyone behind it.
    assert observations(_event("a@news.example", label="ham"), feedback=True) == [
        ("addr:a@news.example", "feedback_ham"), ("domain:news.example", "feedback_ham")]
    assert observations(_event("a@news.example"), feedback=True) == "no_label"
    assert observations(_event("a@news.example"), feedback=False) == "no_verdict"
    assert observations(_event("", client="", verdict="spam"), feedback=False) == "no_sender"


def test_verified_events_count_for_the_names_they_proved_only():
    """Reputation per authenticated domain: a verified event (extra["auth"], written by the SMTP
    ingress) counts for the keys it proved, an unverified one (replay) for those it claims."""
    def verified(ev: events.MailEvent, proven: list[str]) -> events.MailEvent:
        return replace(ev, extra={"auth": {"proven": proven, "dmarc": {"result": "pass" if proven else "fail"}}})

    forged = verified(_event("ceo@bank.example", verdict="ham"), [])
    assert observations(forged, feedback=False) == [("client:192.0.2.10", "ham")]  # the peer is no claim
    genuine = verified(_event("ceo@bank.example", verdict="spam"), ["bank.example"])
    assert observations(genuine, feedback=False) == [
        ("domain:bank.example", "spam"), ("addr:ceo@bank.example", "spam"), ("client:192.0.2.10", "spam")]
    # A list whose DKIM d= is its own, mailing for a sender: the list's domain, not the sender's.
    relayed = verified(_event("bounce@lists.example", verdict="ham"), ["lists.example", "news.example"])
    assert observations(relayed, feedback=False)[:2] == [("domain:lists.example", "ham"),
                                                         ("domain:news.example", "ham")]
    # A report about a forged message vouches for nobody; one about a genuine message for its names.
    report = replace(forged, label="ham", extra={**forged.extra, "feedback": "user-report", "by": "u1"})
    assert observations(report, feedback=True) == "no_sender"
    report = replace(genuine, label="ham", extra={**genuine.extra, "feedback": "user-report", "by": "u1"})
    assert observations(report, feedback=True) == [("domain:bank.example", "feedback_ham"),
                                                   ("addr:ceo@bank.example", "feedback_ham")]
    # A malformed record proves nothing; an event without one is judged by its claims as before.
    assert observations(replace(forged, extra={"auth": {"proven": "bank.example"}}), feedback=False) == [
        ("client:192.0.2.10", "ham")]
    assert observations(_event("ceo@bank.example", verdict="ham"), feedback=False)[0] == ("addr:ceo@bank.example",
                                                                                         "ham")


def test_credentials_follow_the_kafka_settings():
    base = config.load(env={})
    assert broker_credentials(base) is None
    sasl = replace(base, kafka=replace(base.kafka, security_protocol="SASL_PLAINTEXT",
                                       sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p"))
    creds = broker_credentials(sasl)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.mechanism.value, creds.username, creds.password, creds.ssl_context) == ("SCRAM-SHA-512", "u", "p",
                                                                                          None)
    tls = broker_credentials(replace(base, kafka=replace(base.kafka, security_protocol="SSL")))
    assert isinstance(tls, faust.SSLCredentials)
    with pytest.raises(ValueError, match="security_protocol"):
        broker_credentials(replace(base, kafka=replace(base.kafka, security_protocol="KERBEROS")))


def test_store_choices():
    assert store_url("memory") == "memory://"
    try:
        import rocksdict  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="rocksdict"):
            store_url("rocksdb")
    else:
        assert store_url("rocksdb") == "rocksdb://"
    with pytest.raises(ValueError, match="unknown store"):
        store_url("redis")


def test_internal_topics_are_the_apps_own():
    s = config.load(env={"FLOODGATE_KAFKA_GROUP_PREFIX": "g1"})
    assert internal_topics(s, ["g1.reputation-observations", "g1.reputation-senders-changelog",
                               "g1.classify", "g10.reputation-observations", "mail.ham"]) == [
        "g1.reputation-observations", "g1.reputation-senders-changelog"]


def test_tally_counts_and_keeps_the_published_standing():
    # Before the agreement rule one ham report made a sender good and two spam reports took it
    # away; now it takes three ham reporters over an hour, and three spam reporters.
    entry, good = tally({}, "feedback_ham", 1, "u:1", 0.0)
    assert not good
    entry, good = _reports(entry, [("u:2", 60.0), ("u:3", AGREEMENT_SPAN_S)])
    assert good and entry["feedback_ham"] == 3 and entry["good"] is False  # not yet published
    entry["good"] = good
    entry, good = _reports(entry, [("u:4", 0.0), ("u:5", 0.0), ("u:6", 0.0)], kind="feedback_spam")
    assert not good and entry["good"] is True and entry["feedback_spam"] == 3


def test_observation_records_carry_a_count_and_the_old_format_counts_one():
    assert decode_observation(encode_observation("ham", 3)) == ("ham", 3)
    assert decode_observation(b"feedback_spam:12") == ("feedback_spam", 12)
    assert decode_observation(b"spam") == ("spam", 1)  # records written before counts existed
    for bad in (b"ham:0", b"ham:-1", b"ham:x", b"ham:", b"eggs:2", b"", None, b"ham:\xd9\xa3"):
        assert decode_observation(bad) is None, bad


def test_a_batch_is_aggregated_per_key_kind_and_traffic_window():
    w = TRAFFIC_WINDOW_S
    ham = [("addr:a@x.example", "ham"), ("domain:x.example", "ham")]
    batch = [(ham, 10 * w + 1), ([("domain:x.example", "spam")], 10 * w + 2), (ham, 10 * w + 5),
             (ham, 11 * w)]  # the last one in the next window
    assert aggregate(batch) == [
        ("addr:a@x.example", "ham", 2, 10 * w + 5), ("domain:x.example", "ham", 2, 10 * w + 5),
        ("domain:x.example", "spam", 1, 10 * w + 2),
        ("addr:a@x.example", "ham", 1, 11 * w), ("domain:x.example", "ham", 1, 11 * w)]
    assert aggregate([]) == []


def test_tally_applies_a_count_at_once():
    entry, good = tally({}, "ham", GOOD_MIN_HAM - 1)
    assert not good and entry["ham"] == GOOD_MIN_HAM - 1
    entry, good = tally(entry, "ham", 1)
    assert good and entry["ham"] == GOOD_MIN_HAM


# -- the worker on the real broker ------------------------------------------------------------

class Worker:
    """The reputation worker as a subprocess (restartable), and a reader of the reputation topic."""

    def __init__(self, settings: Settings, tmp_path: Path, args: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.args = args
        self.port = free_port()
        self.env = os.environ | config.environment(settings) | {
            "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers}
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.records: list[tuple[bytes | None, bytes | None]] = []
        self.last_error = ""  # the last failed request, for a timeout's message
        self.reader = kafka.consumer(settings, group=f"check-{uuid.uuid4().hex[:8]}")
        self.reader.assign([TopicPartition(settings.topic("reputation"), 0, 0)])
        self.producer = kafka.producer(settings)

    def start(self) -> None:
        self.runs += 1
        self.log_path = self.tmp_path / f"reputation-{self.runs}.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "reputation", "--web-port", str(self.port),
                 "--partitions", "2", "--datadir", str(self.tmp_path / "faust"), *self.args],
                env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            assert self.alive(), "the reputation worker died"
            return bool((self.try_get("/reputation/stats/") or {}).get("ready"))

        wait_for(ready, START_TIMEOUT_S, interval=0.2, what="the worker to be ready")

    def stop(self) -> int | None:
        """SIGTERM, and the exit code (None if it had to be killed)."""
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            # Stuck: its threads' stacks into the log (faulthandler on SIGQUIT), then killed.
            self.proc.send_signal(signal.SIGQUIT)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: b"most recent call first" in self.log_path.read_bytes(), 10, what="a stack dump")
            self.proc.kill()
            self.proc.wait()
            code = None
        text = self.log_path.read_text(errors="replace")
        dump = text.find("Thread 0x")
        print(text[-3000:] if code is not None or dump < 0 else text[dump:][-12000:])
        return code

    def text(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
            return r.read().decode()

    def get(self, path: str) -> Any:
        return orjson.loads(self.text(path))

    def try_get(self, path: str) -> Any:
        try:
            return self.get(path)
        except OSError as e:  # HTTPError (a 503 while it is not ready) included
            self.last_error = f"{path}: {e!r}"
            return None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def send(self, topic_key: str, values: list[bytes], times: list[float] | None = None) -> None:
        """Produce ``values``, with record times (unix seconds) if given: the agreement span is
        measured in record times, so a test states when each reporter spoke instead of waiting."""
        for i, v in enumerate(values):
            when = {} if times is None else {"timestamp": int(times[i] * 1000)}
            self.producer.produce(self.settings.topic(topic_key), key=uuid.uuid4().hex.encode(), value=v, **when)
        assert self.producer.flush(30) == 0

    def poll_records(self) -> list[tuple[bytes | None, bytes | None]]:
        for m in self.reader.consume(500, 0.2):
            assert not m.error(), m.error()
            self.records.append((m.key(), m.value()))
        return self.records

    def published(self, key: str) -> list[senders.Standing]:
        """Every published standing of one key, in order."""
        self.poll_records()
        return [s for k, v in self.records if k == key.encode() and (s := senders.decode_standing(v))]

    def standings(self, key: str) -> list[bool]:
        return [s.good for s in self.published(key)]

    def good(self) -> set[str]:
        return senders.good_senders(self.poll_records())

    def wait_sender(self, key: str, what: str, **want: int) -> dict[str, Any]:
        """The worker's table entry for a key, once it has the wanted counts."""
        last: list[Any] = [None]

        def ready() -> dict[str, Any] | None:
            last[0] = view = self.try_get(f"/reputation/senders/{key}/")
            return view if view and all(view.get(k) == n for k, n in want.items()) else None

        try:
            return wait_for(ready, STEP_TIMEOUT_S, interval=0.2, what=what)
        except AssertionError as e:
            raise AssertionError(f"{e}; last view of {key}: {last[0]} ({self.last_error})") from None


@contextmanager
def _workers(settings: Settings, dirs: list[Path], *, start: bool,
             args: tuple[str, ...] = ()) -> Iterator[list[Worker]]:
    """Workers of one app, one per directory (started, or for the caller to start), each stopped
    after (``topic_settings`` then deletes the app's topics with the spec's)."""
    workers = [Worker(settings, d, args) for d in dirs]
    codes: list[int | None] = []
    try:
        if start:
            for w in workers:
                w.start()
        yield workers
    finally:
        for w in workers:
            if w.alive():
                codes.append(w.stop())
            w.reader.close()
    assert codes == [0] * len(workers), f"the workers exited with {codes} on SIGTERM"


@pytest.fixture
def worker(topic_settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    with _workers(topic_settings, [tmp_path], start=True) as (w,):
        yield w


@pytest.fixture
def cold_worker(topic_settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    """A worker not started yet: input produced first is a backlog when it starts."""
    with _workers(topic_settings, [tmp_path], start=False) as (w,):
        yield w


@pytest.mark.kafka
def test_feedback_decides_standing_and_bad_records_are_skipped(worker: Worker):
    worker.send("feedback", [
        b"not a mail event",                                  # no metadata line
        b"",                                                  # empty
        b'{"v":99,"id":"x"}\nraw',                            # unknown schema version
        events.encode(_event("carol@nolabel.example")),       # feedback without a verdict
    ])
    # Ham reports from three users over the agreement span (before the agreement rule: one
    # release) make alice good; their record times say when each reporter spoke.
    t0 = _whole_second() - 2 * AGREEMENT_SPAN_S
    worker.send("feedback", [_report("Alice@Good.Example", "ham", f"user{i}@example.com") for i in range(3)],
                times=[t0, t0 + AGREEMENT_SPAN_S / 2, t0 + AGREEMENT_SPAN_S])
    wait_for(lambda: worker.good() >= {"addr:alice@good.example", "domain:good.example"},
             STEP_TIMEOUT_S, what="alice's agreed reports to make her good")

    # A sender released once, then reported as spam twice: good (before the agreement rule, by
    # the release; now by twenty ham verdicts from as many clients, so no client earns a
    # standing), then no longer good (two spam reporters against one ham reporter).
    worker.send("ham", [events.encode(_event("bob@fickle.example", f"198.51.100.{100 + i}", verdict="ham"))
                        for i in range(GOOD_MIN_HAM)])
    wait_for(lambda: worker.standings("domain:fickle.example") == [True],
             STEP_TIMEOUT_S, what="bob's verdicts to make his domain good")
    worker.send("feedback", [_report("bob@fickle.example", "ham", "ops", release=True),
                             _report("bob@fickle.example", "spam", "carol@example.com"),
                             _report("bob@fickle.example", "spam", "dave@example.com")])
    wait_for(lambda: worker.standings("domain:fickle.example") == [True, False],
             STEP_TIMEOUT_S, what="bob's domain to lose its standing")
    assert worker.standings("addr:bob@fickle.example") == [True, False]

    assert worker.good() == {"addr:alice@good.example", "domain:good.example"}
    # Feedback never vouches for the client address.
    assert not any(k.startswith(b"client:") for k, _ in worker.records if k)
    stats = worker.get("/reputation/stats/")
    assert stats["skipped_undecodable"] == 3
    assert stats["skipped_no_label"] == 1
    assert worker.alive()
    # The table's view of one sender, routed by key.
    bob = worker.get("/reputation/senders/domain:fickle.example/")
    assert (bob["feedback_ham"], bob["feedback_spam"], bob["good"]) == (1, 2, False)
    assert 'floodgate_errors_total{kind="undecodable",stage="reputation"} 3.0' in worker.text("/metrics")


@pytest.mark.kafka
def test_a_restarted_worker_recovers_its_tables_from_the_changelog(worker: Worker):
    first = [events.encode(_event(f"n{i}@steady.example", "198.51.100.20", verdict="ham")) for i in range(15)]
    worker.send("ham", first)
    worker.wait_sender("domain:steady.example", "the first 15 verdicts to be counted", ham=15)
    assert worker.stop() == 0

    worker.start()  # same group: its tables come back from their changelog topics
    worker.send("ham", [events.encode(_event(f"m{i}@steady.example", "198.51.100.20", verdict="ham"))
                        for i in range(10)])
    wait_for(lambda: worker.standings("domain:steady.example") == [True], STEP_TIMEOUT_S,
             what="the domain to become good across the restart")
    standing = worker.published("domain:steady.example")[0]
    assert standing.ham >= GOOD_MIN_HAM and standing.spam == 0
    # At-least-once: every verdict is counted, and input whose offsets were not committed before
    # the stop is replayed (counted twice), so the count is 25 or a little more.
    last: list[Any] = []

    def all_counted() -> bool:
        last[:] = [worker.try_get("/reputation/senders/domain:steady.example/"), worker.try_get("/reputation/stats/")]
        return bool(last[0]) and last[0].get("ham", 0) >= 25

    try:
        wait_for(all_counted, STEP_TIMEOUT_S, interval=0.2, what="all 25 verdicts to be counted")
    except AssertionError as e:
        raise AssertionError(f"{e}; last view and stats: {last}") from None


@pytest.mark.kafka
def test_verdicts_make_a_steady_ham_sender_good_and_a_spammer_not(worker: Worker):
    newsletter = [events.encode(_event(f"issue{i}@newsletter.example", "198.51.100.7", verdict="ham"))
                  for i in range(25)]
    spammer = [events.encode(_event(f"x{i}@spammy.example", "203.0.113.9", verdict="spam")) for i in range(30)]
    lucky = [events.encode(_event(f"y{i}@spammy.example", "203.0.113.9", verdict="ham")) for i in range(3)]
    worker.send("spam", spammer)
    worker.send("ham", newsletter + lucky)

    wait_for(lambda: "domain:newsletter.example" in worker.good(), STEP_TIMEOUT_S,
             what="the newsletter domain to become good")
    assert "client:198.51.100.7" in worker.good()
    assert not any(k.startswith("addr:") for k in worker.good())  # one message per address

    view = worker.wait_sender("domain:spammy.example", "all of the spammer's verdicts to be counted", ham=3, spam=30)
    assert view["good"] is False
    assert view["traffic_recent"] == 33
    assert worker.standings("domain:spammy.example") == []
    assert worker.standings("client:203.0.113.9") == []

    traffic = worker.get("/reputation/traffic/")
    busiest = {s["key"]: s["messages"] for s in traffic["senders"]}
    assert busiest["client:203.0.113.9"] == 33 and busiest["domain:newsletter.example"] == 25
    assert worker.alive()


def _read_all(settings: Settings, topic: str) -> list[tuple[int, bytes]]:
    """(partition, key) of every record on a topic, from the beginning to its end now."""
    admin = kafka.admin(settings)
    parts = admin.list_topics(topic, timeout=10).topics[topic].partitions
    reader = kafka.consumer(settings, group=f"check-{uuid.uuid4().hex[:8]}")
    try:
        ends = {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        reader.assign([TopicPartition(topic, p, 0) for p in parts])
        return [(m.partition(), m.key()) for m in consume_n(reader, sum(ends.values()))]
    finally:
        reader.close()


@pytest.mark.kafka
def test_a_backlog_of_verdicts_is_counted_per_sender_once_per_batch(cold_worker: Worker):
    worker = cold_worker
    n = 2 * GOOD_MIN_HAM
    worker.send("ham", [events.encode(_event(f"n{i}@bulk.example", "198.51.100.40", verdict="ham"))
                        for i in range(n)])
    worker.start()  # the backlog reaches the agents as batches

    view = worker.wait_sender("domain:bulk.example", f"all {n} verdicts to be counted", ham=n, spam=0)
    assert view["good"] is True and view["traffic_recent"] == n
    client = worker.wait_sender("client:198.51.100.40", "the client's verdicts", ham=n)
    assert client["good"] is True
    # One standing change per sender, carrying the counts it was decided on.
    published = worker.published("domain:bulk.example")
    assert [s.good for s in published] == [True] and GOOD_MIN_HAM <= published[0].ham <= n
    assert worker.standings("client:198.51.100.40") == [True]
    assert not any(k.startswith("addr:") for k in worker.good())  # one message per address

    stats = worker.get("/reputation/stats/")
    assert stats["verdicts"] == n and stats["observations"] == 3 * n
    assert "skipped_error" not in stats
    # Counted observations: fewer records than observations (a batch sends one per sender key
    # and kind), and every table write in the changelog partition of the key's observations
    # (changelog keys are JSON: the sender key, or [sender key, window range]).
    assert stats["observation_records"] < stats["observations"]
    observed = _read_all(worker.settings, observations_topic(worker.settings))
    assert len(observed) == stats["observation_records"]
    partition_of = {key.decode(): p for p, key in observed}  # observation keys: raw UTF-8
    app_id = worker.settings.group("reputation")
    senders_log = _read_all(worker.settings, f"{app_id}-senders-changelog")
    assert {orjson.loads(k) for _p, k in senders_log} == set(partition_of)
    assert all(partition_of[orjson.loads(k)] == p for p, k in senders_log)
    traffic_log = _read_all(worker.settings, f"{app_id}-traffic-changelog")
    assert traffic_log and all(partition_of[orjson.loads(k)[0]] == p for p, k in traffic_log)


@pytest.mark.kafka
def test_observation_records_of_the_old_format_are_still_counted(worker: Worker):
    # Observations on the topic from before counts existed: a bare kind is one observation.
    # Keys as Faust writes them (raw UTF-8), partitioned as Faust does (murmur2).
    producer = kafka.producer(worker.settings, partitioner="murmur2_random")
    key = b"domain:legacy.example"
    for value in (b"ham", b"ham", b"spam:2", b"ham:0", b"eggs"):
        producer.produce(observations_topic(worker.settings), key=key, value=value)
    assert producer.flush(30) == 0
    worker.wait_sender("domain:legacy.example", "the old and new observations to be counted", ham=2, spam=2)

    def skipped_both() -> dict[str, Any] | None:
        stats = worker.try_get("/reputation/stats/") or {}
        return stats if stats.get("skipped_bad_observation") == 2 else None

    stats = wait_for(skipped_both, STEP_TIMEOUT_S, what="the two bad observations to be skipped")
    assert "skipped_error" not in stats


@pytest.mark.kafka
def test_any_of_two_workers_answers_for_every_sender(topic_settings: Settings, tmp_path: Path):
    # Two workers share the 2 partitions; a sender's view is asked of each, and the one that
    # does not hold the key forwards the request to the one that does.
    dirs = [tmp_path / "a", tmp_path / "b"]
    for d in dirs:
        d.mkdir()
    with _workers(topic_settings, dirs, start=True) as workers:
        wait_for(lambda: all((w.try_get("/reputation/stats/") or {}).get("ready") for w in workers),
                 START_TIMEOUT_S, interval=0.2, what="both workers to be ready after the rebalance")
        domains = [f"d{i}.example" for i in range(8)]  # 8 keys over 2 partitions: both workers own some
        workers[0].send("ham", [events.encode(_event(f"u{n}@{d}", f"192.0.2.{i}", verdict="ham"))
                                for i, d in enumerate(domains) for n in range(3)])
        for d in domains:
            for w in workers:
                view = w.wait_sender(f"domain:{d}", f"{d}'s verdicts, asked of worker {w.port}", ham=3)
                assert view["known"] is True and view["spam"] == 0


@pytest.mark.kafka
def test_verdicts_written_in_transactions_are_counted_and_committed(worker: Worker):
    # The classifier writes its verdicts in transactions, so the verdict topics carry commit
    # markers between batches: offsets with no record behind them, which Faust must step over
    # both to count every verdict and to commit its position.
    producer = kafka.producer(worker.settings, transactional_id=f"test-{uuid.uuid4().hex[:8]}")
    producer.init_transactions(30)
    n, per_transaction = 600, 20
    for start in range(0, n, per_transaction):
        producer.begin_transaction()
        for i in range(start, start + per_transaction):
            ev = _event(f"t{i}@txn.example", "198.51.100.77", verdict="ham")
            producer.produce(worker.settings.topic("ham"), key=ev.key, value=events.encode(ev))
        producer.commit_transaction(30)
    worker.wait_sender("domain:txn.example", f"all {n} verdicts to be counted", ham=n)
    assert worker.get("/reputation/stats/")["verdicts"] == n
    # Committed up to the last record of each partition: at most its final marker is left.
    s = worker.settings
    wait_for(lambda: max(partition_lags(s, s.group("reputation"), "ham").values()) <= 1, STEP_TIMEOUT_S,
             what="the worker's offsets committed past the transactions")


# -- agreement and revocation on the real broker ----------------------------------------------

# The agreement span the next tests give the worker (--agreement-span): short, so that a test
# states its reporters' times in seconds; they are record times, set when the test produces.
TEST_SPAN_S = 30.0


@pytest.fixture
def agreement_worker(topic_settings: Settings, tmp_path: Path) -> Iterator[Worker]:
    with _workers(topic_settings, [tmp_path], start=True, args=("--agreement-span", str(TEST_SPAN_S))) as (w,):
        yield w


def _reports_at(worker: Worker, mail_from: str, who_at: list[tuple[str, float]], label: str = "ham") -> None:
    """Reports on one sender's mail, by (reporter, record time); an empty reporter is anonymous."""
    worker.send("feedback", [_report(mail_from, label, who) for who, _at in who_at], times=[at for _w, at in who_at])


@pytest.mark.kafka
def test_user_reports_make_a_sender_good_only_in_agreement(agreement_worker: Worker):
    worker, t0 = agreement_worker, _whole_second() - 100 * TEST_SPAN_S
    span = TEST_SPAN_S
    # Short of agreement: one user's report; one user reporting ten times over ten spans; ten
    # anonymous reports over ten spans; five users all within a few seconds.
    _reports_at(worker, "news@one.example", [("carol@example.com", t0)])
    _reports_at(worker, "news@repeat.example", [("carol@example.com", t0 + i * span) for i in range(10)])
    _reports_at(worker, "news@anon.example", [("", t0 + i * span) for i in range(10)])
    _reports_at(worker, "news@burst.example", [(f"user{i}@example.com", t0 + i) for i in range(5)])
    # Agreement: three users over the span.
    _reports_at(worker, "news@agreed.example",
                [("carol@example.com", t0), ("dave@example.com", t0 + span / 2), ("erin@example.com", t0 + span)])

    wait_for(lambda: "domain:agreed.example" in worker.good(), STEP_TIMEOUT_S, what="agreement to make a sender good")
    for domain, reports, reporters in (("one", 1, 1), ("repeat", 10, 1), ("anon", 10, 1), ("burst", 5, 5)):
        view = worker.wait_sender(f"domain:{domain}.example", f"{domain}'s reports to be counted", feedback_ham=reports)
        assert view["good"] is False and len(view["ham_reporters"]) == reporters, view
        assert worker.standings(f"domain:{domain}.example") == []
    assert worker.good() == {"addr:news@agreed.example", "domain:agreed.example"}
    [agreed] = worker.published("domain:agreed.example")
    assert (agreed.ham_reporters, agreed.ham_operators, agreed.spam_reporters, agreed.reports_span_s) == (
        3, 0, 0, span)
    # No user's name in the table: reporters are hashed ids.
    assert not any("carol" in r for r in worker.get("/reputation/senders/domain:agreed.example/")["ham_reporters"])


def _cli(worker: Worker, *args: str, code: int = 0) -> str:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.feedback import TOKEN_ENV

    result = CliRunner().invoke(app, list(args), env=config.environment(worker.settings) | {TOKEN_ENV: "s3cret"})
    assert result.exit_code == code, result.output
    return result.output


@pytest.mark.kafka
def test_a_revoked_sender_stays_not_good_and_admission_stops_exempting_it_until_restored(agreement_worker: Worker):
    from pipeline.admission import GoodSenders

    worker, span = agreement_worker, TEST_SPAN_S
    keys = senders.keys("list@kept.example", "203.0.113.50")
    domain, addr = keys[0:2][::-1]  # domain:kept.example, addr:list@kept.example
    admission = GoodSenders(worker.settings)
    admission.start()
    try:
        t0 = _whole_second() - 100 * span
        _reports_at(worker, "list@kept.example", [("carol@example.com", t0), ("dave@example.com", t0 + span)])
        worker.send("feedback", [_report("list@kept.example", "ham", "ops", release=True)], times=[t0 + span / 2])
        wait_for(lambda: admission.is_good([domain]) and admission.is_good([addr]), STEP_TIMEOUT_S,
                 what="admission to see both keys of the agreed sender")

        listed = [orjson.loads(line) for line in _cli(worker, "senders", "list", "--json").splitlines()]
        assert {s["key"] for s in listed} == {domain, addr}
        assert {(s["ham_reporters"], s["ham_operators"], s["good"]) for s in listed} == {(3, 1, True)}
        assert "2 known-good sender(s)" in _cli(worker, "senders", "list")

        # Revoked (both of its keys: each key has its own standing), with the operator's token.
        assert "--token does not match" in _cli(worker, "senders", "revoke", domain, "--by", "ops", code=1)
        assert "not a sender key" in _cli(worker, "senders", "revoke", "kept.example", "--by", "ops", "--token",
                                          "s3cret", code=1)
        began = time.monotonic()
        for key in (domain, addr):
            out = _cli(worker, "senders", "revoke", key.upper(), "--by", "ops", "--token", "s3cret")
            assert f"revoked {key} (by ops); the reputation worker published it: revoked" in out
        wait_for(lambda: not admission.is_good(keys), STEP_TIMEOUT_S, what="admission to stop exempting it")
        print(f"admission stopped exempting the sender {time.monotonic() - began:.1f} s after the first revoke began")
        assert worker.standings(domain) == [True, False]
        shown = _cli(worker, "senders", "show", domain)
        assert "standing:     revoked" in shown and "revoked by ops at" in shown

        # Further ham changes nothing: new reporters over the span, and verdicts enough for good standing...
        t1 = _whole_second() - 50 * span
        _reports_at(worker, "list@kept.example", [(f"user{i}@example.com", t1 + i * span) for i in range(5)])
        worker.send("ham", [events.encode(_event("list@kept.example", "203.0.113.50", verdict="ham"))
                            for _ in range(GOOD_MIN_HAM)])
        worker.wait_sender(domain, "the further ham to be counted", feedback_ham=8, ham=GOOD_MIN_HAM)
        # ...nor across a restart (the revocation is in the table's changelog).
        assert worker.stop() == 0
        worker.start()
        worker.send("ham", [events.encode(_event("list@kept.example", "203.0.113.50", verdict="ham"))
                            for _ in range(5)])
        view = worker.wait_sender(domain, "ham after the restart to be counted", ham=GOOD_MIN_HAM + 5)
        assert (view["good"], view["decision"]) == (False, "revoke")
        assert worker.standings(domain) == [True, False] and not admission.is_good([domain, addr])
        # The client address has earned a standing of its own from the verdicts meanwhile: it is
        # another key, which an operator would revoke on its own.
        assert "client:203.0.113.50" in worker.good()

        # Restored: the rule decides again, and the sender is good again.
        for key in (domain, addr):
            out = _cli(worker, "senders", "restore", key, "--by", "lead", "--token", "s3cret")
            assert f"restored {key} (by lead); the reputation worker published it: good" in out
        wait_for(lambda: admission.is_good([domain]) and admission.is_good([addr]), STEP_TIMEOUT_S,
                 what="admission to exempt the restored sender again")
        restored = worker.published(domain)[-1]
        assert (restored.good, restored.decision, restored.decision_by) == (True, "restore", "lead")
        assert "restored by lead" in _cli(worker, "senders", "show", domain)
    finally:
        admission.stop()


@pytest.mark.kafka
def test_revoke_says_so_when_no_worker_publishes_it(topic_settings: Settings):
    # The decision is recorded on the feedback topic either way; the operator is told that it
    # has not been applied yet.
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["senders", "revoke", "domain:x.example", "--by", "ops", "--wait", "1"],
                                env=config.environment(topic_settings))
    assert result.exit_code == 0, result.output
    assert "recorded on the feedback topic; the reputation worker has not published it" in result.output
    records = _read_all(topic_settings, topic_settings.topic("feedback"))
    assert [key for _p, key in records] == [b"domain:x.example"]
    result = CliRunner().invoke(app, ["senders", "show", "domain:x.example"], env=config.environment(topic_settings))
    assert result.exit_code == 1 and "no standing published" in result.output


def test_a_record_taken_before_is_stepped_over_per_partition():
    taken = Replays()
    assert [taken.fresh("ham", 0, o) for o in (0, 1, 2)] == [True, True, True]
    # A rebalance hands partition 0 back from its committed offset 1: 1 and 2 were taken already.
    assert [taken.fresh("ham", 0, o) for o in (1, 2, 3)] == [False, False, True]
    assert taken.fresh("ham", 1, 0) and taken.fresh("spam", 0, 0)  # other partitions, other topics
