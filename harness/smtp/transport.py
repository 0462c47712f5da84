"""The transport: moves bytes between a socket and a `ServerSession`, and
carries out the session's actions. The only SMTP code that writes bytes,
waits, starts TLS, closes or resets connections.

An `asyncio.Protocol`, not a stream: bytes go to the session as they arrive,
and most actions (replies, transcript lines, attempts) are done on the spot,
so a pipelined group of commands costs one read and one write, and no task
or coroutine exists per connection until something has to be waited for (a
delay, a commit, a check in a thread, a TLS handshake).

Durability: the 2xx after a message is written only after the store's
writer thread has committed it (the session asks for `Commit` first)."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
import struct
from typing import Any, cast

from harness.records import Body, NotStored, TranscriptLine
from harness.smtp import outbound
from harness.smtp import session as ss
from harness.smtp.listener import ListenerContext
from harness.smtp.tls import HANDSHAKE_FAILURE_ALERT

log = logging.getLogger("harness.smtp")

PROXY_TIMEOUT = 10.0
TLS_HANDSHAKE_TIMEOUT = 30.0
TLS_FAIL_WAIT = 5.0  # for the client's hello before the tls_fail alert
#: stop reading from a client this far ahead of the conversation (it sends
#: while the session waits for a commit, a delay or a check)
READ_AHEAD = 1 << 20
#: a message over this size has its DKIM and DMARC checked in a process of
#: its own, a smaller one in a thread (see _check_message_apart)
AUTH_APART = 1 << 18


class SmtpTransport(asyncio.Protocol):
    """One connection of a listener."""

    __slots__ = (
        "_closing_how",
        "_durable",
        "_idle",
        "_last",
        "_later",
        "_out",
        "_proxy",
        "_records",
        "_stored_mid",
        "_timer",
        "_tls_fail",
        "_transfer_due",
        "closed",
        "ctx",
        "loop",
        "paused",
        "session",
        "transport",
    )

    def __init__(self, ctx: ListenerContext) -> None:
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.session: ss.ServerSession | None = None
        #: resolved when the connection is gone and its session recorded
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self._out: list[bytes] = []
        self._records: list[TranscriptLine] = []
        self._idle = ctx.scenario.server.timeout
        self._last = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._proxy: asyncio.StreamReader | None = None
        self._tls_fail: asyncio.TimerHandle | None = None
        #: the one thing being waited for (a delay, a tarpit, a TLS handshake)
        self._later: asyncio.Task[None] | asyncio.TimerHandle | None = None
        self._closing_how = ""
        self._stored_mid = 0
        self._durable: asyncio.Future[None] | None = None
        self._transfer_due = 0.0  # loop time a message's transfer must end by (0: none)
        self.paused = False

    # ------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's are not asyncio.Transport subclasses)
        self.transport = cast(asyncio.Transport, transport)
        self.ctx.active.add(self)
        self._arm_idle()
        if self.ctx.proxy_protocol:
            self._proxy = asyncio.StreamReader(limit=1 << 16)
            self._later = self.loop.create_task(self._read_proxy_header())
            return
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        self._begin((str(peer[0]), int(peer[1])), ())

    def data_received(self, data: bytes) -> None:
        self._last = self.loop.time()
        if self._proxy is not None:
            self._proxy.feed_data(data)
            return
        if self._tls_fail is not None:
            self._tls_alert()
            return
        session = self.session
        if session is None:
            return
        self._run(session.receive_data(data))
        if session.in_transfer:
            if not self._transfer_due:  # a message's transfer starts: its deadline
                self._transfer_due = self._last + session.server.data_timeout
                if self._timer is None or self._timer.when() > self._transfer_due:
                    self._arm(self._transfer_due)
        else:
            self._transfer_due = 0.0
        if session.busy and session.buffered > READ_AHEAD and not self.paused:
            self._pause()

    def eof_received(self) -> bool:
        """The client closed its sending side (often right after a pipelined
        QUIT): answer what it sent first, then close from our side."""
        if self._proxy is not None:
            self._proxy.feed_eof()
            return True
        if self.session is not None:
            self._run(self.session.receive_eof())
        # keep the transport open for the replies still due (TLS cannot
        # half-close: asyncio closes it, and warns if asked otherwise)
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is None

    def connection_lost(self, exc: Exception | None) -> None:
        for handle in (self._timer, self._tls_fail, self._later):
            if handle is not None:
                handle.cancel()
        self._timer = self._tls_fail = self._later = None
        if self._durable is not None:  # stored, never waited for: its outcome read anyway
            self._durable.add_done_callback(_outcome)
            self._durable = None
        session = self.session
        if session is not None:
            self._run(session.connection_lost(exc))
            for cb in self.ctx.on_session_end:
                try:
                    cb(session.id)
                except Exception as e:  # a watcher must not break the serving
                    self.ctx.errors.append(e)
            self.ctx.changed()
        self.transport = None
        self.ctx.active.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    # ----------------------------------------------------------- the start

    async def _read_proxy_header(self) -> None:
        """The client address a PROXY v1/v2 header names (aiosmtpd parses
        it); then SMTP, with what followed the header."""
        from aiosmtpd.proxy_protocol import get_proxy

        reader = self._proxy
        assert reader is not None and self.transport is not None
        try:
            data = await asyncio.wait_for(get_proxy(reader), PROXY_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            data = None
        if self.transport is None:
            return
        if not data or not data.valid or data.src_addr is None:
            log.warning("connection without a valid PROXY header: closed")
            self.transport.close()
            return
        self._later = None
        # what the client sent after the header is SMTP
        reader.feed_eof()
        rest = await reader.read()
        self._proxy = None
        if data.command == 0:  # LOCAL: a health check
            client = ("0.0.0.0", 0)
        else:
            client = (str(data.src_addr), int(data.src_port or 0))
        peer = self.transport.get_extra_info("peername") or ("0.0.0.0", 0)
        self._begin(client, (f"PROXY header: client {client[0]}:{client[1]} "
                             f"via {peer[0]}:{peer[1]}",))
        if rest and self.session is not None:
            self._run(self.session.receive_data(rest))

    def _begin(self, peer: tuple[str, int], notes: tuple[str, ...]) -> None:
        ctx = self.ctx
        assert self.transport is not None
        scenario = ctx.scenario
        tls = self._tls_info()
        sid = ctx.store.session_started(listener=ctx.name, peer_ip=peer[0], peer_port=peer[1],
                                        scenario=scenario.name, t=ctx.engine.clock())
        if ctx.worker is not None:
            notes = (*notes, f"served by {ctx.worker}")
        self.session = ss.ServerSession(
            session_id=sid, server=scenario.server, decider=ctx, clock=ctx.engine.clock,
            peer=peer, scenario=scenario.name, tls=tls,
            tls_available=ctx.tls_context() is not None, notes=notes)
        self._run(self.session.start())

    def _tls_info(self) -> ss.TlsInfo | None:
        assert self.transport is not None
        obj = self.transport.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        return ss.TlsInfo(obj.version(), cipher[0] if cipher else None)

    # -------------------------------------------------------- the actions

    def _run(self, actions: list[ss.Out]) -> None:
        """Carry out the session's actions; a request (always last) is
        answered on the spot when it can be, else waited for."""
        session = self.session
        assert session is not None
        ctx = self.ctx
        store = ctx.store
        changed = False
        while actions:
            request: ss.Request | None = None
            for action in actions:
                if type(action) is TranscriptLine:
                    line = action
                    self._records.append(line)
                    for obs in ctx.observers:
                        try:
                            obs(line)
                        except Exception as e:  # an observer must not break the session
                            ctx.errors.append(e)
                elif isinstance(action, ss.Send):
                    self._out.append(action.data)
                elif isinstance(action, ss.Attempt):
                    store.attempt(action.record)
                    changed = True
                elif isinstance(action, ss.Update):
                    store.session_update(session.id, **action.fields)
                elif isinstance(action, ss.Request):
                    request = action
                elif isinstance(action, ss.MessageStored):
                    self._stored(action)
                    changed = True
                elif isinstance(action, ss.Close):
                    self._close(action.how)
                elif isinstance(action, ss.TlsFail):
                    self._start_tls_fail()
                elif isinstance(action, ss.Error):
                    log.error("error while serving session %d", session.id,
                              exc_info=action.error)
                    ctx.errors.append(action.error)
            if request is None:
                break
            if isinstance(request, ss.StoreMessage):
                self._flush_records()  # the transcript before the message
                mid = self._stored_mid = store.message(request.draft)
                if ctx.analyst is not None or ctx.queue_analysis:  # in the same commit
                    store.analysis_job(mid, client_ip=session.connection.key,
                                       helo=session.helo_seen, hostname=session.server.hostname,
                                       zone=ctx.scenario.dns if ctx.dns == "scenario" else None)
                # the message durable: what the session's Commit waits for,
                # and what the analyst waits for before telling its worker
                self._durable = store.durable(mid)
                if ctx.analyst is not None:
                    ctx.analyst.queued(mid, self._durable)
                actions = session.resume(mid)
                continue
            self._flush()
            self._wait(request)
            break
        self._flush()
        self._flush_records()
        if changed:
            ctx.changed()

    def _flush(self) -> None:
        """Write the replies queued so far in one segment (pipelined
        commands get their replies together, as RFC 2920 suggests)."""
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out = []
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _flush_records(self) -> None:
        if self._records:
            self.ctx.store.transcript(self._records)
            self._records = []

    def _wait(self, request: ss.Request) -> None:
        """Carry out a request that takes time; resume the session after."""
        loop = self.loop
        if isinstance(request, ss.Commit):
            # the message just handed over, durable (a large one: all its pieces)
            assert self._durable is not None
            self._durable.add_done_callback(self._committed)
            self._durable = None
        elif isinstance(request, ss.Consult):
            assert self.session is not None
            self.ctx.consult(self.session, request.event).add_done_callback(self._consulted)
        elif isinstance(request, ss.Delay):
            self._later = loop.call_later(request.seconds, self._resume, None)
        elif isinstance(request, ss.Drip):
            self._later = loop.create_task(self._tarpit(request))
        elif isinstance(request, ss.StartTls):
            self._later = loop.create_task(self._start_tls())
        elif isinstance(request, ss.CheckSpf):
            self._in_thread(self._check_spf, request.sender)
        elif isinstance(request, ss.CheckMessage):
            if len(request.content) > AUTH_APART:
                self._check_message_apart(request.content, request.mail_from)
            else:
                self._in_thread(self._check_message, request.content, request.mail_from)
        elif isinstance(request, ss.CheckContent):
            self._in_thread(self.ctx.engine.content_checks, request.content)
        else:  # pragma: no cover - every request is handled above
            raise AssertionError(f"unknown request {request!r}")

    def _resume(self, result: object) -> None:
        self._later = None
        if self.session is None or self.transport is None:
            return
        self._run(self.session.resume(result))
        self._resume_reading()

    def _throw(self, error: BaseException) -> None:
        self._later = None
        if self.session is None or self.transport is None:
            return
        self._run(self.session.throw(error))
        self._resume_reading()

    def _consulted(self, fut: asyncio.Future[Any]) -> None:
        self._resume(fut.result())  # never fails: a book out of reach is a 451 decision

    def _committed(self, fut: asyncio.Future[None]) -> None:
        error = fut.exception()
        if error is not None:
            if isinstance(error, NotStored) and self.ctx.analyst is not None:
                self.ctx.analyst.not_stored(self._stored_mid)
            self._throw(error)
        else:
            self._resume(None)

    def _in_thread(self, fn: Any, *args: Any) -> None:
        """Run `fn` in a worker thread (DNS, signature checks): never on the loop."""
        fut = self.loop.run_in_executor(None, fn, *args)

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled():  # the loop is closing: the session is gone
                return
            error = f.exception()
            if error is not None:
                self._throw(error)
            else:
                self._resume(f.result())
        fut.add_done_callback(done)

    def _check_message_apart(self, content: Body, mail_from: str) -> None:
        """A large message's DKIM and DMARC, in a process of their own (see
        harness.analysis.auth_process): dkimpy canonicalizes the body in
        Python, holding the interpreter lock, and in a thread of this
        process that held the event loop (a signed 20 MB message: 0.3 s, 4
        s with runs of spaces to fold). A worker thread waits for it."""
        session = self.session
        assert session is not None
        ctx = self.ctx
        zone = None if ctx.dns == "system" else {
            name: {rtype: list(values) for rtype, values in records.items()}
            for name, records in ctx.scenario.dns.items()}
        self._in_thread(functools.partial(
            ctx.auth_process().check, content.parts, zone, client_ip=session.connection.key,
            helo=session.helo_seen or "", mail_from=mail_from,
            hostname=session.server.hostname))

    def _check_spf(self, sender: str) -> Any:
        from harness.analysis.auth import check_spf

        session = self.session
        assert session is not None
        return check_spf(str(session.connection.client), sender, session.helo_seen or "",
                         self.ctx.resolver(), receiver=session.server.hostname)

    def _check_message(self, content: Body, mail_from: str) -> Any:
        from harness.analysis.auth import check_message

        session = self.session
        assert session is not None
        return check_message(bytes(content.whole()), client_ip=session.connection.key,
                             helo=session.helo_seen or "", mail_from=mail_from,
                             resolver=self.ctx.resolver(), hostname=session.server.hostname)

    def _stored(self, action: ss.MessageStored) -> None:
        """A message is durable: tell watchers and the analyst, pass it to
        the listener's handlers, schedule its rule's bounce."""
        ctx = self.ctx
        session = self.session
        assert session is not None
        for cb in ctx.on_message:
            try:
                cb(action.message_id)
            except Exception as e:  # a watcher must not break the session
                ctx.errors.append(e)
        if action.accepted and (ctx.handlers or ctx.scenario.forward is not None):
            from harness.smtp.handlers import pass_on

            pass_on(ctx, session, action)
        if action.rule is not None:  # its bounce:, if it has one, goes out later
            outbound.after_message(
                ctx, session_id=session.id, rule=action.rule, accepted=action.accepted,
                mail_from=action.mail_from, rcpts=action.rcpt_tos,
                content=bytes(action.content.whole()),
                message_id=action.message_id, dsn=action.dsn,
                client_ip=session.connection.key, helo=session.helo_seen)

    # ---------------------------------------------------- time and faults

    def _arm_idle(self) -> None:
        self._arm(self._last + self._idle)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(when, self._idle_check)

    def _idle_check(self) -> None:
        """The idle timeout and a message's transfer deadline: one timer,
        re-armed from the last read, so a read costs no timer of its own."""
        self._timer = None
        if self.transport is None:
            return
        now = self.loop.time()
        session = self.session
        if self._transfer_due and now >= self._transfer_due and session is not None:
            if session.in_transfer:
                self._run(session.transfer_timeout())
                return
            self._transfer_due = 0.0
        due = self._last + self._idle
        if now < due:
            self._arm(min(due, self._transfer_due) if self._transfer_due else due)
            return
        if session is None:
            self.transport.close()
            return
        self._run(session.idle_timeout())

    def _close(self, how: str) -> None:
        self._closing_how = how
        transport = self.transport
        if transport is None or how == "hang":
            return
        self._flush()
        if how == "rst":
            sock = transport.get_extra_info("socket")
            if sock is not None:
                # SO_LINGER on, timeout 0: close() sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()

    def _start_tls_fail(self) -> None:
        """After the 220: wait (a while) for the client's TLS hello, answer
        it with a handshake_failure alert, close."""
        self._flush()
        self._tls_fail = self.loop.call_later(TLS_FAIL_WAIT, self._tls_alert)

    def _tls_alert(self) -> None:
        if self._tls_fail is not None:
            self._tls_fail.cancel()
            self._tls_fail = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(HANDSHAKE_FAILURE_ALERT)
            transport.close()

    async def _tarpit(self, request: ss.Drip) -> None:
        """Write one byte at a time; writing is not idling (no 421 mid-reply)."""
        for byte in request.data:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            transport.write(bytes([byte]))
            self._last = self.loop.time()
            await asyncio.sleep(request.interval)
        self._later = None
        self._resume(None)

    async def _start_tls(self) -> None:
        ctx = self.ctx.tls_context()
        transport = self.transport
        assert ctx is not None and transport is not None
        try:
            new = await self.loop.start_tls(transport, self, ctx, server_side=True,
                                            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as e:
            self._later = None
            if self.session is not None and self.transport is not None:
                self._run(self.session.throw(e))
            return
        self._later = None
        if new is None or self.transport is None:
            return
        self.transport = new
        info = self._tls_info()
        self._resume(info)

    # -------------------------------------------------------- flow control

    def _pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def _resume_reading(self) -> None:
        if self.paused and self.session is not None and not self.session.busy:
            if self.transport is not None:
                self.transport.resume_reading()
            self.paused = False


def _outcome(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # a refusal nobody waited for is not an unretrieved error
