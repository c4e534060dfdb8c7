"""Per-client limits at the socket, and what changes under stress (Postfix's anvil and its
stress-dependent settings, for Floodgate's ingress).

Decisions are made as early as they can be, before a session costs anything:

* **at connect** (:meth:`Clients.connect`): concurrent connections per client address and per
  network (/24 for IPv4, /64 for IPv6, where one host's neighbours are), the connection rate
  per client, and the total. A refused client gets ``421 4.7.0`` and the connection closes.
* **at MAIL FROM** (:meth:`Clients.mail`): the message rate per client, and, under stress, the
  share left to clients without history. A refused transaction gets ``450 4.7.1`` before its
  body is read; the client's MTA tries again later.

Clients are **known** once they have history: messages accepted into the priority lane over a
while, and only while the ingress is calm (so a flood's bots never earn it however long it
lasts), or a client address the reputation topic calls good. Clients without history share a
rate of their own (``unknown_message_rate``, per session process): a flood spread over many
sources, each under every per-source limit, still shows there. Under **stress** (that rate
exceeded, admission diverting a source, the connection table half full, or the event loop
falling behind) a client without history may hold only a couple of connections, clients without
history together only a share of the slots and only a few transactions at once, their accepted
mail goes to the bulk lane, and idle and error limits shrink. So a flood from many sources,
each under its own limits, cannot take the share that clients with history keep: mail from them
is never refused while they stay within their own limits.

Rates are GCRA (a leaky bucket as a theoretical arrival time: O(1) per event, no timers);
memory is bounded by recent traffic (idle clients are forgotten).
"""

from __future__ import annotations

import functools
import ipaddress
import math
from collections import Counter
from dataclasses import dataclass

from pipeline.core.config import SmtpSettings

# How long stress lasts after its last sign: long enough that a flood's pauses do not reopen
# the door, short enough that normal limits return soon after it ends (admission's STRESS_S).
STRESS_HOLD_S = 10.0
# Forget a client after this long without a connection (its rates have long recovered; its
# history is rebuilt in a few minutes of mail).
IDLE_S = 3600.0
PRUNE_EVERY_S = 60.0

REFUSE_TOTAL = "421 4.7.0 too many connections, try again later"
REFUSE_CLIENT = "421 4.7.0 too many connections from your address, try again later"
REFUSE_NETWORK = "421 4.7.0 too many connections from your network, try again later"
REFUSE_RATE = "421 4.7.0 too many connections per second from your address, try again later"
REFUSE_STRESS = "421 4.7.0 server busy, try again later"
DEFER_RATE = "450 4.7.1 too much mail from your address, try again later"
DEFER_STRESS = "450 4.7.1 server busy, try again later"


