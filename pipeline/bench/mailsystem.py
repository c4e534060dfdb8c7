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
import imaplib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline import kafka
from pipeline.bench import mailstack
from pipeline.core import config
from pipeline.core.config import Settings
from pipeline.core.events import MailEvent
from pipeline.kafka import topics
from pipeline.node import NODE, OPTIONAL, Node, server_ports

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


class PrivateBroker:
    """``infra/kafka/broker.py`` with a port, a controller port and a state directory of its own.

    ``KAFKA_BOOTSTRAP_SERVERS`` is removed from its environment (with it set, broker.py starts
    nothing); ``down`` stops only the process this state directory's ``up`` started."""

    def __init__(self, state: Path, heap: str = BROKER_HEAP) -> None:
        self.state = state
        self.port = server_ports(2)  # below the ephemeral range: it is stopped and started
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

    def kill(self) -> None:
        """SIGKILL: a crash, no controlled shutdown (``up`` starts it again)."""
        pid = int((self.state / "broker.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text():
            time.sleep(0.05)  # until the kernel has ended it (bounded: SIGKILL cannot be ignored)


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
        self.node = Node(settings, self.workdir / "logs")
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


# --- mail for it -------------------------------------------------------------------------------------

TAG = "X-Mailsystem-Test"
# Header fields Postfix's cleanup drops from every message (message_drop_headers), and the
# corpus's own delivery trace: not what a sending client sends.
DROPPED = (b"return-path", b"delivered-to", b"bcc", b"resent-bcc", b"content-length")
HEADER = re.compile(rb"[!-9;-~]+:")  # a header field's name and colon (RFC 5322 2.2)
# As the classifier sees a message that came through Postfix: its Received header on top.
POSTFIX_RECEIVED = b"Received: from mail.sender.test (unknown [127.0.0.23])\r\n\tby mx.floodgate.test (Postfix)\r\n"


class CorpusMail:
    """Held-out corpus messages (easy_ham_2, spam_2) that ``registry``'s champion scores clearly
    (ham below ``ham_below``, spam above ``spam_above``), each sent with a tag header of its own,
    ready for SMTP: CRLF, no header Postfix would drop, no line Postfix would fold (998 bytes)."""

    def __init__(self, registry: Path, candidates: int = 400, ham_below: float = 0.05, spam_above: float = 0.95,
                 seed: int = 19) -> None:
        from models import corpus
        from models import registry as models

        model = models.load_champion(registry)
        msgs = [m for m in corpus.load_spamassassin(config.ROOT / "data", groups=("easy_ham_2", "spam_2"))
                if len(m.raw) < 12_000 and max(len(line) for line in m.raw.split(b"\n")) < 900]
        random.Random(seed).shuffle(msgs)
        chosen = [(m.label or "ham", self.prepare(m.raw, "x")) for m in msgs[:candidates]]
        scores = model.score([POSTFIX_RECEIVED + raw for _, raw in chosen])
        self.pools: dict[str, list[bytes]] = {"ham": [], "spam": []}
        for (label, raw), score in zip(chosen, scores, strict=True):
            if (label == "ham" and score < ham_below) or (label == "spam" and score > spam_above):
                self.pools[label].append(raw)
        self.used = Counter[str]()

    @staticmethod
    def prepare(raw: bytes, tag: str) -> bytes:
        head, sep, body = mailstack.crlf(raw).partition(b"\r\n\r\n")
        fields: list[bytes] = []
        for line in head.split(b"\r\n"):
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] += b"\r\n" + line
            else:
                fields.append(line)
        # Header fields only: the corpus has mbox "From " lines among them, which Postfix would
        # take for the start of the body (and put an empty line above).
        kept = [f for f in fields if HEADER.match(f) and f.split(b":", 1)[0].lower() not in DROPPED]
        return b"\r\n".join([f"{TAG}: {tag}".encode(), *kept]) + sep + body

    def take(self, kind: str, tag: str) -> bytes:
        """The next unused ``kind`` (ham or spam) message, tagged ``tag``."""
        raw = self.pools[kind][self.used[kind]]
        self.used[kind] += 1
        return raw.replace(f"{TAG}: x\r\n".encode(), f"{TAG}: {tag}\r\n".encode(), 1)


def header(message: bytes, name: str) -> str:
    """One header field's value (unfolded, decoded leniently) or ""."""
    head = message.split(b"\r\n\r\n", 1)[0].replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    m = re.search(rb"^" + re.escape(name.encode()) + rb":[ \t]*([^\r\n]*)", head, re.M | re.I)
    return m.group(1).decode("utf-8", "replace").strip() if m else ""


def listing(ms: MailSystem) -> list[str]:
    """Every user's INBOX and Junk over IMAP: one line per message, with Floodgate's headers."""
    from pipeline.sinks import parse_trace

    assert ms.dovecot is not None
    lines = []
    for user in ms.users:
        imap = ms.dovecot.imap(user)
        try:
            for box in ("INBOX", "Junk"):
                msgs = mailstack.mailbox(imap, box)
                lines.append(f"{user} {box}: {len(msgs)} message(s)")
                for uid, body in msgs.items():
                    trace = parse_trace(header(body, "X-Floodgate-Trace"))
                    score = header(body, "X-Floodgate-Score")[:6]
                    lines.append(f"  uid {uid.decode():>2}  X-Floodgate-Score: {score:6}  "
                                 f"event {trace.get('event', '-')[:12]}  lane {trace.get('lane', '-'):8}  "
                                 f"{header(body, 'Subject')[:50]}")
        finally:
            imap.logout()
    return lines


def placed(ms: MailSystem) -> tuple[int, list[str]]:
    """Messages in the users' mailboxes, and the event ids in the quarantine."""
    from pipeline.sinks.quarantine import Quarantine

    assert ms.dovecot is not None and ms.settings is not None
    count = 0
    for user in ms.users:
        imap = ms.dovecot.imap(user)
        try:
            count += sum(len(mailstack.uids(imap, box)) for box in ("INBOX", "Junk"))
        finally:
            imap.logout()
    held: list[str] = []
    if ms.settings.paths.quarantine_db.exists():
        store = Quarantine(ms.settings.paths.quarantine_db)
        try:
            held = [e.event_id for e in store.entries(1000)]
        finally:
            store.close()
    return count, held


def wait(condition: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.2)  # polling interval of a deadline-bounded wait


# --- make demo-mailsystem ----------------------------------------------------------------------------

# Who sends what to whom in the demo: (kind, recipient, client address).
DEMO_PLAN = (("ham", "bob@example.com", "127.0.0.23"), ("ham", "carol@example.net", "127.0.0.23"),
             ("ham", "bob@example.com", "127.0.0.24"), ("spam", "bob@example.com", "127.0.0.66"),
             ("spam", "carol@example.net", "127.0.0.67"))
DEMO_TIMEOUT_S = 90.0


def demo(base: Settings, log: Callable[[str], None] = print) -> None:
    """Postfix in front, Dovecot behind, on the settings' broker (private topics): ham and spam
    from swaks, a Junk move reported back, a release from the quarantine, the mailboxes over IMAP."""
    import tempfile

    from pipeline import feedback

    reason = mailstack.unavailable()
    if reason:
        raise SystemExit(f"demo-mailsystem: {reason}")
    mail = CorpusMail(base.paths.registry)
    workdir = Path(tempfile.mkdtemp(prefix="floodgate-mailsystem-"))
    log(f"Floodgate between Postfix and Dovecot on loopback; Kafka at {base.kafka.bootstrap_servers} (private topics)")
    with running(base, workdir, own_broker=False, log=lambda line: log(f"  started {line}")) as ms:
        assert ms.postfix and ms.dovecot and ms.settings
        log("\nswaks -> Postfix (the MX) -> floodgate smtp, told the original client by XFORWARD:")
        qids = []
        for i, (kind, rcpt, client) in enumerate(DEMO_PLAN):
            raw = mail.take(kind, f"demo-{i}")
            _, _, qid = ms.postfix.swaks("sender@corpus.test", rcpt, raw, client=client, helo="mail.corpus.test")
            log(f"  {kind:4} from {client} to {rcpt}: {'queued as ' + str(qid) if qid else 'refused'} "
                f"({header(raw, 'Subject')[:50]})")
            qids += [qid] if qid else []
        wait(lambda: set(qids) <= set(ms.postfix.sent()), DEMO_TIMEOUT_S, "Postfix handing the mail to Floodgate")
        for line in ms.postfix.log().splitlines():
            if "status=sent" in line:
                log("  postfix: " + line.split("]: ", 1)[-1].split(", delay=")[0] + ": " + line.split("status=")[-1])
        for line in (workdir / "logs" / "smtp.log").read_text(errors="replace").splitlines():
            if '"msg":"accepted"' in line:
                rec = json.loads(line)
                log(f"  floodgate smtp: event {rec['event_id'][:12]} from client {rec['client']} (HELO {rec['helo']}), "
                    f"relayed by {rec.get('relay', '-')}")
        wait(lambda: sum((lambda c, h: (c, len(h)))(*placed(ms))) >= len(qids), DEMO_TIMEOUT_S,
             "delivery over LMTP and the quarantine")
        _, held = placed(ms)
        log(f"\ndelivered over LMTP into Dovecot; quarantined: {len(held)}")
        imap = ms.dovecot.imap("bob@example.com")
        try:
            inbox = mailstack.uids(imap, "INBOX")
            if inbox:
                log("\nbob moves a message into Junk and back out (IMAPSieve -> floodgate-report -> the spool):")
                _move(imap, inbox[0], "Junk", log)
                _move(imap, mailstack.uids(imap, "Junk")[0], "INBOX", log)
        finally:
            imap.logout()
        if held:
            log(f"\nfloodgate quarantine release {held[0]} --by postmaster")
            feedback.release(ms.settings, held[0], "postmaster")
            wait(lambda: placed(ms)[0] >= len(qids) - len(held) + 1, DEMO_TIMEOUT_S, "the released message")
        reports = _feedback(ms.settings, (2 if inbox else 0) + (1 if held else 0))
        log(f"\nthe feedback topic ({ms.settings.topic('feedback')}):")
        for e in reports:
            log(f"  {e.label:4}  event {e.id[:12]}  {e.extra}")
        log("\nthe mailboxes over IMAP:")
        for line in listing(ms):
            log("  " + line)
    log(f"\nstopped everything; the workers' logs are in {workdir / 'logs'}")


def _move(imap: imaplib.IMAP4, uid: bytes, to: str, log: Callable[[str], None]) -> None:
    t0 = time.monotonic()
    typ, _ = imap.uid("MOVE", uid, to)
    log(f"  MOVE uid {uid.decode()} to {to}: {typ} in {time.monotonic() - t0:.2f} s")


def _feedback(settings: Settings, n: int) -> list[MailEvent]:
    """The first ``n`` events on the feedback topic (fewer if they do not come within 30 s)."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from pipeline.core import events

    consumer = kafka.consumer(settings, settings.group("demo-feedback"))
    topic = settings.topic("feedback")
    found: list[MailEvent] = []
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 30
        while len(found) < n and time.monotonic() < deadline:
            found += [events.decode(m.value()) for m in consumer.consume(n - len(found), 0.5) if not m.error()]
        return found
    finally:
        consumer.close()
