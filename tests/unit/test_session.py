"""The sans-IO SMTP session (harness/smtp/session.py): bytes in, actions out,
no socket and no event loop. Command order and guards, the one transaction,
DATA and BDAT framing, pipelining, STARTTLS, AUTH, attempts, the end of a
session; and the state bugs once found on real sockets, here without one."""

from __future__ import annotations

import base64
import hashlib
import hmac
import subprocess
import sys
from pathlib import Path

import pytest
from conversation import Conversation, scenario

from harness.records import NotStored
from harness.smtp import session as ss

ROOT = Path(__file__).resolve().parents[2]
PLAIN_ALICE = base64.b64encode(b"\0alice\0s3cret").decode()
AUTH = """\
server:
  auth: {mechanisms: [PLAIN, LOGIN, CRAM-MD5], users: {alice: s3cret}, required: true,
         before_tls: true}
"""


# --------------------------------------------------------------- the module


def test_session_imports_no_io() -> None:
    """`import harness.smtp.session` pulls in no asyncio, socket, ssl, sqlite3
    or aiosmtpd: in a fresh interpreter, nothing of them is loaded."""
    code = ("import sys, harness.smtp.session\n"
            "bad = ('asyncio', 'socket', 'ssl', 'sqlite3', 'aiosmtpd', 'selectors')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in bad))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------- greeting, EHLO


def test_session_greets_and_advertises() -> None:
    c = Conversation()
    assert c.greeting == ["220 mx.harness.test ESMTP SMTP Harness"]
    lines = c.ehlo()
    assert lines[0] == "250-mx.harness.test Hello client.lab.test"
    assert lines[-1].startswith("250 ") and all(x.startswith("250-") for x in lines[:-1])
    words = [x[4:] for x in lines[1:]]
    assert words == ["SIZE 33554432", "8BITMIME", "PIPELINING", "CHUNKING", "BINARYMIME", "DSN",
                     "ENHANCEDSTATUSCODES", "SMTPUTF8", "STARTTLS"]
    assert c.updates == {} and c.session.used["advertised"] == words


def test_session_helo_is_one_line_and_allows_no_parameters() -> None:
    c = Conversation()
    assert c.send("HELO client.lab.test") == ["250 mx.harness.test Hello client.lab.test"]
    assert c.cmd("MAIL FROM:<a@lab.test> SIZE=10") == "501 5.5.4 Syntax: MAIL FROM:<address>"
    assert c.cmd("MAIL FROM:<a@lab.test>") == "250 2.1.0 Ok"


@pytest.mark.parametrize(("commands", "last"), [
    (["MAIL FROM:<a@lab.test>"], "503 5.5.1 Error: send HELO/EHLO first"),
    (["EHLO c.test", "RCPT TO:<b@lab.test>"], "503 5.5.1 Error: need MAIL command"),
    (["EHLO c.test", "DATA"], "503 5.5.1 Error: need MAIL command"),
    (["EHLO c.test", "MAIL FROM:<a@lab.test>", "DATA"], "554 5.5.1 Error: no valid recipients"),
    (["EHLO c.test", "MAIL FROM:<a@lab.test>", "MAIL FROM:<a@lab.test>"],
     "503 5.5.1 Error: nested MAIL command"),
    (["EHLO c.test", "MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA x"],
     "501 5.5.4 Syntax: DATA"),
    (["EHLO"], "501 5.5.4 Syntax: EHLO hostname"),
    (["EHLO c.test", "MAIL TO:<a@lab.test>"], "501 5.5.4 Syntax: MAIL FROM:<address>"),
    (["EHLO c.test", 'MAIL FROM:"'], "553 5.1.3 Error: malformed address"),
    (["EHLO c.test", "MAIL FROM:<a@[1.2"], "553 5.1.3 Error: malformed address"),
    (["EHLO c.test", "MAIL FROM:<a@lab.test> FOO=1"],
     "555 5.5.4 MAIL FROM parameter FOO not recognized"),
    (["EHLO c.test", "MAIL FROM:<ü@lab.test>"], "553 5.6.7 Non-ASCII address needs SMTPUTF8"),
    (["EHLO c.test", "MAIL FROM:<a@lab.test> SIZE=99999999999"],
     "552 5.3.4 Message size exceeds fixed maximum message size"),
    (["EHLO c.test", "MAIL FROM:<>", "RCPT TO:<>"], "501 5.5.4 Syntax: RCPT TO:<address>"),
    (["EHLO c.test", "STARTTLS now"], "501 5.5.4 Syntax: STARTTLS"),
    (["NOOP", "RSET x"], "501 5.5.4 Syntax: RSET"),
    (["VRFY"], "501 5.5.4 Syntax: VRFY <address>"),
    (["EXPN staff"], "502 5.5.1 EXPN not implemented"),
    (["FOO"], '500 5.5.1 Error: command "FOO" not recognized'),
    (["AUTH PLAIN x"], "503 5.5.1 Error: send EHLO first"),
    (["EHLO c.test", "AUTH PLAIN x"], "502 5.5.1 AUTH not offered"),
])
def test_session_guards(commands: list[str], last: str) -> None:
    c = Conversation()
    assert c.send(*commands)[-1] == last


def test_session_bad_lines_get_500_and_twenty_end_the_session() -> None:
    c = Conversation()
    assert c.feed(b"\r\n") == ["500 5.5.2 Error: bad syntax"]
    assert c.feed(b"\xff\xfe\r\n") == ["500 5.5.2 Error: bad syntax"]
    assert c.feed(b"NOOP " + b"x" * 600 + b"\r\n") == ["500 5.5.2 Line too long"]
    assert c.feed(b"X" * 3000 + b"\r\n") == ["500 5.5.2 Line too long"]
    got = c.feed(b"BAD\r\n" * 16)
    assert got[-1] == "421 4.7.0 Too many errors, closing connection"
    assert c.closed == "fin" and c.session.end_reason == "too many errors"
    assert c.feed(b"NOOP\r\n") == []  # over: nothing more is read


def test_session_overlong_line_split_across_reads_gets_one_reply() -> None:
    c = Conversation()
    assert c.feed(b"X" * 1500) == []
    assert c.feed(b"Y" * 1500) == []
    assert c.feed(b"Z\r\nNOOP\r\n") == ["500 5.5.2 Line too long", "250 2.0.0 Ok"]


def test_session_overlong_line_then_eof_ends_quietly() -> None:
    c = Conversation()
    c.feed(b"X" * 3000)
    assert c.eof() == []
    assert c.closed == "fin" and c.errors == []
    c.lost()
    assert c.updates["end_reason"] == "client closed"


def test_session_refused_banner_serves_only_quit() -> None:
    c = Conversation(scenario("""\
        rules:
          - {name: closed, on: connect, reply: 554 5.3.2 No SMTP service here}
        """))
    assert c.greeting == ["554 5.3.2 No SMTP service here"]
    assert c.cmd("EHLO c.test") == "503 5.5.1 Bad sequence of commands"
    assert c.cmd("QUIT") == "221 2.0.0 Bye"
    assert c.closed == "fin"


# ---------------------------------------------------- the one transaction


def test_session_pipelined_transactions_are_never_mixed() -> None:
    c = Conversation()
    c.ehlo()
    got = c.feed(b"MAIL FROM:<a@lab.test>\r\nRCPT TO:<b@lab.test>\r\nRCPT TO:<c@lab.test>\r\n"
                 b"DATA\r\n")
    assert c.codes(got) == [250, 250, 250, 354]
    got = c.feed(b"one\r\n.\r\nMAIL FROM:<x@lab.test>\r\nRCPT TO:<y@lab.test>\r\nDATA\r\n"
                 b"two\r\n.\r\nQUIT\r\n")
    assert c.codes(got) == [250, 250, 250, 354, 250, 221]
    [m1, m2] = c.messages
    assert (m1.mail_from, m1.rcpt_tos, m1.raw) == ("a@lab.test", ("b@lab.test", "c@lab.test"),
                                                   b"one\r\n")
    assert (m2.mail_from, m2.rcpt_tos, m2.raw) == ("x@lab.test", ("y@lab.test",), b"two\r\n")
    assert c.session.used["pipelined"] >= 3
    assert [(a.rcpt, a.message_id, a.outcome) for a in c.attempts] == [
        ("b@lab.test", 1, "accepted"), ("c@lab.test", 1, "accepted"),
        ("y@lab.test", 2, "accepted")]


@pytest.mark.parametrize("reset", ["RSET", "EHLO again.test", "HELO again.test"])
def test_session_rset_and_greetings_end_the_transaction(reset: str) -> None:
    c = Conversation()
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>")
    assert c.session.transaction is not None
    assert c.cmd(reset).startswith("250")
    assert c.session.transaction is None
    assert c.cmd("DATA") == "503 5.5.1 Error: need MAIL command"
    assert c.attempts == []  # an abandoned transaction is no verdict


def test_session_data_unstuffs_dots_and_keeps_bytes() -> None:
    c = Conversation()
    c.ehlo()
    body = b"Subject: dots\r\n\r\n..leading\r\n.\xff\xfe raw\r\nlast line\r\n"
    assert c.transaction(body=body)[-1] == "250 2.0.0 Ok: queued as 1"
    assert c.messages[0].raw == b"Subject: dots\r\n\r\n.leading\r\n\xff\xfe raw\r\nlast line\r\n"
    assert c.messages[0].subject == "dots"


def test_session_body_arriving_in_pieces() -> None:
    c = Conversation()
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA")
    data = b"Subject: pieces\r\n\r\n" + b"line\r\n" * 1000 + b".\r\n"
    replies = []
    for i in range(0, len(data), 7):  # the terminator split at every possible place
        replies += c.feed(data[i:i + 7])
    assert replies == ["250 2.0.0 Ok: queued as 1"]
    assert c.messages[0].raw == data[:-3]


def test_session_empty_message() -> None:
    c = Conversation()
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA")
    assert c.feed(b".\r\n") == ["250 2.0.0 Ok: queued as 1"]
    assert c.messages[0].raw == b""


def test_session_size_limit_counts_the_message_not_the_doubled_dots() -> None:
    c = Conversation(scenario("server: {size_limit: 1000}\n"))
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA")
    fits = b"\r\n".join([b"." * 50] * 19) + b"\r\n"  # 988 bytes, 1007 on the wire
    assert c.feed(fits.replace(b"\r\n.", b"\r\n..") + b".\r\n")[-1].startswith("250")
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA")
    assert c.feed(b"x" * 5000 + b"\r\n.\r\n") == [
        "552 5.3.4 Message size exceeds fixed maximum message size"]
    assert len(c.messages) == 1 and c.session.held < 1000
    assert c.attempts[-1].outcome == "rejected" and c.attempts[-1].code == 552


def test_session_over_the_limit_is_drained_not_kept() -> None:
    c = Conversation(scenario("server: {size_limit: 1000}\n"))
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA")
    for _ in range(100):
        assert c.feed(b"y" * 10_000) == []
        assert c.session.held < 100
    assert c.feed(b"\r\n.\r\nNOOP\r\n") == [
        "552 5.3.4 Message size exceeds fixed maximum message size", "250 2.0.0 Ok"]


def test_session_max_line_length_refuses_after_the_dot() -> None:
    c = Conversation(scenario("server: {max_line_length: 100}\n"))
    c.ehlo()
    assert c.transaction(body=b"x" * 200 + b"\r\n")[-1] == (
        "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)")
    assert c.messages == []


def test_session_undecodable_subject_is_stored_as_sent() -> None:
    c = Conversation()
    c.ehlo()
    assert c.transaction(body=b"Subject: =?utf-8?B?a?=\r\n\r\nx\r\n")[-1].startswith("250")
    assert c.messages[0].subject == "=?utf-8?B?a?="
    assert c.errors == []


# --------------------------------------------------------------------- BDAT


def test_session_bdat_chunks_split_anywhere_join_exactly() -> None:
    c = Conversation()
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test> BODY=BINARYMIME", "RCPT TO:<b@lab.test>")
    stream = b"BDAT 5\r\nab\r\ncBDAT 3 LAST\r\n\x00\r\n"
    replies = []
    for byte in stream:
        replies += c.feed(bytes([byte]))
    assert replies == ["250 2.0.0 5 octets received", "250 2.0.0 Ok: queued as 1"]
    assert c.messages[0].raw == b"ab\r\nc\x00\r\n"


def test_session_bdat_over_the_limit_is_refused_and_read_past() -> None:
    c = Conversation(scenario("server: {size_limit: 1000}\n"))
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>")
    assert c.feed(b"BDAT 5000\r\n" + b"x" * 4000) == []
    assert c.session.held < 100  # dropped as it comes
    assert c.feed(b"x" * 1000 + b"BDAT 3 LAST\r\nabc") == [
        "552 5.3.4 Message size exceeds fixed maximum message size",
        "503 5.5.1 Earlier chunk was refused; send RSET"]
    assert c.cmd("RSET") == "250 2.0.0 Ok"


def test_session_data_after_bdat_and_binarymime_with_data() -> None:
    c = Conversation()
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>")
    c.feed(b"BDAT 2\r\nab")
    assert c.cmd("DATA") == "503 5.5.1 DATA cannot follow BDAT in one transaction"
    c.cmd("RSET")
    c.send("MAIL FROM:<a@lab.test> BODY=BINARYMIME", "RCPT TO:<b@lab.test>")
    assert c.cmd("DATA") == "503 5.5.1 BODY=BINARYMIME needs BDAT, not DATA"


def test_session_bdat_with_a_size_and_bad_words_is_refused_and_read_past() -> None:
    # the size is readable: its bytes are the chunk, not commands
    c = Conversation()
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>")
    assert c.feed(b"BDAT 5 MORE\r\nhelloNOOP\r\n") == [
        "501 5.5.4 Syntax: BDAT <size> [LAST]", "250 2.0.0 Ok"]
    assert any(x.text == "<chunk: 5 bytes, discarded>" for x in c.lines)
    assert c.feed(b"BDAT 3 LAST\r\nabc") == ["250 2.0.0 Ok: queued as 1"]
    # not offered: refused the same way, and the stream stays in step
    off = Conversation(scenario("server: {extensions: {chunking: false}}\n"))
    off.ehlo()
    assert off.feed(b"BDAT 4 LAST\r\nQUITNOOP\r\n") == [
        "502 5.5.1 BDAT not offered", "250 2.0.0 Ok"]
    assert off.closed is None


def test_session_bdat_without_a_size_ends_the_session() -> None:
    c = Conversation()
    c.ehlo()
    assert c.cmd("BDAT lots") == "501 5.5.4 Syntax: BDAT <size> [LAST]"
    assert c.closed == "fin" and c.session.end_reason == "unreadable BDAT size"


# ------------------------------------------------------------------ STARTTLS


def test_session_plaintext_after_starttls_is_discarded() -> None:
    """A man in the middle appends a command to STARTTLS (CVE-2011-0411):
    it is dropped, and the first reply over TLS answers the client's EHLO."""
    c = Conversation()
    c.ehlo()
    assert c.feed(b"STARTTLS\r\nNOOP injected\r\n") == ["220 2.0.0 Ready to start TLS"]
    assert any("discarded 15 bytes" in x.text for x in c.lines)
    assert c.ehlo()[0].startswith("250-")
    assert c.session.tls and c.updates["tls_version"] == "TLSv1.3"


def test_session_starttls_forgets_the_login_and_the_greeting() -> None:
    c = Conversation(scenario(AUTH))
    c.ehlo()
    assert c.cmd(f"AUTH PLAIN {PLAIN_ALICE}") == "235 2.7.0 Authentication successful"
    assert c.cmd("STARTTLS").startswith("220")
    assert c.session.auth_user is None and c.session.helo is None
    assert c.cmd("MAIL FROM:<a@lab.test>") == "503 5.5.1 Error: send HELO/EHLO first"
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@lab.test>") == "530 5.7.0 Authentication required"
    assert c.cmd("STARTTLS") == "503 5.5.1 TLS already active"


def test_session_starttls_off_and_required() -> None:
    assert Conversation(scenario("server: {starttls: off}\n")).send(
        "EHLO c.test", "STARTTLS")[-1] == "502 5.5.1 STARTTLS not offered"
    c = Conversation(scenario("server: {starttls: require}\n"))
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@lab.test>") == "530 5.7.0 Must issue a STARTTLS command first"


def test_session_tls_fail_answers_220_then_asks_for_the_alert() -> None:
    c = Conversation(scenario("rules:\n  - {name: broken, on: starttls, fault: tls_fail}\n"))
    c.ehlo()
    assert c.cmd("STARTTLS") == "220 2.0.0 Ready to start TLS"
    assert c.closed == "tls_fail" and c.session.end_reason == "tls_fail (rule broken)"


# ---------------------------------------------------------------------- AUTH


def test_session_auth_plain_login_and_cram_md5() -> None:
    c = Conversation(scenario(AUTH))
    c.ehlo()
    assert c.cmd("AUTH PLAIN") == "334 "  # an empty challenge (RFC 4954 4)
    assert c.cmd(PLAIN_ALICE) == "235 2.7.0 Authentication successful"
    c = Conversation(scenario(AUTH))
    c.ehlo()
    assert c.cmd("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert c.cmd(base64.b64encode(b"alice").decode()) == "334 UGFzc3dvcmQ6"
    assert c.cmd(base64.b64encode(b"wrong").decode()) == (
        "535 5.7.8 Authentication credentials invalid")
    c = Conversation(scenario(AUTH))
    c.ehlo()
    challenge = base64.b64decode(c.cmd("AUTH CRAM-MD5")[4:])
    digest = hmac.new(b"s3cret", challenge, hashlib.md5).hexdigest()
    assert c.cmd(base64.b64encode(f"alice {digest}".encode()).decode()).startswith("235")
    assert c.cmd("AUTH PLAIN x") == "503 5.5.1 Already authenticated"
    assert not any("s3cret" in x.text or PLAIN_ALICE in x.text for x in c.lines)


def test_session_auth_cancel_bad_base64_and_an_overlong_answer() -> None:
    c = Conversation(scenario(AUTH))
    c.ehlo()
    c.cmd("AUTH LOGIN")
    assert c.cmd("*") == "501 5.7.0 Authentication cancelled"
    c.cmd("AUTH PLAIN")
    assert c.cmd("!!!") == "501 5.5.2 Cannot decode response"
    c.cmd("AUTH PLAIN")
    assert c.cmd("A" * 3000) == "500 5.5.6 Authentication exchange line is too long"
    assert c.cmd("NOOP") == "250 2.0.0 Ok"


def test_session_auth_needs_tls_unless_before_tls() -> None:
    c = Conversation(scenario("server: {auth: {users: {alice: s3cret}}}\n"))
    assert "AUTH PLAIN LOGIN" not in [x[4:] for x in c.ehlo()]
    assert c.cmd("AUTH PLAIN x") == (
        "538 5.7.11 Encryption required for requested authentication mechanism")


# ------------------------------------------------------------ rules applied


def test_session_scripted_replies_faults_and_attempts() -> None:
    c = Conversation(scenario("""\
        rules:
          - {name: full, on: rcpt, when: {rcpt: full@lab.test}, reply: 552 5.2.2 Mailbox full}
          - {name: grey, on: rcpt, when: {rcpt: grey@lab.test}, reply: 451 4.7.1 Later}
          - {name: slow, on: noop, delay: 2s}
        """))
    c.ehlo()
    got = c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<full@lab.test>", "RCPT TO:<grey@lab.test>",
                 "RCPT TO:<ok@lab.test>")
    assert got[1:] == ["552 5.2.2 Mailbox full", "451 4.7.1 Later", "250 2.1.5 Ok"]
    assert [(a.rcpt, a.outcome, a.code, a.rule) for a in c.attempts] == [
        ("full@lab.test", "rejected", 552, "full"), ("grey@lab.test", "deferred", 451, "grey")]
    t = c.t
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    assert c.t == t + 2 and any(x.text == "delay 2.000s" and x.rule == "slow" for x in c.lines)


@pytest.mark.parametrize(("fault", "how"), [("drop", "fin"), ("reset", "rst"), ("hang", "hang")])
def test_session_faults_end_the_conversation(fault: str, how: str) -> None:
    c = Conversation(scenario(f"rules:\n  - {{name: f, on: mail, fault: {fault}}}\n"))
    c.ehlo()
    assert c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>") == []
    assert c.closed == how
    assert c.session.end_reason == f"{fault} (rule f)"
    if fault == "hang":
        assert c.eof() == [] and c.closed == "fin"


def test_session_data_fault_after_part_of_the_body() -> None:
    c = Conversation(scenario(
        "rules:\n  - {name: cut, on: data, fault: drop, after_bytes: 100}\n"))
    c.ehlo()
    got = c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA")
    assert got[-1] == "354 End data with <CR><LF>.<CR><LF>"
    assert c.feed(b"x" * 99) == [] and c.closed is None
    c.feed(b"x" * 10)
    assert c.closed == "fin"
    assert [(a.outcome, a.rule) for a in c.attempts] == [("dropped", "cut")]
    assert any(x.text == "<100 bytes of the message>" for x in c.lines)


def test_session_tarpit_asks_for_a_drip_then_goes_on() -> None:
    c = Conversation(scenario("rules:\n  - {name: tar, on: noop, fault: tarpit, drip: 0.5s}\n"))
    assert c.cmd("NOOP") == "250 2.0.0 Ok"
    [drip] = [r for r in c.requests if isinstance(r, ss.Drip)]
    assert (drip.data, drip.interval) == (b"250 2.0.0 Ok\r\n", 0.5)
    assert c.cmd("QUIT") == "221 2.0.0 Bye"


def test_session_421_reply_closes_and_message_phase_rule_still_stores() -> None:
    c = Conversation(scenario("""\
        rules:
          - {name: spam, on: message, when: {body: viagra}, reply: 550 5.7.1 Spam}
          - {name: bye, on: rset, reply: 421 4.3.2 Going down}
        """))
    c.ehlo()
    assert c.transaction(body=b"Subject: x\r\n\r\nviagra\r\n")[-1] == "550 5.7.1 Spam"
    assert len(c.messages) == 1  # captured all the same
    assert c.attempts[-1].outcome == "rejected" and c.attempts[-1].message_id == 1
    assert c.cmd("RSET") == "421 4.3.2 Going down"
    assert c.closed == "fin" and c.session.end_reason == "closed after 421 (rule bye)"


def test_session_spf_is_asked_for_only_when_a_rule_uses_it() -> None:
    c = Conversation()
    c.ehlo()
    c.cmd("MAIL FROM:<a@lab.test>")
    assert not any(isinstance(r, ss.CheckSpf) for r in c.requests)
    c = Conversation(scenario(
        "rules:\n  - {name: spf, on: mail, when: {spf: fail}, reply: 550 5.7.23 SPF}\n"))
    c.spf.result = "fail"
    c.ehlo()
    assert c.cmd("MAIL FROM:<a@lab.test>") == "550 5.7.23 SPF"
    assert any(x.text.startswith("SPF fail for lab.test") for x in c.lines)


# ------------------------------------------------------------------ the end


def test_session_half_close_after_pipelined_quit_answers_everything() -> None:
    c = Conversation()
    got = c.feed(b"EHLO c.test\r\nMAIL FROM:<a@lab.test>\r\nRCPT TO:<b@lab.test>\r\nDATA\r\n"
                 b"x\r\n.\r\nQUIT\r\n")
    assert c.eof() == []
    assert c.codes(got)[-3:] == [354, 250, 221]
    assert c.closed == "fin" and c.session.end_reason == "quit"


def test_session_client_vanishing_after_rcpt_leaves_lost_attempts() -> None:
    c = Conversation()
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "RCPT TO:<c@lab.test>", "DATA")
    c.feed(b"partial body")
    c.lost()
    assert [(a.rcpt, a.outcome, a.phase) for a in c.attempts] == [
        ("b@lab.test", "lost", "message"), ("c@lab.test", "lost", "message")]
    assert c.updates["end_reason"] == "client closed"
    assert c.updates["mail_from"] == ["a@lab.test"]
    assert c.updates["rcpt_tos"] == ["b@lab.test", "c@lab.test"]
    assert c.lines[-1].text == "session ended: client closed"


