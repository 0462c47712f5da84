"""What every evidence reader shares: problems with their position, SMTP
replies found in log text, text decoding, time parsing, CSV with a header.

May know: text and bytes handed in, the standard library's csv, json,
datetime and re. May not know: files, sockets, storage, clocks (a time zone
or a year is handed in through `ReadOptions`; nothing reads "now")."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any

__all__ = [
    "Endpoint",
    "EvidenceFile",
    "Problem",
    "ReadOptions",
    "Reply",
    "csv_rows",
    "decode",
    "endpoint",
    "find_reply",
    "parse_time",
]

#: (address, port) as a log writes it; the port is None when it gave none.
Endpoint = tuple[str, int | None]


@dataclass(frozen=True)
class Problem:
    """A line of a file that could not be read, or a file of another kind."""

    path: str
    line: int  # 1-based; 0: the file as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line else \
            f"{self.path}: {self.message}"


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """What a log does not say about itself.

    `tz`: the zone of times written without one (syslog lines, Exim's main
    log, a PowerShell export of local times); UTC unless told. `year`: the
    year of syslog times, which carry none (a time that would lie more than
    a month after `now` is taken to be from the year before). `now`: epoch
    seconds, for that year rule."""

    tz: tzinfo = UTC
    year: int | None = None
    now: float | None = None


@dataclass(frozen=True, kw_only=True)
class EvidenceFile:
    """One file read: its kind, its records in file order, what went wrong."""

    path: str
    kind: str  # a key of READERS ("postfix", "exchange-send-protocol", ...)
    title: str  # what it is, in words
    records: tuple[Any, ...]
    problems: tuple[Problem, ...] = ()
    #: The smallest step its times can show, in seconds (1.0 for syslog).
    resolution: float = 0.001
    #: Facts about the file a reader wants to pass on (log type, version).
    notes: tuple[str, ...] = ()
    header: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------- SMTP replies

_REPLY = re.compile(r"(?<![\w.])([2-5]\d\d)(?:[ -]+([2-5]\.\d{1,3}\.\d{1,3})(?![\d.]))?"
                    r"(?:[ -](.*))?$", re.S)
#: Where logs quote a remote server's reply inside their own words.
_QUOTES = (
    re.compile(r"\{LED=([^}]*)\}"),                       # Exchange queues: [{LRT=..};{LED=..}]
    re.compile(r'responded with:?\s*"([^"]+)"', re.I),    # Exchange: Primary target IP ... "451 .."
    re.compile(r"\bsaid:\s*(.*?)(?:\s+\(in reply to [^)]*\))?\s*$", re.I | re.S),  # Postfix
    re.compile(r"\brefused to talk to me:\s*(.*)$", re.I | re.S),  # Postfix, at the banner
    re.compile(r"SMTP error from remote (?:mail server|mailer) after .*?:"
               r"\s*([2-5]\d\d(?:[ -].*)?)$", re.I | re.S),  # Exim
    re.compile(r"Remote server returned '([^']*)'", re.I),  # Exchange NDR text
)


@dataclass(frozen=True)
class Reply:
    """An SMTP reply as a log quotes it: "451 4.7.1 Greylisted"."""

    code: int
    enhanced: str | None
    text: str  # the whole reply as quoted (first line when several were joined)

    @classmethod
    def parse(cls, text: str | None) -> Reply | None:
        """A reply that starts the text, or None."""
        if not text:
            return None
        text = text.strip().strip('"').strip()
        m = _REPLY.match(text)
        if m is None:
            return None
        return cls(int(m.group(1)), m.group(2), " ".join(text.split()))

    @property
    def message(self) -> str:
        """The words after the codes."""
        m = _REPLY.match(self.text)
        return (m.group(3) or "").strip() if m else self.text

    def agrees(self, other: Reply) -> bool:
        """The same reply: same code, same enhanced code when both give one,
        and one text starts the other (logs cut long replies, join or drop
        continuation lines)."""
        if self.code != other.code:
            return False
        if self.enhanced and other.enhanced and self.enhanced != other.enhanced:
            return False
        a, b = _norm(self.message), _norm(other.message)
        return not a or not b or a.startswith(b) or b.startswith(a)

    def __str__(self) -> str:
        return self.text


def _norm(text: str) -> str:
    return " ".join(text.lower().replace('"', "").split())


def find_reply(text: str | None) -> Reply | None:
    """The remote SMTP reply a log line quotes, wherever it stands: inside
    Exchange's LED={...} or 'responded with: "..."', after Postfix's 'said:',
    after Exim's 'SMTP error from remote mail server after ...:', or at the
    start."""
    if not text:
        return None
    for rx in _QUOTES:
        m = rx.search(text)
        if m:
            inner = m.group(1)
            nested = find_reply(inner) if inner != text else None
            got = nested or Reply.parse(inner)
            if got is not None:
                return got
    return Reply.parse(text)


# -------------------------------------------------------------------- text

def decode(data: bytes | str) -> str:
    """Text from a file's bytes: a BOM says UTF-8 or UTF-16 (PowerShell 5.1's
    Out-File and Exchange Online's extended reports write UTF-16); UTF-16
    without a BOM is recognised by its NULs; anything else is UTF-8, with
    bytes that are not shown as U+FFFD (nothing is lost silently: the line
    still parses, or says why not)."""
    if isinstance(data, str):
        return data[1:] if data.startswith("\ufeff") else data
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", "replace")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", "replace")
    head = data[:200]
    if len(head) >= 4 and head.count(b"\x00") * 3 >= len(head):
        return data.decode("utf-16-le" if head[1:2] == b"\x00" else "utf-16-be", "replace")
    return data.decode("utf-8", "replace")


def endpoint(text: str | None) -> Endpoint | None:
    """'10.0.0.5:25', '[::1]:25', '::1' (no port) -> (address, port)."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        return host, int(port) if port.isdigit() else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port) if port.isdigit() else None
    return text, None


