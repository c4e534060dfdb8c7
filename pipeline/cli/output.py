"""What operator commands print: nothing an attacker wrote reaches a terminal as control codes."""

from __future__ import annotations

import re

import typer

# Spam is written by attackers, and so are the envelope senders that become sender keys: control
# characters (terminal escape sequences among them) are never printed to an operator's terminal,
# except tab and line ends.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    return _CONTROL.sub("?", str(value))


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error to stderr; the exit to raise."""
    typer.echo(f"error: {printable(message)}", err=True)
    return typer.Exit(code)
