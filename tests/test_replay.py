"""Replay ingress: pacing and envelope synthesis as pure functions; the replay itself on the real broker."""

from __future__ import annotations

import ipaddress
import itertools
import mailbox
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from models.corpus import Message, iter_messages
from pipeline import kafka
from pipeline.core import events
from pipeline.core.config import Settings
from pipeline.replay import (
    BURST_S,
    CLIENT_NETWORKS,
    EnvelopeSynth,
    TokenBucket,
    client_address,
    header_block,
    replay,
    sanitize_address,
    select,
)
from tests.kafka_helpers import consume_n, records_on

DOMAINS = ("example.com", "example.net", "example.org")


def _mail(sender: str, subject: str, extra: str = "") -> bytes:
    return (f"{extra}From: {sender}\nTo: someone@list.test\nSubject: {subject}\n"
            f"Message-ID: <{subject.replace(' ', '.')}@mx.test>\n\nBody of {subject}.\n").encode()


# -- pacing ----------------------------------------------------------------------------------
def _simulate(bucket: TokenBucket, n: int, start: float = 0.0) -> list[float]:
    """Send times of n messages when the sender sleeps exactly as long as the bucket says."""
    now, times = start, []
    for _ in range(n):
        now += bucket.reserve(now)
        times.append(now)
    return times


def test_token_bucket_paces_at_the_rate() -> None:
    times = _simulate(TokenBucket(rate=50, burst=1, now=0.0), 501)
    assert times[0] == 0.0
    assert times[-1] == pytest.approx(10.0)  # 500 intervals of 1/50 s
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) == pytest.approx(0.02) and max(gaps) == pytest.approx(0.02)


def test_token_bucket_bursts_at_most_burst_after_a_stall() -> None:
    bucket = TokenBucket(rate=100, burst=5, now=0.0)
    _simulate(bucket, 10)
    # Idle for a minute: only 5 tokens were saved, the 6th message waits its 1/100 s.
    times = _simulate(bucket, 8, start=60.0)
    assert times[:5] == [60.0] * 5
    assert times[5] == pytest.approx(60.01) and times[7] == pytest.approx(60.03)


def test_token_bucket_absorbs_coarse_sleeps() -> None:
    """At 5000 msg/s a sleep lasts at least a timer tick (1 ms here, five messages' worth); the
    burst of BURST_S seconds lets the sender catch up instead of falling to 1000 msg/s."""
    rate = 5000.0

    def seconds_for(burst: float) -> float:
        bucket, now = TokenBucket(rate, burst, now=0.0), 0.0
        for _ in range(50_000):
            wait = bucket.reserve(now)
            now += max(wait, 0.001) if wait else 0.0
        return now

    assert seconds_for(rate * BURST_S) == pytest.approx(10.0, rel=0.01)
    assert seconds_for(1.0) > 20.0  # without a burst the tick caps the rate


def test_token_bucket_refuses_a_nonpositive_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0)


# -- envelopes -------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("<bounce-123@Lists.Sender.TEST>", "bounce-123@lists.sender.test"),
    ('"Alice Example" <alice@sender.test>', "alice@sender.test"),
    ("alice@sender.test (Alice)", "alice@sender.test"),
    ("=?utf-8?q?Zo=C3=AB?= <zoe@sender.test>", "zoe@sender.test"),
    ("<>", None),
    ("undisclosed-recipients:;", None),
    ("no address here", None),
    ("alice@localhost", None),  # no dot: not a domain mail comes from
    ("a b@sender.test", None),
    ("x" * 65 + "@sender.test", None),
])
def test_sanitize_address(value: str, expected: str | None) -> None:
    assert sanitize_address(value) == expected


def test_envelope_prefers_return_path_and_is_deterministic() -> None:
    synth = EnvelopeSynth(DOMAINS, users=50, seed=7)
    raw = _mail('"Alice" <alice@from.test>', "one", extra="Return-Path: <bounces@rp.test>\n")
    env = synth.envelope(raw, "spam/00001")
    assert env.mail_from == "bounces@rp.test"
    assert env.helo == "mail.rp.test"
    assert env.client_address == client_address("rp.test")
    assert env == synth.envelope(raw, "spam/00001")  # same message, same seed: same envelope
    [rcpt] = env.rcpt_to
    local, _, domain = rcpt.partition("@")
    assert domain in DOMAINS and local.startswith("user") and int(local[4:]) < 50


