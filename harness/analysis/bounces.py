"""Reports a rule's `bounce:` sends back to a sender: pure builders.

Given an accepted message (its envelope and bytes) and what the rule asks
for, `plan_reports` decides whether anything may be sent at all and builds
the messages:

- ``dsn``: an RFC 3464 delivery status notification, a multipart/report
  (RFC 6522) with a readable part, a message/delivery-status part (status,
  action and diagnostic from the rule) and the returned headers (or the whole
  message when the sender asked RET=FULL);
- ``exchange``: the same report laid out as Exchange lays out its NDRs (a
  readable part for the user, "Diagnostic information for administrators"
  with the generating server and the ``#550 5.1.1 ... ##`` line, the
  original message headers), in our own words, with the same
  delivery-status part;
- ``autoreply``: an RFC 3834 automatic reply from each recipient
  (Auto-Submitted: auto-replied, In-Reply-To the original);
- ``arf``: an RFC 5965 abuse report about the message, per recipient (a
  feedback loop's complaint: multipart/report; report-type=feedback-report).

What is never sent, and why (`Skipped`): nothing in reply to a null sender
(RFC 5321 section 4.5.5: reports go to the reverse-path, and a report about
a report would loop); no failure or delay notice to a recipient whose
NOTIFY excludes it (RFC 3461 section 4.1); no auto-reply to a message that
is itself automatic or from a list (RFC 3834 section 2).

Every report goes out with a null reverse-path (MAIL FROM:<>), as RFC 3464
and RFC 3834 (section 3.3) ask, so a report can never cause another one.

Where the formats come from: RFC 3464 and RFC 6522 (the DSN fields and the
report container), RFC 3834 (auto-replies), RFC 5965 (the feedback report
fields), and for the Exchange layout Microsoft's description of its NDRs
("Email non-delivery reports and SMTP errors in Exchange Online") with the
section headings our own parser (dsn.py) recognises. The sentences are ours.

May know: bytes, the standard library's `email` package, the status-code
catalogue. Builds messages only: sending them is harness/smtp/outbound.py.
"""

from __future__ import annotations

import html
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email import charset as _charset
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import formatdate, getaddresses, make_msgid

from harness import __version__
from harness.analysis.codes import lookup

__all__ = ["KINDS", "Accepted", "Report", "Skipped", "action_for", "default_diagnostic",
           "plan_reports"]

KINDS = ("dsn", "exchange", "autoreply", "arf")
USER_AGENT = f"SMTP-Harness/{__version__}"

#: The basic reply code a made-up diagnostic starts with, by status class.
_BASIC_FOR_CLASS = {"2": 250, "4": 451, "5": 550}
#: Exchange's transport component strings for common codes (facts of its NDRs).
_EXCHANGE_COMPONENT = {
    "5.1.1": "RESOLVER.ADR.RecipNotFound; not found",
    "5.1.10": "RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
    "5.2.2": "STOREDRV.Deliver; mailbox full",
    "5.4.1": "Recipient address rejected: Access denied",
    "5.7.1": "RESOLVER.RST.AuthRequired; authentication required",
    "4.4.7": "QUEUE.Expired; message expired",
}
_ENHANCED = re.compile(r"(?<![\w.])([245]\.\d{1,3}\.\d{1,3})(?![\w.]*\d)")
_BASIC = re.compile(r"^\s*#?([245]\d\d)(?:[ -]|$)")


@dataclass(frozen=True, kw_only=True)
class Accepted:
    """The message a rule accepted and will report on."""

    mail_from: str  # "" for the null reverse-path
    rcpts: tuple[str, ...]  # the recipients the report is about
    raw: bytes
    received_at: float
    client_ip: str | None = None
    helo: str | None = None
    #: DSN parameters as the sender gave them (RFC 3461)
    envid: str | None = None
    ret: str | None = None  # FULL or HDRS
    notify: Mapping[str, Sequence[str]] = field(default_factory=dict)
    orcpt: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Report:
    """One message to send: MAIL FROM:<`mail_from`> RCPT TO:<`to`>."""

    kind: str
    to: str
    recipients: tuple[str, ...]  # whom it reports on
    status: str | None
    raw: bytes
    mail_from: str = ""  # always null: a report never causes another one
    subject: str = ""


@dataclass(frozen=True, kw_only=True)
class Skipped:
    """A report that is not sent (for whom, and why)."""

    kind: str
    recipients: tuple[str, ...]
    reason: str


