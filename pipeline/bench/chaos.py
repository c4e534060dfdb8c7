"""``python -m pipeline.bench chaos`` (``make chaos``): a long run of corpus mail through the standard workers
while faults are injected on a schedule, then the accounting of every acknowledged message.

Faults, one at a time, each followed by its recovery and a quiet gap:

* ``kill:<worker>``: SIGKILL of a classify-priority, classify-bulk, deliver or cleanup worker,
  restarted at once (as an orchestrator's restart policy would);
* ``maildir-down``: the delivery target unavailable for ``outage_s``: the Maildir root is
  atomically swapped with a plain file (as root, ``chmod`` would not stop a write), so every
  write fails with an OS error, which deliver must treat as transient and retry;
* ``broker-restart`` (one broker) / ``broker-kill`` (three brokers): SIGKILL of a broker node,
  started again after ``broker_down_s``.

The brokers are private local clusters (``infra/kafka/broker.py --nodes N``), never the shared
broker: one node (``chaos1``, ports 19192+) and three nodes (``chaos``, ports 19092+, topics
with replication factor 3 and min ISR 2).

Recovery time of a fault: from the fault until every affected consumer group has committed
past the log end (last stable offset) its input partitions had when the fault was undone (the
worker restarted, the store back, the broker started) — the stalled group has resumed and
cleared what queued meanwhile. Lost and duplicated messages are counted overall (every
acknowledged message in exactly one of a mailbox, the quarantine, the dead-letter topic) and
per fault kind for the messages accepted between its faults and their recoveries.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import OffsetSpec

from pipeline import kafka, lag
from pipeline.admission import Admission
from pipeline.bench import accounting, traffic
from pipeline.bench.flood import load_mail
from pipeline.classify import OUT_TOPICS
from pipeline.core import config
from pipeline.core.config import Settings
from pipeline.kafka import topics
from pipeline.lag import GROUP_INPUTS
from pipeline.node import STANDARD, Node

REPORTS = Path("reports")
BROKER = [sys.executable, str(config.ROOT / "infra" / "kafka" / "broker.py")]
# Private clusters: (state name, first port). The three-node one is `make cluster-up`'s.
CLUSTERS = {1: ("chaos1", 19192), 3: ("chaos", 19092)}
# The workers whose mail is accounted for (the reputation stage keeps advisory counts), with
# their groups' input topics (topic keys). The classifiers write their outputs in transactions.
INPUTS = {w: keys for w, keys in GROUP_INPUTS.items() if w in STANDARD and w != "reputation"}
# Topics written in transactions (classify's outputs, both lanes): a commit marker can be the last
# offset of a partition, so a group that read everything commits one short of the end there.
TRANSACTIONAL = {key for keys in OUT_TOPICS.values() for key in keys}
POLL_S = 0.5  # polling interval of the deadline-bounded waits below
DRAIN_TIMEOUT_S = 600.0
ADMIN_TIMEOUT_S = 5.0
OFFSET_BEGINNING = -2  # librdkafka's logical offset: the partition's first record
RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically (Linux 3.15+, glibc 2.28+)
AT_FDCWD = -100


@dataclass
class Plan:
    messages: int = 100_000
    rate: float = 200.0  # msg/s offered: below capacity, so each fault's backlog can drain
    brokers: int = 1
    outage_s: float = 10.0  # how long the delivery target stays down
    broker_down_s: float = 10.0  # how long a killed broker stays down
    warmup_s: float = 5.0
    gap_s: float = 5.0  # quiet time between one fault's recovery and the next fault
    recovery_timeout_s: float = 180.0
    seed: int = 7
    faults: tuple[str, ...] = ()  # these first, in order; then the standard cycle while mail flows
    cycle: bool = True


@dataclass
class Fault:
    kind: str
    target: str
    at: float  # wall clock, comparable with events' accepted_at
    restored_at: float = 0.0
    recovered_at: float | None = None
    behind: list[str] = field(default_factory=list)  # groups not caught up when it timed out

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else round(self.recovered_at - self.at, 2)


@dataclass
class RunResult:
    brokers: int
    plan: dict[str, Any]
    faults: list[Fault]
    ledger: accounting.Ledger
    sent: traffic.Sent
    found: accounting.Found
    crashes: list[str] = field(default_factory=list)  # workers that died without being killed
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    duration_s: float = 0.0
    drain_s: float | None = None


# -- brokers -----------------------------------------------------------------------------
class LocalCluster:
    """``infra/kafka/broker.py --nodes N``: a private cluster this run may crash at will."""

    def __init__(self, nodes: int) -> None:
        self.nodes = nodes
        self.name, self.port = CLUSTERS[nodes]
        self.started_here = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*BROKER, "--nodes", str(self.nodes), "--name", self.name, "--port", str(self.port),
                               *args], check=check, capture_output=True, text=True)

    def up(self) -> str:
        self.started_here = self._run("status", check=False).returncode != 0
        self._run("up")
        return self.bootstrap()

    def bootstrap(self) -> str:
        return self._run("bootstrap").stdout.strip()

    def kill(self, node: int) -> None:
        self._run("kill", str(node))

    def start(self, node: int) -> None:
        self._run("start", str(node))

    def down(self) -> None:
        if self.started_here:
            self._run("down", check=False)


@contextlib.contextmanager
def replication(brokers: int) -> Iterator[None]:
    """The topic spec's replication for this cluster (what ``make topics`` reads from the environment)."""
    saved = {k: os.environ.get(k) for k in ("FLOODGATE_REPLICATION_FACTOR", "FLOODGATE_MIN_INSYNC")}
    os.environ["FLOODGATE_REPLICATION_FACTOR"] = str(min(brokers, 3))
    os.environ["FLOODGATE_MIN_INSYNC"] = str(min(brokers, 2))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- the delivery target -------------------------------------------------------------------
