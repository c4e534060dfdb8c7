"""Per-client limits at the socket and under stress: the rules as pure functions, then the real
ingress on the real broker, with clients on distinct 127/8 addresses."""

from __future__ import annotations

import resource
import smtplib
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from pipeline import kafka
from pipeline.core import events
from pipeline.core.config import Settings, SmtpSettings
from pipeline.smtp import SmtpIngress
from pipeline.smtp.limits import (
    DEFER_RATE,
    DEFER_STRESS,
    REFUSE_CLIENT,
    REFUSE_NETWORK,
    REFUSE_RATE,
    REFUSE_STRESS,
    REFUSE_TOTAL,
    STRESS_HOLD_S,
    Clients,
    network_of,
)
from pipeline.smtp.protocol import xtext_decode
from pipeline.smtp.server import FD_RESERVE, MAX_HELD_REFUSALS, held_refusals_cap, raise_open_files_limit
from tests.kafka_helpers import consume_n
from tests.test_smtp import RAW, _inbound

# --- the rules ----------------------------------------------------------------------------------


def limits(**kw: object) -> SmtpSettings:
    return replace(SmtpSettings(), **kw)  # type: ignore[arg-type]


def test_networks_are_slash_24_and_slash_64() -> None:
    assert network_of("192.0.2.77") == "192.0.2.0/24"
    assert network_of("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert network_of("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert network_of("not an address") == "not an address"


def test_connections_per_client_per_network_and_in_total() -> None:
    c = Clients(limits(max_connections=5, max_connections_per_client=2, max_connections_per_network=3,
                       client_connection_rate=0, stress_connection_share=1.0))
    assert [c.connect("192.0.2.1", 0.0) for _ in range(3)] == [None, None, REFUSE_CLIENT]
    assert c.connect("192.0.2.2", 0.0) is None
    assert c.connect("192.0.2.3", 0.0) == REFUSE_NETWORK  # three from 192.0.2.0/24 already
    assert c.connect("198.51.100.1", 0.0) is None and c.connect("203.0.113.1", 0.0) is None
    assert c.connect("203.0.113.2", 0.0) == REFUSE_TOTAL
    c.disconnect("192.0.2.1")
    assert c.total == 4 and c.connect("192.0.2.1", 0.0) is None


def test_connection_rate_per_client_is_a_burst_then_a_rate() -> None:
    c = Clients(limits(client_connection_rate=2.0, client_connection_burst=3))
    got = [c.connect("192.0.2.1", 0.0) for _ in range(4)]
    assert got == [None, None, None, REFUSE_RATE]
    for _ in range(3):
        c.disconnect("192.0.2.1")
    assert c.connect("192.0.2.2", 0.0) is None  # another client is not touched
    assert c.connect("192.0.2.1", 0.6) is None  # half a second later, one more


def test_message_rate_per_client_defers_with_450() -> None:
    c = Clients(limits(client_message_rate=1.0, client_message_burst=2))
    assert [c.mail("192.0.2.1", 0.0) for _ in range(3)] == [None, None, DEFER_RATE]
    assert c.mail("192.0.2.9", 0.0) is None
    assert c.mail("192.0.2.1", 1.0) is None


def test_under_stress_clients_without_history_get_a_bounded_share() -> None:
    c = Clients(limits(max_connections=8, stress_connection_share=1.0, stress_unknown_share=0.5,
                       stress_unknown_connections_per_client=1, stress_unknown_transactions=1,
                       client_connection_rate=0, known_after_messages=2, known_after_s=10.0))
    # A client with history: two messages, ten seconds apart.
    assert not c.accepted("192.0.2.1", 0.0) and c.accepted("192.0.2.1", 10.0)
    c.stress(10.0)
    assert c.stressed(10.0) and not c.stressed(10.0 + STRESS_HOLD_S)
    # Without history: one connection each, four in all (half of eight); one transaction at once.
    assert [c.connect("198.51.100.1", 10.0), c.connect("198.51.100.1", 10.0)] == [None, REFUSE_CLIENT]
    assert [c.connect(f"203.0.{i}.1", 10.0) for i in range(4)] == [None, None, None, REFUSE_STRESS]
    assert c.mail("198.51.100.1", 10.0) is None and c.mail("203.0.0.1", 10.0) == DEFER_STRESS
    c.done("198.51.100.1")
    assert c.mail("203.0.0.1", 10.0) is None
    # The client with history is under none of that: all its own limits are there for it.
    assert [c.connect("192.0.2.1", 10.0) for _ in range(4)] == [None] * 4
    assert [c.mail("192.0.2.1", 10.0) for _ in range(3)] == [None] * 3


def test_a_full_connection_table_is_stress_and_limits_shrink() -> None:
    c = Clients(limits(max_connections=4, stress_connection_share=0.5, client_connection_rate=0,
                       idle_timeout_s=300.0, stress_idle_timeout_s=10.0, hard_error_limit=20,
                       stress_hard_error_limit=2))
    assert (c.idle_timeout(0.0), c.hard_error_limit(0.0)) == (300.0, 20)
    c.connect("192.0.2.1", 0.0)
    c.connect("192.0.2.2", 0.0)
    assert (c.idle_timeout(0.0), c.hard_error_limit(0.0)) == (10.0, 2)


@pytest.mark.parametrize(("value", "expected"), [
    ("127.0.0.23", "127.0.0.23"), ("we+2Bird=helo", "we+ird=helo"), ("[UNAVAILABLE]", None),
    ("a+0Db", "a?b"),  # a decoded control character is never passed on
    ("+2", None), ("caf\u00e9", None),
])
def test_xforward_values_are_xtext(value: str, expected: str | None) -> None:
    assert xtext_decode(value) == expected


# --- the real ingress -----------------------------------------------------------------------------


@contextmanager
def ingress(settings: Settings, **smtp: object) -> Iterator[int]:
    s = replace(settings, smtp=replace(settings.smtp, domains=("example.com",), **smtp))  # type: ignore[arg-type]
    server = SmtpIngress(s, host="127.0.0.1", port=0)
    port = server.start()
    try:
        yield port
    finally:
        server.stop()


def client(port: int, source: str) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, source_address=(source, 0), timeout=30)