@functools.lru_cache(maxsize=65536)  # per connection and per disconnect: the same few clients
def network_of(address: str) -> str:
    """The network a client address counts towards: its /24 (IPv4) or /64 (IPv6)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    v4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip
    return str(ipaddress.ip_network(f"{v4}/24", strict=False))


@dataclass
class _Client:
    connections: int = 0
    conn_tat: float = 0.0  # GCRA theoretical arrival time of connections
    mail_tat: float = 0.0  # ...and of messages
    first_accepted: float | None = None
    accepted: int = 0
    inflight: int = 0  # transactions between MAIL and their end
    seen: float = 0.0
    known: bool = False
    held: int = 0  # error replies held (tarpit) in a row, each within STRESS_HOLD_S of the last
    held_at: float = -math.inf


def _gcra(tat: float, now: float, rate: float, burst: float) -> tuple[bool, float]:
    """(allowed, new tat) for one more event at ``rate`` a second with ``burst`` in hand."""
    if rate <= 0:
        return True, tat
    interval = 1.0 / rate
    new = max(tat, now) + interval
    if new - now > burst * interval:
        return False, tat
    return True, new


class Clients:
    """Every client of one ingress: its connections, rates and history (the anvil)."""

    def __init__(self, s: SmtpSettings) -> None:
        self.s = s
        self._clients: dict[str, _Client] = {}
        self._networks: Counter[str] = Counter()
        self.total = 0
        self.unknown_connections = 0
        self.unknown_inflight = 0
        self._unknown_tat = 0.0  # GCRA of the mail of all clients without history together
        self._stress_at = -math.inf
        self._pruned = 0.0

    # -- stress ------------------------------------------------------------------------------
    def stress(self, now: float) -> None:
        """A sign of stress from outside (admission diverting a flood, a slow event loop)."""
        self._stress_at = now

    def stressed(self, now: float) -> bool:
        if self.total >= self.s.max_connections * self.s.stress_connection_share:
            self._stress_at = now
        return now - self._stress_at < STRESS_HOLD_S

    def idle_timeout(self, now: float) -> float:
        return self.s.stress_idle_timeout_s if self.stressed(now) else self.s.idle_timeout_s

    def hard_error_limit(self, now: float) -> int:
        return self.s.stress_hard_error_limit if self.stressed(now) else self.s.hard_error_limit

    def tarpit(self, address: str, now: float) -> float:
        """How long to hold the error reply ``address`` gets now, under stress: ``error_sleep_s``,
        doubling with each further one it gets within :data:`STRESS_HOLD_S` of the last, up to
        ``stress_error_sleep_max_s``. A client refused once waits a second; a bot that reconnects
        at once on every refusal waits the most, and costs an accept and a close that much less
        often (in the hog shape of the front-door bench those were a fifth of the front's CPU)."""
        c = self._get(address, now)
        c.held = c.held + 1 if now - c.held_at < STRESS_HOLD_S else 1
        c.held_at = now
        s = self.s
        return min(s.error_sleep_s * 2 ** min(c.held - 1, 16), max(s.error_sleep_s, s.stress_error_sleep_max_s))

    # -- history -----------------------------------------------------------------------------
    def _get(self, address: str, now: float) -> _Client:
        c = self._clients.get(address)
        if c is None:
            c = self._clients[address] = _Client()
        c.seen = now
        return c

    def known(self, address: str) -> bool:
        c = self._clients.get(address)
        return c is not None and c.known

    def make_known(self, address: str, now: float) -> None:
        """History from elsewhere: a client the reputation topic calls good, or one another
        ingress process has seen long enough."""
        c = self._get(address, now)
        if not c.known:
            c.known = True
            self.unknown_connections -= c.connections
            self.unknown_inflight = max(0, self.unknown_inflight - c.inflight)

    def accepted(self, address: str, now: float) -> bool:
        """A message from ``address`` was accepted into the priority lane while the ingress was
        calm (the caller's to say); True when that made the client known."""
        c = self._get(address, now)
        if c.first_accepted is None:
            c.first_accepted = now
        c.accepted += 1
        if (not c.known and c.accepted >= self.s.known_after_messages
                and now - c.first_accepted >= self.s.known_after_s):
            self.make_known(address, now)
            return True
        return False

    # -- connections -------------------------------------------------------------------------
    def connect(self, address: str, now: float) -> str | None:
        """Count a new connection from ``address``; the refusal reply instead, if any."""
        self._prune(now)
        s = self.s
        c = self._get(address, now)
        net = network_of(address)
        if self.total >= s.max_connections:
            return REFUSE_TOTAL
        if c.connections >= s.max_connections_per_client:
            return REFUSE_CLIENT
        if self._networks[net] >= s.max_connections_per_network:
            return REFUSE_NETWORK
        if not c.known and self.stressed(now):
            if c.connections >= s.stress_unknown_connections_per_client:
                return REFUSE_CLIENT
            if self.unknown_connections >= s.max_connections * s.stress_unknown_share:
                return REFUSE_STRESS
        ok, tat = _gcra(c.conn_tat, now, s.client_connection_rate, s.client_connection_burst)
        if not ok:
            return REFUSE_RATE
        c.conn_tat = tat
        c.connections += 1
        self._networks[net] += 1
        self.total += 1
        if not c.known:
            self.unknown_connections += 1
        return None

    def disconnect(self, address: str) -> None:
        c = self._clients.get(address)
        if c is None or c.connections <= 0:
            return
        c.connections -= 1
        net = network_of(address)
        self._networks[net] -= 1
        if self._networks[net] <= 0:
            del self._networks[net]
        self.total -= 1
        if not c.known:
            self.unknown_connections -= 1

    # -- messages ----------------------------------------------------------------------------
    def mail(self, address: str, now: float) -> str | None:
        """A MAIL FROM from ``address`` (the connection's client, or the one a trusted relay
        forwarded); the deferral reply instead, if any. An allowed one must be ended with
        :meth:`done`."""
        c = self._get(address, now)
        ok, tat = _gcra(c.mail_tat, now, self.s.client_message_rate, self.s.client_message_burst)
        if not ok:
            return DEFER_RATE
        if not c.known:
            shared, shared_tat = _gcra(self._unknown_tat, now, self.s.unknown_message_rate,
                                       self.s.unknown_message_burst)
            if not shared:
                self._stress_at = now  # more mail from strangers than their share: a flood
                return DEFER_STRESS
            if self.stressed(now) and self.unknown_inflight >= self.s.stress_unknown_transactions:
                return DEFER_STRESS
            self._unknown_tat = shared_tat
        c.mail_tat = tat
        c.inflight += 1
        if not c.known:
            self.unknown_inflight += 1
        return None

    def done(self, address: str) -> None:
        """The transaction :meth:`mail` allowed has ended (accepted, refused, reset, or closed)."""
        c = self._clients.get(address)
        if c is None or c.inflight <= 0:
            return
        c.inflight -= 1
        if not c.known:
            self.unknown_inflight = max(0, self.unknown_inflight - 1)

    def _prune(self, now: float) -> None:
        if now - self._pruned < PRUNE_EVERY_S:
            return
        self._pruned = now
        self._clients = {a: c for a, c in self._clients.items()
                         if c.connections or c.inflight or now - c.seen < IDLE_S}

    def __len__(self) -> int:
        return len(self._clients)
