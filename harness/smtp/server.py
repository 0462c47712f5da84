"""The SMTP adapter: an aiosmtpd `SMTP` subclass that asks the scenario engine
how to answer each step and plays the answer on the wire.

aiosmtpd gives us the protocol object, the stream plumbing, timeouts and
address parsing. It has no hook before the 220 banner, always answers DATA
with 354, closes nothing on a 421 and rejects ESMTP parameters it does not
know, so the command loop and every command this harness scripts are our
own methods here. This is the only code that sleeps, writes bytes, closes or
resets transports; the engine only decides.

Durability: the 2xx after the final dot is written only after the store's
writer thread has committed the message (and everything queued before it)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import secrets
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP

from harness.scenario import engine as ev
from harness.scenario.engine import Decision, Engine
from harness.scenario.model import Fault, Phase, Scenario, TlsMode
from harness.smtp import outbound
from harness.smtp import params as px
from harness.smtp.tls import HANDSHAKE_FAILURE_ALERT, server_context
from harness.store.db import Store

log = logging.getLogger("harness.smtp")

#: (session id, time, direction C/S/I, phase, text, rule) for live observers
Observer = Callable[[int, float, str, str | None, str, str | None], None]

_PHASE_OF = {
    "HELO": Phase.HELO, "EHLO": Phase.HELO, "MAIL": Phase.MAIL, "RCPT": Phase.RCPT,
    "DATA": Phase.DATA, "RSET": Phase.RSET, "NOOP": Phase.NOOP, "VRFY": Phase.VRFY,
    "QUIT": Phase.QUIT, "STARTTLS": Phase.STARTTLS, "AUTH": Phase.AUTH, "BDAT": Phase.BDAT,
}

#: Enhanced status codes (RFC 3463) for replies of our own that carry none.
_ENHANCED_FOR = {
    250: "2.0.0", 221: "2.0.0", 252: "2.0.0", 421: "4.3.0", 451: "4.3.0", 500: "5.5.2",
    501: "5.5.4", 502: "5.5.1", 503: "5.5.1", 504: "5.5.4", 530: "5.7.0", 550: "5.0.0",
    552: "5.3.4", 553: "5.1.3", 554: "5.0.0", 555: "5.5.4",
}

MAX_BAD_COMMANDS = 20  # then 421 and close, as Postfix's smtpd_hard_error_limit
MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4, including CRLF
MAX_TRANSCRIPT_TEXT = 2000
_READ_CHUNK = 65536
PROXY_TIMEOUT = 10.0


@dataclass
class AnalysisJob:
    mid: int
    raw: bytes
    client_ip: str
    helo: str
    mail_from: str
    hostname: str
    zone: dict[str, Any] | None
    auth: Any  # results already computed for a rule, or None


class Analyst:
    """Analyses stored messages in the background, in a thread and in
    batches, when deliveries pause (no new message for `analysis_quiet`
    seconds) or when a message has waited `analysis_max_lag`: the parsing is
    CPU work that shares the interpreter with the event loop, and during a
    burst the CPU belongs to the SMTP conversations."""

    BATCH = 64

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.jobs: collections.deque[tuple[float, AnalysisJob, asyncio.Future[None],
                                           HarnessSMTP]] = collections.deque()
        self.task: asyncio.Task[None] | None = None

    def add(self, job: AnalysisJob, session: HarnessSMTP) -> None:
        loop = asyncio.get_running_loop()
        self.ctx.last_activity = loop.time()
        done: asyncio.Future[None] = loop.create_future()
        self.ctx.pending.add(done)
        done.add_done_callback(self.ctx.pending.discard)
        self.jobs.append((loop.time(), job, done, session))
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._run())

    async def _run(self) -> None:
        from harness.analysis.summary import analyze_batch

        loop = asyncio.get_running_loop()
        while self.jobs:
            now = loop.time()
            quiet = now - self.ctx.last_activity
            waited = now - self.jobs[0][0]
            if quiet < self.ctx.analysis_quiet and waited < self.ctx.analysis_max_lag:
                # a timer, not a poll: the pause in deliveries it waits for
                # has no event of its own
                await asyncio.sleep(min(self.ctx.analysis_quiet - quiet,
                                        self.ctx.analysis_max_lag - waited))
                continue
            batch = [self.jobs.popleft() for _ in range(min(self.BATCH, len(self.jobs)))]
            work = [(j.raw, j.client_ip, j.helo, j.mail_from, j.zone, j.hostname)
                    for _, j, _, _ in batch]
            try:
                results = await asyncio.to_thread(analyze_batch, work)
            except Exception as e:  # an analysis bug must not touch the sessions
                self.ctx.errors.append(e)
                results = [None] * len(batch)
            for (_, job, done, session), analysis in zip(batch, results, strict=True):
                if analysis is not None:
                    if job.auth is not None:  # checked before a rule's decision: keep it
                        analysis["auth"] = job.auth.as_dict()
                        analysis["authentication_results"] = job.auth.authentication_results
                    self.ctx.store.message_analysis(job.mid, analysis,
                                                    analysis.get("ndr") is not None)
                if not done.done():
                    done.set_result(None)
                session._changed()


class _Hangup(Exception):
    """Internal: the connection is closed or closing on purpose; stop the loop."""


JOURNAL_LIMIT = 100_000


@dataclass(frozen=True)
class JournalEntry:
    """One decision: the step, the client's command, the deciding rule (None:
    the normal behaviour), and the rules that did not match, with why."""

    session_id: int
    t: float
    phase: str
    command: str
    rule: str | None
    reply: str | None
    fault: str | None
    misses: tuple[tuple[str, str], ...]


@dataclass
class ListenerContext:
    """What all connections of one listener share."""

    engine: Engine
    store: Store
    name: str = "127.0.0.1:2525"
    observers: list[Observer] = field(default_factory=list)
    #: exceptions raised while serving (re-raised by test fixtures, never lost)
    errors: list[BaseException] = field(default_factory=list)
    #: called with (session id) when a session ends; (message id) when stored
    on_session_end: list[Callable[[int], None]] = field(default_factory=list)
    on_message: list[Callable[[int], None]] = field(default_factory=list)
    #: connections being served now
    active: set[HarnessSMTP] = field(default_factory=set)
    #: every decision, newest last (bounded): for verification and near misses
    journal: list[JournalEntry] = field(default_factory=list)
    #: called (on the loop) whenever something was recorded: waiters wake up
    on_change: list[Callable[[], None]] = field(default_factory=list)
    #: called (on the loop) when the scenario was switched or changed in code
    on_scenario: list[Callable[[], None]] = field(default_factory=list)
    #: the port-465 style: TLS from the first byte
    implicit_tls: bool = False
    #: a PROXY protocol v1/v2 header precedes SMTP (behind a load balancer)
    proxy_protocol: bool = False
    #: where a made lab CA certificate is written (beside the store)
    ca_dir: Path | None = None
    #: where SPF/DKIM/DMARC look things up: the scenario's dns: zone, or
    #: "system" (the machine's resolver, only when a user asks for it)
    dns: str = "scenario"
    #: analyses of stored messages still to finish
    pending: set[asyncio.Future[None]] = field(default_factory=set)
    #: analysis waits for this long without a new message (0: at once)...
    analysis_quiet: float = 0.25
    #: ...but a message waits no longer than this for its analysis
    analysis_max_lag: float = 30.0
    #: when the last connection or message arrived (loop time)
    last_activity: float = 0.0
    #: issue 14: where a rule's bounce: is sent (HOST, PORT); see smtp/outbound.py
    bounce_via: tuple[str, int] | None = None
    _analyst: Analyst | None = None
    _tls: tuple[object, ssl.SSLContext] | None = None
    _resolver: tuple[object, Any] | None = None

    @property
    def scenario(self) -> Scenario:
        return self.engine.scenario

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the current scenario, made once per scenario
        (call `prepare_tls` before serving and after switching scenarios)."""
        return self._tls[1] if self._tls is not None else None

    def analyst(self) -> Analyst:
        if self._analyst is None:
            self._analyst = Analyst(self)
        return self._analyst

    def resolver(self) -> Any:
        """The DNS the authentication checks use, made once per scenario."""
        from harness.analysis.dns import ScenarioDns, SystemDns

        key = self.scenario.dns if self.dns == "scenario" else "system"
        if self._resolver is None or self._resolver[0] is not key:
            self._resolver = (key, SystemDns() if self.dns == "system"
                              else ScenarioDns(self.scenario.dns))
        return self._resolver[1]

    def prepare_tls(self) -> None:
        server = self.scenario.server
        if server.starttls is TlsMode.OFF and not self.implicit_tls:
            self._tls = None
            return
        key = (server.tls, server.hostname)
        if self._tls is None or self._tls[0] != key:
            self._tls = (key, server_context(server.tls, server.hostname, self.ca_dir))


