"""Floodgate between real mail programs: Postfix in front, Dovecot behind, the workers between.

:class:`MailSystem` runs, on loopback ports under temporary directories:

* a private Kafka broker (``infra/kafka/broker.py`` with a port and a state directory of its own,
  :class:`PrivateBroker`), which a test may stop and start: the broker outage is real for every
  worker, and the shared broker is never touched (``own_broker=False``: the settings' cluster);
* Dovecot (``infra/dovecot``): LMTP and IMAP, IMAPSieve reporting Junk moves to the report spool;
* the workers as supervised processes (:class:`~pipeline.node.Node`): ``floodgate smtp`` trusting
  XFORWARD from Postfix, both lanes' classifiers and deliverers (``floodgate deliver`` over LMTP
  into Dovecot), cleanup (the quarantine), ``floodgate report-drain``;
* Postfix (``infra/postfix``): the MX, relaying the local domains to ``floodgate smtp``.

``tests/test_mailsystem.py`` shares one across its tests; ``make demo-mailsystem``
(:func:`demo`) sends a few messages through one and lists the mailboxes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline import kafka
from pipeline.bench import mailstack
from pipeline.core import config
from pipeline.core.config import Settings
from pipeline.kafka import topics
from pipeline.node import NODE, OPTIONAL, Node

BROKER = [sys.executable, str(config.ROOT / "infra" / "kafka" / "broker.py")]
# A small heap: the stack carries a few dozen messages (the shared broker has 512 MiB).
BROKER_HEAP = "256m"
USERS = {"bob@example.com": "bob-secret", "carol@example.net": "carol-secret"}
# The workers between Postfix and Dovecot: the standard ones but reputation (nothing here needs
# sender standing; admission runs without it until it has read some), and the report drain.
WORKERS = ("smtp", "classify-priority", "classify-bulk", "deliver", "deliver-bulk", "cleanup", "report-drain")
# How long floodgate smtp waits for the broker's acknowledgement before its 451: short, so that
# Postfix sees the deferral within seconds when the broker is down (the default is 10 s).
ACK_TIMEOUT_S = 2.0


def free_ports(n: int, host: str = mailstack.LOOPBACK) -> int:
    """The first of ``n`` consecutive ports nobody listens on now (Node numbers its workers' ports so)."""
    for _ in range(100):
        base = mailstack.free_port(host)
        if base + n >= 65536:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for p in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind((host, p))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


class PrivateBroker:
    """``infra/kafka/broker.py`` with a port, a controller port and a state directory of its own.

    ``KAFKA_BOOTSTRAP_SERVERS`` is removed from its environment (with it set, broker.py starts
    nothing); ``down`` stops only the process this state directory's ``up`` started."""

    def __init__(self, state: Path, heap: str = BROKER_HEAP) -> None:
        self.state = state
        self.port = free_ports(2)
        self.env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"} | {
            "FLOODGATE_KAFKA_PORT": str(self.port), "FLOODGATE_KAFKA_CONTROLLER_PORT": str(self.port + 1),
            "FLOODGATE_KAFKA_STATE": str(state), "FLOODGATE_KAFKA_HEAP": heap}

    @property
    def bootstrap(self) -> str:
        return f"{mailstack.LOOPBACK}:{self.port}"

    def _run(self, command: str) -> None:
        proc = subprocess.run([*BROKER, command], env=self.env, capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"broker.py {command} exited {proc.returncode}: {proc.stdout}{proc.stderr}")

    def up(self) -> None:
        self._run("up")

    def down(self) -> None:
        self._run("down")


