"""Run Floodgate's workers as separate processes, the way an operator deploys them.

Used by the demo, the flood benchmark and end-to-end tests: each worker is its own
``floodgate <worker>`` process with its own metrics/health port, restartable alone, stopped
with SIGTERM (or killed with SIGKILL by fault-injection tests).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import config
from pipeline.core.config import Settings

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
        "classify-bulk": 10, "deliver-bulk": 10, "cleanup": 10, "reputation": 10}
# The ingress (``floodgate smtp``; the flood bench's generator plays it) is on the priority path
# too: every message, flood or not, is admitted there, and a starved ingress falls behind and
# then releases its backlog as bursts that look like floods.
INGRESS_NICE = -10
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


@dataclass
class Worker:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    module: str = "pipeline.cli"  # run as ``python -m <module> <argv>``
    proc: subprocess.Popen | None = None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class WorkerSet:
    settings: Settings
    log_dir: Path
    base_port: int = 9400
    workers: dict[str, Worker] = field(default_factory=dict)
    spam_cpus: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if shutil.which("taskset") and hasattr(os, "sched_getaffinity"):  # Linux (util-linux)
            self.spam_cpus = spam_side_cpus(os.sched_getaffinity(0), os.environ.get(SPAM_SIDE_CPUS_ENV))

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None,
              module: str = "pipeline.cli") -> Worker:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        worker = self.workers.get(name)
        if worker is None:
            worker = Worker(name, argv, self.base_port + len(self.workers), self.log_dir / f"{name}.log", module)
            self.workers[name] = worker
        env = os.environ | config.environment(self.settings) | {
            "FLOODGATE_INSTANCE": name,
            "FLOODGATE_WORKER_METRICS_PORT": str(worker.port),
        } | (extra_env or {})
        log = worker.log_path.open("ab")
        # ``nice -n`` is relative to this process's own niceness, which may have been raised.
        delta = NICE.get(name, 0) - os.nice(0)
        nice = ["nice", "-n", str(delta)] if delta else []
        if NICE.get(name, 0) > 0 and self.spam_cpus:
            # The wrapper sets the affinity before the worker starts any thread (librdkafka's
            # inherit it); setting it on the child's pid afterwards would race them.
            nice = ["taskset", "-c", self.spam_cpus, *nice]
        worker.proc = subprocess.Popen([*nice, sys.executable, "-m", worker.module, *worker.argv], env=env,
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        return worker

    def start_standard(self, names: list[str] | None = None) -> None:
        for name in names or list(STANDARD):
            self.start(name, STANDARD[name])
        self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        pending = [w for w in self.workers.values() if w.alive()]
        while pending:
            for w in list(pending):
                if not w.alive():
                    raise RuntimeError(f"worker {w.name} exited with {w.proc.returncode if w.proc else '?'}:\n"
                                       + w.log_path.read_text(errors="replace")[-3000:])
                if w.ready():
                    pending.remove(w)
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {timeout:.0f}s: {[w.name for w in pending]}")
            time.sleep(0.1)  # polling interval of a deadline-bounded wait

    def signal(self, name: str, sig: int = signal.SIGTERM) -> None:
        w = self.workers[name]
        if w.alive():
            w.proc.send_signal(sig)  # type: ignore[union-attr]

    def stop(self, name: str, timeout: float = 30.0) -> int | None:
        """SIGTERM once, then wait; SIGKILL after ``timeout``. Returns the exit code."""
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
        w = self.workers[name]
        if w.alive():
            w.proc.kill()  # type: ignore[union-attr]
            w.proc.wait()  # type: ignore[union-attr]

    def restart(self, name: str) -> Worker:
        w = self.workers[name]
        return self.start(name, w.argv, module=w.module)

    def stop_all(self, timeout: float = 30.0) -> dict[str, int | None]:
        for name in self.workers:
            self.signal(name, signal.SIGTERM)
        return {name: self._wait(name, timeout) for name in self.workers}
