"""The ``floodgate`` console command: one subcommand per worker and per operator task.

Stage modules are imported inside their commands so that each worker loads only what it runs.
"""

from __future__ import annotations

import faulthandler
import signal
from typing import TYPE_CHECKING, Annotated

import typer

from pipeline.core import config

if TYPE_CHECKING:
    from pipeline.core.service import Service

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Floodgate: Kafka stream processing for mail; a spam flood never delays ham.")
topics_app = typer.Typer(no_args_is_help=True, help="The topics of infra/topics.toml.")
app.add_typer(topics_app, name="topics")

from models.cli import app as model_app  # noqa: E402 - light: model modules load inside its commands

app.add_typer(model_app, name="model")

from pipeline.cli import quarantine  # noqa: E402 - light: the quarantine store loads inside its commands

app.add_typer(quarantine.app, name="quarantine")
app.command("report")(quarantine.report)

from pipeline.cli import senders  # noqa: E402 - light: the reputation topic is read inside its commands

app.add_typer(senders.app, name="senders")


@topics_app.command("apply")
def topics_apply(dry_run: bool = typer.Option(False, help="report what would change, change nothing")) -> None:
    """Create missing topics, grow partitions, set configs; report drift that needs a human."""
    from pipeline import kafka
    from pipeline.kafka import topics

    settings = config.load()
    report = topics.apply(settings, kafka.admin(settings), dry_run=dry_run)
    for line in report:
        typer.echo(line)
    typer.echo(f"topics: {len(report)} change(s)" if report else "topics: no changes")


@topics_app.command("show")
def topics_show() -> None:
    """Each topic of the spec with its partitions and end offsets."""
    from confluent_kafka import TopicPartition

    from pipeline import kafka
    from pipeline.kafka import topics

    settings = config.load()
    metadata = kafka.admin(settings).list_topics(timeout=10).topics
    probe = kafka.consumer(settings, group=settings.group("topics-show"))
    try:
        for t in topics.desired(settings):
            if t.name not in metadata:
                typer.echo(f"{t.name:28} MISSING")
                continue
            parts = sorted(metadata[t.name].partitions)
            total = sum(probe.get_watermark_offsets(TopicPartition(t.name, p), timeout=10)[1] for p in parts)
            typer.echo(f"{t.name:28} partitions={len(parts):<3} records={total}")
    finally:
        probe.close()


def start_service(name: str) -> tuple[config.Settings, Service]:
    """What every worker command does first: settings, JSON logs, signals, /metrics and health."""
    from pipeline.core import log
    from pipeline.core.service import Service

    settings = config.load()
    log.setup()
    service = Service(name, settings)
    service.install_signal_handlers()
    service.serve_http()
    return settings, service


@app.command()
def classify(lane: str = typer.Option("priority", help="priority or bulk: the lane topic to consume")) -> None:
    """Score mail with the champion model; route it to ham, spam or dead-letter (transactional)."""
    from pipeline import classify as stage

    settings, service = start_service(f"classify-{lane}")
    stage.run(settings, lane, service).run()


@app.command()
def reputation(
    web_port: int = typer.Option(-1, help="port of /reputation/* and /metrics; 0 none; -1 worker.metrics_port"),
    partitions: int = typer.Option(6, help="partitions of its internal topics and tables (max. workers)"),
    store: str = typer.Option("memory", help="table store: memory, or rocksdb (needs rocksdict)"),
    datadir: str = typer.Option("", help="Faust's data directory (default .run/reputation)"),
    loglevel: str = typer.Option("info", help="log level"),
    agreement_reporters: int = typer.Option(
        None, min=1, help="distinct ham reporters that make a sender good (default AGREEMENT_REPORTERS, 3)"),
    agreement_span: float = typer.Option(
        None, min=0, help="seconds their reports must span (default AGREEMENT_SPAN_S, an hour)"),
) -> None:
    """Keep per-sender ham/spam tables (Faust); publish who is known-good to the reputation topic."""
    from pathlib import Path

    from pipeline import reputation as stage

    rule = stage.Agreement(stage.AGREEMENT_REPORTERS if agreement_reporters is None else agreement_reporters,
                           stage.AGREEMENT_SPAN_S if agreement_span is None else agreement_span)
    stage.run(config.load(), loglevel=loglevel, web_port=None if web_port < 0 else web_port,
              partitions=partitions, store=store, datadir=Path(datadir) if datadir else stage.DEFAULT_DATADIR,
              agreement=rule)