@dataclass
class MailSystem:
    """Postfix → floodgate smtp → Kafka → the workers → Dovecot, on loopback (module docstring)."""

    base: Settings
    workdir: Path
    registry: Path | None = None
    own_broker: bool = True
    users: dict[str, str] = field(default_factory=lambda: dict(USERS))
    log: Callable[[str], None] = lambda _line: None

    broker: PrivateBroker | None = None
    settings: Settings | None = None
    dovecot: mailstack.Dovecot | None = None
    postfix: mailstack.Postfix | None = None
    node: Node | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def start(self) -> MailSystem:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _timed(self, what: str, t0: float) -> None:
        self.timings[what] = round(time.monotonic() - t0, 1)
        self.log(f"{what}: {self.timings[what]:.1f} s")

    def _start(self) -> None:
        # The broker starts in the background (10-30 s of JVM start-up) while Dovecot and Postfix
        # start: Postfix's next hop, floodgate smtp, comes up last, and nothing is sent before.
        pool = ThreadPoolExecutor(1, thread_name_prefix="broker")
        t_broker = time.monotonic()
        if self.own_broker:
            self.broker = PrivateBroker(self.workdir / "kafka")
            broker_up = pool.submit(self.broker.up)
        try:
            t0 = time.monotonic()
            self.dovecot = mailstack.Dovecot(mailstack.private_dir("fg-dovecot-"), users=self.users)
            self.dovecot.start()
            self._timed(f"Dovecot (LMTP {self.dovecot.lmtp_port}, IMAP {self.dovecot.imap_port})", t0)
            smtp_port = mailstack.free_port()
            t0 = time.monotonic()
            self.postfix = mailstack.Postfix(mailstack.private_dir("fg-postfix-"),
                                             next_hop=(mailstack.LOOPBACK, smtp_port), recipients=self.users)
            self.postfix.start()
            self._timed(f"Postfix (MX on {self.postfix.port})", t0)
            bootstrap = self.base.kafka.bootstrap_servers
            if self.broker is not None:
                broker_up.result()
                bootstrap = self.broker.bootstrap
                self._timed(f"private broker at {bootstrap}", t_broker)
        finally:
            pool.shutdown()
        settings = config.private(self.base, "mail", self.workdir, bootstrap=bootstrap, registry=self.registry)
        t0 = time.monotonic()
        topics.apply(settings, kafka.admin(settings))
        self._timed("topics", t0)
        self.settings = settings = replace(
            settings,
            smtp=replace(settings.smtp, host=mailstack.LOOPBACK, port=smtp_port, processes=1,
                         xforward_hosts=(f"{mailstack.LOOPBACK}/32",), ack_timeout_s=ACK_TIMEOUT_S),
            delivery=replace(settings.delivery, mode="lmtp", host=mailstack.LOOPBACK, port=self.dovecot.lmtp_port,
                             timeout_s=10.0),
            paths=replace(settings.paths, report_spool=self.dovecot.spool))
        t0 = time.monotonic()
        self.node = Node(settings, self.workdir / "logs", base_port=free_ports(len(WORKERS)))
        for name in WORKERS:
            self.node.start(name, (NODE | OPTIONAL)[name])
        self.node.wait_ready()
        self._timed(f"workers ({', '.join(WORKERS)}; floodgate smtp on {smtp_port})", t0)

    def stop(self) -> dict[str, int | None]:
        """Stop everything started; the workers' exit codes (0: a clean stop on SIGTERM)."""
        codes: dict[str, int | None] = {}
        if self.postfix is not None:
            self.postfix.stop()
        if self.node is not None:
            codes = self.node.stop_all()
        if self.dovecot is not None:
            self.dovecot.stop()
        if self.broker is not None:
            with contextlib.suppress(RuntimeError):
                self.broker.down()
        elif self.settings is not None:
            with contextlib.suppress(Exception):
                topics.delete(self.settings, kafka.admin(self.settings))
        return codes

    def remove(self) -> None:
        """Remove the instances' directories (after :meth:`stop`; kept until then for a post-mortem)."""
        for part in (self.postfix, self.dovecot):
            if part is not None:
                shutil.rmtree(part.root, ignore_errors=True)


@contextlib.contextmanager
def running(base: Settings, workdir: Path, **kw: object) -> Iterator[MailSystem]:
    stack = MailSystem(base, workdir, **kw)  # type: ignore[arg-type]
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
        stack.remove()
