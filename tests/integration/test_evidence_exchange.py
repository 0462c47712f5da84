"""Exchange's logs of a real session, lined up with the harness.

A test client plays Exchange: it drives the harness with smtplib (a
greylisted recipient and a full mailbox, the retry that is accepted, the NDR
it sends back) and, as it goes, writes what Exchange would log in the
documented formats: the Send connector's protocol log (every command and
reply, its own endpoints, its own clock) and the message tracking log
(DEFER, FAIL, DSN, SEND). Its clock runs 2.5 s ahead of the harness's, as a
second machine's might. `harness evidence` then has to put every line beside
the harness's session, attempt or stored NDR, measure the 2.5 s, and flag
the lines we edit afterwards."""

from __future__ import annotations

import csv
import io
import json
import os
import smtplib
import socket
import subprocess
import sys
import time
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

import pytest

from harness.analysis.evidence import ReadOptions, read_evidence
from harness.evidence import lineup_for
from harness.testing import Harness

SKEW = 2.5  # the "Exchange" machine's clock is this far ahead
CONNECTOR = "SMTP Harness"
SCENARIO = """\
scenario: exchange-evidence
summary: user@lab.test is greylisted once, full@lab.test is full
rules:
  - name: greylist once
    on: rcpt
    when: {rcpt: user@lab.test, attempt: 1}
    reply: 451 4.7.1 Greylisted, this sender is new here; please try again later
  - name: mailbox full
    on: rcpt
    when: {rcpt: full@lab.test}
    reply: 552 5.2.2 Mailbox full; the recipient's mailbox is over its storage quota
"""
TRACKING_FIELDS = [
    "date-time", "client-ip", "client-hostname", "server-ip", "server-hostname",
    "source-context", "connector-id", "source", "event-id", "internal-message-id",
    "message-id", "network-message-id", "recipient-address", "recipient-status", "total-bytes",
    "recipient-count", "related-recipient-address", "reference", "message-subject",
    "sender-address", "return-path", "message-info", "directionality", "tenant-id",
    "original-client-ip", "original-server-ip", "custom-data", "transport-traffic-type",
    "log-id", "schema-version"]


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


