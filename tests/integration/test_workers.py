"""`harness serve --workers 2` as a user runs it: two worker processes on
one port (SO_REUSEPORT), one console, one API, one store; stateful
scenarios decide as one process would; a killed worker is started again
and nothing it acknowledged is lost. On an SQLite store and on PostgreSQL
(a private cluster, tests/conftest.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness.store import Location
from harness.store.db import Reader

HARNESS = [sys.executable, "-m", "harness.cli"]
HELO = "client.lab.test"

COUNTED = "\n".join(["scenario: counted", "rules:"] + [
    f"  - {{name: attempt {n}, on: rcpt, when: {{attempt: {n}}}, "
    f"reply: '451 4.7.1 attempt {n}'}}" for n in range(1, 13)]) + "\n"


@dataclass
class Farm:
    proc: subprocess.Popen[str]
    store: Location
    port: int = 0
    http: int = 0
    pids: list[int] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def read_until(self, pattern: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"serve ended before {pattern!r}: {''.join(self.lines)}")

    def api(self, path: str, body: dict[str, object] | None = None,
            method: str = "GET") -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=60)
        return "".join(self.lines) + out


def start(tmp_path: Path, *args: str, store: Location | None = None) -> Farm:
    store = tmp_path / "h.db" if store is None else store
    proc = subprocess.Popen(
        [*HARNESS, "serve", "--workers", "2", "--listen", "127.0.0.1:0",
         "--http", "127.0.0.1:0", "--store", str(store), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "250"}, start_new_session=True)
    farm = Farm(proc, store)
    line = farm.read_until(r"listening on")
    m = re.search(r"listening on [\d.]+:(\d+) .*2 worker processes", line)
    assert m, line
    farm.port = int(m.group(1))
    m = re.search(r"workers: pids (\d+) (\d+)", farm.read_until(r"workers: pids"))
    assert m
    farm.pids = [int(m.group(1)), int(m.group(2))]
    m = re.search(r"API on http://[\d.]+:(\d+)", farm.read_until(r"API on"))
    assert m
    farm.http = int(m.group(1))
    farm.read_until(r"^store ")
    return farm


@pytest.fixture
def farm_of(tmp_path: Path) -> Iterator[list[Farm]]:
    farms: list[Farm] = []
    yield farms
    for f in farms:
        if f.proc.poll() is None:
            os.killpg(f.proc.pid, signal.SIGKILL)
            f.proc.wait(10)


def rcpt(port: int, to: str = "user@lab.test") -> str:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=10) as c:
        c.ehlo()
        c.mail("app@lab.test")
        code, text = c.rcpt(to)
        return f"{code} {text.decode()}"


def test_attempt_numbers_count_across_workers_without_gaps_or_repeats(
        tmp_path: Path, farm_of: list[Farm], store_at: Location) -> None:
    (tmp_path / "counted.yaml").write_text(COUNTED)
    farm = start(tmp_path, "counted.yaml", store=store_at)
    farm_of.append(farm)
    replies = [rcpt(farm.port) for _ in range(12)]
    assert replies == [f"451 4.7.1 attempt {n}" for n in range(1, 13)]
    out = farm.stop()
    served = set(re.findall(r"served by worker (\d), pid (\d+)", out))
    assert {w for w, _ in served} == {"0", "1"}, "both workers served connections"
    assert "scenario state shared in" in out


def test_greylisting_across_workers_then_accepted_after_the_window(
        tmp_path: Path, farm_of: list[Farm]) -> None:
    (tmp_path / "grey.yaml").write_text("""\
scenario: grey
rules:
  - name: greylist
    on: rcpt
    when: {first_seen: "< 1s"}
    reply: 451 4.7.1 Greylisted, try again later
