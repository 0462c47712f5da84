"""Idle connections: the memory `harness serve` holds per open, silent SMTP
connection (target: under 8 KiB each at 10,000), and a normal delivery
through smtplib while they are all open. See bench/README.md.

    .venv/bin/python bench/idle.py                     # 10,000 connections
    .venv/bin/python bench/idle.py --connections 500   # a short mode (the suite runs it)

The server's resident memory is read from /proc before the connections are
opened and once every one of them has had its greeting (each has a session
by then); the difference over the number of connections is the cost of one.
Loopback only."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shlex
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
TARGET_KIB = 8.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def open_idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    """n connections, each read up to its 220 greeting, then left silent."""
    writers: list[asyncio.StreamWriter] = []
    sem = asyncio.Semaphore(500)  # connect in waves: the listen queue is finite

    async def one() -> None:
        async with sem:
            reader, writer = await asyncio.open_connection(HOST, port)
            line = await reader.readline()
            if not line.startswith(b"220"):
                raise RuntimeError(f"greeting {line!r}")
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(n)))
    return writers


def deliver(port: int) -> float:
    m = EmailMessage()
    m["From"], m["To"], m["Subject"] = "a@bench.test", "b@bench.test", "among the idle"
    m.set_content("hello\n")
    started = time.perf_counter()
    with smtplib.SMTP(HOST, port, local_hostname="client.bench.test", timeout=30) as c:
        c.send_message(m)
    return time.perf_counter() - started


async def measure(args: argparse.Namespace, server: subprocess.Popen[str],
                  port: int) -> dict[str, float]:
    before = rss_kib(server.pid)
    started = time.perf_counter()
    writers = await open_idle(port, args.connections)
    opened = time.perf_counter() - started
    after = rss_kib(server.pid)
    latency = await asyncio.to_thread(deliver, port)
    for w in writers:
        w.close()
    return {"connections": args.connections, "rss_before_kib": before,
            "rss_after_kib": after, "kib_per_connection": (after - before) / len(writers),
            "open_seconds": opened, "delivery_ms_while_open": latency * 1000}


def run(args: argparse.Namespace) -> dict[str, float]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="harness-idle-") as tmp:
        argv = [str(ROOT / ".venv" / "bin" / "harness"), "serve", "--listen", f"{HOST}:{port}",
                "--http", "off", "--store", f"{tmp}/idle.db", "--quiet", *args.serve_arg]
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            if "listening on" not in line:
                raise SystemExit(f"harness serve did not start: {line}{server.stdout.read()}")
            deliver(port)  # one delivery first: what a session needs is loaded
            return asyncio.run(measure(args, server, port))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10_000)
    p.add_argument("--serve-arg", action="append", default=[],
                   help="an extra argument for harness serve (repeatable)")
    p.add_argument("--json", type=Path)
    p.add_argument("--check", action="store_true", help=f"exit 2 at {TARGET_KIB} KiB or more")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.connections + 100
    if soft < need:
        if hard < need:
            raise SystemExit(f"{args.connections} connections need {need} open files; "
                             f"the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    r = run(args)
    print(f"{r['connections']:,} idle connections: {r['kib_per_connection']:.1f} KiB each "
          f"(server RSS {r['rss_before_kib'] / 1024:.1f} -> {r['rss_after_kib'] / 1024:.1f} MiB,"
          f" opened in {r['open_seconds']:.1f} s); a delivery meanwhile took "
          f"{r['delivery_ms_while_open']:.1f} ms (target: under {TARGET_KIB:g} KiB each)")
    print(f"command: {shlex.join(sys.argv)}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    return 2 if args.check and r["kib_per_connection"] >= TARGET_KIB else 0


if __name__ == "__main__":
    sys.exit(main())
