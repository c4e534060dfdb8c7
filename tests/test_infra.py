"""The deployment files in infra/, checked without running them (no Docker engine or Kubernetes
cluster exists on the development machines): Prometheus rules and config with promtool, the
Grafana dashboard's queries against pipeline/core/metrics.py, Kubernetes manifests against the
Kubernetes schemas, and the ScaledObjects, Compose services and Dockerfile against the code's
own group, topic and command names."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer.main
import yaml
from prometheus_client.metrics import MetricWrapperBase

from pipeline.cli import app
from pipeline.core import metrics
from pipeline.core.config import Settings
from pipeline.lag import GROUP_INPUTS

INFRA = Path(__file__).resolve().parents[1] / "infra"
K8S = INFRA / "k8s"
PROM = INFRA / "prometheus"
K8S_VERSION = "1.33"  # a Kubernetes release the manifests must be valid for
METRIC_NAME = re.compile(r"\b(?:floodgate|kafka)_[a-zA-Z0-9_]+")
# The workers whose group KEDA scales; reputation (Faust tables) is deliberately not autoscaled.
SCALED = ("classify-priority", "classify-bulk", "deliver", "deliver-bulk", "cleanup")
WORKERS = ("smtp", "reputation", "classify-priority", "classify-bulk", "deliver", "deliver-bulk", "cleanup", "lag",
           "web")


def known_metrics() -> set[str]:
    """Every series name pipeline/core/metrics.py can expose."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "info": ("_info",), "gauge": ("",)}
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            names |= {value._name + s for s in suffixes[value._type]}
    return names


def metric_names(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def cli_commands() -> set[str]:
    return set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f.name, d) for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


def configmap() -> dict[str, str]:
    return of_kind("ConfigMap")["floodgate-config"]["data"]


def deployed_settings() -> Settings:
    """The settings the Kubernetes workers run with (prefixes from the ConfigMap)."""
    data, base = configmap(), Settings()
    return replace(base, kafka=replace(base.kafka, topic_prefix=data["FLOODGATE_KAFKA_TOPIC_PREFIX"],
                                       group_prefix=data["FLOODGATE_KAFKA_GROUP_PREFIX"]))


def worker_of(args: list[str]) -> str:
    """The worker a container's arguments run: its command, with the lane where it has lanes
    (classify has no lane-less name; deliver's priority lane is plain ``deliver``)."""
    lane = args[args.index("--lane") + 1] if "--lane" in args else "priority"
    if args[0] == "classify":
        return f"classify-{lane}"
    return args[0] if lane == "priority" else f"{args[0]}-{lane}"


# -- Prometheus ---------------------------------------------------------------------------------
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (`make tools` installs it)")


