"""The SMTP adapter on real sockets: every override and every fault as a client
sees it on the wire (raw sockets where smtplib would hide the detail)."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import time

import aiosmtplib
import pytest

from harness.testing import Harness

HELO = "client.lab.test"


class Wire:
    """A raw SMTP client: send bytes, read whole replies."""

    def __init__(self, h: Harness, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((h.host, h.port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionAbortedError(f"closed; partial {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> list[str]:
        lines = []
        while True:
            line = self.line().decode()
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return lines

    def cmd(self, text: str) -> list[str]:
        self.send(text.encode() + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """True when the server closed (EOF) without sending anything more."""
        data = self.sock.recv(4096)
        return data == b""

    def close(self) -> None:
        self.sock.close()


def scenario(rules: str, server: str = "") -> str:
    return f"scenario: t\n{server}rules:\n{rules}" if rules else f"scenario: t\n{server}"


# ---------------------------------------------------------------- defaults


def test_default_ehlo_advertises_extensions_and_replies_carry_enhanced_codes() -> None:
    with Harness() as h:
        w = Wire(h)
        assert w.reply() == ["220 mx.harness.test ESMTP SMTP Harness"]
        ehlo = w.cmd(f"EHLO {HELO}")
        keywords = {x[4:].split()[0] for x in ehlo[1:]}
        assert {"SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8"} <= keywords
        assert w.cmd("MAIL FROM:<a@lab.test>") == ["250 2.1.0 Ok"]
        assert w.cmd("RCPT TO:<b@lab.test>") == ["250 2.1.5 Ok"]
        assert w.cmd("DATA")[0].startswith("354 ")
        final = w.cmd("Subject: x\r\n\r\nhello\r\n.")
        assert final[0].startswith("250 2.0.0 ")
        assert w.cmd("NOOP") == ["250 2.0.0 Ok"]
        assert w.cmd("RSET") == ["250 2.0.0 Ok"]
        assert w.cmd("VRFY <b@lab.test>")[0].startswith("252 2.0.0")
        assert w.cmd("QUIT") == ["221 2.0.0 Bye"]
        assert w.closed()


def test_message_is_stored_byte_for_byte_with_dot_stuffing_undone() -> None:
    body = (b"Subject: dots\r\nX-Bin: \xc3\xa9t\xc3\xa9\r\n\r\n.leading dot\r\n..two\r\n"
            b"line with trailing spaces   \r\n\r\n.\r\n" + b"x" * 3000 + b"\r\n")
    with Harness() as h:
        with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=5) as c:
            c.sendmail("a@lab.test", ["b@lab.test"], body)
        [m] = h.messages()
    assert m.raw == body
    assert m.size == len(body)
    assert m.subject == "dots"


def test_empty_message_and_pipelined_commands_after_the_dot() -> None:
    with Harness() as h:
        w = Wire(h)
        w.reply()
        w.cmd(f"EHLO {HELO}")
        # One write: the whole transaction, an empty message, then another one and QUIT.
        w.send(b"MAIL FROM:<a@lab.test>\r\nRCPT TO:<b@lab.test>\r\nDATA\r\n")
        assert w.reply() == ["250 2.1.0 Ok"]
        assert w.reply() == ["250 2.1.5 Ok"]
        assert w.reply()[0].startswith("354")
        w.send(b".\r\nMAIL FROM:<a@lab.test>\r\nRCPT TO:<c@lab.test>\r\nDATA\r\n"
               b"Subject: 2\r\n\r\nsecond\r\n.\r\nQUIT\r\n")
        assert w.reply()[0].startswith("250 2.0.0")
        assert w.reply() == ["250 2.1.0 Ok"]
        assert w.reply() == ["250 2.1.5 Ok"]
        assert w.reply()[0].startswith("354")
        assert w.reply()[0].startswith("250 2.0.0")
        assert w.reply() == ["221 2.0.0 Bye"]
        msgs = h.messages()
    assert [m.raw for m in msgs] == [b"", b"Subject: 2\r\n\r\nsecond\r\n"]
    assert [m.rcpt_tos for m in msgs] == [["b@lab.test"], ["c@lab.test"]]


def test_null_sender_of_bounces_is_accepted() -> None:
    with Harness() as h:
        with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=5) as c:
            c.sendmail("<>", ["b@lab.test"], b"Subject: bounce\r\n\r\nx\r\n")
        [m] = h.messages()
    assert m.mail_from == ""


def test_aiosmtplib_client_delivers() -> None:
    with Harness() as h:
        async def send() -> None:
            await aiosmtplib.send(b"Subject: a\r\n\r\nasync\r\n", sender="a@lab.test",
                                  recipients=["b@lab.test"], hostname=h.host, port=h.port,
                                  local_hostname=HELO, timeout=5, start_tls=False)
        asyncio.run(send())
        [m] = h.messages()
    assert m.raw == b"Subject: a\r\n\r\nasync\r\n"


# ------------------------------------------------------------------ banner


def test_banner_421_closes_the_connection() -> None:
    s = scenario("  - on: connect\n    reply: 421 4.3.2 System not accepting network messages\n")
    with Harness(s) as h:
        w = Wire(h)
        assert w.reply() == ["421 4.3.2 System not accepting network messages"]
        assert w.closed()
        h.wait_idle()
        [sess] = h.sessions()
    assert "421" in (sess.end_reason or "")


def test_banner_554_then_only_quit_is_served() -> None:
    s = scenario("  - on: connect\n    reply: 554 5.7.1 No SMTP service here\n")
    with Harness(s) as h:
        w = Wire(h)
        assert w.reply() == ["554 5.7.1 No SMTP service here"]
        assert w.cmd(f"EHLO {HELO}") == ["503 5.5.1 Bad sequence of commands"]
        assert w.cmd("QUIT") == ["221 2.0.0 Bye"]


def test_banner_multi_line_and_delayed() -> None:
    s = scenario("  - on: connect\n    delay: 200ms\n"
                 "    reply: ['220 mx.lab.test first line', '220 mx.lab.test second line']\n")
    with Harness(s) as h:
        w = Wire(h)
        start = time.monotonic()
        assert w.reply() == ["220-mx.lab.test first line", "220 mx.lab.test second line"]
        assert time.monotonic() - start >= 0.19
        assert w.cmd(f"EHLO {HELO}")[0].startswith("250-")


# ------------------------------------------------------------ transactions


def test_mixed_per_recipient_replies_in_one_transaction() -> None:
    s = scenario(
        "  - on: rcpt\n    when: {rcpt: unknown@*}\n    reply: 550 5.1.1 User unknown\n"
        "  - on: rcpt\n    when: {rcpt: later@*}\n    reply: 451 4.2.1 Try later\n")
    with Harness(s) as h:
        with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=5) as c:
            refused = c.sendmail("a@lab.test", ["ok@lab.test", "unknown@lab.test",
                                                "later@lab.test"], b"Subject: m\r\n\r\nx\r\n")
        assert refused == {"unknown@lab.test": (550, b"5.1.1 User unknown"),
                           "later@lab.test": (451, b"4.2.1 Try later")}
        [m] = h.messages()
        attempts = {a.rcpt: (a.phase, a.code, a.outcome) for a in h.attempts()}
    assert m.rcpt_tos == ["ok@lab.test"]
    assert attempts == {"ok@lab.test": ("message", 250, "accepted"),
                        "unknown@lab.test": ("rcpt", 550, "rejected"),
                        "later@lab.test": ("rcpt", 451, "deferred")}


def test_data_command_rejected_before_354() -> None:
    s = scenario("  - on: data\n    reply: 554 5.7.1 Message refused\n")
    with Harness(s) as h:
        w = Wire(h)
        w.reply()
        w.cmd(f"EHLO {HELO}")
        w.cmd("MAIL FROM:<a@lab.test>")
        w.cmd("RCPT TO:<b@lab.test>")
        assert w.cmd("DATA") == ["554 5.7.1 Message refused"]
        assert w.cmd("RSET") == ["250 2.0.0 Ok"]
        w.close()
        h.wait_idle()
        [a] = h.attempts()
        assert (a.phase, a.code, a.outcome) == ("data", 554, "rejected")
        assert h.messages() == []


def test_then_close_replies_and_hangs_up() -> None:
    s = scenario("  - on: mail\n    reply: 550 5.7.1 Go away\n    then: close\n")
    with Harness(s) as h:
        w = Wire(h)
        w.reply()
        w.cmd(f"EHLO {HELO}")
        assert w.cmd("MAIL FROM:<a@lab.test>") == ["550 5.7.1 Go away"]
        assert w.closed()


def test_size_declared_over_limit_and_actual_over_limit() -> None:
    s = scenario("", server="server: {size_limit: 1KB}\n")
    with Harness(s) as h:
        w = Wire(h)
        w.reply()
        assert "250-SIZE 1000" in w.cmd(f"EHLO {HELO}")
        assert w.cmd("MAIL FROM:<a@lab.test> SIZE=5000")[0].startswith("552 5.3.4")
        assert w.cmd("MAIL FROM:<a@lab.test> SIZE=500") == ["250 2.1.0 Ok"]
        w.cmd("RCPT TO:<b@lab.test>")
        w.cmd("DATA")
        assert w.cmd("Subject: big\r\n\r\n" + "y" * 3000 + "\r\n.")[0].startswith("552 5.3.4")
        assert w.cmd("NOOP") == ["250 2.0.0 Ok"]
        w.close()
        h.wait_idle()
        assert h.messages() == []
        [a] = h.attempts()
        assert (a.code, a.enhanced, a.outcome) == (552, "5.3.4", "rejected")


# ------------------------------------------------------------------- faults


def test_drop_closes_without_a_reply() -> None:
    s = scenario("  - on: rcpt\n    fault: drop\n")
    with Harness(s) as h:
        w = Wire(h)
        w.reply()
        w.cmd(f"EHLO {HELO}")
        w.cmd("MAIL FROM:<a@lab.test>")
        w.send(b"RCPT TO:<b@lab.test>\r\n")
        assert w.closed()
        h.wait_idle()
        [a] = h.attempts()
    assert (a.outcome, a.code) == ("dropped", None)


def test_reset_sends_a_tcp_rst() -> None:
    s = scenario("  - on: helo\n    fault: reset\n")
    with Harness(s) as h:
        w = Wire(h)
        w.reply()
        w.send(f"EHLO {HELO}\r\n".encode())
        with pytest.raises(ConnectionResetError):
            w.sock.recv(4096)


def test_hang_sends_nothing_until_the_client_gives_up() -> None:
    s = scenario("  - on: mail\n    fault: hang\n")
    with Harness(s) as h:
        w = Wire(h, timeout=0.3)
        w.reply()
        w.cmd(f"EHLO {HELO}")
        w.send(b"MAIL FROM:<a@lab.test>\r\n")
        with pytest.raises(TimeoutError):  # the client's own timeout is the event
            w.sock.recv(4096)
        w.close()
        h.wait_idle()
        [sess] = h.sessions()
    assert (sess.end_reason or "").startswith("hang")


def test_tarpit_drips_the_reply_one_byte_at_a_time() -> None:
    s = scenario("  - on: rcpt\n    reply: 250 2.1.5 Slowly ok\n"
                 "    fault: tarpit\n    drip: 20ms\n")
    with Harness(s) as h:
        w = Wire(h)
        w.reply()
        w.cmd(f"EHLO {HELO}")
        w.cmd("MAIL FROM:<a@lab.test>")
        w.send(b"RCPT TO:<b@lab.test>\r\n")
        reads = []
        data = b""
        start = time.monotonic()
        while not data.endswith(b"\r\n"):
            chunk = w.sock.recv(4096)
            assert chunk
            reads.append(chunk)
            data += chunk
        elapsed = time.monotonic() - start
    assert data == b"250 2.1.5 Slowly ok\r\n"
    assert len(reads) > len(data) // 2  # arrived in many small pieces
    assert elapsed >= 0.015 * len(data)


def test_client_vanishing_mid_data_leaves_store_consistent() -> None:
    with Harness() as h:
        w = Wire(h)
        w.reply()
        w.cmd(f"EHLO {HELO}")
        w.cmd("MAIL FROM:<a@lab.test>")
        w.cmd("RCPT TO:<b@lab.test>")
        w.cmd("DATA")
        w.send(b"Subject: half\r\n\r\npart of a body")
        w.close()
        h.wait_idle()
        assert h.messages() == []
        [a] = h.attempts()
        assert (a.rcpt, a.outcome, a.code) == ("b@lab.test", "lost", None)
        [sess] = h.sessions()
        assert sess.ended_at is not None
        # and the server still serves
        with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=5) as c:
            assert c.noop()[0] == 250


# ------------------------------------------------------------------ garbage


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"\xff\xfe\x00\x01junk", "500 5.5.2 Error: bad syntax"),
        (b"", "500 5.5.2 Error: bad syntax"),
        (b"FOO bar", '500 5.5.1 Error: command "FOO" not recognized'),
        (b"MAIL FROM:<a@lab.test>", "503 5.5.1 Error: send HELO/EHLO first"),
        (b"RCPT TO:<a@lab.test>", "503 5.5.1 Error: need MAIL command"),
        (b"DATA", "503 5.5.1 Error: need MAIL command"),
        (b"HELO", "501 5.5.4 Syntax: HELO hostname"),
        (b"A" * 600, "500 5.5.2 Line too long"),
        (b"NOOP " + b"x" * 5000, "500 5.5.2 Line too long"),
    ],
)
def test_garbage_gets_a_proper_smtp_error(line: bytes, reply: str) -> None:
    with Harness() as h:
        w = Wire(h)
        w.reply()
        w.send(line + b"\r\n")
        assert w.reply() == [reply]
        assert w.cmd("NOOP") == ["250 2.0.0 Ok"]


def test_endless_garbage_is_cut_off_and_the_server_lives_on() -> None:
    with Harness() as h:
        w = Wire(h)
        w.reply()
        w.send(b"\x00\x01\x02 binary\r\n" * 30)
        replies = []
        while True:
            try:
                replies.append(w.reply()[0])
            except ConnectionAbortedError:
                break
        assert replies[-1] == "421 4.7.0 Too many errors, closing connection"
        assert len(replies) == 21  # 20 errors, then the 421
        with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=5) as c:
            c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: after\r\n\r\nx\r\n")
        assert len(h.messages()) == 1
        assert h.errors == []


def test_random_bytes_never_kill_the_server() -> None:
    import random

    rng = random.Random(1234)
    with Harness() as h:
        for _ in range(30):
            w = Wire(h)
            w.reply()
            w.send(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))))
            w.close()
        h.wait_idle()
        with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=5) as c:
            assert c.ehlo()[0] == 250
        assert h.errors == []


def _chance_replies(seed: int) -> list[int]:
    s = scenario("  - on: rcpt\n    when: {chance: 50%}\n    reply: 451 4.4.2 Flaky\n")
    codes = []
    with Harness(s, seed=seed) as h, smtplib.SMTP(h.host, h.port, local_hostname=HELO,
                                                  timeout=5) as c:
        c.ehlo()
        c.mail("a@lab.test")
        for i in range(24):
            codes.append(c.rcpt(f"r{i}@lab.test")[0])
    return codes


def test_seed_replays_a_run_on_the_wire() -> None:
    first = _chance_replies(7)
    assert first == _chance_replies(7)
    assert set(first) == {250, 451}
    assert first != _chance_replies(8)


@pytest.mark.parametrize("transfer", ["data", "bdat"])
def test_half_close_after_pipelined_quit_still_gets_every_reply(transfer: str) -> None:
    """A client (Exim does this) sends the message and QUIT, then shuts down its
    sending side: the buffered commands must still be answered, the 250 among
    them, and the connection closed after the 221."""
    body = b"Subject: half\r\n\r\nclosing after QUIT\r\n"
    payload = (b"DATA\r\n" + body + b".\r\n" if transfer == "data"
               else f"BDAT {len(body)} LAST\r\n".encode() + body)
    with Harness() as h:
        w = Wire(h)
        w.reply()
        w.cmd(f"EHLO {HELO}")
        w.send(b"MAIL FROM:<a@lab.test>\r\nRCPT TO:<b@lab.test>\r\n" + payload + b"QUIT\r\n")
        w.sock.shutdown(socket.SHUT_WR)
        replies = []
        while True:
            try:
                replies.append(w.reply()[0])
            except ConnectionAbortedError:
                break
        assert replies[-2].startswith("250 2.0.0 Ok: queued as")
        assert replies[-1] == "221 2.0.0 Bye"
        [m] = h.messages()
        assert m.raw == body
