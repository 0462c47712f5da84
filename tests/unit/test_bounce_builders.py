"""Bounces on demand, the pure half: the `bounce:` key in scenario files, the
report builders (harness/analysis/bounces.py), and our own parser reading
each kind back (parse_ndr for the reports, classify for the others)."""

from __future__ import annotations

import json
import textwrap
from email import message_from_bytes
from email.policy import compat32

import pytest

from harness.analysis.bounces import Accepted, action_for, default_diagnostic, plan_reports
from harness.analysis.classify import classify
from harness.analysis.dsn import parse_ndr
from harness.errors import ScenarioError
from harness.scenario import model as m
from harness.scenario.loader import build_rule, load_text

NOW = 1_760_000_000.0
ORIGINAL = (b"From: App <app@sender.test>\r\nTo: bounce@lab.test\r\nSubject: Order 42\r\n"
            b"Message-ID: <order-42@sender.test>\r\n\r\nYour order is on its way.\r\n")


def accepted(*rcpts: str, raw: bytes = ORIGINAL, **kw: object) -> Accepted:
    return Accepted(mail_from=str(kw.pop("mail_from", "app@sender.test")),
                    rcpts=rcpts or ("bounce@lab.test",), raw=raw, received_at=NOW - 5,
                    client_ip="127.0.0.1", helo="client.sender.test", **kw)  # type: ignore[arg-type]


def build(kind: str, acc: Accepted | None = None, *, status: str | None = None,
          diagnostic: str | None = None):  # type: ignore[no-untyped-def]
    return plan_reports(kind, acc or accepted(), status=status, diagnostic=diagnostic,
                        hostname="mx.harness.test", now=NOW)


