"""DNS zones and signed mail for benches of sender authentication (a private knotd serves the zones).

The world a bench's verifying ingress sees:

* ``N`` sender domains ``d<i>.auth.test`` (one zone each: its own SPF, DKIM key, DMARC policy),
  whose SPF allows all of 127/8 (every bench client), so their mail passes SPF, DKIM and DMARC:
  legitimate bulk mail, and the ham;
* a known-good domain, :data:`GOOD` (``bank.auth.test``), whose SPF allows only the ham senders'
  network (127.1/16), with a DKIM key and ``p=reject``: its own mail passes; the same name from
  anywhere else (a bot forging it) fails SPF, carries no valid signature and fails DMARC;
* the bots' domains of the other shapes (``bot<net>-<b>.example``): a wildcard ``?all`` SPF
  record in a zone ``example``, no DKIM, no DMARC (neutral, none, none).

Messages are signed at build time (dkimpy, relaxed/simple, rsa-sha256 with a 2048-bit key per
:data:`KEYS` slot), so the bench pays only for verification.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.bench import mailauth

GOOD = "bank.auth.test"
SELECTOR = "sel"
KEYS = 4  # distinct 2048-bit keys, shared round-robin by the domains (key generation is slow)
HAM_NETWORK = "127.1.0.0/16"  # pipeline.bench.smtpload.HAM_NET
_FROM = re.compile(rb"^From:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*\r?\n", re.M | re.I)


def domain(i: int) -> str:
    return f"d{i}.auth.test"


@dataclass
class World:
    zones: dict[str, list[tuple]]
    keys: list[mailauth.RsaKey]
    good_key: mailauth.RsaKey

    def sign(self, raw: bytes, dom: str, key: mailauth.RsaKey) -> bytes:
        return mailauth.sign(raw, dom, SELECTOR, key)


def build(n_domains: int) -> World:
    keys = [mailauth.rsa_key(2048) for _ in range(KEYS)]
    good_key = mailauth.rsa_key(2048)
    zones: dict[str, list[tuple]] = {
        GOOD: [("@", "TXT", f"v=spf1 ip4:{HAM_NETWORK} -all"), (f"{SELECTOR}._domainkey", "TXT", good_key.record()),
               ("_dmarc", "TXT", "v=DMARC1; p=reject"), ("mail", "A", "127.1.0.1")],
        "example": [("*", "TXT", "v=spf1 ?all")],
    }
    for i in range(n_domains):
        zones[domain(i)] = [("@", "TXT", "v=spf1 ip4:127.0.0.0/8 -all"),
                            (f"{SELECTOR}._domainkey", "TXT", keys[i % KEYS].record()),
                            ("_dmarc", "TXT", "v=DMARC1; p=none"), ("mail", "A", "127.0.0.1")]
    return World(zones, keys, good_key)


def with_from(raw: bytes, address: str) -> bytes:
    """``raw`` with its (first) From field replaced by ``address`` (or one added on top)."""
    line = b"From: <" + address.encode() + b">\r\n"
    if _FROM.search(raw):
        return _FROM.sub(lambda _m: line, raw, count=1)
    return line + raw


def signed_mail(world: World, raws: Sequence[bytes], first: int, count: int) -> list[tuple[str, bytes]]:
    """(MAIL FROM, signed message) for domains ``first`` .. ``first + count - 1``, one message each
    (cycling through ``raws``): legitimate bulk mail that passes SPF, DKIM and DMARC."""
    out = []
    for k in range(count):
        dom = domain(first + k)
        raw = with_from(raws[k % len(raws)], f"news@{dom}")
        out.append((f"bounce@{dom}", world.sign(raw, dom, world.keys[(first + k) % KEYS])))
    return out


def good_mail(world: World, raw: bytes) -> tuple[str, bytes]:
    """A message from the known-good domain itself (sent from the ham network: it passes)."""
    return f"bounce@{GOOD}", world.sign(with_from(raw, f"alerts@{GOOD}"), GOOD, world.good_key)


def forged_good(raw: bytes) -> tuple[str, bytes]:
    """Spam forging the known-good domain in MAIL FROM and From, unsigned: from a bot it fails
    SPF (not in the domain's network) and DMARC (p=reject), and proves nothing."""
    return f"alerts@{GOOD}", with_from(raw, f"alerts@{GOOD}")


def ham_mail(world: World, raws: Sequence[bytes], first: int, domains: int, good_every: int = 10
             ) -> list[tuple[str, str, bytes]]:
    """(HELO, MAIL FROM, signed message) per ham message: from ``domains`` sender domains starting
    at ``first``, every ``good_every``-th from the known-good domain :data:`GOOD` (sent from the
    ham network, so it passes and proves the name)."""
    out = []
    for i, raw in enumerate(raws):
        if good_every and i % good_every == 0:
            mail_from, signed = good_mail(world, raw)
            out.append((f"mail.{GOOD}", mail_from, signed))
            continue
        k = first + i % domains
        dom = domain(k)
        signed = world.sign(with_from(raw, f"someone@{dom}"), dom, world.keys[k % KEYS])
        out.append((f"mail.{dom}", f"someone@{dom}", signed))
    return out
