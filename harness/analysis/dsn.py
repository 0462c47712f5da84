"""NDR / DSN parsing: what a bounce says happened to each recipient.

`parse_ndr(raw)` reads one message (bytes, as captured) and returns an `Ndr`,
or None when the message is not a non-delivery, delay or delivery report
(ordinary mail, auto-replies, ARF feedback reports).

Two sources, combined per recipient:

- RFC 6522 multipart/report with an RFC 3464 message/delivery-status part,
  or RFC 6533 message/global-delivery-status (UTF-8); field blocks are read
  leniently (folded lines, missing blank lines, lower-case names), and the
  same fields are recognised when a sender pastes them into a text part.
- The human-readable texts MTAs write when they send no delivery-status
  part (Exchange 5.5/2003, Exchange 2007+/Office 365, Postfix, Exim,
  Sendmail, qmail, DragonFly, OpenSMTPD, Gmail and a generic fallback). They
  also fill in what a delivery-status part left out (a missing recipient or
  diagnostic).

The status reported for a recipient is the most precise enhanced status code
(RFC 3463) the report gives for it. The code the remote server quoted in the
diagnostic beats the Status field when it has the same class and is at least
as specific: the field is the reporting MTA's translation of that reply, and
often a looser one (it is kept as `reported_status`). Generic codes (X.0.0,
and X.4.7 "expired", which RFC 3463 says should give way to the code of the
actual problem) give way to a precise code the readable text states for that
recipient. A basic reply code alone ("550 User unknown") yields no status:
nothing is invented.

May know: bytes, the standard library's `email` and `html` packages, regular
expressions. May not know: sockets, storage, asyncio, HTTP (a test enforces it).
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.errors import HeaderParseError, MessageError
from email.header import Header, decode_header, make_header
from email.message import Message
from email.policy import compat32
from typing import Literal

__all__ = [
    "Kind",
    "Ndr",
    "OriginalMessage",
    "RecipientResult",
    "find_reply_code",
    "find_status",
    "parse_ndr",
]

Kind = Literal["failure", "delay", "delivered", "relayed", "expanded"]
Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]


@dataclass(frozen=True, kw_only=True)
class RecipientResult:
    """What the report says about one recipient (RFC 3464 section 2.3 names)."""

    final_recipient: str | None
    original_recipient: str | None = None
    action: Action | None = None
    #: Enhanced status code ("5.1.1"), or None when the report gives none.
    status: str | None = None
    #: The Status field exactly as the report wrote it, when there was one.
    reported_status: str | None = None
    diagnostic_type: str | None = None  # "smtp", "x-unix", ...
    diagnostic_text: str | None = None  # "550 5.1.1 <x>... User unknown"
    remote_mta: str | None = None
    last_attempt_date: str | None = None
    will_retry_until: str | None = None
    #: The SMTP reply code found in the diagnostic (550), or None.
    reply_code: int | None = None


@dataclass(frozen=True, kw_only=True)
class OriginalMessage:
    """Headers of the message the report returns (None where absent)."""

    message_id: str | None = None
    subject: str | None = None
    from_: str | None = None
    to: str | None = None
    #: Where they came from: "message/rfc822", "text/rfc822-headers",
    #: "message/global", "message/global-headers", "inline" or None.
    source: str | None = None


@dataclass(frozen=True, kw_only=True)
class Ndr:
    """A parsed non-delivery (or delay, or delivery) report."""

    kind: Kind
    is_delay: bool
    #: Which parser recognised it: "rfc3464", "rfc6533", "exchange2003",
    #: "exchange2007", "office365", "postfix", "exim", "sendmail", "qmail", ...
    format: str
    reporting_mta: str | None = None
    arrival_date: str | None = None
    original_envelope_id: str | None = None
    recipients: tuple[RecipientResult, ...] = ()
    original: OriginalMessage = field(default_factory=OriginalMessage)
    #: The report's own Subject and From.
    subject: str | None = None
    sender: str | None = None


# --------------------------------------------------------------------------
# Status and reply codes in free text

#: An enhanced status code: not inside an IP address, a version ("v5.1.1") or
#: a longer dotted number; "550-5.7.1" (a multi-line reply) is fine.
_ESC = re.compile(r"(?:(?<=\d\d\d-)|(?<![\w.\-/=]))([245])\.([0-7])\.(\d{1,3})"
                  r"(?!\d|\.\d|-\d)")
_REPLY_BEFORE_ESC = re.compile(r"(?<![\w.])([245][0-5]\d)(?:[ \-]+|-?\s*#?)([245])\.[0-7]\.\d")
_REPLY = re.compile(r"(?:(?<= :)|(?<![\w.\-+:/=,]))([245][0-5]\d)"
                    r"(?=[ \-:;,)\]'\"]|\.(?:\s|$)|$)", re.MULTILINE)


def _code_key(code: str) -> tuple[int, int, int]:
    a, b, c = code.split(".")
    return int(a), int(b), int(c)


def _specificity(code: str) -> int:
    """2 for "5.1.1", 1 for "5.1.0" or "5.0.1", 0 for "5.0.0" and "4.4.7" (RFC 3463:
    X.4.7 should give way to the code of the actual problem)."""
    _, subject, detail = _code_key(code)
    if code in ("4.4.7", "5.4.7") or (subject == 0 and detail == 0):
        return 0
    return 1 if subject == 0 or detail == 0 else 2


def find_status(text: str | None, klass: str | None = None) -> str | None:
    """The enhanced status code ("5.1.1") an error text states, or None.

    The most specific code wins (see `_specificity`), the first among equals.
    With `klass` ("2", "4" or "5"), only codes of that class count; without,
    only 4.X.X and 5.X.X codes do."""
    if not text:
        return None
    best: str | None = None
    for m in _ESC.finditer(text):
        if m.group(1) != (klass or m.group(1)) or (not klass and m.group(1) == "2"):
            continue
        code = f"{m.group(1)}.{m.group(2)}.{int(m.group(3))}"
        if best is None or _specificity(code) > _specificity(best):
            best = code
    return best


def find_reply_code(text: str | None, klass: str | None = None) -> int | None:
    """The SMTP reply code (550) an error text states, or None.

    A code written before an enhanced status code of its class ("550 5.1.1")
    is preferred; with `klass`, the first code of that class, if any."""
    if not text:
        return None
    for m in _REPLY_BEFORE_ESC.finditer(text):
        if m.group(1)[0] == m.group(2) and m.group(1)[0] == (klass or m.group(1)[0]):
            return int(m.group(1))
    codes = [m.group(1) for m in _REPLY.finditer(text)]
    pick = next((c for c in codes if c[0] == klass), codes[0] if codes else None)
    return int(pick) if pick else None


def _prefer(reported: str | None, in_text: str | None, reply: int | None) -> str | None:
    """Choose between the Status field and the code in the diagnostic text.

    The diagnostic is usually the remote server's own reply; the Status field
    is the reporting MTA's translation of it, often a looser one (Sendmail
    reports 5.1.1 for a "550 5.7.1 IP address blacklisted"). So the code in
    the text wins when it has the same class and is at least as specific;
    when the classes differ, the class of the SMTP reply code decides."""
    if not reported:
        return in_text
    if not in_text or in_text == reported:
        return reported
    if reported[0] != in_text[0]:
        cls = str(reply)[0] if reply else None
        return in_text if cls == in_text[0] else reported
    return in_text if _specificity(in_text) >= _specificity(reported) else reported


# --------------------------------------------------------------------------
# Loading and decoding

_SPACES = re.compile(r"[ \t]+")


def _unsurrogate(text: str) -> str:
    """Undo the email package's surrogateescape of raw 8-bit (UTF-8) bytes."""
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        return text.encode("ascii", "surrogateescape").decode("utf-8", "replace")
    return text


