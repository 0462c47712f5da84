"""The capture store on a real SQLite file: WAL, durable barrier, grouping,
the writer lock, and the retry timeline read back."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from harness.errors import StoreError
from harness.store.db import Reader, Store


def test_store_is_wal_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as st:
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="x")
        st.message(sid, t=1.0, mail_from="a@x", rcpt_tos=["b@x"], mail_options=[],
                   rcpt_options=[], raw=b"raw\r\n", subject="s", message_id="<m>")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
    with Store(path) as st:  # ids continue after a restart
        assert st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1,
                                  scenario="x") == sid + 1
    with Reader(path) as r:
        [m] = r.messages(raw=True)
        assert m.raw == b"raw\r\n"


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path / "s.db"), pytest.raises(StoreError, match="in use"):
        Store(tmp_path / "s.db").open()


def test_barrier_resolves_after_commit_and_groups_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"

    async def run(st: Store) -> None:
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="x")
        waits = []
        for i in range(500):
            st.message(sid, t=float(i), mail_from="a@x", rcpt_tos=["b@x"], mail_options=[],
                       rcpt_options=[], raw=b"m%d" % i, subject=None, message_id=None)
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


def test_attempt_timeline_has_intervals(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as st:
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="x")
        for t, code in ((100.0, 451), (160.5, 451), (400.0, 250)):
            st.attempt(sid, t=t, mail_from="a@x", rcpt="B@x", phase="rcpt", code=code,
                       enhanced=None, reply=None,
                       outcome="deferred" if code == 451 else "accepted", rule=None)
        st.attempt(sid, t=130.0, mail_from="a@x", rcpt="c@x", phase="rcpt", code=250,
                   enhanced=None, reply=None, outcome="accepted", rule=None)
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
