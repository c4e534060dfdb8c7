"""Test session fixtures: a real Kafka broker, never a fake.

The broker is, in order of preference: the cluster named by ``KAFKA_BOOTSTRAP_SERVERS``; a
testcontainers KRaft container where a Docker engine answers; else the local broker of
``infra/kafka/broker.py`` (started if it is not running, and stopped at the end only if this
session started it).
"""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import kafka
from pipeline.core import config
from pipeline.kafka import topics

ROOT = Path(__file__).resolve().parents[1]


def _refusing_dns_port() -> int:
    """A loopback UDP port nothing listens on: a DNS query sent there is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Sender authentication is on by default and asks DNS about the tests' .test domains. The tests that
# verify senders serve their zones from a private knotd (tests/test_auth.py); every other test's
# ingress is pointed at a refusing loopback port, so its lookups give temperror within milliseconds
# instead of depending on, or waiting for, this host's resolver.
os.environ.setdefault("FLOODGATE_AUTH_NAMESERVERS", "127.0.0.1")
os.environ.setdefault("FLOODGATE_AUTH_DNS_PORT", str(_refusing_dns_port()))
BROKER = [sys.executable, str(ROOT / "infra" / "kafka" / "broker.py")]
_broker_description = "not started"


def _docker_kafka() -> tuple[str, object] | None:
    try:
        from docker.errors import DockerException
        from testcontainers.kafka import KafkaContainer
    except ImportError:
        return None
    try:
        container = KafkaContainer("apache/kafka:4.1.2").with_kraft()
        container.start()
    except DockerException:
        return None  # no Docker engine here: use the local broker
    except Exception as e:  # an engine that answers but cannot run the image
        print(f"testcontainers could not start Kafka ({e}); using the local broker", file=sys.stderr)
        return None
    return container.get_bootstrap_server(), container


# With pytest-xdist (``make test`` runs ``-n``), the controller process owns the local broker:
# it starts it before the workers start, and stops it (if it started it) after they are all done,
# so that no worker stops it under another and no two workers start it at once.
_controller_started_broker = False


def _xdist_worker() -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


def pytest_configure(config: pytest.Config) -> None:
    global _controller_started_broker
    parallel = (getattr(config.option, "numprocesses", None) or 0) > 0 or getattr(config.option, "dist", "no") != "no"
    if _xdist_worker() or not parallel or os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return
    _controller_started_broker = subprocess.run([*BROKER, "status"], capture_output=True).returncode != 0
    subprocess.run([*BROKER, "up"], check=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _controller_started_broker and not _xdist_worker():
        subprocess.run([*BROKER, "down"], check=False)


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    global _broker_description
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        _broker_description = f"external cluster {os.environ['KAFKA_BOOTSTRAP_SERVERS']}"
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    found = None if os.environ.get("FLOODGATE_NO_DOCKER") or _xdist_worker() else _docker_kafka()
    if found:
        address, container = found
        _broker_description = f"testcontainers apache/kafka at {address}"
        yield address
        container.stop()  # type: ignore[attr-defined]
        return
    started_here = subprocess.run([*BROKER, "status"], capture_output=True).returncode != 0
    subprocess.run([*BROKER, "up"], check=True)
    version = subprocess.run([*BROKER, "version"], capture_output=True, text=True).stdout.strip()
    address = subprocess.run([*BROKER, "bootstrap"], capture_output=True, text=True).stdout.strip()
    _broker_description = f"local Apache Kafka {version} (KRaft) at {address}"
    print(f"\nbroker: {_broker_description}", file=sys.stderr)
    try:
        yield address
    finally:
        if started_here:
            # Kafka clients the tests dropped but a reference cycle keeps alive would retry the
            # stopped broker until exit, filling the log with "Connection refused": free them first.
            gc.collect()
            subprocess.run([*BROKER, "down"], check=False)


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        version = subprocess.run([*BROKER, "version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        version = "unknown"
    where = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or "local broker (infra/kafka/broker.py)"
    return [f"kafka: Apache Kafka {version} in KRaft mode; bootstrap: {where}"]


@pytest.fixture
def settings(bootstrap: str, tmp_path: Path) -> Iterator[config.Settings]:
    """Settings with private topics (a unique prefix), private groups and private paths.

    Sender authentication is off here: these tests check the ingress's protocol and limits byte
    for byte. tests/test_auth.py turns it on, pointed at a private knotd with zones made at test time."""
    s = config.private(config.load(env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap}), "t", tmp_path)
    yield replace(s, auth=replace(s.auth, enabled=False))


@pytest.fixture
def topic_settings(settings: config.Settings) -> Iterator[config.Settings]:
    """``settings`` with every topic of the spec created, and deleted afterwards."""
    admin = kafka.admin(settings)
    topics.apply(settings, admin)
    yield settings
    topics.delete(settings, admin)


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model registry with a champion trained on part of the corpus's older groups (seconds)."""
    import random

    from models import corpus
    from models.train import train_and_register

    msgs = list(corpus.load_spamassassin(config.ROOT / "data", groups=("easy_ham", "hard_ham", "spam")))
    random.Random(11).shuffle(msgs)
    registry = tmp_path_factory.mktemp("registry")
    train_and_register(msgs[:1500], registry, promote=True)
    return registry
