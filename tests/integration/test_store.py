"""The capture store on a real SQLite file and a real PostgreSQL database
(a private cluster, tests/conftest.py): WAL, durable barrier, grouping,
the large-message lane, reopening, the writer lock, and the retry timeline
read back. `store_at` runs a test once per backend."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from harness.errors import StoreError
from harness.records import AttemptRecord, Body, MessageDraft, TranscriptLine
from harness.store import Location, is_postgres
from harness.store.db import Reader, Store
from harness.store.dialect import dialect


def sql(where: Location, text: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Run SQL on a store behind the harness's back (? parameters)."""
    db = dialect(where).connect("writer")
    try:
        cur = db.execute(text, params)
        return [tuple(r) for r in cur.fetchall()] if cur.description else []
    finally:
        db.close()


def draft(sid: int, t: float, raw: bytes, subject: str | None = None,
          message_id: str | None = None) -> MessageDraft:
    return MessageDraft(sid, t, "a@x", ("b@x",), (), (), Body((raw,)), subject, message_id, {})


def test_store_survives_reopen(store_at: Location) -> None:
    with Store(store_at) as st:
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="x")
        st.message(draft(sid, 1.0, b"raw\r\n", "s", "<m>"))
    if not is_postgres(store_at):
        assert sqlite3.connect(store_at).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with Store(store_at) as st:  # ids continue after a restart
        again = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1,
                                   scenario="x")
    # one writer counts on; a shared store's writers take ids in blocks
    assert again == sid + 1 if not is_postgres(store_at) else again > sid
    with Reader(store_at) as r:
        [m] = r.messages(raw=True)
        assert m.raw == b"raw\r\n"


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db"), pytest.raises(StoreError, match="in use"):
        Store(tmp_path / "s.db").open()


def test_barrier_resolves_after_commit_and_groups_writes(store_at: Location) -> None:
    path = store_at

    async def run(st: Store) -> None:
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="x")
        waits = []
        for i in range(500):
            st.message(draft(sid, float(i), b"m%d" % i))
            waits.append(st.barrier())
        await asyncio.gather(*waits)
        # every awaited message is visible to another connection now
        with Reader(path) as r:
            assert len(r.messages()) == 500

    st = Store(path).open()
    try:
        asyncio.run(run(st))
        assert st.commits < 500  # many messages shared a commit
    finally:
        st.close()


def test_attempt_timeline_has_intervals(store_at: Location) -> None:
    path = store_at
    with Store(path) as st:
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="x")
        for t, code in ((100.0, 451), (160.5, 451), (400.0, 250)):
            st.attempt(AttemptRecord(sid, t, "a@x", "B@x", "rcpt", code, None, None,
                                     "deferred" if code == 451 else "accepted", None, None))
        st.attempt(AttemptRecord(sid, 130.0, "a@x", "c@x", "rcpt", 250, None, None,
                                 "accepted", None, None))
    with Reader(path) as r:
        timeline = r.attempts(rcpt="b@x")
    assert [(a.t, a.code, a.interval) for a in timeline] == [
        (100.0, 451, None), (160.5, 451, 60.5), (400.0, 250, 239.5)]


def test_reader_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no store"):
        Reader(tmp_path / "missing.db")
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="cannot read"):
        Reader(bad)


def test_transcript_and_envelope_read_back_as_written(store_at: Location) -> None:
    """One record type from the session to the reader: a transcript line
    comes back as the same TranscriptLine, the envelope from its columns."""
    path = store_at
    lines = [TranscriptLine(1, 10.0, "C", "mail", "MAIL FROM:<a@x> SIZE=5", None),
             TranscriptLine(1, 10.1, "S", "mail", "250 2.1.0 Ok", "a rule")]
    with Store(path) as st:
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="x")
        assert sid == 1
        st.transcript(lines)
        st.session_update(sid, mail_from=["a@x"], rcpt_tos=["b@x", "c@x"])
    with Reader(path) as r:
        [s] = r.sessions(with_events=True)
    assert s.events == lines
    assert (s.mail_from, s.rcpt_tos) == (["a@x"], ["b@x", "c@x"])


def test_older_store_gains_the_envelope_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE sessions (id INTEGER PRIMARY KEY, started_at REAL NOT NULL,"
        " ended_at REAL, listener TEXT NOT NULL, peer_ip TEXT NOT NULL,"
        " peer_port INTEGER NOT NULL, scenario TEXT NOT NULL, helo TEXT, tls_version TEXT,"
        " tls_cipher TEXT, auth_user TEXT, extensions TEXT, end_reason TEXT);"
        "INSERT INTO sessions (id, started_at, listener, peer_ip, peer_port, scenario)"
        " VALUES (1, 1.0, 'l', '127.0.0.1', 1, 'x');")
    conn.commit()
    conn.close()
    with Store(path):
        pass
    with Reader(path) as r:
        [s] = r.sessions()
        assert (s.mail_from, s.rcpt_tos) == ([], [])
        assert r.relays() == []


def test_a_large_message_is_written_in_parts_and_read_back_whole(store_at: Location) -> None:
    """Over CHUNK bytes a message is written in parts, a few megabytes per
    commit, beside other writes; read back, it is byte for byte as sent."""
    path = store_at
    big = bytes(range(256)) * (5 * 1024 * 1024 // 256 + 7)  # 5 MB and a bit
    parts = [big[:3_000_000], big[3_000_000:]]

    async def run(st: Store) -> None:
        st.attach(asyncio.get_running_loop())
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="x")
        mid = st.message(MessageDraft(sid, 1.0, "a@x", ("b@x",), (), (), Body(parts), None,
                                      None, {}))
        assert st.writes_in_pieces(mid)
        small = st.message(draft(sid, 2.0, b"small\r\n"))
        await st.barrier()  # the small one: not held behind the large one's parts
        with Reader(path) as r:
            assert small in [m.id for m in r.messages()]
        await st.durable(mid)
        assert not st.writes_in_pieces(mid)

    st = Store(path).open()
    try:
        asyncio.run(run(st))
    finally:
        st.close()
    with Reader(path) as r:
        got = r.message(1)
        assert got is not None and got.raw == big and got.size == len(big)
        assert r.raw(1, limit=1000) == big[:1000]
        assert [m.size for m in r.messages()] == [len(big), 7]  # "small\r\n"
    assert sql(path, "SELECT COUNT(*) FROM message_parts") == [(6,)]


def test_a_partial_message_left_by_a_crash_is_removed_at_open(store_at: Location) -> None:
    path = store_at
    with Store(path):
        pass
    sql(path, "INSERT INTO sessions (id, started_at, listener, peer_ip, peer_port, scenario)"
              " VALUES (1, 1.0, 'l', '127.0.0.1', 1, 'x')")
    sql(path, "INSERT INTO messages (id, session_id, received_at, mail_from, rcpt_tos,"
              " mail_options, rcpt_options, dsn, size, raw, partial) VALUES"
              " (1, 1, 1.0, 'a@x', '[]', '[]', '[]', '{}', 5000000, ?, 1)", (b"",))
    sql(path, "INSERT INTO message_parts (message_id, seq, data) VALUES (1, 0, ?)", (b"\0",))
    with Reader(path) as r:
        assert r.messages() == []  # never shown half written
        assert r.sessions()[0].message_ids == []
    with Store(path):
        pass
    assert sql(path, "SELECT COUNT(*) FROM messages") == [(0,)]
    assert sql(path, "SELECT COUNT(*) FROM message_parts") == [(0,)]
