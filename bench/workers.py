"""Scaling on one machine: `harness serve --workers 2` against one process,
on the SQLite store and on PostgreSQL, beside bare aiosmtpd and Postfix's
smtp-sink in the same run, loaded by Postfix's smtp-source; and what
shared scenario state costs per stateful decision. See bench/README.md.

    .venv/bin/python bench/workers.py                 # 3 runs of everything
    .venv/bin/python bench/workers.py --repeat 5 --json out.json
    .venv/bin/python bench/workers.py --quick         # a short mode (the suite runs it)

Configurations ("harness" is `harness serve --quiet --http 127.0.0.1:0`,
durable capture and transcripts on, as a user runs it):

    smtp-sink        Postfix's C sink, the ceiling of this machine
    bare             bare aiosmtpd (bench/bare_sink.py)
    w1-sqlite        one process, SQLite
    w2-sqlite        --workers 2, SQLite (ids in blocks; state in STORE.state)
    w1-pg            one process, PostgreSQL (state in the database: shared)
    w2-pg            --workers 2, PostgreSQL

Workloads: 1 KB from 20 sessions, many messages per connection and one per
connection, with the `accept` scenario; then the stateful workload: the
same 1 KB many-per-connection load with a scenario whose rule reads the
pair's attempt count at RCPT (it never matches, so every message is still
accepted, but every RCPT is a decision against the book that spans
connections: in memory for w1-sqlite, in the shared book otherwise). The
cost of shared state per decision is the stateful run's server CPU per
message less the accept run's, for the same configuration.

Server CPU is user + system time of the server's process tree (workers,
analysis worker) over the timed run, from /proc, plus for PostgreSQL the
cluster's processes. On a 2-core machine smtp-source, the harness's
workers, its analysis worker and PostgreSQL all share the two cores:
figures compare configurations in one run; they are not capacities.
Loopback only; no DNS."""

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
from store import counts, postmaster, wait_analysed  # noqa: E402
from throughput import (  # noqa: E402
    HARNESS_CMD,
    BenchError,
    Sink,
    Workload,
    free_port,
    load,
    received,
    smtp_source,
    start,
    tree_cpu,
)

WORKLOADS = {w.name: w for w in (
    Workload("1k-20-many", 1024, 20, True, 5_000, 0.0),
    Workload("1k-20-one", 1024, 20, False, 3_000, 0.0),
)}
STATEFUL = "stateful"  # 1k-20-many with the scenario below
CONFIGS = ("smtp-sink", "bare", "w1-sqlite", "w2-sqlite", "w1-pg", "w2-pg")
HARNESSES = CONFIGS[2:]
# every RCPT asks for the pair's attempt count: a decision against the book
# that spans connections (the rule never matches: every message is accepted)
STATEFUL_SCENARIO = """\
scenario: counted-accept
summary: accepts everything, but counts each pair's attempts at RCPT
rules:
  - name: never
    on: rcpt
    when: {attempt: ">= 1000000000"}
    reply: 451 4.7.1 not reached
"""


@dataclass
class Run:
    workload: str
    config: str
    repeat: int
    messages: int
    seconds: float
    msgs_per_s: float
    cpu_us: float  # per message: the server's process tree
    db_cpu_us: float  # per message: the PostgreSQL cluster's processes (0 without)


def harness_argv(config: str, port: int, store: str, scenario: Path | None) -> list[str]:
    argv = shlex.split(HARNESS_CMD.format(port=port, store="STORE"))
    argv[argv.index("STORE")] = store
    if config.startswith("w2"):
        argv += ["--workers", "2"]
    if scenario is not None:
        argv.append(str(scenario))
    return argv


def one_run(args: argparse.Namespace, pg: PgCluster, workload: str, config: str,
            rep: int, tmp_root: Path) -> Run:
    w = WORKLOADS["1k-20-many" if workload == STATEFUL else workload]
    messages = args.messages or w.messages
    if config in ("smtp-sink", "bare"):
        sink, port = start(config, args, tmp_root / "unused.db")
        try:
            if args.warmup:
                load(smtp_source(args, w, port, args.warmup), args.timeout)
            cpu0 = tree_cpu(sink.proc.pid)
            seconds = load(smtp_source(args, w, port, messages), args.timeout)
            cpu1 = tree_cpu(sink.proc.pid)
        finally:
            sink.stop()
        got = received(sink)
        if got is not None and got != args.warmup + messages:
            raise sink.fail(f"received {got} messages, expected {args.warmup + messages}")
        return Run(workload, config, rep, messages, seconds, messages / seconds,
                   (cpu1 - cpu0) / messages * 1e6, 0.0)
    with tempfile.TemporaryDirectory(prefix="harness-bench-", dir=tmp_root) as tmp:
        db = ""
        if config.endswith("-pg"):
            db = f"bench_{uuid.uuid4().hex[:8]}"
            store = pg.create_database(db)
        else:
            store = str(Path(tmp) / "bench.db")
        scenario = None
        if workload == STATEFUL:
            scenario = Path(tmp) / "counted-accept.yaml"
            scenario.write_text(STATEFUL_SCENARIO)
        port = free_port()
        sink = Sink(f"harness ({config})", harness_argv(config, port, store, scenario))
        try:
            sink.wait_ready(port)
            if args.warmup:
                load(smtp_source(args, w, port, args.warmup), args.timeout)
            wait_analysed(store, args.warmup, 120)
            db_pid = postmaster(pg) if db else 0
            cpu0, dcpu0 = tree_cpu(sink.proc.pid), tree_cpu(db_pid) if db_pid else 0.0
            seconds = load(smtp_source(args, w, port, messages), args.timeout)
            cpu1, dcpu1 = tree_cpu(sink.proc.pid), tree_cpu(db_pid) if db_pid else 0.0
            wait_analysed(store, args.warmup + messages, args.analysis_timeout)
        finally:
            sink.stop()
        got = counts(store)[0]
        if got != args.warmup + messages:
            raise sink.fail(f"stored {got} messages, expected {args.warmup + messages}")
        if db:
            with contextlib.suppress(Exception):
                pg.psql(f'DROP DATABASE "{db}"')
    return Run(workload, config, rep, messages, seconds, messages / seconds,
               (cpu1 - cpu0) / messages * 1e6, (dcpu1 - dcpu0) / messages * 1e6)


