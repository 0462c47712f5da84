"""The capture store: SQLite in WAL mode, one writer thread, grouped commits.

The event loop never touches the database. It hands writes to `Store` methods
that only append to a queue; a writer thread drains the queue, runs everything
pending in one transaction and commits it (synchronous=FULL, so a commit is
on disk). Under load many sessions' writes share one commit. A caller that
must not answer before its data is durable (the 250 after the final dot)
awaits the future `store_message` returns: it resolves after the commit that
carried the message, and carries every earlier write too (the queue is FIFO).

Readers (CLI, tests, API) open their own connections; WAL lets them read
while the writer writes. IDs are allocated in memory by the one writer
process, so the loop never waits for an INSERT to learn an ID; a lock file
keeps a second writer off the same store."""

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
from typing import Any

from harness.errors import StoreError
from harness.records import AttemptRecord, MessageDraft, NotStored, Outcome, TranscriptLine
from harness.store import retention as rt
from harness.store.bounces import SCHEMA as BOUNCES_SCHEMA

DEFAULT_PATH = Path(".harness") / "harness.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    ended_at REAL,
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
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    session_id INTEGER NOT NULL REFERENCES sessions(id),
    t REAL NOT NULL,
    direction TEXT NOT NULL,  -- 'C' client, 'S' server, 'I' info (faults, delays)
    phase TEXT,
    text TEXT NOT NULL,
    rule TEXT
);
CREATE INDEX IF NOT EXISTS events_session ON events(session_id, id);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    session_id INTEGER NOT NULL REFERENCES sessions(id),
    received_at REAL NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,   -- JSON list
    mail_options TEXT NOT NULL,
    rcpt_options TEXT NOT NULL,   -- JSON list: each accepted RCPT's parameters as sent
    dsn TEXT,                     -- JSON: RET, ENVID, NOTIFY, ORCPT decoded (RFC 3461)
    size INTEGER NOT NULL,
    subject TEXT,
    message_id TEXT,
    is_ndr INTEGER,               -- NULL until analysed; 1 for a bounce/delay notice
    analysis TEXT,                -- JSON: the parsed NDR, SPF/DKIM/DMARC results
    raw BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_session ON messages(session_id);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    session_id INTEGER NOT NULL REFERENCES sessions(id),
    t REAL NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt TEXT NOT NULL,
    phase TEXT NOT NULL,      -- where the verdict was reached
    code INTEGER,             -- NULL when the verdict was a fault
    enhanced TEXT,
    reply TEXT,
    outcome TEXT NOT NULL,    -- accepted | deferred | rejected | dropped | reset | hang | lost
    rule TEXT,
    message_id INTEGER
);
CREATE INDEX IF NOT EXISTS attempts_rcpt ON attempts(rcpt, t);
CREATE TABLE IF NOT EXISTS relays (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id),
    session_id INTEGER NOT NULL REFERENCES sessions(id),
    t REAL NOT NULL,
    handler TEXT NOT NULL,    -- "forward to HOST:PORT", or a handler's class name
    ok INTEGER NOT NULL,
    status TEXT NOT NULL      -- the next hop's reply, or what went wrong
);
CREATE INDEX IF NOT EXISTS relays_message ON relays(message_id);
CREATE TABLE IF NOT EXISTS analysis_queue (  -- messages stored, not analysed yet
    message_id INTEGER PRIMARY KEY,
    client_ip TEXT NOT NULL,
    helo TEXT,
    hostname TEXT NOT NULL,       -- the receiving server's name (Authentication-Results)
    zone_id INTEGER               -- zones.id: the scenario's DNS; NULL: the system's
);
CREATE TABLE IF NOT EXISTS message_parts (  -- the bytes of a message over CHUNK, in order
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES messages(id),
    seq INTEGER NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS message_parts_message ON message_parts(message_id, seq);
CREATE TABLE IF NOT EXISTS zones (   -- the scenario dns: zones analyses look things up in
    id INTEGER PRIMARY KEY,
    json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS health (  -- one row the writer rewrites to see whether it can write
    id INTEGER PRIMARY KEY CHECK (id = 1),
    t REAL NOT NULL
);
"""

#: Columns added since the first release: (table, column, type), added to an
#: older store when it is opened for writing.
MIGRATIONS = (("sessions", "mail_from", "TEXT"), ("sessions", "rcpt_tos", "TEXT"),
              ("messages", "partial", "INTEGER"))  # 1 while a large message is written

#: messages over this many bytes are written in pieces of this size
CHUNK = 1 << 20
#: the writer takes queued pieces into one commit up to about this much
BATCH_BYTES = 2 << 20
#: the checkpointer copies the WAL into the database after about this much
CHECKPOINT_BYTES = 16 << 20
_PART = "INSERT INTO message_parts (message_id, seq, data) VALUES (?, ?, ?)"
_PIECES = object()  # in the queue: large messages' pieces wait in their lane
_UNMARK = "UPDATE messages SET partial = NULL WHERE id = ?"  # a large message is whole
_PRUNE = object()  # in the queue: retention has another step to take
_PROBE = "INSERT OR REPLACE INTO health (id, t) VALUES (1, ?)"
_INSERT_PARTIAL = (
    "INSERT INTO messages (id, session_id, received_at, mail_from, rcpt_tos, mail_options,"
    " rcpt_options, dsn, size, subject, message_id, raw, partial)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)")
_QUEUE_JOB = ("INSERT OR REPLACE INTO analysis_queue (message_id, client_ip, helo, hostname,"
              " zone_id) VALUES (?, ?, ?, ?, ?)")
_DROP_PARTIAL_PARTS = ("DELETE FROM message_parts WHERE message_id IN"
                       " (SELECT id FROM messages WHERE partial = 1)")
_DROP_PARTIAL = "DELETE FROM messages WHERE partial = 1"
_INSERT_MESSAGE = (
    "INSERT INTO messages (id, session_id, received_at, mail_from, rcpt_tos, mail_options,"
    " rcpt_options, dsn, size, subject, message_id, raw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
    " ?, ?)")
#: the writes that store a message (its row, its parts, its analysis job):
#: what a full disk refuses is dropped, its client told 452
_MESSAGE_WRITES = frozenset({_INSERT_MESSAGE, _INSERT_PARTIAL, _PART, _UNMARK, _QUEUE_JOB})

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


def _connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        uri = f"file:{path}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


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
    """The store cannot write: its disk is full, or its file is read-only or
    gone. Messages are answered 452 4.3.1 until it can again."""


#: SQLite's result codes (and their extended forms) for a store that cannot
#: write for want of space or of a writable file: not the data's fault
_DISK_TROUBLE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")


def _disk_trouble(e: BaseException) -> bool:
    return (isinstance(e, sqlite3.OperationalError)
            and str(getattr(e, "sqlite_errorname", "")).startswith(_DISK_TROUBLE))


#: records (sessions, transcripts, attempts) kept in memory while the disk is
#: full, written once it is not; past this many, the oldest are given up
HOLD_MAX = 200_000
#: seconds between retention's looks when its last look found nothing due
PRUNE_EVERY = 0.5


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
    """Queue items, with the lists a loop hands over (a turn's writes) opened."""
    for item in batch:
        if isinstance(item, list):
            yield from item
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


class Store:
    """Capture store. `open()` for the writer side (serve), `reader()` to query."""

    def __init__(self, path: str | Path = DEFAULT_PATH, *,
                 retention: rt.Retention | None = None) -> None:
        self.path = Path(path)
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
        self._prune_due = bool(self.retention)
        self._prune_at = 0.0  # not before (monotonic): a step finding nothing waits a while
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: the event loop writes come from (attach), and what it gathered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._pending: list[Any] = []
        self._handing_over = False
        #: large messages' writes, taken a few megabytes per commit
        self._pieces: collections.deque[Any] = collections.deque()
        self._in_pieces: set[int] = set()  # large messages not all written yet
        self._thread: threading.Thread | None = None
        self._checkpointer: threading.Thread | None = None
        self._checkpoint_due = threading.Event()
        self._closing = False
        self._written = 0  # bytes committed since the last checkpoint was asked for
        self._lockfile: int | None = None
        self._next_session = 1
        self._next_message = 1
        self._next_attempt = 1
        self._next_zone = 1
        self._zones: dict[str, int] = {}
        self.commits = 0  # how many transactions the writer committed
        self.error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------

    def open(self) -> Store:
        """Create or open the database, take the writer lock, start the writer."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(f"{self.path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise StoreError(f"cannot create store {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise StoreError(
                f"store {self.path} is in use by another harness serve (use --store PATH)"
            ) from e
        self._lockfile = fd
        try:
            conn = _connect(self.path)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            # checkpoints are the checkpointer thread's: copying the WAL into
            # the database at a commit held that commit (and every 250
            # waiting behind it) for as long as the copy took
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            # the WAL file is cut back to this when it starts over (it grows
            # to about 16 * CHECKPOINT_BYTES under sustained load; an idle
            # store need not keep that)
            conn.execute(f"PRAGMA journal_size_limit = {4 * CHECKPOINT_BYTES}")
            conn.executescript(SCHEMA + BOUNCES_SCHEMA)
            for table, column, kind in MIGRATIONS:
                have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            # A large message whose writing a crash cut short was never
            # acknowledged: it goes (its client will send it again).
            conn.execute("DELETE FROM message_parts WHERE message_id IN"
                         " (SELECT id FROM messages WHERE partial = 1)")
            conn.execute("DELETE FROM messages WHERE partial = 1")
            # Messages stored before the analysis queue existed (or whose
            # job a store of an older version lost) are queued now.
            conn.execute(
                "INSERT INTO analysis_queue (message_id, client_ip, helo, hostname, zone_id)"
                " SELECT m.id, s.peer_ip, s.helo, 'mx.harness.test', NULL FROM messages m"
                " JOIN sessions s ON s.id = m.session_id WHERE m.analysis IS NULL"
                " AND m.id NOT IN (SELECT message_id FROM analysis_queue)")
            for row in conn.execute("SELECT id, json FROM zones"):
                self._zones[row[1]] = row[0]
            for table, attr in (("zones", "_next_zone"), ("sessions", "_next_session"),
                                ("messages", "_next_message"),
                                ("attempts", "_next_attempt")):
                (top,) = conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()
                setattr(self, attr, top + 1)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open store {self.path}: {e}") from e
        self._thread = threading.Thread(target=self._writer, args=(conn,),
                                        name="harness-store", daemon=True)
        self._thread.start()
        if self.retention:
            self._queue.put(_PRUNE)  # what is due already goes first
        self._checkpointer = threading.Thread(target=self._checkpoints,
                                              name="harness-checkpoint", daemon=True)
        self._checkpointer.start()
        return self

    def _checkpoints(self) -> None:
        """Copies the WAL into the database (PASSIVE: beside the writer's
        commits, never holding them) each time it has grown by
        CHECKPOINT_BYTES; at the end, all of it, and the WAL emptied."""
        conn = _connect(self.path)
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
        if self._pending and (self._loop is None or not self._loop.is_running()
                              or threading.get_ident() == self._loop_thread):
            self._hand_over()  # gathered this turn of the loop: theirs too
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._checkpointer is not None:
            self._closing = True
            self._checkpoint_due.set()
            self._checkpointer.join()
            self._checkpointer = None
        if self._lockfile is not None:
            os.close(self._lockfile)
            self._lockfile = None

    def __enter__(self) -> Store:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the writer thread -----------------------------------------------

    def _writer(self, conn: sqlite3.Connection) -> None:
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
                elif item is not _PIECES and item is not _PRUNE:
                    ops.append(item)
            budget = BATCH_BYTES
            whole: list[int] = []
            while self._pieces and budget > 0:
                piece = self._pieces.popleft()
                if isinstance(piece, _Barrier):
                    waiters.append(piece)
                    continue
                ops.append(piece)
                budget -= _piece_bytes(piece)
                if piece[0] == _UNMARK:
                    whole.append(piece[1][0])
            err = self._write(conn, ops, waiters)
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
                while self._prune_due and self._prune(conn):
                    pass
                if job.vacuum:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("VACUUM")
                        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                job.result.append(self.pruned)
                job.done.set()
            if (self._prune_due and not stop and time.monotonic() >= self._prune_at
                    and self._prune(conn)):
                self._queue.put(_PRUNE)  # more to prune: another step, after what comes
            if stop:
                conn.close()
                return

    def _write(self, conn: sqlite3.Connection, ops: list[Any],
               waiters: list[_Barrier | threading.Event]) -> BaseException | None:
        """Commit `ops` (after what a full disk held back). Returns the error
        the commit's waiters get, or None."""
        if self._held:
            ops = self._held + ops
            self._held = []
        try:
            self._commit(conn, ops)
        except Exception as e:  # sqlite3.Error, or UnicodeEncodeError for bad text
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if _disk_trouble(e):
                return self._refuse(ops, e, waiters)
            # One bad row must not take the batch's other writes (other
            # sessions', other messages') down with it: again, one by one,
            # with text made storable.
            err: BaseException | None = None
            for i, op in enumerate(ops):
                try:
                    self._commit(conn, [_storable(op)])
                except Exception as e2:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    if _disk_trouble(e2):
                        return self._refuse(ops[i:], e2, waiters)
                    err = self.error = e2
            return err
        if ops and self._message_ops(ops):
            self._prune_due = bool(self.retention)
        if ops and isinstance(self.error, StoreFull):  # written again
            self.error = None
            self._tell(f"store {self.path} writes again ({self.refused:,} message(s) "
                       "refused with 452 4.3.1 while it could not)")
        return None

    @staticmethod
    def _message_ops(ops: list[Any]) -> bool:
        return any(op[0] in _MESSAGE_WRITES for op in ops)

    def _refuse(self, ops: list[Any], e: BaseException,
                waiters: list[_Barrier | threading.Event]) -> StoreFull:
        """The disk refused a commit: its messages (and any large message
        still being written) are not stored, and their clients are told so;
        the other records are held and written with the next commit."""
        failed = {op[1][0] for op in ops if op[0] in _MESSAGE_WRITES and op[0] != _UNMARK}
        keep = [op for op in ops if op[0] not in _MESSAGE_WRITES]
        had_pieces = bool(self._in_pieces)
        while self._pieces:  # large messages in flight: not stored either
            piece = self._pieces.popleft()
            if isinstance(piece, _Barrier):
                waiters.append(piece)
            elif piece[0] in _MESSAGE_WRITES:
                failed.add(piece[1][0])
        self._in_pieces.clear()
        if had_pieces:  # rows of theirs written before, marked partial
            keep.append((_DROP_PARTIAL_PARTS, (), False))
            keep.append((_DROP_PARTIAL, (), False))
        if len(keep) > HOLD_MAX:
            self.given_up += len(keep) - HOLD_MAX
            keep = keep[-HOLD_MAX:]
        self._held = keep
        self.refused += sum(1 for op in ops if op[0] in (_INSERT_MESSAGE, _INSERT_PARTIAL))
        first = not isinstance(self.error, StoreFull)
        err = StoreFull(f"store {self.path} cannot write ({e}): messages are answered "
                        "452 4.3.1 until it can")
        self._failed.update(dict.fromkeys(failed, err))
        while len(self._failed) > HOLD_MAX:  # the oldest refusals were answered long ago
            del self._failed[next(iter(self._failed))]
        self.error = err
        if first:
            self._tell(str(err))
        self._prune_due = bool(self.retention)
        return err

    def _prune(self, conn: sqlite3.Connection) -> bool:
        """One step of retention, its own short transaction. True: more is due."""
        try:
            conn.execute("BEGIN")
            messages, sessions = rt.step(conn, self.retention)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._prune_due = False
            if not _disk_trouble(e):
                self.error = e
            return False
        self.pruned += messages
        n = messages + sessions
        self._prune_due = n > 0
        if not n:
            self._prune_at = time.monotonic() + PRUNE_EVERY
        return n > 0

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
        self._put("UPDATE messages SET analysis = ?, is_ndr = ? WHERE id = ?",
                  (text, int(is_ndr), mid))
        self._put("DELETE FROM analysis_queue WHERE message_id = ?", (mid,))

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
                zone_id = self._zones[text] = self._next_zone
                self._next_zone += 1
                self._put("INSERT OR IGNORE INTO zones (id, json) VALUES (?, ?)",
                          (zone_id, text))
        op = (_QUEUE_JOB, (mid, client_ip, helo, hostname, zone_id), False)
        if mid in self._in_pieces:
            self._pieces.append(op)  # after the message's last piece
        else:
            self._submit(op)

    def clear(self) -> None:
        """Forget everything captured (queued like any write; IDs keep counting)."""
        for table in ("events", "attempts", "relays", "analysis_queue", "message_parts",
                      "messages", "sessions"):
            self._put(f"DELETE FROM {table}", ())

    def _commit(self, conn: sqlite3.Connection, ops: list[Any]) -> None:
        conn.execute("BEGIN")
        for sql, rows in _grouped(ops):
            if sql == _PART:  # a megabyte each: one statement each
                for part in rows:
                    conn.execute(sql, part)
            elif len(rows) > 1 and sql.startswith("INSERT"):
                _insert_many(conn, sql, rows)
            else:
                conn.executemany(sql, rows)
        conn.execute("COMMIT")
        self.commits += 1

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve writes from `loop` (call it on the loop): what its thread
        writes during one turn of the loop reaches the writer thread as one
        item, handed over at the end of the turn (a wake-up of the writer
        per write was a good part of the CPU under load); what other threads
        write goes through the loop too, in order with it."""
        self._loop, self._loop_thread = loop, threading.get_ident()

    def _put(self, sql: str, params: Sequence[Any], many: bool = False) -> None:
        self._submit((sql, params, many))

    def _submit(self, item: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            self._gather(item)
            return
        loop = self._loop
        if loop is not None and loop.is_running():
            try:
                loop.call_soon_threadsafe(self._gather, item)
                return
            except RuntimeError:  # the loop closed meanwhile
                pass
        self._queue.put(item)

    def _gather(self, item: Any) -> None:
        self._pending.append(item)
        if not self._handing_over:
            self._handing_over = True
            assert self._loop is not None
            self._loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        self._handing_over = False
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
        (`vacuum`) give the freed space back to the file system; blocks (not
        for the loop). Returns the messages deleted since the store was
        opened (what is due is pruned at once when it opens)."""
        done = threading.Event()
        result: list[int] = []
        self._queue.put(_PruneAll(vacuum, done, result))
        done.wait(timeout)
        return result[0] if result else 0

    # -- writes (non-blocking: safe on the event loop) ---------------------

    def session_started(self, *, listener: str, peer_ip: str, peer_port: int,
                        scenario: str, t: float | None = None) -> int:
        sid = self._next_session
        self._next_session += 1
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
        self._put(f"UPDATE sessions SET {cols} WHERE id = ?", (*fields.values(), sid))

    def transcript(self, lines: Sequence[TranscriptLine]) -> None:
        """Transcript lines, as the session made them (any sessions')."""
        self._put("INSERT INTO events (session_id, t, direction, phase, text, rule)"
                  " VALUES (?, ?, ?, ?, ?, ?)", lines, True)

    def attempt(self, record: AttemptRecord) -> int:
        aid = self._next_attempt
        self._next_attempt += 1
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
        """Queue a message; pair it with `barrier()` before answering 250.

        A message over CHUNK bytes is written in parts (message_parts), in a
        lane of their own that the writer takes about BATCH_BYTES of per
        commit: the row first, marked partial, then the parts (views of the
        caller's buffer, not copies), then the mark removed. Other sessions'
        commits go on in between; a crash leaves a partial row, never
        acknowledged, that the next open removes."""
        mid = self._next_message
        self._next_message += 1
        body = draft.raw
        big = len(body) > CHUNK
        row = (mid, draft.session_id, draft.t, draft.mail_from,
               _json_strings(draft.rcpt_tos), _json_strings(draft.mail_options),
               _json_strings(draft.rcpt_options), json.dumps(draft.dsn) if draft.dsn else "{}",
               len(body), draft.subject, draft.message_id)
        if not big:
            self._put(_INSERT_MESSAGE, (*row, body.whole()))
            return mid
        lane = self._pieces
        lane.append((_INSERT_PARTIAL, (*row, b""), False))
        seq = 0
        for part in body.parts:  # views of the caller's parts, at most CHUNK each
            view = memoryview(part)
            for offset in range(0, len(view), CHUNK):
                lane.append((_PART, (mid, seq, view[offset:offset + CHUNK]), False))
                seq += 1
        lane.append((_UNMARK, (mid,), False))
        self._in_pieces.add(mid)
        self._queue.put(_PIECES)  # wakes the writer
        return mid

    def writes_in_pieces(self, mid: int) -> bool:
        """Message `mid` is large and not all written yet."""
        return mid in self._in_pieces

    def durable(self, mid: int) -> asyncio.Future[None]:
        """A future that resolves once message `mid` is committed: for a large
        one, when its last piece is; otherwise with everything queued so far
        (`barrier`)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if mid not in self._in_pieces:
            self._submit(_Barrier(loop, fut, mid))
        else:
            self._pieces.append(_Barrier(loop, fut, mid))
            self._queue.put(_PIECES)
        return fut


class Reader:
    """Queries over a store, from any thread or process (read-only)."""

    def __init__(self, path: str | Path = DEFAULT_PATH) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no store at {self.path} (run harness serve first, "
                             "or give --store PATH)")
        try:
            self.conn = _connect(self.path, readonly=True)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute("SELECT 1 FROM sessions LIMIT 1")
            columns = {r[1] for r in self.conn.execute("PRAGMA table_info(messages)")}
            # a large message still being written is not there yet
            self._whole = "partial IS NULL" if "partial" in columns else "1"
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot read store {self.path}: {e}") from e

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _session(self, row: sqlite3.Row) -> SessionRecord:
        d = dict(row)
        for key, empty in (("extensions", {}), ("mail_from", []), ("rcpt_tos", [])):
            d[key] = json.loads(d[key]) if d.get(key) else empty
        return SessionRecord(**d)

    def sessions(self, *, limit: int | None = None, session_ids: Sequence[int] | None = None,
                 with_events: bool = False) -> list[SessionRecord]:
        sql = "SELECT * FROM sessions"
        params: list[Any] = []
        if session_ids is not None:
            sql += f" WHERE id IN ({','.join('?' * len(session_ids))})"
            params.extend(session_ids)
        sql += " ORDER BY id DESC"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        out = [self._session(r) for r in self.conn.execute(sql, params)]
        out.reverse()
        if not out:
            return out
        ids = [s.id for s in out]
        by_id = {s.id: s for s in out}
        marks = ",".join("?" * len(ids))
        for r in self.conn.execute(
            f"SELECT id, session_id FROM messages WHERE session_id IN ({marks}) ORDER BY id",
                ids):
            by_id[r["session_id"]].message_ids.append(r["id"])
        if with_events:
            for r in self.conn.execute(
                f"SELECT session_id, t, direction, phase, text, rule FROM events"
                f" WHERE session_id IN ({marks}) ORDER BY id", ids):
                by_id[r["session_id"]].events.append(TranscriptLine(*r))
        return out

    def session(self, sid: int) -> SessionRecord | None:
        found = self.sessions(session_ids=[sid], with_events=True)
        return found[0] if found else None

    def _message(self, row: sqlite3.Row) -> MessageRecord:
        d = dict(row)
        d.pop("partial", None)
        if "raw" in d and d["raw"] is not None and not d["raw"] and d["size"] > CHUNK:
            d["raw"] = self.raw(d["id"])
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
                 ndr: bool | None = None) -> list[MessageRecord]:
        cols = "*" if raw else ("id, session_id, received_at, mail_from, rcpt_tos, mail_options,"
                                " rcpt_options, dsn, size, subject, message_id, is_ndr, analysis")
        sql = f"SELECT {cols} FROM messages"
        where: list[str] = [self._whole]
        params: list[Any] = []
        if rcpt is not None:
            where.append("EXISTS (SELECT 1 FROM json_each(rcpt_tos) WHERE lower(value) = ?)")
            params.append(rcpt.lower())
        if session_id is not None:
            where.append("session_id = ?")
            params.append(session_id)
        if ndr is not None:
            where.append("is_ndr = ?" if ndr else "(is_ndr = 0 OR is_ndr IS NULL)")
            if ndr:
                params.append(1)
        sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC"
        if limit:
            sql += " LIMIT ?"
            params.append(limit)
        out = [self._message(r) for r in self.conn.execute(sql, params)]
        out.reverse()
        return out

    def raw(self, mid: int, limit: int | None = None) -> bytes:
        """A message's bytes as received (or its first `limit` bytes)."""
        row = self.conn.execute(
            "SELECT size, raw FROM messages WHERE id = ?" if limit is None else
            "SELECT size, substr(raw, 1, ?) FROM messages WHERE id = ?",
            (mid,) if limit is None else (limit, mid)).fetchone()
        if row is None:
            return b""
        size, raw = row
        if raw or size <= CHUNK:
            return bytes(raw or b"")[:limit] if limit else bytes(raw or b"")
        out = bytearray()
        for (data,) in self.conn.execute(
                "SELECT data FROM message_parts WHERE message_id = ? ORDER BY seq", (mid,)):
            out += data
            if limit and len(out) >= limit:
                return bytes(out[:limit])
        return bytes(out)

    def message(self, mid: int) -> MessageRecord | None:
        row = self.conn.execute(f"SELECT * FROM messages WHERE id = ? AND {self._whole}",
                                (mid,)).fetchone()
        return self._message(row) if row else None

    def relays(self, message_id: int | None = None) -> list[Relay]:
        """What handlers (forwards) did with stored messages, oldest first."""
        sql = "SELECT message_id, session_id, t, handler, ok, status FROM relays"
        params: list[Any] = []
        if message_id is not None:
            sql += " WHERE message_id = ?"
            params.append(message_id)
        try:
            rows = self.conn.execute(sql + " ORDER BY id", params).fetchall()
        except sqlite3.OperationalError:  # a store from before relays, never served since
            return []
        return [Relay(r[0], r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]

    def attempts(self, *, rcpt: str | None = None, mail_from: str | None = None
                 ) -> list[Attempt]:
        sql = "SELECT * FROM attempts"
        where: list[str] = []
        params: list[Any] = []
        if rcpt is not None:
            where.append("lower(rcpt) = ?")
            params.append(rcpt.lower())
        if mail_from is not None:
            where.append("lower(mail_from) = ?")
            params.append(mail_from.lower())
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY t, id"
        out = [Attempt(**dict(r)) for r in self.conn.execute(sql, params)]
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
            return [r[0] for r in self.conn.execute(
                "SELECT message_id FROM analysis_queue ORDER BY message_id")]
        except sqlite3.OperationalError:  # a store from before the queue, never served since
            return [r[0] for r in self.conn.execute(
                "SELECT id FROM messages WHERE analysis IS NULL ORDER BY id")]

    def usage(self) -> dict[str, int]:
        """Bytes: the database file, its write-ahead log, the pages in use
        (the rest of the file is free pages, reused before it grows)."""
        wal = Path(f"{self.path}-wal")
        return {"file_bytes": self.path.stat().st_size,
                "wal_bytes": wal.stat().st_size if wal.exists() else 0,
                "used_bytes": rt.used_bytes(self.conn)}

    def counts(self, tables: Sequence[str] = ("sessions", "messages", "attempts", "events")
               ) -> dict[str, int]:
        return {t: self.conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                for t in tables}


def _insert_many(conn: sqlite3.Connection, sql: str, rows: list[Any]) -> None:
    """INSERT many rows with a few multi-row statements (INSERT ... VALUES
    (...), (...), ...) in chunks of a power of two: sqlite3 lets go of the
    interpreter lock around every statement it steps, and with the event
    loop's thread waiting for it each of those was a thread switch (a
    tenth of the CPU under load with executemany, one step per row)."""
    head, _, one = sql.partition(" VALUES ")
    i = 0
    while i < len(rows):
        n = 1 << min((len(rows) - i).bit_length() - 1, 6)  # 64 rows at most
        chunk = rows[i:i + n]
        conn.execute(f"{head} VALUES {', '.join([one] * n)}",
                     [v for row in chunk for v in row])
        i += n


def _grouped(ops: list[tuple[str, Any, bool]]) -> Iterator[tuple[str, list[Any]]]:
    """The rows of a commit's INSERTs gathered per statement (one
    executemany each, not one call per row), in the order each statement
    first appears; any other statement (an UPDATE, a DELETE) is a fence that
    everything queued before it passes first."""
    groups: dict[str, list[Any]] = {}
    for sql, params, many in ops:
        if not sql.startswith("INSERT"):
            yield from groups.items()
            groups = {}
            yield sql, [params] if not many else list(params)
            continue
        rows = groups.get(sql)
        if rows is None:
            rows = groups[sql] = []
        if many:
            rows.extend(params)
        else:
            rows.append(params)
    yield from groups.items()


def _text(value: Any) -> Any:
    """A str SQLite can store: lone surrogates (from bytes a client sent that
    are not UTF-8) become backslash escapes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _storable(op: tuple[str, Any, bool]) -> tuple[str, Any, bool]:
    sql, params, many = op
    if many:
        return sql, [tuple(_text(v) for v in row) for row in params], many
    return sql, tuple(_text(v) for v in params), many
