"""Several writers on one store (`Store(location, shared=True)`; always so
for PostgreSQL), on one SQLite file and on one PostgreSQL database: ids
reserved in blocks never collide, nothing is lost, each message is analysed
exactly once by whichever analysis worker claims it, a dead worker's claims
and a dead writer's half-written message are taken over, a live one's are
not. Real processes where it matters."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.analysis_worker import Worker
from harness.errors import StoreError
from harness.store import Location, is_postgres
from harness.store.db import Reader, Store
from harness.store.dialect import dialect

#: one writer process: N sessions, each a message (with its analysis job)
#: and an attempt, every message durable before the next; then it waits
#: until no stored message waits for its analysis (its own analyst's or
#: another's), and says what it wrote and analysed
WRITER = textwrap.dedent("""
    import asyncio, json, sys
    from harness.analyst import Analyst
    from harness.records import AttemptRecord, Body, MessageDraft
    from harness.store import location
    from harness.store.db import Store

    async def main(where, n, name):
        st = Store(location(where), shared=True).open()
        st.attach(asyncio.get_running_loop())
        analyst = Analyst(st, mode="process")
        await analyst.start()
        out = {"sessions": [], "messages": [], "attempts": []}
        for i in range(n):
            sid = st.session_started(listener=name, peer_ip="127.0.0.1", peer_port=i,
                                     scenario="x")
            body = b"Subject: %s %d\\r\\n\\r\\nhello\\r\\n" % (name.encode(), i)
            mid = st.message(MessageDraft(sid, float(i), "a@x.test", ("b@x.test",), (), (),
                                          Body((body,)), f"{name} {i}", None, {}))
            st.analysis_job(mid, client_ip="127.0.0.1", helo="c.test", hostname="mx.test",
                            zone=None)
            analyst.queued(mid)
            await st.durable(mid)
            aid = st.attempt(AttemptRecord(sid, float(i), "a@x.test", "b@x.test", "message",
                                           250, "2.0.0", "250 ok", "accepted", None, mid))
            st.session_update(sid, ended_at=float(i), end_reason="quit")
            out["sessions"].append(sid)
            out["messages"].append(mid)
            out["attempts"].append(aid)
        await asyncio.wait_for(analyst.idle(), 60)
        await analyst.stop()
        await st.barrier()
        out["analysed"] = analyst.analysed_count
        out["errors"] = [str(e) for e in analyst.errors]
        st.close()
        print(json.dumps(out))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
""")


def test_two_writer_processes_share_one_store(store_at: Location) -> None:
    n = 150
    with Store(store_at, shared=True):  # the tables, before both start at once
        pass
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(store_at), str(n), name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("one", "two")]
    outs = []
    for p in procs:
        out, errs = p.communicate(timeout=180)
        assert p.returncode == 0, errs
        outs.append(json.loads(out))
    for kind in ("sessions", "messages", "attempts"):
        ids = [i for o in outs for i in o[kind]]
        assert len(set(ids)) == 2 * n, f"{kind}: an id handed out twice"
        for o in outs:  # each writer's ids grow (blocks in time order)
            assert o[kind] == sorted(o[kind])
    assert all(o["errors"] == [] for o in outs), outs
    # each message analysed once: the two analysts' counts add up exactly
    assert sum(o["analysed"] for o in outs) == 2 * n
    with Reader(store_at) as r:
        messages = r.messages()
        assert sorted(m.id for m in messages) == sorted(i for o in outs for i in o["messages"])
        assert all(m.analysis is not None for m in messages)
        assert r.analysis_pending() == []
        assert r.counts() == {"sessions": 2 * n, "messages": 2 * n, "attempts": 2 * n,
                              "events": 0}
        claimed = r.execute("SELECT COUNT(*) FROM analysis_queue").fetchone()[0]
    assert claimed == 0


def test_a_single_writer_and_shared_writers_keep_each_other_off(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path, shared=True), Store(path, shared=True), pytest.raises(  # two: fine
            StoreError, match="in use by another harness serve"):
        Store(path).open()
    with Store(path), pytest.raises(StoreError, match="does not share it"):
        Store(path, shared=True).open()


def test_a_dead_writers_half_written_message_goes_a_live_ones_stays(
        store_at: Location) -> None:
    live = Store(store_at, shared=True).open()
    try:
        assert live.owner is not None
        db = dialect(store_at).connect("writer")
        try:
            db.execute("INSERT INTO sessions (id, started_at, listener, peer_ip, peer_port,"
                       " scenario) VALUES (900001, 1.0, 'l', '127.0.0.1', 1, 'x')")
            for mid, mark in ((900001, live.owner.token), (900002, 424242)):  # 424242: nobody
                db.execute("INSERT INTO messages (id, session_id, received_at, mail_from,"
                           " rcpt_tos, mail_options, rcpt_options, dsn, size, raw, partial)"
                           " VALUES (?, 900001, 1.0, 'a@x', '[]', '[]', '[]', '{}', 5000000,"
                           " ?, ?)", (mid, b"", mark))
                db.execute("INSERT INTO message_parts (message_id, seq, data) VALUES (?, 0, ?)",
                           (mid, b"\0"))
        finally:
            db.close()
        with Store(store_at, shared=True):  # another writer starts
            pass
        with Reader(store_at) as r:
            left = [row[0] for row in r.execute("SELECT id FROM messages ORDER BY id")]
            parts = [row[0] for row in r.execute("SELECT message_id FROM message_parts")]
        assert left == [900001] and parts == [900001]
    finally:
        live.close()


def test_claims_of_a_dead_worker_are_taken_over_a_live_ones_are_not(
        store_at: Location) -> None:
    with Store(store_at, shared=True) as st:
        import asyncio

        from harness.records import Body, MessageDraft

        async def write() -> None:
            st.attach(asyncio.get_running_loop())
            sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1,
                                     scenario="x")
            for i in range(3):
                mid = st.message(MessageDraft(sid, float(i), "a@x", ("b@x",), (), (),
                                              Body((b"Subject: %d\r\n\r\nx\r\n" % i,)), None,
                                              None, {}))
                st.analysis_job(mid, client_ip="127.0.0.1", helo=None, hostname="mx",
                                zone=None)
            await st.barrier()
        asyncio.run(write())
    with Reader(store_at) as r:
        first, second, third = r.analysis_pending()
    alive = Worker(store_at)
    try:
        db = dialect(store_at).connect("writer")
        try:
            db.execute("UPDATE analysis_queue SET claimed_by = ? WHERE message_id = ?",
                       (alive.owner.token, first))
            db.execute("UPDATE analysis_queue SET claimed_by = 424242 WHERE message_id = ?",
                       (second,))  # a worker that is gone
        finally:
            db.close()
        other = Worker(store_at)
        try:
            got = [int(line.split("\t")[0]) for line in other.batch()]
            assert got == [third]  # the unclaimed one first
            got = [int(line.split("\t")[0]) for line in other.batch()]
            assert got == [second]  # then the dead worker's, let go
            assert list(other.batch()) == []  # never the live one's
        finally:
            other.close()
    finally:
        alive.close()
    if not is_postgres(store_at):  # the owners' lock files go with them
        assert list(Path(f"{store_at}.owners").iterdir()) == []
