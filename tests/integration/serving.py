"""`harness serve` run as a user runs it, for the integration tests: a
subprocess on an ephemeral loopback port whose console is read line by line
(the SMTP and HTTP ports it prints are noted), its API read with urllib, and
one message sent with smtplib."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HARNESS = [sys.executable, "-m", "harness.cli"]
HELO = "client.lab.test"


class ServeProcess:
    """`harness serve --listen ADDRESS:0 --http ADDRESS:0 --store STORE ...`,
    read until its console says `store ...` (the last line of its start)."""

    def __init__(self, store: str | Path, *extra: str, address: str = "127.0.0.1",
                 cwd: Path | None = None, new_session: bool = False) -> None:
        self.address = address
        self.proc = subprocess.Popen(
            [*HARNESS, "serve", *extra, "--listen", f"{address}:0", "--http", f"{address}:0",
             "--store", str(store)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
            env={**os.environ, "COLUMNS": "300"}, start_new_session=new_session)
        self.lines: list[str] = []
        self.smtp = self.http = 0
        self.read_until(r"^store ")

    def read_until(self, pattern: str) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := re.search(r"listening on [\d.]+:(\d+)", line):
                self.smtp = int(m.group(1))
            if m := re.search(r"API on http://[\d.]+:(\d+)", line):
                self.http = int(m.group(1))
            if re.search(pattern, line):
                return line
        raise AssertionError(f"serve ended before {pattern!r}: {''.join(self.lines)}")

    def get(self, path: str) -> tuple[int, Any]:
        """The API's status and JSON body for a GET."""
        try:
            with urllib.request.urlopen(f"http://{self.address}:{self.http}{path}",
                                        timeout=30) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def send(self, subject: str, size: int = 2_000) -> str:
        """The reply to the message's data: "250 ..." or "452 ..."."""
        body = f"Subject: {subject}\r\n\r\n".encode() + b"x" * size + b"\r\n"
        with smtplib.SMTP(self.address, self.smtp, local_hostname=HELO, timeout=30) as s:
            s.ehlo()
            s.mail("app@lab.test")
            s.rcpt("user@harness.test")
            code, text = s.data(body)
            return f"{code} {text.decode()}"

    def stop(self) -> str:
        """Ctrl-C, and the whole console."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=60)
        self.lines.append(out)
        return "".join(self.lines)

    def kill(self) -> None:
        """SIGKILL (of its process group, when it has one of its own)."""
        if self.proc.poll() is None:
            if self.proc.pid == os.getpgid(self.proc.pid):
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        self.proc.wait(10)
