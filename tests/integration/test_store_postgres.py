"""The PostgreSQL store with real parts: a private cluster (tests/conftest.py),
`harness serve --store postgresql://...` as a process, real clients
(smtplib, swaks), the CLI's read commands and the API against it; a read-only
database and a lost connection answered 452 4.3.1, never 250; kill -9 under
load losing nothing acknowledged; retention's sizes on PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_cluster import PgCluster
from serving import HARNESS, HELO
from serving import ServeProcess as Serve

from harness.errors import StoreError
from harness.records import Body, MessageDraft
from harness.store import display
from harness.store.db import Reader, Store
from harness.store.retention import Retention
from harness.testing import Harness


def dbname(url: str) -> str:
    return url.split("/")[3].split("?")[0]


@pytest.fixture
def serving(pg_url: str) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})


def writer_backends(pg: PgCluster, url: str) -> str:
    """pg_terminate_backend of the harness writers' connections to one database."""
    # (with a timeout: returns once the backend is gone, not when it was told)
    return (f"SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE datname ="
            f" '{dbname(url)}' AND application_name = 'harness-writer'")


# ------------------------------------------------------------- the basics

def test_display_hides_the_password() -> None:
    shown = display("postgresql://app:s3cret@db.lab.test:5433/harness?password=other&x=1")
    assert "s3cret" not in shown and "other" not in shown
    assert shown == "postgresql://app:***@db.lab.test:5433/harness?password=***&x=1"
    assert display("postgres://db/harness") == "postgres://db/harness"


def test_reader_errors_for_a_database_are_clear(pg_cluster: PgCluster, pg_url: str) -> None:
    with pytest.raises(StoreError, match=r"no store at postgresql://.*run harness serve"):
        Reader(pg_url)  # an empty database
    missing = pg_cluster.url("no_such_db")
    with pytest.raises(StoreError, match="cannot connect to store") as e:
        Reader(missing)
    assert "\n" not in str(e.value)
    r = cli("sessions", "--store", missing)
    assert r.returncode == 1 and "cannot connect to store" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_cluster_is_private_and_durable(pg_cluster: PgCluster, pg_url: str) -> None:
    """fsync and synchronous commits on (durability is what is tested); the
    socket in the cluster's own folder, never the machine's cluster."""
    assert pg_cluster.psql("SHOW fsync").strip() == "on"
    assert pg_cluster.psql("SHOW synchronous_commit").strip() == "on"
    assert str(pg_cluster.dir) in pg_url and str(pg_cluster.port) in pg_url
    assert pg_cluster.port != 5432


# ---------------------------------------------------- serve, CLI, API

def test_serve_swaks_and_every_read_command(pg_url: str, serving: list[Serve],
                                            tmp_path: Path) -> None:
    serving.append(s := Serve(pg_url, "mailbox-full", cwd=tmp_path))
    assert s.lines[-1].startswith(f"store {pg_url}")
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed: run the README's test command"
    r = subprocess.run([swaks, "--server", f"127.0.0.1:{s.smtp}", "--helo", HELO,
                        "--from", "app@sender.test", "--to", "full@lab.test"],
                       capture_output=True, text=True, timeout=30)
    assert "<** 552 5.2.2" in r.stdout
    with smtplib.SMTP("127.0.0.1", s.smtp, local_hostname=HELO, timeout=10) as c:
        c.sendmail("", ["postmaster@harness.test"], b"Subject: Hello there\r\n"
                   b"Message-ID: <pg1@lab.test>\r\n\r\nbody\r\n")
    status, ready = s.get("/readyz")
    assert status == 200, ready
    status, info = s.get("/api/v1/store")
    assert info["path"] == pg_url and info["writable"] is True
    assert info["counts"] == {"sessions": 2, "messages": 1} and info["used_bytes"] > 0
    status, msgs = s.get("/api/v1/messages")
    assert [m["subject"] for m in msgs] == ["Hello there"]
    out = s.stop()
    assert "stopped: 2 sessions, 1 messages in postgresql://" in out

    sessions = json.loads(cli("sessions", "--json", "--store", pg_url).stdout)
    assert [x["envelope"]["rcpt_tos"] for x in sessions] == [["full@lab.test"],
                                                              ["postmaster@harness.test"]]
    shown = cli("show", str(sessions[0]["id"]), "--store", pg_url)
    assert "S: 552 5.2.2" in shown.stdout and "mailbox full" in shown.stdout
    [m] = json.loads(cli("messages", "--json", "--store", pg_url).stdout)
    assert (m["subject"], m["message_id"]) == ("Hello there", "<pg1@lab.test>")
    raw = subprocess.run([*HARNESS, "show", f"m{m['id']}", "--raw", "--store", pg_url],
                         capture_output=True, timeout=60)
    assert raw.stdout == b"Subject: Hello there\r\nMessage-ID: <pg1@lab.test>\r\n\r\nbody\r\n"
    assert not (tmp_path / ".harness" / "harness.db").exists()  # nothing went to SQLite


