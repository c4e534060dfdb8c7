"""``python -m pipeline.bench``: the harness's commands (``make demo``, ``make demo-mailsystem``, ``make bench-*``,
``make chaos``).

The harness drives and measures the product; the product never imports it, so its commands live
here rather than in ``floodgate``.
"""

from __future__ import annotations

import typer

from pipeline.cli import start_service
from pipeline.core import config

COMMAND = "python -m pipeline.bench"
app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Floodgate's harness: the demo, the flood and chaos benches, the naive baseline.")


@app.command("flood")
def bench_flood(
    pre: float = typer.Option(20.0, help="seconds of steady mail before the flood"),
    flood: float = typer.Option(20.0, help="seconds of flood"),
    post: float = typer.Option(20.0, help="seconds of steady mail after it"),
    capacity: float = typer.Option(0.0, help="pipeline capacity in msg/s; 0 measures it first"),
    naive: bool = typer.Option(True, help="also run the naive single-lane configuration"),
    keep: bool = typer.Option(False, help="keep the work directory (worker logs, Maildirs, quarantine)"),
) -> None:
    """A spam flood at 5x capacity: ham latency before, during and after, beside the naive design."""
    from pipeline.bench import flood as bench

    settings = config.load()
    scenario = bench.Scenario(pre_s=pre, flood_s=flood, post_s=post, capacity=capacity or None)
    report = bench.run(settings, scenario, ("floodgate", "naive") if naive else ("floodgate",), keep=keep)
    typer.echo(bench.summary(report))
    typer.echo("wrote reports/flood.json and reports/flood.png"
               + (f"; kept {report['workdir']}" if keep else ""))


@app.command("reputation")
def bench_reputation(
    verdicts: int = typer.Option(20_000, help="classified events in the backlog the worker drains"),
) -> None:
    """Verdicts per second one reputation worker tallies, and its CPU per verdict -> BENCHMARKS.md."""
    import sys
    import tempfile
    from pathlib import Path

    from models.bench import write_section
    from pipeline.bench import reputation as bench

    out = config.ROOT / "BENCHMARKS.md"
    with tempfile.TemporaryDirectory(prefix="floodgate-repbench-") as tmp:
        result = bench.run(config.load(), verdicts, Path(tmp))
    command = "make bench-reputation" if verdicts == 20_000 else COMMAND + " " + " ".join(sys.argv[1:])
    write_section(out, bench.section(bench.old_section(out), result, command))
    typer.echo(f"{result['verdicts_per_s']:,} verdicts/s, {result['cpu_s_per_1k']} CPU s per 1,000 verdicts, "
               f"{result['internal_per_verdict']} internal records per verdict {result['internal_records']}")
    typer.echo("wrote the reputation section of BENCHMARKS.md")


@app.command()
def chaos(
    messages: int = typer.Option(100_000, help="messages per run"),
    rate: float = typer.Option(200.0, help="messages/s offered (below capacity, so backlogs drain)"),
    brokers: str = typer.Option("1,3", help="runs: 1 = a private broker, restarted; 3 = a private "
                                "three-broker cluster, one broker killed"),
    outage: float = typer.Option(10.0, help="seconds the delivery target (Maildir store) stays down"),
    broker_down: float = typer.Option(10.0, help="seconds a killed broker stays down"),
    seed: int = typer.Option(7, help="fault order and traffic"),
) -> None:
    """Fault injection: worker SIGKILLs, broker crashes, the delivery target down, on a long run of mail;
    then where every acknowledged message went (none lost, none twice). Writes reports/chaos.json."""
    import sys

    from pipeline.bench import chaos as bench

    plans = [bench.Plan(messages=messages, rate=rate, brokers=int(b), outage_s=outage, broker_down_s=broker_down,
                        seed=seed) for b in brokers.split(",")]
    rep = bench.run(config.load(), plans, command=" ".join([COMMAND, *sys.argv[1:]]),
                    log=lambda line: typer.echo(line), benchmarks=config.ROOT / "BENCHMARKS.md")
    typer.echo(bench.summary(rep))
    typer.echo("wrote reports/chaos.json and the chaos section of BENCHMARKS.md")
    if any(r["lost"] or r["duplicated"] for r in rep["runs"].values()):
        raise typer.Exit(1)


@app.command()
def demo(
    seconds: float = typer.Option(10.0, help="length of each phase: before, during and after the flood"),
    naive: bool = typer.Option(False, help="also run the naive single-lane design on the same traffic"),
) -> None:
    """The whole story on this machine: workers as processes, real mail, a spam flood, the result."""
    from pipeline.bench import flood as bench

    settings = config.load()
    typer.echo("Floodgate demo: measuring this machine's capacity, then steady mail, a spam flood at 5x capacity,"
               " and recovery.\nWorkers run as separate processes; the live table is consumer lag per group.")
    scenario = bench.Scenario(pre_s=seconds, flood_s=seconds, post_s=seconds)
    report = bench.run(settings, scenario, ("floodgate", "naive") if naive else ("floodgate",), live=True)
    typer.echo(bench.summary(report))
    typer.echo("wrote reports/flood.json and reports/flood.png")


@app.command()
def mailsystem() -> None:
    """Postfix in front, Dovecot behind (private instances on loopback, as root): mail from swaks, a Junk
    move reported back, a release from the quarantine, the mailboxes over IMAP."""
    from pipeline.bench import mailsystem as bench

    bench.demo(config.load(), log=typer.echo)


@app.command()
def naive() -> None:
    """The single-lane design of 2008 (benchmark baseline): classify, then deliver or quarantine, in turn."""
    from pipeline.bench import naive as stage

    settings, service = start_service("naive")
    stage.run(settings, service).run()


if __name__ == "__main__":
    app()
