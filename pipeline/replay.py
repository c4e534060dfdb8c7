"""Replay ingress (``floodgate replay``): feed a mail corpus into Floodgate as mail events.

Like ``floodgate smtp`` it admits each message to the ``inbound`` topic, or to ``bulk`` when
its source floods (:mod:`pipeline.admission`).

Messages come from :mod:`models.corpus` (SpamAssassin layout, mbox, Maildir, .eml folder,
JSONL). Each gets an SMTP envelope synthesised the way a real MX would have seen it:

* MAIL FROM: the message's ``Return-Path``, else ``From``/``Sender`` (the address only,
  sanitised; the null reverse-path when none is usable);
* RCPT TO: one user of a local domain, ``user0000``..``user{users-1}`` over
  ``settings.smtp.domains``, chosen from a hash of the seed and the message's name, so the
  same message goes to the same mailbox on every run with the same seed;
* client address: a hash of the sender domain into the IPv6 documentation prefix 2001:db8::/32
  (RFC 3849: never routable, never someone's real mail server), 64 bits of it, so one sending
  domain is one client and no two domains share one, as admission expects;
* HELO: ``mail.<sender domain>``.

Like SMTP, replay refuses messages above ``settings.smtp.max_message_bytes`` (counted as
skipped) rather than truncating them. Pacing is a token bucket (:class:`TokenBucket`).
"""

from __future__ import annotations

import hashlib
import ipaddress
import itertools
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from email.utils import getaddresses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException

from pipeline import kafka
from pipeline.admission import Admission
from pipeline.core import authres, events, metrics
from pipeline.core.config import Settings

if TYPE_CHECKING:
    from models.corpus import Message

STAGE = "replay"
SOURCE = "replay"
log = logging.getLogger("floodgate.replay")

