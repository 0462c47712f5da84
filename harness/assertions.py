"""Assertion helpers with precise failure messages, for tests of code that
sends mail:

    assert_replied(session, phase="rcpt", code=451)
    assert_ndr(message, status="5.1.1")

Each raises HarnessAssertionError saying what was expected and what the
transcript or the NDR actually holds."""

from __future__ import annotations

from harness.store.db import MessageRecord, SessionRecord
from harness.testing import HarnessAssertionError


def _replies(session: SessionRecord, phase: str | None) -> list[tuple[str, str | None]]:
    """(reply line, rule) of the session's final reply lines, in a phase."""
    out = []
    for e in session.events:
        if e.direction != "S" or (len(e.text) > 3 and e.text[3] == "-"):
            continue
        if phase is None or e.phase == phase:
            out.append((e.text, e.rule))
    return out


def assert_replied(session: SessionRecord, *, phase: str | None = None,
                   code: int | None = None, enhanced: str | None = None,
                   rule: str | None = None) -> str:
    """The harness sent a reply matching all that is given (in `phase`, with
    `code`, `enhanced` status, decided by `rule`). Returns that reply line."""
    for text, by in _replies(session, phase):
        parts = text.split(" ", 2)
        if code is not None and parts[0] != str(code):
            continue
        if enhanced is not None and (len(parts) < 2 or parts[1] != enhanced):
            continue
        if rule is not None and by != rule:
            continue
        return text
    want = ", ".join(f"{k}={v}" for k, v in (("phase", phase), ("code", code),
                                             ("enhanced", enhanced), ("rule", rule))
                     if v is not None)
    sent = "\n".join(f"  [{e.phase or '-'}] {e.direction}: {e.text}"
                     + (f"  [{e.rule}]" if e.rule else "")
                     for e in session.events if e.direction in "CS")
    raise HarnessAssertionError(
        f"session {session.id}: no reply with {want}. The transcript:\n{sent}")


def assert_ndr(message: MessageRecord, *, status: str | None = None,
               recipient: str | None = None, action: str | None = None,
               diagnostic: str | None = None) -> None:
    """The message is an NDR (DSN) whose recipient (or any) has this status,
    action, and a diagnostic containing `diagnostic`."""
    from harness.analysis.dsn import parse_ndr

    if message.raw is None:
        raise HarnessAssertionError(f"message {message.id} was read without its bytes")
    ndr = parse_ndr(message.raw)
    if ndr is None:
        raise HarnessAssertionError(
            f"message {message.id} (from {message.mail_from or '<>'}, subject "
            f"{message.subject!r}) is not an NDR")
    rows = [r for r in ndr.recipients
            if recipient is None or (r.final_recipient or "").lower().endswith(
                recipient.lower())]
    for r in rows:
        if status is not None and r.status != status:
            continue
        if action is not None and (r.action or "").lower() != action.lower():
            continue
        if diagnostic is not None and diagnostic not in (r.diagnostic_text or ""):
            continue
        return
    seen = "\n".join(f"  {r.final_recipient}: action {r.action}, status {r.status}, "
                     f"diagnostic {r.diagnostic_text!r}" for r in ndr.recipients) or "  (none)"
    want = ", ".join(f"{k}={v!r}" for k, v in (("recipient", recipient), ("status", status),
                                               ("action", action),
                                               ("diagnostic", diagnostic)) if v is not None)
    raise HarnessAssertionError(
        f"NDR message {message.id} has no recipient with {want}. It reports:\n{seen}")
