"""The flood at the front door: ham and a spam flood over real SMTP, timed from the client's
connect to the durable Maildir write (``make bench-flood``, and the end of ``make demo``).

Where :mod:`pipeline.bench.flood` produces straight into the lanes (its generator plays the
ingress), this bench goes through ``floodgate smtp`` as the internet does: ham senders and bots
connect from their own addresses on 127/8 (:mod:`pipeline.bench.smtpload`), so the ingress's
per-client limits, stress, tarpit, admission and broker acknowledgements are all in the path.

One run, two configurations, one after the other, each on its own private topics:

* ``floodgate``: ``floodgate smtp`` and the standard workers on a :class:`~pipeline.node.Node`,
  as ``floodgate run`` starts them (the lag monitor aside: the bench samples lag itself);
* ``naive``: the same ingress program with admission and the per-client limits out of the way
  by settings alone (:func:`naive_settings`: nothing diverted, nobody refused, held or limited),
  everything into one queue, the naive single-lane worker of 2008 behind it.

For each configuration, each flood shape (``fast``, ``hog``, ``concentrated``,
``forged-known-good``: :data:`pipeline.bench.smtpload.SHAPES`) runs warm-up, before, during and
after on the same node, the pipeline drained between shapes. The ham senders send throughout, each well within its
limits (one connection at a time, a couple of messages a second); the first warm-up is long
enough for every one of them to become a known client (``smtp.known_after_messages`` over
``smtp.known_after_s``), as a deployment's regular senders are, and the report says whether
they did. Bots and hoggers (in a process of their own) run in the flood phase only.

Measured, per configuration, shape and phase: ham connect -> 250 and connect -> Maildir (the
file's ctime, after its fsync), every SMTP step, every 4xx/421/refusal per role, the bots'
attempts and acceptances, signs of stress seen from outside (held refusals, "server busy",
idle sessions closed), the disk probe and consumer lag, CPU per process (the ingress's front and
each session process, the broker, each worker, both generators); and the ledger: every message
that got a 250 in exactly one of a mailbox, the quarantine or the dead-letter topic. Results:
``reports/frontdoor.json`` and ``reports/frontdoor.png``.

The shapes of random mail run with sender authentication off, whatever the settings say: their
senders' domains are made up, and a run must not depend on what this host's resolver makes of
them (its cost is measured apart: ``smtp-load --auth``).

``forged-known-good`` (issue 20, in the default shapes): spam forging a known-good sender. Its
bots send :mod:`pipeline.bench.authworld`'s forgery of :data:`~pipeline.bench.authworld.GOOD`
(MAIL FROM and From, unsigned, from outside the domain's SPF, against ``p=reject``), and its ham
senders send authworld's signed ham (a tenth from the known-good domain itself, which passes). It
runs on a node of its own per configuration, after the other shapes (a fresh node, so a full
warm-up again: about 1.5 min more per configuration, and ~35 s once to sign the ham), whose
ingress verifies senders against a private knotd serving authworld's zones
(:mod:`pipeline.bench.dnsserver`, started once for the run), with the known-good domain published
as good on the private reputation topic before the ingress starts. The naive configuration gets
the same mail, zones and standings (its ingress verifies too; it has no admission to use the
result). Reported for it besides the usual: the bot messages that went into the priority lane in
the flood's first second and after it (by event id, from the lane in the quarantine's and the
Maildirs' metadata), and whether issue 20's target was met (:func:`forged_target`). Without knotd
(Debian ``knot``) the shape is skipped, with the reason in the log, the report (``skipped``) and
the summary.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from models.bench import machine
from pipeline.bench import accounting, flood, smtpload
from pipeline.bench.flood import Bed, fmt
from pipeline.bench.smtpload import AuthMail, HamSpec, Phases, Run
from pipeline.core.config import Settings
from pipeline.node import Node, free_port, take_priority

SHAPES = ("fast", "hog", "concentrated", "forged-known-good")
CONFIGS = ("floodgate", "naive")
# Ham: 20 senders (other providers' MTAs, each from a /24 of its own on 127.1/16), one message
# per connection, 40 a second together: 600 in a 15-s phase, so a phase's p99 is its 6th
# slowest message, and each sender sends 2 a second, far inside every per-client limit.
HAM_SENDERS = 20
HAM_RATE = 40.0
# The first warm-up lasts the ingress's time to know a client (smtp.known_after_s) and this
# much more: a sender's 5th message comes within a second, its messages reach a session
# process late on a loaded host, and the report checks that every ham sender was known.
KNOWN_MARGIN_S = 10.0
# A later shape on the same node: its ham senders are known already, the pipeline was drained.
SETTLE_S = 5.0
# The generators run at the default niceness: the internet's clients get no priority at the
# ingress's host (a process that ran the lane-level bench before is at the ingress's -10).
GENERATOR_NICE = 0
# What the naive configuration's limits are set to: more than the bench can ever reach.
UNLIMITED = 1_000_000
# Issue 20's target for the forged-known-good flood (beside smtpload.FIRST_SECOND_S): no flood
# message in the priority lane after the flood's first second, ham p99 connect -> Maildir during
# the flood within this multiple of the pre-flood p99 and under this many seconds.
TARGET_RATIO = 1.5
TARGET_P99_S = 1.0


@dataclass
class FrontDoorScenario:
    warmup_s: float | None = None  # the first shape's; None: smtp.known_after_s + KNOWN_MARGIN_S
    settle_s: float = SETTLE_S  # a later shape's warm-up
    pre_s: float = 15.0
    flood_s: float = 15.0
    post_s: float = 15.0
    shapes: tuple[str, ...] = SHAPES
    ham_senders: int = HAM_SENDERS
    ham_rate: float = HAM_RATE
    seed: int = 7


@dataclass
class ShapeResult:
    """One shape's run in one configuration: the smtpload summary and what the bench adds."""

    summary: dict[str, Any]  # smtpload.summarize(), with connect -> Maildir
    phases: dict[str, dict[str, Any]]  # the bench's own per phase: ham placement, clear p99, disk, stress signs
    ledger: str = ""
    ok: bool = False
    lost: int = 0
    duplicated: int = 0
    drain_s: float | None = None  # the flood's last spam in the quarantine, after the flood's end
    ham_known: int = 0  # ham senders the ingress knew when the flood began
    ratio: float | None = None  # ham p99 connect -> Maildir, flood phase over before
    verified: bool = False  # on the node whose ingress verifies senders against the auth world's zones
    # Accepted bot messages in the priority lane, in the flood's first second and after it (by the
    # time of their 250; smtpload.bots_in_priority); None in a configuration of one queue (naive).
    bot_priority_first_second: int | None = None
    bot_priority_after_first_second: int | None = None
    series: dict[str, list[Any]] = field(default_factory=dict)  # ham, bots, lag, disk over time


