"""``floodgate run``: the workers of one host, each its own supervised process.

Postfix's master is the model: every worker is its own ``floodgate <worker>`` process with its
own metrics/health port, restartable alone; the node starts them, restarts any that exits or
dies (at once after a worker that ran a while, then with a doubling backoff while it keeps
failing, each restart logged), and on SIGTERM stops them all with SIGTERM and waits. A worker
that exits with code 75 (``EX_TEMPFAIL``) is asking for exactly that restart. The same
supervisor runs the workers of the demo, the benchmarks and the fault-injection runs.

Where systemd runs the workers instead, ``infra/systemd/`` has a unit per worker (with
``Restart=always``) and a target for the node; on Kubernetes, a Deployment per worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import config
from pipeline.core import log as logs
from pipeline.core.config import Settings

log = logs.get("node")

# The standard deployment: one process per job. Names are also instance ids (stable
# transactional ids, so a restarted worker fences its previous self at once).
STANDARD = {
    "classify-priority": ["classify", "--lane", "priority"],
    "classify-bulk": ["classify", "--lane", "bulk"],
    "deliver": ["deliver"],
    "deliver-bulk": ["deliver", "--lane", "bulk"],
    "cleanup": ["cleanup"],
    "reputation": ["reputation"],
}
# A whole node as ``floodgate run`` starts it: the ingress, the standard workers, the lag monitor,
# the web worker (the quarantine in a browser; it reads the quarantine file cleanup writes).
NODE = {"smtp": ["smtp"], **STANDARD, "lag": ["lag", "--serve"], "web": ["web"]}
# Workers a node runs only when named (``floodgate run -w NAME``): the report drain belongs where
# the mail store spools users' Junk moves (pipeline/reports/), usually not a Floodgate node.
OPTIONAL = {"report-drain": ["report-drain"]}
# CPU niceness per worker: the spam side yields the CPU to the ham side, so a flood that
# saturates the machine still leaves ham its share (the bulk lane and cleanup may fall behind;
# that is their job), and the priority lane is served first when it wakes (make bench-flood,
# 2 cores: flood-phase ham p99 over pre-flood p99 2.8-3.6x at 0, 2.0x at -10). The priority
# lane's workers sit above the broker and the ingress (-10), which do the flood's work too: at
# -20 their threads, librdkafka's included, no longer wait behind that work for a core
# (flood-phase ham p99 median 0.27 s vs 0.39 s over six interleaved pairs). They use a small
# share of a core at normal traffic, and what they do waits on the broker, so they cannot starve
# it for long. Raising priority needs CAP_SYS_NICE; without it `nice` warns in the worker's log
# and the worker runs at 0. On Kubernetes the same is done with separate deployments and CPU
# requests.
PRIORITY_LANE_NICE = -20
NICE = {"classify-priority": PRIORITY_LANE_NICE, "deliver": PRIORITY_LANE_NICE,
        "naive": PRIORITY_LANE_NICE,  # naive: the same share as the priority lane, for a fair comparison
        "classify-bulk": 10, "deliver-bulk": 10, "cleanup": 10, "reputation": 10,
        "report-drain": 10,  # feedback is for retraining: no hurry
        "web": 10}  # people's pages wait a few milliseconds more rather than ham
# The ingress (``floodgate smtp``; the flood bench's generator plays it) is on the priority path
# too: every message, flood or not, is admitted there, and a starved ingress falls behind and
# then releases its backlog as bursts that look like floods.
INGRESS_NICE = -10
NICE["smtp"] = INGRESS_NICE
# CPUs for the spam side (the workers NICE puts above 0). Niceness decides who runs first on a
# core, not where: at +10 the spam side still ran on every core, so during a flood a ham-path
# thread that woke could find its core busy with bulk work and wait for it to be preempted,
# and so could the broker's threads, which serve both lanes. Confined to the upper half of
# the host's CPUs (the last one on 2 cores), the spam side leaves the other half to the priority
# lane, the broker and the ingress, which may still use every core (flood bench, 2 cores, ten
# interleaved pairs: flood-phase ham p99 lower in 7, median 0.18 s vs 0.22 s unconfined; a modest
# gain). The cost is the spam side's: it drains a flood ~5 s later, and mixed mail, timed to the
# last message quarantined, goes through ~15 % slower on 2 cores (BENCHMARKS.md).
# ``FLOODGATE_SPAM_SIDE_CPUS`` overrides it: a CPU list as ``taskset -c`` takes it (``1``,
# ``2-3``), or ``all`` for no confinement. On Kubernetes the same is a CPU limit on the spam
# side's deployments, or exclusive cores for the priority lane (the static CPU manager policy).
SPAM_SIDE_CPUS_ENV = "FLOODGATE_SPAM_SIDE_CPUS"
_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")  # taskset -c: 1 or 2-3,5


def spam_side_cpus(available: set[int], spec: str | None = None) -> str | None:
    """The CPU list (``taskset -c`` syntax) the spam side is confined to, or None for none.

    ``spec`` is the operator's choice (``FLOODGATE_SPAM_SIDE_CPUS``); unset or ``auto``, the
    upper half of ``available`` (the CPUs this process may use), none on a single CPU."""
    spec = (spec or "auto").strip()
    if spec == "all":
        return None
    if spec != "auto":
        if not _CPU_LIST.fullmatch(spec):
            raise ValueError(f"{SPAM_SIDE_CPUS_ENV}={spec!r}: expected a CPU list such as 1 or 2-3,5, or all")
        return spec
    cpus = sorted(available)
    if len(cpus) < 2:
        return None
    return ",".join(str(c) for c in cpus[(len(cpus) + 1) // 2:])


def take_priority(nice: int) -> None:
    """Run this process (its current thread and the threads it starts from now) at ``nice``,
    if allowed (CAP_SYS_NICE for a negative value)."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
