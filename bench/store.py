"""The store backends: `harness serve` with its embedded SQLite store against
the same harness with a PostgreSQL store, in the same run, loaded by
Postfix's smtp-source. See bench/README.md.

    .venv/bin/python bench/store.py                  # 1 KB and 100 KB, 3 runs each
    .venv/bin/python bench/store.py --repeat 5 --json out.json
    .venv/bin/python bench/store.py --quick          # a short mode (the suite runs it)

The PostgreSQL server is a private cluster the script starts (Debian's
postgresql package, tools/pg_cluster.py: a temp folder, a unix socket
there, fsync and synchronous commits on) and stops; each run gets a fresh
database, as each SQLite run a fresh file. Every run sends untimed warm-up
messages, waits for their analysis, then times one smtp-source run (20
sessions, many messages per connection) and checks that the store holds
every message sent.

Server CPU per message is user + system time over the timed run, from
/proc: the harness's process tree (its analysis worker included) and, for
PostgreSQL, the cluster's (postmaster, the harness's backends, WAL writer,
checkpointer, autovacuum) shown apart and added up. The load generator,
the harness and PostgreSQL share the machine's cores: figures compare
backends in one run, they are not capacities. Loopback only; no DNS."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(BENCH_DIR))

from pg_cluster import PgCluster, PgUnavailable  # noqa: E402
from throughput import (  # noqa: E402
    HARNESS_CMD,
    BenchError,
    Sink,
    Workload,
    free_port,
    load,
    smtp_source,
    tree_cpu,
)

from harness.store.db import Reader  # noqa: E402

WORKLOADS = {w.name: w for w in (
    Workload("1k-20-many", 1024, 20, True, 5_000, 0.0),
    Workload("100k-20-many", 102_400, 20, True, 1_000, 0.0),
)}
BACKENDS = ("sqlite", "postgresql")


@dataclass
class Run:
    workload: str
    backend: str
    repeat: int
    messages: int
    seconds: float
    msgs_per_s: float
    harness_cpu_us: float  # per message, the harness's process tree
    db_cpu_us: float  # per message, the PostgreSQL cluster's processes (0 for SQLite)
    commits_per_s: float | None = None  # PostgreSQL: xact_commit of the database per second


def postmaster(pg: PgCluster) -> int:
    return int((pg.data / "postmaster.pid").read_text().split()[0])


def counts(store: str) -> tuple[int, int]:
    """(messages, waiting for their analysis)."""
    with Reader(store) as r:
        total = r.counts(("messages",))["messages"]
        return total, len(r.analysis_pending())


def wait_analysed(store: str, total: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have, waiting = counts(store)
        if have >= total and waiting == 0:
            return
        time.sleep(0.1)  # the store is the only thing that says so: polled
    raise BenchError(f"analysis not done {timeout:.0f} s after the run")


def commits(pg: PgCluster, db: str) -> int:
    return int(pg.psql(f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{db}'"))


def one_run(args: argparse.Namespace, pg: PgCluster | None, w: Workload, backend: str,
            rep: int) -> Run:
    messages = args.messages or w.messages
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
        db = ""
        if backend == "postgresql":
            assert pg is not None
            db = f"bench_{uuid.uuid4().hex[:8]}"
            store = pg.create_database(db)
        else:
            store = str(Path(tmp) / "bench.db")
        port = free_port()
        argv = shlex.split(HARNESS_CMD.format(port=port, store="STORE"))
        argv[argv.index("STORE")] = store
        sink = Sink(f"harness ({backend})", argv)
        try:
            sink.wait_ready(port)
            if args.warmup:
                load(smtp_source(args, w, port, args.warmup), args.timeout)
            wait_analysed(store, args.warmup, 120)
            db_pid = postmaster(pg) if pg is not None and backend == "postgresql" else 0
            c0 = commits(pg, db) if db and pg else 0
            cpu0, dcpu0 = tree_cpu(sink.proc.pid), tree_cpu(db_pid) if db_pid else 0.0
            seconds = load(smtp_source(args, w, port, messages), args.timeout)
            cpu1, dcpu1 = tree_cpu(sink.proc.pid), tree_cpu(db_pid) if db_pid else 0.0
            c1 = commits(pg, db) if db and pg else 0
            wait_analysed(store, args.warmup + messages, args.analysis_timeout)
        finally:
            sink.stop()
        got = counts(store)[0]
        if got != args.warmup + messages:
            raise sink.fail(f"stored {got} messages, expected {args.warmup + messages}")
        if db and pg:
            with contextlib.suppress(Exception):
                pg.psql(f'DROP DATABASE "{db}"')
    return Run(w.name, backend, rep, messages, seconds, messages / seconds,
               (cpu1 - cpu0) / messages * 1e6, (dcpu1 - dcpu0) / messages * 1e6,
               (c1 - c0) / seconds if db else None)


def summarize(runs: list[Run], names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        entry: dict[str, Any] = {"workload": WORKLOADS[name].describe()}
        for backend in BACKENDS:
            mine = [r for r in runs if r.workload == name and r.backend == backend]
            entry[backend] = {
                "msgs_per_s": statistics.median(r.msgs_per_s for r in mine),
                "runs": [round(r.msgs_per_s) for r in mine],
                "harness_cpu_us": statistics.median(r.harness_cpu_us for r in mine),
                "db_cpu_us": statistics.median(r.db_cpu_us for r in mine),
                "cpu_us": statistics.median(r.harness_cpu_us + r.db_cpu_us for r in mine),
                "commits_per_s": (statistics.median(r.commits_per_s or 0.0 for r in mine)
                                  if backend == "postgresql" else None),
            }
        entry["ratio"] = entry["postgresql"]["msgs_per_s"] / entry["sqlite"]["msgs_per_s"]
        out[name] = entry
    return out


def table(summary: dict[str, Any], repeat: int) -> str:
    rows = [f"medians of {repeat} runs; server CPU per message: harness + database server",
            "",
            "| workload | SQLite msg/s | SQLite CPU/msg | PostgreSQL msg/s | PostgreSQL CPU/msg"
            " (harness + server) | commits/s (PG) | PG / SQLite |",
            "|---|---|---|---|---|---|---|"]
    for e in summary.values():
        s, p = e["sqlite"], e["postgresql"]
        rows.append(f"| {e['workload']} | {s['msgs_per_s']:,.0f} | {s['cpu_us']:,.0f} us | "
                    f"{p['msgs_per_s']:,.0f} | {p['cpu_us']:,.0f} us ({p['harness_cpu_us']:,.0f}"
                    f" + {p['db_cpu_us']:,.0f}) | {p['commits_per_s']:,.0f} | "
                    f"{e['ratio']:.2f} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", dest="workloads", action="append", choices=list(WORKLOADS),
                   help="workload to run (repeatable; default: both)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per backend and workload")
    p.add_argument("--messages", type=int, default=0,
                   help="messages per timed run (0: the workload's own number)")
    p.add_argument("--warmup", type=int, default=200, help="untimed messages first")
    p.add_argument("--quick", action="store_true",
                   help="short mode: 1 run of 300 messages per workload and backend")
    p.add_argument("--smtp-source", default="/usr/sbin/smtp-source")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per smtp-source run")
    p.add_argument("--analysis-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.messages, args.warmup = 1, 300, 20
    if not os.access(args.smtp_source, os.X_OK):
        p.error(f"{args.smtp_source} is not there (Debian: apt-get install postfix)")
    args.workloads = args.workloads or list(WORKLOADS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[Run] = []
    try:
        with PgCluster() as pg:
            for rep in range(1, args.repeat + 1):
                for name in args.workloads:
                    # alternate the order: slow drift on a shared machine favours neither
                    for backend in BACKENDS if rep % 2 else BACKENDS[::-1]:
                        r = one_run(args, pg, WORKLOADS[name], backend, rep)
                        runs.append(r)
                        print(f"run {rep}/{args.repeat} {name:<13} {backend:<10} "
                              f"{r.msgs_per_s:7.0f} msg/s  harness {r.harness_cpu_us:6.0f} us"
                              f"  db {r.db_cpu_us:6.0f} us", file=sys.stderr, flush=True)
    except (BenchError, PgUnavailable) as e:
        print(f"store: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("store: interrupted", file=sys.stderr)
        return 130
    summary = summarize(runs, args.workloads)
    print(table(summary, args.repeat))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": {"platform": platform.platform(), "python": platform.python_version(),
                     "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
            "summary": summary, "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