# -- the configurations --------------------------------------------------------------------
def naive_settings(s: Settings) -> Settings:
    """The naive configuration's ingress: the same program, with admission and the per-client
    limits out of the way by settings alone. Nothing floods (a floor no source reaches), no
    client, network or total is limited, no rate is checked (0: off), and stress changes nothing
    (no share, no tarpit, no shorter timeouts); everything goes to ``inbound``."""
    smtp = replace(s.smtp, max_connections=UNLIMITED, max_connections_per_client=UNLIMITED,
                   max_connections_per_network=UNLIMITED, client_connection_rate=0.0,
                   client_message_rate=0.0, unknown_message_rate=0.0,
                   max_messages_per_connection=UNLIMITED,
                   stress_connection_share=1.0, stress_unknown_share=1.0,
                   stress_unknown_connections_per_client=UNLIMITED, stress_unknown_transactions=UNLIMITED,
                   stress_idle_timeout_s=s.smtp.idle_timeout_s, stress_hard_error_limit=s.smtp.hard_error_limit,
                   error_sleep_s=0.0)
    return replace(s, smtp=smtp, admission=replace(s.admission, flood_rate=float(UNLIMITED)))


def own_port(s: Settings) -> Settings:
    """The ingress on loopback on a port of its own (other runs share the host)."""
    return replace(s, smtp=replace(s.smtp, host="127.0.0.1", port=free_port()))


def start_floodgate(node: Node, settings: Settings) -> list[str]:
    node.start("smtp", ["smtp"])
    return flood.start_floodgate(node, settings)


def start_naive(node: Node, settings: Settings) -> list[str]:
    node.start("smtp", ["smtp"])
    return flood.start_naive(node, settings)


