"""Minimal aiosmtpd sink: the baseline the harness is measured against.

It accepts every message with "250 OK" and keeps nothing but a counter.

Protocol with bench/throughput.py:
  * the first line on stdout is the bound TCP port (an integer), flushed;
  * on SIGINT or SIGTERM the server closes and the last stdout line is
    "bare_sink: received N messages".

Usage: python bench/bare_sink.py [--port N]   (N=0, the default, lets the OS pick)
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"  # loopback only, never anything else
HOSTNAME = "bench.test"  # passed to aiosmtpd so it never calls socket.getfqdn()


class CountingHandler:
    """Accept every message, keep nothing but a count."""

    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.received += 1
        return "250 OK"


async def serve(port: int) -> int:
    loop = asyncio.get_running_loop()
    handler = CountingHandler()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=HOSTNAME, loop=loop), HOST, port
    )
    bound = server.sockets[0].getsockname()[1]
    print(bound, flush=True)

    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
    print(f"bare_sink: received {handler.received} messages", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Minimal aiosmtpd sink (benchmark baseline).")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: any)")
    args = parser.parse_args(argv)
    return asyncio.run(serve(args.port))


if __name__ == "__main__":
    sys.exit(main())
