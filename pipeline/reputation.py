"""``floodgate reputation``: decide which senders are known to be good (a Faust app).

Admission (at ingress, :mod:`pipeline.admission`) diverts flooding sources to the bulk lane
but never a known-good sender; this worker keeps that set. It reads user and operator
verdicts and operators' sender decisions from ``feedback`` and classifier verdicts from ``ham``
and ``spam``, keeps per-sender tables, and publishes every change of a sender's standing, and
every operator decision, to the compacted ``reputation`` topic (record format:
:mod:`pipeline.core.senders`).

Standing rule (:func:`is_good`), first match wins:

* **Revoked by an operator: not good**, whatever else the key has, until an operator restores
  it (``floodgate senders revoke|restore``, below).
* **Spam reports veto**: a sender with spam reports from at least as many distinct reporters as
  it has ham reporters is not good, whatever its verdicts. This is the fail-safe direction: a
  false spam report can cost a sender only its exemption (its mail then meets flood admission's
  rate checks like anyone's), never a verdict.
* **Ham reports count only in agreement**: ham reports from at least ``AGREEMENT_REPORTERS``
  distinct reporters, the first and the latest new reporter at least ``AGREEMENT_SPAN_S`` apart
  by record time (and, by the veto, more ham reporters than spam reporters), make a sender good
  whatever the classifier said: it was wrong, and independent people agree. A reporter is the
  feedback event's ``extra["by"]``; every report without one is the same anonymous reporter, and
  one reporter's repeated reports count once. Short of agreement, ham reports do nothing for
  the standing: one user, one user reporting a hundred times, or several reporting within a
  minute (a script with a few accounts) never make a sender good. Feedback counts for the
  ``addr:`` and ``domain:`` keys only: a client address is shared by everyone behind a NAT, a
  hosting provider or a big provider's outbound relays.
* **Otherwise verdicts decide**: good after at least ``GOOD_MIN_HAM`` ham verdicts with a spam
  share below ``GOOD_MAX_SPAM_SHARE``. Verdicts count for ``addr:``, ``domain:`` and
  ``client:``.

A quarantine release (``extra["feedback"] == "quarantine-release"``) is **one vote**, an
operator's, not agreement by itself. A release is the operator's decision about one message
(it was not spam), not about all its sender will send. The worker cannot check that the
release was authorised: the admin token is checked by the CLI, and the marker is a field of a
record that any client allowed to write the feedback topic can set (SECURITY.md §9, no ACLs),
so if a release were agreement by itself, one forged record would again be all that a
self-exemption takes. And "please release my message" is the request a spammer can make of an
operator most easily. So a release counts as one reporter, the operator (an ``o:`` id, shown as
``ham_operators``), and a message released twice by one operator (a release repeated after a
crash) is one vote. An operator's decision about a sender as a whole is explicit, audited and
stronger: ``floodgate senders revoke`` removes the standing and keeps it removed.

What the tables keep for the rule, per key and bounded: the hashed ids of at most
``REPORTERS_KEPT`` distinct ham and spam reporters (``u:``/``o:`` and 16 hex digits of SHA-256
of the name, or ``anon``: no user's address reaches a table, a changelog or the published
record), the record times of the first and the latest new ham reporter, and the last operator
decision (``revoke``/``restore``, by whom, when). Entries written before these fields existed
read as having no reporters; a sender made good by one report under the old rule keeps its
published standing until its next observation re-decides it (or an operator revokes it).

Revocation. ``floodgate senders revoke KEY --by NAME`` (authorised like a quarantine release)
writes a :class:`pipeline.core.senders.Decision` record on the feedback topic, keyed by the
sender key; the ``feedback`` agent turns it into an observation of kind ``revoke`` (or
``restore``) for that key, like a report, so it reaches the ``tally`` agent that owns the key,
in order with the key's other observations. ``tally`` records the decision in the key's
``senders`` entry (the one home of the standing; its changelog makes it survive restarts) and
publishes the resulting standing at once, changed or not, with the decision in it: admission
sees ``good: false`` within about a second (two ``TAKE_WITHIN_S`` batches and its own poll).
Every later observation is decided with the revocation in place, so further ham never makes
the key good again; ``restore`` removes it and the rule decides again. The feedback topic is
kept forever: the decisions are also their own audit log, and a worker rebuilt from scratch
replays them in order.

Dataflow. The input topics are keyed by event id, but tables must be partitioned like the
stream that updates them. So two agents (``feedback``; ``ham`` + ``spam``) turn events into
observations keyed by sender key on an internal topic ``<app id>-observations``, and the
``tally`` agent, which owns the sender keys of its partitions, updates:

* ``<app id>-senders``: per sender key the four counts, the reporters and the operator
  decision (above), and the last published standing;
* ``<app id>-traffic``: messages (verdicts) per sender key in tumbling ``TRAFFIC_WINDOW_S``
  windows by record time, expired after ``TRAFFIC_EXPIRES_S`` (the live view).

Every agent works in batches (Faust's ``take_events``: up to ``TAKE_MAX`` records, or what
arrived within ``TAKE_WITHIN_S``). An observation carries a count: one record per sender key,
kind (``ham``/``spam``) and traffic window of a batch, value ``kind:count`` (``ham:3``; a bare
``ham``, the format before counts, counts one); feedback, one record per sender key, kind
(``feedback_ham``/``feedback_spam``) and reporter of a batch, with the earliest record time,
value ``kind:count:reporter`` (``feedback_ham:2:u:1f…``; without a reporter, the format before
reporters, it is the anonymous one); an operator decision, one record each, never merged,
value ``revoke:1:NAME`` or ``restore:1:NAME``. ``tally``
applies a key's observations of a batch in order, publishing each standing change as it
happens, then writes the key's ``senders`` entry once and each touched ``traffic`` window once.
A verdict used to cost nine internal records (three observations, three entry writes, three
window writes); on the corpus mix of ``make bench-reputation`` a backlog now costs 1.8, and
one worker tallies ~2,700 verdicts/s at 0.35 CPU ms each (was ~590/s at 1.7 ms; same machine,
same quiet minute; BENCHMARKS.md). Below the batch size, a batch is what arrived within
``TAKE_WITHIN_S`` and holds fewer repeats, so a verdict at a low rate costs more than that.

Both tables have changelog topics on the broker, so a restarted or rebalanced worker
recovers them (the in-memory store replays the changelog at start; ``rocksdb://`` keeps a
local copy and replays only the tail, if ``rocksdict`` is installed). Faust picks a table
write's changelog partition from the current stream event, which a batch does not set: the
tally sets it to the key's own observation before writing (:func:`as_current`), so a key's
entries land in the partition of its observations, where recovery looks for them.

Delivery: at-least-once. A batch's input offsets are acknowledged only after the batch is
done, and Faust flushes its producer (observations, changelogs, standings) before it commits
them; input not yet committed when a worker stops is processed again by its successor, so a
restart can count some records twice (seen here: 25 verdicts counted as 25 to 36 across a
stop/start 0.5 s after the worker became ready), which an advisory count tolerates; a record
read again by the process that already took it (a rebalance that hands its partition back) is
stepped over (:class:`Replays`). A
standing is published and acknowledged before the table records it as published, so a crash
never leaves a change unpublished (it may repeat one).
Seen on this broker: a record that arrives while a (re)starting worker is still recovering
its tables was, in about one restart in four, never counted (most likely Faust's fetcher,
which abandons a message whose delivery races a flow suspension: ``wait_first(callback(message),
suspend_flow.wait())`` in ``faust/transport/consumer.py``). ``/reputation/stats/`` reports
``ready`` once recovery is done; the tests produce only then and lost nothing in 8 restarts.

Not exactly-once, because Faust's ``exactly_once`` cannot carry this topology: it picks the
transactional producer for a send by the *destination* partition, but commits only the
transactions of input partitions whose offsets moved. Observations (a repartition by sender
key) land in transactions that are never committed, and ``tally`` (``read_committed``) never
sees them: on this broker nothing was ever tallied. Counts are advisory, so at-least-once is
the right trade here anyway.

Caveat: Faust's at-least-once consumer reads ``read_uncommitted``, so records of a classify
transaction that was later aborted (and retried) are counted too: a few double counts after a
classifier crash, never a missed one.

Web (optional, ``--web-port`` or ``FLOODGATE_WORKER_METRICS_PORT``; loopback by default):
``/reputation/senders/{key}/`` (routed to the worker that owns the key),
``/reputation/traffic/`` (this worker's busiest senders over the kept windows),
``/reputation/stats/``, ``/healthz``, ``/readyz`` (200 once its tables are recovered) and
``/metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import operator
import time
import weakref
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import faust
from confluent_kafka import KafkaException
from faust.exceptions import SameNode
from faust.streams import _current_event
from faust.transport.drivers import aiokafka as faust_kafka
from faust.types import TP
from faust.web import Request, Response, View
from faust.web.exceptions import ServiceUnavailable

from pipeline import kafka
from pipeline.core import authres, events, log, metrics, senders
from pipeline.core.config import ROOT, Settings
from pipeline.kafka import topics

STAGE = "reputation"

# Twenty ham verdicts: enough that a spammer cannot earn an exemption from a handful of mails
# the classifier got wrong, few enough that a small legitimate sender gets there within a day.
GOOD_MIN_HAM = 20
# A legitimate sender's spam verdicts are classifier false positives (well under 1 %); a
# spammer mixing in ham-looking mail shows far more. 5 % separates the two with margin.
GOOD_MAX_SPAM_SHARE = 0.05
# The live traffic view: one-minute windows (rates in messages per minute), ten kept.
TRAFFIC_WINDOW_S = 60.0
TRAFFIC_EXPIRES_S = 600.0
# Partitions of the internal topics and tables: the most workers that can share the stage.
DEFAULT_PARTITIONS = 6
# Batches: each agent takes up to TAKE_MAX records, or what came within TAKE_WITHIN_S, and
# writes once per distinct key (and kind, and traffic window) of the batch. A backlog fills
# batches at once (make bench-reputation: 1,000 a batch 0.42 CPU ms per verdict, 4,000 0.35;
# a full batch is ~1.5 s of work); at a quiet moment a standing change waits at most
# TAKE_WITHIN_S per stage (two stages), nothing next to the twenty verdicts it takes to earn one.
TAKE_MAX = 4000
TAKE_WITHIN_S = 0.5
# The sender view waits at most this long for the producer's metadata of observations (once).
ROUTING_METADATA_TIMEOUT_S = 5.0
# Faust's producer sends at once by default (linger 0): many small requests for the
# observations and changelog records of a batch. 10 ms fills requests (make bench-reputation:
# 0.55 CPU ms per verdict at 0, 0.44 at 5 ms, 0.42 at 10 ms, 0.40 at 50 ms but fewer verdicts/s,
# since a standing change waits for its acknowledgement).
PRODUCER_LINGER_S = 0.01
# How many senders the traffic view lists.
TRAFFIC_TOP = 100
DEFAULT_DATADIR = ROOT / ".run" / "reputation"
# Observations are tallied within seconds; a week (like inbound) lets a stopped worker catch up.
OBSERVATIONS_RETENTION = timedelta(days=7)
# Faust creates its internal topics while its consumer first joins the group, and a topic the
# consumer's metadata does not show yet is left out of the assignment ("Ignoring missing
# topic") until the next metadata refresh, which rejoins the group. Faust's default of five
# minutes meant five minutes of nothing tallied after a fresh start; a metadata request every
# few seconds costs nothing.
METADATA_MAX_AGE_MS = 5_000

# Agreement: ham reports make a sender good only from this many distinct reporters. One report is
# one account, which may be the spammer's own at the provider, receiving his own spam; a real
# false positive (a newsletter, a correspondent) is reported by several of its recipients.
# Three means a spammer needs three accounts that receive his mail, and an operator can trace
# every one of them; it is still small enough for a small sender's real recipients to reach.
AGREEMENT_REPORTERS = 3
# ...whose reports (first to latest new reporter, by record time) span at least this long. A
# script driving a few accounts reports within seconds; people read their mail over hours. An
# hour also leaves the other recipients time to report the same mail as spam, which vetoes.
AGREEMENT_SPAN_S = 3600.0
# Reporters kept per key and side: well above AGREEMENT_REPORTERS, so "more ham reporters than
# spam reporters" still means something for a contested sender, and few enough that an entry
# stays small (an id is 18 bytes) however many users report a big domain. With both sides full
# the sender counts as contested and is not good by feedback: the safe side.
REPORTERS_KEPT = 16
# Reporter ids: 16 hex digits (64 bits) of SHA-256 of the name. Distinct reporters stay distinct
# (a collision among the 32 a key keeps is a 1-in-10^16 event), and no table, changelog or
# published record carries a user's address.
REPORTER_ID_HEX = 16
ANONYMOUS = "anon"
USER, OPERATOR = "u:", "o:"

HAM, SPAM, FEEDBACK_HAM, FEEDBACK_SPAM = "ham", "spam", "feedback_ham", "feedback_spam"
REVOKE, RESTORE = senders.REVOKE, senders.RESTORE
KINDS = (HAM, SPAM, FEEDBACK_HAM, FEEDBACK_SPAM, REVOKE, RESTORE)
VERDICT_KINDS = (HAM, SPAM)
DECISION_KINDS = (REVOKE, RESTORE)
FEEDBACK_PREFIXES = (senders.ADDR, senders.DOMAIN)
# Table entry fields beyond the counts (absent in entries of verdict-only keys and in entries
# written before they existed).
HAM_REPORTERS, SPAM_REPORTERS = "ham_reporters", "spam_reporters"
HAM_FIRST_AT, HAM_LAST_AT = "ham_first_at", "ham_last_at"
DECISION, DECISION_BY, DECISION_AT = "decision", "decision_by", "decision_at"


@dataclass(frozen=True)
class Agreement:
    """How much agreement ham reports need (``floodgate reputation --agreement-*``; tests use a
    short span)."""

    reporters: int = AGREEMENT_REPORTERS
    span_s: float = AGREEMENT_SPAN_S

    def __post_init__(self) -> None:
        if self.reporters < 1 or self.span_s < 0:
            raise ValueError(f"agreement needs at least one reporter and a span >= 0, not {self}")


AGREEMENT = Agreement()


def is_good(ham: int, spam: int, ham_reporters: int = 0, spam_reporters: int = 0, *, span_s: float = 0.0,
            revoked: bool = False, rule: Agreement = AGREEMENT) -> bool:
    """The standing rule (see the module docstring): verdict counts, distinct reporters of ham and
    spam feedback, the span of the ham reporters, an operator's revocation."""
    if revoked:
        return False
    if spam_reporters and spam_reporters >= ham_reporters:
        return False
    if ham_reporters >= rule.reporters and span_s >= rule.span_s:
        return True
    return ham >= GOOD_MIN_HAM and spam < GOOD_MAX_SPAM_SHARE * (ham + spam)