class MaildirOutage:
    """Make the Maildir root unusable and back, atomically, with no window where deliver could
    recreate an empty root: ``renameat2(RENAME_EXCHANGE)`` swaps the root and a plain file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blocker = root.with_name(root.name + ".unavailable")
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _swap(self) -> None:
        rc = self._libc.renameat2(AT_FDCWD, str(self.root).encode(), AT_FDCWD, str(self.blocker).encode(),
                                  RENAME_EXCHANGE)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"renameat2 exchange {self.root} <-> {self.blocker}: {os.strerror(err)}")

    def down(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.blocker.write_text("the Maildir store is unavailable (fault injection)\n")
        self._swap()

    def up(self) -> None:
        self._swap()
        self.blocker.unlink()


# -- offsets -------------------------------------------------------------------------------
class Progress:
    """Committed offsets of the workers' groups against the log ends of their inputs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.admin = kafka.admin(settings)
        self.inputs = {w: [settings.topic(k) for k in keys] for w, keys in INPUTS.items()}
        self.transactional = {settings.topic(k) for k in TRANSACTIONAL}
        self._parts: dict[str, list[int]] = {}
        self._probes: dict[str, Consumer] = {}
        self._reader: Consumer | None = None
        self.behind: list[str] = []
        self.why: dict[str, str] = {}  # worker -> why it counted as behind at its last check

    def _partitions(self, topic: str) -> list[int]:
        if topic not in self._parts:
            meta = self.admin.list_topics(topic, timeout=ADMIN_TIMEOUT_S).topics[topic]
            self._parts[topic] = sorted(meta.partitions)
        return self._parts[topic]

    def ends(self, workers: list[str]) -> dict[tuple[str, int], int] | None:
        """Last stable offsets of the workers' inputs; None while the cluster cannot answer."""
        try:
            tps = {TopicPartition(t, p): OffsetSpec.latest()
                   for w in workers for t in self.inputs[w] for p in self._partitions(t)}
            futures = self.admin.list_offsets(tps, isolation_level=IsolationLevel.READ_COMMITTED,
                                              request_timeout=ADMIN_TIMEOUT_S)
            return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}
        except KafkaException:
            # After a broker of three was killed and restarted, one admin client kept failing for
            # minutes while the pipeline had long drained: start afresh instead of trusting it.
            self.admin = kafka.admin(self.settings)
            return None

    def committed(self, worker: str) -> dict[tuple[str, int], int]:
        """The group's committed offsets, read by a consumer of that group that never subscribes.
        (Not AdminClient.list_consumer_group_offsets: in librdkafka 2.16 an admin client's
        OffsetFetch answered NOT_COORDINATOR — the coordinator moving in a broker restart —
        dereferences a NULL consumer-group handle and kills the process.)"""
        group = self.settings.group(worker)
        if group not in self._probes:
            self._probes[group] = kafka.consumer(self.settings, group)
        tps = [TopicPartition(t, p) for t in self.inputs[worker] for p in self._partitions(t)]
        answer = self._probes[group].committed(tps, timeout=ADMIN_TIMEOUT_S)
        failed = [tp.error for tp in answer if tp.error]
        if failed:
            # A partition the probe could not read (a coordinator that moved): raised, so that
            # caught_up starts a fresh probe, rather than read as "never committed" (a group
            # judged behind for as long as this probe keeps its stale coordinator).
            raise KafkaException(failed[0])
        return {(tp.topic, tp.partition): tp.offset for tp in answer}

    def close(self) -> None:
        for c in self._probes.values():
            c.close()
        if self._reader is not None:
            self._reader.close()

    def caught_up(self, worker: str, target: dict[tuple[str, int], int]) -> bool:
        try:
            committed = self.committed(worker)
        except KafkaException as e:
            probe = self._probes.pop(self.settings.group(worker), None)  # start afresh next time
            if probe is not None:
                probe.close()
            self.why[worker] = f"committed offsets unreadable: {e}"
            return False
        short: dict[tuple[str, int], int] = {}
        for (topic, part), end in target.items():
            if topic not in self.inputs[worker]:
                continue
            slack = 1 if topic in self.transactional else 0  # a commit marker may hold the last offset
            if end > 0 and committed.get((topic, part), -1) < end - slack:
                if topic not in self.transactional:
                    self.why[worker] = f"{topic}[{part}] committed {committed.get((topic, part))} < end {end}"
                    return False
                short[(topic, part)] = committed.get((topic, part), OFFSET_BEGINNING)
        # On a transactional topic a group cannot commit past records it is never given: a
        # transaction aborted by a broker fault leaves aborted records and a second marker at the
        # end of a partition (or is all a partition ever got: then the group never commits it),
        # and with no mail after them the group's commit stays two or more short of the end for
        # good. Caught up, then, means nothing readable is left from the committed offset on (as
        # `floodgate lag` counts it).
        if not short:
            return True
        found = self._readable(short, target)
        if found:
            self.why[worker] = found
            return False
        return True

    def _readable(self, starts: dict[tuple[str, int], int], ends: dict[tuple[str, int], int]) -> str:
        """What a read_committed reader finds from each start up to its end: "" when nothing, else
        the first record the group has not committed, or the partitions that gave no answer."""
        if self._reader is None:
            self._reader = kafka.consumer(self.settings, self.settings.group("chaos-reader"), **lag.PROBE)
        self._reader.assign([TopicPartition(t, p, o) for (t, p), o in starts.items()])
        pending = set(starts)
        deadline = time.monotonic() + ADMIN_TIMEOUT_S
        try:
            while pending and time.monotonic() < deadline:
                for msg in self._reader.consume(len(starts), timeout=0.1):
                    key = (msg.topic(), msg.partition())
                    err = msg.error()
                    if err is None and msg.offset() < ends[key]:
                        return (f"{key[0]}[{key[1]}] record at {msg.offset()} after committed {starts[key]} "
                                f"(end {ends[key]})")
                    if err is None or err.code() == KafkaError._PARTITION_EOF:
                        pending.discard(key)
        finally:
            self._reader.unassign()
        if not pending:
            return ""
        # No record and no end of partition within the timeout: the reader, not the group, may be
        # what is stuck (a client that kept a dead broker's view, as the committed-offset probe
        # did): the next check starts a fresh one, and this one counts as behind meanwhile.
        self._reader.close()
        self._reader = None
        return "reader had no answer for " + ", ".join(f"{t}[{p}] from {starts[(t, p)]}" for t, p in sorted(pending))

    def wait(self, workers: list[str], target: dict[tuple[str, int], int] | None, timeout: float,
             tick: Callable[[], None] = lambda: None) -> float | None:
        """When every worker's group had committed past ``target``; None at the deadline.
        ``tick`` runs at every poll (the supervisor's round)."""
        deadline = time.monotonic() + timeout
        self.behind = list(workers)
        self.why = {}
        while time.monotonic() < deadline:
            tick()
            if target is None:
                target = self.ends(workers)
            else:
                self.behind = [w for w in workers if not self.caught_up(w, target)]
                if not self.behind:
                    return time.time()
            time.sleep(POLL_S)
        return None  # self.behind: the groups still behind (or unreadable) at the deadline