@needs_promtool
@pytest.mark.parametrize("args", [["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                                  ["test", "rules", "alerts_test.yml"]], ids=" ".join)
def test_promtool(args: list[str]) -> None:
    done = subprocess.run([promtool, *args], cwd=PROM, capture_output=True, text=True, timeout=60)  # type: ignore[list-item]
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_name_known_metrics() -> None:
    rules = [r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert {"FloodgateHamLatencyOverObjective", "FloodgateHamLagOverObjective", "FloodgateHamGroupStalled",
            "FloodgateDeadLetters", "FloodgateNoModelLoaded", "FloodgateWorkerDown"} <= {r["alert"] for r in rules}
    for r in rules:
        assert metric_names(r["expr"]) <= known_metrics(), r["alert"]


def test_prometheus_scrapes_every_compose_worker() -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{w}:9400" for w in WORKERS}


# -- Grafana ------------------------------------------------------------------------------------
def test_grafana_dashboard_queries_known_metrics() -> None:
    dashboard = json.loads((INFRA / "grafana" / "floodgate.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    used: set[str] = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = metric_names(t["expr"])
            assert names, f"{p['title']}: {t['expr']}"
            assert names <= known_metrics(), f"{p['title']}: unknown {names - known_metrics()}"
            used |= names
    assert {"kafka_consumergroup_lag", "kafka_consumergroup_group_lag_seconds",
            "floodgate_end_to_end_latency_seconds_bucket", "floodgate_messages_total",
            "floodgate_dead_letters_total", "floodgate_model_info", "floodgate_consumergroup_status"} <= used


# -- Kubernetes ---------------------------------------------------------------------------------
def test_manifests_are_valid_kubernetes() -> None:
    docs = k8s_docs()
    assert docs
    for name, doc in docs:
        if doc["kind"] in ("ScaledObject", "Kustomization"):  # custom resources: checked below
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"].get("namespace", "floodgate") == "floodgate", name


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")


def test_a_deployment_per_worker_with_probes() -> None:
    deployments = of_kind("Deployment")
    port = int(configmap()["FLOODGATE_WORKER_METRICS_PORT"])
    commands = cli_commands()
    assert set(deployments) == {f"floodgate-{w}" for w in WORKERS}
    for name, d in deployments.items():
        (container,) = d["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] in commands, name
        assert worker_of(container["args"]) == name.removeprefix("floodgate-")
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == port
        live, ready = container["livenessProbe"], container["readinessProbe"]
        assert (live["httpGet"]["path"], live["httpGet"]["port"]) == ("/healthz", "metrics"), name
        assert (ready["httpGet"]["path"], ready["httpGet"]["port"]) == ("/readyz", "metrics"), name
        assert d["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_scaled_objects_name_the_workers_groups_and_topics() -> None:
    s = deployed_settings()
    spec = tomllib.loads((INFRA / "topics.toml").read_text())["topics"]
    deployments = of_kind("Deployment")
    scaled = of_kind("ScaledObject")
    assert len(scaled) == len(SCALED)
    seen = set()
    for so in scaled.values():
        target = so["spec"]["scaleTargetRef"]["name"]
        worker = worker_of(deployments[target]["spec"]["template"]["spec"]["containers"][0]["args"])
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        topic_keys = GROUP_INPUTS[worker]
        assert trigger["type"] == "kafka"
        assert meta["consumerGroup"] == s.group(worker)
        if len(topic_keys) == 1:
            assert meta["topic"] == s.topic(topic_keys[0])
        else:  # a group on several topics: KEDA counts every topic the group has offsets on
            assert "topic" not in meta
        assert meta["bootstrapServers"] == configmap()["FLOODGATE_KAFKA_BOOTSTRAP_SERVERS"]
        partitions = max(spec[k]["partitions"] for k in topic_keys)
        # One replica per partition at most; cleanup stays at one (its SQLite quarantine).
        assert so["spec"]["maxReplicaCount"] == (1 if worker == "cleanup" else partitions)
        assert int(meta["lagThreshold"]) > 0 and int(meta["activationLagThreshold"]) >= 0
        # No lane sleeps at zero (mail would wait); activation is sized for the lag that commit
        # markers leave on a caught-up group (one per partition) should that change.
        assert so["spec"]["minReplicaCount"] >= 1
        assert int(meta["activationLagThreshold"]) >= partitions
        assert meta["excludePersistentLag"] == "true"
        seen.add(worker)
    assert seen == set(SCALED)  # each lane its own ScaledObject: ham and spam scale independently


# -- Compose and Dockerfile ---------------------------------------------------------------------
def test_compose_runs_kafka_4_kraft_topics_workers_and_prometheus() -> None:
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.2"
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert services["topics"]["command"] == ["topics", "apply"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    commands = cli_commands()
    for w in WORKERS:
        svc = services[w]
        assert svc["command"][0] in commands and worker_of(svc["command"]) == w
        assert svc["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert svc["environment"]["FLOODGATE_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
        assert svc["build"]["dockerfile"] == "infra/Dockerfile"
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


def dockerfile() -> list[list[str]]:
    """The Dockerfile's instructions as [op, arguments], continuation lines joined."""
    text = "\n".join(ln for ln in (INFRA / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#"))
    logical = [" ".join(ln.split()) for ln in text.replace("\\\n", " ").splitlines() if ln.strip()]
    return [ln.split(None, 1) for ln in logical]


def image_env() -> dict[str, str]:
    return dict(kv.split("=", 1) for op, args in dockerfile() if op == "ENV" for kv in args.split())


def test_state_volumes_are_where_the_image_settings_point() -> None:
    env = image_env()
    registry, maildirs = env["FLOODGATE_PATHS_REGISTRY"], env["FLOODGATE_PATHS_MAILDIR_ROOT"]
    quarantine = str(Path(env["FLOODGATE_PATHS_QUARANTINE_DB"]).parent)
    made = " ".join(args for op, args in dockerfile() if op == "RUN" and "mkdir" in args)
    assert all(d in made for d in (registry, maildirs, quarantine)), "the image creates them for its user"

    def mounts(d: dict[str, Any]) -> set[str]:
        (c,) = d["spec"]["template"]["spec"]["containers"]
        return {m["mountPath"] for m in c.get("volumeMounts", [])}

    deployments = of_kind("Deployment")
    assert registry in mounts(deployments["floodgate-classify-priority"])
    assert registry in mounts(deployments["floodgate-classify-bulk"])
    assert quarantine in mounts(deployments["floodgate-cleanup"])
    services = yaml.safe_load((INFRA / "docker-compose.yml").read_text())["services"]

    def targets(name: str) -> set[str]:
        return {v.split(":")[1] for v in services[name].get("volumes", [])}

    assert registry in targets("classify-priority") and registry in targets("classify-bulk")
    assert maildirs in targets("deliver") and quarantine in targets("cleanup")


def test_dockerfile_slim_non_root_floodgate_entrypoint() -> None:
    instructions = dockerfile()
    text = " ".join(f"{op} {args}" for op, args in instructions)
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    users = [i for i, (op, _) in enumerate(instructions) if op == "USER"]
    runs = [i for i, (op, _) in enumerate(instructions) if op == "RUN"]
    assert users and users[-1] > runs[-1] and instructions[users[-1]][1] not in ("root", "0")
    assert ["ENTRYPOINT", '["floodgate"]'] in instructions
    assert ["COPY", "infra/topics.toml ./infra/topics.toml"] in instructions  # the settings read it
    assert "FLOODGATE_WORKER_METRICS_PORT=9400" in text and "FLOODGATE_WORKER_METRICS_HOST=0.0.0.0" in text


# --- systemd: a unit per worker, a target for the node ---------------------------------------

SYSTEMD = INFRA / "systemd"
INSTALLED_FLOODGATE = "/opt/floodgate/venv/bin/floodgate"


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file's sections, each key with every value it is given (systemd keys repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_a_systemd_unit_per_worker_restarting_always_and_a_target_for_the_node() -> None:
    from pipeline.node import NICE, NODE

    units = {p.name.removeprefix("floodgate-").removesuffix(".service"): unit(p)
             for p in SYSTEMD.glob("floodgate-*.service")}
    assert set(units) == set(NODE)
    target = unit(SYSTEMD / "floodgate.target")
    assert set(target["Unit"]["Wants"][0].split()) == {f"floodgate-{n}.service" for n in NODE}
    for name, u in units.items():
        service = u["Service"]
        assert service["ExecStart"] == [" ".join([INSTALLED_FLOODGATE, *NODE[name]])], name
        assert service["Restart"] == ["always"] and u["Unit"]["StartLimitIntervalSec"] == ["0"], name
        assert f"FLOODGATE_INSTANCE=%H-{name}" in service["Environment"], name
        assert int(service.get("Nice", ["0"])[0]) == NICE.get(name, 0), name
        assert u["Unit"]["PartOf"] == ["floodgate.target"] and u["Install"]["WantedBy"] == ["floodgate.target"]
    ports = [s["Service"]["Environment"] for s in units.values()]
    assert len({e for env in ports for e in env if e.startswith("FLOODGATE_WORKER_METRICS_PORT=")}) == len(units)


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    # The units name the installed command; here the checkout's own one stands in for it.
    here = shutil.which("floodgate") or str(Path(sys.executable).with_name("floodgate"))
    for f in SYSTEMD.iterdir():
        (tmp_path / f.name).write_text(f.read_text().replace(INSTALLED_FLOODGATE, here))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# --- Postfix in front, Dovecot behind (tests/test_mailsystem.py runs them) -------------------------

POSTFIX = INFRA / "postfix"
DOVECOT = INFRA / "dovecot"


def test_postfix_takes_only_what_floodgate_takes_and_hands_it_over_with_xforward() -> None:
    """Whatever Postfix accepts and Floodgate then refuses with 5xx bounces to a (forged) sender:
    backscatter. So Postfix's domains are Floodgate's, its size limit below Floodgate's, and its
    transport goes to floodgate smtp's default address with XFORWARD."""
    from pipeline.bench.mailstack import master_cf_services, read_main_cf, transport_domains
    from pipeline.core.config import SmtpSettings

    smtp = SmtpSettings()
    main = read_main_cf(POSTFIX / "main.cf")
    assert main["relay_domains"].split() == list(smtp.domains)
    assert int(main["message_size_limit"]) < smtp.max_message_bytes
    assert int(main["floodgate_destination_recipient_limit"]) <= smtp.max_recipients
    assert main["relay_recipient_maps"] and main["mydestination"] == "" and main["local_recipient_maps"] == ""
    assert transport_domains(POSTFIX / "floodgate-transport") == {
        d: f"floodgate:[{smtp.host}]:{smtp.port}" for d in smtp.domains}
    service = master_cf_services(POSTFIX / "master.cf")
    assert service.split()[:8] == ["floodgate", "unix", "-", "-", "n", "-", "-", "smtp"]
    assert "-o smtp_send_xforward_command=yes" in service


def test_dovecot_listens_where_floodgate_delivers_and_pipes_moves_to_the_spool() -> None:
    from pipeline.core.config import DeliverySettings

    conf = (DOVECOT / "floodgate.conf").read_text()
    lmtp = re.search(r"service lmtp \{\s*inet_listener lmtp \{\s*address = (\S+)\s*port = (\d+)", conf)
    assert lmtp and (lmtp.group(1), int(lmtp.group(2))) == (DeliverySettings().host, DeliverySettings().port)
    bin_dir = re.search(r"sieve_pipe_bin_dir = (\S+)", conf).group(1)  # type: ignore[union-attr]
    for label, script in (("spam", "report-spam.sieve"), ("ham", "report-ham.sieve")):
        assert f"file:/etc/dovecot/floodgate/{script}" in conf
        assert f'pipe :copy "floodgate-report" ["{label}", "${{username}}"];' in (DOVECOT / script).read_text()
    assert bin_dir == "/etc/dovecot/floodgate/bin"
    program = (DOVECOT / "floodgate-report").read_text()
    drain = unit(DOVECOT / "floodgate-report-drain.service")["Service"]
    spool = re.search(r"^exec .* --spool (\S+)", program, re.M).group(1)  # type: ignore[union-attr]
    assert f"FLOODGATE_PATHS_REPORT_SPOOL={spool}" in drain["Environment"]
    assert spool in drain["ReadWritePaths"][0].split()
    assert drain["ExecStart"] == [f"{INSTALLED_FLOODGATE} report-drain"] and drain["Restart"] == ["always"]
    assert (DOVECOT / "floodgate-report").stat().st_mode & 0o111


def test_systemd_analyze_verifies_the_report_drain_unit(tmp_path: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    here = shutil.which("floodgate") or str(Path(sys.executable).with_name("floodgate"))
    path = tmp_path / "floodgate-report-drain.service"
    path.write_text((DOVECOT / path.name).read_text().replace(INSTALLED_FLOODGATE, here))
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