def _decode_header(value: object) -> str | None:
    if value is None:
        return None
    text: str
    if isinstance(value, Header):  # compat32's wrapper for raw 8-bit header bytes
        pieces = []
        for chunk, charset in decode_header(value):
            if isinstance(chunk, bytes):
                cs = None if charset in (None, "unknown-8bit") else charset
                pieces.append(_charset_decode(chunk, cs))
            else:
                pieces.append(chunk)
        text = "".join(pieces)
    else:
        text = _unsurrogate(str(value))
    with contextlib.suppress(MessageError, HeaderParseError, LookupError, UnicodeError,
                             ValueError):
        text = str(make_header(decode_header(text)))
    text = _SPACES.sub(" ", text.replace("\r", "").replace("\n", " ")).strip()
    return text or None


def _header(msg: Message, name: str) -> str | None:
    try:
        return _decode_header(msg.get(name))
    except (TypeError, ValueError):
        return None


def _load(raw: bytes) -> Message | None:
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if data.startswith(b"From ") and b"\n" in data:
        data = data.split(b"\n", 1)[1]  # an mbox separator line
    if not data.strip():
        return None
    return message_from_bytes(data, policy=compat32)


_CJK_FALLBACKS = {
    "iso-2022-jp": ("euc-jp", "cp932"), "euc-jp": ("cp932", "iso-2022-jp"),
    "shift_jis": ("cp932", "euc-jp"), "gb2312": ("gb18030",), "gbk": ("gb18030",),
    "euc-kr": ("cp949",), "big5": ("big5hkscs",),
}


def _charset_decode(data: bytes, charset: str | None) -> str:
    """Bytes as text: the declared charset, then UTF-8, then the encodings a
    mislabelled CJK part usually is in, then Latin-1 (which never fails)."""
    fallbacks = _CJK_FALLBACKS.get((charset or "").lower(), ())
    for cs in (charset, "utf-8", *fallbacks):
        if not cs:
            continue
        try:
            return data.decode(cs)
        except (LookupError, ValueError):  # unknown name, NUL in the name, bad bytes
            continue
    return data.decode("latin-1")


def _payload_text(part: Message) -> str:
    """A non-multipart part's content, transfer-decoded, as text."""
    try:
        payload = part.get_payload(decode=True)
    except _DAMAGE:
        payload = None
    if isinstance(payload, bytes):
        try:
            charset = part.get_content_charset()
        except _DAMAGE:
            charset = None
        text = _charset_decode(payload, charset)
    else:
        raw = _payload(part)
        text = raw if isinstance(raw, str) else ""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _serialise_fields(part: Message) -> str:
    """Field blocks the email package split into header-only messages."""
    out: list[str] = []
    payload = _payload(part)
    if isinstance(payload, list):
        for sub in payload:
            lines = [f"{k}: {v}" for k, v in sub.items()]
            body = _payload(sub)
            if isinstance(body, str) and body.strip():
                lines.append(body.strip("\n"))
            out.append("\n".join(lines))
        return _unsurrogate("\n\n".join(out))
    return _payload_text(part)


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except (ValueError, TypeError, AttributeError):
        return "text/plain"


#: What the email package raises on damaged input it parsed without complaint
#: (a NUL or an unknown name in a charset parameter, a bad encoding).
_DAMAGE = (ValueError, LookupError, TypeError, AssertionError, MessageError)


def _payload(part: Message) -> list[Message] | str:
    """A part's payload, undecoded: sub-parts, or text ("" if unreadable)."""
    try:
        payload = part.get_payload()
    except _DAMAGE:
        return ""
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    return payload if isinstance(payload, str) else ""


def _walk(part: Message) -> Iterator[Message]:
    """Message.walk(), minus its exceptions on damaged parts."""
    yield part
    payload = _payload(part)
    if isinstance(payload, list):
        for sub in payload:
            yield from _walk(sub)


def _filename(part: Message) -> str:
    try:
        return (part.get_filename() or "").lower()
    except _DAMAGE:
        return ""


# --------------------------------------------------------------------------
# Field blocks (RFC 3464 section 2)

_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9\-]*)[ \t]*:[ \t]*(.*)$")
_RECIPIENT_FIELDS = frozenset({
    "final-recipient", "original-recipient", "action", "status", "remote-mta",
    "diagnostic-code", "last-attempt-date", "will-retry-until", "x-actual-recipient",
    "final-log-id",
})
_MESSAGE_FIELDS = frozenset({
    "reporting-mta", "arrival-date", "original-envelope-id", "received-from-mta",
    "dsn-gateway", "x-postfix-queue-id", "x-postfix-sender", "x-original-message-id",
})
_DSN_FIELDS = _RECIPIENT_FIELDS | _MESSAGE_FIELDS


def _field_blocks(text: str) -> list[dict[str, str]]:
    """Blocks of `Name: value` fields; a repeated recipient field starts a
    new block even without the blank line between them."""
    blocks: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    last: str | None = None
    for line in text.split("\n"):
        if not line.strip():
            if cur:
                blocks.append(cur)
            cur, last = {}, None
            continue
        if line[0] in " \t" and last is not None:
            cur[last] = f"{cur[last]} {line.strip()}".strip()
            continue
        m = _FIELD.match(line.strip())
        if m and m.group(1).lower() in _DSN_FIELDS:
            name = m.group(1).lower()
            if name in cur and name in ("final-recipient", "original-recipient", "action",
                                        "status"):
                blocks.append(cur)
                cur = {}
            cur[name] = m.group(2).strip()
            last = name
        elif m:
            last = None  # an unknown field: kept out, its continuation too
        elif last == "diagnostic-code":
            cur[last] = f"{cur[last]} {line.strip()}"
        else:
            last = None
    if cur:
        blocks.append(cur)
    return blocks


_XTEXT = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")  # RFC 6533 section 3


def _address_field(value: str | None) -> str | None:
    """`rfc822; <a@b>` -> `a@b` (also `utf-8;` with \\x{...} escapes)."""
    if not value:
        return None
    kind, sep, addr = value.partition(";")
    if not sep:
        addr = kind
    addr = addr.strip().strip("<>").strip()
    if "\\x{" in addr:
        addr = _XTEXT.sub(lambda m: chr(min(int(m.group(1), 16), 0x10FFFF)), addr)
    m = _EMAIL.search(addr)
    if m:
        return m.group(0)
    return addr or None


def _typed_value(value: str | None) -> tuple[str | None, str | None]:
    """`smtp; 550 ...` -> ("smtp", "550 ...")."""
    if not value:
        return None, None
    kind, sep, rest = value.partition(";")
    if sep and re.fullmatch(r"\s*[A-Za-z][A-Za-z0-9\-]*\s*", kind):
        return kind.strip().lower(), _clean(rest)
    return None, _clean(value)


def _clean(text: str | None) -> str | None:
    if text is None:
        return None
    text = _SPACES.sub(" ", text.replace("\n", " ")).strip()
    return text or None


_STATUS_FIELD = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")


