"""``floodgate classify``: score mail with the champion model and route it to ham or spam.

One lane's topic in (``inbound`` for the priority lane, or ``bulk`` where ingress admission
diverts flooding sources), ham | spam | dead-letter out,
in Kafka transactions (consume-transform-produce with the input offsets inside), so a crash
anywhere neither loses nor duplicates a routing. Several processes in one group share the
lane's partitions.

* With no model in the registry the worker refuses to start: mail is never passed through
  unclassified.
* Hot reload: a promoted model is loaded and verified in a background thread, then swapped
  in between two batches (or while the lane is idle). Each batch is scored by exactly one model, and each event carries
  the version that scored it; no message ever meets a half-loaded model.
* Campaign cache: a message whose verdict key (:func:`models.features.verdict_key`: every header
  value and body byte the model reads) was scored before by the same model costs a lookup
  (floods are near-duplicates).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from confluent_kafka import Message

from models import authfeatures, features, registry
from pipeline.core import events, metrics
from pipeline.core.config import Settings
from pipeline.core.service import Service
from pipeline.kafka.loop import Loop, Output, decode_batch

STAGE = "classify"
# Each lane's input and (ham, spam) output topics (infra/topics.toml keys). Lanes stay apart
# down to the sinks: flood mail the model misses must not queue in front of the priority
# lane's ham, and a flood's spam must not cost the reputation worker (which reads the priority
# lane's verdicts only) ten broker writes a message.
LANES = {"priority": "inbound", "bulk": "bulk"}
OUT_TOPICS = {"priority": ("ham", "spam"), "bulk": ("bulk_ham", "bulk_spam")}
# How often to look for a newly promoted model: a stat() of one small file.
RELOAD_CHECK_S = 1.0
# A flood of one campaign needs one entry; a diverse flood is bounded by this.
CACHE_ENTRIES = 100_000
WARM_UP_MESSAGE = b"From: a@example.org\r\nSubject: warm-up\r\n\r\nnothing\r\n"


class NoModelError(SystemExit):
    pass


class FingerprintCache:
    """LRU map from campaign fingerprint to (verdict, score), valid for one model version."""

    def __init__(self, capacity: int = CACHE_ENTRIES) -> None:
        self.capacity = capacity
        self.version: str | None = None
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.hits = 0

    def get(self, version: str, fp: str) -> tuple[str, float] | None:
        if version != self.version:
            self._items.clear()
            self.version = version
            return None
        hit = self._items.get(fp)
        if hit is not None:
            self._items.move_to_end(fp)
            self.hits += 1
        return hit

    def put(self, version: str, fp: str, verdict: tuple[str, float]) -> None:
        if version != self.version:
            self._items.clear()
            self.version = version
        self._items[fp] = verdict
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)


class ModelHolder:
    """The model in use, and a background reload when the registry's champion changes."""

    def __init__(self, path: Path, log) -> None:  # type: ignore[no-untyped-def]
        self.path = path
        self.log = log
        if registry.champion_version(path) is None:
            raise NoModelError(
                f"floodgate classify: no model in the registry at {path}. "
                "Train one first (make train); mail is never passed through unclassified.")
        self.model = self._warm(registry.load_champion(path))
        self._pending: registry.LoadedModel | None = None
        self._loading = False
        self._checked = time.monotonic()
        self._publish()

    @staticmethod
    def _warm(model: registry.LoadedModel) -> registry.LoadedModel:
        """Score one message before the model meets mail: the first call pays lazy set-up."""
        model.score([WARM_UP_MESSAGE])
        return model

    def _publish(self) -> None:
        metrics.MODEL.info({"version": self.model.version})
        metrics.MODEL_LOADED.set(1)
        self.log.info("model in use", extra={"model_version": self.model.version})

    def current(self) -> registry.LoadedModel:
        """The model for the next batch: swaps in a fully loaded new champion if one is ready."""
        if self._pending is not None:
            self.model, self._pending = self._pending, None
            self._publish()
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_S and not self._loading:
            self._checked = now
            version = registry.champion_version(self.path)
            if version is not None and version != self.model.version:
                self._loading = True
                threading.Thread(target=self._load, name="model-reload", daemon=True).start()
        return self.model

    def _load(self) -> None:
        try:
            self._pending = self._warm(registry.load_champion(self.path))
        except Exception as e:  # a bad artifact never replaces a good model
            metrics.ERRORS.labels(STAGE, "model-reload").inc()
            self.log.error("model reload refused", extra={"error": repr(e)})
        finally:
            self._loading = False


class Classifier:
    def __init__(self, settings: Settings, lane: str, service: Service) -> None:
        if lane not in LANES:
            raise ValueError(f"lane must be one of {tuple(LANES)}")
        self.settings = settings
        self.lane = lane
        self.models = ModelHolder(settings.paths.registry, service.log)
        self.cache = FingerprintCache()
        self.ham, self.spam = (settings.topic(key) for key in OUT_TOPICS[lane])
        self.dead = settings.topic("dead_letter")

    def handle(self, msgs: Sequence[Message]) -> list[Output]:
        model = self.models.current()  # one model for the whole batch
        decoded, outputs = decode_batch(msgs, STAGE, self.dead)
        todo: list[tuple[events.MailEvent, str]] = []
        results: dict[int, tuple[str, float]] = {}
        for _m, ev in decoded:
            # All the model reads, not only subject and body: our Authentication-Results too.
            fp = features.verdict_key(ev.raw) + authfeatures.cache_key_part(model.pipeline, ev.raw)
            hit = self.cache.get(model.version, fp)
            if hit is not None:
                results[len(todo)] = hit
            todo.append((ev, fp))
        to_score = [i for i in range(len(todo)) if i not in results]
        if to_score:
            scored = model.verdicts([todo[i][0].raw for i in to_score])
            for i, verdict in zip(to_score, scored, strict=True):
                results[i] = (verdict[0], float(verdict[1]))
                self.cache.put(model.version, todo[i][1], results[i])
        for i, (ev, _fp) in enumerate(todo):
            verdict, score = results[i]
            out = replace(ev.classified(verdict, round(score, 6), model.version), lane=ev.lane or self.lane)
            # No key: librdkafka's sticky partitioner then puts a whole batch on one partition of
            # each output topic, so a transaction touches about three partitions instead of eight
            # (each one a produce request, a partition check by the broker and a commit marker).
            # Nothing downstream reads the key: the event id is in the record itself.
            outputs.append(Output(self.ham if verdict == "ham" else self.spam, None, events.encode(out)))
            metrics.MESSAGES.labels(STAGE, self.lane, verdict).inc()
        return outputs


def run(settings: Settings, lane: str, service: Service) -> Loop:
    """Build the classifier loop (the caller runs it). Raises NoModelError with no model."""
    classifier = Classifier(settings, lane, service)
    return Loop(service, STAGE, settings.group(f"classify-{lane}"), [settings.topic(LANES[lane])],
                classifier.handle, transactional=True, on_idle=classifier.models.current)
