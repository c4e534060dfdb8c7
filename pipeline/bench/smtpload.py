"""SMTP load generator: ham senders, flooding bots and connection hoggers over real SMTP.

The flood bench and ``python -m pipeline.bench smtp-load`` drive an ingress (``floodgate smtp``)
with it the way the internet does: every client connects from its own source address on
127/8 (any 127.x.y.z is a local address on Linux loopback, so a single host can play many
clients and the ingress sees each as distinct), and speaks EHLO / MAIL FROM / RCPT TO / DATA
(dot-stuffed) / QUIT in lock step, one command, one reply, as an MTA does against a server
that does not offer PIPELINING (aiosmtpd does not).

Roles:

* ham senders (:class:`HamSpec`): ``senders`` addresses on 127.1/16, together ``rate``
  messages a second, evenly spaced, one message per connection, corpus ham. Open loop: a
  message starts on time whether or not the previous one has finished (a real MTA runs
  deliveries in parallel), so a slow server shows as latency, not as a lower offered rate. A
  message turned away with a 4xx, a refused or reset connection, is retried after
  ``retry_delay_s`` as an MTA's queue would (counted), up to ``max_attempts``; a 5xx is final.
* bots (:class:`Shape`): ``bots`` addresses, each with ``conns`` concurrent connections in a
  closed loop ("as fast as the server takes it": a connection sends its next message as soon
  as the previous one got its reply), ``per_conn`` messages per connection, corpus spam from
  forged senders; optionally at most ``rate`` messages a second per bot.
* hoggers: bots that also hold ``idle`` connections open each, after EHLO, sending a NOOP every
  ``noop_s`` so that neither side times them out, and reopening them when the server drops them.

Phases (:class:`Phases`): warm-up, before, during (the bots and hoggers run), after, named as in
:mod:`pipeline.bench.flood`. Ham runs through all of them.

What is recorded (:class:`Transaction`, :class:`Failure`): per message, the wall time its
connection began and the seconds from then to each step's reply (``connect``, ``banner``,
``ehlo``, ``mail``, ``rcpt``, ``data`` for the 354, ``dot`` for the final reply), the event id
from Floodgate's ``250 2.0.0 OK: queued as <id>``, and the attempts it took; per failed step,
which step, the code and text of the 4xx/5xx, or ``refused``/``reset``/``timeout`` for the
connection. A delivered ham message's Maildir file is found by event id with
:mod:`pipeline.bench.accounting` (its ctime: after the data fsync), for connect -> Maildir.

Its own CPU: the generator runs on one asyncio loop in one thread, and measures that thread's
CPU time per phase (``time.thread_time``), reported per accepted message; other processes
(the ingress, the broker) can be watched from ``/proc`` alongside.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import random
import socket
import time
from collections import Counter, deque
from collections.abc import Container, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from models.corpus import Message
from pipeline import kafka
from pipeline.bench import accounting, authworld, traffic
from pipeline.bench.flood import stats
from pipeline.bench.reputation import cpu_seconds
from pipeline.core import config, senders
from pipeline.core.config import Settings
from pipeline.kafka import topics
from pipeline.node import STANDARD, Node, free_port
from pipeline.replay import TokenBucket

# Steps of one message, in order. ``connect`` is the TCP handshake, ``banner`` the server's
# greeting, ``data`` the 354 after DATA, ``dot`` the reply to the message (250 with the event id).
STEPS = ("connect", "banner", "ehlo", "mail", "rcpt", "data", "dot")
CONNECT, BANNER, EHLO, MAIL, RCPT, DATA, DOT = range(len(STEPS))
# Source networks on 127/8, one per role (127.<net>.<i // 250>.<i % 250 + 1>): the ingress sees
# each client as its own address. Bots of each preset get their own, so that runs of different
# shapes against one ingress do not inherit each other's admission history.
HAM_NET = 1
# Linux: bind() to a source address without taking an ephemeral port there; the port is picked
# at connect() for the 4-tuple, so tens of thousands of connections from one address do not
# exhaust its ports (TIME_WAIT included).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# A server that does not answer a step within this long is given up on (a timeout failure).
# Longer than the ingress's ack timeout (10 s) and its grace, so a 451 arrives first.
REPLY_TIMEOUT_S = 30.0
# After a refused or turned-away connection, a bot or hogger waits this long before it tries
# again (Shape.backoff_s): bots retry at once, but 120 connections retrying a 421 without a
# pause are thousands of connects a second, which cost the generator as much CPU as the ingress.
BOT_BACKOFF_S = 0.1
# How long after the last phase in-flight ham (retries included) may take to finish.
DRAIN_S = 30.0
QUEUED_AS = b"queued as "


# -- what is sent --------------------------------------------------------------------------
def dot_stuff(raw: bytes) -> bytes:
    """The DATA payload for ``raw``: leading dots doubled (RFC 5321 4.5.2), ended by CRLF.CRLF.

    Only dots after CRLF start a line for the server (the end of DATA is CRLF.CRLF and nothing
    else), so only those are doubled; a message not ending in CRLF gets one."""
    body = raw.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def crlf(raw: bytes) -> bytes:
    """Line ends as on the wire: a bare LF becomes CRLF, as a sending MTA makes it."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def _address(address: str) -> bytes:
    return address.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message ready for the wire: its commands and its dot-stuffed payload, built once."""

    mail: bytes  # the MAIL FROM command line
    rcpt: bytes  # the RCPT TO command line
    payload: bytes  # dot-stuffed, ending with CRLF.CRLF

    @property
    def script(self) -> tuple[tuple[int, bytes, bytes], ...]:
        return ((MAIL, self.mail, b"2"), (RCPT, self.rcpt, b"2"), (DATA, b"DATA\r\n", b"3"), (DOT, self.payload, b"2"))

    @classmethod
    def build(cls, mail_from: str, rcpt_to: str, raw: bytes) -> Outgoing:
        utf8 = not (mail_from + rcpt_to).isascii()
        return cls(b"MAIL FROM:<" + _address(mail_from) + b">" + (b" SMTPUTF8" if utf8 else b"") + b"\r\n",
                   b"RCPT TO:<" + _address(rcpt_to) + b">\r\n", dot_stuff(raw))


def ham_outgoing(ham: Sequence[Message], seed: int = 7) -> list[tuple[bytes, Outgoing]]:
    """(HELO name, message) per corpus ham, with the envelope ``floodgate replay`` gives it
    (sender from its headers, one recipient at a local domain), line ends made CRLF."""
    out = []
    for m in ham:
        env = traffic.SYNTH.envelope(m.raw, f"{seed}:{m.group}/{m.name}")
        out.append((env.helo.encode(), Outgoing.build(env.mail_from, env.rcpt_to[0], crlf(m.raw))))
    random.Random(seed).shuffle(out)
    return out


def spam_payloads(spam: Sequence[Message]) -> list[bytes]:
    return [dot_stuff(crlf(m.raw)) for m in spam]


def source(net: int, i: int) -> str:
    """The ``i``-th client address of a role's network on 127/8, each in a /24 of its own
    (127.<net>.<i % 250 + 1>.<i // 250 + 1>; never .0 or .255).

    Clients on the internet are spread over networks, and the ingress counts connections per /24
    and hands each /24 to one session process (``pipeline/smtp/front.py``). Packed into one /24, a
    shape's 60 bots were held to 50 connections by the per-network limit, and every bot of a shape
    landed in one session process, the ham senders' or the other one as the hash fell."""
    return f"127.{net}.{i % 250 + 1}.{i // 250 + 1}"


# -- what is measured ----------------------------------------------------------------------
@dataclass(slots=True)
class Transaction:
    """One message. For ham, its last attempt's steps and the wall time its first began."""

    role: str  # ham | bot
    client: str  # the source address it was sent from
    started: float  # wall time its (first) connection began; for a bot's later messages on a connection, MAIL
    at: list[float]  # seconds from the last attempt's start to each step's reply (nan: not reached)
    code: int = 0  # the reply that ended it: 250, a 4xx/5xx, or 0 (no reply: connection failed)
    event_id: str = ""
    attempts: int = 1
    done: float = 0.0  # wall time of that reply
    landed: float | None = None  # when its Maildir file was written (ctime), once looked up

    @property
    def accepted(self) -> bool:
        return self.code == 250


@dataclass(frozen=True, slots=True)
class Failure:
    """A reply that was not a success, or a connection that failed, at one step."""

    role: str  # ham | bot | idle
    client: str
    step: str  # one of STEPS, or "noop", "quit"
    code: int  # 4xx/5xx; 0 for a connection failure
    text: str  # the reply's text, or refused | reset | timeout | the OS error
    at: float  # wall time
    waited: float = math.nan  # seconds from the connection's start (a later message's: its MAIL) to this reply


class Rejected(Exception):
    """A 4xx/5xx reply, or a reply where none was expected (an unsolicited 421 before the banner)."""

    def __init__(self, step: int | str, line: bytes) -> None:
        super().__init__(line)
        self.step = step if isinstance(step, str) else STEPS[step]
        self.line = line

    @property
    def code(self) -> int:
        try:
            return int(self.line[:3])
        except ValueError:
            return 0


def _pending(at: list[float], first: int = CONNECT) -> str:
    """The step a connection failed in: the first from ``first`` on without a reply."""
    return next((STEPS[i] for i in range(first, len(at)) if math.isnan(at[i])), "quit")


def _waited(at: list[float], step: str) -> float:
    """Seconds from the start to the reply of ``step`` (nan when it has none: a NOOP's, say)."""
    return at[STEPS.index(step)] if step in STEPS else math.nan


def _connection_error(e: BaseException) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, EOFError)):
        return "reset"
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, OSError) and e.errno is not None:
        return os.strerror(e.errno)
    return type(e).__name__