# -- the run -------------------------------------------------------------------------------
def steady(ham: list, spam: list, n: int, rate: float, seed: int) -> list[traffic.Planned]:
    rng = random.Random(seed)
    mixed = [(m, "ham") for m in ham] + [(m, "spam") for m in spam]
    rng.shuffle(mixed)
    return [traffic.Planned(i / rate, mixed[i % len(mixed)][0].raw, mixed[i % len(mixed)][1], "base",
                            traffic.envelope_for(mixed[i % len(mixed)][0].raw, rng)) for i in range(n)]


def standard_cycle(brokers: int) -> list[str]:
    broker = "broker-restart" if brokers == 1 else "broker-kill"
    return [*(f"kill:{w}" for w in INPUTS), "maildir-down", broker]


class Chaos:
    def __init__(self, settings: Settings, plan: Plan, workers: Node, cluster: LocalCluster | None,
                 rng: random.Random, log=print) -> None:  # type: ignore[no-untyped-def]
        self.settings = settings
        self.plan = plan
        self.workers = workers
        self.cluster = cluster
        self.rng = rng
        self.progress = Progress(settings)
        self.outage = MaildirOutage(settings.paths.maildir_root)
        self.faults: list[Fault] = []
        self.crashes: list[str] = []
        self.log = log

    def supervise(self) -> None:
        """Note every worker that died without being killed (the node's supervisor restarts it,
        as it would in production): a finding. Exit code 75 is a worker's watchdog asking for a
        restart."""
        crashes = self.workers.crashes()
        for e in crashes[len(self.crashes):]:
            tail = self.workers.workers[e.name].log_tail(1500)
            self.crashes.append(f"{e.name} exited with {e.code} at {e.at:.1f}: {tail}")
            self.log(f"  !! {e.name} exited on its own (exit {e.code}); the node restarts it in {e.restart_in_s:g} s")

    def inject(self, kind: str) -> Fault:
        all_workers = list(INPUTS)
        self.log(f"  {kind} ...")
        if kind.startswith("kill:"):
            name = kind.split(":", 1)[1]
            fault = Fault(kind, name, time.time())
            self.workers.kill(name)  # the node's supervisor restarts it
            self.workers.wait_ready()
            fault.restored_at = time.time()
            waiting = [name]
        elif kind == "maildir-down":
            deliverers = [w for w in INPUTS if w.startswith("deliver")]
            fault = Fault(kind, str(self.outage.root), time.time())
            self.outage.down()
            time.sleep(self.plan.outage_s)  # the length of the outage, not synchronisation
            self.outage.up()
            fault.restored_at = time.time()
            waiting = deliverers
        elif kind in ("broker-restart", "broker-kill"):
            assert self.cluster is not None
            node = self.rng.randint(1, self.cluster.nodes)
            fault = Fault(kind, f"node {node}", time.time())
            self.cluster.kill(node)
            time.sleep(self.plan.broker_down_s)  # the length of the outage, not synchronisation
            self.cluster.start(node)
            fault.restored_at = time.time()
            waiting = all_workers
        else:
            raise ValueError(f"unknown fault {kind!r}")
        # Recovered: the groups have committed past the log end their inputs had when the fault
        # was undone (worker restarted, store back, broker started): what queued meanwhile is done.
        fault.recovered_at = self.progress.wait(waiting, None, self.plan.recovery_timeout_s, tick=self.supervise)
        if fault.recovered_at is None:
            fault.behind = [f"{w} ({self.progress.why[w]})" if w in self.progress.why else w
                            for w in self.progress.behind]
        self.faults.append(fault)
        self.log(f"  {kind:24} {fault.target:18} recovered in "
                 f"{fault.recovery_s if fault.recovery_s is not None else 'NOT RECOVERED'} s"
                 + (f" (still behind: {', '.join(fault.behind)})" if fault.behind else ""))
        return fault

    def schedule(self, sender: threading.Thread) -> None:
        """The listed faults first, then the standard cycle in random order while mail flows."""
        sender.join(self.plan.warmup_s)
        for kind in self.plan.faults:
            self.inject(kind)
            self.supervise()
            sender.join(self.plan.gap_s)
        if not self.plan.cycle:
            return
        broker_ok = self.cluster is not None
        while sender.is_alive():
            cycle = [k for k in standard_cycle(self.plan.brokers) if broker_ok or not k.startswith("broker")]
            self.rng.shuffle(cycle)
            for kind in cycle:
                if not sender.is_alive():
                    break
                self.inject(kind)
                self.supervise()
                sender.join(self.plan.gap_s)


