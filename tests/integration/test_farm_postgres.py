"""Two harness hosts behind one MX name, sharing one PostgreSQL database (a
private cluster, tests/conftest.py): host A on 127.0.0.1, host B on
127.0.0.2, each its own `harness serve` as a user starts it. A pair
greylisted on A is accepted on B after the window; each host reads back
what the other captured; kill -9 of one host under load loses no
acknowledged message and the other goes on serving."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import HARNESS, HELO, ServeProcess

from harness.store.db import Reader

WINDOW = 2.0  # the greylisting window, seconds: short, the test waits it out

GREY = f"""\
scenario: grey
rules:
  - name: greylist
    on: rcpt
    when: {{first_seen: "< {WINDOW:g}s"}}
    reply: 451 4.7.1 Greylisted, try again later
"""


def Host(address: str, store: str, *extra: str, cwd: Path) -> ServeProcess:
    """`harness serve` on one loopback address, its store the shared database
    (a process group of its own: kill -9 takes its analysis worker too)."""
    return ServeProcess(store, *extra, address=address, cwd=cwd, new_session=True)


@pytest.fixture
def hosts(pg_url: str) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for h in started:
        h.kill()


def swaks(host: ServeProcess) -> str:
    """swaks's last reply line before QUIT to a message for user@lab.test."""
    r = subprocess.run(["swaks", "--server", f"{host.address}:{host.smtp}", "--helo", HELO,
                        "--from", "app@lab.test", "--to", "user@lab.test",
                        "--timeout", "20"], capture_output=True, text=True, timeout=60)
    replies = [x[4:] for x in r.stdout.splitlines() if re.match(r"<[-~*]+ +\d{3} ", x)]
    assert replies, r.stdout + r.stderr
    return next((x for x in replies if x[:1] in "45"), replies[-2])


def cli(*args: str) -> str:
    r = subprocess.run([*HARNESS, *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_greylisted_on_host_a_accepted_on_host_b_after_the_window(
        pg_url: str, hosts: list[ServeProcess], tmp_path: Path) -> None:
    (tmp_path / "grey.yaml").write_text(GREY)
    a = Host("127.0.0.1", pg_url, "grey.yaml", cwd=tmp_path)
    hosts.append(a)
    b = Host("127.0.0.2", pg_url, "grey.yaml", cwd=tmp_path)
    hosts.append(b)
    assert "scenario state shared in PostgreSQL" in "".join(a.lines + b.lines)
    assert swaks(a) == "451 4.7.1 Greylisted, try again later"
    seen_by = time.monotonic()  # the pair was first seen before this
    assert swaks(b) == "451 4.7.1 Greylisted, try again later"  # B knows the pair too
    time.sleep(max(0.0, WINDOW + 0.1 - (time.monotonic() - seen_by)))
    assert swaks(b).startswith("250 2.0.0 Ok: queued as")
    # what either host captured, read back from the other and from the CLI
    for host in (a, b):
        sessions = host.get("/api/v1/sessions?limit=10")[1]
        assert sorted(s["listener"].split(":")[0] for s in sessions) == [
            "127.0.0.1", "127.0.0.2", "127.0.0.2"]
        assert len(host.get("/api/v1/messages")[1]) == 1
    listing = cli("sessions", "--store", pg_url)
    assert listing.count("127.0.0.1:") >= 1 and "listener" in listing
    attempts = cli("attempts", "--store", pg_url, "--json")
    timeline = [(x["listener"].split(":")[0], x["code"]) for x in json.loads(attempts)]
    assert timeline == [("127.0.0.1", 451), ("127.0.0.2", 451), ("127.0.0.2", 250)]
    table = cli("attempts", "--store", pg_url, "--rcpt", "user@lab.test")
    assert re.search(r"127\.0\.0\.2:\d+ +app@lab\.test +user@lab\.test +3 ", table), table
    a.stop()
    b.stop()


def test_kill_9_of_one_host_under_load_loses_nothing_and_the_other_serves_on(
        pg_url: str, hosts: list[ServeProcess], tmp_path: Path) -> None:
    """Twenty clients, each trying A then B as a sender tries an MX's
    addresses in turn (half of them start with B); A gets SIGKILL midway.
    Every 250 is in the database, byte for byte; B answered after the kill."""
    a = Host("127.0.0.1", pg_url, "--quiet", cwd=tmp_path)
    hosts.append(a)
    b = Host("127.0.0.2", pg_url, "--quiet", cwd=tmp_path)
    hosts.append(b)
    total, clients, kill_after = 1600, 20, 400
    acked: dict[str, bytes] = {}
    after_kill: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def client(n: int) -> None:
        order = [a, b] if n % 2 else [b, a]
        for i in range(total // clients):
            body = (f"Subject: farm {n}-{i}\r\nMessage-ID: <{n}-{i}@lab.test>\r\n\r\n"
                    .encode() + os.urandom(200).hex().encode() + b"\r\n")
            for host in order:
                try:
                    with smtplib.SMTP(host.address, host.smtp, local_hostname=HELO,
                                      timeout=30) as c:
                        c.sendmail(f"c{n}@lab.test", ["sink@lab.test"], body)
                except (OSError, smtplib.SMTPException):
                    continue  # the next address, as an MTA would
                with lock:
                    acked[f"<{n}-{i}@lab.test>"] = body
                    if killed.is_set():
                        after_kill.append(host.address)
                    elif len(acked) >= kill_after:
                        killed.set()
                        os.killpg(a.proc.pid, signal.SIGKILL)  # serve and its analyst
                break

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert a.proc.wait(10) == -signal.SIGKILL
    assert killed.is_set()
    assert len(after_kill) > 200 and set(after_kill[-50:]) == {"127.0.0.2"}
    assert b.proc.poll() is None
    assert len(b.get("/api/v1/sessions?limit=5")[1]) == 5  # B's API, alive
    b.stop()
    with Reader(pg_url) as r:
        stored = {m.message_id: m.raw for m in r.messages(raw=True)}
    missing = [k for k in acked if k not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    assert all(stored[k] == v for k, v in acked.items())
