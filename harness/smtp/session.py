"""The SMTP server session, sans-IO: bytes in, actions out.

In the manner of h11: the caller owns the socket, the clock's ticking and
every wait; this object owns the conversation. It reads command lines, DATA
bodies and BDAT chunks out of the bytes it is fed, keeps the one copy of the
conversation's state (greeting, TLS, login, the transaction), applies every
guard (command order, 503/530/554, limits, syntax), asks the scenario engine
how to answer each step and returns what to do about it as a list of
actions: bytes to send, transcript lines and attempts to record, a delay to
wait, a check to run, a message to store and commit, TLS to start, a fault
to play, the connection to close.

Some actions are requests (`Request`): the session stops after one and
goes on when the caller answers it with `resume(result)`. Everything else
is done in order, synchronously, by the caller.

The conversation is a generator: each command handler is linear code that
`yield`s what it needs (a line, a body, a chunk, or a request for the
caller) and receives it. The generator never sees a socket or an event loop.

May know: the scenario engine and model, ESMTP parameter parsing, the typed
records, the standard library's pure parts.
Must not know: asyncio, socket, ssl, sqlite3, aiosmtpd."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.header import decode_header, make_header
from typing import Any, Literal, Protocol

from harness.records import (
    AttemptRecord,
    Body,
    Direction,
    MessageDraft,
    NotStored,
    Outcome,
    TranscriptLine,
)
from harness.scenario import engine as ev
from harness.scenario.engine import Connection, Decision
from harness.scenario.model import Fault, Phase, Server, TlsMode
from harness.smtp import params as px

MAX_BAD_COMMANDS = 20  # then 421 and close, as Postfix's smtpd_hard_error_limit
MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, including CRLF
MAX_LINE = 1001  # longest line read at all (MAIL/RCPT with parameters); longer: 500
MAX_TRANSCRIPT_TEXT = 2000
PART = 1 << 20  # a long DATA body is moved out of the buffer in parts of about this size

# ------------------------------------------------------------------ actions


class Action:
    """Something the caller does, in order."""

    __slots__ = ()


class Request(Action):
    """An action the session waits on: the caller answers with `resume()`."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Send(Action):
    """Write these bytes (replies, already recorded)."""

    data: bytes


#: A transcript line to keep and show is an action too: the TranscriptLine
#: itself (there are many, so no wrapper).
Out = Action | TranscriptLine


@dataclass(frozen=True, slots=True)
class Attempt(Action):
    """A sender/recipient pair's verdict to keep (the retry timeline)."""

    record: AttemptRecord


@dataclass(frozen=True, slots=True)
class Update(Action):
    """Columns of the session's own row to set (helo, tls_version, ...)."""

    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Error(Action):
    """Something went wrong inside the harness (not the client's fault):
    keep it for whoever watches (a test re-raises it)."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class Close(Action):
    """End the connection after what was sent: `fin` closes it, `rst`
    resets it (TCP RST), `hang` keeps it open and silent until the client
    gives up or the idle timeout ends it. The session is over; the caller
    reports the connection's end with `connection_lost()`."""

    how: Literal["fin", "rst", "hang"]


@dataclass(frozen=True, slots=True)
class TlsFail(Action):
    """The tls_fail fault: after the 220, answer the client's TLS hello
    with a handshake_failure alert and close."""


@dataclass(frozen=True, slots=True)
class MessageStored(Action):
    """A message is durably stored (after its commit, before its reply):
    tell watchers, queue its analysis, pass it on."""

    message_id: int
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: Body  # the received buffers themselves
    auth: Any  # the authentication results a rule waited for, or None
    accepted: bool  # its reply is positive (handlers and forward: get it)
    rule: str | None  # the rule that decided its reply (its bounce: is sent)
    dsn: dict[str, Any]  # the DSN parameters, as in the draft


@dataclass(frozen=True, slots=True)
class Delay(Request):
    """Wait this long, then resume (None)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Drip(Request):
    """Write these bytes one at a time, `interval` seconds apart (tarpit),
    then resume (None)."""

    data: bytes
    interval: float


@dataclass(frozen=True, slots=True)
class StartTls(Request):
    """Start TLS on the connection; resume with `TlsInfo`, or with an
    exception when the handshake failed."""


@dataclass(frozen=True, slots=True)
class CheckSpf(Request):
    """Check SPF for this MAIL FROM; resume with an `SpfOutcome`."""

    sender: str


@dataclass(frozen=True, slots=True)
class CheckMessage(Request):
    """Check DKIM and DMARC (and SPF) of a received message; resume with an
    `AuthOutcome`. The message as received (joined where the check runs,
    not on the event loop)."""

    content: Body
    mail_from: str


@dataclass(frozen=True, slots=True)
class CheckContent(Request):
    """Test the scenario's header and body conditions on a large message
    (off the event loop); resume with the engine's `ContentChecks`."""

    content: Body


@dataclass(frozen=True, slots=True)
class StoreMessage(Request):
    """Hand the message to the store; resume with its id (int)."""

    draft: MessageDraft


@dataclass(frozen=True, slots=True)
class Commit(Request):
    """Resume (None) once everything handed to the store so far is durable;
    or with an exception when the store could not write."""


@dataclass(frozen=True, slots=True)
class Consult(Request):
    """Decide `event` against the shared book (several processes or hosts
    serve the scenario): resume with the Decision."""

    event: ev.Event


# ----------------------------------------------------- what requests return


@dataclass(frozen=True, slots=True)
class TlsInfo:
    version: str | None
    cipher: str | None


class SpfOutcome(Protocol):
    @property
    def result(self) -> str: ...
    @property
    def domain(self) -> str: ...
    @property
    def client_ip(self) -> str: ...
    @property
    def mechanism(self) -> str | None: ...


class DmarcOutcome(Protocol):
    @property
    def result(self) -> str: ...


class AuthOutcome(Protocol):
    @property
    def dkim_result(self) -> str: ...
    @property
    def dmarc(self) -> DmarcOutcome: ...
    @property
    def authentication_results(self) -> str: ...


class Decider(Protocol):
    """The scenario engine as the session sees it (the listener wraps the
    engine to keep its journal)."""

    @property
    def uses(self) -> frozenset[str]: ...  # the matcher keys the scenario uses

    def connect(self, client: str) -> Connection: ...
    def disconnect(self, conn: Connection) -> None: ...
    def decide(self, session: ServerSession, event: ev.Event) -> Decision | Consult: ...


# ------------------------------------------------------------- input needs


class _Line:
    """Wait for a command (or SASL) line."""


class _Body:
    """Wait for a DATA body up to CRLF.CRLF; the state of the search."""

    __slots__ = ("dropped", "kept", "limit", "parts", "scan", "stuffed")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.scan = 0  # where to look for a line starting with a dot next
        self.stuffed = 0  # doubled dots in the buffer before `scan`
        self.dropped = 0  # message bytes thrown away once over the limit
        self.parts: list[bytes] = []  # the message so far, moved out of the buffer
        self.kept = 0  # their size


