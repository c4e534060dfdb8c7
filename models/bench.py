"""``make bench-classify``: throughput of the scoring path (the classifier worker's inner loop).

Scores the whole corpus mix with the champion at several batch sizes, on one thread, and reports
messages and megabytes per CPU-second (per core: the process's CPU time, so other load on a shared
machine does not count against it) next to wall-clock rates. Also splits the cost by pipeline step.
Results go to BENCHMARKS.md (its classify section), with the command and the machine.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from threadpoolctl import threadpool_limits

from models import registry

SECTION_START = "<!-- bench-classify:start -->"
SECTION_END = "<!-- bench-classify:end -->"
BATCHES = (1, 50, 200, 1000)  # 200 is the workers' default batch (settings.worker.batch_size)


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = re.search(r"Model name:\s*(.+)", out).group(1).strip()  # type: ignore[union-attr]
    except (OSError, subprocess.CalledProcessError, AttributeError):
        pass
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def _timed(fn: Callable[[], object], rounds: int) -> tuple[float, float]:
    """Best (cpu seconds, wall seconds) of ``rounds`` runs."""
    best = (float("inf"), float("inf"))
    for _ in range(rounds):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        best = min(best, (time.process_time() - c0, time.perf_counter() - w0))
    return best


def run(model: registry.LoadedModel, raws: Sequence[bytes], batches: Sequence[int] = BATCHES,
        rounds: int = 3) -> dict[str, Any]:
    n, size = len(raws), sum(map(len, raws))
    results: dict[str, Any] = {"messages": n, "mean_bytes": round(size / n), "version": model.version,
                               "batches": {}, "steps": {}}
    with threadpool_limits(1):  # one core: what one worker process gets
        for b in batches:
            limit = n if b > 1 else min(n, 1000)  # batch 1 is slow; a thousand calls measure it well
            def score(b: int = b, limit: int = limit) -> None:
                for i in range(0, limit, b):
                    model.score(raws[i:min(i + b, limit)])
            cpu, wall = _timed(score, rounds)
            nbytes = sum(map(len, raws[:limit]))
            results["batches"][b] = {"msgs_per_cpu_s": round(limit / cpu), "mb_per_cpu_s": round(nbytes / cpu / 1e6, 1),
                                     "msgs_per_wall_s": round(limit / wall)}
        pipe = model.pipeline
        docs = pipe.named_steps["mail"].transform(raws)
        x = pipe.named_steps["hash"].transform(docs)
        for name, fn in (("mail (parse + tokenize)", lambda: pipe.named_steps["mail"].transform(raws)),
                         ("hash (vectorize)", lambda: pipe.named_steps["hash"].transform(docs)),
                         ("clf (predict_proba)", lambda: pipe.named_steps["clf"].predict_proba(x))):
            cpu, _ = _timed(fn, rounds)
            results["steps"][name] = {"us_per_msg": round(1e6 * cpu / n, 1)}
    results["machine"] = machine()
    return results


def markdown(r: dict[str, Any], command: str) -> str:
    m = r["machine"]
    lines = [SECTION_START, "## Classify: scoring throughput", "",
             f"Command: `{command}` · model `{r['version']}` · {r['messages']} messages of the SpamAssassin corpus "
             f"(mean {r['mean_bytes']:,} bytes) · one thread",
             f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; load average at the start "
             f"{m['load_average']} (a shared machine: per-CPU-second rates are the comparable figure)", "",
             "| batch | msgs / CPU-s (per core) | MB / CPU-s | msgs / wall-s |", "|---:|---:|---:|---:|"]
    for b, v in r["batches"].items():
        lines.append(f"| {b} | {v['msgs_per_cpu_s']:,} | {v['mb_per_cpu_s']} | {v['msgs_per_wall_s']:,} |")
    lines += ["", "Cost by pipeline step (whole corpus in one batch):", "", "| step | µs / message |", "|---|---:|"]
    lines += [f"| {k} | {v['us_per_msg']} |" for k, v in r["steps"].items()]
    lines += ["", SECTION_END]
    return "\n".join(lines) + "\n"


def read_section(path: Path, start: str, end: str) -> str:
    """The text between a benchmark's start and end markers in BENCHMARKS.md ("" if absent): a
    benchmark that keeps a table of its runs carries the earlier rows forward from it."""
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        return text.split(start, 1)[1].split(end, 1)[0]
    return ""


def write_section(path: Path, section: str) -> None:
    """Replace a benchmark's section of BENCHMARKS.md (or append it), leaving the rest alone. The
    section's first and last lines are its start and end markers."""
    lines = section.strip("\n").splitlines()
    start, end = lines[0], lines[-1]
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section.rstrip("\n") + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
