"""Retention: how much a long-running store keeps. The oldest messages and
the sessions they came in go first, in small steps the store's writer takes
between its commits (never one long transaction that would hold a 250
back):

- `keep`: the newest N messages;
- `keep_days`: nothing older than D days;
- `max_bytes`: the store's pages in use under SIZE (deleted pages are
  reused, so the file stops growing there; `harness prune --vacuum` gives
  the space back to the file system). The write-ahead log beside it comes
  on top: up to about 300 MB under sustained load, cut back when idle.
  PostgreSQL: pg_total_relation_size of the store's tables. A deleted
  row's space is not given back there but reused (once VACUUM has been
  through; the store asks for one after each such step), so the size
  counted is the tables' size less what retention deleted that new
  messages have not taken up yet (`Pruning`): the tables stop growing at
  about SIZE.

A session still open is never deleted (its messages may be, under `keep`
and `max_bytes`: a connection that sends forever must not keep everything);
nor is a message still being written or waiting for its analysis (whoever
waits for that analysis gets it; the message goes at a later step). What a
message leaves behind (its parts, its relays) goes with it.

The SQL is written once for SQLite and PostgreSQL (`?` parameters, through
the store's `Db`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.store.dialect import Db

#: rows deleted per step (a step is one short transaction)
STEP = 500


@dataclass(frozen=True)
class Retention:
    keep: int | None = None
    keep_days: float | None = None
    max_bytes: int | None = None

    def __bool__(self) -> bool:
        return any(x is not None for x in (self.keep, self.keep_days, self.max_bytes))

    def describe(self) -> str:
        parts = []
        if self.keep is not None:
            parts.append(f"the newest {self.keep:,} messages")
        if self.keep_days is not None:
            d = self.keep_days
            parts.append(f"the last {d:g} day{'' if d == 1 else 's'}")
        if self.max_bytes is not None:
            n = self.max_bytes
            parts.append(f"under {n / 1e9:,.3g} GB" if n >= 1e9 else f"under {n / 1e6:,.3g} MB")
        return "keeps " + ", ".join(parts) if parts else "keeps everything"


@dataclass
class Pruning:
    """What a writer's retention remembers between steps (PostgreSQL's
    max_bytes): bytes it deleted that new messages have not reused yet
    (`credit`), the highest message id seen, and whether a VACUUM is due
    (deleted rows' space is reused only after one)."""

    credit: int = 0
    last_id: int | None = None
    vacuum_due: bool = False
    deleted: list[int] = field(default_factory=list)  # (for the tests: bytes per step)


def used_bytes(db: Db) -> int:
    """Bytes of the store's data in use (SQLite: its file, less the free
    pages; PostgreSQL: its tables' total relation size)."""
    return db.dialect.used_bytes(db)


def _delete_messages(db: Db, below: int, want: int | None = None) -> tuple[int, int]:
    """The oldest messages with an id under `below`, up to STEP of them (or,
    `want` given, as many as it takes to free about that many bytes): how
    many, and their bytes."""
    ids = []
    freed = 0
    for mid, size in db.execute(
            "SELECT id, size FROM messages WHERE id < ? AND partial IS NULL AND id NOT IN"
            f" (SELECT message_id FROM analysis_queue) ORDER BY id LIMIT {STEP}", (below,)):
        ids.append(mid)
        freed += size
        if want is not None and freed >= want:
            break
    if not ids:
        return 0, 0
    marks = ",".join("?" * len(ids))
    for table, column in (("message_parts", "message_id"), ("relays", "message_id"),
                          ("analyses", "message_id")):
        db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)
    db.execute(f"DELETE FROM messages WHERE id IN ({marks})", ids)
    return len(ids), freed


