"""`harness predict`: when will this message be retried, and when will it bounce?

Prints the schedule a sending MTA follows after a first transient failure:
every attempt (wall-clock time, time since the first, time since the one
before), when the sender gets a delay notice, when the message expires and
the NDR goes out, and what the prediction assumes. The models live in
:mod:`harness.analysis.retry`; this module parses options and renders.

    harness predict --mta exchange
    harness predict --mta exchange --failure connection --set MessageExpirationTimeout=00:30:00
    harness predict --mta postfix --set delay_warning_time=4h --first-failure 2025-01-06T09:00Z
    harness predict --mta exim --set 'retry=F,1h,5m' --json
    harness predict --mta exchange-online --rate 100/min --greylist 5m

Wiring (cli.py): ``add_arguments(subparser)`` adds the options;
``predict_command(args, console)`` runs the command and returns the exit
status. Bad input raises :class:`PredictError` (a HarnessError), which the
CLI prints as one line.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.analysis import queue_series, retry
from harness.errors import HarnessError

__all__ = ["PredictError", "add_arguments", "build_report", "predict_command"]

#: Runs of equal intervals longer than this are shown shortened (unless --all).
COLLAPSE_RUN = 5
#: Schedules with at most this many attempts are always shown in full.
SHOW_ALL_UP_TO = 12

_FAILURE_TEXT = {
    "message": "after a 4xx reply to the message (greylisting at RCPT, 451 after the dot, ...)",
    "connection": "after a failed connection (refused, dropped, timed out, 421 at the banner)",
}
_MTA_TEXT = {
    "exchange": "Exchange Server",
    "exchange-online": "Exchange Online (estimated from the on-premises model)",
    "postfix": "Postfix",
    "exim": "Exim",
}
# the settings worth showing in the text output, per model and failure kind
_SHOWN = {
    ("exchange", "message"): ("MessageRetryInterval", "DelayNotificationTimeout",
                              "MessageExpirationTimeout"),
    ("exchange", "connection"): ("QueueGlitchRetryCount", "QueueGlitchRetryInterval",
                                 "TransientFailureRetryCount", "TransientFailureRetryInterval",
                                 "OutboundConnectionFailureRetryInterval",
                                 "DelayNotificationTimeout", "MessageExpirationTimeout"),
}


class PredictError(HarnessError):
    """Bad options for `harness predict` (a setting, a value, a time)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `harness predict`'s options to an (sub)parser."""
    parser.add_argument(
        "--mta", choices=retry.MTAS, default="exchange",
        help="the sending MTA to model (default exchange)")
    parser.add_argument(
        "--set", dest="set_values", action="append", default=[], metavar="NAME=VALUE",
        help="an MTA setting, repeatable: Exchange parameter names (MessageRetryInterval="
             "00:05:00, TransientFailureRetryCount=3, MessageExpirationTimeout=2.00:00:00, "
             "Role=Edge, ...), Postfix main.cf names (minimal_backoff_time=60s, ...), Exim "
             "options (retry='F,2h,15m; G,16h,1h,1.5; F,4d,6h', delay_warning=4h, "
             "queue_interval=30m); durations like 5m, 2d or 00:15:00")
    parser.add_argument(
        "--failure", choices=retry.FAILURES, default="message",
        help="message: a 4xx reply inside a working session (default); connection: refused, "
             "dropped, timed out or 421 at the banner (Exchange retries these differently)")
    parser.add_argument(
        "--first-failure", default="now", metavar="TIME",
        help="when the first attempt failed: an ISO 8601 time (2025-01-06T09:00:00+01:00; "
             "without an offset, local time) or 'now' (default)")
    parser.add_argument("--all", dest="all_attempts", action="store_true",
                        help="list every attempt (long runs of equal intervals are shortened "
                             "otherwise)")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    parser.add_argument(
        "--rate", metavar="RATE",
        help="messages a time toward the remote (100/min, 5/s, 2000/h): show the queue "
             "depth and the oldest message's age this builds up, for a dead remote and for "
             "greylisting, and an alert level that tells them apart")
    parser.add_argument(
        "--greylist", default="5m", metavar="DURATION",
        help="with --rate: how long the greylisting remote refuses a new sender (default "
             "5m); its first retry at or after this is accepted")


