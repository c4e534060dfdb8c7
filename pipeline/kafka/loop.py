"""The one consume → process → produce loop every Kafka worker runs.

A worker supplies a handler that turns a batch of records into output records. The loop owns
everything Kafka: subscribing, batching, transactions or commits, dead-lettering, retries and
shutdown. Two delivery modes:

* ``transactional=True`` (classify): consume-transform-produce in a Kafka
  transaction, the input offsets sent inside it, so a crash anywhere neither loses nor
  duplicates a routing.
* ``transactional=False`` (deliver, cleanup): the handler writes to an idempotent sink (keyed
  by event id); outputs (dead letters) are flushed, then offsets committed. A crash between
  the write and the commit replays the batch, and the sink ignores what it already has.

Failure policy:

* the handler raises :class:`TransientError` (a sink is down): nothing is committed, the
  batch is rewound and retried after a backoff that doubles up to ``MAX_BACKOFF_S``;
* the handler raises anything else: the batch is retried one record at a time, and a record
  that still fails goes to the dead-letter topic with the exception as its reason. One bad
  record never stops a worker;
* an output above :data:`RECORD_MAX` (no producer would ever accept it) counts as the handler
  failing on its input (:class:`RecordTooLarge`), so it is dead-lettered rather than retried forever;
* the broker side fails (a broker restart, a moving group coordinator): a failed offset commit,
  or a transaction that cannot be completed, is aborted where needed and retried like a
  transient error; a transactional producer that failed fatally (its transaction expired at the
  coordinator during the outage) is replaced by a new one with the same transactional id;
* a transactional call that blocks past its own timeout (librdkafka#5456/#5511: after a broker
  restart ``send_offsets_to_transaction`` can wait forever for a group coordinator it will never
  reach) is abandoned after :data:`TXN_CALL_DEADLINE_S`, its producer with it: a new producer with
  the same transactional id fences the stuck one, and the batch resumes from the group's committed
  offsets (see :meth:`Loop._replace_producer`).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Message, Producer, TopicPartition

from pipeline import kafka
from pipeline.core import events, metrics
from pipeline.core import log as logs
from pipeline.core.service import Service, freeze_start_up
from pipeline.kafka.health import ClientHealth

log = logs.get("loop")

# A SIGKILLed transactional producer leaves an open transaction that blocks read_committed
# consumers downstream until it times out; the default is 60 s, far too long for ham.
TRANSACTION_TIMEOUT_MS = 10_000
MAX_BACKOFF_S = 10.0
# A librdkafka call still blocked 15 s after its own 30 s timeout is stuck (see Watchdog).
BLOCKED_CALL_DEADLINE_S = 45.0
EXIT_BLOCKED = 75  # EX_TEMPFAIL: restart me
# Fatal producer errors, or producers abandoned stuck in a call, survived in-process before the
# worker gives up and exits (EXIT_BLOCKED) for a restart.
MAX_RENEWALS = 5
RENEWAL_WINDOW_S = 300.0
# The transactional producer's blocking calls (init, send offsets, commit, abort) are given this
# timeout, and run on a helper thread that is abandoned if the call has not returned
# TXN_CALL_GRACE_S later: librdkafka ignores the timeout of send_offsets_to_transaction while the
# group coordinator it cached is down or was decommissioned (confluentinc/librdkafka#5456, #5511;
# no release fixes them yet). After a broker restart that call blocked for good in 1 of 3 tries.
# A healthy call takes milliseconds; a timed-out one is retried or aborted as before.
TXN_CALL_TIMEOUT_S = 5.0
TXN_CALL_GRACE_S = 2.0
TXN_CALL_DEADLINE_S = TXN_CALL_TIMEOUT_S + TXN_CALL_GRACE_S
DEAD_LETTER_REASON_MAX = 1000
DEAD_LETTER_KEY_MAX = 1024  # event ids are 32 characters; a longer key is kept only as its length
# The largest record a worker produces: the producers' message.max.bytes less room for the
# framing librdkafka counts against it. produce() refuses anything larger on every retry, so an
# output above it (a record near the limit that grew by its verdict metadata) would stall its
# partition forever; its input is dead-lettered instead, and dead letters are cut to fit.
RECORD_MAX = int(kafka.DURABLE_PRODUCER["message.max.bytes"]) - 4096


class TransientError(Exception):
    """A sink or peer is unavailable: retry the whole batch later, dead-letter nothing."""


class ProducerStuck(Exception):
    """A transactional call did not return within :data:`TXN_CALL_DEADLINE_S`."""


def call_with_deadline(what: str, call: Callable[[float], object], timeout: float = TXN_CALL_TIMEOUT_S,
                       grace: float = TXN_CALL_GRACE_S) -> object:
    """``call(timeout)`` on a daemon thread; its result or exception, or :class:`ProducerStuck`
    when it has not returned ``grace`` seconds after its own timeout. Nothing can cancel a call
    inside librdkafka: a stuck one keeps its thread (and its client) until it returns, if ever."""
    box: list[tuple[bool, object]] = []
    done = threading.Event()
    lock = threading.Lock()
    state = {"abandoned": False}
    start = time.monotonic()

    def run() -> None:
        try:
            box.append((True, call(timeout)))
        except BaseException as e:  # handed to the caller
            box.append((False, e))
        with lock:
            done.set()
            late = state["abandoned"]
        if late:  # worth knowing: how long a stuck call really stays stuck
            log.warning("an abandoned Kafka call returned", extra={
                "call": what, "after_s": round(time.monotonic() - start, 1),
                "outcome": "success" if box[0][0] else str(box[0][1])[:200]})

    threading.Thread(target=run, name=f"kafka-{what}", daemon=True).start()
    done.wait(timeout + grace)
    with lock:
        if not done.is_set():
            state["abandoned"] = True
            raise ProducerStuck(f"{what} still blocked {timeout + grace:.0f} s after it was called")
    ok, value = box[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value


class RecordTooLarge(Exception):
    """A handler produced an output no producer would accept (above :data:`RECORD_MAX`)."""


@dataclass(frozen=True)
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)


Handler = Callable[[Sequence[Message]], list[Output]]


def record_size(o: Output) -> int:
    return len(o.key or b"") + len(o.value) + sum(len(k) + len(v) for k, v in o.headers)


def dead_letter(topic: str, msg: Message, stage: str, reason: str) -> Output:
    """The record unchanged, with why and where it failed in headers (cut to fit in one record,
    with ``floodgate-truncated`` giving the original size; the original stays at its origin)."""
    headers = [
        ("floodgate-stage", stage.encode()),
        ("floodgate-reason", reason[:DEAD_LETTER_REASON_MAX].encode(errors="replace")),
        ("floodgate-origin", f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()),
        ("floodgate-failed-at", f"{time.time():.3f}".encode()),
    ]
    key = msg.key()
    if key is not None and len(key) > DEAD_LETTER_KEY_MAX:  # not an event id: a forged record's key
        headers.append(("floodgate-key-dropped", str(len(key)).encode()))
        key = None
    out = Output(topic, key, msg.value() or b"", headers)
    excess = record_size(out) + 64 - RECORD_MAX  # 64: the truncation header itself
    if excess > 0:
        headers.append(("floodgate-truncated", str(len(out.value)).encode()))
        out = Output(topic, out.key, out.value[:max(0, len(out.value) - excess)], headers)
    return out


def reject(topic: str, msg: Message, stage: str, kind: str, reason: str) -> Output:
    """A record a stage cannot take, as a dead letter: counted by kind and logged (ids, never
    bodies), with ``<stage>: <reason>`` as its reason."""
    metrics.DEAD_LETTERS.labels(stage, kind).inc()
    metrics.MESSAGES.labels(stage, "unknown", "dead_letter").inc()
    log.warning("dead-lettered", extra={"stage": stage, "origin": f"{msg.topic()}/{msg.partition()}/{msg.offset()}",
                                        "event_id": events.peek_id(msg.value()), "reason": reason[:200]})
    return dead_letter(topic, msg, stage, f"{stage}: {reason}")


def decode_batch(msgs: Sequence[Message], stage: str, dead_letter_topic: str, verdict: str | None = None,
                 ) -> tuple[list[tuple[Message, events.MailEvent]], list[Output]]:
    """The mail events of a batch, and dead letters for the records that are not mail events
    (or, with ``verdict``, that carry another verdict than their topic promises)."""
    good: list[tuple[Message, events.MailEvent]] = []
    dead: list[Output] = []
    for m in msgs:
        try:
            event = events.decode(m.value())
        except events.EventError as e:
            dead.append(reject(dead_letter_topic, m, stage, "EventError", f"not a mail event: {e}"))
            continue
        if verdict is not None and event.verdict != verdict:
            dead.append(reject(dead_letter_topic, m, stage, f"not_{verdict}",
                               f"verdict {event.verdict!r} on the {verdict} topic"))
            continue
        good.append((m, event))
    return good, dead


def instance_id() -> str:
    """A stable name for this worker instance: transactional ids must survive restarts so that
    a restarted worker fences its previous self and aborts its open transaction at once."""
    return os.environ.get("FLOODGATE_INSTANCE") or f"{socket.gethostname()}-{os.getpid()}"


def _next_offsets(msgs: Sequence[Message]) -> list[TopicPartition]:
    nxt: dict[tuple[str, int], int] = {}
    for m in msgs:
        key = (m.topic(), m.partition())
        nxt[key] = max(nxt.get(key, 0), m.offset() + 1)
    return [TopicPartition(t, p, o) for (t, p), o in nxt.items()]


def _first_offsets(msgs: Sequence[Message]) -> list[TopicPartition]:
    first: dict[tuple[str, int], int] = {}
    for m in msgs:
        key = (m.topic(), m.partition())
        first[key] = min(first.get(key, m.offset()), m.offset())
    return [TopicPartition(t, p, o) for (t, p), o in first.items()]


class Watchdog:
    """Ends the process when a librdkafka call blocks far past its own timeout.

    ``send_offsets_to_transaction`` ignores its timeout when the group coordinator went away
    (confluentinc/librdkafka#5456, #5511): after a broker restart it can block forever, and the
    worker with it — seen in ``make chaos``: both classifiers stuck, their lanes stalled. The
    transactional calls now run under :func:`call_with_deadline` and a stuck producer is replaced
    in-process; this is the last resort for the consumer calls that recovery itself makes. Nothing
    can cancel the call, so past ``BLOCKED_CALL_DEADLINE_S`` the worker exits (code
    ``EXIT_BLOCKED``) for its supervisor to restart it; the new instance fences the stuck
    transaction, which is aborted, and its batch is consumed again: nothing lost or duplicated.
    """

    def __init__(self, log) -> None:  # type: ignore[no-untyped-def]
        self.log = log
        self._call: tuple[str, float] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def guard(self, name: str) -> Iterator[None]:
        with self._lock:
            self._call = (name, time.monotonic() + BLOCKED_CALL_DEADLINE_S)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._call = None

    def _watch(self) -> None:
        while True:
            time.sleep(1.0)  # the deadline is 45 s; a second's precision is plenty
            with self._lock:
                call = self._call
            if call is not None and time.monotonic() > call[1]:
                self.log.error("a Kafka client call is blocked past its timeout; exiting for a restart",
                               extra={"call": call[0], "deadline_s": BLOCKED_CALL_DEADLINE_S})
                os._exit(EXIT_BLOCKED)


class BatchTimer:
    """How long each phase of one batch took (``mark`` ends the phase under way)."""

    def __init__(self) -> None:
        self.start = self._last = time.monotonic()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = now - self._last
        self._last = now

    def total(self) -> float:
        return self._last - self.start


class Loop:
    def __init__(self, service: Service, stage: str, group: str, topics: list[str], handler: Handler,
                 *, transactional: bool, batch_size: int | None = None, batch_timeout_s: float | None = None,
                 consumer_overrides: dict | None = None, on_idle: Callable[[], object] | None = None) -> None:
        """``on_idle``: called when a poll brought nothing (e.g. the classifier looking for a newly
        promoted model, so that an idle worker serves the champion, not its predecessor)."""
        s = service.settings
        self.service = service
        self.stage = stage
        self.group = group
        self.topics = topics
        self.handler = handler
        self.on_idle = on_idle
        self.transactional = transactional
        self.batch_size = batch_size or s.worker.batch_size
        self.batch_timeout_s = batch_timeout_s if batch_timeout_s is not None else s.worker.batch_timeout_s
        self.slow_batch_s = s.worker.slow_batch_s
        self.dead_letter_topic = s.topic("dead_letter")
        # /readyz: a broker connection up, the group's assignment steady, this loop polling.
        self.health = ClientHealth(f"{stage} consumer", group=True)
        service.checks.append(self.health.problem)
        self.consumer = kafka.consumer(s, group, **self.health.config(), **(consumer_overrides or {}))
        self._tid = f"{group}.{instance_id()}" if transactional else None
        self.producer = self._new_producer()
        self._renewals: list[float] = []
        self.log = service.log
        self._watchdog = Watchdog(self.log)
        self.processed = 0

    # -- the loop -----------------------------------------------------------------------
    def _new_producer(self) -> Producer:
        tid = self._tid
        return kafka.producer(self.service.settings, transactional_id=tid,
                              **({"transaction.timeout.ms": TRANSACTION_TIMEOUT_MS} if tid else {}))

    def _retrying(self, call: Callable[[float], None], what: str) -> None:
        """``call(timeout)`` on the producer until it is acknowledged; a retriable error is
        retried unless the worker is stopping, anything else raised (:class:`ProducerStuck`
        when the call outlives its deadline)."""
        while True:
            try:
                call_with_deadline(what, call)
                return
            except KafkaException as e:
                if not e.args[0].retriable() or self.service.stopping.is_set():
                    raise
                self.log.warning(f"{what} not acknowledged; retrying", extra={"error": str(e.args[0])})

    def _init_transactions(self) -> None:
        self._retrying(self.producer.init_transactions, "init_transactions")

    def _replace_producer(self, reason: str, msgs: Sequence[Message]) -> None:
        """Replace the transactional producer with a new one with the same transactional id, and
        take the batch up again from the group's committed offsets.

        Two causes. The producer failed fatally: a broker outage longer than the transaction
        timeout makes the coordinator abort the open transaction and bump the producer epoch, and
        the producer's next call fails (INVALID_TXN_STATE, PRODUCER_FENCED). Or it is stuck in a
        call (:class:`ProducerStuck`), abandoned with the thread blocked in it. Exiting would
        stall the lane until something restarted the worker; a new producer carries on at once.

        The new producer's ``init_transactions`` fences the old one (its epoch is bumped: anything
        it still sends is refused) and completes whatever transaction it left: an open one is
        aborted, a commit already under way at the coordinator is finished. Only then are the
        committed offsets the truth, so the batch restarts from them, not from its first records:
        after a commit whose outcome was unknown, rewinding would route the batch twice. Too many
        replacements in a row mean something else (a twin with our id): exit for a restart then."""
        while True:
            now = time.monotonic()
            self._renewals = [t for t in self._renewals if now - t < RENEWAL_WINDOW_S] + [now]
            if len(self._renewals) > MAX_RENEWALS:
                self.log.error("transactional producer replaced too often; exiting for a restart",
                               extra={"reason": reason, "replacements": len(self._renewals)})
                os._exit(EXIT_BLOCKED)  # a normal exit could wait on the stuck clients' threads
            metrics.ERRORS.labels(self.stage, "producer-renewed").inc()
            self.log.error("replacing the transactional producer", extra={"reason": reason})
            self.producer = self._new_producer()
            try:
                self._init_transactions()
                break
            except ProducerStuck as e:
                reason = str(e)
        self._resume_from_committed(msgs)

    def _resume_from_committed(self, msgs: Sequence[Message]) -> None:
        """Seek the batch's partitions (those still assigned) to the group's committed offsets;
        where the group never committed one, to the batch's first record."""
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        first = {(tp.topic, tp.partition): tp.offset for tp in _first_offsets(msgs)
                 if (tp.topic, tp.partition) in assigned}
        if not first:
            return
        while True:
            try:
                # A read_committed consumer asks for stable offsets: none pending in a transaction.
                with self._watchdog.guard("committed"):
                    committed = self.consumer.committed([TopicPartition(t, p) for t, p in first],
                                                        timeout=TXN_CALL_TIMEOUT_S)
                for tp in committed:
                    if tp.error is not None:
                        raise KafkaException(tp.error)
                break
            except KafkaException as e:
                if self.service.stopping.is_set():
                    raise
                self.log.warning("committed offsets not read; retrying", extra={"error": str(e.args[0])})
        for tp in committed:
            offset = tp.offset if tp.offset >= 0 else first[(tp.topic, tp.partition)]
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))

    def run(self) -> None:
        if self.transactional:
            self._init_transactions()
        # Ready once the group has given this member its partitions (possibly none), not merely
        # after subscribing: until then mail on the topic waits for the join.
        self.consumer.subscribe(self.topics, on_assign=lambda _consumer, _partitions: self.service.ready.set())
        freeze_start_up()
        backoff = 0.5
        try:
            while not self.service.stopping.is_set():
                self._exit_if_stalled()
                msgs = self.consumer.consume(self.batch_size, self.batch_timeout_s)
                msgs = [m for m in msgs if self._usable(m)]
                if not msgs:
                    if self.on_idle is not None:
                        self.on_idle()
                    continue
                metrics.BATCH_SIZE.labels(self.stage).observe(len(msgs))
                timer = BatchTimer()
                try:
                    self._process(msgs, timer)
                    self._timed(timer, len(msgs))
                    backoff = 0.5
                except TransientError as e:
                    metrics.ERRORS.labels(self.stage, "transient").inc()
                    self.log.warning("sink unavailable; retrying batch", extra={"error": str(e), "backoff_s": backoff})
                    self._rewind(msgs)
                    self.service.stopping.wait(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                except KafkaException as e:
                    if not (self.transactional and e.args[0].fatal()) or self.service.stopping.is_set():
                        raise
                    self._replace_producer(f"failed fatally: {e.args[0]}", msgs)
                except ProducerStuck as e:
                    metrics.ERRORS.labels(self.stage, "producer-stuck").inc()
                    if self.service.stopping.is_set():
                        # Nothing was committed; the next instance fences the stuck transaction.
                        self.log.warning("stopping with a transactional call stuck", extra={"error": str(e)})
                        break
                    self._replace_producer(str(e), msgs)
        finally:
            self.close()

    def _exit_if_stalled(self) -> None:
        """A consumer with an assigned partition that it will never fetch (librdkafka #5586,
        :data:`~pipeline.kafka.health.FETCH_STALL_S`) holds the lane up for good: exit for a
        restart, whose new consumer starts from the committed offsets. Between batches, so
        nothing is half done (non-transactional sinks commit after writing; transactions are
        committed or aborted by then)."""
        stuck = self.health.stalled()
        if stuck is None:
            return
        metrics.ERRORS.labels(self.stage, "consumer-stalled").inc()
        self.log.error("a partition is assigned but never fetched; exiting for a restart", extra={"problem": stuck})
        os._exit(EXIT_BLOCKED)  # a normal exit could wait on the client's threads

    def close(self) -> None:
        # Leaving the group at once lets partitions move without waiting for a session timeout.
        with contextlib.suppress(RuntimeError):  # already closed
            self.consumer.close()
        self.producer.flush(10)

    def _usable(self, m: Message) -> bool:
        err = m.error()
        if err is None:
            return True
        if err.code() == KafkaError._FATAL:
            # The consumer is unusable for good (e.g. fenced); every later consume returns the
            # same error. Exit, for a restart, instead of logging it forever with the lane stalled.
            raise KafkaException(err)
        if err.code() != KafkaError._PARTITION_EOF:
            metrics.ERRORS.labels(self.stage, "consume").inc()
            self.log.warning("consume error", extra={"error": str(err)})
        return False

    def _process(self, msgs: Sequence[Message], timer: BatchTimer) -> None:
        outputs = self._handle(msgs)
        timer.mark("handle")
        if self.transactional:
            self._commit_transaction(msgs, outputs)
        else:
            self._produce(outputs)
            if self.producer.flush(30) > 0:
                raise TransientError("outputs not acknowledged by the broker")
            timer.mark("publish")
            try:
                self.consumer.commit(offsets=_next_offsets(msgs), asynchronous=False)
            except KafkaException as e:
                # The group coordinator moved or is down (a broker restart: NOT_COORDINATOR,
                # _WAIT_COORD, timeouts) or a rebalance took the partitions: the sink is
                # idempotent, so the batch is simply processed again (or by the new owner).
                if e.args[0].fatal():
                    raise
                raise TransientError(f"offset commit failed: {e.args[0]}") from None
        timer.mark("commit")
        self.processed += len(msgs)

    def _timed(self, timer: BatchTimer, records: int) -> None:
        for phase, seconds in timer.phases.items():
            metrics.BATCH_SECONDS.labels(self.stage, phase).observe(seconds)
        if timer.total() > self.slow_batch_s:
            self.log.warning("slow batch", extra={"records": records, "seconds": round(timer.total(), 3)}
                             | {f"{phase}_s": round(seconds, 3) for phase, seconds in timer.phases.items()})

    def _checked(self, msgs: Sequence[Message]) -> list[Output]:
        outputs = self.handler(msgs)
        for o in outputs:
            if record_size(o) > RECORD_MAX:
                raise RecordTooLarge(f"an output for {o.topic} of {record_size(o)} bytes is above the "
                                     f"{RECORD_MAX}-byte record limit")
        return outputs

    def _handle(self, msgs: Sequence[Message]) -> list[Output]:
        try:
            return self._checked(msgs)
        except TransientError:
            raise
        except Exception as batch_error:  # isolate the bad record: one at a time
            self.log.warning("batch failed; retrying one record at a time", extra={"error": repr(batch_error)})
            outputs: list[Output] = []
            for m in msgs:
                try:
                    outputs += self._checked([m])
                except TransientError:
                    raise
                except Exception as e:
                    outputs.append(reject(self.dead_letter_topic, m, self.stage, type(e).__name__,
                                          f"{type(e).__name__}: {e}"))
            return outputs

    def _produce(self, outputs: list[Output]) -> None:
        for o in outputs:
            while True:
                try:
                    self.producer.produce(o.topic, key=o.key, value=o.value, headers=o.headers or None)
                    break
                except BufferError:  # local queue full: let it drain
                    self.producer.poll(0.1)
        self.producer.poll(0)

    def _commit_transaction(self, msgs: Sequence[Message], outputs: list[Output]) -> None:
        producer = self.producer
        producer.begin_transaction()
        try:
            self._produce(outputs)
            offsets, group = _next_offsets(msgs), self.consumer.consumer_group_metadata()
            call_with_deadline("send_offsets_to_transaction",
                               lambda timeout: producer.send_offsets_to_transaction(offsets, group, timeout))
            self._commit_with_retry()
        except KafkaException as e:
            err = e.args[0]
            if err.fatal():
                raise  # fenced by a newer instance of ourselves: exit and let it work
            # Abortable, or retriable before the commit began (a broker restart times out
            # send_offsets_to_transaction): abort, and the batch is retried in a new transaction.
            # Its outputs so far are discarded by the abort: read_committed consumers never see them.
            self._abort()
            raise TransientError(f"transaction aborted: {err}") from None

    def _commit_with_retry(self) -> None:
        """A commit whose outcome is unknown (timed out) may only be retried, never aborted."""
        while True:
            try:
                call_with_deadline("commit_transaction", self.producer.commit_transaction)
                return
            except KafkaException as e:
                err = e.args[0]
                if err.fatal() or err.txn_requires_abort() or not err.retriable():
                    raise
                if self.service.stopping.is_set():
                    raise SystemExit("stopping with a transaction commit pending") from None
                self.log.warning("transaction commit not acknowledged; retrying", extra={"error": str(err)})

    def _abort(self) -> None:
        self._retrying(self.producer.abort_transaction, "transaction abort")

    def _rewind(self, msgs: Sequence[Message]) -> None:
        """Seek back to the first record of the failed batch, on partitions still assigned."""
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        for tp in _first_offsets(msgs):
            if (tp.topic, tp.partition) in assigned:
                self.consumer.seek(tp)
