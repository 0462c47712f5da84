"""The scenario library, proven with real clients against real sockets.

Three layers:

- every file of the library loads, passes `harness check`, and carries a
  `send:` message and an `expect:` verdict that agree with its own rules;
- a small "lab sender" (smtplib, retrying like an MTA on a fake clock) plays
  each scenario's `send:` message and must reach the scenario's `expect:`
  verdict (outcome, attempt counts, NDR status and diagnostic);
- one focused test per scenario asserts the exact replies on the wire and
  what the store recorded (attempts, messages, session end).

Every client uses `local_hostname` (no DNS lookup), loopback only and short
socket timeouts. Time is injected (`Harness(clock=...)`) where a rule reads
it; the only waits are the ones a scenario is about (a tarpit's drip, a
silent server's client timeout), kept short.
"""

from __future__ import annotations

import itertools
import smtplib
import socket
import time
from contextlib import closing
from dataclasses import dataclass, field

import pytest

from harness import cli
from harness.scenario.engine import Connect, Engine, Helo, Mail
from harness.scenario.library import library_dir, library_names, load
from harness.scenario.loader import load_text
from harness.scenario.model import Outcome, Scenario, Send
from harness.testing import Harness

CLIENT = "client.lab.test"  # our EHLO name: smtplib never calls getfqdn()
TIMEOUT = 5.0  # client socket timeout: nothing can hang a test for long
LIBRARY = library_names()


# ------------------------------------------------------------------ helpers