def predict_command(args: argparse.Namespace | Mapping[str, Any] | None = None,
                    console: Console | None = None, **options: Any) -> int:
    """Run `harness predict`. ``args`` is the parsed Namespace (or a mapping of
    the same names); keyword ``options`` override it: ``mta``, ``set_values``
    (or ``set``: "NAME=VALUE" strings; or ``settings``: a name -> value
    mapping), ``failure``, ``first_failure`` (text or a datetime), ``json``,
    ``all_attempts`` (or ``all``). Returns 0; raises PredictError."""
    opts = _options(args, options)
    out = console or Console(highlight=False, soft_wrap=True)
    mta = str(opts["mta"])
    failure = str(opts["failure"])
    start = _first_failure(opts["first_failure"])
    try:
        settings = retry.settings_for(mta, opts["settings"])
        schedule = retry.predict(mta, settings, failure)
    except ValueError as e:
        raise PredictError(str(e)) from None
    report = build_report(mta, failure, settings, schedule, start)
    if opts["rate"] is not None:
        report["queue"] = queue_report(schedule, str(opts["rate"]), str(opts["greylist"]))
        if opts["json"]:
            out.out(json.dumps(report, indent=2), highlight=False)
            return 0
        _render_queue(report, out)
        return 0
    if opts["json"]:
        out.out(json.dumps(report, indent=2), highlight=False)
        return 0
    _render(report, schedule, out, all_attempts=bool(opts["all_attempts"]))
    return 0


def build_report(mta: str, failure: str, settings: retry.Settings, schedule: retry.Schedule,
                 start: datetime) -> dict[str, Any]:
    """The prediction as JSON-ready data (what --json prints)."""

    def when(offset: float | None) -> str | None:
        if offset is None:
            return None
        return (start + timedelta(seconds=offset)).isoformat(timespec="seconds")

    attempts = []
    for i, at in enumerate(schedule.attempts):
        attempts.append({
            "n": i + 1,
            "at": at,
            "since_previous": None if i == 0 else at - schedule.attempts[i - 1],
            "time": when(at),
        })
    return {
        "mta": mta,
        "failure": failure,
        "first_failure": when(0.0),
        "settings": settings.as_config(),
        "overridden": list(settings.overridden),
        "attempts": attempts,
        "delay_notice_at": schedule.delay_notice_at,
        "delay_notice_time": when(schedule.delay_notice_at),
        "expires_at": schedule.expires_at,
        "expires_time": when(schedule.expires_at),
        "notes": list(schedule.notes),
    }


# ------------------------------------------------------------------ options


def _options(args: argparse.Namespace | Mapping[str, Any] | None,
             options: Mapping[str, Any]) -> dict[str, Any]:
    given: dict[str, Any] = {}
    if isinstance(args, argparse.Namespace):
        given.update(vars(args))
    elif args is not None:
        given.update(args)
    given.update(options)
    if "set" in given and "set_values" not in options:
        given["set_values"] = given.pop("set")
    if "all" in given and "all_attempts" not in options:
        given["all_attempts"] = given.pop("all")
    set_values = given.get("set_values") or []
    if isinstance(set_values, str):
        set_values = [set_values]
    settings: dict[str, str] = {}
    for item in set_values:
        name, eq, value = str(item).partition("=")
        if not eq or not name.strip():
            raise PredictError(f"--set {item!r}: expected NAME=VALUE, e.g. "
                               "MessageRetryInterval=00:05:00")
        settings[name.strip()] = value.strip()
    extra = given.get("settings")
    if isinstance(extra, Mapping):
        settings.update({str(k): str(v) for k, v in extra.items()})
    mta = str(given.get("mta") or "exchange").lower()
    if mta not in retry.MTAS:
        raise PredictError(f"--mta {mta!r}: use one of {', '.join(retry.MTAS)}")
    failure = str(given.get("failure") or "message").lower()
    if failure not in retry.FAILURES:
        raise PredictError(f"--failure {failure!r}: use message or connection")
    return {
        "mta": mta,
        "failure": failure,
        "settings": settings,
        "first_failure": given.get("first_failure", "now"),
        "json": bool(given.get("json", False)),
        "all_attempts": bool(given.get("all_attempts", False)),
        "rate": given.get("rate"),
        "greylist": given.get("greylist") or "5m",
    }