async def _either(a: asyncio.Event, b: asyncio.Event) -> None:
    """Until one of two events is set."""
    waits = {asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())}
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


# -- the client ----------------------------------------------------------------------------
# One step of a script: (index in STEPS, the line to send first or None, the first byte of a good reply).
Step = tuple[int, bytes | None, bytes]


class _Client(asyncio.Protocol):
    """One SMTP client connection, driven by its replies.

    :meth:`run` takes a script of steps and returns one future for all of it: each reply (the
    final line of a multi-line one stands for it) is timed into ``at``, checked, and answered
    with the next step's line from the protocol callback itself, so a message costs the event
    loop one future and one task wake-up, not one per command (the generator's CPU is what the
    ingress does not get). The future's result is the last reply; a bad reply fails it with
    :class:`Rejected`, a lost connection with the connection's error."""

    __slots__ = ("at", "buf", "closed", "done", "i", "loop", "quitting", "replies", "script", "t0", "transport",
                 "woken")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.replies: deque[bytes] = deque()  # replies no script was waiting for (the banner, a 421)
        self.closed: BaseException | None = None
        self.quitting = False
        self.script: Sequence[Step] = ()
        self.i = 0
        self.at: list[float] = []
        self.t0 = 0.0
        self.done: asyncio.Future[bytes] | None = None
        # Set when the server speaks unasked (an idle session's 421) or hangs up: an idle client
        # learns of it then, not at its next command.
        self.woken = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        start = 0
        while (end := buf.find(b"\r\n", start)) >= 0:
            if buf[start + 3:start + 4] != b"-":  # "250-..." continues a reply, "250 ..." ends it
                self._reply(buf[start:end])
            start = end + 2
        self.buf = buf[start:]

    def _reply(self, line: bytes) -> None:
        done = self.done
        if done is None or done.done():
            if self.quitting:  # the 221: the server closes, so do we
                self.close()
            else:
                self.replies.append(line)
                self.woken.set()
            return
        step, _, ok = self.script[self.i]
        self.at[step] = time.monotonic() - self.t0
        if line[:1] != ok:
            done.set_exception(Rejected(step, line))
            return
        self.i += 1
        if self.i == len(self.script):
            done.set_result(line)
        else:
            send = self.script[self.i][1]
            if send is not None:
                self.transport.write(send)  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = exc or ConnectionResetError("connection closed by the server")
        self.woken.set()
        if self.done is not None and not self.done.done():
            self.done.set_exception(self.closed)

    def run(self, script: Sequence[Step], at: list[float], t0: float) -> asyncio.Future[bytes]:
        """Play ``script``, timing each reply into ``at`` (seconds since ``t0``, monotonic)."""
        self.script, self.i, self.at, self.t0 = script, 0, at, t0
        self.done = done = self.loop.create_future()
        if self.closed is not None and not self.replies:
            done.set_exception(self.closed)
            return done
        send = script[0][1]
        if send is not None:
            self.transport.write(send)  # type: ignore[union-attr]
        while self.replies and not done.done():  # what came before anyone asked
            self._reply(self.replies.popleft())
        if self.closed is not None and not done.done():
            done.set_exception(self.closed)
        return done

    def quit(self) -> None:
        """QUIT without waiting for the 221: the connection closes when it comes (or the server hangs up)."""
        if self.closed is None and self.transport is not None:
            self.quitting = True
            self.transport.write(b"QUIT\r\n")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int, src: str) -> _Client:
    """A TCP connection to ``host:port`` from the address ``src``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((src, 0))
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        _, proto = await loop.create_connection(_Client, sock=sock)
    except BaseException:
        sock.close()
        raise
    return proto


class Session:
    """An SMTP session in lock step (no PIPELINING); step times go into the ``at`` given."""

    __slots__ = ("client", "t0")

    def __init__(self, client: _Client, t0: float) -> None:
        self.client = client
        self.t0 = t0  # monotonic start the step times count from

    @classmethod
    async def open(cls, host: str, port: int, src: str, helo: bytes, at: list[float]) -> Session:
        """Connect from ``src``, read the banner, EHLO."""
        t0 = time.monotonic()
        client = await connect(host, port, src)
        at[CONNECT] = time.monotonic() - t0
        try:
            await client.run(((BANNER, None, b"2"), (EHLO, b"EHLO " + helo + b"\r\n", b"2")), at, t0)
        except BaseException:
            client.close()
            raise
        return cls(client, t0)

    def message(self, m: Outgoing, at: list[float]) -> asyncio.Future[bytes]:
        """MAIL, RCPT, DATA, the payload: the final reply's line (a 250), or :class:`Rejected`."""
        return self.client.run(m.script, at, self.t0)

    def noop(self, at: list[float]) -> asyncio.Future[bytes]:
        """NOOP (a hogger keeping its connection); its reply time goes where EHLO's went."""
        return self.client.run(((EHLO, b"NOOP\r\n", b"2"),), at, self.t0)

    def quit(self) -> None:
        self.client.quit()