def test_envelope_headers_are_unfolded_and_undecodable_bytes_refused() -> None:
    synth = EnvelopeSynth(DOMAINS)
    folded = b'Subject: x\r\nFROM: "A Very Long Display Name"\r\n\t<long@fold.test>\r\n\r\nbody\r\n'
    assert synth.envelope(folded, "n").mail_from == "long@fold.test"
    latin1 = b"Return-Path: <j\xf6rg@latin1.test>\nFrom: ok@utf8.test\n\nbody\n"
    assert synth.envelope(latin1, "n").mail_from == "ok@utf8.test"


def test_envelope_without_a_usable_sender() -> None:
    env = EnvelopeSynth(DOMAINS).envelope(_mail("undisclosed-recipients:;", "two"), "x")
    assert env.mail_from == ""  # the null reverse-path
    assert env.helo == "mail.mx.test"  # the domain of the Message-ID


def test_envelope_reads_headers_only() -> None:
    synth = EnvelopeSynth(DOMAINS)
    for eol in (b"\n", b"\r\n"):
        raw = eol.join([b"Subject: hi", b"Message-ID: <1@mid.test>", b"", b"From: body@inbody.test", b""])
        assert header_block(raw) == eol.join([b"Subject: hi", b"Message-ID: <1@mid.test>", b""])
        env = synth.envelope(raw, "n")
        assert (env.mail_from, env.helo) == ("", "mail.mid.test")


def test_recipients_spread_over_users_and_domains_and_follow_the_seed() -> None:
    a, b = EnvelopeSynth(DOMAINS, users=100, seed=1), EnvelopeSynth(DOMAINS, users=100, seed=2)
    rcpts = [a.recipient(f"m{i}") for i in range(2000)]
    assert len(set(rcpts)) > 90  # nearly every one of the 100 users gets mail
    assert {r.partition("@")[2] for r in rcpts} == set(DOMAINS)
    assert rcpts != [b.recipient(f"m{i}") for i in range(2000)]


def test_client_addresses_are_documentation_addresses_per_domain() -> None:
    addrs = {client_address(f"sender{i}.test") for i in range(500)}
    assert len(addrs) > 300
    for a in addrs:
        ip = ipaddress.ip_address(a)
        assert any(ip in net for net in CLIENT_NETWORKS)
        assert ip not in {net.network_address for net in CLIENT_NETWORKS}
        assert ip not in {net.broadcast_address for net in CLIENT_NETWORKS}


def test_select_limits_and_shuffles_deterministically() -> None:
    msgs = [Message(b"x", None, "g", str(i)) for i in range(20)]
    assert [m.name for m in select(iter(msgs), limit=3)] == ["0", "1", "2"]
    one = [m.name for m in select(iter(msgs), limit=5, shuffle=True, seed=3)]
    assert one == [m.name for m in select(iter(msgs), limit=5, shuffle=True, seed=3)]
    assert one != [m.name for m in select(iter(msgs), limit=5, shuffle=True, seed=4)]
    assert len(one) == 5


# -- replay on the broker ------------------------------------------------------------------
def _write_sources(tmp_path: Path) -> tuple[Path, Path]:
    box_path = tmp_path / "spam.mbox"
    box = mailbox.mbox(box_path)
    box.add(_mail("Win <winner@lottery.test>", "you won"))
    box.add(_mail("pills@pharma.test", "cheap pills", extra="Return-Path: <>\n"))
    box.close()
    eml = tmp_path / "mail"
    (eml / "ham").mkdir(parents=True)
    (eml / "ham" / "1.eml").write_bytes(_mail("Bob <bob@friends.test>", "lunch").replace(b"\n", b"\r\n"))
    (eml / "ham" / "2.eml").write_bytes(_mail("carol@work.test", "report") + "Grüße\n".encode())
    (eml / "ham" / "3.eml").write_bytes(_mail("dave@big.test", "too big") + b"x" * 2000)
    return box_path, eml