def load(text: str) -> m.Scenario:
    return load_text(textwrap.dedent(text), "s.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load(text)
    return [str(p) for p in info.value.problems]


# ---------------------------------------------------------------- the loader


def test_bounce_key_loads_every_field() -> None:
    (rule,) = load("""\
        rules:
          - name: late bounce
            on: message
            when: {rcpt: bounce@lab.test}
            bounce: {kind: exchange, status: 5.2.2, diagnostic: "552 5.2.2 Mailbox full",
                     after: 1m}
        """).rules
    assert rule.bounce == m.Bounce(kind=m.BounceKind.EXCHANGE, status="5.2.2",
                                   diagnostic="552 5.2.2 Mailbox full", after=60.0)
    assert rule.reply is None  # accepted with the normal 250


def test_bounce_status_comes_from_the_diagnostic_when_not_given() -> None:
    (rule,) = load("""\
        rules:
          - on: message
            bounce: {diagnostic: "550 5.1.1 <x@lab.test>: user unknown"}
        """).rules
    assert rule.bounce is not None
    assert (rule.bounce.kind, rule.bounce.status, rule.bounce.after) == (
        m.BounceKind.DSN, "5.1.1", 0.0)


@pytest.mark.parametrize("kind", ["autoreply", "arf"])
def test_bounce_kinds_without_status_load_with_nothing_else(kind: str) -> None:
    (rule,) = load(f"rules:\n  - on: message\n    bounce: {{kind: {kind}}}\n").rules
    assert rule.bounce is not None and rule.bounce.kind.value == kind
    assert rule.bounce.status is None


@pytest.mark.parametrize(("text", "expected"), [
    ("  - on: rcpt\n    bounce: {status: 5.1.1}\n",
     "s.yaml:3:13: bounce applies to on: message"),
    ("  - on: message\n    reply: 550 5.1.1 No\n    bounce: {status: 5.1.1}\n",
     "s.yaml:3:12: a rule that bounces later accepts the message first; 550 refuses it"),
    ("  - on: message\n    fault: drop\n    bounce: {status: 5.1.1}\n",
     "s.yaml:3:12: fault: drop never accepts the message"),
    ("  - on: message\n    bounce: {kind: dns, status: 5.1.1}\n",
     "s.yaml:3:20: bounce kind cannot be 'dns' (did you mean dsn?)"),
    ("  - on: message\n    bounce: {status: '5.1'}\n",
     "s.yaml:3:22: bounce status '5.1' is not an enhanced status code"),
    ("  - on: message\n    bounce: {kind: arf, status: 5.7.1}\n",
     "s.yaml:3:33: status applies to kind dsn or exchange, not arf"),
    ("  - on: message\n    bounce: {kind: exchange, status: 2.0.0}\n",
     "s.yaml:3:38: Exchange writes an NDR for a failure (5) or a delay (4)"),
    ("  - on: message\n    bounce: {status: 5.1.1, diagnostic: '550 5.2.2 Full'}\n",
     "s.yaml:3:41: the diagnostic states 5.2.2 but status is 5.1.1"),
    ("  - on: message\n    bounce: {status: 2.0.0, diagnostic: '550 failed'}\n",
     "s.yaml:3:41: the diagnostic's reply code is class 5, the status class 2"),
    ("  - on: message\n    bounce: {}\n",
     "s.yaml:3:13: bounce kind dsn needs a status"),
    ("  - on: message\n    bounce: {status: 5.1.1, after: soon}\n",
     "s.yaml:3:36: bounce after: expected a duration"),
    ("  - on: message\n    bounce: {status: 5.1.1, retry: 3}\n",
     "s.yaml:3:29: unknown key retry in bounce"),
    ("  - on: message\n    bounce: dsn\n",
     "s.yaml:3:13: bounce must be a mapping of keys to values"),
])
def test_bounce_mistakes_are_positioned(text: str, expected: str) -> None:
    found = problems("rules:\n" + text)
    assert any(p.startswith(expected) for p in found), found


def test_bounce_on_message_with_exchange_expiry_code_is_accepted() -> None:
    # Exchange reports an expired message as 550 4.4.7: a failure with a 4.x.x code
    (rule,) = load("""\
        rules:
          - on: message
            bounce: {kind: exchange, diagnostic: "550 4.4.7 QUEUE.Expired; message expired"}
        """).rules
    assert rule.bounce is not None and rule.bounce.status == "4.4.7"
    assert action_for("4.4.7", rule.bounce.diagnostic) == "failed"


def test_bounce_alone_is_an_outcome_and_a_rule_in_code_is_checked_the_same() -> None:
    rule = build_rule({"name": "b", "on": "message", "bounce": {"kind": "autoreply"}})
    assert rule.bounce is not None and rule.bounce.kind is m.BounceKind.AUTOREPLY
    with pytest.raises(ScenarioError, match="bounce applies to on: message"):
        build_rule({"name": "b", "on": "rcpt", "bounce": {"status": "5.1.1"}})


# ---------------------------------------------- each kind, read back by us


@pytest.mark.parametrize(("kind", "status", "diagnostic", "action", "ndr_kind"), [
    ("dsn", "5.1.1", None, "failed", "failure"),
    ("dsn", "5.2.2", "552 5.2.2 Mailbox full", "failed", "failure"),
    ("dsn", "4.2.2", None, "delayed", "delay"),
    ("dsn", "2.0.0", None, "delivered", "delivered"),
    ("exchange", "5.1.1", None, "failed", "failure"),
    ("exchange", "5.7.1", "550 5.7.1 Delivery not authorized", "failed", "failure"),
    ("exchange", "4.4.7", "550 4.4.7 QUEUE.Expired; message expired", "failed", "failure"),
])
def test_status_reports_read_back_to_the_rules_status(
        kind: str, status: str, diagnostic: str | None, action: str, ndr_kind: str) -> None:
    notify = {"bounce@lab.test": ("SUCCESS", "FAILURE", "DELAY")}
    (report,), skipped = build(kind, accepted(notify=notify), status=status,
                               diagnostic=diagnostic)
    assert skipped == []
    assert (report.kind, report.to, report.mail_from, report.status) == (
        kind, "app@sender.test", "", status)
    ndr = parse_ndr(report.raw)
    assert ndr is not None, report.raw.decode()
    assert ndr.kind == ndr_kind
    (rcpt,) = ndr.recipients
    assert (rcpt.final_recipient, rcpt.status, rcpt.action) == ("bounce@lab.test", status, action)
    expected = diagnostic or default_diagnostic(status)
    if kind == "exchange" and diagnostic is None:  # Exchange's own words for the code
        expected = "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"
    assert rcpt.diagnostic_text == expected
    assert ndr.reporting_mta == "mx.harness.test"
    assert ndr.original.message_id == "<order-42@sender.test>"
    assert classify(report.raw).kind == {"failure": "ndr", "delay": "delay",
                                         "delivered": "delivery"}[ndr_kind]


def test_exchange_report_has_exchanges_sections_and_the_hash_line() -> None:
    (report,), _ = build("exchange", status="5.1.1")
    msg = message_from_bytes(report.raw, policy=compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "multipart/alternative", "message/delivery-status", "text/rfc822-headers"]
    assert [p.get_content_type() for p in parts[0].get_payload()] == ["text/plain", "text/html"]
    text = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    body = text.get_payload(decode=True).decode()
    for section in ("Delivery has failed to these recipients or groups:",
                    "Diagnostic information for administrators:",
                    "Generating server: mx.harness.test",
                    "#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##",
                    "Original message headers:", "Subject: Order 42"):
        assert section in body, body
    assert msg["Subject"] == "Undeliverable: Order 42"
    assert msg["In-Reply-To"] == "<order-42@sender.test>"
    # the readable text alone is recognised as Exchange's, to the same status
    alone = (b"From: postmaster@mx.harness.test\r\nSubject: Undeliverable: Order 42\r\n\r\n"
             + body.replace("\n", "\r\n").encode())
    ndr = parse_ndr(alone)
    assert ndr is not None and ndr.format == "exchange2007"
    assert [(r.final_recipient, r.status) for r in ndr.recipients] == [
        ("bounce@lab.test", "5.1.1")]


def test_dsn_carries_envid_orcpt_and_returns_headers_or_the_whole_message() -> None:
    acc = accepted(envid="ENV-42", orcpt={"bounce@lab.test": "rfc822;alias@lab.test"})
    (report,), _ = build("dsn", acc, status="5.1.1")
    ndr = parse_ndr(report.raw)
    assert ndr is not None and ndr.original_envelope_id == "ENV-42"
    assert ndr.recipients[0].original_recipient == "alias@lab.test"
    msg = message_from_bytes(report.raw, policy=compat32)
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"Your order is on its way" not in report.raw
    (full,), _ = build("dsn", accepted(ret="FULL"), status="5.1.1")
    msg = message_from_bytes(full.raw, policy=compat32)
    assert msg.get_payload()[2].get_content_type() == "message/rfc822"
    assert b"Your order is on its way" in full.raw


def test_default_diagnostics_are_short_catalogue_replies() -> None:
    assert default_diagnostic("5.1.1") == "550 5.1.1 User unknown"
    assert default_diagnostic("4.2.2") == "451 4.2.2 Mailbox full"
    # a generic code, or one whose catalogue replies are long stories, gets its title
    assert default_diagnostic("5.0.0") == "550 5.0.0 Other undefined Status"
    assert default_diagnostic("4.4.1") == "421 4.4.1 Connection timed out"
    assert default_diagnostic("5.9.9").startswith("550 5.9.9 ")


def test_reports_are_crlf_and_auto_submitted() -> None:
    for kind, status in (("dsn", "5.1.1"), ("exchange", "5.1.1"), ("autoreply", None),
                         ("arf", None)):
        (report,), _ = build(kind, status=status)
        assert b"\n" not in report.raw.replace(b"\r\n", b""), kind
        msg = message_from_bytes(report.raw, policy=compat32)
        assert msg["Auto-Submitted"] in ("auto-replied", "auto-generated"), kind
        assert msg["To"] == "app@sender.test"


def test_autoreply_is_not_an_ndr_and_is_classified_as_an_autoreply() -> None:
    reports, skipped = build("autoreply", accepted("bounce@lab.test", "ooto@lab.test"))
    assert skipped == []
    assert [r.recipients for r in reports] == [("bounce@lab.test",), ("ooto@lab.test",)]
    for report in reports:
        assert parse_ndr(report.raw) is None  # "not an NDR"
        got = classify(report.raw)
        assert (got.kind, got.is_ndr) == ("autoreply", False)
        assert "RFC 3834" in got.reason
        msg = message_from_bytes(report.raw, policy=compat32)
        assert msg["From"] == report.recipients[0]
        assert msg["Subject"] == "Auto: Order 42"
        assert msg["In-Reply-To"] == "<order-42@sender.test>"


def test_autoreply_text_comes_from_the_diagnostic() -> None:
    (report,), _ = build("autoreply", diagnostic="Gone fishing \u2014 back on Monday.")
    msg = message_from_bytes(report.raw, policy=compat32)
    assert msg.get_payload(decode=True).decode() == "Gone fishing \u2014 back on Monday.\r\n"


def test_arf_complaint_is_not_an_ndr_and_is_classified_as_a_complaint() -> None:
    (report,), _ = build("arf")
    assert parse_ndr(report.raw) is None
    got = classify(report.raw)
    assert got.kind == "complaint" and not got.is_ndr
    fb = got.feedback
    assert fb is not None
    assert (fb.feedback_type, fb.version, fb.original_mail_from, fb.original_rcpt_to) == (
        "abuse", "1", "<app@sender.test>", ("<bounce@lab.test>",))
    assert (fb.source_ip, fb.reported_domain, fb.reporting_mta) == (
        "127.0.0.1", "sender.test", "dns; mx.harness.test")
    assert fb.user_agent is not None and fb.user_agent.startswith("SMTP-Harness/")
    msg = message_from_bytes(report.raw, policy=compat32)
    assert msg.get_param("report-type") == "feedback-report"
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain", "message/feedback-report", "message/rfc822"]


# ------------------------------------------------------- what is never sent


def test_nothing_is_sent_in_reply_to_a_null_sender() -> None:
    for kind, status in (("dsn", "5.1.1"), ("autoreply", None), ("arf", None)):
        reports, (skipped,) = build(kind, accepted(mail_from=""), status=status)
        assert reports == []
        assert "null sender" in skipped.reason and skipped.recipients == ("bounce@lab.test",)


@pytest.mark.parametrize(("notify", "status", "sent"), [
    (None, "5.1.1", True),
    (("NEVER",), "5.1.1", False),
    (("SUCCESS", "DELAY"), "5.1.1", False),
    (("DELAY",), "4.2.2", True),
    (("FAILURE",), "4.2.2", False),
    (None, "2.0.0", False),  # success notices only when asked
    (("SUCCESS",), "2.0.0", True),
])
def test_notify_decides_which_notices_a_recipient_gets(
        notify: tuple[str, ...] | None, status: str, sent: bool) -> None:
    acc = accepted("bounce@lab.test", notify={"bounce@lab.test": notify} if notify else {})
    reports, skipped = build("dsn", acc, status=status)
    assert bool(reports) is sent
    if not sent:
        assert "RFC 3461" in skipped[0].reason


def test_notify_never_for_one_recipient_leaves_it_out_of_the_report() -> None:
    acc = accepted("a@lab.test", "b@lab.test", notify={"b@lab.test": ("NEVER",)})
    (report,), (skipped,) = build("dsn", acc, status="5.1.1")
    assert report.recipients == ("a@lab.test",) and skipped.recipients == ("b@lab.test",)
    ndr = parse_ndr(report.raw)
    assert ndr is not None and [r.final_recipient for r in ndr.recipients] == ["a@lab.test"]


@pytest.mark.parametrize("header", ["Auto-Submitted: auto-generated", "Precedence: bulk",
                                    "List-Id: <news.sender.test>", "Precedence: list"])
def test_no_autoreply_to_automatic_or_list_mail(header: str) -> None:
    raw = header.encode() + b"\r\n" + ORIGINAL
    reports, (skipped,) = build("autoreply", accepted(raw=raw))
    assert reports == [] and "no auto-reply" in skipped.reason


def test_auto_submitted_no_still_gets_an_autoreply() -> None:
    reports, skipped = build("autoreply", accepted(raw=b"Auto-Submitted: no\r\n" + ORIGINAL))
    assert len(reports) == 1 and skipped == []


def test_unknown_kind_and_missing_status_are_errors_of_the_caller() -> None:
    with pytest.raises(ValueError, match="unknown bounce kind"):
        build("vacation")
    with pytest.raises(ValueError, match="needs a status"):
        build("dsn")


# ---------------------------------------------------------- classification


@pytest.mark.parametrize(("headers", "kind"), [
    (b"Subject: hello\r\n", "message"),
    (b"Auto-Submitted: auto-replied\r\nSubject: Re: hello\r\n", "autoreply"),
    (b"X-Autoreply: yes\r\nSubject: hello\r\n", "autoreply"),
    (b"Precedence: auto_reply\r\nSubject: hello\r\n", "autoreply"),
    (b"Subject: Automatic reply: hello\r\n", "autoreply"),
    (b"Subject: Out of Office: hello\r\n", "autoreply"),
    (b"Auto-Submitted: auto-generated\r\nSubject: Your invoice\r\n", "automatic"),
    (b"Auto-Submitted: no\r\nSubject: hello\r\n", "message"),
    (b"Content-Type: multipart/report; report-type=disposition-notification; boundary=b\r\n"
     b"Subject: Read: hello\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nread\r\n"
     b"--b\r\nContent-Type: message/disposition-notification\r\n\r\n"
     b"Disposition: manual-action/MDN-sent-manually; displayed\r\n--b--", "read-receipt"),
])
def test_classify_names_automatic_messages(headers: bytes, kind: str) -> None:
    raw = headers if b"\r\n\r\n" in headers else headers + b"\r\nbody\r\n"
    assert classify(raw).kind == kind


@pytest.mark.parametrize(("kind", "says", "classified_as"), [
    ("autoreply", "it is an automatic reply (Auto-Submitted: auto-replied (RFC 3834))",
     "autoreply"),
    ("arf", "it is an abuse complaint (ARF) (an RFC 5965 feedback report (Feedback-Type: "
            "abuse))", "complaint"),
])
def test_explain_says_what_a_report_that_is_not_an_ndr_is(tmp_path, kind: str,  # type: ignore[no-untyped-def]
                                                           says: str, classified_as: str) -> None:
    import io

    from rich.console import Console

    from harness.explain import explain_command

    (report,), _ = build(kind)
    path = tmp_path / f"{kind}.eml"
    path.write_bytes(report.raw)
    err = io.StringIO()
    rc = explain_command(str(path), as_json=False, console=Console(file=io.StringIO()),
                         err_console=Console(file=err, width=300))
    assert rc == 1
    assert err.getvalue().strip() == (f"harness: error: {path}: not an NDR - no delivery "
                                      f"status report found in it; {says}")
    # a script tells such a report from a file that is no report at all
    out = io.StringIO()
    assert explain_command(str(path), as_json=True, console=Console(file=out)) == 1
    data = json.loads(out.getvalue())
    assert (data["reason"], data["classified_as"]) == ("not_ndr", classified_as)
