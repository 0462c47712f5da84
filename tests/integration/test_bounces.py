"""Bounces on demand over real sockets: a harness whose rule accepts and
later bounces, sending through a second harness (the next hop), which
captures the report; what was sent, skipped or failed is recorded with the
first harness's session (transcript and the `bounces` table); the SMTP reply
is never delayed or changed; `harness serve --bounce-via` and the --config
key do the same from the command line."""

from __future__ import annotations

import json
import os
import re
import smtplib
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.analysis.classify import classify
from harness.analysis.dsn import parse_ndr
from harness.store.bounces import BounceRecord, bounces
from harness.store.db import Reader
from harness.testing import Harness

HELO = "client.sender.test"
ORIGINAL = (b"From: App <app@sender.test>\r\nTo: bounce@lab.test\r\nSubject: Order 42\r\n"
            b"Message-ID: <order-42@sender.test>\r\n\r\nYour order is on its way.\r\n")


def scenario(kind: str = "dsn", extra: str = "status: 5.1.1", after: str = "0s") -> str:
    return textwrap.dedent(f"""\
        scenario: late-bounce
        rules:
          - name: accept then bounce
            on: message
            when: {{rcpt: "bounce*@lab.test"}}
            bounce: {{kind: {kind}, {extra}, after: {after}}}
        """).replace(", ,", ",").replace("{kind: autoreply, , ", "{kind: autoreply, ")


def send(h: Harness, rcpts: list[str], sender: str = "app@sender.test",
         message: bytes = ORIGINAL) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=10) as c:
        return c.sendmail(sender, rcpts, message)


def recorded(h: Harness) -> list[BounceRecord]:
    h.store.sync_barrier()
    with Reader(h.store_path) as r:
        return bounces(r, raw=True)


def info_lines(h: Harness) -> list[str]:
    return [e.text for s in h.sessions() for e in s.events
            if e.direction == "I" and e.text.startswith("bounce")]


def wait_for_outcome(h: Harness, n: int = 1, timeout: float = 10) -> list[BounceRecord]:
    found = h._wait(lambda: recorded(h) if len(recorded(h)) >= n else None, timeout)
    assert found is not None, f"no bounce outcome recorded; transcript: {info_lines(h)}"
    return found


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dsn_goes_to_the_sender_through_the_next_hop_and_reads_back() -> None:
    with Harness() as hop, Harness(scenario(extra='diagnostic: "550 5.1.1 No such user"'),
                                   bounce_via=f"{hop.host}:{hop.port}") as h:
        assert send(h, ["bounce@lab.test", "ok@lab.test"]) == {}  # both accepted
        got = hop.wait_for_message(rcpt="app@sender.test", timeout=10)
        assert got.mail_from == ""  # MAIL FROM:<>, as reports are sent
        assert got.subject == "Delivery failed: Order 42"
        ndr = parse_ndr(got.raw or b"")
        assert ndr is not None
        # the rule names bounce*@lab.test: ok@lab.test is not in the report
        assert [(r.final_recipient, r.status, r.action, r.diagnostic_text)
                for r in ndr.recipients] == [
            ("bounce@lab.test", "5.1.1", "failed", "550 5.1.1 No such user")]
        (rec,) = wait_for_outcome(h)
        assert (rec.kind, rec.status, rec.outcome, rec.recipients, rec.mail_to, rec.rule) == (
            "dsn", "5.1.1", "sent", ["bounce@lab.test"], "app@sender.test", "accept then bounce")
        assert rec.via == f"{hop.host}:{hop.port}"
        assert rec.reply is not None and rec.reply.startswith("250 ")
        assert rec.raw is not None and parse_ndr(rec.raw) is not None
        assert rec.message_id == h.messages()[0].id
        lines = info_lines(h)
        assert lines[0].startswith("bounce scheduled: dsn 5.1.1 about bounce@lab.test to "
                                   "<app@sender.test> in 0s via 127.0.0.1:")
        assert lines[1].startswith("bounce sent: dsn 5.1.1 about bounce@lab.test")
        # the next hop's own analysis flags it as an NDR
        hop.wait_idle()
        stored = hop.messages()[0]
        assert stored.is_ndr is True
        assert stored.analysis is not None
        assert stored.analysis["ndr"]["recipients"][0]["status"] == "5.1.1"


