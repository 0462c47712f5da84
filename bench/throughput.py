"""Throughput benchmark: harness vs a bare aiosmtpd sink, loaded by Postfix smtp-source.

Runs both sinks in the same invocation, in two load modes:

  per-connection   one message per SMTP connection (smtp-source default)
  persistent       many messages per connection (smtp-source -d: each of the
                   parallel sessions keeps its connection until the total is sent)

Each (mode, sink) pair is measured --repeat times on a freshly started sink;
the median messages/second is reported, with the ratio harness/bare per mode.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import re
import shlex
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"  # loopback only
MAIL_DOMAIN = "bench.test"  # reserved TLD, used for HELO and addresses: no DNS anywhere
ADDRESS = f"bench@{MAIL_DOMAIN}"

STARTUP_TIMEOUT = 20.0  # seconds for a sink to accept connections
STOP_GRACE = 5.0  # seconds between SIGINT and SIGKILL
TARGET_RATIO = 0.7  # harness must reach this fraction of bare aiosmtpd

MODES: dict[str, list[str]] = {
    "per-connection": [],  # smtp-source sends one message per connection by default
    "persistent": ["-d"],  # -d: don't disconnect, send the next message on the same connection
}
SINKS = ("bare", "harness")

DEFAULT_HARNESS_CMD = (
    f"{shlex.quote(str(ROOT / '.venv' / 'bin' / 'harness'))} serve"
    " --listen 127.0.0.1:{port} --http 127.0.0.1:0 --store {store} --quiet"
)
BARE_CMD = [sys.executable, str(BENCH_DIR / "bare_sink.py")]
RECEIVED_RE = re.compile(r"bare_sink: received (\d+) messages")


class BenchError(Exception):
    """A run failed; the message says why."""


@dataclass
class RunResult:
    mode: str
    sink: str
    repeat: int
    messages: int
    seconds: float
    msgs_per_s: float
    checks: list[str] = field(default_factory=list)
    killed: bool = False


# --------------------------------------------------------------------------- sink process


class Sink:
    """A sink subprocess with its stdout/stderr drained by background threads."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: deque[str] = deque(maxlen=200)
        self.killed = False
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,  # our SIGINT is explicit; a Ctrl-C is not doubled
            )
        except OSError as exc:
            raise BenchError(f"{name}: cannot start {shlex.join(argv)}: {exc}") from exc
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _drain(self, stream: IO[str], is_stdout: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            self.output.append(line)
            if is_stdout:
                self.lines.put(line)

    def tail(self, n: int = 15) -> str:
        lines = list(self.output)[-n:]
        return "\n".join("    | " + line for line in lines) if lines else "    | (no output)"

    def fail(self, why: str) -> BenchError:
        return BenchError(f"{self.name}: {why}\n  command: {shlex.join(self.argv)}\n{self.tail()}")

    def first_line(self, deadline: float) -> str:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.fail(f"printed no port within {STARTUP_TIMEOUT:.0f} s")
            try:
                return self.lines.get(timeout=min(remaining, 0.1))
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    raise self.fail(
                        f"exited with {self.proc.returncode} before printing its port"
                    ) from None

    def wait_ready(self, port: int, deadline: float) -> None:
        """Wait until the port answers with an SMTP 220 greeting (then QUIT politely)."""
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.fail(f"exited with {self.proc.returncode} during startup")
            try:
                with socket.create_connection((HOST, port), timeout=2.0) as s:
                    f = s.makefile("rwb")
                    greeting = f.readline()
                    if not greeting.startswith(b"220"):
                        raise self.fail(f"unexpected greeting on port {port}: {greeting!r}")
                    f.write(b"QUIT\r\n")
                    f.flush()
                    f.readline()
                    return
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.05)
        raise self.fail(
            f"port {HOST}:{port} did not accept SMTP within {STARTUP_TIMEOUT:.0f} s"
            f" (last error: {last_error})"
        )

    def _signal_group(self, signum: int) -> None:
        # The sink runs in its own session/process group (start_new_session), whose id
        # is its pid: signalling the group also reaches anything a wrapper started.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def stop(self) -> None:
        """SIGINT, wait up to STOP_GRACE seconds, then SIGKILL."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGINT)
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.killed = True
                self._signal_group(signal.SIGKILL)  # leader not yet reaped: pgid still ours
                self.proc.wait()
        for t in self._threads:
            t.join(timeout=2.0)

    def received_count(self) -> int | None:
        """The count a bare_sink reports on exit, if this sink is one."""
        for line in reversed(self.output):
            m = RECEIVED_RE.search(line)
            if m:
                return int(m.group(1))
        return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def start_bare() -> tuple[Sink, int]:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    sink = Sink("bare", BARE_CMD)
    try:
        line = sink.first_line(deadline)
        try:
            port = int(line.strip())
        except ValueError:
            raise sink.fail(f"first stdout line is not a port: {line!r}") from None
        sink.wait_ready(port, deadline)
    except BaseException:
        sink.stop()
        raise
    return sink, port


def start_harness(template: str, store: Path) -> tuple[Sink, int]:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    port = free_port()
    values = {
        "port": str(port),
        "store": str(store),
        "python": sys.executable,
        "bench": str(BENCH_DIR),
    }
    # Split first, then substitute, so paths with spaces stay one argument.
    argv = [token.format(**values) for token in shlex.split(template)]
    sink = Sink("harness", argv)
    try:
        sink.wait_ready(port, deadline)
    except BaseException:
        sink.stop()
        raise
    return sink, port


# --------------------------------------------------------------------------- store check


def count_messages(store: Path) -> int | None:
    """Row count of the store's `messages` table, or None if there is no such table/file."""
    if not store.exists():
        return None
    uri = store.resolve().as_uri() + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=10.0)
        try:
            row = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages'"
            ).fetchone()
            if row is None:
                return None
            (n,) = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
            return int(n)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BenchError(f"cannot read the store {store} (read-only): {exc}") from exc


