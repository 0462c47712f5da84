"""Retry models: when a sending MTA will try again, warn the sender, and give up.

Given an MTA's settings, :func:`predict` answers "after a first transient
failure at t = 0, when are the next attempts, when does the sender get a delay
notice, and when does the message bounce?" as a :class:`Schedule` of seconds
since that first attempt. :func:`compare` holds a prediction against attempt
times the harness actually saw and says, in one line, whether they agree.

Three families of MTA are modelled, each from its own documentation (and, for
Postfix and Exim, from reading their source); what each model assumes is said
in the schedule's ``notes``, because the numbers are only as good as those
assumptions.

* **Exchange Server** 2013/2016/2019/SE (the Transport service on a Mailbox
  server, or an Edge Transport server), and **Exchange Online** as an estimate.
* **Postfix** (qmgr's deferred queue, whole seconds).
* **Exim** 4 (retry rules, queue runners, ``delay_warning``).

Pure: no I/O, no clock, no event loop. Every function takes and returns plain
numbers; wall-clock times are the caller's business (``harness predict``).
Errors a user can cause raise ValueError with a message fit to print.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias

__all__ = [
    "DEBIAN_EXIM_RETRY",
    "FAILURES",
    "MTAS",
    "Comparison",
    "ExchangeSettings",
    "EximSettings",
    "Failure",
    "Mta",
    "PostfixSettings",
    "RetryRule",
    "Schedule",
    "Settings",
    "compare",
    "exchange_schedule",
    "exim_schedule",
    "format_duration",
    "format_timespan",
    "parse_duration",
    "parse_exim_rules",
    "parse_timespan",
    "postfix_schedule",
    "predict",
    "settings_for",
]

Mta: TypeAlias = Literal["exchange", "exchange-online", "postfix", "exim"]
Failure: TypeAlias = Literal["message", "connection"]
MTAS: tuple[Mta, ...] = ("exchange", "exchange-online", "postfix", "exim")
FAILURES: tuple[Failure, ...] = ("message", "connection")

#: The most attempts a schedule lists; the expiry is still computed past it.
MAX_LISTED = 10_000
#: The most steps a model simulates (a guard against absurd settings).
MAX_STEPS = 2_000_000

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Schedule:
    """A predicted retry schedule, in seconds since the first (failed) attempt.

    ``attempts[0]`` is that first attempt (0.0); every later entry is a
    retry, up to and including the last failed attempt before the bounce
    (Postfix and Exim bounce right after a failed attempt; Exchange expires
    a message on a timer, so its last attempt comes before ``expires_at``). ``delay_notice_at``
    is when the first delay notice (a DSN with Action: delayed) goes to the
    sender, or None when none is sent before the bounce. ``expires_at`` is
    when the MTA gives up and bounces the message (sends the NDR). ``notes``
    say what the prediction assumes."""

    attempts: list[float]
    delay_notice_at: float | None
    expires_at: float
    notes: list[str] = field(default_factory=list)

    @property
    def intervals(self) -> list[float]:
        """Seconds between consecutive attempts (one fewer than attempts)."""
        return [b - a for a, b in itertools.pairwise(self.attempts)]


@dataclass(frozen=True)
class Comparison:
    """How observed attempt times compare with a prediction.

    ``deltas[i]`` is observed minus predicted for attempt i (both measured
    from the first attempt), for the attempts both have. ``extra`` counts
    observed attempts the prediction does not have; ``missing`` counts
    predicted attempts not observed (only when the observation was declared
    complete)."""

    ok: bool
    deltas: list[float]
    extra: int
    missing: int
    verdict: str


# ------------------------------------------------------------ value syntax

_UNITS = {"s": 1.0, "m": MINUTE, "h": HOUR, "d": DAY, "w": 7 * DAY}
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
_COMPOUND = re.compile(r"^(?:\d+(?:\.\d+)?[smhdw])+$", re.IGNORECASE)
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])", re.IGNORECASE)
# .NET TimeSpan as Exchange shows and takes it: [d.]hh:mm[:ss[.fffffff]]
_TIMESPAN = re.compile(
    r"^(?:(?P<d>\d+)\.)?(?P<h>\d{1,2}):(?P<m>\d{1,2})(?::(?P<s>\d{1,2})(?:\.(?P<f>\d{1,7}))?)?$")


def parse_timespan(text: str) -> float:
    """Seconds from an Exchange (.NET) time span: ``d.hh:mm:ss``, ``hh:mm:ss``,
    ``hh:mm``, with optional fractional seconds (``00:00:30.5``).

    ``2.00:00:00`` is two days, ``00:15:00`` fifteen minutes, ``4:00:00``
    four hours. Hours must be below 24 and minutes and seconds below 60 (a
    day count carries anything longer), as .NET requires."""
    t = text.strip()
    m = _TIMESPAN.match(t)
    if not m:
        raise ValueError(f"expected a time span such as 00:15:00 or 2.00:00:00 "
                         f"(d.hh:mm:ss), got {text!r}")
    days = int(m.group("d") or 0)
    hours, minutes = int(m.group("h")), int(m.group("m"))
    seconds = int(m.group("s") or 0)
    fraction = float("0." + m.group("f")) if m.group("f") else 0.0
    if hours > 23 or minutes > 59 or seconds > 59:
        raise ValueError(f"time span {text!r}: hours must be 0-23 and minutes and seconds "
                         "0-59 (write days as d.hh:mm:ss, e.g. 1.12:00:00)")
    return days * DAY + hours * HOUR + minutes * MINUTE + seconds + fraction


def parse_duration(text: str | float, default_unit: str = "s") -> float:
    """Seconds from ``300s``, ``5m``, ``2h``, ``2d``, ``1w``, ``1h30m``, an
    Exchange time span (``00:05:00``, ``2.00:00:00``), or a bare number in
    ``default_unit`` (Postfix gives each parameter its own default unit)."""
    if isinstance(text, bool):
        raise ValueError(f"expected a duration such as 5m or 00:05:00, got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"a duration must be a finite, non-negative number, got {text!r}")
        return float(text) * _UNITS[default_unit]
    t = text.strip()
    if ":" in t:
        return parse_timespan(t)
    if _NUMBER.match(t):
        return float(t) * _UNITS[default_unit]
    if _COMPOUND.match(t):
        return sum(float(n) * _UNITS[u.lower()] for n, u in _PART.findall(t))
    raise ValueError(f"expected a duration such as 300s, 5m, 2h, 2d, 1h30m or 00:05:00, "
                     f"got {text!r}")


def format_duration(seconds: float) -> str:
    """``900`` -> ``15m``, ``5400`` -> ``1h30m``, ``172800`` -> ``2d``,
    ``1.5`` -> ``1.5s``: the largest units first, zero parts left out."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds != int(seconds) and seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    rest = round(seconds)
    if rest == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, rest = divmod(rest, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


def format_timespan(seconds: float) -> str:
    """Seconds as Exchange shows a time span: ``2.00:00:00``, ``00:15:00``."""
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    core = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}.{core}" if days else core