def reporter_id(event: events.MailEvent) -> str:
    """Who reported a feedback event, as the tables keep it: ``anon`` without a name, else ``u:``
    (a user's report) or ``o:`` (an operator's release) and a hash of the name."""
    extra = event.extra if isinstance(event.extra, dict) else {}
    by = extra.get("by")
    name = by.strip().lower() if isinstance(by, str) else ""
    if not name:
        return ANONYMOUS
    role = OPERATOR if extra.get("feedback") == senders.RELEASE_FEEDBACK else USER
    return role + hashlib.sha256(name.encode(errors="replace")).hexdigest()[:REPORTER_ID_HEX]


def observations(event: events.MailEvent, feedback: bool) -> list[tuple[str, str]] | str:
    """The (sender key, kind) pairs one event contributes, or why it contributes none."""
    env = event.envelope
    if feedback:
        if event.label not in (HAM, SPAM):
            return "no_label"
        kind = f"feedback_{event.label}"
        keys = [k for k in senders.trusted_keys(env.mail_from, "", authres.proven_domains(event.extra))
                if k.startswith(FEEDBACK_PREFIXES)]
    else:
        if event.verdict not in VERDICT_KINDS:
            return "no_verdict"
        kind = event.verdict
        # A verified event counts for the names it proved only: a forger's spam must not cost the
        # real sender its standing, nor its ham earn the forger one (pipeline.core.senders.proven_keys).
        keys = senders.trusted_keys(env.mail_from, env.client_address, authres.proven_domains(event.extra))
    return [(k, kind) for k in keys] if keys else "no_sender"


