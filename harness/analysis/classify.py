"""What kind of automatic message this is, when it is one.

`parse_ndr` answers "is this a non-delivery (or delay, or delivery)
report, and what does it say?"; auto-replies and abuse complaints are not
NDRs and it says None for them. `classify` goes on from there and names
them, so a bounce handler under test can be checked for telling the three
apart (an application that unsubscribes a user on an out-of-office has a
bug):

- ``ndr`` / ``delay`` / ``delivery``: `parse_ndr` read a report (its `Ndr`
  is in `Classification.ndr`);
- ``complaint``: an RFC 5965 abuse report (multipart/report;
  report-type=feedback-report, or a message/feedback-report part), with its
  fields read (`Feedback`);
- ``read-receipt``: an RFC 8098 message disposition notification;
- ``autoreply``: an automatic reply: Auto-Submitted: auto-replied (RFC
  3834), or the headers other responders use instead (X-Autoreply,
  X-Autorespond, Precedence: auto_reply, Exchange's "Automatic reply:"
  subject);
- ``automatic``: some other machine-made message (Auto-Submitted:
  auto-generated);
- ``message``: none of these.

Pure: bytes in, a frozen result out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from email.policy import compat32
from typing import Literal

from harness.analysis.dsn import Ndr, parse_ndr

__all__ = ["Classification", "Feedback", "classify"]

Kind = Literal["ndr", "delay", "delivery", "complaint", "read-receipt", "autoreply",
               "automatic", "message"]

_NDR_KIND: dict[str, Kind] = {"failure": "ndr", "delay": "delay", "delivered": "delivery",
                              "relayed": "delivery", "expanded": "delivery"}
_AUTOREPLY_SUBJECT = re.compile(r"^\s*(?:automatic reply|auto(?:matic)?[- ]?(?:reply|response)"
                                r"|auto:|out of (?:the )?office)", re.I)
#: Headers responders other than RFC 3834 ones set on their replies.
_AUTOREPLY_HEADERS = (("X-Autoreply", None), ("X-Autorespond", None),
                      ("Precedence", re.compile(r"^\s*auto[_-]reply\s*$", re.I)))
_FIELD = re.compile(r"^([A-Za-z][A-Za-z0-9-]*)\s*:\s*(.*)$")


@dataclass(frozen=True, kw_only=True)
class Feedback:
    """The fields of an RFC 5965 feedback report (section 3.1 names)."""

    feedback_type: str | None
    user_agent: str | None = None
    version: str | None = None
    original_mail_from: str | None = None
    original_rcpt_to: tuple[str, ...] = ()
    arrival_date: str | None = None
    reporting_mta: str | None = None
    source_ip: str | None = None
    reported_domain: str | None = None


@dataclass(frozen=True, kw_only=True)
class Classification:
    kind: Kind
    reason: str  # what decided it, for a person
    ndr: Ndr | None = None
    feedback: Feedback | None = None

    @property
    def is_ndr(self) -> bool:
        return self.ndr is not None

    def as_dict(self) -> dict[str, object]:
        from dataclasses import asdict

        return {"kind": self.kind, "reason": self.reason, "is_ndr": self.is_ndr,
                "feedback": asdict(self.feedback) if self.feedback else None}


def _ctype(part: Message) -> str:
    try:
        return part.get_content_type().lower()
    except (ValueError, LookupError, TypeError):
        return ""


def _walk(msg: Message) -> list[Message]:
    try:
        return list(msg.walk())
    except (ValueError, LookupError, TypeError):
        return [msg]


def _report_type(msg: Message) -> str:
    try:
        value = msg.get_param("report-type")
    except (ValueError, LookupError, TypeError):
        return ""
    return value.lower() if isinstance(value, str) else ""


def _text(part: Message) -> str:
    payload = part.get_payload()
    if isinstance(payload, list):
        # the email package reads some message/* types as a list of blocks
        return "\n".join(str(p) for p in payload)
    raw = part.get_payload(decode=True)
    if isinstance(raw, bytes):
        return raw.decode("utf-8", "replace")
    return str(payload)


def _feedback(part: Message) -> Feedback:
    fields: dict[str, list[str]] = {}
    for line in re.sub(r"\r?\n[ \t]+", " ", _text(part)).splitlines():
        m = _FIELD.match(line.strip())
        if m:
            fields.setdefault(m.group(1).lower(), []).append(m.group(2).strip())

    def one(name: str) -> str | None:
        return fields.get(name, [None])[0]

    return Feedback(
        feedback_type=one("feedback-type"), user_agent=one("user-agent"),
        version=one("version"), original_mail_from=one("original-mail-from"),
        original_rcpt_to=tuple(fields.get("original-rcpt-to", [])),
        arrival_date=one("arrival-date") or one("received-date"),
        reporting_mta=one("reporting-mta"), source_ip=one("source-ip"),
        reported_domain=one("reported-domain"))


def classify(raw: bytes, /) -> Classification:
    """What kind of message `raw` is (see the module docstring)."""
    ndr = parse_ndr(raw)
    if ndr is not None:
        return Classification(kind=_NDR_KIND.get(ndr.kind, "ndr"), ndr=ndr,
                              reason=f"a {ndr.kind} report ({ndr.format})")
    msg = message_from_bytes(raw, policy=compat32)
    parts = _walk(msg)
    report_type = _report_type(msg)
    for part in parts:
        if _ctype(part) == "message/feedback-report":
            fb = _feedback(part)
            return Classification(kind="complaint", feedback=fb, reason=(
                f"an RFC 5965 feedback report (Feedback-Type: {fb.feedback_type or '?'})"))
    if report_type == "feedback-report":
        return Classification(kind="complaint", feedback=Feedback(feedback_type=None),
                              reason="multipart/report; report-type=feedback-report, "
                                     "without its message/feedback-report part")
    if report_type == "disposition-notification" or any(
            _ctype(p) == "message/disposition-notification" for p in parts):
        return Classification(kind="read-receipt",
                              reason="an RFC 8098 message disposition notification")
    auto = " ".join(str(msg.get("Auto-Submitted", "")).split()).lower()
    if auto.startswith("auto-replied"):
        return Classification(kind="autoreply", reason="Auto-Submitted: auto-replied (RFC 3834)")
    for name, pattern in _AUTOREPLY_HEADERS:
        value = msg.get(name)
        if value is not None and (pattern is None or pattern.match(str(value))):
            return Classification(kind="autoreply", reason=f"{name}: {str(value).strip()}")
    subject = " ".join(str(msg.get("Subject", "")).split())
    if _AUTOREPLY_SUBJECT.match(subject):
        return Classification(kind="autoreply", reason=f"the subject: {subject[:60]}")
    if auto and not auto.startswith("no"):
        return Classification(kind="automatic", reason=f"Auto-Submitted: {auto}")
    return Classification(kind="message", reason="no sign of an automatic message")
