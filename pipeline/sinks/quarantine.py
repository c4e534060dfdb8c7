"""The spam quarantine: one SQLite file, a row per event id.

WAL mode lets operators list and release while the cleanup worker writes; ``synchronous=FULL``
makes a committed transaction survive power loss (WAL's NORMAL may lose the last ones), since
the worker commits its Kafka offsets right after. ``INSERT OR IGNORE`` on the primary key makes
replays harmless. Each row keeps the event's metadata line beside the raw message so that a
release re-injects the very same event.

Three tables (schema version 2). ``quarantine`` holds what is listed and searched (envelope,
subject, score, model, release state: a few hundred bytes a row); ``quarantine_message`` the
event's metadata line and raw bytes, read only to show or release one message;
``quarantine_recipient`` one row per envelope recipient (lowercased) with the time, the index of
"everything held for these addresses, newest first" (the web worker's user view and the digest).
Version 1 kept the raw bytes inside ``quarantine``, before the release columns: SQLite follows a
row's overflow pages to reach a column stored after a large blob, so with 100,000 messages a
count of the held ones or a search by subject read the whole file (1.2 GB, 0.3 s warm, seconds
cold); now such a scan reads the summaries only (``make bench-web``). A version 1 file is
converted when it is first opened, in one transaction (stop the cleanup worker of the old
version before starting the new one).

Search and paging (:meth:`Quarantine.search`): newest first by (``quarantined_at``, ``event_id``),
keyset pages (a cursor, never OFFSET: page 2,000 costs what page 1 does), filters on recipient,
sender, subject, score, model version, time and state, all answered from one covering index in
time order (and the recipient index), the page and its count in one pass.

Releases claim a row before they produce anything (:meth:`Quarantine.claim`): one conditional
UPDATE, atomic under SQLite's write lock across processes, gives the row to exactly one
release, which holds it for a lease; :meth:`Quarantine.mark_released` with that claim ends it.
A release that died after claiming holds the row only until its lease runs out
(``pipeline/feedback.py`` has the whole argument). Deleting (:meth:`Quarantine.delete`) takes the
same claim first, so a message being released is never deleted under the release.

Digests (``floodgate digest``, :mod:`pipeline.digest`) record here which recipient got the digest
of which period (``quarantine_digest``), the state that makes a digest once per period.
"""

from __future__ import annotations

