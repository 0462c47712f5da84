"""Start and stop SMTP listeners in the running event loop."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass

from harness.errors import HarnessError
from harness.smtp import outbound
from harness.smtp.handlers import FORWARD_TIMEOUT
from harness.smtp.listener import ListenerContext
from harness.smtp.transport import SmtpTransport

# aiosmtpd logs on "mail.log" (its PROXY parser, the handlers it runs); the
# harness has its own transcript, so keep aiosmtpd to warnings.
logging.getLogger("mail.log").setLevel(logging.WARNING)

#: connections the kernel queues before we accept them (asyncio's default of
#: 100 left a burst of clients connected but never greeted); the kernel caps
#: it at net.core.somaxconn
BACKLOG = 4096


def parse_hostport(text: str, default_port: int = 2525) -> tuple[str, int]:
    """'127.0.0.1:2525', '[::1]:2525', ':2525' or '127.0.0.2' into (host, port)."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise HarnessError(f"bad address {text!r}: missing ]")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise HarnessError(f"bad address {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = _port(p, text)
    host = host or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise HarnessError(f"bad address {text!r}: give an IP address such as 127.0.0.1"
                               ) from None
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise HarnessError(f"bad port in {whole!r}")
    return int(text)


@dataclass
class Listener:
    ctx: ListenerContext
    server: asyncio.Server

    @property
    def address(self) -> tuple[str, int]:
        sock = self.server.sockets[0]
        host, port = sock.getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        """Stop accepting, close every open connection, let sessions finish."""
        self.server.close()
        await close_connections(self.ctx, abort=False, grace=5)
        await outbound.close(self.ctx)  # bounces still waiting are cancelled
        if self.ctx.pending_handlers:  # messages being passed on
            await asyncio.wait(list(self.ctx.pending_handlers), timeout=FORWARD_TIMEOUT)
        if self.ctx.handler_runner is not None:
            await asyncio.to_thread(self.ctx.handler_runner.stop)
            self.ctx.handler_runner = None
        if self.ctx.auth_checker is not None:
            await asyncio.to_thread(self.ctx.auth_checker.close)
            self.ctx.auth_checker = None
        await self.server.wait_closed()


async def close_connections(ctx: ListenerContext, *, abort: bool, grace: float) -> int:
    """Close every open connection of a listener (`abort`: at once, with
    nothing more written) and wait for their sessions to be recorded as
    ended; returns how many there were."""
    open_ = list(ctx.active)
    for proto in open_:
        transport = proto.transport
        if transport is not None:
            if abort:
                transport.abort()
            else:
                transport.close()
    if open_:
        await asyncio.wait([p.closed for p in open_], timeout=grace)
    return len(open_)


async def start_listener(ctx: ListenerContext, host: str = "127.0.0.1", port: int = 2525,
                         backlog: int = BACKLOG, reuse_port: bool = False) -> Listener:
    """Listen for SMTP on host:port (`reuse_port`: beside other processes
    on the same address, SO_REUSEPORT: the kernel spreads connections)."""
    loop = asyncio.get_running_loop()
    ctx.loop = loop
    ctx.store.attach(loop)
    ctx.prepare_tls()
    try:
        server = await loop.create_server(
            lambda: SmtpTransport(ctx), host, port, reuse_address=True,
            reuse_port=reuse_port or None,
            ssl=ctx.tls_context() if ctx.implicit_tls else None,
            ssl_handshake_timeout=30 if ctx.implicit_tls else None, backlog=backlog)
    except OSError as e:
        raise HarnessError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    listener = Listener(ctx, server)
    ctx.name = "{}:{}".format(*listener.address)
    return listener