def action_for(status: str, diagnostic: str | None = None) -> str:
    """RFC 3464 Action of a status: failed (5.x.x, or a 5xx reply quoting a
    4.x.x code as Exchange does for an expired message), delayed (4.x.x) or
    delivered (2.x.x)."""
    if status.startswith("2"):
        return "delivered"
    basic = _BASIC.match(diagnostic or "")
    if status.startswith("5") or (basic is not None and basic.group(1)[0] == "5"):
        return "failed"
    return "delayed"


#: A typical reply longer than this tells a story of its own (a Winsock
#: error, an address): the code's title is the plainer default then.
_DEFAULT_REPLY_MAX = 72


def default_diagnostic(status: str) -> str:
    """A reply line for a status when the rule gives none: the catalogue's
    shortest typical reply for that exact code, else the code's title."""
    info = lookup(status)
    if info is not None and info.match == "exact" and not status.endswith(".0.0"):
        for reply in sorted(info.typical_replies, key=len):
            found = _ENHANCED.search(reply)
            if (found and found.group(1) == status and _BASIC.match(reply)
                    and len(reply) <= _DEFAULT_REPLY_MAX):
                return reply
    title = info.title if info is not None else "Delivery status"
    return f"{_BASIC_FOR_CLASS[status[0]]} {status} {title}"


def _smtp_diagnostic(status: str, diagnostic: str | None) -> str:
    """The remote reply a report quotes: the rule's diagnostic, with a reply
    code and the status put in front when it has none."""
    if not diagnostic:
        return default_diagnostic(status)
    text = diagnostic.strip()
    if _BASIC.match(text):
        return text.lstrip("#")
    if not _ENHANCED.search(text):
        text = f"{status} {text}"
    return f"{_BASIC_FOR_CLASS[status[0]]} {text}"


# ------------------------------------------------------------------ the plan


_LIST_HEADERS = ("List-Id", "List-Unsubscribe", "List-Post", "Mailing-List")
_BULK = re.compile(r"^\s*(bulk|list|junk)\s*$", re.I)


def _autoreply_refusal(headers: Message) -> str | None:
    """Why RFC 3834 section 2 says not to auto-reply to this message, or None."""
    auto = str(headers.get("Auto-Submitted", "")).strip().lower()
    if auto and not auto.startswith("no"):
        return f"the message is itself automatic (Auto-Submitted: {auto}; RFC 3834 section 2)"
    precedence = str(headers.get("Precedence", ""))
    if _BULK.match(precedence):
        return f"the message is bulk or list mail (Precedence: {precedence.strip()})"
    for name in _LIST_HEADERS:
        if headers.get(name) is not None:
            return f"the message came from a mailing list ({name}; RFC 3834 section 2)"
    return None


def _notify_allows(notify: Sequence[str] | None, action: str) -> bool:
    """RFC 3461 section 4.1: NOTIFY=NEVER, or a list without FAILURE/DELAY/
    SUCCESS, asks for no notice of that kind (no NOTIFY: failures and
    delays are reported, successes not)."""
    words = {w.upper() for w in notify or ()}
    wanted = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS"}[action]
    if not words:
        return action != "delivered"
    return "NEVER" not in words and wanted in words


def plan_reports(kind: str, accepted: Accepted, *, status: str | None,
                 diagnostic: str | None, hostname: str, now: float
                 ) -> tuple[list[Report], list[Skipped]]:
    """The reports to send for one accepted message, and those not sent."""
    if kind not in KINDS:
        raise ValueError(f"unknown bounce kind {kind!r} (known: {', '.join(KINDS)})")
    rcpts = accepted.rcpts
    if accepted.mail_from in ("", "<>"):
        return [], [Skipped(kind=kind, recipients=rcpts, reason=(
            "the message had a null sender (<>): reports go to the reverse-path, and a "
            "report about a report is never sent (RFC 5321 section 4.5.5)"))]
    headers = BytesHeaderParser(policy=compat32).parsebytes(accepted.raw)
    builder = _BUILDERS[kind]
    if kind == "autoreply":
        refusal = _autoreply_refusal(headers)
        if refusal is not None:
            return [], [Skipped(kind=kind, recipients=rcpts, reason=f"no auto-reply: {refusal}")]
    if kind in ("dsn", "exchange"):
        if status is None:
            raise ValueError(f"a {kind} report needs a status")
        action = action_for(status, diagnostic)
        wanted = tuple(r for r in rcpts if _notify_allows(accepted.notify.get(r), action))
        skipped = [Skipped(kind=kind, recipients=(r,), reason=(
            f"the sender asked NOTIFY={','.join(accepted.notify.get(r) or ())} for this "
            f"recipient, so no '{action}' notice (RFC 3461 section 4.1)"))
            for r in rcpts if r not in wanted]
        if not wanted:
            return [], skipped
        return [builder(accepted, wanted, status, diagnostic, hostname, now, headers)], skipped
    # one auto-reply, or one complaint, per recipient
    return [builder(accepted, (r,), status, diagnostic, hostname, now, headers)
            for r in rcpts], []