def csv_rows(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number of the row's start, cells) for each CSV row; quoted
    cells may span lines."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    for row in reader:
        yield start, row
        start = reader.line_num + 1


# --------------------------------------------------------------------- time

_US = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})\s+(\d{1,2}):(\d{2})(?::(\d{2})(\.\d+)?)?"
                 r"\s*([AaPp][Mm])?$")
_DOTNET = re.compile(r"^\\?/Date\((-?\d+)([+-]\d{4})?\)\\?/$")
_LOOSE = re.compile(r"^(\d{4})[-/](\d{1,2})[-/](\d{1,2})[ T](\d{1,2}):(\d{2}):(\d{2})(\.\d+)?"
                    r"\s*(Z|GMT|UTC|[+-]\d{2}:?\d{2})?$")


def parse_time(text: str, tz: tzinfo = UTC) -> float | None:
    """Epoch seconds (UTC) of a time as Exchange, PowerShell, syslog or Exim
    write it, or None. Understood: ISO 8601 with any number of fraction
    digits and Z or an offset; "2003-8-12 0:58:14 GMT"; PowerShell's en-US
    "8/20/2018 11:32:37 AM"; Windows PowerShell JSON "/Date(1554854402036)/".
    A time without a zone is in `tz`."""
    text = text.strip()
    if not text:
        return None
    m = _DOTNET.match(text)
    if m:
        return int(m.group(1)) / 1000.0
    m = _LOOSE.match(text)
    if m:
        y, mo, d, h, mi, s = (int(x) for x in m.groups()[:6])
        frac = float(m.group(7) or 0)
        zone = _zone(m.group(8), tz)
        try:
            return datetime(y, mo, d, h, mi, s, tzinfo=zone).timestamp() + frac
        except ValueError:
            return None
    m = _US.match(text)
    if m:
        mo, d, y, h, mi = (int(x) for x in m.groups()[:5])
        s = int(m.group(6) or 0)
        frac = float(m.group(7) or 0)
        half = (m.group(8) or "").upper()
        if half:
            if not 1 <= h <= 12:
                return None
            h = h % 12 + (12 if half == "PM" else 0)
        try:
            return datetime(y, mo, d, h, mi, s, tzinfo=tz).timestamp() + frac
        except ValueError:
            return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=tz)
    return dt.timestamp()


def _zone(text: str | None, default: tzinfo) -> tzinfo:
    if not text:
        return default
    if text in ("Z", "GMT", "UTC"):
        return UTC
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:4])))


def header_fields(value: str, sep: str = ",") -> list[str]:
    """A '#Fields:' value as names: 'date-time,connector-id' -> [...]."""
    return [f.strip() for f in value.split(sep) if f.strip()] if sep != " " else value.split()


def cell(row: Sequence[str], index: dict[str, int], *names: str) -> str:
    """The first of `names` the header has, from a row ('' when absent)."""
    for name in names:
        i = index.get(name)
        if i is not None and i < len(row):
            return row[i]
    return ""


@dataclass
class HashHeaderCsv:
    """A log whose header lines start with '#' ('#Software: ...', '#Fields:
    a,b,c') and whose other lines are CSV rows (Exchange's protocol and
    message tracking logs). A '#Fields:' line anywhere (files joined end to
    end) sets the fields for the rows after it."""

    path: str
    header: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    def rows(self, text: str, sep: str = ","
             ) -> Iterator[tuple[int, dict[str, int], list[str]]]:
        index: dict[str, int] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if line.startswith("#"):
                key, colon, value = line[1:].partition(":")
                if colon:
                    self.header[key.strip().lower()] = value.strip()
                    if key.strip().lower() == "fields":
                        names = header_fields(value, sep)
                        index = {name.lower(): i for i, name in enumerate(names)}
                continue
            if not index:
                self.problems.append(Problem(self.path, n, "a row before any #Fields: line"))
                continue
            if sep == ",":
                try:
                    cells = next(csv.reader([line]))
                except (csv.Error, StopIteration) as e:
                    self.problems.append(Problem(self.path, n, f"not a CSV row: {e}"))
                    continue
            else:
                cells = line.split(sep)
            if len(cells) < len(index):
                # trailing empty fields may be cut; a row this short is not one
                if len(cells) < min(3, len(index)):
                    self.problems.append(Problem(
                        self.path, n, f"{len(cells)} fields, the #Fields: line names "
                        f"{len(index)}"))
                    continue
                cells = cells + [""] * (len(index) - len(cells))
            yield n, index, cells
