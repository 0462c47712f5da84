"""Retention on a real SQLite store and a real PostgreSQL database (where
the test says `store_at`): what --keep, --keep-days and
--max-store-size delete (oldest messages first, then the ended sessions no
message is left of, with their transcripts and attempts), under serve as it
goes and with `harness prune`."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness.records import AttemptRecord, Body, MessageDraft, TranscriptLine
from harness.store import Location
from harness.store.db import Reader, Store
from harness.store.retention import Retention

HARNESS = [sys.executable, "-m", "harness.cli"]


def fill(st: Store, *, sessions: int, per_session: int, t0: float = 1_000.0,
         size: int = 100, open_last: bool = False) -> list[int]:
    """Sessions with messages, a transcript line and an attempt each."""
    sids = []
    t = t0
    for n in range(sessions):
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=n,
                                 scenario="accept", t=t)
        sids.append(sid)
        for _ in range(per_session):
            t += 1
            mid = st.message(MessageDraft(sid, t, "a@x.test", ("b@x.test",), (), (),
                                          Body((b"x" * size,)), "s", None, {}))
            st.message_analysis(mid, {"ndr": None}, False)  # analysed: free to go
            st.transcript([TranscriptLine(sid, t, "I", "message", f"stored as {mid}", None)])
            st.attempt(AttemptRecord(sid, t, "a@x.test", "b@x.test", "message", 250, "2.0.0",
                                     "250 ok", "accepted", None, mid))
        if not (open_last and n == sessions - 1):
            st.session_update(sid, ended_at=t + 0.5, end_reason="quit")
    return sids


def rows(path: Location, table: str, column: str = "id") -> list[int]:
    with Reader(path) as r:
        return [x[0] for x in r.execute(f"SELECT {column} FROM {table} ORDER BY 1")]


def test_keep_deletes_the_oldest_messages_then_their_ended_sessions(store_at: Location) -> None:
    path = store_at
    with Store(path) as st:
        fill(st, sessions=4, per_session=3)  # messages 1-12 in sessions 1-4
    with Store(path, retention=Retention(keep=5)) as st:
        assert st.prune_now() == 7
    assert rows(path, "messages") == [8, 9, 10, 11, 12]
    # session 3 keeps message 8 (and so its transcript and attempts); 1 and 2 are gone
    assert rows(path, "sessions") == [3, 4]
    assert sorted(set(rows(path, "lines", "session_id"))) == [3, 4]
    assert sorted(set(rows(path, "attempts", "session_id"))) == [3, 4]


def test_an_open_session_is_never_deleted_but_its_messages_may_be(store_at: Location) -> None:
    path = store_at
    with Store(path) as st:
        fill(st, sessions=1, per_session=6, open_last=True)
    with Store(path, retention=Retention(keep=2)) as st:
        st.prune_now()
    assert rows(path, "messages") == [5, 6]
    with Store(path, retention=Retention(keep=0)) as st:
        st.prune_now()
    assert rows(path, "messages") == []
    assert rows(path, "sessions") == [1]  # still open: a connection that sends forever


def test_keep_days_goes_by_time(store_at: Location) -> None:
    path = store_at
    now = time.time()
    with Store(path) as st:
        fill(st, sessions=2, per_session=2, t0=now - 3 * 86400)  # three days old
        fill(st, sessions=1, per_session=2, t0=now - 3600)  # an hour old
    with Store(path, retention=Retention(keep_days=1)) as st:
        assert st.prune_now() == 4
    assert rows(path, "messages") == [5, 6]
    assert rows(path, "sessions") == [3]


def test_max_store_size_keeps_the_data_under_the_size(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as st:
        fill(st, sessions=10, per_session=10, size=50_000)  # about 5 MB
    with Reader(path) as r:
        assert r.usage()["used_bytes"] > 4_000_000
    with Store(path, retention=Retention(max_bytes=1_500_000)) as st:
        st.prune_now(vacuum=True)
    with Reader(path) as r:
        usage = r.usage()
    assert usage["used_bytes"] <= 1_500_000
    assert usage["file_bytes"] <= 1_600_000  # vacuumed: the space went back to the disk
    kept = rows(path, "messages")
    assert kept and kept[-1] == 100 and kept == list(range(kept[0], 101))  # the newest


def test_a_large_message_goes_with_its_parts(store_at: Location) -> None:
    path = store_at
    with Store(path) as st:
        fill(st, sessions=1, per_session=1, size=3 << 20)  # stored in parts
        fill(st, sessions=1, per_session=1, t0=5_000.0)
    assert rows(path, "message_parts", "DISTINCT message_id") == [1]
    with Store(path, retention=Retention(keep=1)) as st:
        st.prune_now()
    assert rows(path, "messages") == [2]
    assert rows(path, "message_parts", "DISTINCT message_id") == []


def _serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], int, int]:
    proc = subprocess.Popen(
        [*HARNESS, "serve", "--quiet", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
         "--store", str(tmp_path / "h.db"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"})
    assert proc.stdout is not None
    smtp = http = 0
    for line in proc.stdout:
        if m := re.search(r"listening on [\d.]+:(\d+)", line):
            smtp = int(m.group(1))
        if m := re.search(r"API on http://[\d.]+:(\d+)", line):
            http = int(m.group(1))
        if line.startswith("store "):
            assert "keeps the newest 5 messages" in line, line
            return proc, smtp, http
    raise AssertionError("serve did not start")


def _store_info(port: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/store", timeout=10) as r:
        data: dict[str, object] = json.load(r)
    return data


def test_serve_prunes_as_it_goes_and_says_so(tmp_path: Path) -> None:
    proc, smtp, http = _serve(tmp_path, "--keep", "5")
    try:
        for i in range(20):
            with smtplib.SMTP("127.0.0.1", smtp, local_hostname="client.lab.test") as s:
                s.sendmail("a@lab.test", ["b@harness.test"], f"Subject: {i}\r\n\r\nbody\r\n")
        deadline = time.monotonic() + 20
        while True:  # retention runs after the commits, in steps of its own
            info = _store_info(http)
            counts = info["counts"]
            assert isinstance(counts, dict)
            if counts["messages"] == 5 and counts["sessions"] <= 6:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["writable"] is True and info["pruned_messages"] == 15
        assert info["retention"] == {"keep": 5, "keep_days": None, "max_bytes": None,
                                     "summary": "keeps the newest 5 messages"}
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert "15 older message(s) pruned" in out
    with Reader(tmp_path / "h.db") as r:
        assert [m.subject for m in r.messages()] == ["15", "16", "17", "18", "19"]


def test_prune_command(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as st:
        fill(st, sessions=20, per_session=1, size=100_000)
    run = subprocess.run([*HARNESS, "prune", "--keep", "3", "--vacuum", "--store", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    m = re.search(r"pruned 17 message\(s\) \(keeps the newest 3 messages\): 3 messages, "
                  r"3 sessions left; in use ([\d.]+) MB -> ([\d.]+) MB, "
                  r"file ([\d.]+) MB -> ([\d.]+) MB$", run.stdout.strip())
    assert m, run.stdout
    used_before, used_after, file_before, file_after = map(float, m.groups())
    assert used_before >= 2.0 and file_before >= 2.0  # 20 messages of 100 kB
    assert 0.3 <= used_after <= 0.5 and file_after <= 0.5  # 3 of them, the file vacuumed
    assert rows(path, "messages") == [18, 19, 20]


def test_prune_refuses_without_a_policy_and_while_serve_holds_the_store(
        tmp_path: Path) -> None:
    run = subprocess.run([*HARNESS, "prune", "--store", str(tmp_path / "h.db")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "say what to keep" in run.stderr
    run = subprocess.run([*HARNESS, "prune", "--max-store-size", "12parsecs"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "--max-store-size: expected a size" in run.stderr
    proc, _, _ = _serve(tmp_path, "--keep", "5")
    try:
        run = subprocess.run([*HARNESS, "prune", "--keep", "1", "--store",
                              str(tmp_path / "h.db")], capture_output=True, text=True,
                             timeout=60)
        assert run.returncode == 1 and "in use by another harness serve" in run.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)


@pytest.mark.parametrize("size", ["1KB", "0"])
def test_max_store_size_too_small_is_refused(tmp_path: Path, size: str) -> None:
    run = subprocess.run([*HARNESS, "serve", "--max-store-size", size, "--store",
                          str(tmp_path / "h.db")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "at least 1MiB" in run.stderr


def test_a_message_waiting_for_its_analysis_is_kept_until_analysed(store_at: Location
                                                                   ) -> None:
    path = store_at
    with Store(path) as st:
        fill(st, sessions=1, per_session=4)
        st.analysis_job(2, client_ip="127.0.0.1", helo="c", hostname="mx", zone=None)
    with Store(path, retention=Retention(keep=1)) as st:
        st.prune_now()
    assert rows(path, "messages") == [2, 4]  # 2 is waited for
    with Store(path, retention=Retention(keep=1)) as st:
        st.message_analysis(2, {"ndr": None}, False)
        st.sync_barrier()
        st.prune_now()
    assert rows(path, "messages") == [4]
