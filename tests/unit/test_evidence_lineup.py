"""Lining up, as a pure function: the fixtures' sender logs beside harness
records built here as plain data (the integration and lab tests do the same
against a real harness, Exchange-like client, Postfix and Exim)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.analysis.evidence import ReadOptions, read_evidence
from harness.analysis.evidence.capture import (
    Capture,
    CapturedAttempt,
    CapturedEvent,
    CapturedMessage,
    CapturedSession,
)
from harness.analysis.evidence.lineup import KINDS, Lineup, LineupOptions, line_up

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evidence"
OPTS = ReadOptions(now=datetime(2026, 11, 30, 12, 0, tzinfo=UTC).timestamp())
T0 = datetime(2026, 11, 30, 9, 0, 0, tzinfo=UTC).timestamp()
EHLO = ["250-mx.harness.test Hello EX01.contoso.test", "250-SIZE 33554432", "250-PIPELINING",
        "250-DSN", "250-ENHANCEDSTATUSCODES", "250 8BITMIME"]
GREY = "451 4.7.1 Greylisted, this sender is new here; please try again later"
FULL = "552 5.2.2 Mailbox full; the recipient's mailbox is over its storage quota"


def read(name: str):  # type: ignore[no-untyped-def]
    p = FIXTURES / name
    return read_evidence(p.name, p.read_bytes(), OPTS)


def session(sid: int, t: float, port: int, lines: list[tuple[str, str, str]],
            listener: int = 2525, ip: str = "10.0.0.5") -> CapturedSession:
    """A session whose transcript is (direction, phase, text), 1 ms apart."""
    return CapturedSession(
        id=sid, started_at=t, ended_at=t + len(lines) / 1000, peer=(ip, port),
        listener=("192.0.2.10", listener), end_reason="quit",
        events=tuple(CapturedEvent(t=t + i / 1000, direction=d, phase=p, text=x)
                     for i, (d, p, x) in enumerate(lines)))


def attempt(aid: int, s: CapturedSession, rcpt: str, reply: str, phase: str = "rcpt",
            mail_from: str = "alice@contoso.test", message: int | None = None) -> CapturedAttempt:
    t = next(e.t for e in s.events if e.direction == "S" and e.text == reply)
    code = int(reply[:3])
    return CapturedAttempt(id=aid, session_id=s.id, t=t, mail_from=mail_from, rcpt=rcpt,
                           phase=phase, code=code, enhanced=reply.split()[1], reply=reply,
                           outcome="accepted" if code < 300 else "deferred" if code < 500
                           else "rejected", message_id=message)


def exchange_capture(skew: float, second_reply: str = "250 2.0.0 Ok: queued as 7") -> Capture:
    """What the harness would hold for SEND20261130-1.LOG, on a clock `skew`
    seconds behind the sender's."""
    base = T0 + 1.109 - skew
    s1 = session(1, base, 50211, [
        ("S", "connect", "220 mx.harness.test ESMTP SMTP Harness"),
        ("C", "helo", "EHLO EX01.contoso.test"), *[("S", "helo", x) for x in EHLO],
        ("C", "mail", "MAIL FROM:<alice@contoso.test> SIZE=2313"),
        ("S", "mail", "250 2.1.0 Ok"), ("C", "rcpt", "RCPT TO:<user@lab.test>"),
        ("S", "rcpt", GREY), ("C", "rcpt", "RCPT TO:<full@lab.test>"), ("S", "rcpt", FULL),
        ("C", "rset", "RSET"), ("S", "rset", "250 2.0.0 Ok"), ("C", "quit", "QUIT"),
        ("S", "quit", "221 2.0.0 Bye")])
    s2 = session(2, T0 + 61.415 - skew, 50299, [
        ("S", "connect", "220 mx.harness.test ESMTP SMTP Harness"),
        ("C", "helo", "EHLO EX01.contoso.test"), *[("S", "helo", x) for x in EHLO],
        ("C", "mail", "MAIL FROM:<alice@contoso.test> SIZE=2313"),
        ("S", "mail", "250 2.1.0 Ok"), ("C", "rcpt", "RCPT TO:<user@lab.test>"),
        ("S", "rcpt", "250 2.1.5 Ok"), ("C", "data", "DATA"),
        ("S", "data", "354 End data with <CR><LF>.<CR><LF>"),
        ("C", "message", "<message: 2313 bytes>"), ("S", "message", second_reply),
        ("C", "quit", "QUIT"), ("S", "quit", "221 2.0.0 Bye")])
    return Capture(label="", sessions=(s1, s2), attempts=(
        attempt(1, s1, "user@lab.test", GREY), attempt(2, s1, "full@lab.test", FULL),
        attempt(3, s2, "user@lab.test", second_reply, phase="message", message=1)))


