"""The small value languages of scenario files: durations, sizes,
comparisons and SMTP replies (harness/scenario/values.py)."""

from __future__ import annotations

import math

import pytest

from harness.scenario.values import (
    Compare,
    Reply,
    parse_compare,
    parse_duration,
    parse_reply,
    parse_reply_line,
    parse_size,
)

# ------------------------------------------------------------------ durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("5s", 5.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        (" 5 s ", 5.0),
        ("5S", 5.0),
        ("10MS", 0.01),
        ("30", 30.0),  # a bare number is seconds
        ("0.5", 0.5),
        (7, 7.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_duration_parses(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "fast",
        "5 seconds",
        "5sec",
        "5x",
        "-5s",
        "-1",
        "1e3s",
        "5s 2m",
        "s",
        "1.s",
        "9" * 400,  # overflows a float: too large, not a crash
        "9" * 400 + "h",
        True,  # YAML booleans are not durations
        False,
        -1,
        -0.5,
        math.nan,
        math.inf,
    ],
)
def test_duration_rejects_bad_input(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)  # type: ignore[arg-type]


def test_duration_error_names_the_input_and_an_example() -> None:
    with pytest.raises(ValueError, match=r"5s.*'fast'"):
        parse_duration("fast")


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "octets"),
    [
        ("1024", 1024),
        ("0", 0),
        ("10MB", 10_000_000),
        ("10mb", 10_000_000),
        ("10 MB", 10_000_000),
        ("1KB", 1000),
        ("1GB", 1_000_000_000),
        ("512KiB", 512 * 1024),
        ("1MiB", 1024**2),
        ("2GiB", 2 * 1024**3),
        ("100B", 100),
        ("1.5MB", 1_500_000),
        (2048, 2048),
        (0, 0),
    ],
)
def test_size_parses(text: str | int, octets: int) -> None:
    assert parse_size(text) == octets


@pytest.mark.parametrize(
    "text",
    ["", "big", "10 megabytes", "10TB", "-1", "-1MB", "MB", "1e6", "9" * 400 + "MB",
     True, -1],
)
def test_size_rejects_bad_input(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)  # type: ignore[arg-type]


# ---------------------------------------------------------------- comparisons


@pytest.mark.parametrize(
    ("text", "unit", "op", "value", "high"),
    [
        ("3", "count", "==", 3, None),
        (3, "count", "==", 3, None),
        ("= 3", "count", "==", 3, None),
        ("== 3", "count", "==", 3, None),
        ("!= 3", "count", "!=", 3, None),
        ("2..5", "count", "..", 2, 5),
        ("2 .. 5", "count", "..", 2, 5),
        ("3..", "count", "..", 3, None),
        ("2..2", "count", "..", 2, 2),
        (">= 2", "count", ">=", 2, None),
        (">=2", "count", ">=", 2, None),
        ("<= 2", "count", "<=", 2, None),
        ("> 2", "count", ">", 2, None),
        ("< 60s", "duration", "<", 60, None),
        ("<1m", "duration", "<", 60, None),
        ("> 250ms", "duration", ">", 0.25, None),
        ("1.5s..3s", "duration", "..", 1.5, 3),
        ("30..", "duration", "..", 30, None),
        (30, "duration", "==", 30, None),
        (">1MB", "size", ">", 1_000_000, None),
        ("<= 512KiB", "size", "<=", 512 * 1024, None),
        ("1KB..2KB", "size", "..", 1000, 2000),
        ("1.5MB..2MB", "size", "..", 1_500_000, 2_000_000),
    ],
)
def test_compare_parses(text: str | int, unit: str, op: str, value: float,
                        high: float | None) -> None:
    c = parse_compare(text, unit)  # type: ignore[arg-type]
    assert c.op == op
    assert c.value == pytest.approx(value)
    assert c.high == (None if high is None else pytest.approx(high))


@pytest.mark.parametrize(
    ("text", "unit", "inside", "outside"),
    [
        ("3", "count", [3], [2, 4]),
        ("!= 3", "count", [2, 4], [3]),
        ("2..5", "count", [2, 3, 5], [1, 6]),
        ("3..", "count", [3, 4, 1000], [1, 2]),
        (">= 2", "count", [2, 3], [0, 1]),
        ("> 2", "count", [3], [2]),
        ("<= 2", "count", [0, 2], [3]),
        ("< 60s", "duration", [0, 59.9], [60, 61]),
        (">1MB", "size", [1_000_001], [1_000_000, 0]),
    ],
)
def test_compare_holds_at_the_boundaries(text: str, unit: str, inside: list[float],
                                        outside: list[float]) -> None:
    c = parse_compare(text, unit)  # type: ignore[arg-type]
    assert [c.holds(x) for x in inside] == [True] * len(inside)
    assert [c.holds(x) for x in outside] == [False] * len(outside)


@pytest.mark.parametrize(
    ("text", "unit", "message"),
    [
        ("5..2", "count", "empty"),
        ("60s..1s", "duration", "empty"),
        ("2MB..1MB", "size", "empty"),
        ("", "count", None),
        (">=", "count", None),
        ("lots", "count", None),
        ("2.5", "count", "whole number"),
        ("1.5..3", "count", "whole number"),
        ("-1", "count", None),
        ("..5", "count", None),
        ("1...3", "count", None),
        ("<< 2", "count", None),
        ("> 1 fortnight", "duration", None),
        ("> big", "size", None),
        (True, "count", None),
        (-1, "duration", "negative"),
    ],
)
def test_compare_rejects_bad_input(text: object, unit: str, message: str | None) -> None:
    with pytest.raises(ValueError, match=message):
        parse_compare(text, unit)  # type: ignore[arg-type]


