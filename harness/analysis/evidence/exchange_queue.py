"""Exchange queues: Get-Queue and Get-Message output, exported with
Export-Csv (with or without PowerShell 5.1's '#TYPE' line) or ConvertTo-Json
(one object or an array).

Read by property name (Identity, Status, LastError, NextHopDomain,
DeliveryType, MessageCount, RetryCount, LastRetryTime, NextRetryTime,
InternetMessageId, FromAddress, Subject, DateReceived, Recipients, ...),
whatever the order; properties this reader does not use are kept in
`extra`, by their name without case, '-' or '_' ("firstretrytime").
LastError quotes the remote reply in one of two shapes, both read:
'451 4.4.0 Primary target IP address responded with: "451 4.7.1 ...".
Attempted failover ...' and '[{LRT=...};{LED=451 4.7.1 ...};{FQDN=...};
{IP=...}]'. Times: ISO 8601 (PowerShell 7, or .ToString('o')), Windows
PowerShell's JSON "/Date(ms)/", or en-US "12/3/2026 7:48:43 AM" in
`ReadOptions.tz`. A Status that JSON wrote as a number is kept as
"status N": its names are not documented as numbers.

May know: the text handed in. May not know: files, sockets, storage."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from harness.analysis.evidence.base import (
    EvidenceFile,
    Problem,
    ReadOptions,
    Reply,
    find_reply,
    parse_time,
)
from harness.analysis.evidence.exchange_tracking import csv_dicts, norm

__all__ = ["QueueRow", "QueuedMessage", "QueuedRecipient", "read_queue_csv",
           "read_queue_json", "sniff_csv", "sniff_json"]

_QUEUE_KEYS = {"nexthopdomain", "deliverytype", "messagecount"}
_MESSAGE_KEYS = {"internetmessageid", "fromaddress"}


@dataclass(frozen=True, kw_only=True)
class QueueRow:
    """A queue, as Get-Queue shows it."""

    line: int
    identity: str | None
    status: str | None
    delivery_type: str | None
    next_hop: str | None
    message_count: int | None
    last_error: str | None
    last_reply: Reply | None
    retry_count: int | None
    last_retry: float | None
    next_retry: float | None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class QueuedRecipient:
    address: str
    status: str | None = None
    last_error: str | None = None
    last_reply: Reply | None = None


@dataclass(frozen=True, kw_only=True)
class QueuedMessage:
    """A message in a queue, as Get-Message shows it."""

    line: int
    identity: str | None
    message_id: str | None
    sender: str | None
    subject: str | None
    status: str | None
    last_error: str | None
    last_reply: Reply | None
    retry_count: int | None
    received: float | None
    expiration: float | None
    queue: str | None
    recipients: tuple[QueuedRecipient, ...] = ()
    extra: dict[str, str] = field(default_factory=dict)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _int(value: Any) -> int | None:
    s = _text(value).strip()
    return int(s) if s.isdigit() else None


def _status(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"status {value}"
    if isinstance(value, dict):  # ConvertTo-Json -Depth 3+ of an enum wrapper
        value = value.get("Value", value.get("value"))
    return _text(value).strip() or None


def _time(path: str, line: int, key: str, value: Any, options: ReadOptions,
          problems: list[Problem]) -> float | None:
    if isinstance(value, dict):  # a DateTime with its notes (ConvertTo-Json -Depth 2+)
        value = value.get("value", value.get("DateTime"))
    s = _text(value).strip()
    if not s:
        return None
    t = parse_time(s, options.tz)
    if t is None:
        problems.append(Problem(path, line, f"{key} {s!r} is not a time this reads "
                                "(export times with .ToUniversalTime().ToString('o'))"))
    return t


def _recipients(value: Any) -> tuple[QueuedRecipient, ...]:
    """Get-Message -IncludeRecipientInfo's Recipients: objects with Address,
    Status, LastError; or plain addresses; or a ';' joined string."""
    items: list[Any]
    if isinstance(value, list):
        items = value
    elif isinstance(value, dict):
        items = [value]
    elif isinstance(value, str) and value.strip() and value.strip() != "System.Object[]":
        items = [x for x in value.replace(",", ";").split(";") if x.strip()]
    else:
        items = []
    out = []
    for item in items:
        if isinstance(item, dict):
            low = {norm(k): v for k, v in item.items()}
            err = _text(low.get("lasterror")).strip() or None
            out.append(QueuedRecipient(address=_text(low.get("address")).strip(),
                                       status=_status(low.get("status")), last_error=err,
                                       last_reply=find_reply(err)))
        else:
            out.append(QueuedRecipient(address=_text(item).strip()))
    return tuple(r for r in out if r.address)


def _record(path: str, line: int, raw: dict[str, Any], options: ReadOptions,
            problems: list[Problem]) -> QueueRow | QueuedMessage | None:
    row = {norm(k): v for k, v in raw.items()}
    last_error = _text(row.get("lasterror")).strip() or None
    used = {"identity", "status", "lasterror", "retrycount", "lastretrytime", "nextretrytime"}
    if _QUEUE_KEYS & set(row) and not _MESSAGE_KEYS & set(row):
        used |= {"deliverytype", "nexthopdomain", "messagecount"}
        return QueueRow(
            line=line, identity=_text(row.get("identity")) or None,
            status=_status(row.get("status")),
            delivery_type=_text(row.get("deliverytype")) or None,
            next_hop=_text(row.get("nexthopdomain")) or None,
            message_count=_int(row.get("messagecount")), last_error=last_error,
            last_reply=find_reply(last_error), retry_count=_int(row.get("retrycount")),
            last_retry=_time(path, line, "LastRetryTime", row.get("lastretrytime"), options,
                             problems),
            next_retry=_time(path, line, "NextRetryTime", row.get("nextretrytime"), options,
                             problems),
            extra={norm(k): _text(v) for k, v in raw.items() if norm(k) not in used})
    if _MESSAGE_KEYS & set(row):
        used |= {"internetmessageid", "fromaddress", "subject", "datereceived",
                 "expirationtime", "queue", "recipients"}
        return QueuedMessage(
            line=line, identity=_text(row.get("identity")) or None,
            message_id=_text(row.get("internetmessageid")).strip() or None,
            sender=_text(row.get("fromaddress")).strip() or None,
            subject=_text(row.get("subject")) or None, status=_status(row.get("status")),
            last_error=last_error, last_reply=find_reply(last_error),
            retry_count=_int(row.get("retrycount")),
            received=_time(path, line, "DateReceived", row.get("datereceived"), options,
                           problems),
            expiration=_time(path, line, "ExpirationTime", row.get("expirationtime"),
                             options, problems),
            queue=_text(row.get("queue")) or None, recipients=_recipients(row.get("recipients")),
            extra={norm(k): _text(v) for k, v in raw.items() if norm(k) not in used})
    problems.append(Problem(path, line, "neither a queue (NextHopDomain, DeliveryType) nor a "
                            "queued message (InternetMessageId, FromAddress)"))
    return None


# --------------------------------------------------------------------- CSV

def _names(head: str) -> set[str]:
    from harness.analysis.evidence.exchange_tracking import csv_header

    got = csv_header(head)
    return {norm(x) for x in got[1]} if got else set()


def sniff_csv(head: str) -> bool:
    names = _names(head)
    return bool(names) and (names >= _QUEUE_KEYS or names >= _MESSAGE_KEYS)


def read_queue_csv(path: str, text: str, options: ReadOptions | None = None) -> EvidenceFile:
    opts = options or ReadOptions()
    problems: list[Problem] = []
    records = [r for n, row in csv_dicts(path, text, problems)
               if (r := _record(path, n, row, opts, problems)) is not None]
    return _file(path, "csv", records, problems)


# -------------------------------------------------------------------- JSON

def sniff_json(head: str) -> bool:
    s = head.lstrip()
    if not s.startswith(("{", "[")):
        return False
    low = norm(s[:4000])
    return ('"nexthopdomain"' in low or '"internetmessageid"' in low) and (
        '"deliverytype"' in low or '"fromaddress"' in low or '"lasterror"' in low)


def _objects(text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) of each top-level object of a JSON array (or the one
    object), so problems can name a line."""
    dec = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if text.startswith("[", i):
        i += 1
        while True:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text) or text[i] == "]":
                return
            value, end = dec.raw_decode(text, i)
            yield text.count("\n", 0, i) + 1, value
            i = end
    else:
        value, _ = dec.raw_decode(text, i)
        yield text.count("\n", 0, i) + 1, value