class ProtocolLog:
    """Rows of a Send connector protocol log, as Exchange writes them."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.seq: dict[str, int] = {}

    def add(self, session: str, local: str, remote: str, event: str, data: str = "",
            context: str = "") -> None:
        n = self.seq.get(session, 0)
        self.seq[session] = n + 1
        self.rows.append([stamp(time.time() + SKEW), CONNECTOR, session, str(n), local, remote,
                          event, data, context])

    def text(self) -> str:
        out = io.StringIO()
        out.write("#Software: Microsoft Exchange Server\r\n#Version: 15.02.1544.004\r\n"
                  "#Log-type: SMTP Send Protocol Log\r\n"
                  f"#Date: {self.rows[0][0]}\r\n#Fields: date-time,connector-id,session-id,"
                  "sequence-number,local-endpoint,remote-endpoint,event,data,context\r\n")
        csv.writer(out, lineterminator="\r\n").writerows(self.rows)
        return out.getvalue()


class ExchangeSMTP(smtplib.SMTP):
    """smtplib that logs each command and reply the way Exchange's Send
    protocol log does (one '<' row per reply line)."""

    def __init__(self, host: str, port: int, log: ProtocolLog, session: str) -> None:
        self.plog, self.session, self.ends = log, session, ("", f"{host}:{port}")
        super().__init__(host, port, local_hostname="EX01.contoso.test", timeout=10)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        self.plog.add(self.session, "", f"{host}:{port}", "*", context="attempting to connect")
        sock = super()._get_socket(host, port, timeout)
        here = sock.getsockname()
        self.ends = (f"{here[0]}:{here[1]}", f"{host}:{port}")
        self.plog.add(self.session, *self.ends, "+")
        return sock

    def putcmd(self, cmd: str, args: str = "") -> None:
        cmd = cmd.upper()  # Exchange writes its verbs in capitals
        self.plog.add(self.session, *self.ends, ">", f"{cmd} {args}".strip())
        super().putcmd(cmd, args)

    def getreply(self) -> tuple[int, bytes]:
        code, msg = super().getreply()
        lines = msg.decode().split("\n")
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            self.plog.add(self.session, *self.ends, "<", f"{code}{sep}{line}".strip())
        return code, msg

    def note(self, text: str) -> None:
        self.plog.add(self.session, *self.ends, "*", context=text)

    def bye(self) -> None:
        self.quit()
        self.plog.add(self.session, *self.ends, "-", context="Local")


class TrackingLog:
    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []

    def add(self, event: str, source: str, **fields: str) -> None:
        self.rows.append({"date-time": stamp(time.time() + SKEW), "event-id": event,
                          "source": source, "schema-version": "15.02.1544.004",
                          **{k.replace("_", "-"): v for k, v in fields.items()}})

    def text(self) -> str:
        out = io.StringIO()
        out.write("#Software: Microsoft Exchange Server\r\n#Version: 15.02.1544.004\r\n"
                  "#Log-type: Message Tracking Log\r\n"
                  f"#Date: {self.rows[0]['date-time']}\r\n#Fields: "
                  + ",".join(TRACKING_FIELDS) + "\r\n")
        w = csv.writer(out, lineterminator="\r\n")
        for r in self.rows:
            w.writerow([r.get(f, "") for f in TRACKING_FIELDS])
        return out.getvalue()


def _message(mid: str) -> bytes:
    m = EmailMessage()
    m["From"] = "Alice <alice@contoso.test>"
    m["To"] = "user@lab.test, full@lab.test"
    m["Subject"] = "evidence test"
    m["Message-ID"] = mid
    m.set_content("Sent by a test that plays Exchange.\n")
    return m.as_bytes()


def _ndr(ndr_id: str, original: str) -> bytes:
    """An Exchange-style NDR for full@lab.test, quoting the harness's reply."""
    report = (
        "Reporting-MTA: dns;EX01.contoso.test\r\n\r\n"
        "Final-recipient: RFC822; full@lab.test\r\nAction: failed\r\nStatus: 5.2.2\r\n"
        "Remote-MTA: DNS; mx.harness.test\r\n"
        "Diagnostic-code: smtp; 552 5.2.2 Mailbox full; the recipient's mailbox is over its "
        "storage quota\r\n")
    return (
        "From: Microsoft Outlook <MicrosoftExchange329e71ec88ae4615bbc36ab6ce41109e@contoso.test>"
        "\r\nTo: <alice@contoso.test>\r\nSubject: Undeliverable: evidence test\r\n"
        f"Message-ID: {ndr_id}\r\nMIME-Version: 1.0\r\nContent-Type: multipart/report; "
        'report-type=delivery-status; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nDelivery has failed to these recipients or "
        "groups:\r\n\r\nfull@lab.test\r\n\r\n"
        "--b1\r\nContent-Type: message/delivery-status\r\n\r\n" + report +
        "\r\n--b1\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: Alice <alice@contoso.test>\r\nSubject: evidence test\r\nMessage-ID: {original}"
        "\r\n\r\n--b1--\r\n").encode()


