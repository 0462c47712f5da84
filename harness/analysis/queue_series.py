"""Queues over time: how many messages a sending MTA holds, how old the
oldest is, and how many wait for a retry, sample by sample.

Three sources give the same `QueueSample` series:

* the lab samples its Postfix or Exim queue during a run (harness.lab
  passes each message's arrival time and whether it is deferred: `sample`);
* a series of Exchange `Get-Queue` exports, Export-Csv or ConvertTo-Json,
  one file per sample or one file with several (`read_get_queue`);
* a prediction: messages arriving at a steady rate toward a remote that
  never accepts (a dead remote) or accepts once a message has waited long
  enough (greylisting), with the sending MTA's retry schedule from
  harness.analysis.retry deciding when each leaves (`build_up`).

This is a minimal Get-Queue reader of our own: the evidence readers
(harness.analysis.evidence, another branch) read Get-Queue fully; this one
takes only what a depth-over-time series needs, by property name: Identity,
DeliveryType, Status, MessageCount, DeferredMessageCount, FirstRetryTime,
LastRetryTime, NextHopDomain, and a sample time (a SampledAt column the
collection command adds, else the file's time the caller passes).

May know: text handed in, numbers. May not know: files, clocks, sockets.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = ["QueueSample", "Readout", "build_up", "parse_rate", "read_get_queue", "sample",
           "stay", "summary", "threshold"]


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueSample:
    """The queue at time `t` (seconds: Unix time, or since a start)."""

    t: float
    depth: int
    oldest_age: float
    deferred: int


def sample(t: float, messages: Iterable[tuple[float, bool]]) -> QueueSample:
    """A sample from (arrival time, deferred?) of each queued message."""
    arrivals = [(a, d) for a, d in messages]
    oldest = max((t - a for a, _ in arrivals), default=0.0)
    return QueueSample(t=t, depth=len(arrivals), oldest_age=max(0.0, oldest),
                       deferred=sum(1 for _, d in arrivals if d))


def summary(samples: Sequence[QueueSample]) -> dict[str, float | int]:
    """Peaks of a series: depth, oldest age, deferred (0 for no samples)."""
    return {"samples": len(samples),
            "peak_depth": max((s.depth for s in samples), default=0),
            "peak_oldest_age": max((s.oldest_age for s in samples), default=0.0),
            "peak_deferred": max((s.deferred for s in samples), default=0)}


# ---------------------------------------------------------------- prediction

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hr|hour|d|day)s?\s*$",
                   re.I)
_PER = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
        "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}


def parse_rate(text: str) -> float:
    """'100/min' -> messages per second (also /s, /h, /day)."""
    m = _RATE.match(text)
    if not m:
        raise ValueError(f"rate {text!r}: write messages per time, such as 100/min, 5/s or "
                         "2000/h")
    value = float(m.group(1)) / _PER[m.group(2).lower()]
    if value <= 0:
        raise ValueError(f"rate {text!r}: must be above 0")
    return value


def stay(attempts: Sequence[float], expires_at: float | None,
         accepts_after: float | None) -> float | None:
    """How long one message stays queued, its first attempt failing at 0:
    until the first attempt at or after `accepts_after` (the remote takes it
    then), else until it expires and is returned (None: it never leaves)."""
    if accepts_after is not None:
        for t in attempts:
            if t >= accepts_after and (expires_at is None or t < expires_at):
                return float(t)
    return expires_at


def build_up(rate: float, held: float | None, times: Iterable[float]) -> list[QueueSample]:
    """The queue at each of `times` when messages arrive `rate` a second from
    t = 0 (at 0, 1/rate, 2/rate, ...), each fails its first attempt at once
    and stays `held` seconds (None: for ever). Every queued message waits for
    a retry. A message that leaves at t is gone at t."""
    eps = 1e-9
    out = []
    for t in times:
        if t < 0:
            raise ValueError("times start at 0")
        last = math.floor(t * rate + eps)  # the newest arrival so far
        # the oldest still queued: all since 0, or those that came after t - held
        first = 0 if held is None or t < held else math.floor((t - held) * rate + eps) + 1
        count = max(0, last - first + 1)
        out.append(QueueSample(t=t, depth=count,
                               oldest_age=(t - first / rate) if count else 0.0,
                               deferred=count))
    return out


def threshold(greylisting_stay: float | None, dead_stay: float | None,
              margin: float = 1.25) -> float | None:
    """An oldest-message-age alert level that greylisting never reaches and a
    dead remote does: a quarter above the greylisted message's stay, or None
    when the two cannot be told apart by age."""
    if greylisting_stay is None:
        return None
    level = greylisting_stay * margin
    if dead_stay is not None and dead_stay <= level:
        return None
    return level


# ---------------------------------------------------------- Get-Queue exports


@dataclass(frozen=True, slots=True)
class Readout:
    """What a Get-Queue export gave: samples, and the problems found
    (`path:line: problem`), the rest read all the same."""

    samples: tuple[QueueSample, ...]
    problems: tuple[str, ...]
    queues: int


_DATE_JSON = re.compile(r"^/Date\((-?\d+)\)/$")
_US_TIME = "%m/%d/%Y %I:%M:%S %p"
#: Queues that hold copies of messages already handed on, not waiting mail
_NOT_WAITING = {"shadowredundancy", "shadow"}


def _time(value: Any) -> float | None:
    """ISO 8601, Windows PowerShell's JSON /Date(ms)/, or en-US text (as UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip()
    m = _DATE_JSON.match(text)
    if m:
        return int(m.group(1)) / 1000.0
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        try:
            dt = datetime.strptime(text, _US_TIME)
        except ValueError:
            return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _int(value: Any) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _rows_csv(text: str) -> list[tuple[int, dict[str, str]]]:
    lines = text.splitlines()
    start = 1 if lines and lines[0].startswith("#TYPE") else 0
    reader = csv.reader(io.StringIO("\n".join(lines[start:])))
    header: list[str] | None = None
    out = []
    for n, row in enumerate(reader, start=start + 1):
        if not row or not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [h.strip().lower() for h in row]
            continue
        out.append((n, dict(zip(header, row, strict=False))))
    return out


