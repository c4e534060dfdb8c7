#!/usr/bin/env python3
"""Run a local Apache Kafka 4.x broker (KRaft, combined broker+controller) on loopback.

No Docker and no tarball: the broker is the Maven artifact ``org.apache.kafka:kafka_2.13``
resolved with its runtime dependencies into a cache under the user's home, plus a Log4j2
binding so the broker logs to a file.

    python infra/kafka/broker.py up       # fetch (once), format (once), start, wait until it answers
    python infra/kafka/broker.py down     # stop the process that `up` started, and only that one
    python infra/kafka/broker.py status   # exit 0 when the broker answers, 1 when it does not
    python infra/kafka/broker.py version  # the broker's version as it logged it

Where ``KAFKA_BOOTSTRAP_SERVERS`` is set, nothing is started: that cluster is used.

Cluster mode (fault-injection runs): N combined broker+controller nodes on loopback, each with
its own ``node.id``, ports, ``log.dirs`` and state under ``.run/kafka-<name>/node<i>/``, the
quorum formatted with ``--initial-controllers`` (a dynamic KRaft quorum), internal topics
replicated min(N, 3) times with min ISR min(N, 2). It never touches the single broker above.

    python infra/kafka/broker.py --nodes 3 --name chaos up          # start every node not running
    python infra/kafka/broker.py --nodes 3 --name chaos down        # stop every node it started
    python infra/kafka/broker.py --nodes 3 --name chaos status      # exit 0 when every node answers
    python infra/kafka/broker.py --nodes 3 --name chaos kill 2      # SIGKILL node 2 (a crash)
    python infra/kafka/broker.py --nodes 3 --name chaos start 2     # start node 2, wait until it serves
    python infra/kafka/broker.py --nodes 3 --name chaos bootstrap   # the bootstrap address list

Options: ``--port BASE`` (default 19092: node i listens on BASE+2(i-1), its controller on the
next port), ``--heap`` (default 320m per node).

Standard library only, so that it runs before the project's virtual environment exists; what it
shares with the cluster (fetching, starting and watching a node) is in ``local.py``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import local  # infra/kafka/local.py, beside this file
from local import KAFKA_VERSION, LISTENERS, ROOT, answers, external, fetch, java, log, our_pid, pid_alive

# Per-checkout state: config, data, logs and the pid of the broker this checkout started.
STATE = Path(os.environ.get("FLOODGATE_KAFKA_STATE", ROOT / ".run" / "kafka"))
PORT = int(os.environ.get("FLOODGATE_KAFKA_PORT", "9092"))
CONTROLLER_PORT = int(os.environ.get("FLOODGATE_KAFKA_CONTROLLER_PORT", str(PORT + 1)))
# The scripts in the Kafka distribution default to 1 GiB; half of that serves a 2-core test machine.
HEAP = os.environ.get("FLOODGATE_KAFKA_HEAP", "512m")

SERVER_PROPERTIES = """# Written by infra/kafka/broker.py: one combined broker+controller on loopback.
{listeners}# One node: internal topics cannot be replicated further.
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Topics come from infra/topics.toml; a typo must fail, not create a topic.
auto.create.topics.enable=false
num.partitions=1
# A fresh group starts at once instead of waiting 3 s for more members (tests, demo).
group.initial.rebalance.delay.ms=0
offsets.topic.num.partitions=8
transaction.state.log.num.partitions=8
# Tests and benchmarks delete their topics when they end. With the default of 60 s the files of
# a deleted topic are unlinked a minute later, in the middle of the next measurement, whose
# Maildir fsyncs share the disk (and, on a journalled filesystem, the journal) with those
# unlinks; at 1 s they happen before the bench's page-cache flush (pipeline/bench/flood.py) instead.
log.segment.delete.delay.ms=1000
# The log cleaner's key map is allocated on the heap at start and held for good: 128 MiB by
# default, a quarter of this broker's heap (its live heap after a full collection went from
# 217 MB to 110 MB with 16 MiB). The compacted topics here (offsets, transactions, the reputation
# changelogs) are small; 16 MiB maps about 600,000 keys per cleaning pass, and a larger log is
# simply cleaned in more passes.
log.cleaner.dedupe.buffer.size=16777216
"""


def bootstrap() -> str:
    return external() or f"127.0.0.1:{PORT}"


def configure() -> None:
    listeners = LISTENERS.format(node=1, voters=f"127.0.0.1:{CONTROLLER_PORT}", port=PORT, cport=CONTROLLER_PORT,
                                 data=STATE / "data")
    local.configure(STATE, SERVER_PROPERTIES.format(listeners=listeners))


def format_storage() -> None:
    if (STATE / "data" / "meta.properties").exists():
        return
    cluster_id = local.random_id()
    log(f"formatting KRaft storage (cluster id {cluster_id})")
    subprocess.run(
        java("kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
             "-c", str(STATE / "server.properties"), state=STATE),
        check=True, stdout=subprocess.DEVNULL,
    )


def version() -> str | None:
    """The version the broker logged at start-up (AppInfoParser), or the one we run."""
    logfile = STATE / "server.log"
    if logfile.exists():
        found = re.findall(r"Kafka version: (\S+)", logfile.read_text(errors="replace"))
        if found:
            return found[-1]
    return None


def up() -> int:
    if external():
        log(f"KAFKA_BOOTSTRAP_SERVERS={external()}: using that cluster, starting nothing")
        return 0 if answers(bootstrap(), timeout=5) else 1
    pid = our_pid(STATE)
    if pid and answers(bootstrap()):
        log(f"already running (pid {pid}) at {bootstrap()}")
        return 0
    if pid is None and answers(bootstrap()):
        sys.exit(f"[kafka] something else listens on {bootstrap()}; stop it or set FLOODGATE_KAFKA_PORT")
    fetch()
    configure()
    if pid is None:
        (STATE / "broker.pid").unlink(missing_ok=True)
        format_storage()
        pid = local.spawn(STATE, HEAP)
        log(f"started Kafka {KAFKA_VERSION} (pid {pid}, heap {HEAP}), waiting for {bootstrap()}")
    local.wait_started({STATE: (pid, bootstrap())})
    log(f"Kafka {version() or KAFKA_VERSION} answers at {bootstrap()}")
    return 0


def down() -> int:
    if external():
        log("KAFKA_BOOTSTRAP_SERVERS is set: nothing was started here, nothing to stop")
        return 0
    pid = our_pid(STATE)
    if pid is None:
        log("not running")
        (STATE / "broker.pid").unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        log(f"pid {pid} ignored SIGTERM for 30 s; killing it")
        os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.1)
    (STATE / "broker.pid").unlink(missing_ok=True)
    log(f"stopped (pid {pid})")
    return 0


def status() -> int:
    if external():
        ok = answers(bootstrap(), timeout=5)
        log(f"external cluster {bootstrap()}: {'answers' if ok else 'does not answer'}")
        return 0 if ok else 1
    pid = our_pid(STATE)
    ok = pid is not None and answers(bootstrap())
    if ok:
        log(f"running: pid {pid}, Kafka {version() or KAFKA_VERSION}, bootstrap {bootstrap()}, state {STATE}")
    elif pid is not None:
        log(f"pid {pid} is alive but {bootstrap()} does not answer")
    elif (STATE / "broker.pid").exists():
        log("not running: the broker started here has died (run `make kafka-up` to restart it)")
    else:
        log("not running")
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    if any(a == "--nodes" or a.startswith("--nodes=") for a in argv[1:]):
        from cluster import main as cluster_main  # infra/kafka/cluster.py, beside this file

        return cluster_main(argv)
    commands = {"up": up, "down": down, "status": status, "fetch": lambda: (fetch(), 0)[1],
                "bootstrap": lambda: (print(bootstrap()), 0)[1],
                "version": lambda: (print(version() or KAFKA_VERSION), 0)[1]}
    if len(argv) != 2 or argv[1] not in commands:
        print(__doc__)
        return 2
    return commands[argv[1]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