def test_kill_9_under_load_loses_no_acknowledged_message(pg_url: str, serving: list[Serve],
                                                          tmp_path: Path) -> None:
    """20 clients, up to 2,000 messages; serve is killed with SIGKILL midway.
    Every message that got a 250 is in the database, byte for byte; the
    store opens cleanly after (a large message cut short is removed)."""
    serving.append(s := Serve(pg_url, "--quiet", cwd=tmp_path))
    total, clients, kill_after = 2000, 20, 600
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    killed = threading.Event()

    def client(n: int) -> None:
        for i in range(total // clients):
            if killed.is_set():
                return
            size = 1_500_000 if i % 40 == 39 else 300  # now and then one in parts
            body = (f"Subject: crash {n}-{i}\r\nMessage-ID: <{n}-{i}@lab.test>\r\n\r\n"
                    .encode() + os.urandom(size // 2).hex().encode() + b"\r\n")
            try:
                with smtplib.SMTP("127.0.0.1", s.smtp, local_hostname=HELO, timeout=30) as c:
                    c.sendmail(f"c{n}@lab.test", ["sink@lab.test"], body)
            except (OSError, smtplib.SMTPException):
                return
            with lock:
                acked[f"<{n}-{i}@lab.test>"] = body
                if len(acked) >= kill_after and not killed.is_set():
                    killed.set()
                    s.proc.kill()  # SIGKILL while the other clients are mid-flight

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    s.proc.wait(10)
    assert s.proc.returncode == -signal.SIGKILL
    assert len(acked) >= kill_after
    with Store(pg_url):  # opens cleanly; what a crash left half written goes
        pass
    with Reader(pg_url) as r:
        stored = {m.message_id: m.raw for m in r.messages(raw=True)}
        partial = r.execute("SELECT COUNT(*) FROM messages WHERE partial IS NOT NULL").fetchone()
    missing = [k for k in acked if k not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    assert all(stored[k] == v for k, v in acked.items())
    assert partial[0] == 0


# ------------------------------------------- a store that cannot write

def test_a_read_only_database_defers_with_452_and_recovers(
        pg_cluster: PgCluster, pg_url: str, serving: list[Serve], tmp_path: Path) -> None:
    serving.append(s := Serve(pg_url, cwd=tmp_path))
    assert s.send("before").startswith("250 2.0.0 Ok: queued as")
    db = dbname(pg_url)
    # the database read-only (as a hot standby is): the writer's next
    # session finds it so once its connection is made again
    pg_cluster.psql(f"ALTER DATABASE {db} SET default_transaction_read_only = on")
    pg_cluster.psql(writer_backends(pg_cluster, pg_url))
    assert s.send("refused") == "452 4.3.1 Insufficient system storage"
    s.read_until(r"cannot write \(.*read-only.*452 4\.3\.1 until it can")
    status, ready = s.get("/readyz")
    assert status == 503 and "cannot write" in str(ready["problems"])
    status, info = s.get("/api/v1/store")  # reads still work
    assert status == 200 and info["writable"] is False and info["refused_messages"] == 1

    pg_cluster.psql(f"ALTER DATABASE {db} SET default_transaction_read_only = off")
    pg_cluster.psql(writer_backends(pg_cluster, pg_url))
    status, ready = s.get("/readyz")  # asked again: one small write
    assert status == 200, (ready, s.stop())
    assert s.send("after").startswith("250 2.0.0 Ok: queued as")
    s.read_until(r"writes again \(1 message\(s\) refused with 452 4\.3\.1")
    out = s.stop()
    assert "analysis worker exited" not in out  # it waited for the store too
    with Reader(pg_url) as r:
        assert [m.subject for m in r.messages()] == ["before", "after"]
        outcomes = [(a.outcome, a.code) for a in r.attempts() if a.phase == "message"]
        # the refused session's records, held while it could not write, are there
        assert outcomes == [("accepted", 250), ("deferred", 452), ("accepted", 250)]


def test_a_lost_connection_is_made_again_and_never_answered_250(
        pg_cluster: PgCluster, pg_url: str, serving: list[Serve], tmp_path: Path) -> None:
    serving.append(s := Serve(pg_url, cwd=tmp_path))
    assert s.send("first").startswith("250 ")
    # the server ends the writer's connection while it is idle: the next
    # commit finds it gone before anything was sent, connects again, and
    # commits (nothing was written the first time)
    pg_cluster.psql(writer_backends(pg_cluster, pg_url))
    assert s.send("second").startswith("250 ")
    s.read_until(r"connection was lost .*connecting again")
    # the database takes no connections: messages are 452 until it does
    db = dbname(pg_url)
    pg_cluster.psql(f"ALTER DATABASE {db} ALLOW_CONNECTIONS false")
    pg_cluster.psql(writer_backends(pg_cluster, pg_url))
    assert s.send("third") == "452 4.3.1 Insufficient system storage"
    s.read_until(r"cannot be reached .*452 4\.3\.1 until it can")
    pg_cluster.psql(f"ALTER DATABASE {db} ALLOW_CONNECTIONS true")
    deadline = time.monotonic() + 20
    while (reply := s.send("fourth")).startswith("452"):  # tried again once a second
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert reply.startswith("250 ")
    out = s.stop()
    assert out.count("cannot be reached") == 1  # said once
    with Reader(pg_url) as r:
        subjects = [m.subject for m in r.messages()]
    assert subjects[:2] == ["first", "second"] and subjects[-1] == "fourth"
    assert "third" not in subjects


# ------------------------------------------------------------ retention

def test_max_store_size_on_postgresql_reuses_the_space(pg_url: str) -> None:
    """PostgreSQL does not give a deleted row's space back: retention
    counts it as free once deleted, a VACUUM makes it reusable, and the
    tables stop growing at about the size kept."""
    def fill(st: Store, n: int, t0: float) -> None:
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1,
                                 scenario="x", t=t0)
        for i in range(n):
            mid = st.message(MessageDraft(sid, t0 + i, "a@x", ("b@x",), (), (),
                                          Body((os.urandom(100_000),)), "s", None, {}))
            st.message_analysis(mid, {"ndr": None}, False)
        st.session_update(sid, ended_at=t0 + n, end_reason="quit")

    with Store(pg_url) as st:
        fill(st, 50, 1_000.0)  # 5 MB that does not compress
    with Reader(pg_url) as r:
        assert r.usage()["used_bytes"] > 5_000_000
    policy = Retention(max_bytes=3_000_000)
    with Store(pg_url, retention=policy) as st:
        st.prune_now(vacuum=True)
        with Reader(pg_url) as r:
            kept = [m.size for m in r.messages()]
            first = r.usage()["used_bytes"]
        assert 2_000_000 <= sum(kept) <= 3_000_000
        fill(st, 20, 5_000.0)  # 2 MB more: into the space given up
        st.sync_barrier()
        st.prune_now(vacuum=True)
        with Reader(pg_url) as r:
            kept = [m.size for m in r.messages()]
            after = r.usage()["used_bytes"]
    assert sum(kept) <= 3_000_000
    assert after <= first * 1.15, (first, after)  # the tables did not grow on


def test_prune_command_on_postgresql(pg_url: str) -> None:
    with Store(pg_url) as st:
        sid = st.session_started(listener="l", peer_ip="127.0.0.1", peer_port=1, scenario="x")
        for i in range(10):
            mid = st.message(MessageDraft(sid, float(i), "a@x", ("b@x",), (), (),
                                          Body((b"m%d" % i,)), str(i), None, {}))
            st.message_analysis(mid, {"ndr": None}, False)
        st.session_update(sid, ended_at=20.0)
    run = cli("prune", "--keep", "3", "--vacuum", "--store", pg_url)
    assert run.returncode == 0, run.stderr
    assert re.match(r"pruned 7 message\(s\) \(keeps the newest 3 messages\): 3 messages, "
                    r"1 sessions left; tables [\d.]+ MB -> [\d.]+ MB$", run.stdout.strip()), \
        run.stdout
    with Reader(pg_url) as r:
        assert [m.subject for m in r.messages()] == ["7", "8", "9"]


# ------------------------------------------------- the Python Harness

def test_harness_on_postgresql_reads_back_only_its_own(pg_url: str) -> None:
    """Two harnesses on one database (two hosts, say): each reads back, and
    resets, what it served; a Reader sees everything; the API reads it."""
    with Harness(store=pg_url, http=True) as a, Harness(store=pg_url) as b:
        for h, who in ((a, "a"), (b, "b"), (a, "a2")):
            with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=10) as c:
                c.sendmail(f"{who}@lab.test", ["user@harness.test"], f"Subject: {who}\r\n\r\nx\r\n")
        assert [m.subject for m in a.messages()] == ["a", "a2"]
        assert [m.subject for m in b.messages()] == ["b"]
        assert [x.mail_from for x in b.attempts(rcpt="user@harness.test")] == ["b@lab.test"]
        with urllib.request.urlopen(f"{a.http_url}/api/v1/messages", timeout=10) as r:
            assert sorted(m["subject"] for m in json.load(r)) == ["a", "a2", "b"]
        a.reset()
        assert a.messages() == [] and a.sessions() == []
        assert [m.subject for m in b.messages()] == ["b"]  # b's captures stay
        a.wait_idle()
        b.wait_idle()
        with pytest.raises(Exception, match="use store_location"):
            _ = a.store_path
    with Reader(pg_url) as r:
        [m] = r.messages()
        assert m.subject == "b" and m.analysis is not None and r.analysis_pending() == []