@pytest.fixture
def exchange_run(tmp_path: Path) -> Any:
    """The harness and the two logs of one Exchange-like delivery."""
    with Harness(SCENARIO, store=tmp_path / "harness.db") as h:
        plog, tlog = ProtocolLog(), TrackingLog()
        mid = make_msgid(domain="EX01.contoso.test")
        ndr_id = make_msgid(domain="EX01.contoso.test")
        common = {"message_id": mid, "internal_message_id": "41", "server_ip": h.host,
                  "server_hostname": "mx.harness.test", "connector_id": CONNECTOR,
                  "sender_address": "alice@contoso.test", "message_subject": "evidence test"}
        tlog.add("RECEIVE", "STOREDRIVER", **{**common, "server_ip": "", "server_hostname":
                                              "EX01", "connector_id": ""},
                 recipient_address="user@lab.test;full@lab.test")
        # 1: user@lab.test greylisted, full@lab.test full
        c = ExchangeSMTP(h.host, h.port, plog, "08DE2F1A3C4B5D01")
        c.ehlo()
        c.note(f"sending message with RecordId 51539607553 and InternetMessageId {mid}")
        c.mail("alice@contoso.test")
        grey = c.rcpt("user@lab.test")
        full = c.rcpt("full@lab.test")
        c.rset()
        c.bye()
        assert grey[0] == 451 and full[0] == 552
        tlog.add("DEFER", "SMTP", **common, recipient_address="user@lab.test",
                 recipient_status="[{LRT=};{LED=" + f"{grey[0]} {grey[1].decode()}" +
                 "};{FQDN=mx.harness.test};{IP=" + h.host + "}]")
        tlog.add("FAIL", "SMTP", **common, recipient_address="full@lab.test",
                 recipient_status=f"{full[0]} {full[1].decode()}")
        # the NDR Exchange makes for full@lab.test, routed to the harness as well
        tlog.add("DSN", "DSN", message_id=ndr_id, internal_message_id="42",
                 recipient_address="alice@contoso.test", reference=mid,
                 related_recipient_address="full@lab.test",
                 message_subject="Undeliverable: evidence test")
        c = ExchangeSMTP(h.host, h.port, plog, "08DE2F1A3C4B5D02")
        c.ehlo()
        c.note(f"sending message with RecordId 51539607554 and InternetMessageId {ndr_id}")
        c.sendmail("", ["alice@contoso.test"], _ndr(ndr_id, mid))
        c.bye()
        # 2: the retry, accepted
        c = ExchangeSMTP(h.host, h.port, plog, "08DE2F1A3C4B5D03")
        c.ehlo()
        c.note(f"sending message with RecordId 51539607553 and InternetMessageId {mid}")
        c.mail("alice@contoso.test")
        assert c.rcpt("user@lab.test")[0] == 250
        code, reply = c.data(_message(mid))
        c.bye()
        assert code == 250
        tlog.add("SEND", "SMTP", **common, recipient_address="user@lab.test",
                 recipient_status=f"{code} {reply.decode()}")
        h.wait_idle()
        h.sessions()  # everything committed
        send = tmp_path / "SEND20261130-1.LOG"
        track = tmp_path / "MSGTRK2026113009-1.LOG"
        send.write_text(plog.text(), encoding="utf-8", newline="")
        track.write_text(tlog.text(), encoding="utf-8", newline="")
        yield h, send, track, mid, ndr_id


def _lineup(*paths: Path, store: Path) -> Any:
    files = [read_evidence(str(p), p.read_bytes(), ReadOptions()) for p in paths]
    lineup, _ = lineup_for(files, [store])
    return lineup


def _steps(lineup: Any, path: Path) -> list[Any]:
    return [st for m in lineup.timelines for st in m.steps
            if any(x.where.startswith(f"{path}:") for x in st.sender)]


def test_evidence_exchange_logs_line_up_with_the_session(exchange_run: Any) -> None:
    h, send, track, mid, _ndr_id = exchange_run
    lineup = _lineup(send, track, store=h.store_path)
    assert lineup.problems == []
    assert lineup.disagreements == [], [d.message for d in lineup.disagreements]
    # each tracking event beside what the harness did
    by_event: dict[str, Any] = {}
    for st in _steps(lineup, track):
        for x in st.sender:
            if x.where.startswith(f"{track}:"):
                by_event[x.text.split(" ")[0]] = st
    assert {"DEFER", "FAIL", "SEND", "DSN"} <= set(by_event)
    assert by_event["DEFER"].harness.reply.startswith("451 4.7.1")
    assert by_event["FAIL"].harness.reply.startswith("552 5.2.2")
    assert by_event["SEND"].harness.reply.startswith("250")
    ndr = next(m for m in h.messages() if m.mail_from == "")
    assert by_event["DSN"].harness.message == ndr.id
    assert f"m{ndr.id}" in by_event["DSN"].harness.text
    # the protocol log's lines sit beside the same attempts
    sides = {x.where.split(":")[0] for st in _steps(lineup, send) for x in st.sender}
    assert str(send) in sides
    assert all(st.harness is not None for st in _steps(lineup, send) if st.kind == "attempt")
    # the clock skew, measured on both files
    skews = {s.path: s for s in lineup.skews}
    for p in (send, track):
        assert skews[str(p)].seconds == pytest.approx(SKEW, abs=0.05), skews[str(p)].describe()
    # one timeline for the message, one holding the NDR's own delivery? No:
    # the NDR's session carries its own Message-ID, the DSN event its reference
    keys = {m.key for m in lineup.timelines}
    assert mid.lower() in keys