def _status_field(value: str | None) -> str | None:
    if not value:
        return None
    m = _STATUS_FIELD.search(value)
    if not m:
        return None
    return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}"


_ACTIONS: dict[str, Action] = {
    "failed": "failed", "failure": "failed", "fail": "failed", "undeliverable": "failed",
    "delayed": "delayed", "delay": "delayed", "delivered": "delivered",
    "deliverable": "delivered",  # Postfix's address verification reports
    "relayed": "relayed", "expanded": "expanded",
}


def _action(value: str | None) -> Action | None:
    words = (value or "").split()
    return _ACTIONS.get(words[0].lower().strip(".,;()")) if words else None


# --------------------------------------------------------------------------
# Working state for one recipient


@dataclass
class _Draft:
    address: str | None = None
    original: str | None = None
    action: Action | None = None
    reported: str | None = None
    diag_type: str | None = None
    diag: str | None = None
    remote_mta: str | None = None
    last_attempt: str | None = None
    retry_until: str | None = None
    #: What the readable text says about this recipient, when a delivery-status
    #: part says it too: consulted only where the part states no precise code.
    extra: str | None = None

    def finish(self, *, delay: bool) -> RecipientResult:
        diag = _clean(self.diag)
        # an X-Unix diagnostic is an exit status ("255"), not an SMTP reply
        reply = None if self.diag_type == "x-unix" else find_reply_code(diag)
        cls = self.reported[0] if self.reported else (str(reply)[0] if reply else None)
        in_text = find_status(diag, cls) or find_status(diag)
        status = _prefer(self.reported, in_text, reply)
        if self.extra and (status is None or _specificity(status) == 0):
            more = find_status(self.extra, status[0] if status else None)
            if more and (status is None or _specificity(more) > _specificity(status)):
                status = more
            if reply is None:
                extra_reply = find_reply_code(self.extra)
                if extra_reply and (status is None or str(extra_reply)[0] == status[0]):
                    reply = extra_reply
        if reply and status and str(reply)[0] != status[0]:
            # a reply of another class than the status may be some other line
            reply = find_reply_code(diag, status[0]) or reply
        action = self.action
        if action is None:
            if status and status[0] == "2":
                action = "delivered"
            elif delay and (status is None or status[0] == "4"):
                action = "delayed"
            else:
                action = "failed"
        return RecipientResult(
            final_recipient=self.address,
            original_recipient=self.original,
            action=action,
            status=status,
            reported_status=self.reported,
            diagnostic_type=self.diag_type,
            diagnostic_text=diag,
            remote_mta=self.remote_mta,
            last_attempt_date=self.last_attempt,
            will_retry_until=self.retry_until,
            reply_code=reply,
        )


def _draft_from_fields(f: dict[str, str]) -> _Draft:
    address = _address_field(f.get("final-recipient")) or _address_field(
        f.get("x-actual-recipient"))
    original = _address_field(f.get("original-recipient"))
    dtype, diag = _typed_value(f.get("diagnostic-code"))
    _, remote = _typed_value(f.get("remote-mta"))
    return _Draft(
        address=address or original,
        original=original,
        action=_action(f.get("action")),
        reported=_status_field(f.get("status")),
        diag_type=dtype,
        diag=diag,
        remote_mta=remote,
        last_attempt=_clean(f.get("last-attempt-date")),
        retry_until=_clean(f.get("will-retry-until")),
    )


@dataclass
class _Report:
    """Per-message fields and recipients found in field blocks."""

    reporting_mta: str | None = None
    arrival_date: str | None = None
    envelope_id: str | None = None
    drafts: list[_Draft] = field(default_factory=list)


def _report_from_blocks(blocks: list[dict[str, str]]) -> _Report:
    rep = _Report()
    for block in blocks:
        if rep.reporting_mta is None and block.get("reporting-mta"):
            rep.reporting_mta = _typed_value(block["reporting-mta"])[1]
        if rep.arrival_date is None and block.get("arrival-date"):
            rep.arrival_date = _clean(block["arrival-date"])
        if rep.envelope_id is None and block.get("original-envelope-id"):
            rep.envelope_id = _clean(block["original-envelope-id"])
        if not any(k in block for k in _RECIPIENT_FIELDS):
            continue
        draft = _draft_from_fields(block)
        has_address = "final-recipient" in block or "original-recipient" in block or (
            "x-actual-recipient" in block)
        if not has_address and rep.drafts:
            # the rest of the previous recipient's fields, after a stray blank line
            prev = rep.drafts[-1]
            names = ("action", "reported", "diag_type", "diag", "remote_mta", "last_attempt",
                     "retry_until")
            given = [n for n in names if getattr(draft, n) is not None]
            if given and all(getattr(prev, n) is None for n in given):
                for n in given:
                    setattr(prev, n, getattr(draft, n))
                continue
        if not has_address and draft.reported is None and draft.action is None:
            continue
        rep.drafts.append(draft)
    return rep


# --------------------------------------------------------------------------
# The human-readable text of a report

_TAG_BREAK = re.compile(r"<\s*(?:br|/p|/div|/tr|/li|/h\d|/table|p|div|tr)\b[^>]*>", re.I)
_TAG = re.compile(r"<[^>]*>")
_STYLE = re.compile(r"<(style|script|head)\b.*?</\1\s*>", re.I | re.S)


def _html_to_text(text: str) -> str:
    text = _STYLE.sub(" ", text)
    text = _TAG_BREAK.sub("\n", text)
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    lines = [_SPACES.sub(" ", line).rstrip() for line in text.split("\n")]
    return "\n".join(lines)


_RETURNED_TYPES = ("message/rfc822", "message/global", "text/rfc822-headers",
                   "message/global-headers", "message/partial", "message/external-body")
_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")


def _human_text(msg: Message) -> str:
    """The report's readable text: text parts outside any returned message,
    plain text preferred over HTML."""
    plain: list[str] = []
    htmls: list[str] = []

    def walk(part: Message) -> None:
        ctype = _content_type(part)
        if ctype in _RETURNED_TYPES or ctype in _DSN_TYPES:
            return
        payload = _payload(part)
        if isinstance(payload, list):
            for sub in payload:
                walk(sub)
            return
        if ctype.startswith("multipart/"):  # no boundary: read it as text
            plain.append(_payload_text(part))
            return
        if ctype == "text/html":
            htmls.append(_html_to_text(_payload_text(part)))
        elif ctype.startswith("text/"):
            if _filename(part).endswith((".eml", ".msg")):
                return
            plain.append(_payload_text(part))

    walk(msg)
    if not plain and not msg.is_multipart() and _content_type(msg) not in ("text/plain",
                                                                           "text/html"):
        plain.append(_payload_text(msg))
    text = "\n\n".join(t for t in plain if t.strip())
    if not text.strip():
        text = "\n\n".join(htmls)
    return text


_ORIGINAL_MARKERS = re.compile(
    r"^[\s>]*(?:"
    r"-*\s*below this line is a copy of the message"
    r"|-+\s*this is a copy of (?:the|your) message"
    r"|message headers follow"
    r"|-+\s*original message\s*-*\s*$"
    r"|-+\s*original message follows"
    r"|-+\s*(?:the )?(?:returned|unsent|undelivered) message"
    r"|below is a copy of the original message"
    r"|original message headers:"
    r"|-+\s*the header of the original message"
    r"|-+\s*(?:begin )?(?:original|returned) message\b"
    r"|original (?:message|mail) (?:follows|as follows)"
    r"|(?:included|enclosed|attached|below) (?:is|are) (?:a )?copy of (?:the )?(?:original )?"
    r"message"
    r"|\|?-+\s*message text follows"
    r"|[-=*_]{3,}.*\b(?:original message|copy of (?:the|your) message|message follows)\b"
    r")", re.I | re.M)


