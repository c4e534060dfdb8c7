"""SMTP ingress (``floodgate smtp``): accept mail for our domains and make it a durable event.

A message gets ``250`` only once the broker has acknowledged its event on its lane's topic
(``acks=all``, idempotent producer), so nothing that got a 250 can be lost. When the broker
is unreachable or slow, the reply is ``451 4.3.0`` and the sending server retries later: mail
waits in the sender's queue, never in ours.

Policy, in SMTP terms:

* RCPT to a domain outside ``settings.smtp.domains`` -> ``550 5.7.1`` (never an open relay);
  more than ``max_recipients`` -> ``452 4.5.3`` (RFC 5321 4.5.3.1.8: the client sends the rest
  in another transaction);
* ``SIZE`` is advertised; a declared or actual size above ``max_message_bytes`` -> ``552 5.3.4``
  (the body is read to its end and discarded, never truncated);
* a connection may carry at most ``max_messages_per_connection`` messages, then ``421 4.7.0``;
  at most ``max_connections`` sessions are open at once, further clients get ``421 4.7.0``;
* SMTPUTF8 is on: internationalised addresses are accepted for local domains, in a transaction
  whose MAIL FROM carries the SMTPUTF8 parameter (RFC 6531), else ``553 5.6.7``. Addresses are
  compared and stored normalised: the domain as IDNA (UTS #46 mapping: case, fullwidth forms,
  ideographic full stops) after NFC, the local part NFC; an address with a control character
  (NUL included) or an invisible one (zero-width, soft hyphen, bidirectional marks: Unicode
  format characters) is refused with ``553``, so that no lookalike reaches a mailbox no user reads;
* admission: mail from a source that floods goes to the bulk lane's topic, everything else to
  ``inbound`` (:mod:`pipeline.admission`), before it is queued anywhere.

Bridging asyncio and confluent-kafka: ``produce`` is called from the event loop, a thread
serves ``poll()``, and each delivery callback resolves its asyncio future through
``loop.call_soon_threadsafe``. (``confluent_kafka.aio.AIOProducer`` builds its own producer
and buffers up to a second in Python before producing; this keeps the one producer
configuration of :mod:`pipeline.kafka` and adds no latency.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import time
import unicodedata
from typing import Any, AnyStr

import idna
from aiosmtpd.smtp import SMTP, Envelope, Session
from confluent_kafka import KafkaError, KafkaException

from pipeline import kafka
from pipeline.admission import Admission
from pipeline.core import events, metrics
from pipeline.core.config import Settings
from pipeline.core.service import Service, freeze_start_up
from pipeline.kafka import topics
from pipeline.kafka.health import ClientHealth, first_problem

STAGE = "smtp"
log = logging.getLogger("floodgate.smtp")

# A sender with a legitimate queue reconnects; a spambot hammering one connection is cut off.
MAX_MESSAGES_PER_CONNECTION = 100
# Open sessions at once. Each may hold a message of up to max_message_bytes in memory, so this
# bounds memory and file descriptors under a connection flood; further clients get 421 and retry.
MAX_CONNECTIONS = 500
# librdkafka scans for timed-out messages about once a second: give its own verdict (the
# authoritative one) that long to arrive before the asyncio side gives up on the ack.
ACK_GRACE_S = 1.0
POLL_INTERVAL_S = 0.1
# On shutdown, sessions waiting for an ack get this long beyond the ack timeout to finish.
SHUTDOWN_GRACE_S = 2.0
# Readiness. After a message the broker did not acknowledge (a 451), the ingress is not ready
# until one is acknowledged again or this long has passed; from then on the broker's metadata
# decides, looked at every METADATA_CHECK_S: every partition of both lane topics has a leader
# and at least min.insync.replicas in sync, the condition for acks=all to succeed.
TEMPFAIL_HOLD_S = 10.0
METADATA_CHECK_S = 2.0
IDENT = "Floodgate ESMTP"
# RFC 5321 caps lines at 1000 octets, but real mail breaks it (HTML on one line; clients that
# end lines with a bare LF, which makes the whole message one "line"). aiosmtpd refuses such
# mail with 500; we accept lines up to this length instead, and store them unchanged. The end
# of DATA is still only CRLF.CRLF (no SMTP smuggling). It also bounds a connection's buffer.
LINE_LENGTH_LIMIT = 1024 * 1024

REPLY_OK = "250 2.0.0 OK: queued as {id}"
REPLY_RCPT_OK = "250 2.1.5 OK"
REPLY_RELAY_DENIED = "550 5.7.1 <{rcpt}>: relay access denied"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 too many recipients"
REPLY_BAD_ADDRESS = "553 5.1.3 address is not valid UTF-8"
REPLY_BAD_SENDER = "553 5.1.7 sender address has control or invisible characters"
REPLY_BAD_RECIPIENT = "553 5.1.3 recipient address has control or invisible characters"
REPLY_NEEDS_SMTPUTF8 = "553 5.6.7 non-ASCII address without the SMTPUTF8 parameter"
REPLY_TOO_MANY_MESSAGES = "421 4.7.0 too many messages on this connection, reconnect"
REPLY_TEMPFAIL = "451 4.3.0 temporary failure, try again later"
REPLY_SHUTDOWN = b"421 4.3.2 service shutting down, try again later\r\n"
REPLY_BUSY = b"421 4.7.0 too many connections, try again later\r\n"
# aiosmtpd's own size replies, given enhanced status codes (RFC 3463 5.3.4: message too big).
_SIZE_REPLIES = {
    "552 Error: message size exceeds fixed maximum message size":
        "552 5.3.4 message size exceeds fixed maximum message size",
    "552 Error: Too much mail data": "552 5.3.4 message exceeds fixed maximum message size",
}


class DeliveryFailed(Exception):
    """The broker did not acknowledge an event (unreachable, timeout, local queue full)."""


# Unicode categories an address must not contain: controls (NUL, CR, LF, ESC...) and format
# characters, the invisible ones (zero-width space and joiners, soft hyphen, bidirectional
# marks, the byte-order mark). IDNA would quietly drop some of them, so they are refused first.
_REFUSED_CATEGORIES = {"Cc", "Cf"}


def invisible_or_control(text: str) -> bool:
    return any(unicodedata.category(c) in _REFUSED_CATEGORIES for c in text)


def normalize_domain(domain: str) -> str | None:
    """The lower-case ASCII form of a domain (NFC, then IDNA with UTS #46 mapping: fullwidth
    letters and ideographic full stops become what they look like), or None when it cannot be
    one of ours (a literal, invisible or control characters, not a valid IDNA name)."""
    d = domain.strip()
    if not d or d.startswith("[") or invisible_or_control(d):  # address literals are never local here
        return None
    try:
        return idna.encode(unicodedata.normalize("NFC", d), uts46=True).decode("ascii").rstrip(".")
    except (idna.IDNAError, UnicodeError):
        return None


def valid_utf8(text: str) -> bool:
    """aiosmtpd decodes command arguments with surrogateescape: lone surrogates mean bad bytes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class KafkaBridge:
    """Produce from asyncio and await the broker's acknowledgement."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.settings = settings
        self.loop = loop
        self.ack_timeout_s = settings.smtp.ack_timeout_s
        self._fatal = threading.Event()
        self.lanes = {settings.topic("inbound"): "priority", settings.topic("bulk"): "bulk"}
        self.health = {t: ClientHealth(f"{lane} lane producer") for t, lane in self.lanes.items()}
        self.min_isr = {t.name: int(t.config["min.insync.replicas"]) for t in topics.desired(settings)
                        if t.name in self.lanes}
        self.last_ack: float | None = None
        self.last_tempfail: float | None = None
        self.metadata_problem: str | None = "the lane topics' metadata not read yet"
        self.producer = self._new_producer()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="smtp-kafka-poll", daemon=True)
        self._thread.start()
        self._meta_thread = threading.Thread(target=self._watch_metadata, name="smtp-kafka-metadata", daemon=True)
        self._meta_thread.start()

    def _new_producer(self) -> Any:
        def on_error(err: KafkaError) -> None:
            if err.fatal():
                self._fatal.set()
            log.warning("kafka error", extra={"error": str(err), "fatal": err.fatal()})

        # librdkafka gives up on a message after the same timeout, so that a message we
        # answered 451 for is rarely still in flight behind our back (see ``resolve``).
        return kafka.lane_producer(self.settings, {t: h.config() for t, h in self.health.items()},
                                   **{"message.timeout.ms": max(1, int(self.ack_timeout_s * 1000)),
                                      "error_cb": on_error})

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self._fatal.is_set():
                self._replace_producer()
            self.producer.poll(POLL_INTERVAL_S)

    def _watch_metadata(self) -> None:
        while not self._stop.wait(METADATA_CHECK_S if self.metadata_problem is None else METADATA_CHECK_S / 4):
            try:
                found = self.producer.list_topics(timeout=METADATA_CHECK_S)
            except KafkaException as e:
                self.metadata_problem = f"no metadata from the broker: {e.args[0]}"
                continue
            self.metadata_problem = None
            for topic, min_isr in self.min_isr.items():
                meta = found.topics.get(topic)
                if meta is None or meta.error is not None:
                    self.metadata_problem = f"topic {topic} unknown to the broker"
                    break
                weak = [p for p in meta.partitions.values() if p.leader < 0 or len(p.isrs) < min_isr]
                if weak:
                    self.metadata_problem = (f"{topic}: {len(weak)} partition(s) without a leader or with fewer "
                                             f"than {min_isr} in-sync replicas")
                    break

    def problem(self) -> str | None:
        """Why a message sent now would get 451, or None (``/readyz``)."""
        now = time.monotonic()
        if (self.last_tempfail is not None and (self.last_ack is None or self.last_ack < self.last_tempfail)
                and now - self.last_tempfail < TEMPFAIL_HOLD_S):
            return "the broker did not acknowledge the last message: answering 451"
        return first_problem([h.problem for h in self.health.values()] + [lambda: self.metadata_problem])

    def _replace_producer(self) -> None:
        """An idempotent producer that hit a fatal error (e.g. a sequence gap after broker data
        loss) refuses everything from then on: start a new one rather than 451 all mail forever."""
        self._fatal.clear()
        old, self.producer = self.producer, self._new_producer()
        metrics.ERRORS.labels(STAGE, "producer_fatal").inc()
        log.error("producer hit a fatal error; replaced it")
        old.purge()  # its undelivered events fail now, and their sessions get 451
        old.flush(0)

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        event_id = key.decode()

        def resolve(err: KafkaError | None) -> None:
            if fut.done():  # the SMTP side already gave up and answered 451
                if err is None:
                    metrics.ERRORS.labels(STAGE, "late_ack").inc()
                    log.warning("event acknowledged after its 451; the sender's retry will duplicate it",
                                extra={"event_id": event_id})
                return
            if err is None:
                self.last_ack = time.monotonic()
                fut.set_result(None)
            else:
                fut.set_exception(DeliveryFailed(str(err)))

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed at shutdown: nobody waits
                self.loop.call_soon_threadsafe(resolve, err)

        try:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
            except BufferError:
                raise DeliveryFailed("local producer queue full") from None
            except KafkaException as e:
                raise DeliveryFailed(str(e)) from None
            try:
                await asyncio.wait_for(fut, self.ack_timeout_s + ACK_GRACE_S)
            except TimeoutError:
                raise DeliveryFailed(f"no acknowledgement within {self.ack_timeout_s:g}s") from None
        except DeliveryFailed:
            self.last_tempfail = time.monotonic()
            raise

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join()
        self._meta_thread.join()
        self.producer.flush(timeout_s)


class _Server(SMTP):
    """aiosmtpd's SMTP with enhanced size replies, connection tracking and a message counter."""

    line_length_limit = LINE_LENGTH_LIMIT

    def __init__(self, ingress: SmtpIngress, **kwargs: Any) -> None:
        super().__init__(ingress.handler, **kwargs)
        self.ingress = ingress
        self.messages = 0  # accepted on this connection
        self.turned_away = False  # over the connection limit: no session was started

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.ingress.connections) >= self.ingress.max_connections:
            self.turned_away = True
            metrics.ERRORS.labels(STAGE, "too_many_connections").inc()
            transport.write(REPLY_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)
        self.ingress.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.turned_away:
            super().data_received(data)

    def eof_received(self) -> bool | None:
        return False if self.turned_away else super().eof_received()

    def connection_lost(self, error: Exception | None) -> None:
        if self.turned_away:
            return
        self.ingress.connections.discard(self)
        super().connection_lost(error)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and status in _SIZE_REPLIES:
            metrics.MESSAGES.labels(STAGE, "", "rejected").inc()
            log.info("rejected: too big", extra={"client": _client(self.session)})
            status = _SIZE_REPLIES[status]  # type: ignore[assignment]
        await super().push(status)