def _rows_json(text: str) -> list[tuple[int, dict[str, Any]]]:
    data = json.loads(text)
    items = data if isinstance(data, list) else [data]
    return [(n, {str(k).lower(): v for k, v in item.items()}) if isinstance(item, dict)
            else (n, {}) for n, item in enumerate(items, start=1)]


def read_get_queue(text: str, *, path: str = "-",
                   file_time: float | None = None) -> Readout:
    """Samples from one Get-Queue export (Export-Csv, with or without the
    '#TYPE' line, or ConvertTo-Json). Rows with the same sample time (a
    SampledAt column, else `file_time`) make one sample: depth is the sum of
    MessageCount over the queues that hold waiting mail (shadow queues left
    out), deferred the messages in queues in Retry (DeferredMessageCount where
    given), oldest age the longest time a queue in Retry has been retrying
    (since FirstRetryTime: Get-Queue gives no message ages)."""
    problems: list[str] = []
    stripped = text.lstrip("\ufeff").strip()
    if not stripped:
        return Readout((), (f"{path}: empty file, no queue in it",), 0)
    rows: list[tuple[int, dict[str, Any]]]
    if stripped[0] in "[{":
        try:
            rows = _rows_json(stripped)
        except json.JSONDecodeError as e:
            return Readout((), (f"{path}:{e.lineno}:{e.colno}: not JSON: {e.msg}",), 0)
        where = "item"
    else:
        rows = _rows_csv(stripped)
        where = "line"
    by_time: dict[float, list[tuple[int, int, int, float | None]]] = {}
    queues = 0
    for n, row in rows:
        if "messagecount" not in row and "identity" not in row:
            problems.append(f"{path}:{n}: not a Get-Queue row (no Identity or MessageCount); "
                            f"skipped" if where == "line" else
                            f"{path}: {where} {n}: not a Get-Queue object; skipped")
            continue
        count = _int(row.get("messagecount"))
        if count is None:
            problems.append(f"{path}:{n}: MessageCount {row.get('messagecount')!r} is not a "
                            f"number; skipped")
            continue
        kind = str(row.get("deliverytype") or "").strip().lower()
        if kind in _NOT_WAITING:
            continue
        if "sampledat" in row:  # the file's own time only for a file without the column
            raw = row["sampledat"]
            t = _time(raw) if raw not in (None, "") else None
            if t is None:
                problems.append(f"{path}:{n}: SampledAt {raw!r} is not a time; skipped" if raw
                                else f"{path}:{n}: SampledAt is empty; skipped")
                continue
        else:
            t = file_time
            if t is None:
                problems.append(f"{path}:{n}: no sample time (add a SampledAt column, see "
                                f"docs/exchange-lab.md); skipped")
                continue
        status = str(row.get("status") or "").strip().lower()
        retrying = status == "retry"
        deferred = _int(row.get("deferredmessagecount"))
        if deferred is None:
            deferred = count if retrying else 0
        first = _time(row.get("firstretrytime")) if retrying else None
        by_time.setdefault(t, []).append((count, deferred, 1, first))
        queues += 1
    samples = []
    for t in sorted(by_time):
        rows_at = by_time[t]
        ages = [t - f for *_, f in rows_at if f is not None and f <= t]
        samples.append(QueueSample(t=t, depth=sum(r[0] for r in rows_at),
                                   oldest_age=max(ages, default=0.0),
                                   deferred=sum(r[1] for r in rows_at)))
    return Readout(tuple(samples), tuple(problems), queues)
