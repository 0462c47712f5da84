"""Exchange Server 2003: the SMTP virtual server's log and the message
tracking log.

The SMTP log (IIS, W3C extended format) starts with '#Software:',
'#Version:', '#Date:' and '#Fields: date time c-ip cs-username ...
cs-method cs-uri-stem cs-uri-query sc-status ...' (space-separated; '+'
stands for a space inside a field). On an outbound connection cs-username
is OutboundConnectionCommand (cs-method is the verb, cs-uri-query the rest
of the command) or OutboundConnectionResponse (cs-uri-query is the reply),
and c-ip is the remote server. W3C logs are in UTC. The log has no session
id: an outbound session starts at the remote server's 220 and ends after
QUIT, per remote address.

The message tracking log (SERVER.log\\yyyymmdd.log) is tab-separated under
'# Message Tracking Log File', '# Exchange System Attendant Version ...'
and '# Date<TAB>Time<TAB>client-ip<TAB>...' (Microsoft KB 246965); Date and
Time are GMT ("2003-8-12", "0:58:14 GMT"). Event-ID is a number: `EVENTS`
names those we could source (KB 821905, KB 246959; 1028, 1030 and 1031 as a
public log converter, AWStats' maillogconvert.pl, names them).

May know: the text handed in. May not know: files, sockets, storage."""

from __future__ import annotations

from harness.analysis.evidence.base import (
    EvidenceFile,
    HashHeaderCsv,
    Problem,
    ReadOptions,
    parse_time,
)
from harness.analysis.evidence.exchange_protocol import ProtocolLine
from harness.analysis.evidence.exchange_tracking import TrackingEvent, norm

__all__ = ["EVENTS", "read_smtp_log", "read_tracking_2003", "sniff_smtp", "sniff_tracking"]

#: Exchange 2000/2003 tracking event numbers: (name, canonical).
EVENTS: dict[int, tuple[str, str | None]] = {
    0: ("Message transfer in", "RECEIVE"),
    1: ("Probe transfer in", None),
    2: ("Report transfer in", None),
    4: ("Message submission", "RECEIVE"),
    5: ("Probe submission", None),
    6: ("Probe transfer out", None),
    7: ("Message transfer out", None),
    8: ("Report transfer out", None),
    9: ("Message delivered", "DELIVER"),
    10: ("Report delivered", None),
    18: ("StartAssocByMTSUser", None),
    23: ("ReleaseAssocByMTSUse", None),
    26: ("Distribution list expansion", None),
    28: ("Message redirected", None),
    29: ("Message rerouted", None),
    31: ("Downgrading", None),
    33: ("Report absorption", None),
    34: ("Report generation", None),
    43: ("Unroutable report discarded", None),
    50: ("Gateway deleted message", None),
    51: ("Gateway deleted probe", None),
    52: ("Gateway deleted report", None),
    1019: ("SMTP: submit message to Advanced Queuing (the first event of a message "
           "submitted through SMTP)", "RECEIVE"),
    1027: ("Store submission (the first event of a message submitted through the "
           "Store)", "RECEIVE"),
    1028: ("SMTP Store Driver: message delivered locally to the Store", "DELIVER"),
    1030: ("SMTP: non-delivery report (NDR) generated", "DSN"),
    1031: ("SMTP: end outbound transfer (the message went to the remote server)", "SEND"),
}


# ------------------------------------------------------------------ SMTP log

def sniff_smtp(head: str) -> bool:
    low = head.lower()
    fields = next((ln for ln in low.splitlines() if ln.startswith("#fields:")), "")
    return "cs-method" in fields and "c-ip" in fields and (
        "smtpsvc" in low or "outboundconnection" in low or "ehlo" in low or "helo" in low)


