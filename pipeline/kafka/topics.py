"""Apply infra/topics.toml to a cluster: create what is missing, report drift, destroy nothing."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewPartitions,
    NewTopic,
)
from tenacity import RetryCallState, retry, retry_if_result, stop_after_delay, wait_fixed

from pipeline.core.config import Settings, topic_spec

TIMEOUT_S = 30.0
# The Faust apps among the workers, by the name their consumer group takes (reputation.STAGE;
# not imported, to keep Faust out of the topic tooling): see app_topics.
STREAM_APPS = ("reputation",)


@dataclass(frozen=True)
class TopicSpec:
    key: str
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]


def desired(settings: Settings) -> list[TopicSpec]:
    spec = topic_spec()
    defaults = spec["defaults"]
    rf = int(os.environ.get("FLOODGATE_REPLICATION_FACTOR", defaults["replication_factor"]))
    isr = int(os.environ.get("FLOODGATE_MIN_INSYNC", defaults["min_insync_replicas"]))
    out = []
    for key, t in spec["topics"].items():
        merged: dict[str, Any] = defaults | t
        out.append(TopicSpec(
            key=key,
            name=settings.topic(key),
            partitions=int(merged["partitions"]),
            replication_factor=rf,
            config={
                "cleanup.policy": merged["cleanup_policy"],
                "retention.ms": str(merged["retention_ms"]),
                "min.insync.replicas": str(min(isr, rf)),
                "max.message.bytes": str(merged["max_message_bytes"]),
            },
        ))
    return out


def _describe_configs(admin: AdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    if not names:
        return {}
    futures = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, n) for n in names])
    return {res.name: {k: v.value for k, v in fut.result(TIMEOUT_S).items()} for res, fut in futures.items()}


def _still_unseen(state: RetryCallState) -> NoReturn:
    unseen = state.outcome.result() if state.outcome else "?"
    raise TimeoutError(f"created topics not in the metadata after {TIMEOUT_S:.0f} s: {unseen}")


@retry(retry=retry_if_result(bool), stop=stop_after_delay(TIMEOUT_S), wait=wait_fixed(0.1),
       retry_error_callback=_still_unseen)
def _unseen(admin: AdminClient, names: list[str]) -> list[str]:
    """Of ``names``, the topics the metadata does not show yet with a leader for every partition.
    The controller acknowledges a creation before every broker knows the topic: a worker, or a
    second ``apply``, started at once would not find it. Retried until none is left."""
    found = admin.list_topics(timeout=TIMEOUT_S).topics
    return [n for n in names
            if n not in found or not found[n].partitions or any(p.leader < 0 for p in found[n].partitions.values())]


def wait_visible(admin: AdminClient, names: list[str]) -> None:
    """Return once the metadata shows every topic of ``names`` with a leader for every
    partition; TimeoutError after ``TIMEOUT_S``."""
    _unseen(admin, names)


def apply(settings: Settings, admin: AdminClient, dry_run: bool = False) -> list[str]:
    """Bring the cluster to the spec. Returns one line per change made (or, dry, to make) and per drift."""
    report: list[str] = []
    topics = desired(settings)
    metadata = admin.list_topics(timeout=TIMEOUT_S).topics
    missing = [t for t in topics if t.name not in metadata]
    if missing and not dry_run:
        futures = admin.create_topics(
            [NewTopic(t.name, t.partitions, t.replication_factor, config=t.config) for t in missing],
            operation_timeout=TIMEOUT_S,
        )
        for fut in futures.values():
            try:
                fut.result(TIMEOUT_S)
            except KafkaException as e:
                if "TOPIC_ALREADY_EXISTS" not in str(e):  # a concurrent apply won the race
                    raise
        _unseen(admin, [t.name for t in missing])  # applied means usable
    report += [f"create {t.name} partitions={t.partitions} rf={t.replication_factor}" for t in missing]

    existing = [t for t in topics if t.name in metadata]
    current = _describe_configs(admin, [t.name for t in existing])
    grow: list[NewPartitions] = []
    for t in existing:
        parts = metadata[t.name].partitions
        have = len(parts)
        if have < t.partitions:
            grow.append(NewPartitions(t.name, t.partitions))
            report.append(f"grow {t.name} partitions {have} -> {t.partitions}")
        elif have > t.partitions:
            report.append(f"DRIFT {t.name} has {have} partitions, spec says {t.partitions} (not shrinking)")
        rf = len(next(iter(parts.values())).replicas) if parts else 0
        if rf != t.replication_factor:
            report.append(f"DRIFT {t.name} replication factor {rf}, spec says {t.replication_factor}"
                          " (reassign partitions to change it)")
        changes = {k: v for k, v in t.config.items() if current[t.name].get(k) != v}
        if changes:
            report += [f"set {t.name} {k}={v} (was {current[t.name].get(k)})" for k, v in changes.items()]
            if not dry_run:
                resource = ConfigResource(
                    ConfigResource.Type.TOPIC, t.name,
                    incremental_configs=[ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
                                         for k, v in changes.items()],
                )
                for fut in admin.incremental_alter_configs([resource]).values():
                    fut.result(TIMEOUT_S)
    if grow and not dry_run:
        for fut in admin.create_partitions(grow, operation_timeout=TIMEOUT_S).values():
            fut.result(TIMEOUT_S)
    return report


def app_topics(settings: Settings, existing: Iterable[str], apps: Iterable[str] = STREAM_APPS) -> list[str]:
    """The topics the stream apps of this deployment made for themselves (changelogs,
    repartition and assignor topics). Faust names them after the app id, which is a consumer
    group of the deployment: ``<group prefix>.<app>-…``."""
    prefixes = tuple(f"{settings.group(app)}-" for app in apps)
    return sorted(t for t in existing if t.startswith(prefixes))


def delete(settings: Settings, admin: AdminClient) -> None:
    """Delete a private deployment's topics: every topic of the spec and those its stream apps
    made (:func:`app_topics`). For tests and benchmarks, which run under a prefix of their own;
    left behind, they add up: 1,270 leftover topics made a freshly started broker spend 62 CPU-s
    instead of 47 on a shortened flood run. A deployment without a topic prefix is refused: its
    topics are nobody's scratch space."""
    if not settings.kafka.topic_prefix:
        raise ValueError("refusing to delete the topics of a deployment without a topic prefix")
    existing = admin.list_topics(timeout=TIMEOUT_S).topics
    names = sorted({t.name for t in desired(settings) if t.name in existing} | set(app_topics(settings, existing)))
    if names:
        for fut in admin.delete_topics(names, operation_timeout=TIMEOUT_S).values():
            fut.result(TIMEOUT_S)
