"""One settings object for every worker: defaults, then a TOML file, then environment variables.

The TOML file is ``$FLOODGATE_CONFIG`` or ``./floodgate.toml`` when present; its tables mirror
the dataclasses below (``[kafka]``, ``[smtp]``, ...). Environment variables win; each field's
variable is ``FLOODGATE_<SECTION>_<FIELD>`` (for example ``FLOODGATE_SMTP_PORT``), and the
Kafka bootstrap address also answers to the conventional ``KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import uuid
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TOPIC_SPEC = ROOT / "infra" / "topics.toml"


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"  # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
    sasl_mechanism: str = ""  # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_ca_location: str = ""
    ssl_certificate_location: str = ""
    ssl_key_location: str = ""
    topic_prefix: str = ""
    group_prefix: str = "floodgate"


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 2525
    hostname: str = "floodgate.localdomain"
    # Mail is accepted only for these domains: never an open relay.
    domains: tuple[str, ...] = ("example.com", "example.net", "example.org")
    max_message_bytes: int = 10 * 1024 * 1024
    max_recipients: int = 100
    # How long to wait for the broker's acknowledgement before answering 451.
    ack_timeout_s: float = 10.0
    # Session processes sharing the port (pipeline/smtp/server.py); 0: one per CPU.
    processes: int = 0
    # Relays (addresses or networks) whose XFORWARD is believed: an MTA in front, such as Postfix.
    # Their connections are not limited as clients; the client they forward is.
    xforward_hosts: tuple[str, ...] = ()
    # -- limits (pipeline/smtp/limits.py), Postfix's names and defaults where they exist ------
    # Open sessions at once. Each may hold a message of up to max_message_bytes in memory, so this
    # bounds memory and file descriptors under a connection flood.
    max_connections: int = 500
    # A sender that reconnects is normal; one connection carrying a flood is cut off.
    max_messages_per_connection: int = 100
    # Postfix opens at most 20 connections to one destination (default_destination_concurrency_limit):
    # a client holding more is not an MTA delivering mail. A network (/24, /64) gets a little more.
    max_connections_per_client: int = 20
    max_connections_per_network: int = 50
    # New connections a second per client, with a burst: a queue flush may open several at once,
    # a spambot that reconnects for every message opens hundreds.
    client_connection_rate: float = 10.0
    client_connection_burst: int = 30
    # Messages a second per client (deferred with 450 beyond): above admission's flood floor, so a
    # busy source is first diverted to the bulk lane and only then slowed down.
    client_message_rate: float = 50.0
    client_message_burst: int = 100
    # Stress: when this share of max_connections is open (or admission diverts a flood, or the
    # event loop lags), clients without history get only stress_unknown_connections_per_client
    # connections each, together stress_unknown_share of the slots and
    # stress_unknown_transactions transactions at once (per session process).
    stress_connection_share: float = 0.5
    stress_unknown_share: float = 0.5
    stress_unknown_connections_per_client: int = 2
    stress_unknown_transactions: int = 4
    # Mail from clients without history, together, per session process: a flood spread over many
    # sources, each under every per-source limit, still shows here. Past the rate (and its burst)
    # a MAIL FROM from such a client gets 450 and the ingress is under stress; a new legitimate
    # sender's MTA retries in minutes, a spam run's bots are slowed down before any DATA.
    unknown_message_rate: float = 20.0
    unknown_message_burst: int = 40
    # A client is known after this many accepted messages over at least this long.
    known_after_messages: int = 5
    known_after_s: float = 30.0
    # Idle sessions are closed after this long; under stress sooner (Postfix: smtpd_timeout 300s, 10s).
    idle_timeout_s: float = 300.0
    stress_idle_timeout_s: float = 10.0
    # Error replies a session may collect before it is closed (Postfix: smtpd_hard_error_limit 20,
    # 1 under stress), and after how many each further one waits error_sleep_s first (a tarpit:
    # smtpd_soft_error_limit 10, smtpd_error_sleep_time 1s); under stress clients without
    # history wait from their first error.
    hard_error_limit: int = 20
    stress_hard_error_limit: int = 2
    soft_error_limit: int = 10
    error_sleep_s: float = 1.0
    # Under stress a client's held error replies double, each within 10 s of its last, up to this:
    # a bot that reconnects at once on every refusal then costs an accept every 10 s per connection
    # it tries, not every second. (An MTA waits 5 minutes for a greeting, RFC 5321 4.5.3.2.)
    stress_error_sleep_max_s: float = 10.0


@dataclass(frozen=True)
class PathSettings:
    data: Path = ROOT / "data"
    maildir_root: Path = ROOT / ".run" / "maildirs"
    quarantine_db: Path = ROOT / ".run" / "quarantine.sqlite3"
    # Users' Junk moves waiting for ``floodgate report-drain`` (pipeline/reports/): written by the
    # IMAPSieve pipe program as the mail user, on the mail store's host.
    report_spool: Path = ROOT / ".run" / "report-spool"
    registry: Path = ROOT / "models" / "registry"


@dataclass(frozen=True)
class WorkerSettings:
    batch_size: int = 200
    batch_timeout_s: float = 0.05
    metrics_host: str = "127.0.0.1"  # loopback by default: metrics are not for the world
    metrics_port: int = 0  # 0: no HTTP endpoint
    quarantine_retention_days: int = 30
    # The bulk lane's deliveries a second (0: unlimited). Flood mail the model lets through is
    # delivered, but never at a pace whose disk writes and fsyncs crowd out the priority lane's.
    bulk_delivery_rate: float = 200.0
    # A batch whose handling, publishing and commit took longer than this is logged with the time
    # of each phase (the ``floodgate_batch_seconds`` histogram has them all): one second is ham's
    # whole end-to-end target, so a batch this slow made its ham miss it.
    slow_batch_s: float = 1.0


@dataclass(frozen=True)
class DeliverySettings:
    """Where ``floodgate deliver`` puts ham: local Maildirs, or a downstream LMTP/SMTP server."""

    mode: str = "maildir"  # maildir | lmtp | smtp
    host: str = "127.0.0.1"
    port: int = 24  # the customary LMTP port over TCP; an absolute path as host means a Unix socket
    timeout_s: float = 30.0  # a downstream slower than this counts as down: the batch is retried
    local_hostname: str = "floodgate.localdomain"  # our name in LHLO/EHLO


@dataclass(frozen=True)
class AdmissionSettings:
    """Flood admission at ingress (pipeline/admission/): when a source counts as a flood."""

    flood_rate: float = 30.0  # msgs/s from one source, per ingress process, below which nothing floods
    surge: float = 4.0  # ...and above which a source floods when this many times its own baseline


@dataclass(frozen=True)
class AuthSettings:
    """Sender authentication at SMTP ingress (pipeline/smtp/auth.py): SPF, DKIM, ARC, DMARC.

    On by default, with the system's resolver: admission's known-good exemption trusts a name
    only once the message proved it, so with verification off a forger of a known-good sender
    rides the priority lane. It cannot stall SMTP (everything unfinished at ``budget_s`` is
    ``temperror``) nor prove anything on a DNS failure (``temperror`` proves nothing).
    """

    enabled: bool = True
    authserv_id: str = ""  # the id in our Authentication-Results; "" -> smtp.hostname
    nameservers: tuple[str, ...] = ()  # resolver addresses; empty -> /etc/resolv.conf
    dns_port: int = 53
    dns_backend: str = "aiodns"  # aiodns (c-ares, ~0.15 CPU ms a query) | dnspython (pure Python, ~0.45)
    budget_s: float = 2.0  # the most verification may add to one message; past it: temperror
    query_timeout_s: float = 1.5  # one DNS query (its answer still fills the cache after a budget ran out)
    cache_entries: int = 50_000
    failure_ttl_s: float = 10.0  # a timed-out or SERVFAIL name is not asked again for this long
    # The HELO identity (RFC 7208 2.3) is checked only when MAIL FROM's SPF did not pass: a pass
    # already proved the client may send for the sender, and the HELO result decides nothing then.
    helo: str = "unless-mailfrom-passes"  # always | unless-mailfrom-passes | never
    arc: bool = True
    max_signatures: int = 5  # DKIM signatures evaluated per message (each hashes the body again)
    process_above_bytes: int = 256 * 1024  # DKIM/ARC of bigger messages in a worker process


@dataclass(frozen=True)
class WebSettings:
    """``floodgate web`` (pipeline/web/) and the digests' links (``floodgate digest``)."""

    host: str = "127.0.0.1"  # loopback by default: put a TLS-terminating proxy in front
    port: int = 8025
    # Where people reach the web worker, as the links in digests must name it (no trailing /).
    public_url: str = "http://127.0.0.1:8025"
    # Signs operators' sessions and recipients' links (itsdangerous, HMAC-SHA1 over a key derived
    # per purpose). Empty: the web worker makes one at start (sessions and links then die with the
    # process) and ``floodgate digest`` refuses to run. Set it (FLOODGATE_WEB_SECRET_KEY) from a
    # secret store, at least 32 random bytes.
    secret_key: str = ""
    # A recipient's link is good for this long: long enough to act on a digest after a weekend.
    link_max_age_days: float = 7.0
    # An operator's session ends after this long, used or not (a working day and a bit).
    session_max_age_s: float = 10 * 3600.0
    # Digests: a period's name and length ("day": one digest per recipient and UTC day).
    digest_period: str = "day"
    digest_from: str = "quarantine@floodgate.localdomain"  # the digest's From: header