def read_smtp_log(path: str, text: str, options: ReadOptions | None = None) -> EvidenceFile:
    src = HashHeaderCsv(path)
    problems: list[Problem] = []
    records: list[ProtocolLine] = []
    count: dict[str, int] = {}
    open_session: dict[str, str] = {}
    quitting: set[str] = set()  # sent QUIT: the next response ends the session
    for n, idx, cells in src.rows(text, sep=" "):
        row = {k: cells[i].replace("+", " ") if cells[i] != "-" else ""
               for k, i in idx.items() if i < len(cells)}
        when = f"{row.get('date', '')} {row.get('time', '')}".strip()
        t = parse_time(when.replace(" ", "T", 1) if row.get("date") else when)
        if t is None:
            problems.append(Problem(path, n, f"date/time {when!r} is not a time"))
            continue
        user = row.get("cs-username", "")
        remote_ip = row.get("c-ip", "")
        port = row.get("s-port", "")
        if user.lower().startswith("outboundconnection"):
            response = user.lower() == "outboundconnectionresponse"
            data = row.get("cs-uri-query", "") if response else " ".join(
                x for x in (row.get("cs-method", ""), row.get("cs-uri-query", "")) if x)
            if (response and data.startswith("220")) or remote_ip not in open_session:
                count[remote_ip] = count.get(remote_ip, 0) + 1
                open_session[remote_ip] = f"{remote_ip}#{count[remote_ip]}"
            sid = open_session[remote_ip]
            records.append(ProtocolLine(
                line=n, t=t, direction="send", connector=row.get("s-sitename", ""),
                session=sid, sequence=None, local=(row.get("s-ip", ""), None) if row.get(
                    "s-ip") else None,
                remote=(remote_ip, int(port) if port.isdigit() else None),
                event="<" if response else ">", data=data.strip(), context=""))
            if not response and data.upper().startswith("QUIT"):
                quitting.add(remote_ip)
            elif response and remote_ip in quitting:
                quitting.discard(remote_ip)
                open_session.pop(remote_ip, None)
        else:
            # an inbound line: the client's command, and the status it got
            verb = row.get("cs-method", "")
            data = " ".join(x for x in (verb, row.get("cs-uri-query", "")) if x)
            records.append(ProtocolLine(
                line=n, t=t, direction="receive", connector=row.get("s-sitename", ""),
                session=f"{remote_ip}#in", sequence=None,
                local=(row.get("s-ip", ""), int(port) if port.isdigit() else None),
                remote=(remote_ip, None), event="<", data=data.strip(),
                context=f"status {row.get('sc-status', '')}"))
    return EvidenceFile(path=path, kind="exchange2003-smtp",
                        title="Exchange 2003 SMTP virtual server log (W3C extended)",
                        records=tuple(records), problems=tuple(src.problems + problems),
                        resolution=1.0, header=dict(src.header))


# -------------------------------------------------------------- tracking log

def sniff_tracking(head: str) -> bool:
    low = head.lower()
    return "# message tracking log file" in low or any(
        ln.startswith("#") and "\t" in ln and "event-id" in ln for ln in low.splitlines()[:5])


def read_tracking_2003(path: str, text: str, options: ReadOptions | None = None
                       ) -> EvidenceFile:
    problems: list[Problem] = []
    records: list[TrackingEvent] = []
    index: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        if raw.startswith("#"):
            body = raw.lstrip("#").strip()
            if "\t" in body:
                index = {norm(name): i for i, name in enumerate(body.split("\t"))}
            continue
        if not index:
            problems.append(Problem(path, n, "a row before the '# Date<TAB>Time<TAB>...' "
                                    "header line"))
            continue
        cells = raw.split("\t")
        row = {k: cells[i].strip() if i < len(cells) and cells[i].strip() != "-" else ""
               for k, i in index.items()}
        when = f"{row.get('date', '')} {row.get('time', '')}"
        t = parse_time(when)
        if t is None:
            problems.append(Problem(path, n, f"date/time {when.strip()!r} is not a time"))
            continue
        number = row.get("eventid", "")
        if not number.lstrip("-").isdigit():
            problems.append(Problem(path, n, f"Event-ID {number!r} is not a number"))
            continue
        name, canonical = EVENTS.get(int(number), (f"event {number} (not in our table)", None))
        size = row.get("totalbytes", "")
        rcpt = row.get("recipientaddress", "")
        records.append(TrackingEvent(
            line=n, t=t, event_id=number, source=row.get("partnername") or None,
            message_id=row.get("msgid") or None, recipients=(rcpt,) if rcpt else (),
            sender=row.get("senderaddress") or None, subject=row.get("messagesubject") or None,
            client_ip=row.get("clientip") or None, client_host=row.get("clienthostname") or None,
            server_ip=row.get("serverip") or None,
            server_host=row.get("serverhostname") or None,
            reference=(row["linkedmsgid"],) if row.get("linkedmsgid") not in (None, "", "-")
            else (), total_bytes=int(size) if size.isdigit() else None,
            schema="exchange2003", canonical=canonical, meaning=name))
    return EvidenceFile(path=path, kind="exchange2003-tracking",
                        title="Exchange 2003 message tracking log", records=tuple(records),
                        problems=tuple(problems), resolution=1.0)
