"""`harness serve` as a process, driven by real clients: the CLI round trip,
swaks, Ctrl-C, and kill -9 under load (every 250-acknowledged message must be
in the store byte for byte)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

HARNESS = [sys.executable, "-m", "harness.cli"]
HELO = "client.lab.test"


class Served:
    def __init__(self, proc: subprocess.Popen[str], host: str, port: int, store: Path) -> None:
        self.proc, self.host, self.port, self.store = proc, host, port, store
        self.lines: list[str] = []

    def read_until(self, pattern: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"serve ended before {pattern!r}: {''.join(self.lines)}")


def start_serve(tmp_path: Path, *args: str) -> Served:
    store = tmp_path / "store.db"
    proc = subprocess.Popen(
        [*HARNESS, "serve", *args, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
         "--store", str(store)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"})
    s = Served(proc, "", 0, store)
    line = s.read_until(r"listening on")
    m = re.search(r"listening on ([\d.]+):(\d+)", line)
    assert m, line
    s.host, s.port = m.group(1), int(m.group(2))
    return s


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    marker = request.node.get_closest_marker("serve_args")
    s = start_serve(tmp_path, *(marker.args if marker else ()))
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait()


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=60, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.serve_args("mailbox-full")
def test_serve_swaks_gets_552_and_sessions_show_the_transcript(served: Served) -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed: run the README's test command"
    r = subprocess.run([swaks, "--server", f"{served.host}:{served.port}", "--helo", HELO,
                        "--from", "sender@lab.test", "--to", "full@lab.test"],
                       capture_output=True, text=True, timeout=30)
    assert "<** 552 5.2.2" in r.stdout
    # live output: one line per reply, with the rule that decided it
    line = served.read_until(r"RCPT TO")
    assert "552 5.2.2" in line and "[mailbox full]" in line
    served.proc.send_signal(signal.SIGINT)
    out, _ = served.proc.communicate(timeout=20)
    assert served.proc.returncode == 0
    assert "stopped: 1 sessions, 0 messages" in out

    sessions = json.loads(cli("sessions", "--json", "--store", str(served.store)).stdout)
    [s] = sessions
    assert s["helo"] == HELO
    assert s["peer"]["ip"] == "127.0.0.1"
    assert s["envelope"] == {"mail_from": ["sender@lab.test"], "rcpt_tos": ["full@lab.test"]}
    said = [(e["direction"], e["text"]) for e in s["transcript"] if e["direction"] != "I"]
    assert ("C", "RCPT TO:<full@lab.test>") in said
    assert any(d == "S" and t.startswith("552 5.2.2") for d, t in said)

    shown = cli("show", str(s["id"]), "--store", str(served.store))
    assert shown.returncode == 0
    assert "C: RCPT TO:<full@lab.test>" in shown.stdout
    assert "S: 552 5.2.2" in shown.stdout and "mailbox full" in shown.stdout
    table = cli("sessions", "--store", str(served.store))
    assert "full@lab.test" in table.stdout


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_serve_on_either_event_loop(tmp_path: Path, loop: str) -> None:
    """uvloop is an optional extra (installed by the test command): both
    loops serve the same conversation, pipelining and a half-close included."""
    s = start_serve(tmp_path, "--loop", loop)
    try:
        with socket.create_connection((s.host, s.port), timeout=5) as c:
            c.sendall(b"EHLO client.lab.test\r\nMAIL FROM:<a@lab.test>\r\n"
                      b"RCPT TO:<b@lab.test>\r\nDATA\r\n")
            c.sendall(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
            c.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := c.recv(65536):
                got += chunk
        assert b"250 2.0.0 Ok: queued as 1" in got and got.endswith(b"221 2.0.0 Bye\r\n")
    finally:
        s.proc.send_signal(signal.SIGINT)
        s.proc.communicate(timeout=20)
    assert s.proc.returncode == 0


def test_serve_messages_json_and_show_raw(served: Served) -> None:
    body = b"Subject: Hello there\r\nMessage-ID: <x1@lab.test>\r\n\r\nbody\r\n"
    with smtplib.SMTP(served.host, served.port, local_hostname=HELO, timeout=5) as c:
        c.sendmail("a@lab.test", ["b@lab.test", "c@lab.test"], body)
    served.read_until(r"queued as")
    msgs = json.loads(cli("messages", "--json", "--store", str(served.store)).stdout)
    assert [(m["mail_from"], m["rcpt_tos"], m["size"], m["subject"], m["message_id"])
            for m in msgs] == [("a@lab.test", ["b@lab.test", "c@lab.test"], len(body),
                                "Hello there", "<x1@lab.test>")]
    raw = subprocess.run([*HARNESS, "show", f"m{msgs[0]['id']}", "--raw", "--store",
                          str(served.store)], capture_output=True, timeout=60)
    assert raw.stdout == body


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    r = cli("show", "7", "--store", str(tmp_path / "none.db"))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "no store" in r.stderr
    r = cli("serve", "no-such-scenario", "--store", str(tmp_path / "s.db"))
    assert r.returncode == 1 and "no scenario named" in r.stderr and "Traceback" not in r.stderr


def test_check_prints_every_problem_with_positions(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "summary: three mistakes\n"
        "rules:\n"
        "  - on: rcpt\n"
        "    whn: {rcpt: a@b}\n"         # misspelt key
        "    reply: 550 5.1.1 no\n"
        "  - on: rcpt\n"
        "    reply: 550 4.1.1 mismatch\n"  # class disagrees
        "  - on: mial\n"                   # unknown phase
        "    reply: 451 4.7.1 later\n")
    r = cli("check", str(bad))
    assert r.returncode == 1
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith(f"{bad}:4:5: unknown key whn") and "did you mean when?" in lines[0]
    assert lines[1].startswith(f"{bad}:7:12: reply:")
    assert lines[2].startswith(f"{bad}:8:9: on cannot be 'mial'") and "mail" in lines[2]
    ok = cli("check", "mailbox-full", "accept")
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_scenarios_lists_the_library() -> None:
    r = cli("scenarios", "--json")
    names = {s["name"] for s in json.loads(r.stdout)}
    assert {"accept", "mailbox-full"} <= names


def test_kill_9_under_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    """20 concurrent clients send up to 2,000 messages; serve is killed with
    SIGKILL midway. Every message that got a 250 must be in the store, byte for
    byte, and the database must open cleanly."""
    s = start_serve(tmp_path, "--quiet")
    total, clients, kill_after = 2000, 20, 600
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    killed = threading.Event()

    def client(n: int) -> None:
        for i in range(total // clients):
            if killed.is_set():
                return
            body = (f"Subject: crash {n}-{i}\r\nMessage-ID: <{n}-{i}@lab.test>\r\n\r\n"
                    .encode() + os.urandom(16).hex().encode() * 30 + b"\r\n")
            try:
                with smtplib.SMTP(s.host, s.port, local_hostname=HELO, timeout=10) as c:
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
        t.join(120)
    s.proc.wait(10)
    assert s.proc.returncode == -signal.SIGKILL
    assert len(acked) >= kill_after

    db = sqlite3.connect(s.store)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = dict(db.execute("SELECT message_id, raw FROM messages"))
    missing = [k for k in acked if k not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    assert all(stored[k] == v for k, v in acked.items())
    db.close()


def _serve_many(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], list[tuple[str, int]],
                                                        list[str]]:
    proc = subprocess.Popen([*HARNESS, "serve", "--quiet", "--http", "off",
                             "--store", str(tmp_path / "s.db"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    assert proc.stdout is not None
    addrs, lines = [], []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"listening on ([\d.]+):(\d+)", line)
        if m:
            addrs.append((m.group(1), int(m.group(2))))
        if line.startswith("store "):
            break
    return proc, addrs, lines


def test_serve_several_listeners_each_with_its_own_scenario(tmp_path: Path) -> None:
    proc, addrs, lines = _serve_many(tmp_path, "--listen", "127.0.0.1:0=service-unavailable",
                                     "--listen", "127.0.0.2:0=accept")
    try:
        assert len(addrs) == 2, lines
        (h1, p1), (h2, p2) = addrs
        assert "service-unavailable" in lines[0] and "scenario accept" in lines[1]
        with pytest.raises(smtplib.SMTPConnectError) as e:
            smtplib.SMTP(h1, p1, local_hostname=HELO, timeout=5)
        assert e.value.smtp_code == 421
        with smtplib.SMTP(h2, p2, local_hostname=HELO, timeout=5) as c:
            c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: mx2\r\n\r\nx\r\n")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    sessions = json.loads(cli("sessions", "--json", "--store", str(tmp_path / "s.db")).stdout)
    assert sorted(s["listener"] for s in sessions) == sorted(f"{h}:{p}" for h, p in addrs)
    assert sorted(s["scenario"] for s in sessions) == ["accept", "service-unavailable"]


def test_serve_config_file_with_an_implicit_tls_listener(tmp_path: Path) -> None:
    import ssl

    (tmp_path / "lab.yaml").write_text(
        "store: captures.db\n"
        "listeners:\n"
        "  - {listen: '127.0.0.1:0', scenario: mailbox-full}\n"
        "  - {listen: '127.0.0.1:0', scenario: accept, tls: implicit}\n")
    proc, addrs, lines = _serve_many(tmp_path, "--config", str(tmp_path / "lab.yaml"))
    try:
        assert len(addrs) == 2, lines
        assert "implicit TLS" in lines[1]
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with smtplib.SMTP_SSL(*addrs[1], local_hostname=HELO, timeout=5, context=ctx) as c:
            c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: 465\r\n\r\nx\r\n")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=20)
    assert (tmp_path / "captures.db").is_file()
    msgs = json.loads(cli("messages", "--json", "--store", str(tmp_path / "captures.db")).stdout)
    assert [m["subject"] for m in msgs] == ["465"]
