"""Exchange's SMTP protocol logs: the Send connector's (Exchange as the
client: what it said to the remote server and what came back) and the
Receive connector's.

The file starts with '#Software:', '#Version:', '#Log-type:', '#Date:' and
'#Fields: date-time,connector-id,session-id,sequence-number,local-endpoint,
remote-endpoint,event,data,context'; each further line is one CSV row. The
fields are taken from the '#Fields:' line, never from positions. Events:
'+' connect, '-' disconnect, '>' sent by the logging server, '<' received by
it, '*' information (for example "sending message with RecordId ... and
InternetMessageId <...>"). Times are UTC ("2026-12-03T07:48:43.123Z").

May know: the text handed in. May not know: files, sockets, storage."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from harness.analysis.evidence.base import (
    Endpoint,
    EvidenceFile,
    HashHeaderCsv,
    Problem,
    ReadOptions,
    Reply,
    cell,
    endpoint,
    parse_time,
)

__all__ = ["ProtocolLine", "ProtocolSession", "read_protocol_log", "sessions", "sniff"]

Event = Literal["+", "-", ">", "<", "*"]
_EVENTS = {"+", "-", ">", "<", "*"}
_MESSAGE_ID = re.compile(r"InternetMessageId\s+(<[^>]*>)", re.I)


@dataclass(frozen=True, kw_only=True)
class ProtocolLine:
    """One row of a protocol log."""

    line: int
    t: float
    direction: Literal["send", "receive"]  # whose log: a Send or a Receive connector
    connector: str
    session: str
    sequence: int | None
    local: Endpoint | None
    remote: Endpoint | None
    event: Event
    data: str
    context: str

    @property
    def reply(self) -> Reply | None:
        """The SMTP reply on this line, for lines the remote side sent (Send
        log '<') or this server sent (Receive log '>')."""
        mine = "<" if self.direction == "send" else ">"
        return Reply.parse(self.data) if self.event == mine else None

    @property
    def command(self) -> str | None:
        """The SMTP command on this line (the client's side)."""
        theirs = ">" if self.direction == "send" else "<"
        return self.data if self.event == theirs else None


@dataclass(frozen=True, kw_only=True)
class ProtocolSession:
    """The lines of one session-id, in sequence order."""

    session: str
    direction: Literal["send", "receive"]
    connector: str
    lines: tuple[ProtocolLine, ...]

    @property
    def local(self) -> Endpoint | None:
        return next((x.local for x in self.lines if x.local and x.local[1]), None)

    @property
    def remote(self) -> Endpoint | None:
        return next((x.remote for x in self.lines if x.remote), None)

    @property
    def start(self) -> float:
        return self.lines[0].t

    @property
    def message_ids(self) -> tuple[str, ...]:
        found: list[str] = []
        for x in self.lines:
            if x.event == "*":
                m = _MESSAGE_ID.search(x.data) or _MESSAGE_ID.search(x.context)
                if m and m.group(1) not in found:
                    found.append(m.group(1))
        return tuple(found)


def sniff(head: str) -> bool:
    low = head.lower()
    return "#log-type: smtp send protocol log" in low or \
        "#log-type: smtp receive protocol log" in low or (
            "#fields: date-time,connector-id,session-id,sequence-number" in low)


def read_protocol_log(path: str, text: str, options: ReadOptions | None = None
                      ) -> EvidenceFile:
    opts = options or ReadOptions()
    src = HashHeaderCsv(path)
    records: list[ProtocolLine] = []
    for n, idx, row in src.rows(text):
        log_type = src.header.get("log-type", "").lower()
        direction: Literal["send", "receive"] = "receive" if "receive" in log_type else "send"
        missing = [f for f in ("date-time", "session-id", "event") if f not in idx]
        if missing:
            src.problems.append(Problem(path, n, "the #Fields: line has no "
                                        + ", ".join(missing) + ": not a protocol log"))
            continue
        t = parse_time(cell(row, idx, "date-time"), opts.tz)
        if t is None:
            src.problems.append(Problem(path, n, f"date-time {cell(row, idx, 'date-time')!r} "
                                        "is not a time"))
            continue
        event = cell(row, idx, "event").strip()
        if event not in _EVENTS:
            src.problems.append(Problem(path, n, f"event {event!r} is none of + - > < *"))
            continue
        seq = cell(row, idx, "sequence-number").strip()
        records.append(ProtocolLine(
            line=n, t=t, direction=direction, connector=cell(row, idx, "connector-id"),
            session=cell(row, idx, "session-id"), sequence=int(seq) if seq.isdigit() else None,
            local=endpoint(cell(row, idx, "local-endpoint")),
            remote=endpoint(cell(row, idx, "remote-endpoint")),
            event=event,  # type: ignore[arg-type]
            data=cell(row, idx, "data"), context=cell(row, idx, "context")))
    log_type = src.header.get("log-type", "")
    if not records and not src.problems:
        src.problems.append(Problem(path, 0, "no protocol log rows"))
    return EvidenceFile(path=path, kind=_kind(log_type), title=log_type or
                        "Exchange SMTP protocol log", records=tuple(records),
                        problems=tuple(src.problems), resolution=0.001,
                        header=dict(src.header))


def _kind(log_type: str) -> str:
    return "exchange-receive-protocol" if "receive" in log_type.lower() else \
        "exchange-send-protocol"


def sessions(records: Sequence[object]) -> list[ProtocolSession]:
    """Protocol lines grouped by session-id (a session may continue in the
    next file: records from several files group together), in start order."""
    groups: dict[tuple[str, str], list[ProtocolLine]] = {}
    for r in records:
        if isinstance(r, ProtocolLine):
            groups.setdefault((r.direction, r.session), []).append(r)
    out = []
    for (direction, sid), lines in groups.items():
        lines.sort(key=lambda x: (x.t, x.sequence if x.sequence is not None else 0))
        out.append(ProtocolSession(session=sid, direction=direction,  # type: ignore[arg-type]
                                   connector=lines[0].connector, lines=tuple(lines)))
    out.sort(key=lambda s: s.start)
    return out