def banner(port: int, source: str) -> bytes:
    """What a new connection from ``source`` is told first."""
    with socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0)) as sock:
        return sock.makefile("rb").readline()


@pytest.mark.kafka
def test_a_client_over_its_connection_limit_gets_421_while_another_gets_in(topic_settings: Settings) -> None:
    with ingress(topic_settings, max_connections_per_client=2) as port:
        first, second = client(port, "127.0.1.5"), client(port, "127.0.1.5")
        try:
            assert banner(port, "127.0.1.5").startswith(b"421 4.7.0 too many connections from your address")
            assert banner(port, "127.0.2.6").startswith(b"220 ")
            assert first.noop()[0] == 250 and second.noop()[0] == 250  # those already in are served
        finally:
            first.close()
            second.close()


@pytest.mark.kafka
def test_a_client_over_its_message_rate_gets_450_before_its_data(topic_settings: Settings) -> None:
    with ingress(topic_settings, client_message_rate=0.01, client_message_burst=1) as port:
        with client(port, "127.0.1.7") as s:
            s.ehlo("mx.sender.test")
            assert s.sendmail("a@sender.test", ["bob@example.com"], RAW) == {}
            code, reply = s.mail("a@sender.test")
            assert (code, reply[:5]) == (450, b"4.7.1")
        with client(port, "127.0.2.8") as other:
            other.ehlo("mx.other.test")
            assert other.sendmail("b@other.test", ["bob@example.com"], RAW) == {}


@pytest.mark.kafka
def test_under_stress_a_refused_client_waits_longer_each_time_it_comes_back(topic_settings: Settings) -> None:
    # Two connections of four are stress, and they take the strangers' whole share: every further
    # connection from a client without history is refused, its 421 held (the tarpit), each time
    # twice as long as the last. (Lower bounds only: a reply is never sent early.)
    with (ingress(topic_settings, max_connections=4, stress_connection_share=0.5, stress_unknown_share=0.5,
                  error_sleep_s=0.25, stress_error_sleep_max_s=10.0) as port,
          client(port, "127.0.1.10") as one, client(port, "127.0.1.11") as two):
        assert one.noop()[0] == 250 and two.noop()[0] == 250
        waited = []
        for _ in range(3):
            started = time.monotonic()
            assert banner(port, "127.0.3.3").startswith(b"421 4.7.0 server busy")
            waited.append(time.monotonic() - started)
        assert waited[0] >= 0.25 and waited[1] >= 0.5 and waited[2] >= 1.0, waited