def test_compare_renders_as_written() -> None:
    assert str(parse_compare(" >= 2 ", "count")) == ">= 2"
    assert str(Compare("..", 2, 5, text="2..5")) == "2..5"


# -------------------------------------------------------------------- replies


@pytest.mark.parametrize(
    ("text", "code", "enhanced", "lines"),
    [
        ("550 5.1.1 No such user", 550, "5.1.1", ("No such user",)),
        ("550 5.1.1 text", 550, "5.1.1", ("text",)),
        ("451 4.7.1 Greylisted, try again later", 451, "4.7.1",
         ("Greylisted, try again later",)),
        ("250 2.0.0 Ok: queued as X", 250, "2.0.0", ("Ok: queued as X",)),
        ("250 OK", 250, None, ("OK",)),
        ("421 mx closing", 421, None, ("mx closing",)),
        ("354 End data with <CR><LF>.<CR><LF>", 354, None,
         ("End data with <CR><LF>.<CR><LF>",)),
        ("550", 550, None, ("",)),
        ("550 5.1.1", 550, "5.1.1", ("",)),
        ("  550 5.1.1 padded  ", 550, "5.1.1", ("padded",)),
        ("550 5.1.10 three-digit detail", 550, "5.1.10", ("three-digit detail",)),
        ("552 5.2.2 Mailbox full; over quota", 552, "5.2.2", ("Mailbox full; over quota",)),
        ("550 5.1.1  two  spaces", 550, "5.1.1", ("two  spaces",)),
        ("550 1.2.3.4 is not an enhanced code", 550, None, ("1.2.3.4 is not an enhanced code",)),
        ("554 Ünïcödé text", 554, None, ("Ünïcödé text",)),
    ],
)
def test_reply_parses_code_enhanced_and_text(text: str, code: int, enhanced: str | None,
                                             lines: tuple[str, ...]) -> None:
    r = parse_reply(text)
    assert (r.code, r.enhanced, r.lines) == (code, enhanced, lines)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("550 5.1.1 No such user", ["550 5.1.1 No such user"]),
        ("250 OK", ["250 OK"]),
        ("550", ["550"]),
        ("550 5.1.1", ["550 5.1.1"]),
        (["550 5.7.1 first", "550 5.7.1 second"], ["550-5.7.1 first", "550 5.7.1 second"]),
        (["550 5.7.1 one", "550 5.7.1 two", "550 5.7.1 three"],
         ["550-5.7.1 one", "550-5.7.1 two", "550 5.7.1 three"]),
        (["250 first", "250 last"], ["250-first", "250 last"]),
        (["451 4.7.1 only"], ["451 4.7.1 only"]),
    ],
)
def test_reply_renders_multiline_with_hyphens(value: str | list[str], wire: list[str]) -> None:
    assert parse_reply(value).render() == wire


def test_reply_str_joins_rendered_lines() -> None:
    r = parse_reply(["550 5.7.1 first", "550 5.7.1 second"])
    assert str(r) == "550-5.7.1 first / 550 5.7.1 second"
    assert r.text == "first\nsecond"


@pytest.mark.parametrize(
    ("code", "positive"),
    [(220, True), (250, True), (354, True), (421, False), (451, False), (550, False)],
)
def test_reply_is_positive_below_400(code: int, positive: bool) -> None:
    assert Reply(code, None, ("x",)).is_positive is positive


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("199 too low", "outside 200-599"),
        ("600 too high", "outside 200-599"),
        ("099 leading zero", "outside 200-599"),
        ("999", "outside 200-599"),
        ("550 4.1.1 wrong class", "disagrees"),
        ("450 5.1.1 wrong class", "disagrees"),
        ("250 5.0.0 wrong class", "disagrees"),
        ("550 2.0.0 wrong class", "disagrees"),
        ("354 2.0.0 go ahead", "no enhanced"),
        ("334 5.7.0 auth", "no enhanced"),
        ("550 3.1.1 class three", "class 2, 4 or 5"),
        ("550 5.1.1000 detail too long", "class 2, 4 or 5"),
        ("550 5.1000.1 subject too long", "class 2, 4 or 5"),
        ("", "expected a reply"),
        ("OK", "expected a reply"),
        ("55 short", "expected a reply"),
        ("5500 long", "expected a reply"),
        ("550x glued", "expected a reply"),
        ("550 first\r\n550 second", "line break"),
        ("550 first\nsecond", "line break"),
        ([], "at least one line"),
        (["550 5.7.1 a", "451 4.7.1 b"], "same code"),
        (["550 5.7.1 a", "550 5.7.2 b"], "same enhanced"),
        (["550 5.7.1 a", "550 b"], "same enhanced"),
        (["550 5.7.1 a", "550 4.7.1 b"], "disagrees"),
    ],
)
def test_reply_checks_reject(value: str | list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_reply(value)


@pytest.mark.parametrize("value", [None, 550, 5.5, {"code": 550}])
def test_reply_line_rejects_non_text(value: object) -> None:
    with pytest.raises(ValueError, match="expected a reply"):
        parse_reply_line(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [200, 221, 250, 354, 421, 451, 500, 550, 599])
def test_reply_accepts_every_code_in_range(code: int) -> None:
    assert parse_reply(f"{code} text").code == code


@pytest.mark.parametrize(
    ("text", "enhanced"),
    [("250 2.1.0 ok", "2.1.0"), ("421 4.3.2 bye", "4.3.2"), ("554 5.7.1 no", "5.7.1")],
)
def test_reply_enhanced_class_agrees_with_code(text: str, enhanced: str) -> None:
    assert parse_reply(text).enhanced == enhanced