""")
    farm = start(tmp_path, "grey.yaml")
    farm_of.append(farm)
    first = time.monotonic()
    early = [rcpt(farm.port)]
    seen_by = time.monotonic()  # the pair was first seen before this
    early += [rcpt(farm.port) for _ in range(7)]
    assert time.monotonic() - first < 1.0, "the test's own window passed too soon"
    assert early == ["451 4.7.1 Greylisted, try again later"] * 8
    time.sleep(max(0.0, 1.05 - (time.monotonic() - seen_by)))  # the window is time itself
    assert [rcpt(farm.port) for _ in range(4)] == ["250 2.1.5 Ok"] * 4
    farm.stop()


def test_control_through_the_api_reaches_every_worker(tmp_path: Path,
                                                      farm_of: list[Farm]) -> None:
    farm = start(tmp_path)
    farm_of.append(farm)
    assert rcpt(farm.port, "full@lab.test").startswith("250")
    farm.api("/api/v1/listeners/0/scenario", {"name": "mailbox-full"}, "PUT")
    codes = {rcpt(farm.port, "full@lab.test")[:3] for _ in range(10)}
    assert codes == {"552"}
    farm.api("/api/v1/listeners/0/rules", {"name": "block x", "on": "rcpt",
                                           "when": {"rcpt": "x@lab.test"},
                                           "reply": "550 5.1.1 No such user"}, "POST")
    assert {rcpt(farm.port, "x@lab.test")[:3] for _ in range(10)} == {"550"}
    listeners = farm.api("/api/v1/listeners")
    assert isinstance(listeners, list) and listeners[0]["scenario"]["name"] == "mailbox-full"
    # one store for both; a session's records are committed in the writer's
    # next group, a moment after its client has gone
    deadline = time.monotonic() + 10
    while len(sessions := farm.api("/api/v1/sessions?limit=100")) < 21:  # type: ignore[arg-type]
        assert time.monotonic() < deadline, sessions
        time.sleep(0.05)
    assert isinstance(sessions, list) and len(sessions) == 21
    farm.stop()


def test_a_killed_worker_is_started_again_and_loses_no_acknowledged_message(
        tmp_path: Path, farm_of: list[Farm], store_at: Location) -> None:
    farm = start(tmp_path, "--quiet", store=store_at)
    farm_of.append(farm)
    total, clients, kill_after = 1200, 16, 300
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    killed = threading.Event()
    failures = 0

    def client(n: int) -> None:
        nonlocal failures
        for i in range(total // clients):
            body = (f"Subject: w {n}-{i}\r\nMessage-ID: <{n}-{i}@lab.test>\r\n\r\n"
                    .encode() + os.urandom(16).hex().encode() * 30 + b"\r\n")
            try:
                with smtplib.SMTP("127.0.0.1", farm.port, local_hostname=HELO,
                                  timeout=10) as c:
                    c.sendmail(f"c{n}@lab.test", ["sink@lab.test"], body)
            except (OSError, smtplib.SMTPException):
                with lock:
                    failures += 1
                continue  # the other worker (or the one started again) takes the next
            with lock:
                acked[f"<{n}-{i}@lab.test>"] = body
                if len(acked) >= kill_after and not killed.is_set():
                    killed.set()
                    os.kill(farm.pids[0], signal.SIGKILL)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert killed.is_set() and len(acked) > total * 3 // 4
    out = farm.stop()
    assert re.search(rf"worker 0 \(pid {farm.pids[0]}\) ended \(signal 9\); starting it again",
                     out), out[-2000:]
    with Reader(farm.store) as r:
        messages = r.messages(raw=True)
        if not isinstance(farm.store, str):
            assert tuple(r.execute("PRAGMA integrity_check").fetchone()) == ("ok",)
    stored = {m.message_id: m.raw for m in messages}
    missing = [k for k in acked if k not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    assert all(stored[k] == v for k, v in acked.items())
    ids = [m.id for m in messages]
    assert len(ids) == len(set(ids))


def test_quiet_workers_relay_lines_while_the_page_watches(tmp_path: Path,
                                                          farm_of: list[Farm]) -> None:
    """--quiet: nobody reads the workers' transcript lines, so they are not
    relayed; once the page's live feed is open they are, every one."""
    farm = start(tmp_path, "--quiet")
    farm_of.append(farm)
    assert rcpt(farm.port).startswith("250")  # before anyone watches
    events = urllib.request.urlopen(f"http://127.0.0.1:{farm.http}/api/v1/events", timeout=30)
    try:
        assert events.readline().startswith(b": connected")
        deadline = time.monotonic() + 20
        seen: set[str] = set()
        sent = 0.0
        while not any("watched@lab.test" in x for x in seen):
            assert time.monotonic() < deadline, seen
            if time.monotonic() - sent > 0.5:  # the feed is live once the workers are told
                sent = time.monotonic()
                threading.Thread(target=rcpt, args=(farm.port, "watched@lab.test"),
                                 daemon=True).start()
            line = events.readline()
            while line.strip():
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if event["type"] == "line":
                        seen.add(event["text"])
                line = events.readline()
    finally:
        events.close()
    farm.stop()
