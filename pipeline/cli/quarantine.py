"""Operator commands: ``floodgate quarantine list|show|release|purge`` and ``floodgate report``.

Light to import (typer only); the work happens in :mod:`pipeline.feedback` and the quarantine store.
"""

from __future__ import annotations

import enum
import sys
from typing import TYPE_CHECKING

import typer

from pipeline.cli.output import fail as _fail
from pipeline.cli.output import printable as _printable
from pipeline.core import config

if TYPE_CHECKING:
    from pipeline.sinks.quarantine import Quarantine

app = typer.Typer(no_args_is_help=True, help="The spam quarantine: list, show, release, purge.")


class Label(enum.StrEnum):
    spam = "spam"
    ham = "ham"


def _store() -> Quarantine:
    from pipeline.sinks.quarantine import Quarantine

    settings = config.load()
    if not settings.paths.quarantine_db.exists():
        raise _fail(f"no quarantine at {settings.paths.quarantine_db}")
    return Quarantine(settings.paths.quarantine_db)


@app.command("list")
def list_entries(limit: int = typer.Option(50, min=1, help="at most this many, newest first"),
                 as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
                 pending: bool = typer.Option(False, help="only messages not released yet")) -> None:
    """Quarantined messages, newest first."""
    import orjson

    from pipeline.feedback import RELEASE_LEASE_S
    from pipeline.sinks import iso

    store = _store()
    try:
        entries = store.entries(limit, include_released=not pending)
    finally:
        store.close()
    for e in entries:
        if as_json:
            typer.echo(orjson.dumps(e.as_dict()).decode())
            continue
        score = "-" if e.score is None else f"{e.score:.3f}"
        state = "released" if e.released_at else "releasing" if e.releasing(RELEASE_LEASE_S) else "held"
        rcpt = ",".join(e.rcpt_to)[:40]
        typer.echo(_printable(f"{e.event_id}  {iso(e.quarantined_at)}  {score:>5}  {state:8}  {e.mail_from[:40]:40}  "
                              f"{rcpt:40}  {e.subject[:60]}"))
    if not as_json:
        typer.echo(f"{len(entries)} message(s)")


@app.command()
def show(event_id: str, raw: bool = typer.Option(False, "--raw", help="write the whole message to stdout")) -> None:
    """One quarantined message: a summary and its headers (the body only with --raw)."""
    from pipeline.feedback import RELEASE_LEASE_S
    from pipeline.sinks import iso
    from pipeline.sinks.quarantine import header_block

    store = _store()
    try:
        entry = store.entry(event_id)
        event = store.event(event_id) if entry else None
    finally:
        store.close()
    if entry is None or event is None:
        raise _fail(f"no quarantined message with event id {event_id!r}")
    released = f"{iso(entry.released_at)} by {entry.released_by}" if entry.released_at else "no"
    if entry.releasing(RELEASE_LEASE_S):
        released = f"being released by {entry.claimed_by} since {iso(entry.claimed_at)}"
    if raw:
        sys.stdout.buffer.write(event.raw)
        sys.stdout.buffer.flush()
        return
    for name, value in (("event", entry.event_id), ("accepted", iso(entry.accepted_at)),
                        ("quarantined", iso(entry.quarantined_at)), ("from", entry.mail_from),
                        ("to", ", ".join(entry.rcpt_to)), ("client", entry.client_address),
                        ("score", entry.score), ("model", entry.model_version), ("lane", event.lane),
                        ("size", f"{entry.size} bytes"), ("subject", entry.subject),
                        ("released", released)):
        typer.echo(_printable(f"{name + ':':13} {value}"))
    head = header_block(event.raw)
    typer.echo("")
    typer.echo(_printable(head.decode("utf-8", errors="replace")))
    typer.echo(f"\n[body not shown: {entry.size} bytes in all; --raw writes the whole message]")


@app.command()
def release(event_id: str,
            by: str = typer.Option(..., "--by", help="operator name, recorded with the release"),
            token: str = typer.Option(None, "--token", help="must match FLOODGATE_ADMIN_TOKEN when it is set")) -> None:
    """Deliver a quarantined message after all, and feed the correction back (label ham)."""
    from pipeline import feedback

    try:
        feedback.release(config.load(), event_id, by, token)
    except feedback.FeedbackError as e:
        raise _fail(str(e)) from None
    typer.echo(f"released {event_id} to delivery; feedback recorded (by {by})")


@app.command()
def purge(older_than: float = typer.Option(None, "--older-than", min=0,
                                           help="days; default worker.quarantine_retention_days")) -> None:
    """Delete messages quarantined longer ago than the retention."""
    days = config.load().worker.quarantine_retention_days if older_than is None else older_than
    store = _store()
    try:
        gone = store.purge(days)
    finally:
        store.close()
    typer.echo(f"purged {gone} message(s) quarantined more than {days:g} day(s) ago")


def report(label: Label, event_id: str,
           by: str = typer.Option("", "--by", help="who reports (user or mailbox), kept with the feedback")) -> None:
    """A user's verdict on a message: feedback for retraining, found in the quarantine or the Maildirs."""
    from pipeline import feedback

    try:
        feedback.report(config.load(), event_id, label.value, by)
    except feedback.FeedbackError as e:
        raise _fail(str(e)) from None
    typer.echo(f"reported {event_id} as {label.value}")