class _Chunk:
    """Wait for a BDAT chunk of `size` octets; kept, or dropped as it comes."""

    __slots__ = ("keep", "left", "parts")

    def __init__(self, size: int, keep: bool) -> None:
        self.left = size
        self.keep = keep
        self.parts: list[bytes] = []


class _Part:
    """Wait for up to `limit` bytes of a body (faults part-way through DATA)."""

    __slots__ = ("got", "limit", "tail")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.got = 0
        # issue 11 (hardening, for the lead's review): the last bytes seen, so
        # a terminator split across reads, or an empty message (".\r\n"
        # right after the DATA line's CRLF), is seen; found by the fuzz target
        self.tail = b"\r\n"


_Input = _Line | _Body | _Chunk | _Part
_LINE = _Line()
_MORE = object()  # not enough input yet
_TOO_LONG = object()  # a line over MAX_LINE was read and dropped


class _Ended(Exception):
    """The conversation is over (a close, a fault): unwind the generator."""


Step = Generator["_Input | Request", Any, Any]

# ----------------------------------------------------------- the transaction


@dataclass(slots=True)
class Transaction:
    """One mail transaction, from an accepted MAIL to its verdict or reset:
    the only copy of it (the engine reads it through the session)."""

    mail_from: str
    params: px.MailParams
    options: tuple[str, ...]
    spf: str | None
    rcpts: list[str] = field(default_factory=list)  # accepted, no verdict yet
    rcpt_params: dict[str, px.RcptParams] = field(default_factory=dict)
    rcpt_options: list[str] = field(default_factory=list)
    rcpt_commands: int = 0  # RCPT commands, accepted or not
    chunks: list[bytes] | None = None  # BDAT chunks so far
    chunks_size: int = 0
    chunk_failed: bool = False
    stored: int | None = None  # the message handed to the store, not durable yet


_ENDING_FAULTS = (Fault.DROP, Fault.RESET, Fault.HANG)
#: a line that starts with a dot: the end of DATA, or a doubled dot
_LINE_DOT = re.compile(rb"\r\n\.")
_COMMIT = Commit()
_FAULT_OUTCOME: dict[Fault, Outcome] = {Fault.DROP: "dropped", Fault.RESET: "reset",
                                        Fault.HANG: "hang"}
_SIZE_REFUSAL = "552 5.3.4 Message size exceeds fixed maximum message size"


# -------------------------------------------------------------- the session