def encode_observation(kind: str, count: int, who: str = "") -> bytes:
    """An observation record's value: ``kind:count`` (e.g. ``ham:3``), and ``:who`` for feedback
    (its reporter id) and decisions (the operator's name)."""
    return (f"{kind}:{count}:{who}" if who else f"{kind}:{count}").encode()


def parse_observation(value: bytes | None) -> tuple[str, int, str] | None:
    """(kind, count, who) of an observation record, or None if it is not one. A bare kind
    (``ham``, the format before counts) counts one; no ``who`` (the format before reporters)
    is an empty one. A decision needs its operator."""
    kind, sep, rest = (value or b"").decode(errors="replace").partition(":")
    if kind not in KINDS:
        return None
    if not sep:
        return None if kind in DECISION_KINDS else (kind, 1, "")
    n, _, who = rest.partition(":")
    count = int(n) if n.isascii() and n.isdigit() else 0
    if count <= 0 or (kind in DECISION_KINDS and not who):
        return None
    return kind, count, who


def decode_observation(value: bytes | None) -> tuple[str, int] | None:
    """(kind, count) of an observation record, or None if it is not one (see
    :func:`parse_observation`, which also gives its reporter or operator)."""
    parsed = parse_observation(value)
    return None if parsed is None else parsed[:2]