def kinds(lineup: Lineup) -> list[tuple[str, str | None]]:
    return [(d.kind, d.where) for d in lineup.disagreements]


def test_lineup_protocol_log_beside_the_sessions_and_measures_skew() -> None:
    f = read("SEND20261130-1.LOG")
    lineup = line_up([f], [exchange_capture(skew=1.25)])
    assert kinds(lineup) == []
    [skew] = lineup.skews
    assert skew.seconds == pytest.approx(1.25, abs=0.01)
    [message] = lineup.timelines
    assert message.key == "<4f2c9a01@ex01.contoso.test>"
    steps = [(st.rcpt, st.harness.reply if st.harness else None) for st in message.steps]
    assert steps == [("user@lab.test", GREY), ("full@lab.test", FULL),
                     ("user@lab.test", "250 2.0.0 Ok: queued as 7")]
    assert message.steps[0].sender[0].where == "SEND20261130-1.LOG:21"


def test_lineup_flags_a_reply_the_harness_never_sent() -> None:
    f = read("SEND20261130-1.LOG")
    lineup = line_up([f], [exchange_capture(skew=0.0, second_reply="250 2.0.0 Ok: queued as 9")])
    assert kinds(lineup) == [("reply-never-sent", "SEND20261130-1.LOG:45")]
    [d] = lineup.disagreements
    assert "'250 2.0.0 Ok: queued as 7'" in d.message and "queued as 9" in d.message


def test_lineup_protocol_session_without_a_harness_session() -> None:
    f = read("SEND20261130-1.LOG")
    cap = exchange_capture(skew=0.0)
    only_first = Capture(label="", sessions=cap.sessions[:1], attempts=cap.attempts[:2])
    found = kinds(line_up([f], [only_first]))
    assert found == [("no-session", "SEND20261130-1.LOG:28")]


def test_lineup_tracking_events_and_a_dsn() -> None:
    cap = exchange_capture(skew=0.5)
    ndr = CapturedMessage(id=5, session_id=9, received_at=T0 + 1.5, mail_from="",
                          rcpt_tos=("alice@contoso.test",),
                          message_id="<7d1e0b55-NDR@EX01.contoso.test>", is_ndr=True,
                          ndr_kind="failure", ndr_recipients=(("full@lab.test", "5.2.2"),))
    with_ndr = Capture(label="", sessions=cap.sessions, attempts=cap.attempts, messages=(ndr,))
    f = read("MSGTRK2026113009-1.LOG")
    lineup = line_up([f], [with_ndr])
    assert kinds(lineup) == []
    [m] = lineup.timelines
    by_line = {st.sender[0].where: st for st in m.steps if st.sender}
    assert by_line["MSGTRK2026113009-1.LOG:7"].harness.reply == GREY  # DEFER
    assert by_line["MSGTRK2026113009-1.LOG:8"].harness.reply == FULL  # FAIL
    assert by_line["MSGTRK2026113009-1.LOG:10"].harness.attempt == 3  # SEND
    assert by_line["MSGTRK2026113009-1.LOG:9"].harness.message == 5  # DSN
    assert lineup.skews[0].seconds == pytest.approx(0.5, abs=0.01)
    # the NDR not in the store: flagged
    lost = line_up([f], [cap])
    assert kinds(lost) == [("dsn-not-captured", "MSGTRK2026113009-1.LOG:9")]


