"""The evidence readers: every format, from fixtures written in the documented
formats (tests/fixtures/evidence/README.md says where each format's
description came from), and the helpers they share."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.analysis.evidence import READERS, ReadOptions, read_evidence, sniff
from harness.analysis.evidence.base import Reply, decode, find_reply, parse_time
from harness.analysis.evidence.exchange2003 import EVENTS as EVENTS_2003
from harness.analysis.evidence.exchange_online import TraceDetailRow, TraceRow
from harness.analysis.evidence.exchange_protocol import ProtocolLine, sessions
from harness.analysis.evidence.exchange_queue import QueuedMessage, QueueRow
from harness.analysis.evidence.exchange_tracking import TrackingEvent, split_statuses
from harness.analysis.evidence.exim import EximRecord
from harness.analysis.evidence.postfix import PostfixRecord

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evidence"
NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC).timestamp()
OPTS = ReadOptions(now=NOW)


def read(name: str, options: ReadOptions = OPTS):  # type: ignore[no-untyped-def]
    p = FIXTURES / name
    return read_evidence(p.name, p.read_bytes(), options)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


# ------------------------------------------------------------- every fixture

@pytest.mark.parametrize(("name", "kind", "records", "problems"), [
    ("SEND20261130-1.LOG", "exchange-send-protocol", 43,
     ["SEND20261130-1.LOG:49: date-time '30-11-2026 09:01:02' is not a time",
      "SEND20261130-1.LOG:50: event '?' is none of + - > < *"]),
    ("RECV20261130-1.LOG", "exchange-receive-protocol", 9, []),
    ("MSGTRK2026113009-1.LOG", "exchange-tracking", 5,
     ["MSGTRK2026113009-1.LOG:11: no time: '2026-11-30 9:02' is not one"]),
    ("MSGTRK20261130-1.LOG", "exchange-tracking", 2, []),
    ("get-messagetrackinglog.csv", "exchange-tracking-csv", 1,
     ["get-messagetrackinglog.csv:3: Recipients was exported as 'System.String[]': select it "
      "as @{n='Recipients';e={$_.Recipients -join ';'}} (docs/exchange-lab.md)",
      "get-messagetrackinglog.csv:3: RecipientStatus was exported as 'System.String[]': "
      "select it as @{n='RecipientStatus';e={$_.RecipientStatus -join ';'}} "
      "(docs/exchange-lab.md)",
      "get-messagetrackinglog.csv:3: Reference was exported as 'System.String[]': select it "
      "as @{n='Reference';e={$_.Reference -join ';'}} (docs/exchange-lab.md)"]),
    ("tracking-flat.csv", "exchange-tracking-csv", 3,
     ["tracking-flat.csv:5: no time: 'soon' is not one"]),
    ("get-queue.csv", "exchange-queue-csv", 2, []),
    ("get-queue.json", "exchange-queue-json", 2,
     ["get-queue.json:13: NextRetryTime 'yesterday' is not a time this reads (export times "
      "with .ToUniversalTime().ToString('o'))"]),
    ("get-message.json", "exchange-queue-json", 1, []),
    ("messagetrace.csv", "exchange-online-trace", 2, []),
    ("messagetracedetail.csv", "exchange-online-trace-detail", 3,
     ["messagetracedetail.csv:5: Date 'not a date' is not a time"]),
    ("MTSummary_Report_extended.csv", "exchange-online-extended", 3, []),
    ("ex261130.log", "exchange2003-smtp", 10,
     ["ex261130.log:15: date/time '2026-11-30 9:00' is not a time"]),
    ("20261130.log", "exchange2003-tracking", 3,
     ["20261130.log:7: Event-ID 'SEND' is not a number"]),
    ("postfix-syslog.log", "postfix", 9,
     ["postfix-syslog.log:11: not a syslog or journal line"]),
    ("postfix-journal.json", "postfix", 3, []),
    ("exim-mainlog", "exim", 9, ["exim-mainlog:10: not an Exim main log line (no time at "
                                 "the start)"]),
])
def test_evidence_reader_reads_each_fixture(name: str, kind: str, records: int,
                                            problems: list[str]) -> None:
    f = read(name)
    assert f.kind == kind
    assert len(f.records) == records
    assert [str(p) for p in f.problems] == problems


def test_evidence_reader_fixture_folder_is_covered() -> None:
    """Every fixture is read by the table above and described in the README."""
    readme = (FIXTURES / "README.md").read_text()
    for p in FIXTURES.iterdir():
        if p.name != "README.md":
            assert p.name in readme, f"{p.name} is not described in the README"


def test_evidence_reader_sniffs_another_kind_of_file_and_says_so() -> None:
    f = read_evidence("notes.txt", b"hello\nthis is not a log\n")
    assert f.kind == "unknown" and f.records == ()
    [problem] = f.problems
    assert str(problem).startswith("notes.txt:1: it is none of the kinds this reads (")
    assert "Postfix mail log" in str(problem)
    assert str(read_evidence("empty.log", b"").problems[0]).startswith(
        "empty.log:1: it is empty")


def test_evidence_reader_names_every_kind_once() -> None:
    kinds = [r.kind for r in READERS]
    assert len(kinds) == len(set(kinds))
    for name in ("SEND20261130-1.LOG", "MSGTRK2026113009-1.LOG", "get-queue.json",
                 "ex261130.log", "20261130.log", "exim-mainlog", "postfix-syslog.log"):
        spec = sniff(decode((FIXTURES / name).read_bytes()))
        assert spec is not None, name


# -------------------------------------------------------------- per format

def test_evidence_protocol_log_fields_by_name_and_sessions() -> None:
    f = read("SEND20261130-1.LOG")
    assert f.header["log-type"] == "SMTP Send Protocol Log"
    lines = [r for r in f.records if isinstance(r, ProtocolLine)]
    first, _second = sessions(lines)
    assert first.session == "08DE2F1A3C4B5D01"
    assert first.local == ("10.0.0.5", 50211) and first.remote == ("192.0.2.10", 2525)
    assert first.message_ids == ("<4f2c9a01@EX01.contoso.test>",)
    replies = [x.reply for x in first.lines if x.reply]
    assert replies[0] == Reply(220, None, "220 mx.harness.test ESMTP SMTP Harness")
    grey = next(r for r in replies if r and r.code == 451)
    assert grey.enhanced == "4.7.1" and grey.message.startswith("Greylisted, this sender")
    assert [x.command for x in first.lines if x.command] == [
        "EHLO EX01.contoso.test", "MAIL FROM:<alice@contoso.test> SIZE=2313",
        "RCPT TO:<user@lab.test>", "RCPT TO:<full@lab.test>", "RSET", "QUIT"]
    assert first.lines[0].t == ts("2026-11-30T09:00:01.103+00:00")


def test_evidence_protocol_log_columns_in_another_order() -> None:
    text = ("#Log-type: SMTP Send Protocol Log\n"
            "#Fields: event,data,date-time,session-id,context,local-endpoint,remote-endpoint,"
            "connector-id,sequence-number\n"
            "<,250 2.1.0 Ok,2026-11-30T09:00:01.115Z,S1,,10.0.0.5:50211,192.0.2.10:2525,X,3\n")
    [line] = read_evidence("x.log", text).records
    assert line.reply.code == 250 and line.session == "S1" and line.sequence == 3
    assert line.local == ("10.0.0.5", 50211) and line.connector == "X"


def test_evidence_receive_log_is_read_the_other_way_round() -> None:
    f = read("RECV20261130-1.LOG")
    lines = [r for r in f.records if isinstance(r, ProtocolLine)]
    assert {x.direction for x in lines} == {"receive"}
    assert [x.command for x in lines if x.command] == ["EHLO app01.contoso.test",
                                                      "MAIL FROM:<alice@contoso.test>"]
    assert lines[2].reply is not None and lines[2].reply.code == 220


def test_evidence_tracking_log_2013_events_and_statuses() -> None:
    f = read("MSGTRK2026113009-1.LOG")
    evs = {e.event_id: e for e in f.records if isinstance(e, TrackingEvent)}
    assert set(evs) == {"RECEIVE", "DEFER", "FAIL", "DSN", "SEND"}
    assert evs["RECEIVE"].recipients == ("user@lab.test", "full@lab.test")
    assert evs["RECEIVE"].schema == "exchange2013"
    assert evs["DEFER"].reply_for("user@lab.test") == Reply(
        451, "4.7.1", "451 4.7.1 Greylisted, this sender is new here; please try again later")
    assert evs["FAIL"].reply_for("full@lab.test").text.endswith("over its storage quota")
    assert evs["DSN"].reference == ("<4f2c9a01@EX01.contoso.test>",)
    assert evs["DSN"].canonical == "DSN" and evs["SEND"].canonical == "SEND"
    assert evs["SEND"].t == ts("2026-11-30T09:01:01.433+00:00")
    assert "shadow" not in evs["SEND"].meaning and evs["SEND"].meaning.startswith("the message")


def test_evidence_tracking_log_2010_schema_and_bom() -> None:
    f = read("MSGTRK20261130-1.LOG")
    assert f.header["version"] == "14.03.0123.000"
    recv, send = f.records
    assert recv.schema == send.schema == "exchange2010"
    assert send.network_id is None and send.reply_for("user@lab.test").code == 250


@pytest.mark.parametrize(("value", "parts"), [
    ("250 2.1.5 OK;550 5.1.1 RESOLVER.ADR.ExRecipNotFound; not found",
     ["250 2.1.5 OK", "550 5.1.1 RESOLVER.ADR.ExRecipNotFound; not found"]),
    ("[{LRT=};{LED=451 4.7.1 x};{FQDN=};{IP=}];250 2.0.0 OK",
     ["[{LRT=};{LED=451 4.7.1 x};{FQDN=};{IP=}]", "250 2.0.0 OK"]),
    ("", []),
    ("250 OK", ["250 OK"]),
])
def test_evidence_tracking_statuses_split_only_between_statuses(value: str,
                                                                parts: list[str]) -> None:
    assert split_statuses(value) == parts


def test_evidence_tracking_csv_reads_export_csv_with_and_without_type_line() -> None:
    flat = read("tracking-flat.csv")
    defer, fail, send = flat.records
    assert defer.schema == "powershell" and defer.reply_for("user@lab.test").code == 451
    assert fail.reply_for("full@lab.test").enhanced == "5.2.2"
    assert send.t == ts("2026-11-30T09:01:01.433+00:00")
    typed = read("get-messagetrackinglog.csv", ReadOptions(tz=timezone(timedelta(hours=1))))
    [ev] = typed.records
    assert ev.recipients == () and ev.event_id == "DEFER"
    assert ev.t == ts("2026-11-30T09:00:01+01:00")  # a local time, in the zone given


def test_evidence_queue_csv_and_json() -> None:
    q1, q2 = read("get-queue.csv").records
    assert isinstance(q1, QueueRow) and q1.status == "Retry" and q1.retry_count == 3
    assert q1.last_reply == Reply(421, "4.3.2", "421 4.3.2 Service not available, closing "
                                               "transmission channel.")
    assert q1.last_retry == ts("2026-11-30T09:05:00+00:00")
    assert q2.last_reply is None and q2.next_hop == "site:second; version:15"
    assert q1.extra["risklevel"] == "Normal"  # kept, by its normalised name
    j1, j2 = read("get-queue.json").records
    assert j1.last_reply.code == 451 and j1.last_retry == ts("2026-11-30T09:00:01.121+00:00")
    assert j2.status == "status 3"  # a number is not given a name it may not have
    assert j2.last_retry == 1796029205.0  # /Date(ms)/
    [m] = read("get-message.json").records
    assert isinstance(m, QueuedMessage) and m.message_id == "<4f2c9a01@EX01.contoso.test>"
    assert m.received == 1796029200.95 and m.retry_count == 1
    [r] = m.recipients
    assert r.address == "user@lab.test" and r.status == "Retry" and r.last_reply.code == 451


def test_evidence_queue_json_syntax_error_names_the_line() -> None:
    f = read_evidence("q.json", '[\n {"NextHopDomain": "a", "DeliveryType": "x",\n  oops}\n]')
    assert [str(p) for p in f.problems] == ["q.json:3: not JSON: Expecting property name "
                                            "enclosed in double quotes (column 3)"]


def test_evidence_exchange_online_exports() -> None:
    rows = read("messagetrace.csv").records
    assert all(isinstance(r, TraceRow) for r in rows)
    assert [r.status for r in rows] == ["Pending", "Failed"]
    assert rows[0].t == ts("2026-11-30T09:10:00+00:00")
    receive, defer, send = read("messagetracedetail.csv").records
    assert isinstance(defer, TraceDetailRow) and defer.canonical == "DEFER"
    assert defer.reply.code == 451 and receive.canonical == "RECEIVE"
    assert send.canonical == "SEND" and send.reply is None
    ext = read("MTSummary_Report_extended.csv")  # UTF-16 with a BOM
    assert [e.event_id for e in ext.records] == ["RECEIVE", "DEFER", "FAIL"]
    assert ext.records[1].reply_for("user@lab.test").code == 451
    assert {e.schema for e in ext.records} == {"extended-trace"}


def test_evidence_exchange_2003_logs() -> None:
    smtp = read("ex261130.log")
    lines = [r for r in smtp.records if isinstance(r, ProtocolLine)]
    out = [x for x in lines if x.direction == "send"]
    [session] = sessions(out)
    assert [x.data for x in session.lines][:3] == [
        "220 mx.harness.test ESMTP SMTP Harness", "EHLO EX2003.contoso.test",
        "250-mx.harness.test Hello EX2003.contoso.test"]
    assert session.lines[-1].data == "221 2.0.0 Bye"  # QUIT's reply closes it
    assert session.remote == ("192.0.2.10", 2525)
    assert smtp.resolution == 1.0
    track = read("20261130.log")
    names = [(e.event_id, e.canonical) for e in track.records]
    assert names == [("1019", "RECEIVE"), ("1020", None), ("1031", "SEND")]
    assert track.records[1].meaning == "event 1020 (not in our table)"
    assert track.records[0].t == ts("2026-11-30T09:00:00+00:00")
    assert track.records[0].source is None  # "-"
    assert EVENTS_2003[1030] == ("SMTP: non-delivery report (NDR) generated", "DSN")


def test_evidence_postfix_syslog_and_journal() -> None:
    f = read("postfix-syslog.log")
    recs = [r for r in f.records if isinstance(r, PostfixRecord)]
    deliveries = [r for r in recs if r.kind == "delivery"]
    deferred, sent, refused = deliveries
    assert deferred.status == "deferred" and deferred.reply.code == 451
    assert deferred.in_reply_to == "RCPT TO" and deferred.relay_endpoint == ("192.0.2.10", 2525)
    assert sent.reply == Reply(250, "2.0.0", "250 2.0.0 Ok: queued as 7")
    assert refused.relay == "none" and refused.reply is None
    assert f.notes == ("1 line(s) of other programs skipped",)
    assert f.resolution == 1.0
    assert deferred.t == ts("2026-11-30T09:00:01+00:00")
    [mid] = [r for r in recs if r.kind == "message-id"]
    assert mid.message_id == "<4f2c9a01@app01.contoso.test>"
    notice = next(r for r in recs if r.kind == "notification")
    assert notice.notification == "3E1D07A2B1" and notice.notification_kind == "non-delivery"
    j = read("postfix-journal.json")
    assert j.resolution == 1e-6
    assert [r.kind for r in j.records] == ["message-id", "delivery", "removed"]
    assert j.records[1].t == 1796029201.123456


@pytest.mark.parametrize(("line", "t", "resolution"), [
    ("Nov 30 09:00:01 mta postfix/smtp[1]: x", "2026-11-30T09:00:01+00:00", 1.0),
    ("Nov  3 09:00:01.250 mta postfix/smtp[1]: x", "2026-11-03T09:00:01.25+00:00", 0.001),
    ("2026-11-30T09:00:01.5+01:00 mta postfix/smtp[1]: x", "2026-11-30T08:00:01.5+00:00",
     1e-6),
    ("2026-11-30T09:00:01+0000 mta postfix/smtp[1]: x", "2026-11-30T09:00:01+00:00", 1.0),
    # read on 30 November: a December line is from last year
    ("Dec 31 23:59:59 mta postfix/smtp[1]: x", "2025-12-31T23:59:59+00:00", 1.0),
])
def test_evidence_syslog_times(line: str, t: str, resolution: float) -> None:
    [rec] = read_evidence("m", line, OPTS).records
    assert rec.t == pytest.approx(ts(t)) and rec.kind == "other"
    assert read_evidence("m", line, OPTS).resolution == resolution


def test_evidence_syslog_without_a_year_says_so() -> None:
    f = read_evidence("m", "Nov 30 09:00:01 mta postfix/smtp[1]: x\n", ReadOptions())
    assert [str(p) for p in f.problems] == [
        "m:1: a syslog time has no year: give ReadOptions(year=...) or now"]


def test_evidence_exim_mainlog() -> None:
    f = read("exim-mainlog")
    recs = [r for r in f.records if isinstance(r, EximRecord)]
    arrival = recs[0]
    assert arrival.kind == "arrival" and arrival.message_id == "<9a1b2c@app01.contoso.test>"
    defer = next(r for r in recs if r.kind == "deferred")
    assert defer.reply.code == 451 and defer.host == ("192.0.2.10", 2525)
    assert defer.local == ("10.0.0.9", 41234) and defer.fields["R"] == "smarthost"
    sent = next(r for r in recs if r.kind == "delivery" and r.address == "user@lab.test")
    assert sent.reply == Reply(250, "2.0.0", "250 2.0.0 Ok: queued as 8")
    assert sent.local == ("10.0.0.9", 41290)
    failed = next(r for r in recs if r.kind == "failed")
    assert failed.reply.code == 550 and failed.error.endswith("no such user")
    bounce = next(r for r in recs if r.kind == "arrival" and r.address == "<>")
    assert bounce.bounce_of == "1tAbCd-0001Xy-2Q"
    assert f.resolution == 0.001
    assert recs[1].t == ts("2026-11-30T09:00:01.204+01:00")  # +0100 on the line


# ----------------------------------------------------------------- helpers

@pytest.mark.parametrize(("text", "expected"), [
    ("[{LRT=11/30/2026 9:00:01 AM};{LED=451 4.7.1 Greylisted};{FQDN=x};{IP=1.2.3.4}]",
     Reply(451, "4.7.1", "451 4.7.1 Greylisted")),
    ('451 4.4.0 Primary target IP address responded with: "421 4.3.2 Service not available."'
     " Attempted failover to alternate host", Reply(421, "4.3.2", "421 4.3.2 Service not "
                                                   "available.")),
    ("[<LRI-2019/11/4 13:31:03>; <led-451 4.4.0 Primary target IP address responded with: "
     '"454 4.7.0 Temporary authentication failure." Attempted ...>]',
     Reply(454, "4.7.0", "454 4.7.0 Temporary authentication failure.")),
    ("host 192.0.2.10[192.0.2.10] said: 550 5.1.1 <x@lab.test>: no such user (in reply to "
     "RCPT TO command)", Reply(550, "5.1.1", "550 5.1.1 <x@lab.test>: no such user")),
    ("host 192.0.2.10[192.0.2.10] refused to talk to me: 421 4.3.2 Try later",
     Reply(421, "4.3.2", "421 4.3.2 Try later")),
    ("SMTP error from remote mail server after pipelined MAIL FROM:<a@b> SIZE=12: 452 4.3.1 "
     "Full", Reply(452, "4.3.1", "452 4.3.1 Full")),
    ("250 OK", Reply(250, None, "250 OK")),
    ("connect to 192.0.2.10[192.0.2.10]:25: Connection refused", None),
    ("Reason: [{LED=};{MSG=};{FQDN=};{IP=}]", None),
    (None, None),
])
def test_evidence_find_reply(text: str | None, expected: Reply | None) -> None:
    assert find_reply(text) == expected


def test_evidence_reply_agreement() -> None:
    a = Reply.parse("451 4.7.1 Greylisted, this sender is new here; please try again later")
    assert a is not None
    assert a.agrees(Reply(451, "4.7.1", "451 4.7.1 Greylisted, this sender is new here"))
    assert a.agrees(Reply(451, None, "451 Greylisted, THIS sender"))
    assert not a.agrees(Reply(451, "4.7.0", "451 4.7.0 Greylisted"))
    assert not a.agrees(Reply(450, "4.7.1", "450 4.7.1 Greylisted"))
    assert not a.agrees(Reply(451, "4.7.1", "451 4.7.1 Busy"))


@pytest.mark.parametrize(("text", "iso"), [
    ("2019-04-10T00:00:02.0366783+02:00", "2019-04-09T22:00:02.036678+00:00"),
    ("2016-04-05T00:00:02.052Z", "2016-04-05T00:00:02.052+00:00"),
    ("2003-8-12 0:58:14 GMT", "2003-08-12T00:58:14+00:00"),
    ("2019/11/4 13:31:03", "2019-11-04T13:31:03+00:00"),
    ("8/20/2018 11:32:37 AM", "2018-08-20T11:32:37+00:00"),
    ("8/20/2018 12:05:00 AM", "2018-08-20T00:05:00+00:00"),
    ("8/20/2018 1:05:00 PM", "2018-08-20T13:05:00+00:00"),
    ("/Date(1554854402036)/", "2019-04-09T23:59:62.036+00:00"),
    ("\\/Date(1554854402036)\\/", "2019-04-09T23:59:62.036+00:00"),
])
def test_evidence_parse_time(text: str, iso: str) -> None:
    if "62.036" in iso:  # /Date(ms)/ is epoch milliseconds
        assert parse_time(text) == 1554854402.036
    else:
        assert parse_time(text) == pytest.approx(datetime.fromisoformat(iso).timestamp())


@pytest.mark.parametrize("text", ["", "soon", "13/45/2026 9:00:00 AM", "2026-02-30T00:00:00Z",
                                  "8/20/2018 13:05:00 PM"])
def test_evidence_parse_time_refuses(text: str) -> None:
    assert parse_time(text) is None


def test_evidence_decode_utf16_and_bom() -> None:
    assert decode("a,b".encode("utf-16")) == "a,b"  # with its BOM
    assert decode("a,b".encode("utf-16-le")) == "a,b"
    assert decode(b"\xef\xbb\xbfa") == "a"
    assert decode(b"caf\xe9") == "caf\ufffd"


READ_PROFILE = settings(max_examples=200, derandomize=True, database=None, deadline=None,
                        suppress_health_check=[HealthCheck.too_slow])
HEADS = ["", "#Log-type: SMTP Send Protocol Log\n#Fields: date-time,session-id,event,data\n",
         "#Fields: date-time,event-id,internal-message-id,recipient-address\n",
         '"Timestamp","EventId","Recipients"\n', "# Message Tracking Log File\n# Date\tTime\n",
         "Nov 30 09:00:01 h postfix/smtp[1]: ", "2026-11-30 09:00:01 1xZ1Yh-0005fP-1Z == ",
         '[{"NextHopDomain": "a", "DeliveryType": ', '"Received","RecipientAddress","Status",'
         '"MessageTraceId"\n']


@READ_PROFILE
@given(st.sampled_from(HEADS), st.text(max_size=400))
def test_evidence_readers_never_raise(head: str, tail: str) -> None:
    """Whatever the text, a reader returns records and problems; it never raises."""
    f = read_evidence("x", head + tail, OPTS)
    for p in f.problems:
        assert str(p).startswith("x:")
    json.dumps([str(p) for p in f.problems])