READY_TIMEOUT_S = 120.0
# Restart policy. A worker that ran at least STABLE_S before it exited is restarted at once (a
# crash, a watchdog exit, a SIGKILL: its lane must flow again); one that keeps exiting sooner
# waits RESTART_BACKOFF_S, doubling up to RESTART_BACKOFF_MAX_S (a missing model, a broken
# setting: retrying in a tight loop would only fill the log and burn a core).
STABLE_S = 30.0
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
WATCH_S = 0.1  # how often the supervisor looks at its children
STOP_TIMEOUT_S = 30.0
_PR_SET_PDEATHSIG = 1
# Looked up once here: loading a library in a child forked from a threaded process can deadlock.
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice), for a worker's metrics endpoint."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_ports(n: int) -> int:
    """The first of ``n`` consecutive ports free now, below the kernel's ephemeral range: for a
    server a test stops and starts again (a broker). In the ephemeral range, a client retrying the
    stopped server can be given the server's own port for its end and connect to itself (TCP's
    simultaneous open), and the restarted server then cannot bind it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(10_000, max(10_001, low - n))
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + n):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports below {low}")


def _die_with_parent() -> None:
    """In the child before exec: its own session (a terminal's Ctrl-C reaches the node, which
    stops the workers in order, not every worker at once), and SIGTERM when the thread that
    started it ends (the node's main thread or its supervisor), so that a killed node leaves
    no orphans (Linux; elsewhere only the new session)."""
    os.setsid()
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Worker:
    name: str
    argv: list[str]
    port: int
    log_path: Path | None  # None: the worker writes to the node's own stdout/stderr
    module: str = "pipeline.cli"  # run as ``python -m <module> <argv>``
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    wanted: bool = True  # False once stopped on purpose: the supervisor leaves it down
    killed: bool = False  # the current process was SIGKILLed by :meth:`Node.kill`
    backoff_s: float = 0.0
    restart_at: float | None = None  # when the supervisor starts it again

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path and self.log_path.exists() else ""


@dataclass(frozen=True)
class Exit:
    """A worker process that ended while it was wanted: a crash, a watchdog exit, a kill."""

    name: str
    code: int | None
    at: float
    ran_s: float
    killed: bool  # by Node.kill (fault injection), not on its own
    restart_in_s: float


class Node:
    """The workers of one host as child processes, supervised (see the module docstring)."""

    def __init__(self, settings: Settings, log_dir: Path | None, base_port: int | None = None,
                 supervise: bool = True) -> None:
        """``base_port``: the first worker's metrics/health port, the next ones following; None
        gives each worker a free port (tests and benches, which share the host with others)."""
        self.settings = settings
        self.log_dir = log_dir
        self.base_port = base_port
        self.supervise = supervise
        self.workers: dict[str, Worker] = {}
        self.exits: list[Exit] = []
        self.spam_cpus: str | None = None
        if shutil.which("taskset") and hasattr(os, "sched_getaffinity"):  # Linux (util-linux)
            self.spam_cpus = spam_side_cpus(os.sched_getaffinity(0), os.environ.get(SPAM_SIDE_CPUS_ENV))
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- starting ----------------------------------------------------------------------------
    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None,
              module: str = "pipeline.cli") -> Worker:
        with self._lock:
            worker = self.workers.get(name)
            if worker is None:
                log_path = self.log_dir / f"{name}.log" if self.log_dir else None
                port = free_port() if self.base_port is None else self.base_port + len(self.workers)
                worker = Worker(name, argv, port, log_path, module, extra_env or {})
                self.workers[name] = worker
            worker.wanted = True
            self._spawn(worker)
        if self.supervise and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="node-supervisor", daemon=True)
            self._watcher.start()
        return worker

    def _spawn(self, worker: Worker) -> None:
        env = os.environ | config.environment(self.settings) | {
            "FLOODGATE_INSTANCE": worker.name,
            "FLOODGATE_WORKER_METRICS_PORT": str(worker.port),
        } | worker.extra_env
        # ``nice -n`` is relative to this process's own niceness, which may have been raised.
        delta = NICE.get(worker.name, 0) - os.nice(0)
        wrapper = ["nice", "-n", str(delta)] if delta else []
        if NICE.get(worker.name, 0) > 0 and self.spam_cpus:
            # The wrapper sets the affinity before the worker starts any thread (librdkafka's
            # inherit it); setting it on the child's pid afterwards would race them.
            wrapper = ["taskset", "-c", self.spam_cpus, *wrapper]
        out = None
        if worker.log_path:
            worker.log_path.parent.mkdir(parents=True, exist_ok=True)
            out = worker.log_path.open("ab")
        try:
            worker.proc = subprocess.Popen([*wrapper, sys.executable, "-m", worker.module, *worker.argv], env=env,
                                           stdout=out, stderr=subprocess.STDOUT if out else None,
                                           stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        finally:
            if out:
                out.close()
        worker.started_at = time.monotonic()
        worker.killed = False
        worker.restart_at = None

    def start_standard(self, names: list[str] | None = None) -> None:
        for name in names or list(STANDARD):
            self.start(name, STANDARD[name])
        self.wait_ready()

    # -- supervision -------------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._closing.is_set():
            now = time.monotonic()
            with self._lock:
                for w in self.workers.values():
                    if not w.wanted or w.proc is None:
                        continue
                    if w.restart_at is None and w.proc.poll() is not None:
                        self._exited(w, now)
                    if w.restart_at is not None and now >= w.restart_at and not self._closing.is_set():
                        self._spawn(w)
                        log.info("worker restarted", extra={"worker": w.name, "pid": w.proc.pid})  # type: ignore[union-attr]
            self._closing.wait(WATCH_S)

    def _exited(self, w: Worker, now: float) -> None:
        ran = now - w.started_at
        if ran >= STABLE_S or w.killed:  # a crash after a good run, or a kill from outside: at once
            w.backoff_s = 0.0
        else:  # it keeps failing on its own: back off
            w.backoff_s = min(max(RESTART_BACKOFF_S, 2 * w.backoff_s), RESTART_BACKOFF_MAX_S)
        w.restart_at = now + w.backoff_s
        code = w.proc.returncode if w.proc else None
        self.exits.append(Exit(w.name, code, time.time(), round(ran, 1), w.killed, w.backoff_s))
        log.log(20 if w.killed else 40, "worker exited; restarting it",
                extra={"worker": w.name, "code": code, "ran_s": round(ran, 1), "restart_in_s": w.backoff_s,
                       "killed": w.killed})

    def crashes(self) -> list[Exit]:
        """Exits of wanted workers that nobody caused (not :meth:`kill`)."""
        return [e for e in self.exits if not e.killed]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until every wanted worker answers ``/readyz`` (one the supervisor is restarting is
        waited for; without supervision a worker that exits is an error)."""
        deadline = time.monotonic() + timeout
        pending = [w for w in self.workers.values() if w.wanted]
        while pending:
            for w in list(pending):
                if not w.alive() and not self.supervise:
                    raise RuntimeError(f"worker {w.name} exited with {w.proc.returncode if w.proc else '?'}:\n"
                                       + w.log_tail())
                if w.alive() and w.ready():
                    pending.remove(w)
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout:.0f}s: {[w.name for w in pending]}\n"
                                   + "\n".join(f"{w.name}: {w.log_tail(1500)}" for w in pending))
            time.sleep(0.1)  # polling interval of a deadline-bounded wait

    # -- stopping, killing -------------------------------------------------------------------
    def signal(self, name: str, sig: int = signal.SIGTERM) -> None:
        w = self.workers[name]
        if w.alive():
            w.proc.send_signal(sig)  # type: ignore[union-attr]

    def stop(self, name: str, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Stop one worker on purpose (it stays down): SIGTERM once, then wait; SIGKILL after
        ``timeout``. Returns the exit code."""
        with self._lock:
            self.workers[name].wanted = False
        self.signal(name, signal.SIGTERM)
        return self._wait(name, timeout)

    def _wait(self, name: str, timeout: float) -> int | None:
        # Never signal twice: a second SIGTERM that lands while the interpreter is exiting
        # (handlers already reset) would kill a worker that was shutting down cleanly.
        w = self.workers[name]
        if w.proc is None:
            return None
        try:
            return w.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            return w.proc.wait()

    def kill(self, name: str) -> None:
        """SIGKILL one worker (fault injection): a crash, which the supervisor answers."""
        with self._lock:
            w = self.workers[name]
            if w.alive():
                w.killed = True
                w.proc.kill()  # type: ignore[union-attr]
                w.proc.wait()  # type: ignore[union-attr]

    def restart(self, name: str) -> Worker:
        """Make sure the worker runs: start it now if it is down (and wanted again)."""
        with self._lock:
            w = self.workers[name]
            w.wanted = True
            if not w.alive():
                self._spawn(w)
            return w

    def stop_all(self, timeout: float = STOP_TIMEOUT_S) -> dict[str, int | None]:
        self._closing.set()
        with self._lock:
            for w in self.workers.values():
                w.wanted = False
        if self._watcher is not None:
            self._watcher.join()
            self._watcher = None
        for name in self.workers:
            self.signal(name, signal.SIGTERM)
        return {name: self._wait(name, timeout) for name in self.workers}


def run(settings: Settings, names: list[str], base_port: int, log_dir: Path | None) -> int:
    """``floodgate run``: start ``names`` (keys of :data:`NODE` or :data:`OPTIONAL`), supervise them until SIGTERM or
    SIGINT, then stop them all. Returns 0 when every worker stopped cleanly."""
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stopping.set())
    node = Node(settings, log_dir, base_port=base_port)
    for name in names:
        node.start(name, (NODE | OPTIONAL)[name])
    log.info("node started", extra={"workers": {n: w.port for n, w in node.workers.items()}})
    stopping.wait()
    log.info("stopping the node")
    codes = node.stop_all()
    log.info("node stopped", extra={"exit_codes": codes})
    return 0 if all(c == 0 for c in codes.values()) else 1
