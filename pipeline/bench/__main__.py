"""``python -m pipeline.bench``: the harness's commands (``make demo``, ``make demo-mailsystem``, ``make bench-*``,
``make chaos``).

The harness drives and measures the product; the product never imports it, so its commands live
here rather than in ``floodgate``.
"""

from __future__ import annotations

import typer

from pipeline.bench.frontdoor import SHAPES
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
    capacity: float = typer.Option(0.0, help="lanes: pipeline capacity in msg/s; 0 measures it first"),
    naive: bool = typer.Option(True, help="also run the naive single-lane configuration"),
    keep: bool = typer.Option(False, help="keep the work directory (worker logs, Maildirs, quarantine)"),
    front_door: bool = typer.Option(True, help="the flood over SMTP at the ingress (reports/frontdoor.*)"),
    lanes: bool = typer.Option(True, help="the flood produced straight into the lanes, the generator playing "
                               "the ingress (reports/flood.*)"),
    shapes: str = typer.Option(",".join(SHAPES), help="front door: flood shapes, one after the other"),
    warmup: float = typer.Option(-1.0, help="front door: seconds of ham before the first shape's measured "
                                 "phases; -1: smtp.known_after_s + 10, so that the ham senders are known"),
) -> None:
    """A spam flood: over SMTP at the front door (ham timed connect -> Maildir, every 4xx), and at
    5x capacity straight into the lanes; each beside the naive design."""
    import sys

    from pipeline.bench import flood as bench
    from pipeline.bench import frontdoor

    settings = config.load()
    configs = ("floodgate", "naive") if naive else ("floodgate",)
    command = " ".join([COMMAND, *sys.argv[1:]])
    typer.echo(f"command: {command}", err=True)
    if front_door:
        scenario = frontdoor.FrontDoorScenario(warmup_s=None if warmup < 0 else warmup, pre_s=pre, flood_s=flood,
                                               post_s=post, shapes=tuple(s for s in shapes.split(",") if s))
        report = frontdoor.run(settings, scenario, configs, keep=keep, command=command,
                               log=lambda line: typer.echo(line, err=True))
        typer.echo(frontdoor.summary(report))
        typer.echo("wrote reports/frontdoor.json and reports/frontdoor.png"
                   + (f"; kept {report['workdir']}" if keep else ""))
    if lanes:
        scenario = bench.Scenario(pre_s=pre, flood_s=flood, post_s=post, capacity=capacity or None)
        report = bench.run(settings, scenario, configs, keep=keep)
        typer.echo(bench.summary(report))
        typer.echo("wrote reports/flood.json and reports/flood.png"
                   + (f"; kept {report['workdir']}" if keep else ""))


@app.command("ingress")
def bench_ingress(
    conns: str = typer.Option("1,5", help="connections each of the 20 clients keeps busy: each run once per value"),
    only: str = typer.Option("", help="only the runs whose name contains this (persistent, per-message, "
                             "product limits, end to end)"),
) -> None:
    """Messages a second the SMTP ingress accepts from 20 clients (1 and 2 processes, persistent and
    one message per connection), CPU per process; and the rate the whole node sustains end to end.
    Writes reports/ingress.json and the ingress section of BENCHMARKS.md."""
    import sys

    from pipeline.bench import ingress as bench

    command = "make bench-ingress" if len(sys.argv) == 2 else " ".join([COMMAND, *sys.argv[1:]])
    typer.echo(f"command: {command}", err=True)
    report = bench.run(config.load(), tuple(int(c) for c in conns.split(",")), only,
                       log=lambda line: typer.echo(line, err=True))
    bench.write(report, command)
    typer.echo("wrote reports/ingress.json and the ingress section of BENCHMARKS.md")


