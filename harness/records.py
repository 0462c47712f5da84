"""The typed records the SMTP session produces and everything downstream
reads: the store writes them, the CLI and the page show them, tests assert
on them. One type per kind of record, from the session to the screen.

May know: the standard library's typing. Must not know: I/O of any kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

#: Who a transcript line is from: the client, the server, or the harness's
#: own note (a delay, a fault, a TLS handshake, the message being stored).
Direction = Literal["C", "S", "I"]

#: What one sender/recipient pair's attempt came to on one connection.
Outcome = Literal["accepted", "deferred", "rejected", "dropped", "reset", "hang", "lost"]

OUTCOMES: tuple[Outcome, ...] = ("accepted", "deferred", "rejected", "dropped", "reset",
                                 "hang", "lost")


class NotStored(Exception):
    """The store could not take a message (its disk full, its file read-only
    or gone): the client is told to try again later, as a receiver short of
    space does (RFC 3463 X.3.1), and nothing says the message was kept."""

    reply = "452 4.3.1 Insufficient system storage"


class TranscriptLine(NamedTuple):
    """One line of a session's transcript, with the time it happened, the
    SMTP step it belongs to and the rule that decided it (None: the
    harness's normal behaviour). A NamedTuple: it is written to the store as
    it is, and there are many of them."""

    session_id: int
    t: float
    direction: Direction
    phase: str | None
    text: str
    rule: str | None

    def as_dict(self) -> dict[str, Any]:
        return self._asdict()


class AttemptRecord(NamedTuple):
    """One sender/recipient pair reaching a verdict on one connection (the
    unit a retry timeline is made of), as the session writes it."""

    session_id: int
    t: float
    mail_from: str
    rcpt: str
    phase: str
    code: int | None  # None when the verdict was a fault or the client vanished
    enhanced: str | None
    reply: str | None
    outcome: Outcome
    rule: str | None
    message_id: int | None


class Body:
    """A message's bytes as received, in one part or several: a large
    message is read in parts of about a megabyte, so it is never held whole
    twice (nor copied whole each time the buffer reading it grows)."""

    __slots__ = ("_whole", "parts", "size")

    def __init__(self, parts: Sequence[bytes | bytearray]) -> None:
        self.parts = tuple(p for p in parts if p)
        self.size = sum(len(p) for p in self.parts)
        self._whole: bytes | bytearray | None = None

    def __len__(self) -> int:
        return self.size

    def whole(self) -> bytes | bytearray:
        """All of it in one piece (joined once, for those who need that)."""
        if self._whole is None:
            self._whole = (self.parts[0] if len(self.parts) == 1
                           else b"".join(self.parts))
        return self._whole

    def head(self, n: int) -> bytes | bytearray:
        """The first `n` bytes, joining only the parts they span."""
        if not self.parts or len(self.parts[0]) >= n:
            return self.parts[0][:n] if self.parts else b""
        out = bytearray()
        for p in self.parts:
            out += p[:n - len(out)]
            if len(out) >= n:
                break
        return out


class MessageDraft(NamedTuple):
    """A received message and its envelope, for the store to keep (it gives
    the message its id)."""

    session_id: int
    t: float
    mail_from: str
    rcpt_tos: tuple[str, ...]
    mail_options: tuple[str, ...]
    rcpt_options: tuple[str, ...]
    raw: Body  # the session's own buffers, handed over, not copied
    subject: str | None
    message_id: str | None
    dsn: dict[str, Any]
