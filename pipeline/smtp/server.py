"""The SMTP server of one ingress process: sessions, limits, admission and the broker.

:class:`SmtpIngress` runs on its own asyncio loop in a thread (``start()`` returns the bound
port) and is the :class:`~pipeline.smtp.protocol.Host` of every session: it applies the
per-client limits (:mod:`pipeline.smtp.limits`), verifies the sender (:mod:`pipeline.smtp.auth`,
when ``auth.enabled``: SPF from the first accepted RCPT on, overlapping DATA; DKIM, ARC and DMARC
at the end of DATA; at most ``auth.budget_s`` in all), decides the lane of each accepted message
(:mod:`pipeline.admission`, which trusts only the names the message proved), hands it to the
broker (:mod:`pipeline.smtp.bridge`) and answers 250 only once the broker has it. Each ingress
process has its own verifier and DNS cache (in front mode, each session process).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import resource
import socket
import threading
import time
from typing import Any

from pipeline.admission import Admission
from pipeline.core import authres, events, metrics
from pipeline.core.config import Settings
from pipeline.smtp import addresses, auth
from pipeline.smtp.bridge import STAGE, DeliveryFailed, KafkaBridge
from pipeline.smtp.limits import Clients
from pipeline.smtp.protocol import Origin, Session, Transaction

log = logging.getLogger("floodgate.smtp")

REPLY_OK = "250 2.0.0 OK: queued as {id}"
REPLY_RELAY_DENIED = "550 5.7.1 <{rcpt}>: relay access denied"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 too many recipients"
REPLY_TEMPFAIL = "451 4.3.0 temporary failure, try again later"
REPLY_SHUTDOWN = "421 4.3.2 service shutting down, try again later"
REPLY_IDLE = "421 4.4.2 idle too long, closing connection"
# On shutdown, sessions waiting for an ack get this long beyond the ack timeout to finish.
SHUTDOWN_GRACE_S = 2.0
# The housekeeping tick: idle sessions closed, the event loop's lag measured. A tick that comes
# this much late means the loop is saturated: stress (clients with history first).
SWEEP_S = 0.5
LOOP_LAG_STRESS_S = 0.25
# Refused connections held open before their 421, under stress (Clients.tarpit: error_sleep_s,
# doubling for a client refused again, up to stress_error_sleep_max_s): a bot that reconnects at
# once then costs one accept every few seconds instead of thousands a second. At most this many
# are held at once, and never more than the open-files limit leaves (held_refusals_cap); past
# that a refusal is answered at once.
MAX_HELD_REFUSALS = 4000
# Descriptors kept for everything but sessions and held refusals: the broker's sockets, DNS,
# the metrics server, logs, the front's channels.
FD_RESERVE = 256
# Open files the ingress wants: max_connections sessions, MAX_HELD_REFUSALS held refusals and the
# reserve. A service manager's default soft limit (systemd: 1024) is below that; the hard limit
# (systemd: 524288) is not, and a process may raise its own soft limit.
OPEN_FILES_WANTED = 8192


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> int:
    """Raise this process's soft limit on open files towards ``wanted`` (never past the hard
    limit, never lower): an accept that fails for want of a descriptor is a client turned away.
    Returns the soft limit now in force; children (the session processes) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def held_refusals_cap(max_connections: int, open_files: int | None = None) -> int:
    """How many refusals a process may hold at once: :data:`MAX_HELD_REFUSALS`, or what the
    open-files limit (``open_files``, default this process's soft limit) leaves after
    ``max_connections`` sessions and :data:`FD_RESERVE`, whichever is less. Holding more would
    make the next accept fail for want of a descriptor, and that could be ham's."""
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if open_files == resource.RLIM_INFINITY:
        return MAX_HELD_REFUSALS
    return max(0, min(MAX_HELD_REFUSALS, open_files - max_connections - FD_RESERVE))


