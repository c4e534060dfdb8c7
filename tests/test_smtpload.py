"""The SMTP load generator (pipeline/bench/smtpload.py): its wire format on its own, then against a
real ``SmtpIngress`` on the broker: source addresses, 4xx counting and retries, dot-stuffing, a
short shaped run and the connect -> Maildir mapping."""

from __future__ import annotations

import asyncio
import math
import os
import smtplib
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from models.corpus import Message
from pipeline import deliver, kafka
from pipeline.bench import smtpload
from pipeline.bench.smtpload import HamSpec, LoadGenerator, Outgoing, Phases, Shape
from pipeline.core import config, events
from pipeline.core.config import Settings
from pipeline.smtp import SmtpIngress
from tests.kafka_helpers import consume_n, wait_for
from tests.worker_helpers import produce, running

# Lines a naive client gets wrong: a lone dot (the end of DATA if not stuffed), two dots, a dot
# starting the message, a dot after a bare LF (not a line start on the wire), 8-bit bytes.
TRICKY = (b".starts with a dot\r\nFrom: a@sender.test\r\nTo: user1@example.com\r\nSubject: dots\r\n\r\n"
          b".\r\n..\r\n.x\r\n...three\r\nbare\n.after a bare LF\r\ncaf\xc3\xa9\r\n.\r\n")


# -- on its own ----------------------------------------------------------------------------
def test_dot_stuffing() -> None:
    assert smtpload.dot_stuff(b"a\r\n.b\r\n") == b"a\r\n..b\r\n.\r\n"
    assert smtpload.dot_stuff(b".\r\n") == b"..\r\n.\r\n"
    assert smtpload.dot_stuff(b"no final newline") == b"no final newline\r\n.\r\n"
    assert smtpload.dot_stuff(b"a\n.b\r\n") == b"a\n.b\r\n.\r\n"  # after a bare LF: not a line start
    assert smtpload.crlf(b"a\nb\r\nc\n") == b"a\r\nb\r\nc\r\n"


def test_sources_are_distinct_loopback_addresses() -> None:
    addresses = [smtpload.source(net, i) for net in (1, 2) for i in range(600)]
    assert len(set(addresses)) == len(addresses)
    assert all(a.startswith("127.") and not a.endswith((".0", ".255")) for a in addresses)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(data)

    def close(self) -> None:
        pass


def test_replies_split_anywhere_drive_the_script() -> None:
    """Multi-line replies, replies cut mid-line, a banner before anyone asked: each command is
    sent once the previous reply is complete, and every step gets its time."""
    async def scenario() -> tuple[bytes, list[bytes], list[float]]:
        client = smtpload._Client()
        transport = _Transport()
        client.connection_made(transport)
        client.data_received(b"220 mx ESMTP\r\n")  # the banner, before the script runs
        at = [math.nan] * len(smtpload.STEPS)
        opened = client.run(((smtpload.BANNER, None, b"2"), (smtpload.EHLO, b"EHLO me\r\n", b"2")), at, 0.0)
        for chunk in (b"250-mx\r\n250-SIZE 10", b"\r\n250 SMTPUTF8\r", b"\n"):
            client.data_received(chunk)
        await opened
        m = Outgoing.build("a@sender.test", "b@example.com", b"hi\r\n")
        done = client.run(m.script, at, 0.0)
        for reply in (b"250 2.1.0 OK\r\n", b"250 2.1.5 OK\r\n", b"354 go on\r\n",
                      b"250 2.0.0 OK: queued as 0123abcd\r\n"):
            client.data_received(reply)
        return await done, transport.written, at

    line, written, at = asyncio.run(scenario())
    assert smtpload.event_id(line) == "0123abcd"
    assert written == [b"EHLO me\r\n", b"MAIL FROM:<a@sender.test>\r\n", b"RCPT TO:<b@example.com>\r\n",
                       b"DATA\r\n", b"hi\r\n.\r\n"]
    assert all(not math.isnan(t) for t in at[smtpload.BANNER:])


def test_a_4xx_fails_the_script_with_its_step() -> None:
    async def scenario() -> smtpload.Rejected:
        client = smtpload._Client()
        client.connection_made(_Transport())
        at = [math.nan] * len(smtpload.STEPS)
        done = client.run(Outgoing.build("a@s.test", "b@example.com", b"x\r\n").script, at, 0.0)
        client.data_received(b"250 OK\r\n250 OK\r\n354 go\r\n451 4.3.0 try again later\r\n")
        with pytest.raises(smtpload.Rejected) as e:
            await done
        return e.value

    r = asyncio.run(scenario())
    assert (r.step, r.code, r.line) == ("dot", 451, b"451 4.3.0 try again later")


def test_phases_are_named_as_in_the_flood_bench() -> None:
    assert [b[0] for b in Phases(1, 2, 3, 4).bounds()] == ["0-warmup", "1-before", "2-during", "3-after"]
    assert Phases(0, 0, 5, 0).bounds() == [("2-during", 0.0, 5.0)]