# ---------------------------------------------------------------- assembling


def _text(body: str, subtype: str = "plain") -> MIMEText:
    """A text part readable in the raw source: 7-bit as it is, otherwise
    UTF-8 in quoted-printable (the email package's default would be base64)."""
    if body.isascii():
        part = MIMEText(body, subtype, "us-ascii")
    else:
        cs = _charset.Charset("utf-8")
        cs.body_encoding = _charset.QP
        part = MIMEText(body, subtype, cs)  # type: ignore[arg-type]
    del part["MIME-Version"]
    return part


def _serialise(msg: Message) -> bytes:
    """Bytes with CRLF line ends, as sent over SMTP."""
    text = msg.as_bytes(policy=compat32.clone(linesep="\n", max_line_length=998))
    return re.sub(rb"\r?\n", b"\r\n", text)


def _header_block(raw: bytes) -> bytes:
    m = re.search(rb"\r?\n\r?\n", raw)
    return raw[: m.start()] if m else raw


def _returned_part(accepted: Accepted) -> Message:
    """The original, as RFC 3462/6522 return it: the whole message when the
    sender asked RET=FULL, else its header section only."""
    if (accepted.ret or "").upper() == "FULL":
        part = MIMEBase("message", "rfc822")
        del part["MIME-Version"]
        part.set_payload([_parsed(accepted.raw)])
        return part
    text = _header_block(accepted.raw).decode("utf-8", "replace").replace("\r\n", "\n")
    return _text(text + "\n", "rfc822-headers")


def _parsed(raw: bytes) -> Message:
    from email import message_from_bytes

    return message_from_bytes(raw, policy=compat32)


def _fields(pairs: Sequence[tuple[str, str | None]]) -> Message:
    block = Message()
    for name, value in pairs:
        if value is not None:
            block[name] = value
    return block


def _delivery_status(accepted: Accepted, rcpts: Sequence[str], status: str,
                     diagnostic: str, action: str, hostname: str, now: float) -> Message:
    """The message/delivery-status part (RFC 3464 section 2)."""
    part = MIMEBase("message", "delivery-status")
    del part["MIME-Version"]
    blocks: list[Message | str] = [_fields([
        ("Reporting-MTA", f"dns; {hostname}"),
        ("X-Reporting-Software", USER_AGENT),
        ("Original-Envelope-Id", accepted.envid),
        ("Received-From-MTA", f"dns; {accepted.helo}" if accepted.helo else None),
        ("Arrival-Date", formatdate(accepted.received_at, usegmt=True)),
    ])]
    for r in rcpts:
        blocks.append(_fields([
            ("Original-Recipient", accepted.orcpt.get(r)),
            ("Final-Recipient", f"rfc822; {r}"),
            ("Action", action),
            ("Status", status),
            ("Remote-MTA", f"dns; {hostname}"),
            ("Diagnostic-Code", f"smtp; {diagnostic}"),
            ("Last-Attempt-Date", formatdate(now, usegmt=True)),
            ("Will-Retry-Until", formatdate(now + 86400, usegmt=True)
             if action == "delayed" else None),
        ]))
    part.set_payload(blocks)
    return part


def _envelope_headers(msg: Message, *, sender: str, to: str, subject: str, hostname: str,
                      now: float, headers: Message) -> None:
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = make_msgid("harness", domain=hostname)
    original_id = headers.get("Message-ID")
    if original_id:
        msg["In-Reply-To"] = str(original_id).strip()
        msg["References"] = str(original_id).strip()


def _subject(headers: Message) -> str:
    return " ".join(str(headers.get("Subject", "")).split()) or "(no subject)"


def _report_container(report_type: str) -> MIMEMultipart:
    outer = MIMEMultipart("report")
    outer.set_param("report-type", report_type)
    return outer