def _inbound_events(settings: Settings, n: int) -> list[events.MailEvent]:
    """Exactly ``n`` events on the inbound topic, read from every partition's start, and no more."""
    c = kafka.consumer(settings, settings.group("test-replay"))
    topic = settings.topic("inbound")
    parts = kafka.admin(settings).list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    try:
        got = [events.decode(m.value()) for m in consume_n(c, n)]
        # and nothing more: replay returns only once every event is acknowledged
        assert records_on(kafka.admin(settings), topic) == n
    finally:
        c.close()
    return got


@pytest.mark.kafka
def test_replay_puts_exactly_those_messages_on_the_inbound_topic(topic_settings: Settings, tmp_path: Path) -> None:
    settings = replace(topic_settings, smtp=replace(topic_settings.smtp, domains=DOMAINS, max_message_bytes=1000))
    box_path, eml = _write_sources(tmp_path)
    messages = [*iter_messages(box_path), *iter_messages(eml)]
    assert [m.label for m in messages] == ["spam", "spam", "ham", "ham", "ham"]

    result = replay(settings, messages, rate=None, label_from_corpus=True, seed=5)

    assert (result.sent, result.delivered, result.failed, result.skipped) == (4, 4, 0, 1)
    assert result.labels == {"spam": 2, "ham": 2}
    assert result.topics == {settings.topic("inbound"): 4}  # no source floods here
    got = {e.id: e for e in _inbound_events(settings, 4)}
    assert set(got) == set(result.event_ids)
    by_name = {e.extra["corpus"]["name"]: e for e in got.values()}
    assert set(by_name) == {"spam.mbox:0", "spam.mbox:1", "ham/1.eml", "ham/2.eml"}
    synth = EnvelopeSynth(DOMAINS, seed=5)
    for m in messages[:4]:
        e = by_name[m.name]
        assert e.raw == m.raw  # exactly the bytes the loader read
        assert (e.source, e.label) == ("replay", m.label)
        assert e.envelope == synth.envelope(m.raw, m.name)
    assert by_name["spam.mbox:0"].envelope.mail_from == "winner@lottery.test"
    assert by_name["spam.mbox:1"].envelope.mail_from == "pills@pharma.test"  # empty Return-Path: From
    assert by_name["ham/1.eml"].envelope.helo == "mail.friends.test"


@pytest.mark.kafka
def test_replay_without_ground_truth_and_with_given_envelopes(topic_settings: Settings, tmp_path: Path) -> None:
    box_path, _ = _write_sources(tmp_path)
    synth = EnvelopeSynth(topic_settings.smtp.domains)
    bot = "203.0.113.66"
    result = replay(topic_settings, iter_messages(box_path), rate=1000.0,
                    envelope_for=lambda m: synth.envelope(m.raw, m.name, client=bot))
    assert result.delivered == 2 and result.labels == {"unlabelled": 2}
    got = _inbound_events(topic_settings, 2)
    assert {e.label for e in got} == {None}
    assert {e.envelope.client_address for e in got} == {bot}
    assert {e.envelope.mail_from for e in got} == {"winner@lottery.test", "pills@pharma.test"}


@pytest.mark.kafka
def test_replay_removes_authentication_results_claiming_our_id(topic_settings: Settings) -> None:
    """Replay does not verify senders: a field claiming our authserv-id in the source would read as
    ours downstream (the model trusts it), so it goes; other servers' fields stay."""
    ours = topic_settings.auth.authserv_id or topic_settings.smtp.hostname
    raw = (f"Authentication-Results: {ours}; dmarc=pass header.from=bank.test\r\n".encode()
           + b"Authentication-Results: mx.other.test; spf=pass\r\n"
           + b"From: ceo@bank.test\r\nSubject: wire\r\n\r\nplease\r\n")
    settings = replace(topic_settings, smtp=replace(topic_settings.smtp, domains=DOMAINS))
    replay(settings, [Message(raw, "spam", "t", "forged.eml")], rate=None, seed=1)
    [ev] = _inbound_events(settings, 1)
    assert ev.raw == raw.split(b"\r\n", 1)[1]
    assert "auth" not in ev.extra  # nothing was verified, so admission takes names as claimed
