"""The engine's book in a database, shared by every process that serves a
listener's scenario (see the package's docstring).

Each stateful decision is one transaction that first takes a lock all
processes share (SQLite: the database's write lock, BEGIN IMMEDIATE;
PostgreSQL: an advisory lock on the scenario's name), reads only the rows
the decision touches (lazily, as the engine asks for them), writes back the
ones it changed and commits: decisions are serialized exactly as one
engine's lock serializes them in one process. Decisions for one scenario
that wait together share one transaction (the lock taken once for the
lot), each made against the book as the one before left it. Commits need not reach the
disk before the reply (SQLite: synchronous=NORMAL in WAL mode; PostgreSQL:
synchronous_commit off): a process that dies loses nothing the others
read, only a crash of the machine (or of PostgreSQL) may forget the last
moments of greylisting, which costs a sender one more deferral.

All database work runs in one thread per process (never on the event
loop); callers get concurrent.futures.Future objects.

Connections open now are counted per process (owner), each owner beating
a heartbeat; an owner silent for STALE seconds (killed) stops counting,
and its rows are removed."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import queue
import socket
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, Generic, TypeVar

from harness.errors import HarnessError
from harness.scenario.engine import INITIAL_STATE, Decision, Engine, Event, SessionFacts

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS engine_state (
        ns TEXT NOT NULL,              -- the scenario's name
        kind TEXT NOT NULL,            -- attempt, first, conn, uses, bucket, state
        key TEXT NOT NULL,
        num DOUBLE PRECISION,
        num2 DOUBLE PRECISION,
        txt TEXT,
        PRIMARY KEY (ns, kind, key))""",
    """CREATE TABLE IF NOT EXISTS engine_open (  -- connections open now, per process
        ns TEXT NOT NULL,
        client TEXT NOT NULL,
        owner TEXT NOT NULL,
        n INTEGER NOT NULL,
        PRIMARY KEY (ns, client, owner))""",
    """CREATE TABLE IF NOT EXISTS engine_owners (
        owner TEXT PRIMARY KEY,
        seen DOUBLE PRECISION NOT NULL)""",
)

#: stateful decisions waiting together are made in one transaction, up to this many
DECISIONS_PER_TRANSACTION = 64
#: seconds between an owner's heartbeats; silent for STALE, it is gone
HEARTBEAT = 2.0
STALE = 5 * HEARTBEAT
#: a decision's transaction is tried again this many times when the
#: database says try again (a deadlock, a serialization failure, busy)
RETRIES = 5

_UPSERT = ("INSERT INTO engine_state (ns, kind, key, num, num2, txt) VALUES (?, ?, ?, ?, ?, ?)"
           " ON CONFLICT (ns, kind, key) DO UPDATE SET num = excluded.num,"
           " num2 = excluded.num2, txt = excluded.txt")
_GET = "SELECT num, num2, txt FROM engine_state WHERE ns = ? AND kind = ? AND key = ?"
_OPENED = ("INSERT INTO engine_open (ns, client, owner, n) VALUES (?, ?, ?, 1)"
           " ON CONFLICT (ns, client, owner) DO UPDATE SET n = engine_open.n + 1")
_ACTIVE = ("SELECT COALESCE(SUM(o.n), 0) FROM engine_open o JOIN engine_owners w"
           " ON w.owner = o.owner WHERE o.ns = ? AND w.seen > ?")
_SEP = "\x1f"  # joins a key's parts (never in an address or a phase name)


class StateError(HarnessError):
    """The shared state cannot be reached or written."""


# ------------------------------------------------------------------ dialects


class _Db:
    """One connection, its placeholder style, and how a decision's
    transaction takes the lock every process shares."""

    retryable: tuple[type[BaseException], ...] = ()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        raise NotImplementedError

    def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        raise NotImplementedError

    def begin(self, ns: str) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        with contextlib.suppress(Exception):
            self.execute("ROLLBACK")

    def close(self) -> None:
        raise NotImplementedError


class _Sqlite(_Db):
    retryable = (sqlite3.OperationalError,)  # "database is locked" past the busy timeout

    def __init__(self, path: Path) -> None:
        try:
            self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.conn.execute("PRAGMA busy_timeout = 30000")
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            for statement in SCHEMA:
                self.conn.execute(statement)
        except sqlite3.Error as e:
            raise StateError(f"cannot open the shared state {path}: {e}") from e

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.conn.execute(sql, params)

    def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        self.conn.executemany(sql, rows)

    def begin(self, ns: str) -> None:
        self.conn.execute("BEGIN IMMEDIATE")  # the write lock: one decision at a time

    def close(self) -> None:
        self.conn.close()