def _parse_bool(name: str, text: str) -> bool:
    t = text.strip().lower().lstrip("$")
    if t in ("true", "yes", "1", "on"):
        return True
    if t in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"{name}: expected $true or $false, got {text!r}")


def _parse_int(name: str, text: str, lo: int, hi: int) -> int:
    t = text.strip()
    if not re.fullmatch(r"\d+", t):
        raise ValueError(f"{name}: expected a whole number {lo}-{hi}, got {text!r}")
    n = int(t)
    if not lo <= n <= hi:
        raise ValueError(f"{name}: {n} is outside the valid range {lo}-{hi}")
    return n


# ================================================================ Exchange
#
# Sources (Microsoft Learn; the facts, in our words):
# - "Message retry, resubmit, and expiration intervals" (Exchange Server
#   2016/2019/SE, mail-flow/queues/message-intervals): when the Transport
#   service cannot connect to the next hop the queue goes to Retry; it first
#   makes QueueGlitchRetryCount (4) attempts QueueGlitchRetryInterval (1 min)
#   apart (EdgeTransport.exe.config keys), then TransientFailureRetryCount (6)
#   attempts TransientFailureRetryInterval apart (5 min on a Mailbox server,
#   10 min on Edge), and after that retries every
#   OutboundConnectionFailureRetryInterval (10 min Mailbox, 30 min Edge).
#   Individual messages in Retry status are retried every MessageRetryInterval:
#   15 minutes (00:15:00) on that page. That a 4xx to RCPT or after DATA, on a
#   connection that otherwise works, is such a per-message retry (the queue
#   itself stays Ready) is our reading; the Get-Message reference shows a
#   recipient's own Status (Complete, Ready, Retry) and LastError, the SMTP
#   reply after the last attempt. A lab verdict is what settles it. A delay DSN follows a delivery
#   failure once DelayNotificationTimeout (4 h) has passed; it should exceed
#   TransientFailureRetryCount x TransientFailureRetryInterval (30 min on a
#   Mailbox server). Set-TransportConfig -ExternalDelayDsnEnabled /
#   -InternalDelayDsnEnabled ($true) switch delay DSNs off per sender side.
#   A message still undelivered after MessageExpirationTimeout (2 days) is
#   returned to the sender in an NDR (550 4.4.7 QUEUE.Expired).
# - Set-TransportService reference (exchange-ps): the valid ranges used
#   below; TransientFailureRetryCount 0 hands the next attempt straight to
#   OutboundConnectionFailureRetryInterval. The current reference page gives
#   MessageRetryInterval's default as 5 minutes while the concept page above,
#   the Exchange 2013 reference and the TransportServer API give 15 minutes
#   (Exchange 2010's was 1 minute); Microsoft's CSS HealthChecker
#   (TransportRetryConfigCheck) recommends 5 minutes or less. We use 15 min
#   and say so; set MessageRetryInterval to what Get-TransportService shows.
# - Exchange Online: the tenant cannot change these settings and Microsoft
#   does not publish the service's retry schedule, so the same model with the
#   on-premises defaults is an estimate, to be checked in a lab. Its expiry
#   is published: Microsoft's current "Fix error code 4.4.7 in Exchange
#   Online" page and the queued messages report say a message that cannot be
#   delivered for 24 hours is returned with an NDR (older pages and the
#   X-MS-Exchange-Organization-ExpirationInterval header said two days; that
#   is history). So exchange-online expires at 24 h.


@dataclass(frozen=True)
class ExchangeSettings:
    """The settings that drive Exchange's retries, in seconds (counts as ints)."""

    transient_failure_retry_count: int = 6
    transient_failure_retry_interval: float = 5 * MINUTE
    message_retry_interval: float = 15 * MINUTE
    outbound_connection_failure_retry_interval: float = 10 * MINUTE
    queue_glitch_retry_count: int = 4
    queue_glitch_retry_interval: float = 1 * MINUTE
    message_expiration_timeout: float = 2 * DAY
    delay_notification_timeout: float = 4 * HOUR
    internal_delay_dsn_enabled: bool = True
    external_delay_dsn_enabled: bool = True
    role: Literal["mailbox", "edge"] = "mailbox"
    sender: Literal["internal", "external"] = "internal"
    overridden: tuple[str, ...] = ()

    def as_config(self) -> dict[str, str]:
        """Name -> value as Exchange shows them (Get-TransportService style)."""
        return {
            "MessageRetryInterval": format_timespan(self.message_retry_interval),
            "QueueGlitchRetryCount": str(self.queue_glitch_retry_count),
            "QueueGlitchRetryInterval": format_timespan(self.queue_glitch_retry_interval),
            "TransientFailureRetryCount": str(self.transient_failure_retry_count),
            "TransientFailureRetryInterval": format_timespan(self.transient_failure_retry_interval),
            "OutboundConnectionFailureRetryInterval":
                format_timespan(self.outbound_connection_failure_retry_interval),
            "DelayNotificationTimeout": format_timespan(self.delay_notification_timeout),
            "MessageExpirationTimeout": format_timespan(self.message_expiration_timeout),
            "InternalDelayDsnEnabled": "$" + str(self.internal_delay_dsn_enabled).lower(),
            "ExternalDelayDsnEnabled": "$" + str(self.external_delay_dsn_enabled).lower(),
            "Role": self.role.capitalize(),
            "Sender": self.sender,
        }


