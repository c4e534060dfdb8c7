"""The spam quarantine: one SQLite table keyed by event id.

WAL mode lets operators list and release while the cleanup worker writes; ``synchronous=FULL``
makes a committed transaction survive power loss (WAL's NORMAL may lose the last ones), since
the worker commits its Kafka offsets right after. ``INSERT OR IGNORE`` on the primary key makes
replays harmless. Each row keeps the event's metadata line beside the raw message so that a
release re-injects the very same event.

Releases claim a row before they produce anything (:meth:`Quarantine.claim`): one conditional
UPDATE, atomic under SQLite's write lock across processes, gives the row to exactly one
release, which holds it for a lease; :meth:`Quarantine.mark_released` with that claim ends it.
A release that died after claiming holds the row only until its lease runs out
(``pipeline/feedback.py`` has the whole argument). A file from before claims existed gets the
claim columns when it is opened.
"""

from __future__ import annotations

import email.policy
import re
import sqlite3
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path

import orjson

from pipeline.core import events
from pipeline.core.events import MailEvent

SUBJECT_MAX = 200
# Subjects are read from the header block only; a header block beyond this is not mail.
HEADER_SCAN_MAX = 256 * 1024
# The RFC 2047 decoder of the email package is quadratic in the number of encoded words: a
# 380 KB Subject of 20,000 words took 11 s (one cleanup worker stalled per message). Only this
# much of the raw value is decoded; SUBJECT_MAX characters are kept anyway.
SUBJECT_DECODE_MAX = 8 * 1024
BUSY_TIMEOUT_MS = 10_000  # operators' commands and the worker share the file
DAY_S = 86_400
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")

SCHEMA = """
CREATE TABLE IF NOT EXISTS quarantine (
    event_id       TEXT PRIMARY KEY,
    accepted_at    REAL NOT NULL,
    quarantined_at REAL NOT NULL,
    mail_from      TEXT NOT NULL,
    rcpt_to        TEXT NOT NULL,   -- JSON list
    client_address TEXT NOT NULL,
    score          REAL,
    model_version  TEXT,
    subject        TEXT NOT NULL,   -- decoded, control characters removed, truncated
    size           INTEGER NOT NULL,
    meta           BLOB NOT NULL,   -- the event's metadata line, to re-inject it unchanged
    raw            BLOB NOT NULL,
    released_at    REAL,
    released_by    TEXT,
    claim          TEXT,            -- the release that holds the row (a random token) ...
    claimed_at     REAL,            -- ... since when (its lease runs from here) ...
    claimed_by     TEXT             -- ... and its operator
);
CREATE INDEX IF NOT EXISTS quarantine_by_time ON quarantine (quarantined_at);
"""
# Columns added after the first schema, added to an older file when it is opened.
ADDED_COLUMNS = (("claim", "TEXT"), ("claimed_at", "REAL"), ("claimed_by", "TEXT"))
SUMMARY = ("event_id, accepted_at, quarantined_at, mail_from, rcpt_to, client_address, score, model_version, "
           "subject, size, released_at, released_by, claimed_at, claimed_by")


@dataclass(frozen=True)
class Entry:
    event_id: str
    accepted_at: float
    quarantined_at: float
    mail_from: str
    rcpt_to: list[str]
    client_address: str
    score: float | None
    model_version: str | None
    subject: str
    size: int
    released_at: float | None
    released_by: str | None
    claimed_at: float | None = None
    claimed_by: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Entry:
        values = dict(row)
        values["rcpt_to"] = orjson.loads(values["rcpt_to"])
        return cls(**{k: values[k] for k in cls.__dataclass_fields__})

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def subject_of(raw: bytes) -> str:
    """The decoded Subject (RFC 2047 words and all), safe to print; empty when unreadable."""
    try:
        msg = BytesHeaderParser(policy=email.policy.default).parsebytes(raw[:HEADER_SCAN_MAX])
        # The raw value, cut before it is decoded (see SUBJECT_DECODE_MAX).
        value = next((str(v) for k, v in msg.raw_items() if k.lower() == "subject"), "")
        subject = str(email.policy.default.header_fetch_parse("subject", value[:SUBJECT_DECODE_MAX]))
    except Exception:  # hostile headers can break the parser in many ways; a subject is cosmetic
        return ""
    return _CONTROL.sub(" ", subject).strip()[:SUBJECT_MAX]