def summarize(runs: list[Run], workloads: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in workloads:
        entry: dict[str, Any] = {}
        for config in CONFIGS:
            mine = [r for r in runs if r.workload == name and r.config == config]
            if not mine:
                continue
            entry[config] = {
                "msgs_per_s": statistics.median(r.msgs_per_s for r in mine),
                "runs": [round(r.msgs_per_s) for r in mine],
                "cpu_us": statistics.median(r.cpu_us + r.db_cpu_us for r in mine),
                "db_cpu_us": statistics.median(r.db_cpu_us for r in mine),
            }
        out[name] = entry
    # what a stateful decision costs: CPU per message above the accept run's
    if STATEFUL in out and "1k-20-many" in out:
        out["decision_cost_us"] = {
            c: out[STATEFUL][c]["cpu_us"] - out["1k-20-many"][c]["cpu_us"]
            for c in HARNESSES if c in out[STATEFUL] and c in out["1k-20-many"]}
    return out


def table(summary: dict[str, Any], repeat: int) -> str:
    rows = [f"medians of {repeat} runs; CPU: server (and database) per message", "",
            "| workload | " + " | ".join(CONFIGS) + " | w2/w1 SQLite | w2/w1 PG |",
            "|---|" + "---|" * (len(CONFIGS) + 2)]
    for name, entry in summary.items():
        if name == "decision_cost_us":
            continue
        label = WORKLOADS["1k-20-many"].describe() + ", stateful rule" if name == STATEFUL \
            else WORKLOADS[name].describe()
        cells = [f"{entry[c]['msgs_per_s']:,.0f} msg/s, {entry[c]['cpu_us']:,.0f} us"
                 if c in entry else "-" for c in CONFIGS]

        def ratio(a: str, b: str, e: dict[str, Any] = entry) -> str:
            if a in e and b in e:
                return f"{e[a]['msgs_per_s'] / e[b]['msgs_per_s']:.2f}"
            return "-"
        rows.append(f"| {label} | " + " | ".join(cells)
                    + f" | {ratio('w2-sqlite', 'w1-sqlite')} | {ratio('w2-pg', 'w1-pg')} |")
    if "decision_cost_us" in summary:
        rows += ["", "shared state, CPU per stateful decision (stateful run less accept run):"]
        for c, us in summary["decision_cost_us"].items():
            book = "this process's memory" if c == "w1-sqlite" else (
                "the shared SQLite file" if c == "w2-sqlite" else "PostgreSQL")
            rows.append(f"  {c:<10} {us:7.0f} us  (book in {book})")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--workload", dest="workloads", action="append",
                   choices=[*WORKLOADS, STATEFUL], help="repeatable; default: all three")
    p.add_argument("--config", dest="configs", action="append", choices=CONFIGS,
                   help="repeatable; default: all")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per configuration")
    p.add_argument("--messages", type=int, default=0,
                   help="messages per timed run (0: the workload's own number)")
    p.add_argument("--warmup", type=int, default=200, help="untimed messages first")
    p.add_argument("--quick", action="store_true",
                   help="short mode: 1 run of 300 messages per workload and configuration")
    p.add_argument("--smtp-source", default="/usr/sbin/smtp-source")
    p.add_argument("--smtp-sink", default="/usr/sbin/smtp-sink")
    p.add_argument("--harness-cmd", default=HARNESS_CMD, help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per smtp-source run")
    p.add_argument("--analysis-timeout", type=float, default=300.0)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.messages, args.warmup = 1, 300, 20
    for tool in (args.smtp_source, args.smtp_sink):
        if not os.access(tool, os.X_OK):
            p.error(f"{tool} is not there (Debian: apt-get install postfix)")
    args.workloads = args.workloads or [*WORKLOADS, STATEFUL]
    args.configs = args.configs or list(CONFIGS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs: list[Run] = []
    try:
        with PgCluster() as pg, tempfile.TemporaryDirectory(prefix="harness-bench-") as tmp:
            for rep in range(1, args.repeat + 1):
                for name in args.workloads:
                    configs = [c for c in args.configs
                               if name != STATEFUL or c in HARNESSES]
                    # alternate the order: slow drift on a shared machine favours none
                    for config in configs if rep % 2 else configs[::-1]:
                        r = one_run(args, pg, name, config, rep, Path(tmp))
                        runs.append(r)
                        print(f"run {rep}/{args.repeat} {name:<11} {config:<10} "
                              f"{r.msgs_per_s:7.0f} msg/s  {r.cpu_us:6.0f} us"
                              + (f" + db {r.db_cpu_us:5.0f} us" if r.db_cpu_us else ""),
                              file=sys.stderr, flush=True)
    except (BenchError, PgUnavailable) as e:
        print(f"workers: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("workers: interrupted", file=sys.stderr)
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
