"""harness.analysis.dsn: NDR/DSN parsing, on small bounces written here and
on the Sisimai corpus (tools/ndr_corpus.py) when it is next to the repo."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.analysis.dsn import find_reply_code, find_status, parse_ndr

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT.parent / "shared" / "corpus" / "sisimai"


def msg(text: str) -> bytes:
    """A message written with LF line ends and a leading newline, as sent: CRLF."""
    return text.lstrip("\n").replace("\n", "\r\n").encode("utf-8")


RFC3464_TWO = msg("""
From: Mail Delivery System <MAILER-DAEMON@mx.sender.test>
To: alice@sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="BOUND"

--BOUND
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.sender.test.

<bob@lab.test>: host mx.lab.test[192.0.2.25] said: 550 5.1.1 <bob@lab.test>:
    Recipient address rejected: User unknown (in reply to RCPT TO command)

<carol@lab.test>: host mx.lab.test[192.0.2.25] said: 552 5.2.2 Mailbox full
    (in reply to RCPT TO command)

--BOUND
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test
Original-Envelope-Id: ENV-42
Arrival-Date: Mon, 1 Jul 2024 10:00:00 +0000

Final-Recipient: rfc822; bob@lab.test
Original-Recipient: rfc822;Bob@Lab.test
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.lab.test
Diagnostic-Code: smtp; 550 5.1.1 <bob@lab.test>: Recipient address rejected:
    User unknown
Last-Attempt-Date: Mon, 1 Jul 2024 10:00:05 +0000

Final-Recipient: rfc822; carol@lab.test
Action: failed
Status: 5.0.0
Remote-MTA: dns; mx.lab.test
Diagnostic-Code: smtp; 552 5.2.2 Mailbox full

--BOUND
Content-Type: text/rfc822-headers

From: Alice <alice@sender.test>
To: bob@lab.test, carol@lab.test
Subject: Quarterly report
Message-ID: <q3@sender.test>

--BOUND--
""")

DELAY = msg("""
From: postmaster@mx.sender.test
To: alice@sender.test
Subject: Delivery Status Notification (Delay)
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b1"

--b1
Content-Type: text/plain

This is an automatically generated Delivery Status Notification.
THIS IS A WARNING MESSAGE ONLY. YOU DO NOT NEED TO RESEND YOUR MESSAGE.

--b1
Content-Type: message/delivery-status

Reporting-MTA: dns;mx.sender.test

Final-Recipient: rfc822;dave@lab.test
Action: delayed
Status: 4.4.7
Diagnostic-Code: smtp; 451 4.7.1 Greylisted, try again later
Will-Retry-Until: Wed, 3 Jul 2024 10:00:00 +0000

--b1--
""")

OFFICE365_TEXT = msg("""
From: Microsoft Outlook <MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@contoso.onmicrosoft.com>
To: alice@contoso.com
Subject: Undeliverable: Budget
Content-Type: text/plain; charset="us-ascii"

Your message to erin@fabrikam.test couldn't be delivered.

erin wasn't found at fabrikam.test.

Diagnostic information for administrators:

Generating server: AM6PR01MB1234.eurprd01.prod.outlook.com

erin@fabrikam.test
Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found'

Original message headers:

From: Alice <alice@contoso.com>
To: <erin@fabrikam.test>
Subject: Budget
Message-ID: <budget-1@contoso.com>
""")

EXCHANGE_HASH = msg("""
From: postmaster@corp.test
To: alice@corp.test
Subject: Undeliverable: Hello

Delivery has failed to these recipients or groups:

frank@corp.test
The e-mail address you entered couldn't be found.

Diagnostic information for administrators:

Generating server: EX1.corp.test

frank@corp.test
#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##
""")

POSTFIX_TEXT = msg("""
From: MAILER-DAEMON@mx.sender.test (Mail Delivery System)
To: alice@sender.test
Subject: Undelivered Mail Returned to Sender

This is the mail system at host mx.sender.test.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

                   The mail system

<grace@lab.test>: host mx.lab.test[192.0.2.25] said: 554 5.7.1
    <grace@lab.test>: Relay access denied (in reply to RCPT TO command)

------ This is a copy of your message, including all the headers. ------