def _delete_sessions(db: Db, below: int) -> int:
    """Ended sessions with an id under `below` (no message is left of
    them: messages go first), up to STEP of them; their transcripts,
    attempts, relays and bounces with them."""
    ids = [r[0] for r in db.execute(
        f"SELECT id FROM sessions WHERE id < ? AND ended_at IS NOT NULL ORDER BY id"
        f" LIMIT {STEP}", (below,))]
    if not ids:
        return 0
    marks = ",".join("?" * len(ids))
    for table in ("events", "lines", "attempts", "relays"):
        db.execute(f"DELETE FROM {table} WHERE session_id IN ({marks})", ids)
    db.execute(f"DELETE FROM sessions WHERE id IN ({marks})", ids)  # bounces: a trigger
    return len(ids)


def _first(db: Db, sql: str, params: tuple[object, ...] = ()) -> int | None:
    row = db.execute(sql, params).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _oldest_kept_session(db: Db) -> int:
    """Sessions under this id have no message left."""
    oldest = _first(db, "SELECT MIN(session_id) FROM messages")
    if oldest is None:  # no message left: every ended session may go
        return (_first(db, "SELECT MAX(id) FROM sessions") or 0) + 1
    return oldest


def step(db: Db, policy: Retention, now: float | None = None, *, exact: bool = False,
         pruning: Pruning | None = None) -> tuple[int, int]:
    """One step of pruning: (messages, sessions) deleted, (0, 0) when
    nothing is due. The caller commits; it calls again while anything was.

    Ids grow with time (a session's when it starts, a message's when it is
    stored), so "older than" is "an id under the first one that is not":
    found from the oldest rows up, a short walk over what is due, never a
    scan of the whole store. `exact`: ids have gaps (a shared store's
    writers reserve them in blocks), so the newest N are counted down
    from the top instead of subtracted from the highest id. `pruning`:
    the writer's memory between steps (PostgreSQL's sizes need it)."""
    now = time.time() if now is None else now
    messages = sessions = 0
    if policy.keep_days is not None:
        cutoff = now - policy.keep_days * 86400
        first_new = _first(db, "SELECT id FROM messages WHERE received_at >= ? ORDER BY id"
                                 " LIMIT 1", (cutoff,))
        messages += _delete_messages(db, first_new if first_new is not None else 1 << 62)[0]
        first_new = _first(db, "SELECT id FROM sessions WHERE started_at >= ? ORDER BY id"
                                 " LIMIT 1", (cutoff,))
        sessions += _delete_sessions(db, min(first_new if first_new is not None else 1 << 62,
                                               _oldest_kept_session(db)))
    if policy.keep is not None and not (messages or sessions):
        if exact:
            nth = _first(db, "SELECT id FROM messages ORDER BY id DESC LIMIT 1 OFFSET ?",
                         (policy.keep,))
            below = 0 if nth is None else nth + 1
        else:
            below = (_first(db, "SELECT MAX(id) FROM messages") or 0) - policy.keep + 1
        messages += _delete_messages(db, below)[0]
        sessions += _delete_sessions(db, _oldest_kept_session(db))
    if policy.max_bytes is not None and not (messages or sessions):
        over = used_bytes(db) - policy.max_bytes
        if db.dialect.postgres:
            over -= _reused(db, pruning or Pruning())
        if over > 0:
            n, freed = _delete_messages(db, 1 << 62, want=over + policy.max_bytes // 20)
            messages += n
            if db.dialect.postgres and pruning is not None and n:
                pruning.credit += freed
                pruning.vacuum_due = True
                pruning.deleted.append(freed)
            sessions += _delete_sessions(db, _oldest_kept_session(db))
    return messages, sessions


def _reused(db: Db, pruning: Pruning) -> int:
    """PostgreSQL: bytes deleted by earlier steps whose space new messages
    have not taken up yet (what they brought since the last look counts
    as taken up). On the first look, where the messages end."""
    if pruning.last_id is None:
        pruning.last_id = _first(db, "SELECT MAX(id) FROM messages") or 0
        return pruning.credit
    row = db.execute("SELECT COALESCE(SUM(size), 0), MAX(id) FROM messages WHERE id > ?",
                     (pruning.last_id,)).fetchone()
    if row[1] is not None:
        pruning.last_id = int(row[1])
    pruning.credit = max(0, pruning.credit - int(row[0]))
    return pruning.credit