STARTERS: dict[str, tuple[flood.Starter, Callable[[Settings], Settings]]] = {
    "floodgate": (start_floodgate, own_port),
    "naive": (start_naive, lambda s: naive_settings(own_port(s))),
}


def watched(node: Node, settings: Settings) -> dict[str, int]:
    """Processes whose CPU is read per phase: the ingress's, the broker, every worker."""
    out = smtpload.ingress_processes(node.workers["smtp"].proc.pid)  # type: ignore[union-attr]
    broker = smtpload.broker_pid(settings)
    if broker is not None:
        out["broker"] = broker
    for name, w in node.workers.items():
        if name != "smtp" and w.proc is not None:
            out[name] = w.proc.pid
    return out


def known_clients(log_path: Path | None, until: float) -> set[str]:
    """Clients the ingress logged as known (``client known``) up to the wall time ``until``."""
    out: set[str] = set()
    if log_path is None or not log_path.exists():
        return out
    with log_path.open("rb") as f:
        for line in f:
            if b'"client known"' not in line:
                continue
            with contextlib.suppress(orjson.JSONDecodeError):
                rec = orjson.loads(line)
                if rec.get("ts", 0) <= until and rec.get("client"):
                    out.add(rec["client"])
    return out


# -- one shape -----------------------------------------------------------------------------
@dataclass
class _Pending:
    """A shape's run, kept until the node is stopped and the sinks are scanned."""

    shape: str
    run: Run
    acked: set[str]
    ham_known: int


def run_shape(bed: Bed, shape: smtpload.Shape, phases: Phases, ham: list, spam: list, spec: HamSpec,
              seed: int, log: Callable[[str], None], bot_mail: list[tuple[str, bytes]] | None = None) -> _Pending:
    s = bed.settings
    os.sync()  # the previous shape's writes are not this one's to wait for
    watch = watched(bed.workers, s)
    run = smtpload.run_split(s.smtp.host, s.smtp.port, shape, phases, ham=ham, spam=spam, ham_spec=spec,
                             watch=watch, seed=seed, bot_mail=bot_mail or ())
    acked = {t.event_id for t in run.transactions if t.accepted and t.event_id}
    flood_start = run.start + phases.warmup_s + phases.pre_s
    senders = {smtpload.source(smtpload.HAM_NET, i) for i in range(spec.senders)}
    known = len(senders & known_clients(bed.workers.workers["smtp"].log_path, flood_start))
    log(f"  {bed.name}/{shape.name}: {len(acked)} messages accepted; draining")
    started = time.monotonic()
    if accounting.wait_accounted(s, acked, flood.DRAIN_TIMEOUT_S) is None:
        log(f"  {bed.name}/{shape.name}: not all accounted for after {flood.DRAIN_TIMEOUT_S:.0f} s")
    log(f"  {bed.name}/{shape.name}: drained in {time.monotonic() - started:.0f} s")
    return _Pending(shape.name, run, acked, known)


def _phase_of(run: Run, t: float) -> str | None:
    for name, start, end in run.phases.bounds():
        if start <= t - run.start < end:
            return name
    return None


def quarantined_lanes(db: Path) -> dict[str, str]:
    """Event id -> the lane it was classified in, for the quarantine's messages (their metadata)."""
    out: dict[str, str] = {}
    if not db.exists():
        return out
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        for event_id, meta in conn.execute("SELECT event_id, meta FROM quarantine_message"):
            with contextlib.suppress(orjson.JSONDecodeError):
                out[event_id] = orjson.loads(meta).get("lane") or "?"
    return out


# Replies that only stress gives (pipeline/smtp/limits.py): the share of clients without history.
STRESS_REPLIES = ("server busy",)
IDLE_CLOSE = "idle too long"