def test_lineup_two_files_of_one_sender_share_one_step() -> None:
    cap = exchange_capture(skew=0.0)
    lineup = line_up([read("SEND20261130-1.LOG"), read("tracking-flat.csv")], [cap])
    [m] = lineup.timelines
    grey = next(st for st in m.steps if st.harness and st.harness.reply == GREY)
    assert sorted(x.where for x in grey.sender) == ["SEND20261130-1.LOG:21",
                                                    "tracking-flat.csv:2"]


def test_lineup_queue_last_error_beside_the_reply_that_caused_it() -> None:
    cap = exchange_capture(skew=0.0)
    lineup = line_up([read("get-queue.json"), read("get-message.json")], [cap])
    flags = kinds(lineup)
    assert flags == [("reply-never-sent", "get-queue.json:13")]  # the edited 450
    steps = [st for m in lineup.timelines for st in m.steps]
    ok = [st for st in steps if st.harness is not None]
    assert {st.sender[0].where for st in ok} == {"get-queue.json:2", "get-message.json:1"}
    assert all("session 1 sent" in st.harness.text for st in ok)


def postfix_capture(*, ndr: bool, retry_gap: float = 301.0) -> Capture:
    s1 = session(1, T0 + 0.4, 40001, [
        ("S", "connect", "220 mx.harness.test ESMTP"), ("C", "helo", "EHLO mta1"),
        ("S", "helo", "250 mx.harness.test"), ("C", "mail", "MAIL FROM:<app@contoso.test>"),
        ("S", "mail", "250 2.1.0 Ok"), ("C", "rcpt", "RCPT TO:<user@lab.test>"),
        ("S", "rcpt", GREY), ("C", "quit", "QUIT"), ("S", "quit", "221 2.0.0 Bye")])
    s2 = session(2, T0 + 0.4 + retry_gap, 40002, [
        ("S", "connect", "220 mx.harness.test ESMTP"), ("C", "helo", "EHLO mta1"),
        ("S", "helo", "250 mx.harness.test"), ("C", "mail", "MAIL FROM:<app@contoso.test>"),
        ("S", "mail", "250 2.1.0 Ok"), ("C", "rcpt", "RCPT TO:<user@lab.test>"),
        ("S", "rcpt", "250 2.1.5 Ok"), ("C", "data", "DATA"), ("S", "data", "354 go ahead"),
        ("C", "message", "<message: 1810 bytes>"), ("S", "message", "250 2.0.0 Ok: queued as 7"),
        ("C", "quit", "QUIT"), ("S", "quit", "221 2.0.0 Bye")])
    messages = (CapturedMessage(
        id=8, session_id=3, received_at=T0 + 303.5, mail_from="",
        rcpt_tos=("app@contoso.test",), message_id="<20261130090503.3E1D07A2B1@mta1>",
        is_ndr=True, ndr_kind="failure", ndr_original_id="<4f2c9a01@app01.contoso.test>",
        ndr_recipients=(("other@lab.test", "4.4.1"),)),) if ndr else ()
    return Capture(label="", sessions=(s1, s2), messages=messages, attempts=(
        attempt(1, s1, "user@lab.test", GREY, mail_from="app@contoso.test"),
        attempt(2, s2, "user@lab.test", "250 2.0.0 Ok: queued as 7", phase="message",
                mail_from="app@contoso.test")))


