"""A stored message as people read it: its headers, its parts, its text and
HTML, whatever its bytes are.

Captured mail is stored exactly as received, and much of what a harness
captures is odd on purpose: addresses like `a@`, `Message-ID: <@>`,
encoded words that do not decode, bytes that are not UTF-8, a charset or a
transfer encoding nobody knows, multiparts nested a thousand deep. The API's
message view, its /html, the page and `harness show` all read messages
through `view()`, which never raises for any bytes: what cannot be decoded
is shown escaped (`\\xff`), and each thing that could not be shown as
intended is said in `problems`.

Why not the email package's modern API (policy.default): its header classes
parse every address and Message-ID on access and raise on some that are
merely odd (an IndexError for `From: a@`), and its parser recurses once per
nested multipart. So the parser runs with the lenient compat32 rules and
headers come back exactly as sent (`_AsSent`); this module decodes them for
display itself (RFC 6532 UTF-8, RFC 2047 encoded words where they decode)
and walks the parts with its own stack, to a bounded depth.

Pure: bytes in, a plain value out; no I/O."""

from __future__ import annotations

import codecs
import contextlib
import re
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32
from typing import Any

#: Multiparts (and attached messages) nested deeper than this are not
#: listed; Python's parser gives up near a thousand levels anyway.
MAX_DEPTH = 64
#: At most this many parts and headers are listed (the rest are counted).
MAX_PARTS = 1000
MAX_HEADERS = 2000
#: Codecs Python knows that are transformations, not mail charsets (some
#: cost more than linear time on hostile input): treated as unknown.
NOT_CHARSETS = frozenset({"punycode", "idna", "unicode-escape", "raw-unicode-escape"})
#: The transfer encodings the email package decodes (others: shown as sent).
KNOWN_ENCODINGS = frozenset({"", "7bit", "8bit", "binary", "base64", "quoted-printable",
                             "x-uuencode", "uuencode", "uue", "x-uue"})


class _AsSent(Compat32):
    """compat32's lenient parsing, with header values handed back exactly as
    parsed (a str whose non-ASCII bytes are surrogate escapes), never turned
    into Header objects or parsed as addresses."""

    def header_fetch_parse(self, name: str, value: str) -> str:
        return value


_POLICY = _AsSent()


@dataclass(frozen=True)
class Part:
    """One leaf part: its place in the walk (0 is the message itself),
    type, file name, decoded size."""

    index: int
    content_type: str
    filename: str | None
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "content_type": self.content_type,
                "filename": self.filename, "size": self.size}


@dataclass
class View:
    """What a person is shown of one message."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    text: str | None = None
    html: str | None = None
    problems: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ escaping

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_UNFOLD = re.compile(r"\r?\n(?=[ \t])")


def _byte_escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    # a surrogate escape stands for one undecodable byte; any other
    # surrogate cannot be written as UTF-8 at all
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def clean(text: str) -> str:
    """`text` with every lone surrogate written as an escape, so it can be
    encoded as UTF-8 (JSON, HTTP bodies, a terminal)."""
    return _SURROGATE.sub(_byte_escape, text)


def printable(text: str) -> str:
    """`text` for a terminal: control characters (but tab and line ends) and
    surrogates written as escapes, so a message cannot drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", clean(text))


def _bytes_of(value: str) -> bytes:
    """The bytes a parsed value came from (non-ASCII bytes are surrogate
    escapes in what the parser hands back)."""
    try:
        return value.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:  # not from the byte parser: plain text
        return clean(value).encode("utf-8")


def header_text(value: str) -> str:
    """A header value for display: unfolded, read as UTF-8 (RFC 6532) with
    other bytes escaped, encoded words (RFC 2047) decoded where they decode
    and left as sent where they do not."""
    text = _UNFOLD.sub("", _bytes_of(value).decode("utf-8", "backslashreplace"))
    if "=?" in text:
        # the email package raises assorted errors for broken words
        # (HeaderParseError, binascii errors, LookupError, UnicodeError):
        # whatever the reason, such a value is shown as sent
        with contextlib.suppress(Exception):
            text = str(make_header(decode_header(text)))
    return clean(text).strip()