def test_session_idle_timeout() -> None:
    c = Conversation()
    c.ehlo()
    assert c._replies(c._run(c.session.idle_timeout())) == [
        "421 4.4.2 Idle timeout, closing connection"]
    assert c.closed == "fin"


def test_session_internal_error_answers_451_and_drops_the_transaction() -> None:
    """A bug of ours while a command runs: 451, recorded, and the transaction
    is gone, so DATA after a failed DATA cannot store under an old envelope."""

    c = Conversation()
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA")
    real = ss.headline
    try:
        ss.headline = lambda content: 1 / 0  # type: ignore[assignment,misc]
        assert c.feed(b"x\r\n.\r\n") == ["451 4.3.0 Internal error in the harness (recorded)"]
    finally:
        ss.headline = real
    assert isinstance(c.errors[0], ZeroDivisionError)
    assert c.cmd("DATA") == "503 5.5.1 Error: need MAIL command"


def test_session_transfer_timeout_cuts_a_dripping_message() -> None:
    c = Conversation(scenario("server: {data_timeout: 30s}\n"))
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>")
    assert not c.session.in_transfer
    c.send("DATA")
    assert c.session.in_transfer
    c.feed(b"Subject: slow\r\n")
    assert c._replies(c._run(c.session.transfer_timeout())) == [
        "421 4.4.2 Message transfer took too long, closing connection"]
    assert c.closed == "fin" and c.session.end_reason == "message transfer timeout"
    assert [(a.rcpt, a.code, a.outcome) for a in c.attempts] == [("b@lab.test", 421, "deferred")]
    assert c.messages == []