def test_evidence_flags_an_edited_reply_in_each_exchange_log(exchange_run: Any,
                                                             tmp_path: Path) -> None:
    h, send, track, _mid, _ndr = exchange_run
    edited_send = tmp_path / "SEND-edited.LOG"
    edited_track = tmp_path / "MSGTRK-edited.LOG"
    lines = send.read_text().splitlines()
    n_send = next(i for i, ln in enumerate(lines) if ',<,"451 4.7.1' in ln)
    lines[n_send] = lines[n_send].replace("451 4.7.1 Greylisted", "450 4.2.1 Mailbox busy")
    edited_send.write_text("\r\n".join(lines) + "\r\n")
    lines = track.read_text().splitlines()
    n_track = next(i for i, ln in enumerate(lines) if ",DEFER," in ln)
    lines[n_track] = lines[n_track].replace("LED=451 4.7.1 Greylisted", "LED=450 4.2.1 Busy")
    edited_track.write_text("\r\n".join(lines) + "\r\n")
    lineup = _lineup(edited_send, edited_track, store=h.store_path)
    flagged = {(d.kind, d.where) for d in lineup.disagreements}
    assert ("reply-never-sent", f"{edited_send}:{n_send + 1}") in flagged, flagged
    assert ("reply-never-sent", f"{edited_track}:{n_track + 1}") in flagged, flagged
    assert {k for k, _ in flagged} == {"reply-never-sent"}
    # the command says so, and exits 3
    r = subprocess.run([sys.executable, "-m", "harness.cli", "evidence", str(edited_send),
                        str(edited_track), "--store", str(h.store_path)],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"! reply-never-sent: {edited_send}:{n_send + 1}: the sender logged '450 4.2.1 " \
        "Mailbox busy" in r.stdout
    assert "2 disagreement(s)" in r.stdout


def test_evidence_flags_a_dsn_never_captured_and_an_attempt_not_logged(
        exchange_run: Any, tmp_path: Path) -> None:
    h, send, track, _mid, _ndr_id = exchange_run
    # a DSN event for an NDR that went elsewhere (another Message-ID, another reference)
    lines = track.read_text().splitlines()
    n = next(i for i, ln in enumerate(lines) if ",DSN," in ln)
    cells = next(csv.reader([lines[n]]))
    cells[TRACKING_FIELDS.index("message-id")] = "<lost-ndr@EX01.contoso.test>"
    cells[TRACKING_FIELDS.index("reference")] = "<some-other-message@EX01.contoso.test>"
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(cells)
    lines[n] = out.getvalue()
    edited_track = tmp_path / "MSGTRK-lost.LOG"
    edited_track.write_text("\r\n".join(lines) + "\r\n")
    # a protocol log that leaves out RCPT TO:<full@lab.test> and its 552
    kept = [ln for ln in send.read_text().splitlines()
            if "RCPT TO:<full@lab.test>" not in ln and ",<,552 5.2.2" not in ln]
    short_send = tmp_path / "SEND-short.LOG"
    short_send.write_text("\r\n".join(kept) + "\r\n")
    lineup = _lineup(short_send, edited_track, store=h.store_path)
    by_kind: dict[str, list[Any]] = {}
    for d in lineup.disagreements:
        by_kind.setdefault(d.kind, []).append(d)
    assert [d.where for d in by_kind["dsn-not-captured"]] == [f"{edited_track}:{n + 1}"]
    # the tracking log's FAIL still logs the 552: only the protocol log lacks it
    assert "attempt-not-logged" not in by_kind
    by_kind = {}
    for d in _lineup(short_send, store=h.store_path).disagreements:
        by_kind.setdefault(d.kind, []).append(d)
    [unlogged] = by_kind["attempt-not-logged"]
    assert "552 5.2.2" in unlogged.message and "RCPT TO:<full@lab.test>" in unlogged.message
    assert any("RCPT TO:<full@lab.test>" in d.message
               for d in by_kind["transcript-differs"])
    assert "reply-never-sent" not in by_kind


def test_evidence_command_prints_the_timeline_and_json(exchange_run: Any) -> None:
    h, send, track, mid, _ndr = exchange_run
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "harness.cli", "evidence", str(send), str(track),
                        "--store", str(h.store_path)], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Message {mid}" in r.stdout
    assert "clock skew +2.5" in r.stdout
    assert "no disagreement" in r.stdout
    r = subprocess.run([sys.executable, "-m", "harness.cli", "evidence", str(send), str(track),
                        "--store", str(h.store_path), "--json"], capture_output=True,
                       text=True, timeout=60, env=env)
    data = json.loads(r.stdout)
    assert data["schema"] == "harness.evidence/1"
    assert data["disagreements"] == 0
    assert {f["kind"] for f in data["files"]} == {"exchange-send-protocol", "exchange-tracking"}