def run_one(base: Settings, plan: Plan, workdir: Path, log=print,  # type: ignore[no-untyped-def]
            own_cluster: bool = True, base_port: int | None = None) -> RunResult:
    """One run. ``own_cluster``: on a private local cluster of ``plan.brokers`` nodes (broker
    faults included); otherwise on ``base``'s brokers, which are never touched (no broker faults),
    as is the case wherever ``KAFKA_BOOTSTRAP_SERVERS`` names a cluster."""
    external = bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")) or not own_cluster
    cluster = None if external else LocalCluster(plan.brokers)
    bootstrap = cluster.up() if cluster else base.kafka.bootstrap_servers
    settings = config.private(base, f"chaos{plan.brokers}-", workdir, bootstrap=bootstrap)
    admin = kafka.admin(settings)
    # Workers inherit the replication settings: Faust sizes its internal topics from them.
    stack = contextlib.ExitStack()
    stack.enter_context(replication(plan.brokers))
    topics.apply(settings, admin)
    workers = Node(settings, workdir / "logs", base_port=base_port)
    admission: Admission | None = None
    rng = random.Random(plan.seed)
    chaos: Chaos | None = None
    try:
        log(f"{plan.brokers} broker(s) at {bootstrap}: {plan.messages} messages at {plan.rate:.0f} msg/s")
        workers.start_standard()
        ham, spam = load_mail(settings.paths.data)
        planned = steady(ham, spam, plan.messages, plan.rate, plan.seed)
        admission = Admission(settings)
        result: dict[str, traffic.Sent] = {}
        route = admission.topic
        sender = threading.Thread(name="traffic", daemon=True, target=lambda: result.update(
            sent=traffic.send(kafka.lane_producer(settings), route, planned, source="chaos")))
        t0 = time.time()
        sender.start()
        chaos = Chaos(settings, plan, workers, cluster, rng, log)
        chaos.schedule(sender)
        sender.join()
        duration = time.time() - t0
        sent = result["sent"]
        log(f"  traffic done: {len(sent.acked)} of {len(sent.kinds)} acknowledged in {duration:.0f} s; draining")
        found = accounting.wait_accounted(settings, set(sent.acked), DRAIN_TIMEOUT_S)
        drain = time.time() - t0 - duration if found is not None else None
        chaos.supervise()
    finally:
        codes = workers.stop_all()
        if chaos is not None:
            chaos.progress.close()
        if admission:
            admission.close()
        stack.close()
        if sys.exc_info()[0] is not None and cluster:
            cluster.down()  # interrupted: leave nothing running
    found = accounting.scan(settings)
    ledger = accounting.reconcile(sent.acked, found)
    with contextlib.suppress(Exception):
        topics.delete(settings, admin)
    if cluster:
        cluster.down()
    return RunResult(plan.brokers, plan.__dict__ | {"bootstrap": bootstrap}, chaos.faults, ledger, sent, found,
                     chaos.crashes, codes, round(duration, 1), None if drain is None else round(drain, 1))