def test_lineup_postfix_deferred_and_sent_beside_451_and_250() -> None:
    f = read("postfix-syslog.log")
    lineup = line_up([f], [postfix_capture(ndr=True)])
    assert kinds(lineup) == []
    [m] = lineup.timelines
    assert m.key == "<4f2c9a01@app01.contoso.test>" and m.sender_ids[0] == "8F2A31C0D4"
    both = [(st.sender[0].where, st.harness.reply) for st in m.steps
            if st.harness and st.kind == "attempt"]
    assert both == [("postfix-syslog.log:5", GREY),
                    ("postfix-syslog.log:7", "250 2.0.0 Ok: queued as 7")]
    refused = next(st for st in m.steps if st.sender and st.sender[0].where.endswith(":8"))
    assert refused.harness is None and refused.note == "the connection never reached the harness"
    dsn = next(st for st in m.steps if st.kind == "dsn")
    assert dsn.harness is not None and dsn.harness.message == 8
    # whole-second log: the skew is a range that holds 0 (the sender logs after our reply)
    [skew] = lineup.skews
    assert skew.low is not None and skew.high is not None and skew.resolution == 1.0
    assert skew.low <= 0.6 <= skew.high


def test_lineup_postfix_dsn_not_captured() -> None:
    lineup = line_up([read("postfix-syslog.log")], [postfix_capture(ndr=False)])
    assert kinds(lineup) == [("dsn-not-captured", "postfix-syslog.log:9")]


def test_lineup_early_retry_against_the_configured_interval() -> None:
    f = read("postfix-syslog.log")
    cap = postfix_capture(ndr=True)
    assert kinds(line_up([f], [cap], LineupOptions(retry_interval=300))) == []
    late = line_up([f], [cap], LineupOptions(retry_interval=600))
    assert kinds(late) == [("early-retry", "postfix-syslog.log:7")]
    assert "retried 301.0 s after" in late.disagreements[0].message


def test_lineup_attempt_the_sender_did_not_log() -> None:
    cap = postfix_capture(ndr=True)
    extra = session(3, T0 + 100, 40003, [
        ("S", "connect", "220 mx.harness.test ESMTP"), ("C", "helo", "EHLO mta1"),
        ("S", "helo", "250 mx.harness.test"), ("C", "mail", "MAIL FROM:<app@contoso.test>"),
        ("S", "mail", "250 2.1.0 Ok"), ("C", "rcpt", "RCPT TO:<user@lab.test>"),
        ("S", "rcpt", GREY)])
    more = Capture(label="", sessions=(*cap.sessions, extra), messages=cap.messages,
                   attempts=(*cap.attempts, attempt(9, extra, "user@lab.test", GREY,
                                                    mail_from="app@contoso.test")))
    lineup = line_up([read("postfix-syslog.log")], [more])
    assert [k for k, _ in kinds(lineup)] == ["attempt-not-logged"]
    assert "session 3" in lineup.disagreements[0].message


def test_lineup_exim_by_ports() -> None:
    f = read("exim-mainlog")
    t = datetime(2026, 11, 30, 8, 0, 1, 204000, tzinfo=UTC).timestamp()
    s1 = session(1, t - 0.010, 41234, [
        ("S", "connect", "220 mx"), ("C", "rcpt", "RCPT TO:<user@lab.test>"), ("S", "rcpt", GREY),
        ("C", "rcpt", "RCPT TO:<nobody@lab.test>"),
        ("S", "rcpt", "550 5.1.1 <nobody@lab.test>: no such user")], ip="10.0.0.9")
    s2 = session(2, t + 61.0, 41290, [
        ("S", "connect", "220 mx"), ("C", "message", "<message: 1810 bytes>"),
        ("S", "message", "250 2.0.0 Ok: queued as 8")], ip="10.0.0.9")
    cap = Capture(label="", sessions=(s1, s2), attempts=(
        attempt(1, s1, "user@lab.test", GREY, mail_from="app@contoso.test"),
        attempt(2, s1, "nobody@lab.test", "550 5.1.1 <nobody@lab.test>: no such user",
                mail_from="app@contoso.test"),
        attempt(3, s2, "user@lab.test", "250 2.0.0 Ok: queued as 8", phase="message",
                mail_from="app@contoso.test")))
    lineup = line_up([f], [cap])
    # the bounce went to another server (10.0.0.30), not to the harness: a DSN
    # the store cannot hold is still flagged, as the sender did make one
    assert [k for k, _ in kinds(lineup)] == ["dsn-not-captured"]
    [m] = lineup.timelines
    pairs = [(st.sender[0].where, st.harness.session if st.harness else None)
             for st in m.steps if st.kind == "attempt"]
    assert ("exim-mainlog:2", 1) in pairs and ("exim-mainlog:3", 1) in pairs
    assert ("exim-mainlog:8", 2) in pairs