# name (lowercase) -> (field, kind, lo, hi); time ranges in seconds, from Set-TransportService
_EXCHANGE_KEYS: dict[str, tuple[str, str, float, float]] = {
    "transientfailureretrycount": ("transient_failure_retry_count", "int", 0, 15),
    "transientfailureretryinterval": ("transient_failure_retry_interval", "time", 1, 12 * HOUR),
    "messageretryinterval": ("message_retry_interval", "time", 1, DAY),
    "outboundconnectionfailureretryinterval":
        ("outbound_connection_failure_retry_interval", "time", 1, 20 * DAY),
    "queueglitchretrycount": ("queue_glitch_retry_count", "int", 0, 15),
    "queueglitchretryinterval": ("queue_glitch_retry_interval", "time", 1, DAY),
    "messageexpirationtimeout": ("message_expiration_timeout", "time", 5, 90 * DAY),
    "delaynotificationtimeout": ("delay_notification_timeout", "time", 1, 30 * DAY),
    "internaldelaydsnenabled": ("internal_delay_dsn_enabled", "bool", 0, 0),
    "externaldelaydsnenabled": ("external_delay_dsn_enabled", "bool", 0, 0),
    "role": ("role", "choice:mailbox,edge", 0, 0),
    "sender": ("sender", "choice:internal,external", 0, 0),
}
_EXCHANGE_NAMES = {k: n for n, k in (
    (n, n.lower()) for n in (
        "TransientFailureRetryCount", "TransientFailureRetryInterval", "MessageRetryInterval",
        "OutboundConnectionFailureRetryInterval", "QueueGlitchRetryCount",
        "QueueGlitchRetryInterval", "MessageExpirationTimeout", "DelayNotificationTimeout",
        "InternalDelayDsnEnabled", "ExternalDelayDsnEnabled", "Role", "Sender"))}


def _exchange_time(name: str, text: str) -> float:
    t = text.strip()
    if _NUMBER.match(t):
        raise ValueError(f"{name}: {t!r} has no unit; write a time span such as 00:15:00 "
                         f"(d.hh:mm:ss) or a duration such as 15m")
    try:
        return parse_duration(t)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


#: Exchange Online returns an undeliverable message after 24 hours (4.4.7 page,
#: queued messages report); it was two days before.
EXCHANGE_ONLINE_EXPIRATION = 1 * DAY
EXCHANGE_ONLINE_SOURCES = (
    "https://learn.microsoft.com/en-us/troubleshoot/exchange/email-delivery/ndr/"
    "fix-error-code-550-4-4-7-in-exchange-online",
    "https://learn.microsoft.com/en-us/exchange/monitoring/mail-flow-reports/"
    "mfr-queued-messages-report",
)


def _exchange_settings(values: Mapping[str, str], *, online: bool = False) -> ExchangeSettings:
    changes: dict[str, Any] = {}
    role_given = False
    for raw_name, text in values.items():
        key = raw_name.strip().lstrip("-").lower()
        if key not in _EXCHANGE_KEYS:
            raise ValueError(_unknown(raw_name, _EXCHANGE_NAMES.values(), "Exchange setting"))
        fname, kind, lo, hi = _EXCHANGE_KEYS[key]
        name = _EXCHANGE_NAMES[key]
        if kind == "int":
            changes[fname] = _parse_int(name, text, int(lo), int(hi))
        elif kind == "bool":
            changes[fname] = _parse_bool(name, text)
        elif kind.startswith("choice:"):
            choices = kind.split(":", 1)[1].split(",")
            v = text.strip().lower()
            if v not in choices:
                raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {text!r}")
            changes[fname] = v
            role_given = role_given or fname == "role"
        else:
            seconds = _exchange_time(name, text)
            if not lo <= seconds <= hi:
                raise ValueError(f"{name}: {format_timespan(seconds)} is outside the valid "
                                 f"range {format_timespan(lo)} through {format_timespan(hi)}")
            changes[fname] = seconds
    base = (ExchangeSettings(message_expiration_timeout=EXCHANGE_ONLINE_EXPIRATION) if online
            else ExchangeSettings())
    if role_given and changes["role"] == "edge":
        # Edge Transport defaults differ for these two (message-intervals page)
        changes.setdefault("transient_failure_retry_interval", 10 * MINUTE)
        changes.setdefault("outbound_connection_failure_retry_interval", 30 * MINUTE)
    overridden = tuple(_EXCHANGE_NAMES[k.strip().lstrip("-").lower()] for k in values)
    return replace(base, overridden=overridden, **changes)