@pytest.mark.parametrize(("kind", "extra", "expect"), [
    ("exchange", "status: 5.2.2", "ndr"),
    ("dsn", "status: 4.2.2", "delay"),
    ("autoreply", "diagnostic: Back on Monday", "autoreply"),
    ("arf", "diagnostic: Marked as spam", "complaint"),
])
def test_each_kind_arrives_and_is_told_apart(kind: str, extra: str, expect: str) -> None:
    with Harness() as hop, Harness(scenario(kind, extra), bounce_via=(hop.host, hop.port)) as h:
        send(h, ["bounce@lab.test"])
        got = hop.wait_for_message(rcpt="app@sender.test", timeout=10)
        c = classify(got.raw or b"")
        assert c.kind == expect, c
        if expect in ("ndr", "delay"):
            assert c.ndr is not None and c.ndr.recipients[0].status == extra.split()[-1]
        else:
            assert parse_ndr(got.raw or b"") is None
        (rec,) = wait_for_outcome(h)
        assert (rec.kind, rec.outcome) == (kind, "sent")


def test_the_reply_is_not_delayed_and_a_waiting_bounce_is_cancelled_at_stop(
        tmp_path: Path) -> None:
    store = tmp_path / "h.db"
    with Harness() as hop:
        h = Harness(scenario(after="1h"), bounce_via=(hop.host, hop.port), store=store).start()
        try:
            # the 250 comes now: the bounce waits in the background
            assert send(h, ["bounce@lab.test"]) == {}
            h.wait_idle()
            assert recorded(h) == []
            assert any(t.startswith("bounce scheduled: dsn 5.1.1") and "in 3600s" in t
                       for t in info_lines(h))
            assert len(h.messages()) == 1
        finally:
            h.stop()
        with Reader(store) as r:
            (rec,) = bounces(r)
        assert rec.outcome == "cancelled"
        assert rec.error == "the harness stopped before the bounce was sent"
        assert hop.messages() == []


def test_a_next_hop_that_is_down_is_recorded_and_loses_nothing() -> None:
    with Harness(scenario(), bounce_via=("127.0.0.1", free_port())) as h:
        assert send(h, ["bounce@lab.test"]) == {}
        (rec,) = wait_for_outcome(h)
        assert rec.outcome == "failed"
        assert rec.error is not None and "Error connecting" in rec.error
        assert rec.raw is not None  # what would have been sent
        assert len(h.messages()) == 1  # the capture is there
        assert any(t.startswith("bounce failed: dsn 5.1.1") for t in info_lines(h))
        h.check()  # nothing raised inside the server


def test_without_a_next_hop_the_bounce_is_recorded_as_not_sent() -> None:
    with Harness(scenario()) as h:
        send(h, ["bounce@lab.test"])
        (rec,) = wait_for_outcome(h)
        assert rec.outcome == "failed" and rec.via is None
        assert rec.error is not None and "--bounce-via" in rec.error


def test_a_refusing_next_hop_is_recorded_with_its_reply() -> None:
    refuse = "rules:\n  - on: rcpt\n    reply: 550 5.7.1 Relaying denied\n"
    with Harness(refuse) as hop, Harness(scenario(), bounce_via=(hop.host, hop.port)) as h:
        send(h, ["bounce@lab.test"])
        (rec,) = wait_for_outcome(h)
        assert rec.outcome == "failed"
        assert rec.error == "the next hop refused the recipient: 550 5.7.1 Relaying denied"


