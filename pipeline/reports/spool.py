"""The report spool, and ``floodgate-report``: the program a mail store pipes a user's verdict to.

When a user moves a message into Junk (or out of it), Dovecot's IMAPSieve runs
``floodgate-report spam|ham USER`` with the message on stdin, and the user's MOVE waits for it.
After ``sieve_pipe_exec_timeout`` (10 s) Dovecot kills it and the MOVE still answers OK: the
report is gone, with an Error line in Dovecot's log as its only trace. A program that published
to Kafka itself would lose every report during a broker outage that way, and hold up every MOVE
while the broker is slow. So this one does the least that makes a report durable and exits:

1. read the message (the store's Return-Path/Delivered-To/Received lines, our stamp, the mail);
2. write it, with a metadata line, to ``SPOOL/tmp/NAME``, fsync it, rename it into
   ``SPOOL/new/NAME`` and fsync the directory (as a Maildir delivery does): once it exits 0
   the report survives a crash of the host;
3. exit 0; on any failure (a full disk, a spool it cannot write) exit 75 with the reason on stderr,
   which Dovecot logs.

``floodgate report-drain`` (:mod:`pipeline.reports.drain`) publishes what is in ``new/`` in name
order (names start with the time in nanoseconds: a message moved into Junk and back out is
reported spam, then ham, in that order) and removes each report only after the broker
acknowledged it; a report it can never publish goes to ``SPOOL/bad/`` with the reason beside it.

Standard library only, and nothing of Floodgate's is imported: it runs as the mail user under any
Python 3.11+ in a few tens of milliseconds, also as a plain file (``python3 -I -S spool.py``) where
the mail user cannot run Floodgate's own virtual environment.

Spool file: one JSON line (``v``, ``label``, ``user``, ``reported_at``, ``bytes``, ``truncated``),
a newline, the message bytes as the pipe gave them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SPOOL_VERSION = 1
LABELS = ("spam", "ham")
# Kept of a message: the feedback topic's records are at most 16 MiB, so a larger message could
# never be published. Beyond it the report is still spooled (marked truncated, without the rest)
# and the drain sets it aside in bad/ with the reason: visible, never silently dropped.
SPOOL_MAX_BYTES = 16 * 1024 * 1024
# Directory and file modes. The pipe runs as the mail user and the drain may run as another user
# in the spool's group: the group reads, renames and removes (a setgid spool directory gives new
# files its group). Set explicitly: the mail store's child processes may run under umask 077.
DIR_MODE = 0o2770
FILE_MODE = 0o640
EX_OK = 0
EX_TEMPFAIL = 75  # sysexits: "try again later"; Dovecot logs the program's failure and its stderr
SUBDIRS = ("tmp", "new", "bad")


class SpoolError(Exception):
    """A spool file that is not a report (the drain sets it aside in bad/)."""


@dataclass(frozen=True)
class Report:
    path: Path
    label: str
    user: str
    reported_at: float
    data: bytes
    truncated: bool

    @property
    def name(self) -> str:
        return self.path.name


class Spool:
    """A spool directory: ``tmp/`` (being written), ``new/`` (waiting), ``bad/`` (set aside)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def ensure(self) -> None:
        for name in ("", *SUBDIRS):
            d = self.root / name
            if not d.is_dir():
                d.mkdir(parents=True, exist_ok=True)
                os.chmod(d, DIR_MODE)

    def write(self, label: str, user: str, data: bytes, truncated: bool = False, now: float | None = None) -> Path:
        """Spool one report durably; its path in ``new/``."""
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, not {label!r}")
        self.ensure()
        ts = time.time() if now is None else now
        name = f"{time.time_ns():020d}.{os.getpid()}.{secrets.token_hex(4)}.{label}"
        meta = {"v": SPOOL_VERSION, "label": label, "user": user, "reported_at": ts, "bytes": len(data),
                "truncated": truncated}
        tmp = self.root / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(json.dumps(meta, separators=(",", ":")).encode() + b"\n")
                f.write(data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        final = self.root / "new" / name
        os.rename(tmp, final)
        _fsync_dir(final.parent)
        return final

    def pending(self, limit: int = 0) -> list[Path]:
        """Reports waiting in ``new/``, oldest first (at most ``limit``; 0: all)."""
        try:
            names = sorted(n for n in os.listdir(self.root / "new") if not n.startswith("."))
        except FileNotFoundError:
            return []
        return [self.root / "new" / n for n in (names[:limit] if limit else names)]

    def read(self, path: Path) -> Report:
        raw = path.read_bytes()
        head, sep, data = raw.partition(b"\n")
        try:
            meta = json.loads(head) if sep else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("v") != SPOOL_VERSION:
            raise SpoolError("not a report: no version 1 metadata line")
        label, user = meta.get("label"), meta.get("user", "")
        if label not in LABELS or not isinstance(user, str):
            raise SpoolError(f"bad metadata: label {label!r}, user {user!r}")
        if meta.get("bytes") != len(data):
            raise SpoolError(f"incomplete: {len(data)} of {meta.get('bytes')!r} bytes")
        try:
            reported_at = float(meta.get("reported_at", 0.0))
        except (TypeError, ValueError):
            raise SpoolError(f"bad metadata: reported_at {meta.get('reported_at')!r}") from None
        return Report(path, label, user, reported_at, data, bool(meta.get("truncated")))

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def set_aside(self, path: Path, reason: str) -> Path:
        """Move a report that can never be published to ``bad/``, the reason in ``NAME.reason``."""
        self.ensure()
        bad = self.root / "bad" / path.name
        (self.root / "bad" / (path.name + ".reason")).write_text(reason + "\n")
        os.rename(path, bad)
        return bad

    def bad(self) -> list[Path]:
        try:
            return sorted(p for p in (self.root / "bad").iterdir() if not p.name.endswith(".reason"))
        except FileNotFoundError:
            return []


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_stdin(limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of stdin, and whether there was more. The rest is read and
    dropped: the store writes the whole message, and a pipe closed early is an error there."""
    stream = sys.stdin.buffer
    data = stream.read(limit + 1)
    if len(data) <= limit:
        return data, False
    while stream.read(1 << 20):
        pass
    return data[:limit], True


def default_spool() -> Path:
    """The spool of Floodgate's settings (``paths.report_spool``); loads them only when asked."""
    from pipeline.core import config

    return config.load().paths.report_spool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="floodgate-report",
        description="Spool a user's verdict on the message on stdin for floodgate report-drain "
                    "(an IMAPSieve pipe program: fast, durable, never waits for the broker).")
    parser.add_argument("label", choices=LABELS, help="spam: moved into Junk; ham: moved out of it")
    parser.add_argument("user", nargs="?", default="", help="who moved it (the IMAP user)")
    parser.add_argument("--spool", help="the spool directory (default: Floodgate's paths.report_spool)")
    args = parser.parse_args(argv)
    try:
        spool = Spool(args.spool) if args.spool else Spool(default_spool())
        data, truncated = _read_stdin(SPOOL_MAX_BYTES)
        spool.write(args.label, args.user, data, truncated)
    except Exception as e:  # the pipe's caller only sees the exit code and stderr
        print(f"floodgate-report: could not spool the {args.label} report: {e!r}", file=sys.stderr)
        return EX_TEMPFAIL
    return EX_OK


if __name__ == "__main__":
    sys.exit(main())