def test_session_bdat_transaction_is_one_transfer() -> None:
    c = Conversation()
    c.ehlo()
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>")
    c.feed(b"BDAT 3\r\nabc")
    assert c.session.in_transfer  # between chunks too
    c.feed(b"BDAT 2 LAST\r\nde")
    assert not c.session.in_transfer


def test_session_store_that_cannot_write_defers_with_452_and_records_no_acceptance() -> None:
    """A full disk: the message is not kept, the client is told to try
    later (452 4.3.1), the pair's attempt says deferred, and the session
    goes on (the next transaction is taken once the store writes again)."""
    c = Conversation(commit_error=NotStored("disk full"))
    c.ehlo()
    out = c.transaction("a@lab.test", "b@lab.test", "c@lab.test")
    assert out[-1] == "452 4.3.1 Insufficient system storage"
    assert [(a.rcpt, a.outcome, a.code, a.enhanced, a.message_id) for a in c.attempts] == [
        ("b@lab.test", "deferred", 452, "4.3.1", None),
        ("c@lab.test", "deferred", 452, "4.3.1", None)]
    assert not any("stored as message" in line.text for line in c.lines)
    assert any("message not stored: disk full" in line.text for line in c.lines)
    assert c.cmd("MAIL FROM:<a@lab.test>").startswith("250")  # no transaction left over
    c.cmd("RSET")
    c.commit_error = None
    out = c.transaction("a@lab.test", "d@lab.test")
    assert out[-1].startswith("250 2.0.0 Ok: queued as 2")
    assert c.attempts[-1].outcome == "accepted" and c.attempts[-1].message_id == 2