def _cut_original(text: str) -> tuple[str, str]:
    """(report text, inline returned message) split at the usual markers."""
    m = _ORIGINAL_MARKERS.search(text)
    if not m:
        return text, ""
    head = text[: m.start()]
    rest = text[m.end():]
    rest = rest.split("\n", 1)[1] if "\n" in rest else ""
    return head, rest


# --------------------------------------------------------------------------
# Human-readable formats

# An address as reports print it; letters beyond ASCII for SMTPUTF8 (RFC 6531).
_EMAIL_RE = (r"[\w!#$%&'*+/=?^`{|}~.\-]+@[^\W_](?:[\w\-]*[^\W_])?"
             r"(?:\.[^\W_](?:[\w\-]*[^\W_])?)*")
_EMAIL = re.compile(_EMAIL_RE)


@dataclass
class _Ctx:
    """What the text parsers may look at besides the report text."""

    subject: str
    sender: str
    body: str  # the readable text before cutting the returned message
    failed: list[str]  # X-Failed-Recipients


@dataclass
class _TextResult:
    format: str
    drafts: list[_Draft]
    delay: bool = False


def _collect(lines: list[str]) -> str | None:
    return _clean(" ".join(s.strip() for s in lines if s.strip()))


_LEAD = re.compile(r"^[ \t]*(?:[-*\u2022]+[ \t]*)?([<\"]?)(" + _EMAIL_RE + r")[>\"]?(.*)$")
_REST_PUNCT = re.compile(r"^[\s>:.,;\"]*(?:\.\.\.)?[\s:]*")


def _lead_blocks(text: str, *, angle_only: bool = False) -> list[_Draft]:
    """Blocks that begin with a line led by an address: `<addr>: text`
    (qmail, Postfix, Yahoo: with `angle_only`, at the start of the line),
    `addr [reason]`, `addr` alone with the reason on the next lines. A block
    runs to a blank line (one after a "Reason:" label excepted) or to the next
    address-led line."""
    drafts: list[_Draft] = []
    cur: list[str] | None = None

    def flush() -> None:
        if cur is not None and drafts:
            drafts[-1].diag = _collect(cur)

    for line in text.split("\n"):
        m = _LEAD.match(line)
        if m and (not angle_only or (m.group(1) == "<" and line[:1] == "<")):
            flush()
            drafts.append(_Draft(address=m.group(2)))
            rest = _REST_PUNCT.sub("", m.group(3), count=1)
            cur = [rest] if rest else []
            continue
        if cur is None:
            continue
        if not line.strip():
            content = [s for s in cur if s.strip()]
            if content and not content[-1].rstrip().endswith(":"):
                flush()
                cur = None
            continue
        cur.append(line)
    flush()
    return drafts


def _merge_same(drafts: list[_Draft]) -> list[_Draft]:
    """One draft per address (a report may name a recipient twice)."""
    out: list[_Draft] = []
    for d in drafts:
        prev = next((o for o in out if _same(o.address, d.address)), None)
        if prev is None:
            out.append(d)
        elif d.diag and d.diag != prev.diag:
            prev.diag = d.diag if not prev.diag else f"{prev.diag} {d.diag}"
    return out


def _parse_qmail(text: str, ctx: _Ctx) -> _TextResult | None:
    if not re.search(r"this is the qmail-send program|i'm afraid i wasn't able to deliver",
                     text, re.I):
        return None
    drafts = _merge_same(_lead_blocks(text, angle_only=True))
    return _TextResult("qmail", drafts) if drafts else None


def _parse_postfix(text: str, ctx: _Ctx) -> _TextResult | None:
    if not re.search(r"this is the (?:mail system|postfix program) at host", text, re.I):
        return None
    drafts = _merge_same(_lead_blocks(text, angle_only=True))
    delay = bool(re.search(r"THIS IS A WARNING ONLY|delayed mail|still being retried",
                           text + "\n" + ctx.subject, re.I))
    return _TextResult("postfix", drafts, delay) if drafts else None


_EXIM_SIGN = re.compile(
    r"could not be delivered to one or more of\s+its\s+recipients"
    r"|has not yet been delivered to one or more of its\s+recipients"
    r"|this message was created automatically by mail delivery software"
    r"|recipient addresses that were\s+incorrectly constructed", re.I)
_EXIM_ADDR = re.compile(r"^ {1,3}<?(" + _EMAIL_RE + r")>?(?:\s+<[^>]*>)?:?\s*(.*)$")


_EXIM_LIST = re.compile(r"address(?:\(es\))?\s+failed|has not yet been delivered is:"
                        r"|that were\s+incorrectly constructed", re.I)


def _exim_blocks(text: str) -> list[_Draft]:
    """Exim: the address indented by two spaces, details indented by four."""
    drafts: list[_Draft] = []
    cur: list[str] | None = None
    start = _EXIM_LIST.search(text)
    if start:
        text = text[start.end():]
    for line in text.split("\n"):
        m = _EXIM_ADDR.match(line)
        if m:
            if cur is not None and drafts:
                drafts[-1].diag = _collect(cur)
            drafts.append(_Draft(address=m.group(1)))
            rest = m.group(2).strip()
            cur = [rest] if rest and not rest.startswith("(generated from") else []
            continue
        if cur is None:
            continue
        if line.startswith(("    ", "\t")) and line.strip():
            cur.append(line)
            continue
        drafts[-1].diag = _collect(cur)
        cur = None
    if cur is not None and drafts:
        drafts[-1].diag = _collect(cur)
    return drafts


def _parse_exim(text: str, ctx: _Ctx) -> _TextResult | None:
    if not _EXIM_SIGN.search(text):
        return None
    delay = bool(re.search(r"has not yet been delivered|delivery attempts will continue"
                           r"|warning: message .* delayed", text + "\n" + ctx.subject, re.I))
    drafts = _merge_same(_exim_blocks(text))
    if not drafts:
        found = _parse_intro(text, ctx)
        drafts = found.drafts if found else []
    if not drafts and ctx.failed:
        diag = _code_lines(text)
        drafts = [_Draft(address=a, diag=diag) for a in ctx.failed]
    return _TextResult("exim", drafts, delay) if drafts else None


_SM_SECTION = re.compile(
    r"^\s*-+\s*The following addresses? (?:had|has) ([\w\- ]{0,30}?(?:errors|problems))\s*-+",
    re.I | re.M)
_SM_TRANSCRIPT = re.compile(r"^\s*-+\s*Transcript of session follows\s*-+", re.I | re.M)
_SM_REPLY = re.compile(r"^(?:<<<\s*)?([45]\d\d)[ \-](.*)$")
_SM_ADDR_ERR = re.compile(r"^<?(" + _EMAIL_RE + r")>?\.\.\.\s*(.*)$")


