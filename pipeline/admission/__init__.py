"""Flood admission at ingress: mail from a flooding source never shares a queue with normal mail.

Postfix's postscreen triages clients before they reach smtpd, so that spambots never occupy
the processes left for legitimate mail; this module is that idea for Floodgate's ingress.
Every ingress (``floodgate smtp``, ``floodgate replay``) asks :meth:`Admission.topic` where an
accepted message goes: the ``inbound`` topic (the priority lane) or the ``bulk`` topic, which
has its own classifier group, partitions and lag. The decision is made before the message is
queued anywhere, so no flood, however large, puts a message in front of normal mail.

The rule: the message rate of every source — client address, sender address, campaign
fingerprint — is tracked per ingress process (exponentially weighted short-term and baseline
rates per key, O(1) per message, memory bounded by recent traffic). A source's limit is a
floor (``flood_rate``) or a multiple (``surge``) of its own baseline, whichever is higher.
Mail from a source goes to bulk as soon as it is more than a small burst ahead of that limit
(a GCRA / leaky-bucket check: a new bot is caught within its first dozen messages, where a
rate average needs a second or more of its traffic; within its first few while another source
is being diverted, i.e. during a flood), or while its short-term rate is above
the limit; it returns once both are well below again (hysteresis). With N ingress
processes each sees its own connections, so the thresholds apply per process. Both are
settings (``[admission]``, ``FLOODGATE_ADMISSION_FLOOD_RATE``, ``FLOODGATE_ADMISSION_SURGE``).

Senders known to be good (the compacted reputation topic, kept by ``floodgate reputation``
from verdicts and users' reports in agreement) are never diverted; an operator's revocation
(``floodgate senders revoke``) arrives on the same topic as ``good: false`` and ends the
exemption within seconds. The exemption applies only to names the message proved: when the SMTP
ingress verified the sender (``extra["auth"]``, :mod:`pipeline.smtp.auth`), standing is looked up
for the proven keys alone (:func:`pipeline.core.senders.proven_keys`: the DMARC-aligned From
domain, a passing SPF or DKIM domain, the envelope address when its domain is among them, the
client address), so a flood forging a known-good sender is diverted like any other. Events
that carry no verification (``floodgate replay``, ``auth.enabled = false``) are judged by the
names they claim: there a forger of a known-good sender still rides the priority lane (it is
still classified, so this costs priority-lane capacity, not a wrong verdict).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import KafkaException, TopicPartition

from pipeline import kafka
from pipeline.admission.fingerprint import fingerprint
from pipeline.core import authres, events, metrics, senders
from pipeline.core.config import Settings

log = logging.getLogger("floodgate.admission")
# Below this many messages a second from one source (per ingress process) nothing is a flood,
# whatever its history: mailing lists and busy MTAs send several a second; a spam run, hundreds.
FLOOD_RATE = 30.0
# Above the floor, a source floods when its short-term rate exceeds this multiple of its own
# baseline: a source that always sends 50 a second is normal for itself; a new one that
# suddenly sends 50 a second is a flood.
SURGE = 4.0
# Short-term rate: a burst must last a second or two to count; a bot at twice the floor is
# recognised in about 1.5 s (at 5 s it took over 3 s, and a few dozen bots got thousands of
# messages into the priority lane first).
TAU_S = 2.0
# Baseline rate: what a source usually sends, over minutes. It learns only while the source is
# well below its threshold (under LEARN_FRACTION of it), so neither a flood nor the run-up to
# one becomes a source's normal.
BASELINE_TAU_S = 300.0
LEARN_FRACTION = 0.5
# A source is judged against the floor alone until it has this much unflagged history; after
# that, against a surge over its own usual rate (the baseline, bias-corrected for its age). A
# list that has sent 20 a second for minutes may burst to 50; a bot that starts at 50 may not.
MIN_HISTORY_S = 10.0
# A flagged source returns to the priority lane once its rate falls below this fraction of
# its threshold (hysteresis: no flapping between lanes at the threshold; and not so low that a
# busy list which once peaked over the threshold stays diverted while it sends as it always did).
RELEASE_FRACTION = 2 / 3
# Burst allowance: a source may send this many messages back to back before it is judged by
# its rate (a list's digest, a retry queue flushing). Beyond it, each message must wait out its
# 1/limit share: a bot at twice the floor is caught after ~20 messages (the short-term rate
# alone needed ~1.2 s: 24 bots at 68 a second put ~1,900 spam in the priority lane first).
BURST = 10
# Under stress (some source was diverted within the last STRESS_S), a source with no history of
# its own gets this smaller allowance: a flood's bots arrive as new sources, and at BURST each of
# 24 bots got ~18 messages into the priority lane when a diverse flood began (~430 in all; ~100
# at 3). A new legitimate sender rarely sends more than three messages back to back; one that
# does waits in the bulk lane during a flood, and gets the full burst again once the flood has
# been over for STRESS_S. (Postfix's stress-dependent settings are the same idea: tighter limits
# only while under attack.)
BURST_UNDER_STRESS = 3
STRESS_S = 10.0
# How far ahead of its allowance a source can get: a flood is remembered about as long as the
# short-term rate remembers it, not for as long as the flood lasted.
MAX_DEBT_S = TAU_S
# Forget sources idle this long, so memory stays bounded by recent traffic.
IDLE_S = 600.0
# How often to look again for the reputation topic (or the broker) when it is not there.
REPUTATION_RETRY_S = 5.0


@dataclass
class _Rate:
    short: float
    baseline: float
    at: float
    learned_s: float = 0.0  # seconds of unflagged history behind the baseline
    flagged: bool = False
    tat: float = 0.0  # GCRA theoretical arrival time: when the source's allowance catches up


class RateTracker:
    """Per-key message rates (short-term and baseline EWMAs) with flood flags and hysteresis."""

    def __init__(self, flood_rate: float = FLOOD_RATE, surge: float = SURGE, tau_s: float = TAU_S,
                 baseline_tau_s: float = BASELINE_TAU_S) -> None:
        self.flood_rate = flood_rate
        self.surge = surge
        self.tau = tau_s
        self.baseline_tau = baseline_tau_s
        self._rates: dict[str, _Rate] = {}
        self._last_prune = 0.0
        self._last_flood_at = -math.inf  # when a source was last found flooding (stress)

    def usual(self, r: _Rate) -> float | None:
        """The source's own usual rate, once known: the baseline EWMA corrected for its short
        history (an EWMA started at zero underestimates until several time constants pass)."""
        if r.learned_s < MIN_HISTORY_S:
            return None
        return r.baseline / (1.0 - math.exp(-r.learned_s / self.baseline_tau))

    def threshold(self, r: _Rate) -> float:
        return self._limit(self.usual(r))

    def _limit(self, usual: float | None) -> float:
        return self.flood_rate if usual is None else max(self.flood_rate, self.surge * usual)

    def hit(self, key: str, now: float) -> bool:
        """Count one message from ``key``; return whether the key is flooding."""
        r = self._rates.get(key)
        if r is None:
            r = self._rates[key] = _Rate(0.0, 0.0, now)
        dt = max(0.0, now - r.at)
        r.short = r.short * math.exp(-dt / self.tau) + 1.0 / self.tau
        usual = self.usual(r)
        calm = not r.flagged and (usual is None or r.short < self._limit(usual) * LEARN_FRACTION)
        if calm:
            r.baseline = r.baseline * math.exp(-dt / self.baseline_tau) + 1.0 / self.baseline_tau
            r.learned_s += dt
        r.at = now
        limit = self.threshold(r)
        # Two checks. Over its limit by more than a burst (GCRA): diverted at once, and back as
        # soon as it keeps to its limit again (a list near the floor that bunches up a little
        # loses a few messages to bulk, not its lane). Short-term rate over the limit: diverted
        # until the rate falls well below (hysteresis), and its usual rate is not learned meanwhile.
        r.tat = min(max(r.tat, now) + 1.0 / limit, now + MAX_DEBT_S)
        stressed = usual is None and now - self._last_flood_at < STRESS_S
        ahead = r.tat - now > (BURST_UNDER_STRESS if stressed else BURST) / limit
        if r.short > limit:
            r.flagged = True
        elif r.flagged and r.short < limit * RELEASE_FRACTION:
            r.flagged = False
        if r.flagged or ahead:
            self._last_flood_at = now
            return True
        return False

    def rate(self, key: str, now: float) -> float:
        r = self._rates.get(key)
        return 0.0 if r is None else r.short * math.exp(-(now - r.at) / self.tau)

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
            meta, warned = None, False
            while meta is None and not self.stopping.is_set():
                with contextlib.suppress(KafkaException):  # broker away: try again below
                    found = consumer.list_topics(topic, timeout=2).topics.get(topic)
                    meta = found if found is not None and found.error is None else None
                if meta is None:
                    if not warned:
                        log.warning("no reputation topic yet; no sender is exempt", extra={"topic": topic})
                        warned = True
                    self.stopping.wait(REPUTATION_RETRY_S)
            if meta is None:
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

    def __init__(self, settings: Settings, follow_reputation: bool = True) -> None:
        self.rates = RateTracker(settings.admission.flood_rate, settings.admission.surge)
        self.good = GoodSenders(settings)
        self.inbound, self.bulk = settings.topic("inbound"), settings.topic("bulk")
        # The counters' children, looked up once: labels() per message cost a third of admission.
        self._admitted = {lane: metrics.MESSAGES.labels("admission", lane, "admitted") for lane in ("priority", "bulk")}
        if follow_reputation:
            self.good.start()

    def lane(self, ev: events.MailEvent, now: float | None = None) -> str:
        """``priority`` or ``bulk``; every source key of the message is counted either way."""
        now = time.time() if now is None else now
        self.rates.prune(now)
        keys = senders.keys(ev.envelope.mail_from, ev.envelope.client_address)
        trusted = senders.trusted_keys(ev.envelope.mail_from, ev.envelope.client_address,
                                       authres.proven_domains(ev.extra))
        if self.good.is_good(trusted):
            return "priority"
        flooding = False
        # Rates per client, sender address and campaign; not per sender domain, which freemail
        # providers and forgers share with everyone (a domain can still be known-good).
        counted = [k for k in keys if not k.startswith(senders.DOMAIN)]
        for key in (*counted, f"campaign:{fingerprint(ev.raw)}"):
            # Every key is counted, even after one is found flooding, so rates stay true.
            flooding = self.rates.hit(key, now) or flooding
        return "bulk" if flooding else "priority"

    def topic(self, ev: events.MailEvent, now: float | None = None) -> str:
        lane = self.lane(ev, now)
        self._admitted[lane].inc()
        return self.bulk if lane == "bulk" else self.inbound

    def divert(self, ev: events.MailEvent, now: float | None = None) -> str:
        """The bulk lane's topic for a message the ingress sends there on its own account (a client
        without history while the ingress is under stress); its sources are counted as usual, so
        their rates stay true. A known-good sender still goes to the priority lane: by the names
        the message proved, as in :meth:`lane` (a forger of a known-good sender, held under
        admission's floor by the stress limits, would otherwise be sent back to the priority lane)."""
        if self.lane(ev, now) == "priority" and self.good.is_good(senders.trusted_keys(
                ev.envelope.mail_from, ev.envelope.client_address, authres.proven_domains(ev.extra))):
            self._admitted["priority"].inc()
            return self.inbound
        self._admitted["bulk"].inc()
        return self.bulk

    def close(self) -> None:
        self.good.stop()