From: alice@sender.test
To: grace@lab.test
Subject: Relay me
Message-ID: <r1@sender.test>

hello
""")

EXIM_TEXT = msg("""
From: Mail Delivery System <Mailer-Daemon@mail.sender.test>
To: alice@sender.test
Subject: Mail delivery failed: returning message to sender
X-Failed-Recipients: heidi@lab.test

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  heidi@lab.test
    host mx.lab.test [192.0.2.25]
    SMTP error from remote mail server after RCPT TO:<heidi@lab.test>:
    550 5.1.1 <heidi@lab.test>... User unknown

------ This is a copy of the message, including all the headers. ------

From: alice@sender.test
To: heidi@lab.test
Subject: Exim test
Message-Id: <e1@sender.test>

body
""")

QMAIL_TEXT = msg("""
From: MAILER-DAEMON@mx.sender.test
To: alice@sender.test
Subject: failure notice

Hi. This is the qmail-send program at mx.sender.test.
I'm afraid I wasn't able to deliver your message to the following addresses.
This is a permanent error; I've given up. Sorry it didn't work out.

<ivan@lab.test>:
192.0.2.25 does not like recipient.
Remote host said: 550 5.2.1 Mailbox disabled
Giving up on 192.0.2.25.

<judy@lab.test>:
Sorry, no mailbox here by that name. (#5.1.1)

--- Below this line is a copy of the message.

From: alice@sender.test
To: ivan@lab.test, judy@lab.test
Subject: qmail test
Message-ID: <qm1@sender.test>

body
""")

PLAIN_MAIL = msg("""
From: Alice <alice@sender.test>
To: bob@lab.test
Subject: Lunch?
Message-ID: <lunch@sender.test>

Are you free at noon? If this could not be delivered to you, 550 apologies.
""")

AUTO_REPLY = msg("""
From: Bob <bob@lab.test>
To: alice@sender.test
Subject: Automatic reply: Lunch?
Auto-Submitted: auto-replied

I am out of the office until Monday.
""")

ARF = msg("""
From: feedback@isp.test
To: abuse@sender.test
Subject: Abuse report
MIME-Version: 1.0
Content-Type: multipart/report; report-type=feedback-report; boundary="fb"

--fb
Content-Type: text/plain

This is an email abuse report.

--fb
Content-Type: message/feedback-report

Feedback-Type: abuse
User-Agent: SomeGenerator/1.0
Version: 1

--fb--
""")


# ------------------------------------------------------------- RFC 3464


def test_dsn_rfc3464_two_recipients() -> None:
    ndr = parse_ndr(RFC3464_TWO)
    assert ndr is not None
    assert (ndr.kind, ndr.is_delay, ndr.format) == ("failure", False, "rfc3464")
    assert ndr.reporting_mta == "mx.sender.test"
    assert ndr.original_envelope_id == "ENV-42"
    assert ndr.arrival_date == "Mon, 1 Jul 2024 10:00:00 +0000"
    bob, carol = ndr.recipients
    assert bob.final_recipient == "bob@lab.test"
    assert bob.original_recipient == "Bob@Lab.test"
    assert (bob.action, bob.status, bob.reply_code) == ("failed", "5.1.1", 550)
    assert bob.diagnostic_type == "smtp"
    assert bob.diagnostic_text == (
        "550 5.1.1 <bob@lab.test>: Recipient address rejected: User unknown")
    assert bob.remote_mta == "mx.lab.test"
    assert bob.last_attempt_date == "Mon, 1 Jul 2024 10:00:05 +0000"
    # Status 5.0.0 says only "permanent": the remote server's 5.2.2 is reported
    assert (carol.status, carol.reported_status, carol.reply_code) == ("5.2.2", "5.0.0", 552)
    assert ndr.original.message_id == "<q3@sender.test>"
    assert ndr.original.subject == "Quarterly report"
    assert ndr.original.from_ == "Alice <alice@sender.test>"
    assert ndr.original.to == "bob@lab.test, carol@lab.test"
    assert ndr.original.source == "text/rfc822-headers"


def test_dsn_delay_notice() -> None:
    ndr = parse_ndr(DELAY)
    assert ndr is not None
    assert (ndr.kind, ndr.is_delay) == ("delay", True)
    (dave,) = ndr.recipients
    assert dave.action == "delayed"
    # X.4.7 gives way to the code of the actual problem (RFC 3463)
    assert (dave.status, dave.reported_status, dave.reply_code) == ("4.7.1", "4.4.7", 451)
    assert dave.will_retry_until == "Wed, 3 Jul 2024 10:00:00 +0000"


def test_dsn_postfix_delayed_mail_subject_is_a_delay() -> None:
    raw = POSTFIX_TEXT.replace(b"Undelivered Mail Returned to Sender",
                               b"Delayed Mail (still being retried)").replace(
        b"554 5.7.1", b"450 4.2.0")
    ndr = parse_ndr(raw)
    assert ndr is not None
    assert (ndr.kind, ndr.is_delay, ndr.recipients[0].action) == ("delay", True, "delayed")


def test_dsn_global_delivery_status_utf8() -> None:
    raw = msg("""
From: MAILER-DAEMON@mx.sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=global-delivery-status; boundary="g"

--g
Content-Type: text/plain; charset=utf-8

Delivery failed.

--g
Content-Type: message/global-delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: utf-8; j\\x{00FC}rgen@b\\x{00FC}cher.test
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 unknown user

--g
Content-Type: message/global

From: alice@sender.test
To: jürgen@bücher.test
Subject: Grüße
Message-ID: <g1@sender.test>

hallo
--g--
""")
    ndr = parse_ndr(raw)
    assert ndr is not None
    assert ndr.format == "rfc6533"
    assert ndr.recipients[0].final_recipient == "jürgen@bücher.test"
    assert ndr.recipients[0].status == "5.1.1"
    assert ndr.original.subject == "Grüße"


def test_dsn_status_taken_from_diagnostic_when_field_missing() -> None:
    raw = RFC3464_TWO.replace(b"Status: 5.1.1\r\n", b"")
    ndr = parse_ndr(raw)
    assert ndr is not None
    assert ndr.recipients[0].status == "5.1.1"
    assert ndr.recipients[0].reported_status is None


def test_dsn_basic_code_only_gives_no_status() -> None:
    raw = QMAIL_TEXT.replace(b"550 5.2.1 Mailbox disabled", b"550 Mailbox disabled")
    ndr = parse_ndr(raw)
    assert ndr is not None
    ivan = ndr.recipients[0]
    assert (ivan.status, ivan.reply_code) == (None, 550)


# ------------------------------------------------------ text-only formats


def test_dsn_office365_text() -> None:
    ndr = parse_ndr(OFFICE365_TEXT)
    assert ndr is not None
    assert ndr.format == "office365"
    (erin,) = ndr.recipients
    assert erin.final_recipient == "erin@fabrikam.test"
    assert (erin.status, erin.reply_code) == ("5.1.10", 550)
    assert "RESOLVER.ADR.RecipientNotFound" in (erin.diagnostic_text or "")
    assert ndr.original.message_id == "<budget-1@contoso.com>"


def test_dsn_exchange_hash_code_text() -> None:
    ndr = parse_ndr(EXCHANGE_HASH)
    assert ndr is not None
    assert ndr.format == "exchange2007"
    (frank,) = ndr.recipients
    assert (frank.final_recipient, frank.status, frank.reply_code) == (
        "frank@corp.test", "5.1.1", 550)


def test_dsn_postfix_text() -> None:
    ndr = parse_ndr(POSTFIX_TEXT)
    assert ndr is not None
    assert (ndr.format, ndr.kind) == ("postfix", "failure")
    (grace,) = ndr.recipients
    assert (grace.final_recipient, grace.status, grace.reply_code) == (
        "grace@lab.test", "5.7.1", 554)
    assert ndr.original.subject == "Relay me"
    assert ndr.original.source == "inline"


def test_dsn_exim_text() -> None:
    ndr = parse_ndr(EXIM_TEXT)
    assert ndr is not None
    assert ndr.format == "exim"
    (heidi,) = ndr.recipients
    assert (heidi.final_recipient, heidi.status, heidi.reply_code) == (
        "heidi@lab.test", "5.1.1", 550)
    assert ndr.original.message_id == "<e1@sender.test>"


def test_dsn_qmail_text() -> None:
    ndr = parse_ndr(QMAIL_TEXT)
    assert ndr is not None
    assert ndr.format == "qmail"
    ivan, judy = ndr.recipients
    assert (ivan.final_recipient, ivan.status, ivan.reply_code) == ("ivan@lab.test", "5.2.1", 550)
    assert (judy.final_recipient, judy.status, judy.reply_code) == ("judy@lab.test", "5.1.1", None)
    assert ndr.original.subject == "qmail test"


# ----------------------------------------------------------- not bounces


@pytest.mark.parametrize("raw", [PLAIN_MAIL, AUTO_REPLY, ARF], ids=["mail", "autoreply", "arf"])
def test_dsn_not_a_bounce_is_none(raw: bytes) -> None:
    assert parse_ndr(raw) is None


@pytest.mark.parametrize("raw", [
    b"", b"\r\n", b"\x00\xff\xfe" * 50, b"From nobody\n", b"Content-Type: multipart/report\n\n--",
    b"Content-Type: multipart/report; boundary=x\n\n--x\nContent-Type: message/delivery-status"
    b"\n\nStatus: 9.9.9\nFinal-Recipient:\n\n--x--",
    b"Subject: Undeliverable\n\n<a@b>:\n550 5.1.1 " + b"x" * 5000,
    RFC3464_TWO[: len(RFC3464_TWO) // 2],
])
def test_dsn_garbage_never_raises(raw: bytes) -> None:
    parse_ndr(raw)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=3000))
def test_dsn_random_bytes_never_raise(raw: bytes) -> None:
    parse_ndr(raw)


REPORTS = [RFC3464_TWO, DELAY, OFFICE365_TEXT, EXCHANGE_HASH, POSTFIX_TEXT, EXIM_TEXT,
           QMAIL_TEXT]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(REPORTS), st.floats(0, 1), st.binary(min_size=1, max_size=40),
       st.integers(0, 60))
def test_dsn_damaged_report_never_raises(raw: bytes, where: float, junk: bytes,
                                         cut: int) -> None:
    at = int(where * len(raw))
    parse_ndr(raw[:at] + junk + raw[at + cut:])


def test_dsn_rejects_text() -> None:
    with pytest.raises(TypeError):
        parse_ndr("not bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------ code finders


@pytest.mark.parametrize(("text", "status", "reply"), [
    ("550 5.1.1 <a@b>... User unknown", "5.1.1", 550),
    ("550-5.7.26 Unauthenticated email", "5.7.26", 550),
    ("#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##", "5.1.1", 550),
    ("host 192.0.2.5 said: 550 no such user", None, 550),
    ("Sorry, no mailbox here by that name. (#5.1.1)", "5.1.1", None),
    ("5.1.0 - Unknown address error 550-'5.7.1 Access denied'", "5.7.1", 550),
    ("554 4.4.7 Message expired <421 4.4.2 Connection dropped>", "4.4.2", 421),
    ("Postfix 2.3.4 (v5.1.1) at 203.0.113.22", None, None),
    ("", None, None),
])
def test_dsn_code_finders(text: str, status: str | None, reply: int | None) -> None:
    assert find_status(text) == status
    assert find_reply_code(text) == reply


# ------------------------------------------------------------ the corpus


def _load_tool() -> ModuleType:
    path = ROOT / "tools" / "ndr_corpus.py"
    spec = importlib.util.spec_from_file_location("ndr_corpus", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("ndr_corpus", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not (CORPUS / "expected.csv").is_file(),
                    reason=f"no Sisimai corpus at {CORPUS}")
def test_dsn_sisimai_corpus_targets() -> None:
    tool = _load_tool()
    start = time.monotonic()
    report = tool.run(CORPUS)
    assert time.monotonic() - start < 10
    assert report.files >= 632
    assert report.exceptions == []
    assert report.not_bounces_as_ndr == []
    groups = report.groups
    assert groups["a"].rate >= 0.98, groups["a"]
    assert groups["b"].rate >= 0.90, groups["b"]
    assert groups["c"].real > 0 and groups["c"].rate == 1.0, groups["c"]
    # feedback reports and auto-replies are not NDRs
    assert report.total.none_agree == report.total.none