# --------------------------------------------------------------------------- smtp-source


def smtp_source_argv(
    args: argparse.Namespace, mode: str, port: int | str, messages: int
) -> list[str]:
    return [
        args.smtp_source,
        "-4",
        "-s", str(args.sessions),
        "-m", str(messages),
        "-l", str(args.size),
        "-M", MAIL_DOMAIN,  # HELO name (and default address domain): no hostname lookup
        "-f", ADDRESS,
        "-t", ADDRESS,
        *MODES[mode],
        f"{HOST}:{port}",
    ]  # fmt: skip


def run_smtp_source(argv: list[str], timeout: float) -> float:
    """Run smtp-source; return the elapsed perf_counter seconds. Raises on failure."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(
            f"smtp-source timed out after {timeout:.0f} s: {shlex.join(argv)}"
        ) from exc
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(
            f"smtp-source exited with {proc.returncode}: {shlex.join(argv)}\n"
            f"    stderr: {proc.stderr.strip() or '(empty)'}"
        )
    return elapsed


# --------------------------------------------------------------------------- one run


def one_run(args: argparse.Namespace, mode: str, sink_name: str, rep: int) -> RunResult:
    with tempfile.TemporaryDirectory(prefix="smtp-bench-") as tmp:
        store = Path(tmp) / "bench.db"
        if sink_name == "bare":
            sink, port = start_bare()
        else:
            sink, port = start_harness(args.harness_cmd, store)
        checks: list[str] = []
        try:
            before = count_messages(store) if sink_name == "harness" else None
            if args.warmup:
                run_smtp_source(smtp_source_argv(args, mode, port, args.warmup), args.timeout)
            argv = smtp_source_argv(args, mode, port, args.messages)
            if args.verbose:
                print(f"  $ {shlex.join(argv)}", file=sys.stderr)
            try:
                seconds = run_smtp_source(argv, args.timeout)
            except BenchError as exc:
                raise BenchError(f"{exc}\n  {sink_name} sink output:\n{sink.tail()}") from None
        finally:
            sink.stop()

        expected = args.warmup + args.messages
        if sink.proc.returncode not in (0, 130, -signal.SIGINT, -signal.SIGKILL):
            checks.append(f"note: sink exited with {sink.proc.returncode}")
        received = sink.received_count()
        if received is not None:
            if received != expected:
                raise sink.fail(f"bare_sink counted {received} messages, expected {expected}")
            checks.append(f"sink counted {received}")
        if sink_name == "harness":
            if not any(f"listening on {HOST}:{port}" in line for line in sink.output):
                checks.append(f"note: no 'listening on {HOST}:{port}' line seen")
            after = count_messages(store)
            if after is None:
                checks.append("store check skipped: no `messages` table in the store")
            else:
                delta = after - (before or 0)
                if delta != expected:
                    raise sink.fail(
                        f"store `messages` grew by {delta}, expected {expected} ({store})"
                    )
                checks.append(f"store +{delta} messages")
        if sink.killed:
            checks.append(f"note: sink ignored SIGINT for {STOP_GRACE:.0f} s, was SIGKILLed")
        return RunResult(
            mode=mode,
            sink=sink_name,
            repeat=rep,
            messages=args.messages,
            seconds=seconds,
            msgs_per_s=args.messages / seconds,
            checks=checks,
            killed=sink.killed,
        )


# --------------------------------------------------------------------------- report


def summarize(results: list[RunResult], modes: list[str]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for mode in modes:
        entry: dict[str, Any] = {}
        for sink in SINKS:
            rates = [r.msgs_per_s for r in results if r.mode == mode and r.sink == sink]
            entry[sink] = {
                "median_msgs_per_s": statistics.median(rates),
                "min_msgs_per_s": min(rates),
                "max_msgs_per_s": max(rates),
                "runs_msgs_per_s": rates,
            }
        ratio = entry["harness"]["median_msgs_per_s"] / entry["bare"]["median_msgs_per_s"]
        entry["ratio"] = ratio
        entry["meets_target"] = ratio >= TARGET_RATIO
        summary[mode] = entry
    return summary


def print_table(summary: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print()
    print(
        f"{args.messages} messages x {args.repeat} runs, {args.sessions} sessions,"
        f" {args.size}-byte bodies; median msg/s (min-max)"
    )
    header = f"{'mode':<16} {'bare':>22} {'harness':>22} {'harness/bare':>13}"
    print(header)
    print("-" * len(header))
    for mode, entry in summary.items():
        cells = []
        for sink in SINKS:
            s = entry[sink]
            spread = f"({s['min_msgs_per_s']:.0f}-{s['max_msgs_per_s']:.0f})"
            cells.append(f"{s['median_msgs_per_s']:8.0f} {spread}")
        verdict = "ok" if entry["meets_target"] else f"< {TARGET_RATIO}"
        print(f"{mode:<16} {cells[0]:>22} {cells[1]:>22} {entry['ratio']:>8.2f} {verdict:>4}")
    print(f"target: harness/bare >= {TARGET_RATIO} in every mode")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Messages/second of the harness vs a bare aiosmtpd sink under smtp-source.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--messages", type=int, default=2000, help="messages per timed run")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per (mode, sink); median")
    p.add_argument("--sessions", type=int, default=20, help="parallel sessions (smtp-source -s)")
    p.add_argument("--size", type=int, default=1024, help="body bytes (smtp-source -l)")
    p.add_argument(
        "--warmup", type=int, default=100,
        help="untimed messages sent to each fresh sink before the timed run",
    )  # fmt: skip
    p.add_argument(
        "--mode", dest="modes", action="append", choices=list(MODES),
        help="load mode to run (repeatable; default: all)",
    )  # fmt: skip
    p.add_argument(
        "--harness-cmd", default=DEFAULT_HARNESS_CMD,
        help="harness command; placeholders {port} {store} {python} {bench}."
        " It must listen on 127.0.0.1:{port}",
    )  # fmt: skip
    p.add_argument("--smtp-source", default="/usr/sbin/smtp-source", help="smtp-source binary")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per smtp-source run")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    p.add_argument(
        "--check", action="store_true",
        help=f"exit 2 if harness/bare is below {TARGET_RATIO} in any mode",
    )  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="print smtp-source commands")
    args = p.parse_args(argv)
    for name in ("messages", "repeat", "sessions", "size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not os.access(args.smtp_source, os.X_OK):
        p.error(f"{args.smtp_source} not executable (Debian: apt-get install postfix)")
    args.modes = args.modes or list(MODES)
    return args


def _terminated(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwind through the finally blocks that stop the sinks


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    results: list[RunResult] = []
    try:
        for rep in range(1, args.repeat + 1):
            for mode in args.modes:
                # Alternate which sink goes first so slow drift on a shared machine
                # does not always favour the same one.
                order = SINKS if rep % 2 else tuple(reversed(SINKS))
                for sink_name in order:
                    r = one_run(args, mode, sink_name, rep)
                    results.append(r)
                    extra = "; ".join(r.checks)
                    print(
                        f"run {rep}/{args.repeat} {mode:<15} {sink_name:<8}"
                        f" {r.seconds:7.3f} s {r.msgs_per_s:8.0f} msg/s  [{extra}]",
                        file=sys.stderr,
                        flush=True,
                    )
    except BenchError as exc:
        print(f"throughput: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("throughput: interrupted (sinks stopped)", file=sys.stderr)
        return 130

    summary = summarize(results, args.modes)
    print_table(summary, args)

    if args.json:
        doc = {
            "config": {
                "messages": args.messages,
                "repeat": args.repeat,
                "sessions": args.sessions,
                "size": args.size,
                "warmup": args.warmup,
                "harness_cmd": args.harness_cmd,
                "bare_cmd": shlex.join(BARE_CMD),
                "smtp_source": {
                    m: shlex.join(smtp_source_argv(args, m, "PORT", args.messages))
                    for m in args.modes
                },
                "target_ratio": TARGET_RATIO,
            },
            "host": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "loadavg": os.getloadavg(),
            },
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "summary": summary,
            "runs": [asdict(r) for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")

    if args.check and not all(e["meets_target"] for e in summary.values()):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