def _first_failure(value: object) -> datetime:
    """An aware datetime from 'now', an ISO 8601 text, or a datetime (naive = local)."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.astimezone()
    text = str(value or "now").strip()
    if text.lower() == "now":
        return datetime.now().astimezone().replace(microsecond=0)
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise PredictError(f"--first-failure {text!r}: expected an ISO 8601 time such as "
                           "2025-01-06T09:00:00+01:00, or now") from None
    return t if t.tzinfo else t.astimezone()


# ---------------------------------------------------------------- rendering


def _render(report: Mapping[str, Any], schedule: retry.Schedule, out: Console, *,
            all_attempts: bool) -> None:
    mta, failure = str(report["mta"]), str(report["failure"])
    start = datetime.fromisoformat(str(report["first_failure"]))
    out.print(f"[bold]{escape(_MTA_TEXT[mta])}[/], {escape(_FAILURE_TEXT[failure])}")
    out.print(f"first failure {_clock(start)} ({_offset(start)})")
    settings: Mapping[str, str] = report["settings"]
    shown = _SHOWN.get(("exchange" if mta.startswith("exchange") else mta, failure),
                       tuple(settings))
    names = [n for n in shown if n in settings]
    names += [n for n in report["overridden"] if n not in names]
    out.print("settings: " + ", ".join(
        f"{escape(n)} {escape(settings[n])}" + ("[dim] (set)[/]" if n in report["overridden"]
                                                 else "")
        for n in names))
    out.print()

    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("n", justify="right")
    table.add_column("at")
    table.add_column("since first", justify="right")
    table.add_column("since previous", justify="right")
    attempts = schedule.attempts
    for kind, i, count in _rows(attempts, collapse=not all_attempts):
        if kind == "row":
            at = attempts[i]
            prev = "" if i == 0 else retry.format_duration(at - attempts[i - 1])
            table.add_row(str(i + 1), _clock(start + timedelta(seconds=at)),
                          "0s" if i == 0 else "+" + retry.format_duration(at), prev)
        else:
            gap = retry.format_duration(attempts[i] - attempts[i - 1])
            table.add_row("[dim]...[/]", f"[dim]{count} more, every {gap}[/]", "", "")
    out.print(table)
    out.print()

    notice = schedule.delay_notice_at
    if notice is None:
        out.print("delay notice  [dim]none[/]")
    else:
        out.print(f"delay notice  {_clock(start + timedelta(seconds=notice))}  "
                  f"(+{retry.format_duration(notice)})")
    expires = schedule.expires_at
    out.print(f"[bold]bounce (NDR)[/]  {_clock(start + timedelta(seconds=expires))}  "
              f"(+{retry.format_duration(expires)})")
    n = len(attempts)
    out.print(f"{n} attempt{'s' if n != 1 else ''}, the last at "
              f"+{retry.format_duration(attempts[-1])}")
    if schedule.notes:
        out.print()
        out.print("[bold]notes[/]")
        for note in schedule.notes:
            out.print(f"  - {escape(note)}")


def _rows(attempts: Sequence[float], *, collapse: bool) -> list[tuple[str, int, int]]:
    """("row", index, 0) for shown attempts and ("gap", index, count) for a
    shortened run of `count` attempts whose interval is that of `index`."""
    n = len(attempts)
    if not collapse or n <= SHOW_ALL_UP_TO:
        return [("row", i, 0) for i in range(n)]
    rows: list[tuple[str, int, int]] = [("row", 0, 0)]
    i = 1
    while i < n:
        gap = attempts[i] - attempts[i - 1]
        j = i
        while j + 1 < n and abs((attempts[j + 1] - attempts[j]) - gap) < 1e-6:
            j += 1
        length = j - i + 1  # rows i..j share the interval
        if length > COLLAPSE_RUN:
            rows += [("row", i, 0), ("row", i + 1, 0), ("gap", i + 2, length - 3),
                     ("row", j, 0)]
        else:
            rows += [("row", k, 0) for k in range(i, j + 1)]
        i = j + 1
    return rows


def _clock(t: datetime) -> str:
    return t.strftime("%a %Y-%m-%d %H:%M:%S")


def _offset(t: datetime) -> str:
    off = t.utcoffset() or timedelta(0)
    sign = "-" if off < timedelta(0) else "+"
    minutes = abs(int(off.total_seconds())) // 60
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


# ------------------------------------------------------------ queue build-up

#: Where the build-up is shown (seconds after the messages start to fail)
_QUEUE_TIMES = (0, 60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 12 * 3600,
                24 * 3600, 36 * 3600, 48 * 3600, 72 * 3600, 96 * 3600, 120 * 3600)


def queue_report(schedule: retry.Schedule, rate_text: str, greylist_text: str
                 ) -> dict[str, Any]:
    """The queue a steady flow builds up against a dead remote (nothing is
    accepted; each message stays until it expires) and against greylisting
    (each message is accepted at its first retry after the greylisting
    window), with the MTA's retry schedule; and an alert level on the oldest
    message's age that the second never reaches and the first does."""
    try:
        rate = queue_series.parse_rate(rate_text)
        window = retry.parse_duration(greylist_text)
    except ValueError as e:
        raise PredictError(str(e)) from None
    dead = queue_series.stay(schedule.attempts, schedule.expires_at, None)
    grey = queue_series.stay(schedule.attempts, schedule.expires_at, window)
    end = max(dead or 0.0, 3600.0)
    times = sorted({t for t in _QUEUE_TIMES if t <= end} | {end}
                   | ({grey} if grey is not None else set()))
    level = queue_series.threshold(grey, dead)

    def series(held: float | None) -> list[dict[str, float | int]]:
        return [{"t": x.t, "depth": x.depth, "oldest_age": x.oldest_age,
                 "deferred": x.deferred} for x in queue_series.build_up(rate, held, times)]

    return {
        "rate_per_minute": rate * 60,
        "greylist_window": window,
        "scenarios": [
            {"name": "dead remote", "held": dead, "samples": series(dead)},
            {"name": "greylisting", "held": grey, "samples": series(grey)},
        ],
        "alert_oldest_age": level,
        "alert_depth": None if level is None else math.ceil(rate * level),
    }


