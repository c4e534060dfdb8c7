"""Flood admission at ingress: mail from a flooding source never shares a queue with normal mail.

Postfix's postscreen triages clients before they reach smtpd, so that spambots never occupy
the processes left for legitimate mail; this module is that idea for Floodgate's ingress.
Every ingress (``floodgate smtp``, ``floodgate replay``) asks :meth:`Admission.topic` where an
accepted message goes: the ``inbound`` topic (the priority lane) or the ``bulk`` topic, which
has its own classifier group, partitions and lag. The decision is made before the message is
queued anywhere, so no flood, however large, puts a message in front of normal mail.

The rule: the message rate of every source — client address, sender address, sender domain,
campaign fingerprint — is tracked per ingress process (an exponentially weighted rate per
key, O(1) per message, memory bounded by recent traffic); mail from a source sending faster
than ``FLOOD_RATE`` goes to bulk until its rate falls well below it again (hysteresis). With N
ingress processes each sees its own connections, so the threshold applies per process.

Senders known to be good (the compacted reputation topic, kept by ``floodgate reputation``
from feedback and verdicts) are never diverted. Limit: an envelope sender can be forged, so a
spammer claiming a good sender's address rides the priority lane; it is still classified, so
this costs priority-lane capacity, not a wrong verdict.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import TopicPartition

from pipeline import events, kafka, metrics, senders
from pipeline.config import Settings
from pipeline.fingerprint import fingerprint

log = logging.getLogger("floodgate.admission")
# Messages per second from one source (per ingress process) above which it is a flood. A busy
# legitimate MTA delivering to one provider rarely exceeds a few per second per client; a
# spam run sends hundreds. Known-good senders are exempt.
FLOOD_RATE = 5.0
# Time constant of the rate estimate: a burst must last a few seconds to count as a flood,
# and a source that stops is forgiven within ~half a minute.
TAU_S = 5.0
# A flagged source returns to the priority lane only once its rate falls below this fraction
# of FLOOD_RATE (hysteresis: no flapping between lanes at the threshold).
RELEASE_FRACTION = 0.5
# Forget sources idle this long, so memory stays bounded by recent traffic.
IDLE_S = 300.0


@dataclass
class _Rate:
    value: float
    at: float
    flagged: bool = False


class RateTracker:
    """Exponentially weighted message rate per key, with flood flags and hysteresis."""

    def __init__(self, flood_rate: float = FLOOD_RATE, tau_s: float = TAU_S) -> None:
        self.flood_rate = flood_rate
        self.tau = tau_s
        self._rates: dict[str, _Rate] = {}
        self._last_prune = 0.0

    def hit(self, key: str, now: float) -> bool:
        """Count one message from ``key``; return whether the key is flooding."""
        r = self._rates.get(key)
        if r is None:
            r = self._rates[key] = _Rate(0.0, now)
        r.value = r.value * math.exp(-(now - r.at) / self.tau) + 1.0 / self.tau
        r.at = now
        if r.value > self.flood_rate:
            r.flagged = True
        elif r.flagged and r.value < self.flood_rate * RELEASE_FRACTION:
            r.flagged = False
        return r.flagged

    def rate(self, key: str, now: float) -> float:
        r = self._rates.get(key)
        return 0.0 if r is None else r.value * math.exp(-(now - r.at) / self.tau)

    def prune(self, now: float) -> None:
        if now - self._last_prune < IDLE_S / 10:
            return
        self._last_prune = now
        self._rates = {k: r for k, r in self._rates.items() if now - r.at < IDLE_S}

    def __len__(self) -> int:
        return len(self._rates)


class GoodSenders:
    """The known-good sender keys, read from the compacted reputation topic in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.keys: frozenset[str] = frozenset()
        self._thread = threading.Thread(target=self._follow, name="reputation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()

    def is_good(self, keys: Sequence[str]) -> bool:
        good = self.keys
        return any(k in good for k in keys)

    def _follow(self) -> None:
        topic = self.settings.topic("reputation")
        consumer = kafka.consumer(self.settings, group=self.settings.group("admission-reputation"))
        try:
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                log.warning("no reputation topic; no sender is exempt", extra={"topic": topic})
                return
            # Every worker reads all of it, from the start: the latest value per key is the standing.
            consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
            standing: dict[str, bool] = {}
            while not self.stopping.is_set():
                changed = False
                for m in consumer.consume(500, 0.5):
                    if m.error() or m.key() is None:
                        continue
                    key = m.key().decode(errors="replace")
                    rec = senders.decode_standing(m.value())
                    if m.value() is None:  # a tombstone: no standing any more
                        changed = standing.pop(key, None) is not None or changed
                    elif rec is not None:
                        standing[key] = rec.good
                        changed = True
                if changed:
                    self.keys = frozenset(k for k, good in standing.items() if good)
        finally:
            consumer.close()


class Admission:
    """Where an accepted message goes: the ``inbound`` topic, or ``bulk`` when its source floods."""

    def __init__(self, settings: Settings, flood_rate: float = FLOOD_RATE, follow_reputation: bool = True) -> None:
        self.rates = RateTracker(flood_rate)
        self.good = GoodSenders(settings)
        self.inbound, self.bulk = settings.topic("inbound"), settings.topic("bulk")
        if follow_reputation:
            self.good.start()

    def lane(self, ev: events.MailEvent, now: float | None = None) -> str:
        """``priority`` or ``bulk``; every source key of the message is counted either way."""
        now = time.time() if now is None else now
        self.rates.prune(now)
        keys = senders.keys(ev.envelope.mail_from, ev.envelope.client_address)
        if self.good.is_good(keys):
            return "priority"
        flooding = False
        for key in (*keys, f"campaign:{fingerprint(ev.raw)}"):
            # Every key is counted, even after one is found flooding, so rates stay true.
            flooding = self.rates.hit(key, now) or flooding
        return "bulk" if flooding else "priority"

    def topic(self, ev: events.MailEvent, now: float | None = None) -> str:
        lane = self.lane(ev, now)
        metrics.MESSAGES.labels("admission", lane, "admitted").inc()
        return self.bulk if lane == "bulk" else self.inbound

    def close(self) -> None:
        self.good.stop()
