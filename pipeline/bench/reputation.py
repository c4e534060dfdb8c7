"""``make bench-reputation``: how many verdicts a second one reputation worker tallies.

A backlog of classified corpus mail (every SpamAssassin group, the corpus's label as the
verdict, envelopes as the flood bench makes them: a few hundred sender domains, addresses and
client addresses) is produced to private ``ham``/``spam`` topics first; then one
``floodgate reputation`` process starts on it (its own group, nice 0) and is timed from the
moment it is ready until its ``/reputation/stats/`` show every observation tallied. Reported:
verdicts per wall second, the worker's CPU seconds per 1,000 verdicts (from ``/proc``: other
load on a shared machine does not count against it), and the records the worker wrote to its
internal topics (observations and the two table changelogs) per verdict. One row per run is
appended to the reputation section of BENCHMARKS.md, with the commit, command and machine.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import TopicPartition

from models import corpus
from models.bench import machine, read_section
from pipeline import kafka
from pipeline.bench import traffic
from pipeline.core import config, events, senders
from pipeline.core.config import ROOT, Settings
from pipeline.kafka import topics
from pipeline.node import Node
from pipeline.reputation import internal_topics

SECTION_START = "<!-- bench-reputation:start -->"
SECTION_END = "<!-- bench-reputation:end -->"
TABLE_HEAD = ("| when (UTC) | commit of the worker | verdicts | verdicts / s | CPU s / 1k verdicts "
              "| internal records / verdict | load avg (1 min) |")
# Starting means joining a group, creating internal topics and recovering (empty) tables.
READY_TIMEOUT_S = 180.0
# A backlog of 20,000 verdicts at the slowest rate seen (~100/s on a loaded machine).
DRAIN_TIMEOUT_S = 600.0
POLL_S = 0.2
SEED = 11
WORKER_CODE = "pipeline/reputation.py"


def backlog(data_dir: Path, n: int, seed: int = SEED) -> list[events.MailEvent]:
    """``n`` classified events from the corpus, cycled, with the flood bench's envelopes."""
    rng = random.Random(seed)
    msgs = list(corpus.load_spamassassin(data_dir))
    rng.shuffle(msgs)
    out = []
    for i in range(n):
        m = msgs[i % len(msgs)]
        ev = events.new_event(traffic.envelope_for(m.raw, rng), m.raw, source="bench", label=m.label)
        out.append(ev.classified(m.label, 0.9 if m.label == "spam" else 0.1, "bench"))
    return out


def produce(settings: Settings, evs: list[events.MailEvent]) -> None:
    producer = kafka.producer(settings)
    for ev in evs:
        while True:
            try:
                producer.produce(settings.topic(ev.verdict or "ham"), key=ev.key, value=events.encode(ev))
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("the backlog was not acknowledged within 120 s")


