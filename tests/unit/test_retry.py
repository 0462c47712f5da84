"""Retry models (harness/analysis/retry.py) as tables of hand-checked numbers.

Every expected schedule below was worked out by hand from the rules the
module's comments cite (Microsoft's retry-interval page and Set-TransportService
reference, postconf(5) and qmgr's arithmetic, the Exim spec's retry chapter),
not by running the code and copying its output."""

from __future__ import annotations

import pytest

from harness.analysis import retry
from harness.analysis.retry import (
    DEBIAN_EXIM_RETRY,
    RetryRule,
    Schedule,
    compare,
    format_duration,
    format_timespan,
    parse_duration,
    parse_exim_rules,
    parse_timespan,
    predict,
    settings_for,
)

M, H, D = 60.0, 3600.0, 86400.0

# ------------------------------------------------------------ value syntax


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("00:15:00", 15 * M),
        ("00:05:00", 5 * M),
        ("2.00:00:00", 2 * D),
        ("4:00:00", 4 * H),  # how Exchange shows DelayNotificationTimeout
        ("1.12:00:00", 36 * H),
        ("00:00:30.5", 30.5),
        ("00:05", 5 * M),  # hh:mm
        ("90.00:00:00", 90 * D),
        (" 00:00:01 ", 1.0),
    ],
)
def test_parse_timespan(text: str, seconds: float) -> None:
    assert parse_timespan(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("24:00:00", "hours must be 0-23"),
        ("00:60:00", "minutes and seconds 0-59"),
        ("00:00:60", "minutes and seconds 0-59"),
        ("15m", "d.hh:mm:ss"),
        ("5", "d.hh:mm:ss"),
        ("1:2:3:4", "d.hh:mm:ss"),
        ("-00:05:00", "d.hh:mm:ss"),
    ],
)
def test_parse_timespan_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_timespan(text)


@pytest.mark.parametrize(
    ("text", "unit", "seconds"),
    [
        ("300s", "s", 300.0),
        ("5m", "s", 300.0),
        ("2h", "s", 2 * H),
        ("2d", "s", 2 * D),
        ("1w", "s", 7 * D),
        ("1h30m", "s", 90 * M),
        ("1.5h", "s", 90 * M),
        ("300", "s", 300.0),  # a bare number takes the default unit
        ("5", "d", 5 * D),  # Postfix maximal_queue_lifetime=5 means 5 days
        ("4", "h", 4 * H),  # Postfix delay_warning_time=4 means 4 hours
        ("00:15:00", "s", 15 * M),  # a time span is always a time span
        ("2.00:00:00", "d", 2 * D),
        ("5M", "s", 300.0),
    ],
)
def test_parse_duration(text: str, unit: str, seconds: float) -> None:
    assert parse_duration(text, unit) == seconds