def _parse_sendmail(text: str, ctx: _Ctx) -> _TextResult | None:
    sec = _SM_SECTION.search(text)
    tr = _SM_TRANSCRIPT.search(text)
    if not sec and not tr:
        return None
    drafts: list[_Draft] = []
    delay = bool(sec and sec.group(1).lower().startswith("transient")) or bool(
        re.search(r"^warning: could not send", ctx.subject, re.I))
    if sec:
        for line in text[sec.end():].split("\n")[1:]:
            s = line.strip()
            if not s:
                if drafts:
                    break
                continue
            if s.startswith("-----"):
                break
            r = re.match(r"^\((?:reason:\s*)?(.*?)\)?$", s, re.I)
            if r and drafts:
                inner = r.group(1)
                ex = re.match(r"expanded from:?\s*<?(" + _EMAIL_RE + r")>?", inner, re.I)
                if ex:
                    if drafts[-1].address is None:
                        drafts[-1].address = ex.group(1)
                    continue
                drafts[-1].diag = inner if not drafts[-1].diag else f"{drafts[-1].diag} {inner}"
                continue
            if s.startswith("("):
                continue
            m = _EMAIL.search(s)
            rest = s[m.end():].strip(" >]\"',") if m else ""
            drafts.append(_Draft(address=m.group(0) if m else None,
                                 diag=s if len(rest) > 3 else None))
    if tr:
        body = text[tr.end():]
        end = re.search(r"^\s*-{3,}", body, re.M)
        body = body[: end.start()] if end else body
        errors: list[tuple[str | None, str]] = []
        for line in body.split("\n"):
            s = line.strip()
            m = _SM_REPLY.match(s)
            if m:
                addr = _EMAIL.search(m.group(2))
                errors.append((addr.group(0) if addr else None, s.lstrip("<").strip()))
                continue
            m2 = _SM_ADDR_ERR.match(s)
            if m2:
                errors.append((m2.group(1), s))
        for d in drafts:
            if d.diag and find_reply_code(d.diag) and find_status(d.diag):
                continue
            mine = [t for a, t in errors if _same(a, d.address)]
            if not mine and len(drafts) == 1:
                mine = [t for _, t in errors if find_reply_code(t)]
            pick = next((t for t in mine if find_status(t)), mine[0] if mine else None)
            if pick and pick != d.diag:
                d.diag = f"{d.diag} {pick}" if d.diag else pick
        if not drafts:
            for a, t in errors:
                if a and not any(_same(a, d.address) for d in drafts):
                    drafts.append(_Draft(address=a, diag=t))
    drafts = [d for d in drafts if d.address or d.diag]
    return _TextResult("sendmail", drafts, delay) if drafts else None


_EX2003 = re.compile(r"did not reach the following recipient|following recipient\(s\) could"
                     r" not be reached", re.I)
_EX2003_ADDR = re.compile(r"^\s*(" + _EMAIL_RE + r")\s+on\s+\S.*$")


def _parse_exchange2003(text: str, ctx: _Ctx) -> _TextResult | None:
    m = _EX2003.search(text)
    if not m:
        return None
    drafts: list[_Draft] = []
    cur: list[str] | None = None
    for line in text[m.end():].split("\n")[1:]:
        a = _EX2003_ADDR.match(line)
        if a:
            if cur is not None and drafts:
                drafts[-1].diag = _collect(cur)
            drafts.append(_Draft(address=a.group(1)))
            cur = []
            continue
        if cur is None:
            continue
        if not line.strip():
            if cur:
                drafts[-1].diag = _collect(cur)
                cur = None
            continue
        cur.append(line)
    if cur is not None and drafts:
        drafts[-1].diag = _collect(cur)
    if not drafts:
        found = _parse_intro(text, ctx)
        drafts = found.drafts if found else []
    return _TextResult("exchange2003", drafts) if drafts else None


_EX2007_SIGN = re.compile(
    r"diagnostic information for administrators|delivery has failed to these recipients"
    r"|remote server (?:at .{0,200}?)?returned '|#\d{3}[ \-][245]\.\d\.\d+"
    r"|your message (?:to \S+ )?couldn'?t be delivered|message wasn'?t delivered", re.I | re.S)
_EX_DIAG = re.compile(
    r"Remote Server (?:at [^\n']*?)?returned '([^'\n]*)'"
    r"|(#\d{3}[ \-][245]\.\d\.\d+[^#\n]*(?:##)?)"
    r"|Remote server returned\s+(\d{3}[^\n]*)", re.I)
_MICROSOFT = re.compile(r"outlook\.com|office ?365|protection\.outlook|exchange online|"
                        r"prod\.outlook|hotmail\.com|\.prod\.exchangelabs", re.I)


def _parse_exchange2007(text: str, ctx: _Ctx) -> _TextResult | None:
    if not _EX2007_SIGN.search(text):
        return None
    drafts: list[_Draft] = []
    last_addr: str | None = None
    for line in text.split("\n"):
        s = line.strip()
        d = _EX_DIAG.search(s)
        if d:
            diag = next(g for g in d.groups() if g)
            before = _EMAIL.search(s[: d.start()])
            addr = before.group(0) if before else last_addr
            if addr:
                drafts.append(_Draft(address=addr, diag=diag))
            continue
        if re.match(r"(?:generating|receiving|sending) server|original message headers",
                    s, re.I):
            last_addr = None
            continue
        em = re.fullmatch(r"<?(" + _EMAIL_RE + r")>?(?:\s*(?:\(|<|\[|on\s).*)?", s)
        if em:
            last_addr = em.group(1)
    drafts = _merge_same(drafts)
    if not drafts:
        m = re.search(r"delivery has failed to these recipients or groups:?"
                      r"|your message to (" + _EMAIL_RE + r") couldn'?t be delivered", text, re.I)
        if m:
            if m.group(1):
                drafts = [_Draft(address=m.group(1))]
            else:
                seg = text[m.end(): m.end() + 3000].strip()
                head, _, rest = seg.partition("\n")
                found = _EMAIL.search(head)
                if found:
                    drafts = [_Draft(address=found.group(0),
                                     diag=_clean(rest.strip().split("\n\n")[0]))]
    if not drafts:
        return None
    return _TextResult("office365" if _MICROSOFT.search(text) else "exchange2007", drafts)


def _parse_dragonfly(text: str, ctx: _Ctx) -> _TextResult | None:
    m = re.search(r"There was an error delivering your mail to <(" + _EMAIL_RE + r")>", text)
    if not m:
        return None
    rest = text[m.end():]
    body = rest.split("\n", 1)[1] if "\n" in rest else ""
    return _TextResult("dragonfly", [_Draft(address=m.group(1), diag=_clean(body))])


def _parse_opensmtpd(text: str, ctx: _Ctx) -> _TextResult | None:
    m = re.search(r"following list of recipients:|this is the mailer-daemon, please do not",
                  text, re.I)
    if not m:
        return None
    drafts = [d for d in _lead_blocks(text[m.end():]) if d.diag]
    delay = bool(re.search(r"delivery attempts are still in progress|temporar", text, re.I))
    return _TextResult("opensmtpd", drafts, delay) if drafts else None


def _parse_gmail(text: str, ctx: _Ctx) -> _TextResult | None:
    m = re.search(r"Delivery to the following recipients? (failed permanently|has been delayed"
                  r"|failed)", text, re.I)
    if not m:
        return None
    delay = "delayed" in m.group(1).lower()
    rest = text[m.end():]
    details = re.search(r"Technical details of (?:permanent|temporary) (?:failure|problem):?"
                        r"(.*)", rest, re.I | re.S)
    head = rest[: details.start()] if details else rest
    drafts = [_Draft(address=a.group(1)) for a in re.finditer(
        r"^\s*<?(" + _EMAIL_RE + r")>?\s*$", head, re.M)]
    diag = _clean(details.group(1)) if details else None
    for d in drafts:
        d.diag = diag
    return _TextResult("gmail", drafts, delay) if drafts else None


