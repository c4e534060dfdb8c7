"""The product end to end, every worker its own process, on the real broker.

Corpus mail replayed into ``inbound`` must end exactly once in a Maildir, the quarantine or
the dead-letter topic — also when a classifier is SIGKILLed or SIGTERMed mid-stream — and
every routing on the ham/spam topics must exist exactly once (exactly-once transactions).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import urllib.request
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import TopicPartition

from models import corpus
from pipeline import kafka
from pipeline.admission import Admission
from pipeline.bench import accounting, traffic
from pipeline.core import config, events
from pipeline.kafka import topics
from pipeline.node import NICE, Node, spam_side_cpus
from tests.kafka_helpers import wait_for
from tests.worker_helpers import scrape

pytestmark = pytest.mark.kafka
DATA = config.ROOT / "data"


@pytest.fixture(scope="module")
def mail() -> tuple[list[corpus.Message], list[corpus.Message]]:
    msgs = list(corpus.load_spamassassin(DATA, groups=("easy_ham_2", "spam_2")))
    rng = random.Random(3)
    rng.shuffle(msgs)
    return [m for m in msgs if m.label == "ham"], [m for m in msgs if m.label == "spam"]


@pytest.fixture(scope="module")
def pipeline(bootstrap: str, trained_registry: Path, tmp_path_factory: pytest.TempPathFactory):
    """All workers of the standard deployment, as processes, on private topics."""
    tmp = tmp_path_factory.mktemp("pipeline")
    settings = config.private(config.load(env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap}), "e2e", tmp,
                              registry=trained_registry)
    admin = kafka.admin(settings)
    topics.apply(settings, admin)
    workers = Node(settings, tmp / "logs")
    workers.start_standard()
    yield settings, workers
    codes = workers.stop_all()
    topics.delete(settings, admin)
    assert all(c == 0 for c in codes.values()), f"workers did not exit cleanly on SIGTERM: {codes}"


def replay(settings, msgs: list[corpus.Message], seed: int) -> traffic.Sent:
    rng = random.Random(seed)
    plan = [traffic.Planned(0.0, m.raw, m.label or "ham", "base", traffic.envelope_for(m.raw, rng)) for m in msgs]
    admission = Admission(settings)
    try:
        return traffic.send(kafka.lane_producer(settings), admission.topic, plan)
    finally:
        admission.close()


def holds(found: accounting.Found, ids: set[str]) -> bool:
    """Every one of ``ids`` is in a mailbox, the quarantine or the dead letters ``found`` saw."""
    return ids <= set(found.delivered) | set(found.quarantined) | set(found.dead)


def placed(settings, ids: set[str]) -> accounting.Found | None:
    found = accounting.Found()
    accounting.scan_maildirs(settings.paths.maildir_root, found)
    accounting.scan_quarantine(settings.paths.quarantine_db, found)
    return found if holds(found, ids) else None


def routed_ids(settings, keys=("ham", "spam", "bulk_ham", "bulk_spam")) -> Counter:
    """Every event id on both lanes' ham and spam topics, as a read_committed consumer sees them
    (a replay as fast as it goes sends bursts that admission may divert to the bulk lane)."""
    consumer = kafka.consumer(settings, group=f"check-{uuid.uuid4().hex[:6]}")
    counts: Counter = Counter()
    try:
        assignment = []
        ends = {}
        for key in keys:
            topic = settings.topic(key)
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                tp = TopicPartition(topic, p)
                low, high = consumer.get_watermark_offsets(tp, timeout=10)
                if high > low:
                    ends[(topic, p)] = high
                    assignment.append(TopicPartition(topic, p, low))
        consumer.assign(assignment)
        positions_done: set = set()

        def drained() -> bool:
            for m in consumer.consume(500, 0.5):
                if m.error():
                    continue
                counts[events.decode(m.value()).id] += 1
            for tp in consumer.position(assignment):
                # read_committed stops at the last stable offset; markers occupy offsets too
                if tp.offset >= ends[(tp.topic, tp.partition)] - 1:
                    positions_done.add((tp.topic, tp.partition))
            return len(positions_done) == len(ends)

        wait_for(drained, timeout=60, what="ham and spam topics read to their end")
    finally:
        consumer.close()
    return counts


def test_replayed_corpus_is_accounted_exactly_once(pipeline, mail):
    settings, _ = pipeline
    ham, spam = mail
    sent = replay(settings, ham[:120] + spam[:80], seed=1)
    assert len(sent.acked) == 200
    found = wait_for(lambda: placed(settings, set(sent.acked)), timeout=120, what="200 messages placed")
    ledger = accounting.reconcile(sent.acked, found)
    assert ledger.ok, ledger.summary()
    assert ledger.placed["mailbox"] + ledger.placed["quarantine"] == 200
    # Routing follows the model (a small one here; `make evaluate` measures the real one):
    # nearly all truth-ham delivered, spam caught far above chance.
    ham_ids = {i for i in sent.acked if sent.labels[i] == "ham"}
    assert len(ham_ids & set(found.delivered)) >= 110
    assert len((set(sent.acked) - ham_ids) & set(found.quarantined)) >= 30


def test_the_spam_side_yields_the_cpu_to_the_ham_side(pipeline):
    _, workers = pipeline
    nice = {name: os.getpriority(os.PRIO_PROCESS, w.proc.pid) for name, w in workers.workers.items()}
    for ham_side in ("classify-priority", "deliver"):
        for spam_side in ("classify-bulk", "deliver-bulk", "cleanup", "reputation"):
            assert nice[ham_side] < nice[spam_side], nice
    if os.geteuid() == 0:  # allowed to raise priority: exactly as configured
        assert nice == {name: NICE.get(name, 0) for name in nice}


def test_every_worker_answers_health_and_readiness(pipeline):
    _, workers = pipeline
    for w in workers.workers.values():
        for path, body in (("/healthz", b"ok\n"), ("/readyz", b"ready\n")):
            with urllib.request.urlopen(f"http://127.0.0.1:{w.port}{path}", timeout=5) as r:
                assert (r.status, r.read()) == (200, body), (w.name, path)


def _batch_timings(port: int, phases: tuple[str, ...]) -> tuple[float, list[float]]:
    """From a worker's /metrics: its batches (less those sent back to be retried, which are
    counted as batches and as transient errors but not timed) and its timed count per phase."""
    samples = scrape(port)

    def value(name: str, **labels: str) -> float:  # a worker has one stage: no need to name it
        return sum(v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items())

    batches = value("floodgate_batch_size_count") - value("floodgate_errors_total", kind="transient")
    return batches, [value("floodgate_batch_seconds_count", phase=phase) for phase in phases]


def test_every_kafka_worker_times_each_phase_of_its_batches(pipeline, mail):
    settings, workers = pipeline
    ham, spam = mail
    sent = replay(settings, ham[200:210] + spam[200:210], seed=5)
    wait_for(lambda: placed(settings, set(sent.acked)), timeout=120, what="20 messages placed")
    timed: dict[str, float] = {}
    for w in workers.workers.values():
        if w.name == "reputation":  # a Faust app, not a Loop
            continue
        phases = ("handle", "commit") if w.name.startswith("classify") else ("handle", "publish", "commit")

        def consistent(port: int = w.port, phases: tuple[str, ...] = phases) -> tuple[float] | None:
            # A batch is counted when it is taken and timed when it is done: a scrape in between
            # sees one more batch than timings, so wait for the worker to finish what it holds.
            batches, counts = _batch_timings(port, phases)
            return (batches,) if all(c == batches for c in counts) else None

        (timed[w.name],) = wait_for(consistent, timeout=30, what=f"{w.name}'s batches all timed, phase by phase")
    assert timed["classify-priority"] + timed["classify-bulk"] > 0, timed
    assert timed["deliver"] + timed["deliver-bulk"] > 0 and timed["cleanup"] > 0, timed


def test_the_spam_side_keeps_off_the_ham_sides_cpus(pipeline):
    _, workers = pipeline
    if workers.spam_cpus is None:
        pytest.skip("a single CPU, or no CPU affinity (taskset) on this host")
    cpus = {name: os.sched_getaffinity(w.proc.pid) for name, w in workers.workers.items()}
    for ham_side in ("classify-priority", "deliver"):
        assert cpus[ham_side] == os.sched_getaffinity(0), cpus  # may run anywhere
        for spam_side in ("classify-bulk", "deliver-bulk", "cleanup", "reputation"):
            assert cpus[spam_side] < cpus[ham_side], cpus  # a strict subset: some CPUs are the ham side's


@pytest.mark.parametrize(("available", "spec", "expected"), [
    ({0, 1}, None, "1"),
    ({0, 1, 2}, "auto", "2"),
    ({0, 1, 2, 3}, None, "2,3"),
    ({4, 5, 6, 7}, None, "6,7"),  # the CPUs this process may use, not 0..n
    ({0}, None, None),  # one CPU: nothing to keep apart
    ({0, 1}, "all", None),
    ({0, 1, 2, 3}, "2-3", "2-3"),
    ({0, 1, 2, 3}, "1,3", "1,3"),
])
def test_spam_side_cpus(available, spec, expected):
    assert spam_side_cpus(available, spec) == expected


@pytest.mark.parametrize("spec", ["half", "-1", "1-", "1,,2", "1-2-3"])
def test_spam_side_cpus_rejects_what_taskset_would_not_take(spec):
    with pytest.raises(ValueError, match="FLOODGATE_SPAM_SIDE_CPUS"):
        spam_side_cpus({0, 1}, spec)


def test_classifier_killed_mid_stream_loses_and_duplicates_nothing(pipeline, mail):
    settings, workers = pipeline
    ham, spam = mail
    msgs = ham[120:420] + spam[80:280]
    random.Random(5).shuffle(msgs)
    before = routed_ids(settings)
    sent = replay(settings, msgs[:250], seed=2)
    # Kill as soon as part of this batch has been routed, so the kill lands mid-stream.
    wait_for(lambda: len(set(routed_ids(settings, ("ham", "spam"))) & set(sent.acked)) >= 20, timeout=60,
             what="priority-lane routing under way")
    workers.kill("classify-priority")
    more = replay(settings, msgs[250:], seed=3)
    workers.restart("classify-priority")
    workers.wait_ready()
    ids = set(sent.acked) | set(more.acked)
    found = wait_for(lambda: placed(settings, ids), timeout=180, what="all messages placed after the kill")
    ledger = accounting.reconcile(ids, found)
    assert ledger.ok, ledger.summary()
    routed = routed_ids(settings) - before
    assert {i: n for i, n in routed.items() if i in ids and n != 1} == {}, "an event routed twice"
    assert ids <= set(routed) | set(found.dead)


def test_sigterm_mid_batch_exits_zero_and_keeps_exactly_once(pipeline, mail):
    settings, workers = pipeline
    ham, spam = mail
    before = routed_ids(settings)
    sent = replay(settings, ham[420:620] + spam[280:380], seed=4)
    wait_for(lambda: len(set(routed_ids(settings, ("ham", "spam"))) & set(sent.acked)) >= 10, timeout=60,
             what="priority-lane routing under way")
    assert workers.stop("classify-priority") == 0
    workers.restart("classify-priority")
    workers.wait_ready()
    found = wait_for(lambda: placed(settings, set(sent.acked)), timeout=180, what="all placed after SIGTERM")
    assert accounting.reconcile(sent.acked, found).ok
    routed = routed_ids(settings) - before
    assert all(routed[i] == 1 for i in sent.acked if i in routed)


def test_malformed_records_are_dead_lettered_with_a_reason_and_work_goes_on(pipeline, mail):
    settings, _ = pipeline
    producer = kafka.producer(settings)
    producer.produce(settings.topic("inbound"), key=b"junk-1", value=b"\x00\x01 not an event")
    producer.produce(settings.topic("bulk"), key=b"junk-2", value=b'{"v":1,"id":"x"}\nno envelope')
    assert producer.flush(30) == 0
    # Mail that is hostile but a valid event is classified, not dropped.
    env = events.Envelope("x@spam.example", ("user1@example.com",), "203.0.113.77")
    hostile = events.new_event(env, b"Content-Type: multipart/mixed; boundary=\"\r\n\r\n--\x00\xff" * 50)
    producer.produce(settings.topic("inbound"), key=hostile.key, value=events.encode(hostile))
    assert producer.flush(30) == 0
    after = replay(settings, mail[0][620:640], seed=6)

    def dead_and_done() -> accounting.Found | None:
        # One scan decides and is returned: a second one could see mail the first had not.
        found = accounting.scan(settings)
        reasons = [r for r in found.dead.values()]
        ok = (sum(r.startswith("classify: not a mail event") for r in reasons) >= 2
              and holds(found, set(after.acked) | {hostile.id}))
        return found if ok else None

    found = wait_for(dead_and_done, timeout=120, what="dead letters with reasons, later mail placed")
    assert hostile.id in set(found.delivered) | set(found.quarantined)


def test_classify_refuses_to_start_without_a_model(topic_settings, tmp_path):
    no_model = replace(topic_settings, paths=replace(topic_settings.paths, registry=tmp_path / "empty"))
    env = {**config.environment(no_model), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "classify", "--lane", "priority"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "no model in the registry" in proc.stdout + proc.stderr
