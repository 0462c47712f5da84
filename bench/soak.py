"""Soak: `harness serve` under smtp-source load for minutes, sampled every
second: messages/second, resident memory (the server and its analysis
worker), the analysis backlog and the store's size on disk; then how long
the backlog takes to drain once the load stops. Drawn as a PNG.

    .venv/bin/python bench/soak.py --minutes 10 --size 102400 --png soak.png
    .venv/bin/python bench/soak.py --seconds 5 --size 1024      # a short mode

By default it starts a harness of its own (fresh store, loopback); with
--port and --store it loads one that runs already (its pid found from the
port). Targets (issue 11): RSS peak under 250 MB at 100 KB, 20 sessions;
the backlog drained within 30 s of the end of the load."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
RSS_TARGET_MB = 250.0
DRAIN_TARGET_S = 30.0


@dataclass
class Sample:
    t: float  # seconds since the load started
    messages: int
    msgs_per_s: float
    rss_mb: float  # the server process
    worker_rss_mb: float  # its analysis worker
    backlog: int  # messages waiting for their analysis
    store_mb: float
    loading: bool


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def worker_of(pid: int) -> int | None:
    for child in children(pid):
        with contextlib.suppress(OSError):
            if b"harness.analysis_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
    return None


def pid_on_port(port: int) -> int:
    """The process listening on 127.0.0.1:port (from /proc/net/tcp)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[3] == "0A" and int(parts[1].split(":")[1], 16) == port:
            inodes.add(parts[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        return int(proc.name)
    raise SystemExit(f"nothing listens on {HOST}:{port}")


def store_state(store: Path) -> tuple[int, int, float]:
    """(messages, waiting for analysis, MB on disk: the file, its WAL)."""
    size = sum(p.stat().st_size for p in (store, Path(f"{store}-wal")) if p.exists())
    conn = sqlite3.connect(store.resolve().as_uri() + "?mode=ro", uri=True, timeout=10)
    try:
        (count,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM messages").fetchone()
        (waiting,) = conn.execute("SELECT COUNT(*) FROM analysis_queue").fetchone()
    finally:
        conn.close()
    return int(count), int(waiting), size / 1024 / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def run(args: argparse.Namespace) -> dict[str, object]:
    duration = args.seconds if args.seconds else args.minutes * 60
    server = None
    tmp = None
    if args.port:
        port, store, pid = args.port, Path(args.store), pid_on_port(args.port)
    else:
        tmp = tempfile.mkdtemp(prefix="harness-soak-")
        port, store = free_port(), Path(tmp) / "soak.db"
        server = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "harness"), "serve", "--listen", f"{HOST}:{port}",
             "--http", "127.0.0.1:0", "--store", str(store), "--quiet", *args.serve_arg],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert server.stdout is not None
        if "listening on" not in server.stdout.readline():
            raise SystemExit("harness serve did not start")
        pid = server.pid
    samples: list[Sample] = []
    load = subprocess.Popen(
        [args.smtp_source, "-4", "-s", str(args.sessions), "-m", "100000000",
         "-l", str(args.size), "-M", "bench.test", "-f", "bench@bench.test",
         "-t", "bench@bench.test", "-d", f"{HOST}:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    started = time.monotonic()
    last = (started, store_state(store)[0])
    drained_at = None
    try:
        while True:
            time.sleep(1.0)  # a sampler: time is what it measures
            now = time.monotonic()
            loading = now - started < duration
            if not loading and load.poll() is None:
                os.killpg(load.pid, signal.SIGTERM)
                load.wait(10)
            count, waiting, mb = store_state(store)
            worker = worker_of(pid)
            samples.append(Sample(
                t=round(now - started, 2), messages=count,
                msgs_per_s=(count - last[1]) / (now - last[0]), rss_mb=rss_mb(pid),
                worker_rss_mb=rss_mb(worker) if worker else 0.0, backlog=waiting,
                store_mb=mb, loading=loading))
            last = (now, count)
            if not loading and waiting == 0:
                drained_at = now - started - duration
                break
            if not loading and now - started - duration > args.drain_timeout:
                break
    finally:
        if load.poll() is None:
            os.killpg(load.pid, signal.SIGKILL)
        if server is not None:
            os.killpg(server.pid, signal.SIGINT)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        if tmp is not None and not args.keep_store:  # gigabytes after a long run
            shutil.rmtree(tmp, ignore_errors=True)
    loaded = [s for s in samples if s.loading]
    return {
        "config": {"seconds": duration, "size": args.size, "sessions": args.sessions,
                   "port": port, "store": str(store)},
        "messages": samples[-1].messages if samples else 0,
        "mean_msgs_per_s": (sum(s.msgs_per_s for s in loaded) / len(loaded)) if loaded else 0,
        "rss_peak_mb": max((s.rss_mb for s in samples), default=0),
        "worker_rss_peak_mb": max((s.worker_rss_mb for s in samples), default=0),
        "backlog_peak": max((s.backlog for s in samples), default=0),
        "drained_after_s": drained_at,
        "store_mb": samples[-1].store_mb if samples else 0,
        "samples": [asdict(s) for s in samples],
    }


def draw(result: dict[str, object], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    assert isinstance(samples, list)
    t = [s["t"] for s in samples]
    cfg = result["config"]
    assert isinstance(cfg, dict)
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    series = [("messages / s", [s["msgs_per_s"] for s in samples], None),
              ("RSS, MB", [s["rss_mb"] for s in samples], RSS_TARGET_MB),
              ("analysis backlog", [s["backlog"] for s in samples], None),
              ("store on disk, MB", [s["store_mb"] for s in samples], None)]
    for ax, (label, ys, target) in zip(axes, series, strict=True):
        ax.plot(t, ys, color="#1f77b4")
        if label.startswith("RSS"):
            ax.plot(t, [s["worker_rss_mb"] for s in samples], color="#ff7f0e",
                    label="analysis worker")
            ax.legend(["harness serve", "analysis worker"], loc="upper left")
        if target is not None:
            ax.axhline(target, color="#d62728", linestyle="--", linewidth=1)
        ax.axvline(float(cfg["seconds"]), color="#888888", linestyle=":", linewidth=1)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("seconds since the load started (dotted: the load stops)")
    fig.suptitle(f"harness serve under smtp-source: {cfg['sessions']} sessions, "
                 f"{int(cfg['size']) // 1024} KB messages, {float(cfg['seconds']) / 60:g} min")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=0.0, help="instead of --minutes")
    p.add_argument("--size", type=int, default=102_400, help="body bytes")
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--port", type=int, default=0, help="a harness that runs already")
    p.add_argument("--store", default="", help="its store (with --port)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an option for the harness it starts (repeat), e.g. "
                        "--serve-arg=--max-store-size --serve-arg=2GB")
    p.add_argument("--keep-store", action="store_true",
                   help="keep the store of the harness it started (deleted by default)")
    p.add_argument("--drain-timeout", type=float, default=120.0)
    p.add_argument("--smtp-source", default="/usr/sbin/smtp-source")
    p.add_argument("--json", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--check", action="store_true", help="exit 2 when a target is missed")
    args = p.parse_args(argv)
    if args.port and not args.store:
        p.error("--port needs --store")
    result = run(args)
    drained = result["drained_after_s"]
    print(f"{result['messages']:,} messages in {result['config']['seconds']:g} s "  # type: ignore[index]
          f"({result['mean_msgs_per_s']:.0f} msg/s); RSS peak {result['rss_peak_mb']:.0f} MB "
          f"(analysis worker {result['worker_rss_peak_mb']:.0f} MB); analysis backlog peak "
          f"{result['backlog_peak']:,}, drained "
          + (f"{drained:.1f} s after the load" if drained is not None else "NOT within the timeout")
          + f"; store {result['store_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.png:
        draw(result, args.png)
        print(f"wrote {args.png}")
    ok = (float(result["rss_peak_mb"]) < RSS_TARGET_MB  # type: ignore[arg-type]
          and drained is not None and float(drained) <= DRAIN_TARGET_S)  # type: ignore[arg-type]
    return 2 if args.check and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