class Quarantine:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection per worker, used by one thread at a time (the worker loop's thread).
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                  timeout=BUSY_TIMEOUT_MS / 1000)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self._add_columns()

    def _add_columns(self) -> None:
        """Bring a file from before claims existed up to the schema (once, whoever opens it first)."""
        def missing() -> list[tuple[str, str]]:
            have = {row["name"] for row in self.db.execute("PRAGMA table_info(quarantine)")}
            return [(name, decl) for name, decl in ADDED_COLUMNS if name not in have]

        if not missing():
            return
        self.db.execute("BEGIN IMMEDIATE")  # another process may be adding them right now
        try:
            for name, decl in missing():
                self.db.execute(f"ALTER TABLE quarantine ADD COLUMN {name} {decl}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()

    def add(self, batch: Iterable[MailEvent], now: float | None = None) -> set[str]:
        """Store a batch in one committed transaction; the ids that were not there before."""
        now = time.time() if now is None else now
        added: set[str] = set()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for e in batch:
                meta = events.encode(e).partition(b"\n")[0]
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO quarantine (event_id, accepted_at, quarantined_at, mail_from, rcpt_to,"
                    " client_address, score, model_version, subject, size, meta, raw)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (e.id, e.accepted_at, now, e.envelope.mail_from, orjson.dumps(list(e.envelope.rcpt_to)).decode(),
                     e.envelope.client_address, e.score, e.model_version, subject_of(e.raw), len(e.raw), meta, e.raw))
                if cur.rowcount == 1:
                    added.add(e.id)
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return added

    def entries(self, limit: int = 50, include_released: bool = True) -> list[Entry]:
        where = "" if include_released else "WHERE released_at IS NULL"
        rows = self.db.execute(f"SELECT {SUMMARY} FROM quarantine {where} ORDER BY quarantined_at DESC, event_id"
                               " LIMIT ?", (limit,))
        return [Entry.from_row(r) for r in rows]

    def entry(self, event_id: str) -> Entry | None:
        row = self.db.execute(f"SELECT {SUMMARY} FROM quarantine WHERE event_id = ?", (event_id,)).fetchone()
        return Entry.from_row(row) if row else None

    def event(self, event_id: str) -> MailEvent | None:
        """The quarantined event exactly as it arrived from the spam topic."""
        row = self.db.execute("SELECT meta, raw FROM quarantine WHERE event_id = ?", (event_id,)).fetchone()
        return events.decode(bytes(row["meta"]) + b"\n" + bytes(row["raw"])) if row else None

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM quarantine").fetchone()[0]

    def claim(self, event_id: str, by: str, lease_s: float, now: float | None = None) -> str | None:
        """Take a message for releasing it: a claim (token) if it is there, not released, and
        not claimed by another release within the last ``lease_s`` seconds; else None. One
        conditional UPDATE, so of concurrent claims in any number of processes one wins."""
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        cur = self.db.execute("UPDATE quarantine SET claim = ?, claimed_at = ?, claimed_by = ?"
                              " WHERE event_id = ? AND released_at IS NULL"
                              " AND (claimed_at IS NULL OR claimed_at <= ?)",
                              (token, now, by, event_id, now - lease_s))
        return token if cur.rowcount == 1 else None

    def unclaim(self, event_id: str, claim: str) -> bool:
        """Give a claim back (its release failed before anything was marked): the next release
        need not wait for the lease. False if the claim is no longer this one."""
        cur = self.db.execute("UPDATE quarantine SET claim = NULL, claimed_at = NULL, claimed_by = NULL"
                              " WHERE event_id = ? AND claim = ? AND released_at IS NULL", (event_id, claim))
        return cur.rowcount == 1

    def mark_released(self, event_id: str, by: str, now: float | None = None, claim: str | None = None) -> bool:
        """Record a release; False if it was already released (or is not there), or, with
        ``claim``, if another release has claimed the row since (this one's lease ran out)."""
        held = "" if claim is None else " AND claim = ?"
        cur = self.db.execute("UPDATE quarantine SET released_at = ?, released_by = ?"
                              f" WHERE event_id = ? AND released_at IS NULL{held}",
                              (time.time() if now is None else now, by, event_id, *(() if claim is None else (claim,))))
        return cur.rowcount == 1

    def purge(self, older_than_days: float, now: float | None = None) -> int:
        """Delete what was quarantined more than ``older_than_days`` ago; how many rows went."""
        cutoff = (time.time() if now is None else now) - older_than_days * DAY_S
        return self.db.execute("DELETE FROM quarantine WHERE quarantined_at < ?", (cutoff,)).rowcount