def analyse(p: _Pending, found: accounting.Found, classified: dict[str, tuple[float, str]],
            lag: list[tuple[float, str, int]], lag_t0: float, disk: list[tuple[float, float]],
            everything: set[str], spam_lanes: dict[str, str], lanes: bool = True) -> ShapeResult:
    """``everything``: every message the node's ingress acknowledged, all its shapes' (the other
    shapes' are not this one's unexpected finds); ``spam_lanes``: the quarantine's lanes;
    ``lanes``: the configuration has lanes (not the naive single queue)."""
    run = p.run
    smtpload.attach_maildir(run, found)
    summary = smtpload.summarize(run)
    ledger = accounting.reconcile(p.acked, found)
    ledger.unexpected = len((set(found.delivered) | set(found.quarantined) | set(found.dead)) - everything)
    end = run.start + run.phases.total_s
    flood_start = run.start + run.phases.warmup_s + run.phases.pre_s
    flood_end = flood_start + run.phases.flood_s
    stalls = flood.stall_windows(disk)
    phases: dict[str, dict[str, Any]] = {name: {"ham_mailbox_priority": 0, "ham_mailbox_bulk": 0,
                                                "ham_quarantined": 0, "ham_dead": 0, "ham_not_found": 0,
                                                "ham_not_accepted": 0, "clear": [], "disk": [],
                                                "stress_replies": 0, "idle_closed": 0, "held_4xx": 0}
                                         for name, _, _ in run.phases.bounds()}
    ham_series: list[tuple[float, float | None, str]] = []  # (t, connect -> Maildir, where)
    for tx in run.ham():
        ph = _phase_of(run, tx.started)
        if ph is None:
            continue
        bucket = phases[ph]
        t = round(tx.started - run.start, 3)
        if not tx.accepted:
            bucket["ham_not_accepted"] += 1
            ham_series.append((t, None, "not accepted"))
            continue
        if tx.landed is not None:
            bulk = classified.get(tx.event_id, (0.0, "?"))[1] == "bulk"  # admission took it for a flood
            bucket["ham_mailbox_bulk" if bulk else "ham_mailbox_priority"] += 1
            latency = tx.landed - tx.started
            ham_series.append((t, round(latency, 4), "bulk" if bulk else "mailbox"))
            if flood.clear_of(stalls, tx.started, tx.landed):
                bucket["clear"].append(latency)
        elif tx.event_id in found.quarantined:
            bucket["ham_quarantined"] += 1
            ham_series.append((t, round(found.quarantined[tx.event_id] - tx.started, 4), "held as spam"))
        elif tx.event_id in found.dead:
            bucket["ham_dead"] += 1
        else:
            bucket["ham_not_found"] += 1
    for f in run.failures:
        ph = _phase_of(run, f.at)
        if ph is None or f.role == "ham":
            continue
        phases[ph]["stress_replies"] += any(r in f.text for r in STRESS_REPLIES)
        phases[ph]["idle_closed"] += IDLE_CLOSE in f.text
        phases[ph]["held_4xx"] += 400 <= f.code < 500 and f.waited >= smtpload.HELD_S
    for when, seconds in disk:
        ph = _phase_of(run, when)
        if ph is not None:
            phases[ph]["disk"].append(seconds)
    for bucket in phases.values():
        bucket["ham_clear_to_maildir"] = flood.stats(bucket.pop("clear"))
        bucket["disk"] = flood.stats(bucket["disk"])
    bots = [t for t in run.transactions if t.role == "bot" and t.accepted]
    in_priority: set[str] = set()
    for t in bots:  # which lane the flood took: admission's bulk lane, or the priority lane with the ham
        lane = spam_lanes.get(t.event_id) or classified.get(t.event_id, (0.0, "?"))[1]
        if lane == "priority":
            in_priority.add(t.event_id)
        ph = _phase_of(run, t.done)
        if ph is not None:
            key = {"bulk": "bot_bulk_lane", "priority": "bot_priority_lane"}.get(lane, "bot_lane_unknown")
            phases[ph][key] = phases[ph].get(key, 0) + 1
    first_second = smtpload.bots_in_priority(run, in_priority) if lanes else {}
    spam_landed = [found.quarantined[t.event_id] for t in bots if t.event_id in found.quarantined]
    before = summary["phases"].get("1-before", {}).get("ham", {}).get("connect_to_maildir", {}).get("p99")
    during = summary["phases"].get("2-during", {}).get("ham", {}).get("connect_to_maildir", {}).get("p99")
    per_second: dict[int, int] = {}
    for t in bots:
        k = int(t.done - run.start)
        per_second[k] = per_second.get(k, 0) + 1
    return ShapeResult(
        summary=summary, phases=phases, ledger=ledger.summary(), ok=ledger.ok, lost=len(ledger.lost),
        duplicated=len(ledger.duplicated),
        drain_s=round(max(spam_landed) - flood_end, 2) if spam_landed else None,
        ham_known=p.ham_known,
        ratio=round(during / before, 2) if before and during is not None else None,
        **first_second,
        series={"ham": ham_series,
                "bots_accepted_per_s": sorted(per_second.items()),
                "lag": [(round(lag_t0 + t - run.start, 2), g, n) for t, g, n in lag
                        if run.start - 1 <= lag_t0 + t <= end + 60],
                "disk": [(round(when - run.start, 3), round(sec, 4)) for when, sec in disk
                         if run.start <= when <= end]},
    )


