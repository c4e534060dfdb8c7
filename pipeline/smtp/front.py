"""Several ingress processes on one port: the front (the screen) and its session processes.

Postfix's postscreen is the model. One front process owns the listening socket and accepts
every connection; it applies the connection limits there, with the whole ingress in view
(:class:`~pipeline.smtp.limits.Clients`), so a refused client never reaches a session process,
and hands each accepted connection's socket to a session process (``SCM_RIGHTS`` over a Unix
socket pair). The session processes speak SMTP, check message rates, decide the lane and
produce to the broker, each with its own event loop on its own core.

A client always lands in the same session process (chosen by a hash of its network), so its
message rate and its history are counted in one place and the limits hold across processes
without shared state. What one side needs of the other travels as short lines on the socket
pair:

* front → session: ``C <id> <client>`` with the socket attached (a new connection);
  ``S <0|1>`` (stress as the front sees it, which sessions add to their own signs);
* session → front: ``X <id>`` (that connection closed), ``K <client>`` (a client became known:
  the front gives it a known client's share), ``S`` (a sign of stress: admission diverting a
  flood, a lagging loop), ``R <0|1> <reason>`` (readiness).

The front restarts a session process that dies (its connections are lost; their senders retry,
as after any dropped SMTP connection) and is ready only while every session process is.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from pipeline.core import metrics
from pipeline.core.config import Settings
from pipeline.core.service import Service
from pipeline.smtp.limits import Clients, network_of
from pipeline.smtp.server import SmtpIngress, client_address, held_refusals_cap, networks

log = logging.getLogger("floodgate.smtp")

CHANNEL_BUFFER = 4096
# A session process that dies is started again after this long (doubling while it keeps dying).
RESTART_S = 0.5
RESTART_MAX_S = 10.0
STRESS_BROADCAST_S = 1.0
BACKLOG = 4096  # SYN flood or not, ham must find a place in the accept queue


def session_processes(configured: int) -> int:
    """How many session processes: the setting, or one per CPU this process may use."""
    if configured > 0:
        return configured
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def shard(client: str, n: int) -> int:
    """The session process a client's connections go to: by its network, stably."""
    digest = hashlib.blake2b(network_of(client).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % n


@dataclass
class Worker:
    index: int
    channel: socket.socket | None = None
    proc: subprocess.Popen | None = None
    ready: bool = False
    reason: str = "starting"
    connections: set[int] = field(default_factory=set)
    restart_at: float | None = None
    backoff: float = RESTART_S
    started_at: float = 0.0


class Front:
    """The front process: accept, screen, hand over; supervise the session processes."""

    def __init__(self, settings: Settings, processes: int, host: str | None = None, port: int | None = None) -> None:
        self.settings = settings
        s = settings.smtp
        self.host = s.host if host is None else host
        self.port = s.port if port is None else port
        self.clients = Clients(s)
        self.trusted = networks(s.xforward_hosts)
        self.workers = [Worker(i) for i in range(processes)]
        self.conn_client: dict[int, str] = {}  # connection id -> the client it was counted for
        self._next_id = 0
        self.held = 0
        # The front holds no sessions (their sockets go to the session processes), only refusals.
        self.held_cap = held_refusals_cap(0)
        self.loop = asyncio.new_event_loop()
        self.listener: socket.socket | None = None
        self._stress_sent = False
        self._stopping = False

    # -- session processes ---------------------------------------------------------------------
    def _spawn(self, w: Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = os.environ | {"FLOODGATE_INSTANCE": f"{os.environ.get('FLOODGATE_INSTANCE', 'smtp')}-s{w.index}",
                            "FLOODGATE_WORKER_METRICS_PORT": "0"}
        w.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "smtp", "--session-channel",
                                   str(theirs.fileno())], env=env, pass_fds=(theirs.fileno(),),
                                  stdin=subprocess.DEVNULL)
        theirs.close()
        ours.setblocking(False)
        w.channel, w.ready, w.reason, w.started_at, w.restart_at = ours, False, "starting", time.monotonic(), None
        self.loop.add_reader(ours.fileno(), self._read_channel, w)
        log.info("session process started", extra={"index": w.index, "pid": w.proc.pid})

    def _lost(self, w: Worker) -> None:
        """A session process died: forget its connections, schedule its restart."""
        if w.channel is not None:
            self.loop.remove_reader(w.channel.fileno())
            w.channel.close()
            w.channel = None
        for conn in w.connections:
            self._disconnected(conn)
        w.connections.clear()
        w.ready, w.reason = False, "restarting"
        ran = time.monotonic() - w.started_at
        w.backoff = RESTART_S if ran > 30 else min(2 * w.backoff, RESTART_MAX_S)
        w.restart_at = time.monotonic() + w.backoff
        code = w.proc.poll() if w.proc else None
        metrics.ERRORS.labels("smtp", "session_process_exited").inc()
        log.log(logging.INFO if self._stopping else logging.ERROR, "session process exited",
                extra={"index": w.index, "code": code, "restart_in_s": None if self._stopping else w.backoff})

    def _read_channel(self, w: Worker) -> None:
        try:
            data = w.channel.recv(CHANNEL_BUFFER) if w.channel else b""
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost(w)
            return
        kind, _, rest = data.decode("utf-8", "replace").partition(" ")
        if kind == "X":
            conn = int(rest)
            w.connections.discard(conn)
            self._disconnected(conn)
        elif kind == "K":
            self.clients.make_known(rest, time.monotonic())
        elif kind == "S":
            self.clients.stress(time.monotonic())
        elif kind == "R":
            flag, _, reason = rest.partition(" ")
            w.ready, w.reason = flag == "1", reason

    def _disconnected(self, conn: int) -> None:
        client = self.conn_client.pop(conn, None)
        if client is not None:
            self.clients.disconnect(client)

    # -- accepting -----------------------------------------------------------------------------
    def _trusted(self, client: str) -> bool:
        if not self.trusted:  # the usual case: no relay forwards here (parsing costs per accept)
            return False
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(client)
            return any(ip in net for net in self.trusted)
        return False

    async def _accept(self) -> None:
        assert self.listener is not None
        while not self._stopping:
            try:
                conn, peer = await self.loop.sock_accept(self.listener)
            except OSError:
                if self._stopping:
                    return
                await asyncio.sleep(0.01)  # out of file descriptors: let some close
                continue
            self._screen(conn, client_address(peer))

    def _screen(self, conn: socket.socket, client: str) -> None:
        now = time.monotonic()
        counted = not self._trusted(client)
        refused = self.clients.connect(client, now) if counted else None
        if refused:
            metrics.SMTP_REFUSED.labels("connect", refused[:3]).inc()
            if self.held < self.held_cap and self.clients.stressed(now):
                self.held += 1
                self.loop.call_later(self.clients.tarpit(client, now), self._refuse, conn, refused, True)
            else:
                self._refuse(conn, refused, False)
            return
        alive = [w for w in self.workers if w.channel is not None]
        if not alive:
            if counted:
                self.clients.disconnect(client)
            self._refuse(conn, "421 4.3.2 service not available, try again later", False)
            return
        w = alive[shard(client, len(alive))] if len(alive) < len(self.workers) else \
            self.workers[shard(client, len(self.workers))]
        self._next_id += 1
        conn_id = self._next_id
        try:
            socket.send_fds(w.channel, [f"C {conn_id} {client}".encode()], [conn.fileno()])  # type: ignore[arg-type]
        except OSError:
            if counted:
                self.clients.disconnect(client)
            self._refuse(conn, "421 4.3.2 service not available, try again later", False)
            return
        finally:
            conn.close()
        if counted:
            self.conn_client[conn_id] = client
        w.connections.add(conn_id)

    def _refuse(self, conn: socket.socket, reply: str, held: bool) -> None:
        if held:
            self.held -= 1
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            conn.send(reply.encode() + b"\r\n")
        conn.close()

    async def _housekeeping(self) -> None:
        while not self._stopping:
            await asyncio.sleep(STRESS_BROADCAST_S)
            now = time.monotonic()
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None and w.channel is not None:
                    self._lost(w)
                if w.channel is None and w.restart_at is not None and now >= w.restart_at and not self._stopping:
                    self._spawn(w)
            stressed = self.clients.stressed(now)
            for w in self.workers:
                if w.channel is not None:
                    with contextlib.suppress(OSError):
                        w.channel.send(f"S {int(stressed)}".encode())

    # -- readiness and lifetime ----------------------------------------------------------------
    def problem(self) -> str | None:
        down = [f"session process {w.index}: {w.reason}" for w in self.workers if not w.ready]
        return "; ".join(down) or None

    def start(self) -> int:
        sock = socket.create_server((self.host, self.port), backlog=BACKLOG, reuse_port=False)
        sock.setblocking(False)
        self.listener = sock
        self.port = sock.getsockname()[1]
        for w in self.workers:
            self._spawn(w)
        self._tasks = [self.loop.create_task(self._accept()), self.loop.create_task(self._housekeeping())]
        self._thread = threading.Thread(target=self.loop.run_forever, name="smtp-front", daemon=True)
        self._thread.start()
        log.info("listening", extra={"host": self.host, "port": self.port, "session_processes": len(self.workers)})
        return self.port

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping = True
        self.loop.call_soon_threadsafe(self._close_listener)
        for w in self.workers:  # each finishes the acks in flight, says goodbye, exits
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        for w in self.workers:
            if w.proc is not None:
                try:
                    w.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()

    def _close_listener(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.listener is not None:
            self.listener.close()


# -- the session process side ------------------------------------------------------------------

class Channel:
    """A session process's line to its front (see the module docstring)."""

    def __init__(self, fd: int, ingress: SmtpIngress) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.ingress = ingress
        self._ready: tuple[bool, str] | None = None

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(line.encode())

    def start(self) -> None:
        self.ingress.loop.call_soon_threadsafe(self.ingress.loop.add_reader, self.sock.fileno(), self._read)

    def _read(self) -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, CHANNEL_BUFFER, 4)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg, fds = b"", []
        if not msg:  # the front is gone: so are we
            self.ingress.loop.remove_reader(self.sock.fileno())
            os.kill(os.getpid(), signal.SIGTERM)
            return
        kind, _, rest = msg.decode("utf-8", "replace").partition(" ")
        if kind == "C" and fds:
            conn_id, _, client = rest.partition(" ")
            self.ingress.adopt(socket.socket(fileno=fds[0]), int(conn_id), client)
        elif kind == "S" and rest == "1":
            self.ingress.clients.stress(time.monotonic())
        for fd in fds[1:]:
            os.close(fd)

    def report_ready(self, problem: str | None) -> None:
        state = (problem is None, problem or "")
        if state != self._ready:
            self._ready = state
            self.send(f"R {int(state[0])} {state[1]}")


def run_session_process(settings: Settings, channel_fd: int, service: Service) -> None:
    """A session process: sessions the front hands over, until SIGTERM or the front goes."""
    from pipeline.core.service import freeze_start_up

    ingress = SmtpIngress(settings)
    channel = Channel(channel_fd, ingress)
    ingress.front = channel
    ingress.start(listen=False)
    if ingress.verifier is not None:
        ingress.verifier.wait_warm()  # the worker process for big messages, before readiness
    channel.start()
    freeze_start_up()
    service.ready.set()
    try:
        while not service.stopping.wait(0.5):
            channel.report_ready(ingress.bridge.problem())
    finally:
        channel.report_ready("stopping")
        ingress.stop()


def run_front(settings: Settings, service: Service, processes: int) -> None:
    """``floodgate smtp`` with several session processes (``smtp.processes``; 0: one per CPU)."""
    front = Front(settings, processes)
    front.start()
    service.checks.append(front.problem)
    service.ready.set()
    try:
        service.stopping.wait()
    finally:
        service.ready.clear()
        front.stop()
        service.close()