def exchange_schedule(s: ExchangeSettings, failure: Failure = "message", *,
                      online: bool = False) -> Schedule:
    """Exchange's schedule after a first failure at t = 0.

    ``failure="message"``: the remote answered with a 4xx inside a working
    SMTP session (greylisting at RCPT, 451 after the dot): the message is
    retried every MessageRetryInterval. ``failure="connection"``: the
    connection failed (refused, dropped, timed out, 421 at the banner): the
    queue retries QueueGlitchRetryCount times a QueueGlitchRetryInterval
    apart, then TransientFailureRetryCount times a TransientFailureRetryInterval
    apart, then every OutboundConnectionFailureRetryInterval."""
    notes: list[str] = []
    product = "Exchange Online" if online else (
        "Exchange Server (Edge Transport)" if s.role == "edge" else
        "Exchange Server (Transport service on a Mailbox server)")
    if online:
        notes.append("Exchange Online: its retry settings are not configurable and Microsoft "
                     "does not publish its schedule; this is the on-premises model with its "
                     "defaults, an estimate to check against a lab")
        if "MessageExpirationTimeout" not in s.overridden:
            notes.append("Exchange Online returns a message it could not deliver for 24 hours "
                         "with an NDR (Microsoft's 4.4.7 page and queued messages report: "
                         f"{EXCHANGE_ONLINE_SOURCES[0]}); older documentation said two days")
    if failure == "message":
        gaps: Iterator[float] = _repeat(s.message_retry_interval)
        notes.append(f"{product}: a 4xx reply inside a working session puts the message in "
                     f"Retry; it is retried every MessageRetryInterval "
                     f"({format_duration(s.message_retry_interval)})")
        if "MessageRetryInterval" not in s.overridden and not online:
            notes.append("MessageRetryInterval 15 min is the default on Microsoft's "
                         "retry-intervals page; the current Set-TransportService reference "
                         "says 5 min and Microsoft's HealthChecker recommends 5 min or less: "
                         "check Get-TransportService | fl MessageRetryInterval")
    else:
        gaps = _chain(
            [s.queue_glitch_retry_interval] * s.queue_glitch_retry_count,
            [s.transient_failure_retry_interval] * s.transient_failure_retry_count,
            _repeat(s.outbound_connection_failure_retry_interval))
        notes.append(
            f"{product}: a failed connection (refused, dropped, timed out, or a 421 at the "
            f"banner) puts the queue in Retry: {s.queue_glitch_retry_count} glitch retries "
            f"{format_duration(s.queue_glitch_retry_interval)} apart, then "
            f"{s.transient_failure_retry_count} transient-failure retries "
            f"{format_duration(s.transient_failure_retry_interval)} apart, then every "
            f"{format_duration(s.outbound_connection_failure_retry_interval)}")
        notes.append("QueueGlitchRetryCount/Interval live in EdgeTransport.exe.config, not in "
                     "Set-TransportService; a cumulative update resets them")
        if s.delay_notification_timeout <= (s.transient_failure_retry_count
                                            * s.transient_failure_retry_interval):
            notes.append("DelayNotificationTimeout should be longer than "
                         "TransientFailureRetryCount x TransientFailureRetryInterval "
                         "(Microsoft's advice); here it is not")
    expiry = s.message_expiration_timeout
    attempts, truncated = _take_until(gaps, expiry)
    if truncated:
        notes.append(f"only the first {MAX_LISTED} attempts are listed")
    enabled = (s.internal_delay_dsn_enabled if s.sender == "internal"
               else s.external_delay_dsn_enabled)
    notice: float | None = None
    if not enabled:
        flag = "Internal" if s.sender == "internal" else "External"
        notes.append(f"no delay DSN: Set-TransportConfig -{flag}DelayDsnEnabled is $false")
    else:
        notice = next((a for a in attempts if a >= s.delay_notification_timeout), None)
        if notice is not None:
            dnt = format_duration(s.delay_notification_timeout)
            notes.append(f"the delay DSN goes out with the first failed attempt after "
                         f"DelayNotificationTimeout ({dnt}), once")
        else:
            notes.append("no delay DSN: no failed attempt comes after DelayNotificationTimeout "
                         "before the message expires")
    notes.append(f"the NDR (550 4.4.7 QUEUE.Expired) is due when MessageExpirationTimeout "
                 f"({format_duration(expiry)}) has passed since the message was queued; Exchange "
                 f"checks expiry on its own, so expect it at or shortly after that time")
    return Schedule(attempts, notice, expiry, notes)


# ================================================================= Postfix
#
# Sources: postconf(5) as shipped with Postfix 3.7 (defaults: queue_run_delay
# 300s, minimal_backoff_time 300s, maximal_backoff_time 4000s,
# maximal_queue_lifetime 5d, bounce_queue_lifetime 5d, delay_warning_time 0h
# = off; bare numbers are seconds, but days for the two lifetimes and hours for
# delay_warning_time; lifetime 0 means "try once"), and qmgr's source
# (qmgr_active.c, qmgr.c), read for the arithmetic:
# - after a failed attempt at `now`, if now >= arrival + maximal_queue_lifetime
#   (bounce_queue_lifetime for a null-sender message) the message bounces;
#   else, if delay_warning_time is set and now >= arrival + delay_warning_time
#   - 1, a delay warning goes out (once);
# - otherwise the queue file is dated now + backoff, where backoff is the
#   message's age (now - arrival) clamped to [minimal_backoff_time,
#   maximal_backoff_time]: retries come when the age doubles (300, 600, 1200,
#   2400, 4800 s with the defaults) until the backoff reaches the maximum;
# - the deferred queue is scanned every queue_run_delay (a timer that runs
#   from qmgr's start), and a scan takes a file back when its date is at most
#   now + 1 s. All of this is in whole seconds (event_time()).
# Measured in this project's Postfix lab (3.7): with queue_run_delay = 1s a
# retry came minimal_backoff_time - 1 s after the failed attempt (1.01 s for
# 2s, 2.01 s for 3s), which is what the "+ 1 s" predicts.


@dataclass(frozen=True)
class PostfixSettings:
    queue_run_delay: float = 300
    minimal_backoff_time: float = 300
    maximal_backoff_time: float = 4000
    maximal_queue_lifetime: float = 5 * DAY
    bounce_queue_lifetime: float = 5 * DAY
    delay_warning_time: float = 0
    #: the message is itself a bounce (null sender): bounce_queue_lifetime applies
    null_sender: bool = False
    #: seconds from the first attempt to the first deferred-queue scan (0 <= phase < delay)
    scan_phase: float = 0
    overridden: tuple[str, ...] = ()

    def as_config(self) -> dict[str, str]:
        return {
            "queue_run_delay": _pf_time(self.queue_run_delay),
            "minimal_backoff_time": _pf_time(self.minimal_backoff_time),
            "maximal_backoff_time": _pf_time(self.maximal_backoff_time),
            "maximal_queue_lifetime": _pf_time(self.maximal_queue_lifetime),
            "bounce_queue_lifetime": _pf_time(self.bounce_queue_lifetime),
            "delay_warning_time": _pf_time(self.delay_warning_time),
            "null_sender": "yes" if self.null_sender else "no",
            "scan_phase": _pf_time(self.scan_phase),
        }