def test_lineup_without_a_store_shows_the_sender_side() -> None:
    lineup = line_up([read("postfix-syslog.log")], [])
    assert "no store was given" in lineup.notes[0]
    assert kinds(lineup) == []  # nothing to disagree with
    assert sum(len(m.steps) for m in lineup.timelines) == 6


def test_lineup_exchange_2003_logs_by_time() -> None:
    f = read("ex261130.log")
    s1 = session(1, T0 + 1.0, 50500, [
        ("S", "connect", "220 mx.harness.test ESMTP SMTP Harness"),
        ("C", "helo", "EHLO EX2003.contoso.test"),
        ("S", "helo", "250-mx.harness.test Hello EX2003.contoso.test"),
        ("S", "helo", "250 8BITMIME"),
        ("C", "mail", "MAIL FROM:<bob@contoso.test> SIZE=1810"), ("S", "mail", "250 2.1.0 Ok"),
        ("C", "rcpt", "RCPT TO:<user@lab.test>"), ("S", "rcpt", GREY),
        ("C", "quit", "QUIT"), ("S", "quit", "221 2.0.0 Bye")])
    cap = Capture(label="", sessions=(s1,), attempts=(
        attempt(1, s1, "user@lab.test", GREY, mail_from="bob@contoso.test"),))
    lineup = line_up([f], [cap])
    assert kinds(lineup) == []
    steps = [st for m in lineup.timelines for st in m.steps if st.harness]
    assert [st.harness.reply for st in steps] == [GREY]


LINEUP_PROFILE = settings(max_examples=120, derandomize=True, database=None, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
LINES = [
    "Nov 30 09:00:01 h postfix/smtp[1]: 8F2A31C0D4: to=<user@lab.test>, relay=192.0.2.10"
    "[192.0.2.10]:2525, delay=1, dsn=4.7.1, status=deferred (host x said: 451 4.7.1 no)",
    "Nov 30 09:00:02 h postfix/cleanup[1]: 8F2A31C0D4: message-id=<a@b>",
    "Nov 30 09:00:03 h postfix/bounce[1]: 8F2A31C0D4: sender non-delivery notification: 1A2B3C",
    "Nov 30 09:05:01 h postfix/smtp[1]: 8F2A31C0D4: to=<user@lab.test>, relay=192.0.2.10"
    "[192.0.2.10]:2525, delay=1, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as 7)",
    "Nov 30 09:05:01 h postfix/smtp[1]: 1A2B3C: to=<app@contoso.test>, relay=none, delay=1, "
    "dsn=4.4.1, status=deferred (connect to x: Connection refused)",
]


@LINEUP_PROFILE
@given(st.lists(st.sampled_from(LINES), max_size=12), st.text(max_size=80),
       st.floats(min_value=-600, max_value=600), st.booleans())
def test_lineup_never_raises_whatever_the_log(lines: list[str], noise: str, shift: float,
                                              ndr: bool) -> None:
    """Any mix of lines, noise and clock offsets: a lineup, never an exception,
    and every disagreement names a kind we document."""
    text = "\n".join([*lines, noise])
    f = read_evidence("m", text, OPTS)
    cap = postfix_capture(ndr=ndr, retry_gap=abs(shift) + 1)
    lineup = line_up([f], [cap], LineupOptions(retry_interval=60))
    assert {d.kind for d in lineup.disagreements} <= set(KINDS)
    for m in lineup.timelines:
        assert [s.t for s in m.steps] == sorted(s.t for s in m.steps)
