"""The capture store: one writer thread, grouped commits, a durable barrier
before the 250; SQLite (WAL, the embedded default) or PostgreSQL.

The event loop never touches the database. It hands writes to `Store` methods
that only append to a queue; a writer thread drains the queue, runs everything
pending in one transaction and commits it (SQLite synchronous=FULL, a
PostgreSQL commit: on disk either way). Under load many sessions' writes
share one commit. A caller that must not answer before its data is durable
(the 250 after the final dot) awaits the future `durable(mid)` returns: it
resolves after the commit that carried the message, and carries every
earlier write too (the queue is FIFO).

Readers (CLI, tests, API) open their own connections; WAL (or PostgreSQL)
lets them read while the writer writes. What differs between the two
databases is in dialect.py; this file is the one writer and reader.

IDs (sessions, messages, attempts, zones) are handed out without asking the
database on the event loop. A single writer (the default for an SQLite
file) counts in memory from the store's highest id, and a lock file keeps a
second writer off the store. A shared store (`shared=True`; always for
PostgreSQL) has several writers, processes or hosts: each reserves small
blocks of ids from the database ahead of need (a counters table in SQLite,
sequences in PostgreSQL), refilled by its writer thread before they run
out, so ids stay unique and roughly in time order."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import os
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from harness.errors import StoreError
from harness.records import AttemptRecord, MessageDraft, NotStored, Outcome, TranscriptLine
from harness.store import Location, is_postgres
from harness.store import retention as rt
from harness.store.dialect import ID_TABLES, Db, Dialect, Owner, dialect

DEFAULT_PATH = Path(".harness") / "harness.db"

#: the tables, for SQLite and PostgreSQL both: dialect.py fills in the
#: column types the two spell differently ({pk}: an id the writer gives,
#: {serial}: one the database gives)
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id {pk},
    started_at {real} NOT NULL,
    ended_at {real},
    listener TEXT NOT NULL,
    peer_ip TEXT NOT NULL,
    peer_port INTEGER NOT NULL,
    scenario TEXT NOT NULL,
    helo TEXT,
    tls_version TEXT,
    tls_cipher TEXT,
    auth_user TEXT,
    extensions TEXT,          -- JSON: what the server advertised / the client used
    end_reason TEXT,
    mail_from TEXT,           -- JSON list: each MAIL FROM address the client gave
    rcpt_tos TEXT             -- JSON list: each RCPT TO address the client gave
);
CREATE TABLE IF NOT EXISTS events (   -- transcripts of stores before `lines` (read only)
    id {serial},
    session_id {bigint} NOT NULL REFERENCES sessions(id),
    t {real} NOT NULL,
    direction TEXT NOT NULL,  -- 'C' client, 'S' server, 'I' info (faults, delays)
    phase TEXT,
    text TEXT NOT NULL,
    rule TEXT
);
CREATE INDEX IF NOT EXISTS events_session ON events(session_id, id);
CREATE TABLE IF NOT EXISTS lines (    -- the transcripts: a row per session per commit
    id {serial},
    session_id {bigint} NOT NULL REFERENCES sessions(id),
    n INTEGER NOT NULL,           -- transcript lines in the row
    packed TEXT NOT NULL          -- JSON: [[t, direction, phase, text, rule], ...]
);
CREATE INDEX IF NOT EXISTS lines_session ON lines(session_id, id);
CREATE TABLE IF NOT EXISTS messages (
    id {pk},
    session_id {bigint} NOT NULL REFERENCES sessions(id),
    received_at {real} NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,   -- JSON list
    mail_options TEXT NOT NULL,
    rcpt_options TEXT NOT NULL,   -- JSON list: each accepted RCPT's parameters as sent
    dsn TEXT,                     -- JSON: RET, ENVID, NOTIFY, ORCPT decoded (RFC 3461)
    size {bigint} NOT NULL,
    subject TEXT,
    message_id TEXT,
    is_ndr INTEGER,               -- stores before `analyses`: as there
    analysis TEXT,                -- (written in a row of its own: an UPDATE here
                                  -- wrote the whole row again, its bytes included)
    raw {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_session ON messages(session_id);
CREATE TABLE IF NOT EXISTS attempts (
    id {pk},
    session_id {bigint} NOT NULL REFERENCES sessions(id),
    t {real} NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    phase TEXT NOT NULL,      -- where the verdict was reached
    code INTEGER,             -- NULL when the verdict was a fault
    enhanced TEXT,
    reply TEXT,
    outcome TEXT NOT NULL,    -- accepted | deferred | rejected | dropped | reset | hang | lost
    rule TEXT,
    message_id {bigint}
);
CREATE INDEX IF NOT EXISTS attempts_rcpt ON attempts(rcpt, t);
CREATE TABLE IF NOT EXISTS relays (
    id {serial},
    message_id {bigint} NOT NULL REFERENCES messages(id),
    session_id {bigint} NOT NULL REFERENCES sessions(id),
    t {real} NOT NULL,
    handler TEXT NOT NULL,    -- "forward to HOST:PORT", or a handler's class name
    ok INTEGER NOT NULL,
    status TEXT NOT NULL      -- the next hop's reply, or what went wrong
);
CREATE INDEX IF NOT EXISTS relays_message ON relays(message_id);
CREATE TABLE IF NOT EXISTS analysis_queue (  -- messages stored, not analysed yet
    message_id {bigint} PRIMARY KEY,
    client_ip TEXT NOT NULL,
    helo TEXT,
    hostname TEXT NOT NULL,       -- the receiving server's name (Authentication-Results)
    zone_id {bigint}              -- zones.id: the scenario's DNS; NULL: the system's
);
CREATE TABLE IF NOT EXISTS analyses (  -- a message's analysis, once done
    message_id {bigint} PRIMARY KEY,
    is_ndr INTEGER NOT NULL,      -- 1 for a bounce/delay notice
    analysis TEXT NOT NULL        -- JSON: the parsed NDR, SPF/DKIM/DMARC results
);
CREATE TABLE IF NOT EXISTS message_parts (  -- the bytes of a message over CHUNK, in order
    id {serial},
    message_id {bigint} NOT NULL REFERENCES messages(id),
    seq INTEGER NOT NULL,
    data {blob} NOT NULL
);
CREATE INDEX IF NOT EXISTS message_parts_message ON message_parts(message_id, seq);
CREATE TABLE IF NOT EXISTS zones (   -- the scenario dns: zones analyses look things up in
    id {pk},
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS health (  -- one row the writer rewrites to see whether it can write
    id INTEGER PRIMARY KEY CHECK (id = 1),
    t {real} NOT NULL
);
"""

#: Columns added since the first release: (table, column, type), added to an
#: older store when it is opened for writing.
MIGRATIONS = (("sessions", "mail_from", "TEXT"), ("sessions", "rcpt_tos", "TEXT"),
              # a large message being written: its writer's owner token (1: a
              # single writer's); NULL once whole
              ("messages", "partial", "INTEGER"),
              # the analysis worker (owner token) that took the job
              ("analysis_queue", "claimed_by", "INTEGER"))
#: the tables' version, written on a PostgreSQL store (a writer finding it
#: there touches no table's definition): one more with each change above
SCHEMA_VERSION = 2
#: after the migrations: a large message left half written is found at once
INDEXES = ("CREATE INDEX IF NOT EXISTS messages_partial ON messages(partial)"
           " WHERE partial IS NOT NULL",)

#: messages over this many bytes are written in pieces of this size
CHUNK = 1 << 20
#: the writer takes queued pieces into one commit up to about this much
BATCH_BYTES = 2 << 20
#: the checkpointer copies the WAL into the database after about this much
CHECKPOINT_BYTES = 16 << 20
#: the partial mark of a single writer's large messages (a shared store's
#: writers mark theirs with their owner token)
SINGLE_WRITER = 1
_PART = "INSERT INTO message_parts (message_id, seq, data) VALUES (?, ?, ?)"
_PIECES = object()  # in the queue: large messages' pieces wait in their lane


@dataclass
class _ToLane:
    """Pieces for the large messages' lane, sent through the queue so that
    they reach the writer after what was queued before them (the message's
    session row: PostgreSQL checks the foreign key)."""

    items: list[Any]