@pytest.mark.kafka
def test_idle_sessions_are_closed_sooner_under_stress(topic_settings: Settings) -> None:
    # Two open connections of four are stress; idle sessions then last a second instead of five minutes.
    with (ingress(topic_settings, max_connections=4, stress_connection_share=0.5, stress_idle_timeout_s=1.0,
                  idle_timeout_s=300.0, stress_unknown_share=1.0) as port,
          socket.create_connection(("127.0.0.1", port), timeout=30, source_address=("127.0.1.9", 0)) as lone):
        replies = lone.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        crowd = client(port, "127.0.2.9")  # the second connection: stress
        started = time.monotonic()
        try:
            # Nothing more is sent: the next line is the server closing the idle session.
            assert replies.readline().startswith(b"421 4.4.2")
            assert time.monotonic() - started < 10
            assert replies.readline() == b""  # and the connection is gone
        finally:
            crowd.close()


@pytest.mark.kafka
def test_xforward_only_from_trusted_relays_and_admission_sees_the_original_client(topic_settings: Settings) -> None:
    with ingress(topic_settings, xforward_hosts=("127.0.3.0/24",)) as port:
        with client(port, "127.0.4.1") as stranger:
            stranger.ehlo("mx.stranger.test")
            assert not stranger.has_extn("xforward")
            assert stranger.docmd("XFORWARD ADDR=192.0.2.1")[0] == 550
        with client(port, "127.0.3.25") as relay:
            relay.ehlo("mx.relay.test")
            assert "ADDR" in relay.esmtp_features["xforward"].split()
            assert relay.docmd("XFORWARD NAME=bot.example ADDR=192.0.2.44 PORT=1234")[0] == 250
            assert relay.docmd("XFORWARD PROTO=ESMTP HELO=bot+2Bhelo.example IDENT=4F1A2B SOURCE=REMOTE")[0] == 250
            assert relay.sendmail("forged@bank.example", ["bob@example.com"], RAW) == {}
            # Forwarded attributes last one transaction.
            assert relay.sendmail("a@sender.test", ["bob@example.com"], RAW) == {}
    c = _inbound(topic_settings)
    try:
        got = [events.decode(m.value()) for m in consume_n(c, 2)]
    finally:
        c.close()
    forwarded = next(e for e in got if e.envelope.mail_from == "forged@bank.example")
    plain = next(e for e in got if e.envelope.mail_from == "a@sender.test")
    assert (forwarded.envelope.client_address, forwarded.envelope.helo) == ("192.0.2.44", "bot+helo.example")
    assert forwarded.extra == {"relay": "127.0.3.25", "relay_queue_id": "4F1A2B"}
    assert (plain.envelope.client_address, plain.extra) == ("127.0.3.25", {})


@pytest.mark.kafka
def test_a_relays_retry_of_one_delivery_gets_the_same_event_id(topic_settings: Settings) -> None:
    """A 451 cannot promise the broker does not have the event (a late acknowledgement); the relay
    then delivers again, and its retry must not become a second message: same relay, queue id,
    envelope and bytes, same event id (the sinks keep one copy per id). Anything else differs."""
    def queued_as(relay: smtplib.SMTP, ident: str | None, rcpt: str = "bob@example.com", raw: bytes = RAW) -> str:
        if ident is not None:
            assert relay.docmd(f"XFORWARD ADDR=192.0.2.44 IDENT={ident}")[0] == 250
        relay.mail("a@sender.test")
        relay.rcpt(rcpt)
        code, reply = relay.data(raw)
        assert code == 250, reply
        return reply.decode().rsplit(" ", 1)[-1]

    with ingress(topic_settings, xforward_hosts=("127.0.3.0/24",)) as port, client(port, "127.0.3.25") as relay:
        relay.ehlo("mx.relay.test")
        first = queued_as(relay, "4F1A2B")
        assert queued_as(relay, "4F1A2B") == first  # the retry
        others = {queued_as(relay, "4F1A2C"), queued_as(relay, "4F1A2B", rcpt="carol@example.com"),
                  queued_as(relay, "4F1A2B", raw=RAW + b"more\r\n"), queued_as(relay, None), queued_as(relay, None)}
    assert len(others) == 5 and first not in others


