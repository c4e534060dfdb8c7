"""Operator commands: ``floodgate senders list|show|revoke|restore``.

Known-good senders are never diverted to the bulk lane by flood admission. These commands show
who is known-good and why (read from the compacted reputation topic, as admission reads it), and
take that standing away or give it back (an operator decision on the feedback topic, applied by
the reputation worker, which publishes it to admission; :mod:`pipeline.feedback`). Light to
import (typer only); the work happens in :mod:`pipeline.feedback`.

A standing record carries its counts as of the sender's last change of standing (or operator
decision); ``floodgate reputation``'s ``/reputation/senders/KEY/`` has the live ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from pipeline.cli.output import fail, printable
from pipeline.core import config

if TYPE_CHECKING:
    from pipeline.core.senders import Standing

app = typer.Typer(no_args_is_help=True,
                  help="Known-good senders (exempt from flood admission): list, show, revoke, restore.")
KEY_HELP = "a sender key: addr:ADDRESS, domain:DOMAIN or client:ADDRESS"
WAIT_HELP = "seconds to wait for the reputation worker to publish it (default: feedback.DECISION_WAIT_S, 10)"
# The list's key column: keys are cut to this many characters (show prints the whole key).
KEY_WIDTH = 48


def _standings() -> dict[str, Standing]:
    from pipeline import feedback

    try:
        return feedback.standings(config.load())
    except feedback.FeedbackError as e:
        raise fail(str(e)) from None


def _state(s: Standing) -> str:
    return "revoked" if s.revoked else "good" if s.good else "not good"


def _as_dict(s: Standing) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(s), "revoked": s.revoked}


def _span(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min" if seconds >= 60 \
        else f"{seconds:.0f} s"


def _decision(s: Standing) -> str:
    from pipeline.sinks import iso

    if not s.decision:
        return "-"
    done = "revoked" if s.revoked else "restored"
    return f"{done} by {s.decision_by} at {iso(s.decision_at)}"


@app.command("list")
def list_senders(
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    everyone: bool = typer.Option(False, "--all", help="also senders that are not good: revoked, or lost standing"),
) -> None:
    """Known-good senders with their verdict and report counts, reporters and operator decisions."""
    import orjson

    shown = [s for _key, s in sorted(_standings().items()) if everyone or s.good]
    for s in shown:
        if as_json:
            typer.echo(orjson.dumps(_as_dict(s)).decode())
            continue
        reporters = f"{s.ham_reporters}/{s.spam_reporters}" + (f" ({s.ham_operators} op)" if s.ham_operators else "")
        typer.echo(printable(f"{s.key[:KEY_WIDTH]:{KEY_WIDTH}}  {_state(s):8}  verdicts {s.ham}/{s.spam}  "
                             f"reports {s.feedback_ham}/{s.feedback_spam} by {reporters} over "
                             f"{_span(s.reports_span_s)}  {_decision(s)}"))
    if not as_json:
        good = sum(s.good for s in shown)
        typer.echo(f"{good} known-good sender(s)" + (f", {len(shown) - good} not good" if everyone else "")
                   + "; counts ham/spam")


@app.command()
def show(key: str = typer.Argument(..., help=KEY_HELP),
         as_json: bool = typer.Option(False, "--json", help="the record as JSON")) -> None:
    """One sender key's published standing: why it is (or is not) known-good."""
    import orjson

    from pipeline.core import senders
    from pipeline.sinks import iso

    sender = senders.normalise_key(key)
    if sender is None:
        raise fail(f"{key!r} is not {KEY_HELP}")
    s = _standings().get(sender)
    if s is None:
        raise fail(f"no standing published for {sender}: it has never been known-good, nor revoked")
    if as_json:
        typer.echo(orjson.dumps(_as_dict(s)).decode())
        return
    for name, value in (("sender", s.key), ("standing", _state(s)),
                        ("verdicts", f"{s.ham} ham, {s.spam} spam"),
                        ("reports", f"{s.feedback_ham} ham, {s.feedback_spam} spam"),
                        ("reporters", f"{s.ham_reporters} of ham ({s.ham_operators} operators releasing), "
                                      f"{s.spam_reporters} of spam"),
                        ("ham reports", f"spanning {_span(s.reports_span_s)} (first to latest new reporter)"),
                        ("decision", _decision(s)), ("published", iso(s.updated_at))):
        typer.echo(printable(f"{name + ':':13} {value}"))
    typer.echo("\n[counts as of the last change of standing or decision]")


def _decide(decision: str, key: str, by: str, token: str | None, wait: float | None) -> None:
    from pipeline import feedback

    wait = feedback.DECISION_WAIT_S if wait is None else wait
    try:
        made, standing = feedback.decide(config.load(), key, decision, by, token, wait_s=wait)
    except feedback.FeedbackError as e:
        raise fail(str(e)) from None
    done = "revoked" if decision == "revoke" else "restored"
    if standing is None:
        typer.echo(printable(f"{done} {made.key} (by {made.by}): recorded on the feedback topic; the reputation "
                             f"worker has not published it within {wait:g} s (is it running?) and will when it gets "
                             "to it"))
        return
    typer.echo(printable(f"{done} {made.key} (by {made.by}); the reputation worker published it: "
                         f"{_state(standing)}"))


@app.command()
def revoke(key: str = typer.Argument(..., help=KEY_HELP),
           by: str = typer.Option(..., "--by", help="operator name, recorded with the decision"),
           token: str = typer.Option(None, "--token", help="must match FLOODGATE_ADMIN_TOKEN when it is set"),
           wait: float = typer.Option(None, "--wait", min=0, help=WAIT_HELP)) -> None:
    """Take a sender key's known-good standing away; further ham does not give it back until restored."""
    _decide("revoke", key, by, token, wait)


@app.command()
def restore(key: str = typer.Argument(..., help=KEY_HELP),
            by: str = typer.Option(..., "--by", help="operator name, recorded with the decision"),
            token: str = typer.Option(None, "--token", help="must match FLOODGATE_ADMIN_TOKEN when it is set"),
            wait: float = typer.Option(None, "--wait", min=0, help=WAIT_HELP)) -> None:
    """Lift a revocation: the standing rule decides the sender's standing again."""
    _decide("restore", key, by, token, wait)