class ServerSession:
    """One SMTP connection's conversation. Feed it with `start()`,
    `receive_data()`, `receive_eof()`, `resume()`, `idle_timeout()` and
    `connection_lost()`; each returns the actions to carry out, in order."""

    def __init__(self, *, session_id: int, server: Server, decider: Decider,
                 clock: Callable[[], float], peer: tuple[str, int],
                 scenario: str = "", tls: TlsInfo | None = None,
                 tls_available: bool = False, notes: Sequence[str] = ()) -> None:
        self.id = session_id
        self.server = server
        self.peer = peer
        self._decider = decider
        self._clock = clock
        self._scenario_name = scenario
        self._tls_available = tls_available
        self._notes = tuple(notes)
        self._initial_tls = tls
        self.connection = decider.connect(peer[0])
        # what the engine reads (SessionFacts), and the rest of the state
        self.tls = tls is not None
        self.helo: str | None = None  # the name of the last accepted HELO/EHLO
        self.auth_user: str | None = None
        self.message_index = 0
        self.transaction: Transaction | None = None
        self.ehlo = False
        self.refused = False  # the banner was negative: only QUIT is served
        self.used: dict[str, Any] = {}  # extensions advertised and used
        self.helo_seen: str | None = None  # the last HELO/EHLO name given, across STARTTLS
        self.last_command = "(connect)"
        self.end_reason: str | None = None
        self.closing_rule: str | None = None  # the rule that ended the session, if one did
        #: the session's envelope: each address the client gave, once
        self.mail_froms: list[str] = []
        self.rcpt_tos: list[str] = []
        self._envelope_changed = False
        self._phase: Phase | None = None
        self._now = clock()  # the time of what is being handled now
        # input
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._discarding = False  # dropping the rest of an over-long line
        self._tls_pending = False  # STARTTLS answered: plain text from now on is dropped
        self.discarded = 0
        # the conversation
        self._gen: Step = self._conversation()
        self._want: _Input | None = None
        self._waiting: Request | None = None
        self._out = self._fresh()
        self.over = False  # the conversation has ended (closing, or closed)
        self.hanging = False
        self.finished = False  # connection_lost() has been reported

    # --------------------------------------------------------- SessionFacts

    @property
    def mail_from(self) -> str | None:
        tx = self.transaction
        return tx.mail_from if tx is not None else None

    @property
    def declared_size(self) -> int | None:
        tx = self.transaction
        return tx.params.size if tx is not None else None

    @property
    def rcpts(self) -> Sequence[str]:
        tx = self.transaction
        return tx.rcpts if tx is not None else ()

    @property
    def rcpt_index(self) -> int:
        tx = self.transaction
        return tx.rcpt_commands if tx is not None else 0

    @property
    def spf(self) -> str | None:
        tx = self.transaction
        return tx.spf if tx is not None else None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf) - self._pos

    @property
    def held(self) -> int:
        """Bytes of the client's held in memory: the buffer, a BDAT chunk
        being read and the transaction's chunks so far."""
        want = self._want
        held = self.buffered + (sum(map(len, want.parts)) if isinstance(want, _Chunk) else 0)
        tx = self.transaction
        return held + (tx.chunks_size if tx is not None and tx.chunks else 0)

    @property
    def in_transfer(self) -> bool:
        """A message's bytes are under way: a DATA body being read, or a
        transaction's BDAT chunks begun (the transfer deadline runs)."""
        if isinstance(self._want, (_Body, _Chunk, _Part)):
            return True
        tx = self.transaction
        return tx is not None and tx.chunks is not None and not self.over

    @property
    def busy(self) -> bool:
        """A request is out: input waits until it is answered."""
        return self._waiting is not None

    # -------------------------------------------------------------- driving

    def start(self) -> list[Out]:
        """The connection is open (after any PROXY header and implicit TLS)."""
        return self._drive(None)

    def receive_data(self, data: bytes) -> list[Out]:
        if self.over or self._tls_pending:
            self.discarded += len(data)
            return []
        if self._discarding:
            end = data.find(b"\n")
            if end < 0:
                return []
            self._discarding = False
            data = data[end + 1:]
            self._buf += data
            if self._want is _LINE:
                self._want = None
                return self._drive(_TOO_LONG)
            return []
        self._buf += data
        want = self._want
        if want is None:
            return []  # busy: the data waits for the conversation
        self._want = None
        return self._drive(None, need=want)

    def receive_eof(self) -> list[Out]:
        """The client closed its sending side. Whatever complete commands it
        sent before are still answered (a pipelined QUIT then a half-close)."""
        self._eof = True
        if self.hanging:
            self.end_reason = self.end_reason or "client closed"
            self.hanging = False
            return [Close("fin")]
        if self.over or self._want is None:
            return []  # done, or busy: the end is noticed when input is next wanted
        # waiting for input that will never come
        self._want = None
        self.end_reason = self.end_reason or "client closed"
        self._stop()
        return [Close("fin")]

    def resume(self, result: object = None) -> list[Out]:
        """The answer to the request the session waits on."""
        if self._waiting is None or self.over:
            return []
        self._waiting = None
        return self._drive(result)

    def throw(self, error: BaseException) -> list[Out]:
        """The request the session waits on failed: `error` is raised where
        the session asked (a failed handshake, a check that broke, a store
        that could not commit)."""
        if self._waiting is None or self.over:
            return []
        self._waiting = None
        return self._drive(None, error)

    def idle_timeout(self) -> list[Out]:
        """Nothing came from the client for the server's timeout."""
        if self.finished:
            return []
        if self.hanging:
            self.end_reason = "hang ended by the idle timeout"
            self.hanging = False
            return [Close("fin")]
        if self.over:
            return [Close("fin")]
        self._out = out = self._fresh()
        self._now = self._clock()
        self.end_reason = "idle timeout"
        self._phase = None
        self._reply(["421 4.4.2 Idle timeout, closing connection"], None)
        out.append(Close("fin"))
        self._stop()
        return out

    def transfer_timeout(self) -> list[Out]:
        """The message's transfer has taken longer than the server's
        data_timeout (a client that drips): 421 and close; its recipients'
        verdict is that reply."""
        if self.over:
            return []
        self._out = out = self._fresh()
        self._now = self._clock()
        self.end_reason = "message transfer timeout"
        reply = "421 4.4.2 Message transfer took too long, closing connection"
        tx = self.transaction
        if tx is not None and tx.rcpts:
            self._attempts(tx.rcpts, None, phase=Phase.MESSAGE.value, default=reply)
            tx.rcpts = []
        self._note(f"message transfer cut after {self.server.data_timeout:g}s "
                   f"({self.held} bytes held)")
        self._phase = None
        self._reply([reply], None)
        out.append(Close("fin"))
        self._stop()
        return out

    def connection_lost(self, error: BaseException | None = None) -> list[Out]:
        """The connection is gone (closed by either side, or broken): the
        last records of the session."""
        if self.finished:
            return []
        self.finished = True
        if self.end_reason is None:
            self.end_reason = "connection lost" if error is not None else "client closed"
        self._stop()
        self._out = out = self._fresh()
        self._now = self._clock()
        tx = self.transaction
        if tx is not None and tx.rcpts:
            # The client vanished after recipients were accepted: the pair
            # saw no verdict on this connection, but the sender did try.
            self._attempts(tx.rcpts, None, phase=(self._phase or Phase.DATA).value,
                           outcome="lost", rule=self.closing_rule, message_id=tx.stored)
            tx.rcpts = []
        self._decider.disconnect(self.connection)
        self._note(f"session ended: {self.end_reason}")
        out.append(Update({
            "ended_at": self._now, "end_reason": self.end_reason, "helo": self.helo_seen,
            "extensions": self.used, "auth_user": self.auth_user,
            "mail_from": self.mail_froms, "rcpt_tos": self.rcpt_tos}))
        return out

    @staticmethod
    def _fresh() -> list[Out]:
        return []

    def _stop(self) -> None:
        """No more conversation: drop the generator and the input."""
        self.over = True
        self._want = None
        self._waiting = None
        self._buf = bytearray()
        self._pos = 0
        self._gen.close()

    def _drive(self, value: object, error: BaseException | None = None, *,
               need: _Input | Request | None = None) -> list[Out]:
        """Run the conversation until it needs input it has not got, or a
        request answered; return the actions it produced. `need`: the input
        the conversation was waiting for, to be taken from the buffer first."""
        self._out = out = self._fresh()
        self._now = self._clock()
        gen = self._gen
        try:
            if need is None:
                need = gen.send(value) if error is None else gen.throw(error)
            while True:
                if isinstance(need, Request):
                    self._waiting = need
                    out.append(need)
                    break
                value = self._take(need)
                if value is _MORE:
                    if self._eof:
                        self.end_reason = self.end_reason or "client closed"
                        out.append(Close("fin"))
                        self._stop()
                    else:
                        self._want = need
                    break
                need = gen.send(value)
        except StopIteration:
            self.over = True
        except Exception as e:  # a bug of ours: keep it, and end this connection
            out.append(Error(e))
            self.end_reason = f"internal error: {type(e).__name__}"
            out.append(Close("fin"))
            self._stop()
        return out

    # ------------------------------------------------------------- reading

    def _take(self, need: _Input) -> object:
        """What `need` waits for, from the buffer; _MORE if it is not all here."""
        buf = self._buf
        pos = self._pos
        if need is _LINE:
            end = buf.find(b"\n", pos)
            if end < 0:
                if len(buf) - pos > MAX_LINE:
                    self._discarding = True
                    self._consume(len(buf))
                return _MORE
            if end - pos > MAX_LINE:
                self._consume(end + 1)
                return _TOO_LONG
            line = bytes(buf[pos:end - 1] if end > pos and buf[end - 1] == 13  # "\r"
                         else buf[pos:end])
            self._consume(end + 1)
            return line
        if isinstance(need, _Body):
            return self._take_body(need)
        if isinstance(need, _Chunk):
            n = min(need.left, len(buf) - pos)
            if n:
                if need.keep:
                    need.parts.append(bytes(buf[pos:pos + n]))
                self._consume(pos + n)
                need.left -= n
            return b"".join(need.parts) if need.left == 0 else _MORE
        assert isinstance(need, _Part)
        n = min(need.limit - need.got, len(buf) - pos)
        piece = need.tail + buf[pos:pos + n]
        self._consume(pos + n)
        need.got += n
        need.tail = bytes(piece[-4:])  # issue 11 (hardening): see _Part
        if need.got >= need.limit or b"\r\n.\r\n" in piece:
            return need.got
        return _MORE

    def _consume(self, upto: int) -> None:
        if upto >= len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif upto > 65536:
            del self._buf[:upto]
            self._pos = 0
        else:
            self._pos = upto

    def _take_body(self, need: _Body) -> object:
        """Up to CRLF.CRLF: (the message unstuffed, as a Body; over the
        limit; size).

        The body is searched in bulk (aiosmtpd reads DATA a line at a time,
        which dominates its cost for larger messages): one regular
        expression finds each line that starts with a dot, the terminator or
        a doubled dot, so one pass counts the dots to undo and finds the end
        (the re module's literal search beats bytes.find() here). What was
        searched is moved out in parts of about PART bytes, so the buffer
        stays small (a growing buffer of hundreds of megabytes is copied
        each time it grows). The size limit applies to the message (RFC
        1870: the doubled dots do not count); over it, the rest is drained,
        not kept."""
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        buf = self._buf
        first = need.scan == 0 and not need.dropped and not need.parts
        if first:
            if buf[:3] == b".\r\n":  # the empty message
                self._consume(3)
                return Body(()), False, 0
            if len(buf) < 3 and buf[:1] == b".":
                return _MORE  # a first line of "." or ".." or ".x": not known yet
        end = -1
        scan = need.scan
        for found in _LINE_DOT.finditer(buf, scan):
            i = found.start()
            if i + 5 > len(buf):  # "\r\n." at the very end: not known yet
                scan = i
                break
            if buf[i + 3:i + 5] == b"\r\n":
                end = i + 2
                break
            need.stuffed += 1
            scan = i + 3
        else:
            scan = max(scan, len(buf) - 2)  # a "\r\n" may be cut in two
        limit = need.limit
        if end < 0:
            need.scan = scan
            if limit and need.dropped + need.kept + len(buf) - need.stuffed > limit + 5:
                # Surely over the limit: keep only a tail long enough to find
                # the terminator.
                cut = min(len(buf) - 8, scan)
                kept = buf.count(b"\r\n.", cut, scan)
                need.dropped += need.kept + cut - (need.stuffed - kept)
                need.parts, need.kept = [], 0
                del buf[:cut]
                need.stuffed = kept
                need.scan = scan - cut
            elif len(buf) > 2 * PART and scan > PART:
                self._part_out(need, scan)
            return _MORE
        if need.dropped:
            self._consume(end + 3)
            return Body(()), True, need.dropped + end
        # The buffer becomes the message's last part (no copy); what the
        # client sent after the dot starts a new buffer.
        rest = bytes(buf[end + 3:])
        del buf[end:]
        self._buf = bytearray(rest)
        self._pos = 0
        if not need.parts and buf[:1] == b".":
            del buf[:1]  # the first line's doubled dot
        last = buf.replace(b"\r\n.", b"\r\n") if need.stuffed else buf
        body = Body((*need.parts, last))
        return body, bool(limit and len(body) > limit), len(body)

    def _part_out(self, need: _Body, scan: int) -> None:
        """Move the searched front of a long body out of the buffer, as a
        part with its doubled dots undone. The cut falls after a byte that
        is not CR or LF, so no "CRLF." is split between two parts."""
        buf = self._buf
        cut = scan - 8
        while cut > 0 and buf[cut - 1] in (10, 13):
            cut -= 1
        part = bytes(buf[:cut])
        if not need.parts and not need.kept and part[:1] == b".":
            part = part[1:]  # the first line's doubled dot
        doubled = part.count(b"\r\n.")
        if doubled:
            part = part.replace(b"\r\n.", b"\r\n")
        need.parts.append(part)
        need.kept += len(part)
        need.stuffed -= doubled
        del buf[:cut]
        need.scan = scan - cut

    def _line_waiting(self) -> bool:
        """Another command is already in the buffer (the client pipelined)."""
        return self._buf.find(b"\n", self._pos) >= 0

    # ----------------------------------------------------------- recording

    def _record(self, direction: Direction, text: str, rule: str | None = None) -> None:
        if len(text) > MAX_TRANSCRIPT_TEXT:
            text = text[:MAX_TRANSCRIPT_TEXT] + f"... ({len(text)} chars)"
        # the phase as the word it is (a StrEnum member is a str)
        self._out.append(TranscriptLine(self.id, self._now, direction, self._phase, text, rule))

    def _note(self, text: str, rule: str | None = None) -> None:
        self._record("I", text, rule)

    def _reply(self, lines: Sequence[str], rule: str | None) -> None:
        """Record and send a reply (one line, or the lines of a multi-line one)."""
        for line in lines:
            self._record("S", line, rule)
        text = f"{lines[0]}\r\n" if len(lines) == 1 else "".join(f"{x}\r\n" for x in lines)
        self._out.append(Send(text.encode("utf-8", "surrogateescape")))

    def _error(self, text: str) -> None:
        """A reply of our own to a command we cannot take."""
        self._reply((text,), None)

    def _attempts(self, rcpts: Sequence[str], d: Decision | None, *, phase: str,
                  default: str = "", message_id: int | None = None,
                  outcome: Outcome | None = None, rule: str | None = None) -> None:
        """Each pair's verdict on this connection: the one place attempts are
        written. The decision's scripted reply or fault, or `default` (our
        normal reply), or (`outcome` given) no reply at all."""
        tx = self.transaction
        mail_from = tx.mail_from if tx is not None else ""
        t = self._now
        code: int | None = None
        enhanced: str | None = None
        reply: str | None = None
        if d is not None:
            rule = d.rule
        if d is not None and d.fault in _ENDING_FAULTS:
            outcome = _FAULT_OUTCOME[d.fault]
        elif d is not None and d.reply is not None:
            code, enhanced, reply = d.reply.code, d.reply.enhanced, str(d.reply)
        elif default:
            code, reply = int(default[:3]), default
            first = default[4:].split(" ", 1)[0]
            enhanced = first if first.count(".") == 2 else None
        if outcome is None:
            outcome = ("accepted" if code is None or code < 400
                       else "deferred" if code < 500 else "rejected")
        for rcpt in rcpts:
            self._out.append(Attempt(AttemptRecord(
                self.id, t, mail_from, rcpt, phase, code, enhanced, reply, outcome, rule,
                message_id)))

    # ---------------------------------------------------- decisions played

    def _decide(self, event: ev.Event) -> Generator[Consult, Decision, Decision]:
        """The decider's decision; one that needs the shared book is asked
        for (Consult) and waited for."""
        d = self._decider.decide(self, event)
        if isinstance(d, Consult):
            d = yield d
        return d

    def _play(self, d: Decision) -> Step:
        """A decision's delay, then its connection fault (which ends the
        conversation): what comes before the reply."""
        if d.rule is None:  # the normal behaviour: nothing to play
            return
        if d.delay > 0:
            self._note(f"delay {d.delay:.3f}s", d.rule)
            yield Delay(d.delay)
        if d.fault in _ENDING_FAULTS:
            self._fault(d.fault, d.rule)

    def _fault(self, fault: Fault, rule: str | None) -> None:
        self._note(f"fault: {fault.value}", rule)
        self.closing_rule = rule
        if fault is Fault.HANG:
            # Say nothing until the client gives up (its EOF) or the idle
            # timeout closes the connection; what it sends meanwhile is dropped.
            self.end_reason = f"hang (rule {rule})"
            self.hanging = True
            self._out.append(Close("hang"))
        else:
            self.end_reason = f"{fault.value} (rule {rule})"
            self._out.append(Close("rst" if fault is Fault.RESET else "fin"))
        raise _Ended

    def _answer(self, d: Decision, default: str | Sequence[str]) -> Step:
        """The scripted reply, or the default; tarpit and close as told."""
        if d.rule is None:  # the normal behaviour
            self._reply((default,) if isinstance(default, str) else default, None)
            return
        if d.reply is not None:
            lines: Sequence[str] = d.reply.render()
        else:
            lines = (default,) if isinstance(default, str) else default
        if d.fault is Fault.TARPIT:
            for line in lines:
                self._record("S", line, d.rule)
                self._note(f"tarpit: one byte every {d.drip:g}s", d.rule)
            yield Drip("".join(f"{x}\r\n" for x in lines).encode("utf-8", "surrogateescape"),
                       d.drip)
        else:
            self._reply(lines, d.rule)
        if d.close or (d.reply is not None and d.reply.code == 421):
            self._hangup(f"closed after {lines[-1][:3]} (rule {d.rule})", d.rule)

    def _hangup(self, reason: str, rule: str | None = None) -> None:
        self.end_reason = reason
        self.closing_rule = rule
        self._out.append(Close("fin"))
        raise _Ended

    # ------------------------------------------------------ the conversation

    def _conversation(self) -> Step:
        try:
            yield from self._banner()
            bad = 0
            while True:
                line = yield _LINE
                if line is _TOO_LONG:
                    self._phase = None
                    self._record("C", "<command line too long>")
                    self._error("500 5.5.2 Line too long")
                    ok = False
                else:
                    ok = yield from self._command(line)
                bad += 0 if ok else 1
                if bad >= MAX_BAD_COMMANDS:
                    self._phase = None
                    self._reply(["421 4.7.0 Too many errors, closing connection"], None)
                    self._hangup("too many errors")
        except _Ended:
            return

    def _banner(self) -> Step:
        for note in self._notes:
            self._note(note)
        if self._initial_tls is not None:
            self._tls_on_record("implicit TLS", self._initial_tls)
        self._phase = Phase.CONNECT
        self._note(f"connection from {self.peer[0]}:{self.peer[1]} "
                   f"(scenario {self._scenario_name})")
        d = yield from self._decide(ev.Connect())
        yield from self._play(d)
        yield from self._answer(d, f"220 {self.server.hostname} {self.server.greeting}")
        if d.reply is not None and not d.reply.is_positive:
            self.refused = True  # RFC 5321 3.1: after 554, wait for QUIT

    def _command(self, line: bytes) -> Step:
        """Run one command line; False when it was not a valid command."""
        verb_bytes, _, arg_bytes = line.partition(b" ")
        verb = verb_bytes.decode("ascii", "replace").upper()
        self._phase = _PHASE_OF.get(verb)
        shown = line.decode("utf-8", "replace")
        if verb == "AUTH" and shown.count(" ") >= 2:
            shown = " ".join(shown.split(" ")[:2]) + " <credentials>"
        self._record("C", shown)
        self.last_command = shown
        if not verb.isalpha() or not verb.isascii():
            self._error("500 5.5.2 Error: bad syntax")
            return False
        if len(line) + 2 > MAX_COMMAND_LINE and verb not in ("MAIL", "RCPT"):
            self._error("500 5.5.2 Line too long")
            return False
        if self.refused and verb != "QUIT":
            self._error("503 5.5.1 Bad sequence of commands")
            return True
        handler = _COMMANDS.get(verb)
        if handler is None:
            self._error(f'500 5.5.1 Error: command "{verb[:20]}" not recognized')
            return False
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape") or None
        if verb in ("MAIL", "RCPT", "BDAT") and self._line_waiting():
            self.used["pipelined"] = self.used.get("pipelined", 0) + 1
        try:
            yield from handler(self, arg)
        except _Ended:
            raise
        except px.ParamError as e:
            self._error(e.reply)
        except Exception as e:  # a bug of ours: say so, keep it, go on
            self._out.append(Error(e))
            self.transaction = None  # never a second DATA on a half-done transaction
            self._reply(["451 4.3.0 Internal error in the harness (recorded)"], None)
        return True

    # ---------------------------------------------------------- HELO, EHLO

    def _helo(self, arg: str | None) -> Step:
        return self._greet(arg, extended=False)

    def _ehlo(self, arg: str | None) -> Step:
        return self._greet(arg, extended=True)

    def _greet(self, arg: str | None, *, extended: bool) -> Step:
        if not arg:
            self._error(f"501 5.5.4 Syntax: {'EHLO' if extended else 'HELO'} hostname")
            return
        d = yield from self._decide(ev.Helo(name=arg, extended=extended))
        yield from self._play(d)
        if d.reply is not None and not d.reply.is_positive:
            yield from self._answer(d, "")
            return
        self.ehlo = extended
        self.helo = self.helo_seen = arg
        self.transaction = None
        first = (f"250 {d.reply.lines[0]}" if d.reply is not None
                 else f"250 {self.server.hostname} Hello {arg}")
        lines = [first]
        if extended:
            advertised = self._extensions()
            self.used["advertised"] = advertised
            lines = [f"250-{x[4:]}" for x in (first, *(f"250 {a}" for a in advertised))]
            lines[-1] = f"250 {lines[-1][4:]}"
        # the lines are whole: the decision's reply (if any) is in the first
        yield from self._answer(Decision(phase=Phase.HELO, rule=d.rule, fault=d.fault,
                                         drip=d.drip, close=d.close), lines)

    def _auth_offered(self) -> bool:
        auth = self.server.auth
        return auth is not None and (self.tls or auth.before_tls)

    def _extensions(self) -> list[str]:
        server = self.server
        ext = server.extensions
        out = []
        if server.size_limit:
            out.append(f"SIZE {server.size_limit}")
        if ext.eightbitmime:
            out.append("8BITMIME")
        if ext.pipelining:
            out.append("PIPELINING")
        if ext.chunking:
            out.append("CHUNKING")
            if ext.eightbitmime:
                out.append("BINARYMIME")
        if ext.dsn:
            out.append("DSN")
        if ext.enhancedstatuscodes:
            out.append("ENHANCEDSTATUSCODES")
        if ext.smtputf8:
            out.append("SMTPUTF8")
        if self._tls_available and not self.tls and server.starttls is not TlsMode.OFF:
            out.append("STARTTLS")
        if self.tls and ext.requiretls:
            out.append("REQUIRETLS")
        if self._auth_offered():
            assert server.auth is not None
            out.append("AUTH " + " ".join(server.auth.mechanisms))
        return out

    # ------------------------------------------------------------ STARTTLS

    def _starttls(self, arg: str | None) -> Step:
        if arg:
            self._error("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls:
            self._error("503 5.5.1 TLS already active")
            return
        if not self._tls_available or self.server.starttls is TlsMode.OFF:
            self._error("502 5.5.1 STARTTLS not offered")
            return
        d = yield from self._decide(ev.StartTls())
        yield from self._play(d)
        if d.fault is Fault.TLS_FAIL:
            self._reply(["220 2.0.0 Ready to start TLS"], d.rule)
            self._note("fault: tls_fail (handshake_failure alert, then close)", d.rule)
            self.closing_rule = d.rule
            self.end_reason = f"tls_fail (rule {d.rule})"
            self._out.append(TlsFail())
            raise _Ended
        if not d.accepts:
            yield from self._answer(d, "")
            return
        yield from self._answer(d, "220 2.0.0 Ready to start TLS")
        # RFC 3207 4.2 (and CVE-2011-0411): nothing the client sent in plain
        # text after STARTTLS may count as sent over TLS.
        leftover = len(self._buf) - self._pos
        self._buf.clear()
        self._pos = 0
        self._tls_pending = True
        self.discarded = 0
        try:
            got = yield StartTls()
        except Exception as e:  # the handshake failed: nothing more to say in plain text
            self._tls_pending = False
            self._note(f"TLS handshake failed: {e}")
            self._hangup("TLS handshake failed")
        self._tls_pending = False
        leftover += self.discarded
        if leftover:
            self._note(f"discarded {leftover} bytes sent in plain text after STARTTLS")
        assert isinstance(got, TlsInfo)
        # RFC 3207 4.2: forget everything learnt before TLS.
        self.tls = True
        self.helo = None
        self.auth_user = None  # a login in plain text does not carry over
        self.ehlo = False
        self.transaction = None
        self.used["starttls"] = True
        self._tls_on_record("STARTTLS", got)

    def _tls_on_record(self, how: str, info: TlsInfo) -> None:
        self._note(f"{how}: {info.version} {info.cipher}")
        self._out.append(Update({"tls_version": info.version, "tls_cipher": info.cipher}))

    # ---------------------------------------------------------------- AUTH

    def _auth(self, arg: str | None) -> Step:
        auth = self.server.auth
        if self.helo is None:
            self._error("503 5.5.1 Error: send EHLO first")
            return
        if auth is None:
            self._error("502 5.5.1 AUTH not offered")
            return
        if not self._auth_offered():
            self._error("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.auth_user is not None:
            self._error("503 5.5.1 Already authenticated")
            return
        if self.transaction is not None:
            self._error("503 5.5.1 AUTH not allowed during a mail transaction")
            return
        mechanism, _, initial = (arg or "").partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in auth.mechanisms:
            self._error(f"504 5.5.4 Unrecognized authentication type {mechanism[:20]}")
            return
        got = yield from self._sasl(mechanism, initial.strip() or None, auth.users)
        if got is None:
            self._error("501 5.7.0 Authentication cancelled")
            return
        user, valid = got
        d = yield from self._decide(ev.Auth(mechanism=mechanism, user=user, valid=valid))
        yield from self._play(d)
        self.used["auth"] = mechanism
        positive = d.reply.is_positive if d.reply is not None else valid
        if d.accepts and positive:
            self.auth_user = user
            self._note(f"authenticated as {user} ({mechanism})", d.rule)
            self._out.append(Update({"auth_user": user}))
        yield from self._answer(d, "235 2.7.0 Authentication successful" if valid
                                else "535 5.7.8 Authentication credentials invalid")

    def _sasl(self, mechanism: str, initial: str | None, users: Any) -> Step:
        """The SASL exchange: (user, credentials right), or None if cancelled."""
        if mechanism == "PLAIN":
            response = initial if initial not in (None, "=") else (
                yield from self._challenge(""))
            if response is None:
                return None
            user, password = px.plain_credentials(response)
            return user, users.get(user) == password
        if mechanism == "LOGIN":
            if initial is not None and initial != "=":
                user_b64: str | None = initial
            else:
                user_b64 = yield from self._challenge(px.b64("Username:"))
            if user_b64 is None:
                return None
            user = px.b64_decode(user_b64)
            pw_b64 = yield from self._challenge(px.b64("Password:"))
            if pw_b64 is None:
                return None
            return user, users.get(user) == px.b64_decode(pw_b64)
        challenge = (f"<{secrets.randbelow(10**12)}.{int(self._clock())}"
                     f"@{self.server.hostname}>")
        response = yield from self._challenge(px.b64(challenge))
        if response is None:
            return None
        user, ok = px.cram_md5_valid(challenge, response, users.get(
            px.b64_decode(response).rpartition(" ")[0]))
        return user, ok

    def _challenge(self, text: str) -> Step:
        """334 and the client's answer; None for "*" (cancel)."""
        self._reply([f"334 {text}".rstrip() if text else "334 "], None)
        line = yield _LINE
        if line is _TOO_LONG:
            raise px.ParamError("500 5.5.6 Authentication exchange line is too long")
        answer = line.decode("utf-8", "replace")
        self._record("C", "<credentials>" if answer != "*" else "*")
        return None if answer == "*" else answer

    # ----------------------------------------------------------- MAIL RCPT

    def _path(self, arg: str | None, keyword: str, syntax: str, *,
              null_ok: bool) -> tuple[str, list[str]] | None:
        """(address, ESMTP parameters) of MAIL FROM:/RCPT TO:, or None after
        answering a malformed one. The null path <> is "" where allowed."""
        if arg is None or arg[:len(keyword)].upper() != keyword:
            self._error(syntax)
            return None
        found = px.parse_path(arg[len(keyword):].strip())
        if found is None:
            self._error("553 5.1.3 Error: malformed address")
            return None
        address, params_text = found
        if address == "<>" and null_ok:
            address = ""  # the null reverse-path of bounces (RFC 5321 4.5.5)
        elif not address or address == "<>":
            self._error(syntax)
            return None
        return address, params_text.split()

    def _mail(self, arg: str | None) -> Step:
        server = self.server
        if self.helo is None:
            self._error("503 5.5.1 Error: send HELO/EHLO first")
            return
        if server.starttls is TlsMode.REQUIRE and not self.tls:
            self._error("530 5.7.0 Must issue a STARTTLS command first")
            return
        if server.auth is not None and server.auth.required and self.auth_user is None:
            self._error("530 5.7.0 Authentication required")
            return
        if self.transaction is not None:
            self._error("503 5.5.1 Error: nested MAIL command")
            return
        syntax = "501 5.5.4 Syntax: MAIL FROM:<address>"
        path = self._path(arg, "FROM:", syntax, null_ok=True)
        if path is None:
            return
        address, options = path
        if options and not self.ehlo:
            self._error(syntax)
            return
        ext = server.extensions
        mail = px.parse_mail_params(
            options, dsn=ext.dsn, eightbitmime=ext.eightbitmime, smtputf8=ext.smtputf8,
            binarymime=ext.chunking and ext.eightbitmime,
            requiretls=ext.requiretls and self.tls)
        if not address.isascii() and not mail.smtputf8:
            self._error("553 5.6.7 Non-ASCII address needs SMTPUTF8")
            return
        used = self.used
        for key, value in (("size", mail.size), ("body", mail.body), ("ret", mail.ret),
                           ("envid", mail.envid)):
            if value is not None:
                used[key] = value
        if mail.smtputf8:
            used["smtputf8"] = True
        if mail.requiretls:
            used["requiretls"] = True
        self._envelope(self.mail_froms, address)
        if mail.size is not None and server.size_limit and mail.size > server.size_limit:
            self._error(_SIZE_REFUSAL)
            return
        spf = None
        if "spf" in self._decider.uses:
            outcome: SpfOutcome = yield CheckSpf(address)
            spf = outcome.result
            self._note(f"SPF {outcome.result} for {outcome.domain} from {outcome.client_ip}"
                       + (f" ({outcome.mechanism})" if outcome.mechanism else ""))
        d = yield from self._decide(ev.Mail(sender=address, size=mail.size, spf=spf))
        yield from self._play(d)
        if d.accepts:
            self.transaction = Transaction(mail_from=address, params=mail,
                                           options=tuple(options), spf=spf)
            self.message_index += 1
        yield from self._answer(d, "250 2.1.0 Ok")

    def _rcpt(self, arg: str | None) -> Step:
        tx = self.transaction
        if tx is None:
            self._error("503 5.5.1 Error: need MAIL command")
            return
        syntax = "501 5.5.4 Syntax: RCPT TO:<address>"
        path = self._path(arg, "TO:", syntax, null_ok=False)
        if path is None:
            return
        address, options = path
        if not address.isascii() and not tx.params.smtputf8:
            self._error("553 5.6.7 Non-ASCII address needs SMTPUTF8")
            return
        rparams = px.parse_rcpt_params(options, dsn=self.server.extensions.dsn)
        if rparams.notify or rparams.orcpt:
            self.used["dsn_rcpt"] = True
        self._envelope(self.rcpt_tos, address)
        tx.rcpt_commands += 1
        d = yield from self._decide(ev.Rcpt(recipient=address))
        if not d.accepts:
            # a verdict on this pair now: record it before playing it (a
            # fault ends the conversation)
            self._attempts((address,), d, phase=d.phase.value)
        yield from self._play(d)
        if d.accepts:
            tx.rcpts.append(address)
            tx.rcpt_options.append(" ".join(options))
            tx.rcpt_params[address] = rparams
        yield from self._answer(d, "250 2.1.5 Ok")

    def _envelope(self, addresses: list[str], address: str) -> None:
        if address not in addresses:
            addresses.append(address)
            self._envelope_changed = True

    # ---------------------------------------------------------- DATA, BDAT

    def _refuse_transaction(self, d: Decision) -> None:
        """The transaction's recipients get `d` as their verdict; it is over."""
        tx = self.transaction
        if tx is not None:
            self._attempts(tx.rcpts, d, phase=d.phase.value)
            tx.rcpts = []
        self.transaction = None

    def _data(self, arg: str | None) -> Step:
        tx = self.transaction
        if tx is None:
            self._error("503 5.5.1 Error: need MAIL command")
            return
        if tx.chunks is not None:
            self._error("503 5.5.1 DATA cannot follow BDAT in one transaction")
            return
        if tx.params.body == "BINARYMIME":
            self._error("503 5.5.1 BODY=BINARYMIME needs BDAT, not DATA")
            return
        if not tx.rcpts:
            self._error("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            self._error("501 5.5.4 Syntax: DATA")
            return
        d = yield from self._decide(ev.Data())
        if not d.accepts:
            self._refuse_transaction(d)
        if d.fault in _ENDING_FAULTS and d.after_bytes is not None:
            # 354, part of the body, then the fault
            if d.delay > 0:
                self._note(f"delay {d.delay:.3f}s", d.rule)
                yield Delay(d.delay)
            self._reply(["354 End data with <CR><LF>.<CR><LF>"], d.rule)
            got = yield _Part(d.after_bytes)
            self._phase = Phase.MESSAGE
            self._record("C", f"<{got} bytes of the message>")
            self._fault(d.fault, d.rule)
        yield from self._play(d)
        yield from self._answer(d, "354 End data with <CR><LF>.<CR><LF>")
        if not d.accepts:
            return
        self._phase = Phase.MESSAGE
        content, too_big, size = yield _Body(self.server.size_limit)
        self._record("C", f"<message: {size} bytes>")
        yield from self._message(content, too_big)

    def _bdat(self, arg: str | None) -> Step:
        """RFC 3030 CHUNKING: BDAT <size> [LAST]; the chunk is read whatever
        the verdict (the client has sent it already)."""
        chunking = self.server.extensions.chunking
        words = (arg or "").split()
        if (not chunking or not words or not words[0].isdigit() or len(words) > 2
                or (len(words) == 2 and words[1].upper() != "LAST")):
            refusal = ("501 5.5.4 Syntax: BDAT <size> [LAST]" if chunking
                       else "502 5.5.1 BDAT not offered")
            sized = bool(words) and words[0].isdigit()
            if sized:
                # the size says how much follows: read past it, as for any
                # refused chunk (else its bytes would be read as commands)
                yield _Chunk(int(words[0]), False)
                self._record("C", f"<chunk: {words[0]} bytes, discarded>")
            self._error(refusal)
            if words and not sized:
                # without a size the chunk cannot be skipped: the stream is lost
                self._hangup("unreadable BDAT size")
            return
        size = int(words[0])
        last = len(words) == 2
        tx = self.transaction
        limit = self.server.size_limit
        # The client declares the size: never hold more than the limit.
        keep = (tx is not None and bool(tx.rcpts) and not tx.chunk_failed
                and not (limit and tx.chunks_size + size > limit))
        chunk = yield _Chunk(size, keep)
        self._record("C", f"<chunk: {size} bytes{', last' if last else ''}>")
        self.used["bdat"] = self.used.get("bdat", 0) + 1
        if tx is None:
            self._error("503 5.5.1 Error: need MAIL command")
            return
        if tx.chunk_failed:
            self._error("503 5.5.1 Earlier chunk was refused; send RSET")
            return
        if not tx.rcpts:
            self._error("554 5.5.1 Error: no valid recipients")
            return
        if not keep:
            tx.chunk_failed = True
            tx.chunks = None
            self._attempts(tx.rcpts, None, phase="bdat", default=_SIZE_REFUSAL)
            tx.rcpts = []
            self._error(_SIZE_REFUSAL)
            return
        if tx.chunks is None:
            tx.chunks = []
        tx.chunks.append(chunk)
        tx.chunks_size += size
        d = yield from self._decide(ev.Bdat(size=size, last=last, total=tx.chunks_size))
        if not d.accepts:
            self._attempts(tx.rcpts, d, phase=d.phase.value)
            tx.rcpts = []
            tx.chunk_failed = True
            tx.chunks = None
        yield from self._play(d)
        if not d.accepts or not last:
            yield from self._answer(d, f"250 2.0.0 {size} octets received")
            return
        content = Body(tx.chunks or ())  # the chunks as they came: not joined
        tx.chunks = None
        self._phase = Phase.MESSAGE
        yield from self._message(content, bool(limit and len(content) > limit))

    def _message(self, content: Body, too_big: bool) -> Step:
        """A whole message arrived: check it, store it, decide, commit, reply."""
        tx = self.transaction
        assert tx is not None
        refusal = None
        if too_big:
            refusal = _SIZE_REFUSAL
        elif self._line_too_long(content):
            refusal = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
        if refusal is not None:
            self._attempts(tx.rcpts, None, phase="message", default=refusal)
            tx.rcpts = []
            self.transaction = None
            self._error(refusal)
            return
        rcpts = tuple(tx.rcpts)
        subject, message_id = headline(content.head(HEAD_SCAN))
        dsn = self._dsn_record(tx)
        # Stored before anything is waited for: a client that vanishes during
        # the checks below leaves the message in the store, and its
        # recipients (still pending) are recorded as lost.
        mid = yield StoreMessage(MessageDraft(
            self.id, self._now, tx.mail_from, rcpts, tx.options,
            tuple(tx.rcpt_options), content, subject, message_id, dsn))
        tx.stored = mid
        auth = None
        if self._decider.uses & {"dkim", "dmarc"}:
            auth = yield CheckMessage(content, tx.mail_from)
            self._note(f"Authentication-Results: {auth.authentication_results}")
        checks = None
        if len(content) > CONTENT_INLINE and self._decider.uses & ev.CONTENT_KEYS:
            checks = yield CheckContent(content)
        d = yield from self._decide(ev.Message(
            content=content, dkim=auth.dkim_result if auth else None,
            dmarc=auth.dmarc.result if auth else None, checks=checks))
        # Durable before any 2xx: wait for the commit that carries the
        # message. The attempts are recorded after it: a client gone
        # meanwhile has its recipients recorded as lost (with the message);
        # a store that could not write (a full disk) defers them.
        try:
            yield _COMMIT
        except NotStored as e:
            self._attempts(rcpts, None, phase="message", default=e.reply)
            tx.rcpts = []
            self.transaction = None
            self._note(f"message not stored: {e}")
            self._error(e.reply)
            return
        self._attempts(rcpts, d, phase="message", message_id=mid,
                       default=f"250 2.0.0 Ok: queued as {mid}")
        tx.rcpts = []
        self._note(f"stored as message {mid}", d.rule)
        if self._envelope_changed:  # the session's row shows it while it lasts
            self._envelope_changed = False
            self._out.append(Update({"mail_from": self.mail_froms, "rcpt_tos": self.rcpt_tos}))
        mail_from = tx.mail_from
        self.transaction = None
        self._out.append(MessageStored(mid, mail_from, rcpts, content, auth, d.accepts, d.rule,
                                       dsn))
        yield from self._play(d)
        yield from self._answer(d, f"250 2.0.0 Ok: queued as {mid}")

    def _line_too_long(self, content: Body) -> bool:
        limit = self.server.max_line_length
        if limit is None or len(content) + 2 <= limit:
            return False
        return any(len(line) + 2 > limit for line in content.whole().split(b"\r\n"))

    @staticmethod
    def _dsn_record(tx: Transaction) -> dict[str, Any]:
        """DSN (RFC 3461) and related parameters as sent, decoded."""
        mail = tx.params
        out: dict[str, Any] = {}
        if mail.ret is not None:
            out["ret"] = mail.ret
        if mail.envid is not None:
            out["envid"] = mail.envid
        if mail.body is not None:
            out["body"] = mail.body
        if mail.requiretls:
            out["requiretls"] = True
        per = {}
        for r in tx.rcpts:
            p = tx.rcpt_params.get(r)
            if p is not None and (p.notify or p.orcpt):
                per[r] = {"notify": p.notify, "orcpt": p.orcpt}
        if per:
            out["recipients"] = per
        return out

    # ------------------------------------------------------ the other verbs

    def _rset(self, arg: str | None) -> Step:
        if arg:
            self._error("501 5.5.4 Syntax: RSET")
            return
        d = yield from self._decide(ev.Rset())
        yield from self._play(d)
        if d.accepts:
            self.transaction = None
        yield from self._answer(d, "250 2.0.0 Ok")

    def _noop(self, arg: str | None) -> Step:
        d = yield from self._decide(ev.Noop())
        yield from self._play(d)
        yield from self._answer(d, "250 2.0.0 Ok")

    def _vrfy(self, arg: str | None) -> Step:
        if not arg:
            self._error("501 5.5.4 Syntax: VRFY <address>")
            return
        found = px.parse_path(arg)
        d = yield from self._decide(ev.Vrfy(argument=found[0] if found else arg))
        yield from self._play(d)
        yield from self._answer(d, "252 2.0.0 Cannot VRFY user, but will accept message")

    def _quit(self, arg: str | None) -> Step:
        d = yield from self._decide(ev.Quit())
        yield from self._play(d)
        self.end_reason = "quit"
        yield from self._answer(d, "221 2.0.0 Bye")
        self._hangup("quit", d.rule)

    def _help(self, arg: str | None) -> Step:
        self._error("214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY QUIT")
        return
        yield  # a generator, like every command

    def _expn(self, arg: str | None) -> Step:
        self._error("502 5.5.1 EXPN not implemented")
        return
        yield  # a generator, like every command


_COMMANDS: dict[str, Callable[[ServerSession, str | None], Step]] = {
    "HELO": ServerSession._helo, "EHLO": ServerSession._ehlo,
    "STARTTLS": ServerSession._starttls, "AUTH": ServerSession._auth,
    "MAIL": ServerSession._mail, "RCPT": ServerSession._rcpt, "DATA": ServerSession._data,
    "BDAT": ServerSession._bdat, "RSET": ServerSession._rset, "NOOP": ServerSession._noop,
    "VRFY": ServerSession._vrfy, "QUIT": ServerSession._quit, "HELP": ServerSession._help,
    "EXPN": ServerSession._expn,
}

_PHASE_OF = {
    "HELO": Phase.HELO, "EHLO": Phase.HELO, "MAIL": Phase.MAIL, "RCPT": Phase.RCPT,
    "DATA": Phase.DATA, "RSET": Phase.RSET, "NOOP": Phase.NOOP, "VRFY": Phase.VRFY,
    "QUIT": Phase.QUIT, "STARTTLS": Phase.STARTTLS, "AUTH": Phase.AUTH, "BDAT": Phase.BDAT,
}


# ------------------------------------------------------------ message head


def headline(content: bytes | bytearray) -> tuple[str | None, str | None]:
    """Subject (RFC 2047 decoded where it can be) and Message-ID of a
    message; None when absent.

    A search of the header block for the two fields rather than the email
    package's parser, which costs more than the rest of a small message's
    handling."""
    # the header section ends at the first empty line (CRLF, or a bare LF
    # from a careless client); a message without one, or with a header block
    # of more than HEAD_SCAN bytes, is searched that far only
    m = _HEADER_END.search(content, 0, HEAD_SCAN)
    head = content[: m.start() if m else HEAD_SCAN]
    subject: str | None = None
    message_id: str | None = None
    for found in _HEADLINE.finditer(head):
        value = _FOLD.sub(b" ", found.group(2)).strip()
        if found.group(1).lower() == b"subject":
            if subject is None:
                subject = _decode_header(value)
        elif message_id is None:
            message_id = value.decode("utf-8", "replace")
        if subject is not None and message_id is not None:
            break
    return subject, message_id


HEAD_SCAN = 1 << 16
#: a message up to this size has its header and body conditions tested on
#: the event loop, in the decision (a millisecond at most); a larger one in
#: a worker thread first (CheckContent): a 20 MB message's split, decoding
#: and a case-insensitive search took 200 ms, every other session waiting
CONTENT_INLINE = 1 << 16
_FOLD = re.compile(rb"\r?\n[ \t]+")
_HEADER_END = re.compile(rb"(?:^|\n)\r?\n")
#: a Subject or Message-ID field with its continuation lines
_HEADLINE = re.compile(rb"^(subject|message-id)[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


def _decode_header(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError, HeaderParseError):
        return text  # an encoded word that does not decode: shown as sent