def _json_objects(text: str) -> list[dict[str, object]]:
    # Amazon SNS folds long lines as "!\n " when it mails a notification
    text = text.replace("!\n ", "")
    start = text.find("{")
    end = text.rfind("}")
    if start < 0 or end <= start:
        return []
    try:
        data = json.loads(text[start: end + 1])
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    inner = data.get("Message")  # an SNS envelope around the SES notification
    if isinstance(inner, str):
        try:
            nested = json.loads(inner)
        except ValueError:
            nested = None
        if isinstance(nested, dict):
            return [nested]
    return [data]


def _parse_ses_json(text: str, ctx: _Ctx) -> _TextResult | None:
    """Amazon SES bounce and delivery notifications (JSON, often via SNS)."""
    if "notificationType" not in ctx.body and "eventType" not in ctx.body:
        return None
    drafts: list[_Draft] = []
    delay = False
    for obj in _json_objects(ctx.body):
        ntype = str(obj.get("notificationType") or obj.get("eventType") or "")
        if ntype == "Bounce" and isinstance(obj.get("bounce"), dict):
            bounce = obj["bounce"]
            assert isinstance(bounce, dict)
            for r in bounce.get("bouncedRecipients") or []:
                if not isinstance(r, dict) or not isinstance(r.get("emailAddress"), str):
                    continue
                dtype, diag = _typed_value(str(r.get("diagnosticCode") or "") or None)
                drafts.append(_Draft(
                    address=_address_field(r["emailAddress"]),
                    action=_action(str(r.get("action") or "") or None),
                    reported=_status_field(str(r.get("status") or "") or None),
                    diag_type=dtype, diag=diag))
        elif ntype == "Delivery" and isinstance(obj.get("delivery"), dict):
            delivery = obj["delivery"]
            assert isinstance(delivery, dict)
            response = str(delivery.get("smtpResponse") or "") or None
            for addr in delivery.get("recipients") or []:
                if isinstance(addr, str):
                    drafts.append(_Draft(address=addr, action="delivered", diag_type="smtp",
                                         diag=response))
        elif ntype == "DeliveryDelay" and isinstance(obj.get("deliveryDelay"), dict):
            dd = obj["deliveryDelay"]
            assert isinstance(dd, dict)
            delay = True
            for r in dd.get("delayedRecipients") or []:
                if isinstance(r, dict) and isinstance(r.get("emailAddress"), str):
                    drafts.append(_Draft(
                        address=r["emailAddress"], action="delayed",
                        reported=_status_field(str(r.get("status") or "") or None),
                        diag=str(r.get("diagnosticCode") or "") or None))
    return _TextResult("amazonses", drafts, delay) if drafts else None


_INTRO = re.compile(
    r"following (?:\w+ )?(?:recipients?|address(?:es|\(es\))?|destinations?)"
    r"|(?:was|were|could|has|have) not (?:be(?:en)? )?(?:delivered|deliverable|reached)"
    r"|could not be (?:delivered|reached)|not (?:be )?delivered to|undeliverable to"
    r"|unable to deliver (?:\w+ ){0,3}to|did not reach|failed addresses|failure reasons"
    r"|recipients? (?:were|was) affected|(?:recipients?|address(?:es)?) failed"
    r"|(?:unknown|invalid) (?:user|recipient|final delivery userid|address)\s*:"
    r"|delivery to (?:the following|.{0,60}(?:failed|aborted))"
    r"|mailbox is full\s*:", re.I)
_CODE = re.compile(
    r"(?:^|[\s:;'\"(\[#=])[45][0-5]\d(?:[ \-:][\s\-]*|$)|(?<![\w.])[45]\.[0-7]\.\d{1,3}\b", re.M)


def _code_lines(text: str) -> str | None:
    return _clean(" ".join(ln for ln in text.split("\n") if _CODE.search(ln)))


