"""A local multi-node Kafka KRaft cluster on loopback, for fault injection (``broker.py --nodes N``).

Each node is one combined broker+controller process with its own ``node.id``, listener ports,
``log.dirs`` and state directory (``.run/kafka-<name>/node<i>/``). The metadata quorum is
formatted once with ``--initial-controllers`` (a dynamic KRaft quorum: every node formatted
with the same cluster id and the same voter list, each voter named with its metadata
directory id). Killing one node of three leaves a majority: the quorum and every partition
with min ISR 2 stay writable.

Standard library only, like ``broker.py``; what the two share is in ``local.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import local  # infra/kafka/local.py, beside this file
from local import log

DEFAULT_PORT = 19092  # far from the single broker's 9092/9093
# Three JVMs share a 2-core machine with everything else: a modest heap each.
DEFAULT_HEAP = os.environ.get("FLOODGATE_KAFKA_CLUSTER_HEAP", "320m")
STOP_TIMEOUT_S = 30.0

NODE_PROPERTIES = """# Written by infra/kafka/cluster.py: node {node} of {nodes} (combined broker+controller).
{listeners}# Internal topics survive the loss of one node and stay writable (min ISR 2 of 3).
offsets.topic.replication.factor={rf}
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={isr}
share.coordinator.state.topic.replication.factor={rf}
share.coordinator.state.topic.min.isr={isr}
default.replication.factor={rf}
# min.insync.replicas stays at its default (1) for the broker: a client that creates a topic with
# one replica (Faust's internal topics, unless told otherwise) must still be able to write to it.
# Floodgate's topics carry their own (FLOODGATE_MIN_INSYNC=2).
# Never elect a replica that may miss acknowledged records.
unclean.leader.election.enable=false
auto.create.topics.enable=false
num.partitions=1
group.initial.rebalance.delay.ms=0
offsets.topic.num.partitions=8
transaction.state.log.num.partitions=8
# A killed node keeps leading its partitions, and coordinating its groups and transactions,
# until the controller fences it: broker.session.timeout.ms after its last heartbeat (9 s by
# default). Ham stalls that long before anything can move (issue 18: 15-18 s from a kill to ham
# flowing again with the defaults).
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=4000
# Small machine, three JVMs: fewer threads than the defaults (3 network, 8 I/O).
num.network.threads=2
num.io.threads=4
"""


@dataclass(frozen=True)
class Node:
    id: int
    port: int
    cport: int
    state: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        return local.our_pid(self.state)


@dataclass(frozen=True)
class Cluster:
    name: str
    nodes: int
    port: int
    heap: str

    @property
    def state(self) -> Path:
        return local.ROOT / ".run" / f"kafka-{self.name}"

    def node(self, i: int) -> Node:
        if not 1 <= i <= self.nodes:
            sys.exit(f"[kafka] node must be 1..{self.nodes}, not {i}")
        port = self.port + 2 * (i - 1)
        return Node(i, port, port + 1, self.state / f"node{i}")

    def all(self) -> list[Node]:
        return [self.node(i) for i in range(1, self.nodes + 1)]

    def bootstrap(self) -> str:
        return ",".join(n.address for n in self.all())

    @property
    def replication(self) -> tuple[int, int]:
        return min(self.nodes, 3), min(self.nodes, 2)


def _layout(c: Cluster) -> dict:
    """The cluster's identity (cluster id, each node's directory id), made once and kept."""
    path = c.state / "cluster.json"
    if path.exists():
        layout = json.loads(path.read_text())
        if layout["nodes"] != c.nodes or layout["port"] != c.port:
            sys.exit(f"[kafka] {c.state} holds a {layout['nodes']}-node cluster on port {layout['port']};"
                     f" run `down` and remove it to change the layout")
        return layout
    layout = {"nodes": c.nodes, "port": c.port, "cluster_id": local.random_id(),
              "directories": {str(n.id): local.random_id() for n in c.all()}}
    c.state.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(layout, indent=1) + "\n")
    return layout


def _configure(c: Cluster, layout: dict) -> None:
    voters = ",".join(f"127.0.0.1:{n.cport}" for n in c.all())
    rf, isr = c.replication
    for n in c.all():
        listeners = local.LISTENERS.format(node=n.id, voters=voters, port=n.port, cport=n.cport,
                                           data=n.state / "data")
        local.configure(n.state, NODE_PROPERTIES.format(node=n.id, nodes=c.nodes, listeners=listeners, rf=rf, isr=isr))
    formatted = [(n.state / "data" / "meta.properties").exists() for n in c.all()]
    if all(formatted):
        return
    if any(formatted):
        sys.exit(f"[kafka] some nodes of {c.state} are formatted and some not; remove {c.state} to start afresh")
    initial = ",".join(f"{n.id}@127.0.0.1:{n.cport}:{layout['directories'][str(n.id)]}" for n in c.all())
    log(f"formatting {c.nodes} nodes (cluster id {layout['cluster_id']}, initial controllers {initial})")
    for n in c.all():
        subprocess.run(
            local.java("kafka.tools.StorageTool", "format", "-t", layout["cluster_id"],
                        "--initial-controllers", initial, "-c", str(n.state / "server.properties"), state=n.state),
            check=True, stdout=subprocess.DEVNULL)


def _start(c: Cluster, nodes: list[Node]) -> int:
    local.fetch()
    _configure(c, _layout(c))
    pids: dict[Path, tuple[int, str]] = {}
    for n in nodes:
        pid = n.pid()
        if pid is None:
            if local.answers(n.address):
                sys.exit(f"[kafka] something else listens on {n.address}; choose another --port")
            pid = local.spawn(n.state, c.heap)
            log(f"node {n.id}: started (pid {pid}, heap {c.heap}) on {n.address}")
        pids[n.state] = (pid, n.address)
    local.wait_started(pids)
    log(f"cluster {c.name!r}: {len(nodes)} node(s) serving; bootstrap {c.bootstrap()}")
    return 0


def up(c: Cluster) -> int:
    return _start(c, c.all())


def start(c: Cluster, node: int) -> int:
    return _start(c, [c.node(node)])


def kill(c: Cluster, node: int) -> int:
    """SIGKILL one node: a crash, no controlled shutdown."""
    n = c.node(node)
    pid = n.pid()
    if pid is None:
        log(f"node {node}: not running")
        return 1
    os.kill(pid, signal.SIGKILL)
    while local.pid_alive(pid):
        time.sleep(0.05)  # until the kernel has reaped it (bounded: SIGKILL cannot be ignored)
    log(f"node {node}: killed (pid {pid})")
    return 0


def down(c: Cluster) -> int:
    running = {n.id: pid for n in c.all() if (pid := n.pid()) is not None}
    for pid in running.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while any(local.pid_alive(p) for p in running.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for node, pid in running.items():
        if local.pid_alive(pid):
            # The last nodes of a quorum cannot finish a controlled shutdown without the others.
            log(f"node {node}: pid {pid} ignored SIGTERM for {STOP_TIMEOUT_S:.0f} s; killing it")
            os.kill(pid, signal.SIGKILL)
    for n in c.all():
        (n.state / "broker.pid").unlink(missing_ok=True)
    log(f"cluster {c.name!r}: stopped {len(running)} node(s)")
    return 0


def status(c: Cluster) -> int:
    ok = True
    for n in c.all():
        pid = n.pid()
        answers = pid is not None and local.answers(n.address)
        ok &= answers
        log(f"node {n.id}: {'serving' if answers else 'running, not answering' if pid else 'not running'}"
            f"{f' (pid {pid})' if pid else ''} at {n.address}")
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="broker.py", description="A local multi-node KRaft cluster.")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--name", default="cluster", help="names the state directory .run/kafka-<name>")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="node i listens on PORT+2(i-1)")
    parser.add_argument("--heap", default=DEFAULT_HEAP)
    parser.add_argument("command", choices=("up", "down", "status", "kill", "start", "bootstrap"))
    parser.add_argument("node", type=int, nargs="?")
    args = parser.parse_args(argv[1:])
    if not args.name.replace("-", "").isalnum():
        parser.error("--name: letters, digits and dashes only")
    if local.external():
        log("KAFKA_BOOTSTRAP_SERVERS is set: the local cluster is not used")
    c = Cluster(args.name, args.nodes, args.port, args.heap)
    if args.command in ("kill", "start"):
        if args.node is None:
            parser.error(f"{args.command} needs a node number")
        return (kill if args.command == "kill" else start)(c, args.node)
    if args.command == "bootstrap":
        print(c.bootstrap())
        return 0
    return {"up": up, "down": down, "status": status}[args.command](c)
