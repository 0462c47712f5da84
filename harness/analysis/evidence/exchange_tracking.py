"""Exchange's message tracking: the MSGTRK*.LOG files themselves (the
Exchange 2010 schema and the 2013+ one, which adds network-message-id,
transport-traffic-type, log-id and schema-version), and what
Get-MessageTrackingLog returns, exported with Export-Csv (with or without
the '#TYPE ...' line PowerShell 5.1 writes first).

Both are read by field name, from the file's '#Fields:' line or its CSV
header row: names are compared without case, '-' and '_' ("recipient-status",
"RecipientStatus" and "recipient_status" are one field), so the extended
message trace of Exchange Online (exchange_online.py) reads through the same
code. Multi-valued fields (recipients, their statuses, references) are ';'
separated; a status may itself contain '; ' ("550 5.1.1 RESOLVER.ADR.
ExRecipNotFound; not found") or ';' inside brackets ("[{LRT=};{LED=...}]"),
so statuses are split only where the next part starts a new one.

Event ids (2013+): RECEIVE, SEND, DEFER, FAIL, DSN, DELIVER, RESUBMIT,
TRANSFER, HAREDIRECT, ... are kept as written; `canonical` names what the
lining up uses (SEND, DEFER, FAIL, DSN, RECEIVE, DELIVER).

May know: the text handed in. May not know: files, sockets, storage."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass

from harness.analysis.evidence.base import (
    EvidenceFile,
    HashHeaderCsv,
    Problem,
    ReadOptions,
    Reply,
    find_reply,
    parse_time,
)

__all__ = [
    "EVENTS",
    "TrackingEvent",
    "event_from_row",
    "read_tracking_csv",
    "read_tracking_log",
    "sniff_csv",
    "sniff_log",
    "split_statuses",
]

#: Event ids of the message tracking log (Exchange 2013 and later), in our
#: words, after Microsoft's "Event types in the message tracking log".
EVENTS: dict[str, str] = {
    "AGENTINFO": "a transport agent recorded data about the message",
    "BADMAIL": "a message from the Pickup or Replay directory could be neither delivered "
               "nor returned",
    "CLIENTSUBMISSION": "a message was submitted from an Outlook client",
    "DEFER": "delivery was delayed",
    "DELIVER": "the message was delivered to a local mailbox",
    "DELIVERFAIL": "delivery to a local mailbox failed",
    "DROP": "the message was dropped without a delivery status notification",
    "DSN": "a delivery status notification (NDR, delay or success notice) was generated",
    "DUPLICATEDELIVER": "a duplicate copy was not delivered again",
    "DUPLICATEEXPAND": "a duplicate distribution group expansion was suppressed",
    "DUPLICATEREDIRECT": "a duplicate redirection was suppressed",
    "EXPAND": "a distribution group was expanded",
    "FAIL": "delivery failed",
    "HADISCARD": "a shadow copy was discarded after the primary copy went on",
    "HARECEIVE": "a shadow copy was received",
    "HAREDIRECT": "a shadow copy was created",
    "HAREDIRECTFAIL": "a shadow copy could not be created",
    "INITMESSAGECREATED": "a message was sent to an arbitration mailbox for approval",
    "LOAD": "the message was loaded at start-up",
    "MODERATIONEXPIRE": "a moderator did not decide in time; the message expired",
    "MODERATORAPPROVE": "a moderator approved the message",
    "MODERATORREJECT": "a moderator rejected the message",
    "MODERATORSALLNDR": "every moderator's approval request came back undeliverable",
    "NOTIFYMAPI": "a message was found in a mailbox Outbox",
    "NOTIFYSHADOW": "the primary copy told its shadow copy to continue",
    "POISONMESSAGE": "the message was put in or taken out of the poison message queue",
    "PROCESS": "the message was processed",
    "PROCESSMEETINGMESSAGE": "a meeting message was processed by the Mailbox Transport "
                             "Delivery service",
    "RECEIVE": "the message was received and committed to the queue database",
    "REDIRECT": "the message was redirected to another recipient",
    "RESOLVE": "a recipient was resolved to another address",
    "RESUBMIT": "the message was resubmitted (Safety Net or shadow redundancy)",
    "RESUBMITDEFER": "a resubmission was deferred",
    "RESUBMITFAIL": "a resubmission failed",
    "SEND": "the message was sent by SMTP to another server",
    "SUBMIT": "the Mailbox Transport Submission service handed the message to the "
              "Transport service",
    "SUBMITDEFER": "the hand-over to the Transport service was deferred",
    "SUBMITFAIL": "the hand-over to the Transport service failed",
    "SUPPRESSED": "transmission was suppressed",
    "THROTTLE": "the message was throttled",
    "TRANSFER": "recipients were moved to a copy of the message (content conversion, "
                "recipient limits or agents)",
}
_CANONICAL = {"SEND", "DEFER", "FAIL", "DSN", "RECEIVE", "DELIVER"}
#: A status starts here: "250 ...", "[{LRT=..." or "{...".
_STATUS_START = re.compile(r"\s*(?:[2-5]\d\d\b|\[|\{)")
_BRACKETS = {"[": "]", "{": "}"}


@dataclass(frozen=True, kw_only=True)
class TrackingEvent:
    """One message tracking event."""

    line: int
    t: float
    event_id: str
    source: str | None = None
    message_id: str | None = None
    internal_id: str | None = None
    network_id: str | None = None
    recipients: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    sender: str | None = None
    return_path: str | None = None
    subject: str | None = None
    client_ip: str | None = None
    client_host: str | None = None
    server_ip: str | None = None
    server_host: str | None = None
    connector: str | None = None
    source_context: str | None = None
    reference: tuple[str, ...] = ()
    related_recipient: str | None = None
    total_bytes: int | None = None
    #: "exchange2010", "exchange2013" (2013 and later), "powershell"
    #: (Get-MessageTrackingLog | Export-Csv), "extended-trace",
    #: "exchange2003"
    schema: str = "exchange2013"
    #: SEND, DEFER, FAIL, DSN, RECEIVE, DELIVER, or None (other events)
    canonical: str | None = None
    #: What the event id means, in words.
    meaning: str = ""

    def status_for(self, rcpt: str) -> str | None:
        """The recipient-status of one recipient (the only one when a single
        status covers all)."""
        if not self.statuses:
            return None
        low = [r.lower() for r in self.recipients]
        if rcpt.lower() in low and len(self.statuses) == len(self.recipients):
            return self.statuses[low.index(rcpt.lower())]
        return self.statuses[0] if len(self.statuses) == 1 else None

    def reply_for(self, rcpt: str) -> Reply | None:
        return find_reply(self.status_for(rcpt))


def split_statuses(value: str) -> list[str]:
    """'250 2.1.5 OK;550 5.1.1 RESOLVER.ADR.ExRecipNotFound; not found' ->
    two statuses (a ';' splits only where a new status starts, and never
    inside [...] or {...})."""
    out: list[str] = []
    depth: list[str] = []
    cur = ""
    for i, ch in enumerate(value):
        if ch in _BRACKETS:
            depth.append(_BRACKETS[ch])
        elif depth and ch == depth[-1]:
            depth.pop()
        if ch == ";" and not depth and _STATUS_START.match(value, i + 1):
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _split(value: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(";") if x.strip())


def norm(name: str) -> str:
    """A field name compared without case, '-', '_' or spaces."""
    return re.sub(r"[-_\s]", "", name).lower()


_NAMES = {
    "t": ("datetime", "timestamp", "datetimeutc", "date"),
    "event_id": ("eventid",),
    "source": ("source",),
    "message_id": ("messageid",),
    "internal_id": ("internalmessageid",),
    "network_id": ("networkmessageid",),
    "recipients": ("recipientaddress", "recipients"),
    "statuses": ("recipientstatus",),
    "sender": ("senderaddress", "sender"),
    "return_path": ("returnpath",),
    "subject": ("messagesubject",),
    "client_ip": ("clientip",),
    "client_host": ("clienthostname",),
    "server_ip": ("serverip",),
    "server_host": ("serverhostname",),
    "connector": ("connectorid",),
    "source_context": ("sourcecontext",),
    "reference": ("reference",),
    "related_recipient": ("relatedrecipientaddress",),
    "total_bytes": ("totalbytes",),
}


def _get(row: dict[str, str], key: str) -> str:
    for name in _NAMES[key]:
        if row.get(name):
            return row[name]
    return ""


def event_from_row(path: str, line: int, row: dict[str, str], schema: str,
                   options: ReadOptions, problems: list[Problem]) -> TrackingEvent | None:
    """A TrackingEvent from a row keyed by normalised field names, or None
    (with a problem) when the row has no time or no event id."""
    when = _get(row, "t")
    t = parse_time(when, options.tz)
    if t is None:
        problems.append(Problem(path, line, f"no time: {when!r} is not one" if when
                                else "no time in this row"))
        return None
    event_id = _get(row, "event_id").strip().upper()
    if not event_id:
        problems.append(Problem(path, line, "no event id in this row"))
        return None
    recipients = _get(row, "recipients")
    statuses = _get(row, "statuses")
    for name, value in (("Recipients", recipients), ("RecipientStatus", statuses),
                        ("Reference", _get(row, "reference"))):
        if value.strip() == "System.String[]":
            problems.append(Problem(path, line, f"{name} was exported as 'System.String[]': "
                                    f"select it as @{{n='{name}';e={{$_.{name} -join ';'}}}} "
                                    "(docs/exchange-lab.md)"))
    size = _get(row, "total_bytes").strip()
    return TrackingEvent(
        line=line, t=t, event_id=event_id, source=_get(row, "source").strip().upper() or None,
        message_id=_get(row, "message_id").strip() or None,
        internal_id=_get(row, "internal_id").strip() or None,
        network_id=_get(row, "network_id").strip() or None,
        recipients=() if recipients.strip() == "System.String[]" else _split(recipients),
        statuses=() if statuses.strip() == "System.String[]" else tuple(
            split_statuses(statuses)),
        sender=_get(row, "sender").strip() or None,
        return_path=_get(row, "return_path").strip() or None,
        subject=_get(row, "subject") or None,
        client_ip=_get(row, "client_ip") or None, client_host=_get(row, "client_host") or None,
        server_ip=_get(row, "server_ip") or None, server_host=_get(row, "server_host") or None,
        connector=_get(row, "connector") or None,
        source_context=_get(row, "source_context") or None,
        reference=() if _get(row, "reference").strip() == "System.String[]" else _split(
            _get(row, "reference")),
        related_recipient=_get(row, "related_recipient") or None,
        total_bytes=int(size) if size.isdigit() else None, schema=schema,
        canonical=event_id if event_id in _CANONICAL else None,
        meaning=EVENTS.get(event_id, "an event this reader does not know (kept as written)"))


# -------------------------------------------------------------- MSGTRK*.LOG

def sniff_log(head: str) -> bool:
    low = head.lower()
    return "#log-type: message tracking log" in low or (
        "#fields:" in low and "event-id" in low and "internal-message-id" in low)


def read_tracking_log(path: str, text: str, options: ReadOptions | None = None
                      ) -> EvidenceFile:
    opts = options or ReadOptions()
    src = HashHeaderCsv(path)
    problems: list[Problem] = []
    records: list[TrackingEvent] = []
    for n, idx, cells in src.rows(text):
        row = {norm(k): cells[i] for k, i in idx.items() if i < len(cells)}
        if "eventid" not in row:
            problems.append(Problem(path, n, "the #Fields: line has no event-id: "
                                    "not a message tracking log"))
            continue
        schema = "exchange2013" if "networkmessageid" in row else "exchange2010"
        ev = event_from_row(path, n, row, schema, opts, problems)
        if ev is not None:
            records.append(ev)
    version = src.header.get("version", "")
    if not records and not problems and not src.problems:
        problems.append(Problem(path, 0, "no message tracking rows"))
    return EvidenceFile(path=path, kind="exchange-tracking",
                        title=f"Exchange message tracking log (version {version or '?'})",
                        records=tuple(records), problems=tuple(src.problems + problems),
                        header=dict(src.header))


# ------------------------------------------- Get-MessageTrackingLog | Export-Csv

def csv_header(text: str) -> tuple[int, list[str]] | None:
    """(line number, names) of the first row of an Export-Csv file, after an
    optional '#TYPE ...' line."""
    for n, raw in enumerate(text.splitlines()[:3], 1):
        if raw.startswith("#TYPE") or not raw.strip():
            continue
        try:
            return n, next(csv.reader([raw]))
        except (csv.Error, StopIteration):
            return None
    return None


def sniff_csv(head: str) -> bool:
    got = csv_header(head)
    if got is None:
        return False
    names = {norm(x) for x in got[1]}
    return "eventid" in names and ("timestamp" in names) and not head.startswith("#Fields")


def csv_dicts(path: str, text: str, problems: list[Problem]
              ) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of an Export-Csv file as {normalised name: cell} with their line."""
    lines = text.splitlines(keepends=True)
    start = 0
    while start < len(lines) and (lines[start].startswith("#TYPE") or not lines[start].strip()):
        start += 1
    reader = csv.reader(lines[start:])
    try:
        header = [norm(x) for x in next(reader)]
    except StopIteration:
        return
    except csv.Error as e:
        problems.append(Problem(path, start + 1, f"the header row is not CSV: {e}"))
        return
    while True:
        this = start + reader.line_num + 1  # where the next row starts
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            problems.append(Problem(path, this, f"not a CSV row: {e}"))
            continue
        if not any(c.strip() for c in row):
            continue
        if len(row) > len(header):
            problems.append(Problem(path, this, f"{len(row)} cells, the header names "
                                    f"{len(header)}"))
            continue
        yield this, {h: (row[i] if i < len(row) else "") for i, h in enumerate(header)}


def read_tracking_csv(path: str, text: str, options: ReadOptions | None = None
                      ) -> EvidenceFile:
    opts = options or ReadOptions()
    problems: list[Problem] = []
    records = []
    for n, row in csv_dicts(path, text, problems):
        ev = event_from_row(path, n, row, "powershell", opts, problems)
        if ev is not None:
            records.append(ev)
    if not records and not problems:
        problems.append(Problem(path, 0, "no rows after the header"))
    return EvidenceFile(path=path, kind="exchange-tracking-csv",
                        title="Get-MessageTrackingLog output (Export-Csv)",
                        records=tuple(records), problems=tuple(problems))