def event_id(line: bytes) -> str:
    i = line.rfind(QUEUED_AS)
    return line[i + len(QUEUED_AS):].strip().decode("ascii", "replace") if i >= 0 else ""


# -- the scenario --------------------------------------------------------------------------
@dataclass
class HamSpec:
    senders: int = 20
    rate: float = 20.0  # messages a second from all senders together
    retry_delay_s: float = 1.0  # an MTA's retry interval, shortened to the bench's scale
    max_attempts: int = 5


@dataclass
class Shape:
    """Who floods, and how. ``bots == 0``: no flood (ham alone)."""

    name: str
    bots: int = 60
    conns: int = 2  # concurrent connections per bot, each a closed loop
    per_conn: int = 5  # messages per connection, then QUIT and reconnect
    idle: int = 0  # idle connections each bot holds open (hogging)
    noop_s: float = 20.0  # a hogger's NOOP interval (aiosmtpd times a session out after 300 s)
    rate: float | None = None  # at most this many messages a second per bot; None: as fast as taken
    net: int = 2  # the bots' addresses: 127.<net>.x.y
    campaign: bool = False  # one spam message for all (a campaign) instead of random corpus spam
    backoff_s: float = BOT_BACKOFF_S  # pause after a refused or rejected connection
    # What the bots send: "random" (corpus spam from random addresses at the bot's own domain),
    # or prepared mail (LoadGenerator's ``bot_mail``, in order): "forge-good" (spam forging a
    # known-good domain, pipeline.bench.authworld.forged_good), "signed" (legitimate bulk mail, a
    # new signing domain a message: authworld.signed_mail).
    mail: str = "random"


# The flood shapes of issue 23, deliverable 1. ``fast`` keeps 120 connections busy in a closed
# loop, several times the concurrency that saturates one ingress process (about 20): the
# offered load is whatever the ingress takes, and more. ``hog`` adds 10 idle connections per
# bot (600, beyond the ingress's 500-session limit). ``concentrated``: as many connections from
# 3 addresses, many messages each.
SHAPES = {
    "none": Shape("none", bots=0),
    "fast": Shape("fast", bots=60, conns=2, per_conn=5, net=2),
    "hog": Shape("hog", bots=60, conns=2, per_conn=5, idle=10, net=3),
    "concentrated": Shape("concentrated", bots=3, conns=40, per_conn=20, net=4),
    # Acceptance capacity: 20 clients as fast as they can, one connection and one message each
    # at a time (run with --no-ham, --pre 0 --post 0).
    "saturate": Shape("saturate", bots=20, conns=1, per_conn=1, net=5),
    # Issue 20: spam forging a known-good sender's domain (MAIL FROM and From) from 60 bots, failing
    # SPF, DKIM and DMARC: with verification on it must stay out of the priority lane.
    "forged-known-good": Shape("forged-known-good", bots=60, conns=2, per_conn=5, net=6, mail="forge-good"),
    # Acceptance capacity with legitimate signed mail (SPF, DKIM and DMARC pass), each message
    # from a new domain of the auth world: with --auth, verification's cost (run it twice on one
    # ingress for a cold and a warm cache).
    "saturate-signed": Shape("saturate-signed", bots=20, conns=1, per_conn=1, net=7, mail="signed"),
}


@dataclass
class Phases:
    warmup_s: float = 5.0
    pre_s: float = 10.0
    flood_s: float = 20.0
    post_s: float = 10.0

    @property
    def total_s(self) -> float:
        return self.warmup_s + self.pre_s + self.flood_s + self.post_s

    def bounds(self) -> list[tuple[str, float, float]]:
        """(name, start, end) in seconds from the run's start, the names of the flood bench."""
        out, t = [], 0.0
        for name, length in (("0-warmup", self.warmup_s), ("1-before", self.pre_s), ("2-during", self.flood_s),
                             ("3-after", self.post_s)):
            if length > 0:
                out.append((name, t, t + length))
            t += length
        return out


@dataclass
class Run:
    """What one run recorded; :func:`summarize` turns it into the report."""

    shape: Shape
    ham_spec: HamSpec | None
    phases: Phases
    target: str
    start: float = 0.0  # wall time of t = 0
    transactions: list[Transaction] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # phase -> process name -> CPU s
    connects: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> role -> connections attempted
    idle_held_max: int = 0
    generator_behind_max_s: float = 0.0  # how late the ham schedule started a message, at worst

    def ham(self) -> list[Transaction]:
        return [t for t in self.transactions if t.role == "ham"]


