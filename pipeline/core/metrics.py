"""Prometheus metrics of every worker, in one place so that names and labels stay consistent.

Names follow Prometheus conventions (``_total`` counters, base units in seconds); lag metrics
reuse the names operators know from kafka_exporter and kafka-lag-exporter.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

# Lanes as labels. An event's lane is metadata any producer can write: a value outside these is
# counted as "unknown", so forged lanes cannot grow a label set (and memory) without bound.
LANES = ("priority", "bulk")


def lane_label(lane: str | None) -> str:
    return lane if lane in LANES else "unknown"


# Stages: smtp, replay, admission, classify, deliver, cleanup. Outcomes: ham, spam, dead_letter, ...
MESSAGES = Counter("floodgate_messages_total", "Messages processed, by stage, lane and outcome",
                   ["stage", "lane", "outcome"])
DEAD_LETTERS = Counter("floodgate_dead_letters_total", "Events sent to the dead-letter topic",
                       ["stage", "reason"])
# The SMTP ingress's refusals by the limits (pipeline/smtp/limits.py): at connect (421), at MAIL
# FROM (450), idle sessions closed (421); the code is the reply's.
SMTP_REFUSED = Counter("floodgate_smtp_refused_total", "Connections and transactions the SMTP ingress refused or "
                       "closed by its limits, by step and reply code", ["step", "code"])
ERRORS = Counter("floodgate_errors_total", "Errors a worker survived, by stage and kind", ["stage", "kind"])
# Ham must arrive within a second or so, floods may take minutes: buckets cover both.
END_TO_END = Histogram(
    "floodgate_end_to_end_latency_seconds",
    "From acceptance at ingress to durable delivery or quarantine",
    ["lane", "verdict"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
BATCH_SIZE = Histogram("floodgate_batch_size", "Records per processed batch", ["stage"],
                       buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000))
# Where a worker's time goes, per batch: "handle" is the stage's own work (scoring, Maildir
# fsyncs, the quarantine's commit), "publish" its outputs acknowledged by the broker, "commit" the
# consumer offsets (for a transactional stage: the transaction, outputs and offsets together).
# A stalled lane shows here whether the disk, the broker or the model held it.
BATCH_SECONDS = Histogram("floodgate_batch_seconds", "Time per processed batch, by stage and phase",
                          ["stage", "phase"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
MODEL = Info("floodgate_model", "The model version a classifier scores with")
MODEL_LOADED = Gauge("floodgate_model_loaded", "1 when a classifier has a model loaded")
LAG = Gauge("kafka_consumergroup_lag", "Consumer group lag in messages",
            ["consumergroup", "topic", "partition"])
LAG_SECONDS = Gauge("kafka_consumergroup_group_lag_seconds", "Estimated consumer group lag in seconds",
                    ["consumergroup", "topic", "partition"])
GROUP_STATUS = Gauge("floodgate_consumergroup_status", "Burrow-style status (1 for the current one)",
                     ["consumergroup", "status"])
# Sender authentication at SMTP ingress (pipeline/smtp/auth.py). Results are from fixed vocabularies
# (RFC 8601), so the label sets stay small whatever senders send.
AUTH_RESULTS = Counter("floodgate_auth_results_total", "Sender authentication results at ingress",
                       ["method", "result"])
AUTH_SECONDS = Histogram("floodgate_auth_seconds", "Time sender authentication added to a message",
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 2.5, 5))

# The web worker (pipeline/web/): requests by view (a route's name, a fixed set) and status class,
# their time (the list view's objective is 300 ms at p95), and the actions people take.
WEB_REQUESTS = Counter("floodgate_web_requests_total", "Web requests by view and status class (2xx, 4xx...)",
                       ["view", "code"])
WEB_SECONDS = Histogram("floodgate_web_request_seconds", "Web request time by view", ["view"],
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2.5, 5))
WEB_ACTIONS = Counter("floodgate_web_actions_total", "Quarantine actions taken in the web worker, by action, "
                      "role (operator, recipient) and outcome (done, refused)", ["action", "role", "outcome"])