def relayed_event_id(relay: str, queue_id: str, mail_from: str, rcpt_to: list[str], raw: bytes) -> str:
    """The event id of a message a trusted relay forwarded with its queue id (XFORWARD IDENT):
    the same for every attempt at the same delivery, different for any other.

    A 451 cannot promise that the broker does not have the event: an acknowledgement may come
    after the answer, or a produce request in flight when the time ran out may have been written
    (seen with Postfix in front when the broker came back during a retry, tests/test_mailsystem.py).
    The relay then delivers again and the broker holds the message twice; with one id for both,
    the sinks keep one copy (a Maildir file and a quarantine row per event id, LMTP/SMTP
    delivery skips an id it already sent). The relay's queue id alone is not enough (Postfix
    reuses short queue ids), so the envelope and the message are part of it."""
    h = hashlib.blake2b(digest_size=16, person=b"floodgate-relay")
    for part in (relay, queue_id, mail_from, *rcpt_to):
        h.update(part.encode("utf-8", "surrogateescape") + b"\0")
    h.update(raw)
    return h.hexdigest()


def client_address(peer: Any) -> str:
    """The peer's IP address (an IPv4 client of a dual-stack listener as plain IPv4)."""
    host = str(peer[0]) if isinstance(peer, tuple) else str(peer or "")
    if ":" not in host:  # IPv4 as the kernel writes it: already canonical (no parse per accept)
        return host
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
    return host