def _pf_time(seconds: float) -> str:
    s = int(seconds)
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if s and s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


# name -> (field, default unit for a bare number)
_POSTFIX_KEYS: dict[str, tuple[str, str]] = {
    "queue_run_delay": ("queue_run_delay", "s"),
    "minimal_backoff_time": ("minimal_backoff_time", "s"),
    "maximal_backoff_time": ("maximal_backoff_time", "s"),
    "maximal_queue_lifetime": ("maximal_queue_lifetime", "d"),
    "bounce_queue_lifetime": ("bounce_queue_lifetime", "d"),
    "delay_warning_time": ("delay_warning_time", "h"),
    "null_sender": ("null_sender", ""),
    "scan_phase": ("scan_phase", "s"),
}


def _postfix_settings(values: Mapping[str, str]) -> PostfixSettings:
    changes: dict[str, Any] = {}
    for raw_name, text in values.items():
        key = raw_name.strip().lower()
        if key not in _POSTFIX_KEYS:
            raise ValueError(_unknown(raw_name, _POSTFIX_KEYS, "Postfix setting"))
        fname, unit = _POSTFIX_KEYS[key]
        if fname == "null_sender":
            changes[fname] = _parse_bool(key, text)
            continue
        if ":" in text:
            raise ValueError(f"{key}: Postfix takes a number and a unit (s, m, h, d, w), "
                             f"got {text!r}")
        try:
            seconds = parse_duration(text, unit)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        if seconds != int(seconds):
            raise ValueError(f"{key}: Postfix counts whole seconds, got {text!r}")
        changes[fname] = float(seconds)
    s = replace(PostfixSettings(), overridden=tuple(k.strip().lower() for k in values),
                **changes)
    for name in ("queue_run_delay", "minimal_backoff_time", "maximal_backoff_time"):
        if getattr(s, name) <= 0:
            raise ValueError(f"{name} must be more than 0 (postconf(5): a non-zero time)")
    if not 0 <= s.scan_phase < s.queue_run_delay:
        raise ValueError("scan_phase must be at least 0 and less than queue_run_delay")
    return s


def postfix_schedule(s: PostfixSettings, failure: Failure = "message") -> Schedule:
    """Postfix's schedule after a first failure at t = 0 (the message arrived
    at t = 0 and was tried at once). Whole seconds throughout."""
    notes: list[str] = []
    qrd, lo, hi = int(s.queue_run_delay), int(s.minimal_backoff_time), int(s.maximal_backoff_time)
    phase = int(s.scan_phase)
    lifetime = int(s.bounce_queue_lifetime if s.null_sender else s.maximal_queue_lifetime)
    warn = 0 if s.null_sender else int(s.delay_warning_time)
    notes.append(f"Postfix: after each failure the message waits its age clamped to "
                 f"[minimal_backoff_time {format_duration(lo)}, maximal_backoff_time "
                 f"{format_duration(hi)}], so retries come as its age doubles, then every "
                 f"{format_duration(hi)} or so")
    notes.append(f"retries happen at deferred-queue scans, every queue_run_delay "
                 f"({format_duration(qrd)}); a scan takes a message back once its retry "
                 f"time is at most now + 1 s (qmgr, whole seconds; measured in the lab: a "
                 f"retry minimal_backoff_time - 1 s after the failure with 1 s scans)")
    notes.append(f"scans are assumed at {format_duration(phase)} + k x "
                 f"{format_duration(qrd)} after the first attempt; they really run from "
                 f"qmgr's start, so each retry may come up to {format_duration(qrd - 1)} "
                 f"later (set scan_phase)" if qrd > 1 else
                 "scans every second: a retry may still come up to a second later")
    if hi < lo:
        notes.append("maximal_backoff_time is below minimal_backoff_time (postconf(5) says "
                     "it should not be); the minimum wins")
    if lo < qrd:
        notes.append("minimal_backoff_time is below queue_run_delay (postconf(5) advises "
                     "against it): retries wait for the next scan")
    if failure == "connection":
        notes.append("a failed connection also marks the destination dead for "
                     "minimal_backoff_time ('delivery temporarily suspended'); a retry that "
                     "comes up a second early may be skipped to the next scan")
    attempts: list[float] = [0.0]
    now = 0
    notice: int | None = None
    truncated = False
    for _ in range(MAX_STEPS):
        if now >= lifetime:
            break
        if warn > 0 and notice is None and now >= warn - 1:
            notice = now
        backoff = max(min(now, hi), lo)
        due = now + backoff
        now = _next_scan(after=now, at_least=due - 1, period=qrd, phase=phase)
        if len(attempts) < MAX_LISTED:
            attempts.append(float(now))
        else:
            truncated = True
    else:
        raise ValueError("these settings need too many steps to reach the queue lifetime")
    expires = float(now)
    if truncated:
        notes.append(f"only the first {MAX_LISTED} attempts are listed")
    if lifetime == 0:
        notes.append("a queue lifetime of 0 means one try, then the bounce")
    name = "bounce_queue_lifetime" if s.null_sender else "maximal_queue_lifetime"
    notes.append(f"the bounce goes out after the first failed attempt at or after {name} "
                 f"({format_duration(lifetime)}), not at that time itself")
    if s.null_sender:
        notes.append("a null-sender message (a bounce) gets no delay warning")
    elif warn == 0:
        notes.append("no delay warning: delay_warning_time is 0 (Postfix's default)")
    elif notice is None:
        notes.append("no delay warning: the message bounces before delay_warning_time")
    else:
        notes.append(f"the delay warning goes out with the first failed attempt at or after "
                     f"delay_warning_time - 1 s ({format_duration(max(warn - 1, 0))}), once")
    return Schedule(attempts, None if notice is None else float(notice), expires, notes)


