"""`harness probe` as a user runs it, against harness listeners started in
this process (loopback only, ephemeral ports): each step printed, the
replies explained, the verdict and the exit code; the certificate checks;
MX from a zone file with the first host down; --send with a DKIM-signed
test message; --json. Nothing here resolves a name or leaves loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.testing import Harness

HARNESS = [sys.executable, "-m", "harness.cli"]


def probe(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HARNESS, "probe", *args, "--helo", "probe.lab.test"],
                          capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def probe_json(*args: str) -> tuple[dict[str, Any], int]:
    r = probe(*args, "--json")
    assert r.stderr == "", r.stderr
    return json.loads(r.stdout), r.returncode


def steps(report: dict[str, Any], mx: int = 0) -> list[tuple[str, int | None]]:
    return [(s["step"], s["code"]) for s in report["mx"][mx]["steps"]]


def test_relay_denied_550_at_rcpt_would_bounce() -> None:
    # the issue's own example: relay-denied hosts only harness.test
    with Harness("relay-denied") as h:
        r = probe("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}")
        assert r.returncode == 4, r.stdout + r.stderr
        out = r.stdout
        for step in ("connect", "banner", "EHLO", "STARTTLS", "TLS", "MAIL", "RCPT", "RSET",
                     "QUIT"):
            assert f"\n{step} " in out, (step, out)
        rcpt = next(line for line in out.splitlines() if line.startswith("RCPT "))
        assert "550 5.7.1 Unable to relay" in rcpt
        assert "5.7.1 Delivery not authorized, message refused" in rcpt  # the explanation
        assert "verdict: would bounce - 550 5.7.1 Unable to relay" in out
        assert "\nWOULD BOUNCE - " in out
        # nothing but those steps reached the server: no DATA, no message
        h.wait_idle()
        (session,) = h.sessions()
        commands = [e.text.split(" ")[0].upper() for e in session.events if e.direction == "C"]
        assert commands == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "RSET", "QUIT"]
        assert h.messages() == []


def test_relay_denied_takes_its_own_domain() -> None:
    with Harness("relay-denied") as h:
        report, code = probe_json("a@lab.test", "b@harness.test", "--mx",
                                  f"127.0.0.1:{h.port}")
        assert (report["verdict"], code) == ("deliver", 0)


def test_accept_would_deliver_and_the_json_has_every_step() -> None:
    with Harness("accept") as h:
        report, code = probe_json("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}")
    assert code == 0
    assert report["schema"] == "harness.probe/1"
    assert (report["verdict"], report["verdict_text"], report["exit_code"]) == (
        "deliver", "would deliver", 0)
    assert report["dns"] is None  # --mx: no DNS at all
    assert steps(report) == [("connect", None), ("banner", 220), ("ehlo", 250),
                             ("starttls", 220), ("tls", None), ("ehlo-tls", 250),
                             ("mail", 250), ("rcpt", 250), ("rset", 250), ("quit", 221)]
    mx = report["mx"][0]
    assert mx["banner_name"] == "mx.harness.test"
    assert mx["size_limit"] == 32 * 1024 * 1024
    assert mx["starttls_offered"] is True
    assert "pipelining" in mx["extensions"] and "requiretls" in mx["extensions"]  # after TLS
    assert mx["tls"]["version"].startswith("TLSv1.")
    cert = mx["tls"]["certificate"]
    assert cert["self_signed"] and not cert["chain_ok"] and cert["name_ok"] is True
    assert cert["expected_name"] == "mx.harness.test" and cert["name_source"] == "banner"
    rcpt = mx["steps"][7]
    assert rcpt["sent"] == "RCPT TO:<b@lab.test>" and rcpt["reply"].startswith("250 2.1.5")
    assert rcpt["explanation"]["code"] == "2.1.5" and rcpt["seconds"] >= 0


def test_service_unavailable_421_at_the_banner_would_defer() -> None:
    with Harness("service-unavailable") as h:
        r = probe("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}")
    assert r.returncode == 3, r.stdout
    banner = next(line for line in r.stdout.splitlines() if line.startswith("banner "))
    assert "421 4.3.2 Service not available" in banner
    assert "4.3.2 System not accepting network messages" in banner
    assert "verdict: would defer - refused at the banner: 421 4.3.2" in r.stdout
    assert "\nEHLO " not in r.stdout  # nothing after the banner


def test_wrong_host_certificate_name_mismatch_with_the_lab_ca() -> None:
    scenario = "server: {tls: {certificate: wrong_host}}\n"
    with Harness(scenario) as h:
        ca = h.store_path.parent / "harness-ca.pem"  # written beside the store
        assert ca.is_file()
        r = probe("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}", "--ca", str(ca))
        report, code = probe_json("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}",
                                  "--ca", str(ca))
    assert r.returncode == 0  # an opportunistic sender still delivers...
    assert f"chain against {ca}: verified" in r.stdout
    assert "name mx.harness.test (the banner's name): does not match" in r.stdout
    assert ("note: a sender that verifies certificates (MTA-STS, DANE, a required TLS auth "
            "level) would defer here: name mismatch: the certificate is for "
            "wrong-host.harness.invalid, not mx.harness.test") in r.stdout
    cert = report["mx"][0]["tls"]["certificate"]
    assert (cert["chain_ok"], cert["name_ok"], cert["names"]) == (
        True, False, ["wrong-host.harness.invalid"])
    assert code == 0


BANNER_WITH_CODE = textwrap.dedent("""\
    server: {tls: {certificate: ca_signed}}
    rules:
      - name: banner with an enhanced code
        on: connect
        reply: 220 2.0.0 mx.harness.test ESMTP ready
    """)


def test_a_banner_with_an_enhanced_code_names_the_host_after_it() -> None:
    # "220 2.0.0 mx.harness.test": the host name is the word after the
    # enhanced code, and the certificate made for it matches
    with Harness(BANNER_WITH_CODE) as h:
        ca = str(h.store_path.parent / "harness-ca.pem")
        r = probe("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}", "--ca", ca)
        report, code = probe_json("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}",
                                  "--ca", ca)
    banner = next(line for line in r.stdout.splitlines() if line.startswith("banner "))
    assert "220 2.0.0 mx.harness.test ESMTP ready" in banner
    assert "(banner name mx.harness.test)" in r.stdout
    assert "name mx.harness.test (the banner's name): matches" in r.stdout
    assert "does not match" not in r.stdout and "mismatch" not in r.stdout
    assert "2.0.0 (the banner's name)" not in r.stdout
    mx = report["mx"][0]
    assert mx["banner_name"] == "mx.harness.test"
    cert = mx["tls"]["certificate"]
    assert (cert["ok"], cert["name_ok"], cert["expected_name"], cert["name_source"]) == (
        True, True, "mx.harness.test", "banner")
    assert (r.returncode, code) == (0, 0)


def test_a_refusing_banner_gives_no_host_name() -> None:
    # "421 4.3.2 Service not available": no host name in it, not "4.3.2"
    with Harness("service-unavailable") as h:
        report, code = probe_json("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}")
    assert code == 3
    assert report["mx"][0]["banner_name"] is None


def test_named_target_checks_the_certificate_against_that_name() -> None:
    scenario = "server: {hostname: mx1.lab.test, tls: {certificate: ca_signed}}\n"
    with Harness(scenario) as h:
        ca = str(h.store_path.parent / "harness-ca.pem")
        good, _ = probe_json("a@lab.test", "b@lab.test", "--mx",
                             f"mx1.lab.test=127.0.0.1:{h.port}", "--ca", ca)
        bad, _ = probe_json("a@lab.test", "b@lab.test", "--mx",
                            f"mx9.lab.test=127.0.0.1:{h.port}", "--ca", ca)
    cert = good["mx"][0]["tls"]["certificate"]
    assert (cert["ok"], cert["expected_name"], cert["name_source"]) == (
        True, "mx1.lab.test", "mx")
    assert bad["mx"][0]["tls"]["certificate"]["name_ok"] is False


def test_expired_certificate_is_reported_with_its_days() -> None:
    with Harness("server: {tls: {certificate: expired}}\n") as h:
        ca = str(h.store_path.parent / "harness-ca.pem")
        report, _ = probe_json("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}",
                               "--ca", ca)
    cert = report["mx"][0]["tls"]["certificate"]
    assert cert["days_left"] < -360 and not cert["chain_ok"]
    assert cert["chain_error"].startswith("expired on ")


def test_zone_with_two_mx_the_first_down_the_second_probed(tmp_path: Path) -> None:
    with Harness("accept") as h:
        # the same port on 127.0.0.2, where nobody listens
        zone = tmp_path / "zone.yaml"
        zone.write_text(textwrap.dedent("""\
            lab.test:
              SOA: ["ns1.lab.test hostmaster.lab.test 2025010101 3600 600 604800 300"]
              MX: ["20 mx2.lab.test", "10 mx1.lab.test"]
            mx1.lab.test: {A: [127.0.0.2]}
            mx2.lab.test: {A: [127.0.0.1]}
            """))
        r = probe("a@lab.test", "b@lab.test", "--dns", str(zone), "--port", str(h.port))
        report, code = probe_json("a@lab.test", "b@lab.test", "--dns", str(zone),
                                  "--port", str(h.port))
    assert r.returncode == 0 and code == 0, r.stdout
    first, second = report["mx"]
    assert (first["label"], first["verdict"], first["decisive"]) == (
        "MX 10 mx1.lab.test", "defer", False)
    assert first["reason"] == f"unreachable: Connection refused (127.0.0.2:{h.port})"
    assert (second["label"], second["verdict"]) == ("MX 20 mx2.lab.test", "deliver")
    assert steps(report, 1)[-3:] == [("rcpt", 250), ("rset", 250), ("quit", 221)]
    assert report["dns"]["soa"].startswith("ns1.lab.test hostmaster.lab.test")
    assert report["dns"]["mx"] == [{"preference": 10, "host": "mx1.lab.test"},
                                   {"preference": 20, "host": "mx2.lab.test"}]
    assert report["notes"] == [f"before it, a sender would skip MX 10 mx1.lab.test "
                               f"(unreachable: Connection refused (127.0.0.2:{h.port}))"]
    assert "MX 10 mx1.lab.test 127.0.0.2" in r.stdout and "MX 20 mx2.lab.test" in r.stdout
    # the certificate is checked against the MX host name now
    assert second["tls"]["certificate"]["expected_name"] == "mx2.lab.test"


def test_null_mx_and_a_missing_domain_bounce_without_connecting(tmp_path: Path) -> None:
    zone = tmp_path / "zone.yaml"
    zone.write_text("null.test: {MX: ['0 .']}\n")
    report, code = probe_json("a@lab.test", "b@null.test", "--dns", str(zone))
    assert (report["verdict"], code, report["mx"]) == ("bounce", 4, [])
    assert "null MX (RFC 7505)" in report["reason"]
    report, code = probe_json("a@lab.test", "b@missing.test", "--dns", str(zone))
    assert (report["verdict"], code) == ("bounce", 4)
    assert "does not exist" in report["reason"]


def test_a_silent_server_times_out_at_the_banner() -> None:
    with Harness("no-banner") as h:
        report, code = probe_json("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}",
                                  "--timeout", "banner=0.3")
    assert code == 3
    assert steps(report) == [("connect", None), ("banner", None)]
    assert report["mx"][0]["steps"][1]["error"] == "no reply within 0.3s"


def test_a_broken_tls_handshake_would_defer() -> None:
    scenario = "rules:\n  - on: starttls\n    fault: tls_fail\n"
    with Harness(scenario) as h:
        report, code = probe_json("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}")
    assert code == 3
    tls = report["mx"][0]["steps"][-1]
    assert tls["step"] == "tls" and tls["error"].startswith("the TLS handshake failed")
    assert report["mx"][0]["tls"]["error"] == tls["error"]


def test_refused_starttls_goes_on_in_plain_text() -> None:
    scenario = "rules:\n  - on: starttls\n    reply: 454 4.7.0 TLS not available\n"
    with Harness(scenario) as h:
        report, code = probe_json("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}")
    assert code == 0
    assert ("starttls", 454) in steps(report) and ("rcpt", 250) in steps(report)
    assert any("opportunistic sender goes on in plain text" in n
               for n in report["mx"][0]["notes"])


def test_several_mx_given_in_order() -> None:
    with Harness("mailbox-full") as full, Harness("accept") as ok:
        report, code = probe_json("a@lab.test", "full@lab.test", "--mx",
                                  f"127.0.0.1:{full.port}", "--mx", f"127.0.0.1:{ok.port}")
    # the first answers within the transaction: that decides, as for a sender
    assert (report["verdict"], code) == ("bounce", 4)
    assert [m["verdict"] for m in report["mx"]] == ["bounce", "deliver"]
    assert "552 5.2.2" in report["reason"]


def dkim_key(tmp_path: Path) -> tuple[Path, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "dkim.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    import base64

    return path, base64.b64encode(public).decode()


def test_send_delivers_a_dkim_signed_test_message(tmp_path: Path) -> None:
    key, public = dkim_key(tmp_path)
    scenario = textwrap.dedent(f"""\
        dns:
          sel1._domainkey.lab.test: {{TXT: ["v=DKIM1; k=rsa; p={public}"]}}
        """)
    with Harness(scenario) as h:
        report, code = probe_json("a@lab.test", "b@lab.test", "--mx", f"127.0.0.1:{h.port}",
                                  "--send", "--dkim-key", str(key), "--dkim-selector", "sel1")
        assert code == 0, report
        assert steps(report)[-4:] == [("rcpt", 250), ("data", 354), ("message", 250),
                                      ("quit", 221)]
        assert report["send"] is True
        assert report["reason"].endswith("the message was accepted: 250 2.0.0 Ok: queued as 1 "
                                         "(Requested action okay, completed)")
        h.wait_idle()
        (msg,) = h.messages()
        assert msg.mail_from == "a@lab.test" and msg.rcpt_tos == ["b@lab.test"]
        assert msg.subject == "SMTP Harness probe: test message"
        assert (msg.raw or b"").startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
        assert msg.analysis is not None and msg.analysis["auth"]["dkim"][0]["result"] == "pass"
        mail = next(s for s in report["mx"][0]["steps"] if s["step"] == "mail")
        assert mail["sent"].startswith("MAIL FROM:<a@lab.test> SIZE=")


def test_dkim_without_send_or_selector_is_refused(tmp_path: Path) -> None:
    key, _ = dkim_key(tmp_path)
    r = probe("a@lab.test", "b@lab.test", "--mx", "127.0.0.1:1", "--dkim-key", str(key))
    assert (r.returncode, r.stderr.strip()) == (
        1, "harness: error: --dkim-key signs the test message: add --send")
    r = probe("a@lab.test", "b@lab.test", "--mx", "127.0.0.1:1", "--send", "--dkim-key",
              str(key))
    assert r.stderr.strip() == "harness: error: --dkim-key needs --dkim-selector"


@pytest.mark.parametrize(("args", "error"), [
    (["--mx", "mx.partner.example"], "--mx mx.partner.example is a host name and no DNS "
                                     "was asked for"),
    ([], "nothing to probe: give --mx HOST[:PORT]"),
    (["--mx", "127.0.0.1:notaport"], "--mx '127.0.0.1:notaport': bad port"),
    (["--mx", "127.0.0.1:1", "--timeout", "rcpt=soon"], "--timeout 'rcpt=soon'"),
    (["--mx", "127.0.0.1:1", "--timeout", "dot=5"], "--timeout 'dot=5': give STEP=SECONDS"),
    (["--mx", "127.0.0.1:1", "--ca", "/nonexistent/ca.pem"], "--ca /nonexistent/ca.pem"),
    (["--dns", "/nonexistent/zone.yaml"], "/nonexistent/zone.yaml:1:1: cannot read"),
])
def test_bad_input_is_one_line_and_exit_1(args: list[str], error: str) -> None:
    r = probe("a@lab.test", "b@lab.test", *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout == ""
    assert error in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_bad_zone_file_lists_its_problems(tmp_path: Path) -> None:
    zone = tmp_path / "zone.yaml"
    zone.write_text("lab.test: {MX: ['10 mx1.lab.test']}\nmx1.lab.test: {A: [not-an-ip]}\n")
    r = probe("a@lab.test", "b@lab.test", "--dns", str(zone))
    assert r.returncode == 1
    assert r.stderr.strip() == f"{zone}:2:20: 'not-an-ip' is not an IP address"


def test_help_says_it_sends_nothing_beyond_the_steps() -> None:
    r = subprocess.run([*HARNESS, "probe", "--help"], capture_output=True, text=True,
                       timeout=30, env={**os.environ, "COLUMNS": "100"})
    text = " ".join(r.stdout.split())
    assert "It sends nothing beyond those steps: no DATA and no message, unless you give --send" \
        in text
    assert "exit status: 0 would deliver, 3 would defer, 4 would bounce" in text
    assert "banner 30" in text and "RFC 5321" in text


def test_an_mx_with_two_addresses_the_first_down(tmp_path: Path) -> None:
    with Harness("accept") as h:
        zone = tmp_path / "zone.yaml"
        zone.write_text("lab.test: {MX: ['10 mx.lab.test']}\n"
                        "mx.lab.test: {A: [127.0.0.2, 127.0.0.1]}\n")
        report, code = probe_json("a@lab.test", "b@lab.test", "--dns", str(zone),
                                  "--port", str(h.port))
    (mx,) = report["mx"]
    assert code == 0 and mx["address"] == "127.0.0.1"
    assert steps(report)[:3] == [("connect", None), ("connect", None), ("banner", 220)]
    assert mx["steps"][0]["error"] == f"Connection refused (127.0.0.2:{h.port})"
    assert mx["notes"][0].startswith(f"127.0.0.2:{h.port} did not answer")