# -- one configuration, every shape ----------------------------------------------------------
@dataclass
class AuthWorld:
    """What the shapes that send prepared mail (``Shape.mail``: forged-known-good) run with: the
    auth world's mail and the private knotd serving its zones (on 127.0.0.1:``dns_port``)."""

    mail: AuthMail
    dns_port: int


def needs_auth(shape: str) -> bool:
    """The shape's bots send the auth world's prepared mail, for an ingress that verifies it."""
    return smtpload.SHAPES[shape].mail != "random"


def _verifying(starter: flood.Starter, adjust: Callable[[Settings], Settings], dns_port: int
               ) -> tuple[flood.Starter, Callable[[Settings], Settings]]:
    """A configuration's starter and settings for the auth world's node: the ingress verifies
    against the private knotd, and the known-good domain is published before it starts."""
    def start(node: Node, settings: Settings) -> list[str]:
        smtpload.publish_good(settings, smtpload.GOOD_KEYS)
        return starter(node, settings)

    return start, lambda s: smtpload.verifying(adjust(s), dns_port)


def _unverifying(adjust: Callable[[Settings], Settings]) -> Callable[[Settings], Settings]:
    """A configuration's settings for the node of random mail: sender authentication off, whatever
    the settings say, so that no run asks this host's resolver about made-up domains (answers in
    milliseconds on one host, a 2-s budget each on another). Its cost is measured apart
    (``smtp-load --auth``, BENCHMARKS.md), and the forged-known-good shape runs with it on
    against knotd."""
    def unverified(s: Settings) -> Settings:
        adjusted = adjust(s)
        return replace(adjusted, auth=replace(adjusted.auth, enabled=False))

    return unverified


def _merge(found: accounting.Found, more: accounting.Found) -> None:
    found.delivered.update(more.delivered)
    found.quarantined.update(more.quarantined)
    found.accepted.update(more.accepted)
    found.dead.update(more.dead)
    found.dead_records += more.dead_records


def run_config(name: str, base: Settings, scenario: FrontDoorScenario, workdir: Path, ham: list, spam: list,
               log: Callable[[str], None], live: bool = False, auth: AuthWorld | None = None
               ) -> dict[str, ShapeResult]:
    """Every shape of ``scenario`` in configuration ``name``: the shapes of random mail on one node,
    then those of the auth world's mail (``auth``; none without it) on a node of their own."""
    starter, adjust = STARTERS[name]
    plain = tuple(s for s in scenario.shapes if not needs_auth(s))
    signed = tuple(s for s in scenario.shapes if needs_auth(s)) if auth is not None else ()
    results: dict[str, ShapeResult] = {}
    everything: set[str] = set()
    found = accounting.Found()
    exits: list[dict[str, Any]] = []
    for shapes, world in ((plain, None), (signed, auth)):
        if not shapes:
            continue
        bed_name, start, settings, bed_ham = name, starter, _unverifying(adjust), ham
        if world is not None:
            bed_name, bed_ham = f"{name}-auth", world.mail.ham
            start, settings = _verifying(starter, adjust, world.dns_port)
        log(f"{bed_name}: starting floodgate smtp and the workers"
            + (f" (verifying senders against the private knotd on port {world.dns_port})" if world else ""))
        bed_results, acked, bed_found, bed_exits = _run_bed(
            bed_name, start, settings, shapes, base, scenario, workdir, bed_ham, spam, log, live,
            lanes=name != "naive", bot_mail=world.mail.bot_mail if world else {})
        for r in bed_results.values():
            r.verified = world is not None
        results |= bed_results
        everything |= acked
        _merge(found, bed_found)
        exits += bed_exits
    whole = accounting.reconcile(everything, found)
    for r in results.values():
        r.summary["config_ledger"] = whole.summary()
        r.summary["worker_exits"] = exits
    return results


