"""Protocol completeness on real sockets: STARTTLS and implicit TLS with each
certificate kind, AUTH, DSN parameters, BDAT, PROXY headers, limits, the idle
timeout, and extensions switched off."""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager

import pytest

from harness.testing import Harness

HELO = "client.lab.test"


def scenario(text: str) -> str:
    return "scenario: t\n" + text


class Wire:
    def __init__(self, h: Harness, timeout: float = 5.0) -> None:
        self.sock: socket.socket = socket.create_connection((h.host, h.port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[str]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionAbortedError(f"closed; partial {self.buf!r}")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            lines.append(line.decode())
            if len(lines[-1]) < 4 or lines[-1][3] != "-":
                return lines

    def cmd(self, text: str) -> list[str]:
        self.send(text.encode() + b"\r\n")
        return self.reply()

    def ehlo(self) -> set[str]:
        return {x[4:].split()[0] for x in self.cmd(f"EHLO {HELO}")[1:]}


def client_tls(verify: bool = False, cafile: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@contextmanager
def smtp(h: Harness) -> Iterator[smtplib.SMTP]:
    with closing(smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=5)) as c:
        yield c


# ------------------------------------------------------------------- STARTTLS


def test_starttls_offered_by_default_and_session_records_version() -> None:
    with Harness() as h:
        with smtp(h) as c:
            c.ehlo()
            assert c.has_extn("starttls")
            assert not c.has_extn("requiretls")
            c.starttls(context=client_tls())
            c.ehlo()
            assert not c.has_extn("starttls")
            assert c.has_extn("requiretls")
            c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: tls\r\n\r\nx\r\n")
            c.quit()
        h.wait_idle()
        [s] = h.sessions()
    assert s.tls_version in ("TLSv1.2", "TLSv1.3")
    assert s.tls_cipher
    assert s.extensions["starttls"] is True


def test_starttls_require_refuses_mail_before_tls() -> None:
    with Harness(scenario("server: {starttls: require}\n")) as h:
        w = Wire(h)
        w.reply()
        w.ehlo()
        assert w.cmd("MAIL FROM:<a@lab.test>") == [
            "530 5.7.0 Must issue a STARTTLS command first"]
        with smtp(h) as c:
            c.starttls(context=client_tls())
            c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: ok\r\n\r\nx\r\n")


def test_starttls_off_is_not_offered() -> None:
    with Harness(scenario("server: {starttls: off}\n")) as h:
        w = Wire(h)
        w.reply()
        assert "STARTTLS" not in w.ehlo()
        assert w.cmd("STARTTLS")[0].startswith("502 5.5.1")


def test_starttls_rule_can_answer_454() -> None:
    s = scenario("rules:\n  - on: starttls\n    reply: 454 4.7.0 TLS not available due to "
                 "temporary reason\n")
    with Harness(s) as h, smtp(h) as c:
        c.ehlo()
        with pytest.raises(smtplib.SMTPResponseException) as e:
            c.starttls(context=client_tls())
        assert e.value.smtp_code == 454
        assert c.noop()[0] == 250  # still in plaintext, still served


def test_tls_fail_answers_220_then_breaks_the_handshake() -> None:
    s = scenario("rules:\n  - name: broken tls\n    on: starttls\n    fault: tls_fail\n")
    with Harness(s) as h:
        with smtp(h) as c:
            c.ehlo()
            with pytest.raises((ssl.SSLError, smtplib.SMTPServerDisconnected, OSError)):
                c.starttls(context=client_tls())
        h.wait_idle()
        [sess] = h.sessions()
    assert sess.end_reason == "tls_fail (rule broken tls)"
    assert any(e.text.startswith("fault: tls_fail") for e in sess.events)


@pytest.mark.parametrize(("kind", "error"), [
    ("self_signed", "self-signed certificate"),
    ("expired", "certificate has expired"),
    ("wrong_host", "Hostname mismatch"),
])
def test_certificate_kinds_fail_a_validating_client_for_their_reason(kind: str,
                                                                      error: str) -> None:
    s = scenario(f"server: {{hostname: mx.lab.test, tls: {{certificate: {kind}}}}}\n")
    with Harness(s) as h, smtp(h) as c:
        c._host = "mx.lab.test"  # the name to verify (smtplib takes it from connect())
        c.ehlo()
        ca = h.store_path.parent / "harness-ca.pem"
        ctx = ssl.create_default_context(cafile=str(ca) if kind != "self_signed" else None)
        with pytest.raises(ssl.SSLCertVerificationError, match=error):
            c.starttls(context=ctx)


def test_ca_signed_certificate_verifies_with_the_lab_ca() -> None:
    s = scenario("server: {hostname: mx.lab.test, tls: {certificate: ca_signed}}\n")
    with Harness(s) as h:
        ca = h.store_path.parent / "harness-ca.pem"
        assert ca.is_file()
        ctx = ssl.create_default_context(cafile=str(ca))
        with smtp(h) as c:
            c._host = "mx.lab.test"  # the name to verify (smtplib takes it from connect())
            c.ehlo()
            c.starttls(context=ctx)
            c.ehlo()
            assert c.noop()[0] == 250


def test_implicit_tls_listener() -> None:
    with Harness(implicit_tls=True) as h:
        with closing(smtplib.SMTP_SSL(h.host, h.port, local_hostname=HELO, timeout=5,
                                      context=client_tls())) as c:
            c.ehlo()
            assert not c.has_extn("starttls")
            c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: 465\r\n\r\nx\r\n")
        h.wait_idle()
        [s] = h.sessions()
    assert s.tls_version is not None
    assert any(e.text.startswith("implicit TLS") for e in s.events)


def test_given_cert_and_key_files_are_used(tmp_path: pytest.TempPathFactory) -> None:
    from harness.scenario.model import CertKind
    from harness.smtp.tls import make_certificate

    material = make_certificate("files.lab.test", CertKind.SELF_SIGNED)
    d = tmp_path  # type: ignore[assignment]
    (d / "c.pem").write_bytes(material.cert_pem)  # type: ignore[operator]
    (d / "k.pem").write_bytes(material.key_pem)  # type: ignore[operator]
    path = d / "s.yaml"  # type: ignore[operator]
    path.write_text("server: {tls: {cert: c.pem, key: k.pem}}\n")
    with Harness(path) as h, smtp(h) as c:
        c.ehlo()
        c.starttls(context=client_tls())
        der = c.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert ssl.DER_cert_to_PEM_cert(der).strip() == material.cert_pem.decode().strip()


# ----------------------------------------------------------------------- AUTH

AUTH = ("server:\n  auth: {mechanisms: [PLAIN, LOGIN, CRAM-MD5], users: {alice: s3cret},"
        " required: true}\n")


def test_auth_offered_only_after_tls_and_required_for_mail() -> None:
    with Harness(scenario(AUTH)) as h:
        w = Wire(h)
        w.reply()
        assert "AUTH" not in w.ehlo()
        assert w.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldA==")[0].startswith("538 5.7.11")
        assert w.cmd("MAIL FROM:<a@lab.test>") == ["530 5.7.0 Authentication required"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_auth_mechanisms_with_smtplib(mechanism: str) -> None:
    with Harness(scenario(AUTH)) as h:
        with smtp(h) as c:
            c.starttls(context=client_tls())
            c.ehlo()
            assert set(c.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN", "CRAM-MD5"}
            c.user, c.password = "alice", "s3cret"
            code, _ = c.auth(mechanism, getattr(c, "auth_" + mechanism.lower().replace(
                "-", "_")))
            assert code == 235
            c.sendmail("alice@lab.test", ["b@lab.test"], b"Subject: auth\r\n\r\nx\r\n")
        h.wait_idle()
        [s] = h.sessions()
    assert s.auth_user == "alice"
    assert s.extensions["auth"] == mechanism
    texts = [e.text for e in s.events]
    assert "s3cret" not in " ".join(texts)  # credentials never reach the transcript
    assert base64.b64encode(b"\0alice\0s3cret").decode() not in " ".join(texts)


def test_auth_wrong_password_gets_535_and_scripted_replies_win() -> None:
    s = scenario(AUTH + "rules:\n  - on: auth\n    when: {auth_user: mallory}\n"
                 "    reply: 454 4.7.0 Temporary authentication failure\n")
    with Harness(s) as h, smtp(h) as c:
        c.starttls(context=client_tls())
        c.ehlo()
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("alice", "wrong")
        assert (e.value.smtp_code, e.value.smtp_error) == (
            535, b"5.7.8 Authentication credentials invalid")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("mallory", "anything")
        assert e.value.smtp_code == 454


def test_cram_md5_by_hand_and_cancel() -> None:
    with Harness(scenario(AUTH.replace("required: true", "before_tls: true"))) as h:
        w = Wire(h)
        w.reply()
        assert "AUTH" in w.ehlo()
        [challenge] = w.cmd("AUTH CRAM-MD5")
        assert challenge.startswith("334 ")
        assert w.cmd("*") == ["501 5.7.0 Authentication cancelled"]
        [challenge] = w.cmd("AUTH CRAM-MD5")
        nonce = base64.b64decode(challenge[4:])
        digest = hmac.new(b"s3cret", nonce, hashlib.md5).hexdigest()
        answer = base64.b64encode(f"alice {digest}".encode()).decode()
        assert w.cmd(answer) == ["235 2.7.0 Authentication successful"]


def test_swaks_tls_and_auth() -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed: run the README's test command"
    with Harness(scenario(AUTH)) as h:
        for mech in ("PLAIN", "LOGIN"):
            r = subprocess.run([swaks, "--server", f"{h.host}:{h.port}", "--helo", HELO,
                                "--from", "alice@lab.test", "--to", "b@lab.test", "--tls",
                                "--auth", mech, "--auth-user", "alice",
                                "--auth-password", "s3cret"],
                               capture_output=True, text=True, timeout=30)
            assert "<~  235 2.7.0 Authentication successful" in r.stdout, r.stdout
            assert "<~  250 2.0.0 Ok: queued" in r.stdout
        r = subprocess.run([swaks, "--server", f"{h.host}:{h.port}", "--helo", HELO,
                            "--from", "alice@lab.test", "--to", "b@lab.test", "--tls",
                            "--auth", "LOGIN", "--auth-user", "alice",
                            "--auth-password", "nope"],
                           capture_output=True, text=True, timeout=30)
        assert "<~* 535 5.7.8" in r.stdout, r.stdout


def test_swaks_implicit_tls() -> None:
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed: run the README's test command"
    with Harness(implicit_tls=True) as h:
        r = subprocess.run([swaks, "--server", f"{h.host}:{h.port}", "--helo", HELO,
                            "--from", "a@lab.test", "--to", "b@lab.test", "--tlsc"],
                           capture_output=True, text=True, timeout=30)
        assert "<~  250 2.0.0 Ok: queued" in r.stdout, r.stdout
        assert len(h.messages()) == 1


# ------------------------------------------------------------------------ DSN


def test_dsn_parameters_are_kept_as_sent_and_decoded() -> None:
    with Harness() as h:
        w = Wire(h)
        w.reply()
        assert "DSN" in w.ehlo()
        assert w.cmd("MAIL FROM:<a@lab.test> RET=HDRS ENVID=QQ+2B314") == ["250 2.1.0 Ok"]
        assert w.cmd("RCPT TO:<b@lab.test> NOTIFY=SUCCESS,DELAY "
                     "ORCPT=rfc822;B+2Bx@lab.test") == ["250 2.1.5 Ok"]
        assert w.cmd("RCPT TO:<c@lab.test> NOTIFY=NEVER") == ["250 2.1.5 Ok"]
        assert w.cmd("RCPT TO:<d@lab.test> NOTIFY=SOMETIMES")[0].startswith("501 5.5.4")
        w.cmd("DATA")
        assert w.cmd("Subject: dsn\r\n\r\nx\r\n.")[0].startswith("250")
        [m] = h.messages()
    assert m.mail_options == ["RET=HDRS", "ENVID=QQ+2B314"]
    assert m.rcpt_options == ["NOTIFY=SUCCESS,DELAY ORCPT=rfc822;B+2Bx@lab.test",
                              "NOTIFY=NEVER"]
    assert m.dsn == {"ret": "HDRS", "envid": "QQ+314", "recipients": {
        "b@lab.test": {"notify": ["SUCCESS", "DELAY"], "orcpt": "rfc822;B+x@lab.test"},
        "c@lab.test": {"notify": ["NEVER"], "orcpt": None}}}


def test_dsn_switched_off_refuses_its_parameters() -> None:
    with Harness(scenario("server: {extensions: {dsn: false, pipelining: false}}\n")) as h:
        w = Wire(h)
        w.reply()
        advertised = w.ehlo()
        assert "DSN" not in advertised and "PIPELINING" not in advertised
        assert w.cmd("MAIL FROM:<a@lab.test> RET=FULL")[0].startswith("555 5.5.4")


# ----------------------------------------------------------------------- BDAT


def test_bdat_chunks_are_joined_exactly() -> None:
    part1 = b"Subject: chunks\r\n\r\nbinary \x00\x01\xff and a lone dot:\r\n.\r\n"
    part2 = b"no dot-stuffing in BDAT\r\n"
    with Harness() as h:
        w = Wire(h)
        w.reply()
        assert {"CHUNKING", "BINARYMIME"} <= w.ehlo()
        w.send(b"MAIL FROM:<a@lab.test> BODY=BINARYMIME\r\nRCPT TO:<b@lab.test>\r\n"
               + f"BDAT {len(part1)}\r\n".encode() + part1
               + f"BDAT {len(part2)} LAST\r\n".encode() + part2)
        assert w.reply() == ["250 2.1.0 Ok"]
        assert w.reply() == ["250 2.1.5 Ok"]
        assert w.reply() == [f"250 2.0.0 {len(part1)} octets received"]
        assert w.reply()[0].startswith("250 2.0.0 Ok: queued as")
        assert w.cmd("MAIL FROM:<a@lab.test> BODY=BINARYMIME") == ["250 2.1.0 Ok"]
        w.cmd("RCPT TO:<b@lab.test>")
        assert w.cmd("DATA")[0].startswith("503 5.5.1")
        [m] = h.messages()
    assert m.raw == part1 + part2


def test_bdat_rule_refuses_a_chunk() -> None:
    s = scenario("rules:\n  - on: bdat\n    when: {size: '> 10'}\n"
                 "    reply: 552 5.3.4 Chunk too big for this test\n")
    with Harness(s) as h:
        w = Wire(h)
        w.reply()
        w.ehlo()
        w.cmd("MAIL FROM:<a@lab.test>")
        w.cmd("RCPT TO:<b@lab.test>")
        w.send(b"BDAT 5\r\nhello")
        assert w.reply()[0].startswith("250 2.0.0 5 octets")
        w.send(b"BDAT 20 LAST\r\n" + b"y" * 20)
        assert w.reply() == ["552 5.3.4 Chunk too big for this test"]
        w.send(b"BDAT 1 LAST\r\nz")
        assert w.reply()[0].startswith("503 5.5.1")
        assert w.cmd("RSET") == ["250 2.0.0 Ok"]
        [a] = h.attempts()
        assert h.messages() == []
    assert (a.phase, a.code) == ("bdat", 552)


def test_chunking_switched_off() -> None:
    with Harness(scenario("server: {extensions: {chunking: false}}\n")) as h:
        w = Wire(h)
        w.reply()
        assert "CHUNKING" not in w.ehlo()
        assert w.cmd("BDAT 0 LAST")[0].startswith("502 5.5.1")


# ------------------------------------------------------------ SIZE, UTF8, etc


def test_smtputf8_addresses_and_used_extensions_are_recorded() -> None:
    with Harness() as h:
        w = Wire(h)
        w.reply()
        w.ehlo()
        assert w.cmd("MAIL FROM:<jöran@lab.test>")[0].startswith("553 5.6.7")
        w.send("MAIL FROM:<jöran@lab.test> SMTPUTF8 BODY=8BITMIME SIZE=30\r\n"
               "RCPT TO:<δοκιμή@lab.test>\r\n".encode())
        assert w.reply() == ["250 2.1.0 Ok"]
        assert w.reply() == ["250 2.1.5 Ok"]
        w.cmd("DATA")
        w.cmd("Subject: ü\r\n\r\nx\r\n.")
        w.cmd("QUIT")
        h.wait_idle()
        [m] = h.messages()
        [s] = h.sessions()
    assert m.rcpt_tos == ["δοκιμή@lab.test"]
    assert {"smtputf8": True, "body": "8BITMIME", "size": 30} .items() <= s.extensions.items()
    assert s.extensions["pipelined"] >= 1


def test_max_line_length_rejects_long_lines_after_the_dot() -> None:
    with Harness(scenario("server: {max_line_length: 100}\n")) as h, smtp(h) as c:
        with pytest.raises(smtplib.SMTPDataError) as e:
            c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: x\r\n\r\n" + b"z" * 200)
        assert e.value.smtp_code == 500
        assert c.noop()[0] == 250


# ---------------------------------------------------------------------- PROXY


def test_proxy_protocol_v1_sets_the_client_address() -> None:
    s = scenario("rules:\n  - on: mail\n    when: {client: 192.0.2.0/24}\n"
                 "    reply: 550 5.7.1 Blocked by IP\n")
    with Harness(s, proxy_protocol=True) as h:
        w = Wire(h)
        w.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
        assert w.reply()[0].startswith("220")
        w.ehlo()
        assert w.cmd("MAIL FROM:<a@lab.test>") == ["550 5.7.1 Blocked by IP"]
        w.sock.close()
        h.wait_idle()
        [sess] = h.sessions()
    assert (sess.peer_ip, sess.peer_port) == ("192.0.2.7", 40000)


def test_proxy_protocol_v2_and_missing_header() -> None:
    import struct

    with Harness(proxy_protocol=True) as h:
        w = Wire(h)
        sig = b"\r\n\r\n\x00\r\nQUIT\n"
        addr = socket.inet_aton("198.51.100.9") + socket.inet_aton("127.0.0.1") + struct.pack(
            "!HH", 51000, 25)
        w.send(sig + bytes([0x21, 0x11]) + struct.pack("!H", len(addr)) + addr)
        assert w.reply()[0].startswith("220")
        w.sock.close()
        bad = Wire(h)
        bad.send(b"EHLO no-proxy-header\r\n")
        assert bad.sock.recv(100) == b""  # closed without a word
        h.wait_idle()
        [sess] = h.sessions()
    assert sess.peer_ip == "198.51.100.9"


# --------------------------------------------------------------------- limits


def test_max_connections_per_client_answers_421() -> None:
    with Harness(scenario("server: {limits: {max_connections_per_client: 2}}\n")) as h:
        a, b = Wire(h), Wire(h)
        assert a.reply()[0].startswith("220") and b.reply()[0].startswith("220")
        c = Wire(h)
        assert c.reply() == ["421 4.7.0 Too many connections from your host"]
        assert a.cmd("QUIT") == ["221 2.0.0 Bye"]
        assert a.sock.recv(10) == b""  # closed: the server has counted it out
        d = Wire(h)  # a place is free again
        assert d.reply()[0].startswith("220")


def test_rate_limit_five_per_minute_answers_421_to_the_sixth() -> None:
    t = [1000.0]
    s = scenario("server: {limits: {rate: {messages: 5, per: 1m, key: client}}}\n")
    with Harness(s, clock=lambda: t[0]) as h:
        codes = []
        for i in range(6):
            with smtp(h) as c:
                try:
                    c.sendmail("a@lab.test", [f"r{i}@lab.test"], b"Subject: r\r\n\r\nx\r\n")
                    codes.append(250)
                except smtplib.SMTPSenderRefused as e:
                    codes.append(e.smtp_code)
                except smtplib.SMTPServerDisconnected:
                    codes.append(-1)
            t[0] += 1
        assert codes == [250] * 5 + [421]
        t[0] += 12  # one token back after 12 s
        with smtp(h) as c:
            c.sendmail("a@lab.test", ["late@lab.test"], b"Subject: r\r\n\r\nx\r\n")
        h.wait_idle()
        refused = [e for s_ in h.sessions() for e in s_.events
                   if e.direction == "S" and e.text.startswith("421")]
    assert refused[0].text == "421 4.7.0 Rate limit exceeded for your host, try again later"
    assert refused[0].rule == "limit rate"


def test_messages_per_connection_and_recipients_per_message() -> None:
    s = scenario("server: {limits: {messages_per_connection: 1, recipients_per_message: 2}}\n")
    with Harness(s) as h, smtp(h) as c:
        refused = c.sendmail("a@lab.test", ["1@lab.test", "2@lab.test", "3@lab.test"],
                             b"Subject: x\r\n\r\nx\r\n")
        assert refused == {"3@lab.test": (452, b"4.5.3 Too many recipients")}
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("a@lab.test", ["4@lab.test"], b"Subject: x\r\n\r\nx\r\n")
        assert e.value.smtp_code == 421


def test_idle_timeout_answers_421_4_4_2() -> None:
    with Harness(scenario("server: {timeout: 300ms}\n")) as h:
        w = Wire(h)
        w.reply()
        start = time.monotonic()
        assert w.reply() == ["421 4.4.2 Idle timeout, closing connection"]
        assert time.monotonic() - start >= 0.25
        assert w.sock.recv(10) == b""


def test_rate_limit_with_an_exchange_online_reply() -> None:
    s = scenario("server:\n  limits:\n    rate: {messages: 1, per: 1h, key: sender,\n"
                 "           reply: '451 4.7.500 Server busy. Please try again later.'}\n")
    with Harness(s) as h, smtp(h) as c:
        c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: 1\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPSenderRefused) as e:
            c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: 2\r\n\r\nx\r\n")
        assert (e.value.smtp_code, e.value.smtp_error) == (
            451, b"4.7.500 Server busy. Please try again later.")
        assert c.noop()[0] == 250  # a 451 keeps the connection
