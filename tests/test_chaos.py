"""Fault injection, short: the workers SIGKILLed one kind at a time, the delivery target down,
and one broker of three killed, all mid-stream — and still every acknowledged message ends in
exactly one of a mailbox, the quarantine or the dead-letter topic. (`make chaos` is the long run.)
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.bench import chaos
from pipeline.core import config

pytestmark = pytest.mark.kafka


def base_settings(bootstrap: str | None, registry: Path) -> config.Settings:
    s = config.load(env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap} if bootstrap else None)
    return replace(s, paths=replace(s.paths, registry=registry))


def check(result: chaos.RunResult, plan: chaos.Plan) -> None:
    timeline = [(f.kind, f.target, f.recovery_s, f.behind) for f in result.faults]
    assert len(result.sent.acked) == plan.messages, "the broker did not acknowledge every message"
    assert result.ledger.ok, result.ledger.summary()
    assert result.ledger.placed["mailbox"] > 0 and result.ledger.placed["quarantine"] > 0
    assert [f.kind for f in result.faults] == list(plan.faults)
    assert all(f.recovered_at is not None for f in result.faults), f"a group did not catch up: {timeline}"
    # Exit 75 is the worker's watchdog asking for a restart (a librdkafka call hung past its
    # timeout, see pipeline/kafka/loop.py); anything else is a worker that died.
    assert [c for c in result.crashes if " exited with 75 " not in c] == [], "a worker died without being killed"
    assert all(code == 0 for code in result.exit_codes.values()), result.exit_codes


def test_every_worker_killed_and_delivery_down_lose_and_duplicate_nothing(bootstrap, trained_registry, tmp_path):
    plan = chaos.Plan(messages=4000, rate=50.0, outage_s=3.0, warmup_s=2.0, gap_s=0.5, recovery_timeout_s=120.0,
                      faults=(*(f"kill:{w}" for w in chaos.INPUTS), "maildir-down"), cycle=False)
    result = chaos.run_one(base_settings(bootstrap, trained_registry), plan, tmp_path, own_cluster=False,
)
    check(result, plan)
    # The faults hit a pipeline with mail in flight, not an idle one.
    assert all(f.at < result.sent.start + plan.messages / plan.rate for f in result.faults)


@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
                    reason="KAFKA_BOOTSTRAP_SERVERS names a cluster: the local three-broker cluster is not started")
def test_one_of_three_brokers_killed_mid_stream_loses_and_duplicates_nothing(bootstrap, trained_registry, tmp_path):
    plan = chaos.Plan(messages=2000, rate=100.0, brokers=3, broker_down_s=5.0, warmup_s=3.0,
                      recovery_timeout_s=120.0, faults=("broker-kill",), cycle=False)
    result = chaos.run_one(base_settings(None, trained_registry), plan, tmp_path)
    check(result, plan)
    assert result.plan["bootstrap"].count(",") == 2
