"""A real Postfix (Debian's) relaying to a real harness, on 127.0.0.1 only.

Each test starts its own private Postfix instance (`postfix_lab`, see
conftest.py) with lab timings: retries every second or two, no DNS. Waits
are bounded: `wait_queue_empty` / `wait_deferred` poll Postfix's queue
(Postfix has no event to await) and fail with the queue and maillog.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import time
from email import policy
from email.message import Message
from pathlib import Path

import pytest

from harness.lab.postfix import PostfixLab, PostfixLabError

pytestmark = pytest.mark.slow

SENDER = "sender@lab.test"
WAIT = 10.0  # upper bound for any queue to drain; the tests take far less


def message(rcpt: str, subject: str, body: bytes) -> bytes:
    head = (f"From: Lab Sender <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            f"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.lab.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode()
    return head + body


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


def delivery_status(raw: bytes) -> tuple[Message, list[Message]]:
    """A DSN's (per-message fields, [per-recipient fields]), via the email package."""
    msg = email.message_from_bytes(raw, policy=policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    assert len(parts) == 1, [p.get_content_type() for p in msg.walk()]
    blocks = parts[0].get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2
    return blocks[0], blocks[1:]


def field(block: Message, name: str) -> str:
    return " ".join(str(block[name]).split())  # unfold


# ------------------------------------------------------------------ relaying


def test_postfix_relays_a_message_to_the_harness_byte_for_byte(lab_harness, postfix_lab):
    h = lab_harness()  # the default scenario: accept everything
    pf = postfix_lab(h)
    body = (b"Hello from the Postfix lab.\r\n"
            b".a line starting with a dot: stuffed on both hops, unstuffed on arrival\r\n"
            b".\r\n"
            b"..\r\n"
            b"trailing spaces   \r\n"
            b"\tindented with a tab\r\n"
            b"\r\n"
            + "Grüße aus dem Labor: 8-bit UTF-8 travels as 8BITMIME\r\n".encode()
            + b"x" * 900 + b"\r\n"
            b"last line\r\n")
    original = message("user@lab.test", "relay test", body)

    queue_id = pf.submit_smtp(SENDER, ["user@lab.test"], original)
    pf.wait_queue_empty(WAIT)

    [m] = h.messages()
    assert (m.mail_from, m.rcpt_tos) == (SENDER, ["user@lab.test"])
    assert m.raw is not None
    assert body_of(m.raw) == body
    # Postfix prepends one Received header (naming this queue ID) and changes nothing else
    assert m.raw.endswith(original)
    trace = m.raw[:-len(original)]
    assert trace.startswith(b"Received: from submit.lab.test (unknown [127.0.0.1])\r\n")
    assert all(line.startswith(b"\t") for line in trace.split(b"\r\n")[1:-1])
    assert f"by {pf.myhostname} (Postfix) with ESMTP id {queue_id}".encode() in trace

    [s] = h.sessions()
    assert s.helo == pf.myhostname == pf.postconf("myhostname")
    assert s.peer_ip == "127.0.0.1"


# ------------------------------------------------------------------ bounces


def test_a_552_at_rcpt_comes_back_as_a_dsn_to_the_sender(lab_harness, postfix_lab):
    h = lab_harness("mailbox-full")  # rcpt full@... gets 552 5.2.2
    pf = postfix_lab(h)
    pf.submit_smtp(SENDER, ["full@lab.test"],
                   message("full@lab.test", "quota test", b"Will not fit.\r\n"))
    pf.wait_queue_empty(WAIT)

    [rejected] = h.attempts(rcpt="full@lab.test")
    assert (rejected.code, rejected.enhanced, rejected.outcome) == (552, "5.2.2", "rejected")

    [ndr] = h.messages()  # the original was refused; only the NDR was stored
    assert ndr.mail_from == "" and ndr.rcpt_tos == [SENDER]
    [ndr_session] = [s for s in h.sessions() if ndr.id in s.message_ids]
    assert any(e.text.startswith("MAIL FROM:<>") for e in ndr_session.events)
    assert ndr_session.helo == pf.myhostname

    assert ndr.raw is not None
    msg = email.message_from_bytes(ndr.raw, policy=policy.default)
    assert msg["To"] == SENDER
    per_message, [rcpt] = delivery_status(ndr.raw)
    assert field(per_message, "Reporting-MTA") == f"dns; {pf.myhostname}"
    assert field(rcpt, "Final-Recipient") == "rfc822; full@lab.test"
    assert field(rcpt, "Action") == "failed"
    assert field(rcpt, "Status") == "5.2.2"
    assert re.match(r"smtp; 552 5\.2\.2 Mailbox full", field(rcpt, "Diagnostic-Code"))


# ------------------------------------------------------------------ retries

GREYLIST_ONCE = """
rules:
  - on: rcpt
    when: {attempt: 1}
    reply: "451 4.7.1 Greylisted"
"""

BACKOFF = 3  # seconds: minimal_backoff_time = maximal_backoff_time (see the assertion)


def test_a_451_is_retried_after_the_backoff(lab_harness, postfix_lab):
    h = lab_harness(GREYLIST_ONCE)
    pf = postfix_lab(h, settings={"minimal_backoff_time": f"{BACKOFF}s",
                                  "maximal_backoff_time": f"{BACKOFF}s",
                                  "queue_run_delay": "1s"})
    queue_id = pf.submit_smtp(SENDER, ["grey@lab.test"],
                              message("grey@lab.test", "greylist test", b"Try again.\r\n"))
    deferred = pf.wait_deferred(queue_id, WAIT)
    assert deferred.status == "deferred" and deferred.reason is not None
    assert "451 4.7.1 Greylisted" in deferred.reason
    pf.wait_queue_empty(WAIT)

    first, retry = h.attempts(rcpt="grey@lab.test")
    assert (first.code, first.outcome) == (451, "deferred")
    assert (retry.code, retry.outcome) == (250, "accepted")
    assert retry.interval is not None
    # Postfix's backoff works in whole seconds and one second early: a deferred
    # file is dated int(now) + backoff and taken back once that date is at most
    # int(now) + 1 (qmgr_active_feed), so the retry comes BACKOFF - 1 whole
    # seconds later at the earliest (measured: 2.01 s for a 3 s backoff).
    assert int(retry.t) - int(first.t) >= BACKOFF - 1
    assert retry.interval > BACKOFF - 2
    assert retry.interval < BACKOFF + 1 + 1  # at most backoff + one queue run (+ slack)
    [m] = h.messages()
    assert m.rcpt_tos == ["grey@lab.test"]


def test_a_message_put_off_in_the_incoming_queue_is_taken_up(lab_harness, postfix_lab):
    """Postfix's queue manager puts a deferred message it finds still locked
    by the agent that deferred it back in the incoming queue, dated 60 s
    ahead (qmgr_active_defer); the lab's look at the queue takes it up at
    once. Here the queue file is put off as the queue manager does: Postfix
    alone leaves it; the lab's next look sends it, and the retry reaches
    the harness."""
    h = lab_harness(GREYLIST_ONCE)
    pf = postfix_lab(h, settings={"minimal_backoff_time": "3600s",
                                  "maximal_backoff_time": "3600s", "queue_run_delay": "1s"})
    queue_id = pf.submit_smtp(SENDER, ["grey@lab.test"],
                              message("grey@lab.test", "incoming", b"Again.\r\n"))
    pf.wait_deferred(queue_id, WAIT)
    [path] = [Path(d) / queue_id for d, _, files in os.walk(pf.queue_directory / "deferred")
              if queue_id in files]
    incoming = pf.queue_directory / "incoming" / queue_id
    os.rename(path, incoming)
    ahead = time.time() + 60
    os.utime(incoming, (ahead, ahead))
    # a scan asked for does not take it either (postkick can end with SIGPIPE
    # while the queue manager restarts: its outcome is not what is tested)
    subprocess.run(["postkick", "-c", str(pf.config_dir), "public", "qmgr", "I"], check=False)
    time.sleep(2)  # Postfix alone: two queue runs, and no look at it from the lab
    assert len(h.attempts(rcpt="grey@lab.test")) == 1
    deadline = time.monotonic() + WAIT
    while len(h.attempts(rcpt="grey@lab.test")) < 2:
        assert time.monotonic() < deadline, pf.maillog()
        pf.queue()  # the lab's look
        time.sleep(0.05)
    assert pf.kicks == 1
    assert [a.code for a in h.attempts(rcpt="grey@lab.test")] == [451, 250]


# ------------------------------------------------------------------ the rest of the API


DSN_OFFERED = "server:\n  extensions: {dsn: true}\nrules: []\n"
DSN_NOT_OFFERED = "server:\n  extensions: {dsn: false}\nrules: []\n"


def test_sendmail_dsn_options_reach_the_next_hop_or_postfixs_own_dsn(lab_harness, postfix_lab):
    """sendmail -N/-V/-R: passed on to a server that offers DSN; reported by
    Postfix itself ("relayed", envelope ID, headers only) to one that does not."""
    h = lab_harness(DSN_OFFERED)
    plain = lab_harness(DSN_NOT_OFFERED)
    pf = postfix_lab(h, transports={"nodsn.test": (plain.host, plain.port)})
    dsn = {"dsn_notify": ["success", "failure"], "envid": "lab env+1", "ret": "hdrs"}
    pf.submit_sendmail(SENDER, ["ok@lab.test"], message("ok@lab.test", "dsn on", b"1\r\n"), **dsn)
    pf.submit_sendmail(SENDER, ["ok@nodsn.test"], message("ok@nodsn.test", "dsn off", b"2\r\n"),
                       **dsn)
    pf.wait_queue_empty(WAIT)

    [passed_on] = h.messages(rcpt="ok@lab.test")
    assert passed_on.mail_from == SENDER
    assert {"ENVID=lab+20env+2B1", "RET=HDRS"} <= set(passed_on.mail_options)  # xtext
    assert passed_on.rcpt_options == ["ORCPT=rfc822;ok@lab.test NOTIFY=SUCCESS,FAILURE"]

    [delivered] = plain.messages()
    assert delivered.rcpt_tos == ["ok@nodsn.test"]
    sent = " ".join(delivered.mail_options + delivered.rcpt_options)
    assert "NOTIFY" not in sent and "ENVID" not in sent and "RET" not in sent
    [report] = h.messages(rcpt=SENDER)  # Postfix's success DSN, via the relayhost
    assert report.mail_from == "" and report.raw is not None
    per_message, [rcpt] = delivery_status(report.raw)
    assert field(rcpt, "Final-Recipient") == "rfc822; ok@nodsn.test"
    assert field(rcpt, "Action") == "relayed"
    assert field(per_message, "Original-Envelope-Id") == "lab env+1"
    types = [p.get_content_type()
             for p in email.message_from_bytes(report.raw, policy=policy.default).walk()]
    assert "text/rfc822-headers" in types and "message/rfc822" not in types  # RET=HDRS

    with pytest.raises(PostfixLabError, match="VERP"):  # Postfix would read -V xy as VERP
        pf.submit_sendmail(SENDER, ["ok@lab.test"], b"\r\nx\r\n", envid="xy")


def test_expire_returns_a_deferred_message_at_once(lab_harness, postfix_lab):
    h = lab_harness("""
rules:
  - on: rcpt
    when: {rcpt: "slow@*"}
    reply: "451 4.3.0 Try again later"
""")
    pf = postfix_lab(h)
    queue_id = pf.submit_smtp(SENDER, ["slow@lab.test"],
                              message("slow@lab.test", "expire test", b"later\r\n"))
    entry = pf.wait_deferred(queue_id, WAIT)
    assert entry.recipients == ("slow@lab.test",) and entry.sender == SENDER
    pf.expire(queue_id)
    pf.wait_queue_empty(WAIT)

    assert [a.outcome for a in h.attempts(rcpt="slow@lab.test")] == ["deferred"]
    [ndr] = h.messages(rcpt=SENDER)
    assert ndr.mail_from == "" and ndr.raw is not None
    _, [rcpt] = delivery_status(ndr.raw)
    assert field(rcpt, "Action") == "failed"
    assert field(rcpt, "Status") == "4.3.0"  # an expired message keeps the last 4xx
    assert field(rcpt, "Diagnostic-Code") == "smtp; 451 4.3.0 Try again later"
    assert f"{queue_id}: from=<{SENDER}>, status=force-expired" in pf.maillog()


def test_two_instances_coexist_and_stop_without_leftovers(lab_harness, postfix_lab):
    h = lab_harness()
    second_port = lab_harness()
    a = postfix_lab(h)
    b = postfix_lab(h, transports={"other.test": (second_port.host, second_port.port)})
    assert len({a.port, b.port}) == 2 and a.root != b.root
    assert a.syslog_name != b.syslog_name and a.myhostname != b.myhostname
    assert a.processes() and b.processes()
    assert not set(a.processes()) & set(b.processes())

    a.submit_smtp(SENDER, ["one@lab.test"], message("one@lab.test", "from a", b"a\r\n"))
    b.submit_smtp(SENDER, ["two@lab.test", "three@other.test"],
                  message("two@lab.test", "from b", b"b\r\n"))
    a.wait_queue_empty(WAIT)
    b.wait_queue_empty(WAIT)
    assert sorted((s.helo, tuple(s.rcpt_tos)) for s in h.sessions()) == sorted(
        [(a.myhostname, ("one@lab.test",)), (b.myhostname, ("two@lab.test",))])
    [routed] = second_port.sessions()
    assert (routed.helo, routed.rcpt_tos) == (b.myhostname, ["three@other.test"])

    a.stop()
    assert a.processes() == [] and not a.root.exists()
    assert b.processes()  # the other instance is untouched
    assert f"{a.syslog_name}/master" in a.maillog()  # the log outlives the directory
    b.stop()
    assert b.processes() == []


@pytest.mark.parametrize(("settings", "reason"), [
    # read by every command: `postfix check` fails (its message comes through a pty)
    ({"mail_owner": "no-such-user"}, r"mail_owner: unknown user name value: no-such-user"),
    # read by qmgr alone: the master starts, qmgr dies; start() or the wait says why
    ({"queue_run_delay": "soon"}, r"qmgr\[\d+\]: fatal: invalid queue_run_delay"),
])
def test_a_bad_setting_fails_fast_with_the_reason(lab_harness, settings, reason):
    if why := PostfixLab.unavailable():
        pytest.skip(why)
    h = lab_harness()
    lab = PostfixLab((h.host, h.port), settings=settings)
    started = time.monotonic()
    try:
        with pytest.raises(PostfixLabError, match=reason):
            lab.start()
            lab.submit_smtp(SENDER, ["user@lab.test"], message("user@lab.test", "bad", b"x\r\n"))
            lab.wait_queue_empty(WAIT)
    finally:
        lab.stop()
    assert lab.processes() == [] and not lab.root.exists()
    assert time.monotonic() - started < 4  # Postfix sleeps 1 s after a fatal error
