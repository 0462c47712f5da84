"""`harness explain`: the rendering and argument handling in harness/explain.py,
for a code, a reply line, an NDR file and the errors, as text and as JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from harness import explain
from harness.explain import SCHEMA, explain_command

#: An RFC 3464 report: one recipient refused for good, one still being retried.
NDR = b"""\
From: MAILER-DAEMON@mx.sender.test
To: alice@sender.test
Subject: Undelivered Mail Returned to Sender
Message-ID: <bounce-1@mx.sender.test>
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

Delivery to the following recipients failed.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: rfc822; bob@lab.test
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.lab.test
Diagnostic-Code: smtp; 550 5.1.1 <bob@lab.test>: Recipient address rejected: User unknown

Final-Recipient: rfc822; carol@lab.test
Action: delayed
Status: 4.7.1
Remote-MTA: dns; mx.lab.test
Diagnostic-Code: smtp; 451 4.7.1 Greylisted, try again later
Will-Retry-Until: Wed, 3 Jan 2024 10:00:00 +0000

--B
Content-Type: text/rfc822-headers

From: alice@sender.test
To: bob@lab.test
Subject: Quarterly report
Message-ID: <orig-1@sender.test>

--B--
""".replace(b"\n", b"\r\n")

#: What Exchange sends when a message expires in its queue.
EXPIRED = b"""\
From: postmaster@contoso.test
To: alice@contoso.test
Subject: Undeliverable: Lab test
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="X"

--X
Content-Type: text/plain

Delivery has failed to these recipients or groups.

--X
Content-Type: message/delivery-status

Reporting-MTA: dns;ex1.contoso.test

Final-Recipient: rfc822;dave@lab.test
Action: failed
Status: 4.4.7
Diagnostic-Code: smtp;550 4.4.7 QUEUE.Expired; message expired

