"""How the store speaks to its database: SQLite (embedded, the default) or
PostgreSQL (psycopg 3: several writers, several hosts).

db.py, retention.py, bounces.py and the analysis worker write their SQL
once: `?` for parameters, ON CONFLICT for upserts (SQLite has it since
3.24), and in the schema a few tokens ({pk}, {serial}, {real}, {blob},
{bigint}) for the column types the two spell differently. A `Dialect` turns
that into what its database takes and keeps everything else that differs:
how to connect for each role, SQLite's pragmas, id blocks (a counters table
in SQLite, sequences in PostgreSQL), owner locks (a flock'ed file per owner
beside an SQLite file, an advisory lock per owner in PostgreSQL) that say
which writer or analysis worker is still alive, sizes, VACUUM, and which
errors mean "the store cannot write" (452 4.3.1) rather than "a bad row".

Everything here blocks: it runs in the store's writer thread, in reader
threads and in the analysis worker, never on an event loop."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from harness.errors import StoreError
from harness.store import Location, display, is_postgres

Role = Literal["writer", "reader", "worker"]

#: the tables whose ids the writer hands out itself (not the database)
ID_TABLES = ("sessions", "messages", "attempts", "zones")

#: every table of ours (sizes, VACUUM)
TABLES = ("sessions", "events", "lines", "messages", "attempts", "relays", "analysis_queue",
          "analyses", "message_parts", "zones", "health", "bounces")

#: owner tokens start here; 1 marks a large message being written by a
#: single (unshared) writer, and stores of older versions
FIRST_OWNER = 2

#: the first key of PostgreSQL advisory locks held by owners ("HARS")
ADVISORY_NS = 0x48415253


class Db:
    """A connection and its dialect: SQL with `?` parameters, as db.py
    writes it, sent as the database wants it."""

    def __init__(self, dialect: Dialect, raw: Any) -> None:
        self.dialect = dialect
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.raw.execute(self.dialect.sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        if self.dialect.postgres:
            with self.raw.cursor() as cur:
                cur.executemany(self.dialect.sql(sql), rows)
        else:
            self.raw.executemany(sql, rows)

    def pipeline(self) -> contextlib.AbstractContextManager[Any]:
        """PostgreSQL: the statements inside are sent without waiting for
        each one's answer (psycopg's pipeline mode), answered together at
        the end: a commit of a hundred statements is one round trip, not a
        hundred (each a wake-up of the writer thread, which then waits for
        the interpreter lock the event loop holds). SQLite: as they come."""
        if self.dialect.postgres:
            return cast(contextlib.AbstractContextManager[Any], self.raw.pipeline())
        return contextlib.nullcontext()

    def begin(self) -> None:
        # SQLite: take the write lock at once (a transaction that reads
        # first and writes later can fail at once, busy, when another
        # connection wrote in between; several writers or the analysis
        # worker's claims are such connections)
        self.raw.execute("BEGIN" if self.dialect.postgres else "BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.raw.execute("COMMIT")

    def rollback(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.execute("ROLLBACK")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.execute(sql, params).fetchone()
        return None if row is None else row[0]


class Owner:
    """A writer's or worker's token, and the lock that says it is alive."""

    def __init__(self, token: int, fd: int | None = None) -> None:
        self.token = token
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Dialect(ABC):
    name: str
    postgres: bool
    #: the driver's base error class
    Error: type[Exception]
    #: added to a claim's inner SELECT (PostgreSQL: other workers' claims
    #: under way are passed over, not waited for)
    claim_lock = ""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.display = display(location)
        self._sql: dict[str, str] = {}

    def sql(self, text: str) -> str:
        return text

    @abstractmethod
    def connect(self, role: Role) -> Db: ...

    @abstractmethod
    def schema(self) -> list[str]: ...

    @abstractmethod
    def apply_schema(self, db: Db, statements: list[str]) -> None: ...

    def schema_lock(self, db: Db) -> contextlib.AbstractContextManager[None]:
        """While held, no other writer makes or changes the tables."""
        return contextlib.nullcontext()

    def schema_ready(self, db: Db, version: int) -> bool:
        """The tables are there, of this version: nothing to make."""
        return False

    def mark_schema(self, db: Db, version: int) -> None:
        """Write down that the tables are of this version."""
        return None

    @abstractmethod
    def columns(self, db: Db, table: str) -> set[str]: ...

    @abstractmethod
    def disk_trouble(self, e: BaseException) -> bool:
        """The store cannot write for want of space, of a writable file or
        server, of rights: not the data's fault."""

    def lost(self, e: BaseException) -> bool:
        """The connection to the store is gone (a server restarted, a
        network cut)."""
        return False

    def transient(self, e: BaseException) -> bool:
        """Another writer got in the way (a deadlock, a lock wait cut
        short): the same work may simply be done again later."""
        return False

    @abstractmethod
    def missing_table(self, e: BaseException) -> bool: ...

    @abstractmethod
    def rcpt_match(self) -> str:
        """A condition: one of a message's recipients (rcpt_tos, a JSON
        list) is `?` (lower-case)."""

    @abstractmethod
    def usage(self, db: Db) -> dict[str, int]: ...

    @abstractmethod
    def used_bytes(self, db: Db) -> int: ...

    @abstractmethod
    def reserve(self, db: Db, wants: dict[str, int]) -> dict[str, list[int]]:
        """Ids for the tables named, as many as asked for each: reserved
        in the database, never handed out to another writer."""

    def init_counters(self, db: Db) -> None:
        """Make the id reservations start above what a store already holds."""
        return None

    @abstractmethod
    def take_owner(self, db: Db) -> Owner: ...

    def retake_owner(self, db: Db, owner: Owner) -> None:
        """After a reconnection: the owner's lock again."""
        return None

    def release_owner(self, owner: Owner) -> None:
        """The owner is done (its connection closed first)."""
        owner.release()

    @abstractmethod
    def live_owners(self, db: Db, tokens: Iterable[int]) -> set[int]: ...

    def prune_lock(self, db: Db) -> bool:
        """In a transaction: True when this writer may prune now (one
        writer at a time)."""
        return True

    @abstractmethod
    def vacuum(self, db: Db) -> None: ...

    @abstractmethod
    def exists(self) -> bool: ...


