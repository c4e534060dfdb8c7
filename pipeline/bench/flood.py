"""The flood scenario: does ham wait behind spam? (``make bench-flood``, and the end of ``make demo``)

One run, two configurations on the same traffic, one after the other on the same machine:

* ``floodgate``: the real topology, every worker its own process (admission at ingress to the
  inbound | bulk lanes, a classifier group per lane, deliver and cleanup apart);
* ``naive``: one consumer that classifies and then delivers or quarantines, in turn — the
  single queue of 2008.

First the pipeline's capacity is measured on this machine (mixed corpus mail through the
priority lane as fast as it goes). Then steady mixed mail runs at a quarter of that rate;
during the flood window spam arrives on top at 20× the base rate — five times capacity —
first as one campaign from a few bots, then as diverse spam from a few dozen; then recovery.
Every message's end-to-end latency (accepted at ingress → durably in a Maildir, or in the
quarantine) is measured, per phase, with consumer lag over time and the accounting of every
message. Results: ``reports/flood.json`` and ``reports/flood.png``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import shutil
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from models import corpus
from pipeline import kafka
from pipeline.admission import Admission
from pipeline.bench import accounting, traffic
from pipeline.core import config
from pipeline.core.config import Settings
from pipeline.core.service import freeze_start_up
from pipeline.kafka import topics
from pipeline.lag import LagMonitor
from pipeline.node import INGRESS_NICE, Node, take_priority
from pipeline.replay import client_address
from pipeline.sinks import from_iso, maildir, parse_trace, unstamp

REPORTS = Path("reports")
CALIBRATION_MESSAGES = 1500
LAG_SAMPLE_S = 0.5
DRAIN_TIMEOUT_S = 900.0
# Admission's floor sized to the lane it protects: one source may take up to this share of the
# priority lane's measured capacity before its rate can make it a flood (the operator's rule for
# ``admission.flood_rate``). The fixed 30/s default made the corpus's two busiest mailing lists
# (~15 % of its ham each) floods from their first seconds once a faster run put the base rate
# above 200/s, and a source diverted from the start never learns its usual rate.
SOURCE_SHARE = 0.1
# The disk probe: one small Maildir delivery this often, beside the Maildirs (DiskProbe).
DISK_PROBE_S = 0.1
DISK_PROBE_BYTES = 4096
# A probe write this slow means the disk stopped (its median is ~1 ms when idle, 0.1 s is a
# hundred times that): ham on its way through the pipeline meanwhile may have waited for the
# disk, whatever the flood did. The report's "clear p99" leaves those messages out, to tell the
# pipeline's own tail from the host's disk; the targets are judged on all ham. (A longer way is
# likelier to overlap a stop, whatever made it long, so it favours fast messages somewhat.)
DISK_STALL_S = 0.1


@dataclass
class Scenario:
    # Steady mail before the measured phases, not reported: a deployment has history (admission
    # knows each source's usual rate, reputation knows good senders); a bench starts cold.
    warmup_s: float = 15.0
    pre_s: float = 20.0
    flood_s: float = 20.0
    post_s: float = 20.0
    base_fraction: float = 0.25  # base rate = this × capacity
    flood_multiple: float = 20.0  # flood rate = this × base rate (= 5 × capacity)
    capacity: float | None = None  # messages/s; measured when None
    seed: int = 7


@dataclass
class ConfigResult:
    name: str
    ledger: str
    ok: bool
    lost: int
    duplicated: int
    phases: dict[str, dict[str, Any]]
    drain_s: float | None
    series: list[tuple[float, str, float]] = field(default_factory=list)  # (t, kind, latency)
    lag: list[tuple[float, str, int]] = field(default_factory=list)  # (t, group, lag)
    disk: list[tuple[float, float]] = field(default_factory=list)  # (t, seconds one durable write took)
    generator_behind_max_s: float = 0.0
    started_at: float = 0.0  # the wall clock at t = 0 of the series, to match worker logs (--keep)


def load_mail(data_dir: Path) -> tuple[list[corpus.Message], list[corpus.Message]]:
    """Held-out corpus mail (the newer groups: the model was trained on the older ones)."""
    msgs = list(corpus.load_spamassassin(data_dir, groups=("easy_ham_2", "spam_2")))
    return [m for m in msgs if m.label == "ham"], [m for m in msgs if m.label == "spam"]


def measure_capacity(settings: Settings, workers: Node, ham: list, spam: list) -> float:
    """Messages/s the priority path sustains here: a burst of mixed mail, timed to the last landing."""
    rng = random.Random(1)
    mixed = [(m, "ham") for m in ham] + [(m, "spam") for m in spam]
    rng.shuffle(mixed)
    plan = [traffic.Planned(0.0, m.raw, label, "calibration",
                            traffic.envelope_for(m.raw, rng, client=client_address(f"c{i}")))
            for i, (m, label) in enumerate(mixed[:CALIBRATION_MESSAGES])]
    producer = kafka.lane_producer(settings)
    start = time.time()
    inbound = settings.topic("inbound")
    sent = traffic.send(producer, lambda ev: inbound, plan)  # straight into the priority lane
    if accounting.wait_accounted(settings, set(sent.kinds), DRAIN_TIMEOUT_S) is None:
        raise RuntimeError("calibration did not finish")
    return len(plan) / (time.time() - start)


class LagSampler(threading.Thread):
    def __init__(self, settings: Settings, groups: list[str], t0: float) -> None:
        super().__init__(name="lag-sampler", daemon=True)
        self.monitor = LagMonitor(settings, groups)
        self.t0 = t0
        self.samples: list[tuple[float, str, int]] = []
        self.rows: list = []  # the latest sample, for a live view
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(LAG_SAMPLE_S):
            try:
                rows = self.monitor.sample()
            except Exception:  # a slow admin call must not end the benchmark
                continue
            self.rows = rows
            now = time.time() - self.t0
            per_group: dict[str, int] = {}
            for r in rows:
                per_group[r.group] = per_group.get(r.group, 0) + r.lag
            self.samples += [(round(now, 2), g, lag) for g, lag in per_group.items()]

    def view(self):  # type: ignore[no-untyped-def]
        """A per-group live table: Burrow-style status, lag in messages and seconds."""
        from rich.table import Table

        rows = self.rows
        status = self.monitor.status(rows) if rows else {}
        t = Table(title=f"consumer lag, t={time.time() - self.t0:5.1f} s")
        for col in ("group", "status", "lag (msgs)", "lag (s)"):
            t.add_column(col, justify="left" if col in ("group", "status") else "right")
        for group in self.monitor.groups:
            mine = [r for r in rows if r.group == group]
            secs = [r.lag_seconds for r in mine if r.lag_seconds is not None]
            st = status.get(group)
            t.add_row(group.split(".", 1)[-1], st.name if st is not None else "-", str(sum(r.lag for r in mine)),
                      f"{max(secs):.1f}" if secs else "-")
        return t

    def finish(self) -> list[tuple[float, str, int]]:
        self.stop.set()
        self.join(10)
        self.monitor.close()
        return self.samples


class DiskProbe(threading.Thread):
    """A control for the disk: one small Maildir delivery (write, fsync, link, fsync of ``new/``)
    every ``DISK_PROBE_S`` into a mailbox of its own on the Maildirs' filesystem, timed.

    What the probe waited for, every durable write on that disk waited for, whatever Floodgate's
    code did: a phase whose ham p99 is near the probe's max in that phase waited for the disk
    (its write cache, a shared or throttled virtual disk), not for the pipeline.
    """

    def __init__(self, mailbox: Path) -> None:
        super().__init__(name="disk-probe", daemon=True)
        self.mailbox = mailbox
        self.samples: list[tuple[float, float]] = []  # (wall time, seconds)
        self.stop = threading.Event()

    def run(self) -> None:
        data = b"X" * DISK_PROBE_BYTES
        maildir.ensure(self.mailbox)
        while not self.stop.wait(DISK_PROBE_S):
            started, t = time.time(), time.monotonic()
            maildir.deliver(self.mailbox, f"probe.{len(self.samples)}", data)
            self.samples.append((started, time.monotonic() - t))

    def finish(self) -> list[tuple[float, float]]:
        self.stop.set()
        self.join(10)
        return self.samples


def stall_windows(disk: list[tuple[float, float]], threshold: float = DISK_STALL_S) -> list[tuple[float, float]]:
    """(start, end) wall times of the probe writes that took longer than ``threshold``."""
    return [(started, started + seconds) for started, seconds in disk if seconds > threshold]


def clear_of(windows: list[tuple[float, float]], start: float, end: float) -> bool:
    """Did [start, end] (a message's way from acceptance to its mailbox) miss every window?"""
    return not any(a < end and b > start for a, b in windows)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def stats(values: list[float]) -> dict[str, Any]:
    return {"n": len(values),
            "p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
            "max": max(values) if values else None,
            "mean": statistics.fmean(values) if values else None}


# Starts a configuration's workers on a node; returns the consumer groups whose lag is sampled.
Starter = Callable[[Node, Settings], list[str]]


class Bed:
    """One configuration on private topics, Maildirs and a quarantine: its workers as processes
    (a :class:`Node`), and, once :meth:`measure` is called, consumer lag and the disk probe
    sampled from a clean page cache on. Made by :func:`testbed`."""

    def __init__(self, name: str, settings: Settings, workers: Node, workdir: Path) -> None:
        self.name, self.settings, self.workers, self.workdir = name, settings, workers, workdir
        self.groups: list[str] = []
        self.t0 = 0.0  # wall time of t = 0 of the lag samples
        self.sampler: LagSampler | None = None
        self.probe: DiskProbe | None = None
        self.lag: list[tuple[float, str, int]] = []  # (t, group, lag)
        self.disk: list[tuple[float, float]] = []  # (wall time, seconds one durable write took)

    def measure(self) -> None:
        """Start sampling. What an earlier configuration (or calibration, or run) left dirty in the
        page cache would be written back 30 s later, inside this one's measurement, and
        delivery's fsyncs would wait behind it: start from a clean page cache. This
        configuration's own writes are part of what is measured."""
        os.sync()
        freeze_start_up()  # the plan and the corpus: a full collection would walk them mid-flood
        self.t0 = time.time()
        self.sampler = LagSampler(self.settings, self.groups, self.t0)
        self.sampler.start()
        self.probe = DiskProbe(self.workdir / "disk-probe")  # beside the Maildirs: the same filesystem
        self.probe.start()

    def live(self, on: bool) -> contextlib.AbstractContextManager[Any]:
        """The live per-group lag table on the terminal while the body runs, when ``on``."""
        if not on or self.sampler is None:
            return contextlib.nullcontext()
        from rich.live import Live

        return Live(get_renderable=self.sampler.view, refresh_per_second=2)

    def stop(self) -> None:
        """Stop sampling and the workers (idempotent); the sinks are then still there to scan."""
        if self.sampler is not None:
            self.lag = self.sampler.finish()
            self.sampler = None
        if self.probe is not None:
            self.disk = self.probe.finish()
            self.probe = None
        self.workers.stop_all()


@contextlib.contextmanager
def testbed(name: str, base: Settings, workdir: Path, start_workers: Starter,
            settings: Callable[[Settings], Settings] | None = None) -> Iterator[Bed]:
    """A :class:`Bed` for configuration ``name`` under ``workdir/name``, its workers started by
    ``start_workers``; ``settings`` adjusts its settings first. Afterwards its topics are deleted."""
    own = config.private(base, f"{name}-", workdir / name)
    if settings is not None:
        own = settings(own)
    admin = kafka.admin(own)
    topics.apply(own, admin)
    bed = Bed(name, own, Node(own, workdir / name / "logs"), workdir / name)
    try:
        bed.groups = start_workers(bed.workers, own)
        yield bed
    finally:
        bed.stop()
        topics.delete(own, admin)


def run_config(name: str, base: Settings, scenario: Scenario, plan: list[traffic.Planned], workdir: Path,
               start_workers: Starter, admit: bool, live: bool = False) -> ConfigResult:
    with testbed(name, base, workdir, start_workers) as bed:
        settings = bed.settings
        # The generator plays the ingress: Floodgate admits each message to its lane; the naive
        # design has one queue for everything.
        admission = Admission(settings) if admit else None
        try:
            inbound = settings.topic("inbound")
            route = admission.topic if admission else (lambda ev: inbound)
            take_priority(INGRESS_NICE)  # the generator is the ingress here
            bed.measure()
            with bed.live(live):
                sent = traffic.send(kafka.lane_producer(settings), route, plan)
                accounting.wait_accounted(settings, set(sent.acked), DRAIN_TIMEOUT_S)
        finally:
            bed.stop()
            if admission:
                admission.close()
        t0, lag, disk = bed.t0, bed.lag, bed.disk
        found = accounting.scan(settings)
    ledger = accounting.reconcile(sent.acked, found)
    classified = classified_times(settings.paths.maildir_root)
    phase_of = _phases(scenario)
    series: list[tuple[float, str, float]] = []
    buckets: dict[str, dict[str, list[float]]] = {}
    last_spam = 0.0
    stalls = stall_windows(disk)
    for event_id in sent.kinds:
        accepted = sent.accepted[event_id]
        if event_id in found.delivered:
            landed, path = min(found.delivered[event_id]), "ham"
        elif event_id in found.quarantined:
            landed, path = found.quarantined[event_id], "spam"
            last_spam = max(last_spam, landed)
        else:
            continue
        latency = max(0.0, landed - accepted)
        # Plotted by what the message is (corpus truth) and where it went: legitimate ham
        # delivered, spam quarantined, spam the model missed (delivered), ham held as spam.
        kind = {("ham", "ham"): "ham", ("spam", "spam"): "spam", ("spam", "ham"): "missed spam",
                ("ham", "spam"): "held ham"}[(sent.labels[event_id], path)]
        series.append((round(accepted - t0, 3), kind, round(latency, 4)))
        phase = buckets.setdefault(phase_of(accepted - sent.start), {})
        phase.setdefault(path, []).append(latency)
        if path == "ham" and sent.labels[event_id] == "ham":
            # Legitimate mail (by the corpus's truth), and where its time went.
            phase.setdefault("legit_ham", []).append(latency)
            if clear_of(stalls, accepted, landed):
                phase.setdefault("legit_ham_clear", []).append(latency)
            if event_id in classified:
                when, lane = classified[event_id]
                phase.setdefault("legit_ham_queued", []).append(max(0.0, when - accepted))
                phase.setdefault("legit_ham_delivering", []).append(max(0.0, landed - when))
                if lane == "bulk":  # legitimate mail admission took for a flood
                    phase.setdefault("legit_ham_bulk", []).append(latency)
            if event_id in sent.acked:
                phase.setdefault("legit_ham_ingress", []).append(max(0.0, sent.acked[event_id] - accepted))
    for when, seconds in disk:
        buckets.setdefault(phase_of(when - sent.start), {}).setdefault("disk", []).append(seconds)
    flood_end = sent.start + scenario.warmup_s + scenario.pre_s + scenario.flood_s
    return ConfigResult(
        name=name, ledger=ledger.summary(), ok=ledger.ok, lost=len(ledger.lost), duplicated=len(ledger.duplicated),
        phases={ph: {path: stats(v) for path, v in paths.items()} for ph, paths in sorted(buckets.items())},
        drain_s=round(last_spam - flood_end, 2) if last_spam else None,
        series=series, lag=lag, disk=[(round(when - t0, 3), round(seconds, 4)) for when, seconds in disk],
        generator_behind_max_s=round(sent.behind_max_s, 3), started_at=t0,
    )


def classified_times(root: Path) -> dict[str, tuple[float, str]]:
    """Event id -> (classification time, lane), from the trace header deliver puts on each message."""
    out: dict[str, tuple[float, str]] = {}
    for path in root.glob("*/*/new/*.floodgate"):
        with path.open("rb") as f:
            head = f.read(512)
        headers, _ = unstamp(head + b"\n")
        trace = parse_trace(headers.get("x-floodgate-trace", ""))
        when = from_iso(trace.get("classified", ""))
        if when is not None and "event" in trace:
            out[trace["event"]] = (when, trace.get("lane", "?"))
    return out


def _phases(s: Scenario):  # type: ignore[no-untyped-def]
    def phase(t: float) -> str:
        if t < s.warmup_s:
            return "0-warmup"
        if t < s.warmup_s + s.pre_s:
            return "1-before"
        if t < s.warmup_s + s.pre_s + s.flood_s:
            return "2-during"
        return "3-after"
    return phase


def start_floodgate(workers: Node, settings: Settings) -> list[str]:
    workers.start_standard()
    return [settings.group(g) for g in ("classify-priority", "classify-bulk", "deliver", "deliver-bulk", "cleanup",
                                        "reputation")]


def start_naive(workers: Node, settings: Settings) -> list[str]:
    workers.start("naive", ["naive"], module="pipeline.bench")
    workers.wait_ready()
    return [settings.group("naive")]


def run(settings: Settings, scenario: Scenario, configs: tuple[str, ...] = ("floodgate", "naive"),
        out: Path = REPORTS, live: bool = False, keep: bool = False) -> dict[str, Any]:
    """Both configurations on one plan; ``keep`` leaves the work directory (each configuration's
    worker logs, Maildirs and quarantine) for inspection, its path in the report."""
    ham, spam = load_mail(settings.paths.data)
    workdir = Path(settings.paths.maildir_root).parent / f"flood-{uuid.uuid4().hex[:6]}"
    if scenario.capacity is None:
        cal = config.private(settings, "calibration-", workdir / "calibration")
        topics.apply(cal, kafka.admin(cal))
        workers = Node(cal, workdir / "calibration" / "logs")
        try:
            workers.start_standard()
            scenario.capacity = measure_capacity(cal, workers, ham, spam)
        finally:
            workers.stop_all()
            topics.delete(cal, kafka.admin(cal))
    floor = max(settings.admission.flood_rate, SOURCE_SHARE * scenario.capacity)
    settings = replace(settings, admission=replace(settings.admission, flood_rate=floor))
    base_rate = scenario.capacity * scenario.base_fraction
    flood_rate = base_rate * scenario.flood_multiple
    plan = traffic.plan(ham, spam, base_rate=base_rate, flood_rate=flood_rate,
                        pre_s=scenario.warmup_s + scenario.pre_s,
                        flood_s=scenario.flood_s, post_s=scenario.post_s, seed=scenario.seed)
    results = {}
    for name in configs:
        starter = start_floodgate if name == "floodgate" else start_naive
        results[name] = run_config(name, settings, scenario, plan, workdir, starter, admit=name == "floodgate",
                                   live=live)
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "scenario": {**scenario.__dict__, "base_rate": round(base_rate, 1), "flood_rate": round(flood_rate, 1),
                     "admission_floor": round(floor, 1),
                     "messages": len(plan)},
        "machine": {"cpu": _cpu(), "cores": _cores(), "python": platform.python_version()},
        **({"workdir": str(workdir)} if keep else {}),
        "results": {n: {k: v for k, v in r.__dict__.items() if k not in ("series", "lag", "disk")}
                    for n, r in results.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "flood.json").write_bytes(orjson.dumps(
        report | {"series": {n: {"latency": r.series, "lag": r.lag, "disk": r.disk} for n, r in results.items()}}))
    plot(results, scenario, out / "flood.png")
    return report


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def plot(results: dict[str, ConfigResult], s: Scenario, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(7 * len(results), 8), squeeze=False, sharex="col")
    for col, (name, r) in enumerate(results.items()):
        ax = axes[0][col]
        for verdict, color in (("spam", "tab:red"), ("missed spam", "tab:orange"), ("held ham", "tab:purple"),
                               ("ham", "tab:blue")):
            pts = [(t, lat) for t, p, lat in r.series if p == verdict]
            if pts:
                ax.scatter([t for t, _ in pts], [lat for _, lat in pts], s=2, c=color, label=verdict, alpha=0.5)
        scatter_disk(ax, r.disk)
        ax.set_yscale("log")
        ax.set_ylabel("end-to-end latency (s)")
        ax.set_title(f"{name}: latency by acceptance time")
        shade_flood(ax, s.warmup_s + s.pre_s, s.warmup_s + s.pre_s + s.flood_s, label="flood")
        ax.legend(loc="upper left")
        ax = axes[1][col]
        for group in sorted({g for _, g, _ in r.lag}):
            pts = [(t, lag) for t, g, lag in r.lag if g == group]
            ax.plot([t for t, _ in pts], [lag for _, lag in pts], label=group.split(".", 1)[-1])
        shade_flood(ax, s.warmup_s + s.pre_s, s.warmup_s + s.pre_s + s.flood_s)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("consumer lag (messages)")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def shade_flood(ax: Any, start: float, end: float, label: str | None = None) -> None:
    """The flood window on a plot over time."""
    ax.axvspan(start, end, color="orange", alpha=0.15, label=label)


def scatter_disk(ax: Any, disk: list[tuple[float, float]]) -> None:
    """The disk probe's writes (t, seconds) on a latency plot: what any durable write waited."""
    if disk:
        ax.scatter([t for t, _ in disk], [sec for _, sec in disk], s=4, c="black", marker="x",
                   label="one fsynced write (disk probe)", alpha=0.5)


def fmt(v: float | None) -> str:
    """Seconds in a summary table."""
    return "-" if v is None else f"{v:.3f}"


def summary(report: dict[str, Any]) -> str:
    s = report["scenario"]
    lines = ["", f"capacity {s['capacity']:.0f} msg/s; base {s['base_rate']} msg/s; flood {s['flood_rate']} msg/s "
             f"for {s['flood_s']:.0f} s; {s['messages']} messages; admission floor {s.get('admission_floor')} msg/s",
             "ham = legitimate mail delivered (corpus truth); ingress = accepted -> broker ack;"
             " queued = accepted -> classified; delivering = classified -> in the Maildir;"
             f" disk = one small fsynced Maildir write beside the Maildirs, every {DISK_PROBE_S} s;"
             f" clear = ham whose way overlapped no probe write over {DISK_STALL_S} s (a diagnostic:"
             " the targets are on all ham); seconds",
             f"{'config':10} {'phase':9} {'ham p50':>9} {'ham p99':>9} {'ham max':>9} {'clear p99':>9} "
             f"{'ingress p99':>11} {'queued p99':>10} {'delivering p99':>14} {'spam p50':>9} {'n ham':>6} "
             f"{'via bulk':>8} {'disk p99':>8} {'disk max':>8}"]
    for name, r in report["results"].items():
        for phase, paths in r["phases"].items():
            if phase == "0-warmup":
                continue
            h, sp, q = paths.get("legit_ham", {}), paths.get("spam", {}), paths.get("legit_ham_queued", {})
            ing, dlv = paths.get("legit_ham_ingress", {}), paths.get("legit_ham_delivering", {})
            disk, clear = paths.get("disk", {}), paths.get("legit_ham_clear", {})
            f = fmt
            lines.append(f"{name:10} {phase[2:]:9} {f(h.get('p50')):>9} {f(h.get('p99')):>9} {f(h.get('max')):>9} "
                         f"{f(clear.get('p99')):>9} {f(ing.get('p99')):>11} {f(q.get('p99')):>10} "
                         f"{f(dlv.get('p99')):>14} {f(sp.get('p50')):>9} "
                         f"{h.get('n', 0):>6} "
                         f"{paths.get('legit_ham_bulk', {}).get('n', 0):>8} "
                         f"{f(disk.get('p99')):>8} {f(disk.get('max')):>8}")
        lines.append(f"{name:10} accounting: {r['ledger']}; spam drained {r['drain_s']} s after the flood")
        verdict = "every message in exactly one place" if r["ok"] else "MAIL LOST OR DUPLICATED"
        lines.append(f"{name:10} {verdict} (mailbox, quarantine or dead-letter topic)")
    return "\n".join(lines)
