"""Parsers for the small value languages of scenario files: durations
("250ms", "5s", "2m"), sizes ("10MB"), comparisons ("< 60s", "2..5") and
SMTP replies ("550 5.1.1 text").

Pure functions; each raises ValueError with a message fit for a user, which
the loader turns into a positioned problem."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
# Decimal units as mail servers advertise them (Exchange "10 MB" = 10,485,760 in
# practice, but SIZE is in octets and users write what they mean); binary ones too.
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_duration(text: str | int | float) -> float:
    """Seconds from "250ms", "5s", "2m", "1h", "1d" or a bare number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"expected a duration such as 5s or 250ms, got {text!r}")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise ValueError(f"a duration must be a finite number, got {text!r}")
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration such as 5s, 250ms or 2m, got {text!r}")
    unit = (m.group(2) or "s").lower()
    seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    if not math.isfinite(seconds):
        raise ValueError(f"duration {text!r} is too large")
    return seconds


def parse_size(text: str | int) -> int:
    """Octets from "10MB", "512KiB", "1024" or a bare number."""
    if isinstance(text, bool):
        raise ValueError(f"expected a size such as 10MB, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("a size cannot be negative")
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"expected a size such as 10MB, 512KiB or 1024, got {text!r}")
    unit = (m.group(2) or "b").lower()
    octets = float(m.group(1)) * _SIZE_UNITS[unit]
    if not math.isfinite(octets):
        raise ValueError(f"size {text!r} is too large")
    return int(octets)


Op = Literal["<", "<=", ">", ">=", "==", "!="]
_COMPARE = re.compile(r"^\s*(<=|>=|==|!=|<|>|=)?\s*(.+?)\s*$")
# Bounds may hold a decimal point ("1.5s..3s"); the lazy low bound stops at "..".
_RANGE = re.compile(r"^\s*([^\s<>=!]\S*?)\s*\.\.\s*(\S*)\s*$")


@dataclass(frozen=True)
class Compare:
    """A numeric test: `op value`, or an inclusive range lo..hi (hi may be open)."""

    op: Op | Literal[".."]
    value: float
    high: float | None = None
    text: str = ""

    def holds(self, x: float) -> bool:
        if self.op == "..":
            return x >= self.value and (self.high is None or x <= self.high)
        return {
            "<": x < self.value,
            "<=": x <= self.value,
            ">": x > self.value,
            ">=": x >= self.value,
            "==": x == self.value,
            "!=": x != self.value,
        }[self.op]

    def __str__(self) -> str:
        return self.text


def parse_compare(text: str | int | float, unit: Literal["count", "duration", "size"]) -> Compare:
    """Parse "3", "2..5", "3..", ">= 2", "< 60s", ">1MB" for the given unit."""

    def number(s: str) -> float:
        if unit == "duration":
            return parse_duration(s)
        if unit == "size":
            return float(parse_size(s))
        if not re.fullmatch(r"\d+", s):
            raise ValueError(f"expected a whole number, got {s!r}")
        return float(int(s))

    if isinstance(text, bool):
        raise ValueError(f"expected a number or a comparison such as '>= 2', got {text!r}")
    if isinstance(text, (int, float)):
        return Compare("==", number(str(text)) if unit != "duration" else parse_duration(text),
                       text=str(text))
    r = _RANGE.match(text)
    if r:
        lo = number(r.group(1))
        hi = number(r.group(2)) if r.group(2) else None
        if hi is not None and hi < lo:
            raise ValueError(f"range {text!r} is empty: {r.group(2)} is below {r.group(1)}")
        return Compare("..", lo, hi, text=text.strip())
    m = _COMPARE.match(text)
    if not m or not m.group(2):
        raise ValueError(f"expected a comparison such as '>= 2' or a range '2..5', got {text!r}")
    op = m.group(1) or "=="
    if op == "=":
        op = "=="
    return Compare(op, number(m.group(2)), text=text.strip())  # type: ignore[arg-type]


_REPLY = re.compile(r"^(\d{3})(?:[ -](.*))?$", re.DOTALL)
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: basic code, optional enhanced status, one or more text lines."""

    code: int
    enhanced: str | None
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    def render(self) -> list[str]:
        """Wire lines without CRLF: '550-5.1.1 first', '550 5.1.1 last'."""
        lines = self.lines or ("",)
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            body = f"{self.enhanced} {line}" if self.enhanced else line
            out.append(f"{self.code}{sep}{body}".rstrip())
        return out

    def __str__(self) -> str:
        return " / ".join(self.render())


def parse_reply_line(text: str) -> Reply:
    """Parse one reply line "CODE [X.Y.Z] text" and check code and class agree."""
    if not isinstance(text, str):
        raise ValueError(f"expected a reply such as '550 5.1.1 No such user', got {text!r}")
    text = text.strip()
    if "\r" in text or "\n" in text:
        raise ValueError("a reply line cannot contain a line break (use a list for multi-line)")
    m = _REPLY.match(text)
    if not m:
        raise ValueError(
            f"expected a reply such as '550 5.1.1 No such user', got {text!r}"
        )
    code = int(m.group(1))
    if not 200 <= code <= 599:
        raise ValueError(f"reply code {code} is outside 200-599")
    rest = (m.group(2) or "").strip()
    enhanced: str | None = None
    first, _, after = rest.partition(" ")
    if re.fullmatch(r"\d+\.\d+\.\d+", first):
        em = _ENHANCED.match(first)
        if not em:
            raise ValueError(
                f"enhanced status {first!r} is not class.subject.detail with class 2, 4 or 5"
            )
        if code // 100 == 3:
            raise ValueError(f"a {code} reply takes no enhanced status code")
        if int(em.group(1)) != code // 100:
            raise ValueError(
                f"enhanced status {first} disagrees with reply code {code}: "
                f"its class must be {code // 100}"
            )
        enhanced = first
        rest = after.strip()
    return Reply(code, enhanced, (rest,))


def parse_reply(value: str | list[str]) -> Reply:
    """A reply from one line or a list of lines (a multi-line reply with one code)."""
    if isinstance(value, list):
        if not value:
            raise ValueError("a multi-line reply needs at least one line")
        parts = [parse_reply_line(v) for v in value]
        codes = {p.code for p in parts}
        if len(codes) > 1:
            raise ValueError(
                f"all lines of a multi-line reply need the same code, got {sorted(codes)}"
            )
        statuses = {p.enhanced for p in parts}
        if len(statuses) > 1:
            raise ValueError("all lines of a multi-line reply need the same enhanced status")
        return Reply(parts[0].code, parts[0].enhanced, tuple(p.lines[0] for p in parts))
    return parse_reply_line(value)


def parse_next_hop(text: str) -> tuple[str, int]:
    """'HOST:PORT' ('[::1]:25' for IPv6) of a server to pass mail on to."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or (":" in host.strip("[]") and not text.startswith("[")):
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:2526, got {text!r}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"the port of {text!r} must be a number from 1 to 65535")
    return host, int(port)