_UNMARK = "UPDATE messages SET partial = NULL WHERE id = ?"  # a large message is whole
_PRUNE = object()  # in the queue: retention has another step to take
_REFILL = object()  # in the queue: a shared store's ids are running low
_PROBE = "INSERT INTO health (id, t) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET t = excluded.t"
_INSERT_PARTIAL = (
    "INSERT INTO messages (id, session_id, received_at, mail_from, rcpt_tos, mail_options,"
    " rcpt_options, dsn, size, subject, message_id, raw, partial)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_QUEUE_JOB = ("INSERT INTO analysis_queue (message_id, client_ip, helo, hostname, zone_id)"
              " VALUES (?, ?, ?, ?, ?) ON CONFLICT (message_id) DO UPDATE SET"
              " client_ip = excluded.client_ip, helo = excluded.helo,"
              " hostname = excluded.hostname, zone_id = excluded.zone_id, claimed_by = NULL")
_DROP_PARTIAL_PARTS = ("DELETE FROM message_parts WHERE message_id IN"
                       " (SELECT id FROM messages WHERE partial = ?)")
_DROP_PARTIAL = "DELETE FROM messages WHERE partial = ?"
_INSERT_MESSAGE = (
    "INSERT INTO messages (id, session_id, received_at, mail_from, rcpt_tos, mail_options,"
    " rcpt_options, dsn, size, subject, message_id, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
    " ?, ?)")
#: a message's analysis is done: retention may take it now
_DEQUEUE = "DELETE FROM analysis_queue WHERE message_id = ?"
_ANALYSED = ("INSERT INTO analyses (message_id, is_ndr, analysis) VALUES (?, ?, ?)"
             " ON CONFLICT (message_id) DO NOTHING")  # analysed twice: the first stays
_INSERT_LINES = "INSERT INTO lines (session_id, n, packed) VALUES (?, ?, ?)"
#: the writes that store a message (its row, its parts, its analysis job):
#: what a full disk refuses is dropped, its client told 452
_MESSAGE_WRITES = frozenset({_INSERT_MESSAGE, _INSERT_PARTIAL, _PART, _UNMARK, _QUEUE_JOB})
#: writes after which retention may find something to delete
_PRUNE_AFTER = _MESSAGE_WRITES | {_DEQUEUE}

_Op = tuple[str, Sequence[Any]] | tuple[str, Iterable[Sequence[Any]], bool]


@dataclass
class Attempt:
    id: int
    session_id: int
    t: float
    mail_from: str
    rcpt: str
    phase: str
    code: int | None
    enhanced: str | None
    reply: str | None
    outcome: Outcome
    rule: str | None
    message_id: int | None
    interval: float | None = None  # seconds since the previous attempt of the pair


@dataclass
class Relay:
    """A stored message passed on by a handler (a forward), and how it went."""

    message_id: int
    session_id: int
    t: float
    handler: str
    ok: bool
    status: str


@dataclass
class MessageRecord:
    id: int
    session_id: int
    received_at: float
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: list[str]
    size: int
    dsn: dict[str, Any]
    subject: str | None
    message_id: str | None
    is_ndr: bool | None = None
    analysis: dict[str, Any] | None = None
    raw: bytes | None = None

    def as_dict(self, raw: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "raw"}
        if raw and self.raw is not None:
            d["raw"] = self.raw.decode("utf-8", errors="surrogateescape")
        return d


@dataclass
class SessionRecord:
    id: int
    started_at: float
    ended_at: float | None
    listener: str
    peer_ip: str
    peer_port: int
    scenario: str
    helo: str | None
    tls_version: str | None
    tls_cipher: str | None
    auth_user: str | None
    extensions: dict[str, Any]
    end_reason: str | None
    mail_from: list[str] = field(default_factory=list)
    rcpt_tos: list[str] = field(default_factory=list)
    events: list[TranscriptLine] = field(default_factory=list)
    message_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["events"] = [e.as_dict() for e in self.events]
        return d


@dataclass(frozen=True, slots=True)
class _PruneAll:
    vacuum: bool
    done: threading.Event
    result: list[int]


@dataclass(frozen=True, slots=True)
class _Barrier:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    mid: int | None = None  # waits for this message (durable), not for the commit


class StoreFull(StoreError, NotStored):
    """The store cannot write: its disk is full, its file or server
    read-only, gone or out of reach. Messages are answered 452 4.3.1 until
    it can again."""


#: records (sessions, transcripts, attempts) kept in memory while the disk is
#: full, written once it is not; past this many, the oldest are given up
HOLD_MAX = 200_000
#: seconds between retention's looks when its last look found nothing due
PRUNE_EVERY = 0.5
#: records nobody waits for reach the writer at most this much later...
HAND_OVER_AFTER = 0.05
#: ...or once this many writes are gathered
HAND_OVER_MAX = 4096
#: seconds between attempts to connect again to a store that went away
RECONNECT_EVERY = 1.0


#: a string JSON writes as it is between quotes: printable ASCII, no quote or backslash
_PLAIN = re.compile(r'[ !#-\[\]-~]*')


def _json_strings(items: Sequence[str]) -> str:
    """A JSON list of strings; the plain ones (nearly all addresses and
    parameters) without json.dumps, which costs more per call than the rest
    of writing a message row."""
    if all(_PLAIN.fullmatch(x) for x in items):
        return '["' + '", "'.join(items) + '"]' if items else "[]"
    return json.dumps(list(items))


def _piece_bytes(item: Any) -> int:
    return len(item[1][2]) if isinstance(item, tuple) and item[0] == _PART else 0


def _flat(batch: list[Any]) -> Iterator[Any]:
    """Queue items, with the lists a loop hands over (a turn's writes)
    opened, and the transcript lines it gathered per session packed."""
    for item in batch:
        if isinstance(item, list):
            for x in item:
                if type(x) is tuple and type(x[1]) is dict:  # {session: lines}
                    x = (x[0], [_pack(sid, ls) for sid, ls in x[1].items()], True)
                yield x
        else:
            yield item