def networks(specs: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Addresses or networks as settings give them; a bad entry fails at start, not at the first mail."""
    try:
        return [ipaddress.ip_network(s.strip(), strict=False) for s in specs if s.strip()]
    except ValueError as e:
        raise SystemExit(f"floodgate smtp: smtp.xforward_hosts: {e}") from None


class SmtpIngress:
    """One ingress process: the listening socket (or sockets handed over), every session."""

    def __init__(self, settings: Settings, *, host: str | None = None, port: int | None = None,
                 max_messages_per_connection: int | None = None, max_connections: int | None = None) -> None:
        s = settings.smtp
        self.settings = settings
        self.host = s.host if host is None else host
        self.port = s.port if port is None else port
        self.hostname = s.hostname
        self.max_message_bytes = s.max_message_bytes
        self.max_messages_per_connection = (s.max_messages_per_connection if max_messages_per_connection is None
                                            else max_messages_per_connection)
        if max_connections is not None:
            from dataclasses import replace

            s = replace(s, max_connections=max_connections)
        self.clients = Clients(s)
        self.domains = {d for d in (addresses.normalize_domain(x) for x in s.domains) if d}
        self.primary_domain = next(iter(s.domains), "")
        self.max_recipients = s.max_recipients
        self.trusted = networks(s.xforward_hosts)
        # Flooding sources go to the bulk lane before anything is queued (postscreen's idea).
        self.admission = Admission(settings, follow_reputation=False)
        # Sender authentication: results stamped on the message and recorded in the event.
        self.verifier = auth.Verifier(auth.config_from_settings(settings)) if settings.auth.enabled else None
        self.auth_tasks: set[asyncio.Task[Any]] = set()  # SPF checks started at RCPT, not yet awaited
        self.sessions: set[Session] = set()
        self.held_refusals = 0
        self.held_refusals_cap = held_refusals_cap(self.clients.s.max_connections)
        self.inflight = 0
        self.loop = asyncio.new_event_loop()
        self.idle = asyncio.Event()
        self.bridge: KafkaBridge
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # In a session process of several (pipeline/smtp/front.py): the line to the front, which
        # accepts the connections and keeps the connection limits; None when this process listens.
        self.front: Any = None

    # -- Host: what sessions ask ---------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic()

    def idle_timeout(self) -> float:
        return self.clients.idle_timeout(self.now())

    def hard_error_limit(self) -> int:
        return self.clients.hard_error_limit(self.now())

    def error_delay(self, session: Session) -> float:
        now, client = self.now(), session.origin().client
        if self.clients.stressed(now) and not self.clients.known(client):
            return self.clients.tarpit(client, now)
        return self.settings.smtp.error_sleep_s if session.errors >= self.settings.smtp.soft_error_limit else 0.0

    def trusted_relay(self, session: Session) -> bool:
        if not self.trusted:
            return False
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(session.peer)
            return any(ip in net for net in self.trusted)
        return False

    def opened(self, session: Session) -> str | None:
        now = self.now()
        if self.front is not None or self.trusted_relay(session):  # the front counted it
            session.counted = False
        else:
            refused = self.clients.connect(session.peer, now)
            if refused:
                metrics.SMTP_REFUSED.labels("connect", refused[:3]).inc()
                log.info("refused at connect", extra={"client": session.peer, "reply": refused})
                return refused
            session.counted = True
        self.sessions.add(session)
        return None

    def refusal_delay(self, session: Session) -> float:
        if self.held_refusals >= self.held_refusals_cap or not self.clients.stressed(self.now()):
            return 0.0
        self.held_refusals += 1
        session.held = True
        return self.clients.tarpit(session.peer, self.now())

    def refusal_closed(self, session: Session) -> None:
        if getattr(session, "held", False):
            self.held_refusals -= 1

    def closed(self, session: Session) -> None:
        self.sessions.discard(session)
        if getattr(session, "counted", False):
            self.clients.disconnect(session.peer)
        conn_id = getattr(session, "conn_id", None)
        if self.front is not None and conn_id is not None:
            self.front.send(f"X {conn_id}")

    def stress(self, reason: str) -> None:
        """A sign of stress seen here; the front hears of it too. Its onset is logged with the
        reason (calm ends: clients without history are held to their share and earn none)."""
        now = self.now()
        if not self.clients.stressed(now):
            log.info("stress", extra={"reason": reason})
        self.clients.stress(now)
        if self.front is not None:
            self.front.send("S")

    def check_mail(self, session: Session, origin: Origin) -> str | None:
        now = self.now()
        if not self.clients.known(origin.client) and self.admission.good.is_good([f"client:{origin.client}"]):
            self.clients.make_known(origin.client, now)  # history from the reputation topic
            log.info("client known", extra={"client": origin.client, "via": "reputation"})
            if self.front is not None:
                self.front.send(f"K {origin.client}")
        refused = self.clients.mail(origin.client, now)
        if refused:
            metrics.SMTP_REFUSED.labels("mail", refused[:3]).inc()
            log.info("deferred at MAIL", extra={"client": origin.client, "reply": refused})
            return refused
        session.limit_key = origin.client
        return None

    def transaction_ended(self, session: Session) -> None:
        session.spf_task = None  # a check started for a transaction that ended runs on into the cache
        key = getattr(session, "limit_key", None)
        if key is not None:
            self.clients.done(key)
            session.limit_key = None

    def check_rcpt(self, session: Session, address: str) -> tuple[str | None, str]:
        local, at, domain = address.rpartition("@")
        if not at and address.lower() == "postmaster":  # RFC 5321 4.5.1: always accepted
            local, domain = address, self.primary_domain
        ours = addresses.normalize_domain(domain)
        if ours not in self.domains:
            metrics.MESSAGES.labels(STAGE, "", "rejected").inc()
            log.info("relay denied", extra={"client": session.peer})
            return REPLY_RELAY_DENIED.format(rcpt=address), address
        if len(session.txn.rcpt_to) >= self.max_recipients:
            return REPLY_TOO_MANY_RCPTS, address
        if self.verifier is not None and not session.txn.rcpt_to:
            # SPF needs only the client, MAIL FROM and HELO: start it at the first accepted RCPT,
            # so that its DNS overlaps DATA (not at MAIL: a transaction refused at RCPT costs none).
            origin = session.origin()
            task = self.verifier.start_spf(origin.client, session.txn.mail_from or "", origin.helo)
            session.spf_task = task
            self.auth_tasks.add(task)
            task.add_done_callback(self.auth_tasks.discard)
        # Stored as normalised, so that every spelling of one address reaches one mailbox.
        return None, f"{local}@{ours}"

    async def _verify(self, session: Session, origin: Origin, txn: Transaction, raw: bytes) -> tuple[bytes, Any]:
        """The message stamped with our Authentication-Results (forged ones with our id removed)
        and the results for the event; within ``auth.budget_s`` (then temperror, never pass)."""
        assert self.verifier is not None
        spf_task = getattr(session, "spf_task", None)
        session.spf_task = None
        results = await self.verifier.verify(raw, client_ip=origin.client, mail_from=txn.mail_from or "",
                                             helo=origin.helo, spf_task=spf_task)
        stamped, forged = auth.stamp(raw, results, self.verifier.cfg.authserv_id)
        count_auth(results)
        if forged:
            metrics.ERRORS.labels(STAGE, "forged_authentication_results").inc()
        if results.timed_out:
            metrics.ERRORS.labels(STAGE, "auth_budget").inc()
        return stamped, results.to_meta()

    async def deliver(self, session: Session, origin: Origin, txn: Transaction, raw: bytes) -> str:
        extra: dict[str, Any] = {"relay": origin.relay, "relay_queue_id": origin.relay_queue_id} if origin.relay else {}
        # From the bytes the relay sent (before our stamp): its retry of the same message gets the same id.
        event_id = (relayed_event_id(origin.relay, origin.relay_queue_id, txn.mail_from or "", txn.rcpt_to, raw)
                    if origin.relay and origin.relay_queue_id else None)
        if self.verifier is not None:
            self.inflight += 1  # shutdown waits for this message's answer from here on
            try:
                raw, extra[authres.AUTH] = await self._verify(session, origin, txn, raw)
            finally:
                self.inflight -= 1
                if self.inflight == 0:
                    self.idle.set()
        event = events.new_event(
            events.Envelope(mail_from=txn.mail_from or "", rcpt_to=tuple(txn.rcpt_to),
                            client_address=origin.client, helo=origin.helo),
            raw, source="smtp", extra=extra, event_id=event_id)
        ctx = {"event_id": event.id, "client": origin.client, "helo": origin.helo,
               "rcpts": len(txn.rcpt_to), "bytes": len(raw)} | ({"relay": origin.relay} if origin.relay else {})
        if authres.AUTH in extra:  # the results in a word each (the header has the rest)
            meta = extra[authres.AUTH]
            ctx["auth"] = " ".join([f"spf={meta['spf']['mailfrom']['result']}",
                                    *(f"dkim={d['result']}" for d in meta["dkim"]), f"dmarc={meta['dmarc']['result']}"])
        now = self.now()
        calm = not self.clients.stressed(now)
        if not calm and not self.clients.known(origin.client):
            # Under stress, mail from clients without history goes to the bulk lane: a flood
            # spread thin over many sources, each under admission's own floor, stays out of ham's.
            topic = self.admission.divert(event)
        else:
            topic = self.admission.topic(event)
        if topic == self.admission.bulk:
            self.stress("admission diverted a flood")
        self.inflight += 1
        try:
            # accepted_at is stamped now; the ack follows within milliseconds when the broker is well.
            await self.bridge.send(topic, event.key, events.encode(event))
        except DeliveryFailed as e:
            metrics.MESSAGES.labels(STAGE, "", "deferred").inc()
            metrics.ERRORS.labels(STAGE, "broker").inc()
            log.warning("deferred: broker did not acknowledge", extra=ctx | {"error": str(e)})
            return REPLY_TEMPFAIL
        finally:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()
        if calm and topic == self.admission.inbound and self.clients.accepted(origin.client, self.now()):
            log.info("client known", extra={"client": origin.client, "via": "history"})
            if self.front is not None:
                self.front.send(f"K {origin.client}")
        metrics.MESSAGES.labels(STAGE, "", "accepted").inc()
        log.info("accepted", extra=ctx)
        return REPLY_OK.format(id=event.id)

    # -- the server ----------------------------------------------------------------------------
    def _session(self) -> Session:
        return _PeerSession(self)

    async def _listen(self, listen: bool) -> int:
        self._sweeper = self.loop.create_task(self._sweep())
        if not listen:
            return 0
        self._server = await self.loop.create_server(self._session, self.host, self.port, backlog=1024)
        return int(self._server.sockets[0].getsockname()[1])

    def adopt(self, sock: socket.socket, conn_id: int, client: str) -> None:
        """A connection the front accepted and screened (called on this process's loop)."""
        session = _PeerSession(self)
        session.conn_id = conn_id
        session.peer = client
        self.loop.create_task(self.loop.connect_accepted_socket(lambda: session, sock))

    async def _sweep(self) -> None:
        """Close idle sessions; a late tick means a saturated loop: stress."""
        expected = self.loop.time() + SWEEP_S
        while True:
            await asyncio.sleep(max(0.0, expected - self.loop.time()))
            late = self.loop.time() - expected
            expected = self.loop.time() + SWEEP_S
            now = self.now()
            if late > LOOP_LAG_STRESS_S:
                self.stress(f"event loop {late:.2f} s late")
            timeout = self.clients.idle_timeout(now)
            for session in list(self.sessions):
                if not session.busy and now - session.last_active > timeout:
                    metrics.SMTP_REFUSED.labels("idle", "421").inc()
                    session.close(REPLY_IDLE)

    def start(self, listen: bool = True) -> int:
        """Serve on ``host:port`` (returns the port), or only what :meth:`adopt` is given."""
        self.bridge = KafkaBridge(self.settings, self.loop)
        self.admission.good.start()
        self._thread = threading.Thread(target=self.loop.run_forever, name="smtp", daemon=True)
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._listen(listen), self.loop).result(10)
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
        if self._server is not None:
            self._server.close()  # no new connections
        if self._sweeper:
            self._sweeper.cancel()
        if self.inflight:
            # Sessions waiting for an ack get their answer (250 or 451) before we go.
            self.idle.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle.wait(), self.settings.smtp.ack_timeout_s + SHUTDOWN_GRACE_S)
        for session in list(self.sessions):
            session.close(REPLY_SHUTDOWN)
        for task in list(self.auth_tasks):
            task.cancel()
        if self.verifier is not None:
            await self.verifier.aclose()
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


def count_auth(r: auth.AuthResults) -> None:
    """Metrics of one verification (results are fixed vocabularies: bounded label sets)."""
    metrics.AUTH_SECONDS.observe(r.elapsed_s)
    metrics.AUTH_RESULTS.labels("spf", r.spf_mailfrom.result).inc()
    for d in r.dkim:
        metrics.AUTH_RESULTS.labels("dkim", d.result).inc()
    metrics.AUTH_RESULTS.labels("dmarc", r.dmarc.result).inc()
    if r.arc is not None:
        metrics.AUTH_RESULTS.labels("arc", r.arc.result).inc()


class _PeerSession(Session):
    """A session that learns its peer's address when the connection is made."""

    def __init__(self, host: SmtpIngress) -> None:
        super().__init__(host, "")
        self.counted = False  # counted in the client table (not a trusted relay)
        self.held = False  # a refusal held open for a while (refusal_delay)
        self.limit_key: str | None = None
        self.conn_id: int | None = None  # the front's id of a connection handed over
        self.spf_task: asyncio.Task[Any] | None = None  # SPF of the transaction, from its first RCPT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.conn_id is None:
            self.peer = client_address(transport.get_extra_info("peername"))
        super().connection_made(transport)