def _run_bed(name: str, starter: flood.Starter, adjust: Callable[[Settings], Settings], shapes: tuple[str, ...],
             base: Settings, scenario: FrontDoorScenario, workdir: Path, ham: list, spam: list,
             log: Callable[[str], None], live: bool, lanes: bool, bot_mail: dict[str, list[tuple[str, bytes]]]
             ) -> tuple[dict[str, ShapeResult], set[str], accounting.Found, list[dict[str, Any]]]:
    """``shapes`` one after the other on one node: their results, every message the node's ingress
    acknowledged, where the node's sinks put them, and the workers that exited."""
    spec = HamSpec(senders=scenario.ham_senders, rate=scenario.ham_rate)
    pending: list[_Pending] = []
    with flood.testbed(name, base, workdir, starter, settings=adjust) as bed:
        warmup = (scenario.warmup_s if scenario.warmup_s is not None
                  else bed.settings.smtp.known_after_s + KNOWN_MARGIN_S)
        bed.measure()
        with bed.live(live):
            for i, shape_name in enumerate(shapes):
                shape = smtpload.SHAPES[shape_name]
                phases = Phases(warmup if i == 0 else scenario.settle_s, scenario.pre_s, scenario.flood_s,
                                scenario.post_s)
                flood_at = phases.warmup_s + phases.pre_s
                log(f"  {name}/{shape_name}: {phases.total_s:.0f} s of ham, a flood from {flood_at:.0f} s "
                    f"for {phases.flood_s:.0f} s")
                pending.append(run_shape(bed, shape, phases, ham, spam, spec, scenario.seed, log,
                                         bot_mail=bot_mail.get(shape.mail)))
        bed.stop()
        exits = [asdict(e) for e in bed.workers.exits]
        found = accounting.scan(bed.settings)
        classified = flood.classified_times(bed.settings.paths.maildir_root)
        spam_lanes = quarantined_lanes(bed.settings.paths.quarantine_db)
    acked: set[str] = set().union(*(p.acked for p in pending))
    results = {p.shape: analyse(p, found, classified, bed.lag, bed.t0, bed.disk, acked, spam_lanes, lanes=lanes)
               for p in pending}
    return results, acked, found, exits


def run(settings: Settings, scenario: FrontDoorScenario, configs: tuple[str, ...] = CONFIGS, out: Path = flood.REPORTS,
        live: bool = False, keep: bool = False, log: Callable[[str], None] = print,
        command: str = "") -> dict[str, Any]:
    """Every configuration and shape; writes ``frontdoor.json`` and ``frontdoor.png`` to ``out``.
    The shapes of the auth world's mail are skipped, with the reason, when knotd cannot run."""
    from pipeline.bench.dnsserver import KnotServer

    take_priority(GENERATOR_NICE)
    ham_mail, spam = smtpload.load_corpus(settings.paths.data, scenario.seed)
    workdir = Path(settings.paths.maildir_root).parent / f"frontdoor-{uuid.uuid4().hex[:6]}"
    started = time.time()
    load_before = os.getloadavg()
    results: dict[str, dict[str, ShapeResult]] = {}
    skipped: dict[str, str] = {}
    try:
        with contextlib.ExitStack() as stack:
            auth = None
            if any(needs_auth(s) for s in scenario.shapes):
                why = KnotServer.unavailable()
                if why:
                    skipped = {s: why for s in scenario.shapes if needs_auth(s)}
                    log(f"skipping {', '.join(skipped)}: {why}")
                else:
                    log("signing the auth world's ham and starting a private knotd for its zones")
                    mail = smtpload.auth_mail(settings.paths.data)
                    auth = AuthWorld(mail, stack.enter_context(KnotServer(mail.world.zones)).port)
            for name in configs:
                results[name] = run_config(name, settings, scenario, workdir, ham_mail, spam, log, live, auth)
    finally:
        if not keep:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "command": command,
        "scenario": asdict(scenario) | {"shape_specs": {s: asdict(smtpload.SHAPES[s]) for s in scenario.shapes},
                                        "smtp": asdict(settings.smtp), "admission": asdict(settings.admission)},
        "machine": machine(),
        "started_at": started,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "skipped": skipped,
        **({"workdir": str(workdir)} if keep else {}),
        "results": {c: {s: {k: v for k, v in asdict(r).items() if k != "series"} for s, r in shapes.items()}
                    for c, shapes in results.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontdoor.json").write_bytes(orjson.dumps(
        report | {"series": {c: {s: r.series for s, r in shapes.items()} for c, shapes in results.items()}}))
    plot(results, scenario, out / "frontdoor.png")
    return report