def _client(session: Session | None) -> str:
    """The peer's IP address (an IPv4 client of a dual-stack listener as plain IPv4)."""
    peer = session.peer if session else None
    host = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
    return host


class Handler:
    """aiosmtpd hooks: the policy above, and the hand-off to Kafka."""

    def __init__(self, ingress: SmtpIngress) -> None:
        s = ingress.settings
        self.ingress = ingress
        self.admission = ingress.admission
        self.domains = {d for d in (normalize_domain(x) for x in s.smtp.domains) if d}
        self.primary_domain = next(iter(s.smtp.domains), "")
        self.max_recipients = s.smtp.max_recipients

    async def handle_MAIL(self, server: _Server, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        if server.messages >= self.ingress.max_messages_per_connection:
            metrics.MESSAGES.labels(STAGE, "", "rejected").inc()
            log.info("connection message limit reached", extra={"client": _client(session)})
            # The reply is written before the loop runs this callback, then the connection closes.
            asyncio.get_running_loop().call_soon(server.transport.close)  # type: ignore[union-attr]
            return REPLY_TOO_MANY_MESSAGES
        if not valid_utf8(address):
            return REPLY_BAD_ADDRESS
        if invisible_or_control(address):
            return REPLY_BAD_SENDER
        if not address.isascii() and not envelope.smtp_utf8:
            return REPLY_NEEDS_SMTPUTF8
        address = unicodedata.normalize("NFC", address)
        envelope.mail_from = address  # "<>" (the null reverse-path of bounces) becomes "" in the event
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: _Server, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if not valid_utf8(address):
            return REPLY_BAD_ADDRESS
        if invisible_or_control(address):
            return REPLY_BAD_RECIPIENT
        if not address.isascii() and not envelope.smtp_utf8:
            return REPLY_NEEDS_SMTPUTF8
        local, at, domain = address.rpartition("@")
        if not at and address.lower() == "postmaster":  # RFC 5321 4.5.1: always accepted
            local, domain = address, self.primary_domain
        ours = normalize_domain(domain)
        if ours not in self.domains:
            metrics.MESSAGES.labels(STAGE, "", "rejected").inc()
            log.info("relay denied", extra={"client": _client(session)})
            return REPLY_RELAY_DENIED.format(rcpt=address)
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return REPLY_TOO_MANY_RCPTS
        # Stored as normalised, so that every spelling of one address reaches one mailbox.
        envelope.rcpt_tos.append(f"{unicodedata.normalize('NFC', local)}@{ours}")
        envelope.rcpt_options.extend(rcpt_options)
        return REPLY_RCPT_OK

    async def handle_DATA(self, server: _Server, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        mail_from = "" if envelope.mail_from == "<>" else (envelope.mail_from or "")
        helo = (session.host_name or "").encode("utf-8", "replace").decode("utf-8")
        event = events.new_event(
            events.Envelope(mail_from=mail_from, rcpt_to=tuple(envelope.rcpt_tos),
                            client_address=_client(session), helo=helo),
            raw, source="smtp")
        ctx = {"event_id": event.id, "client": event.envelope.client_address, "helo": helo,
               "rcpts": len(event.envelope.rcpt_to), "bytes": len(raw)}
        self.ingress.inflight += 1
        try:
            # accepted_at is stamped now; the ack follows within milliseconds when the broker is well.
            await self.ingress.bridge.send(self.admission.topic(event), event.key, events.encode(event))
        except DeliveryFailed as e:
            metrics.MESSAGES.labels(STAGE, "", "deferred").inc()
            metrics.ERRORS.labels(STAGE, "broker").inc()
            log.warning("deferred: broker did not acknowledge", extra=ctx | {"error": str(e)})
            return REPLY_TEMPFAIL
        finally:
            self.ingress.inflight -= 1
            if self.ingress.inflight == 0:
                self.ingress.idle.set()
        server.messages += 1
        metrics.MESSAGES.labels(STAGE, "", "accepted").inc()
        log.info("accepted", extra=ctx)
        return REPLY_OK.format(id=event.id)


class SmtpIngress:
    """The SMTP server on its own asyncio loop in a thread: ``start()`` returns the bound port."""

    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None,
                 max_messages_per_connection: int = MAX_MESSAGES_PER_CONNECTION,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.settings = settings
        self.host = settings.smtp.host if host is None else host
        self.port = settings.smtp.port if port is None else port
        self.max_messages_per_connection = max_messages_per_connection
        self.max_connections = max_connections
        # Flooding sources go to the bulk lane before anything is queued (postscreen's idea).
        self.admission = Admission(settings, follow_reputation=False)
        self.handler = Handler(self)
        self.connections: set[_Server] = set()
        self.inflight = 0
        self.loop = asyncio.new_event_loop()
        self.idle = asyncio.Event()
        self.bridge: KafkaBridge
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def _factory(self) -> _Server:
        s = self.settings.smtp
        return _Server(self, data_size_limit=s.max_message_bytes, enable_SMTPUTF8=True,
                       hostname=s.hostname, ident=IDENT, loop=self.loop)

    async def _listen(self) -> int:
        self._server = await self.loop.create_server(self._factory, self.host, self.port)
        return int(self._server.sockets[0].getsockname()[1])

    def start(self) -> int:
        self.bridge = KafkaBridge(self.settings, self.loop)
        self.admission.good.start()
        self._thread = threading.Thread(target=self.loop.run_forever, name="smtp", daemon=True)
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        except Exception:  # e.g. the port is taken: leave no thread or producer behind
            self.bridge.close(0)
            self.admission.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
            self._thread = None
            raise
        log.info("listening", extra={"host": self.host, "port": self.port,
                                     "domains": list(self.settings.smtp.domains)})
        return self.port

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()  # no new connections
        if self.inflight:
            # Sessions waiting for an ack get their answer (250 or 451) before we go.
            self.idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), self.settings.smtp.ack_timeout_s + SHUTDOWN_GRACE_S)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.write(REPLY_SHUTDOWN)
                conn.transport.close()
        await asyncio.sleep(0)  # let the transports flush and close

    def stop(self) -> None:
        if self._thread is None:
            return
        started = time.monotonic()
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(
                self.settings.smtp.ack_timeout_s + SHUTDOWN_GRACE_S + 5)
        self.bridge.close()
        self.admission.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
        self._thread = None
        log.info("stopped", extra={"shutdown_s": round(time.monotonic() - started, 3)})


def run(settings: Settings, service: Service) -> None:
    """``floodgate smtp``: serve until SIGTERM/SIGINT, then finish in-flight acks and exit."""
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd logs every command and address
    ingress = SmtpIngress(settings)
    ingress.start()
    service.checks.append(ingress.bridge.problem)
    freeze_start_up()
    service.ready.set()
    try:
        service.stopping.wait()
    finally:
        service.ready.clear()
        ingress.stop()
        service.close()
