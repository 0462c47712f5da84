"""Exim's main log.

A line: "2026-12-03 07:48:51.502 [21788] 1xZ1Yh-0005fP-1Z == user@lab.test
R=to_relay T=relay_smtp defer (-44) H=127.0.0.1 [127.0.0.1]:38651
I=[127.0.0.1]:58624 DT=0.000s: SMTP error from remote mail server after
RCPT TO:<user@lab.test>: 451 4.7.1 ...". The time may carry milliseconds
(log_selector +millisec) and a zone (log_timezone); the [pid] and the
message id are optional. Flags: '<=' arrival, '=>' delivery, '->' another
address of the same delivery, '>>' cutthrough delivery, '*>' suppressed
delivery, '**' failed (bounced), '==' deferred; also "Completed",
"frozen", retry-time lines and connection lines, kept as "other".

Fields by name: R= router, T= transport (on '<=' lines the subject), H=
the remote host as "name [ip]:port", I= the local interface and port, C=
the remote server's reply to the final DATA, id= the Message-ID (id*= when
Exim made it), R= on a '<= <>' line the message a bounce is about, QT= DT=
times. The error after the first ': ' outside quotes quotes the remote
reply.

May know: the text handed in. May not know: files, sockets, storage."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from harness.analysis.evidence.base import (
    Endpoint,
    EvidenceFile,
    Problem,
    ReadOptions,
    Reply,
    find_reply,
    parse_time,
)

__all__ = ["EximRecord", "read_exim", "sniff"]

_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d{3})?(?: [+-]\d{4})?)"
    r"(?: \[(?P<pid>\d+)\])?"
    r"(?: (?P<id>[0-9A-Za-z]{6}-[0-9A-Za-z]{6}-[0-9A-Za-z]{2}"
    r"|[0-9A-Za-z]{6}-[0-9A-Za-z]{11}-[0-9A-Za-z]{4}))?"
    r"(?: (?P<rest>.*))?$")
_FLAGS = {"<=": "arrival", "=>": "delivery", "->": "delivery", ">>": "delivery",
          "*>": "suppressed", "**": "failed", "==": "deferred"}
_FIELD = re.compile(r'(?:^|\s)(?P<k>[A-Za-z]{1,4}\*?)=(?P<v>"(?:[^"\\]|\\.)*"|<[^>]*>|\S*)')
_HOST = re.compile(r"(?:^|\s)H=(?P<name>\(?[^\s\[]*\)?)?\s?\[(?P<ip>[^\]]+)\](?::(?P<port>\d+))?")
_IFACE = re.compile(r"(?:^|\s)I=\[(?P<ip>[^\]]+)\](?::(?P<port>\d+))?")
_TRAILING_DT = re.compile(r"\s+DT=\S+\s*$")


@dataclass(frozen=True, kw_only=True)
class EximRecord:
    """One main log line."""

    line: int
    t: float
    pid: int | None
    msgid: str | None  # Exim's message id
    #: arrival, delivery, suppressed, failed, deferred, completed, other
    kind: str
    flag: str | None
    address: str | None
    text: str
    fields: dict[str, str] = field(default_factory=dict)
    host: Endpoint | None = None  # the remote server
    local: Endpoint | None = None  # I=: our end of that connection
    error: str | None = None
    reply: Reply | None = None
    message_id: str | None = None  # id= on an arrival line
    bounce_of: str | None = None  # R= on a '<= <>' line: the message it is about


def sniff(head: str) -> bool:
    hits = 0
    for line in head.splitlines()[:40]:
        m = _LINE.match(line)
        if m and m["rest"] is not None:
            hits += 1
            if m["id"] and (m["rest"][:2] in _FLAGS or m["rest"].startswith("Completed")):
                return True
    return hits >= 3 and any(" exim " in ln or "SMTP connection from" in ln
                             for ln in head.splitlines()[:40])


def _split_error(rest: str) -> tuple[str, str | None]:
    """The fields part and the error part (after the first ': ' outside
    quotes and angle brackets)."""
    quote = False
    angle = 0
    for i, ch in enumerate(rest):
        if ch == '"' and (i == 0 or rest[i - 1] != "\\"):
            quote = not quote
        elif not quote and ch == "<":
            angle += 1
        elif not quote and ch == ">" and angle:
            angle -= 1
        elif not quote and not angle and ch == ":" and rest[i + 1:i + 2] == " ":
            return rest[:i], rest[i + 2:]
    return rest, None


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
        return re.sub(r"\\(.)", r"\1", v[1:-1])
    return v


def read_exim(path: str, text: str, options: ReadOptions | None = None) -> EvidenceFile:
    opts = options or ReadOptions()
    records: list[EximRecord] = []
    problems: list[Problem] = []
    millis = True
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if line.startswith("--- ") and line.endswith(" ---"):
            continue  # a section marker (the lab appends the paniclog so)
        m = _LINE.match(line)
        if m is None:
            problems.append(Problem(path, n, "not an Exim main log line (no time at the start)"))
            continue
        t = parse_time(m["ts"], opts.tz)
        if t is None:
            problems.append(Problem(path, n, f"time {m['ts']!r} is not one"))
            continue
        millis = millis and "." in m["ts"]
        rest = m["rest"] or ""
        pid = int(m["pid"]) if m["pid"] else None
        flag = rest[:2] if rest[:3].rstrip() in _FLAGS and m["id"] else None
        if flag is None:
            kind = "completed" if m["id"] and rest.startswith("Completed") else "other"
            records.append(EximRecord(line=n, t=t, pid=pid, msgid=m["id"], kind=kind,
                                      flag=None, address=None, text=rest))
            continue
        body = rest[3:]
        address, _, after = body.partition(" ")
        fields_part, error = _split_error(after)
        if error is not None:
            error = _TRAILING_DT.sub("", error)
        fields = {f["k"]: _unquote(f["v"]) for f in _FIELD.finditer(fields_part)}
        hm = _HOST.search(fields_part)
        im = _IFACE.search(fields_part)
        reply = find_reply(error) if error else Reply.parse(fields.get("C"))
        message_id = fields.get("id", fields.get("id*"))
        records.append(EximRecord(
            line=n, t=t, pid=pid, msgid=m["id"], kind=_FLAGS[flag], flag=flag,
            address=address, text=rest, fields=fields,
            host=(hm["ip"], int(hm["port"]) if hm["port"] else None) if hm else None,
            local=(im["ip"], int(im["port"]) if im["port"] else None) if im else None,
            error=error, reply=reply,
            message_id=f"<{message_id}>" if message_id and not message_id.startswith("<")
            else message_id,
            bounce_of=fields.get("R") if flag == "<=" and address == "<>" else None))
    if not records and not problems:
        problems.append(Problem(path, 0, "no Exim lines in it"))
    return EvidenceFile(path=path, kind="exim", title="Exim main log", records=tuple(records),
                        problems=tuple(problems), resolution=0.001 if millis else 1.0)
