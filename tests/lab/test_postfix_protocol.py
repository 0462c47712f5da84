"""Postfix against the protocol features: STARTTLS (and broken TLS), DSN
parameters passed on, MX failover between two listeners."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow

SENDER = "sender@lab.test"
WAIT = 15.0


def message(rcpt: str, subject: str) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            "Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.lab.test>\r\n\r\n"
            "body\r\n").encode()


def test_postfix_delivers_over_starttls_and_the_session_shows_the_version(
        lab_harness, postfix_lab):
    h = lab_harness()  # STARTTLS offered by default with a made certificate
    pf = postfix_lab(h, settings={"smtp_tls_security_level": "may",
                                  "smtp_tls_loglevel": "1"})
    pf.submit_smtp(SENDER, ["user@lab.test"], message("user@lab.test", "over tls"))
    pf.wait_queue_empty(WAIT)
    h.wait_idle()
    [m] = h.messages()
    [s] = [s for s in h.sessions() if m.id in s.message_ids]
    assert s.tls_version in ("TLSv1.2", "TLSv1.3")
    assert s.extensions["starttls"] is True
    assert "Anonymous TLS connection established" in pf.maillog() or \
        "Untrusted TLS connection established" in pf.maillog()


TLS_FAIL = """
rules:
  - name: broken tls
    on: starttls
    fault: tls_fail
"""


def test_postfix_may_falls_back_to_plaintext_after_tls_fail(lab_harness, postfix_lab):
    """At security level `may`, a failed handshake makes Postfix try again in
    plaintext (it logs the TLS failure); the message is delivered unencrypted."""
    h = lab_harness(TLS_FAIL)
    pf = postfix_lab(h, settings={"smtp_tls_security_level": "may"})
    pf.submit_smtp(SENDER, ["user@lab.test"], message("user@lab.test", "fallback"))
    pf.wait_queue_empty(WAIT)
    h.wait_idle()
    sessions = h.sessions()
    broken = [s for s in sessions if (s.end_reason or "").startswith("tls_fail")]
    delivered = [s for s in sessions if s.message_ids]
    assert broken and delivered
    assert delivered[0].tls_version is None  # the retry was in plaintext
    assert "starttls" not in delivered[0].extensions
    assert broken[0].started_at <= delivered[0].started_at


def test_postfix_encrypt_defers_after_tls_fail(lab_harness, postfix_lab):
    """At level `encrypt` Postfix must not send in plaintext: it defers."""
    h = lab_harness(TLS_FAIL)
    pf = postfix_lab(h, settings={"smtp_tls_security_level": "encrypt"})
    qid = pf.submit_smtp(SENDER, ["user@lab.test"], message("user@lab.test", "no fallback"))
    entry = pf.wait_deferred(qid, WAIT)
    reason = entry.reason or ""
    assert "TLS" in reason or "handshake" in reason, reason
    assert h.messages() == []


def test_sendmail_dsn_notify_envid_and_orcpt_are_recorded_as_sent(lab_harness, postfix_lab):
    h = lab_harness()
    pf = postfix_lab(h)
    pf.submit_sendmail(SENDER, ["user@lab.test"], message("user@lab.test", "dsn options"),
                       dsn_notify=["success", "delay", "failure"], envid="lab-env 42")
    pf.wait_queue_empty(WAIT)
    [m] = h.messages(rcpt="user@lab.test")
    assert "ENVID=lab-env+2042" in m.mail_options  # xtext as sent on the wire
    [opts] = m.rcpt_options
    # Postfix writes NOTIFY in its own order; the harness keeps what it sent
    assert set(opts.split()) == {"NOTIFY=SUCCESS,FAILURE,DELAY", "ORCPT=rfc822;user@lab.test"}
    assert m.dsn["envid"] == "lab-env 42"  # decoded
    assert m.dsn["recipients"] == {"user@lab.test": {
        "notify": ["SUCCESS", "FAILURE", "DELAY"], "orcpt": "rfc822;user@lab.test"}}


def test_postfix_fails_over_from_a_421_primary_to_the_secondary(lab_harness, postfix_lab):
    primary = lab_harness("service-unavailable")  # 421 4.3.2 at the banner
    secondary = lab_harness(host="127.0.0.2")
    assert secondary.host == "127.0.0.2"
    pf = postfix_lab(primary, settings={
        # Postfix 3.5+: a list of next hops, tried in order like MX hosts.
        "relayhost": f"[{primary.host}]:{primary.port}, [{secondary.host}]:{secondary.port}",
    })
    start = time.monotonic()
    pf.submit_smtp(SENDER, ["user@lab.test"], message("user@lab.test", "failover"))
    pf.wait_queue_empty(WAIT)
    assert time.monotonic() - start < WAIT
    primary.wait_idle()
    [refused] = primary.sessions()
    assert (refused.end_reason or "").startswith("closed after 421")
    [m] = secondary.messages()
    assert m.rcpt_tos == ["user@lab.test"]
    assert "refused to talk to me" in pf.maillog()


def test_harness_explain_reads_a_postfix_dsn_captured_from_postfix(lab_harness, postfix_lab,
                                                                    tmp_path):
    """The NDR Postfix sends back after a 550 5.1.1: `harness explain` names
    the recipient, the status, the remote reply, and what to check."""
    import json
    import subprocess
    import sys

    h = lab_harness("unknown-user")
    pf = postfix_lab(h)
    pf.submit_smtp(SENDER, ["nobody@lab.test"], message("nobody@lab.test", "explain me"))
    pf.wait_queue_empty(WAIT)
    h.wait_idle()
    [bounce] = [m for m in h.messages() if m.mail_from == ""]
    assert bounce.is_ndr is True
    path = tmp_path / "bounce.eml"
    path.write_bytes(bounce.raw or b"")
    r = subprocess.run([sys.executable, "-m", "harness.cli", "explain", str(path)],
                       capture_output=True, text=True, timeout=60,
                       env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert "nobody@lab.test" in r.stdout and "5.1.1" in r.stdout
    assert "550 5.1.1 RESOLVER.ADR.RecipNotFound" in r.stdout
    assert "What to check" in r.stdout or "what to check" in r.stdout.lower()
    data = json.loads(subprocess.run(
        [sys.executable, "-m", "harness.cli", "explain", str(path), "--json"],
        capture_output=True, text=True, timeout=60).stdout)
    [rcpt] = data["ndr"]["recipients"]
    assert (rcpt["recipient"], rcpt["action"], rcpt["status"]) == (
        "nobody@lab.test", "failed", "5.1.1")
    assert rcpt["status_info"]["title"] == "Bad destination mailbox address"
