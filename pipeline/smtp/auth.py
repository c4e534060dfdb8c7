"""Sender authentication at SMTP ingress: SPF, DKIM, ARC and DMARC, on the ingress's event loop.

What is checked (RFC 7208, 6376, 8617, 7489), and what comes out (RFC 8601):

* SPF for the MAIL FROM identity (for the null sender ``<>``, ``postmaster@<HELO>``) and for the
  HELO name (``helo``: by default only when MAIL FROM did not pass; a pass proved the client may
  send for the sender, and a HELO name proves no sender's name); results ``pass fail softfail
  neutral none temperror permerror``;
* DKIM, every signature (at most ``max_signatures``): ``pass fail none temperror permerror`` with
  its ``d=``/``s=``; ARC chain validation (``none pass fail``, ``temperror`` when DNS failed);
* DMARC for the From domain: ``pass fail none temperror permerror``, the policy that applies
  (``p=``, or ``sp=`` for a subdomain of the organisational domain) and which identity aligned;
* :class:`AuthResults` renders one ``Authentication-Results`` header with our authserv-id,
  metadata for the event (``extra["auth"]``), and the identities it proved (:meth:`proven`):
  admission gives known-good standing only to those.

How the blocking libraries are kept off the network. dkimpy and pyspf are the well-kept
implementations, but they do DNS themselves, blockingly, and hide timeouts (dkimpy turns a DNS
timeout into ``False``: a timeout would look like a forged signature). Here they never touch the
network: each library call runs on the event loop against a DNS view that answers from the cache
only (dkimpy's ``dnsfunc``; pyspf's module-level ``spf.DNSLookup``, replaced at import and
deferring to the original outside a verification). On a miss the hook raises :class:`_Miss`;
the caller awaits the record (aiodns/c-ares, or dnspython's asyncio resolver; one query per name
however many messages wait for it) and runs the library call again. A library call is pure CPU
(an SPF evaluation ~0.1 ms, a DKIM signature ~0.3 ms), so the re-runs on a cold cache are cheap,
and with a warm cache every check runs once with no I/O. The keys of all signatures, the SPF
records of MAIL FROM and HELO and the DMARC record are fetched concurrently. Evaluation limits
(SPF's 10 lookups, 2 void lookups) are the library's own, counted afresh per run.

The budget. The whole verification of a message is bounded by ``budget_s`` (default 2 s) from
the end of DATA; each DNS wait is bounded by what is left of it. Anything unfinished at the
deadline is ``temperror``, never ``pass``. A DNS query itself runs on for up to
``query_timeout_s`` after the message that started it gave up, so its answer (or its failure,
cached ``failure_ttl_s``) serves the next message: a dead name server costs one wait, not one
per message. SPF can start at the first accepted RCPT (:meth:`Verifier.start_spf`), overlapping
DATA.

What repeats is not done again (each measured with ``pipeline.bench.authbench``, CPU per message
on this 2-core host; BENCHMARKS.md):

* an SPF result is kept per (client, domain) until the first record it used expires — per
  (client, sender, HELO) when a record has a macro (``%{l}``, ``%{h}``...);
* a DKIM signature's result is kept by what it covers (the signature field, every field its
  ``h=`` names, the body) and its key record, until that record expires: a campaign sent to many
  recipients one transaction at a time, or a flood of one signed message, costs a hash, not
  dkimpy (0.34 -> 0.09 ms a message for a campaign);
* key records are parsed once per distinct record, RSA signatures are checked in OpenSSL
  (``cryptography``; dkimpy's pure-Python pow() took 0.17 ms of a 0.45 ms check), checked at
  import to give dkimpy's answers;
* DKIM, ARC and DMARC run inline after one concurrent prefetch of every record they need, so a
  warm message makes no task and never suspends.

CPU bounds (attacker-chosen inputs): keys over ``max_key_bits`` or with a public exponent over
2**32 are refused before any arithmetic (pow() with a 16384-bit exponent holds the GIL for ~20 s);
at most ``max_signatures`` DKIM signatures and ``max_arc_sets`` ARC sets are evaluated (each one
canonicalises and hashes the body again). DKIM/ARC of messages over ``process_above_bytes`` run
in one worker process (dkimpy's canonicalisation is single regex calls that hold the GIL ~50 ms
a MB: a thread would stall the loop), at most ``max_big_inflight`` queued, else ``temperror``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import concurrent.futures.process
import contextlib
import contextvars
import functools
import hashlib
import ipaddress
import logging
import multiprocessing
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from email.utils import getaddresses
from typing import Any, TypeVar

import dkim
import dkim.crypto
import dkim.util
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import spf
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes as crypto_hashes
from cryptography.hazmat.primitives.asymmetric import padding as crypto_padding
from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa
from cryptography.hazmat.primitives.asymmetric import utils as crypto_utils
from publicsuffixlist import PublicSuffixList

from pipeline.core import authres

try:  # c-ares through aiodns: the DNS client's CPU per query is a third of dnspython's
    import aiodns
    import pycares
except ImportError:  # pragma: no cover - then the dnspython backend
    aiodns = None

log = logging.getLogger("floodgate.auth")
T = TypeVar("T")

HELO_MODES = ("always", "unless-mailfrom-passes", "never")
# The big-message worker process starts in ~0.5-2 s (a fresh interpreter importing dkimpy); on a
# loaded host it has taken longer. Readiness waits this long for it at most.
WARM_UP_S = 60.0
SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# A library re-run per missing record: SPF needs at most ~1 + 10 mechanisms + 10 MX hosts each;
# the deadline ends it long before this in practice.
MAX_ROUNDS = 128
# RSA public exponents over this are refused before any arithmetic: pow() with a huge exponent holds
# the loop for seconds, and real keys use 65537.
MAX_EXPONENT = 2**32

# dkimpy logs every failed signature at ERROR: keep that out of the service log.
_quiet = logging.getLogger("floodgate.auth.dkimpy")
_quiet.setLevel(logging.CRITICAL)
_quiet.propagate = False
_quiet.addHandler(logging.NullHandler())


# ------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class AuthConfig:
    """The verifier's knobs (``[auth]`` in floodgate.toml, see pipeline.core.config.AuthSettings)."""

    authserv_id: str = "floodgate.localdomain"
    nameservers: tuple[str, ...] = ()  # empty: the system's resolv.conf
    dns_port: int = 53
    budget_s: float = 2.0  # the whole verification of one message
    query_timeout_s: float = 1.5  # one DNS query (it may outlive the message that started it)
    cache_entries: int = 50_000  # records: ~3 a sending domain, so ~15,000 domains' worth (a few MB)
    min_ttl_s: float = 5.0  # a TTL of 0 would make every message of a flood ask again
    max_ttl_s: float = 3600.0  # a revoked key or SPF change is seen within the hour whatever the TTL says
    max_negative_ttl_s: float = 300.0  # RFC 2308's advice is 1-3 hours; a new DKIM key must be seen sooner
    failure_ttl_s: float = 10.0  # timeouts and SERVFAIL: one wait per name, not one per message
    helo: str = "unless-mailfrom-passes"  # always | unless-mailfrom-passes | never
    arc: bool = True
    max_signatures: int = 5  # each hashes the body again; real mail carries 1-3 (author, ESP, list)
    max_arc_sets: int = 8  # RFC 8617 allows 50; each set is a seal and a signature to check
    max_key_bits: int = 4096  # RFC 8301: verifiers must handle 1024..4096
    min_key_bits: int = 1024  # RFC 8301: shorter RSA keys do not verify
    process_above_bytes: int = 256 * 1024  # DKIM/ARC of bigger messages in a worker process
    max_big_inflight: int = 4  # big messages queued for it; more: temperror at once (memory bound)
    dns_backend: str = "aiodns"  # aiodns (c-ares: ~0.15 CPU ms a query) | dnspython (pure Python: ~0.45)
    negative_ttl_s: float = 60.0  # NXDOMAIN/NODATA with the aiodns backend (c-ares hides the SOA)
    spf_result_entries: int = 20_000  # (client, domain[, sender, HELO]) -> result, until a record it used expires
    dkim_result_entries: int = 20_000  # a repeated signature over the same bytes -> its result, likewise
    signed_fields_only: bool = True  # dkimpy gets the signed fields and the body only (_signed_part)

    def __post_init__(self) -> None:
        if self.helo not in HELO_MODES:
            raise ValueError(f"auth.helo must be one of {', '.join(HELO_MODES)}, not {self.helo!r}")