class LoadGenerator:
    """One run of a shape against an ingress at ``host:port``: ``asyncio.run(gen.run())``.

    ``watch``: other processes (name -> pid) whose CPU is read from ``/proc`` per phase."""

    def __init__(self, host: str, port: int, shape: Shape, phases: Phases, *,
                 ham: Sequence[tuple[bytes, Outgoing]] = (), ham_spec: HamSpec | None = None,
                 spam: Sequence[bytes] = (), watch: dict[str, int] | None = None, seed: int = 7,
                 reply_timeout_s: float = REPLY_TIMEOUT_S, bot_mail: Sequence[tuple[str, bytes]] = ()) -> None:
        if ham_spec is not None and not ham:
            raise ValueError("ham senders need ham to send")
        if shape.bots and not spam:
            raise ValueError("bots need spam to send")
        if shape.bots and shape.mail != "random" and not bot_mail:
            raise ValueError(f"shape {shape.name} needs prepared mail (bot_mail)")
        # (MAIL FROM, dot-stuffed payload) for shapes that send prepared mail, taken in turn.
        self.bot_mail = [(f, dot_stuff(crlf(raw))) for f, raw in bot_mail]
        self._next_bot_mail = 0
        self.host, self.port = host, port
        self.shape, self.phases = shape, phases
        self.ham, self.ham_spec, self.spam = list(ham), ham_spec, list(spam)
        self.watch = dict(watch or {})
        self.rng = random.Random(seed)
        self.reply_timeout_s = reply_timeout_s
        self.run_ = Run(shape, ham_spec, phases, f"{host}:{port}")
        self._flood_over = asyncio.Event()  # rebound to the running loop in run()
        self._idle_held = 0
        self._ham_tasks: set[asyncio.Task[Transaction]] = set()
        self.connects: Counter[str] = Counter()  # connections attempted, by role

    # -- ham -------------------------------------------------------------------------------
    async def send(self, src: str, helo: bytes, m: Outgoing) -> Transaction:
        """One ham message from the address ``src``, on a connection of its own, retried after a
        tempfail as ``ham_spec`` says (or :class:`HamSpec`'s defaults); recorded and returned."""
        spec = self.ham_spec or HamSpec()
        tx = Transaction("ham", src, time.time(), [math.nan] * len(STEPS))
        for attempt in range(1, spec.max_attempts + 1):
            tx.attempts = attempt
            tx.at = [math.nan] * len(STEPS)
            code = await self._attempt(tx, helo, m)
            if code == 250 or 500 <= code < 600:
                break
            if attempt < spec.max_attempts:
                await asyncio.sleep(spec.retry_delay_s)  # the MTA's queue: try again later
        self.run_.transactions.append(tx)
        return tx

    async def _attempt(self, tx: Transaction, helo: bytes, m: Outgoing) -> int:
        """One connection, one message; the code that ended it (0: the connection failed)."""
        session = None
        try:
            async with asyncio.timeout(self.reply_timeout_s):
                self.connects["ham"] += 1
                session = await Session.open(self.host, self.port, tx.client, helo, tx.at)
                line = await session.message(m, tx.at)
            tx.code, tx.event_id, tx.done = 250, event_id(line), time.time()
        except Rejected as r:
            tx.code, tx.done = r.code, time.time()
            self._fail(tx.role, tx.client, r.step, r.code, r.line, _waited(tx.at, r.step))
        except (OSError, TimeoutError, EOFError) as e:
            tx.code, tx.done = 0, time.time()
            self._fail(tx.role, tx.client, _pending(tx.at), 0, _connection_error(e))
        finally:
            if session is not None:
                session.quit()
        return tx.code

    def _fail(self, role: str, client: str, step: str, code: int, text: bytes | str,
              waited: float = math.nan) -> None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        self.run_.failures.append(Failure(role, client, step, code, text, time.time(), waited))

    async def _ham_schedule(self, t0: float, end: float) -> None:
        spec = self.ham_spec
        assert spec is not None
        senders = [source(HAM_NET, i) for i in range(spec.senders)]
        k = 0
        while (due := k / spec.rate) < end:
            delay = t0 + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the open loop
            else:
                self.run_.generator_behind_max_s = max(self.run_.generator_behind_max_s, -delay)
            helo, m = self.ham[k % len(self.ham)]
            task = asyncio.create_task(self.send(senders[k % len(senders)], helo, m))
            self._ham_tasks.add(task)
            task.add_done_callback(self._ham_tasks.discard)
            k += 1

    # -- bots and hoggers --------------------------------------------------------------------
    def _bot_message(self, bot: str, payload: bytes) -> Outgoing:
        if self.shape.mail != "random":
            sender, payload = self.bot_mail[self._next_bot_mail % len(self.bot_mail)]
            self._next_bot_mail += 1
            rcpt = traffic.SYNTH.recipient(f"{self.rng.getrandbits(64):016x}")
            return Outgoing(b"MAIL FROM:<" + sender.encode() + b">\r\n", b"RCPT TO:<" + rcpt.encode() + b">\r\n",
                            payload)
        sender = f"{self.rng.getrandbits(40):010x}@{bot}.example"
        rcpt = traffic.SYNTH.recipient(f"{self.rng.getrandbits(64):016x}")
        return Outgoing(b"MAIL FROM:<" + sender.encode() + b">\r\n", b"RCPT TO:<" + rcpt.encode() + b">\r\n", payload)

    async def _bot_connection(self, src: str, name: str, bucket: TokenBucket | None) -> None:
        shape = self.shape
        # A forger names itself after the domain it forges; the others after their own domain.
        helo = (f"mail.{authworld.GOOD}" if shape.mail == "forge-good" else f"{name}.example").encode()
        over = self._flood_over
        campaign = self.spam[0]
        while not over.is_set():
            tx = Transaction("bot", src, time.time(), [math.nan] * len(STEPS))
            first = CONNECT  # the first step of the message in hand (MAIL after a connection's first)
            session = None
            try:
                async with asyncio.timeout(self.reply_timeout_s):
                    self.connects["bot"] += 1
                    session = await Session.open(self.host, self.port, src, helo, tx.at)
                for i in range(shape.per_conn):
                    if over.is_set():
                        break
                    if bucket is not None:
                        wait = bucket.reserve(time.monotonic())
                        if wait > 0:
                            await asyncio.sleep(wait)
                    if i:
                        tx = Transaction("bot", src, time.time(), [math.nan] * len(STEPS))
                        session.t0, first = time.monotonic(), MAIL
                    payload = campaign if shape.campaign else self.spam[self.rng.randrange(len(self.spam))]
                    async with asyncio.timeout(self.reply_timeout_s):
                        line = await session.message(self._bot_message(name, payload), tx.at)
                    tx.code, tx.event_id, tx.done = 250, event_id(line), time.time()
                    self.run_.transactions.append(tx)
                backoff = False
            except Rejected as r:
                tx.code, tx.done = r.code, time.time()
                self.run_.transactions.append(tx)
                self._fail("bot", src, r.step, r.code, r.line, _waited(tx.at, r.step))
                backoff = True
            except (OSError, TimeoutError, EOFError) as e:
                self._fail("bot", src, _pending(tx.at, first), 0, _connection_error(e))
                backoff = True
            finally:
                if session is not None:
                    session.quit()
            if backoff:
                await asyncio.sleep(self.shape.backoff_s)

    async def _idle_connection(self, src: str, name: str) -> None:
        helo = f"{name}.example".encode()
        over = self._flood_over
        while not over.is_set():
            at = [math.nan] * len(STEPS)
            session = None
            try:
                async with asyncio.timeout(self.reply_timeout_s):
                    self.connects["idle"] += 1
                    session = await Session.open(self.host, self.port, src, helo, at)
                self._idle_held += 1
                self.run_.idle_held_max = max(self.run_.idle_held_max, self._idle_held)
                try:
                    client = session.client
                    client.woken.clear()  # by the banner, which came before anyone asked
                    while not over.is_set():
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.shape.noop_s):
                                await _either(over, client.woken)
                        if over.is_set():
                            break
                        if client.woken.is_set():  # the server closed it first (idle too long) or spoke
                            if client.replies:
                                raise Rejected("idle", client.replies.popleft())
                            raise client.closed or ConnectionResetError("connection closed by the server")
                        try:
                            async with asyncio.timeout(self.reply_timeout_s):
                                await session.noop(at)
                        except Rejected as r:
                            raise Rejected("noop", r.line) from None
                finally:
                    self._idle_held -= 1
                backoff = False
            except Rejected as r:
                self._fail("idle", src, r.step, r.code, r.line, _waited(at, r.step))
                backoff = True
            except (OSError, TimeoutError, EOFError) as e:
                self._fail("idle", src, _pending(at, CONNECT) if math.isnan(at[EHLO]) else "noop", 0,
                           _connection_error(e))
                backoff = True
            finally:
                if session is not None:
                    session.quit()
            if backoff:
                await asyncio.sleep(self.shape.backoff_s)

    async def _flood(self) -> None:
        shape = self.shape
        tasks = []
        for b in range(shape.bots):
            src, name = source(shape.net, b), f"bot{shape.net}-{b}"
            bucket = TokenBucket(shape.rate, burst=shape.conns, now=time.monotonic()) if shape.rate else None
            tasks += [asyncio.create_task(self._bot_connection(src, name, bucket)) for _ in range(shape.conns)]
            tasks += [asyncio.create_task(self._idle_connection(src, name)) for _ in range(shape.idle)]
        await asyncio.gather(*tasks)

    # -- the run -----------------------------------------------------------------------------
    def _cpu_sample(self) -> dict[str, float]:
        # The loop's thread alone (an ingress in the same process, as in the tests, is not counted),
        # and the generator's whole process from /proc.
        sample = {"generator": time.thread_time(), "generator_process": cpu_seconds(os.getpid())}
        for name, pid in self.watch.items():
            with contextlib.suppress(OSError):
                sample[name] = cpu_seconds(pid, tree=True)  # an ingress's session processes too
        return sample

    async def run(self, start_at: float | None = None) -> Run:
        """The phases, from now or from the wall time ``start_at`` (when a generator in another
        process plays the other roles: :func:`run_split`)."""
        ph = self.phases
        self._flood_over = asyncio.Event()
        if start_at is not None:
            await asyncio.sleep(max(0.0, start_at - time.time()))
        t0 = time.monotonic()
        self.run_.start = time.time()
        ham = asyncio.create_task(self._ham_schedule(t0, ph.total_s)) if self.ham_spec else None
        flood: asyncio.Task[None] | None = None
        last, connects = self._cpu_sample(), Counter(self.connects)
        for name, _start, end in ph.bounds():
            if name == "2-during" and self.shape.bots:
                flood = asyncio.create_task(self._flood())
            await asyncio.sleep(max(0.0, t0 + end - time.monotonic()))  # until the phase's end
            if name == "2-during":
                self._flood_over.set()
            now = self._cpu_sample()
            self.run_.cpu[name] = {k: round(now[k] - last[k], 3) for k in now if k in last}
            self.run_.connects[name] = dict(self.connects - connects)
            last, connects = now, Counter(self.connects)
        if flood is not None:
            await asyncio.wait({flood}, timeout=self.reply_timeout_s)
        if ham is not None:
            await ham
        if self._ham_tasks:  # in flight, or waiting to retry
            _, pending = await asyncio.wait(set(self._ham_tasks), timeout=DRAIN_S)
            for task in pending:
                task.cancel()
        return self.run_


