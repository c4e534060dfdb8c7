"""SMTP ingress against the real broker, through real SMTP conversations (smtplib)."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline import kafka
from pipeline.core import config, events
from pipeline.core.config import Settings
from pipeline.smtp import SmtpIngress, normalize_domain
from tests.kafka_helpers import consume_n, records_on, wait_for

pytestmark = pytest.mark.kafka

MAX_BYTES = 64 * 1024
# A line starting with a dot (dot-stuffed on the wire), 8-bit bytes, CRLF line ends.
RAW = (b"From: Alice <alice@sender.test>\r\nTo: bob@example.com\r\nSubject: hello\r\n"
       b"Message-ID: <1@sender.test>\r\n\r\nHi Bob,\r\n.a line starting with a dot\r\n"
       b"caf\xc3\xa9\r\n-- \r\nAlice\r\n")


@pytest.fixture
def smtp_settings(topic_settings: Settings) -> Settings:
    smtp = replace(topic_settings.smtp, domains=("example.com", "example.net"), max_recipients=3,
                   max_message_bytes=MAX_BYTES, ack_timeout_s=10.0)
    return replace(topic_settings, smtp=smtp)


def _start(settings: Settings, **kwargs: int) -> tuple[SmtpIngress, int]:
    ingress = SmtpIngress(settings, host="127.0.0.1", port=0, **kwargs)
    return ingress, ingress.start()


@pytest.fixture
def server(smtp_settings: Settings) -> Iterator[int]:
    ingress, port = _start(smtp_settings)
    yield port
    ingress.stop()


def _inbound(settings: Settings) -> Consumer:
    """A consumer assigned every inbound partition from the beginning (no group rebalance to wait for)."""
    c = kafka.consumer(settings, settings.group("test-smtp"))
    topic = settings.topic("inbound")
    parts = kafka.admin(settings).list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    return c


def _inbound_count(settings: Settings) -> int:
    return records_on(kafka.admin(settings), settings.topic("inbound"))


def _event_id(reply: bytes) -> str:
    return reply.decode().rsplit(" ", 1)[-1]


def test_local_mail_becomes_an_event_with_envelope_and_exact_bytes(server: int, smtp_settings: Settings) -> None:
    with smtplib.SMTP("127.0.0.1", server) as s:
        s.ehlo("mx.sender.test")
        assert s.has_extn("size") and int(s.esmtp_features["size"]) == MAX_BYTES
        assert s.mail("alice@sender.test", ["BODY=8BITMIME"])[0] == 250
        assert s.rcpt("bob@example.com")[0] == 250
        assert s.rcpt("carol@EXAMPLE.NET")[0] == 250
        assert s.rcpt("mallory@elsewhere.test")[0] == 550  # refused, the others stand
        code, reply = s.data(RAW)
    assert code == 250
    c = _inbound(smtp_settings)
    try:
        [msg] = consume_n(c, 1)
    finally:
        c.close()
    event = events.decode(msg.value())
    assert msg.key() == event.key and event.id == _event_id(reply)
    assert event.raw == RAW
    assert event.source == "smtp" and event.label is None
    assert event.envelope == events.Envelope(mail_from="alice@sender.test",
                                             # the recipient domain as normalised (lower-case IDNA)
                                             rcpt_to=("bob@example.com", "carol@example.net"),
                                             client_address="127.0.0.1", helo="mx.sender.test")


def test_long_lines_and_bare_newlines_are_kept_as_sent(server: int, smtp_settings: Settings) -> None:
    raws = [b"Subject: html\r\n\r\n<p>" + b"x" * 5000 + b"</p>\r\n",
            b"Subject: bare\n\nbare newlines\nkept as they are\n\r\n"]
    with smtplib.SMTP("127.0.0.1", server) as s:
        s.ehlo("mx.sender.test")
        ids = []
        for raw in raws:
            s.mail("alice@sender.test")
            s.rcpt("bob@example.com")
            code, reply = s.data(raw)
            assert code == 250
            ids.append(_event_id(reply))
    c = _inbound(smtp_settings)
    try:
        got = {e.id: e.raw for e in (events.decode(m.value()) for m in consume_n(c, 2))}
    finally:
        c.close()
    assert [got[i] for i in ids] == raws


def test_relay_to_a_foreign_domain_is_refused(server: int, smtp_settings: Settings) -> None:
    with smtplib.SMTP("127.0.0.1", server) as s:
        s.ehlo("mx.sender.test")
        s.mail("spammer@sender.test")
        code, reply = s.rcpt("victim@gmail.test")
        assert (code, reply[:5]) == (550, b"5.7.1")
        assert s.rcpt("victim@example.com.evil.test")[0] == 550  # a suffix of ours is not ours
        assert s.rcpt("victim@[127.0.0.1]")[0] == 550
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.data(RAW)
        assert refused.value.smtp_code == 503  # no valid recipient: no DATA
    assert _inbound_count(smtp_settings) == 0


def test_oversized_mail_is_refused_not_truncated(server: int, smtp_settings: Settings) -> None:
    big = RAW + b"x" * 100 + b"\r\n"
    big = big * (MAX_BYTES // len(big) + 1)
    with smtplib.SMTP("127.0.0.1", server) as s:
        s.ehlo("mx.sender.test")
        code, reply = s.mail("alice@sender.test", [f"SIZE={MAX_BYTES + 1}"])
        assert (code, reply[:5]) == (552, b"5.3.4")
        # A client that does not declare the size is refused after DATA, and the session goes on.
        assert s.mail("alice@sender.test")[0] == 250
        assert s.rcpt("bob@example.com")[0] == 250
        code, reply = s.data(big)
        assert (code, reply[:5]) == (552, b"5.3.4")
        assert s.noop()[0] == 250
    assert _inbound_count(smtp_settings) == 0


def test_too_many_recipients_get_452_and_the_rest_is_accepted(server: int, smtp_settings: Settings) -> None:
    with smtplib.SMTP("127.0.0.1", server) as s:
        s.ehlo("mx.sender.test")
        assert s.mail("<>")[0] == 250  # a bounce: the null reverse-path is accepted
        assert [s.rcpt(f"user{i}@example.com")[0] for i in range(3)] == [250, 250, 250]
        code, reply = s.rcpt("user3@example.com")
        assert (code, reply[:5]) == (452, b"4.5.3")
        assert s.data(RAW)[0] == 250
    c = _inbound(smtp_settings)
    try:
        [msg] = consume_n(c, 1)
    finally:
        c.close()
    event = events.decode(msg.value())
    assert event.envelope.mail_from == ""
    assert event.envelope.rcpt_to == ("user0@example.com", "user1@example.com", "user2@example.com")


def test_smtputf8_addresses_are_accepted_for_local_domains(server: int, smtp_settings: Settings) -> None:
    with smtplib.SMTP("127.0.0.1", server) as s:
        s.ehlo("mx.sender.test")
        assert s.has_extn("smtputf8")
        assert s.mail("jörg@absender.test", ["SMTPUTF8"])[0] == 250
        assert s.rcpt("zoë@example.com")[0] == 250
        assert s.data(RAW)[0] == 250
    c = _inbound(smtp_settings)
    try:
        [msg] = consume_n(c, 1)
    finally:
        c.close()
    env = events.decode(msg.value()).envelope
    assert (env.mail_from, env.rcpt_to) == ("jörg@absender.test", ("zoë@example.com",))


@pytest.mark.parametrize(("domain", "expected"), [
    ("Example.COM.", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("[192.0.2.1]", None),
    ("", None),
    ("ＥＸＡＭＰＬＥ.com", "example.com"),  # fullwidth letters: what they look like
    ("example\u3002com", "example.com"),  # an ideographic full stop is a dot
    ("exa\u200bmple.com", None),  # zero-width space: invisible, refused (IDNA would drop it)
    ("exam\u00adple.com", None),  # soft hyphen: likewise
    ("example.com\u200e", None),  # a left-to-right mark
])
def test_normalize_domain(domain: str, expected: str | None) -> None:
    assert normalize_domain(domain) == expected


def _raw_command(s: smtplib.SMTP, command: str) -> tuple[int, bytes]:
    """A command as the client wrote it, UTF-8 and all (smtplib would refuse non-ASCII)."""
    s.command_encoding = "utf-8"
    return s.docmd(command)


def test_lookalike_recipient_domains_reach_the_real_mailbox_or_are_refused(server: int,
                                                                         smtp_settings: Settings) -> None:
    with smtplib.SMTP("127.0.0.1", server) as s:
        s.ehlo("mx.sender.test")
        assert s.mail("alice@sender.test", ["SMTPUTF8"])[0] == 250
        for invisible in ("bob@exa\u200bmple.com", "bob@exam\u00adple.com", "b\u200bob@example.com"):
            assert _raw_command(s, f"RCPT TO:<{invisible}>")[0] == 553, invisible
        assert _raw_command(s, "RCPT TO:<bob@ＥＸＡＭＰＬＥ.com>")[0] == 250
        assert _raw_command(s, "RCPT TO:<carol@example\u3002com>")[0] == 250
        assert s.data(RAW)[0] == 250
    c = _inbound(smtp_settings)
    try:
        [msg] = consume_n(c, 1)
    finally:
        c.close()
    assert events.decode(msg.value()).envelope.rcpt_to == ("bob@example.com", "carol@example.com")


def test_nul_and_unannounced_non_ascii_addresses_are_refused(server: int) -> None:
    with smtplib.SMTP("127.0.0.1", server) as s:
        s.ehlo("mx.sender.test")
        assert _raw_command(s, "MAIL FROM:<al\x00ice@sender.test>")[0] == 553
        assert _raw_command(s, "MAIL FROM:<jörg@absender.test>")[0] == 553  # no SMTPUTF8 parameter
        assert s.mail("alice@sender.test")[0] == 250
        code, reply = _raw_command(s, "RCPT TO:<zoë@example.com>")  # a transaction without SMTPUTF8
        assert (code, reply[:5]) == (553, b"5.6.7")
        assert s.rcpt("bob@example.com")[0] == 250


def test_per_connection_message_limit(smtp_settings: Settings) -> None:
    ingress, port = _start(smtp_settings, max_messages_per_connection=1)
    try:
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.ehlo("mx.sender.test")
            s.mail("alice@sender.test")
            s.rcpt("bob@example.com")
            assert s.data(RAW)[0] == 250
            code, _ = s.mail("alice@sender.test")
            assert code == 421
    finally:
        ingress.stop()


def test_connection_limit_turns_clients_away_with_421(smtp_settings: Settings) -> None:
    ingress, port = _start(smtp_settings, max_connections=1)
    try:
        with smtplib.SMTP("127.0.0.1", port) as first:
            with pytest.raises(smtplib.SMTPConnectError) as busy:
                smtplib.SMTP("127.0.0.1", port)
            assert busy.value.smtp_code == 421
            assert first.noop()[0] == 250  # the session already open is served as before
        # once the first has gone, a new client gets in
        with wait_for(lambda: _connect(port), what="a free connection slot") as second:
            assert second.noop()[0] == 250
    finally:
        ingress.stop()


def test_unreachable_broker_gives_451_to_data(settings: Settings) -> None:
    unreachable = replace(settings, kafka=replace(settings.kafka, bootstrap_servers="127.0.0.1:1"),
                          smtp=replace(settings.smtp, ack_timeout_s=1.0))
    ingress, port = _start(unreachable)
    try:
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.ehlo("mx.sender.test")
            s.mail("alice@sender.test")
            assert s.rcpt("bob@example.com")[0] == 250
            code, reply = s.data(RAW)
        assert (code, reply[:5]) == (451, b"4.3.0")
    finally:
        ingress.stop()


def test_floodgate_smtp_stops_cleanly_on_sigterm(smtp_settings: Settings) -> None:
    """The real command: mail accepted before SIGTERM is on the topic, idle sessions get 421, exit 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | config.environment(smtp_settings) | {
        "FLOODGATE_SMTP_HOST": "127.0.0.1",
        "FLOODGATE_SMTP_PORT": str(port),
        "FLOODGATE_SMTP_DOMAINS": "example.com",
    }
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "smtp"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        s = wait_for(lambda: _connect(port), timeout=60, what="floodgate smtp to listen")
        s.ehlo("mx.sender.test")
        s.mail("alice@sender.test")
        s.rcpt("bob@example.com")
        code, reply = s.data(RAW)
        assert code == 250
        proc.send_signal(signal.SIGTERM)
        assert s.getreply()[0] == 421  # unasked: the server says goodbye, then hangs up
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.getreply()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert '"msg":"stopped"' in stderr
    c = _inbound(smtp_settings)
    try:
        [msg] = consume_n(c, 1)
    finally:
        c.close()
    assert events.decode(msg.value()).id == _event_id(reply)


def _connect(port: int) -> smtplib.SMTP | None:
    try:
        return smtplib.SMTP("127.0.0.1", port, timeout=30)
    except OSError:
        return None