# ---------------------------------------------------------------- SQLite

class SQLite(Dialect):
    name = "sqlite"
    postgres = False
    Error = sqlite3.Error
    TYPES = {"pk": "INTEGER PRIMARY KEY", "serial": "INTEGER PRIMARY KEY", "real": "REAL",
             "blob": "BLOB", "bigint": "INTEGER"}
    #: SQLite's result codes (and their extended forms) for a store that
    #: cannot write for want of space or of a writable file
    DISK_TROUBLE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        self.path = Path(location)
        self.owners_dir = Path(f"{self.path}.owners")

    def exists(self) -> bool:
        return self.path.exists()

    def connect(self, role: Role) -> Db:
        if role == "reader":
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                   check_same_thread=False)
        else:
            # (the writer's multi-row INSERTs come in every row count up to
            # 64 for each table: kept prepared, not prepared again)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   cached_statements=1024)
        conn.execute("PRAGMA busy_timeout = 10000")
        if role == "worker":  # its claims need not be on disk before the next commit's
            conn.execute("PRAGMA synchronous = OFF")
        return Db(self, conn)

    def schema(self) -> list[str]:
        from harness.store.bounces import TABLE, TRIGGERS
        from harness.store.db import SCHEMA

        text = (SCHEMA + TABLE).format(**self.TYPES)
        out = [s.strip() for s in text.split(";\n") if s.strip()]
        out.append("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY,"
                   " next INTEGER NOT NULL)")
        out += TRIGGERS["sqlite"]
        return out

    def apply_schema(self, db: Db, statements: list[str]) -> None:
        db.raw.executescript(";\n".join(statements) + ";")

    def columns(self, db: Db, table: str) -> set[str]:
        return {r[1] for r in db.execute(f"PRAGMA table_info({table})")}

    def disk_trouble(self, e: BaseException) -> bool:
        return (isinstance(e, sqlite3.OperationalError)
                and str(getattr(e, "sqlite_errorname", "")).startswith(self.DISK_TROUBLE))

    def missing_table(self, e: BaseException) -> bool:
        return isinstance(e, sqlite3.OperationalError) and "no such" in str(e)

    def rcpt_match(self) -> str:
        return "EXISTS (SELECT 1 FROM json_each(rcpt_tos) WHERE lower(value) = ?)"

    def usage(self, db: Db) -> dict[str, int]:
        """Bytes: the database file, its write-ahead log, the pages in use
        (the rest of the file is free pages, reused before it grows)."""
        wal = Path(f"{self.path}-wal")
        return {"file_bytes": self.path.stat().st_size,
                "wal_bytes": wal.stat().st_size if wal.exists() else 0,
                "used_bytes": self.used_bytes(db)}

    def used_bytes(self, db: Db) -> int:
        page_size = db.one("PRAGMA page_size")
        pages = db.one("PRAGMA page_count")
        free = db.one("PRAGMA freelist_count")
        return int((pages - free) * page_size)

    def init_counters(self, db: Db) -> None:
        db.execute("INSERT INTO counters (name, next) VALUES ('owners', ?)"
                   " ON CONFLICT (name) DO NOTHING", (FIRST_OWNER,))
        for table in ID_TABLES:
            db.execute(f"INSERT INTO counters (name, next) SELECT '{table}',"
                       f" COALESCE(MAX(id), 0) + 1 FROM {table} WHERE true"
                       " ON CONFLICT (name) DO UPDATE SET next = max(next, excluded.next)")

    def reserve(self, db: Db, wants: dict[str, int]) -> dict[str, list[int]]:
        out = {}
        for table, n in wants.items():
            top = db.one("UPDATE counters SET next = next + ? WHERE name = ? RETURNING next",
                         (n, table))
            out[table] = list(range(top - n, top))
        return out

    def take_owner(self, db: Db) -> Owner:
        db.begin()
        try:
            self.init_counters(db)
            token = db.one("UPDATE counters SET next = next + 1 WHERE name = 'owners'"
                           " RETURNING next - 1")
            db.commit()
        except BaseException:
            db.rollback()
            raise
        self.owners_dir.mkdir(exist_ok=True)
        fd = os.open(self.owners_dir / str(token), os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return Owner(int(token), fd)

    def release_owner(self, owner: Owner) -> None:
        owner.release()
        with contextlib.suppress(OSError):  # gone for good: its file goes
            (self.owners_dir / str(owner.token)).unlink()

    def live_owners(self, db: Db, tokens: Iterable[int]) -> set[int]:
        """An owner is alive while its file is locked (by its process: a
        killed process's locks go with it)."""
        live = set()
        for token in tokens:
            path = self.owners_dir / str(token)
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue  # never made, or found dead before
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                live.add(token)
            else:  # dead: its file goes
                with contextlib.suppress(OSError):
                    path.unlink()
            finally:
                os.close(fd)
        return live

    def vacuum(self, db: Db) -> None:
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


# ------------------------------------------------------------ PostgreSQL

def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as e:
        raise StoreError("a postgresql:// store needs psycopg 3: "
                         "pip install 'smtp-harness[postgres]'") from e
    return psycopg


class _Row(tuple[Any, ...]):
    """A row read by name or position, as sqlite3.Row is."""

    names: tuple[str, ...] = ()
    positions: dict[str, int] = {}

    def keys(self) -> tuple[str, ...]:
        return self.names

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self.positions[key])
        return tuple.__getitem__(self, key)