# --------------------------------------------------------------------- parts


def _charset_of(part: Message) -> str | None:
    try:
        return part.get_content_charset()
    except Exception:  # a malformed parameter: as if none was given
        return None


def _decode_text(payload: bytes, charset: str | None, where: str,
                 problems: list[str]) -> str:
    """A text part's bytes as text: its charset when Python knows it (bytes
    that are not valid in it escaped), else UTF-8 with the rest escaped."""
    if charset is None:
        return payload.decode("utf-8", "backslashreplace")
    try:
        name = codecs.lookup(charset).name
    except (LookupError, ValueError):
        name = None
    if name is None or name in NOT_CHARSETS:
        problems.append(f"{where}: unknown charset {clean(charset)!r}, shown as UTF-8 "
                        "with other bytes escaped")
        return payload.decode("utf-8", "backslashreplace")
    try:
        return payload.decode(name)
    except UnicodeError:
        problems.append(f"{where}: bytes that are not {name} are shown escaped")
    try:
        return payload.decode(name, "backslashreplace")
    except UnicodeError:  # a codec that cannot go on after an error
        return payload.decode("utf-8", "backslashreplace")


def _leaf(part: Message, index: int, view: View) -> None:
    where = f"part {index}"
    ctype = clean(part.get_content_type())
    try:
        filename = part.get_filename()
    except Exception:  # a malformed parameter: no file name
        filename = None
    cte = clean(str(part.get("content-transfer-encoding", ""))).strip().lower()
    try:
        payload = part.get_payload(decode=True)
    except Exception:  # said below
        payload = None
    if not isinstance(payload, bytes):
        view.problems.append(f"{where}: its content cannot be decoded")
        payload = b""
    if cte not in KNOWN_ENCODINGS:
        view.problems.append(f"{where}: unknown transfer encoding {cte!r}, shown as sent")
    elif any("Base64" in type(d).__name__ for d in part.defects):
        view.problems.append(f"{where}: the base64 is damaged, shown as far as it decodes")
    if len(view.parts) < MAX_PARTS:
        view.parts.append(Part(index, ctype, clean(filename) if filename else None,
                               len(payload)))
    if ctype not in ("text/plain", "text/html") or (
            view.text if ctype == "text/plain" else view.html) is not None:
        return
    text = clean(_decode_text(payload, _charset_of(part), where, view.problems))
    if ctype == "text/plain":
        view.text = text
    else:
        view.html = text


def _walk(msg: Message, view: View) -> None:
    """Every part in order (the order of Message.walk), with an explicit
    stack and no deeper than MAX_DEPTH."""
    index = 0
    too_deep = False
    stack: list[tuple[Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        if part.is_multipart():
            children = part.get_payload()
            if depth >= MAX_DEPTH:
                too_deep = True
            elif isinstance(children, list):
                stack.extend((c, depth + 1) for c in reversed(children)
                             if isinstance(c, Message))
        else:
            _leaf(part, index, view)
        index += 1
    if too_deep:
        view.problems.append(f"parts nested deeper than {MAX_DEPTH} levels are not listed")
    if len(view.parts) >= MAX_PARTS:
        view.problems.append(f"only the first {MAX_PARTS} parts are listed")


def view(raw: bytes) -> View:
    """The message's headers, parts, first text and first HTML; never raises
    for any bytes."""
    out = View()
    whole = True
    try:
        msg = BytesParser(policy=_POLICY).parsebytes(raw)
    except RecursionError:  # the parser recurses once per nested multipart
        msg = BytesParser(policy=_POLICY).parsebytes(raw, headersonly=True)
        out.problems.append("the parts nest too deeply to be read: headers only "
                            "(the raw message has everything)")
        whole = False
    items = msg.items()
    out.headers = [(clean(_bytes_of(k).decode("utf-8", "backslashreplace")), header_text(v))
                   for k, v in items[:MAX_HEADERS]]
    if len(items) > MAX_HEADERS:
        out.problems.append(f"only the first {MAX_HEADERS} of {len(items)} headers are listed")
    if whole:
        _walk(msg, out)
    return out