def _render_queue(report: Mapping[str, Any], out: Console) -> None:
    mta = str(report["mta"])
    q: Mapping[str, Any] = report["queue"]
    dead, grey = q["scenarios"]
    rate = q["rate_per_minute"]
    out.print(f"[bold]{escape(_MTA_TEXT[mta])}[/]: queue build-up at {rate:g} messages a "
              f"minute, every one deferred at its first attempt")
    span = retry.format_duration
    out.print(f"dead remote: nothing is accepted; each message stays until it expires "
              f"({span(dead['held']) if dead['held'] is not None else 'never'})")
    out.print(f"greylisting ({span(q['greylist_window'])}): each message is accepted at its "
              f"first retry after that, "
              f"{span(grey['held']) if grey['held'] is not None else 'never'} after it came")
    out.print()
    table = Table(box=None, pad_edge=False, show_edge=False)
    table.add_column("after", justify="right")
    table.add_column("dead remote: depth", justify="right")
    table.add_column("oldest", justify="right")
    table.add_column("greylisting: depth", justify="right")
    table.add_column("oldest", justify="right")
    for d, g in zip(dead["samples"], grey["samples"], strict=True):
        # ages to the whole second above: arrivals are 1/rate apart, so the
        # oldest is a fraction of a second younger than the hold time
        table.add_row(span(d["t"]) if d["t"] else "0s", f"{d['depth']:,}",
                      span(math.ceil(d["oldest_age"])) if d["oldest_age"] else "0s",
                      f"{g['depth']:,}",
                      span(math.ceil(g["oldest_age"])) if g["oldest_age"] else "0s")
    out.print(table)
    out.print()
    level = q["alert_oldest_age"]
    if level is None:
        out.print("[yellow]the oldest message's age does not tell a dead remote from "
                  "greylisting here[/]")
    else:
        out.print(f"[bold]alert[/] when the oldest queued message is older than "
                  f"{span(level)} (or the queue deeper than {q['alert_depth']:,}): greylisting "
                  f"peaks at {span(grey['held'])}; a dead remote's oldest message reaches it "
                  f"{span(level)} after the remote stops accepting")
    out.print("[dim]every queued message waits for a retry (deferred = depth); the retry "
              "times are the model's (see harness predict without --rate)[/]")