# -- against a real ingress ----------------------------------------------------------------
@pytest.fixture
def ingress(topic_settings: Settings) -> Iterator[tuple[SmtpIngress, int]]:
    ing = SmtpIngress(topic_settings, host="127.0.0.1", port=0)
    port = ing.start()
    yield ing, port
    ing.stop()


def _events(settings: Settings, n: int, keys: tuple[str, ...] = ("inbound",)) -> dict[str, events.MailEvent]:
    c = kafka.consumer(settings, settings.group("test-smtpload"))
    admin = kafka.admin(settings)
    parts = []
    for key in keys:
        topic = settings.topic(key)
        parts += [TopicPartition(topic, p, OFFSET_BEGINNING)
                  for p in admin.list_topics(topic, timeout=10).topics[topic].partitions]
    c.assign(parts)
    try:
        return {e.id: e for e in (events.decode(m.value()) for m in consume_n(c, n))}
    finally:
        c.close()


@pytest.mark.kafka
def test_each_client_sends_from_its_own_loopback_address(ingress: tuple[SmtpIngress, int],
                                                         topic_settings: Settings) -> None:
    _, port = ingress
    gen = LoadGenerator("127.0.0.1", port, smtpload.SHAPES["none"], Phases())
    m = Outgoing.build("alice@sender.test", "user1@example.com", b"Subject: hi\r\n\r\nhello\r\n")
    sources = ["127.1.0.1", "127.7.3.9", "127.200.0.5"]

    async def send_all() -> list[smtpload.Transaction]:
        return list(await asyncio.gather(*(gen.send(src, b"mx.sender.test", m) for src in sources)))

    txs = asyncio.run(send_all())
    assert all(t.accepted and t.event_id for t in txs)
    got = _events(topic_settings, len(sources))
    assert {t.event_id: t.client for t in txs} == {i: e.envelope.client_address for i, e in got.items()}
    assert all(e.envelope.helo == "mx.sender.test" for e in got.values())


@pytest.mark.kafka
def test_a_421_is_counted_and_the_ham_retried(topic_settings: Settings) -> None:
    """The ingress's only connection slot is taken: the ham gets 421 at the banner, is retried
    like an MTA retries, and gets in once the slot is free."""
    ing = SmtpIngress(topic_settings, host="127.0.0.1", port=0, max_connections=1)
    port = ing.start()
    try:
        gen = LoadGenerator("127.0.0.1", port, smtpload.SHAPES["none"], Phases(),
                            ham_spec=HamSpec(retry_delay_s=0.2, max_attempts=200),
                            ham=[(b"mx", Outgoing.build("a@sender.test", "user1@example.com", b"x\r\n"))])
        result: list[smtpload.Transaction] = []
        with smtplib.SMTP("127.0.0.1", port):  # holds the slot until the ham was turned away
            thread = threading.Thread(target=lambda: result.append(
                asyncio.run(gen.send("127.1.0.1", b"mx.sender.test", gen.ham[0][1]))))
            thread.start()
            wait_for(lambda: gen.run_.failures, what="the ham turned away")
        thread.join(30)
    finally:
        ing.stop()
    [tx] = result
    assert tx.accepted and tx.attempts >= 2
    f = gen.run_.failures[0]
    assert (f.role, f.client, f.step, f.code) == ("ham", "127.1.0.1", "banner", 421)
    assert "too many connections" in f.text
    gen.run_.start = tx.started
    phase = smtpload.summarize(gen.run_)["phases"]["0-warmup"]["ham"]
    assert phase["replies_421"] == phase["replies_4xx"] == tx.attempts - 1
    assert (phase["retried"], phase["retries"], phase["accepted"]) == (1, tx.attempts - 1, 1)


@pytest.mark.kafka
def test_dot_stuffing_round_trips_byte_identically(ingress: tuple[SmtpIngress, int],
                                                   topic_settings: Settings) -> None:
    _, port = ingress
    gen = LoadGenerator("127.0.0.1", port, smtpload.SHAPES["none"], Phases())
    tx = asyncio.run(gen.send("127.1.0.2", b"mx.sender.test",
                              Outgoing.build("a@sender.test", "user1@example.com", TRICKY)))
    assert tx.accepted
    [event] = _events(topic_settings, 1).values()
    assert event.id == tx.event_id
    assert event.raw == TRICKY