# -- ham and bots in two processes ---------------------------------------------------------
# Step times are taken by the generator's event loop: with the bots on the same loop, a ham
# reply waits there behind the flood's replies and refusals (thousands a second) and the wait
# counts against the ingress. So in :func:`run_split` the bots and hoggers run in a process of
# their own, as they would on other hosts, and the ham senders' loop stays nearly idle.
CHILD_READY_S = 120.0  # the bots' process imports the product and takes the corpus first (a loaded host)
START_AFTER_S = 1.0  # both processes start their phases this long after the bots' process is ready


def _bots_process(conn: Connection, host: str, port: int, shape: Shape, phases: Phases, spam: list[bytes],
                  seed: int, bot_mail: list[tuple[str, bytes]]) -> None:
    """The bots' process (:func:`run_split`): ready, then the phases from the start time given."""
    gen = LoadGenerator(host, port, shape, phases, spam=spam, seed=seed, bot_mail=bot_mail)
    conn.send(True)
    start_at = conn.recv()
    conn.send(asyncio.run(gen.run(start_at)))
    conn.close()


def run_split(host: str, port: int, shape: Shape, phases: Phases, *, ham: Sequence[tuple[bytes, Outgoing]],
              spam: Sequence[bytes], ham_spec: HamSpec | None, watch: dict[str, int] | None = None,
              seed: int = 7, bot_mail: Sequence[tuple[str, bytes]] = ()) -> Run:
    """One run with the bots and hoggers in a child process and the ham senders here, started
    at the same wall time; one :class:`Run` of both. The child's CPU is ``generator-bots``."""
    if not shape.bots:
        gen = LoadGenerator(host, port, shape, phases, ham=ham, ham_spec=ham_spec, watch=watch, seed=seed,
                            bot_mail=bot_mail)
        return asyncio.run(gen.run())
    ctx = multiprocessing.get_context("spawn")  # this process has threads (samplers, Kafka clients): no fork
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_bots_process, name="smtpload-bots", daemon=True,
                        args=(theirs, host, port, shape, phases, list(spam), seed, list(bot_mail)))
    child.start()
    theirs.close()
    try:
        if not ours.poll(CHILD_READY_S):
            raise RuntimeError(f"the bots' process was not ready within {CHILD_READY_S:.0f} s")
        ours.recv()
        start_at = time.time() + START_AFTER_S
        ours.send(start_at)
        gen = LoadGenerator(host, port, replace(shape, bots=0), phases, ham=ham, ham_spec=ham_spec,
                            watch={**(watch or {}), "generator-bots": child.pid}, seed=seed)  # type: ignore[dict-item]
        run = asyncio.run(gen.run(start_at))
        if not ours.poll(REPLY_TIMEOUT_S + DRAIN_S):
            raise RuntimeError("the bots' process did not report its run")
        bots: Run = ours.recv()
    finally:
        ours.close()
        child.join(10)
        if child.is_alive():
            child.kill()
            child.join()
    return _merge(run, bots, shape)