def _resolve(futures: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for fut, err in futures:
        if fut.done():
            continue
        if err is None:
            fut.set_result(None)
        elif isinstance(err, StoreFull):
            fut.set_exception(StoreFull(str(err)))
        else:
            fut.set_exception(StoreError(f"store write failed: {err}"))


class _Counter:
    """Ids of one table counted in memory: the store's only writer."""

    def __init__(self, first: int) -> None:
        self.next = first

    def take(self) -> int:
        n = self.next
        self.next += 1
        return n


class _Reserve:
    """Ids of one table reserved in the database ahead of need (a shared
    store): `take()` never waits for the database while the writer thread
    keeps the reserve topped up. The block asked for doubles (up to MAX)
    when the reserve ran low before the last refill came: under load a
    refill is rare, and at rest ids stay close to time order."""

    MIN, MAX = 16, 1024
    #: seconds take() waits, once the reserve is empty, for the writer
    STARVED_WAIT = 1.0

    def __init__(self, table: str, wake: Callable[[], None], emergency: Callable[[], int]
                 ) -> None:
        self.table = table
        self.block = self.MIN
        self.wanted = False
        self.starved = 0  # takes that found the reserve empty
        self._ids: collections.deque[int] = collections.deque()
        self._filled = threading.Condition()
        self._wake = wake
        self._emergency = emergency

    def take(self) -> int:
        try:
            n = self._ids.popleft()
        except IndexError:
            n = self._starved()
        if not self.wanted and len(self._ids) <= self.block // 2:
            self.wanted = True
            self._wake()
        return n

    def _starved(self) -> int:
        # A burst faster than the refills, or a store that cannot be
        # reached: wait a moment for the writer, then take an id no other
        # writer can have (negative, from this writer's owner token)
        # rather than hold the event loop any longer.
        self.starved += 1
        deadline = time.monotonic() + self.STARVED_WAIT
        with self._filled:
            while True:
                try:
                    return self._ids.popleft()
                except IndexError:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._emergency()
                self.wanted = True
                self._wake()
                self._filled.wait(left)

    def want(self) -> int:
        """How many to reserve now (the writer's thread)."""
        if len(self._ids) < self.block // 4 and self.block < self.MAX:
            self.block *= 2
        return self.block

    def fill(self, ids: Sequence[int]) -> None:
        with self._filled:
            self._ids.extend(ids)
            self.wanted = False
            self._filled.notify_all()


class Store:
    """Capture store. `open()` for the writer side (serve), `Reader` to query.

    `location`: an SQLite file's path, or a postgresql:// URL. `shared`:
    other writers (processes, hosts) write to the same store at the same
    time; always so for PostgreSQL."""

    def __init__(self, location: Location = DEFAULT_PATH, *,
                 retention: rt.Retention | None = None, shared: bool = False) -> None:
        self.dialect: Dialect = dialect(location)
        self.location: Location = location if is_postgres(location) else Path(location)
        #: the SQLite file (None for PostgreSQL)
        self.path: Path | None = None if self.dialect.postgres else Path(location)
        self.display = self.dialect.display
        self.shared = shared or self.dialect.postgres
        self.retention = retention or rt.Retention()
        #: told (from the writer's thread) when the store stops or starts
        #: again being able to write: a line for a console
        self.on_health: Callable[[str], None] | None = None
        #: records held while the disk is full, and messages refused then
        self._held: list[Any] = []
        self._failed: dict[int, StoreFull] = {}
        self.refused = 0  # messages not stored (452) since the store was opened
        self.given_up = 0  # records dropped when more than HOLD_MAX were held
        self.pruned = 0  # messages retention deleted
        self.reconnects = 0  # connections to the store made again after it went away
        self._pruning = rt.Pruning()
        self._vacuumer: threading.Thread | None = None
        self._vacuum_due = threading.Event()
        self._prune_due = bool(self.retention)
        self._prune_at = 0.0  # not before (monotonic): a step finding nothing waits a while
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: the event loop writes come from (attach), and what it gathered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._pending: list[Any] = []
        self._lines: dict[int, list[TranscriptLine]] = {}  # transcripts, per session
        self._handing_over: Literal["soon", "later"] | None = None
        self._hand_over_timer: asyncio.TimerHandle | None = None
        #: large messages' writes, taken a few megabytes per commit
        self._pieces: collections.deque[Any] = collections.deque()
        self._in_pieces: set[int] = set()  # large messages not all written yet
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_due = threading.Event()
        self._closing = False
        self._written = 0  # bytes committed since the last checkpoint was asked for
        self._lockfile: int | None = None
        self._db: Db | None = None  # the writer's connection (None: lost, not made again)
        self._lost: BaseException | None = None  # why it was lost
        self._connect_at = 0.0  # not before (monotonic): the next attempt to connect
        self._committing = False  # COMMIT sent: a connection lost now leaves it unknown
        #: this writer's owner token (a shared store), and the lock that
        #: tells the others it is alive
        self.owner: Owner | None = None
        self._partial = SINGLE_WRITER
        self._ids: dict[str, _Counter | _Reserve] = {}
        self._emergency = 0
        self._zones: dict[str, int] = {}
        self.commits = 0  # how many transactions the writer committed
        self.error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------

    def open(self) -> Store:
        """Create or open the database, take the writer lock (a single
        writer) or an owner token (a shared store), start the writer."""
        self._lock()
        try:
            db = self.dialect.connect("writer")
        except BaseException:
            self._unlock()
            raise
        try:
            for attempt in range(3):  # another host's writer in the way: again
                try:
                    self._prepare(db)
                    break
                except Exception as e:
                    if attempt == 2 or not self.dialect.transient(e):
                        raise
                    db.rollback()
        except BaseException as e:
            db.close()
            self._unlock()
            if isinstance(e, StoreError) or not isinstance(e, Exception):
                raise
            raise StoreError(f"cannot open store {self.display}: {e}") from e
        self._db = db
        self._thread = threading.Thread(target=self._writer, name="harness-store", daemon=True)
        self._thread.start()
        if self.retention:
            self._queue.put(_PRUNE)  # what is due already goes first
        if not self.dialect.postgres:
            self._checkpointer = threading.Thread(target=self._checkpoints,
                                                  name="harness-checkpoint", daemon=True)
            self._checkpointer.start()
        return self

    def _lock(self) -> None:
        """SQLite: a single writer locks the store's lock file for itself;
        shared writers lock it together (each keeps the single one out)."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create store {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StoreError(
                f"store {self.path} is in use by another harness serve (use --store PATH)"
                if not self.shared else
                f"store {self.path} is in use by a harness serve that does not share it"
            ) from e
        self._lockfile = fd

    def _unlock(self) -> None:
        if self.owner is not None:
            self.dialect.release_owner(self.owner)
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None

    def _prepare(self, db: Db) -> None:
        """The schema (made or brought up to date), this writer's owner
        token, what a crash left (half-written large messages, unqueued
        analyses), and the ids."""
        d = self.dialect
        if not d.postgres:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            # checkpoints are the checkpointer thread's: copying the WAL into
            # the database at a commit held that commit (and every 250
            # waiting behind it) for as long as the copy took
            db.execute("PRAGMA wal_autocheckpoint = 0")
            # the WAL file is cut back to this when it starts over (it grows
            # to about 16 * CHECKPOINT_BYTES under sustained load; an idle
            # store need not keep that)
            db.execute(f"PRAGMA journal_size_limit = {4 * CHECKPOINT_BYTES}")
        # PostgreSQL: only when the tables are not there yet, or are of an
        # older version (CREATE INDEX IF NOT EXISTS and CREATE OR REPLACE
        # TRIGGER lock tables that other hosts' writers are writing)
        with d.schema_lock(db):
            if not d.schema_ready(db, SCHEMA_VERSION):
                d.apply_schema(db, d.schema())
                for table, column, kind in MIGRATIONS:
                    if column not in d.columns(db, table):
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                for statement in INDEXES:
                    db.execute(statement)
                d.mark_schema(db, SCHEMA_VERSION)
        if self.shared:
            self.owner = d.take_owner(db)
            self._partial = self.owner.token
        db.begin()
        try:
            # A large message whose writing a crash cut short was never
            # acknowledged: it goes (its client will send it again). A
            # shared store's others may be writing theirs: only the marks
            # of writers no longer alive go.
            marks = [r[0] for r in db.execute(
                "SELECT DISTINCT partial FROM messages WHERE partial IS NOT NULL")]
            if self.shared and marks:
                marks = sorted(set(marks) - d.live_owners(db, marks))
            for mark in marks:
                db.execute(_DROP_PARTIAL_PARTS, (mark,))
                db.execute(_DROP_PARTIAL, (mark,))
            # Messages stored before the analysis queue existed (or whose
            # job a store of an older version lost) are queued now.
            db.execute(
                "INSERT INTO analysis_queue (message_id, client_ip, helo, hostname, zone_id)"
                " SELECT m.id, s.peer_ip, s.helo, 'mx.harness.test', NULL FROM messages m"
                " JOIN sessions s ON s.id = m.session_id WHERE m.analysis IS NULL"
                " AND NOT EXISTS (SELECT 1 FROM analysis_queue q WHERE q.message_id = m.id)"
                " AND NOT EXISTS (SELECT 1 FROM analyses a WHERE a.message_id = m.id)"
                " ON CONFLICT DO NOTHING")
            for zid, text in db.execute("SELECT id, json FROM zones"):
                self._zones[text] = zid
            tops = {}
            if not self.shared:
                for table in ID_TABLES:
                    tops[table] = db.one(f"SELECT COALESCE(MAX(id), 0) FROM {table}")
            db.commit()
        except BaseException:
            db.rollback()
            raise
        if not self.shared:
            self._ids = {t: _Counter(top + 1) for t, top in tops.items()}
            return
        reserves = {t: _Reserve(t, self._wake_refill, self._emergency_id) for t in ID_TABLES}
        got = d.reserve(db, {t: r.block for t, r in reserves.items()})
        for table, ids in got.items():
            reserves[table].fill(ids)
        self._ids = dict(reserves)

    def _wake_refill(self) -> None:
        self._queue.put(_REFILL)

    def _emergency_id(self) -> int:
        """An id when the reserve ran dry and the store gave no more (it
        cannot be reached): negative, unique by this writer's token."""
        assert self.owner is not None
        self._emergency += 1
        return -((self.owner.token << 32) + self._emergency)

    def _checkpoints(self) -> None:
        """Copies the WAL into the database (PASSIVE: beside the writer's
        commits, never holding them) each time it has grown by
        CHECKPOINT_BYTES; at the end, all of it, and the WAL emptied."""
        assert self.path is not None
        conn = self.dialect.connect("writer").raw
        wal = Path(f"{self.path}-wal")
        try:
            while not self._closing:
                self._checkpoint_due.wait()
                self._checkpoint_due.clear()
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    if wal.exists() and wal.stat().st_size > 16 * CHECKPOINT_BYTES:
                        # readers let it fall behind: once caught up, rewind
                        conn.execute("PRAGMA wal_checkpoint(RESTART)")
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()

    def close(self) -> None:
        """Commit what is queued and stop the writer."""
        if (self._pending or self._lines) and (
                self._loop is None or not self._loop.is_running()
                or threading.get_ident() == self._loop_thread):
            self._hand_over()  # gathered on the loop: theirs too
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._closing = True
        if self._checkpointer is not None:
            self._checkpoint_due.set()
            self._checkpointer.join()
            self._checkpointer = None
        if self._vacuumer is not None:
            self._vacuum_due.set()
            self._vacuumer.join()
            self._vacuumer = None
        self._unlock()

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread -----------------------------------------------

    def _writer(self) -> None:
        # with a time limit to keep, the writer wakes now and then to prune
        wait = 60.0 if self.retention.keep_days is not None else None
        while True:
            # Everything queued goes into one commit, with up to BATCH_BYTES
            # of large messages' pieces (a lane of their own: other
            # sessions' commits never wait behind a large message).
            try:
                batch = [self._queue.get(timeout=wait)]
            except queue.Empty:
                batch = [_PRUNE]
                self._prune_due = True
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            # the large messages' pieces this commit takes (they reached the
            # lane through the queue, in an earlier turn: what was queued
            # before them, their session's row, is committed already)
            budget = BATCH_BYTES
            pieces: list[Any] = []
            while self._pieces and budget > 0:
                piece = self._pieces.popleft()
                pieces.append(piece)
                budget -= _piece_bytes(piece)
            stop = False
            ops: list[Any] = []
            waiters: list[_Barrier | threading.Event] = []
            prune_all: list[_PruneAll] = []
            for item in _flat(batch):
                if item is None:
                    stop = True
                elif isinstance(item, (_Barrier, threading.Event)):
                    waiters.append(item)
                elif isinstance(item, _PruneAll):
                    prune_all.append(item)
                elif isinstance(item, _ToLane):  # a large message's: from the next commit
                    self._pieces.extend(item.items)
                elif item is not _PIECES and item is not _PRUNE and item is not _REFILL:
                    ops.append(item)
            self._refill()
            whole: list[int] = []
            for piece in pieces:
                if isinstance(piece, _Barrier):
                    waiters.append(piece)
                    continue
                ops.append(piece)
                if piece[0] == _UNMARK:
                    whole.append(piece[1][0])
            err = self._write(ops, waiters)
            self._in_pieces.difference_update(whole)  # before anyone waiting is woken
            self._release(waiters, err)
            self._written += (BATCH_BYTES - budget) + 4096 * len(ops)  # pieces, and pages
            if self._written > CHECKPOINT_BYTES:
                self._written = 0
                self._checkpoint_due.set()
            if self._pieces:
                self._queue.put(_PIECES)  # more pieces: another turn, after what comes
            for job in prune_all:
                self._prune_due = bool(self.retention)
                while self._prune_due and self._prune():
                    pass
                if job.vacuum and self._db is not None:
                    with contextlib.suppress(Exception):
                        self.dialect.vacuum(self._db)
                job.result.append(self.pruned)
                job.done.set()
            if (self._prune_due and not stop and time.monotonic() >= self._prune_at
                    and self._prune()):
                self._queue.put(_PRUNE)  # more to prune: another step, after what comes
            if stop and self._pieces and self.error is None:
                self._queue.put(None)  # large messages queued before the close: finished first
                continue
            if stop:
                if self._db is not None:
                    self._db.close()
                    self._db = None
                return

    def _refill(self) -> None:
        """A shared store's reserves of ids running low: more, in a short
        transaction of their own (SQLite) or from the sequences."""
        wants = {t: r.want() for t, r in self._ids.items()
                 if isinstance(r, _Reserve) and r.wanted}
        if not wants or not self._connected():
            return
        assert self._db is not None
        try:
            got = self.dialect.reserve(self._db, wants)
        except Exception as e:  # tried again at the next turn
            self._db.rollback()
            if self.dialect.lost(e):
                self._drop(e)
            return
        for table, ids in got.items():
            reserve = self._ids[table]
            assert isinstance(reserve, _Reserve)
            reserve.fill(ids)

    def _connected(self) -> bool:
        """The writer has a connection, or has just made one again (not
        more often than every RECONNECT_EVERY seconds)."""
        if self._db is not None:
            return True
        now = time.monotonic()
        if now < self._connect_at:
            return False
        self._connect_at = now + RECONNECT_EVERY
        try:
            db = self.dialect.connect("writer")
            if self.owner is not None:
                self.dialect.retake_owner(db, self.owner)
        except Exception as e:
            self._lost = e
            return False
        self._db = db
        self.reconnects += 1
        return True

    def _drop(self, e: BaseException) -> None:
        """The connection is gone: made again at the next write."""
        if self._db is not None:
            self._db.close()
        self._db = None
        self._lost = e
        self._connect_at = 0.0

    def _try(self, ops: list[Any]) -> BaseException | None:
        """Commit `ops`: None, or why not. A connection found gone before
        the COMMIT was sent is made again and the commit tried once more
        (nothing of it was written); gone while the COMMIT was on its way,
        whether it took is unknown: the error, and its messages refused."""
        for again in (False, True):
            if not self._connected():
                self._lost = self._lost or StoreError("the store cannot be reached")
                return self._lost
            db = self._db
            assert db is not None
            try:
                self._commit(db, ops)
                return None
            except Exception as e:  # the database's errors, or a text it cannot take
                db.rollback()
                if not self.dialect.lost(e):
                    return e
                sent = self._committing
                self._drop(e)
                if sent or again:
                    return e
                self._connect_at = 0.0
                self._tell(f"store {self.display}: the connection was lost ({_line(e)});"
                           " connecting again")
        raise AssertionError("unreachable")

    def _cannot_write(self, e: BaseException) -> bool:
        return (self.dialect.disk_trouble(e) or self.dialect.lost(e)
                or (self._db is None and e is self._lost))

    def _write(self, ops: list[Any], waiters: list[_Barrier | threading.Event]
               ) -> BaseException | None:
        """Commit `ops` (after what a full disk held back). Returns the error
        the commit's waiters get, or None."""
        if self._held:
            ops = self._held + ops
            self._held = []
        if not ops:
            return None
        err = self._try(ops)
        if err is not None:
            if self._cannot_write(err):
                return self._refuse(ops, err, waiters)
            # One bad row must not take the batch's other writes (other
            # sessions', other messages') down with it: again with text
            # made storable, then one by one.
            ops = [_storable(op, self.dialect.postgres) for op in ops]
            err = self._try(ops)
        if err is not None:
            if self._cannot_write(err):
                return self._refuse(ops, err, waiters)
            err = None
            for i, op in enumerate(ops):
                e2 = self._try([op])
                if e2 is not None:
                    if self._cannot_write(e2):
                        return self._refuse(ops[i:], e2, waiters)
                    err = self.error = e2
            if err is not None:
                return err
        if self.retention and any(op[0] in _PRUNE_AFTER for op in ops):
            self._prune_due = True
        if ops and isinstance(self.error, StoreFull):  # written again
            self.error = None
            self._tell(f"store {self.display} writes again ({self.refused:,} message(s) "
                       "refused with 452 4.3.1 while it could not)")
        return None

    def _refuse(self, ops: list[Any], e: BaseException,
                waiters: list[_Barrier | threading.Event]) -> StoreFull:
        """The store refused a commit (a full disk, a read-only server, a
        lost connection): its messages (and any large message still being
        written) are not stored, and their clients are told so; the other
        records are held and written with the next commit."""
        failed = {op[1][0] for op in ops if op[0] in _MESSAGE_WRITES and op[0] != _UNMARK}
        keep = [op for op in ops if op[0] not in _MESSAGE_WRITES]
        if self._committing:
            # the connection went while the COMMIT was on its way: it may
            # have been written; written again, a row already there stays
            keep = [_idempotent(op) for op in keep]
        refused = {op[1][0] for op in ops if op[0] in (_INSERT_MESSAGE, _INSERT_PARTIAL)}
        had_pieces = bool(self._in_pieces)
        while self._pieces:  # large messages in flight: not stored either
            piece = self._pieces.popleft()
            if isinstance(piece, _Barrier):
                waiters.append(piece)
            elif piece[0] in _MESSAGE_WRITES:
                failed.add(piece[1][0])
                if piece[0] == _INSERT_PARTIAL:
                    refused.add(piece[1][0])
        self._in_pieces.clear()
        if had_pieces:  # rows of theirs written before, marked partial
            keep.append((_DROP_PARTIAL_PARTS, (self._partial,), False))
            keep.append((_DROP_PARTIAL, (self._partial,), False))
        if len(keep) > HOLD_MAX:
            self.given_up += len(keep) - HOLD_MAX
            keep = keep[-HOLD_MAX:]
        self._held = keep
        self.refused += len(refused)
        first = not isinstance(self.error, StoreFull)
        if self.dialect.lost(e) or e is self._lost:
            why = (f"store {self.display} cannot be reached ({_line(e)}): messages are "
                   "answered 452 4.3.1 until it can")
        else:
            why = (f"store {self.display} cannot write ({_line(e)}): messages are answered "
                   "452 4.3.1 until it can")
        err = StoreFull(why)
        self._failed.update(dict.fromkeys(failed, err))
        while len(self._failed) > HOLD_MAX:  # the oldest refusals were answered long ago
            del self._failed[next(iter(self._failed))]
        self.error = err
        if first:
            self._tell(str(err))
        self._prune_due = bool(self.retention)
        return err

    def _prune(self) -> bool:
        """One step of retention, its own short transaction. True: more is due."""
        if not self._connected():
            return False
        db = self._db
        assert db is not None
        try:
            db.begin()
            if not self.dialect.prune_lock(db):  # another writer prunes now
                db.commit()
                self._prune_at = time.monotonic() + PRUNE_EVERY
                return False
            messages, sessions = rt.step(db, self.retention, exact=self.shared,
                                         pruning=self._pruning)
            db.commit()
            if self._pruning.vacuum_due:
                self._pruning.vacuum_due = False
                self._vacuum()
        except Exception as e:
            db.rollback()
            self._prune_due = False
            if self.dialect.lost(e):
                self._drop(e)
            elif not (self.dialect.disk_trouble(e) or self.dialect.transient(e)):
                self.error = e
            return False
        self.pruned += messages
        n = messages + sessions
        self._prune_due = n > 0
        if not n:
            self._prune_at = time.monotonic() + PRUNE_EVERY
        return n > 0

    def _vacuum(self) -> None:
        """PostgreSQL: a VACUUM of the tables retention deleted from, so
        that new rows reuse the space; in a thread of its own, beside the
        writer's commits (it may take a while on a large store)."""
        if self._vacuumer is None:
            self._vacuumer = threading.Thread(target=self._vacuums, name="harness-vacuum",
                                              daemon=True)
            self._vacuumer.start()
        self._vacuum_due.set()

    def _vacuums(self) -> None:
        db: Db | None = None
        try:
            while True:
                self._vacuum_due.wait()
                self._vacuum_due.clear()
                if self._closing:
                    return
                try:
                    db = db or self.dialect.connect("writer")
                    self.dialect.vacuum(db)
                except Exception:  # autovacuum does it in the end
                    if db is not None:
                        db.close()
                    db = None
        finally:
            if db is not None:
                db.close()

    def _tell(self, line: str) -> None:
        if self.on_health is not None:
            with contextlib.suppress(Exception):
                self.on_health(line)

    def _release(self, waiters: list[_Barrier | threading.Event],
                 err: BaseException | None) -> None:
        """Wake whoever waited for this commit: each event loop once, with all
        its futures (a wake-up of a loop from this thread costs about as much
        as the rest of a small message's handling). A wait for one message
        fails only if that message was refused."""
        by_loop: dict[asyncio.AbstractEventLoop,
                      list[tuple[asyncio.Future[None], BaseException | None]]] = {}
        for w in waiters:
            if isinstance(w, threading.Event):
                w.set()
                continue
            why = err
            if w.mid is not None:  # a message: was it refused (now or before)?
                refused = self._failed.get(w.mid)  # (several may wait for one)
                if refused is not None:
                    why = refused
                elif err is None or isinstance(err, StoreFull):
                    why = None  # committed before this commit failed
            by_loop.setdefault(w.loop, []).append((w.future, why))
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures)
            except RuntimeError as e:  # a loop already closed: keep writing
                self.error = e

    def message_analysis(self, mid: int, analysis: dict[str, Any] | str, is_ndr: bool) -> None:
        """A message's analysis (JSON, or its text already), and it leaves
        the analysis queue."""
        text = analysis if isinstance(analysis, str) else json.dumps(analysis, default=str)
        self.message_analyses([(mid, text, is_ndr)])

    def message_analyses(self, results: Sequence[tuple[int, str, bool]]) -> None:
        """Analyses (message id, JSON text, is an NDR), written together:
        one UPDATE and one DELETE for them all."""
        now = [r for r in results if r[0] not in self._in_pieces]
        for mid, text, is_ndr in results:
            if mid in self._in_pieces:  # after the message's last piece
                self._submit(_ToLane([(_ANALYSED, (mid, int(is_ndr), text), False),
                                      (_DEQUEUE, (mid,), False)]))
        if now:  # at once: a worker that ends lets its claims go (another may take them)
            self._submit((_ANALYSED, [(mid, int(n), text) for mid, text, n in now], True),
                         True)
            self._submit((_DEQUEUE, [(mid,) for mid, _, _ in now], True), True)

    def analysis_job(self, mid: int, *, client_ip: str, helo: str | None, hostname: str,
                     zone: Mapping[str, Any] | None) -> None:
        """Queue a stored message for analysis (in the same commit as the
        message: a crash cannot lose the job). `zone`: the scenario's dns:
        records to look SPF, DKIM and DMARC up in; None: the system's DNS."""
        zone_id = None
        if zone is not None:
            text = json.dumps(zone, sort_keys=True, default=list)
            zone_id = self._zones.get(text)
            if zone_id is None:
                zone_id = self._zones[text] = self._ids["zones"].take()
                self._put("INSERT INTO zones (id, json) VALUES (?, ?)"
                          " ON CONFLICT (id) DO NOTHING", (zone_id, text))
        op = (_QUEUE_JOB, (mid, client_ip, helo, hostname, zone_id), False)
        if mid in self._in_pieces:
            self._submit(_ToLane([op]))  # after the message's last piece
        else:
            self._submit(op)

    def clear(self, session_ids: Iterable[int] | None = None) -> None:
        """Forget everything captured (queued like any write; IDs keep
        counting); or, `session_ids` given, those sessions and all they
        left (what a shared store's other writers captured stays)."""
        if session_ids is None:
            for table in ("events", "lines", "attempts", "relays", "analysis_queue",
                          "analyses", "message_parts", "messages", "sessions"):
                self._put(f"DELETE FROM {table}", (), prompt=True)
            return
        ids = sorted(set(session_ids))
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ",".join("?" * len(chunk))
            mids = f"(SELECT id FROM messages WHERE session_id IN ({marks}))"
            for sql in (f"DELETE FROM events WHERE session_id IN ({marks})",
                        f"DELETE FROM lines WHERE session_id IN ({marks})",
                        f"DELETE FROM attempts WHERE session_id IN ({marks})",
                        f"DELETE FROM relays WHERE session_id IN ({marks})",
                        f"DELETE FROM analysis_queue WHERE message_id IN {mids}",
                        f"DELETE FROM analyses WHERE message_id IN {mids}",
                        f"DELETE FROM message_parts WHERE message_id IN {mids}",
                        f"DELETE FROM messages WHERE session_id IN ({marks})",
                        f"DELETE FROM sessions WHERE id IN ({marks})"):
                self._put(sql, tuple(chunk), prompt=True)

    def _commit(self, db: Db, ops: list[Any]) -> None:
        self._committing = False
        with db.pipeline():
            db.begin()
            for sql, rows in _grouped(ops):
                if sql == _PART:  # a megabyte each: one statement each
                    for part in rows:
                        db.execute(sql, part)
                elif len(rows) > 1 and sql.startswith("INSERT"):
                    _insert_many(db, sql, rows)
                elif len(rows) == 1:
                    db.execute(sql, rows[0])
                else:
                    db.executemany(sql, rows)
            # (in a pipeline the statements may be on their way already: a
            # connection lost from here on may have committed them)
            self._committing = True
            db.commit()
        self._committing = False
        self.commits += 1

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve writes from `loop` (call it on the loop): what its thread
        writes during one turn of the loop reaches the writer thread as one
        item, handed over at the end of the turn (a wake-up of the writer
        per write was a good part of the CPU under load); what other threads
        write goes through the loop too, in order with it."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def _put(self, sql: str, params: Sequence[Any], many: bool = False, *,
             prompt: bool = False) -> None:
        self._submit((sql, params, many), prompt)

    def _submit(self, item: Any, prompt: bool | None = None) -> None:
        """Queue a write. Records nobody waits for (transcripts, attempts,
        sessions: `prompt` False) reach the writer with the next write
        somebody waits for (a message's commit, a barrier), or HAND_OVER_AFTER
        seconds later: with one client, a commit (and an fsync) per command
        was most of the time between its messages. None: prompt unless a
        plain SQL write."""
        if prompt is None:
            prompt = type(item) is not tuple
        if threading.get_ident() == self._loop_thread:
            self._gather(item, prompt)
            return
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                loop.call_soon_threadsafe(self._gather, item, prompt)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        self._queue.put(item)

    def _gather(self, item: Any, prompt: bool) -> None:
        if (self._lines and type(item) is tuple and item[0].startswith("DELETE")
                and item[0] is not _DEQUEUE):
            self._pack_lines()  # lines written before a deletion go before it
        self._pending.append(item)
        if prompt or len(self._pending) > HAND_OVER_MAX:
            if self._handing_over != "soon":
                self._schedule(True)
        elif self._handing_over is None:
            self._schedule(False)

    def _schedule(self, soon: bool) -> None:
        loop = self._loop
        assert loop is not None
        if self._hand_over_timer is not None:
            self._hand_over_timer.cancel()
            self._hand_over_timer = None
        if soon:  # at the end of this turn of the loop
            self._handing_over = "soon"
            loop.call_soon(self._hand_over)
        else:
            self._handing_over = "later"
            self._hand_over_timer = loop.call_later(HAND_OVER_AFTER, self._hand_over)

    def _pack_lines(self) -> None:
        # packed into rows by the writer's thread (the loop's has the
        # conversations to carry on): see _flat
        held, self._lines = self._lines, {}
        self._pending.append((_INSERT_LINES, held, True))

    def _hand_over(self) -> None:
        self._handing_over = None
        if self._hand_over_timer is not None:
            self._hand_over_timer.cancel()
            self._hand_over_timer = None
        if self._lines:
            self._pack_lines()
        if self._pending:
            items, self._pending = self._pending, []
            self._queue.put(items)

    def barrier(self) -> asyncio.Future[None]:
        """A future that resolves once everything queued so far is committed
        (a StoreError if the commit failed)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._submit(_Barrier(loop, fut))
        return fut

    def sync_barrier(self, timeout: float = 10.0) -> None:
        """Block until everything queued so far is committed (not for the loop)."""
        ev = threading.Event()
        self._submit(ev)
        ev.wait(timeout)

    def probe(self) -> asyncio.Future[None]:
        """Write one small row and say whether it was committed (a store
        that could not write, asked whether it can again)."""
        self._put(_PROBE, (time.time(),))
        return self.barrier()

    def prune_now(self, *, vacuum: bool = False, timeout: float | None = None) -> int:
        """Prune to the retention policy until nothing more is due, then
        (`vacuum`) give the freed space back (SQLite: to the file system;
        PostgreSQL: plain VACUUM); blocks (not for the loop). Returns the
        messages deleted since the store was opened (what is due is pruned
        at once when it opens)."""
        done = threading.Event()
        result: list[int] = []
        self._queue.put(_PruneAll(vacuum, done, result))
        done.wait(timeout)
        return result[0] if result else 0

    # -- writes (non-blocking: safe on the event loop) ---------------------

    def session_started(self, *, listener: str, peer_ip: str, peer_port: int,
                        scenario: str, t: float | None = None) -> int:
        sid = self._ids["sessions"].take()
        self._put("INSERT INTO sessions (id, started_at, listener, peer_ip, peer_port, scenario)"
                  " VALUES (?, ?, ?, ?, ?, ?)",
                  (sid, time.time() if t is None else t, listener, peer_ip, peer_port, scenario))
        return sid

    _SESSION_FIELDS = frozenset({"helo", "tls_version", "tls_cipher", "auth_user",
                                 "ended_at", "end_reason", "extensions", "mail_from",
                                 "rcpt_tos"})
    _JSON_FIELDS = frozenset({"extensions", "mail_from", "rcpt_tos"})

    def session_update(self, sid: int, **fields: Any) -> None:
        bad = set(fields) - self._SESSION_FIELDS
        if bad:
            raise ValueError(f"unknown session fields: {sorted(bad)}")
        for key in self._JSON_FIELDS & fields.keys():
            value = fields[key]
            fields[key] = (_json_strings(value) if isinstance(value, list)
                           else json.dumps(value))
        cols = ", ".join(f"{k} = ?" for k in fields)
        # a session's end goes at once: a reader after the client is gone
        # finds all of it
        self._put(f"UPDATE sessions SET {cols} WHERE id = ?", (*fields.values(), sid),
                  prompt="ended_at" in fields)

    def transcript(self, lines: Sequence[TranscriptLine]) -> None:
        """Transcript lines, as the session made them (any sessions'). On
        the loop's thread they are gathered per session until the hand-over
        and written as one row of `lines` per session per commit: a row per
        line was most of a commit's work (nine lines to a small message)."""
        if not lines:
            return
        if threading.get_ident() != self._loop_thread:
            by: dict[int, list[TranscriptLine]] = {}
            for line in lines:
                by.setdefault(line[0], []).append(line)
            self._submit((_INSERT_LINES, [_pack(sid, ls) for sid, ls in by.items()], True))
            return
        held = self._lines
        sid = lines[0][0]
        if lines[-1][0] == sid and all(line[0] == sid for line in lines):
            got = held.get(sid)
            if got is None:
                held[sid] = list(lines)
            else:
                got.extend(lines)
        else:
            for line in lines:
                held.setdefault(line[0], []).append(line)
        if self._handing_over is None:
            self._schedule(False)

    def attempt(self, record: AttemptRecord) -> int:
        aid = self._ids["attempts"].take()
        self._put("INSERT INTO attempts (id, session_id, t, mail_from, rcpt, phase, code,"
                  " enhanced, reply, outcome, rule, message_id)"
                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", (aid, *record))
        return aid

    def relay(self, *, message_id: int, session_id: int, t: float, handler: str, ok: bool,
              status: str) -> None:
        """What a handler (a forward) did with a stored message."""
        self._put("INSERT INTO relays (message_id, session_id, t, handler, ok, status)"
                  " VALUES (?, ?, ?, ?, ?, ?)", (message_id, session_id, t, handler, int(ok),
                                                 status))

    def message(self, draft: MessageDraft) -> int:
        """Queue a message; pair it with `durable()` before answering 250.

        A message over CHUNK bytes is written in parts (message_parts), in a
        lane of their own that the writer takes about BATCH_BYTES of per
        commit: the row first, marked partial (with this writer's mark),
        then the parts (views of the caller's buffer, not copies), then the
        mark removed. Other sessions' commits go on in between; a crash
        leaves a partial row, never acknowledged, that the next open removes
        (a shared store's: once its writer is no longer alive)."""
        mid = self._ids["messages"].take()
        body = draft.raw
        big = len(body) > CHUNK
        row = (mid, draft.session_id, draft.t, draft.mail_from,
               _json_strings(draft.rcpt_tos), _json_strings(draft.mail_options),
               _json_strings(draft.rcpt_options), json.dumps(draft.dsn) if draft.dsn else "{}",
               len(body), draft.subject, draft.message_id)
        if not big:
            self._put(_INSERT_MESSAGE, (*row, body.whole()))
            return mid
        lane: list[Any] = [(_INSERT_PARTIAL, (*row, b"", self._partial), False)]
        seq = 0
        for part in body.parts:  # views of the caller's parts, at most CHUNK each
            view = memoryview(part)
            for offset in range(0, len(view), CHUNK):
                lane.append((_PART, (mid, seq, view[offset:offset + CHUNK]), False))
                seq += 1
        lane.append((_UNMARK, (mid,), False))
        self._in_pieces.add(mid)
        self._submit(_ToLane(lane))  # in order: after its session's row
        return mid

    def writes_in_pieces(self, mid: int) -> bool:
        """Message `mid` is large and not all written yet."""
        return mid in self._in_pieces

    def durable(self, mid: int) -> asyncio.Future[None]:
        """A future that resolves once message `mid` is committed: for a large
        one, when its last piece is; otherwise with everything queued so far
        (`barrier`)."""
        loop = (self._loop if threading.get_ident() == self._loop_thread and self._loop
                else asyncio.get_running_loop())
        fut: asyncio.Future[None] = loop.create_future()
        if mid not in self._in_pieces:
            self._submit(_Barrier(loop, fut, mid))
        else:
            self._submit(_ToLane([_Barrier(loop, fut, mid)]))  # after its last piece
        return fut


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Reader:
    """Queries over a store, from any thread or process (read-only)."""

    def __init__(self, location: Location = DEFAULT_PATH) -> None:
        self.dialect: Dialect = dialect(location)
        self.location: Location = location if is_postgres(location) else Path(location)
        #: the SQLite file, or the URL (its password hidden): what to print
        self.path: Path | str = (self.dialect.display if self.dialect.postgres
                                 else Path(location))
        d = self.dialect
        if not d.exists():
            raise StoreError(f"no store at {self.path} (run harness serve first, "
                             "or give --store PATH)")
        self.db = d.connect("reader")
        self.conn: Any = self.db.raw
        try:
            if not d.postgres:
                self.conn.row_factory = sqlite3.Row
            self.db.execute("SELECT 1 FROM sessions LIMIT 1")
            # a large message still being written is not there yet
            self._whole = ("partial IS NULL" if "partial" in d.columns(self.db, "messages")
                           else "1 = 1")
            # a store written before transcripts were packed has only `events`
            self._packed = bool(d.columns(self.db, "lines"))
            # analyses in a table of their own (an older store's: in messages)
            if d.columns(self.db, "analyses"):
                self._from = ("messages m LEFT JOIN analyses a ON a.message_id = m.id")
                self._ndr = "COALESCE(a.is_ndr, m.is_ndr)"
                analysis = "COALESCE(a.analysis, m.analysis)"
            else:
                self._from, self._ndr, analysis = "messages m", "m.is_ndr", "m.analysis"
            self._cols = ("m.id, m.session_id, m.received_at, m.mail_from, m.rcpt_tos,"
                          " m.mail_options, m.rcpt_options, m.dsn, m.size, m.subject,"
                          f" m.message_id, {self._ndr} AS is_ndr, {analysis} AS analysis")
        except Exception as e:
            self.db.close()
            if d.postgres and d.missing_table(e):
                raise StoreError(f"no store at {self.path} (run harness serve --store "
                                 "URL first)") from None
            raise StoreError(f"cannot read store {self.path}: {_line(e)}") from e

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """A query of your own (`?` for parameters, whichever the database):
        a cursor, its rows read by position or by name."""
        return self.db.execute(sql, params)

    def _session(self, row: Any) -> SessionRecord:
        d = dict(row)
        for key, empty in (("extensions", {}), ("mail_from", []), ("rcpt_tos", [])):
            d[key] = json.loads(d[key]) if d.get(key) else empty
        return SessionRecord(**d)

    def sessions(self, *, limit: int | None = None, session_ids: Sequence[int] | None = None,
                 with_events: bool = False) -> list[SessionRecord]:
        sql = "SELECT * FROM sessions"
        params: list[Any] = []
        if session_ids is not None:
            if not session_ids:
                return []
            sql += f" WHERE id IN ({','.join('?' * len(session_ids))})"
            params.extend(session_ids)
        sql += " ORDER BY id DESC"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        out = [self._session(r) for r in self.execute(sql, params)]
        out.reverse()
        if not out:
            return out
        ids = [s.id for s in out]
        by_id = {s.id: s for s in out}
        marks = ",".join("?" * len(ids))
        for r in self.execute(
            f"SELECT id, session_id FROM messages WHERE session_id IN ({marks})"
                f" AND {self._whole} ORDER BY id", ids):
            by_id[r[1]].message_ids.append(r[0])
        if with_events:
            for r in self.execute(
                f"SELECT session_id, t, direction, phase, text, rule FROM events"
                f" WHERE session_id IN ({marks}) ORDER BY id", ids):
                by_id[r[0]].events.append(TranscriptLine(*r))  # a store before `lines`
            if self._packed:
                for r in self.execute(f"SELECT session_id, packed FROM lines"
                                      f" WHERE session_id IN ({marks}) ORDER BY id", ids):
                    by_id[r[0]].events.extend(_unpack(r[0], r[1]))
        return out

    def session(self, sid: int) -> SessionRecord | None:
        found = self.sessions(session_ids=[sid], with_events=True)
        return found[0] if found else None

    def _message(self, row: Any) -> MessageRecord:
        d = dict(row)
        d.pop("partial", None)
        if "raw" in d and d["raw"] is not None and not d["raw"] and d["size"] > CHUNK:
            d["raw"] = self.raw(d["id"])
        elif d.get("raw") is not None:
            d["raw"] = bytes(d["raw"])
        for k in ("rcpt_tos", "mail_options", "rcpt_options"):
            d[k] = json.loads(d[k])
        d["dsn"] = json.loads(d.get("dsn") or "{}")
        if "analysis" in d:
            d["analysis"] = json.loads(d["analysis"]) if d["analysis"] else None
        if d.get("is_ndr") is not None:
            d["is_ndr"] = bool(d["is_ndr"])
        return MessageRecord(**d)

    def messages(self, *, limit: int | None = None, rcpt: str | None = None,
                 session_id: int | None = None, raw: bool = False,
                 ndr: bool | None = None, session_ids: Sequence[int] | None = None
                 ) -> list[MessageRecord]:
        cols = self._cols + (", m.raw" if raw else "")
        sql = f"SELECT {cols} FROM {self._from}"
        where: list[str] = [self._whole]
        params: list[Any] = []
        if rcpt is not None:
            where.append(self.dialect.rcpt_match())
            params.append(rcpt.lower())
        if session_id is not None:
            where.append("session_id = ?")
            params.append(session_id)
        if session_ids is not None:
            if not session_ids:
                return []
            where.append(f"session_id IN ({','.join('?' * len(session_ids))})")
            params.extend(session_ids)
        if ndr is not None:
            where.append(f"{self._ndr} = ?" if ndr
                         else f"({self._ndr} = 0 OR {self._ndr} IS NULL)")
            if ndr:
                params.append(1)
        sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY m.id DESC"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        out = [self._message(r) for r in self.execute(sql, params)]
        out.reverse()
        return out

    def raw(self, mid: int, limit: int | None = None) -> bytes:
        """A message's bytes as received (or its first `limit` bytes)."""
        row = self.execute(
            "SELECT size, raw FROM messages WHERE id = ?" if limit is None else
            "SELECT size, substr(raw, 1, ?) FROM messages WHERE id = ?",
            (mid,) if limit is None else (limit, mid)).fetchone()
        if row is None:
            return b""
        size, raw = row[0], row[1]
        if raw or size <= CHUNK:
            return bytes(raw or b"")[:limit] if limit else bytes(raw or b"")
        out = bytearray()
        for r in self.execute(
                "SELECT data FROM message_parts WHERE message_id = ? ORDER BY seq", (mid,)):
            out += r[0]
            if limit and len(out) >= limit:
                return bytes(out[:limit])
        return bytes(out)

    def message(self, mid: int) -> MessageRecord | None:
        row = self.execute(f"SELECT {self._cols}, m.raw FROM {self._from}"
                           f" WHERE m.id = ? AND {self._whole}", (mid,)).fetchone()
        return self._message(row) if row else None

    def relays(self, message_id: int | None = None, *,
               session_ids: Sequence[int] | None = None) -> list[Relay]:
        """What handlers (forwards) did with stored messages, oldest first."""
        sql = "SELECT message_id, session_id, t, handler, ok, status FROM relays"
        where: list[str] = []
        params: list[Any] = []
        if message_id is not None:
            where.append("message_id = ?")
            params.append(message_id)
        if session_ids is not None:
            if not session_ids:
                return []
            where.append(f"session_id IN ({','.join('?' * len(session_ids))})")
            params.extend(session_ids)
        if where:
            sql += " WHERE " + " AND ".join(where)
        try:
            rows = self.execute(sql + " ORDER BY id", params).fetchall()
        except self.dialect.Error as e:  # a store from before relays, never served since
            if not self.dialect.missing_table(e):
                raise
            return []
        return [Relay(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]

    def attempts(self, *, rcpt: str | None = None, mail_from: str | None = None,
                 session_ids: Sequence[int] | None = None) -> list[Attempt]:
        sql = "SELECT * FROM attempts"
        where: list[str] = []
        params: list[Any] = []
        if rcpt is not None:
            where.append("lower(rcpt) = ?")
            params.append(rcpt.lower())
        if mail_from is not None:
            where.append("lower(mail_from) = ?")
            params.append(mail_from.lower())
        if session_ids is not None:
            if not session_ids:
                return []
            where.append(f"session_id IN ({','.join('?' * len(session_ids))})")
            params.extend(session_ids)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY t, id"
        out = [Attempt(**dict(r)) for r in self.execute(sql, params)]
        last: dict[tuple[str, str], float] = {}
        for a in out:
            key = (a.mail_from.lower(), a.rcpt.lower())
            if key in last:
                a.interval = a.t - last[key]
            last[key] = a.t
        return out

    def analysis_pending(self) -> list[int]:
        """Ids of the stored messages still waiting for their analysis."""
        try:
            return [r[0] for r in self.execute(
                "SELECT message_id FROM analysis_queue ORDER BY message_id")]
        except self.dialect.Error as e:  # a store from before the queue, never served since
            if not self.dialect.missing_table(e):
                raise
            return [r[0] for r in self.execute(
                "SELECT id FROM messages WHERE analysis IS NULL ORDER BY id")]

    def usage(self) -> dict[str, int]:
        """Bytes: SQLite: the database file, its write-ahead log, the pages
        in use (the rest of the file is free pages, reused before it
        grows); PostgreSQL: pg_total_relation_size of the store's tables
        (all three the same)."""
        return self.dialect.usage(self.db)

    def counts(self, tables: Sequence[str] = ("sessions", "messages", "attempts", "events")
               ) -> dict[str, int]:
        """Rows of `tables`; "events": transcript lines (packed or not)."""
        out = {}
        for t in tables:
            n = self.db.one(f"SELECT COUNT(*) FROM {t}")
            if t == "events" and self._packed:
                n += self.db.one("SELECT COALESCE(SUM(n), 0) FROM lines")
            out[t] = int(n)
        return out


#: rows in one multi-row INSERT at most
INSERT_ROWS = 64

_VALUES = re.compile(r"^(.*?) VALUES (\([^)]*\))(.*)$", re.S)


def _insert_many(db: Db, sql: str, rows: list[Any]) -> None:
    """INSERT many rows with few multi-row statements (INSERT ... VALUES
    (...), (...), ...), 64 rows at most each: sqlite3 lets go of the
    interpreter lock around every statement it prepares, steps and resets,
    and with the event loop's thread holding it each of those is a wait
    for the lock and a thread switch or more (measured: about 3.5 switches
    of the writer thread per statement under load, a tenth of the server's
    CPU with executemany, one step per row). SQLite: one statement for up
    to 64 rows, of the exact count (the writer's connection keeps enough
    prepared statements for every count of every table); PostgreSQL: chunks
    of a power of two (psycopg prepares what is run often, in a cache of a
    hundred; each statement is a message of the pipeline, not a switch)."""
    m = _VALUES.match(sql)
    assert m is not None, sql
    head, one, tail = m.groups()
    if "DO UPDATE" in tail:
        # one statement may not update a row twice (PostgreSQL): of rows
        # for the same key (the first column), the last, as one by one
        rows = list({row[0]: row for row in rows}.values())
    exact = not db.dialect.postgres
    i = 0
    while i < len(rows):
        left = len(rows) - i
        n = min(left, INSERT_ROWS) if exact else min(1 << (left.bit_length() - 1), INSERT_ROWS)
        chunk = rows[i:i + n]
        db.execute(f"{head} VALUES {', '.join([one] * n)}{tail}",
                   [v for row in chunk for v in row])
        i += n


#: tables whose rows others refer to come first in a commit (PostgreSQL
#: checks each foreign key as the row is written)
_PARENTS_FIRST = {"sessions": 0, "zones": 0, "messages": 1}


def _table(sql: str) -> str:
    return sql.split(None, 3)[2].split("(", 1)[0]  # INSERT INTO <table> ...


def _grouped(ops: list[tuple[str, Any, bool]]) -> Iterator[tuple[str, list[Any]]]:
    """The rows of a commit's INSERTs gathered per statement (one
    executemany each, not one call per row): the tables other rows refer to
    first (sessions, then messages), the others in the order each statement
    first appears. (In order of first appearance alone, a session's lines
    could go before the session's row: another session's lines came
    first.) Then a session's updates, merged into one per session (a
    session's end and its envelope: two UPDATEs a connection), and the
    analysis queue's deletions: after the rows they follow. Any other
    statement (a DELETE of clear() or retention) is a fence that everything
    queued before it passes first."""
    groups: dict[str, list[Any]] = {}
    updates: dict[int, dict[str, Any]] = {}
    dequeue: list[Any] = []

    def flush() -> Iterator[tuple[str, list[Any]]]:
        yield from sorted(groups.items(), key=lambda g: _PARENTS_FIRST.get(_table(g[0]), 2))
        by_sql: dict[str, list[Any]] = {}
        for sid, fields in updates.items():
            sql = ("UPDATE sessions SET " + ", ".join(f"{k} = ?" for k in fields)
                   + " WHERE id = ?")
            by_sql.setdefault(sql, []).append((*fields.values(), sid))
        yield from by_sql.items()
        if dequeue:
            yield _DEQUEUE, dequeue

    for sql, params, many in ops:
        if sql.startswith(_UPDATE_SESSION) and not many:
            fields = updates.setdefault(params[-1], {})
            for name, value in zip(sql[len(_UPDATE_SESSION):-len(" WHERE id = ?")].split(", "),
                                   params, strict=False):
                fields[name.removesuffix(" = ?")] = value
            continue
        if sql == _DEQUEUE:
            if many:
                dequeue.extend(params)
            else:
                dequeue.append(params)
            continue
        if not sql.startswith("INSERT") or (
                sql is _QUEUE_JOB and dequeue and (params[0],) in dequeue):
            # (a message queued again after its job left the queue: the
            # deletion first, as it was written)
            yield from flush()
            groups, updates, dequeue = {}, {}, []
            if not sql.startswith("INSERT"):
                yield sql, [params] if not many else list(params)
                continue
        rows = groups.get(sql)
        if rows is None:
            rows = groups[sql] = []
        if many:
            rows.extend(params)
        else:
            rows.append(params)
    yield from flush()


_UPDATE_SESSION = "UPDATE sessions SET "


def _pack(sid: int, lines: Sequence[TranscriptLine]) -> tuple[int, int, str]:
    """A row of `lines`: a session's transcript lines as JSON, text any
    database can store (see _text)."""
    rows = [line[1:] for line in lines]
    text = _ENCODE(rows)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes a client sent that are not UTF-8
        text = _ENCODE([[_text(v) for v in row] for row in rows])
    return sid, len(rows), text


#: one encoder (json.dumps with options makes one per call)
_ENCODE = json.JSONEncoder(ensure_ascii=False, check_circular=False).encode


def _unpack(sid: int, text: str) -> Iterator[TranscriptLine]:
    for t, direction, phase, line, rule in json.loads(text):
        yield TranscriptLine(sid, t, direction, phase, line, rule)


def _text(value: Any, postgres: bool = False) -> Any:
    """A str the database can store: lone surrogates (from bytes a client
    sent that are not UTF-8) become backslash escapes; for PostgreSQL,
    whose text cannot hold it, so does a NUL."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "surrogateescape").decode("utf-8",
                                                                   "backslashreplace")
        if postgres and "\x00" in value:
            value = value.replace("\x00", "\\x00")
    return value


def _storable(op: tuple[str, Any, bool], postgres: bool = False) -> tuple[str, Any, bool]:
    sql, params, many = op
    if many:
        return sql, [tuple(_text(v, postgres) for v in row) for row in params], many
    return sql, tuple(_text(v, postgres) for v in params), many


def _idempotent(op: tuple[str, Any, bool]) -> tuple[str, Any, bool]:
    """An INSERT written again after a commit whose fate is unknown: a row
    already there (the same id) stays as it is."""
    sql, params, many = op
    if sql.startswith("INSERT") and "ON CONFLICT" not in sql:
        return sql + " ON CONFLICT DO NOTHING", params, many
    return op
