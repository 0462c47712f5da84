"""Bounces on demand end to end with a real MTA: a private Postfix relays a
message to `harness serve` (a process, as a user starts it), whose rule
accepts it and later bounces it through `--bounce-via` to a second harness;
the second captures the DSN, and `harness explain` reads it back as the
rule's status for that recipient."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.lab.postfix import PostfixLab
from harness.testing import Harness

pytestmark = pytest.mark.slow

HARNESS = [sys.executable, "-m", "harness.cli"]
SENDER = "app@sender.test"

LATE_BOUNCE = textwrap.dedent("""\
    scenario: late-bounce
    summary: A gateway that accepts, then bounces unknown users a moment later
    rules:
      - name: unknown user, found out later
        on: message
        when: {rcpt: gone@lab.test}
        bounce: {kind: dsn, diagnostic: "550 5.1.1 <gone@lab.test>: mailbox unavailable",
                 after: 500ms}
    """)


def test_postfix_relays_the_harness_bounces_later_and_explain_reads_the_status(
        tmp_path: Path, lab_harness: Callable[..., Harness],
        postfix_lab: Callable[..., PostfixLab]) -> None:
    mailbox = lab_harness()  # the next hop: where the sender's mail (the DSN) lands
    (tmp_path / "late-bounce.yaml").write_text(LATE_BOUNCE)
    serve = subprocess.Popen(
        [*HARNESS, "serve", "late-bounce.yaml", "--listen", "127.0.0.1:0", "--http", "off",
         "--bounce-via", f"{mailbox.host}:{mailbox.port}", "--store", "gateway.db"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "COLUMNS": "200"})
    try:
        assert serve.stdout is not None
        seen = []
        for line in serve.stdout:
            seen.append(line)
            if "Ctrl-C stops" in line:
                break
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", "".join(seen))
        assert m, "".join(seen)
        pf = postfix_lab(("127.0.0.1", int(m.group(1))))
        message = (f"From: App <{SENDER}>\r\nTo: <gone@lab.test>\r\nSubject: Welcome\r\n"
                   "Message-ID: <welcome-1@sender.test>\r\n\r\nHello!\r\n").encode()
        pf.submit(SENDER, ["gone@lab.test"], message)
        pf.wait_queue_empty(timeout=15)  # the gateway said 250: Postfix is done
        assert pf.failures() == []
        got = mailbox.wait_for_message(rcpt=SENDER, timeout=15)
        for line in serve.stdout:  # the gateway says it sent the bounce
            seen.append(line)
            if "bounce sent: dsn 5.1.1" in line:
                break
    finally:
        serve.terminate()
        serve.communicate(timeout=20)
    assert got.mail_from == ""  # a DSN travels with a null reverse-path
    dsn = tmp_path / "bounce.eml"
    dsn.write_bytes(got.raw or b"")
    r = subprocess.run([*HARNESS, "explain", str(dsn), "--json"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    explained = json.loads(r.stdout)
    assert explained["kind"] == "ndr"
    (rcpt,) = explained["ndr"]["recipients"]
    assert (rcpt["recipient"], rcpt["status"], rcpt["action"]) == (
        "gone@lab.test", "5.1.1", "failed")
    assert rcpt["diagnostic_text"] == "550 5.1.1 <gone@lab.test>: mailbox unavailable"
    assert explained["ndr"]["original"]["message_id"] == "<welcome-1@sender.test>"
    # the gateway recorded what it sent, with the session Postfix opened
    shown = subprocess.run([*HARNESS, "show", "1", "--json", "--store",
                            str(tmp_path / "gateway.db")], capture_output=True, text=True,
                           timeout=30)
    transcript = [e["text"] for e in json.loads(shown.stdout)["transcript"]]
    assert any(t.startswith("bounce sent: dsn 5.1.1 about gone@lab.test to <app@sender.test>")
               for t in transcript), transcript