def _merge(ham: Run, bots: Run, shape: Shape) -> Run:
    ham.shape = shape
    ham.transactions += bots.transactions
    ham.failures += bots.failures
    for phase, counts in bots.connects.items():
        mine = ham.connects.setdefault(phase, {})
        for role, n in counts.items():
            mine[role] = mine.get(role, 0) + n
    ham.idle_held_max = bots.idle_held_max
    return ham


# -- end to end ----------------------------------------------------------------------------
def attach_maildir(run: Run, found: accounting.Found) -> int:
    """Each accepted ham message's Maildir write time (the file's ctime, from the accounting's
    scan, by the event id the 250 carried); returns how many were found."""
    n = 0
    for tx in run.ham():
        times = found.delivered.get(tx.event_id) if tx.event_id else None
        if times:
            tx.landed = min(times)
            n += 1
    return n


def maildir_found(root: Path) -> accounting.Found:
    found = accounting.Found()
    accounting.scan_maildirs(root, found)
    return found


# -- the report ----------------------------------------------------------------------------
def _steps(txs: list[Transaction]) -> dict[str, dict[str, Any]]:
    """Per step, seconds from the previous step's reply (connect: from the start)."""
    out: dict[str, list[float]] = {s: [] for s in STEPS}
    for tx in txs:
        prev = 0.0
        for i, t in enumerate(tx.at):
            if not math.isnan(t):
                out[STEPS[i]].append(t - prev)
                prev = t
    return {s: _stats(v) for s, v in out.items() if v}


def _stats(values: list[float]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats(values).items()}


# The ingress answers a refusal or a deferral at once (milliseconds) unless it holds it first (a
# tarpit of smtp.error_sleep_s, 1 s: under stress, for clients without history): a 4xx that came
# this long after its connection (or its MAIL) began was held. A sign of stress seen from outside.
HELD_S = 0.5


def _failure_counts(failures: list[Failure]) -> dict[str, int]:
    return {
        "held_4xx": sum(1 for f in failures if 400 <= f.code < 500 and f.waited >= HELD_S),
        "replies_4xx": sum(1 for f in failures if 400 <= f.code < 500),
        "replies_421": sum(1 for f in failures if f.code == 421),
        "replies_451": sum(1 for f in failures if f.code == 451),
        "replies_5xx": sum(1 for f in failures if 500 <= f.code < 600),
        "refused": sum(1 for f in failures if f.code == 0 and f.text == "refused"),
        "reset": sum(1 for f in failures if f.code == 0 and f.text == "reset"),
        "timeout": sum(1 for f in failures if f.code == 0 and f.text == "timeout"),
        "other_errors": sum(1 for f in failures if f.code == 0 and f.text not in ("refused", "reset", "timeout")),
    }


