"""``make bench-ingress``: how many messages a second ``floodgate smtp`` accepts, and what the
whole node sustains end to end.

Acceptance: the ingress and the broker alone (no workers), 20 clients from 20 addresses on
127/8 sending as fast as they can (:mod:`pipeline.bench.smtpload`, closed loops: each
connection sends its next message as soon as the last got its 250), in two ways:

* ``persistent``: each client's connection carries up to ``smtp.max_messages_per_connection``
  messages before it reconnects, as an MTA with a queue for one destination does;
* ``per-message``: a connection per message, as a simple script or a bot does;

each with ``smtp.processes`` 1 (one process) and 2 (a front and two session processes). The
per-client limits and admission are out of the way (the naive configuration's settings,
:func:`pipeline.bench.frontdoor.naive_settings`): with them, 20 clients could never exceed
20 x ``client_message_rate`` (1,000 msg/s), one message per connection never 20 x
``client_connection_rate`` (200 msg/s), and 20 clients without history sending this fast are a
flood (stress); what is measured is the ingress's own work. One more run shows what the
product's limits let the same 20 clients, unknown to it, through.

End to end: ``floodgate smtp`` and the standard workers on a node, the same 20 persistent
clients, admission and limits out of the way (so everything takes the priority lane): the
rate accepted, and the rate landing in a mailbox or the quarantine over the same window, with
what was still queued when the clients stopped.

CPU per process from ``/proc`` (the ingress's front and each session process, the broker, the
generator's process), as seconds per 1,000 accepted messages. Each run starts with a short
unmeasured warm-up (connections, the broker's batches). Rows are appended to the ingress section
of BENCHMARKS.md with the command, the commit and the machine; ``reports/ingress.json`` has all.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from models.bench import machine, read_section, write_section
from pipeline import kafka
from pipeline.bench import accounting, flood, smtpload
from pipeline.bench.frontdoor import naive_settings, own_port, watched
from pipeline.core import config
from pipeline.core.config import ROOT, Settings
from pipeline.kafka import topics
from pipeline.node import STANDARD, Node

SECTION_START = "<!-- bench-ingress:start -->"
SECTION_END = "<!-- bench-ingress:end -->"
TABLE_HEAD = ("| when (UTC) | commit | run | processes | clients x connections each | accepted msg/s | landed msg/s "
              "| CPU s / 1k msgs: ingress (front; sessions) | broker | generator | load avg (1 min) |")
CLIENTS = 20
NET = 6  # the clients' addresses: 127.6.<i>.1 (smtpload.source)
# A closed loop needs a moment to fill its connections and the broker its batches.
WARMUP_S = 3.0
SECONDS = 15.0
E2E_SECONDS = 30.0
DRAIN_TIMEOUT_S = 600.0
# The code a row measures: the ingress and what it calls on a message's way to the broker.
CODE = ("pipeline/smtp", "pipeline/admission", "pipeline/kafka", "pipeline/core/events.py")


@dataclass(frozen=True)
class Case:
    name: str
    processes: int
    per_conn: int  # messages per connection (1: one per connection)
    conns: int = 1  # connections each client keeps busy
    limits: bool = False  # the product's limits and admission, instead of none
    end_to_end: bool = False  # the standard workers too, and the landing rate
    seconds: float = SECONDS


# An MTA with mail queued for one destination opens several connections at once (Postfix: up to
# 20); with one each, 20 clients wait out every round trip in turn and measure the latency of a
# transaction more than the ingress's capacity (on a loaded 2-core host, 20 x 1 gave ~350 msg/s
# where 60 x 2 gave ~900). So each run is made with 1 and with this many per client.
MANY_CONNS = 5


def cases(conns: tuple[int, ...] = (1, MANY_CONNS)) -> list[Case]:
    persistent = 100  # smtp.max_messages_per_connection's default: an MTA reconnects after that many
    out = [Case(name, processes, per_conn, c) for c in conns for processes in (1, 2)
           for name, per_conn in (("persistent", persistent), ("per-message", 1))]
    most = max(conns)
    return [*out, Case("persistent, product limits", 2, persistent, most, limits=True),
            Case("end to end, persistent", 2, persistent, most, end_to_end=True, seconds=E2E_SECONDS)]


@contextmanager
def ingress(base: Settings, workdir: Path, case: Case) -> Iterator[tuple[Settings, Node]]:
    """``floodgate smtp`` (and the standard workers, end to end) on private topics and a free port."""
    s = own_port(config.private(base, "ingress-", workdir))
    s = s if case.limits else naive_settings(s)
    s = replace(s, smtp=replace(s.smtp, processes=case.processes))
    admin = kafka.admin(s)
    topics.apply(s, admin)
    node = Node(s, workdir / "logs")
    try:
        node.start("smtp", ["smtp"])
        if case.end_to_end:
            node.start_standard(list(STANDARD))
        node.wait_ready()
        yield s, node
    finally:
        node.stop_all()
        topics.delete(s, admin)


def measure(base: Settings, case: Case, spam: list[bytes], log: Callable[[str], None]) -> dict[str, Any]:
    shape = smtpload.Shape(case.name, bots=CLIENTS, conns=case.conns, per_conn=case.per_conn, net=NET)
    with tempfile.TemporaryDirectory(prefix="floodgate-ingress-", dir=base.paths.maildir_root.parent) as tmp, \
            ingress(base, Path(tmp), case) as (s, node):
        watch = watched(node, s)  # the ingress's processes, the broker, and end to end the workers
        host, port = s.smtp.host, s.smtp.port
        smtpload.run_split(host, port, shape, smtpload.Phases(0, 0, WARMUP_S, 0), ham=[], spam=spam, ham_spec=None,
                           watch=watch)
        load = os.getloadavg()
        run = smtpload.run_split(host, port, shape, smtpload.Phases(0, 0, case.seconds, 0), ham=[], spam=spam,
                                 ham_spec=None, watch=watch)
        summary = smtpload.summarize(run)
        phase = summary["phases"]["2-during"]
        result: dict[str, Any] = {
            "case": asdict(case), "clients": CLIENTS, "connections_per_client": case.conns,
            "accepted_per_s": phase["accepted_per_s"]["bot"], "accepted": phase["bot"]["accepted"],
            "attempted": phase["bot"]["attempted"], "replies_4xx": phase["bot"]["replies_4xx"],
            "failures": summary["failures"][:5], "cpu_s": phase["cpu_s"], "loadavg": [round(x, 2) for x in load],
            "message_seconds": phase["bot"]["start_to_250"],
            "exits": [asdict(e) for e in node.exits],
        }
        if case.end_to_end:
            start, end = run.start, run.start + case.seconds
            ids = {t.event_id for t in run.transactions if t.accepted and t.event_id}
            log(f"  {len(ids)} accepted; waiting for the pipeline to place them")
            found = accounting.wait_accounted(s, ids, DRAIN_TIMEOUT_S) or accounting.scan(s)
            placed = [min(found.delivered[i]) for i in ids if i in found.delivered]
            placed += [found.quarantined[i] for i in ids if i in found.quarantined and i not in found.delivered]
            result |= {"landed_per_s": round(sum(1 for t in placed if start <= t < end) / case.seconds, 1),
                       "queued_at_end": sum(1 for t in placed if t >= end) + len(ids) - len(placed),
                       "drained_s": round(max(placed) - end, 2) if placed else None,
                       "placed": len(placed), "accepted_total": len(ids)}
    return result


def run(settings: Settings, conns: tuple[int, ...] = (1, MANY_CONNS), only: str = "",
        log: Callable[[str], None] = print) -> dict[str, Any]:
    _, spam = smtpload.load_corpus(settings.paths.data)
    started = {"when": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "commit": commit()}  # what was measured
    rows = []
    for case in cases(conns):
        if only and only not in case.name:
            continue
        log(f"{case.name}, {case.processes} process(es): {CLIENTS} clients x {case.conns} connection(s), "
            f"{case.seconds:.0f} s")
        r = measure(settings, case, spam, log)
        log("  " + line(r))
        rows.append(r)
    return {"machine": machine(), **started, "runs": rows}


def cpu_per_1k(r: dict[str, Any]) -> dict[str, float]:
    n = r["accepted"] or 1
    return {k: round(1000 * v / n, 2) for k, v in r["cpu_s"].items()}


def line(r: dict[str, Any]) -> str:
    per = cpu_per_1k(r)
    ingress = {k: v for k, v in per.items() if k.startswith("smtp")}
    e2e = (f"; landed {r['landed_per_s']} msg/s, {r['queued_at_end']} still queued at the end, drained "
           f"{r['drained_s']} s after" if "landed_per_s" in r else "")
    return (f"accepted {r['accepted_per_s']} msg/s ({r['replies_4xx']} 4xx); CPU s per 1k msgs: "
            f"{', '.join(f'{k} {v}' for k, v in ingress.items())}, broker {per.get('broker')}, "
            f"generator {per.get('generator-bots')}{e2e}")


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:  # the checkout's commit (the harness measures as much as the ingress), + with changes to the ingress
        dirty = git("status", "--porcelain", "--", *CODE)
        return git("log", "-1", "--format=%h") + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def table_row(r: dict[str, Any], when: str, sha: str) -> str:
    per = cpu_per_1k(r)
    sessions = [v for k, v in per.items() if k.startswith("smtp-session")]
    ingress = (f"{per['smtp']}" if "smtp" in per
               else f"{sum(sessions) + per.get('smtp-front', 0):.2f} ({per.get('smtp-front')}; "
                    f"{' + '.join(str(v) for v in sessions)})")
    c = r["case"]
    return (f"| {when} | {sha} | {c['name']} | {c['processes']} | {r['clients']} x {r['connections_per_client']} | "
            f"{r['accepted_per_s']:,} | {r.get('landed_per_s', '–')} | {ingress} | {per.get('broker', '–')} | "
            f"{per.get('generator-bots', '–')} | {r['loadavg'][0]} |")


def section(old: str, report: dict[str, Any], command: str) -> str:
    rows = [ln for ln in old.splitlines() if ln.startswith("| 20")]
    when, sha = report.get("when") or time.strftime("%Y-%m-%d %H:%M", time.gmtime()), report.get("commit") or commit()
    m = report["machine"]
    return "\n".join([
        SECTION_START,
        "## Ingress: messages accepted over SMTP",
        "",
        f"Command: `{command}` · {CLIENTS} clients, each from its own address on 127/8, as fast as they can (closed "
        "loops: the next message as soon as the last got its 250), with 1 or several connections each (an MTA "
        "opens several to a destination with a queue); `persistent`: up to 100 messages per "
        "connection (as an MTA), `per-message`: one message per connection. The ingress and the broker alone, "
        "the per-client limits and admission out of the way (settings only), except the `product limits` run "
        "(the same 20 clients, unknown to the ingress); `end to end`: the standard workers too, everything in "
        "the priority lane, `landed` = placed in a mailbox or the quarantine within the same window. "
        f"{WARMUP_S:.0f} s unmeasured, then {SECONDS:.0f} s ({E2E_SECONDS:.0f} s end to end). CPU from `/proc`, "
        "seconds per 1,000 accepted messages; the broker is shared with whatever else runs on the host.",
        f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']} (a shared machine: CPU per message is the "
        "comparable figure; the load average is the 1-minute one at the start of each run).",
        "",
        TABLE_HEAD,
        "|---|---|---|---:|---|---:|---:|---|---:|---:|---:|",
        *rows, *(table_row(r, when, sha) for r in report["runs"]),
        "",
        SECTION_END,
    ]) + "\n"


def old_section(path: Path) -> str:
    return read_section(path, SECTION_START, SECTION_END)


def write(report: dict[str, Any], command: str, out: Path = flood.REPORTS,
          benchmarks: Path = ROOT / "BENCHMARKS.md") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "ingress.json").write_bytes(orjson.dumps(report | {"command": command}, option=orjson.OPT_INDENT_2))
    write_section(benchmarks, section(old_section(benchmarks), report, command))