def test_session_client_gone_before_the_commit_records_its_pairs_lost_with_the_message() -> None:
    """The message was handed to the store, the 250 never sent: the sender
    will try again, and the attempt says so (lost, with the message it left)."""
    c = Conversation(hold_commits=True)
    c.ehlo()
    assert c.transaction("a@lab.test", "b@lab.test")[-1].startswith("354")
    assert not c.attempts  # no verdict before the commit
    c.lost()
    assert [(a.outcome, a.message_id, a.phase) for a in c.attempts] == [("lost", 1, "message")]


# A large message's header and body conditions are tested before the
# decision, in a request of their own (the transport runs it in a worker
# thread); a small one's, or a scenario without such conditions, in the
# decision itself. The verdict is the same either way.
_CONTENT_RULES = """
rules:
  - {name: invoice, on: message, when: {header: {Subject: '*invoice*'}},
     reply: 554 5.7.1 no invoices}
  - {name: lottery, on: message, when: {body: {regex: '(?i)lottery'}},
     reply: 554 5.7.1 no lotteries}
"""


def _message(c: Conversation, subject: str, body: bytes) -> str:
    c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA")
    return c.feed(b"Subject: " + subject.encode() + b"\r\n\r\n" + body + b"\r\n.\r\n")[-1]


@pytest.mark.parametrize(
    ("subject", "body", "reply"),
    [
        ("Your invoice", b"x", "554 5.7.1 no invoices"),
        ("hello", b"you won the LOTTERY", "554 5.7.1 no lotteries"),
        ("hello", b"nothing to see", "250 2.0.0 Ok: queued as 1"),
    ],
)
@pytest.mark.parametrize("padding", [0, ss.CONTENT_INLINE])
def test_session_content_conditions_of_a_large_message_are_tested_ahead(
        subject: str, body: bytes, reply: str, padding: int) -> None:
    c = Conversation(scenario(_CONTENT_RULES))
    c.ehlo()
    assert _message(c, subject, b"a" * padding + b"\r\n" + body) == reply
    ahead = [r for r in c.requests if isinstance(r, ss.CheckContent)]
    assert len(ahead) == (1 if padding else 0)


def test_session_large_message_without_content_rules_is_not_tested_ahead() -> None:
    c = Conversation(scenario(
        "rules:\n  - {name: r, on: rcpt, when: {rcpt: x@y}, reply: 550 5.1.1 no}\n"))
    c.ehlo()
    assert _message(c, "hello", b"a" * ss.CONTENT_INLINE * 2) == "250 2.0.0 Ok: queued as 1"
    assert not any(isinstance(r, ss.CheckContent) for r in c.requests)