--X--
""".replace(b"\n", b"\r\n")


def run(target: str, *, as_json: bool = False, width: int = 100,
        color: bool = False) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    console = Console(file=out, width=width, force_terminal=color,
                      color_system="standard" if color else None, highlight=False)
    err_console = Console(file=err, width=width, force_terminal=False)
    rc = explain_command(target, as_json=as_json, console=console, err_console=err_console)
    return rc, out.getvalue(), err.getvalue()


def run_json(target: str) -> tuple[int, dict[str, Any]]:
    rc, out, err = run(target, as_json=True, width=40)  # a narrow console must not wrap JSON
    assert err == ""
    data: dict[str, Any] = json.loads(out)
    assert data["schema"] == SCHEMA and data["input"] == target
    return rc, data


def flat(text: str) -> str:
    return " ".join(text.split())


# -------------------------------------------------------------------- codes


def test_code_text() -> None:
    rc, out, err = run("5.7.1")
    assert (rc, err) == (0, "")
    text = flat(out)
    for part in ("5.7.1", "Delivery not authorized, message refused", "5 · Permanent failure",
                 "7 · Security or policy status", "permanent", "Typical causes",
                 "What to check", "Get-ReceiveConnector", "550 5.7.1 Unable to relay"):
        assert part in text, part


def test_code_json() -> None:
    rc, data = run_json("5.7.1")
    assert rc == 0 and data["kind"] == "code"
    code = data["code"]
    assert (code["code"], code["entry"], code["match"], code["known"]) == (
        "5.7.1", "5.7.1", "exact", True)
    assert (code["class"], code["subject"], code["outcome"], code["transient"]) == (
        5, 7, "permanent", False)
    assert code["checks"] and code["causes"] and code["vendor"] is None
    assert set(code) >= {"class_name", "subject_name", "title", "meaning", "exchange",
                         "typical_replies"}


def test_range_code() -> None:
    rc, out, _ = run("4.7.500")
    assert rc == 0 and "4.7.500 is in the range 4.7.500-699" in flat(out)
    assert "temporary" in out and "Microsoft value" in out
    _, data = run_json("4.7.500")
    assert (data["code"]["code"], data["code"]["entry"], data["code"]["match"]) == (
        "4.7.500", "4.7.500-699", "range")


def test_unknown_code_says_so_and_falls_back() -> None:
    rc, out, _ = run("5.7.777")
    assert rc == 0
    text = flat(out)
    assert "5.7.777 not in the catalogue" in text
    assert "meaning of its class and subject (5.7.x, security or policy status)" in text
    _, data = run_json("5.7.777")
    assert (data["code"]["known"], data["code"]["match"], data["code"]["entry"]) == (
        False, "subject", "5.7.x")
    _, data = run_json("4.9.1")
    assert (data["code"]["match"], data["code"]["entry"]) == ("class", "4.x.x")


def test_basic_code() -> None:
    rc, out, _ = run("421")
    assert rc == 0
    assert "Service not available, closing transmission channel" in flat(out)
    assert "4 · Transient negative completion" in flat(out)
    _, data = run_json("421")
    assert data["code"]["kind"] == "basic" and data["code"]["transient"] is True


def test_colours_follow_the_class() -> None:
    red, yellow, green = "\x1b[1;31m", "\x1b[1;33m", "\x1b[1;32m"
    assert red in run("5.7.1", color=True)[1]
    assert yellow in run("4.7.1", color=True)[1]
    assert green in run("2.0.0", color=True)[1]
    assert red not in run("2.0.0", color=True)[1]


# ------------------------------------------------------------------ replies


def test_reply_text() -> None:
    rc, out, _ = run("550 5.7.1 Unable to relay")
    text = flat(out)
    assert rc == 0
    assert text.startswith("Reply 550 5.7.1 Unable to relay")
    # the enhanced code first, then the basic one
    assert text.index("enhanced code 5.7.1") < text.index("basic code 550")
    assert "What to check" in text


def test_reply_json() -> None:
    rc, data = run_json("#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##")
    assert rc == 0 and data["kind"] == "reply"
    reply = data["reply"]
    assert (reply["basic_code"], reply["enhanced_code"]) == ("550", "5.1.1")
    assert reply["component"]["name"] == "RESOLVER.ADR.RecipNotFound"
    assert reply["enhanced"]["title"] == "Bad destination mailbox address"
    assert reply["basic"]["code"] == "550"
    assert reply["outcome"] == "permanent" and reply["checks"]


def test_reply_class_mismatch_is_shown() -> None:
    rc, out, _ = run("550 4.4.7 QUEUE.Expired; message expired")
    assert rc == 0 and "expired in its queue" in flat(out)


def test_reply_with_a_quoted_remote_reply() -> None:
    line = ('451 4.4.0 Primary target IP address responded with: "451 5.7.3 Cannot achieve '
            'Exchange Server authentication." Attempted failover to alternate host')
    rc, out, _ = run(line)
    assert rc == 0
    assert "Quoted reply 451 5.7.3 Cannot achieve Exchange Server authentication." in flat(out)
    _, data = run_json(line)
    assert data["reply"]["quoted"]["enhanced_code"] == "5.7.3"


def test_reply_with_an_unknown_range_code() -> None:
    _, data = run_json("451 4.7.600 Access denied, please try again later")
    assert data["reply"]["enhanced"]["entry"] == "4.7.500-699"


# --------------------------------------------------------------------- NDRs


def test_ndr_text(tmp_path: Path) -> None:
    path = tmp_path / "bounce.eml"
    path.write_bytes(NDR)
    rc, out, err = run(str(path), width=120)
    assert (rc, err) == (0, "")
    text = flat(out)
    assert text.startswith("Non-delivery report")
    for part in ("reported by mx.sender.test", "<orig-1@sender.test>", "'Quarterly report'",
                 "Recipient 1 of 2 bob@lab.test", "action failed",
                 "status 5.1.1 · Bad destination mailbox address",
                 "remote server mx.lab.test",
                 "remote reply 550 5.1.1 <bob@lab.test>: Recipient address rejected: User unknown",
                 "status class permanent", "Failed for good",
                 "Recipient 2 of 2 carol@lab.test", "action delayed", "status class transient",
                 "Not delivered yet", "retrying until Wed, 3 Jan 2024", "What to check"):
        assert part in text, part
    bob = text[text.index("Recipient 1 of 2"):text.index("Recipient 2 of 2")]
    assert "Get-Recipient" in bob and "greylisting" not in bob.lower()


def test_ndr_json(tmp_path: Path) -> None:
    path = tmp_path / "bounce.eml"
    path.write_bytes(NDR)
    rc, data = run_json(str(path))
    assert rc == 0 and data["kind"] == "ndr"
    ndr = data["ndr"]
    assert (ndr["path"], ndr["format"], ndr["is_delay"], ndr["reporting_mta"]) == (
        str(path), "rfc3464", False, "mx.sender.test")
    assert ndr["original"] == {"message_id": "<orig-1@sender.test>", "subject": "Quarterly report"}
    bob, carol = ndr["recipients"]
    assert (bob["recipient"], bob["action"], bob["status"], bob["outcome"]) == (
        "bob@lab.test", "failed", "5.1.1", "permanent")
    assert bob["status_info"]["title"] == "Bad destination mailbox address"
    assert bob["reply"]["basic_code"] == "550" and bob["reply_code"] == 550
    assert bob["remote_mta"] == "mx.lab.test" and bob["diagnostic_type"] == "smtp"
    assert bob["checks"]
    assert (carol["action"], carol["outcome"], carol["status_info"]["transient"]) == (
        "delayed", "transient", True)
    assert carol["will_retry_until"] == "Wed, 3 Jan 2024 10:00:00 +0000"


def test_ndr_for_an_expired_message(tmp_path: Path) -> None:
    path = tmp_path / "expired.eml"
    path.write_bytes(EXPIRED)
    rc, out, _ = run(str(path), width=120)
    assert rc == 0
    text = flat(out)
    assert "status 4.4.7 · Delivery time expired" in text
    assert "Failed after retrying" in text
    assert "QUEUE.Expired" in text and "expired in its queue" in text
    _, data = run_json(str(path))
    [dave] = data["ndr"]["recipients"]
    assert dave["outcome"] == "permanent" and dave["status_info"]["transient"] is True


def test_recipient_report_with_a_stand_in_record() -> None:
    # the report works on what harness.analysis.dsn gives; a stand-in with the
    # same fields shows the rules without the parser
    from harness.analysis.dsn import RecipientResult

    rec = RecipientResult(final_recipient="x@lab.test", action="failed", status="5.7.1",
                          reported_status="5.0.0", diagnostic_type="smtp",
                          diagnostic_text="550 5.7.1 RESOLVER.RST.AuthRequired; authentication "
                                          "required", reply_code=550)
    rep = explain.recipient_report(rec)
    assert rep.outcome == "permanent" and rep.status_info is not None
    assert rep.reply is not None and rep.reply.component is not None
    assert rep.checks[0] == rep.reply.component.checks[0]  # the most specific advice first
    assert any("5.0.0" in n for n in rep.notes)


def test_not_an_ndr(tmp_path: Path) -> None:
    path = tmp_path / "hello.eml"
    path.write_bytes(b"From: a@b.test\r\nTo: c@d.test\r\nSubject: hi\r\n\r\nJust mail.\r\n")
    rc, out, err = run(str(path))
    assert (rc, out) == (1, "")
    assert err.count("\n") == 1 and "not an NDR" in err
    rc, data = run_json(str(path))
    assert rc == 1 and (data["kind"], data["reason"]) == ("error", "not_ndr")
    assert "classified_as" not in data  # plain mail: nothing automatic about it


def test_not_an_ndr_msg_hint(tmp_path: Path) -> None:
    path = tmp_path / "bounce.msg"
    path.write_bytes(b"\xd0\xcf\x11\xe0 not mime at all")
    rc, _, err = run(str(path))
    assert rc == 1 and "save the NDR as .eml" in err


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("target", ["missing.eml", "some/dir/missing", "C:\\ndr\\x.eml"])
def test_missing_file_is_one_line(tmp_path: Path, target: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(target)
    assert (rc, out) == (1, "")
    assert err == f"harness: error: {target}: no such file\n"
    rc, data = run_json(target)
    assert rc == 1 and (data["kind"], data["reason"]) == ("error", "not_found")
    assert data["error"] == f"{target}: no such file"


def test_directory(tmp_path: Path) -> None:
    rc, _, err = run(str(tmp_path))
    assert rc == 1 and "is a directory" in err


def test_text_without_a_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc, out, err = run("hello world")
    assert (rc, out) == (1, "")
    assert "no status code found" in err and err.count("\n") == 1
    rc, data = run_json("hello")
    assert rc == 1 and data["reason"] == "no_code"


def test_a_reply_mentioning_a_file_name_is_still_a_reply(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc, data = run_json("550 5.7.1 see https://example.test/policy.txt")
    assert rc == 0 and data["kind"] == "reply"


def test_a_soft_wrapping_console_loses_no_text() -> None:
    # the CLI's consoles soft-wrap; the explanation must still be complete
    out = io.StringIO()
    console = Console(file=out, width=60, soft_wrap=True, highlight=False)
    assert explain_command("5.7.1", as_json=False, console=console) == 0
    assert "followed by the server name and 5.7.1." in flat(out.getvalue())
    assert max(len(line.rstrip()) for line in out.getvalue().splitlines()) <= 60


def test_errors_go_to_the_main_console_without_an_error_console() -> None:
    out = io.StringIO()
    rc = explain_command("nope.eml", as_json=False, console=Console(file=out, width=80))
    assert rc == 1 and out.getvalue() == "harness: error: nope.eml: no such file\n"


# ------------------------------------------------------- the JSON contract

CODE_KEYS = {"code", "entry", "match", "known", "kind", "class", "class_name", "subject",
             "subject_name", "title", "meaning", "outcome", "transient", "causes", "checks",
             "exchange", "vendor", "typical_replies", "source"}
REPLY_KEYS = {"text", "basic_code", "enhanced_code", "message", "outcome", "transient",
              "enhanced", "basic", "component", "socket_error", "quoted", "notes", "checks"}
NDR_KEYS = {"path", "kind", "format", "is_delay", "reporting_mta", "original", "recipients"}
RECIPIENT_KEYS = {"recipient", "action", "status", "status_info", "outcome", "verdict",
                  "remote_mta", "diagnostic_type", "diagnostic_text", "reply_code",
                  "last_attempt_date", "will_retry_until", "reply", "notes", "checks"}


def test_json_shape_is_the_documented_one(tmp_path: Path) -> None:
    # the module docstring documents these keys; this keeps both in step
    doc = explain.__doc__ or ""
    for key in CODE_KEYS | REPLY_KEYS | NDR_KEYS | RECIPIENT_KEYS:
        assert f'"{key}"' in doc, key

    _, data = run_json("5.1.1")
    assert set(data) == {"schema", "kind", "input", "code"}
    assert set(data["code"]) == CODE_KEYS

    _, data = run_json('441 4.4.1 responded with "421 4.4.2 gone" Winsock error code: 10054')
    reply = data["reply"]
    assert set(reply) == REPLY_KEYS
    assert set(reply["enhanced"]) == set(reply["basic"]) == CODE_KEYS
    assert set(reply["quoted"]) == REPLY_KEYS
    assert set(reply["socket_error"]) == {"code", "name", "meaning"}
    _, data = run_json("550 5.1.1 RESOLVER.ADR.RecipNotFound; not found")
    assert set(data["reply"]["component"]) == {"name", "known", "meaning", "checks"}

    path = tmp_path / "bounce.eml"
    path.write_bytes(NDR)
    _, data = run_json(str(path))
    assert set(data["ndr"]) == NDR_KEYS
    assert set(data["ndr"]["original"]) == {"message_id", "subject"}
    for rec in data["ndr"]["recipients"]:
        assert set(rec) == RECIPIENT_KEYS
        assert set(rec["status_info"]) == CODE_KEYS and set(rec["reply"]) == REPLY_KEYS

    _, data = run_json(str(tmp_path / "missing.eml"))
    assert set(data) == {"schema", "kind", "input", "error", "reason"}


def test_explain_names_microsofts_page_for_5_7_520_and_4_4_317() -> None:
    for code, page in (("5.7.520", "non-delivery-reports-in-exchange-online"),
                       ("4.4.317", "fix-error-code-450-4-4-317-in-exchange-online")):
        _, data = run_json(code)
        assert any(page in url for url in data["code"]["source"]), data["code"]["source"]
        rc, out, _ = run(code, width=300)
        assert rc == 0
        assert "source" in out and page in out
    _, data = run_json("4.4.317")
    assert "UntrustedRoot" in data["code"]["meaning"]


EXO_5_4_1 = "Recipient address rejected, access denied (Exchange Online)"


@pytest.mark.parametrize("line", [
    "550 5.4.1 Relay Access Denied",
    "550 5.4.1 Recipient address rejected: Access denied",
    "550 5.4.1 [kijitora@example.org]: Recipient address rejected: Access denied.",
    "#550 5.4.1 Relay Access Denied ##",
])
def test_a_5_4_1_reply_in_exchange_onlines_words_is_headed_by_its_meaning(line: str) -> None:
    # X.4.1 is "No answer from host" in the registry; Exchange Online's text
    # says the recipient was refused, and that meaning heads the explanation
    rc, out, _ = run(line, width=300)
    assert rc == 0
    heading = next(row for row in out.splitlines() if "enhanced code" in row)
    assert EXO_5_4_1 in heading and "No answer from host" not in heading
    text = flat(out)
    assert "Directory-Based Edge Blocking" in text.split("Typical causes")[1]
    assert "Get-AcceptedDomain" in text.split("What to check")[1]
    assert "could not reach the destination host" not in text  # not the registry's meaning
    # the registry's meaning is not hidden: a note says which meaning was taken and why
    assert "5.4.1 is 'No answer from host' in the IANA registry" in text
    _, data = run_json(line)
    enhanced = data["reply"]["enhanced"]
    assert (enhanced["title"], enhanced["entry"], enhanced["vendor"]) == (
        EXO_5_4_1, "5.4.1", "Microsoft")
    assert any("fix-error-code-550-5-4-1-in-exchange-online" in u for u in enhanced["source"])


@pytest.mark.parametrize("line", ["550 5.4.1 No answer from host",
                                  "541 5.4.1 Mail rejected by destination domain",
                                  "451 4.4.1 Connection timed out"])
def test_a_4_1_reply_in_other_words_keeps_the_registry_meaning(line: str) -> None:
    rc, out, _ = run(line, width=300)
    assert rc == 0
    heading = next(row for row in out.splitlines() if "enhanced code" in row)
    assert "No answer from host" in heading and EXO_5_4_1 not in out
    assert "IANA registry" not in out


def test_the_code_alone_keeps_the_registry_meaning() -> None:
    _, data = run_json("5.4.1")
    assert data["code"]["title"] == "No answer from host"