def read_queue_json(path: str, text: str, options: ReadOptions | None = None
                    ) -> EvidenceFile:
    opts = options or ReadOptions()
    problems: list[Problem] = []
    records: list[QueueRow | QueuedMessage] = []
    try:
        for line, value in _objects(text):
            if not isinstance(value, dict):
                problems.append(Problem(path, line, "not an object: ConvertTo-Json of "
                                        "Get-Queue or Get-Message writes objects"))
                continue
            rec = _record(path, line, value, opts, problems)
            if rec is not None:
                records.append(rec)
    except json.JSONDecodeError as e:
        problems.append(Problem(path, e.lineno, f"not JSON: {e.msg} (column {e.colno})"))
    return _file(path, "json", records, problems)


def _file(path: str, how: str, records: list[QueueRow | QueuedMessage],
          problems: list[Problem]) -> EvidenceFile:
    queues = sum(isinstance(r, QueueRow) for r in records)
    what = ("Get-Queue" if queues == len(records) else "Get-Message" if not queues
            else "Get-Queue and Get-Message")
    if not records and not problems:
        problems.append(Problem(path, 0, "no queues or messages in it"))
    exported = "Export-Csv" if how == "csv" else "ConvertTo-Json"
    return EvidenceFile(path=path, kind=f"exchange-queue-{how}", title=f"{what} ({exported})",
                        records=tuple(records), problems=tuple(problems))