class _NoHandler:
    """aiosmtpd wants a handler object; every hook we need is a method below."""


class HarnessSMTP(SMTP):
    """One SMTP connection, answered by the scenario engine."""

    def __init__(self, ctx: ListenerContext) -> None:
        # SMTP.__init__ reflects over the handler and this class on every
        # connection (inspect.getmembers, dir) to build hook tables this class
        # does not use: about a quarter of the cost of a one-message
        # connection. So the stream protocol is set up here and the attributes
        # aiosmtpd 1.4.6 (pinned) reads in connection_made/lost, eof_received,
        # _timeout_cb, _getaddr and _getparams are set directly.
        loop = asyncio.get_running_loop()
        server = ctx.scenario.server
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.__ident__ = server.greeting
        self.loop = loop
        self.event_handler = _NoHandler()
        self.data_size_limit = server.size_limit or None
        self.enable_SMTPUTF8 = server.extensions.smtputf8
        self._decode_data = False
        self.hostname = server.hostname  # never getfqdn(): no DNS per connection
        self.tls_context = ctx.tls_context()
        self.require_starttls = server.starttls is TlsMode.REQUIRE
        self._timeout_duration = server.timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = False
        self._auth_methods = {}
        self._handle_hooks = {}
        self._smtp_methods = {}
        self._enforce_call_limit = False
        self._out: list[bytes] = []
        self.ctx = ctx
        self._scenario = ctx.scenario  # the scenario this connection started with
        self._sid = 0
        self._peer = ""
        self._last_command = "(connect)"
        self._conn: ev.Connection | None = None
        self._phase: Phase | None = None
        self._rule: str | None = None
        self._scripted = False  # the reply being pushed is from a rule: write as is
        self._pending: list[tuple[float, str, str | None, str, str | None]] = []
        self._end_reason = "client closed"
        self._closing_rule: str | None = None  # the rule that hung up, if one did
        self._refused = False  # banner was 554: only QUIT is served
        self._ehlo = False
        self._mail_options: list[str] = []
        self._rcpt_options: list[str] = []
        self._accepted_pairs: list[str] = []
        self._used: dict[str, Any] = {}
        self._tls_on = False
        self._helo_seen: str | None = None  # the last HELO/EHLO name, across STARTTLS
        self._hanging = False
        self._mail = px.MailParams()
        self._rcpt_params: dict[str, px.RcptParams] = {}
        self._chunks: list[bytes] | None = None  # BDAT chunks of this transaction
        self._chunks_size = 0
        self._chunk_failed = False

    # ------------------------------------------------------------ transcript

    def _changed(self) -> None:
        for cb in self.ctx.on_change:
            try:
                cb()
            except Exception as e:  # a waiter must not break the session
                self.ctx.errors.append(e)

    def _record(self, direction: str, text: str, rule: str | None = None) -> None:
        if len(text) > MAX_TRANSCRIPT_TEXT:
            text = text[:MAX_TRANSCRIPT_TEXT] + f"... ({len(text)} chars)"
        t = self.ctx.engine.clock()
        phase = self._phase.value if self._phase else None
        self._pending.append((t, direction, phase, text, rule))
        for obs in self.ctx.observers:
            try:
                obs(self._sid, t, direction, phase, text, rule)
            except Exception as e:  # an observer must not break the session
                self.ctx.errors.append(e)

    def _flush(self) -> None:
        if self._pending:
            self.ctx.store.events(self._sid, self._pending)
            self._pending = []

    async def push(self, status: str | bytes) -> None:
        """Queue a reply line; `_send` writes queued lines in one segment."""
        line = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if (not self._scripted and self._scenario.server.extensions.enhancedstatuscodes
                and len(line) > 4 and line[3] == " " and line[0] in "245"):
            line = _with_enhanced(line)
        self._record("S", line, self._rule)
        self._out.append(line.encode("utf-8", "surrogateescape") + b"\r\n")

    async def _send(self) -> None:
        """Write the queued replies. Called before anything that waits (reading
        the next command, a delay, a fault), so pipelined commands get their
        replies in one segment, as RFC 2920 suggests, and nothing is held back."""
        if not self._out:
            return
        data = b"".join(self._out)
        self._out = []
        if self.transport is None or self.transport.is_closing():
            return
        self._writer.write(data)
        await self._writer.drain()

    # ---------------------------------------------------------- the session

    async def _handle_client(self) -> None:
        assert self.session is not None and self.transport is not None
        peer: tuple[str, int] = self.session.peer or ("0.0.0.0", 0)  # type: ignore[assignment]
        self.ctx.active.add(self)
        self.ctx.last_activity = self.loop.time()
        proxied = ""
        if self.ctx.proxy_protocol:
            try:
                got = await self._read_proxy_header()
            except BaseException:
                self.ctx.active.discard(self)
                raise
            if got is None:
                self.ctx.active.discard(self)
                return
            proxied = f" via {peer[0]}:{peer[1]}"
            peer = got
        self._peer = f"{peer[0]}:{peer[1]}"
        self._tls_on = self.transport.get_extra_info("ssl_object") is not None
        self._conn = self.ctx.engine.connect(str(peer[0]), tls=self._tls_on)
        self._sid = self.ctx.store.session_started(
            listener=self.ctx.name, peer_ip=str(peer[0]), peer_port=int(peer[1]),
            scenario=self._scenario.name, t=self.ctx.engine.clock())
        if proxied:
            self._record("I", f"PROXY header: client {self._peer}{proxied}")
        if self._tls_on:
            self._record_tls("implicit TLS")
        try:
            await self._serve()
        except _Hangup:
            pass
        except asyncio.CancelledError:
            if self._end_reason == "client closed" and self.transport is None:
                self._end_reason = "connection lost"
        except Exception as e:  # pragma: no cover - the loop catches per command
            self.ctx.errors.append(e)
            self._end_reason = f"internal error: {type(e).__name__}"
        finally:
            self._finish()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine

    async def _read_proxy_header(self) -> tuple[str, int] | None:
        """The client address a PROXY v1/v2 header names (aiosmtpd parses it)."""
        from aiosmtpd.proxy_protocol import get_proxy

        try:
            data = await asyncio.wait_for(get_proxy(self._reader), PROXY_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            data = None
        if not data or not data.valid or data.src_addr is None:
            log.warning("connection without a valid PROXY header: closed")
            if self.transport is not None:
                self.transport.close()
            return None
        if data.command == 0 or data.src_addr is None:  # LOCAL: health check
            return ("0.0.0.0", 0)
        return (str(data.src_addr), int(data.src_port or 0))

    def _record_tls(self, how: str) -> None:
        assert self.transport is not None
        obj = self.transport.get_extra_info("ssl_object")
        version = obj.version() if obj is not None else None
        cipher = obj.cipher()[0] if obj is not None and obj.cipher() else None
        self._record("I", f"{how}: {version} {cipher}")
        self.ctx.store.session_update(self._sid, tls_version=version, tls_cipher=cipher)

    def eof_received(self) -> bool | None:
        """The client closed its sending side (often right after a pipelined
        QUIT). aiosmtpd cancels the session here, so commands still in the
        buffer, a message already received among them, would go unanswered;
        instead the reader gets EOF after them and the session ends when the
        loop reaches it (and closes the connection then)."""
        result: bool | None = asyncio.StreamReaderProtocol.eof_received(self)
        return result

    def _timeout_cb(self) -> None:
        """Idle timeout: 421 4.4.2 and close (a hung session just closes)."""
        self._end_reason = "hang ended by the idle timeout" if self._hanging else "idle timeout"
        transport = self.transport
        if transport is None:
            return
        if not self._hanging and not transport.is_closing():
            line = "421 4.4.2 Idle timeout, closing connection"
            self._phase = None
            self._rule = None
            self._record("S", line)
            self._writer.write(line.encode() + b"\r\n")
        transport.close()

    def _finish(self) -> None:
        self.ctx.active.discard(self)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()  # e.g. after a half-close: the replies are out
        if self._conn is not None:
            self.ctx.engine.disconnect(self._conn)
        t = self.ctx.engine.clock()
        if self._accepted_pairs and self._conn is not None:
            # The client vanished after recipients were accepted: the pair saw
            # no verdict on this connection, but the sender did try.
            for rcpt in self._accepted_pairs:
                self.ctx.store.attempt(
                    self._sid, t=t, mail_from=self._conn.mail_from or "", rcpt=rcpt,
                    phase=(self._phase or Phase.DATA).value, code=None, enhanced=None,
                    reply=None, outcome="lost", rule=self._closing_rule)
            self._accepted_pairs = []
        self._record("I", f"session ended: {self._end_reason}")
        self._flush()
        self.ctx.store.session_update(self._sid, ended_at=t, end_reason=self._end_reason,
                                      helo=self._helo_seen, extensions=self._used,
                                      auth_user=self._conn.auth_user if self._conn else None)
        for cb in self.ctx.on_session_end:
            with contextlib.suppress(Exception):
                cb(self._sid)
        self._changed()

    async def _serve(self) -> None:
        assert self._conn is not None
        self._phase = Phase.CONNECT
        self._record("I", f"connection from {self._peer} (scenario {self._scenario.name})")
        d = await self._decide(ev.Connect())
        await self._answer(d, f"220 {self.hostname} {self.__ident__}")
        if d.reply is not None and not d.reply.is_positive:
            self._refused = True  # RFC 5321 3.1: after 554, wait for QUIT
        bad = 0
        while self.transport is not None and not self.transport.is_closing():
            self._flush()
            line = await self._read_command()
            if line is None:
                bad += 1
            else:
                ok = await self._dispatch(line)
                bad += 0 if ok else 1
            if bad >= MAX_BAD_COMMANDS:
                self._phase = None
                self._scripted = True
                await self.push("421 4.7.0 Too many errors, closing connection")
                await self._hangup("too many errors")

    async def _read_command(self) -> bytes | None:
        """One command line, or None after answering an over-long one."""
        if b"\n" not in self._reader._buffer:  # type: ignore[attr-defined]
            await self._send()  # no pipelined command waiting: answer now
        try:
            line: bytes = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            await self._reader.read(e.consumed)
            await self._discard_line()
            self._phase = None
            self._record("C", "<command line too long>")
            await self.push("500 5.5.2 Line too long")
            return None
        except asyncio.IncompleteReadError:
            raise _Hangup() from None
        return line.rstrip(b"\r\n")

    async def _discard_line(self) -> None:
        """Read and drop the rest of an over-long line."""
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as e:
                await self._reader.read(e.consumed)
            except asyncio.IncompleteReadError:
                raise _Hangup() from None

    async def _dispatch(self, line: bytes) -> bool:
        """Run one command; False when it was not a valid command."""
        verb_bytes, _, arg_bytes = line.partition(b" ")
        try:
            verb = verb_bytes.decode("ascii").upper()
        except UnicodeDecodeError:
            verb = ""
        self._phase = _PHASE_OF.get(verb)
        self._rule = None
        self._scripted = False
        shown = line.decode("utf-8", "replace")
        if verb == "AUTH" and shown.count(" ") >= 2:
            shown = " ".join(shown.split(" ")[:2]) + " <credentials>"
        self._record("C", shown)
        self._last_command = shown
        if not line.strip():
            await self.push("500 5.5.2 Error: bad syntax")
            return False
        if not verb.isalpha():
            await self.push("500 5.5.2 Error: bad syntax")
            return False
        if len(line) + 2 > MAX_COMMAND_LINE and verb not in ("MAIL", "RCPT"):
            await self.push("500 5.5.2 Line too long")
            return False
        if self._refused and verb != "QUIT":
            await self.push("503 5.5.1 Bad sequence of commands")
            return True
        method = getattr(self, f"cmd_{verb}", None)
        if method is None:
            await self.push(f'500 5.5.1 Error: command "{verb[:20]}" not recognized')
            return False
        arg = arg_bytes.strip().decode("utf-8", "surrogateescape") or None
        self._reset_timeout()
        if verb in ("MAIL", "RCPT", "BDAT"):
            self._note_pipelining()
        try:
            await method(arg)
        except (_Hangup, asyncio.CancelledError):
            raise
        except ConnectionError:
            raise _Hangup() from None
        except Exception as e:
            log.exception("error while answering %s", verb)
            self.ctx.errors.append(e)
            self._scripted = True
            await self.push("451 4.3.0 Internal error in the harness (recorded)")
        return True

    # ----------------------------------------------------- decisions on wire

    def _engine_decide(self, event: ev.Event) -> Decision:
        """The engine's decision, noted in the listener's journal (what each
        step was, which rule decided it, and which rules nearly did)."""
        assert self._conn is not None
        d = self.ctx.engine.decide(self._conn, event)
        self.ctx.journal.append(JournalEntry(
            session_id=self._sid, t=self.ctx.engine.clock(), phase=d.phase.value,
            command=self._last_command, rule=d.rule, reply=str(d.reply) if d.reply else None,
            fault=d.fault.value if d.fault else None, misses=d.misses))
        if len(self.ctx.journal) > JOURNAL_LIMIT:
            del self.ctx.journal[: len(self.ctx.journal) - JOURNAL_LIMIT]
        if self.ctx.engine.errors:
            self.ctx.errors.extend(self.ctx.engine.errors)
            self.ctx.engine.errors.clear()
        return d

    async def _delay_and_fault(self, d: Decision) -> None:
        """Play a decision's delay, then its connection fault (which ends the
        session): what comes before the reply."""
        if d.delay > 0:
            self._record("I", f"delay {d.delay:.3f}s", d.rule)
            await self._send()
            await asyncio.sleep(d.delay)
        if d.fault in (Fault.DROP, Fault.RESET, Fault.HANG):
            await self._fault(d.fault, d.rule)

    async def _decide(self, event: ev.Event) -> Decision:
        assert self._conn is not None
        d = self._engine_decide(event)
        self._rule = d.rule
        await self._delay_and_fault(d)
        return d

    def _note_pipelining(self) -> None:
        """Count command groups the client pipelined (more input was waiting)."""
        if b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            self._used["pipelined"] = self._used.get("pipelined", 0) + 1

    async def _answer(self, d: Decision, default: str | list[str]) -> None:
        """Write the scripted reply, or the default; tarpit and close as told."""
        if d.reply is not None:
            lines = d.reply.render()
            self._scripted = True
        else:
            lines = [default] if isinstance(default, str) else default
        if d.fault is Fault.TARPIT:
            await self._drip(lines, d.drip)
        else:
            for line in lines:
                await self.push(line)
        self._scripted = False
        if d.close or (d.reply is not None and d.reply.code == 421):
            await self._hangup(f"closed after {lines[-1][:3]} (rule {d.rule})")

    async def _drip(self, lines: list[str], interval: float) -> None:
        await self._send()
        await self._drip_lines(lines, interval)

    async def _drip_lines(self, lines: list[str], interval: float) -> None:
        for line in lines:
            self._record("S", line, self._rule)
            self._record("I", f"tarpit: one byte every {interval:g}s", self._rule)
            self._flush()
            for byte in (line + "\r\n").encode("utf-8", "surrogateescape"):
                transport = self.transport
                if not isinstance(transport, asyncio.Transport) or transport.is_closing():
                    raise _Hangup()
                transport.write(bytes([byte]))
                self._reset_timeout()  # writing is not idling: no 421 mid-reply
                await asyncio.sleep(interval)

    async def _fault(self, fault: Fault, rule: str | None) -> None:
        self._record("I", f"fault: {fault.value}", rule)
        self._closing_rule = rule
        self._flush()
        await self._send()
        transport = self.transport
        assert isinstance(transport, asyncio.Transport)
        if fault is Fault.HANG:
            self._end_reason = f"hang (rule {rule})"
            self._hanging = True
            # Say nothing until the client gives up (its EOF) or the idle
            # timeout closes the connection; what it sends meanwhile is dropped.
            while await self._reader.read(_READ_CHUNK):
                pass
            raise _Hangup()
        self._end_reason = f"{fault.value} (rule {rule})"
        if fault is Fault.RESET:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER on, timeout 0: close() sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()
        raise _Hangup()

    async def _hangup(self, reason: str) -> None:
        await self._send()
        self._end_reason = reason
        self._closing_rule = self._rule
        if self.transport is not None:
            self.transport.close()
        raise _Hangup()

    # ------------------------------------------------------------- commands

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """(address, the rest) from a MAIL/RCPT argument; (None, None) if bad.

        Most paths are a plain <local@domain>: a regular expression takes
        those, at a tenth of the cost of the email package's parser that
        aiosmtpd uses (MAIL/RCPT parsing was a third of its per-message cost)."""
        m = _SIMPLE_PATH.match(arg)
        if m:
            return m.group(1), m.group(2)
        stripped = arg.lstrip()
        if stripped.startswith("<>"):
            return "<>", stripped[2:]
        try:
            result: tuple[str | None, str | None] = super()._getaddr(arg)
        except Exception:  # the email parser fails in more ways than it declares
            return None, None
        return result

    async def cmd_HELO(self, arg: str | None) -> None:
        await self._greet(arg, extended=False)

    async def cmd_EHLO(self, arg: str | None) -> None:
        await self._greet(arg, extended=True)

    async def _greet(self, arg: str | None, *, extended: bool) -> None:
        verb = "EHLO" if extended else "HELO"
        if not arg:
            await self.push(f"501 5.5.4 Syntax: {verb} hostname")
            return
        d = await self._decide(ev.Helo(name=arg, extended=extended))
        if d.reply is not None and not d.reply.is_positive:
            await self._answer(d, "")
            return
        self._ehlo = extended
        self._helo_seen = arg
        self._reset_transaction()
        assert self.session is not None
        self.session.host_name = arg
        self.session.extended_smtp = extended
        first = (f"250 {d.reply.lines[0]}" if d.reply is not None
                 else f"250 {self.hostname} Hello {arg}")
        if not extended:
            self._scripted = True
            await self._answer(Decision(phase=Phase.HELO, rule=d.rule, fault=d.fault,
                                        drip=d.drip, close=d.close), first)
            return
        advertised = self._extensions()
        self._used["advertised"] = [x[4:] for x in advertised]
        lines = [first, *advertised]
        lines = [f"250-{x[4:]}" for x in lines[:-1]] + [f"250 {lines[-1][4:]}"]
        self._scripted = True
        await self._answer(Decision(phase=Phase.HELO, rule=d.rule, fault=d.fault,
                                    drip=d.drip, close=d.close), lines)

    def _auth_offered(self) -> bool:
        auth = self._scenario.server.auth
        return auth is not None and (self._tls_on or auth.before_tls)

    def _extensions(self) -> list[str]:
        server = self._scenario.server
        ext = server.extensions
        out = []
        if self.data_size_limit:
            out.append(f"250 SIZE {self.data_size_limit}")
        if ext.eightbitmime:
            out.append("250 8BITMIME")
        if ext.pipelining:
            out.append("250 PIPELINING")
        if ext.chunking:
            out.append("250 CHUNKING")
            if ext.eightbitmime:
                out.append("250 BINARYMIME")
        if ext.dsn:
            out.append("250 DSN")
        if ext.enhancedstatuscodes:
            out.append("250 ENHANCEDSTATUSCODES")
        if ext.smtputf8:
            out.append("250 SMTPUTF8")
        if self.tls_context is not None and not self._tls_on and (
            server.starttls is not TlsMode.OFF
        ):
            out.append("250 STARTTLS")
        if self._tls_on and ext.requiretls:
            out.append("250 REQUIRETLS")
        if self._auth_offered():
            assert server.auth is not None
            out.append("250 AUTH " + " ".join(server.auth.mechanisms))
        return out

    def _reset_transaction(self) -> None:
        self._mail_options = []
        self._rcpt_options = []
        self._accepted_pairs = []
        self._mail = px.MailParams()
        self._rcpt_params = {}
        self._chunks = None
        self._chunks_size = 0
        self._chunk_failed = False
        self.envelope = self._create_envelope()

    # -------------------------------------------------------------- STARTTLS

    async def cmd_STARTTLS(self, arg: str | None) -> None:
        assert self._conn is not None
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self._tls_on:
            await self.push("503 5.5.1 TLS already active")
            return
        if self.tls_context is None or self._scenario.server.starttls is TlsMode.OFF:
            await self.push("502 5.5.1 STARTTLS not offered")
            return
        d = await self._decide(ev.StartTls())
        if d.fault is Fault.TLS_FAIL:
            await self.push("220 2.0.0 Ready to start TLS")
            await self._send()
            self._record("I", "fault: tls_fail (handshake_failure alert, then close)", d.rule)
            self._closing_rule = d.rule
            transport = self.transport
            assert transport is not None
            # Read the ClientHello's start (if it came) so the alert answers it.
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(self._reader.read(5), 5)
            self._writer.write(HANDSHAKE_FAILURE_ALERT)
            await self._hangup(f"tls_fail (rule {d.rule})")
        if not d.accepts:
            await self._answer(d, "")
            return
        await self._answer(d, "220 2.0.0 Ready to start TLS")
        await self._send()
        # RFC 3207 4.2 (and CVE-2011-0411): nothing the client sent in plain
        # text after STARTTLS may count as sent over TLS.
        leftover = len(self._reader._buffer)  # type: ignore[attr-defined]
        if leftover:
            self._reader._buffer.clear()  # type: ignore[attr-defined]
            self._record("I", f"discarded {leftover} bytes sent in plain text after STARTTLS")
        old = self.transport
        try:
            await self._writer.start_tls(self.tls_context, ssl_handshake_timeout=30)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            self._record("I", f"TLS handshake failed: {e}")
            self._end_reason = "TLS handshake failed"
            raise _Hangup() from None
        # RFC 3207 4.2: forget everything learnt before TLS.
        self._original_transport = old
        self.transport = self._writer.transport
        self._reader._transport = self.transport  # type: ignore[attr-defined]
        self._tls_on = True
        assert self.session is not None
        self.session.ssl = {}
        self.session.host_name = None
        self._conn.tls = True
        self._conn.helo = None
        self._conn.auth_user = None  # a login in plain text does not carry over
        self._ehlo = False
        self._conn.reset_transaction()
        self._reset_transaction()
        self._used["starttls"] = True
        self._record_tls("STARTTLS")

    # ------------------------------------------------------------------ AUTH

    async def cmd_AUTH(self, arg: str | None) -> None:
        assert self._conn is not None
        auth = self._scenario.server.auth
        if self._conn.helo is None:
            await self.push("503 5.5.1 Error: send EHLO first")
            return
        if auth is None:
            await self.push("502 5.5.1 AUTH not offered")
            return
        if not self._auth_offered():
            await self.push("538 5.7.11 Encryption required for requested authentication "
                            "mechanism")
            return
        if self._conn.auth_user is not None:
            await self.push("503 5.5.1 Already authenticated")
            return
        if self._conn.mail_from is not None:
            await self.push("503 5.5.1 AUTH not allowed during a mail transaction")
            return
        mechanism, _, initial = (arg or "").partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in auth.mechanisms:
            await self.push(f"504 5.5.4 Unrecognized authentication type {mechanism[:20]}")
            return
        try:
            got = await self._sasl(mechanism, initial.strip() or None, auth.users)
        except px.ParamError as e:
            await self.push(e.reply)
            return
        if got is None:
            await self.push("501 5.7.0 Authentication cancelled")
            return
        user, valid = got
        d = await self._decide(ev.Auth(mechanism=mechanism, user=user, valid=valid))
        self._used["auth"] = mechanism
        positive = d.reply.is_positive if d.reply is not None else valid
        if d.accepts and positive:
            self._record("I", f"authenticated as {user} ({mechanism})", d.rule)
            self.ctx.store.session_update(self._sid, auth_user=user)
        await self._answer(d, "235 2.7.0 Authentication successful" if valid
                           else "535 5.7.8 Authentication credentials invalid")

    async def _sasl(self, mechanism: str, initial: str | None,
                    users: Any) -> tuple[str, bool] | None:
        """Run the SASL exchange; (user, credentials right) or None if cancelled."""
        if mechanism == "PLAIN":
            response = initial if initial not in (None, "=") else await self._challenge("")
            if response is None:
                return None
            user, password = px.plain_credentials(response)
            return user, users.get(user) == password
        if mechanism == "LOGIN":
            if initial is not None and initial != "=":
                user_b64: str | None = initial
            else:
                user_b64 = await self._challenge(px.b64("Username:"))
            if user_b64 is None:
                return None
            user = px.b64_decode(user_b64)
            pw_b64 = await self._challenge(px.b64("Password:"))
            if pw_b64 is None:
                return None
            return user, users.get(user) == px.b64_decode(pw_b64)
        challenge = f"<{secrets.randbelow(10**12)}.{int(self.ctx.engine.clock())}@{self.hostname}>"
        response = await self._challenge(px.b64(challenge))
        if response is None:
            return None
        user, ok = px.cram_md5_valid(challenge, response, users.get(
            px.b64_decode(response).rpartition(" ")[0]))
        return user, ok

    async def _challenge(self, text: str) -> str | None:
        """334 challenge; the client's line, or None for "*" (cancel)."""
        self._scripted = True
        await self.push(f"334 {text}".rstrip() if text else "334 ")
        self._scripted = False
        await self._send()
        line = await self._read_line_raw()
        self._record("C", "<credentials>" if line != "*" else "*")
        return None if line == "*" else line

    async def _read_line_raw(self) -> str:
        try:
            data: bytes = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            await self._reader.read(e.consumed)
            await self._discard_line()
            raise px.ParamError("500 5.5.6 Authentication exchange line is too long") from None
        except asyncio.IncompleteReadError:
            raise _Hangup() from None
        return data.rstrip(b"\r\n").decode("utf-8", "replace")

    # ------------------------------------------------------------- MAIL RCPT

    async def _path(self, arg: str | None, keyword: str, syntax: str, *,
                    null_ok: bool) -> tuple[str, list[str]] | None:
        """(address, ESMTP parameters) of MAIL FROM:/RCPT TO:, or None after
        answering a malformed one. The null path <> is "" where allowed."""
        rest = _strip_keyword(arg, keyword)
        if rest is None:
            await self.push(syntax)
            return None
        address, params_text = self._getaddr(rest)
        if address is None:
            await self.push("553 5.1.3 Error: malformed address")
            return None
        if address == "<>" and null_ok:
            address = ""  # the null reverse-path of bounces (RFC 5321 4.5.5)
        elif not address or address == "<>":
            await self.push(syntax)
            return None
        return address, (params_text or "").split()

    async def cmd_MAIL(self, arg: str | None) -> None:
        assert self._conn is not None
        server = self._scenario.server
        if self._conn.helo is None:
            await self.push("503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.require_starttls and not self._tls_on:
            await self.push("530 5.7.0 Must issue a STARTTLS command first")
            return
        if server.auth is not None and server.auth.required and self._conn.auth_user is None:
            await self.push("530 5.7.0 Authentication required")
            return
        if self._conn.mail_from is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        syntax = "501 5.5.4 Syntax: MAIL FROM:<address>"
        path = await self._path(arg, "FROM:", syntax, null_ok=True)
        if path is None:
            return
        address, options = path
        if options and not self._ehlo:
            await self.push(syntax)
            return
        ext = server.extensions
        try:
            mail = px.parse_mail_params(
                options, dsn=ext.dsn, eightbitmime=ext.eightbitmime, smtputf8=ext.smtputf8,
                binarymime=ext.chunking and ext.eightbitmime,
                requiretls=ext.requiretls and self._tls_on)
        except px.ParamError as e:
            await self.push(e.reply)
            return
        if not address.isascii() and not mail.smtputf8:
            await self.push("553 5.6.7 Non-ASCII address needs SMTPUTF8")
            return
        for key, value in (("size", mail.size), ("body", mail.body), ("ret", mail.ret),
                           ("envid", mail.envid)):
            if value is not None:
                self._used[key] = value
        if mail.smtputf8:
            self._used["smtputf8"] = True
        if mail.requiretls:
            self._used["requiretls"] = True
        if mail.size is not None and self.data_size_limit and mail.size > self.data_size_limit:
            await self.push("552 5.3.4 Message size exceeds fixed maximum message size")
            return
        spf = None
        if "spf" in self.ctx.engine.uses:
            spf = await self._check_spf(address)
        d = await self._decide(ev.Mail(sender=address, size=mail.size, spf=spf))
        if d.accepts:
            self._reset_transaction()
            self._mail_options = options
            self._mail = mail
        await self._answer(d, "250 2.1.0 Ok")

    async def cmd_RCPT(self, arg: str | None) -> None:
        assert self._conn is not None
        if self._conn.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        syntax = "501 5.5.4 Syntax: RCPT TO:<address>"
        path = await self._path(arg, "TO:", syntax, null_ok=False)
        if path is None:
            return
        address, options = path
        if not address.isascii() and not self._mail.smtputf8:
            await self.push("553 5.6.7 Non-ASCII address needs SMTPUTF8")
            return
        try:
            rparams = px.parse_rcpt_params(options, dsn=self._scenario.server.extensions.dsn)
        except px.ParamError as e:
            await self.push(e.reply)
            return
        if rparams.notify or rparams.orcpt:
            self._used["dsn_rcpt"] = True
        mail_from = self._conn.mail_from
        d = self._engine_decide(ev.Rcpt(recipient=address))
        self._rule = d.rule
        t = self.ctx.engine.clock()
        if not d.accepts:
            # A verdict on this pair now: record it before acting (a fault
            # never returns), then play it.
            self._attempt_from(d, mail_from, address, t)
        await self._delay_and_fault(d)
        if d.accepts:
            self._accepted_pairs.append(address)
            self._rcpt_options.append(" ".join(options))
            self._rcpt_params[address] = rparams
        await self._answer(d, "250 2.1.5 Ok")

    def _attempt_from(self, d: Decision, mail_from: str, rcpt: str, t: float,
                      message_id: int | None = None, default: str = "") -> None:
        """Record one pair's verdict: the scripted reply, a fault, or `default`."""
        code: int | None = None
        enhanced: str | None = None
        reply: str | None = None
        if d.fault in (Fault.DROP, Fault.RESET, Fault.HANG):
            outcome = {Fault.DROP: "dropped", Fault.RESET: "reset", Fault.HANG: "hang"}[d.fault]
        else:
            if d.reply is not None:
                code, enhanced, reply = d.reply.code, d.reply.enhanced, str(d.reply)
            elif default:
                code, reply = int(default[:3]), default
                first = default[4:].split(" ", 1)[0]
                enhanced = first if first.count(".") == 2 else None
            outcome = ("accepted" if code is None or code < 400
                       else "deferred" if code < 500 else "rejected")
        self.ctx.store.attempt(
            self._sid, t=t, mail_from=mail_from, rcpt=rcpt, phase=d.phase.value, code=code,
            enhanced=enhanced, reply=reply, outcome=outcome, rule=d.rule,
            message_id=message_id)
        self._changed()

    # ------------------------------------------------------------ DATA, BDAT

    def _attempts_for_all(self, d: Decision, default: str = "") -> None:
        assert self._conn is not None
        t = self.ctx.engine.clock()
        for rcpt in self._accepted_pairs:
            self._attempt_from(d, self._conn.mail_from or "", rcpt, t, default=default)
        self._accepted_pairs = []

    async def cmd_DATA(self, arg: str | None) -> None:
        assert self._conn is not None
        if self._conn.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if self._chunks is not None:
            await self.push("503 5.5.1 DATA cannot follow BDAT in one transaction")
            return
        if self._mail.body == "BINARYMIME":
            await self.push("503 5.5.1 BODY=BINARYMIME needs BDAT, not DATA")
            return
        if not self._accepted_pairs:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        mail_from = self._conn.mail_from
        d = self._engine_decide(ev.Data())
        self._rule = d.rule
        if not d.accepts:
            self._attempts_for_all(d)
            self._reset_transaction_engine()
        if d.fault in (Fault.DROP, Fault.RESET, Fault.HANG) and d.after_bytes is not None:
            if d.delay > 0:
                self._record("I", f"delay {d.delay:.3f}s", d.rule)
                await self._send()
                await asyncio.sleep(d.delay)
            await self._part_of_body(d.after_bytes)  # 354, part of the body, then the fault
            await self._fault(d.fault, d.rule)
        await self._delay_and_fault(d)
        await self._answer(d, "354 End data with <CR><LF>.<CR><LF>")
        if not d.accepts:
            return
        self._phase = Phase.MESSAGE
        self._rule = None
        content, too_big, size = await self._read_data()
        self._record("C", f"<message: {size} bytes>")
        await self._message(mail_from, content, too_big, size)

    async def _read_chunk(self, size: int, keep: bool) -> bytes:
        """A BDAT chunk of `size` octets, read in bounded pieces; dropped as
        it arrives when it is not to be kept."""
        parts: list[bytes] = []
        left = size
        while left:
            piece = await self._reader.read(min(left, _READ_CHUNK))
            if not piece:
                raise _Hangup()
            self._reset_timeout()
            left -= len(piece)
            if keep:
                parts.append(piece)
        return b"".join(parts)

    async def cmd_BDAT(self, arg: str | None) -> None:
        """RFC 3030 CHUNKING: BDAT <size> [LAST]; the chunk is read whatever
        the verdict (the client has already sent it)."""
        assert self._conn is not None
        words = (arg or "").split()
        if (not self._scenario.server.extensions.chunking or not words
                or not words[0].isdigit() or len(words) > 2
                or (len(words) == 2 and words[1].upper() != "LAST")):
            # Without a valid size the chunk cannot be skipped: the stream is lost.
            await self.push("501 5.5.4 Syntax: BDAT <size> [LAST]" if
                            self._scenario.server.extensions.chunking
                            else "502 5.5.1 BDAT not offered")
            if words and not words[0].isdigit():
                await self._hangup("unreadable BDAT size")
            return
        size = int(words[0])
        last = len(words) == 2
        await self._send()
        limit = self.data_size_limit
        # The client declares the size: never hold more than the limit.
        keep = (self._conn.mail_from is not None and bool(self._accepted_pairs)
                and not self._chunk_failed
                and not (limit and self._chunks_size + size > limit))
        chunk = await self._read_chunk(size, keep)
        self._record("C", f"<chunk: {size} bytes{', last' if last else ''}>")
        self._used["bdat"] = self._used.get("bdat", 0) + 1
        if self._conn.mail_from is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if self._chunk_failed:
            await self.push("503 5.5.1 Earlier chunk was refused; send RSET")
            return
        if not self._accepted_pairs:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if not keep:
            self._chunk_failed = True
            self._chunks = None
            refusal = "552 5.3.4 Message size exceeds fixed maximum message size"
            t = self.ctx.engine.clock()
            for rcpt in self._accepted_pairs:
                self.ctx.store.attempt(self._sid, t=t, mail_from=self._conn.mail_from,
                                       rcpt=rcpt, phase="bdat", code=552, enhanced="5.3.4",
                                       reply=refusal, outcome="rejected", rule=None)
            self._accepted_pairs = []
            await self.push(refusal)
            return
        if self._chunks is None:
            self._chunks = []
        self._chunks.append(chunk)
        self._chunks_size += size
        limit = self.data_size_limit
        d = self._engine_decide(ev.Bdat(size=size, last=last,
                                                       total=self._chunks_size))
        self._rule = d.rule
        if not d.accepts:
            self._attempts_for_all(d)
            self._chunk_failed = True
            self._chunks = None
        await self._delay_and_fault(d)
        if not d.accepts or not last:
            await self._answer(d, f"250 2.0.0 {size} octets received")
            return
        content = b"".join(self._chunks or [])
        self._chunks = None
        self._phase = Phase.MESSAGE
        self._rule = None
        assert self._conn.mail_from is not None
        await self._message(self._conn.mail_from, content,
                            bool(limit and len(content) > limit), len(content))

    async def _part_of_body(self, limit: int) -> None:
        """354, then read up to `limit` bytes of the body (for faults mid-DATA)."""
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._send()
        got = 0
        while got < limit:
            chunk = await self._reader.read(min(_READ_CHUNK, limit - got))
            if not chunk:
                raise _Hangup()
            got += len(chunk)
            if b"\r\n.\r\n" in chunk:
                break
        self._phase = Phase.MESSAGE
        self._record("C", f"<{got} bytes of the message>")

    def _reset_transaction_engine(self) -> None:
        assert self._conn is not None
        self._conn.reset_transaction()
        self._reset_transaction()

    async def _read_data(self) -> tuple[bytes, bool, int]:
        """Read up to CRLF.CRLF; returns (content unstuffed, over the limit, size).

        aiosmtpd reads DATA a line at a time, which dominates its cost for
        larger messages; here the stream is read in chunks and searched for
        the terminator. The size limit applies to the message (RFC 1870: the
        doubled dots do not count); over it, the rest is drained, not kept."""
        await self._send()  # the 354
        reader = self._reader
        limit = self.data_size_limit
        buf = bytearray()
        stuffed = 0  # "\r\n." sequences in buf: one wire byte each beyond the message
        dropped = 0  # message bytes discarded once over the limit
        scan = 0
        while True:
            if buf[:3] == b".\r\n" and not dropped:
                end, tail = 0, 3
                break
            idx = buf.find(b"\r\n.\r\n", scan)
            if idx >= 0:
                end, tail = idx + 2, idx + 5
                break
            chunk = await reader.read(_READ_CHUNK)
            if not chunk:
                raise _Hangup()
            self._reset_timeout()
            old = len(buf)
            buf += chunk
            stuffed += buf.count(b"\r\n.", max(0, old - 2))
            scan = max(0, old - 4)
            if limit and dropped + len(buf) - stuffed > limit + 5:
                # Surely over the limit: keep only a tail long enough to find
                # the terminator (and to count a "\r\n." across the cut).
                keep = 8
                cut = len(buf) - keep
                stuffed_kept = bytes(buf[cut:]).count(b"\r\n.")
                dropped += cut - (stuffed - stuffed_kept)
                del buf[:cut]
                stuffed = stuffed_kept
                scan = 0
        leftover = bytes(buf[tail:])
        if leftover:
            # Pipelined commands after the dot belong to the command reader.
            # StreamReader has no unread(); its buffer is a bytearray that
            # read() has just emptied from the front, so put them back there.
            reader._buffer[:0] = leftover  # type: ignore[attr-defined]
        if dropped:
            return b"", True, dropped + end
        content = bytes(buf[:end])
        if content.startswith(b"."):
            content = content[1:]
        content = content.replace(b"\r\n.", b"\r\n")
        too_big = bool(limit and len(content) > limit)
        return content, too_big, len(content)

    async def _message(self, mail_from: str, content: bytes, too_big: bool, size: int) -> None:
        assert self._conn is not None
        rcpts = list(self._accepted_pairs)
        self._accepted_pairs = []
        t = self.ctx.engine.clock()
        refusal = None
        if too_big:
            refusal = "552 5.3.4 Message size exceeds fixed maximum message size"
        elif self._line_too_long(content):
            refusal = "500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)"
        if refusal is not None:
            self._reset_transaction_engine()
            for rcpt in rcpts:
                self.ctx.store.attempt(self._sid, t=t, mail_from=mail_from, rcpt=rcpt,
                                       phase="message", code=int(refusal[:3]),
                                       enhanced=refusal[4:9], reply=refusal,
                                       outcome="rejected", rule=None)
            await self.push(refusal)
            return
        # Stored before anything is awaited: a client that vanishes during
        # the checks below leaves the message in the store, and its
        # recipients (still pending) are recorded as lost by _finish.
        self._accepted_pairs = rcpts
        subject, message_id = _headline(content)
        mid = self.ctx.store.message(
            self._sid, t=t, mail_from=mail_from, rcpt_tos=rcpts,
            mail_options=self._mail_options, rcpt_options=self._rcpt_options, raw=content,
            subject=subject, message_id=message_id, dsn=self._dsn_record(rcpts))
        auth = None
        if self.ctx.engine.uses & {"dkim", "dmarc"}:
            auth = await asyncio.to_thread(self._check_authentication, content, mail_from)
            self._record("I", f"Authentication-Results: {auth.authentication_results}")
        d = self._engine_decide(ev.Message(
            content=content, dkim=auth.dkim_result if auth else None,
            dmarc=auth.dmarc.result if auth else None))
        self._rule = d.rule
        self._accepted_pairs = []
        for rcpt in rcpts:
            self._attempt_from(d, mail_from, rcpt, t, message_id=mid,
                               default=f"250 2.0.0 Ok: queued as {mid}")
        self._record("I", f"stored as message {mid}", d.rule)
        self._flush()
        # issue 14 hook: a rule's bounce: is scheduled here, sent later in the
        # background (all of it in harness/smtp/outbound.py; never raises)
        if d.rule is not None:
            outbound.after_message(
                self.ctx, session_id=self._sid, rule=d.rule, accepted=d.accepts,
                mail_from=mail_from, rcpts=rcpts, content=content, message_id=mid,
                dsn=self._dsn_record(rcpts), client_ip=str(self._conn.client),
                helo=self._helo_seen)
        self._reset_transaction()
        # Durable before any 2xx: wait for the commit that carries the message.
        # shield(): a client that half-closes cancels this task, but the
        # commit goes on and the message stays stored.
        await asyncio.shield(self.ctx.store.barrier())
        for cb in self.ctx.on_message:
            with contextlib.suppress(Exception):
                cb(mid)
        self._changed()
        self._analyze_later(mid, content, mail_from, auth)
        await self._delay_and_fault(d)
        await self._answer(d, f"250 2.0.0 Ok: queued as {mid}")

    async def _check_spf(self, mail_from: str) -> str:
        """SPF of this MAIL FROM, in a thread (DNS may be the system's)."""
        from harness.analysis.auth import check_spf

        assert self._conn is not None
        result = await asyncio.to_thread(
            check_spf, str(self._conn.client), mail_from, self._helo_seen or "",
            self.ctx.resolver(), receiver=self.hostname)
        self._record("I", f"SPF {result.result} for {result.domain} from {result.client_ip}"
                     + (f" ({result.mechanism})" if result.mechanism else ""))
        return result.result

    def _check_authentication(self, content: bytes, mail_from: str) -> Any:
        """SPF, DKIM and DMARC of a message (synchronous: run in a thread)."""
        from harness.analysis.auth import check_message

        assert self._conn is not None
        return check_message(content, client_ip=str(self._conn.client),
                             helo=self._helo_seen or "", mail_from=mail_from,
                             resolver=self.ctx.resolver(), hostname=self.hostname)

    def _analyze_later(self, mid: int, content: bytes, mail_from: str, auth: Any) -> None:
        """Queue the stored message for analysis (NDR parse, SPF/DKIM/DMARC):
        background work the listener's analyst does in quiet moments."""
        assert self._conn is not None
        self.ctx.analyst().add(AnalysisJob(
            mid=mid, raw=content, client_ip=str(self._conn.client),
            helo=self._helo_seen or "", mail_from=mail_from, hostname=self.hostname,
            zone=dict(self._scenario.dns) if self.ctx.dns == "scenario" else None,
            auth=auth), self)

    def _line_too_long(self, content: bytes) -> bool:
        limit = self._scenario.server.max_line_length
        if limit is None or len(content) + 2 <= limit:
            return False
        return any(len(line) + 2 > limit for line in content.split(b"\r\n"))

    def _dsn_record(self, rcpts: list[str]) -> dict[str, Any]:
        """DSN (RFC 3461) and related parameters as sent, decoded."""
        mail = self._mail
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
        for r in rcpts:
            p = self._rcpt_params.get(r)
            if p is not None and (p.notify or p.orcpt):
                per[r] = {"notify": p.notify, "orcpt": p.orcpt}
        if per:
            out["recipients"] = per
        return out

    async def cmd_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        d = await self._decide(ev.Rset())
        if d.accepts:
            self._reset_transaction()
        await self._answer(d, "250 2.0.0 Ok")

    async def cmd_NOOP(self, arg: str | None) -> None:
        d = await self._decide(ev.Noop())
        await self._answer(d, "250 2.0.0 Ok")

    async def cmd_VRFY(self, arg: str | None) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        address, _ = self._getaddr(arg)
        d = await self._decide(ev.Vrfy(argument=address or arg))
        await self._answer(d, "252 2.0.0 Cannot VRFY user, but will accept message")

    async def cmd_QUIT(self, arg: str | None) -> None:
        d = await self._decide(ev.Quit())
        self._end_reason = "quit"
        await self._answer(d, "221 2.0.0 Bye")
        await self._hangup("quit")

    async def cmd_HELP(self, arg: str | None) -> None:
        await self.push("214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA RSET NOOP VRFY QUIT")

    async def cmd_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 EXPN not implemented")


def _strip_keyword(arg: str | None, keyword: str) -> str | None:
    if arg is None or arg[: len(keyword)].upper() != keyword:
        return None
    return arg[len(keyword):].strip()


def _with_enhanced(line: str) -> str:
    code = int(line[:3]) if line[:3].isdigit() else 0
    rest = line[4:]
    first = rest.split(" ", 1)[0]
    if first.count(".") == 2 and first.replace(".", "").isdigit():
        return line
    status = _ENHANCED_FOR.get(code)
    return f"{line[:4]}{status} {rest}" if status else line


def _headline(content: bytes) -> tuple[str | None, str | None]:
    """Subject (RFC 2047 decoded) and Message-ID of a message; None when absent.

    A scan of the header block rather than the email package's parser, which
    costs more than the rest of a small message's handling."""
    # the header section ends at the first empty line (CRLF, or a bare LF
    # from a careless client)
    m = _HEADER_END.search(content)
    head = content[: m.start()] if m else content
    head = _FOLD.sub(b" ", head)
    subject: str | None = None
    message_id: str | None = None
    for line in re.split(rb"\r?\n", head):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower()
        if key == b"subject" and subject is None:
            subject = _decode_header(value.strip())
        elif key == b"message-id" and message_id is None:
            message_id = value.strip().decode("utf-8", "replace")
    return subject, message_id


_FOLD = re.compile(rb"\r?\n[ \t]+")
_HEADER_END = re.compile(rb"(?:^|\n)\r?\n")


def _decode_header(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(make_header(decode_header(text)))
    except (ValueError, LookupError, UnicodeError):
        return text


#: "<local@domain>" in the common, simple form; anything else (quoted local
#: parts, source routes, comments) goes to aiosmtpd's full RFC 5322 parser.
_SIMPLE_PATH = re.compile(r'\s*<([^<>\s"(),:;@\\\[\]]+@[^<>\s@"\\]+)>(.*)\Z', re.S)
