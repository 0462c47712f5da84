"""DKIM and DMARC of a message over AUTH_APART are checked in a process of
their own (harness.analysis.auth_process: dkimpy canonicalizes the body in
Python, holding the interpreter lock, which in a thread held the event
loop), on real sockets; the verdicts and the Authentication-Results line are
those of the thread's checks."""

from __future__ import annotations

import base64
import os
import random
import re
import signal
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.probe.message import dkim_sign
from harness.smtp.transport import AUTH_APART
from harness.testing import Harness


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    der = k.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def _scenario(public: str) -> str:
    return f"""scenario: dkim-large
dns:
  s1._domainkey.lab.test: {{TXT: ["v=DKIM1; k=rsa; p={public}"]}}
  _dmarc.lab.test: {{TXT: ["v=DMARC1; p=reject"]}}
rules:
  - name: signed
    on: message
    when: {{dkim: pass, dmarc: pass}}
    reply: 250 2.0.0 Signed and aligned
  - name: not signed well
    on: message
    when: {{dmarc: fail}}
    reply: 550 5.7.26 This message failed DMARC
"""


def _message(pem: bytes, size: int, *, tamper: bool = False) -> bytes:
    rng = random.Random(size)
    lines = b"".join(base64.b64encode(rng.randbytes(57)) + b"\r\n"
                     for _ in range(size // 78 + 1))
    body = (b"From: sender@lab.test\r\nTo: user@lab.test\r\nSubject: large\r\n\r\n"
            + lines)
    signed = dkim_sign(body, key_pem=pem, selector="s1", domain="lab.test")  # as probe signs
    return signed.replace(b"Subject: large", b"Subject: LARGE") if tamper else signed


def _send(h: Harness, content: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP(h.host, h.port, local_hostname="client.lab.test", timeout=60) as c:
        c.ehlo()
        c.mail("sender@lab.test")
        c.rcpt("user@lab.test")
        return c.data(content)


@pytest.mark.parametrize("size", [1000, AUTH_APART * 2])
def test_dkim_and_dmarc_verdicts_small_and_large(key: tuple[bytes, str], size: int) -> None:
    pem, public = key
    with Harness(_scenario(public)) as h:
        assert _send(h, _message(pem, size)) == (250, b"2.0.0 Signed and aligned")
        assert _send(h, _message(pem, size, tamper=True)) == (
            550, b"5.7.26 This message failed DMARC")
        # the large ones went to the checks' process; the small ones did not
        assert (h.ctx.auth_checker is not None) == (size > AUTH_APART)
        h.wait_idle()
        notes = [e.text for s in h.sessions() for e in s.events
                 if e.text.startswith("Authentication-Results:")]
        assert len(notes) == 2
        assert "dkim=pass" in notes[0] and "dmarc=pass" in notes[0]
        assert "dkim=fail" in notes[1] and "dmarc=fail" in notes[1]
    assert h.ctx.auth_checker is None  # shut down with the listener


def test_a_killed_checks_process_is_replaced(key: tuple[bytes, str]) -> None:
    # the checks' process dies (killed, out of memory) between two large
    # messages: the next check runs in a new one, with the right verdict
    pem, public = key
    with Harness(_scenario(public)) as h:
        assert _send(h, _message(pem, AUTH_APART * 2)) == (250, b"2.0.0 Signed and aligned")
        checker = h.ctx.auth_checker
        assert checker is not None and checker.started == 1 and checker.pid is not None
        os.kill(checker.pid, signal.SIGKILL)
        assert _send(h, _message(pem, AUTH_APART * 2, tamper=True)) == (
            550, b"5.7.26 This message failed DMARC")
        assert checker.started == 2 and checker.pid is not None
    assert checker.pid is None  # ended with the listener


def test_ctrl_c_to_the_process_group_stops_serve_and_its_checks_process_quietly(
        key: tuple[bytes, str], tmp_path: Path) -> None:
    # a terminal's Ctrl-C reaches every process of the group: the checks'
    # process leaves the stopping to the server (no traceback of its own)
    pem, public = key
    (tmp_path / "s.yaml").write_text(_scenario(public))
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "serve", str(tmp_path / "s.yaml"),
         "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--store", str(tmp_path / "s.db")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"listening on ([\d.]+):(\d+)", line)
            if m:
                break
        else:
            raise AssertionError("serve did not start")
        with smtplib.SMTP(m.group(1), int(m.group(2)), local_hostname="client.lab.test",
                          timeout=60) as c:
            c.ehlo()
            c.mail("sender@lab.test")
            c.rcpt("user@lab.test")
            assert c.data(_message(pem, AUTH_APART * 2)) == (250, b"2.0.0 Signed and aligned")
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "stopped: 1 sessions, 1 messages" in out


def test_what_the_check_raises_in_its_process_is_raised_here() -> None:
    from harness.analysis.auth_process import AuthProcess

    checker = AuthProcess()
    try:
        with pytest.raises(ValueError, match="BOGUS"):
            checker.check([b"Subject: x\r\n\r\nx\r\n"], {"lab.test": {"BOGUS": ["1"]}},
                          client_ip="127.0.0.1", helo="c.lab.test", mail_from="a@lab.test",
                          hostname="mx.harness.test")
        ok = checker.check([b"From: a@lab.test\r\n", b"\r\nx\r\n"], {}, client_ip="127.0.0.1",
                           helo="c.lab.test", mail_from="a@lab.test", hostname="mx.harness.test")
        assert ok.dkim_result == "none" and ok.dmarc.result == "none"
        assert checker.started == 1  # the same process answered both
    finally:
        checker.close()


def test_a_script_without_a_main_guard_runs_once(key: tuple[bytes, str], tmp_path: Path) -> None:
    # (multiprocessing's spawn would import the script again in its child,
    # starting a second harness: the checks' process is no such child)
    pem, public = key
    script = tmp_path / "lab.py"
    script.write_text(f"""
import smtplib, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_auth_large_messages import _message, _scenario
from harness.probe.message import dkim_sign
from harness.smtp.transport import AUTH_APART
from harness.testing import Harness
print("script ran", flush=True)
with Harness(_scenario({public!r})) as h:
    with smtplib.SMTP(h.host, h.port, local_hostname="c.lab.test", timeout=60) as c:
        c.ehlo(); c.mail("sender@lab.test"); c.rcpt("user@lab.test")
        print(c.data(_message({pem!r}, AUTH_APART * 2))[0], flush=True)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["script", "ran", "250"], done.stdout + done.stderr