@pytest.mark.parametrize("text", ["5x", "-5m", "m", "", "5 minutes", "1h 30m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (1.5, "1.5s"), (45, "45s"), (900, "15m"), (5400, "1h30m"), (4000, "1h6m40s"),
     (2 * D, "2d"), (D + 3661, "1d1h1m1s"), (-5, "-5s"), (0.25, "0.25s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(900, "00:15:00"), (2 * D, "2.00:00:00"), (4 * H, "04:00:00"), (36 * H, "1.12:00:00"),
     (1, "00:00:01")],
)
def test_format_timespan_round_trips(seconds: float, text: str) -> None:
    assert format_timespan(seconds) == text
    assert parse_timespan(text) == seconds


# ---------------------------------------------------------------- Exchange


def every(start: float, step: float, stop: float) -> list[float]:
    """start, start+step, ... strictly below stop."""
    out = []
    t = start
    while t < stop:
        out.append(t)
        t += step
    return out


def test_exchange_defaults_message_failure() -> None:
    # a 4xx in a working session: every MessageRetryInterval (15 min) for 2 days;
    # 0, 15m, ..., 47h45m = 192 attempts; the delay DSN with the attempt at 4h
    s = predict("exchange")
    assert s.attempts == every(0, 15 * M, 2 * D)
    assert len(s.attempts) == 192
    assert s.attempts[-1] == 2 * D - 15 * M
    assert s.delay_notice_at == 4 * H
    assert s.expires_at == 2 * D
    assert any("15 min is the default" in n for n in s.notes)


def test_exchange_defaults_connection_failure() -> None:
    # 4 glitch retries 1 min apart, 6 transient retries 5 min apart, then every 10 min
    s = predict("exchange", failure="connection")
    assert s.attempts[:13] == [0, 1 * M, 2 * M, 3 * M, 4 * M,
                               9 * M, 14 * M, 19 * M, 24 * M, 29 * M, 34 * M,
                               44 * M, 54 * M]
    assert s.attempts[11:] == every(44 * M, 10 * M, 2 * D)
    assert len(s.attempts) == 11 + 284
    # the first attempt at or after 4 h is 44 min + 20 x 10 min = 4h04m
    assert s.delay_notice_at == 4 * H + 4 * M
    assert s.expires_at == 2 * D


def test_exchange_edge_defaults_differ() -> None:
    # Edge Transport: TransientFailureRetryInterval 10 min, outbound retry 30 min
    s = predict("exchange", {"Role": "Edge"}, failure="connection")
    assert s.attempts[:13] == [0, 1 * M, 2 * M, 3 * M, 4 * M,
                               14 * M, 24 * M, 34 * M, 44 * M, 54 * M, 64 * M,
                               94 * M, 124 * M]
    # an explicit value still wins over the Edge default
    s = predict("exchange", {"Role": "edge", "TransientFailureRetryInterval": "00:02:00"},
                failure="connection")
    assert s.attempts[5:7] == [6 * M, 8 * M]


@pytest.mark.parametrize(
    ("values", "failure", "attempts", "notice", "expires"),
    [
        # the lab's shortened timings from docs/exchange-lab.md
        ({"MessageRetryInterval": "00:01:00", "DelayNotificationTimeout": "00:05:00",
          "MessageExpirationTimeout": "00:30:00"}, "message",
         every(0, 1 * M, 30 * M), 5 * M, 30 * M),
        # durations with units work as well as time spans; names are case-insensitive
        ({"messageretryinterval": "5m", "MESSAGEEXPIRATIONTIMEOUT": "1h"}, "message",
         every(0, 5 * M, 1 * H), None, 1 * H),
        # TransientFailureRetryCount 0 and no glitch retries: straight to the outbound interval
        ({"QueueGlitchRetryCount": "0", "TransientFailureRetryCount": "0",
          "OutboundConnectionFailureRetryInterval": "00:10:00",
          "MessageExpirationTimeout": "01:00:00", "DelayNotificationTimeout": "00:30:00"},
         "connection", [0, 10 * M, 20 * M, 30 * M, 40 * M, 50 * M], 30 * M, 1 * H),
        ({"TransientFailureRetryCount": "2", "TransientFailureRetryInterval": "00:00:30",
          "QueueGlitchRetryCount": "1", "QueueGlitchRetryInterval": "00:00:10",
          "OutboundConnectionFailureRetryInterval": "00:02:00",
          "MessageExpirationTimeout": "00:05:00", "DelayNotificationTimeout": "00:01:00"},
         "connection", [0, 10, 40, 70, 190], 70, 5 * M),
        # delay DSNs switched off for internal senders
        ({"InternalDelayDsnEnabled": "$false"}, "message", every(0, 15 * M, 2 * D), None,
         2 * D),
        # ... but the external switch does not matter for an internal sender
        ({"ExternalDelayDsnEnabled": "$false"}, "message", every(0, 15 * M, 2 * D), 4 * H,
         2 * D),
        ({"ExternalDelayDsnEnabled": "false", "Sender": "external"}, "message",
         every(0, 15 * M, 2 * D), None, 2 * D),
        # a leading dash, as in PowerShell, is accepted
        ({"-MessageRetryInterval": "00:30:00"}, "message", every(0, 30 * M, 2 * D), 4 * H,
         2 * D),
    ],
)
def test_exchange_overrides(values: dict[str, str], failure: str, attempts: list[float],
                            notice: float | None, expires: float) -> None:
    s = predict("exchange", values, failure)
    assert s.attempts == attempts
    assert s.delay_notice_at == notice
    assert s.expires_at == expires


def test_exchange_online_is_the_on_premises_estimate_expiring_at_24_hours() -> None:
    # Microsoft's current 4.4.7 page and queued messages report: 24 hours
    # (the two days this test used to expect is the older documentation).
    online = predict("exchange-online")
    onprem = predict("exchange")
    assert online.expires_at == 24 * 3600
    assert onprem.expires_at == 2 * 24 * 3600
    assert online.attempts == [t for t in onprem.attempts if t < 24 * 3600]
    assert online.delay_notice_at == onprem.delay_notice_at
    assert "not configurable" in online.notes[0]
    assert any("24 hours" in n and "two days" in n for n in online.notes)
    longer = predict("exchange-online", {"MessageExpirationTimeout": "2.00:00:00"})
    assert longer.expires_at == 2 * 24 * 3600


def test_exchange_warns_when_delay_notice_precedes_transient_retries() -> None:
    s = predict("exchange", {"DelayNotificationTimeout": "00:20:00"}, "connection")
    assert any("should be longer" in n for n in s.notes)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"MessageRetryInterval": "5"}, "has no unit"),
        ({"MessageRetryInterval": "2.00:00:00"}, "outside the valid range"),
        ({"MessageExpirationTimeout": "00:00:04"}, "outside the valid range"),
        ({"TransientFailureRetryCount": "16"}, "outside the valid range 0-15"),
        ({"TransientFailureRetryCount": "three"}, "whole number"),
        ({"TransientFailureRetryInterval": "13:00:00"}, "outside the valid range"),
        ({"MessageRetryIntervall": "00:05:00"}, "did you mean MessageRetryInterval"),
        ({"Role": "hub"}, "mailbox, edge"),
        ({"InternalDelayDsnEnabled": "maybe"}, r"\$true or \$false"),
    ],
)
def test_exchange_bad_settings(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predict("exchange", values)


def test_exchange_config_is_shown_as_exchange_shows_it() -> None:
    cfg = settings_for("exchange", {"MessageRetryInterval": "5m"}).as_config()
    assert cfg["MessageRetryInterval"] == "00:05:00"
    assert cfg["MessageExpirationTimeout"] == "2.00:00:00"
    assert cfg["DelayNotificationTimeout"] == "04:00:00"
    assert settings_for("exchange", {"messageretryinterval": "5m"}).overridden == (
        "MessageRetryInterval",)


# ----------------------------------------------------------------- Postfix


def test_postfix_defaults() -> None:
    # backoff = age clamped to [300, 4000]; scans every 300 s; taken back when
    # due <= now + 1. 0 fails -> due 300 -> scan 300; 300 -> 600; 600 -> 1200;
    # 1200 -> 2400; 2400 -> 4800; 4800 -> due 8800 -> next scan 9000;
    # then due = now + 4000 -> next scan 4200 later.
    s = predict("postfix")
    assert s.attempts[:10] == [0, 300, 600, 1200, 2400, 4800, 9000, 13200, 17400, 21600]
    assert s.attempts[6:] == every(9000, 4200, 433201)
    # the first failed attempt at or after 5 days (432000): 9000 + 101 x 4200
    assert s.expires_at == 433200 == s.attempts[-1]
    assert len(s.attempts) == 108
    assert s.delay_notice_at is None  # delay_warning_time defaults to 0h
    assert any("now + 1 s" in n for n in s.notes)


@pytest.mark.parametrize(
    ("values", "attempts", "notice", "expires"),
    [
        # the Postfix lab: scans every second, min 1 s, max 2 s, lifetime 10 s,
        # delay warning 2 s (sent once now >= 2 - 1)
        ({"queue_run_delay": "1s", "minimal_backoff_time": "1s", "maximal_backoff_time": "2s",
          "maximal_queue_lifetime": "10s", "delay_warning_time": "2s"},
         [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 1, 10),
        # measured in the lab: minimal_backoff_time 2s with 1 s scans retries after 1 s,
        # 3s after 2 s (the "+ 1 s" rule)
        ({"queue_run_delay": "1s", "minimal_backoff_time": "2s", "maximal_backoff_time": "2s",
          "maximal_queue_lifetime": "5s"}, [0, 1, 2, 3, 4, 5], None, 5),
        ({"queue_run_delay": "1s", "minimal_backoff_time": "3s", "maximal_backoff_time": "3s",
          "maximal_queue_lifetime": "10s"}, [0, 2, 4, 6, 8, 10], None, 10),
        # lifetime 0: one try, then the bounce
        ({"maximal_queue_lifetime": "0"}, [0], None, 0),
        # bare numbers take the parameter's unit: 1 -> 1 day, 4 -> 4 hours; the warning
        # comes with the first failed attempt at or after 4h - 1s: 4h50m (17400)
        ({"maximal_queue_lifetime": "1", "delay_warning_time": "4"},
         [0, 300, 600, 1200, 2400, 4800, *every(9000, 4200, 86400 + 4200)], 17400, 88800),
        # a null-sender message (a bounce) uses bounce_queue_lifetime and gets no warning
        ({"null_sender": "yes", "bounce_queue_lifetime": "1h", "delay_warning_time": "5m"},
         [0, 300, 600, 1200, 2400, 4800], None, 4800),
        # scans at 100 + k x 300: 0 -> due 300 (taken from 299) -> 400; 400 -> due 800 -> 1000;
        # 1000 -> due 2000 -> 2200; 2200 -> due 4400 -> 4600
        ({"scan_phase": "100", "maximal_queue_lifetime": "1h"},
         [0, 400, 1000, 2200, 4600], None, 4600),
    ],
)
def test_postfix_overrides(values: dict[str, str], attempts: list[float], notice: float | None,
                           expires: float) -> None:
    s = predict("postfix", values)
    assert s.attempts == attempts
    assert s.delay_notice_at == notice
    assert s.expires_at == expires


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"minimal_backof_time": "5s"}, "did you mean minimal_backoff_time"),
        ({"queue_run_delay": "0"}, "more than 0"),
        ({"queue_run_delay": "00:05:00"}, "number and a unit"),
        ({"minimal_backoff_time": "1.5s"}, "whole seconds"),
        ({"scan_phase": "300"}, "less than queue_run_delay"),
        ({"null_sender": "perhaps"}, "expected"),
    ],
)
def test_postfix_bad_settings(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predict("postfix", values)


def test_postfix_connection_failure_notes_the_dead_destination() -> None:
    s = predict("postfix", failure="connection")
    assert s.attempts == predict("postfix").attempts
    assert any("temporarily suspended" in n for n in s.notes)


# -------------------------------------------------------------------- Exim


def test_exim_rule_parsing() -> None:
    assert parse_exim_rules(DEBIAN_EXIM_RETRY) == [
        RetryRule("F", 2 * H, 15 * M), RetryRule("G", 16 * H, 1 * H, 1.5),
        RetryRule("F", 4 * D, 6 * H)]
    # a whole retry-section line, and one with senders=
    assert parse_exim_rules("*   *   F,2h,15m; G,16h,1h,1.5; F,4d,6h") == parse_exim_rules(
        DEBIAN_EXIM_RETRY)
    assert parse_exim_rules("*  rcpt_4xx  senders=:  F,1h,30m") == [RetryRule("F", H, 30 * M)]
    assert parse_exim_rules("h,1d,1h30m,2;") == [RetryRule("H", D, 90 * M, 2.0)]
    assert str(RetryRule("G", 16 * H, 1 * H, 1.5)) == "G,16h,1h,1.5"


@pytest.mark.parametrize(
    "text", ["", "* *", "X,1h,5m", "G,1h,5m", "G,1h,5m,0.5", "F,1h", "F,1h,0s", "F,01:00:00,5m"])
def test_exim_rule_parsing_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_exim_rules(text)


def test_exim_debian_defaults() -> None:
    # queue runs every 30 min. F,2h,15m: 0 -> 15m -> run 30m; 30m, 1h, 1h30m, 2h
    # (2h is still <= the 2h cutoff) -> 2h15m -> run 2h30m. G,16h,1h,1.5 from 2h30m:
    # last gap 15m < 1h -> 1h -> 3h30m; 1h x 1.5 -> 5h; 1h30m x 1.5 -> 7h15m -> run 7h30m;
    # last gap = min(2h15m, 2h30m) x 1.5 = 3h22m30s -> 10h52m30s -> run 11h;
    # min(3h22m30s, 3h30m) x 1.5 = 5h03m45s -> 16h03m45s -> run 16h30m (past 16h):
    # F,4d,6h: 22h30m, 1d4h30m, ... 3d22h30m; the next retry time (4d4h30m) is past
    # the 4 d cutoff, so the first run after 4 d (4d30m) tries once more and bounces.
    s = predict("exim")
    assert s.attempts == [0, 30 * M, 1 * H, 90 * M, 2 * H, 150 * M, 210 * M, 5 * H, 450 * M,
                          11 * H, 990 * M, *every(1350 * M, 6 * H, 4 * D), 4 * D + 30 * M]
    assert s.attempts[-2] == 3 * D + 22.5 * H
    assert s.expires_at == 4 * D + 30 * M
    # delay_warning 24h: with the first failed attempt at or after 24 h
    assert s.delay_notice_at == D + 4.5 * H


@pytest.mark.parametrize(
    ("values", "attempts", "notice", "expires"),
    [
        # the Exim lab: F,1m,1s with exim -q1s; 60 s is still within the cutoff,
        # 61 s is past it and bounces; warnings every 20 s
        ({"retry": "F,1m,1s", "queue_interval": "1s", "delay_warning": "20s"},
         [float(t) for t in range(62)], 20, 61),
        # retry_interval_max caps a fast-growing G rule at 2 h
        ({"retry": "G,1d,1h,3", "queue_interval": "60s", "retry_interval_max": "2h"},
         [0, H, *every(3 * H, 2 * H, 23 * H + 1), D + 60], None, D + 60),
        # H: start + 3/4 of the random part (its expected value): 0 -> 1h; then
        # 1h + 3/4 x (2h - 1h) = 1h45m -> 2h45m; 1h + 3/4 x (3h30m - 1h) = 2h52m30s
        ({"retry": "H,1d,1h,2", "queue_interval": "30s"},
         [0, H, 2.75 * H, 2.75 * H + 10350], None, None),
        # queue runs at 10 and 40 past the hour: 0 -> retry time 15m -> run at 40m;
        # 40m -> 55m -> run at 1h10m, past the 1 h cutoff: that failure bounces
        ({"retry": "F,1h,15m", "queue_run_phase": "10m", "delay_warning": "0"},
         [0, 40 * M, 70 * M], None, 70 * M),
    ],
)
def test_exim_overrides(values: dict[str, str], attempts: list[float], notice: float | None,
                        expires: float | None) -> None:
    s = predict("exim", values)
    assert s.attempts[:len(attempts)] == attempts
    if expires is not None:
        assert s.attempts == attempts
        assert s.expires_at == expires
    assert s.delay_notice_at == notice


def test_exim_delay_warning_list_repeats_the_last_gap() -> None:
    # the spec's example: 4h:8h:24h, then every 16 h
    times = [int(4 * H), int(8 * H), int(24 * H)]
    due = retry._exim_warnings_due
    assert [due(int(t * H), times) for t in (3, 4, 7, 8, 23, 24, 39, 40, 56)] == [
        0, 1, 1, 2, 2, 3, 3, 4, 5]
    assert [due(int(t * H), [int(6 * H)]) for t in (5, 6, 12, 18)] == [0, 1, 2, 3]
    s = predict("exim", {"retry": "F,4d,1h", "queue_interval": "1h",
                         "delay_warning": "4h:8h:24h"})
    assert s.delay_notice_at == 4 * H
    assert "+8h, +1d, +1d16h" in s.notes[-1]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"retry_interval_max": "25h"}, "at most 24h"),
        ({"delay_warning": "8h:4h"}, "must increase"),
        ({"queue_interval": "0s"}, "more than 0"),
        ({"queue_run_phase": "30m"}, "less than queue_interval"),
        ({"retry": "F,1h"}, "retry parameters"),
        ({"delay_warnings": "4h"}, "did you mean delay_warning"),
    ],
)
def test_exim_bad_settings(values: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        predict("exim", values)


# ---------------------------------------------------------------- dispatch


def test_predict_rejects_unknown_mta_and_failure() -> None:
    with pytest.raises(ValueError, match="did you mean postfix"):
        predict("postfx")
    with pytest.raises(ValueError, match="message or connection"):
        predict("exchange", failure="banner")


def test_predict_takes_settings_objects() -> None:
    s = settings_for("postfix", {"queue_run_delay": "60s", "minimal_backoff_time": "60s"})
    assert predict("postfix", s).attempts[:4] == [0, 60, 120, 240]


def test_schedule_intervals() -> None:
    assert Schedule([0, 60, 180], None, 200).intervals == [60, 120]


# -------------------------------------------------------------- comparison


def test_compare_agrees_within_tolerance() -> None:
    s = predict("exchange", failure="connection")
    t0 = 1_700_000_000.0  # epoch times are fine: taken relative to the first
    observed = [t0 + a + (0.8 if i % 2 else -0.3) for i, a in enumerate(s.attempts[:13])]
    c = compare(s, observed)
    assert c.ok
    assert len(c.deltas) == 13
    assert max(abs(d) for d in c.deltas) <= 1.1
    assert c.verdict == ("retries at +1m x4, then +5m x6, then +10m x2, as predicted "
                         "(within 2s)")


def test_compare_message_retries_verdict() -> None:
    s = predict("exchange", {"MessageRetryInterval": "00:05:00"})
    c = compare(s, [0, 300.5, 600.2, 901.0])
    assert c.ok
    assert c.verdict == "retries at +5m x3, as predicted (within 2s)"


def test_compare_reports_late_and_early_attempts() -> None:
    s = predict("exchange", failure="connection")
    observed = list(s.attempts[:8])
    observed[5] += 7  # 7 s late
    observed[7] -= 30  # 30 s early
    c = compare(s, observed)
    assert not c.ok
    assert c.deltas[5] == 7 and c.deltas[7] == -30
    assert "attempt 6 at +9m7s, predicted +9m (7s late)" in c.verdict
    assert "attempt 8 at +18m30s, predicted +19m (30s early)" in c.verdict
    assert c.verdict.startswith("retries at +1m x4, then +5m7s")


def test_compare_counts_extra_and_missing_attempts() -> None:
    s = predict("postfix", {"queue_run_delay": "1s", "minimal_backoff_time": "1s",
                            "maximal_backoff_time": "2s", "maximal_queue_lifetime": "3s"})
    assert s.attempts == [0, 1, 2, 3]
    c = compare(s, [0, 1, 2, 3, 4])
    assert not c.ok and c.extra == 1
    assert "1 more attempt than predicted (the prediction ends with the bounce at +3s)" in (
        c.verdict)
    # a lab that stops early is fine, unless it says it saw everything
    assert compare(s, [0, 1]).ok
    c = compare(s, [0, 1], complete=True)
    assert not c.ok and c.missing == 2
    assert "only 2 of 4 predicted attempts" in c.verdict


@pytest.mark.parametrize(
    ("observed", "tolerance", "ok"),
    [([0, 62], 2.0, True), ([0, 62.5], 2.0, False), ([0, 62.5], 3.0, True),
     ([10, 70], 0.0, True), ([0], 2.0, True)],
)
def test_compare_tolerance(observed: list[float], tolerance: float, ok: bool) -> None:
    s = Schedule([0, 60, 120], None, 150)
    assert compare(s, observed, tolerance).ok is ok


def test_compare_edge_cases() -> None:
    s = Schedule([0, 60], None, 90)
    c = compare(s, [])
    assert not c.ok and c.verdict == "no attempts observed"
    assert compare(s, [0]).verdict == "1 attempt, no retry, as predicted (within 2s)"
    assert compare(s, [60, 0]).ok  # order does not matter
    with pytest.raises(ValueError):
        compare(s, [0], tolerance=-1)