import email.policy
import re
import sqlite3
import time
import uuid
from collections.abc import Iterable, Sequence
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
# Operators are shown at most this much of a header block (a hostile one has 50,000 lines).
HEADER_SHOW_MAX = 64 * 1024
BUSY_TIMEOUT_MS = 10_000  # operators' commands and the worker share the file
DAY_S = 86_400
SCHEMA_VERSION = 2  # PRAGMA user_version; 0 is a file of version 1 (or a new one)
# A search counts its matches up to this many and then says "more": counting all of 100,000
# rows for every page is a scan the page itself does not need.
COUNT_MAX = 10_000
PAGE_MAX = 500  # rows one search returns at most (the web's bulk actions work a page at a time)
STATES = ("held", "released", "all")
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
    released_at    REAL,
    released_by    TEXT,
    claim          TEXT,            -- the release that holds the row (a random token) ...
    claimed_at     REAL,            -- ... since when (its lease runs from here) ...
    claimed_by     TEXT             -- ... and its operator
);
-- Newest first, with every column the search form filters on: a search walks this index alone
-- (a few MB for 100,000 messages), touching the table only for the rows it shows. (A partial
-- index of the held messages was worse: SQLite does not see that its condition covers
-- "released_at IS NULL", so it read every row's released_at from the table: 190 ms a page.)
CREATE INDEX IF NOT EXISTS quarantine_all ON quarantine
    (quarantined_at, event_id, released_at, score, model_version, mail_from, subject);
CREATE INDEX IF NOT EXISTS quarantine_model ON quarantine (model_version);
CREATE TABLE IF NOT EXISTS quarantine_message (
    event_id TEXT PRIMARY KEY,
    meta     BLOB NOT NULL,         -- the event's metadata line, to re-inject it unchanged
    raw      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine_recipient (
    rcpt           TEXT NOT NULL,   -- lowercased envelope recipient
    quarantined_at REAL NOT NULL,
    event_id       TEXT NOT NULL,
    PRIMARY KEY (rcpt, quarantined_at, event_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS quarantine_recipient_event ON quarantine_recipient (event_id);
CREATE TABLE IF NOT EXISTS quarantine_digest (
    rcpt     TEXT NOT NULL,
    period   TEXT NOT NULL,         -- e.g. 2026-05-01 for a daily digest
    since    REAL NOT NULL,         -- it lists what was quarantined in [since, until)
    until    REAL NOT NULL,
    planned_at REAL NOT NULL,
    sent_at  REAL,                  -- NULL: planned, not known to be acknowledged (sent again, the same)
    PRIMARY KEY (rcpt, period)
) WITHOUT ROWID;
"""
SUMMARY = ("event_id, accepted_at, quarantined_at, mail_from, rcpt_to, client_address, score, model_version, "
           "subject, size, released_at, released_by, claimed_at, claimed_by")
# The version 1 table's columns (the claim columns came later and may be missing).
V1_COLUMNS = ("event_id", "accepted_at", "quarantined_at", "mail_from", "rcpt_to", "client_address", "score",
              "model_version", "subject", "size", "released_at", "released_by", "claim", "claimed_at", "claimed_by")


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

    def releasing(self, lease_s: float, now: float | None = None) -> bool:
        """Whether a release holds this message's claim now (it has not run out)."""
        now = time.time() if now is None else now
        return self.released_at is None and self.claimed_at is not None and now - self.claimed_at < lease_s


@dataclass(frozen=True)
class Search:
    """What a list shows: every field empty or None means "any". Text fields match a substring,
    case-insensitively (ASCII); ``recipients`` are whole addresses (the user view's own)."""

    recipient: str = ""
    sender: str = ""
    subject: str = ""
    score_min: float | None = None
    score_max: float | None = None
    model_version: str = ""
    since: float | None = None  # quarantined at or after
    until: float | None = None  # quarantined before
    state: str = "held"  # held | released | all
    recipients: tuple[str, ...] = ()


Cursor = tuple[float, str]  # (quarantined_at, event_id) of the last row of the previous page


@dataclass(frozen=True)
class Page:
    entries: list[Entry]
    next: Cursor | None  # where the next (older) page starts after; None: this is the last
    prev: Cursor | None = None  # where the previous (newer) page ends before; None: this is the first
    total: int | None = None  # matches of the whole search, up to COUNT_MAX + 1 (when counted)


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


def header_block(raw: bytes, limit: int = HEADER_SHOW_MAX) -> bytes:
    """The message's header block (up to the first empty line), at most ``limit`` bytes of it:
    what ``floodgate quarantine show`` and the web worker show as text."""
    head = raw[:limit]
    for sep in (b"\r\n\r\n", b"\n\n"):
        if sep in head:
            return head.split(sep, 1)[0]
    return head


def recipient_key(address: str) -> str:
    """An envelope recipient as the recipient index keeps it (and the user view asks for it)."""
    return address.strip().lower()


def _like(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, its own % and _ taken literally."""
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Quarantine:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection per worker, used by one thread at a time (the worker loop's thread).
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                  timeout=BUSY_TIMEOUT_MS / 1000)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        if self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            self._upgrade()

    def _upgrade(self) -> None:
        """Create the schema, converting a version 1 file (once, whoever opens it first)."""
        self.db.execute("BEGIN IMMEDIATE")  # another process may be doing it right now
        try:
            if self.db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                old = {row["name"] for row in self.db.execute("PRAGMA table_info(quarantine)")}
                if "raw" in old:
                    self.db.execute("ALTER TABLE quarantine RENAME TO quarantine_v1")
                    self.db.execute("DROP INDEX IF EXISTS quarantine_by_time")
                for statement in SCHEMA.split(";\n"):  # not executescript: it would commit first
                    if statement.strip():
                        self.db.execute(statement)
                if "raw" in old:
                    self._copy_v1(old)
                self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _copy_v1(self, old: set[str]) -> None:
        columns = ", ".join(c for c in V1_COLUMNS if c in old)
        self.db.execute(f"INSERT INTO quarantine ({columns}) SELECT {columns} FROM quarantine_v1")
        self.db.execute("INSERT INTO quarantine_message (event_id, meta, raw)"
                        " SELECT event_id, meta, raw FROM quarantine_v1")
        rows = self.db.execute("SELECT event_id, quarantined_at, rcpt_to FROM quarantine_v1")
        self.db.executemany("INSERT OR IGNORE INTO quarantine_recipient (rcpt, quarantined_at, event_id)"
                            " VALUES (?, ?, ?)", ((recipient_key(r), at, event_id) for event_id, at, rcpts in rows
                                                  for r in orjson.loads(rcpts)))
        self.db.execute("DROP TABLE quarantine_v1")

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
                    " client_address, score, model_version, subject, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (e.id, e.accepted_at, now, e.envelope.mail_from, orjson.dumps(list(e.envelope.rcpt_to)).decode(),
                     e.envelope.client_address, e.score, e.model_version, subject_of(e.raw), len(e.raw)))
                if cur.rowcount != 1:
                    continue
                added.add(e.id)
                self.db.execute("INSERT INTO quarantine_message (event_id, meta, raw) VALUES (?, ?, ?)",
                                (e.id, meta, e.raw))
                self.db.executemany(
                    "INSERT OR IGNORE INTO quarantine_recipient (rcpt, quarantined_at, event_id) VALUES (?, ?, ?)",
                    [(recipient_key(r), now, e.id) for r in e.envelope.rcpt_to])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return added

    def entries(self, limit: int = 50, include_released: bool = True) -> list[Entry]:
        return self.search(Search(state="all" if include_released else "held"), limit).entries

    def search(self, query: Search, limit: int = 50, after: Cursor | None = None,
               before: Cursor | None = None, count: bool = False) -> Page:
        """A page of matching entries, newest first: the first, the one after ``after`` (older),
        or the one before ``before`` (newer); see the module docstring. ``count``: also count the
        matches up to COUNT_MAX (``Page.total``) in the same pass, on a first page."""
        limit = max(1, min(limit, PAGE_MAX))
        where, args, source = self._where(query)
        backwards = after is None and before is not None
        if after is not None:
            where.append("(q.quarantined_at, q.event_id) < (?, ?)")
            args.extend(after)
        elif before is not None:
            where.append("(q.quarantined_at, q.event_id) > (?, ?)")
            args.extend(before)
        counting = count and after is None and before is None
        order = "ASC" if backwards else "DESC"
        # Keys first (from an index alone, in order), the rows shown after: one pass both finds the
        # page and counts the matches, and only the page's rows are read from the table.
        keys = self.db.execute(f"SELECT q.quarantined_at, q.event_id FROM {source}"
                               f" {'WHERE ' + ' AND '.join(where) if where else ''}"
                               f" ORDER BY q.quarantined_at {order}, q.event_id {order} LIMIT ?",
                               (*args, COUNT_MAX + 1 if counting else limit + 1)).fetchall()
        more = len(keys) > limit
        shown = [k[1] for k in keys[:limit]]
        rows = {r["event_id"]: r for r in self.db.execute(
            f"SELECT {SUMMARY} FROM quarantine WHERE event_id IN ({', '.join('?' * len(shown))})", shown)}
        entries = [Entry.from_row(rows[i]) for i in shown if i in rows]
        total = len(keys) if counting else None
        if backwards:
            entries.reverse()
        if not entries:
            return Page([], None, None, total)
        first = (entries[0].quarantined_at, entries[0].event_id)
        last = (entries[-1].quarantined_at, entries[-1].event_id)
        if backwards:
            return Page(entries, last, first if more else None, total)
        return Page(entries, last if more else None, first if after is not None else None, total)

    def count(self, query: Search | None = None, cap: int = COUNT_MAX) -> int:
        """How many entries match (every one with no query), counted up to ``cap`` (then ``cap + 1``)."""
        if query is None:
            return self.db.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        where, args, source = self._where(query)
        sql = (f"SELECT count(*) FROM (SELECT 1 FROM {source}"
               f" {'WHERE ' + ' AND '.join(where) if where else ''} LIMIT ?)")
        return self.db.execute(sql, (*args, cap + 1)).fetchone()[0]

    def _where(self, query: Search) -> tuple[list[str], list[object], str]:
        """The WHERE terms, their arguments and the FROM clause of a search."""
        if query.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, not {query.state!r}")
        where: list[str] = []
        args: list[object] = []
        source = "quarantine AS q"
        if query.recipients:
            keys = sorted({recipient_key(r) for r in query.recipients})
            # Each recipient's rows come from its index; DISTINCT: a message to two of them once.
            source = ("(SELECT DISTINCT event_id FROM quarantine_recipient WHERE rcpt IN "
                      f"({', '.join('?' * len(keys))})) AS mine JOIN quarantine AS q ON q.event_id = mine.event_id")
            args.extend(keys)
        if query.state == "held":
            where.append("q.released_at IS NULL")
        elif query.state == "released":
            where.append("q.released_at IS NOT NULL")
        if query.recipient.strip():  # the recipient index's small rows, not each row's JSON list
            where.append("q.event_id IN (SELECT event_id FROM quarantine_recipient WHERE rcpt LIKE ? ESCAPE '\\')")
            args.append(_like(recipient_key(query.recipient)))
        for column, text in (("q.mail_from", query.sender), ("q.subject", query.subject)):
            if text.strip():
                where.append(f"{column} LIKE ? ESCAPE '\\'")
                args.append(_like(text.strip()))
        if query.model_version.strip():
            # Unary + keeps SQLite off the model index here: without statistics it took it and then
            # sorted a third of the table by time (155 ms a page in make bench-web, 12 ms this way).
            where.append("+q.model_version = ?")
            args.append(query.model_version.strip())
        for term, value in (("q.score >= ?", query.score_min), ("q.score <= ?", query.score_max),
                            ("q.quarantined_at >= ?", query.since), ("q.quarantined_at < ?", query.until)):
            if value is not None:
                where.append(term)
                args.append(value)
        return where, args, source

    def model_versions(self) -> list[str]:
        """The model versions that quarantined something (for a search form's choices)."""
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT model_version FROM quarantine WHERE model_version IS NOT NULL ORDER BY 1 DESC LIMIT 50")]

    def entry(self, event_id: str) -> Entry | None:
        row = self.db.execute(f"SELECT {SUMMARY} FROM quarantine WHERE event_id = ?", (event_id,)).fetchone()
        return Entry.from_row(row) if row else None

    def event(self, event_id: str) -> MailEvent | None:
        """The quarantined event exactly as it arrived from the spam topic."""
        row = self.db.execute("SELECT meta, raw FROM quarantine_message WHERE event_id = ?", (event_id,)).fetchone()
        return events.decode(bytes(row["meta"]) + b"\n" + bytes(row["raw"])) if row else None

    def raw(self, event_id: str) -> bytes | None:
        """The quarantined message's bytes."""
        row = self.db.execute("SELECT raw FROM quarantine_message WHERE event_id = ?", (event_id,)).fetchone()
        return bytes(row["raw"]) if row else None

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

    def delete(self, event_id: str, claim: str) -> bool:
        """Delete a message whose claim this is (taken with :meth:`claim`, so no release holds it)."""
        return self._delete("q.event_id = ? AND q.claim = ?", (event_id, claim)) == 1

    def purge(self, older_than_days: float, now: float | None = None) -> int:
        """Delete what was quarantined more than ``older_than_days`` ago; how many rows went."""
        cutoff = (time.time() if now is None else now) - older_than_days * DAY_S
        return self._delete("q.quarantined_at < ?", (cutoff,))

    def _delete(self, where: str, args: Sequence[object]) -> int:
        """Delete the matching rows from every table in one transaction; how many went."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ids = f"SELECT q.event_id FROM quarantine AS q WHERE {where}"
            self.db.execute(f"DELETE FROM quarantine_recipient WHERE event_id IN ({ids})", args)
            self.db.execute(f"DELETE FROM quarantine_message WHERE event_id IN ({ids})", args)
            gone = self.db.execute(f"DELETE FROM quarantine WHERE event_id IN ({ids})", args).rowcount
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return gone

    # -- digests -------------------------------------------------------------------------------
    def digest_recipients(self, since: float, until: float) -> list[str]:
        """Recipients (as the index keeps them) with messages held that were quarantined in [since, until)."""
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT r.rcpt FROM quarantine_recipient AS r JOIN quarantine AS q ON q.event_id = r.event_id"
            " WHERE r.quarantined_at >= ? AND r.quarantined_at < ? AND q.released_at IS NULL ORDER BY 1",
            (since, until))]

    def plan_digest(self, rcpt: str, period: str, since: float, until: float,
                    now: float | None = None) -> tuple[float, float, bool]:
        """The window [since, until) of ``rcpt``'s digest of ``period`` and whether it was sent:
        planned now with the given window, or as an earlier run planned it (a run that died
        before the broker acknowledged sends the very same digest again)."""
        self.db.execute("INSERT OR IGNORE INTO quarantine_digest (rcpt, period, since, until, planned_at)"
                        " VALUES (?, ?, ?, ?, ?)", (recipient_key(rcpt), period, since, until,
                                                    time.time() if now is None else now))
        row = self.db.execute("SELECT since, until, sent_at FROM quarantine_digest WHERE rcpt = ? AND period = ?",
                              (recipient_key(rcpt), period)).fetchone()
        return row["since"], row["until"], row["sent_at"] is not None

    def mark_digest_sent(self, rcpt: str, period: str, now: float | None = None) -> None:
        self.db.execute("UPDATE quarantine_digest SET sent_at = ? WHERE rcpt = ? AND period = ? AND sent_at IS NULL",
                        (time.time() if now is None else now, recipient_key(rcpt), period))

    def last_digest_until(self, rcpt: str, before_period: str) -> float | None:
        """Where ``rcpt``'s digest before ``before_period`` ended (the next one starts there)."""
        row = self.db.execute("SELECT max(until) FROM quarantine_digest WHERE rcpt = ? AND period < ?",
                              (recipient_key(rcpt), before_period)).fetchone()
        return row[0]

    def held_for(self, rcpt: str, since: float, until: float, limit: int) -> list[Entry]:
        """Messages still held for ``rcpt`` that were quarantined in [since, until), newest first."""
        return self.search(Search(recipients=(rcpt,), since=since, until=until), limit).entries
