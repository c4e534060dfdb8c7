"""``floodgate run``: a node's workers as supervised processes, on the real broker.

A worker that dies (SIGKILL) is restarted by the node and serves again; a worker that keeps
exiting is restarted with a growing delay; SIGTERM to the node stops every worker and the node
exits 0, leaving no process behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
import pytest

from pipeline import node
from pipeline.core import config
from tests.kafka_helpers import wait_for
from tests.worker_helpers import free_port

pytestmark = pytest.mark.kafka


def children(pid: int) -> dict[int, str]:
    """The node's worker processes: pid -> the floodgate command line."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(p): args for p, _, args in (line.strip().partition(" ") for line in out.splitlines()) if p}


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def log_lines(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            lines.append(orjson.loads(line))
    return lines


def test_the_node_restarts_a_killed_worker_and_stops_every_worker_on_sigterm(topic_settings, tmp_path):
    base = free_port()
    env = os.environ | config.environment(topic_settings)
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", "-w", "deliver", "-w", "cleanup",
                                 "--base-port", str(base), "--log-dir", str(tmp_path / "workers")],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        ports = {"deliver": base, "cleanup": base + 1}
        wait_for(lambda: proc.poll() is not None or all(ready(p) for p in ports.values()), timeout=90,
                 what="both workers ready")
        assert proc.poll() is None, log.read_text()[-3000:]
        before = children(proc.pid)
        assert len(before) == 2 and all("pipeline.cli" in a for a in before.values()), before
        deliver_pid = next(p for p, a in before.items() if a.endswith(" deliver"))

        os.kill(deliver_pid, signal.SIGKILL)
        wait_for(lambda: deliver_pid not in children(proc.pid) and len(children(proc.pid)) == 2 and ready(base),
                 timeout=90, what="deliver restarted by the node and ready again")
        restarted = [e for e in log_lines(log) if e.get("msg") == "worker restarted"]
        assert [e["worker"] for e in restarted] == ["deliver"]
        exited = [e for e in log_lines(log) if e.get("msg") == "worker exited; restarting it"]
        assert exited and exited[0]["worker"] == "deliver" and exited[0]["code"] == -signal.SIGKILL

        workers = set(children(proc.pid))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
        stopped = next(e for e in log_lines(log) if e.get("msg") == "node stopped")
        assert stopped["exit_codes"] == {"deliver": 0, "cleanup": 0}
        assert not any(Path(f"/proc/{p}").exists() for p in workers), "a worker outlived the node"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_worker_that_keeps_failing_is_restarted_with_a_growing_delay(topic_settings, tmp_path):
    # A classifier with an empty registry refuses to start (exit 1): the node keeps trying, slower each time.
    settings = config.private(topic_settings, "nomodel", tmp_path, registry=tmp_path / "empty-registry")
    n = node.Node(settings, tmp_path / "logs")
    try:
        n.start("classify-priority", node.NODE["classify-priority"])
        wait_for(lambda: len(n.exits) >= 3, timeout=60, what="three failed starts")
    finally:
        n.stop_all()
    delays = [e.restart_in_s for e in n.exits[:3]]
    assert all(e.code == 1 and not e.killed for e in n.exits[:3]), n.exits
    assert delays == [node.RESTART_BACKOFF_S, 2 * node.RESTART_BACKOFF_S, 4 * node.RESTART_BACKOFF_S]
    assert not n.workers["classify-priority"].alive()  # stop_all ended the supervisor first