DEFAULT_USERS = 1000  # mailboxes over the local domains: enough that no user dominates
# A token bucket holding 50 ms of tokens absorbs sleep() overshoot at high rates while keeping
# bursts too short to matter at low ones.
BURST_S = 0.05
# How long librdkafka keeps retrying one event before replay counts it as failed.
DELIVERY_TIMEOUT_S = 30.0
MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
_SENDER_HEADERS = ("return-path", "from", "sender")
_ENVELOPE_HEADER = re.compile(rb"^(return-path|from|sender|message-id)[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.I | re.M)
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_DOMAIN = re.compile(r"^[^\s@<>()\[\]\\,;:\"]+\.[^\s@<>()\[\]\\,;:\".]+$")
_LOCAL = re.compile(r"^[^\s@<>()\[\]\\,;:\"]+$")
_MESSAGE_ID_DOMAIN = re.compile(r"@([^\s>]+)>?\s*$")
UNKNOWN_DOMAIN = "unknown.invalid"
# RFC 3849's IPv6 documentation prefix: never routable, never someone's real mail server, and
# room for a client per sending domain without two domains sharing one.
CLIENT_NETWORKS = (ipaddress.ip_network("2001:db8::/32"),)  # RFC 2606: a sender we cannot name


# -- pacing ----------------------------------------------------------------------------------
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up. :meth:`reserve` takes one token and
    says how long to wait before using it; waiting exactly that long gives ``rate`` a second on
    average, and after a stall at most ``burst`` messages go out at once."""

    def __init__(self, rate: float, burst: float = 1.0, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.last = now

    def reserve(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


# -- envelope synthesis -------------------------------------------------------------------
def sanitize_address(value: str) -> str | None:
    """A plain ``local@domain`` from a header value (display names, comments, angle brackets
    dropped; domain lower-cased), or None when there is no plausible address."""
    for _name, addr in getaddresses([value]):
        addr = addr.strip().strip("<>").strip()
        local, at, domain = addr.rpartition("@")
        domain = domain.rstrip(".").lower()
        if not (at and local and domain) or len(local) > MAX_LOCAL_PART or len(domain) > MAX_DOMAIN:
            continue
        if not (_LOCAL.match(local) and _DOMAIN.match(domain)):
            continue
        try:
            address = f"{local}@{domain}"
            address.encode("utf-8")  # surrogates from undecodable header bytes
        except UnicodeEncodeError:
            continue
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in address):
            continue
        return address
    return None


def header_block(raw: bytes) -> bytes:
    """The header section of a message: the parser need not walk a body it will not use."""
    ends = [i for i in (raw.find(b"\n\n"), raw.find(b"\n\r\n")) if i >= 0]
    return raw[: min(ends) + 1] if ends else raw


def envelope_headers(raw: bytes) -> dict[str, list[str]]:
    """The values of the few headers envelopes come from, unfolded, by lower-case name.

    A regular expression over the header block, not :mod:`email.parser`, which is ten times
    slower and would make envelope synthesis the bottleneck of a replay. Undecodable bytes stay
    as surrogates, which :func:`sanitize_address` refuses.
    """
    found: dict[str, list[str]] = {}
    for m in _ENVELOPE_HEADER.finditer(header_block(raw)):
        value = _FOLD.sub(b" ", m.group(2)).decode("utf-8", "surrogateescape").strip()
        found.setdefault(m.group(1).decode().lower(), []).append(value)
    return found


def _digest(*parts: object) -> bytes:
    return hashlib.blake2b("\x00".join(map(str, parts)).encode("utf-8", "surrogateescape"), digest_size=8).digest()


def client_address(name: str) -> str:
    """The client address a sending domain (or a load generator's bot) connects from: 64 bits of
    a hash into the documentation prefix (never its first or last address)."""
    h = int.from_bytes(_digest("client", name), "big") % (2**64 - 2)
    return str(CLIENT_NETWORKS[0].network_address + 1 + h)


@dataclass(frozen=True)
class EnvelopeSynth:
    """Deterministic envelopes: the same message, domains, users and seed give the same envelope."""

    domains: tuple[str, ...]
    users: int = DEFAULT_USERS
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.domains:
            raise ValueError("no local domains to deliver to (settings.smtp.domains)")
        if self.users < 1:
            raise ValueError("users must be at least 1")

    def recipient(self, name: str) -> str:
        n = int.from_bytes(_digest("rcpt", self.seed, name), "big") % self.users
        return f"user{n:04d}@{self.domains[n % len(self.domains)]}"

    def envelope(self, raw: bytes, name: str, client: str | None = None) -> events.Envelope:
        """``client`` overrides the client address (a load generator's bots share one)."""
        headers = envelope_headers(raw)
        mail_from = next((a for h in _SENDER_HEADERS for v in headers.get(h, ()) if (a := sanitize_address(v))), None)
        if mail_from:
            domain = mail_from.rpartition("@")[2]
        else:
            mid = _MESSAGE_ID_DOMAIN.search(next(iter(headers.get("message-id", ())), ""))
            domain = mid.group(1).lower() if mid and _DOMAIN.match(mid.group(1)) else UNKNOWN_DOMAIN
        return events.Envelope(mail_from=mail_from or "", rcpt_to=(self.recipient(name),),
                               client_address=client or client_address(domain), helo=f"mail.{domain}")


# -- replay ---------------------------------------------------------------------------------
EnvelopeFor = Callable[["Message"], events.Envelope]


@dataclass
class ReplayResult:
    sent: int = 0  # handed to the producer
    delivered: int = 0  # acknowledged by the broker
    failed: int = 0  # not acknowledged (see the log for why)
    skipped: int = 0  # larger than the SMTP size limit: an MX would have refused them
    elapsed_s: float = 0.0
    event_ids: list[str] = field(default_factory=list)  # delivered, in send order
    labels: Counter[str] = field(default_factory=Counter)  # delivered, by ground-truth label
    topics: Counter[str] = field(default_factory=Counter)  # delivered, by topic (admission's lane)

    @property
    def rate(self) -> float:
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0


def select(messages: Iterable[Message], limit: int | None = None, shuffle: bool = False,
           seed: int = 0) -> Iterable[Message]:
    """``limit`` messages, in source order or shuffled with ``seed`` (shuffling reads them all first)."""
    if shuffle:
        chosen = list(messages)
        random.Random(seed).shuffle(chosen)
        return chosen[:limit] if limit is not None else chosen
    return itertools.islice(messages, limit) if limit is not None else messages


def replay(settings: Settings, messages: Iterable[Message], rate: float | None = None, *,
           label_from_corpus: bool = False, users: int = DEFAULT_USERS, seed: int = 0,
           progress: bool = False, total: int | None = None, stop: threading.Event | None = None,
           delivery_timeout_s: float = DELIVERY_TIMEOUT_S, envelope_for: EnvelopeFor | None = None,
           clock: Callable[[], float] = time.monotonic) -> ReplayResult:
    """Produce ``messages`` to their lane's topic at ``rate`` a second (None: as fast as possible)
    and wait for every acknowledgement. ``stop`` ends the replay early (what was sent is flushed).
    ``envelope_for`` replaces the synthesised envelopes (e.g. a flood from a few bot clients)."""
    admission = Admission(settings)  # an ingress like smtp: floods go to the bulk lane
    synth = EnvelopeSynth(settings.smtp.domains, users, seed)
    max_bytes = settings.smtp.max_message_bytes
    # Replay does not verify senders: an Authentication-Results field claiming our authserv-id in
    # the source is removed, as SMTP removes one (only the SMTP ingress writes ours).
    authserv_id = settings.auth.authserv_id or settings.smtp.hostname
    producer = kafka.lane_producer(settings, **{"message.timeout.ms": int(delivery_timeout_s * 1000)})
    result = ReplayResult()
    sent_ids: list[str] = []
    acked: dict[str, str | None] = {}  # event id -> label, once the broker has it
    bucket = TokenBucket(rate, burst=rate * BURST_S, now=clock()) if rate else None
    labels: dict[str, str | None] = {}  # event id -> label, while in flight

    def on_delivery(err: KafkaError | None, msg: Any) -> None:
        event_id = msg.key().decode()
        if err is None:
            acked[event_id] = labels.pop(event_id)
            result.topics[msg.topic()] += 1
            metrics.MESSAGES.labels(STAGE, "", "accepted").inc()
        else:
            labels.pop(event_id, None)
            result.failed += 1
            metrics.MESSAGES.labels(STAGE, "", "failed").inc()
            log.warning("not delivered", extra={"event_id": event_id, "error": str(err)})

    bar = _progress_bar(progress, total)
    started = clock()
    try:
        for message in messages:
            if stop is not None and stop.is_set():
                break
            if len(message.raw) > max_bytes:
                result.skipped += 1
                metrics.MESSAGES.labels(STAGE, "", "skipped").inc()
                log.info("skipped: larger than the SMTP size limit",
                         extra={"name": message.name, "bytes": len(message.raw), "limit": max_bytes})
                continue
            if bucket is not None:
                wait = bucket.reserve(clock())
                if wait > 0:
                    producer.poll(0)
                    time.sleep(wait)
            envelope = envelope_for(message) if envelope_for else synth.envelope(message.raw, message.name)
            raw, _forged = authres.strip_ours(message.raw, authserv_id)
            event = events.new_event(envelope, raw, source=SOURCE,
                                     label=message.label if label_from_corpus else None)
            event = replace(event, extra={"corpus": {"group": message.group, "name": message.name}})
            labels[event.id] = event.label
            result.sent += 1
            try:
                _produce(producer, admission.topic(event), event, on_delivery)
            except KafkaException as e:  # refused locally (e.g. larger than message.max.bytes)
                labels.pop(event.id, None)
                result.failed += 1
                metrics.MESSAGES.labels(STAGE, "", "failed").inc()
                log.warning("not produced", extra={"event_id": event.id, "name": message.name, "error": str(e)})
                continue
            sent_ids.append(event.id)
            if bar is not None:
                bar.update(1)
    finally:
        admission.close()
        remaining = producer.flush(delivery_timeout_s + 5)
        if remaining:
            result.failed += remaining
            log.error("events still unacknowledged at the end", extra={"count": remaining})
        result.elapsed_s = clock() - started
        if bar is not None:
            bar.close()
    result.event_ids = [i for i in sent_ids if i in acked]
    result.delivered = len(result.event_ids)
    result.labels = Counter(label or "unlabelled" for label in acked.values())
    log.info("replayed", extra={"sent": result.sent, "delivered": result.delivered, "failed": result.failed,
                                "skipped": result.skipped, "elapsed_s": round(result.elapsed_s, 3)})
    return result


def _produce(producer: Any, topic: str, event: events.MailEvent, on_delivery: Callable[..., None]) -> None:
    value = events.encode(event)
    while True:
        try:
            producer.produce(topic, key=event.key, value=value, on_delivery=on_delivery)
            break
        except BufferError:  # local queue full: let deliveries drain it
            producer.poll(0.1)
    producer.poll(0)


def _progress_bar(enabled: bool, total: int | None) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="msg", desc="replay", smoothing=0.1)


def iter_source(path: Path, labels_file: Path | None = None) -> Iterator[Message]:
    """Messages from any source :mod:`models.corpus` reads, format detected from the path."""
    from models.corpus import iter_messages

    return iter_messages(path, labels_file)


def main(settings: Settings, source: Path, *, rate: float | None, limit: int | None, shuffle: bool, seed: int,
         label_from_corpus: bool, users: int, labels_file: Path | None) -> ReplayResult:
    """``floodgate replay``: SIGINT/SIGTERM stop it early; what was sent is still flushed."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    messages = select(iter_source(source, labels_file), limit=limit, shuffle=shuffle, seed=seed)
    total = len(messages) if isinstance(messages, list) else limit
    return replay(settings, messages, rate, label_from_corpus=label_from_corpus, users=users, seed=seed,
                  progress=True, total=total, stop=stop)
