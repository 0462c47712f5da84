"""Start and stop SMTP listeners in the running event loop."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from dataclasses import dataclass

from harness.errors import HarnessError
from harness.smtp import outbound
from harness.smtp.server import HarnessSMTP, ListenerContext

# aiosmtpd logs every connection at INFO on "mail.log"; the harness has its
# own transcript, so keep aiosmtpd to warnings.
logging.getLogger("mail.log").setLevel(logging.WARNING)


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
        protocols = list(self.ctx.active)
        for proto in protocols:
            if proto.transport is not None:
                proto.transport.close()
        tasks = [p.task for p in protocols if p.task is not None]
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await outbound.close(self.ctx)  # issue 14: bounces still waiting are cancelled
        # analyses still queued run now rather than at the next quiet moment
        self.ctx.analysis_quiet = 0.0
        if self.ctx.pending:
            await asyncio.wait(list(self.ctx.pending), timeout=10)
        await self.server.wait_closed()


async def start_listener(ctx: ListenerContext, host: str = "127.0.0.1", port: int = 2525
                         ) -> Listener:
    loop = asyncio.get_running_loop()
    ctx.prepare_tls()
    try:
        server = await loop.create_server(
            lambda: HarnessSMTP(ctx), host, port, reuse_address=True,
            ssl=ctx.tls_context() if ctx.implicit_tls else None,
            ssl_handshake_timeout=30 if ctx.implicit_tls else None)
    except OSError as e:
        raise HarnessError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    listener = Listener(ctx, server)
    ctx.name = "{}:{}".format(*listener.address)
    return listener