def summarize(run: Run) -> dict[str, Any]:
    """Per phase: ham's SMTP step times and connect -> 250 (and -> Maildir when looked up),
    failures per role, accepted messages a second in total and per role, CPU per message."""
    rel = run.start
    phases: dict[str, Any] = {}
    for name, start, end in run.phases.bounds():
        seconds = end - start

        def within(t: float, start: float = start, end: float = end) -> bool:
            return start <= t - rel < end

        ham = [t for t in run.transactions if t.role == "ham" and within(t.started)]
        ok = [t for t in ham if t.accepted]
        accepted = {role: sum(1 for t in run.transactions if t.role == role and t.accepted and within(t.done))
                    for role in ("ham", "bot")}
        failures = [f for f in run.failures if within(f.at)]
        total = sum(accepted.values())
        cpu = run.cpu.get(name, {})
        phase: dict[str, Any] = {
            "seconds": seconds,
            "ham": {
                "sent": len(ham), "accepted": len(ok), "failed": len(ham) - len(ok),
                "retried": sum(1 for t in ham if t.attempts > 1), "retries": sum(t.attempts - 1 for t in ham),
                "steps": _steps(ok),
                "connect_to_250": _stats([t.done - t.started for t in ok]),
                "transaction": _stats([t.at[DOT] for t in ok]),  # the last attempt's connect -> 250
                **({"connect_to_maildir": _stats([t.landed - t.started for t in ok if t.landed is not None]),
                    "in_maildir": sum(1 for t in ok if t.landed is not None)}
                   if any(t.landed is not None for t in run.transactions) else {}),
                **_failure_counts([f for f in failures if f.role == "ham"]),
            },
            "bot": {
                "accepted": accepted["bot"],
                # messages the bots began (a MAIL sent, or a connection opened for one), taken or not
                "attempted": (sum(1 for t in run.transactions if t.role == "bot" and within(t.started))
                              + sum(1 for f in failures if f.role == "bot" and f.code == 0)),
                # from the connect for a connection's first message, from MAIL for the others
                "start_to_250": _stats([t.done - t.started for t in run.transactions
                                          if t.role == "bot" and t.accepted and within(t.started)]),
                **_failure_counts([f for f in failures if f.role == "bot"]),
            },
            "idle": _failure_counts([f for f in failures if f.role == "idle"]),
            "accepted_per_s": {"total": round(total / seconds, 1),
                               **{role: round(n / seconds, 1) for role, n in accepted.items()}},
            "connects_per_s": {role: round(n / seconds, 1) for role, n in run.connects.get(name, {}).items()},
            "cpu_s": cpu,
            "cpu_ms_per_message": {proc: round(1000 * s / total, 3) for proc, s in cpu.items()} if total else {},
            "generator_cpu_ms_per_connect": (
                round(1000 * (cpu["generator"] + cpu.get("generator-bots", 0.0)) / sum(run.connects[name].values()), 3)
                if "generator" in cpu and sum(run.connects.get(name, {}).values()) else None),
        }
        phases[name] = phase
    errors = Counter((f.role, f.step, f.code, f.text[:80]) for f in run.failures)
    return {
        "target": run.target,
        "shape": asdict(run.shape),
        "ham": asdict(run.ham_spec) if run.ham_spec else None,
        "phases_s": asdict(run.phases),
        "started_at": run.start,
        "idle_held_max": run.idle_held_max,
        "generator_behind_max_s": round(run.generator_behind_max_s, 3),
        "phases": phases,
        "failures": [{"role": r, "step": s, "code": c, "text": t, "count": n}
                     for (r, s, c, t), n in errors.most_common(30)],
    }