# ------------------------------------------------------------------------------------------------
# DNS: an asyncio resolver with a TTL cache, shared in-flight queries and a cached failure state

OK, NXDOMAIN, TEMP = "ok", "nxdomain", "temperror"


@dataclass(frozen=True, slots=True)
class Entry:
    status: str  # ok (values may be empty: NODATA) | nxdomain | temperror
    values: tuple[Any, ...] = ()
    expires: float = 0.0
    error: str = ""


def _key(name: str | bytes, rdtype: str) -> tuple[str, str]:
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.rstrip(".").lower(), rdtype.upper()


def _values(rdtype: str, answer: dns.resolver.Answer) -> tuple[Any, ...]:
    """Record data in the shapes pyspf's DNSLookup returns (dkimpy and DMARC use TXT's)."""
    if answer.rrset is None:
        return ()
    if rdtype in ("TXT", "SPF"):
        return tuple(tuple(r.strings) for r in answer.rrset)
    if rdtype in ("A", "AAAA"):
        return tuple(r.address for r in answer.rrset)
    if rdtype == "MX":
        return tuple((r.preference, r.exchange.to_text()) for r in answer.rrset)
    if rdtype == "PTR":
        return tuple(r.target.to_text(True) for r in answer.rrset)
    return tuple(r.to_text() for r in answer.rrset)


_RDTYPE = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28, "SPF": 99}


def _ares_value(rdtype: str, data: Any) -> Any:
    """pycares record data in the shapes of _values (TXT: one record's strings, already joined)."""
    if rdtype in ("TXT", "SPF"):
        return (bytes(data.data),)
    if rdtype in ("A", "AAAA"):
        return data.addr
    if rdtype == "MX":
        return (data.priority, data.exchange)
    if rdtype == "PTR":
        return data.dname
    return str(data)