_DSN_SUBJECT = {"failed": "Delivery failed", "delayed": "Delivery delayed",
                "delivered": "Delivered"}
_DSN_TEXT = {
    "failed": ("Your message could not be delivered to the recipients below. The server "
               "took it first and gave up on it later, as a gateway in front of a "
               "mailbox server does; the reason each recipient failed follows."),
    "delayed": ("Your message has not reached the recipients below yet. Delivery is still "
                "being tried; you will hear again if it fails for good. Nothing needs to "
                "be done now."),
    "delivered": "Your message was delivered to the recipients below, as you asked to be told.",
}


def _build_dsn(accepted: Accepted, rcpts: Sequence[str], status: str | None,
               diagnostic: str | None, hostname: str, now: float, headers: Message) -> Report:
    assert status is not None
    smtp = _smtp_diagnostic(status, diagnostic)
    action = action_for(status, smtp)
    lines = [f"This is the mail system at {hostname} (SMTP Harness, a test server).", "",
             textwrap.fill(_DSN_TEXT[action], 72), ""]
    lines += [f"<{r}>: {smtp}" for r in rcpts]
    outer = _report_container("delivery-status")
    subject = f"{_DSN_SUBJECT[action]}: {_subject(headers)}"
    _envelope_headers(outer, sender=f"Mail Delivery System <MAILER-DAEMON@{hostname}>",
                      to=accepted.mail_from, subject=subject, hostname=hostname, now=now,
                      headers=headers)
    outer["Auto-Submitted"] = "auto-replied"
    outer.attach(_text("\n".join(lines) + "\n"))
    outer.attach(_delivery_status(accepted, rcpts, status, smtp, action, hostname, now))
    outer.attach(_returned_part(accepted))
    return Report(kind="dsn", to=accepted.mail_from, recipients=tuple(rcpts), status=status,
                  raw=_serialise(outer), subject=subject)


def _exchange_line(status: str, smtp: str) -> str:
    """'#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##', Exchange's way of
    quoting the reply in its diagnostic section."""
    basic = _BASIC.match(smtp)
    code = basic.group(1) if basic else str(_BASIC_FOR_CLASS[status[0]])
    text = _BASIC.sub("", smtp, count=1).strip()
    text = _ENHANCED.sub("", text, count=1).strip() if text.startswith(status) else text
    if not text:
        text = _EXCHANGE_COMPONENT.get(status, "")
    return f"#{code} {status} {text} ##".replace("  ", " ")


def _explain_for_user(status: str) -> str:
    info = lookup(status)
    title = info.title if info is not None else "Delivery problem"
    return (f"{title}. The server that holds this mailbox refused the message after it had "
            f"been accepted. Check the address, or ask the recipient's administrator; the "
            f"details below are for them.")


def _build_exchange(accepted: Accepted, rcpts: Sequence[str], status: str | None,
                    diagnostic: str | None, hostname: str, now: float, headers: Message
                    ) -> Report:
    assert status is not None
    if diagnostic is None and status in _EXCHANGE_COMPONENT:
        # what Exchange itself writes for the code: its component string
        diagnostic = f"{_BASIC_FOR_CLASS[status[0]]} {status} {_EXCHANGE_COMPONENT[status]}"
    smtp = _smtp_diagnostic(status, diagnostic)
    action = action_for(status, smtp)
    failed = action == "failed"
    head = ("Delivery has failed to these recipients or groups:" if failed
            else "Delivery is delayed to these recipients or groups:")
    text = [head, ""]
    for r in rcpts:
        text += [r, textwrap.fill(_explain_for_user(status), 72) if failed else
                 "The message is still being retried; nothing needs to be done yet.", ""]
    text += ["", "", "", "Diagnostic information for administrators:", "",
             f"Generating server: {hostname}", ""]
    for r in rcpts:
        text += [r, f"{_exchange_line(status, smtp)}", ""]
    text += ["Original message headers:", "",
             _header_block(accepted.raw).decode("utf-8", "replace").replace("\r\n", "\n")]
    plain = "\n".join(text) + "\n"
    markup = "".join(
        f"<p>{html.escape(line)}</p>" if line else "" for line in text[:-1])
    markup += f"<pre>{html.escape(text[-1])}</pre>"
    alternative = MIMEMultipart("alternative")
    del alternative["MIME-Version"]
    alternative.attach(_text(plain))
    alternative.attach(_text(f"<html><body>{markup}</body></html>\n", "html"))
    outer = _report_container("delivery-status")
    prefix = "Undeliverable" if failed else "Delivery delayed"
    subject = f"{prefix}: {_subject(headers)}"
    _envelope_headers(outer, sender=f"Postmaster <postmaster@{hostname}>",
                      to=accepted.mail_from, subject=subject, hostname=hostname, now=now,
                      headers=headers)
    outer["Auto-Submitted"] = "auto-replied"
    outer.attach(alternative)
    outer.attach(_delivery_status(accepted, rcpts, status, smtp, action, hostname, now))
    outer.attach(_returned_part(accepted))
    return Report(kind="exchange", to=accepted.mail_from, recipients=tuple(rcpts),
                  status=status, raw=_serialise(outer), subject=subject)