def _next_scan(*, after: int, at_least: int, period: int, phase: int) -> int:
    """The first scan time phase + k*period (k >= 0) that is > after and >= at_least."""
    lo = max(after + 1, at_least)
    k = max(0, -(-(lo - phase) // period))
    return phase + k * period


# ==================================================================== Exim
#
# Sources: the Exim specification, chapter "Retry configuration" (rules are
# "letter,cutoff,arguments" sets tried in order until one whose cutoff has not
# passed; cutoffs count from the first failure; F = fixed interval, G =
# geometric (start, multiplier), H = like G but randomised; retry_interval_max
# (default and maximum 24h) caps any interval; retry times are hints acted on
# by queue runners; once the last cutoff has passed the next failure bounces,
# and a message older than the last cutoff is tried at the next queue run even
# before its retry time), the "delay_warning" option (a time list, default
# 24h; empty or zero = no warnings; after the last time, warnings repeat at the
# last gap; only evaluated when a delivery attempt fails), Exim's retry.c and
# deliver.c (G: next = now + max(start, last_gap x multiplier), last_gap being
# the shorter of the predicted and actual previous gap; multiplier in
# thousandths), the Exim 4.96 binary's own -bP (delay_warning = 1d,
# retry_interval_max = 1d), and Debian's exim4 packaging
# (conf.d/retry/30_exim4-config: "* * F,2h,15m; G,16h,1h,1.5; F,4d,6h", the
# same as Exim's default configure; /etc/default/exim4 QUEUEINTERVAL='30m').

DEBIAN_EXIM_RETRY = "F,2h,15m; G,16h,1h,1.5; F,4d,6h"


@dataclass(frozen=True)
class RetryRule:
    """One Exim retry parameter set: ``F,cutoff,interval`` or
    ``G|H,cutoff,start,multiplier`` (times in seconds)."""

    kind: Literal["F", "G", "H"]
    cutoff: float
    interval: float
    multiplier: float = 1.0

    def __str__(self) -> str:
        base = f"{self.kind},{_exim_time(self.cutoff)},{_exim_time(self.interval)}"
        return base if self.kind == "F" else f"{base},{self.multiplier:g}"


def _exim_time(seconds: float) -> str:
    s = int(seconds)
    out = []
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, s = divmod(s, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out) or "0s"


def parse_exim_rules(text: str) -> list[RetryRule]:
    """Parse ``F,2h,15m; G,16h,1h,1.5; F,4d,6h`` (a whole retry line such as
    ``*  *  F,2h,15m; ...`` is accepted too: the pattern, error and
    ``senders=`` fields are skipped)."""
    body = text.strip()
    words = body.split()
    while words and not re.match(r"^[FGH],", words[0], re.IGNORECASE):
        words.pop(0)  # the pattern, the error name, senders=...
    body = " ".join(words)
    if not body:
        raise ValueError(f"expected Exim retry parameters such as {DEBIAN_EXIM_RETRY!r}, "
                         f"got {text!r}")
    rules: list[RetryRule] = []
    for part in (p.strip() for p in body.split(";")):
        if not part:
            continue
        items = [x.strip() for x in part.split(",")]
        kind = items[0].upper()
        try:
            if kind == "F" and len(items) == 3:
                rules.append(RetryRule("F", _exim_dur(items[1]), _exim_dur(items[2])))
            elif kind in ("G", "H") and len(items) == 4:
                mult = float(items[3])
                if not math.isfinite(mult) or mult < 1:
                    raise ValueError(f"multiplier {items[3]!r} must be at least 1")
                rules.append(RetryRule("G" if kind == "G" else "H", _exim_dur(items[1]),
                                       _exim_dur(items[2]), mult))
            else:
                raise ValueError("expected F,cutoff,interval or G,cutoff,start,multiplier")
        except ValueError as e:
            raise ValueError(f"retry parameters {part!r}: {e}") from None
        if rules[-1].interval <= 0:
            raise ValueError(f"retry parameters {part!r}: the interval must be more than 0")
    if not rules:
        raise ValueError(f"no retry parameters in {text!r}")
    return rules


def _exim_dur(text: str) -> float:
    if ":" in text:
        raise ValueError(f"Exim times are like 2h or 1h30m, got {text!r}")
    return parse_duration(text, "s")


@dataclass(frozen=True)
class EximSettings:
    retry: tuple[RetryRule, ...] = tuple(parse_exim_rules(DEBIAN_EXIM_RETRY))
    retry_interval_max: float = DAY
    delay_warning: tuple[float, ...] = (DAY,)
    #: the queue runner's interval (exim -q30m; Debian's QUEUEINTERVAL)
    queue_interval: float = 30 * MINUTE
    #: seconds from the first attempt to the first queue run (0 <= phase < interval)
    queue_run_phase: float = 0
    overridden: tuple[str, ...] = ()

    def as_config(self) -> dict[str, str]:
        return {
            "retry": "; ".join(str(r) for r in self.retry),
            "retry_interval_max": _exim_time(self.retry_interval_max),
            "delay_warning": ":".join(_exim_time(t) for t in self.delay_warning) or "0s",
            "queue_interval": _exim_time(self.queue_interval),
            "queue_run_phase": _exim_time(self.queue_run_phase),
        }


_EXIM_KEYS = {"retry": "retry", "retry_rule": "retry", "retry_interval_max": "retry_interval_max",
              "delay_warning": "delay_warning", "queue_interval": "queue_interval",
              "q": "queue_interval", "queue_run_phase": "queue_run_phase"}


def _exim_settings(values: Mapping[str, str]) -> EximSettings:
    changes: dict[str, Any] = {}
    for raw_name, text in values.items():
        key = raw_name.strip().lower()
        if key not in _EXIM_KEYS:
            known = ("retry", "retry_interval_max", "delay_warning", "queue_interval",
                     "queue_run_phase")
            raise ValueError(_unknown(raw_name, known, "Exim setting"))
        fname = _EXIM_KEYS[key]
        try:
            if fname == "retry":
                changes[fname] = tuple(parse_exim_rules(text))
            elif fname == "delay_warning":
                items = [x.strip() for x in text.split(":") if x.strip()]
                times = tuple(_exim_dur(x) for x in items)
                if len(times) > 10:
                    raise ValueError("Exim takes up to 10 times")
                if any(b <= a for a, b in itertools.pairwise(times)):
                    raise ValueError("the times must increase")
                changes[fname] = () if not times or times[0] == 0 else times
            else:
                changes[fname] = _exim_dur(text)
        except ValueError as e:
            raise ValueError(f"{fname}: {e}") from None
    s = replace(EximSettings(), overridden=tuple(_EXIM_KEYS[k.strip().lower()] for k in values),
                **changes)
    if not 0 < s.retry_interval_max <= DAY:
        raise ValueError("retry_interval_max must be more than 0 and at most 24h "
                         "(Exim's limit)")
    if s.queue_interval <= 0:
        raise ValueError("queue_interval must be more than 0")
    if not 0 <= s.queue_run_phase < s.queue_interval:
        raise ValueError("queue_run_phase must be at least 0 and less than queue_interval")
    return s


def exim_schedule(s: EximSettings, failure: Failure = "message") -> Schedule:
    """Exim's schedule after the immediate delivery attempt at t = 0 fails.

    Retry records count from that first failure (a fresh lab has no older
    record for the host). Whole seconds, as Exim's time(NULL)."""
    notes: list[str] = []
    rules = list(s.retry)
    final_cutoff = int(rules[-1].cutoff)
    qi, phase = int(s.queue_interval), int(s.queue_run_phase)
    cap = int(s.retry_interval_max)
    notes.append(f"Exim: retry rule {'; '.join(str(r) for r in rules)} (cutoffs count from "
                 f"the first failure), intervals capped at retry_interval_max "
                 f"{format_duration(cap)}")
    notes.append(f"retries happen at queue runs every {format_duration(qi)} (exim -q"
                 f"{_exim_time(qi)}; Debian's QUEUEINTERVAL is 30m) once the retry time has "
                 f"passed; runs are assumed at {format_duration(phase)} + k x "
                 f"{format_duration(qi)} after the first attempt (set queue_run_phase)")
    if failure == "message":
        notes.append("a 4xx to RCPT delays that address for this sender (address retry "
                     "record); a 4xx to MAIL or DATA is message-specific; the timing is "
                     "the same for a single message")
    else:
        notes.append("a connection failure sets a retry time for the host (its IP): other "
                     "messages to it wait too")
    if any(r.kind == "H" for r in rules):
        notes.append("H rules pick each interval at random; the prediction uses the expected "
                     "value")
    attempts: list[float] = [0.0]
    now = 0
    last_try, next_try = 0, 0  # a new retry record: next_try = last_try = now
    warn_times = [int(t) for t in s.delay_warning]
    warned = 0
    notices: list[int] = []
    truncated = False
    for _ in range(MAX_STEPS):
        failing = now  # first failure at 0; the message also arrived at 0
        rule = next((r for r in rules if failing <= r.cutoff), None)
        if rule is None:
            break  # past the final cutoff: this failure bounces the address
        if warn_times:
            due = _exim_warnings_due(now, warn_times)
            if due > warned:
                notices.append(now)
                warned = due
        if rule.kind == "F":
            gap = int(rule.interval)
        else:
            last_gap = min(next_try - last_try, now - last_try)
            start = int(rule.interval)
            grown = last_gap * round(rule.multiplier * 1000) // 1000
            if rule.kind == "G":
                gap = start if last_gap < start else grown
            else:  # H: start + uniform part; expected value of Exim's draw
                gap = start + (3 * (grown - start)) // 4 if grown > start else start
        gap = min(gap, cap)
        last_try, next_try = now, now + gap
        # the next queue run at or after the retry time; but a run after the final
        # cutoff tries the message anyway ("on queue longer than maximum retry")
        run = _next_scan(after=now, at_least=next_try, period=qi, phase=phase)
        late = _next_scan(after=max(now, final_cutoff), at_least=0, period=qi, phase=phase)
        now = min(run, late)
        if len(attempts) < MAX_LISTED:
            attempts.append(float(now))
        else:
            truncated = True
    else:
        raise ValueError("these settings need too many steps to reach the final cutoff")
    if truncated:
        notes.append(f"only the first {MAX_LISTED} attempts are listed")
    notes.append(f"the bounce goes out after the first failed attempt past the final cutoff "
                 f"({format_duration(final_cutoff)}); the lab saw Exim sometimes bounce "
                 f"past the cutoff without that last attempt")
    if not warn_times:
        notes.append("no delay warnings: delay_warning is empty or 0")
    elif notices:
        more = ", ".join("+" + format_duration(t) for t in notices[1:6])
        notes.append(f"delay warnings ({_format_warning_list(warn_times)}) go out with failed "
                     f"attempts; the first at +{format_duration(notices[0])}"
                     + (f", then {more}" + (" ..." if len(notices) > 6 else "")
                        if more else ""))
    else:
        notes.append("no delay warning: the message bounces before the first delay_warning "
                     "time")
    return Schedule(attempts, float(notices[0]) if notices else None, float(now), notes)


def _exim_warnings_due(queue_time: int, times: Sequence[int]) -> int:
    """How many delay warnings deliver.c says should have gone out by now."""
    count = sum(1 for t in times if queue_time >= t)
    if count == len(times):
        last = times[-1]
        gap = last - times[-2] if len(times) > 1 else last
        count += (queue_time - last) // gap
    return count


def _format_warning_list(times: Sequence[int]) -> str:
    return "delay_warning " + ":".join(_exim_time(t) for t in times)


# ============================================================== dispatch

Settings: TypeAlias = ExchangeSettings | PostfixSettings | EximSettings


def settings_for(mta: str, values: Mapping[str, str] | None = None) -> Settings:
    """The MTA's settings: its defaults with ``values`` (name -> text, as a
    user types them after ``--set``) applied. Names are case-insensitive."""
    values = values or {}
    kind = _mta(mta)
    if kind in ("exchange", "exchange-online"):
        return _exchange_settings(values, online=kind == "exchange-online")
    if kind == "postfix":
        return _postfix_settings(values)
    return _exim_settings(values)


def predict(mta: str, values: Mapping[str, str] | Settings | None = None,
            failure: str = "message") -> Schedule:
    """The schedule for ``mta`` (exchange, exchange-online, postfix, exim)
    with its defaults, or ``values`` applied, after a first failure at t = 0.

    ``failure`` is ``message`` (a 4xx reply in a working SMTP session) or
    ``connection`` (refused, dropped, timed out, 421 at the banner)."""
    kind = _mta(mta)
    if failure not in FAILURES:
        raise ValueError(f"failure must be message or connection, got {failure!r}")
    fk: Failure = "message" if failure == "message" else "connection"
    s = values if isinstance(values, (ExchangeSettings, PostfixSettings, EximSettings)) \
        else settings_for(kind, values)
    if isinstance(s, ExchangeSettings):
        if kind not in ("exchange", "exchange-online"):
            raise ValueError(f"Exchange settings given for {kind}")
        return exchange_schedule(s, fk, online=kind == "exchange-online")
    if isinstance(s, PostfixSettings):
        return postfix_schedule(s, fk)
    return exim_schedule(s, fk)


def _mta(mta: str) -> Mta:
    m = mta.strip().lower()
    for k in MTAS:
        if m == k:
            return k
    raise ValueError(_unknown(mta, MTAS, "MTA"))


def _unknown(name: str, known: Iterable[str], label: str) -> str:
    names = list(known)
    lower = {k.lower(): k for k in names}
    close = difflib.get_close_matches(name.strip().lower(), list(lower), n=1, cutoff=0.6)
    hint = f" (did you mean {lower[close[0]]}?)" if close else ""
    return f"unknown {label} {name!r}{hint}; known: {', '.join(names)}"


def _repeat(gap: float) -> Iterator[float]:
    while True:
        yield gap


def _chain(*parts: Iterable[float]) -> Iterator[float]:
    for part in parts:
        yield from part


def _take_until(gaps: Iterator[float], expiry: float) -> tuple[list[float], bool]:
    """Attempt times 0, g1, g1+g2, ... strictly before expiry."""
    attempts = [0.0]
    t = 0.0
    for _ in range(MAX_STEPS):
        gap = next(gaps)
        if gap <= 0:
            raise ValueError("a retry interval must be more than 0")
        t += gap
        if t >= expiry:
            return attempts, False
        if len(attempts) >= MAX_LISTED:
            return attempts, True
        attempts.append(t)
    raise ValueError("these settings need too many steps to reach the expiry")


# ============================================================= comparison


def compare(predicted: Schedule, observed: Sequence[float], tolerance: float = 2.0, *,
            complete: bool = False) -> Comparison:
    """Hold observed attempt times against a prediction.

    ``observed`` are the times of the attempts the harness saw, first one
    included, in any unit of seconds (epoch times are fine: they are taken
    relative to the first). Each observed attempt i must lie within
    ``tolerance`` seconds of predicted attempt i. Observing fewer attempts
    than predicted is normal (a lab stops early) unless ``complete`` says the
    observation covers the message's whole life."""
    if tolerance < 0:
        raise ValueError("tolerance cannot be negative")
    obs = sorted(float(x) for x in observed)
    if not obs:
        return Comparison(False, [], 0, len(predicted.attempts) if complete else 0,
                          "no attempts observed")
    rel = [x - obs[0] for x in obs]
    pred = predicted.attempts
    n = min(len(rel), len(pred))
    deltas = [round(rel[i] - pred[i], 6) for i in range(n)]
    extra = max(0, len(rel) - len(pred))
    missing = max(0, len(pred) - len(rel)) if complete else 0
    bad = [i for i in range(n) if abs(deltas[i]) > tolerance]
    ok = not bad and not extra and not missing
    within = f"within {format_duration(tolerance)}"
    if ok:
        shape = _shape(rel, tolerance)
        return Comparison(True, deltas, 0, 0, f"{shape}, as predicted ({within})")
    problems = []
    for i in bad[:3]:
        how = "late" if deltas[i] > 0 else "early"
        problems.append(f"attempt {i + 1} at +{format_duration(rel[i])}, predicted "
                        f"+{format_duration(pred[i])} ({format_duration(abs(deltas[i]))} {how})")
    if len(bad) > 3:
        problems.append(f"{len(bad) - 3} more attempts off by more than "
                        f"{format_duration(tolerance)}")
    if extra:
        problems.append(f"{extra} more attempt{'s' if extra > 1 else ''} than predicted (the "
                        f"prediction ends with the bounce at +"
                        f"{format_duration(predicted.expires_at)})")
    if missing:
        problems.append(f"only {len(rel)} of {len(pred)} predicted attempts")
    return Comparison(False, deltas, extra, missing,
                      f"{_shape(rel, tolerance)}; differs from the prediction: "
                      + "; ".join(problems))


def _shape(times: Sequence[float], tolerance: float) -> str:
    """'retries at +5m x3, then +15m x2' from attempt times."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    if not gaps:
        return "1 attempt, no retry"
    # each attempt may be off by the tolerance, so an interval by twice that
    labels = [format_duration(_nice(g, 2 * tolerance)) for g in gaps]
    runs = [(label, len(list(group))) for label, group in itertools.groupby(labels)]
    parts = [f"+{label}" + (f" x{n}" if n > 1 else "") for label, n in runs]
    return "retries at " + ", then ".join(parts)


def _nice(x: float, tolerance: float) -> float:
    """Round to a whole minute, else a whole second, when that is within
    tolerance; else to milliseconds."""
    minute = round(x / 60) * 60
    if minute >= 60 and abs(x - minute) <= tolerance:
        return float(minute)
    second = round(x)
    if second >= 1 and abs(x - second) <= tolerance:
        return float(second)
    return round(x, 3)
