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

Standard library only, so that it runs before the project's virtual environment exists.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

KAFKA_VERSION = os.environ.get("FLOODGATE_KAFKA_VERSION", "4.1.2")
# Kafka 4 logs through slf4j 2; kafka_2.13's runtime closure brings no backend, so we add one.
LOG4J_VERSION = "2.24.3"
SLF4J_VERSION = "2.0.17"

ROOT = Path(__file__).resolve().parents[2]
# Downloaded jars live under the user's home so that a fresh clone (and every CI run) reuses them.
CACHE = Path(os.environ.get("FLOODGATE_CACHE", Path.home() / ".cache" / "floodgate"))
LIBS = CACHE / f"kafka_2.13-{KAFKA_VERSION}" / "libs"
# Per-checkout state: config, data, logs and the pid of the broker this checkout started.
STATE = Path(os.environ.get("FLOODGATE_KAFKA_STATE", ROOT / ".run" / "kafka"))
PORT = int(os.environ.get("FLOODGATE_KAFKA_PORT", "9092"))
CONTROLLER_PORT = int(os.environ.get("FLOODGATE_KAFKA_CONTROLLER_PORT", str(PORT + 1)))
# The scripts in the Kafka distribution default to 1 GiB; half of that serves a 2-core test machine.
HEAP = os.environ.get("FLOODGATE_KAFKA_HEAP", "512m")
# CPU priority on a shared host. Every message crosses the broker three times, whatever its lane,
# so on one machine the broker must not wait for CPU behind the workers: the bulk lane yields to
# it as it yields to the priority lane (make bench-flood on 2 cores: flood-phase ham p99 was
# 2.5x its pre-flood p99 with the broker at normal priority, 1.3x at -10). Only the priority
# lane's workers, which use little CPU, run above it (-20, pipeline/node.py). Raising priority
# needs CAP_SYS_NICE (root); without it `nice` says so in broker.out and the broker runs as is.
NICE = os.environ.get("FLOODGATE_KAFKA_NICE", "-10")
START_TIMEOUT_S = 90.0

POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>floodgate</groupId><artifactId>local-kafka</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

LOG4J2 = """status = warn
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.controller.name = org.apache.kafka.controller
logger.controller.level = WARN
"""

SERVER_PROPERTIES = """# Written by infra/kafka/broker.py: one combined broker+controller on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:{cport}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
# One node: internal topics cannot be replicated further.
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


def log(msg: str) -> None:
    print(f"[kafka] {msg}", flush=True)


def external() -> str | None:
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None


def bootstrap() -> str:
    return external() or f"127.0.0.1:{PORT}"


def answers(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.split(",")[0].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def fetch() -> Path:
    """Resolve the broker and its runtime closure into the cache (once)."""
    marker = LIBS / ".complete"
    if marker.exists():
        return LIBS
    if not shutil.which("mvn"):
        sys.exit("[kafka] Maven (mvn) is needed to fetch the broker; install it (apt-get install maven).")
    if not shutil.which("java"):
        sys.exit("[kafka] Java 17+ is needed to run the broker; install it (apt-get install openjdk-17-jre-headless).")
    work = LIBS.parent
    work.mkdir(parents=True, exist_ok=True)
    (work / "pom.xml").write_text(POM.format(kafka=KAFKA_VERSION, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION))
    tmp = work / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"fetching org.apache.kafka:kafka_2.13:{KAFKA_VERSION} and its runtime dependencies with Maven")
    subprocess.run(
        ["mvn", "-q", "-B", "-f", str(work / "pom.xml"), "dependency:copy-dependencies",
         "-DincludeScope=runtime", f"-DoutputDirectory={tmp}"],
        check=True,
    )
    # Maven may pick slf4j 1.x from a transitive path; the explicit 2.x is the one we want.
    for old in tmp.glob("slf4j-api-1.*.jar"):
        old.unlink()
    shutil.rmtree(LIBS, ignore_errors=True)
    tmp.rename(LIBS)
    marker.write_text(KAFKA_VERSION + "\n")
    return LIBS


def java(*args: str, heap: str | None = None, state: Path | None = None) -> list[str]:
    cmd = ["java"]
    if heap:
        cmd += [f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    cmd += [
        f"-Dlog4j2.configurationFile={(state or STATE) / 'log4j2.properties'}",
        "-Djava.awt.headless=true",
        "-cp", str(LIBS / "*"),
        *args,
    ]
    return cmd


def niced(cmd: list[str]) -> list[str]:
    """``cmd`` run at the broker's CPU priority (``NICE``); its threads inherit it."""
    return ["nice", "-n", NICE, *cmd] if NICE not in ("", "0") else cmd


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) is not a running broker.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def our_pid(state: Path | None = None) -> int | None:
    """The pid of the broker this checkout started, if that process still runs."""
    state = state or STATE
    pidfile = state / "broker.pid"
    if not pidfile.exists():
        return None
    try:
        pid = int(pidfile.read_text().strip())
    except ValueError:
        return None
    if not pid_alive(pid):
        return None
    try:  # The pid may have been reused by another program since.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return pid
    return pid if b"kafka.Kafka" in cmdline and str(state).encode() in cmdline else None


def configure() -> None:
    STATE.mkdir(parents=True, exist_ok=True)
    (STATE / "log4j2.properties").write_text(LOG4J2.format(log=STATE / "server.log"))
    (STATE / "server.properties").write_text(
        SERVER_PROPERTIES.format(port=PORT, cport=CONTROLLER_PORT, data=STATE / "data")
    )


def format_storage() -> None:
    if (STATE / "data" / "meta.properties").exists():
        return
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    log(f"formatting KRaft storage (cluster id {cluster_id})")
    subprocess.run(
        java("kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
             "-c", str(STATE / "server.properties")),
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
    pid = our_pid()
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
        logfile = STATE / "server.log"
        if logfile.exists():  # keep the last run's log for post-mortems
            logfile.replace(STATE / "server.log.prev")
        with open(STATE / "broker.out", "ab") as out:
            proc = subprocess.Popen(
                niced(java("kafka.Kafka", str(STATE / "server.properties"), heap=HEAP)),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the shell that started it; `down` stops it
            )
        (STATE / "broker.pid").write_text(f"{proc.pid}\n")
        pid = proc.pid
        log(f"started Kafka {KAFKA_VERSION} (pid {pid}, heap {HEAP}), waiting for {bootstrap()}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            tail = (STATE / "broker.out").read_text(errors="replace")[-2000:]
            sys.exit(f"[kafka] broker exited during start-up; see {STATE}/server.log\n{tail}")
        if answers(bootstrap()) and started():
            log(f"Kafka {version() or KAFKA_VERSION} answers at {bootstrap()}")
            return 0
        time.sleep(0.25)
    sys.exit(f"[kafka] broker did not answer within {START_TIMEOUT_S:.0f}s; see {STATE}/server.log")


def started() -> bool:
    logfile = STATE / "server.log"
    return logfile.exists() and "Kafka Server started" in logfile.read_text(errors="replace")


def down() -> int:
    if external():
        log("KAFKA_BOOTSTRAP_SERVERS is set: nothing was started here, nothing to stop")
        return 0
    pid = our_pid()
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
    pid = our_pid()
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