def test_clients_without_history_share_a_rate_and_exceeding_it_is_stress() -> None:
    c = Clients(limits(unknown_message_rate=2.0, unknown_message_burst=3, client_message_rate=0,
                       stress_unknown_transactions=100))
    c.make_known("192.0.2.1", 0.0)
    # Three strangers, each far under every limit of its own, together past their share.
    got = [c.mail(f"198.51.100.{i}", 0.0) for i in range(4)]
    assert got == [None, None, None, DEFER_STRESS]
    assert c.stressed(0.0)
    assert c.mail("192.0.2.1", 0.0) is None  # a client with history is not in that share
    assert c.mail("198.51.100.9", 0.5) is None  # the share refills at its rate


def _lane_events(settings: Settings, key: str, n: int) -> list[events.MailEvent]:
    c = kafka.consumer(settings, settings.group(f"check-{key}"))
    topic = settings.topic(key)
    parts = kafka.admin(settings).list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    try:
        return [events.decode(m.value()) for m in consume_n(c, n)]
    finally:
        c.close()


@pytest.mark.kafka
def test_under_stress_strangers_mail_goes_to_the_bulk_lane_and_earns_no_history(topic_settings: Settings) -> None:
    """Under stress a client without history has its accepted mail sent to the bulk lane, and earns
    no history meanwhile (its second message goes there too, although one would make it known when
    calm); a client with history keeps the priority lane."""
    with ingress(topic_settings, max_connections=4, stress_connection_share=0.5, known_after_messages=1,
                 known_after_s=0.0) as port:
        with client(port, "127.0.5.1") as regular:  # history first, while the ingress is calm
            regular.ehlo("mx.regular.test")
            assert regular.sendmail("a@regular.test", ["bob@example.com"], RAW) == {}
        # Two open connections of four: stress.
        with client(port, "127.0.6.1") as stranger, client(port, "127.0.6.1") as _second:
            stranger.ehlo("mx.stranger.test")
            assert stranger.sendmail("x@stranger.test", ["bob@example.com"], RAW) == {}
            assert stranger.sendmail("x@stranger.test", ["bob@example.com"], RAW) == {}
            with client(port, "127.0.5.1") as regular:
                regular.ehlo("mx.regular.test")
                assert regular.sendmail("a@regular.test", ["bob@example.com"], RAW) == {}
    assert [e.envelope.client_address for e in _lane_events(topic_settings, "inbound", 2)] == ["127.0.5.1"] * 2
    assert [e.envelope.client_address for e in _lane_events(topic_settings, "bulk", 2)] == ["127.0.6.1"] * 2


def test_a_client_refused_again_and_again_waits_longer_each_time_up_to_a_cap() -> None:
    c = Clients(limits(error_sleep_s=1.0, stress_error_sleep_max_s=10.0))
    t = 1000.0
    holds = [c.tarpit("127.3.0.1", t + i * 0.1) for i in range(6)]
    assert holds == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert c.tarpit("127.3.0.2", t) == 1.0  # another client: its own count
    # Quiet for longer than stress lasts: back to the first step.
    assert c.tarpit("127.3.0.1", t + 0.5 + STRESS_HOLD_S + 1) == 1.0
    # error_sleep_s 0 turns the tarpit off, whatever the cap.
    assert Clients(limits(error_sleep_s=0.0)).tarpit("127.3.0.1", t) == 0.0


def test_refusals_are_held_only_as_far_as_the_open_files_limit_leaves_room() -> None:
    assert held_refusals_cap(500, open_files=8192) == MAX_HELD_REFUSALS
    # systemd's default soft limit: 1024 - 500 sessions - the reserve, not a thousand.
    assert held_refusals_cap(500, open_files=1024) == 1024 - 500 - FD_RESERVE
    assert held_refusals_cap(500, open_files=600) == 0  # nothing held rather than an accept failing
    assert held_refusals_cap(0, open_files=resource.RLIM_INFINITY) == MAX_HELD_REFUSALS


def test_the_ingress_raises_its_open_files_limit_within_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))
        now = raise_open_files_limit(4096)
        assert now == (4096 if hard == resource.RLIM_INFINITY else min(4096, hard))
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
        assert raise_open_files_limit(2048) == now  # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
