"""`harness predict` (harness/predict.py): options, text and JSON output."""

from __future__ import annotations

import argparse
import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from rich.console import Console

from harness.errors import HarnessError
from harness.predict import PredictError, add_arguments, predict_command

START = "2025-01-06T09:00:00+00:00"  # a Monday


def console() -> Console:
    return Console(file=io.StringIO(), width=200, highlight=False, color_system=None,
                   soft_wrap=True)


def text_of(con: Console) -> str:
    assert isinstance(con.file, io.StringIO)
    return con.file.getvalue()


def run(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="harness predict")
    add_arguments(parser)
    con = console()
    assert predict_command(parser.parse_args(argv), con) == 0
    return text_of(con)


def run_json(**options: Any) -> dict[str, Any]:
    con = console()
    assert predict_command(None, con, json=True, **options) == 0
    data = json.loads(text_of(con))
    assert isinstance(data, dict)
    return data


def test_arguments_on_a_subparser() -> None:
    parser = argparse.ArgumentParser(prog="harness")
    sub = parser.add_subparsers(dest="command")
    add_arguments(sub.add_parser("predict"))
    args = parser.parse_args(["predict"])
    assert (args.mta, args.set_values, args.failure, args.first_failure, args.json,
            args.all_attempts) == ("exchange", [], "message", "now", False, False)
    args = parser.parse_args(["predict", "--mta", "postfix", "--set", "a=1", "--set", "b=2",
                              "--failure", "connection", "--first-failure", START, "--json",
                              "--all"])
    assert (args.mta, args.set_values, args.failure, args.first_failure, args.json,
            args.all_attempts) == ("postfix", ["a=1", "b=2"], "connection", START, True, True)
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "--mta", "sendmail"])


def test_text_exchange_defaults() -> None:
    out = run(["--first-failure", START])
    lines = out.splitlines()
    assert lines[0].startswith("Exchange Server, after a 4xx reply to the message")
    assert "first failure Mon 2025-01-06 09:00:00 (UTC+00:00)" in out
    assert ("settings: MessageRetryInterval 00:15:00, DelayNotificationTimeout 04:00:00, "
            "MessageExpirationTimeout 2.00:00:00") in out
    # the table: first rows, the shortened run of 15-minute retries, the last row
    assert any(line.split() == ["1", "Mon", "2025-01-06", "09:00:00", "0s"] for line in lines)
    assert any(line.split() == ["2", "Mon", "2025-01-06", "09:15:00", "+15m", "15m"]
               for line in lines)
    assert "188 more, every 15m" in out
    assert any(line.split() == ["192", "Wed", "2025-01-08", "08:45:00", "+1d23h45m", "15m"]
               for line in lines)
    assert "delay notice  Mon 2025-01-06 13:00:00  (+4h)" in out
    assert "bounce (NDR)  Wed 2025-01-08 09:00:00  (+2d)" in out
    assert "192 attempts, the last at +1d23h45m" in out
    assert "notes" in out and "MessageRetryInterval" in out


def test_text_connection_failure_lists_the_three_stages() -> None:
    out = run(["--failure", "connection", "--first-failure", START])
    assert "after a failed connection" in out
    assert "QueueGlitchRetryCount 4" in out and "OutboundConnectionFailureRetryInterval" in out
    rows = [line.split() for line in out.splitlines()]
    since_previous = {r[0]: r[-1] for r in rows if r and r[0].isdigit() and len(r) == 6}
    assert since_previous["2"] == "1m" and since_previous["6"] == "5m"
    assert since_previous["12"] == "10m"
    assert "delay notice  Mon 2025-01-06 13:04:00  (+4h4m)" in out


def test_text_all_lists_every_attempt() -> None:
    out = run(["--all", "--first-failure", START])
    assert "more, every" not in out
    rows = [line.split() for line in out.splitlines()]
    numbered = [r for r in rows if r and r[0].isdigit() and len(r) >= 5 and r[1] in (
        "Mon", "Tue", "Wed")]
    assert [int(r[0]) for r in numbered] == list(range(1, 193))