@dataclass(frozen=True)
class Settings:
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    paths: PathSettings = field(default_factory=PathSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    web: WebSettings = field(default_factory=WebSettings)

    def topic(self, key: str) -> str:
        """The real name of a topic from infra/topics.toml, by its key (``inbound``, ``ham``, ...)."""
        return self.kafka.topic_prefix + topic_spec()["topics"][key]["name"]

    def group(self, worker: str) -> str:
        return f"{self.kafka.group_prefix}.{worker}"


@cache
def topic_spec() -> dict[str, Any]:
    with TOPIC_SPEC.open("rb") as f:
        return tomllib.load(f)


# What an environment variable may say for a boolean setting (``environment`` writes True/False).
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _coerce(value: str, kind: Any) -> Any:
    kind = str(kind)
    if kind == "bool":
        word = value.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(f"not a boolean: {value!r}")
    if "tuple" in kind:
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if "int" in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    if "Path" in kind:
        return Path(value)
    return value


def _section(cls: type, toml: dict[str, Any], prefix: str, env: dict[str, str]) -> Any:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in toml:
            raw = toml[f.name]
            values[f.name] = tuple(raw) if isinstance(raw, list) else raw
            if "Path" in str(f.type):
                values[f.name] = Path(raw)
        name = f"FLOODGATE_{prefix}_{f.name}".upper()
        if name in env:
            values[f.name] = _coerce(env[name], f.type)
    return cls(**values)


def load(path: Path | None = None, env: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if env is None else env)
    if path is None:
        path = Path(env.get("FLOODGATE_CONFIG", "floodgate.toml"))
    toml: dict[str, Any] = {}
    if path.exists():
        with path.open("rb") as f:
            toml = tomllib.load(f)
    if "KAFKA_BOOTSTRAP_SERVERS" in env and "FLOODGATE_KAFKA_BOOTSTRAP_SERVERS" not in env:
        env["FLOODGATE_KAFKA_BOOTSTRAP_SERVERS"] = env["KAFKA_BOOTSTRAP_SERVERS"]
    return Settings(
        kafka=_section(KafkaSettings, toml.get("kafka", {}), "kafka", env),
        smtp=_section(SmtpSettings, toml.get("smtp", {}), "smtp", env),
        paths=_section(PathSettings, toml.get("paths", {}), "paths", env),
        worker=_section(WorkerSettings, toml.get("worker", {}), "worker", env),
        delivery=_section(DeliverySettings, toml.get("delivery", {}), "delivery", env),
        admission=_section(AdmissionSettings, toml.get("admission", {}), "admission", env),
        auth=_section(AuthSettings, toml.get("auth", {}), "auth", env),
        web=_section(WebSettings, toml.get("web", {}), "web", env),
    )


def environment(settings: Settings) -> dict[str, str]:
    """The variables that make :func:`load` return exactly ``settings`` (every field of every
    section, so no ``floodgate.toml`` in the child's directory can change them): how a worker
    started as a child process gets its parent's settings."""
    env: dict[str, str] = {}
    for section in dataclasses.fields(settings):
        values = getattr(settings, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            env[f"FLOODGATE_{section.name}_{f.name}".upper()] = (
                ",".join(value) if isinstance(value, tuple) else str(value))
    return env


def private(settings: Settings, tag: str, workdir: Path, *, bootstrap: str | None = None,
            registry: Path | None = None) -> Settings:
    """``settings`` with topics and consumer groups of their own (``tag`` and a random suffix as
    prefix) and Maildirs and a quarantine under ``workdir``, optionally on another cluster and
    with another model registry: how tests and benchmarks share a cluster and a host with each
    other and with a running deployment."""
    name = f"{tag}{uuid.uuid4().hex[:8]}"
    kafka = replace(settings.kafka, topic_prefix=f"{name}.", group_prefix=name,
                    bootstrap_servers=bootstrap or settings.kafka.bootstrap_servers)
    paths = replace(settings.paths, maildir_root=workdir / "maildirs", quarantine_db=workdir / "quarantine.sqlite3",
                    registry=registry or settings.paths.registry)
    return replace(settings, kafka=kafka, paths=paths)