_ROW_TYPES: dict[tuple[str, ...], type[_Row]] = {}


def _row_factory(cursor: Any) -> Any:
    names = tuple(d.name for d in cursor.description or ())
    kind = _ROW_TYPES.get(names)
    if kind is None:
        kind = _ROW_TYPES[names] = type("Row", (_Row,), {
            "names": names, "positions": {n: i for i, n in enumerate(names)}})
    return kind


class Postgres(Dialect):
    name = "postgresql"
    postgres = True
    claim_lock = " FOR UPDATE SKIP LOCKED"
    TYPES = {"pk": "BIGINT PRIMARY KEY",
             "serial": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
             "real": "DOUBLE PRECISION", "blob": "BYTEA", "bigint": "BIGINT"}
    #: SQLSTATE classes and codes for a server that cannot take our
    #: writes: 53 insufficient resources (a full disk, memory, too many
    #: connections), 58 system errors (I/O), 25006 a read-only
    #: transaction (a standby, default_transaction_read_only), 42501 no
    #: right to write, 57P03 a server starting or stopping
    DISK_TROUBLE = ("53", "58", "25006", "42501", "57P03")
    #: the connection is gone: 08 connection exceptions, 57P01/57P02 the
    #: server shut down or crashed
    LOST = ("08", "57P01", "57P02")
    #: another writer was in the way: 40 deadlocks and serialization,
    #: 55P03 a lock not available
    TRANSIENT = ("40", "55P03")

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        self.psycopg = _psycopg()
        self.Error = self.psycopg.Error

    def exists(self) -> bool:
        return True  # whether it holds a store is found when it is read

    def sql(self, text: str) -> str:
        out = self._sql.get(text)
        if out is None:
            out = self._sql[text] = text.replace("%", "%%").replace("?", "%s")
        return out

    def connect(self, role: Role) -> Db:
        psycopg = self.psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            given = conninfo_to_dict(str(self.location))
        except psycopg.ProgrammingError as e:
            raise StoreError(f"bad store URL {self.display}: {_first_line(e)}") from None
        # ours first, so that the URL's own settings win
        params: dict[str, Any] = {"application_name": f"harness-{role}",
                                  "connect_timeout": 10, "keepalives": 1,
                                  "keepalives_idle": 30, **given}
        if role == "reader":
            params["options"] = (str(given.get("options", "")) +
                                 " -c default_transaction_read_only=on").strip()
        try:
            conn = psycopg.connect(autocommit=True, **params)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to store {self.display}: "
                             f"{_first_line(e)}") from None
        if role == "reader":
            conn.row_factory = _row_factory
        return Db(self, conn)

    def schema(self) -> list[str]:
        from harness.store.bounces import TABLE, TRIGGERS
        from harness.store.db import SCHEMA

        text = (SCHEMA + TABLE).format(**self.TYPES)
        out = [s.strip() for s in text.split(";\n") if s.strip()]
        out += [f"CREATE SEQUENCE IF NOT EXISTS harness_ids_{t}" for t in ID_TABLES]
        out.append(f"CREATE SEQUENCE IF NOT EXISTS harness_owners START {FIRST_OWNER}")
        out += TRIGGERS["postgresql"]
        return out

    @contextlib.contextmanager
    def _schema_lock(self, db: Db) -> Iterator[None]:
        # one writer at a time makes the tables (CREATE ... IF NOT EXISTS
        # racing another is an error in PostgreSQL); each statement is its
        # own transaction, holding no lock while it waits for the next
        db.raw.execute("SELECT pg_advisory_lock(%s, 0)", (ADVISORY_NS,))
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                db.raw.execute("SELECT pg_advisory_unlock(%s, 0)", (ADVISORY_NS,))

    def schema_lock(self, db: Db) -> contextlib.AbstractContextManager[None]:
        return self._schema_lock(db)

    @staticmethod
    def _mark(version: int) -> str:
        return f"SMTP Harness capture store, schema {version}"

    def schema_ready(self, db: Db, version: int) -> bool:
        row = db.raw.execute(
            "SELECT obj_description(to_regclass('sessions'), 'pg_class')").fetchone()
        return bool(row and row[0] == self._mark(version))

    def mark_schema(self, db: Db, version: int) -> None:
        db.raw.execute(f"COMMENT ON TABLE sessions IS '{self._mark(version)}'")

    def apply_schema(self, db: Db, statements: list[str]) -> None:
        for statement in statements:
            db.raw.execute(statement)

    def columns(self, db: Db, table: str) -> set[str]:
        return {r[0] for r in db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?"
            " AND table_schema = current_schema()", (table,))}

    @staticmethod
    def _state(e: BaseException) -> str:
        return str(getattr(e, "sqlstate", None) or "")

    def disk_trouble(self, e: BaseException) -> bool:
        return self._state(e).startswith(self.DISK_TROUBLE)

    def lost(self, e: BaseException) -> bool:
        if not isinstance(e, self.psycopg.Error):
            return False
        state = self._state(e)
        if state:
            return state.startswith(self.LOST)
        # no SQLSTATE: the client library's own "server closed the
        # connection", "connection is closed/lost", a timeout
        return isinstance(e, self.psycopg.OperationalError | self.psycopg.InterfaceError)

    def transient(self, e: BaseException) -> bool:
        return self._state(e).startswith(self.TRANSIENT)

    def missing_table(self, e: BaseException) -> bool:
        return self._state(e) in ("42P01", "42703")  # undefined table, column

    def rcpt_match(self) -> str:
        return ("EXISTS (SELECT 1 FROM json_array_elements_text(rcpt_tos::json) AS r(value)"
                " WHERE lower(r.value) = ?)")

    def used_bytes(self, db: Db) -> int:
        """pg_total_relation_size of our tables: their data, indexes and
        TOAST (large messages' bytes), including space VACUUM has marked
        free for reuse."""
        names = ", ".join(f"'{t}'" for t in TABLES)
        total = db.one(
            "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            f" WHERE n.nspname = current_schema() AND c.relkind = 'r' AND c.relname IN ({names})")
        return int(total)

    def usage(self, db: Db) -> dict[str, int]:
        used = self.used_bytes(db)
        return {"file_bytes": used, "wal_bytes": 0, "used_bytes": used}

    def reserve(self, db: Db, wants: dict[str, int]) -> dict[str, list[int]]:
        out = {}
        for table, n in wants.items():
            out[table] = [r[0] for r in db.raw.execute(
                f"SELECT nextval('harness_ids_{table}') FROM generate_series(1, %s)", (n,))]
        return out

    def take_owner(self, db: Db) -> Owner:
        token = int(db.raw.execute("SELECT nextval('harness_owners')").fetchone()[0])
        owner = Owner(token)
        self.retake_owner(db, owner)
        return owner

    def retake_owner(self, db: Db, owner: Owner) -> None:
        # held by this connection's session: gone when it is (a killed
        # process, a host that went away, a connection cut)
        db.raw.execute("SELECT pg_advisory_lock(%s, %s::integer)", (ADVISORY_NS, owner.token))

    def live_owners(self, db: Db, tokens: Iterable[int]) -> set[int]:
        wanted = set(tokens)
        if not wanted:
            return set()
        held = {int(r[0]) for r in db.raw.execute(
            "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
            " AND objsubid = 2 AND granted AND database ="
            " (SELECT oid FROM pg_database WHERE datname = current_database())",
            (ADVISORY_NS,))}
        return wanted & held

    def prune_lock(self, db: Db) -> bool:
        return bool(db.raw.execute("SELECT pg_try_advisory_xact_lock(%s, 1)",
                                   (ADVISORY_NS,)).fetchone()[0])

    def vacuum(self, db: Db) -> None:
        # plain VACUUM: the deleted rows' space is reused, and the empty
        # end of each table given back; it never locks out the writers
        # (VACUUM FULL would, for as long as it rewrites the tables)
        db.raw.execute("VACUUM (ANALYZE) " + ", ".join(TABLES))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def dialect(location: Location) -> Dialect:
    return Postgres(location) if is_postgres(location) else SQLite(location)
