"""Synthetic but realistic mail traffic from a real corpus, for the demo and the flood benchmark.

Steady mixed mail (corpus ham and spam, many senders, several recipient domains) at a base
rate for the whole run; during the flood window, spam on top at ``flood_rate``: first
campaign-style (one message, near-identical copies, from a handful of bots), then diverse
(many different spam messages from a few dozen bots). Each planned message gets the envelope
``floodgate replay`` would give it (:class:`pipeline.replay.EnvelopeSynth`: MAIL FROM from its
headers, one recipient at a local domain, one client address per sender domain). Flood mail
comes from bot clients with forged random senders, as botnets send it; the corpus's own
envelope senders of spam are often the mailing lists it was collected from, which a real
campaign would not carry.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from models.corpus import Message
from pipeline.core import events
from pipeline.kafka import LaneProducer
from pipeline.replay import EnvelopeSynth, client_address

RECIPIENT_DOMAINS = ("example.com", "example.net", "example.org")
USERS_PER_DOMAIN = 40
CAMPAIGN_BOTS = 3
DIVERSE_BOTS = 24
SYNTH = EnvelopeSynth(RECIPIENT_DOMAINS, users=USERS_PER_DOMAIN * len(RECIPIENT_DOMAINS))


@dataclass(frozen=True, slots=True)
class Planned:
    at: float  # seconds from the start of the run
    raw: bytes
    label: str
    kind: str  # base | campaign | diverse
    envelope: events.Envelope


@dataclass
class Sent:
    """What the generator sent, by event id: the ground truth a report is checked against."""

    kinds: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    accepted: dict[str, float] = field(default_factory=dict)  # the event's accepted_at
    acked: dict[str, float] = field(default_factory=dict)  # event id -> when the broker acknowledged it
    start: float = 0.0
    behind_max_s: float = 0.0  # how far the generator fell behind its own schedule


def _recipient(rng: random.Random) -> str:
    return SYNTH.recipient(f"{rng.getrandbits(64):016x}")


def envelope_for(raw: bytes, rng: random.Random, client: str | None = None) -> events.Envelope:
    """Replay's envelope for ``raw``, to a recipient drawn from ``rng`` (the same message may be
    sent many times, to different people)."""
    return SYNTH.envelope(raw, f"{rng.getrandbits(64):016x}", client)


def plan(ham: Sequence[Message], spam: Sequence[Message], *, base_rate: float, flood_rate: float,
         pre_s: float, flood_s: float, post_s: float, seed: int = 7) -> list[Planned]:
    rng = random.Random(seed)
    total = pre_s + flood_s + post_s
    out: list[Planned] = []
    mixed = [(m, "ham") for m in ham] + [(m, "spam") for m in spam]
    rng.shuffle(mixed)
    n = int(total * base_rate)
    for i in range(n):
        m, label = mixed[i % len(mixed)]
        out.append(Planned(i / base_rate, m.raw, label, "base", envelope_for(m.raw, rng)))
    # The campaign's message depends on the seed alone, not on how much base traffic came first.
    campaign = spam[random.Random(seed).randrange(len(spam))].raw
    half = flood_s / 2
    for i in range(int(flood_s * flood_rate)):
        t = pre_s + i / flood_rate
        if t < pre_s + half:
            bot, raw, kind = f"campaign-{i % CAMPAIGN_BOTS}", campaign, "campaign"
        else:
            bot, raw, kind = f"diverse-{i % DIVERSE_BOTS}", spam[rng.randrange(len(spam))].raw, "diverse"
        forged = f"{rng.getrandbits(40):010x}@{bot}.example"
        env = events.Envelope(mail_from=forged, rcpt_to=(_recipient(rng),), client_address=client_address(bot),
                              helo=f"{bot}.example")
        out.append(Planned(t, raw, "spam", kind, env))
    out.sort(key=lambda p: p.at)
    return out


def send(producer: LaneProducer, route: Callable[[events.MailEvent], str], planned: Sequence[Planned],
         source: str = "replay") -> Sent:
    """Produce the plan at its times (the event's ``accepted_at`` is its send time); ``route``
    names each event's topic, as an ingress's admission does."""
    sent = Sent(start=time.time())
    t0 = time.monotonic()

    def acked(err, msg, ev_id: str) -> None:  # type: ignore[no-untyped-def]
        if err is None:
            sent.acked[ev_id] = time.time()

    for p in planned:
        delay = p.at - (time.monotonic() - t0)
        if delay > 0:
            time.sleep(delay)  # pacing a load generator, not synchronisation
        else:
            sent.behind_max_s = max(sent.behind_max_s, -delay)
        ev = events.new_event(p.envelope, p.raw, source=source, label=p.label)
        sent.kinds[ev.id] = p.kind
        sent.labels[ev.id] = p.label
        sent.accepted[ev.id] = ev.accepted_at
        topic = route(ev)
        while True:
            try:
                producer.produce(topic, key=ev.key, value=events.encode(ev),
                                 on_delivery=lambda err, msg, i=ev.id: acked(err, msg, i))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    producer.flush(60)
    return sent
