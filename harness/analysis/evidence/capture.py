"""What the harness recorded, as plain frozen data for the lining up: the
store's sessions (with their transcripts), attempts and messages, handed in
by the caller (the CLI, the API and the lab read them from the store; this
package never opens it). Times are on the harness's clock, in epoch
seconds; `Capture.label` names the store when there are several (a lab's
target and the collector its bounces went to).

May know: nothing but these types."""

from __future__ import annotations

from dataclasses import dataclass

from harness.analysis.evidence.base import Endpoint

__all__ = ["Capture", "CapturedAttempt", "CapturedEvent", "CapturedMessage",
           "CapturedSession"]


@dataclass(frozen=True, kw_only=True)
class CapturedEvent:
    t: float
    direction: str  # C client, S server, I information
    phase: str | None
    text: str
    rule: str | None = None


@dataclass(frozen=True, kw_only=True)
class CapturedSession:
    id: int
    started_at: float
    ended_at: float | None
    peer: Endpoint  # the sender's side of the connection
    listener: Endpoint | None  # ours
    helo: str | None = None
    end_reason: str | None = None
    events: tuple[CapturedEvent, ...] = ()
    store: str = ""


@dataclass(frozen=True, kw_only=True)
class CapturedAttempt:
    """One sender/recipient pair reaching a verdict on one connection."""

    id: int
    session_id: int
    t: float
    mail_from: str
    rcpt: str
    phase: str
    code: int | None
    enhanced: str | None
    reply: str | None
    outcome: str  # accepted | deferred | rejected | dropped | reset | hang | lost
    rule: str | None = None
    message_id: int | None = None  # the stored copy, when there is one
    store: str = ""


@dataclass(frozen=True, kw_only=True)
class CapturedMessage:
    id: int
    session_id: int
    received_at: float
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message_id: str | None  # the Message-ID header
    subject: str | None = None
    is_ndr: bool = False
    ndr_kind: str | None = None  # failure, delay, ...
    ndr_original_id: str | None = None  # the Message-ID of the message it reports on
    ndr_recipients: tuple[tuple[str | None, str | None], ...] = ()  # (recipient, status)
    store: str = ""


@dataclass(frozen=True, kw_only=True)
class Capture:
    """One store's records."""

    label: str
    sessions: tuple[CapturedSession, ...] = ()
    attempts: tuple[CapturedAttempt, ...] = ()
    messages: tuple[CapturedMessage, ...] = ()
