"""The farm docs/scaling.md describes, run: HAProxy (Debian's package, a
private instance on loopback) with the docs' own backend section in front
of two harness hosts (127.0.0.1 and 127.0.0.2, --proxy-protocol) that share
a PostgreSQL store. Sessions reach both hosts, and each records the real
client's address (sent as 127.0.0.9), not the balancer's."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import ServeProcess
from test_farm_postgres import Host

from harness.store.db import Reader

DOC = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"
CLIENT = "127.0.0.9"  # the sender's own address, as the harness should see it


def docs_config(frontend: tuple[str, int], servers: list[tuple[str, int]]) -> str:
    """The docs' HAProxy block, its addresses made loopback ones."""
    section = DOC.read_text().split("## A harness farm", 1)[1]
    block = re.search(r"```text\n(\s*frontend smtp\n.*?)```", section, re.S)
    assert block, "docs/scaling.md has no HAProxy block"
    lines = [x.strip() for x in block.group(1).splitlines()]
    out = ["global", "    log stderr local0 warning", "defaults", "    timeout connect 5s",
           "    timeout client 60s", "    timeout server 60s"]
    n = 0
    for line in lines:
        if line.startswith("bind "):
            line = f"bind {frontend[0]}:{frontend[1]}"
        elif line.startswith("server "):
            name, _, *rest = line.split()[1:]
            host, port = servers[n]
            n += 1
            line = " ".join(["server", name, f"{host}:{port}", *rest])
        out.append(("    " if not line.startswith(("frontend", "backend")) else "") + line)
    assert n == len(servers) == 2
    return "\n".join(out) + "\n"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def hosts(pg_url: str) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for h in started:
        h.kill()


def test_haproxy_from_the_docs_spreads_sessions_and_passes_the_client_on(
        pg_url: str, hosts: list[ServeProcess], tmp_path: Path) -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.access(haproxy, os.X_OK):
        pytest.fail("haproxy is not installed (the README's test command installs it)")
    for address in ("127.0.0.1", "127.0.0.2"):
        hosts.append(Host(address, pg_url, "--proxy-protocol", cwd=tmp_path))
    front = ("127.0.0.3", free_port("127.0.0.3"))
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(docs_config(front, [(h.address, h.smtp) for h in hosts]))
    check = subprocess.run([haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    proxy = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:  # until HAProxy listens (it says nothing when it does)
            try:
                socket.create_connection(front, timeout=1).close()
                break
            except OSError:
                assert proxy.poll() is None and time.monotonic() < deadline, \
                    proxy.communicate()[0]
                time.sleep(0.05)
        for i in range(8):
            with smtplib.SMTP(*front, local_hostname="client.lab.test", timeout=20,
                              source_address=(CLIENT, 0)) as c:
                c.sendmail("app@lab.test", ["user@lab.test"],
                           f"Subject: via the balancer {i}\r\n\r\nhello\r\n".encode())
    finally:
        proxy.terminate()
        proxy.wait(10)
    for h in hosts:
        h.stop()
    with Reader(pg_url) as r:
        sessions = r.sessions(with_events=False)
        messages = r.messages()
    real = [s for s in sessions if s.message_ids]
    assert len(real) == 8 and len(messages) == 8
    assert {s.peer_ip for s in real} == {CLIENT}  # not 127.0.0.3, the balancer
    assert {s.listener.split(":")[0] for s in real} == {"127.0.0.1", "127.0.0.2"}