def table(summary: dict[str, Any]) -> str:
    """A few lines for a terminal."""
    lines = [f"shape {summary['shape']['name']} against {summary['target']}; idle connections held at most "
             f"{summary['idle_held_max']}; seconds",
             f"{'phase':9} {'ham c->250 p50':>14} {'p99':>7} {'c->maildir p99':>14} {'ham 4xx':>7} {'ham 421':>7} "
             f"{'retried':>7} {'failed':>6} {'bot 4xx':>7} {'msg/s':>7} {'ham/s':>6} {'bot/s':>7} "
             f"{'gen ms/msg':>10}"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"
    for name, p in summary["phases"].items():
        h, b, r = p["ham"], p["bot"], p["accepted_per_s"]
        c = h["connect_to_250"]
        lines.append(f"{name[2:]:9} {f(c.get('p50')):>14} {f(c.get('p99')):>7} "
                     f"{f(h.get('connect_to_maildir', {}).get('p99')):>14} {h['replies_4xx']:>7} "
                     f"{h['replies_421']:>7} {h['retried']:>7} {h['failed']:>6} {b['replies_4xx']:>7} "
                     f"{r['total']:>7} {r['ham']:>6} {r['bot']:>7} "
                     f"{p['cpu_ms_per_message'].get('generator', float('nan')):>10.3f}")
    return "\n".join(lines)


def load_corpus(data_dir: Path, seed: int = 7) -> tuple[list[tuple[bytes, Outgoing]], list[bytes]]:
    """Held-out corpus ham (with envelopes) and spam payloads, as the flood bench uses them."""
    from pipeline.bench.flood import load_mail

    ham, spam = load_mail(data_dir)
    return ham_outgoing(ham, seed), spam_payloads(spam)


# Ham senders' own signing domains in the auth world (beside the known-good one, authworld.GOOD).
AUTH_HAM_DOMAINS = 50
GOOD_KEYS = (f"{senders.DOMAIN}{authworld.GOOD}",)  # published known-good before an auth bench's ingress starts


@dataclass
class AuthMail:
    """The mail of a bench whose ingress verifies senders against :mod:`pipeline.bench.authworld`'s
    zones: signed ham (from the ham senders' domains and, every tenth, the known-good domain
    itself), and the bots' prepared mail by :attr:`Shape.mail`."""

    world: authworld.World
    ham: list[tuple[bytes, Outgoing]]  # (HELO, message), as :func:`ham_outgoing`
    bodies: list[bytes]  # the corpus ham, CRLF line ends (signed_mail signs them again for later runs)
    bot_mail: dict[str, list[tuple[str, bytes]]]  # Shape.mail -> (MAIL FROM, message)
    signed_domains: int  # domains 0 .. signed_domains - 1 sign "signed" mail; the ham's come after


def auth_mail(data_dir: Path, signed_domains: int = 0, ham_domains: int = AUTH_HAM_DOMAINS) -> AuthMail:
    """The auth world (its zones for :class:`~pipeline.bench.dnsserver.KnotServer`) and its mail:
    signed corpus ham, ``forge-good`` (corpus spam forging the known-good domain) and ``signed``
    (legitimate bulk mail, one of ``signed_domains`` domains a message)."""
    from pipeline.bench.flood import load_mail

    ham_msgs, spam_msgs = load_mail(data_dir)
    world = authworld.build(signed_domains + ham_domains)
    bodies = [crlf(m.raw) for m in ham_msgs]
    ham = [(helo.encode(), Outgoing.build(f, traffic.SYNTH.recipient(str(i)), raw))
           for i, (helo, f, raw) in enumerate(authworld.ham_mail(world, bodies, signed_domains, ham_domains))]
    bot_mail = {"forge-good": [authworld.forged_good(crlf(m.raw)) for m in spam_msgs],
                "signed": authworld.signed_mail(world, bodies, 0, signed_domains) if signed_domains else []}
    return AuthMail(world, ham, bodies, bot_mail, signed_domains)


def iter_shapes(names: str) -> Iterator[Shape]:
    for name in (n.strip() for n in names.split(",")):
        if name not in SHAPES:
            raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
        yield SHAPES[name]


def run_shape(host: str, port: int, shape: Shape, phases: Phases, *, ham: Sequence[tuple[bytes, Outgoing]],
              spam: Sequence[bytes], ham_spec: HamSpec | None, watch: dict[str, int] | None = None,
              e2e: Settings | None = None, e2e_timeout_s: float = 120.0, seed: int = 7,
              bot_mail: Sequence[tuple[str, bytes]] = (), lanes: Settings | None = None) -> dict[str, Any]:
    """One run on a fresh event loop, summarised. ``e2e``: the pipeline's settings, to wait for
    the accepted ham in its Maildirs (or quarantine, or dead-letter topic) and time connect ->
    Maildir; the load average is noted before and after."""
    load_before = os.getloadavg()
    run = run_split(host, port, shape, phases, ham=ham, spam=spam, ham_spec=ham_spec, watch=watch, seed=seed,
                    bot_mail=bot_mail)
    load_after = os.getloadavg()
    extra: dict[str, Any] = {}
    if lanes is not None:  # which lane each accepted message went to, from the private topics
        extra["lanes"] = lane_report(run, lanes)
    if e2e is not None:
        ids = {t.event_id for t in run.ham() if t.accepted}
        accounting.wait_accounted(e2e, ids, e2e_timeout_s)
        attach_maildir(run, maildir_found(e2e.paths.maildir_root))
    return summarize(run) | extra | {"loadavg_before": [round(x, 2) for x in load_before],
                                     "loadavg_after": [round(x, 2) for x in load_after]}


# Issue 20's target: no flood message in the priority lane after the flood's first second.
FIRST_SECOND_S = 1.0


def lane_report(run: Run, settings: Settings, timeout_s: float = 60.0) -> dict[str, Any]:
    """Where the run's accepted messages went: bot and ham messages on the priority lane's topic
    (``inbound``) and on ``bulk``, by event id; bot messages in the priority lane in the flood's
    first second and after it (by the time of their 250)."""
    ids: dict[str, set[str]] = {}
    for lane, key in (("priority", "inbound"), ("bulk", "bulk")):
        ids[lane] = {k.decode() for k, _v in kafka.read(settings, settings.topic(key), timeout_s=timeout_s) if k}
    out: dict[str, Any] = {}
    for role in ("bot", "ham"):
        txs = [t for t in run.transactions if t.role == role and t.accepted and t.event_id]
        out[role] = {lane: sum(1 for t in txs if t.event_id in found) for lane, found in ids.items()}
    return out | bots_in_priority(run, ids["priority"])


def bots_in_priority(run: Run, priority: Container[str]) -> dict[str, int]:
    """Accepted bot messages whose event id is in ``priority`` (the priority lane's), in the
    flood's first second and after it, by the time of their 250: issue 20's measure."""
    flood_start = run.start + run.phases.warmup_s + run.phases.pre_s
    bots = [t for t in run.transactions if t.role == "bot" and t.accepted and t.event_id in priority]
    return {"bot_priority_first_second": sum(1 for t in bots if t.done - flood_start <= FIRST_SECOND_S),
            "bot_priority_after_first_second": sum(1 for t in bots if t.done - flood_start > FIRST_SECOND_S)}


# -- the processes under test --------------------------------------------------------------
# The workers a message's way from the ingress to a Maildir or the quarantine needs: the standard
# node less reputation (advisory: it only makes senders known-good, which a short load run does
# not reach, and on a loaded host it was not ready within the node's 120 s).
MAIL_PATH = [w for w in STANDARD if w != "reputation"]


@contextmanager
def ingress_process(base: Settings, workdir: Path, *, workers: bool = False, auth_dns_port: int | None = None,
                    good: Sequence[str] = (), processes: int | None = None) -> Iterator[tuple[Settings, Node]]:
    """``floodgate smtp`` as its own process (at the ingress's niceness, as a node runs it) on
    private topics and a free port, with the workers of :data:`MAIL_PATH` too when ``workers``
    (a model champion needed): yields its settings (``settings.smtp.port``) and the node; afterwards
    stops it and deletes the topics. Sender authentication is off, or, with ``auth_dns_port``,
    on against the DNS server at 127.0.0.1 on that port; ``good``: sender keys published as
    known-good on the private reputation topic before the ingress starts (admission reads them)."""
    settings = config.private(base, "smtpload-", workdir)
    settings = replace(settings, smtp=replace(settings.smtp, host="127.0.0.1", port=free_port(),
                                              processes=settings.smtp.processes if processes is None else processes))
    settings = verifying(settings, auth_dns_port) if auth_dns_port is not None else replace(
        settings, auth=replace(settings.auth, enabled=False))
    admin = kafka.admin(settings)
    topics.apply(settings, admin)
    if good:
        publish_good(settings, good)
    node = Node(settings, workdir / "logs")  # a free port per worker
    try:
        node.start("smtp", ["smtp"])
        if workers:
            node.start_standard(MAIL_PATH)
        node.wait_ready()
        yield settings, node
    finally:
        node.stop_all()
        topics.delete(settings, admin)


def verifying(settings: Settings, dns_port: int) -> Settings:
    """``settings`` with sender authentication on against the private DNS server (a
    :class:`~pipeline.bench.dnsserver.KnotServer` serving the auth world) at 127.0.0.1:``dns_port``."""
    return replace(settings, auth=replace(settings.auth, enabled=True, nameservers=("127.0.0.1",), dns_port=dns_port))


def publish_good(settings: Settings, keys: Sequence[str]) -> None:
    """Standing records making ``keys`` known-good, as the reputation worker would publish them."""
    producer = kafka.producer(settings)
    for key in keys:
        k, v = senders.encode_standing(senders.Standing(key=key, good=True, ham=100, updated_at=time.time()))
        producer.produce(settings.topic("reputation"), key=k, value=v)
    if producer.flush(30):
        raise RuntimeError("the known-good standings were not acknowledged")


def listening_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this host (Linux ``/proc``), e.g. the broker."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return pid
    return None


def broker_pid(settings: Settings) -> int | None:
    """The process of the first bootstrap broker, when it runs on this host (its CPU is read too)."""
    return listening_pid(int(settings.kafka.bootstrap_servers.split(",")[0].rpartition(":")[2]))


def children(pid: int) -> list[int]:
    """The child processes of ``pid``, oldest first (Linux ``/proc``)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return sorted(out)


def ingress_processes(pid: int) -> dict[str, int]:
    """The processes of ``floodgate smtp`` started as ``pid``, by name: ``smtp-front`` and its
    session processes ``smtp-session-<i>``, or ``smtp`` when it is a single process."""
    sessions = children(pid)
    if not sessions:
        return {"smtp": pid}
    return {"smtp-front": pid, **{f"smtp-session-{i}": c for i, c in enumerate(sessions)}}