class FakeClock:
    """An engine clock the test moves by hand (for first_seen windows)."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def smtp(h: Harness, timeout: float = TIMEOUT) -> smtplib.SMTP:
    return smtplib.SMTP(h.host, h.port, local_hostname=CLIENT, timeout=timeout)


_ids = itertools.count(1)


def build_message(*, subject: str = "SMTP Harness test", body: str = "Hello from the lab.",
                  size: int = 0, mail_from: str = "sender@lab.test",
                  rcpt: tuple[str, ...] = ("user@lab.test",),
                  message_id: str | None = None) -> bytes:
    """A plain RFC 5322 message, padded with 76-column lines to about `size`."""
    mid = message_id or f"<test-{next(_ids)}@{CLIENT}>"
    head = (f"From: <{mail_from}>\r\nTo: {', '.join(f'<{r}>' for r in rcpt)}\r\n"
            f"Subject: {subject}\r\nMessage-ID: {mid}\r\n\r\n").encode()
    text = (body + "\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    while len(head) + len(text) + len(line) <= size:
        text += line
    return head + text


def message_for(send: Send) -> bytes:
    return build_message(subject=send.subject, size=send.size, mail_from=send.mail_from,
                         rcpt=send.rcpt, message_id=f"<lab-{send.subject.replace(' ', '-')}"
                                                    f"@{CLIENT}>")


class Raw:
    """A bare socket client, for what smtplib hides: dripped bytes, EOF, RST."""

    def __init__(self, h: Harness, timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection((h.host, h.port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise EOFError(f"connection closed; partial line {self.buf!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> list[bytes]:
        """All lines of one (multi-line) reply."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def command(self, text: str) -> list[bytes]:
        self.send(text.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def greet(raw: Raw) -> None:
    assert raw.reply()[0].startswith(b"220 ")
    assert raw.command(f"EHLO {CLIENT}")[-1].startswith(b"250 ")


def one_session(h: Harness):  # type: ignore[no-untyped-def]
    h.wait_idle()
    sessions = h.sessions()
    assert len(sessions) == 1, sessions
    return sessions[0]


def verdicts(h: Harness, rcpt: str) -> list[tuple[str, str, int | None, str | None]]:
    """(phase, outcome, code, enhanced) of each recorded attempt of a recipient."""
    return [(a.phase, a.outcome, a.code, a.enhanced) for a in h.attempts(rcpt=rcpt)]


# --------------------------------------------------------- the lab sender

#: What a sending MTA waits between retries (Postfix minimal_backoff_time).
RETRY_INTERVAL = 300.0


@dataclass
class Verdict:
    kind: str  # accepted | temporary | permanent
    reply: str  # "CODE X.Y.Z text" as the client saw it, or what went wrong

    @property
    def enhanced(self) -> str | None:
        parts = self.reply.split()
        return parts[1] if len(parts) > 1 and parts[1].count(".") == 2 else None


def _verdict(code: int, text: bytes | str) -> Verdict:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = " ".join(text.split())
    kind = "accepted" if code < 400 else "temporary" if code < 500 else "permanent"
    return Verdict(kind, f"{code} {text}")


def deliver_once(h: Harness, send: Send, rcpts: list[str], *, timeout: float
                 ) -> dict[str, Verdict]:
    """One delivery attempt (one connection) as an MTA makes it: SIZE when
    offered, each recipient, DATA for those accepted. A lost connection is a
    temporary failure of every recipient still open."""
    out: dict[str, Verdict] = {}
    msg = message_for(send)

    def everyone(v: Verdict) -> dict[str, Verdict]:
        return {r: out.get(r, v) for r in rcpts}

    try:
        s = smtp(h, timeout=timeout)
    except smtplib.SMTPConnectError as e:
        return everyone(_verdict(e.smtp_code, e.smtp_error))
    except (smtplib.SMTPServerDisconnected, OSError) as e:
        return everyone(Verdict("temporary", f"connection: {e}"))
    try:
        code, text = s.ehlo()
        if code != 250:
            return everyone(_verdict(code, text))
        options = [f"SIZE={len(msg)}"] if s.has_extn("size") else []
        code, text = s.mail(send.mail_from, options)
        if code != 250:
            return everyone(_verdict(code, text))
        accepted = []
        for r in rcpts:
            code, text = s.rcpt(r)
            if code in (250, 251):
                accepted.append(r)
            else:
                out[r] = _verdict(code, text)
        if not accepted:
            return out
        code, text = s.data(msg)
        for r in accepted:
            out[r] = _verdict(code, text)
        return out
    except (smtplib.SMTPServerDisconnected, OSError) as e:
        return everyone(Verdict("temporary", f"connection lost: {e}"))
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            s.close()


@dataclass
class LabRun:
    outcome: Outcome
    attempts: dict[str, int] = field(default_factory=dict)
    final: dict[str, Verdict] = field(default_factory=dict)


def lab_sender(h: Harness, clock: FakeClock, send: Send, *, max_tries: int,
               timeout: float) -> LabRun:
    """Retry what failed temporarily, RETRY_INTERVAL apart on the fake clock,
    until every recipient is delivered or bounced, or `max_tries` is spent."""
    pending = list(send.rcpt)
    run = LabRun(outcome=Outcome.DELIVERED, attempts=dict.fromkeys(send.rcpt, 0))
    for _ in range(max_tries):
        if not pending:
            break
        result = deliver_once(h, send, pending, timeout=timeout)
        for r, v in result.items():
            run.attempts[r] += 1
            run.final[r] = v
        pending = [r for r in pending if result[r].kind == "temporary"]
        h.wait_idle()
        clock.advance(RETRY_INTERVAL)
    kinds = {v.kind for v in run.final.values()}
    if "permanent" in kinds:
        run.outcome = Outcome.BOUNCED
    elif pending:
        run.outcome = Outcome.DEFERRED
    return run


# ------------------------------------------------ the library as a whole


def test_library_has_the_required_failures() -> None:
    required = {"accept", "unknown-user", "mailbox-full", "greylisting", "relay-denied",
                "message-too-large", "service-unavailable", "too-many-recipients",
                "temp-fail-then-success", "tarpit", "drop-mid-data", "drop-after-dot",
                "rate-limited"}
    assert required <= set(LIBRARY)
    assert len(set(LIBRARY) - {"accept"}) >= 12


def test_library_every_scenario_has_a_focused_test() -> None:
    tests = [n for n in globals() if n.startswith("test_")]
    missing = [name for name in LIBRARY
               if not any(t.startswith(f"test_{name.replace('-', '_')}_") for t in tests)]
    assert not missing, f"library scenarios without a focused test: {missing}"


@pytest.mark.parametrize("name", LIBRARY)
def test_library_scenario_is_complete(name: str) -> None:
    s = load(name)
    assert s.name == name, "scenario: should repeat the file name"
    assert s.summary and "\n" not in s.summary
    assert s.tags
    assert s.send is not None and s.send.rcpt, "send: the message that exercises it"
    assert s.expect is not None and s.expect.outcome is not None
    e = s.expect
    if e.outcome is Outcome.BOUNCED:
        assert e.ndr is not None and e.ndr.status and e.ndr.action == "failed"
        assert e.ndr.status.startswith("5.")
        assert e.ndr.diagnostic
    if e.outcome is Outcome.DEFERRED or (e.min_attempts or 1) > 1:
        assert e.min_attempts and e.min_attempts >= 2, "a retry scenario says how many tries"


@pytest.mark.parametrize("name", LIBRARY)
def test_library_scenario_passes_harness_check(name: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = library_dir() / f"{name}.yaml"
    assert cli.main(["check", str(path)]) == 0
    assert f"ok: {path}" in capsys.readouterr().out


@pytest.mark.parametrize("name", LIBRARY)
def test_library_scenario_meets_its_expect_with_a_lab_sender(name: str) -> None:
    """Play `send:` with retries; the result must be what `expect:` says."""
    scenario = load(name)
    assert scenario.send is not None and scenario.expect is not None
    e = scenario.expect
    max_tries = e.max_attempts or (e.min_attempts or 1) + (
        0 if e.outcome is Outcome.DEFERRED else 1)
    clock = FakeClock()
    with Harness(name, clock=clock) as h:
        run = lab_sender(h, clock, scenario.send, max_tries=max_tries, timeout=1.0)
        assert not h.errors
    assert run.outcome is e.outcome, run
    for rcpt, n in run.attempts.items():
        assert n >= (e.min_attempts or 1), (rcpt, run)
        assert e.max_attempts is None or n <= e.max_attempts, (rcpt, run)
    if e.ndr is not None:
        bounced = [v for v in run.final.values() if v.kind == "permanent"]
        assert bounced, run
        for v in bounced:
            assert v.enhanced == e.ndr.status, v
            assert e.ndr.diagnostic is None or e.ndr.diagnostic in v.reply, v


# ------------------------------------------------------- focused: accept


def test_accept_delivers_and_captures() -> None:
    with Harness("accept") as h, closing(smtp(h)) as s:
        msg = build_message()
        assert s.sendmail("sender@lab.test", ["user@lab.test"], msg) == {}
        [m] = h.messages()
        assert m.raw == msg
        assert verdicts(h, "user@lab.test") == [("message", "accepted", 250, "2.0.0")]


# ------------------------------------------------- focused: unknown-user


def test_unknown_user_rejected_at_rcpt_known_user_accepted() -> None:
    with Harness("unknown-user") as h, closing(smtp(h)) as s:
        s.ehlo()
        assert s.mail("sender@lab.test")[0] == 250
        assert s.rcpt("nobody@lab.test") == (
            550, b"5.1.1 RESOLVER.ADR.RecipNotFound; recipient not found in the directory")
        assert s.rcpt("user@lab.test") == (250, b"2.1.5 Ok")
        assert s.data(build_message())[0] == 250
        [m] = h.messages()
        assert m.rcpt_tos == ["user@lab.test"]
        [a] = h.attempts(rcpt="nobody@lab.test")
        assert (a.phase, a.outcome, a.code, a.enhanced) == ("rcpt", "rejected", 550, "5.1.1")
        assert a.rule == "recipient not in the directory"


def test_unknown_user_only_recipient_means_no_message() -> None:
    with Harness("unknown-user") as h, closing(smtp(h)) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            s.sendmail("sender@lab.test", ["former.employee@lab.test"], build_message())
        code, text = exc.value.recipients["former.employee@lab.test"]
        assert (code, text.split()[0]) == (550, b"5.1.1")
        assert h.messages() == []


# ------------------------------------------------- focused: mailbox-full


def test_mailbox_full_rejected_at_rcpt() -> None:
    with Harness("mailbox-full") as h, closing(smtp(h)) as s:
        s.ehlo()
        s.mail("sender@lab.test")
        code, text = s.rcpt("full@lab.test")
        assert (code, text.split()[0]) == (552, b"5.2.2")
        assert b"Mailbox full" in text
        assert verdicts(h, "full@lab.test") == [("rcpt", "rejected", 552, "5.2.2")]
        assert h.messages() == []


# -------------------------------------------------- focused: greylisting


def test_greylisting_defers_new_triplets_for_the_window() -> None:
    clock = FakeClock()
    with Harness("greylisting", clock=clock) as h:
        def attempt(rcpt: str = "user@lab.test") -> tuple[int, bytes]:
            with closing(smtp(h)) as s:
                s.ehlo()
                s.mail("sender@lab.test")
                reply = s.rcpt(rcpt)
                if reply[0] == 250:
                    assert s.data(build_message(rcpt=(rcpt,)))[0] == 250
                s.quit()
                return reply

        expected_451 = (451, b"4.7.1 Greylisted, this sender is new here; "
                             b"please try again later")
        assert attempt() == expected_451
        clock.advance(30)  # a retry inside the 60 s window: deferred again
        assert attempt() == expected_451
        clock.advance(31)  # 61 s after first seen
        assert attempt() == (250, b"2.1.5 Ok")
        # Another recipient is a new triplet: greylisted on its own.
        assert attempt("other@lab.test") == expected_451
        h.wait_idle()
        assert verdicts(h, "user@lab.test") == [
            ("rcpt", "deferred", 451, "4.7.1"),
            ("rcpt", "deferred", 451, "4.7.1"),
            ("message", "accepted", 250, "2.0.0"),
        ]
        assert [m.rcpt_tos for m in h.messages()] == [["user@lab.test"]]


# ------------------------------------------------- focused: relay-denied


def test_relay_denied_for_foreign_domains_only() -> None:
    with Harness("relay-denied") as h, closing(smtp(h)) as s:
        s.ehlo()
        s.mail("sender@lab.test")
        assert s.rcpt("someone@elsewhere.example") == (
            550, b"5.7.1 Unable to relay; this server does not accept mail for that domain")
        assert s.rcpt("user@lab.test") == (250, b"2.1.5 Recipient OK")
        assert s.rcpt("Boss@LAB.TEST")[0] == 250  # domains compare case-insensitively
        assert s.rcpt("user@lab.test.elsewhere.example")[0] == 550
        assert s.data(build_message())[0] == 250
        [a] = h.attempts(rcpt="someone@elsewhere.example")
        assert (a.outcome, a.code, a.enhanced, a.rule) == (
            "rejected", 550, "5.7.1", "relay denied")
        [m] = h.messages()
        assert m.rcpt_tos == ["user@lab.test", "Boss@LAB.TEST"]


# -------------------------------------------- focused: message-too-large


TOO_LARGE = "552 5.3.4 Message size exceeds fixed maximum message size"


def test_message_too_large_refused_at_mail_when_size_is_declared() -> None:
    with Harness("message-too-large") as h, closing(smtp(h)) as s:
        s.ehlo()
        assert s.esmtp_features["size"] == "100000"
        assert s.mail("sender@lab.test", ["SIZE=200000"]) == (552, TOO_LARGE[4:].encode())
        assert s.mail("sender@lab.test", ["SIZE=100000"])[0] == 250  # at the limit: fine
        s.rset()
        # smtplib declares SIZE itself, as an MTA does.
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:
            s.sendmail("sender@lab.test", ["user@lab.test"], build_message(size=200_000))
        assert exc.value.smtp_code == 552
        assert exc.value.smtp_error.startswith(b"5.3.4 ")
        assert h.messages() == []
        assert h.attempts() == []  # no recipient was reached


def test_message_too_large_refused_after_the_dot_when_the_body_is_bigger() -> None:
    with Harness("message-too-large") as h, closing(smtp(h)) as s:
        s.ehlo()
        s.mail("sender@lab.test")  # no SIZE=: only the body shows it
        s.rcpt("user@lab.test")
        assert s.data(build_message(size=200_000)) == (552, TOO_LARGE[4:].encode())
        # The connection is still usable, and a message under the limit goes.
        assert s.sendmail("sender@lab.test", ["user@lab.test"],
                          build_message(size=50_000)) == {}
        assert verdicts(h, "user@lab.test") == [
            ("message", "rejected", 552, "5.3.4"),
            ("message", "accepted", 250, "2.0.0"),
        ]
        [m] = h.messages()
        assert 49_000 < m.size <= 50_000


def test_message_too_large_limit_is_inclusive() -> None:
    with Harness("message-too-large") as h, closing(smtp(h)) as s:
        s.ehlo()
        exact = build_message(size=100_000)
        exact += b"y" * (100_000 - len(exact) - 2) + b"\r\n"
        assert len(exact) == 100_000
        assert s.sendmail("sender@lab.test", ["user@lab.test"], exact) == {}
        s.mail("sender@lab.test")
        s.rcpt("user@lab.test")
        assert s.data(exact + b"z\r\n")[0] == 552
        assert len(h.messages()) == 1


def test_message_too_large_dot_stuffed_body_under_the_limit_is_accepted() -> None:
    with Harness("message-too-large") as h, closing(smtp(h)) as s:
        s.ehlo()
        msg = build_message() + b".\r\n" * 30_000  # 90 KB, lines that are a lone "."
        assert len(msg) < 100_000 < len(msg) + 30_000
        # SIZE=len(msg) is declared and accepted at MAIL, then:
        assert s.sendmail("sender@lab.test", ["user@lab.test"], msg) == {}
        [m] = h.messages()
        assert m.raw == msg


# ------------------------------------------ focused: service-unavailable


def test_service_unavailable_421_at_the_banner_then_closed() -> None:
    with Harness("service-unavailable") as h:
        with Raw(h) as raw:
            assert raw.reply() == [
                b"421 4.3.2 Service not available, closing transmission channel"]
            assert raw.sock.recv(100) == b""  # the server hung up (FIN), no more bytes
        with pytest.raises(smtplib.SMTPConnectError) as exc:
            smtp(h)
        assert exc.value.smtp_code == 421
        assert exc.value.smtp_error.startswith(b"4.3.2 ")
        h.wait_idle()
        sessions = h.sessions()
        assert len(sessions) == 2
        assert all("421" in (s.end_reason or "") for s in sessions)
        # Refused before MAIL FROM: no pair reached a verdict, nothing stored.
        assert h.attempts() == [] and h.messages() == []


# ------------------------------------------ focused: too-many-recipients


def test_too_many_recipients_452_from_the_fourth_then_split() -> None:
    rcpts = [f"user{i}@lab.test" for i in range(1, 6)]
    with Harness("too-many-recipients") as h, closing(smtp(h)) as s:
        refused = s.sendmail("sender@lab.test", rcpts, build_message(rcpt=tuple(rcpts)))
        assert refused == {r: (452, b"4.5.3 Too many recipients") for r in rcpts[3:]}
        # The sender sends the rest in a new transaction: counting starts again.
        assert s.sendmail("sender@lab.test", rcpts[3:], build_message()) == {}
        assert [m.rcpt_tos for m in h.messages()] == [rcpts[:3], rcpts[3:]]
        assert verdicts(h, "user1@lab.test") == [("message", "accepted", 250, "2.0.0")]
        assert verdicts(h, "user4@lab.test") == [
            ("rcpt", "deferred", 452, "4.5.3"),
            ("message", "accepted", 250, "2.0.0"),
        ]


def test_too_many_recipients_counts_per_transaction_not_per_connection() -> None:
    with Harness("too-many-recipients") as h, closing(smtp(h)) as s:
        s.ehlo()
        for _ in range(2):
            s.mail("sender@lab.test")
            codes = [s.rcpt(f"user{i}@lab.test")[0] for i in range(1, 5)]
            assert codes == [250, 250, 250, 452]
            s.rset()
        assert not h.errors


# --------------------------------------- focused: temp-fail-then-success


def test_temp_fail_then_success_451_after_the_dot_then_250() -> None:
    with Harness("temp-fail-then-success") as h:
        msg = build_message()
        with closing(smtp(h)) as s, pytest.raises(smtplib.SMTPDataError) as exc:
            s.sendmail("sender@lab.test", ["user@lab.test"], msg)
        assert (exc.value.smtp_code, exc.value.smtp_error) == (
            451, b"4.3.0 Temporary server error, please try again later")
        with closing(smtp(h)) as s:
            assert s.sendmail("sender@lab.test", ["user@lab.test"], msg) == {}
        assert verdicts(h, "user@lab.test") == [
            ("message", "deferred", 451, "4.3.0"),
            ("message", "accepted", 250, "2.0.0"),
        ]
        # Captured both times (the harness records what it saw, 451 or not).
        assert [m.raw for m in h.messages()] == [msg, msg]
        # The count is per sender/recipient pair: a new pair fails once too.
        with closing(smtp(h)) as s, pytest.raises(smtplib.SMTPDataError):
            s.sendmail("sender@lab.test", ["other@lab.test"], msg)


# ------------------------------------------------------ focused: tarpit


def test_tarpit_drips_the_rcpt_reply_one_byte_at_a_time() -> None:
    with Harness("tarpit") as h:
        with Raw(h) as raw:
            greet(raw)
            assert raw.command("MAIL FROM:<sender@lab.test>") == [b"250 2.1.0 Ok"]
            raw.send(b"RCPT TO:<user@lab.test>\r\n")
            started = time.monotonic()
            first = raw.sock.recv(100)
            got = first
            while not got.endswith(b"\r\n"):
                chunk = raw.sock.recv(100)
                assert chunk, "the tarpit must finish its reply"
                got += chunk
            elapsed = time.monotonic() - started
            assert got == b"250 2.1.5 Ok\r\n"  # complete and correct, only slow
            assert len(first) < len(got)  # it did not arrive in one piece
            # 14 bytes 50 ms apart: about 0.65 s. Generous bounds only.
            assert 0.3 < elapsed < 4.0
            # The rest of the session is at normal speed.
            assert raw.command("DATA")[0].startswith(b"354")
            raw.send(build_message() + b".\r\n")
            assert raw.reply()[0].startswith(b"250 2.0.0")
            assert raw.command("QUIT") == [b"221 2.0.0 Bye"]
        session = one_session(h)
        assert any(e.text.startswith("tarpit: one byte every 0.05s")
                   and e.rule == "tarpit recipients" for e in session.events)
        assert len(h.messages()) == 1


# ----------------------------------------------- focused: drop-mid-data


def test_drop_mid_data_354_then_the_connection_is_gone() -> None:
    with Harness("drop-mid-data") as h, closing(smtp(h)) as s:
        s.ehlo()
        s.mail("sender@lab.test")
        s.rcpt("user@lab.test")
        s.putcmd("data")
        assert s.getreply()[0] == 354
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.send(smtplib.quotedata(build_message(size=20_000).decode()).encode()
                   + b"\r\n.\r\n")
            s.getreply()  # the reply to the final dot never comes
        session = one_session(h)
        assert session.end_reason == "drop (rule vanish mid-transfer)"
        said = [e.text for e in session.events if e.direction == "C"]
        assert any(t.startswith("<") and "bytes of the message" in t for t in said)
        # The recipient was accepted but its message never arrived.
        assert verdicts(h, "user@lab.test") == [("data", "dropped", None, None)]
        assert h.messages() == []


def test_drop_mid_data_attempt_names_the_rule() -> None:
    with Harness("drop-mid-data") as h, closing(smtp(h)) as s:
        s.ehlo()
        s.mail("sender@lab.test")
        s.rcpt("user@lab.test")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.data(build_message(size=20_000))
        h.wait_idle()
        [a] = h.attempts(rcpt="user@lab.test")
        assert a.outcome == "dropped"
        assert a.rule == "vanish mid-transfer"


# ---------------------------------------------- focused: drop-after-dot


def test_drop_after_dot_message_kept_no_reply_then_duplicate() -> None:
    msg = build_message(message_id="<dup-check@client.lab.test>")
    with Harness("drop-after-dot") as h:
        with Raw(h) as raw:
            greet(raw)
            raw.command("MAIL FROM:<sender@lab.test>")
            raw.command("RCPT TO:<user@lab.test>")
            assert raw.command("DATA")[0].startswith(b"354")
            raw.send(msg + b".\r\n")
            # Closed with a FIN and not one byte of reply (a drop, not a reset).
            assert raw.sock.recv(100) == b""
        h.wait_idle()
        [kept] = h.messages()
        assert kept.raw == msg  # received in full before the drop
        [a] = h.attempts(rcpt="user@lab.test")
        assert (a.outcome, a.code, a.message_id) == ("dropped", None, kept.id)
        # smtplib sees the same thing as a disconnect.
        with closing(smtp(h)) as s:
            s.ehlo()
            s.mail("sender@lab.test")
            s.rcpt("other@lab.test")
            with pytest.raises(smtplib.SMTPServerDisconnected):
                s.data(msg)
        # The sender retries the first pair: accepted, so the recipient has it twice.
        with closing(smtp(h)) as s:
            assert s.sendmail("sender@lab.test", ["user@lab.test"], msg) == {}
        copies = h.messages(rcpt="user@lab.test")
        assert [m.message_id for m in copies] == ["<dup-check@client.lab.test>"] * 2
        assert [v[1] for v in verdicts(h, "user@lab.test")] == ["dropped", "accepted"]


# ------------------------------------------------ focused: rate-limited


def test_rate_limited_third_message_on_a_connection_is_throttled() -> None:
    with Harness("rate-limited") as h:
        with closing(smtp(h)) as s:
            for _ in range(2):
                assert s.sendmail("sender@lab.test", ["user@lab.test"], build_message()) == {}
            with pytest.raises(smtplib.SMTPSenderRefused) as exc:
                s.sendmail("sender@lab.test", ["user@lab.test"], build_message())
            assert (exc.value.smtp_code, exc.value.smtp_error) == (
                451, b"4.7.500 Server busy. Please try again later.")
            # Still throttled on this connection.
            assert s.mail("sender@lab.test")[0] == 451
            s.quit()
        # A new connection starts counting again.
        with closing(smtp(h)) as s:
            assert s.sendmail("sender@lab.test", ["user@lab.test"], build_message()) == {}
        assert len(h.messages()) == 3
        h.wait_idle()
        throttled = [e for sess in h.sessions() for e in sess.events
                     if e.direction == "S" and e.text.startswith("451 4.7.500")]
        assert len(throttled) == 2 and {e.rule for e in throttled} == {"server busy"}


# ----------------------------------------- focused: too-many-connections


def test_too_many_connections_fourth_refused_at_the_banner() -> None:
    with Harness("too-many-connections") as h:
        first = [smtp(h) for _ in range(3)]
        try:
            for s in first:
                assert s.noop()[0] == 250
            with pytest.raises(smtplib.SMTPConnectError) as exc:
                smtp(h)
            assert exc.value.smtp_code == 421
            assert exc.value.smtp_error.startswith(b"4.3.2 The maximum number of connections")
        finally:
            for s in first:
                s.quit()
        # Connections are counted since start, not while open (a model gap).
        with pytest.raises(smtplib.SMTPConnectError):
            smtp(h)


# ------------------------------------------------ focused: spam-rejected


def test_spam_rejected_after_the_dot_by_body_or_subject() -> None:
    gtube = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
    rejected = (550, b"5.7.1 Message rejected as spam by content filtering")
    with Harness("spam-rejected") as h, closing(smtp(h)) as s:
        for msg, rule in ((build_message(body=gtube), "GTUBE in the body"),
                          (build_message(subject="GTUBE test"), "spam subject")):
            with pytest.raises(smtplib.SMTPDataError) as exc:
                s.sendmail("sender@lab.test", ["user@lab.test"], msg)
            assert (exc.value.smtp_code, exc.value.smtp_error) == rejected
            assert h.attempts()[-1].rule == rule
        assert s.sendmail("sender@lab.test", ["user@lab.test"], build_message()) == {}
        assert [v[1:] for v in verdicts(h, "user@lab.test")] == [
            ("rejected", 550, "5.7.1"), ("rejected", 550, "5.7.1"),
            ("accepted", 250, "2.0.0")]


# ----------------------------------------------- focused: sender-blocked


def test_sender_blocked_mail_from_refused_for_the_client_ip() -> None:
    with Harness("sender-blocked") as h, closing(smtp(h)) as s:
        s.ehlo()
        assert s.mail("sender@lab.test") == (
            550, b"5.7.1 Access denied, the sending IP address is on this "
                 b"organization's block list")
        assert s.rcpt("user@lab.test")[0] == 503  # no transaction was opened
        with pytest.raises(smtplib.SMTPSenderRefused):
            s.sendmail("other@lab.test", ["user@lab.test"], build_message())
        assert h.messages() == [] and h.attempts() == []


def test_sender_blocked_decides_by_client_address_only() -> None:
    """The same MAIL FROM from an address off the list is not refused (sans-IO:
    the engine is asked directly, no socket is bound to that address)."""
    engine = Engine(load("sender-blocked"))
    for client, refused in (("127.0.0.1", True), ("192.168.7.7", True),
                            ("192.0.2.10", False), ("2001:db8::1", False)):
        conn = engine.connect(client)
        engine.decide(conn, Connect())
        engine.decide(conn, Helo(name=CLIENT))
        d = engine.decide(conn, Mail(sender="sender@lab.test"))
        assert (d.rule == "sending IP on the block list") is refused, client


# ---------------------------------------------------- focused: no-banner


def test_no_banner_connection_open_but_silent() -> None:
    with Harness("no-banner") as h:
        with Raw(h, timeout=0.5) as raw, pytest.raises(TimeoutError):
            raw.sock.recv(100)  # not one byte: the banner never comes
        with pytest.raises(smtplib.SMTPServerDisconnected, match="timed out"):
            smtp(h, timeout=0.5)
        h.wait_idle()
        sessions = h.sessions()
        assert [s.end_reason for s in sessions] == ["hang (rule silent after connect)"] * 2
        assert not any(e.direction == "S" for s in sessions for e in s.events)


# --------------------------------------------- focused: connection-reset


def test_connection_reset_rst_at_mail_from() -> None:
    with Harness("connection-reset") as h:
        with Raw(h) as raw:
            greet(raw)
            raw.send(b"MAIL FROM:<sender@lab.test>\r\n")
            with pytest.raises(ConnectionResetError):  # RST, not an orderly close
                raw.sock.recv(100)
        with closing(smtp(h)) as s:
            s.ehlo()
            with pytest.raises(smtplib.SMTPServerDisconnected, match="reset"):
                s.mail("sender@lab.test")
        h.wait_idle()
        assert [s.end_reason for s in h.sessions()] == ["reset (rule reset at MAIL FROM)"] * 2
        assert h.attempts() == [] and h.messages() == []


# --------------------------------------------- loader facts the library relies on


def test_library_inline_scenario_yaml_words_stay_words() -> None:
    """`on:` is not read as True by YAML 1.1 (every library rule depends on it)."""
    s: Scenario = load_text("rules:\n  - on: rcpt\n    reply: 550 5.1.1 no\n", "<t>")
    assert s.rules[0].on.value == "rcpt"