# -- the report ----------------------------------------------------------------------------
def plot(results: dict[str, dict[str, ShapeResult]], scenario: FrontDoorScenario, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(results)
    shapes = [s for s in scenario.shapes if any(s in results[c] for c in configs)]
    if not shapes:
        return
    fig, axes = plt.subplots(len(shapes), len(configs), figsize=(7 * len(configs), 3.6 * len(shapes)),
                             squeeze=False)
    for col, config in enumerate(configs):
        for row, shape in enumerate(shapes):
            ax = axes[row][col]
            r = results[config].get(shape)
            if r is None:
                ax.set_visible(False)
                continue
            ph = r.summary["phases_s"]
            for where, color in (("mailbox", "tab:blue"), ("bulk", "tab:purple"), ("held as spam", "tab:red")):
                pts = [(t, lat) for t, lat, w in r.series["ham"] if w == where and lat is not None]
                if pts:
                    ax.scatter([t for t, _ in pts], [lat for _, lat in pts], s=3, c=color, alpha=0.6,
                               label={"mailbox": "ham, connect -> Maildir", "bulk": "ham via the bulk lane",
                                      "held as spam": "ham held as spam"}[where])
            refused = [t for t, lat, w in r.series["ham"] if lat is None]
            if refused:
                ax.scatter(refused, [1e-3] * len(refused), s=12, c="red", marker="v", label="ham never accepted")
            flood.scatter_disk(ax, r.series["disk"])
            ax.set_yscale("log")
            ax.set_ylabel("seconds")
            ax.axvspan(ph["warmup_s"], ph["warmup_s"] + ph["pre_s"], color="tab:green", alpha=0.06)
            flood.shade_flood(ax, ph["warmup_s"] + ph["pre_s"], ph["warmup_s"] + ph["pre_s"] + ph["flood_s"],
                              label="flood")
            ax.set_title(f"{config}, {shape} flood: ham over SMTP, p99 ratio {r.ratio}")
            bots = ax.twinx()
            pts = r.series["bots_accepted_per_s"]
            bots.plot([t for t, _ in pts], [n for _, n in pts], c="grey", lw=0.8, label="bot messages accepted/s")
            bots.set_ylabel("bot msgs accepted / s", color="grey")
            ax.legend(loc="upper left", fontsize=7)
            if row == len(shapes) - 1:
                ax.set_xlabel("seconds since the shape's start")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _p(d: dict[str, Any], *keys: str) -> float | None:
    for k in keys:
        d = d.get(k) or {}
    return d if isinstance(d, (int, float)) else None  # type: ignore[return-value]


def forged_target(r: dict[str, Any]) -> tuple[bool, str]:
    """Whether a shape's result (the report's) met issue 20's target for the forged-known-good
    flood, and the numbers it was judged on."""
    before = _p(r["summary"]["phases"].get("1-before", {}), "ham", "connect_to_maildir", "p99")
    during = _p(r["summary"]["phases"].get("2-during", {}), "ham", "connect_to_maildir", "p99")
    after = r.get("bot_priority_after_first_second")
    met = (after == 0 and r["ratio"] is not None and r["ratio"] <= TARGET_RATIO
           and during is not None and during < TARGET_P99_S)
    return met, (f"bot messages in the priority lane in the flood's first second {r.get('bot_priority_first_second')}"
                 f", after it {after}; ham p99 connect -> Maildir {fmt(before)} -> {fmt(during)} s, ratio "
                 f"{r['ratio']}")


def summary(report: dict[str, Any]) -> str:
    s = report["scenario"]
    lines = ["", f"front door: ham {s['ham_rate']:g} msg/s from {s['ham_senders']} senders over SMTP; floods "
             f"{', '.join(s['shapes'])} for {s['flood_s']:g} s each; load average {report['loadavg_before']} -> "
             f"{report['loadavg_after']}",
             "ham c->250 = connect -> the 250 after DATA; c->maildir = connect -> the durable Maildir write; clear ="
             f" ham whose way overlapped no disk probe write over {flood.DISK_STALL_S} s; 4xx = every 4xx,"
             " refusal and reset the ham senders got; gave up = ham its sender gave up on after its retries; bulk = ham"
             " that went through the bulk lane; bots: messages attempted and accepted a second; held = bot"
             " refusals held before their reply, busy = 'server busy' (both only under stress); seconds",
             f"{'config':9} {'shape':17} {'phase':7} {'c->250 p99':>10} {'c->mdir p50':>11} {'p99':>6} "
             f"{'max':>6} {'clear p99':>9} {'n ham':>5} {'4xx':>4} {'gave up':>7} {'bulk':>4} {'bot try/s':>9} "
             f"{'bot ok/s':>8} {'held':>5} {'busy':>5} {'disk max':>8}"]
    for config, shapes in report["results"].items():
        for shape, r in shapes.items():
            for phase, p in r["summary"]["phases"].items():
                if phase == "0-warmup":
                    continue
                mine = r["phases"][phase]
                h, b = p["ham"], p["bot"]
                failed = h["replies_4xx"] + h["refused"] + h["reset"] + h["timeout"] + h["other_errors"]
                lines.append(
                    f"{config:9} {shape:17} {phase[2:]:7} {fmt(_p(h, 'connect_to_250', 'p99')):>10} "
                    f"{fmt(_p(h, 'connect_to_maildir', 'p50')):>11} {fmt(_p(h, 'connect_to_maildir', 'p99')):>6} "
                    f"{fmt(_p(h, 'connect_to_maildir', 'max')):>6} {fmt(_p(mine, 'ham_clear_to_maildir', 'p99')):>9} "
                    f"{h['sent']:>5} {failed:>4} {h['failed']:>7} {mine['ham_mailbox_bulk']:>4} "
                    f"{b['attempted'] / p['seconds']:>9.0f} {p['accepted_per_s']['bot']:>8.0f} "
                    f"{mine['held_4xx']:>5} {mine['stress_replies']:>5} {fmt(_p(mine, 'disk', 'max')):>8}")
            during = r["summary"]["phases"].get("2-during", {})
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in sorted(during.get("cpu_s", {}).items(), key=lambda kv: -kv[1])
                            if v >= 0.1)
            lanes = r["phases"].get("2-during", {})
            lines.append(f"{config:9} {shape:17} flood-phase bot messages by lane: priority "
                         f"{lanes.get('bot_priority_lane', 0)}, bulk {lanes.get('bot_bulk_lane', 0)}, none (the naive "
                         f"worker's single queue) {lanes.get('bot_lane_unknown', 0)}")
            lines.append(f"{config:9} {shape:17} ledger: {r['ledger']}; ham p99 ratio (during/before) {r['ratio']}; "
                         f"ham senders known at the flood {r['ham_known']}/{s['ham_senders']}; spam drained "
                         f"{r['drain_s']} s after the flood; CPU s in the flood phase: {cpu}")
            if r.get("verified") and r.get("bot_priority_after_first_second") is not None:
                met, numbers = forged_target(r)
                lines.append(f"{config:9} {shape:17} issue 20 target (0 flood messages in the priority lane after the "
                             f"flood's first second, ham p99 during <= {TARGET_RATIO:g}x before and < "
                             f"{TARGET_P99_S:g} s): {'MET' if met else 'NOT MET'}; {numbers}")
            elif r.get("verified"):
                lines.append(f"{config:9} {shape:17} ingress verified senders (knotd); one queue, no lanes to keep "
                             f"the forgery out of; ham p99 ratio {r['ratio']}")
        any_shape = next(iter(shapes.values()), None)
        if any_shape is not None:
            ok = all(r["ok"] for r in shapes.values())
            lines.append(f"{config:9} {'every message in exactly one place' if ok else 'MAIL LOST OR DUPLICATED'}"
                         f" (mailbox, quarantine or dead-letter topic): {any_shape['summary']['config_ledger']}")
    for shape, why in report.get("skipped", {}).items():
        lines.append(f"{shape} skipped: {why}")
    return "\n".join(lines)