@app.command("web")
def bench_web(
    messages: int = typer.Option(100_000, help="messages in the quarantine"),
    rounds: int = typer.Option(20, help="requests timed per kind of list request"),
    quarantine: str = typer.Option("", help="a quarantine file filled by an earlier run: used again (filled "
                                   "and kept there if missing)"),
) -> None:
    """The web worker's list view with a full quarantine: p50/p95 per kind of request -> BENCHMARKS.md."""
    import sys
    import tempfile
    from pathlib import Path

    import orjson

    from models.bench import write_section
    from pipeline.bench import web as bench

    with tempfile.TemporaryDirectory(prefix="floodgate-webbench-") as tmp:
        result = bench.run(config.load(), messages, Path(tmp), rounds, Path(quarantine) if quarantine else None)
    command = ("make bench-web" if (messages, rounds, quarantine) == (100_000, 20, "")
               else COMMAND + " " + " ".join(sys.argv[1:]))
    reports = config.ROOT / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "bench-web.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
    write_section(config.ROOT / "BENCHMARKS.md", bench.section(result, command))
    for label, p in result["passes"].items():
        lv = p["list_view"]
        typer.echo(f"list view over {result['filled']['messages']:,} messages at {label}: p50 {lv['p50_ms']} ms, "
                   f"p95 {lv['p95_ms']} ms, max {lv['max_ms']} ms ({lv['n']} requests; worker CPU p50 "
                   f"{lv['cpu_p50_ms']} ms)")
    typer.echo("wrote reports/bench-web.json and BENCHMARKS.md")


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
    shape: str = typer.Option("hog", help="the flood at the front door: fast, hog (bots that also hold idle "
                              "connections: every limit of the front door at work) or concentrated"),
    front_door: bool = typer.Option(True, help="after the flood into the lanes, a flood over SMTP at the front door"),
) -> None:
    """The whole story on this machine: workers as processes, real mail, a spam flood into the lanes,
    then one over SMTP at the front door, and the result."""
    from pipeline.bench import flood as bench
    from pipeline.bench import frontdoor

    settings = config.load()
    configs = ("floodgate", "naive") if naive else ("floodgate",)
    typer.echo("Floodgate demo: measuring this machine's capacity, then steady mail, a spam flood at 5x capacity,"
               " and recovery.\nWorkers run as separate processes; the live table is consumer lag per group.")
    scenario = bench.Scenario(pre_s=seconds, flood_s=seconds, post_s=seconds)
    report = bench.run(settings, scenario, configs, live=True)
    typer.echo(bench.summary(report))
    typer.echo("wrote reports/flood.json and reports/flood.png")
    if not front_door:
        return
    door = frontdoor.FrontDoorScenario(pre_s=seconds, flood_s=seconds, post_s=seconds, shapes=(shape,))
    typer.echo(f"\nNow at the front door: floodgate smtp and the workers, ham senders and a {shape} flood of bots, "
               "all over real SMTP connections from their own addresses. The ham senders first send for "
               f"{settings.smtp.known_after_s + frontdoor.KNOWN_MARGIN_S:.0f} s, so that the ingress knows them, "
               "as it knows a provider's regular senders.")
    report = frontdoor.run(settings, door, configs, live=True, log=lambda line: typer.echo(line, err=True))
    typer.echo(frontdoor.summary(report))
    typer.echo("wrote reports/frontdoor.json and reports/frontdoor.png")


