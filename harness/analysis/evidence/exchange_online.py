"""Exchange Online message trace exports.

- Get-MessageTraceV2 | Export-Csv: one row per message and recipient
  (Received, SenderAddress, RecipientAddress, Subject, Status, ToIP,
  FromIP, Size, MessageId, MessageTraceId, ...).
- Get-MessageTraceDetailV2 | Export-Csv: the events of one message and
  recipient (Date, Event, Action, Detail, Data, MessageId, MessageTraceId,
  RecipientAddress, SenderAddress, ...); Detail quotes the remote reply of
  a Send, Defer or Fail event.
- The extended message trace report (a CSV the admin center lets you
  download; UTF-16 is common): the message tracking fields with '_'
  (date_time_utc, event_id, recipient_status, ...), read by
  exchange_tracking's row reader.

Fields by name from each file's header row. Times are UTC in these
exports; a time without a zone is taken as UTC unless `ReadOptions.tz`
says otherwise.

May know: the text handed in. May not know: files, sockets, storage."""

from __future__ import annotations

from dataclasses import dataclass

from harness.analysis.evidence.base import (
    EvidenceFile,
    Problem,
    ReadOptions,
    Reply,
    find_reply,
    parse_time,
)
from harness.analysis.evidence.exchange_tracking import (
    TrackingEvent,
    csv_dicts,
    csv_header,
    event_from_row,
    norm,
)

__all__ = ["TraceDetailRow", "TraceRow", "read_extended", "read_trace", "read_trace_detail",
           "sniff_detail", "sniff_extended", "sniff_trace"]

#: Detail events, lowered, to what the lining up calls them.
_DETAIL_EVENTS = (("defer", "DEFER"), ("fail", "FAIL"), ("ndr", "DSN"), ("dsn", "DSN"),
                  ("send", "SEND"), ("deliver", "DELIVER"), ("receive", "RECEIVE"))


@dataclass(frozen=True, kw_only=True)
class TraceRow:
    """A Get-MessageTraceV2 row: one message to one recipient."""

    line: int
    t: float  # Received
    message_id: str | None
    trace_id: str | None
    sender: str | None
    recipient: str | None
    subject: str | None
    status: str | None  # Delivered, Failed, Pending, Quarantined, FilteredAsSpam, ...
    to_ip: str | None
    from_ip: str | None
    size: int | None


@dataclass(frozen=True, kw_only=True)
class TraceDetailRow:
    """A Get-MessageTraceDetailV2 row: one event of a message to one recipient."""

    line: int
    t: float  # Date
    event: str
    action: str | None
    detail: str | None
    data: str | None
    message_id: str | None
    trace_id: str | None
    recipient: str | None
    sender: str | None
    canonical: str | None

    @property
    def reply(self) -> Reply | None:
        return find_reply(self.detail)


def _names(head: str) -> set[str]:
    got = csv_header(head)
    return {norm(x) for x in got[1]} if got else set()


def sniff_trace(head: str) -> bool:
    names = _names(head)
    return {"received", "recipientaddress", "status", "messagetraceid"} <= names


def sniff_detail(head: str) -> bool:
    names = _names(head)
    return {"date", "event", "detail"} <= names and (
        "messagetraceid" in names or "messageid" in names)


def sniff_extended(head: str) -> bool:
    names = _names(head)
    return "eventid" in names and ("datetimeutc" in names or "datetime" in names) and (
        "recipientstatus" in names)


def _time(path: str, n: int, name: str, value: str, options: ReadOptions,
          problems: list[Problem]) -> float | None:
    t = parse_time(value, options.tz)
    if t is None:
        problems.append(Problem(path, n, f"{name} {value!r} is not a time"))
    return t


def read_trace(path: str, text: str, options: ReadOptions | None = None) -> EvidenceFile:
    opts = options or ReadOptions()
    problems: list[Problem] = []
    records = []
    for n, row in csv_dicts(path, text, problems):
        t = _time(path, n, "Received", row.get("received", ""), opts, problems)
        if t is None:
            continue
        size = row.get("size", "").strip()
        records.append(TraceRow(
            line=n, t=t, message_id=row.get("messageid") or None,
            trace_id=row.get("messagetraceid") or None, sender=row.get("senderaddress") or None,
            recipient=row.get("recipientaddress") or None, subject=row.get("subject") or None,
            status=row.get("status") or None, to_ip=row.get("toip") or None,
            from_ip=row.get("fromip") or None, size=int(size) if size.isdigit() else None))
    return EvidenceFile(path=path, kind="exchange-online-trace",
                        title="Get-MessageTraceV2 output (Export-Csv)", records=tuple(records),
                        problems=tuple(problems))


def read_trace_detail(path: str, text: str, options: ReadOptions | None = None
                      ) -> EvidenceFile:
    opts = options or ReadOptions()
    problems: list[Problem] = []
    records = []
    for n, row in csv_dicts(path, text, problems):
        t = _time(path, n, "Date", row.get("date", ""), opts, problems)
        if t is None:
            continue
        event = row.get("event", "").strip()
        low = event.lower()
        canonical = next((c for word, c in _DETAIL_EVENTS if word in low), None)
        records.append(TraceDetailRow(
            line=n, t=t, event=event, action=row.get("action") or None,
            detail=row.get("detail") or None, data=row.get("data") or None,
            message_id=row.get("messageid") or None, trace_id=row.get("messagetraceid") or None,
            recipient=row.get("recipientaddress") or None,
            sender=row.get("senderaddress") or None, canonical=canonical))
    return EvidenceFile(path=path, kind="exchange-online-trace-detail",
                        title="Get-MessageTraceDetailV2 output (Export-Csv)",
                        records=tuple(records), problems=tuple(problems))


def read_extended(path: str, text: str, options: ReadOptions | None = None) -> EvidenceFile:
    opts = options or ReadOptions()
    problems: list[Problem] = []
    records: list[TrackingEvent] = []
    for n, row in csv_dicts(path, text, problems):
        ev = event_from_row(path, n, row, "extended-trace", opts, problems)
        if ev is not None:
            records.append(ev)
    return EvidenceFile(path=path, kind="exchange-online-extended",
                        title="Exchange Online extended message trace report",
                        records=tuple(records), problems=tuple(problems))