# -- the report ----------------------------------------------------------------------------
def by_kind(r: RunResult) -> dict[str, dict[str, Any]]:
    lost, dup = set(r.ledger.lost), set(r.ledger.duplicated)
    out: dict[str, dict[str, Any]] = {}
    for f in r.faults:
        kind = f.kind.replace("kill:", "kill ")
        k = out.setdefault(kind, {"count": 0, "recovery_s": [], "not_recovered": 0, "messages_in_window": 0,
                                  "lost": 0, "duplicated": 0})
        k["count"] += 1
        if f.recovery_s is None:
            k["not_recovered"] += 1
        else:
            k["recovery_s"].append(f.recovery_s)
        end = f.recovered_at or time.time()
        window = {i for i in r.sent.acked if f.at <= r.sent.accepted[i] <= end}
        k["messages_in_window"] += len(window)
        k["lost"] += len(window & lost)
        k["duplicated"] += len(window & dup)
    for k in out.values():
        rec = k["recovery_s"]
        k["recovery_max_s"] = max(rec) if rec else None
        k["recovery_mean_s"] = round(sum(rec) / len(rec), 2) if rec else None
    return out


def report(results: list[RunResult], command: str) -> dict[str, Any]:
    from pipeline.bench.flood import _cores, _cpu

    return {
        "command": command,
        "machine": {"cpu": _cpu(), "cores": _cores(), "python": platform.python_version(),
                    "load_average": [round(x, 2) for x in os.getloadavg()]},
        "runs": {f"{r.brokers}-broker": {
            "plan": r.plan, "duration_s": r.duration_s, "drain_s": r.drain_s,
            "sent": len(r.sent.kinds), "acked": len(r.sent.acked),
            "placed": dict(r.ledger.placed), "lost": len(r.ledger.lost), "duplicated": len(r.ledger.duplicated),
            "lost_ids": r.ledger.lost[:50], "duplicated_ids": r.ledger.duplicated[:50],
            "unexpected": r.ledger.unexpected, "worker_crashes": r.crashes, "exit_codes": r.exit_codes,
            "faults": by_kind(r),
            "timeline": [{"kind": f.kind, "target": f.target, "at": round(f.at - r.sent.start, 2),
                          "restored_after_s": round(f.restored_at - f.at, 2), "recovery_s": f.recovery_s,
                          "behind_at_timeout": f.behind}
                         for f in r.faults],
        } for r in results},
    }