@pytest.mark.kafka
def test_a_short_shaped_run_is_summarised_and_ham_found_in_its_maildir(
        ingress: tuple[SmtpIngress, int], topic_settings: Settings) -> None:
    _, port = ingress
    ham = smtpload.ham_outgoing([Message(b"From: a@list.test\r\nSubject: ham\r\n\r\nhello\r\n", "ham",
                                                  "easy_ham_2", f"{i:05d}") for i in range(5)])
    spam = smtpload.spam_payloads([Message(b"Subject: buy\r\n\r\nnow\r\n", "spam", "spam_2", "00001")])
    shape = Shape("tiny", bots=3, conns=2, per_conn=3, idle=1, net=9)
    gen = LoadGenerator("127.0.0.1", port, shape, Phases(0.3, 1.0, 1.5, 1.0), ham=ham,
                        ham_spec=HamSpec(senders=4, rate=10), spam=spam)
    run = asyncio.run(gen.run())
    summary = smtpload.summarize(run)

    assert list(summary["phases"]) == ["0-warmup", "1-before", "2-during", "3-after"]
    assert summary["idle_held_max"] == 3
    during = summary["phases"]["2-during"]
    assert during["bot"]["accepted"] > 0 and during["accepted_per_s"]["bot"] > 0
    assert during["cpu_ms_per_message"]["generator"] > 0 and during["generator_cpu_ms_per_connect"] > 0
    assert during["connects_per_s"]["idle"] >= 3 / 1.5 and during["connects_per_s"]["bot"] > 0
    for name in ("1-before", "2-during", "3-after"):
        p = summary["phases"][name]
        h = p["ham"]
        assert h["sent"] > 0 and h["accepted"] == h["sent"] and h["failed"] == 0
        assert set(h["steps"]) == set(smtpload.STEPS)
        assert h["connect_to_250"]["p50"] is not None and h["connect_to_250"]["p99"] is not None
        for role in ("ham", "bot"):
            assert {"replies_4xx", "replies_421", "refused", "reset"} <= set(p[role])
        assert {"total", "ham", "bot"} == set(p["accepted_per_s"])

    # Connect -> Maildir: the ham's events, classified as ham, through the real deliver worker.
    accepted = {t.event_id for t in run.ham() if t.accepted}
    got = _events(topic_settings, len([t for t in run.transactions if t.accepted]), ("inbound", "bulk"))
    produce(topic_settings, "ham", [replace(got[i].classified("ham", 0.01, "test"), lane="priority")
                                    for i in accepted])
    with running(topic_settings, deliver.build, "deliver"):
        wait_for(lambda: smtpload.attach_maildir(run, smtpload.maildir_found(topic_settings.paths.maildir_root))
                 == len(accepted), what="every accepted ham in its Maildir")
    assert all(t.landed is not None and t.landed >= t.done - 0.01 for t in run.ham() if t.accepted)
    after = smtpload.summarize(run)["phases"]["1-before"]["ham"]
    assert after["in_maildir"] == after["accepted"]
    assert after["connect_to_maildir"]["p50"] >= after["connect_to_250"]["p50"]


@pytest.mark.kafka
def test_the_smtp_load_command_against_an_ingress_process_it_starts(settings: Settings, tmp_path: Path) -> None:
    """``python -m pipeline.bench smtp-load --start-ingress``: floodgate smtp as a process, ham over
    SMTP, the JSON summary with the ingress's and the broker's CPU."""
    out = tmp_path / "smtpload.json"
    env = os.environ | config.environment(settings)
    subprocess.run([sys.executable, "-m", "pipeline.bench", "smtp-load", "--start-ingress", "--shapes", "none",
                    "--warmup", "0", "--pre", "2", "--flood", "0", "--post", "0", "--ham-rate", "10",
                    "--out", str(out)], env=env, check=True, capture_output=True, timeout=180)
    report = orjson.loads(out.read_bytes())
    assert report["ingress_exits"] == []
    phase = report["runs"]["none"]["phases"]["1-before"]
    assert phase["ham"]["sent"] == 20 and phase["ham"]["accepted"] == 20
    ingress = {k: v for k, v in phase["cpu_s"].items() if k.startswith("smtp")}  # front and session processes
    assert sum(ingress.values()) > 0 and "broker" in phase["cpu_s"]
    assert phase["cpu_ms_per_message"]["generator"] > 0


@pytest.mark.kafka
def test_an_idle_connection_the_server_closes_is_counted_when_it_closes(topic_settings: Settings) -> None:
    """A hogger learns of the ingress's idle timeout (421 4.4.2) when it comes, not at its next
    NOOP: counted as an idle failure at that moment, and the hogger reconnects."""
    s = replace(topic_settings, smtp=replace(topic_settings.smtp, idle_timeout_s=0.6))
    ing = SmtpIngress(s, host="127.0.0.1", port=0)
    port = ing.start()
    try:
        shape = Shape("idle", bots=1, conns=0, idle=1, noop_s=60.0, net=9)
        gen = LoadGenerator("127.0.0.1", port, shape, Phases(0, 0, 3.0, 0), spam=[b"x\r\n.\r\n"])
        run = asyncio.run(gen.run())
    finally:
        ing.stop()
    closed = [f for f in run.failures if f.role == "idle" and f.step == "idle"]
    assert closed and all(f.code == 421 and "idle too long" in f.text for f in closed)
    assert run.connects["2-during"]["idle"] >= 2  # reconnected after each
    assert run.idle_held_max == 1
