"""Passing accepted messages on (forward:, --forward, handlers=): the
message is captured first and arrives at the next hop byte for byte; a next
hop that is down changes neither the reply nor the capture, and the failure
is recorded and shown. Real servers on loopback on both sides."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.handlers import Proxy

from harness.testing import Harness

HELO = "client.lab.test"


def message(subject: str = "relay me") -> bytes:
    m = EmailMessage()
    m["From"] = "a@lab.test"
    m["To"] = "b@lab.test"
    m["Subject"] = subject
    m.set_content("first line\n.leading dot\nlast line\n")
    return m.as_bytes().replace(b"\n", b"\r\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_forward_in_a_scenario_arrives_byte_for_byte() -> None:
    with Harness() as b:
        with Harness(f"scenario: relay\nforward: {b.host}:{b.port}\n") as a:
            with smtplib.SMTP(a.host, a.port, local_hostname=HELO) as c:
                c.sendmail("a@lab.test", ["b@lab.test", "c@lab.test"], message())
            a.wait_idle()
            [sent] = a.messages()
            [relay] = a.relays()
        [got] = b.messages()
    assert got.raw == sent.raw == message()
    assert (got.mail_from, got.rcpt_tos) == ("a@lab.test", ["b@lab.test", "c@lab.test"])
    assert relay.ok and relay.message_id == sent.id
    assert relay.handler == f"forward to {b.host}:{b.port}"
    assert relay.status.startswith("250 ")


def test_forward_to_a_server_that_is_down_keeps_the_250_and_the_capture() -> None:
    port = free_port()  # nobody listens here
    with Harness(f"scenario: relay\nforward: 127.0.0.1:{port}\n") as a:
        with smtplib.SMTP(a.host, a.port, local_hostname=HELO) as c:
            assert c.sendmail("a@lab.test", ["b@lab.test"], message()) == {}
        a.wait_idle()
        [m] = a.messages()
        [relay] = a.relays()
        [s] = a.sessions()
    assert m.raw == message()
    assert not relay.ok and "Connect" in relay.status
    assert any(e.text.startswith(f"forward to 127.0.0.1:{port}: failed") for e in s.events)


def test_forward_is_only_for_accepted_messages() -> None:
    with Harness() as b:
        spec = (f"scenario: relay\nforward: {b.host}:{b.port}\nrules:\n"
                "  - {name: spam, on: message, when: {body: spam}, reply: 550 5.7.1 Spam}\n")
        with Harness(spec) as a:
            with smtplib.SMTP(a.host, a.port, local_hostname=HELO) as c:
                c.sendmail("a@lab.test", ["b@lab.test"], message("ham"))
                try:
                    c.sendmail("a@lab.test", ["b@lab.test"], message("spam") + b"spam\r\n")
                except smtplib.SMTPDataError as e:
                    assert e.smtp_code == 550
            a.wait_idle()
            assert len(a.messages()) == 2 and len(a.relays()) == 1
        assert [m.subject for m in b.messages()] == ["ham"]


def test_handlers_take_aiosmtpd_handler_objects() -> None:
    """aiosmtpd's own Proxy handler, and a user's, get each accepted message."""
    seen: list[tuple[Any, ...]] = []

    class Recorder:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            seen.append((server.hostname, session.peer[0], session.host_name,
                         envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
            return "250 OK"

    with Harness() as b:
        with Harness(handlers=[Proxy(b.host, b.port), Recorder()]) as a:
            with smtplib.SMTP(a.host, a.port, local_hostname=HELO) as c:
                c.sendmail("a@lab.test", ["b@lab.test"], message())
            a.wait_idle()
            assert sorted((r.handler, r.ok) for r in a.relays()) == [
                ("handler Proxy", True), ("handler Recorder", True)]
        [got] = b.messages()
    # Proxy adds an X-Peer line; the rest is as sent
    assert got.raw == message().replace(b"\r\n\r\n", b"\r\nX-Peer: 127.0.0.1\r\n\r\n", 1)
    assert seen == [("mx.harness.test", "127.0.0.1", HELO, "a@lab.test", ["b@lab.test"],
                     message())]


def test_a_handler_that_fails_is_recorded_not_raised() -> None:
    class Broken:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            raise RuntimeError("downstream is on fire")

    with Harness(handlers=[Broken()]) as a:
        with smtplib.SMTP(a.host, a.port, local_hostname=HELO) as c:
            assert c.sendmail("a@lab.test", ["b@lab.test"], message()) == {}
        a.wait_idle()
        [relay] = a.relays()
        assert len(a.messages()) == 1
    assert not relay.ok and relay.status == "RuntimeError: downstream is on fire"


def test_serve_forward_with_swaks_and_show(tmp_path: Path) -> None:
    """As a user would: `harness serve --forward` to a second `harness serve`;
    swaks delivers to the first; the second has it byte for byte; with the
    second stopped, the first still answers 250 and `harness show` says
    what went wrong."""
    first, second = free_port(), free_port()
    harness = [sys.executable, "-m", "harness.cli"]
    b = subprocess.Popen([*harness, "serve", "--listen", f"127.0.0.1:{second}", "--http", "off",
                          "--store", str(tmp_path / "b.db")],
                         stdout=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    a = subprocess.Popen([*harness, "serve", "--listen", f"127.0.0.1:{first}", "--http", "off",
                          "--store", str(tmp_path / "a.db"), "--forward", f"127.0.0.1:{second}"],
                         stdout=subprocess.PIPE, text=True)
    try:
        started = {}
        for name, proc in (("a", a), ("b", b)):
            assert proc.stdout is not None
            started[name] = proc.stdout.readline()
            assert "listening on" in started[name], started[name]
        assert f"forwarding to 127.0.0.1:{second}" in started["a"]
        swaks = ["swaks", "--server", f"127.0.0.1:{first}", "--helo", HELO, "--from",
                 "a@lab.test", "--to", "b@lab.test", "--header", "Subject: via swaks"]
        assert subprocess.run(swaks, capture_output=True, check=False).returncode == 0
        assert b.stdout is not None
        for line in b.stdout:  # the second's console: the relayed copy arriving
            if "queued as 1" in line:
                break
        b.terminate()
        b.wait(10)
        done = subprocess.run(swaks, capture_output=True, text=True, check=False)
        assert done.returncode == 0 and "250 2.0.0 Ok: queued as 2" in done.stdout
    finally:
        for proc in (a, b):
            proc.terminate()
            proc.wait(10)
    show = [*harness, "show", "--store"]
    one = subprocess.run([*show, str(tmp_path / "a.db"), "m1", "--raw"], capture_output=True,
                         check=True).stdout
    got = subprocess.run([*show, str(tmp_path / "b.db"), "m1", "--raw"], capture_output=True,
                         check=True).stdout
    assert one == got and b"Subject: via swaks" in got
    second_msg = subprocess.run([*show, str(tmp_path / "a.db"), "m2"], capture_output=True,
                                text=True, check=True,
                                env={**os.environ, "COLUMNS": "200"}).stdout
    assert f"forward to 127.0.0.1:{second}: failed" in second_msg
