"""Syslog and journal line shapes, shared by the Postfix reader.

Understood: the traditional syslog line ("Dec  3 07:48:43 host tag[pid]:
message", with or without a fraction of a second: journalctl's
short-precise and Postfix's own maillog_file write those), RFC 3339 times
("2026-12-03T07:48:43.123456+00:00 host tag[pid]: ..." from rsyslog's high
precision format and journalctl -o short-iso), and journalctl -o json
(one JSON object per line: __REALTIME_TIMESTAMP, SYSLOG_IDENTIFIER, _PID,
MESSAGE, _HOSTNAME).

May know: the text handed in. May not know: files, sockets, clocks."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime

from harness.analysis.evidence.base import ReadOptions, parse_time

__all__ = ["SyslogLine", "parse_syslog_line"]

_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}
_BSD = re.compile(r"^(?P<mon>[A-Za-z]{3})\s+(?P<day>\d{1,2})\s+(?P<h>\d{1,2}):(?P<m>\d{2}):"
                  r"(?P<s>\d{2})(?P<frac>\.\d+)?\s+(?P<host>\S+)\s+(?P<tag>[^\s\[:]+)"
                  r"(?:\[(?P<pid>\d+)\])?:\s?(?P<msg>.*)$")
_ISO = re.compile(r"^(?P<ts>\d{4}-\d{2}-\d{2}T\S+)\s+(?P<host>\S+)\s+(?P<tag>[^\s\[:]+)"
                  r"(?:\[(?P<pid>\d+)\])?:\s?(?P<msg>.*)$")


@dataclass(frozen=True, kw_only=True)
class SyslogLine:
    t: float
    host: str
    tag: str  # "postfix/smtp", "postfix-lab-1a2b/qmgr"
    pid: int | None
    message: str
    resolution: float  # 1.0 when the time had no fraction


def _year(month: int, day: int, options: ReadOptions) -> int | None:
    if options.year is not None:
        return options.year
    if options.now is None:
        return None
    now = datetime.fromtimestamp(options.now, options.tz)
    # a log line is from the past: a date after today is last year's
    # (December's log read in January)
    return now.year - 1 if (month, day) > (now.month, now.day + 1) else now.year


def parse_syslog_line(line: str, options: ReadOptions) -> SyslogLine | str | None:
    """The line's parts; None when it is not a syslog line; a string saying
    what is wrong when it looks like one but its time is impossible."""
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("MESSAGE"), str):
            return None
        us = str(obj.get("__REALTIME_TIMESTAMP", ""))
        if not us.isdigit():
            return "a journal entry without __REALTIME_TIMESTAMP"
        pid = str(obj.get("_PID", obj.get("SYSLOG_PID", "")))
        return SyslogLine(t=int(us) / 1e6, host=str(obj.get("_HOSTNAME", "")),
                          tag=str(obj.get("SYSLOG_IDENTIFIER", "")),
                          pid=int(pid) if pid.isdigit() else None, message=obj["MESSAGE"],
                          resolution=1e-6)
    m = _ISO.match(line)
    if m:
        t = parse_time(m["ts"], options.tz)
        if t is None:
            return f"time {m['ts']!r} is not one"
        fine = "." in m["ts"].split("T", 1)[1]
        return SyslogLine(t=t, host=m["host"], tag=m["tag"],
                          pid=int(m["pid"]) if m["pid"] else None, message=m["msg"],
                          resolution=1e-6 if fine else 1.0)
    m = _BSD.match(line)
    if m is None:
        return None
    month = _MONTHS.get(m["mon"].lower())
    if month is None:
        return None
    day, h, mi, s = int(m["day"]), int(m["h"]), int(m["m"]), int(m["s"])
    year = _year(month, day, options)
    if year is None:
        return "a syslog time has no year: give ReadOptions(year=...) or now"
    try:
        dt = datetime(year, month, day, h, mi, s, tzinfo=options.tz)
    except ValueError:
        return f"time {m['mon']} {m['day']} {m['h']}:{m['m']}:{m['s']} is not one"
    frac = float(m["frac"] or 0)
    return SyslogLine(t=dt.timestamp() + frac, host=m["host"], tag=m["tag"],
                      pid=int(m["pid"]) if m["pid"] else None, message=m["msg"],
                      resolution=10 ** -(len(m["frac"]) - 1) if m["frac"] else 1.0)