def cpu_seconds(pid: int, tree: bool = False) -> float:
    """User + system CPU time of a process (Linux ``/proc``); with ``tree``, and of its living
    descendants (the SMTP ingress's session processes behind its front)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    if tree:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += cpu_seconds(int(child), tree=True)
    return total


def stats(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/reputation/stats/", timeout=2) as r:
            return orjson.loads(r.read())
    except OSError:
        return None


def internal_records(settings: Settings) -> dict[str, int]:
    """Records per internal topic of the app (the sum of end offsets)."""
    admin = kafka.admin(settings)
    meta = admin.list_topics(timeout=10).topics
    probe = kafka.consumer(settings, group=f"{settings.kafka.group_prefix}.probe")
    try:
        out = {}
        for name in internal_topics(settings, meta):
            parts = meta[name].partitions
            out[name.removeprefix(settings.group("reputation") + "-")] = sum(
                probe.get_watermark_offsets(TopicPartition(name, p), timeout=10)[1] for p in parts)
        return out
    finally:
        probe.close()


def run(base: Settings, n: int, workdir: Path) -> dict[str, Any]:
    settings = config.private(base, "repbench-", workdir / "repbench")
    evs = backlog(settings.paths.data, n)
    keys = [senders.keys(e.envelope.mail_from, e.envelope.client_address) for e in evs]
    expected = sum(map(len, keys))
    kinds = Counter(k.split(":", 1)[0] for k in {k for ks in keys for k in ks})
    distinct = ", ".join(f"{n:,} {kind}" for kind, n in sorted(kinds.items()))
    admin = kafka.admin(settings)
    topics.apply(settings, admin)
    workers = Node(settings, workdir / "logs")
    try:
        produce(settings, evs)
        # Named apart from NICE's "reputation": it runs at nice 0.
        w = workers.start("reputation-bench", ["reputation", "--datadir", str(workdir / "faust")])
        assert w.proc is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ((s := stats(w.port)) and s.get("ready")):
            if not w.alive() or time.monotonic() > deadline:
                raise RuntimeError("the worker did not become ready:\n" + w.log_path.read_text()[-3000:])
            time.sleep(POLL_S)  # polling interval of a deadline-bounded wait
        t0, c0, obs0 = time.monotonic(), cpu_seconds(w.proc.pid), s.get("observations", 0)
        deadline = t0 + DRAIN_TIMEOUT_S
        while (s := stats(w.port) or {}).get("observations", 0) < expected:
            if not w.alive() or time.monotonic() > deadline or s.get("skipped_error"):
                raise RuntimeError(f"not drained: {s} of {expected} observations\n"
                                   + w.log_path.read_text()[-3000:])
            time.sleep(POLL_S)  # polling interval of a deadline-bounded wait
        t1, c1 = time.monotonic(), cpu_seconds(w.proc.pid)
        written = internal_records(settings)
    finally:
        codes = workers.stop_all()
        topics.delete(settings, admin)
    timed = (expected - obs0) * n / expected  # verdicts tallied after t0
    return {"verdicts": n, "observations": expected, "timed_verdicts": round(timed), "seconds": round(t1 - t0, 2),
            "verdicts_per_s": round(timed / (t1 - t0)), "cpu_s_per_1k": round((c1 - c0) / timed * 1000, 3),
            "internal_records": written,
            "internal_per_verdict": round(sum(v for k, v in written.items() if k != "__assignor-__leader") / n, 2),
            "distinct": distinct, "exit_codes": codes, "stats": s, "machine": machine()}


def commit() -> str:
    """The last commit of the worker's code (others commit to the tree too), ``+`` if it has
    uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--", WORKER_CODE)
        return git("log", "-1", "--format=%h", "--", WORKER_CODE) + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def row(r: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    return (f"| {when} | {commit()} | {r['verdicts']:,} | {r['verdicts_per_s']:,} | {r['cpu_s_per_1k']} | "
            f"{r['internal_per_verdict']} | {r['machine']['load_average'][0]} |")


def section(old: str, r: dict[str, Any], command: str) -> str:
    """The BENCHMARKS.md section: earlier runs' rows kept, this run's appended."""
    rows = [line for line in old.splitlines() if line.startswith("| 20")]
    m = r["machine"]
    return "\n".join([
        SECTION_START,
        "## Reputation: verdicts tallied per second",
        "",
        f"Command: `{command}` · a backlog of classified SpamAssassin corpus mail (every group, flood-bench "
        f"envelopes: {r['distinct']}) on private ham/spam topics, one `floodgate reputation` process "
        "(6 partitions, memory store, nice 0), "
        "timed from ready until every observation is tallied. CPU is the worker's own (per 1,000 verdicts); "
        "internal records = observations + senders and traffic changelog records the worker wrote, per verdict.",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']} (a shared machine: CPU per verdict is "
        "the comparable figure; the load average is the 1-minute one at the end of the run).",
        "",
        TABLE_HEAD,
        "|---|---|---:|---:|---:|---:|---:|",
        *rows, row(r),
        "",
        SECTION_END,
    ]) + "\n"


def old_section(path: Path) -> str:
    return read_section(path, SECTION_START, SECTION_END)