class _Postgres(_Db):
    def __init__(self, url: str) -> None:
        import psycopg

        self.retryable = (psycopg.errors.SerializationFailure,
                          psycopg.errors.DeadlockDetected)
        try:
            self.conn = psycopg.connect(url, autocommit=True)
            self.conn.execute("SET synchronous_commit = off")
            with self.conn.transaction():
                # one creator at a time (several hosts may start together)
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("schema"),))
                for statement in SCHEMA:
                    self.conn.execute(statement)
        except psycopg.Error as e:
            raise StateError(f"cannot open the shared state in PostgreSQL: {e}") from e

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), params)

    def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), rows)

    def begin(self, ns: str) -> None:
        self.conn.execute("BEGIN")
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(ns),))

    def close(self) -> None:
        self.conn.close()


def _lock_key(ns: str) -> int:
    """An advisory lock's 64-bit key for a scenario name."""
    return zlib.crc32(f"harness state {ns}".encode())


# ------------------------------------------------------------------ the book

K = TypeVar("K")
V = TypeVar("V")


class _Rows(MutableMapping[K, V], Generic[K, V]):
    """One kind of the book's rows, read as the engine asks for them and
    written back (the changed ones) when the decision commits."""

    def __init__(self, book: SharedBook, kind: str, encode: Callable[[K], str],
                 zero: V | None, read: Callable[[tuple[Any, ...]], V],
                 write: Callable[[V], tuple[float, float | None]]) -> None:
        self._book, self._kind, self._encode, self._zero = book, kind, encode, zero
        self._read, self._write = read, write
        self._cache: dict[K, V] = {}
        self._dirty: set[K] = set()

    def __getitem__(self, key: K) -> V:
        if key in self._cache:
            return self._cache[key]
        row = self._book.row(self._kind, self._encode(key))
        if row is None:
            if self._zero is None:
                raise KeyError(key)
            value = self._zero
        else:
            value = self._read(row)
        self._cache[key] = value
        return value

    def __setitem__(self, key: K, value: V) -> None:
        self._cache[key] = value
        self._dirty.add(key)

    def __delitem__(self, key: K) -> None:
        raise TypeError("the shared book forgets only by reset")

    def __iter__(self) -> Iterator[K]:
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)

    def changes(self) -> Iterator[tuple[str, str, float, float | None, None]]:
        for key in self._dirty:
            num, num2 = self._write(self._cache[key])
            yield self._kind, self._encode(key), num, num2, None


def _joined(key: tuple[str, ...]) -> str:
    return _SEP.join(key)


def _count(row: tuple[Any, ...]) -> int:
    return int(row[0] or 0)


def _one(value: int | float) -> tuple[float, None]:
    return float(value), None


class SharedBook:
    """The book of one decision, inside its transaction."""

    def __init__(self, db: _Db, ns: str, owner: str, now: float) -> None:
        self._db, self.ns, self.owner, self._now = db, ns, owner, now
        self.attempts: _Rows[tuple[str, str, str], int] = _Rows(
            self, "attempt", _joined, 0, _count, _one)
        self.first_seen: _Rows[tuple[str, str, str], float] = _Rows(
            self, "first", _joined, None, lambda r: float(r[0]), _one)
        self.connections: _Rows[str, int] = _Rows(self, "conn", str, 0, _count, _one)
        self.rule_uses: _Rows[str, int] = _Rows(self, "uses", str, 0, _count, _one)
        self.buckets: _Rows[str, tuple[float, float]] = _Rows(
            self, "bucket", str, None, lambda r: (float(r[0]), float(r[1])),
            lambda v: (v[0], v[1]))
        self._state: str | None = None
        self._state_changed = False

    def row(self, kind: str, key: str) -> tuple[Any, ...] | None:
        row = self._db.execute(_GET, (self.ns, kind, key)).fetchone()
        return None if row is None else tuple(row)

    @property
    def state(self) -> str:
        if self._state is None:
            row = self.row("state", "")
            self._state = row[2] if row is not None and row[2] else INITIAL_STATE
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        self._state_changed = True

    def opened(self, client: str) -> None:
        self._db.execute(_OPENED, (self.ns, client, self.owner))

    def closed(self, client: str) -> None:  # pragma: no cover - counted by SharedState.closed
        raise TypeError("a shared connection's closing is counted by SharedState.closed")

    def active(self, client: str | None = None) -> int:
        live = self._now - STALE
        if client is None:
            row = self._db.execute(_ACTIVE, (self.ns, live)).fetchone()
        else:
            row = self._db.execute(_ACTIVE + " AND o.client = ?", (self.ns, live, client)
                                   ).fetchone()
        return int(row[0])

    def flush(self) -> None:
        rows: list[tuple[Any, ...]] = []
        for rows_of in (self.attempts, self.first_seen, self.connections, self.rule_uses,
                        self.buckets):
            rows.extend((self.ns, *change) for change in rows_of.changes())
        if self._state_changed:
            rows.append((self.ns, "state", "", None, None, self._state))
        if rows:
            self._db.many(_UPSERT, rows)


