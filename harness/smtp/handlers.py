"""Passing stored messages on: aiosmtpd's handler API as a feature.

A listener can pass each message it accepted to handlers written for
aiosmtpd: any object with `async handle_DATA(server, session, envelope)`
(aiosmtpd's own `Proxy` and `Sink` among them, or a user's). The harness's
`Forward` is one such handler: it relays the message to another SMTP
server, the release/relay of capture tools (`forward:` in a scenario,
`harness serve --forward HOST:PORT`).

Handlers run after the message is stored and its reply decided, in a thread
of their own with its own event loop (many handlers block: aiosmtpd's
`Proxy` relays with smtplib), so a slow or broken next hop never delays a
reply, never changes one and never loses a capture. What each handler did
is recorded: a transcript line in the session and a row in `relays`."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

import aiosmtplib
from aiosmtpd.smtp import Envelope, Session

from harness.scenario.model import Forward as ForwardTo

if TYPE_CHECKING:
    from harness.smtp.listener import ListenerContext
    from harness.smtp.session import MessageStored, ServerSession

FORWARD_TIMEOUT = 30.0


class Forward:
    """Relays each message to `host:port` as it was received (envelope and
    bytes), with aiosmtplib. aiosmtpd's `Proxy` does the same but answers
    "250 OK" whatever happened to the relayed copy; this one says."""

    def __init__(self, host: str, port: int, *, local_hostname: str = "harness.invalid",
                 timeout: float = FORWARD_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.local_hostname = local_hostname
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Forward({self.host}:{self.port})"

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        assert envelope.mail_from is not None
        client = aiosmtplib.SMTP(hostname=self.host, port=self.port, timeout=self.timeout,
                                 local_hostname=self.local_hostname, start_tls=False,
                                 use_tls=False)
        async with client:
            refused, reply = await client.sendmail(envelope.mail_from, envelope.rcpt_tos,
                                                   content)
        if refused:
            lost = ", ".join(f"{r}: {code} {text}" for r, (code, text) in refused.items())
            raise ForwardError(f"refused by {self.target}: {lost}")
        return f"250 {reply}"


class ForwardError(Exception):
    """The next hop took the message for some recipients only."""


class HandlerServer:
    """What a handler gets as `server`: the listener's name and host name
    (the harness has no aiosmtpd `SMTP` object to give)."""

    def __init__(self, listener: str, hostname: str) -> None:
        self.listener = listener
        self.hostname = hostname


class HandlerRunner:
    """A thread with its own event loop where a listener's handlers run."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever,
                                       name="harness-handlers", daemon=True)
        self.thread.start()

    def submit(self, handler: Any, server: HandlerServer, session: Session,
               envelope: Envelope) -> Future[Any]:
        async def call() -> Any:
            result = handler.handle_DATA(server, session, envelope)
            if inspect.isawaitable(result):
                result = await result
            return result
        return asyncio.run_coroutine_threadsafe(call(), self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


def handlers_for(ctx: ListenerContext) -> list[Any]:
    """The listener's own handlers, and the scenario's `forward:`."""
    forward: ForwardTo | None = ctx.scenario.forward
    extra = [Forward(forward.host, forward.port)] if forward is not None else []
    return [*ctx.handlers, *extra]


def pass_on(ctx: ListenerContext, session: ServerSession, stored: MessageStored) -> None:
    """Give a stored, accepted message to each handler (in their thread) and
    record what each did when it is done."""
    handlers = handlers_for(ctx)
    if not handlers:
        return
    if ctx.handler_runner is None:
        ctx.handler_runner = HandlerRunner()
    loop = asyncio.get_running_loop()
    server = HandlerServer(ctx.name, session.server.hostname)
    for handler in handlers:
        envelope = Envelope()
        envelope.mail_from = stored.mail_from
        envelope.rcpt_tos = list(stored.rcpt_tos)
        envelope.content = envelope.original_content = bytes(stored.content.whole())
        envelope.smtp_utf8 = session.used.get("smtputf8", False)
        smtp_session = Session(loop)
        # aiosmtpd annotates `peer` as str, but sets it to (and its Proxy
        # reads) the (host, port) pair that getpeername() gives
        smtp_session.peer = cast(Any, session.peer)
        smtp_session.host_name = session.helo_seen
        smtp_session.extended_smtp = session.ehlo
        smtp_session.authenticated = session.auth_user is not None
        fut = asyncio.wrap_future(ctx.handler_runner.submit(handler, server, smtp_session,
                                                            envelope), loop=loop)
        done = ctx.pending_handlers
        done.add(fut)
        fut.add_done_callback(done.discard)
        fut.add_done_callback(functools.partial(_record, ctx, session.id, stored, handler))


def _name(handler: Any) -> str:
    target = getattr(handler, "target", None)
    return f"forward to {target}" if target else f"handler {type(handler).__name__}"


def _record(ctx: ListenerContext, sid: int, stored: MessageStored, handler: Any,
            fut: asyncio.Future[Any]) -> None:
    error = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
    if error is None:
        status = str(fut.result() or "")
        ok = status[:1] not in ("4", "5")
    else:
        status = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        ok = False
    name = _name(handler)
    line = ctx.note(sid, f"{name}: {'ok' if ok else 'failed'}: {status}")
    ctx.store.relay(message_id=stored.message_id, session_id=sid, t=line.t, handler=name,
                    ok=ok, status=status[:2000])