_AUTOREPLY_TEXT = ("Thank you for your message. I am away and read mail only now and then;\n"
                   "I will answer when I am back.\n\n(An automatic reply from SMTP Harness, "
                   "a test server,\nsent because a scenario rule asked for it.)")


def _build_autoreply(accepted: Accepted, rcpts: Sequence[str], status: str | None,
                     diagnostic: str | None, hostname: str, now: float, headers: Message
                     ) -> Report:
    (rcpt,) = rcpts
    reply = _text((diagnostic or _AUTOREPLY_TEXT) + "\n")
    reply["MIME-Version"] = "1.0"
    subject = f"Auto: {_subject(headers)}"
    _envelope_headers(reply, sender=rcpt, to=accepted.mail_from, subject=subject,
                      hostname=hostname, now=now, headers=headers)
    reply["Auto-Submitted"] = "auto-replied"  # RFC 3834 section 5
    reply["X-Auto-Response-Suppress"] = "All"  # Exchange: do not answer this either
    return Report(kind="autoreply", to=accepted.mail_from, recipients=(rcpt,), status=None,
                  raw=_serialise(reply), subject=subject)


def _domain(address: str) -> str | None:
    return address.rpartition("@")[2].lower() or None if "@" in address else None


def _build_arf(accepted: Accepted, rcpts: Sequence[str], status: str | None,
               diagnostic: str | None, hostname: str, now: float, headers: Message) -> Report:
    (rcpt,) = rcpts
    source = accepted.client_ip
    text = diagnostic or textwrap.fill(
        f"This is an abuse report for a message {rcpt} received"
        + (f" from {source}" if source else "")
        + f" on {formatdate(accepted.received_at, usegmt=True)}: the recipient marked it "
        "as unwanted. (A complaint made by SMTP Harness, a test server, because a "
        "scenario rule asked for it.)", 72)
    from_domain = None
    for _, addr in getaddresses([str(v) for v in headers.get_all("From") or []]):
        from_domain = _domain(addr) or from_domain
    feedback = "\n".join(f"{k}: {v}" for k, v in (
        ("Feedback-Type", "abuse"),
        ("User-Agent", USER_AGENT),
        ("Version", "1"),
        ("Original-Mail-From", f"<{accepted.mail_from}>"),
        ("Original-Rcpt-To", f"<{rcpt}>"),
        ("Arrival-Date", formatdate(accepted.received_at, usegmt=True)),
        ("Reporting-MTA", f"dns; {hostname}"),
        ("Source-IP", source),
        ("Reported-Domain", from_domain or _domain(accepted.mail_from)),
    ) if v) + "\n"
    outer = _report_container("feedback-report")
    subject = f"Complaint about: {_subject(headers)}"
    _envelope_headers(outer, sender=f"Feedback Loop <fbl@{hostname}>", to=accepted.mail_from,
                      subject=subject, hostname=hostname, now=now, headers=headers)
    outer["Auto-Submitted"] = "auto-generated"
    readable = _text(text + "\n")
    report = MIMEBase("message", "feedback-report")
    del report["MIME-Version"]
    report.set_payload(feedback)  # written as it is: "name: value" lines (RFC 5965 3.1)
    outer.attach(readable)
    outer.attach(report)
    outer.attach(_returned_part(Accepted(**{**accepted.__dict__, "ret": "FULL"})))
    return Report(kind="arf", to=accepted.mail_from, recipients=(rcpt,), status=None,
                  raw=_serialise(outer), subject=subject)


_BUILDERS = {"dsn": _build_dsn, "exchange": _build_exchange, "autoreply": _build_autoreply,
             "arf": _build_arf}
