"""What the local single broker (``broker.py``) and the local cluster (``cluster.py``) share.

The broker is the Maven artifact ``org.apache.kafka:kafka_2.13`` resolved with its runtime
dependencies into a cache under the user's home, plus a Log4j2 binding so that it logs to a
file; each broker process (a node) runs from a state directory of its own holding its
``server.properties``, Log4j2 config, data, logs and pid file.

Standard library only, so that it runs before the project's virtual environment exists.
"""

from __future__ import annotations

import base64
import os
import shutil
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

# The listener part of every node's server.properties: one combined broker+controller process
# with a client listener and a controller listener on loopback.
LISTENERS = """process.roles=broker,controller
node.id={node}
controller.quorum.bootstrap.servers={voters}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data}
"""


def log(msg: str) -> None:
    print(f"[kafka] {msg}", flush=True)


def random_id() -> str:
    """A Kafka id (cluster or directory): 16 random bytes as unpadded base64url, as
    ``kafka-storage.sh random-uuid`` makes them. Like Kafka's own, never one that starts with a
    dash: StorageTool would read ``-t -x…`` as an option (a format failure, one run in 32)."""
    while True:
        found = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not found.startswith("-"):
            return found


def external() -> str | None:
    """The cluster named by ``KAFKA_BOOTSTRAP_SERVERS``: where it is set, nothing is started here."""
    return os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or None


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


def java(*args: str, state: Path, heap: str | None = None) -> list[str]:
    cmd = ["java"]
    if heap:
        cmd += [f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20"]
    cmd += [
        f"-Dlog4j2.configurationFile={state / 'log4j2.properties'}",
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


def our_pid(state: Path) -> int | None:
    """The pid of the broker started with state directory ``state``, if that process still runs."""
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


def configure(state: Path, properties: str) -> None:
    """Write a node's ``server.properties`` and Log4j2 config into its state directory."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "log4j2.properties").write_text(LOG4J2.format(log=state / "server.log"))
    (state / "server.properties").write_text(properties)


def started(state: Path) -> bool:
    """Whether the node of ``state`` has logged that it serves."""
    logfile = state / "server.log"
    return logfile.exists() and "Kafka Server started" in logfile.read_text(errors="replace")


def spawn(state: Path, heap: str) -> int:
    """Start the node of ``state`` in its own session (it outlives the shell that started it;
    ``down`` stops it); its last log is kept as ``server.log.prev``. Returns its pid."""
    logfile = state / "server.log"
    if logfile.exists():  # keep the last run's log for post-mortems
        logfile.replace(state / "server.log.prev")
    with open(state / "broker.out", "ab") as out:
        proc = subprocess.Popen(niced(java("kafka.Kafka", str(state / "server.properties"), state=state, heap=heap)),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    (state / "broker.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def wait_started(nodes: dict[Path, tuple[int, str]]) -> None:
    """Wait until every node (state directory -> (pid, address)) answers and has logged that it
    serves; exit with its output if one dies, or after START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    pending = dict(nodes)
    while pending:
        for state, (pid, address) in list(pending.items()):
            if not pid_alive(pid):
                tail = (state / "broker.out").read_text(errors="replace")[-2000:]
                sys.exit(f"[kafka] broker exited during start-up; see {state}/server.log\n{tail}")
            if answers(address) and started(state):
                del pending[state]
        if time.monotonic() > deadline:
            sys.exit(f"[kafka] did not start within {START_TIMEOUT_S:.0f}s: see {', '.join(map(str, pending))}")
        time.sleep(0.25)  # polling interval of a deadline-bounded wait