def window_of(timestamp: float) -> int:
    """The traffic window (index) a record time falls in: Faust's tumbling windows start at
    multiples of their size."""
    return int(timestamp // TRAFFIC_WINDOW_S)


def aggregate(found: Iterable[tuple[Iterable[tuple[str, str]], float]]) -> list[tuple[str, str, int, float]]:
    """One batch's observations as (sender key, kind, count, record time): one per distinct key,
    kind and traffic window, in the order each first appears; the time is its latest record's."""
    out: dict[tuple[str, str, int], list[Any]] = {}
    for pairs, ts in found:
        w = window_of(ts)
        for key, kind in pairs:
            group = out.get((key, kind, w))
            if group is None:
                out[(key, kind, w)] = [1, ts]
            else:
                group[0] += 1
                group[1] = max(group[1], ts)
    return [(key, kind, n, ts) for (key, kind, _w), (n, ts) in out.items()]


def aggregate_reports(found: Iterable[tuple[str, str, str, float]]) -> list[tuple[str, str, int, float, str]]:
    """One batch's feedback observations and decisions, (sender key, kind, who, record time), as
    (sender key, kind, count, time, who): reports one per distinct key, kind and reporter, in the
    order each first appears, with the earliest time (when that reporter first spoke, which is
    what the agreement span measures); decisions one each, in order, never merged (a revocation,
    a restoration and a revocation again must stay three)."""
    out: dict[tuple[Any, ...], list[Any]] = {}
    for i, (key, kind, who, ts) in enumerate(found):
        group: tuple[Any, ...] = (key, kind, who, i) if kind in DECISION_KINDS else (key, kind, who)
        counted = out.get(group)
        if counted is None:
            out[group] = [1, ts]
        else:
            counted[0] += 1
            counted[1] = min(counted[1], ts)
    return [(g[0], g[1], n, ts, g[2]) for g, (n, ts) in out.items()]


def as_current(event: faust.EventT) -> None:
    """Make ``event`` this task's current stream event, as Faust's stream iterator does for each
    event it yields. Tables pick the changelog partition of a write from it; a batch from
    ``take_events`` leaves it unset (``faust.streams``, faust-streaming 0.15)."""
    _current_event.set(weakref.ref(event))


def new_entry() -> dict[str, Any]:
    return {HAM: 0, SPAM: 0, FEEDBACK_HAM: 0, FEEDBACK_SPAM: 0, "good": False}


def span_of(entry: dict[str, Any]) -> float:
    """Seconds from the first to the latest new ham reporter of an entry (0 without two)."""
    first, last = entry.get(HAM_FIRST_AT), entry.get(HAM_LAST_AT)
    return float(last) - float(first) if first is not None and last is not None else 0.0


def good(entry: dict[str, Any], rule: Agreement = AGREEMENT) -> bool:
    """Whether an entry's sender is good by the rule."""
    return is_good(entry[HAM], entry[SPAM], len(entry.get(HAM_REPORTERS, ())), len(entry.get(SPAM_REPORTERS, ())),
                   span_s=span_of(entry), revoked=entry.get(DECISION) == REVOKE, rule=rule)


def tally(entry: dict[str, Any], kind: str, count: int = 1, who: str = "", at: float = 0.0,
          rule: Agreement = AGREEMENT) -> tuple[dict[str, Any], bool]:
    """The entry after one observation (``count`` messages of one kind; for feedback, by reporter
    ``who`` at record time ``at``; for a decision, by operator ``who`` at ``at``), and whether
    the sender is good now."""
    entry = {**new_entry(), **entry}
    if kind in DECISION_KINDS:
        entry.update({DECISION: kind, DECISION_BY: who, DECISION_AT: at})
        return entry, good(entry, rule)
    entry[kind] = int(entry.get(kind, 0)) + count
    if kind in (FEEDBACK_HAM, FEEDBACK_SPAM):
        field = HAM_REPORTERS if kind == FEEDBACK_HAM else SPAM_REPORTERS
        reporters = list(entry.get(field, ()))
        who = who or ANONYMOUS
        if who not in reporters and len(reporters) < REPORTERS_KEPT:
            entry[field] = [*reporters, who]
            if kind == FEEDBACK_HAM:  # the span runs from the first to the latest new reporter
                first, last = entry.get(HAM_FIRST_AT), entry.get(HAM_LAST_AT)
                entry[HAM_FIRST_AT] = at if first is None else min(first, at)
                entry[HAM_LAST_AT] = at if last is None else max(last, at)
    return entry, good(entry, rule)


def standing_of(key: str, entry: dict[str, Any], good_now: bool, now: float) -> senders.Standing:
    """The published record of an entry."""
    ham_reporters = entry.get(HAM_REPORTERS, ())
    return senders.Standing(
        key=key, good=good_now, ham=entry[HAM], spam=entry[SPAM], feedback_ham=entry[FEEDBACK_HAM],
        feedback_spam=entry[FEEDBACK_SPAM], updated_at=now, ham_reporters=len(ham_reporters),
        ham_operators=sum(r.startswith(OPERATOR) for r in ham_reporters),
        spam_reporters=len(entry.get(SPAM_REPORTERS, ())), reports_span_s=span_of(entry),
        decision=entry.get(DECISION, ""), decision_by=entry.get(DECISION_BY, ""),
        decision_at=float(entry.get(DECISION_AT) or 0.0))


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust (aiokafka) credentials from the same settings the confluent-kafka clients use."""
    k = settings.kafka
    protocol = k.security_protocol.upper()
    if protocol == "PLAINTEXT":
        return None
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        context = create_ssl_context(cafile=k.ssl_ca_location or None,
                                     certfile=k.ssl_certificate_location or None,
                                     keyfile=k.ssl_key_location or None)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        return faust.SASLCredentials(username=k.sasl_username, password=k.sasl_password,
                                     ssl_context=context, mechanism=k.sasl_mechanism or "PLAIN")
    raise ValueError(f"unknown security_protocol {k.security_protocol!r}")


def store_url(store: str) -> str:
    if store == "memory":
        return "memory://"
    if store == "rocksdb":
        try:
            import rocksdict  # noqa: F401
        except ImportError:
            raise ValueError("store rocksdb needs the rocksdict package (pip install rocksdict)") from None
        return "rocksdb://"
    raise ValueError(f"unknown store {store!r} (memory or rocksdb)")


def replication_factor(settings: Settings) -> int:
    return next(t.replication_factor for t in topics.desired(settings) if t.name == settings.topic("reputation"))


def observations_topic(settings: Settings) -> str:
    return f"{settings.group(STAGE)}-observations"


def internal_topics(settings: Settings, existing: Iterable[str]) -> list[str]:
    """The topics Faust made for this app (observations, changelogs, assignor): all named
    ``<app id>-…``; :func:`pipeline.kafka.topics.delete` removes them with a private deployment."""
    return topics.app_topics(settings, existing, (STAGE,))


class GapConsumer(faust_kafka.Consumer):
    """Faust's Kafka consumer, recording a gap in a partition's offsets exactly.

    The verdict topics are written in transactions, so each carries a commit marker after every
    classifier batch: an offset with no record. Faust notes such a gap when the next record
    arrives, but its range runs up to and *including* that record's offset
    (faust-streaming 0.15.3, ``Consumer._add_gap``; upstream issue #606), which then counts as
    acknowledged twice, and the offset it may commit stops at the duplicate: one classifier
    batch per commit interval (2.8 s). The committed position fell ever further behind the
    verdicts: lag that grew without end, and a restart would count again everything since.
    Here the gap is the missing offsets only, so the commit moves past the markers at once.
    """

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        # Called with offset_to = the offset of the record that follows the gap.
        await super()._add_gap(tp, offset_from, offset_to - 1)

    async def subscribe(self, topics: Iterable[str]) -> None:
        """Join the group only once the metadata shows every topic subscribed to. Faust creates
        its internal topics (observations, changelogs) just before, and the controller
        acknowledges a creation before the brokers know the topic: on a loaded host the first
        assignment left ``observations`` out ("Ignoring missing topic"), the worker said it was
        ready without a tally, and the metadata refresh 6 s later rebalanced it. Records read
        before then were counted again, or (fetched across the rebalance) not at all."""
        names = sorted(set(topics))
        settings: Settings | None = getattr(self.app, "floodgate_settings", None)
        if settings is not None and names:
            try:
                await asyncio.to_thread(topics_wait_visible, settings, names)
            except (TimeoutError, KafkaException) as e:
                log.get(STAGE).warning("subscribing before every topic is visible", extra={"error": str(e)})
        await super().subscribe(names)


def topics_wait_visible(settings: Settings, names: list[str]) -> None:
    topics.wait_visible(kafka.admin(settings), names)


class GapTransport(faust_kafka.Transport):
    Consumer = GapConsumer


class App(faust.App):
    """A Faust app whose consumer is :class:`GapConsumer` (its producer is Faust's own), with
    the settings it was built from (the consumer reads the cluster's metadata through them)."""

    floodgate_settings: Settings | None = None

    def _new_transport(self) -> faust.types.TransportT:
        return GapTransport(self.conf.broker_consumer, self)


class Replays:
    """The highest offset this process has taken from each partition, to step over a replay.

    At-least-once (the module docstring) means input not yet committed is read again after a
    rebalance. When the partition comes back to the same process (a member that missed its
    heartbeats under load and rejoined), the agent has already counted those records: the
    likeliest cause of ham counted 714 times for 600 verdicts, seen once in a test on a loaded
    host. Offsets within a partition only grow, so a record at or below the high-water mark was
    taken before. A process that never saw the records (a successor after a restart, another
    member) counts them: the documented double count.
    """

    def __init__(self) -> None:
        self._high: dict[tuple[str, int], int] = {}

    def fresh(self, topic: str, partition: int, offset: int) -> bool:
        tp = (topic, partition)
        if offset <= self._high.get(tp, -1):
            return False
        self._high[tp] = offset
        return True


def build_app(settings: Settings, *, web_port: int | None = None, partitions: int = DEFAULT_PARTITIONS,
              store: str = "memory", datadir: Path = DEFAULT_DATADIR, agreement: Agreement = AGREEMENT) -> faust.App:
    """The Faust app; ``web_port`` None means the configured metrics port (0: no web server)."""
    if web_port is None:
        web_port = settings.worker.metrics_port
    app_id = settings.group(STAGE)
    app = App(
        app_id,
        broker=[f"kafka://{h.strip()}" for h in settings.kafka.bootstrap_servers.split(",") if h.strip()],
        broker_credentials=broker_credentials(settings),
        store=store_url(store),
        datadir=str(datadir),
        processing_guarantee="at_least_once",  # see the module docstring
        topic_partitions=partitions,
        topic_replication_factor=replication_factor(settings),
        web_enabled=web_port != 0,
        web_host=settings.worker.metrics_host,
        web_bind=settings.worker.metrics_host,
        web_port=web_port or 6066,
        web_in_thread=False,
        consumer_metadata_max_age_ms=METADATA_MAX_AGE_MS,
        producer_linger=PRODUCER_LINGER_S,
    )
    app.floodgate_settings = settings
    lg = log.get(STAGE)
    stats: Counter[str] = Counter()

    def skip(why: str, **extra: Any) -> None:
        """Count a record that contributes nothing; log the ones that point at a fault."""
        stats[f"skipped_{why}"] += 1
        metrics.MESSAGES.labels(stage=STAGE, lane="", outcome=f"skipped_{why}").inc()
        if why in ("undecodable", "error"):
            metrics.ERRORS.labels(stage=STAGE, kind=why).inc()
            lg.warning("record skipped", extra={"why": why, **extra}, exc_info=why == "error")

    raw = {"key_type": bytes, "value_type": bytes, "value_serializer": "raw"}
    feedback_topic = app.topic(settings.topic("feedback"), **raw)
    verdict_topic = app.topic(settings.topic("ham"), settings.topic("spam"), **raw)
    # Sender keys are str: raw bytes on the observations topic (the app's key serializer), JSON in
    # the tables' changelogs (windowed keys are tuples). A key's table entries are written to its
    # observation's partition (see tally), and the web view routes by that topic, not the table.
    observed = app.topic(observations_topic(settings), internal=True, partitions=partitions,
                         retention=OBSERVATIONS_RETENTION, key_type=str, value_type=bytes,
                         value_serializer="raw")
    reputation_topic = app.topic(settings.topic("reputation"), key_serializer="raw", **raw)
    totals = app.Table("senders", key_type=str, partitions=partitions)
    traffic = app.Table("traffic", default=int, key_type=str, value_type=int, partitions=partitions).tumbling(
        TRAFFIC_WINDOW_S, expires=timedelta(seconds=TRAFFIC_EXPIRES_S))

    taken = Replays()  # the inputs of observe and tally (distinct topics, so one map serves both)

    async def observe(stream: faust.StreamT, feedback: bool) -> None:
        async for batch in stream.take_events(TAKE_MAX, within=TAKE_WITHIN_S):
            found: list[tuple[list[tuple[str, str]], float]] = []  # verdicts
            reports: list[tuple[str, str, str, float]] = []  # feedback and decisions
            for event in batch:
                msg = event.message
                where = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
                if not taken.fresh(msg.topic, msg.partition, msg.offset):
                    skip("replayed")
                    continue
                decision = senders.decode_decision(event.value) if feedback else None
                if decision is not None:
                    reports.append((decision.key, decision.decision, decision.by, decision.at))
                    stats["decisions"] += 1
                    lg.info("operator decision", extra={"sender": decision.key, "decision": decision.decision,
                                                        "by": decision.by})
                    continue
                try:
                    ev = events.decode(event.value)
                except events.EventError as e:
                    skip("undecodable", reason=str(e), **where)
                    continue
                try:
                    pairs = observations(ev, feedback)
                    if isinstance(pairs, str):
                        skip(pairs, event_id=ev.id)
                        continue
                    if feedback:
                        who = reporter_id(ev)
                        reports.extend((key, kind, who, msg.timestamp) for key, kind in pairs)
                        stats["feedback"] += 1
                    else:
                        found.append((pairs, msg.timestamp))
                        stats["verdicts"] += 1  # before the sends: tally may count them while they await
                except Exception:  # one record never stops the worker
                    skip("error", event_id=ev.id, **where)
            out = aggregate_reports(reports) if feedback else [(*o, "") for o in aggregate(found)]
            sent = 0
            for key, kind, count, ts, who in out:
                try:
                    # Record time travels along, so traffic windows follow when mail was classified
                    # and the agreement span when reporters spoke.
                    await observed.send(key=key, value=encode_observation(kind, count, who), timestamp=ts)
                    sent += 1
                except Exception:  # one send never stops the worker
                    skip("error", sender=key)
            stats["observation_records_sent"] += sent

    @app.agent(feedback_topic, name="feedback")
    async def read_feedback(stream: faust.StreamT) -> None:
        await observe(stream, feedback=True)

    @app.agent(verdict_topic, name="verdicts")
    async def read_verdicts(stream: faust.StreamT) -> None:
        await observe(stream, feedback=False)

    async def tally_key(key: str, observed_: list[tuple[faust.EventT, str, int, str]]) -> None:
        """Apply one key's observations of a batch, in order: a standing change (and every
        operator decision) is published when it happens, the table entry and each traffic
        window are written once."""
        entry = totals.get(key) or new_entry()
        windows: dict[int, tuple[faust.EventT, int]] = {}
        for event, kind, count, who in observed_:
            if kind in VERDICT_KINDS:
                w = window_of(event.message.timestamp)
                windows[w] = (event, windows.get(w, (event, 0))[1] + count)
            entry, good_now = tally(entry, kind, count, who, event.message.timestamp, rule=agreement)
            # A decision is published even when the standing stays: operators see it on the topic.
            if good_now != entry["good"] or kind in DECISION_KINDS:
                standing = standing_of(key, entry, good_now, time.time())
                k, v = senders.encode_standing(standing)
                # Acknowledged before the table says "published": a crash repeats, never loses, it.
                await (await reputation_topic.send(key=k, value=v))
                stats["published"] += 1
                lg.info("standing changed" if good_now != entry["good"] else "decision published",
                        extra={"sender": standing.key, "good": good_now, "decision": standing.decision})
            entry["good"] = good_now
        # A table write goes to the changelog partition of the current event's (Faust's rule
        # for a stream's table): in a batch that is the key's own observation, set here.
        as_current(observed_[-1][0])
        totals[key] = entry
        for event, n in windows.values():
            traffic[key].apply(operator.add, n, event)  # the window of that event's record time
        stats["observations"] += sum(count for _e, _k, count, _who in observed_)

    @app.agent(observed, name="tally")
    async def tally_observations(stream: faust.StreamT) -> None:
        async for batch in stream.take_events(TAKE_MAX, within=TAKE_WITHIN_S):
            by_key: dict[str, list[tuple[faust.EventT, str, int, str]]] = {}
            for event in batch:
                if not taken.fresh(event.message.topic, event.message.partition, event.message.offset):
                    skip("replayed")
                    continue
                parsed = parse_observation(event.value)
                if not event.key or parsed is None:
                    skip("bad_observation")
                    continue
                by_key.setdefault(event.key, []).append((event, *parsed))
            stats["observation_records"] += sum(map(len, by_key.values()))
            for key, observed_ in by_key.items():
                try:
                    await tally_key(key, observed_)
                except Exception:  # one key never stops the worker
                    msg = observed_[-1][0].message
                    skip("error", topic=msg.topic, partition=msg.partition, offset=msg.offset)

    if web_port:
        from faust.sensors.prometheus import setup_prometheus_sensors

        setup_prometheus_sensors(app, name_prefix="faust_reputation")

        def recent_windows() -> list[Any]:
            """The traffic table as of each kept window (views need no stream event)."""
            now = time.time()
            return [traffic.relative_to(now - i * TRAFFIC_WINDOW_S)
                    for i in range(int(TRAFFIC_EXPIRES_S // TRAFFIC_WINDOW_S))]

        routing = {"ready": False}  # the producer knows the observations topic's partitions

        @app.page("/reputation/senders/{key}/")
        async def sender_view(web: View, request: Request, key: str) -> Response:
            """One sender's counts and standing, answered by the worker that owns the key.

            The owner is the worker assigned the key's partition of the observations topic, where
            ``tally`` keeps the key's entry. (Routing by the table instead would hash the key's JSON
            form, ``"domain:x"``, which lands on another partition than the raw key the
            observations are sent with: with two workers, a key asked of the wrong one was unknown.)
            """
            if not routing["ready"]:
                # The router finds a key's partition with the producer's partitioner, which knows
                # only topics the producer has metadata for; a worker that has sent nothing to
                # observations yet (only old or foreign records there) answered 503 for a minute.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(app.producer._ensure_producer().partitions_for(
                        observed.get_topic_name()), ROUTING_METADATA_TIMEOUT_S)
                    routing["ready"] = True
            try:
                return await app.router.route_topic_req(observed, key, web, request)
            except SameNode:
                pass
            except (ServiceUnavailable, TypeError):  # no assignment (or metadata) yet: a fresh worker
                return web.json({"error": "not ready, try again"}, status=503)
            entry = totals.get(key)
            if entry is None:
                return web.json({"key": key, "known": False})
            return web.json({"key": key, "known": True, **entry, "traffic_now": traffic[key].now(),
                             "traffic_recent": sum(w[key].value() for w in recent_windows())})

        @app.page("/reputation/traffic/")
        async def traffic_view(web: View, request: Request) -> Response:
            """This worker's busiest senders over the kept windows (the last ``TRAFFIC_EXPIRES_S``)."""
            # The underlying table is keyed by (sender key, (window start, end)); iterating it
            # needs no key index (which would grow with every sender ever seen).
            recent: Counter[str] = Counter()
            cutoff = time.time() - TRAFFIC_EXPIRES_S
            for (key, (start, _end)), n in list(traffic.table.items()):
                if start >= cutoff:
                    recent[key] += n
            return web.json({"window_s": TRAFFIC_WINDOW_S, "span_s": TRAFFIC_EXPIRES_S,
                             "senders": [{"key": k, "messages": n}
                                         for k, n in recent.most_common(TRAFFIC_TOP)]})

        def ready() -> bool:
            # Tables recovered and no rebalance under way. Records that arrive before then wait,
            # and Faust has been seen to drop one fetched while its flow is suspended.
            return app.tables.recovery.completed.is_set() and not app.rebalancing

        @app.page("/reputation/stats/")
        async def stats_view(web: View, request: Request) -> Response:
            return web.json({"ready": ready(), **stats})

        # What every worker serves (pipeline/core/service.py). Until /readyz answers 200 the worker
        # is still starting, and a SIGTERM then makes Faust's worker exit 1 (InvalidStateError).
        @app.page("/healthz")
        async def healthz_view(web: View, request: Request) -> Response:
            return web.text("ok\n")

        @app.page("/readyz")
        async def readyz_view(web: View, request: Request) -> Response:
            return web.text("ready\n") if ready() else web.text("not ready\n", status=503)

    return app


def logging_config(level: str) -> dict[str, Any]:
    """Faust's worker configures logging itself; this makes it write our JSON lines."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "pipeline.core.log.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json",
                                "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
    }


def run(settings: Settings, *, loglevel: str = "info", **options: Any) -> None:
    """Run the worker until SIGTERM or SIGINT (Faust's worker handles both and exits 0)."""
    app = build_app(settings, **options)
    # Faust creates its data directory without parents: in a fresh checkout (no .run/, which only
    # the local broker's start creates) the worker died at start, again on every restart.
    Path(app.conf.datadir).mkdir(parents=True, exist_ok=True)
    worker = faust.Worker(app, loglevel=loglevel, logging_config=logging_config(loglevel),
                          redirect_stdouts=False)
    worker.execute_from_commandline()