@app.command()
def lag(
    group: Annotated[list[str] | None,
                     typer.Option("--group", "-g", help="a consumer group (repeat); default: Floodgate's")] = None,
    watch: bool = typer.Option(False, "--watch", help="a live table, refreshed every --interval"),
    as_json: bool = typer.Option(False, "--json", help="one JSON document per sample on stdout"),
    serve: bool = typer.Option(False, "--serve", help="keep sampling; serve /metrics on worker.metrics_port"),
    interval: float = typer.Option(5.0, help="seconds between samples"),
    window: int = typer.Option(10, help="samples in the Burrow status window"),
) -> None:
    """Consumer lag per group, topic and partition: messages, seconds, Burrow-style status."""
    from pipeline import lag as monitor
    from pipeline.core import log

    if serve:
        log.setup()
    monitor.run(config.load(), group or [], watch=watch, as_json=as_json, serve=serve, interval=interval, window=window)


@app.command()
def smtp(
    processes: int = typer.Option(-1, help="session processes behind one port; default smtp.processes "
                                  "(0: one per CPU); 1: a single process"),
    session_channel: int = typer.Option(-1, hidden=True, help="(a session process: its line to the front)"),
) -> None:
    """Accept mail for the local domains (smtp.domains); 250 only once the broker has the event."""
    import os
    import shutil
    import tempfile

    from pipeline.smtp import front
    from pipeline.smtp.server import raise_open_files_limit

    settings = config.load()
    if session_channel >= 0:
        _, service = start_service("smtp-session")
        front.run_session_process(settings, session_channel, service)
        return
    raise_open_files_limit()  # before the session processes start: they inherit it
    n = front.session_processes(settings.smtp.processes if processes < 0 else processes)
    if n == 1:
        from pipeline import smtp as ingress

        settings, service = start_service("smtp")
        ingress.run(settings, service)
        return
    # Every process's counters in one /metrics (prometheus_client's multiprocess mode): set
    # before the metrics are first imported here and in the session processes.
    metrics_dir = tempfile.mkdtemp(prefix="floodgate-smtp-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        settings, service = start_service("smtp")
        front.run_front(settings, service, n)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@app.command()
def replay(
    source: Annotated[str, typer.Argument(help="SpamAssassin corpus dir, mbox, Maildir, .eml folder or JSONL")],
    rate: float = typer.Option(0.0, help="messages per second; 0: as fast as possible"),
    limit: int = typer.Option(0, help="at most this many messages; 0: all"),
    shuffle: bool = typer.Option(False, help="shuffle the messages (reads them all first)"),
    seed: int = typer.Option(0, help="seed of the shuffle and of the synthesised recipients"),
    label_from_corpus: bool = typer.Option(False, help="carry the corpus's ham/spam label in each event"),
    users: int = typer.Option(1000, help="mailboxes to spread recipients over, across smtp.domains"),
    labels_file: str = typer.Option("", help="labels of an .eml folder: '<label> <path>' lines or name,label CSV"),
) -> None:
    """Feed a mail corpus into the inbound topic with realistic synthesised envelopes."""
    from pathlib import Path

    from pipeline import replay as ingress
    from pipeline.core import log

    log.setup()
    result = ingress.main(config.load(), Path(source), rate=rate or None, limit=limit or None, shuffle=shuffle,
                          seed=seed, label_from_corpus=label_from_corpus, users=users,
                          labels_file=Path(labels_file) if labels_file else None)
    labels = " ".join(f"{k}={v}" for k, v in sorted(result.labels.items()))
    topics = " ".join(f"{k}={v}" for k, v in sorted(result.topics.items()))
    typer.echo(f"replay: sent={result.sent} delivered={result.delivered} failed={result.failed} "
               f"skipped={result.skipped} in {result.elapsed_s:.1f}s ({result.rate:.0f} msg/s); "
               f"labels: {labels or '-'}; topics: {topics or '-'}")
    if result.failed:
        raise typer.Exit(1)


@app.command()
def deliver(lane: str = typer.Option("priority", help="priority (the ham topic) or bulk (the bulk lane's ham)"),
            ) -> None:
    """Deliver classified ham into Maildirs, or to a downstream LMTP/SMTP server (delivery settings)."""
    from pipeline import deliver as stage

    _, service = start_service("deliver" if lane == "priority" else f"deliver-{lane}")
    stage.serve(service, lane)


@app.command()
def cleanup() -> None:
    """Store classified spam in the quarantine (SQLite); see floodgate quarantine."""
    from pipeline import cleanup as stage

    _, service = start_service("cleanup")
    stage.serve(service)


@app.command("report-drain")
def report_drain() -> None:
    """Publish users' spooled Junk moves (floodgate-report) to the feedback topic, each once acknowledged."""
    from pipeline.reports import drain

    _, service = start_service("report-drain")
    drain.serve(service)


@app.command()
def web() -> None:
    """The quarantine in a browser: operators search and release; recipients see their own held mail."""
    from pipeline import web as worker

    _, service = start_service("web")
    worker.serve(service)


@app.command()
def digest(
    period: str = typer.Option("", help="hour, day or week; default web.digest_period (day)"),
    to: Annotated[list[str] | None, typer.Option("--to", help="only this recipient (repeat)")] = None,
    link: str = typer.Option("", "--link", help="print a recipient's link to their held mail; send nothing"),
) -> None:
    """Mail each recipient with held messages a summary since their last digest, with signed links (once a period)."""
    from pipeline import digest as digests
    from pipeline.cli.output import fail

    settings = config.load()
    if link:
        from pipeline.web.security import Signer

        if not settings.web.secret_key:
            raise fail("web.secret_key is not set (FLOODGATE_WEB_SECRET_KEY)")
        token = Signer(settings.web, settings.web.secret_key).link([link])
        typer.echo(f"{settings.web.public_url.rstrip('/')}/u/{token}")
        return
    try:
        result = digests.run(settings, period_kind=period or None, recipients=to)
    except digests.DigestError as e:
        raise fail(str(e)) from None
    typer.echo(f"digest {result.period}: {result.sent} sent ({result.messages} messages listed), "
               f"{result.already} already sent this period")


@app.command("run")
def run_node(
    worker: Annotated[list[str] | None,
                      typer.Option("--worker", "-w", help="a worker to run (repeat); default: all")] = None,
    without: Annotated[list[str] | None, typer.Option("--without", help="a worker not to run (repeat)")] = None,
    base_port: int = typer.Option(9400, help="metrics/health port of the first worker; the next ones follow"),
    log_dir: str = typer.Option("", help="a log file per worker in this directory; default: this process's stderr"),
) -> None:
    """Run a whole node: every worker its own process, restarted when it exits, all stopped on SIGTERM."""
    from pathlib import Path

    from pipeline import node
    from pipeline.core import log

    names = list(worker or node.NODE)
    known = node.NODE | node.OPTIONAL
    unknown = sorted((set(names) | set(without or ())) - set(known))
    if unknown:
        raise typer.BadParameter(f"unknown worker(s) {unknown}; known: {', '.join(known)}")
    log.setup()
    names = [n for n in names if n not in set(without or ())]
    raise typer.Exit(node.run(config.load(), names, base_port, Path(log_dir) if log_dir else None))


def main() -> None:
    # `kill -QUIT <pid>` writes every thread's Python stack to the worker's log (stderr) and the
    # worker goes on, as a JVM does: where a worker that stopped making progress is stuck, even
    # with its event loop blocked. Not SIGUSR1, which Faust's workers take for their own.
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    app()


if __name__ == "__main__":
    main()