@app.command("smtp-load")
def smtp_load(
    target: str = typer.Option("127.0.0.1:2525", help="HOST:PORT of the ingress (floodgate smtp)"),
    start_ingress: bool = typer.Option(False, help="start floodgate smtp as a process on private topics instead "
                                       "(its CPU and the broker's reported)"),
    workers: bool = typer.Option(False, help="with --start-ingress: the standard workers too, and --e2e"),
    shapes: str = typer.Option("fast,hog,concentrated", help="flood shapes, one run each: none (ham alone), "
                               "fast, hog, concentrated, saturate (20 clients as fast as they can)"),
    warmup: float = typer.Option(5.0, help="seconds of ham before the measured phases"),
    pre: float = typer.Option(10.0, help="seconds of ham before the flood"),
    flood: float = typer.Option(20.0, help="seconds of flood (bots and hoggers) beside the ham"),
    post: float = typer.Option(10.0, help="seconds of ham after the flood"),
    ham: bool = typer.Option(True, help="send ham (off for an acceptance-rate run)"),
    ham_senders: int = typer.Option(20, help="ham client addresses (127.1.x.y)"),
    ham_rate: float = typer.Option(20.0, help="ham messages a second from all senders together"),
    retry_delay: float = typer.Option(1.0, help="seconds before a tempfailed ham message is tried again"),
    bots: int = typer.Option(-1, help="bot addresses (-1: the shape's)"),
    conns: int = typer.Option(-1, help="concurrent connections per bot (-1: the shape's)"),
    per_conn: int = typer.Option(-1, help="messages per bot connection (-1: the shape's)"),
    idle: int = typer.Option(-1, help="idle connections each bot holds open (-1: the shape's)"),
    bot_rate: float = typer.Option(0.0, help="at most this many messages a second per bot (0: as fast as taken)"),
    watch: str = typer.Option("", help="NAME=PID[,NAME=PID...]: processes whose CPU (/proc) is reported per phase"),
    e2e: bool = typer.Option(False, help="time ham to its Maildir: the pipeline's settings (FLOODGATE_*) name "
                             "the Maildir root; waits for the accepted ham to be placed"),
    out: str = typer.Option("reports/smtpload.json", help="the JSON summary"),
    seed: int = typer.Option(7),
    auth: bool = typer.Option(False, help="with --start-ingress: sender authentication on, against a private knotd "
                              "serving the bench's zones (pipeline.bench.authworld); ham and bulk mail signed; "
                              "domain:bank.auth.test known-good. Off: the ingress does not verify"),
    verify: bool = typer.Option(True, help="with --auth: the ingress verifies; --no-verify: the same mail, zones "
                                "and standings with verification off (names as claimed: what a forger got before)"),
    auth_domains: int = typer.Option(3000, help="with --auth: sender domains of saturate-signed (a new one a "
                                     "message until they run out: run it twice for a cold and a warm cache)"),
    processes: int = typer.Option(-1, help="with --start-ingress: the ingress's session processes "
                                  "(-1: smtp.processes; 1: a single process)"),
) -> None:
    """Ham and a flood over real SMTP connections from distinct 127/8 addresses: SMTP step times,
    connect -> 250 (-> Maildir with --e2e), every 4xx, accepted msg/s, CPU per message."""
    import contextlib
    import dataclasses
    import os
    import platform
    import sys
    import tempfile
    from pathlib import Path

    import orjson

    from pipeline.bench import smtpload

    host, _, port = target.rpartition(":")
    phases = smtpload.Phases(warmup, pre, flood, post)
    ham_mail, spam = smtpload.load_corpus(config.load().paths.data, seed)
    bot_mail: dict[str, list[tuple[str, bytes]]] = {}
    world = None
    if auth:
        if not start_ingress:
            raise typer.BadParameter("--auth needs --start-ingress (the ingress must use the bench's DNS server)")
        mail = smtpload.auth_mail(config.load().paths.data, auth_domains)
        world, ham_mail, bodies, bot_mail = mail.world, mail.ham, mail.bodies, mail.bot_mail
    signed_runs = 0
    ham_spec = smtpload.HamSpec(senders=ham_senders, rate=ham_rate, retry_delay_s=retry_delay) if ham else None
    watched = {name: int(pid) for name, _, pid in (w.partition("=") for w in watch.split(",") if w)}
    overrides = {k: v for k, v in (("bots", bots), ("conns", conns), ("per_conn", per_conn), ("idle", idle))
                 if v >= 0} | ({"rate": bot_rate} if bot_rate > 0 else {})
    report: dict = {"command": " ".join([COMMAND, *sys.argv[1:]]), "python": platform.python_version(),
                    "cores": len(os.sched_getaffinity(0)), "auth": auth, "verify": auth and verify, "runs": {}}
    with contextlib.ExitStack() as stack:
        pipeline = config.load() if e2e else None
        if start_ingress:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="floodgate-smtpload-")))
            dns_port = None
            if world is not None:
                from pipeline.bench import authworld
                from pipeline.bench.dnsserver import KnotServer

                dns_port = stack.enter_context(KnotServer(world.zones)).port
            pipeline, node = stack.enter_context(smtpload.ingress_process(
                config.load(), workdir, workers=workers, auth_dns_port=dns_port if verify else None,
                good=smtpload.GOOD_KEYS if world is not None else (),
                processes=processes if processes >= 0 else None))
            lanes = pipeline
            host, port = pipeline.smtp.host, str(pipeline.smtp.port)
            watched |= smtpload.ingress_processes(node.workers["smtp"].proc.pid)  # type: ignore[union-attr]
            broker = smtpload.broker_pid(pipeline)
            if broker is not None:
                watched.setdefault("broker", broker)
            if not workers:
                pipeline = None
        else:
            lanes = None
        for i, shape in enumerate(smtpload.iter_shapes(shapes)):
            shape = dataclasses.replace(shape, **overrides)
            if shape.mail != "random" and shape.mail not in bot_mail:
                raise typer.BadParameter(f"shape {shape.name} sends prepared mail: run it with --auth --start-ingress")
            if shape.mail == "signed" and world is not None:
                # Each run of it: the same domains in the same order (a second run finds them cached),
                # new messages (new signatures: nothing a verifier did for the first run's applies).
                if signed_runs:
                    bodies = bodies[1:] + bodies[:1]
                    bot_mail["signed"] = authworld.signed_mail(world, bodies, 0, auth_domains)
                signed_runs += 1
            summary = smtpload.run_shape(host or "127.0.0.1", int(port), shape, phases, ham=ham_mail, spam=spam,
                                         ham_spec=ham_spec, watch=watched, e2e=pipeline, seed=seed,
                                         bot_mail=bot_mail.get(shape.mail, ()), lanes=lanes)
            name = shape.name if shape.name not in report["runs"] else f"{shape.name}#{i + 1}"
            report["runs"][name] = summary
            typer.echo(smtpload.table(summary))
            if "lanes" in summary:
                typer.echo(f"lanes: {summary['lanes']}")
            typer.echo(f"load average {summary['loadavg_before']} -> {summary['loadavg_after']}")
        if start_ingress:  # an ingress that died (or was killed) mid-run makes its numbers meaningless
            report["ingress_exits"] = [dataclasses.asdict(e) for e in node.exits]
            if node.exits:
                typer.echo(f"the ingress exited during the runs: {node.exits}", err=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    typer.echo(f"wrote {out}")


@app.command("auth-verify")
def auth_verify(
    domains: int = typer.Option(1000, help="sender domains, one message each (cold), then new messages (warm)"),
    helo: str = typer.Option("unless-mailfrom-passes", help="HELO check: always | unless-mailfrom-passes | never"),
    dns_backend: str = typer.Option("aiodns", help="aiodns | dnspython"),
    spf_memo: bool = typer.Option(True, help="keep SPF results per (client, domain)"),
    dkim_memo: bool = typer.Option(True, help="keep DKIM results of a signature over the same bytes"),
    openssl: bool = typer.Option(True, help="RSA checks in OpenSSL (off: dkimpy's pure Python)"),
    signed_fields: bool = typer.Option(True, help="dkimpy gets the signed fields only (off: the whole header)"),
    profile: str = typer.Option("", help="cProfile one pass: cold | warm | campaign"),
) -> None:
    """The verifier alone (pipeline.bench.authbench): CPU ms per message, cold, warm and for a campaign,
    against a private knotd; each option turns one saving off to measure it."""
    import dkim
    import orjson

    from pipeline.bench import authbench
    from pipeline.smtp import auth

    if not openssl:
        dkim.RSASSA_PKCS1_v1_5_verify = auth._ORIGINAL_RSA_VERIFY
    cfg = {"helo": helo, "dns_backend": dns_backend} | ({} if spf_memo else {"spf_result_entries": 0}) \
        | ({} if dkim_memo else {"dkim_result_entries": 0}) | {"signed_fields_only": signed_fields}
    typer.echo(orjson.dumps(authbench.run(domains, profile=profile, **cfg)).decode())


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