def test_text_postfix_with_overrides_and_offset() -> None:
    out = run(["--mta", "postfix", "--set", "delay_warning_time=4h",
               "--set", "maximal_queue_lifetime=1d", "--first-failure",
               "2025-01-06T09:00:00+01:00"])
    assert out.startswith("Postfix, after a 4xx reply")
    assert "(UTC+01:00)" in out
    assert "delay_warning_time 4h (set)" in out and "maximal_queue_lifetime 1d (set)" in out
    # 17400 s = 4h50m after 09:00
    assert "delay notice  Mon 2025-01-06 13:50:00  (+4h50m)" in out
    # 88800 s = 1d40m
    assert "bounce (NDR)  Tue 2025-01-07 09:40:00  (+1d40m)" in out


def test_text_no_delay_notice() -> None:
    out = run(["--mta", "postfix", "--first-failure", START])
    assert "delay notice  none" in out
    assert "bounce (NDR)  Sat 2025-01-11 09:20:00  (+5d20m)" in out


def test_json_output() -> None:
    data = run_json(mta="exchange", set=["MessageRetryInterval=00:05:00",
                                         "MessageExpirationTimeout=01:00:00"],
                    first_failure=START)
    assert data["mta"] == "exchange" and data["failure"] == "message"
    assert data["first_failure"] == "2025-01-06T09:00:00+00:00"
    assert data["settings"]["MessageRetryInterval"] == "00:05:00"
    assert data["overridden"] == ["MessageRetryInterval", "MessageExpirationTimeout"]
    assert [a["at"] for a in data["attempts"]] == [i * 300.0 for i in range(12)]
    assert data["attempts"][0] == {"n": 1, "at": 0.0, "since_previous": None,
                                   "time": "2025-01-06T09:00:00+00:00"}
    assert data["attempts"][11] == {"n": 12, "at": 3300.0, "since_previous": 300.0,
                                    "time": "2025-01-06T09:55:00+00:00"}
    assert data["delay_notice_at"] is None and data["delay_notice_time"] is None
    assert data["expires_at"] == 3600.0
    assert data["expires_time"] == "2025-01-06T10:00:00+00:00"
    assert data["notes"]


def test_json_exim_and_settings_mapping() -> None:
    data = run_json(mta="exim", settings={"retry": "F,1m,1s", "queue_interval": "1s",
                                          "delay_warning": "20s"},
                    first_failure=datetime(2025, 1, 6, 9, 0, tzinfo=UTC))
    assert len(data["attempts"]) == 62
    assert data["delay_notice_at"] == 20.0
    assert data["delay_notice_time"] == "2025-01-06T09:00:20+00:00"
    assert data["expires_time"] == "2025-01-06T09:01:01+00:00"
    assert data["settings"]["retry"] == "F,1m,1s"


def test_first_failure_now_and_naive_local_times() -> None:
    data = run_json(mta="postfix")  # now, as an aware local time
    first = datetime.fromisoformat(data["first_failure"])
    assert first.tzinfo is not None
    assert abs((datetime.now(UTC) - first).total_seconds()) < 60
    data = run_json(mta="postfix", first_failure="2025-01-06T09:00:00")
    assert datetime.fromisoformat(data["first_failure"]).utcoffset() is not None
    assert data["first_failure"].startswith("2025-01-06T09:00:00")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"set": ["MessageRetryInterval"]}, "expected NAME=VALUE"),
        ({"set": ["=5m"]}, "expected NAME=VALUE"),
        ({"set": ["MessageRetryIntervall=00:05:00"]}, "did you mean MessageRetryInterval"),
        ({"set": ["MessageRetryInterval=5"]}, "has no unit"),
        ({"mta": "postfix", "set": ["minimal_backoff_time=soon"]}, "minimal_backoff_time"),
        ({"first_failure": "yesterday"}, "ISO 8601"),
        ({"mta": "sendmail"}, "use one of"),
        ({"failure": "banner"}, "message or connection"),
    ],
)
def test_errors_are_harness_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(PredictError, match=message) as info:
        predict_command(None, console(), **options)
    assert isinstance(info.value, HarnessError)


def test_namespace_and_keyword_overrides() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--mta", "postfix", "--first-failure", START])
    con = console()
    # keywords win over the Namespace
    assert predict_command(args, con, mta="exim", json=True) == 0
    assert json.loads(text_of(con))["mta"] == "exim"
