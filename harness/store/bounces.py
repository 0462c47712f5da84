"""Sent bounces in the capture store: the `bounces` table, kept apart from
db.py (whose dialects add this TABLE and the TRIGGERS to their schema, and
nothing else).

One row per report a rule's `bounce:` produced, written once its fate is
known: sent (with the next hop's reply), failed (with the error), skipped
(with the reason nothing may be sent) or cancelled (the harness stopped
before the delay ended). A trigger deletes a session's rows with the
session, so `Store.clear()` and retention need not know about this table.

Writes go through the store's writer queue (never SQLite on the event
loop); reads take a `Reader`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.store.db import Reader, Store

#: the table ({...}: column types, as in db.SCHEMA)
TABLE = """
CREATE TABLE IF NOT EXISTS bounces (
    id {serial},
    session_id {bigint} NOT NULL,
    message_id {bigint},          -- the accepted message the report is about
    rule TEXT,
    kind TEXT NOT NULL,           -- dsn | exchange | autoreply | arf
    status TEXT,                  -- the enhanced status code reported (dsn, exchange)
    recipients TEXT NOT NULL,     -- JSON list: whom the report is about
    mail_to TEXT,                 -- the envelope recipient: the original sender
    via TEXT,                     -- the next hop, HOST:PORT
    scheduled_at {real} NOT NULL,
    done_at {real},
    outcome TEXT NOT NULL,        -- sent | failed | skipped | cancelled
    reply TEXT,                   -- the next hop's reply to the message (sent)
    error TEXT,                   -- why it failed, was skipped or cancelled
    subject TEXT,
    raw {blob}                    -- the report as built (NULL when skipped)
);
CREATE INDEX IF NOT EXISTS bounces_session ON bounces(session_id, id);
"""

#: a session's bounces go with it, in each database's words
TRIGGERS = {
    "sqlite": ["""CREATE TRIGGER IF NOT EXISTS bounces_follow_sessions AFTER DELETE ON sessions
BEGIN
    DELETE FROM bounces WHERE session_id = OLD.id;
END"""],
    "postgresql": [
        """CREATE OR REPLACE FUNCTION harness_bounces_follow() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM bounces WHERE session_id = OLD.id;
    RETURN OLD;
END $$""",
        """CREATE OR REPLACE TRIGGER bounces_follow_sessions AFTER DELETE ON sessions
FOR EACH ROW EXECUTE FUNCTION harness_bounces_follow()"""],
}

OUTCOMES = ("sent", "failed", "skipped", "cancelled")


@dataclass
class BounceRecord:
    id: int
    session_id: int
    message_id: int | None
    rule: str | None
    kind: str
    status: str | None
    recipients: list[str]
    mail_to: str | None
    via: str | None
    scheduled_at: float
    done_at: float | None
    outcome: str
    reply: str | None
    error: str | None
    subject: str | None
    raw: bytes | None = None

    def as_dict(self, raw: bool = False) -> dict[str, Any]:
        d = asdict(self)
        d.pop("raw")
        if raw and self.raw is not None:
            d["raw"] = self.raw.decode("utf-8", "replace")
        return d


def record(store: Store, *, session_id: int, message_id: int | None, rule: str | None,
           kind: str, status: str | None, recipients: list[str], mail_to: str | None,
           via: str | None, scheduled_at: float, done_at: float | None, outcome: str,
           reply: str | None = None, error: str | None = None, subject: str | None = None,
           raw: bytes | None = None) -> None:
    """Queue one row (non-blocking: safe on the event loop)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown bounce outcome {outcome!r}")
    store._put(  # the store's writer queue, in its order with everything else
        "INSERT INTO bounces (session_id, message_id, rule, kind, status, recipients, mail_to,"
        " via, scheduled_at, done_at, outcome, reply, error, subject, raw)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (session_id, message_id, rule, kind, status, json.dumps(recipients), mail_to, via,
         scheduled_at, done_at, outcome, reply, error, subject, raw))


def bounce(reader: Reader, bid: int) -> BounceRecord | None:
    """One recorded bounce, with its report's bytes."""
    found = bounces(reader, bounce_id=bid, raw=True)
    return found[0] if found else None


def bounces(reader: Reader, *, session_id: int | None = None, raw: bool = False,
            limit: int | None = None, bounce_id: int | None = None) -> list[BounceRecord]:
    """Recorded bounces, oldest first (all, or one session's). A store made
    before this table existed has none."""
    cols = "*" if raw else ("id, session_id, message_id, rule, kind, status, recipients, mail_to,"
                            " via, scheduled_at, done_at, outcome, reply, error, subject")
    sql = f"SELECT {cols} FROM bounces"
    params: list[Any] = []
    where = []
    if session_id is not None:
        where.append("session_id = ?")
        params.append(session_id)
    if bounce_id is not None:
        where.append("id = ?")
        params.append(bounce_id)
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC"
    if limit:
        sql += " LIMIT ?"
        params.append(limit)
    try:
        rows = reader.execute(sql, params).fetchall()
    except reader.dialect.Error as e:
        if reader.dialect.missing_table(e):
            return []
        raise
    out = []
    for row in reversed(rows):
        d = dict(row)
        d["recipients"] = json.loads(d["recipients"])
        if d.get("raw") is not None:
            d["raw"] = bytes(d["raw"])
        out.append(BounceRecord(**d))
    return out
