"""When the store's writer gets what the loop wrote (harness.store.db): a
record nobody waits for rides with the next commit somebody waits for, or
is handed over a little later; transcript lines are packed a row per
session per commit; a session's end goes at once."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from harness.records import Body, MessageDraft, TranscriptLine
from harness.store import db
from harness.store.db import Reader, Store


def _line(sid: int, text: str) -> TranscriptLine:
    return TranscriptLine(sid, time.time(), "C", "mail", text, None)


def _rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def _session(st: Store) -> int:
    return st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="s")


def _message(st: Store, sid: int) -> int:
    return st.message(MessageDraft(sid, time.time(), "a@lab.test", ("b@lab.test",), (), (),
                                   Body((b"Subject: x\r\n\r\nhi\r\n",)), "x", None, {}))


async def _until_lines(path: Path, why: str) -> float:
    """Seconds until a row of `lines` is there, as another process sees the
    store (a bounded poll: the writer's commit is in another thread)."""
    t0 = time.monotonic()
    while not _rows(path, "SELECT n FROM lines"):
        assert time.monotonic() - t0 < 30, why
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def test_lines_of_several_turns_and_the_message_are_one_commit(tmp_path: Path) -> None:
    path = tmp_path / "s.db"

    async def main() -> int:
        with Store(path) as st:
            st.attach(asyncio.get_running_loop())
            await st.barrier()
            before = st.commits
            sid = _session(st)
            st.transcript([_line(sid, "MAIL FROM:<a@lab.test>"), _line(sid, "250 ok")])
            await asyncio.sleep(0)  # another turn of the loop: nothing handed over yet
            st.transcript([_line(sid, "RCPT TO:<b@lab.test>"), _line(sid, "250 ok")])
            await asyncio.sleep(0)
            mid = _message(st, sid)
            await st.durable(mid)
            return st.commits - before

    assert asyncio.run(main()) == 1
    assert _rows(path, "SELECT session_id, n FROM lines") == [(1, 4)]
    with Reader(path) as r:
        [s] = r.sessions(with_events=True)
    assert [e.text for e in s.events] == ["MAIL FROM:<a@lab.test>", "250 ok",
                                          "RCPT TO:<b@lab.test>", "250 ok"]


def test_records_nobody_waits_for_reach_the_store_soon(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "HAND_OVER_AFTER", 0.2)
    path = tmp_path / "s.db"

    async def main() -> float:
        with Store(path) as st:
            st.attach(asyncio.get_running_loop())
            await st.barrier()
            sid = _session(st)
            st.transcript([_line(sid, "EHLO c.lab.test")])
            return await _until_lines(path, "never handed over")

    assert asyncio.run(main()) >= 0.2  # by the timer: nothing else handed it over


def test_a_sessions_end_is_handed_over_at_once(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db, "HAND_OVER_AFTER", 3600.0)  # the timer never fires here
    path = tmp_path / "s.db"

    async def main() -> None:
        with Store(path) as st:
            st.attach(asyncio.get_running_loop())
            sid = _session(st)
            st.transcript([_line(sid, "QUIT")])
            st.session_update(sid, ended_at=time.time(), end_reason="quit")
            await _until_lines(path, "the end waited for the timer")  # with the end
            assert _rows(path, "SELECT end_reason FROM sessions") == [("quit",)]

    asyncio.run(main())


def test_a_store_from_before_lines_and_analyses_reads_as_it_did(tmp_path: Path) -> None:
    """A store written before transcripts were packed and analyses had a
    table of their own (a row per line in `events`, the analysis in the
    message's row) reads the same, read-only or opened again for writing."""
    path = tmp_path / "old.db"

    async def write() -> None:
        with Store(path) as st:
            st.attach(asyncio.get_running_loop())
            sid = _session(st)
            st.transcript([_line(sid, "MAIL FROM:<a@lab.test>"), _line(sid, "250 ok")])
            mid = _message(st, sid)
            await st.durable(mid)
            st.message_analysis(mid, {"ndr": None, "note": "old"}, False)
            await st.barrier()

    asyncio.run(write())
    conn = sqlite3.connect(path)  # as the older version left it
    for sid, packed in list(conn.execute("SELECT session_id, packed FROM lines")):
        for t, d, phase, text, rule in json.loads(packed):
            conn.execute("INSERT INTO events (session_id, t, direction, phase, text, rule)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (sid, t, d, phase, text, rule))
    conn.execute("UPDATE messages SET (is_ndr, analysis) ="
                 " (SELECT is_ndr, analysis FROM analyses WHERE message_id = messages.id)")
    conn.execute("DROP TABLE lines")
    conn.execute("DROP TABLE analyses")
    conn.commit()
    conn.close()

    def read() -> tuple[list[str], object]:
        with Reader(path) as r:
            [s] = r.sessions(with_events=True)
            [m] = r.messages()
            return [e.text for e in s.events], m.analysis

    assert read() == (["MAIL FROM:<a@lab.test>", "250 ok"], {"ndr": None, "note": "old"})
    with Store(path):  # opened for writing: the new tables made, nothing of the old lost
        pass
    assert read() == (["MAIL FROM:<a@lab.test>", "250 ok"], {"ndr": None, "note": "old"})