def _parse_intro(text: str, ctx: _Ctx) -> _TextResult | None:
    """A sentence that introduces the failed recipients ("The following
    addresses had delivery errors", "was not delivered to:"), then the
    addresses, each with the reason that follows it (or precedes it)."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = _INTRO.search(line)
        if not m:
            continue
        region = lines[i: i + 40]
        found: list[tuple[str, int, str]] = []  # address, line, rest of line
        after = line[m.end():]
        on_line = _EMAIL.search(after)
        if on_line:
            found.append((on_line.group(0), 0, after[on_line.end():]))
        for j, ln in enumerate(region[1:], 1):
            lm = _LEAD.match(ln)
            if lm:
                found.append((lm.group(2), j, _REST_PUNCT.sub("", lm.group(3), count=1)))
        if not found:
            # "<addr>" then "Each of the following recipients was rejected"
            before = [lm for lm in (_LEAD.fullmatch(ln.strip()) for ln in lines[max(0, i - 3): i])
                      if lm and not lm.group(3).strip()]
            if before:
                return _TextResult("text", _merge_same([
                    _Draft(address=b.group(2), diag=_clean(line)) for b in before]))
            continue
        drafts: list[_Draft] = []
        for k, (addr, j, rest) in enumerate(found):
            stop = found[k + 1][1] if k + 1 < len(found) else len(region)
            cur = [rest.strip(" >]),;")] if rest.strip(" >]),;") else []
            for ln in region[j + 1: stop]:
                if not ln.strip():
                    content = [s for s in cur if s.strip()]
                    if content and not content[-1].rstrip().endswith(":"):
                        break
                    continue
                if _INTRO.search(ln) and cur:
                    break
                cur.append(ln)
            diag = _collect(cur)
            if not diag and k == 0 and j > 1:
                diag = _collect([ln for ln in region[1:j] if not _INTRO.search(ln)])
            if len(found) == 1 and not _CODE.search(diag or ""):
                codes = _code_lines("\n".join(region))
                if codes:
                    diag = f"{codes} {diag}" if diag else codes
            drafts.append(_Draft(address=addr, diag=diag))
        return _TextResult("text", _merge_same(drafts))
    return None


def _parse_codes(text: str, ctx: _Ctx) -> _TextResult | None:
    """Addresses next to SMTP error codes, anywhere in the report."""
    drafts = [d for d in _lead_blocks(text) if d.diag and _CODE.search(d.diag)]
    if drafts:
        return _TextResult("text", _merge_same(drafts))
    rcpt = re.search(r"RCPT TO:?\s*<?(" + _EMAIL_RE + r")", text, re.I)
    paragraphs = re.split(r"\n\s*\n", text)
    for i, para in enumerate(paragraphs):
        window = para + "\n" + (paragraphs[i + 1] if i + 1 < len(paragraphs) else "")
        addr = rcpt.group(1) if rcpt else None
        if addr is None:
            m = _EMAIL.search(para)
            addr = m.group(0) if m else None
        diag = _code_lines(window if rcpt is None else text)
        if addr and diag:
            return _TextResult("text", [_Draft(address=addr, diag=diag)])
    return None


_LABEL_ADDRESS = re.compile(r"^\s*([A-Za-z][\w'()/,.\- ]{2,80}?)\s*:\s*<?(" + _EMAIL_RE
                            + r")>?\s*\.?\s*$")
_FAILURE_WORDS = re.compile(
    r"unknown|invalid|fail|exceed|full|\bnot?\b|no such|denied|reject|disabled|error|unable"
    r"|quota|refused|blocked|expired|time[ds]? ?out|undeliver|bounced?", re.I)


def _parse_reason_address(text: str, ctx: _Ctx) -> _TextResult | None:
    """`Reason in words: addr` lines (IMail: "User mailbox exceeds allowed
    size: a@b"). The words must state a failure: "To: a@b" or "target mail
    address: a@b" are labels, not reasons."""
    drafts: list[_Draft] = []
    for line in text.split("\n"):
        m = _LABEL_ADDRESS.match(line)
        if m and " " in m.group(1).strip() and _FAILURE_WORDS.search(m.group(1)):
            drafts.append(_Draft(address=m.group(2), diag=_clean(m.group(1))))
    return _TextResult("text", _merge_same(drafts)) if drafts else None


def _parse_lone_address(text: str, ctx: _Ctx) -> _TextResult | None:
    """A short report that names exactly one address, on a line of its own."""
    body = [ln for ln in text.split("\n") if ln.strip()]
    if not body or len(body) > 25:
        return None
    alone = {m.group(2).lower(): m.group(2) for m in (_LEAD.fullmatch(ln.strip()) for ln in body)
             if m and not m.group(3).strip(" >\"")}
    if len(alone) != 1:
        return None
    addr = next(iter(alone.values()))
    rest = [ln for ln in body if addr not in ln]
    return _TextResult("text", [_Draft(address=addr, diag=_collect(rest))])


def _parse_kddi(text: str, ctx: _Ctx) -> _TextResult | None:
    """au one net / EZweb (KDDI): "Could not be delivered to: <addr>"."""
    m = re.search(r"Could not be delivered to:\s*<?(" + _EMAIL_RE + r")>?[^\n]*\n(.*)", text)
    if not m or "Your mail sent on:" not in text:
        return None
    return _TextResult("kddi", [_Draft(address=m.group(1), diag=_clean(m.group(2)))])


#: Formats recognised by a sentence only their MTA writes, tried in order.
_SIGNED_PARSERS = (
    _parse_ses_json,
    _parse_exchange2003,
    _parse_qmail,
    _parse_postfix,
    _parse_sendmail,
    _parse_dragonfly,
    _parse_gmail,
    _parse_opensmtpd,
    _parse_exim,
    _parse_exchange2007,
    _parse_kddi,
)
#: Formats tried only when the sender or subject says "bounce".
_GENERIC_PARSERS = (_parse_intro, _parse_codes, _parse_reason_address, _parse_lone_address)


# --------------------------------------------------------------------------
# The returned message


def _headers_of(part: Message, source: str) -> OriginalMessage:
    return OriginalMessage(
        message_id=_header(part, "Message-ID"),
        subject=_header(part, "Subject"),
        from_=_header(part, "From"),
        to=_header(part, "To"),
        source=source,
    )


_HEADER_START = re.compile(r"^([!-9;-~]+)[ \t]*:[ \t]*(.*)$")
_WANTED = {"message-id": "message_id", "subject": "subject", "from": "from_", "to": "to"}


def _headers_from_text(text: str, source: str) -> OriginalMessage | None:
    """Headers of a message quoted as text, read leniently: quoting ("> ")
    and a common indentation removed, a broken fold joined to its field."""
    lines = [ln[2:] if ln.startswith("> ") else ln for ln in text.split("\n")[:400]]
    while lines and (not lines[0].strip() or lines[0].lstrip().startswith("From ")
                     or not lines[0].strip(" -=*_")):
        lines.pop(0)
    indent = len(lines[0]) - len(lines[0].lstrip()) if lines else 0
    if indent:
        lines = [ln[indent:] if ln[:indent].isspace() else ln for ln in lines]
    fields: dict[str, str] = {}
    last: str | None = None
    stray = 0
    for ln in lines:
        if not ln.strip():
            break
        m = _HEADER_START.match(ln)
        if m and not ln[0].isspace():
            name = m.group(1).lower()
            last = name if name in _WANTED and name not in fields else None
            if last is not None:
                fields[last] = m.group(2)
        elif last is not None:
            fields[last] += " " + ln.strip()
        elif not ln[0].isspace():
            stray += 1  # a fold that lost its indentation, or no header block at all
            if stray > 60:
                break
    if not fields:
        return None
    values = {_WANTED[k]: _decode_header(v) for k, v in fields.items()}
    return OriginalMessage(source=source, **values)


def _original(msg: Message, inline: str) -> OriginalMessage:
    for part in _walk(msg):
        ctype = _content_type(part)
        if ctype in ("message/rfc822", "message/global"):
            payload = _payload(part)
            if isinstance(payload, list) and payload:
                inner = payload[0]
                got = _headers_of(inner, ctype)
                if got.message_id or got.subject or got.from_:
                    return got
                text = _payload(inner)
                if isinstance(text, str):
                    again = _headers_from_text(text, ctype)
                    if again:
                        return again
            elif isinstance(payload, str):
                again = _headers_from_text(payload, ctype)
                if again:
                    return again
        elif ctype in ("text/rfc822-headers", "message/global-headers"):
            got2 = _headers_from_text(_payload_text(part), ctype)
            if got2:
                return got2
    if inline:
        got3 = _headers_from_text(inline, "inline")
        if got3:
            return got3
    return OriginalMessage()


# --------------------------------------------------------------------------
# Assembly

_BOUNCE_SENDER = re.compile(r"mailer-daemon|post_?master|mail delivery|mdaemon|"
                            r"mail administrator|bounce", re.I)
_BOUNCE_SUBJECT = re.compile(
    r"undeliver|delivery (?:status )?(?:notification|failure|failed|has failed)"
    r"|returned mail|failure notice|mail delivery (?:failed|failure|system)|non[- ]?delivery"
    r"|could not (?:be )?deliver|delivery problem|bounced?\b|mail system error"
    r"|delayed mail|delivery (?:delayed|notification)|warning: could not send|\bNDN\b"
    r"|returned to sender|not delivered|failed delivery|delivery failure|mail failed", re.I)
_FEEDBACK = re.compile(r"feedback-report|disposition-notification", re.I)
_DELAY_SUBJECT = re.compile(
    r"\(delay\)|delayed mail|delivery (?:has been )?delayed|delay(?:ed)? notification"
    r"|mail delivery delayed|still being retried|warning\W+could not send"
    r"|warning: message .*delayed|notification: (?:delayed|warning)", re.I)


def _is_feedback(msg: Message) -> bool:
    ctype = _content_type(msg)
    if ctype == "multipart/report":
        try:
            rtype = msg.get_param("report-type")
        except _DAMAGE:
            rtype = None
        if isinstance(rtype, str) and _FEEDBACK.search(rtype):
            return True
    return any(_content_type(p) in ("message/feedback-report", "message/disposition-notification")
               for p in _walk(msg))


def _dsn_parts(msg: Message) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for part in _walk(msg):
        ctype = _content_type(part)
        if ctype in _DSN_TYPES:
            out.append((ctype, _serialise_fields(part)))
        elif ctype == "text/plain" and _filename(part).endswith(
                ("delivery-status", ".dsn")):
            out.append(("message/delivery-status", _payload_text(part)))
    return out


def _unquote(text: str) -> str:
    """A report forwarded with "> " quoting, read as the original."""
    lines = text.split("\n")
    quoted = sum(1 for ln in lines if ln.startswith(">"))
    if quoted < 5 or quoted < len([ln for ln in lines if ln.strip()]) // 3:
        return text
    return "\n".join(re.sub(r"^> ?", "", ln) for ln in lines)


def _same(a: str | None, b: str | None) -> bool:
    return bool(a and b and a.lower() == b.lower())


def _merge_text(drafts: list[_Draft], found: _TextResult) -> None:
    """Fill what the delivery-status part left out from the readable text."""
    for d in drafts:
        match = next((t for t in found.drafts if _same(t.address, d.address)
                      or _same(t.address, d.original)), None)
        if match is None and len(drafts) == 1 and len(found.drafts) == 1:
            match = found.drafts[0]
        if match is None:
            continue
        if d.address is None:
            d.address = match.address
        if not d.diag:
            d.diag = match.diag
        elif match.diag and match.diag != d.diag:
            d.extra = match.diag


def _failed_recipients(msg: Message) -> list[str]:
    out: list[str] = []
    for value in msg.get_all("X-Failed-Recipients") or []:
        out += [m.group(0) for m in _EMAIL.finditer(str(value))]
    return out


_EMBEDDED_REPORT = re.compile(r"^Content-Type:\s*multipart/report\b", re.I | re.M)


def _embedded_report(text: str) -> bytes | None:
    """A whole report pasted into a text part (a forwarded bounce): the
    header block around its "Content-Type: multipart/report" line onwards."""
    m = _EMBEDDED_REPORT.search(text)
    if not m:
        return None
    start = text.rfind("\n\n", 0, m.start())
    lines = text[start + 2 if start >= 0 else 0:].split("\n")
    while lines and not _HEADER_START.match(lines[0]):
        lines.pop(0)  # a separator, or an mbox "From " line
    return "\n".join(lines).encode("utf-8", "surrogateescape") if lines else None


_KIND_OF: tuple[tuple[Action, Kind], ...] = (
    ("failed", "failure"), ("delayed", "delay"), ("delivered", "delivered"),
    ("relayed", "relayed"), ("expanded", "expanded"))


def _kind(actions: set[Action | None]) -> Kind:
    """The report's kind: a failure if any recipient failed, then delay, ..."""
    return next((kind for action, kind in _KIND_OF if action in actions), "failure")


def parse_ndr(raw: bytes, /) -> Ndr | None:
    """Parse a bounce; None when `raw` is not a non-delivery/delay/delivery report."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise TypeError(f"parse_ndr expects bytes, got {type(raw).__name__}")
    if not may_be_report(raw):
        return None
    msg = _load(bytes(raw))
    return None if msg is None else _parse(msg, nested=False)


#: Words (lower case) in the header block of every report the parsers read:
#: structure, senders, subjects, the auto-submitted marks, encoded words
#: (which hide a subject), and the null Return-Path of a bounce.
_HEAD_WORDS = (b"report", b"delivery-status", b"feedback", b"disposition-notification",
               b"x-failed-recipients", b"auto-submitted", b"return-path: <>",
               b"return-path:<>", b"daemon", b"postmaster", b"post_master", b"mail delivery",
               b"mail administrator", b"bounce", b"deliver", b"fail", b"return", b"reject",
               b"could not", b"unable", b"error", b"warning", b"delay", b"notif", b"problem",
               b"expired", b"=?")
#: ...and in the first lines of the body, where a report says what it is.
_BODY_WORDS = (b"delivery-status", b"deliver", b"fail", b"reject", b"bounce", b"rfc822",
               b"base64", b"quoted-printable")
_STATUS_CODE = re.compile(rb"[245]\.\d{1,3}\.\d{1,3}")
_HEAD_SCAN = 1 << 16
_BODY_SCAN = 4096


def may_be_report(raw: bytes, /) -> bool:
    """False when a message is plainly not a report: no word of one in its
    header block or its first 4 KB. A look at a few kilobytes of bytes
    instead of parsing the whole message with every parser (which costs
    about as much per kilobyte as the rest of the harness per message).
    Every bounce of the corpus passes (tests/unit/test_dsn.py)."""
    limit = min(len(raw), _HEAD_SCAN)
    end = raw.find(b"\r\n\r\n", 0, limit)
    bare = raw.find(b"\n\n", 0, end if end >= 0 else limit)
    if bare >= 0:
        end = bare
    if end < 0:
        end = limit
    head = bytes(raw[:end]).lower()
    if any(w in head for w in _HEAD_WORDS):
        return True
    body = bytes(raw[end:end + _BODY_SCAN]).lower()
    return any(w in body for w in _BODY_WORDS) or _STATUS_CODE.search(body) is not None


def _parse(msg: Message, *, nested: bool) -> Ndr | None:
    if _is_feedback(msg):
        return None
    subject = _header(msg, "Subject") or ""
    sender = _header(msg, "From")
    text = _unquote(_human_text(msg))
    report_text, inline = _cut_original(text)

    fmt: str | None = None
    rep = _Report()
    delay = bool(_DELAY_SUBJECT.search(subject))
    parts = _dsn_parts(msg)
    if parts:
        blocks: list[dict[str, str]] = []
        for _, body in parts:
            blocks += _field_blocks(body)
        rep = _report_from_blocks(blocks)
        if rep.drafts:
            global_dsn = any(c == "message/global-delivery-status" for c, _ in parts)
            fmt = "rfc6533" if global_dsn else "rfc3464"
    elif not nested:
        embedded = _embedded_report(text)
        inner = _load(embedded) if embedded else None
        found = _parse(inner, nested=True) if inner is not None else None
        if found is not None:
            return found
    if fmt is None:
        got = _report_from_blocks(_field_blocks(report_text))
        if any(d.address and (d.reported or d.action) for d in got.drafts):
            rep, fmt = got, "rfc3464-text"

    failed = _failed_recipients(msg)
    ctx = _Ctx(subject=subject, sender=sender or "", body=text, failed=failed)
    textual: _TextResult | None = None
    for parser in _SIGNED_PARSERS:
        textual = parser(report_text, ctx)
        if textual is not None:
            break
    if textual is None and (failed or _BOUNCE_SENDER.search(sender or "")
                            or _BOUNCE_SUBJECT.search(subject)):
        for parser in _GENERIC_PARSERS:
            textual = parser(report_text, ctx)
            if textual is not None:
                break
    if textual is None and failed:
        diag = _code_lines(report_text)
        textual = _TextResult("text", [_Draft(address=a, diag=diag) for a in failed])

    if fmt is not None:
        if textual is not None:
            _merge_text(rep.drafts, textual)
    elif textual is not None:
        fmt = textual.format
        rep.drafts = textual.drafts
        delay = delay or textual.delay
    else:
        return None

    if not delay and rep.drafts and all(d.action == "delayed" for d in rep.drafts):
        delay = True
    recipients = tuple(d.finish(delay=delay) for d in rep.drafts)
    kind = _kind({r.action for r in recipients})
    return Ndr(
        kind=kind,
        is_delay=kind == "delay",
        format=fmt,
        reporting_mta=rep.reporting_mta,
        arrival_date=rep.arrival_date,
        original_envelope_id=rep.envelope_id,
        recipients=recipients,
        original=_original(msg, inline),
        subject=subject or None,
        sender=sender,
    )