def test_no_report_about_a_null_sender_message() -> None:
    with Harness() as hop, Harness(scenario(), bounce_via=(hop.host, hop.port)) as h:
        send(h, ["bounce@lab.test"], sender="")
        (rec,) = wait_for_outcome(h)
        assert rec.outcome == "skipped" and rec.raw is None
        assert rec.error is not None and "null sender" in rec.error
        assert hop.messages() == []


def test_no_bounce_for_a_message_the_rule_did_not_decide() -> None:
    with Harness() as hop, Harness(scenario(), bounce_via=(hop.host, hop.port)) as h:
        send(h, ["other@lab.test"])
        h.wait_idle()
        assert recorded(h) == [] and info_lines(h) == []


def test_a_bounce_rule_added_in_code_works_like_one_in_a_file() -> None:
    with Harness() as hop, Harness(bounce_via=(hop.host, hop.port)) as h:
        h.add_rule(on="message", name="ooto", when={"rcpt": "ooto@lab.test"},
                   bounce={"kind": "autoreply"})
        send(h, ["ooto@lab.test"])
        got = hop.wait_for_message(rcpt="app@sender.test", timeout=10)
        assert classify(got.raw or b"").kind == "autoreply"
        h.verify(rule="ooto", count=1)


def test_reset_forgets_recorded_bounces_with_the_sessions() -> None:
    with Harness(scenario()) as h:
        send(h, ["bounce@lab.test"])
        wait_for_outcome(h)
        h.reset()
        assert recorded(h) == []


# ------------------------------------------------------------ the command line

HARNESS = [sys.executable, "-m", "harness.cli"]


def test_serve_bounce_via_and_the_config_key(tmp_path: Path) -> None:
    (tmp_path / "late.yaml").write_text(scenario(extra='diagnostic: "550 5.1.1 Unknown"'))
    with Harness() as hop:
        for how in ("flag", "config"):
            store = tmp_path / f"{how}.db"
            if how == "flag":
                args = ["late.yaml", "--listen", "127.0.0.1:0",
                        "--bounce-via", f"{hop.host}:{hop.port}"]
            else:
                (tmp_path / "serve.yaml").write_text(
                    f"bounce_via: {hop.host}:{hop.port}\n"
                    "listeners:\n  - {listen: 127.0.0.1:0, scenario: late.yaml}\n")
                args = ["--config", "serve.yaml"]
            proc = subprocess.Popen(
                [*HARNESS, "serve", *args, "--http", "off", "--store", str(store)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                env={**os.environ, "COLUMNS": "200"})
            try:
                assert proc.stdout is not None
                lines = []
                for line in proc.stdout:
                    lines.append(line)
                    if "Ctrl-C stops" in line:
                        break
                text = "".join(lines)
                port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
                assert f"rules' bounces are sent via {hop.host}:{hop.port}" in text
                with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=10) as c:
                    c.sendmail("app@sender.test", ["bounce@lab.test"], ORIGINAL)
                for line in proc.stdout:  # the live output shows the bounce
                    if "bounce sent: dsn 5.1.1" in line:
                        break
                got = hop.wait_for_message(rcpt="app@sender.test", timeout=10)
                ndr = parse_ndr(got.raw or b"")
                assert ndr is not None and ndr.recipients[0].status == "5.1.1"
                hop.reset()
            finally:
                proc.terminate()
                proc.wait(20)
            shown = subprocess.run([*HARNESS, "show", "1", "--json", "--store", str(store)],
                                   capture_output=True, text=True, timeout=30)
            texts = [e["text"] for e in json.loads(shown.stdout)["transcript"]]
            assert any(t.startswith("bounce sent: dsn 5.1.1") for t in texts), texts


def test_serve_rejects_a_bad_bounce_via(tmp_path: Path) -> None:
    r = subprocess.run([*HARNESS, "serve", "--bounce-via", "mx.example:25", "--http", "off",
                        "--store", str(tmp_path / "s.db")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("harness: error: --bounce-via: bad address")