def _negative_ttl(response: dns.message.Message | None, cap: float) -> float:
    """RFC 2308: the SOA's minimum (bounded by its own TTL) from the authority section."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return min(float(rrset.ttl), float(rrset[0].minimum), cap)
    return min(60.0, cap)


class DnsCache:
    """DNS lookups for the verifier, on the running loop: cache, then one shared query per name.

    ``peek`` is synchronous (for the libraries' hooks); ``fetch`` awaits a record for at most
    until ``deadline`` (``loop.time()`` based) and never raises: a timeout is an Entry with
    status ``temperror``.
    """

    def __init__(self, cfg: AuthConfig) -> None:
        self.cfg = cfg
        self.backend = "aiodns" if cfg.dns_backend == "aiodns" and aiodns is not None else "dnspython"
        self._ares: Any = None  # made on first use, on the running loop
        self.resolver = dns.asyncresolver.Resolver(configure=not cfg.nameservers)
        if cfg.nameservers:
            self.resolver.nameservers = list(cfg.nameservers)
        self.resolver.port = cfg.dns_port
        self.resolver.cache = None  # ours below: it also keeps failures and shares in-flight queries
        self.resolver.use_edns(0, 0, 1232)  # DKIM keys fit in UDP; truncation falls back to TCP
        self.resolver.timeout = min(cfg.query_timeout_s, 1.0)  # per try; lifetime bounds the retries
        self._cache: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Task[Entry]] = {}
        self.queries = 0  # sent to the resolver (for tests and benchmarks)
        self.hits = 0

    def clear(self) -> None:
        self._cache.clear()

    def peek(self, key: tuple[str, str]) -> Entry | None:
        e = self._cache.get(key)
        if e is None:
            return None
        if e.expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        self.hits += 1
        return e

    def _store(self, key: tuple[str, str], e: Entry) -> None:
        self._cache[key] = e
        self._cache.move_to_end(key)
        while len(self._cache) > self.cfg.cache_entries:
            self._cache.popitem(last=False)

    async def fetch(self, key: tuple[str, str], deadline: float) -> Entry:
        e = self.peek(key)
        if e is not None:
            return e
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(key))
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return Entry(TEMP, error="verification budget spent")
        try:
            # shield: one message giving up does not cancel the query others (or the cache) await
            return await asyncio.wait_for(asyncio.shield(task), remaining)
        except TimeoutError:
            return Entry(TEMP, error="verification budget spent waiting for DNS")

    async def aclose(self) -> None:
        """Release the c-ares channel (on the loop that used it)."""
        ares, self._ares = self._ares, None
        if ares is not None:
            with contextlib.suppress(Exception):
                await ares.close()

    async def _query(self, key: tuple[str, str]) -> Entry:
        self.queries += 1
        if self.backend == "aiodns":
            return await self._query_ares(key)
        return await self._query_dnspython(key)

    async def _query_ares(self, key: tuple[str, str]) -> Entry:
        name, rdtype = key
        cfg = self.cfg
        now = time.monotonic()
        if self._ares is None:
            servers = [f"{ns}:{cfg.dns_port}" if ":" not in ns else f"[{ns}]:{cfg.dns_port}" for ns in cfg.nameservers]
            # tries x timeout <= query_timeout_s; asyncio.wait_for below is the hard bound anyway
            self._ares = aiodns.DNSResolver(nameservers=servers or None, timeout=cfg.query_timeout_s / 2, tries=2)
        try:
            res = await asyncio.wait_for(self._ares.query_dns(name, rdtype), cfg.query_timeout_s)
        except TimeoutError:
            e = Entry(TEMP, error="timeout", expires=now + cfg.failure_ttl_s)
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args else None
            if code == pycares.errno.ARES_ENODATA:
                e = Entry(OK, (), now + max(cfg.min_ttl_s, min(cfg.negative_ttl_s, cfg.max_negative_ttl_s)))
            elif code in (pycares.errno.ARES_ENOTFOUND, pycares.errno.ARES_EBADNAME):
                e = Entry(NXDOMAIN, expires=now + max(cfg.min_ttl_s, min(cfg.negative_ttl_s, cfg.max_negative_ttl_s)))
            else:  # timeout, SERVFAIL, REFUSED, connection refused, bad response...
                e = Entry(TEMP, error=str(exc.args[1] if len(exc.args) > 1 else exc), expires=now + cfg.failure_ttl_s)
        except Exception as exc:
            log.exception("resolver failed", extra={"name": name, "rdtype": rdtype})
            e = Entry(TEMP, error=type(exc).__name__, expires=now + cfg.failure_ttl_s)
        else:
            want = _RDTYPE[rdtype]
            records = [r for r in res.answer if r.type == want]
            values = tuple(_ares_value(rdtype, r.data) for r in records)
            ttl = min((r.ttl for r in records), default=cfg.negative_ttl_s)
            e = Entry(OK, values, now + min(max(float(ttl), cfg.min_ttl_s), cfg.max_ttl_s))
        if e.expires > now:
            self._store(key, e)
        return e

    async def _query_dnspython(self, key: tuple[str, str]) -> Entry:
        name, rdtype = key
        cfg = self.cfg
        now = time.monotonic()
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:  # not a DNS name: no data
            return Entry(NXDOMAIN, error=f"invalid name: {exc}", expires=now)
        try:
            answer = await self.resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False,
                                                 lifetime=cfg.query_timeout_s)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            response = next(iter(responses.values()), None)
            e = Entry(NXDOMAIN, expires=now + max(cfg.min_ttl_s, _negative_ttl(response, cfg.max_negative_ttl_s)))
        except (dns.resolver.LifetimeTimeout, dns.resolver.NoNameservers, dns.exception.DNSException, OSError) as exc:
            e = Entry(TEMP, error=type(exc).__name__, expires=now + cfg.failure_ttl_s)
        except Exception as exc:  # never let a resolver bug become anything but a temporary error
            log.exception("resolver failed", extra={"name": name, "rdtype": rdtype})
            e = Entry(TEMP, error=type(exc).__name__, expires=now + cfg.failure_ttl_s)
        else:
            values = _values(rdtype, answer)
            if answer.rrset is not None:
                ttl = min(max(float(answer.rrset.ttl), cfg.min_ttl_s), cfg.max_ttl_s)
            else:
                ttl = max(cfg.min_ttl_s, _negative_ttl(answer.response, cfg.max_negative_ttl_s))
            e = Entry(OK, values, now + ttl)
        if e.expires > now:
            self._store(key, e)
        return e


class _Results(OrderedDict[Any, tuple[float, Any]]):
    """Checked results kept until the first DNS record they used expires (monotonic seconds),
    at most ``entries`` of them, the oldest written leaving first; ``hits`` counts answers."""

    def __init__(self, entries: int) -> None:
        super().__init__()
        self.entries = entries
        self.hits = 0

    def answer(self, key: Any) -> Any:
        """The result kept for ``key``, or None (never kept, or expired: then forgotten)."""
        hit = self.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self[key]
            return None
        self.hits += 1
        return hit[1]

    def keep(self, key: Any, expires: float, result: Any) -> None:
        self[key] = (expires, result)
        self.move_to_end(key)
        while len(self) > self.entries:
            self.popitem(last=False)


class _Miss(Exception):
    """A library asked for a record that is not cached yet (caught by _View.run)."""

    def __init__(self, key: tuple[str, str]) -> None:
        super().__init__(key)
        self.key = key


class _TempDNS(Exception):
    """A DNS lookup failed temporarily. Not a DKIMException, so dkimpy cannot turn it into False."""


class _View:
    """One message's view of DNS: the shared cache, plus every entry this message already used
    (stable while it is verified, and holding failures that were not cached)."""

    def __init__(self, dns_cache: DnsCache, deadline: float) -> None:
        self.dns = dns_cache
        self.deadline = deadline
        self.seen: dict[tuple[str, str], Entry] = {}

    def get(self, name: str | bytes, rdtype: str) -> Entry:
        key = _key(name, rdtype)
        e = self.seen.get(key)
        if e is None:
            e = self.dns.peek(key)
            if e is None:
                raise _Miss(key)
            self.seen[key] = e
        return e

    async def fetch(self, key: tuple[str, str]) -> Entry:
        e = self.seen.get(key)
        if e is None:
            e = self.seen[key] = await self.dns.fetch(key, self.deadline)
        return e

    async def prefetch(self, keys: Iterable[tuple[str, str]]) -> None:
        todo = []
        for k in keys:
            if k not in self.seen:
                e = self.dns.peek(k)
                if e is None:
                    todo.append(k)
                else:
                    self.seen[k] = e
        if len(todo) == 1:
            await self.fetch(todo[0])
        elif todo:
            await asyncio.gather(*(self.fetch(k) for k in dict.fromkeys(todo)))

    def time_left(self) -> float:
        return self.deadline - asyncio.get_running_loop().time()

    async def run(self, fn: Callable[[], T],
                  after_miss: Callable[[tuple[str, str], Entry], Iterable[tuple[str, str]]] | None = None) -> T:
        """``fn()`` (a library call whose DNS hook reads this view) until it needs nothing missing.

        Raises TimeoutError when the budget is spent (the caller reports temperror).
        """
        for _ in range(MAX_ROUNDS):
            if self.time_left() <= 0:
                raise TimeoutError
            token = _current_view.set(self)
            try:
                return fn()
            except _Miss as miss:
                key = miss.key
            finally:
                _current_view.reset(token)
            entry = await self.fetch(key)
            if after_miss is not None:
                await self.prefetch(after_miss(key, entry))
        raise TimeoutError


# pyspf has no DNS argument: it calls the module-level spf.DNSLookup. Ours reads the current
# message's view (a context variable), and defers to the original outside a verification.
_current_view: contextvars.ContextVar[_View | None] = contextvars.ContextVar("floodgate_auth_view", default=None)
_ORIGINAL_SPF_LOOKUP = spf.DNSLookup


def _spf_lookup(name: str, qtype: str, strict: Any = True, timeout: Any = None) -> list[tuple[tuple[str, str], Any]]:
    view = _current_view.get()
    if view is None:
        return _ORIGINAL_SPF_LOOKUP(name, qtype, strict, timeout)  # type: ignore[no-any-return]
    e = view.get(name, qtype)
    if e.status == TEMP:
        raise spf.TempError(f"DNS {e.error or 'temporary failure'}")
    return [((name, qtype), v) for v in e.values]


spf.DNSLookup = _spf_lookup


# dkimpy's RSA helpers convert between integers and bytes one byte at a time in Python (a third of
# a signature check); the standard library does it in C, with the same results. And RSA's public
# operation is a pure function of (signature, key): a replayed signature (one message sent to many
# recipients in separate transactions, a flood of one signed message) skips the pow().
_ORIGINAL_RSA_ENCRYPT = dkim.crypto.rsa_encrypt


def _int2str(n: int, length: int = -1) -> bytearray:
    if length < 0:
        return bytearray(n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big"))
    return bytearray((n % (1 << (8 * length))).to_bytes(length, "big"))  # dkimpy keeps the low bytes too


def _str2int(s: bytes | bytearray) -> int:
    return int.from_bytes(bytes(s), "big")


@functools.lru_cache(maxsize=4096)
def _rsa_public_op(signature: bytes, modulus: int, exponent: int, mlen: int) -> bytes:
    return bytes(_ORIGINAL_RSA_ENCRYPT(signature, {"modulus": modulus, "publicExponent": exponent}, mlen))


def _rsa_encrypt(message: bytes, pk: dict[str, int], mlen: int) -> bytearray:
    return bytearray(_rsa_public_op(bytes(message), pk["modulus"], pk["publicExponent"], mlen))


_ORIGINAL_EVALUATE_PK = dkim.evaluate_pk


@functools.lru_cache(maxsize=4096)
def _evaluate_pk_memo(s: bytes) -> tuple[Any, Any, Any, Any]:
    return _ORIGINAL_EVALUATE_PK(b"", s)  # type: ignore[no-any-return]


def _evaluate_pk(name: bytes, s: bytes | str | None) -> tuple[Any, Any, Any, Any]:
    """dkimpy's key record parsing (ASN.1 in Python, ~0.1 ms), once per distinct record. The key
    objects are only read by dkimpy. Errors are not cached (and name the record as before)."""
    if not s:
        return _ORIGINAL_EVALUATE_PK(name, s)  # type: ignore[no-any-return]
    try:
        return _evaluate_pk_memo(s.encode("ascii") if isinstance(s, str) else bytes(s))
    except dkim.KeyFormatError:
        return _ORIGINAL_EVALUATE_PK(name, s)  # type: ignore[no-any-return]


# RSA signature verification in OpenSSL (the cryptography package) instead of dkimpy's pure
# Python: pow() on a 2048-bit modulus is ~0.17 ms, more than a third of a signature check; OpenSSL
# takes ~0.02 ms. Same inputs, same answer (checked at import); any key OpenSSL will not take
# (tiny, odd) goes to dkimpy's own code as before.
_ORIGINAL_RSA_VERIFY = dkim.RSASSA_PKCS1_v1_5_verify
_HASHES = {"sha256": crypto_hashes.SHA256(), "sha1": crypto_hashes.SHA1()}


@functools.lru_cache(maxsize=4096)
def _openssl_key(modulus: int, exponent: int) -> Any:
    try:
        return crypto_rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except (ValueError, TypeError, OverflowError):
        return None


def _rsa_verify(hash: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    algo = _HASHES.get(getattr(hash, "name", ""))
    key = _openssl_key(public_key["modulus"], public_key["publicExponent"]) if algo is not None else None
    if key is None:
        return bool(_ORIGINAL_RSA_VERIFY(hash, signature, public_key))
    try:
        key.verify(bytes(signature), hash.digest(), crypto_padding.PKCS1v15(), crypto_utils.Prehashed(algo))
    except InvalidSignature:
        return False
    return True


def _same_rsa_answers() -> bool:
    """dkimpy's verification and ours agree on a good and a bad signature (a 1024-bit test key)."""
    import hashlib

    priv = crypto_rsa.generate_private_key(public_exponent=65537, key_size=1024)
    n = priv.private_numbers()
    pk = {"modulus": n.public_numbers.n, "publicExponent": n.public_numbers.e}
    sk = {"modulus": n.public_numbers.n, "publicExponent": n.public_numbers.e, "privateExponent": n.d,
          "prime1": n.p, "prime2": n.q, "exponent1": n.dmp1, "exponent2": n.dmq1, "coefficient": n.iqmp}
    good = dkim.crypto.RSASSA_PKCS1_v1_5_sign(hashlib.sha256(b"x"), sk)
    bad = bytes([good[0] ^ 1]) + bytes(good[1:])
    return all(_rsa_verify(hashlib.sha256(b"x"), sig, pk) == _ORIGINAL_RSA_VERIFY(hashlib.sha256(b"x"), sig, pk)
               == ok for sig, ok in ((good, True), (bad, False)))


def _speed_up_dkimpy() -> None:
    """Install the faster helpers after checking they give dkimpy's results (else leave dkimpy alone)."""
    samples = [(0, 1), (1, -1), (255, -1), (256, 4), (2**2047 + 12345, 256), (2**70 - 1, 9)]
    if all(_int2str(n, ln) == dkim.crypto.int2str(n, ln) for n, ln in samples) and all(
            _str2int(b) == dkim.crypto.str2int(b) for b in (b"", b"\x00\x01", b"\xff" * 300)):
        dkim.crypto.int2str, dkim.crypto.str2int = _int2str, _str2int
        dkim.crypto.rsa_encrypt = _rsa_encrypt
        dkim.evaluate_pk = _evaluate_pk  # load_pk_from_dns looks it up in dkim's module namespace
    else:  # pragma: no cover - a dkimpy that changed these helpers
        log.warning("dkimpy's RSA helpers changed; not replacing them")
    try:
        same = _same_rsa_answers()
    except Exception:  # pragma: no cover - a dkimpy whose signing helpers changed
        same = False
    if same:
        dkim.RSASSA_PKCS1_v1_5_verify = _rsa_verify  # verify_sig_process looks it up in dkim's namespace
    else:  # pragma: no cover
        log.warning("dkimpy's RSA verification and OpenSSL's disagree; keeping dkimpy's")


_speed_up_dkimpy()


# ------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str
    identity: str  # mailfrom | helo
    domain: str = ""
    address: str = ""  # the checked sender address (postmaster@helo for the null sender)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DkimResult:
    result: str
    domain: str = ""
    selector: str = ""
    identity: str = ""
    algorithm: str = ""
    b: str = ""  # the first characters of b= (RFC 6008 header.b)
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DmarcResult:
    result: str  # pass fail none temperror permerror
    from_domain: str = ""
    policy: str = ""  # none | quarantine | reject: the one that applies
    org_domain: str = ""
    record_domain: str = ""
    spf_aligned: bool = False
    dkim_aligned: str = ""  # the aligned d= that passed
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ArcResult:
    result: str  # none pass fail temperror
    sets: int = 0
    reason: str = ""


@dataclass
class AuthResults:
    spf_mailfrom: SpfResult
    spf_helo: SpfResult | None
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult
    arc: ArcResult | None
    elapsed_s: float = 0.0
    timed_out: bool = False
    proven_domains: tuple[str, ...] = field(default=())

    def proven(self) -> tuple[str, ...]:
        """Domains this message proved it may speak for: the DMARC-aligned From domain, the SPF
        MAIL FROM domain on pass, each passing DKIM d=. (The HELO name is the client's, not a sender's.)"""
        return self.proven_domains

    def to_meta(self) -> dict[str, Any]:
        """For the event's metadata (``extra["auth"]``): plain JSON types only."""
        return {
            "spf": {"mailfrom": _plain(self.spf_mailfrom), "helo": _plain(self.spf_helo) if self.spf_helo else None},
            "dkim": [_plain(d) for d in self.dkim],
            "dmarc": _plain(self.dmarc),
            "arc": _plain(self.arc) if self.arc else None,
            "proven": list(self.proven_domains),
            "elapsed_ms": round(self.elapsed_s * 1000, 1),
            "timed_out": self.timed_out,
        }

    def header_value(self, authserv_id: str) -> str:
        """The Authentication-Results value (RFC 8601), folded with CRLF + tab between results."""
        parts: list[str] = []
        s = self.spf_mailfrom
        parts.append(_resinfo("spf", s.result, _comment(s.reason),
                              [("smtp.mailfrom", _mailbox_value(s.address, s.domain))]))
        if self.spf_helo is not None:
            h = self.spf_helo
            parts.append(_resinfo("spf", h.result, _comment(h.reason), [("smtp.helo", _domain_value(h.domain))]))
        if not self.dkim:
            parts.append("dkim=none")
        for d in self.dkim:
            props = [("header.d", _domain_value(d.domain)), ("header.s", _pvalue(d.selector)),
                     ("header.a", _pvalue(d.algorithm)), ("header.b", _pvalue(d.b))]
            parts.append(_resinfo("dkim", d.result, _comment(d.reason), [p for p in props if p[1]]))
        if self.arc is not None:
            parts.append(_resinfo("arc", self.arc.result, _comment(self.arc.reason), []))
        m = self.dmarc
        comment = f"p={m.policy}" if m.policy else ""
        if m.reason:
            comment = f"{comment} {m.reason}".strip()
        parts.append(_resinfo("dmarc", m.result, _comment(comment),
                              [("header.from", _domain_value(m.from_domain))] if m.from_domain else []))
        return _pvalue(authserv_id.rstrip(".")) + ";\r\n\t" + ";\r\n\t".join(parts)

    def header(self, authserv_id: str) -> str:
        return "Authentication-Results: " + self.header_value(authserv_id)


def _plain(result: Any) -> dict[str, Any]:
    """A flat result dataclass as a dict (dataclasses.asdict deep-copies: 5x slower)."""
    return {name: getattr(result, name) for name in result.__slots__}


# RFC 2045 token: any printable ASCII but SPACE and tspecials.
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_CTL = re.compile(r"[\x00-\x1f\x7f]")


def _pvalue(value: str) -> str:
    """A property value: a token, else a quoted-string (controls dropped, \\ and \" escaped)."""
    value = _CTL.sub("", value)[:200]
    if _TOKEN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _domain_value(domain: str) -> str:
    return domain if _DOMAIN.fullmatch(domain or "") else _pvalue(domain or "")


def _mailbox_value(address: str, domain: str) -> str:
    local, at, dom = address.rpartition("@")
    if at and _DOT_ATOM.fullmatch(local) and _DOMAIN.fullmatch(dom):
        return f"{local}@{dom}"
    return "@" + domain if _DOMAIN.fullmatch(domain or "") else _pvalue(address or domain)


def _comment(text: str) -> str:
    text = _CTL.sub(" ", text).strip()[:120]
    text = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    return f" ({text})" if text else ""


def _resinfo(method: str, result: str, comment: str, props: list[tuple[str, str]]) -> str:
    out = f"{method}={result}{comment}"
    for name, value in props:
        out += f" {name}={value}"
    return out


# ------------------------------------------------------------------------------------------------
# Headers: parsing, removing forged Authentication-Results, stamping ours

split_message = authres.split_message
header_fields = authres.header_fields
authserv_id_of = authres.authserv_id_of
strip_authentication_results = authres.strip_ours


def stamp(raw: bytes, results: AuthResults, authserv_id: str) -> tuple[bytes, int]:
    """Remove forged Authentication-Results with our id, then prepend ours (line ends as the
    message's first line). Returns the new message and how many fields were removed."""
    stripped, removed = strip_authentication_results(raw, authserv_id)
    nl = stripped.find(b"\n")  # no split: a 10 MB message is not copied to look at its first line
    eol = "\n" if nl > 0 and stripped[nl - 1:nl] != b"\r" else "\r\n"
    header = results.header(authserv_id).replace("\r\n", eol) + eol
    return header.encode("utf-8") + stripped, removed


# ------------------------------------------------------------------------------------------------
# Domains

_psl: PublicSuffixList | None = None


def _suffix_list() -> PublicSuffixList:
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()  # ~40 ms once; the list ships with the package
    return _psl


@functools.lru_cache(maxsize=65536)
def org_domain(domain: str) -> str:
    """RFC 7489 3.2 organisational domain (public suffix + one label); a suffix is its own."""
    return _suffix_list().privatesuffix(domain) or domain


def normalise_domain(domain: str) -> str | None:
    d = domain.strip().strip("<>[]").rstrip(".").lower()
    if not d:
        return None
    try:
        d = d.encode("idna").decode("ascii") if not d.isascii() else d
    except UnicodeError:
        return None
    return d if _DOMAIN.fullmatch(d) and len(d) <= 253 else None


def _aligned(a: str, b: str, mode: str) -> bool:
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


@functools.lru_cache(maxsize=65536)
def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _key_refusal(txt: bytes, max_bits: int) -> str:
    """Why a DKIM key record must not reach the arithmetic ('' when it may)."""
    try:
        tags = dkim.util.parse_tag_value(txt)
    except Exception:
        return ""  # dkimpy reports it as a key format error
    if tags.get(b"k", b"rsa") != b"rsa" or not tags.get(b"p"):
        return ""
    try:
        pk = dkim.crypto.parse_public_key(base64.b64decode(tags[b"p"]))
    except (binascii.Error, dkim.crypto.UnparsableKeyError, Exception):
        return ""
    if pk["modulus"].bit_length() > max_bits:
        return f"key over {max_bits} bits"
    if pk["publicExponent"] > MAX_EXPONENT:
        return "key exponent too large"
    return ""


# ------------------------------------------------------------------------------------------------
# The verifier


def _tags(value: bytes) -> dict[bytes, bytes]:
    try:
        return dkim.util.parse_tag_value(re.sub(rb"\r?\n", b"", value))
    except Exception:
        return {}


_TAG = {tag: re.compile(rb"(?:^|;)\s*" + tag + rb"\s*=\s*([^;]*)") for tag in (b"d", b"s", b"h", b"b")}
_WSP = re.compile(rb"\s+")


def _tag(value: bytes, tag: bytes) -> bytes:
    """One tag's value of a DKIM-Signature (whitespace removed): a regex, not a full tag parse,
    for the prefetch and the memo key only (what is verified is dkimpy's parse)."""
    m = _TAG[tag].search(value)
    return _WSP.sub(b"", m.group(1)) if m else b""


def _sig_key(value: bytes) -> tuple[str, str] | None:
    d, sel = _tag(value, b"d"), _tag(value, b"s")
    return _key(sel + b"._domainkey." + d, "TXT") if d and sel else None


def _signed_part(fields: list[tuple[bytes, bytes, bytes]], sigs: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The message as DKIM verification needs it: every DKIM-Signature field and every field a
    signature's ``h=`` names (all instances, in order: dkimpy picks the same ones from the bottom),
    then the body. dkimpy canonicalises *every* header field before it selects the signed ones
    (relaxed: three regex substitutions a field): a message with 40 Received and list fields cost
    0.4 ms for nothing. Results are the same (``test_auth.py``: tampering with a signed field still
    fails, unsigned fields never mattered)."""
    names = {b"dkim-signature"}
    for value, _raw in sigs:
        names.update(n.strip().lower() for n in _tag(value, b"h").split(b":") if n.strip())
    return b"".join(rawf for name, _v, rawf in fields if name.lower() in names) + body


def _dkim_memo_key(sig_raw: bytes, sig_value: bytes, fields: list[tuple[bytes, bytes, bytes]], body: bytes
                   ) -> bytes:
    """What a signature's result depends on besides its key record: the signature field itself,
    every field whose name its h= lists (all of them, in order: more than dkimpy reads, never
    less), and the body. Equal bytes, equal canonical forms, equal result."""
    signed = {n.strip().lower() for n in _tag(sig_value, b"h").split(b":") if n.strip()}
    h = hashlib.sha256(sig_raw)
    for name, _value, rawf in fields:
        if name.lower() in signed:
            h.update(b"\0" + rawf)
    h.update(b"\0\0")
    h.update(body)
    return h.digest()


def _signatures(d: dkim.DKIM, limit: int) -> range:
    """Indexes of the signatures to check, in dkimpy's own list of DKIM-Signature fields."""
    return range(min(limit, sum(1 for n, _ in d.headers if n.lower() == b"dkim-signature")))


def _dkim_result(tags: dict[bytes, bytes], result: str, reason: str = "") -> DkimResult:
    return DkimResult(result, _text(tags.get(b"d")).lower(), _text(tags.get(b"s")), _text(tags.get(b"i")),
                      _text(tags.get(b"a")), re.sub(r"\s+", "", _text(tags.get(b"b")))[:8], reason)


def _key_lookup(lookup: Callable[[bytes, str], Entry], max_bits: int, missing: set[bytes],
                refused: dict[bytes, str]) -> Callable[..., bytes | None]:
    """dkimpy's dnsfunc over a cache-only lookup: a miss raises _Miss, a DNS failure _TempDNS."""
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        e = lookup(name, "TXT")
        if e.status == TEMP:
            raise _TempDNS(e.error)
        if not e.values:
            missing.add(name)
            return None
        txt = b"".join(e.values[0])
        why = _key_refusal(txt, max_bits)
        if why:
            refused[name] = why
            return None
        return txt
    return dnsfunc


def _check_signature(d: dkim.DKIM, idx: int, lookup: Callable[[bytes, str], Entry], max_bits: int) -> DkimResult:
    """Signature ``idx`` of dkimpy's list, synchronously; _Miss propagates (the caller fetches and
    runs it again). The result names the d=/s= dkimpy itself parsed for that signature."""
    missing: set[bytes] = set()
    refused: dict[bytes, str] = {}
    d.signature_fields = {}  # dkimpy sets it when it parsed this signature; never a previous one's
    tags: dict[bytes, bytes] = {}
    try:
        ok = d.verify(idx=idx, dnsfunc=_key_lookup(lookup, max_bits, missing, refused))
        tags = d.signature_fields
    except _TempDNS as exc:
        return _dkim_result(d.signature_fields, "temperror", f"key lookup: {exc}")
    except dkim.ValidationError as exc:
        if "body hash" in str(exc):
            return _dkim_result(d.signature_fields, "fail", "body hash did not verify")
        return _dkim_result(d.signature_fields, "permerror", _short(exc))
    except dkim.DKIMException as exc:
        return _dkim_result(d.signature_fields, "permerror", _short(exc))
    except _Miss:
        raise
    except Exception as exc:  # a library bug: not a pass, not a crash
        log.exception("dkim check failed")
        return _dkim_result(d.signature_fields, "temperror", f"internal error {type(exc).__name__}")
    if ok:
        return _dkim_result(tags, "pass")
    if refused:
        return _dkim_result(tags, "permerror", next(iter(refused.values())))
    if missing:
        return _dkim_result(tags, "permerror", "no key for signature")
    return _dkim_result(tags, "fail", "signature did not verify")


def _check_arc(raw: bytes, lookup: Callable[[bytes, str], Entry], minkey: int, max_bits: int) -> ArcResult:
    try:
        a = dkim.ARC(raw, logger=_quiet, minkey=minkey)
    except dkim.DKIMException as exc:
        return ArcResult("fail", reason=_short(exc))
    sets = sum(1 for n, _ in a.headers if n.lower() == b"arc-seal")
    try:
        cv, _results, comment = a.verify(dnsfunc=_key_lookup(lookup, max_bits, set(), {}))
    except _TempDNS:
        return ArcResult("temperror", sets, "key lookup failed")
    except _Miss:
        raise
    except Exception as exc:
        return ArcResult("fail", sets, _short(exc))
    result = cv.decode() if isinstance(cv, bytes) else str(cv)
    return ArcResult(result if result in ("none", "pass", "fail") else "fail", sets,
                     "" if comment == "success" else str(comment)[:80])


def _worker_init() -> None:
    """In the big-message worker: die with the ingress (Linux PR_SET_PDEATHSIG), even when it is
    killed, and leave SIGINT to the ingress, which stops the pool itself."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        if os.getppid() == 1:  # the parent died before the line above took effect
            os._exit(0)


def _verify_big(raw: bytes, entries: dict[tuple[str, str], Entry], sealed: bool, limits: tuple[int, int, int]
                ) -> tuple[list[DkimResult], ArcResult | None, list[tuple[str, str]]]:
    """In a worker process: DKIM and ARC of a big message against the records fetched for it.
    Returns the keys it lacked (then the caller fetches them and sends the message again)."""
    minkey, max_bits, max_sigs = limits
    missing: list[tuple[str, str]] = []

    def lookup(name: bytes | str, rdtype: str) -> Entry:
        key = _key(name, rdtype)
        e = entries.get(key)
        if e is None:
            raise _Miss(key)
        return e

    dkim_res: list[DkimResult] = []
    try:
        d = dkim.DKIM(raw, logger=_quiet, minkey=minkey)
    except dkim.DKIMException as exc:
        d, dkim_res = None, [DkimResult("permerror", reason=f"message format: {str(exc)[:60]}")]
    for idx in _signatures(d, max_sigs) if d is not None else ():
        try:
            dkim_res.append(_check_signature(d, idx, lookup, max_bits))
        except _Miss as miss:
            missing.append(miss.key)
    arc_res = None
    if sealed:
        try:
            arc_res = _check_arc(raw, lookup, minkey, max_bits)
        except _Miss as miss:
            missing.append(miss.key)
    return dkim_res, arc_res, missing


class Verifier:
    """SPF, DKIM, ARC and DMARC for messages received by the asyncio ingress (one per loop)."""

    def __init__(self, cfg: AuthConfig, dns_cache: DnsCache | None = None) -> None:
        self.cfg = cfg
        self.dns = dns_cache or DnsCache(cfg)
        self._procs: ProcessPoolExecutor | None = None  # for big messages, started on first use
        self._big_inflight = 0
        # SPF's result depends on the client, the sender, the HELO name and DNS alone: kept until
        # the first record it used expires (a flood or a list repeats the same triple).
        self._spf_results = _Results(cfg.spf_result_entries)  # (result, reason)
        # A signature's result, by what it covers and its key record (_dkim_memo_key), until the
        # record expires.
        self._dkim_results = _Results(cfg.dkim_result_entries)  # DkimResult
        _suffix_list()

    async def aclose(self) -> None:
        """On the verifier's loop, when it is done: the DNS channel and the CPU threads."""
        await self.dns.aclose()
        if self._procs is not None:
            self._procs.shutdown(wait=False, cancel_futures=True)

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.cfg.budget_s

    # -- SPF ------------------------------------------------------------------------------------

    def start_spf(self, client_ip: str, mail_from: str, helo: str) -> asyncio.Task[tuple[SpfResult, SpfResult | None]]:
        """Start the SPF checks as soon as MAIL FROM is known (they overlap DATA)."""
        view = _View(self.dns, self._deadline())
        return asyncio.get_running_loop().create_task(self._spf_both(view, client_ip, mail_from, helo))

    async def _spf_both(self, view: _View, ip: str, mail_from: str, helo: str) -> tuple[SpfResult, SpfResult | None]:
        helo_domain = normalise_domain(helo) if helo and not helo.startswith("[") else None
        if helo_domain and "." not in helo_domain:
            helo_domain = None  # not a FQDN (RFC 7208 2.3: no HELO check)
        mode = self.cfg.helo if helo_domain else "never"
        if not mail_from:
            # The null sender: SPF checks postmaster@<HELO> (RFC 7208 2.4) - the same check twice.
            res = await self._spf(view, ip, "", helo_domain or "", "mailfrom")
            return res, (SpfResult(res.result, "helo", res.domain, reason=res.reason) if mode != "never" else None)
        if mode == "never":
            return await self._spf(view, ip, mail_from, helo_domain or "", "mailfrom"), None
        if mode == "unless-mailfrom-passes":
            # A pass proved the client may send for the sender; the HELO result would decide
            # nothing (it proves no sender's name). Saves an evaluation for most ham.
            first = await self._spf(view, ip, mail_from, helo_domain or "", "mailfrom")
            if first.result == "pass":
                return first, None
            return first, await self._spf(view, ip, "", helo_domain or "", "helo")
        first, second = await asyncio.gather(self._spf(view, ip, mail_from, helo_domain or "", "mailfrom"),
                                             self._spf(view, ip, "", helo_domain or "", "helo"))
        return first, second

    async def _spf(self, view: _View, ip: str, sender: str, helo: str, identity: str) -> SpfResult:
        address = sender or (f"postmaster@{helo}" if helo else "")
        local, at, dom = address.rpartition("@")
        domain = normalise_domain(dom) if at else None
        if not _is_ip(ip):
            return SpfResult("none", identity, domain or "", address, "no client IP address")
        if not domain:
            return SpfResult("none", identity, dom, address, "no domain to check")
        address = f"{local}@{domain}"

        def evaluate() -> tuple[str, str]:
            q = spf.query(i=ip, s=address, h=helo or domain, strict=True)
            result, _code, explanation = q.check()
            return result, ("" if result in ("pass", "none", "neutral") else explanation.split(":", 1)[0])

        def mx_hosts(key: tuple[str, str], entry: Entry) -> list[tuple[str, str]]:
            # An mx mechanism looks up each exchange next: fetch them at once, not one per re-run.
            if key[1] != "MX" or entry.status != OK:
                return []
            rr = "AAAA" if ":" in ip else "A"
            return [_key(str(ex), rr) for _pref, ex in entry.values[:10]]

        # A result depends on the client, the domain and DNS alone unless a record used a macro
        # (%{l} the local part, %{h} the HELO...): then on the whole triple.
        domain_key = (ip, domain)
        full_key = (ip, domain, address.lower(), (helo or domain).lower())
        hit = self._spf_results.answer(domain_key) or self._spf_results.answer(full_key)
        if hit is not None:
            return SpfResult(hit[0], identity, domain, address, hit[1])
        await view.prefetch([_key(domain, "TXT")])  # the record itself: no evaluation wasted on its miss
        try:
            result, reason = await view.run(evaluate, after_miss=mx_hosts)
        except TimeoutError:
            return SpfResult("temperror", identity, domain, address, "DNS budget spent")
        except Exception as exc:  # a library bug must not pass or stop a message
            log.exception("spf check failed", extra={"domain": domain})
            return SpfResult("temperror", identity, domain, address, f"internal error {type(exc).__name__}")
        if result not in SPF_RESULTS:  # 'ambiguous' exists only in harsh mode
            result = "permerror"
        used = view.seen.values()  # a superset of what this evaluation used: expires no later
        if result != "temperror" and all(e.status != TEMP for e in used):
            macros = any(b"%" in b"".join(v) for (_n, rr), e in view.seen.items() if rr == "TXT"
                         for v in e.values if b"".join(v)[:6].lower() == b"v=spf1")
            memo_key = full_key if macros else domain_key
            self._spf_results.keep(memo_key, min((e.expires for e in used), default=0.0), (result, reason))
        return SpfResult(result, identity, domain, address, reason)

    # -- DKIM and ARC -----------------------------------------------------------------------------

    async def _dkim_and_arc(self, view: _View, raw: bytes, head: bytes, fields: list[tuple[bytes, bytes, bytes]],
                            signed: bool, sealed: bool) -> tuple[tuple[DkimResult, ...], ArcResult | None]:
        """Every DKIM signature (up to max_signatures) and the ARC chain. The keys are fetched at
        once first; big messages are then checked in a worker process (dkimpy's canonicalisation
        holds the GIL for ~50 ms a MB in single regex calls: a thread would stall the loop)."""
        if not signed and not sealed:
            return (), None
        arc = sealed
        sigs = [(v, rawf) for n, v, rawf in fields if n.lower() == b"dkim-signature"]
        arc_n = sum(1 for n, _v, _r in fields if n.lower() == b"arc-seal") if sealed else 0
        if arc_n > self.cfg.max_arc_sets:
            sealed = False
        # The keys from our own header scan, only to fetch them at once: what is verified, and
        # which d= a result names, is dkimpy's parse (a disagreement costs a fetch, not a wrong d=).
        signing = [v for v, _r in sigs[:self.cfg.max_signatures]]
        if sealed:
            signing += [v for n, v, _r in fields if n.lower() in (b"arc-seal", b"arc-message-signature")]
        await view.prefetch([k for k in map(_sig_key, signing) if k])
        if len(raw) > self.cfg.process_above_bytes:
            dkim_res, arc_res = await self._in_process(view, raw, sealed)
        else:
            dkim_res, arc_res = await self._on_loop(view, raw, sigs[:self.cfg.max_signatures], sealed, fields,
                                                    raw[len(head):])
        if arc and arc_n > self.cfg.max_arc_sets:
            arc_res = ArcResult("fail", arc_n, f"more than {self.cfg.max_arc_sets} ARC sets")
        extra = [_dkim_result(_tags(v), "policy", "too many signatures, not evaluated")
                 for v, _r in sigs[self.cfg.max_signatures:]]
        return tuple(dkim_res) + tuple(extra), arc_res

    async def _on_loop(self, view: _View, raw: bytes, sigs: list[tuple[bytes, bytes]], sealed: bool,
                       fields: list[tuple[bytes, bytes, bytes]], body: bytes
                       ) -> tuple[list[DkimResult], ArcResult | None]:
        """DKIM signatures on the loop. A signature seen before over the same bytes (a campaign sent
        to recipients one transaction at a time, a flood of one message) with the same key record
        gets its earlier result: dkimpy's parse, canonicalisation and hashing are skipped."""
        limits = (self.cfg.min_key_bits, self.cfg.max_key_bits, self.cfg.max_signatures)
        dkim_res: list[DkimResult] = []
        d: dkim.DKIM | None = None
        memo_ok = True  # until dkimpy is seen to read the signatures differently from us
        for idx, (value, rawf) in enumerate(sigs):
            record_key = _sig_key(value)
            record = view.seen.get(record_key) if record_key else None
            memo_key = None
            if memo_ok and record is not None and record.status != TEMP:
                memo_key = _dkim_memo_key(rawf, value, fields, body) + repr(record.values).encode()
                hit = self._dkim_results.answer(memo_key)
                if hit is not None:
                    dkim_res.append(hit)
                    continue
            if d is None:
                try:
                    d = dkim.DKIM(_signed_part(fields, sigs, body) if self.cfg.signed_fields_only else raw,
                                  logger=_quiet, minkey=limits[0])
                except dkim.DKIMException as exc:
                    return [DkimResult("permerror", reason=f"message format: {str(exc)[:60]}")], \
                        await self._arc(view, raw, sealed)
                if sum(1 for n, _ in d.headers if n.lower() == b"dkim-signature") != len(
                        [1 for n, _v, _r in fields if n.lower() == b"dkim-signature"]):
                    memo_ok, memo_key = False, None  # dkimpy reads the header differently: no memo
            d.signature_fields = {}
            try:
                res = await view.run(functools.partial(_check_signature, d, idx, view.get, limits[1]))
            except TimeoutError:
                res = _dkim_result(d.signature_fields, "temperror", "DNS budget spent")
            dkim_res.append(res)
            if memo_key is not None and res.result != "temperror" and record is not None and \
                    res.domain.encode() == _tag(value, b"d").lower() and res.b == _text(_tag(value, b"b"))[:8]:
                self._dkim_results.keep(memo_key, record.expires, res)
        return dkim_res, await self._arc(view, raw, sealed)

    async def _arc(self, view: _View, raw: bytes, sealed: bool) -> ArcResult | None:
        if not sealed:
            return None
        try:
            return await view.run(functools.partial(_check_arc, raw, view.get, self.cfg.min_key_bits,
                                                    self.cfg.max_key_bits))
        except TimeoutError:
            return ArcResult("temperror", reason="DNS budget spent")

    async def _in_process(self, view: _View, raw: bytes, sealed: bool) -> tuple[list[DkimResult], ArcResult | None]:
        limits = (self.cfg.min_key_bits, self.cfg.max_key_bits, self.cfg.max_signatures)
        busy = [DkimResult("temperror", reason="verifier busy with big messages")]
        if self._big_inflight >= self.cfg.max_big_inflight:
            return busy, (ArcResult("temperror", reason="verifier busy") if sealed else None)
        self._big_inflight += 1
        try:
            for _ in range(4):  # a key the header scan did not foresee: fetch it and go again
                try:
                    job = asyncio.get_running_loop().run_in_executor(
                        self._processes(), _verify_big, raw, dict(view.seen), sealed, limits)
                    dkim_res, arc_res, missing = await asyncio.wait_for(job, max(0.0, view.time_left()))
                except TimeoutError:
                    return ([DkimResult("temperror", reason="verification budget spent")],
                            ArcResult("temperror", reason="verification budget spent") if sealed else None)
                except concurrent.futures.process.BrokenProcessPool:
                    # the worker died (killed, out of memory): a new one for the next message
                    log.error("the big-message verifier process died; starting another")
                    procs, self._procs = self._procs, None
                    if procs is not None:
                        procs.shutdown(wait=False, cancel_futures=True)
                    return busy, (ArcResult("temperror", reason="verifier restarting") if sealed else None)
                if not missing:
                    return dkim_res, arc_res
                await view.prefetch(missing)
            return busy, None
        finally:
            self._big_inflight -= 1

    def warm_up(self) -> concurrent.futures.Future[Any]:
        """Start the worker process for big messages now (spawning it takes ~0.5-2 s: not on a message)."""
        return self._processes().submit(_suffix_list)

    def wait_warm(self, timeout_s: float = WARM_UP_S) -> None:
        """Start the big-message worker and wait until it answers, so that an ingress is ready only
        once it can verify any message (and its start-up CPU is spent before the first one). A
        worker that does not come up is logged; big messages then get temperror until one does."""
        try:
            self.warm_up().result(timeout_s)
        except Exception as exc:
            log.error("the big-message verifier process did not start", extra={"error": repr(exc)})

    def _processes(self) -> ProcessPoolExecutor:
        if self._procs is None:
            # spawn: the ingress has threads (Kafka, the loop) that a fork would copy mid-lock
            self._procs = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                              initializer=_worker_init)
        return self._procs

    # -- DMARC ----------------------------------------------------------------------------------

    async def _dmarc_record(self, view: _View, domain: str) -> tuple[str, dict[str, str] | None, str]:
        """(status, tags, domain of the record): status ok | none | temperror."""
        org = org_domain(domain)
        for d in dict.fromkeys((domain, org)):
            e = await view.fetch(_key("_dmarc." + d, "TXT"))
            if e.status == TEMP:
                return TEMP, None, d
            records = [b"".join(v) for v in e.values]
            dmarc = [r for r in records if re.match(rb"v\s*=\s*DMARC1\s*(;|$)", r)]
            if len(dmarc) == 1:
                tags = _dmarc_tags(dmarc[0])
                if tags is not None:
                    return OK, tags, d
            # none, several (RFC 7489 6.6.3: as if none), or unusable: try the org domain
        return "none", None, ""

    async def verify(self, raw: bytes, *, client_ip: str, mail_from: str, helo: str,
                     spf_task: asyncio.Task[tuple[SpfResult, SpfResult | None]] | None = None) -> AuthResults:
        """Everything for one message, within ``budget_s``; never raises.

        Every record the message needs (its DKIM keys, its DMARC records) is fetched at once,
        then DKIM, ARC and DMARC run inline: with a warm cache nothing suspends and no task is
        made. The whole is bounded by the deadline (``asyncio.timeout_at``); what is unfinished
        then is ``temperror``."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        view = _View(self.dns, started + self.cfg.budget_s)
        head, _ = split_message(raw)
        fields = header_fields(head)
        from_domain, from_error = _from_domain(fields)
        if spf_task is None:  # its own view: what SPF used decides how long its result is kept
            spf_task = loop.create_task(self._spf_both(_View(self.dns, view.deadline), client_ip, mail_from, helo))
        low = head.lower()
        signed, sealed = b"dkim-signature" in low, self.cfg.arc and b"arc-seal" in low
        dkim_arc: tuple[tuple[DkimResult, ...], ArcResult | None] | None = None
        record: tuple[str, dict[str, str] | None, str] | None = None
        spf_pair: tuple[SpfResult, SpfResult | None] | None = None
        timed_out = False
        try:
            async with asyncio.timeout_at(view.deadline):
                wanted = [_key("_dmarc." + d, "TXT") for d in dict.fromkeys((from_domain, org_domain(from_domain)))] \
                    if from_domain else []
                await view.prefetch(wanted + (self._signature_keys(fields) if signed or sealed else []))
                dkim_arc = await self._dkim_and_arc(view, raw, head, fields, signed, sealed)
                if from_domain:
                    record = await self._dmarc_record(view, from_domain)
                spf_pair = spf_task.result() if spf_task.done() else await asyncio.shield(spf_task)
        except TimeoutError:
            timed_out = True
        except Exception:  # a bug costs this message its results (temperror), never the session
            log.exception("sender authentication failed")
            timed_out = True
        if spf_pair is None and spf_task.done() and not spf_task.cancelled() and spf_task.exception() is None:
            spf_pair = spf_task.result()

        addr = mail_from or (f"postmaster@{helo}" if helo else "")
        if spf_pair is None:
            dom = normalise_domain(addr.rpartition("@")[2]) or ""
            helo_dom = normalise_domain(helo) if helo and not helo.startswith("[") else None
            spf_pair = (SpfResult("temperror", "mailfrom", dom, addr, "DNS budget spent"),
                        SpfResult("temperror", "helo", helo_dom, reason="DNS budget spent")
                        if self.cfg.helo != "never" and helo_dom and "." in helo_dom else None)
        spf_mailfrom, spf_helo = spf_pair
        if dkim_arc is None:
            dkim_arc = ((DkimResult("temperror", reason="verification budget spent"),) if signed else (),
                        ArcResult("temperror", reason="verification budget spent") if sealed else None)
        dkim_results, arc = dkim_arc
        if not from_domain:
            dmarc = DmarcResult("permerror" if from_error != "none" else "none", reason=from_error)
        else:
            dmarc = _evaluate_dmarc(from_domain, record or (TEMP, None, ""), spf_mailfrom, dkim_results)
        proven = []
        if dmarc.result == "pass":
            proven.append(dmarc.from_domain)
        if spf_mailfrom.result == "pass" and spf_mailfrom.domain and mail_from:  # not the HELO of a bounce
            proven.append(spf_mailfrom.domain)
        proven += [d.domain for d in dkim_results if d.result == "pass" and d.domain]
        return AuthResults(spf_mailfrom, spf_helo, tuple(dkim_results), dmarc, arc,
                           elapsed_s=loop.time() - started, timed_out=timed_out,
                           proven_domains=tuple(dict.fromkeys(proven)))

    def _signature_keys(self, fields: list[tuple[bytes, bytes, bytes]]) -> list[tuple[str, str]]:
        """The key records of the DKIM signatures (up to max_signatures) and ARC sets to check."""
        sigs = [v for n, v, _r in fields if n.lower() == b"dkim-signature"][:self.cfg.max_signatures]
        if self.cfg.arc:
            sigs += [v for n, v, _r in fields if n.lower() in (b"arc-seal", b"arc-message-signature")]
        return [k for k in map(_sig_key, sigs) if k]


def _text(v: bytes | None) -> str:
    return (v or b"").decode("ascii", "replace")


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:60]}"


@functools.lru_cache(maxsize=4096)
def _dmarc_tags(record: bytes) -> dict[str, str] | None:
    """The tags of a DMARC record (memoised per record: callers only read the dict)."""
    tags: dict[str, str] = {}
    for part in record.decode("ascii", "replace").split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags.setdefault(name.strip().lower(), value.strip())
    p = tags.get("p", "").lower()
    if p not in ("none", "quarantine", "reject"):
        return None  # RFC 7489 6.6.3: no valid p= (a rua-only record would be p=none; not worth it here)
    tags["p"] = p
    if tags.get("sp", "").lower() not in ("none", "quarantine", "reject"):
        tags.pop("sp", None)
    return tags


_ADDR_CHARS = r"[!#-'*+\-./0-9=?A-Z^-~]+"  # printable ASCII but specials and space (RFC 5322 3.2.3)
_ADDR = f"{_ADDR_CHARS}@{_ADDR_CHARS}"
_SIMPLE_FROM = re.compile(rf"[ \t]*(?:[A-Za-z0-9 .'_-]*<({_ADDR})>|({_ADDR}))[ \t]*")


def _from_domain(fields: list[tuple[bytes, bytes, bytes]]) -> tuple[str | None, str]:
    """The RFC5322.From domain (exactly one From with one address, RFC 7489 6.6.1), or why not."""
    froms = [v for n, v, _ in fields if n.lower() == b"from"]
    if not froms:
        return None, "none"
    if len(froms) > 1:
        return None, "several From fields"
    text = re.sub(r"\r?\n", "", froms[0].decode("utf-8", "replace"))
    # "Name <a@b>" or "a@b" without quotes, comments, groups or escapes: as getaddresses reads it, 10x faster
    simple = _SIMPLE_FROM.fullmatch(text)
    addrs = [simple.group(1) or simple.group(2)] if simple else [a for _name, a in getaddresses([text]) if a]
    if len(addrs) != 1:
        return None, "From has no single address"
    _local, at, dom = addrs[0].rpartition("@")
    d = normalise_domain(dom) if at else None
    return (d, "") if d else (None, "From domain unusable")


def _evaluate_dmarc(from_domain: str, record: tuple[str, dict[str, str] | None, str],
                    spf_res: SpfResult, dkim_res: Iterable[DkimResult]) -> DmarcResult:
    status, tags, record_domain = record
    org = org_domain(from_domain)
    if status == TEMP:
        return DmarcResult("temperror", from_domain, org_domain=org, reason="policy lookup failed")
    if tags is None:
        return DmarcResult("none", from_domain, org_domain=org)
    policy = tags["p"]
    if record_domain != from_domain and "sp" in tags:
        policy = tags["sp"].lower()
    aspf, adkim = tags.get("aspf", "r").lower()[:1], tags.get("adkim", "r").lower()[:1]
    spf_aligned = spf_res.result == "pass" and _aligned(spf_res.domain, from_domain, aspf)
    dkim_list = list(dkim_res)
    aligned_d = next((d.domain for d in dkim_list if d.result == "pass" and _aligned(d.domain, from_domain, adkim)), "")
    common = {"from_domain": from_domain, "policy": policy, "org_domain": org, "record_domain": record_domain}
    if spf_aligned or aligned_d:
        return DmarcResult("pass", spf_aligned=spf_aligned, dkim_aligned=aligned_d, **common)
    # Nothing aligned passed. If an identity that could have aligned was not evaluated for want of
    # DNS, the honest answer is temperror (the sender's DNS or ours failed, not the sender).
    maybe_spf = spf_res.result == "temperror" and _aligned(spf_res.domain, from_domain, aspf)
    maybe_dkim = any(d.result == "temperror" and (not d.domain or _aligned(d.domain, from_domain, adkim))
                     for d in dkim_list)
    if maybe_spf or maybe_dkim:
        return DmarcResult("temperror", reason="an aligned identity could not be checked", **common)
    return DmarcResult("fail", **common)


def config_from_settings(settings: Any) -> AuthConfig:
    """An AuthConfig from pipeline.core.config.Settings (its ``auth`` section and SMTP hostname)."""
    a = settings.auth
    return AuthConfig(
        authserv_id=a.authserv_id or settings.smtp.hostname, nameservers=tuple(a.nameservers),
        dns_port=a.dns_port, dns_backend=a.dns_backend, budget_s=a.budget_s, query_timeout_s=a.query_timeout_s,
        cache_entries=a.cache_entries, failure_ttl_s=a.failure_ttl_s, helo=a.helo, arc=a.arc,
        max_signatures=a.max_signatures, process_above_bytes=a.process_above_bytes)


with contextlib.suppress(Exception):  # the suffix list loads at import, not on the first message
    _suffix_list()
