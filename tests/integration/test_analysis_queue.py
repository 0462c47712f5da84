"""The analysis queue: a stored message's analysis job lives in the store,
so neither kill -9, nor a client's reset after the dot, nor a dead worker
loses it; the worker reads message bytes from the store; the API says
"pending" until an analysis is done. Real `harness serve` processes, real
clients, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from harness.store.db import Reader
from harness.store.dialect import dialect
from harness.testing import Harness

HARNESS = [sys.executable, "-m", "harness.cli"]
HELO = "client.lab.test"

DSN = (b"From: MAILER-DAEMON@mx.lab.test\r\nTo: sender@lab.test\r\n"
       b"Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
       b'Content-Type: multipart/report; report-type=delivery-status; boundary="b"\r\n\r\n'
       b"--b\r\nContent-Type: text/plain\r\n\r\nI could not deliver your message.\r\n"
       b"--b\r\nContent-Type: message/delivery-status\r\n\r\n"
       b"Reporting-MTA: dns; mx.lab.test\r\n\r\n"
       b"Final-Recipient: rfc822; gone@elsewhere.test\r\nAction: failed\r\n"
       b"Status: 5.1.1\r\nDiagnostic-Code: smtp; 550 5.1.1 No such user\r\n"
       b"--b--\r\n")


def plain(subject: str = "hello") -> bytes:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@lab.test", "b@lab.test", subject
    m.set_content("just a message\n")
    return m.as_bytes().replace(b"\n", b"\r\n")


class Serve:
    def __init__(self, store: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [*HARNESS, "serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
             "--store", str(store), "--quiet", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "COLUMNS": "200"})
        assert self.proc.stdout is not None
        self.port = self.http = 0
        for line in self.proc.stdout:
            m = re.search(r"listening on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            m = re.search(r"web page and API on http://([\d.]+:\d+)/", line)
            if m:
                self.http = int(m.group(1).rsplit(":", 1)[1])
            if line.startswith("store "):
                break
        assert self.port and self.http, "serve did not start"

    def worker(self) -> int:
        """The pid of this server's analysis worker process."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for pid in children.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"harness.analysis_worker" in cmdline:
                return int(pid)
        raise AssertionError("no analysis worker under harness serve")

    def send(self, raw: bytes, sender: str = "a@lab.test") -> None:
        with smtplib.SMTP("127.0.0.1", self.port, local_hostname=HELO, timeout=10) as c:
            c.sendmail(sender, ["b@lab.test"], raw)

    def api(self, path: str) -> tuple[dict[str, str], object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
            return dict(r.headers), json.loads(r.read())

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "store.db"


def unanalysed(store: Path) -> list[int]:
    with Reader(store) as r:
        return r.analysis_pending()


def test_kill_9_then_restart_analyses_what_waited(store: Path) -> None:
    s = Serve(store)
    worker = s.worker()
    os.kill(worker, signal.SIGSTOP)  # the worker stands still: the jobs wait
    try:
        for i in range(20):
            s.send(plain(f"message {i}"))
        s.send(DSN, sender="")
        _, ndrs = s.api("/api/v1/ndrs")
        headers, message = s.api("/api/v1/messages/21")
        assert message["analysis"]["pending"] is True  # not "analysed, nothing found"
        s.proc.kill()  # kill -9 of the server
        s.proc.wait()
    finally:
        os.kill(worker, signal.SIGCONT)
    assert ndrs == []
    assert unanalysed(store) == list(range(1, 22))
    again = Serve(store)  # the queue is read back at start
    try:
        # each read waits (up to a second) for that message's analysis
        for _ in range(30):
            if not again.api("/api/v1/messages/21")[1]["analysis"]["pending"]:
                break
        assert unanalysed(store) == [], "30 s after the restart"
        headers, ndrs = again.api("/api/v1/ndrs")
        assert headers["X-Analysis-Pending"] == "0"
        assert [n["message"]["id"] for n in ndrs] == [21]
        assert ndrs[0]["ndr"]["recipients"][0]["status"] == "5.1.1"
    finally:
        again.stop()


def test_a_dead_worker_is_replaced_and_the_queue_goes_on(store: Path) -> None:
    s = Serve(store)
    try:
        first = s.worker()
        os.kill(first, signal.SIGKILL)
        s.send(DSN, sender="")
        for _ in range(100):
            _, ndrs = s.api("/api/v1/ndrs")
            if ndrs:
                break
        assert [n["message"]["id"] for n in ndrs] == [1]
        assert s.worker() != first
    finally:
        out = s.stop()
    assert "the analysis worker exited with -9; starting another" in out


def test_a_client_reset_right_after_the_dot_leaves_message_and_job(tmp_path: Path) -> None:
    with Harness() as h:
        sock = socket.create_connection((h.host, h.port), timeout=10)
        sock.recv(1000)
        sock.sendall(b"EHLO client.lab.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@lab.test>\r\nDATA\r\n")
        while b"354" not in sock.recv(1000):
            pass
        sock.sendall(DSN + b".\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST at once: the 250 finds nobody
        h.wait_idle()
        [m] = h.messages()
        assert m.is_ndr is True and m.analysis is not None
        assert m.analysis["ndr"]["recipients"][0]["status"] == "5.1.1"


def test_messages_of_an_older_store_without_a_queue_are_analysed(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with Harness(store=path, keep_store=True) as h:
        with smtplib.SMTP(h.host, h.port, local_hostname=HELO) as c:
            c.sendmail("", ["b@lab.test"], DSN)
        h.wait_idle()
    # as a store of an older version left it: no analysis, no queue table
    conn = sqlite3.connect(path)
    conn.execute("UPDATE messages SET analysis = NULL, is_ndr = NULL")
    conn.execute("DROP TABLE analysis_queue")
    conn.execute("DROP TABLE analyses")
    conn.commit()
    conn.close()
    assert unanalysed(path) == [1]
    with Harness(store=path, keep_store=True) as h:
        h.wait_idle()
        [m] = h.messages()
    assert m.is_ndr is True and m.analysis["ndr"]["recipients"][0]["status"] == "5.1.1"


def test_a_large_message_is_analysed_on_its_head_and_says_so() -> None:
    with Harness("scenario: big\nserver: {size_limit: 40MB}\n") as h:
        body = DSN.replace(b"--b--\r\n", b"--b\r\nContent-Type: text/plain\r\n\r\n"
                           + (b"x" * 998 + b"\r\n") * 11_000 + b"--b--\r\n")
        with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=60) as c:
            c.sendmail("", ["b@lab.test"], body)
        h.wait_idle(timeout=60)
        [m] = h.messages()
    assert m.size > 10 * 1024 * 1024
    assert m.analysis is not None and "analysed on its first 1 MB" in m.analysis["partial"]
    assert m.analysis["ndr"]["recipients"][0]["status"] == "5.1.1"
    assert m.analysis["auth"]["dkim"] == []


def test_jobs_of_a_worker_that_went_away_are_taken_over(store: Path) -> None:
    """Jobs claimed by another worker, alive when this server's worker looked
    and gone since (the worker of a killed server, still finishing), are
    taken over: the idle worker is asked again while jobs wait."""
    s = Serve(store)
    worker = s.worker()
    os.kill(worker, signal.SIGSTOP)  # the jobs wait, unclaimed
    try:
        for i in range(3):
            s.send(plain(f"message {i}"))
    finally:
        s.proc.kill()
        s.proc.wait()
        os.kill(worker, signal.SIGKILL)
    d = dialect(store)
    db = d.connect("worker")
    owner = d.take_owner(db)  # another worker, alive: the jobs are its
    db.begin()
    db.execute("UPDATE analysis_queue SET claimed_by = ?", (owner.token,))
    db.commit()
    again = Serve(store)
    try:
        # its worker finds nothing it may claim and says it is idle (nothing
        # outside shows that moment: a second and a half is ten times its look)
        time.sleep(1.5)
        assert unanalysed(store) == [1, 2, 3]
        db.close()
        d.release_owner(owner)  # the other worker is gone
        deadline = time.monotonic() + 20
        while unanalysed(store):
            assert time.monotonic() < deadline, "the jobs were never taken over"
            again.api("/api/v1/messages/3")  # waits up to a second for its analysis
        assert again.api("/api/v1/messages/3")[1]["analysis"]["pending"] is False
    finally:
        again.stop()