# ---------------------------------------------------------------- the service


class SharedState:
    """The shared book of every scenario served from one store, reached
    from one thread of this process."""

    def __init__(self, connect: Callable[[], _Db], where: str) -> None:
        self.where = where
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self.errors: list[BaseException] = []
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(connect, opened),
                                        name="harness-state", daemon=True)
        self._thread.start()
        opened.result()  # a database that cannot be opened: said at start

    # -- the thread ---------------------------------------------------------

    def _run(self, connect: Callable[[], _Db],
             opened: concurrent.futures.Future[None]) -> None:
        try:
            db = connect()
            self._beat(db)
        except BaseException as e:
            opened.set_exception(e)
            return
        opened.set_result(None)
        due = time.monotonic() + HEARTBEAT
        try:
            while True:
                try:
                    job = self._jobs.get(timeout=max(0.0, due - time.monotonic()))
                except queue.Empty:
                    job = None
                if time.monotonic() >= due:
                    due = time.monotonic() + HEARTBEAT
                    try:
                        self._beat(db)
                    except Exception as e:  # the next beat tries again
                        self.errors.append(e)
                        db.rollback()
                while job is not None:
                    if job is _STOP:
                        self._leave(db)
                        return
                    fn, args, future = job
                    job = None
                    if fn == self._decide:
                        # the decisions waiting now, one transaction per
                        # scenario: the lock every process shares is taken
                        # once for all of them, not once each
                        batch = [(args, future)]
                        while len(batch) < DECISIONS_PER_TRANSACTION:
                            try:
                                job = self._jobs.get_nowait()
                            except queue.Empty:
                                break
                            if job is _STOP or job[0] != self._decide or job[1][0] != args[0]:
                                break
                            batch.append((job[1], job[2]))
                            job = None
                        self._decide_batch(db, batch)
                        continue
                    if not future.set_running_or_notify_cancel():
                        continue
                    try:
                        future.set_result(fn(db, *args))
                    except BaseException as e:
                        db.rollback()
                        future.set_exception(e)
        finally:
            db.close()

    def _submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(StateError("the shared state is closed"))
            return future
        self._jobs.put((fn, args, future))
        return future

    def _beat(self, db: _Db) -> None:
        """This owner is alive; owners silent too long are gone (their open
        connections stop counting)."""
        now = time.time()
        db.execute("BEGIN")
        db.execute("INSERT INTO engine_owners (owner, seen) VALUES (?, ?) ON CONFLICT (owner)"
                   " DO UPDATE SET seen = excluded.seen", (self.owner, now))
        db.execute("DELETE FROM engine_open WHERE owner IN"
                   " (SELECT owner FROM engine_owners WHERE seen < ?)", (now - STALE,))
        db.execute("DELETE FROM engine_owners WHERE seen < ?", (now - STALE,))
        db.commit()

    def _leave(self, db: _Db) -> None:
        with contextlib.suppress(Exception):
            db.execute("BEGIN")
            db.execute("DELETE FROM engine_open WHERE owner = ?", (self.owner,))
            db.execute("DELETE FROM engine_owners WHERE owner = ?", (self.owner,))
            db.commit()

    # -- what callers ask ----------------------------------------------------

    def decide(self, ns: str, engine: Engine, session: SessionFacts,
               event: Event) -> concurrent.futures.Future[Decision]:
        """The engine's decision for `event`, against the shared book."""
        return self._submit(self._decide, ns, engine, session, event)

    def _decide(self, db: _Db, ns: str, engine: Engine, session: SessionFacts,
                event: Event) -> Decision:
        conn = session.connection
        counted = conn.counted
        for attempt in range(RETRIES):
            try:
                db.begin(ns)
                book = SharedBook(db, ns, self.owner, time.time())
                decision = engine.decide_with(session, event, book)
                book.flush()
                db.commit()
                return decision
            except db.retryable:
                db.rollback()
                conn.counted = counted  # counted again on the next try
                if attempt == RETRIES - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _decide_batch(self, db: _Db, batch: list[tuple[tuple[Any, ...],
                                                    concurrent.futures.Future[Any]]]) -> None:
        """Decisions for one scenario, in the order asked, in one
        transaction: each against the book as the one before left it. If
        the batch fails (a decision raised), each is made again on its own,
        so only that one fails."""
        batch = [(a, f) for a, f in batch if f.set_running_or_notify_cancel()]
        if not batch:
            return
        if len(batch) > 1:
            ns = batch[0][0][0]
            counted = [a[2].connection.counted for a, _ in batch]
            for attempt in range(RETRIES):
                try:
                    db.begin(ns)
                    decisions = []
                    for (_, engine, session, event), _ in batch:
                        book = SharedBook(db, ns, self.owner, time.time())
                        decisions.append(engine.decide_with(session, event, book))
                        book.flush()
                    db.commit()
                except BaseException as e:
                    db.rollback()
                    for (a, _), c in zip(batch, counted, strict=True):
                        a[2].connection.counted = c  # counted again on the next try
                    if isinstance(e, db.retryable) and attempt < RETRIES - 1:
                        continue
                    break  # one by one below
                else:
                    for (_, future), decision in zip(batch, decisions, strict=True):
                        future.set_result(decision)
                    return
        for args, future in batch:
            try:
                future.set_result(self._decide(db, *args))
            except BaseException as e:
                db.rollback()
                future.set_exception(e)

    def closed(self, ns: str, client: str) -> concurrent.futures.Future[None]:
        """A connection counted in the shared book is closed."""
        return self._submit(self._closed_one, ns, client)

    def _closed_one(self, db: _Db, ns: str, client: str) -> None:
        db.execute("BEGIN")
        db.execute("UPDATE engine_open SET n = n - 1 WHERE ns = ? AND client = ? AND owner = ?",
                   (ns, client, self.owner))
        db.execute("DELETE FROM engine_open WHERE ns = ? AND client = ? AND owner = ?"
                   " AND n <= 0", (ns, client, self.owner))
        db.commit()

    def reset(self, ns: str) -> concurrent.futures.Future[None]:
        """Forget the scenario's counters, times, rule uses and state (the
        connections open now keep counting)."""
        return self._submit(self._reset, ns)

    def _reset(self, db: _Db, ns: str) -> None:
        db.begin(ns)
        db.execute("DELETE FROM engine_state WHERE ns = ?", (ns,))
        db.commit()

    def state(self, ns: str) -> concurrent.futures.Future[str]:
        """The scenario state as the shared book has it."""
        return self._submit(self._state, ns)

    def _state(self, db: _Db, ns: str) -> str:
        row = db.execute("SELECT txt FROM engine_state WHERE ns = ? AND kind = 'state'"
                         " AND key = ''", (ns,)).fetchone()
        return str(row[0]) if row is not None and row[0] else INITIAL_STATE

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(_STOP)
        self._thread.join(10)


_STOP = object()


def state_path(store: str | Path) -> Path:
    """Where workers on one host keep the shared state of a SQLite store:
    a file of its own beside it (its commits never wait behind the store's)."""
    return Path(f"{store}.state")


def open_shared(store: str | Path) -> SharedState:
    """The shared state of a store: tables in its PostgreSQL database, or a
    SQLite file beside a SQLite store."""
    text = str(store)
    if text.startswith(("postgresql://", "postgres://")):
        return SharedState(lambda: _Postgres(text), "PostgreSQL")
    path = state_path(store)
    return SharedState(lambda: _Sqlite(path), str(path))