def summary(rep: dict[str, Any]) -> str:
    lines = []
    for name, run in rep["runs"].items():
        lines.append(f"{name}: {run['acked']} acknowledged of {run['sent']} in {run['duration_s']} s "
                     f"(drained {run['drain_s']} s later); placed {run['placed']}; lost {run['lost']}, "
                     f"duplicated {run['duplicated']}; workers that died on their own: {len(run['worker_crashes'])}")
        lines.append(f"  {'fault':24} {'count':>5} {'recovery mean/max (s)':>22} {'msgs in window':>15} "
                     f"{'lost':>5} {'dup':>5}")
        for kind, k in sorted(run["faults"].items()):
            rec = f"{k['recovery_mean_s']}/{k['recovery_max_s']}" + (f" ({k['not_recovered']} not)"
                                                                    if k["not_recovered"] else "")
            lines.append(f"  {kind:24} {k['count']:>5} {rec:>22} {k['messages_in_window']:>15} "
                         f"{k['lost']:>5} {k['duplicated']:>5}")
    return "\n".join(lines)


SECTION_START = "<!-- chaos:start -->"
SECTION_END = "<!-- chaos:end -->"


def markdown(rep: dict[str, Any]) -> str:
    """The BENCHMARKS.md section: command, machine, and per run the accounting and each fault kind."""
    m = rep["machine"]
    lines = [SECTION_START, "## Chaos: faults injected into a long run", "",
             f"Command: `{rep['command']}` · Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; "
             f"load average at the end {m['load_average']} (a shared machine)", "",
             "Recovery: from the fault until every affected consumer group has committed past the log end its "
             "inputs had when the fault was undone (worker restarted, store back, broker started). Lost and "
             "duplicated: among the messages the broker acknowledged (all of them, and those accepted between "
             "each fault and its recovery).", ""]
    for name, run in rep["runs"].items():
        plan = run["plan"]
        lines += [f"### {name}: {run['acked']:,} of {run['sent']:,} messages acknowledged at {plan['rate']:.0f} msg/s "
                  f"in {run['duration_s']} s (bootstrap {plan['bootstrap']})", "",
                  f"Placed: {', '.join(f'{k} {v:,}' for k, v in sorted(run['placed'].items()))}; "
                  f"**lost {run['lost']}, duplicated {run['duplicated']}**; drained {run['drain_s']} s after the "
                  f"last message; workers that died without being killed: {len(run['worker_crashes'])}; exit codes "
                  f"on SIGTERM: {sorted(set(run['exit_codes'].values()), key=str)}", "",
                  "| fault | count | recovery mean (s) | recovery max (s) | not recovered | msgs in window | lost "
                  "| duplicated |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for kind, k in sorted(run["faults"].items()):
            lines.append(f"| {kind} | {k['count']} | {k['recovery_mean_s']} | {k['recovery_max_s']} | "
                         f"{k['not_recovered']} | {k['messages_in_window']:,} | {k['lost']} | {k['duplicated']} |")
        lines.append("")
    return "\n".join([*lines, SECTION_END]) + "\n"


def run(base: Settings, plans: list[Plan], out: Path = REPORTS, command: str = "python -m pipeline.bench chaos",
        log=print, benchmarks: Path | None = None) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    faulthandler.enable()  # a crash in a native client library still shows where Python was
    # SIGTERM unwinds like Ctrl-C: workers stopped, topics deleted, clusters stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    workdir = Path(base.paths.maildir_root).parent / f"chaos-{uuid.uuid4().hex[:6]}"
    results = []
    try:
        for plan in plans:
            results.append(run_one(base, plan, workdir / f"{plan.brokers}-broker", log))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rep = report(results, command)
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_bytes(orjson.dumps(rep, option=orjson.OPT_INDENT_2))
    if benchmarks is not None:
        from models.bench import write_section

        write_section(benchmarks, markdown(rep))
    return rep
