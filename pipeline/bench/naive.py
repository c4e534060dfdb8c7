"""``python -m pipeline.bench naive``: the single-lane design that failed in 2008, kept for the benchmark only.

Everything goes to ``inbound`` (no admission), and one consumer there classifies each batch
and then, in turn, delivers the ham and quarantines the spam, all in one queue. It is correct
(same model, same sinks, same exactly-once accounting) but ham waits behind every spam
message ahead of it: during a flood its latency grows with the backlog. ``make bench-flood``
runs it beside Floodgate's real topology on the same traffic, so the report shows the
failure next to the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import Message

from models import registry
from pipeline.core import events, metrics
from pipeline.core.config import Settings
from pipeline.core.service import Service
from pipeline.kafka.loop import Loop, Output, decode_batch
from pipeline.sinks import maildir, stamp
from pipeline.sinks.quarantine import Quarantine

STAGE = "naive"


class SingleLane:
    def __init__(self, settings: Settings) -> None:
        self.model = registry.load_champion(settings.paths.registry)
        self.root = settings.paths.maildir_root
        self.quarantine = Quarantine(settings.paths.quarantine_db)
        self.dead = settings.topic("dead_letter")

    def handle(self, msgs: Sequence[Message]) -> list[Output]:
        decoded, outputs = decode_batch(msgs, STAGE, self.dead)
        batch = [event for _, event in decoded]
        verdicts = self.model.verdicts([ev.raw for ev in batch]) if batch else []
        spam: list[events.MailEvent] = []  # one quarantine transaction per batch, as cleanup does
        for ev, (verdict, score) in zip(batch, verdicts, strict=True):
            done = ev.classified(verdict, float(score), self.model.version)
            if verdict == "ham":
                for rcpt in done.envelope.rcpt_to:
                    maildir.deliver(maildir.mailbox_path(self.root, rcpt), maildir.file_name(done), stamp(done))
            else:
                spam.append(done)
            metrics.MESSAGES.labels(STAGE, "single", verdict).inc()
        if spam:
            self.quarantine.add(spam)
        return outputs


def run(settings: Settings, service: Service) -> Loop:
    lane = SingleLane(settings)
    return Loop(service, STAGE, settings.group("naive"), [settings.topic("inbound")], lane.handle,
                transactional=False)
