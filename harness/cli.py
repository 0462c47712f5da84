"""`harness`: thin commands over the scenario, SMTP and store packages.

Every HarnessError is printed as one line (no traceback) with exit status 1;
bad usage exits 2 (argparse)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness import __version__
from harness.errors import HarnessError, ScenarioError
from harness.records import TranscriptLine
from harness.render import printable
from harness.scenario.engine import Engine
from harness.scenario.library import library_dir, library_names, load, resolve
from harness.scenario.loader import load_file
from harness.store import display, is_postgres, local_dir, location
from harness.store.db import DEFAULT_PATH, Reader, SessionRecord, Store
from harness.store.retention import Retention


def _width(stream: object) -> int | None:
    """A terminal's own width; piped output gets COLUMNS or 160, not rich's 80,
    so tables stay readable in less, grep and CI logs."""
    if getattr(stream, "isatty", lambda: False)():
        return None
    return int(os.environ.get("COLUMNS", "160") or 160)


out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _day(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _style(reply: str) -> str:
    return {"2": "green", "3": "cyan", "4": "yellow", "5": "red"}.get(reply[:1], "white")


# ------------------------------------------------------------------- serve


class LivePrinter:
    """One line per reply: time, session, client command, reply, deciding rule."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last_command: dict[int, str] = {}

    def __call__(self, line: TranscriptLine) -> None:
        sid, t, direction, _, text, rule = line
        text = printable(text)  # a client's bytes never drive the operator's terminal
        if direction == "C":
            self.last_command[sid] = text
            return
        if direction == "I":
            if text.startswith(("fault:", "delay", "tarpit", "bounce")):
                self.console.print(f"[dim]{_when(t)} #{sid}[/] [magenta]{escape(text)}[/]"
                                   + (f" [dim]\\[{escape(rule)}][/]" if rule else ""))
            elif text.startswith("session ended"):
                self.last_command.pop(sid, None)
                self.console.print(f"[dim]{_when(t)} #{sid} {escape(text)}[/]")
            elif text.startswith(("connection from", "served by")):
                self.console.print(f"[dim]{_when(t)} #{sid}[/] {escape(text)}")
            return
        if len(text) > 3 and text[3] == "-":
            return  # a continuation line; the final line carries the reply
        cmd = self.last_command.pop(sid, "(banner)")
        if cmd.upper().startswith(("EHLO", "HELO")):
            text = text[:3] + " ..." if text[:1] == "2" else text
        rule_txt = f" [dim]\\[{escape(rule)}][/]" if rule else ""
        self.console.print(
            f"[dim]{_when(t)} #{sid}[/] {escape(cmd[:80])} [dim]->[/] "
            f"[{_style(text)}]{escape(text)}[/]{rule_txt}")


@dataclass
class ListenerSpec:
    host: str
    port: int
    scenario: str | None
    implicit_tls: bool = False
    proxy_protocol: bool = False
    forward: tuple[str, int] | None = None


def _listener_arg(text: str, *, implicit_tls: bool, proxy: bool,
                  forward: tuple[str, int] | None = None) -> ListenerSpec:
    from harness.smtp.runner import parse_hostport

    where, _, scenario = text.partition("=")
    host, port = parse_hostport(where, 465 if implicit_tls else 2525)
    return ListenerSpec(host, port, scenario or None, implicit_tls, proxy, forward)


def _next_hop(text: str, where: str) -> tuple[str, int]:
    from harness.scenario.values import parse_next_hop

    try:
        return parse_next_hop(text)
    except ValueError as e:
        raise HarnessError(f"{where}: {e}") from None


def _config(path: Path, args: argparse.Namespace) -> list[ListenerSpec]:
    """A serve configuration file: listeners, and optionally store and seed."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise HarnessError(f"cannot read config {path}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("listeners"), list):
        raise HarnessError(f"{path}: a config needs a list of listeners "
                           "(listen: HOST:PORT, scenario: NAME, tls: implicit)")
    unknown = set(data) - {"listeners", "store", "seed", "bounce_via"}
    if unknown:
        raise HarnessError(f"{path}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    if "store" in data and is_postgres(str(data["store"])):  # a database URL, as it is
        args.store = str(data["store"])
    elif "store" in data:
        args.store = (path.parent / str(data["store"])) if not Path(
            str(data["store"])).is_absolute() else Path(str(data["store"]))
    if "seed" in data:
        if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
            raise HarnessError(f"{path}: seed must be a whole number, not {data['seed']!r}")
        args.seed = data["seed"]
    if "bounce_via" in data and args.bounce_via is None:  # issue 14: the command line wins
        args.bounce_via = str(data["bounce_via"])
    if not data["listeners"]:
        raise HarnessError(f"{path}: the listeners list is empty")
    specs = []
    for i, item in enumerate(data["listeners"], 1):
        if not isinstance(item, dict) or "listen" not in item:
            raise HarnessError(f"{path}: listener {i} needs listen: HOST:PORT")
        bad = set(item) - {"listen", "scenario", "tls", "proxy_protocol", "forward"}
        if bad:
            raise HarnessError(f"{path}: listener {i}: unknown keys {', '.join(sorted(bad))}")
        if item.get("tls") not in (None, "implicit", "starttls"):
            raise HarnessError(f"{path}: listener {i}: tls is implicit or starttls")
        scenario = item.get("scenario")
        if scenario is not None and not Path(str(scenario)).is_absolute() and (
            path.parent / str(scenario)).is_file():
            scenario = str(path.parent / str(scenario))
        forward = item.get("forward", args.forward)
        spec = _listener_arg(str(item["listen"]), implicit_tls=item.get("tls") == "implicit",
                             proxy=bool(item.get("proxy_protocol", args.proxy_protocol)),
                             forward=None if forward is None else _next_hop(
                                 str(forward), f"{path}: listener {i}: forward"))
        spec.scenario = None if scenario is None else str(scenario)
        specs.append(spec)
    return specs


async def _serve(args: argparse.Namespace) -> int:
    from harness.analyst import Analyst
    from harness.smtp.listener import ListenerContext
    from harness.smtp.runner import Listener, start_listener

    if args.config is not None:
        if args.listen or args.listen_tls:
            raise HarnessError("--config names the listeners: drop --listen/--listen-tls, "
                               "or put them in the config")
        specs = _config(args.config, args)
    else:
        forward = None if args.forward is None else _next_hop(args.forward, "--forward")
        specs = [_listener_arg(x, implicit_tls=False, proxy=args.proxy_protocol, forward=forward)
                 for x in (args.listen or ["127.0.0.1:2525"])]
        specs += [_listener_arg(x, implicit_tls=True, proxy=args.proxy_protocol, forward=forward)
                  for x in args.listen_tls]
    # Load every scenario before anything listens: a bad file starts nothing.
    scenarios = [load(spec.scenario or args.scenario) for spec in specs]
    bounce_via = _bounce_via(args.bounce_via)
    workers = _workers(args.workers)
    farm: Any = None
    shared: Any = None
    if workers > 1 or is_postgres(args.store):
        # several processes on one store (workers, or hosts sharing a
        # PostgreSQL database): ids reserved in blocks, and the scenarios'
        # state in the shared book (harness.state)
        from harness.state import open_shared

        store = Store(args.store, retention=_retention(args), shared=True).open()
        try:
            shared = await asyncio.to_thread(open_shared, args.store)
        except BaseException:
            store.close()
            raise
    else:
        store = Store(args.store, retention=_retention(args)).open()
    loop = asyncio.get_running_loop()
    store.attach(loop)

    def health(line: str) -> None:  # from the store's writer thread
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: err.print(f"[yellow]{escape(line)}[/]"))
    store.on_health = health
    printer = LivePrinter(out)
    listeners: list[Listener] = []
    contexts: list[ListenerContext] = []  # with --workers: the workers serve them
    api: Any = None
    # one analyst for the store, its worker a process of its own: what
    # waited at the last stop (or crash) is taken up first
    analyst = Analyst(store, mode="process")

    async def shut() -> None:
        if api is not None:
            await api.stop()
        for listener in listeners:
            await listener.close()
        if farm is not None:
            await farm.stop()
        await analyst.stop(drain=ANALYSIS_DRAIN)
        if shared is not None:
            await asyncio.to_thread(shared.close)
        store.close()

    try:
        await analyst.start()
        for spec, scenario in zip(specs, scenarios, strict=True):
            ctx = ListenerContext(engine=Engine(scenario, seed=args.seed), store=store,
                                  implicit_tls=spec.implicit_tls,
                                  proxy_protocol=spec.proxy_protocol,
                                  ca_dir=local_dir(args.store), dns=args.dns)
            if spec.forward is not None:
                from harness.smtp.handlers import Forward

                ctx.handlers.append(Forward(*spec.forward, local_hostname=scenario.server.hostname))
            ctx.bounce_via = bounce_via
            ctx.analyst = analyst
            if not args.quiet:
                ctx.observers.append(printer)
            if shared is not None:
                ctx.shared, ctx.loop = shared, loop
            if workers == 1:
                listeners.append(await start_listener(ctx, spec.host, spec.port,
                                                      backlog=args.backlog))
            else:  # the workers serve it; this context is the page's and the console's
                ctx.prepare_tls()
                contexts.append(ctx)
        if workers > 1:
            from harness.smtp.workers import Farm, ListenerPlan

            farm = Farm(contexts, [ListenerPlan(x.host, x.port, x.implicit_tls,
                                                x.proxy_protocol, x.forward) for x in specs],
                        count=workers, store=str(args.store), seed=args.seed, dns=args.dns,
                        bounce_via=bounce_via, backlog=args.backlog, loop=args.loop,
                        ca_dir=str(local_dir(args.store)),
                        say=lambda line: err.print(f"[yellow]{escape(line)}[/]"),
                        watch=not args.quiet)
            await farm.start()
    except BaseException:
        await shut()
        raise
    if args.http != "off":
        from harness.api.app import ApiServer
        from harness.smtp.runner import parse_hostport

        http_host, http_port = parse_hostport(args.http, 8025)
        api = ApiServer([x.ctx for x in listeners] or contexts, args.store, http_host,
                        http_port,
                        token=args.api_token)
        try:
            await api.start()
        except BaseException:
            api = None
            await shut()
            raise
        if farm is not None:  # the workers' lines: for the console, or while the page watches
            api.hub.on_change.append(lambda n: farm.watch(not args.quiet or n > 0))
    served = ([(x.ctx, x.address) for x in listeners] if farm is None
              else list(zip(contexts, farm.addresses, strict=True)))
    for spec, (ctx, (h, p)) in zip(specs, served, strict=True):
        hops = [str(f) for f in (ctx.scenario.forward,) if f is not None]
        hops += ["{}:{}".format(*spec.forward)] if spec.forward else []
        extras = [x for x in ("implicit TLS" if spec.implicit_tls else "",
                              "PROXY protocol" if spec.proxy_protocol else "",
                              f"forwarding to {', '.join(hops)}" if hops else "",
                              f"{workers} worker processes" if farm is not None else "") if x]
        out.print(f"SMTP Harness {__version__} listening on {h}:{p} "
                  f"(scenario {ctx.scenario.name}"
                  + "".join(f", {x}" for x in extras) + ")")
    if farm is not None:
        out.print(f"workers: pids {' '.join(str(p) for p in farm.pids)}; scenario state "
                  f"shared in {shared.where}")
    elif shared is not None:  # a PostgreSQL store: other hosts may serve from it too
        out.print(f"scenario state shared in {shared.where}, with every harness on this store")
    if api is not None:
        out.print(f"web page and API on http://{api.host}:{api.port}/"
                  + (f" (token {api.token})" if api.token else ""))
    if bounce_via is not None:
        out.print(f"rules' bounces are sent via {bounce_via[0]}:{bounce_via[1]}")
    out.print(f"store {display(args.store)}" + (f" ({store.retention.describe()})"
                                       if store.retention else "")
              + (f", seed {args.seed}" if args.seed is not None else "")
              + ("" if args.quiet else "; Ctrl-C stops"))
    sys.stdout.flush()
    # Everything made at start (modules, scenarios, the page) lives as long
    # as the server: out of the collector's sight, a collection scans only
    # what serving makes.
    gc.freeze()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await shut()
    with Reader(args.store) as r:
        c = r.counts()
        waiting = len(r.analysis_pending())
    out.print(f"stopped: {c['sessions']} sessions, {c['messages']} messages in "
              f"{display(args.store)}"
              + (f"; {store.pruned:,} older message(s) pruned" if store.pruned else "")
              + (f"; {store.refused:,} message(s) refused (452) for want of space"
                 if store.refused else "")
              + (f"; {waiting} message(s) wait for their analysis (done at the next start)"
                 if waiting else ""))
    if farm is not None and farm.restarts:
        out.print(f"{farm.restarts} worker(s) were started again after they ended")
    for e in [*(e for x in listeners for e in x.ctx.errors),
              *(e for c in contexts for e in c.errors), *analyst.errors]:
        err.print(f"[red]error while serving:[/] {type(e).__name__}: {escape(str(e))}")
    return 0


def _workers(text: str) -> int:
    """--workers N or auto (one per core)."""
    if text == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise HarnessError(f"--workers: a number from 1 to 64, or auto (got {text!r})")
    return int(text)


def _retention(args: argparse.Namespace) -> Retention:
    """--keep N, --keep-days D, --max-store-size SIZE."""
    from harness.scenario.values import parse_size

    max_bytes = None
    if args.max_store_size is not None:
        try:
            max_bytes = parse_size(args.max_store_size)
        except ValueError as e:
            raise HarnessError(f"--max-store-size: {e}") from None
        if max_bytes < 1 << 20:
            raise HarnessError("--max-store-size: at least 1MiB (the store's own tables "
                               "take some)")
    for name in ("keep", "keep_days"):
        value = getattr(args, name)
        if value is not None and value < 0:
            raise HarnessError(f"--{name.replace('_', '-')}: cannot be negative")
    return Retention(keep=args.keep, keep_days=args.keep_days, max_bytes=max_bytes)


def _prune(args: argparse.Namespace) -> int:
    policy = _retention(args)
    if not policy and not args.vacuum:
        raise HarnessError("say what to keep: --keep N, --keep-days D or --max-store-size "
                           "SIZE (and --vacuum to give the space back to the disk)")
    if not is_postgres(args.store) and not Path(args.store).exists():
        raise HarnessError(f"no store at {args.store}")
    with Reader(args.store) as r:
        before = r.usage()
    with Store(args.store, retention=policy) as store:
        pruned = store.prune_now(vacuum=args.vacuum)
    with Reader(args.store) as r:
        after, counts = r.usage(), r.counts()
    mb = 1024 * 1024
    if is_postgres(args.store):  # tables, not a file; VACUUM: their space is reused
        out.print(f"pruned {pruned:,} message(s) ({policy.describe()}): "
                  f"{counts['messages']:,} messages, {counts['sessions']:,} sessions left; "
                  f"tables {before['used_bytes'] / mb:,.1f} MB -> "
                  f"{after['used_bytes'] / mb:,.1f} MB")
        return 0
    out.print(f"pruned {pruned:,} message(s) ({policy.describe()}): "
              f"{counts['messages']:,} messages, {counts['sessions']:,} sessions left; "
              f"in use {before['used_bytes'] / mb:,.1f} MB -> {after['used_bytes'] / mb:,.1f} MB"
              f", file {before['file_bytes'] / mb:,.1f} MB -> {after['file_bytes'] / mb:,.1f} MB"
              + ("" if args.vacuum or after["file_bytes"] <= after["used_bytes"] * 1.1
                 else " (--vacuum gives the free pages back to the disk)"))
    return 0


def _bounce_via(text: str | None) -> tuple[str, int] | None:
    """--bounce-via HOST:PORT: the next hop for rules' bounce: reports."""
    from harness.smtp.runner import parse_hostport

    if text is None:
        return None
    try:
        return parse_hostport(text, 25)
    except HarnessError as e:
        raise HarnessError(f"--bounce-via: {e}") from None


#: seconds `harness serve` gives the analyses still waiting when it stops
#: (what is left is done at the next start: the queue is in the store)
ANALYSIS_DRAIN = 5.0


def _run_loop(main: Any, which: str) -> int:
    """Run the server on asyncio's own event loop or uvloop's (an optional
    extra, `pip install smtp-harness[fast]`; `auto` takes it when it is
    installed)."""
    if which in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if which == "uvloop":
                raise HarnessError("--loop uvloop: uvloop is not installed "
                                   "(pip install 'smtp-harness[fast]')") from None
        else:
            result: int = uvloop.run(main)
            return result
    result = asyncio.run(main)
    return int(result)


# ------------------------------------------------------------------ others


def _check(args: argparse.Namespace) -> int:
    failed = 0
    for name in args.scenarios:
        try:
            s = load_file(resolve(name))
        except ScenarioError as e:
            failed += 1
            for p in e.problems:
                out.print(escape(str(p)))
            continue
        except HarnessError as e:  # not found: say so and go on with the rest
            failed += 1
            out.print(f"{escape(name)}: {escape(str(e))}")
            continue
        out.print(f"ok: {escape(s.path)} (scenario {escape(s.name)}, {len(s.rules)} rules)")
    return 1 if failed else 0


def _scenarios(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    for name in library_names():
        s = load_file(library_dir() / f"{name}.yaml")
        rows.append({"name": s.name, "summary": s.summary, "tags": list(s.tags),
                     "rules": len(s.rules), "path": s.path})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(box=None, pad_edge=False)
    for col in ("scenario", "summary", "tags"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["summary"], ", ".join(r["tags"]))
    out.print(table)
    return 0


def _messages(args: argparse.Namespace) -> int:
    with Reader(args.store) as r:
        msgs = r.messages(limit=args.limit, rcpt=args.rcpt)
    if args.json:
        print(json.dumps([m.as_dict() for m in msgs], indent=2))
        return 0
    table = Table(box=None, pad_edge=False)
    for col in ("id", "session", "received", "from", "to", "size", "subject"):
        table.add_column(col)
    for m in msgs:
        table.add_row(str(m.id), str(m.session_id), _day(m.received_at),
                      escape(printable(m.mail_from or "<>")),
                      escape(printable(", ".join(m.rcpt_tos))), str(m.size),
                      escape(printable(m.subject or "")))
    out.print(table)
    return 0


def _sessions(args: argparse.Namespace) -> int:
    with Reader(args.store) as r:
        sessions = r.sessions(limit=args.limit, with_events=args.json)
    if args.json:
        print(json.dumps([_session_json(s) for s in sessions], indent=2))
        return 0
    table = Table(box=None, pad_edge=False)
    # several listeners (hosts of a farm, sharing a PostgreSQL store): which one
    where = len({s.listener for s in sessions}) > 1
    for col in ("id", "started", *(("listener",) if where else ()), "peer", "helo", "from",
                "to", "messages", "ended"):
        table.add_column(col)
    for s in sessions:
        table.add_row(str(s.id), _day(s.started_at), *((s.listener,) if where else ()),
                      f"{s.peer_ip}:{s.peer_port}",
                      escape(printable(s.helo or "-")),
                      escape(printable(", ".join(x or "<>" for x in s.mail_from))),
                      escape(printable(", ".join(s.rcpt_tos))), str(len(s.message_ids)),
                      escape(printable(s.end_reason or "open")))
    out.print(table)
    return 0


def _attempts(args: argparse.Namespace) -> int:
    with Reader(args.store) as r:
        attempts = r.attempts(rcpt=args.rcpt, mail_from=args.mail_from)
        listeners = {s.id: s.listener for s in r.sessions(
            session_ids=sorted({a.session_id for a in attempts}))}
    if args.json:
        print(json.dumps([{**asdict(a), "listener": listeners.get(a.session_id)}
                          for a in attempts], indent=2))
        return 0
    table = Table(box=None, pad_edge=False)
    for col in ("when", "session", "listener", "from", "to", "n", "after", "phase", "reply"):
        table.add_column(col)
    count: dict[tuple[str, str], int] = {}
    for a in sorted(attempts, key=lambda x: (x.t, x.id)):
        pair = (a.mail_from.lower(), a.rcpt.lower())
        count[pair] = count.get(pair, 0) + 1
        style = "green" if a.code and a.code < 400 else "yellow" if a.code and a.code < 500 \
            else "red"
        table.add_row(_day(a.t), str(a.session_id), listeners.get(a.session_id, "-"),
                      escape(printable(a.mail_from or "<>")), escape(printable(a.rcpt)),
                      str(count[pair]),
                      "-" if a.interval is None else f"{a.interval:.1f}s", a.phase,
                      f"[{style}]{escape(printable(a.reply or a.outcome))}[/]")
    out.print(table)
    return 0


def _session_json(s: SessionRecord) -> dict[str, Any]:
    return {
        "id": s.id, "listener": s.listener, "scenario": s.scenario,
        "peer": {"ip": s.peer_ip, "port": s.peer_port}, "helo": s.helo,
        "started_at": s.started_at, "ended_at": s.ended_at, "end_reason": s.end_reason,
        "envelope": {"mail_from": s.mail_from, "rcpt_tos": s.rcpt_tos},
        "extensions_used": s.extensions, "message_ids": s.message_ids,
        "transcript": [{"t": e.t, "direction": e.direction, "phase": e.phase,
                        "text": e.text, "rule": e.rule} for e in s.events],
    }


#: SQLite's largest INTEGER, the largest id a store can hold
MAX_ID = 2**63 - 1


def _store_id(text: str, what: str, original: str) -> int:
    """A message or session number from the command line: digits, at most
    the store's largest id (a larger one would overflow SQLite's INTEGER)."""
    if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > 19 or (
            int(text) > MAX_ID):
        raise HarnessError(f"bad id {original!r}: give a session number or m<number> "
                           f"(a {what} number is at most {MAX_ID})")
    return int(text)


def _show(args: argparse.Namespace) -> int:
    ident = args.id.lower()
    with Reader(args.store) as r:
        if ident.startswith("m"):
            msg = r.message(_store_id(ident[1:], "message", args.id))
            if msg is None:
                raise HarnessError(f"no message {ident[1:]} in {display(args.store)}")
            if args.raw:
                sys.stdout.buffer.write(msg.raw or b"")
                return 0
            relays = r.relays(msg.id)
            if args.json:
                print(json.dumps({**msg.as_dict(raw=True),
                                  "relays": [asdict(x) for x in relays]}, indent=2))
                return 0
            show_message(msg, relays, out)
            return 0
        sid = _store_id(ident.lstrip("s"), "session", args.id)
        if args.raw:
            raise HarnessError("--raw shows a message's bytes: give m<number>")
        s = r.session(sid)
        if s is None:
            raise HarnessError(f"no session {ident.lstrip('s')} in {display(args.store)}")
        if args.json:
            print(json.dumps(_session_json(s), indent=2))
            return 0
        out.print(f"[bold]session {s.id}[/] {s.peer_ip}:{s.peer_port} -> {s.listener} "
                  f"(scenario {escape(s.scenario)}), {_day(s.started_at)}, "
                  f"ended: {escape(s.end_reason or 'open')}")
        t0 = s.started_at
        for e in s.events:
            rel = f"+{e.t - t0:8.3f}s"
            text = printable(e.text)  # a client's bytes never drive the terminal
            if e.direction == "C":
                out.print(f"[dim]{rel}[/] C: {escape(text)}")
            elif e.direction == "S":
                rule = f" [dim]\\[{escape(e.rule)}][/]" if e.rule else ""
                out.print(f"[dim]{rel}[/] S: [{_style(text)}]{escape(text)}[/]{rule}")
            else:
                out.print(f"[dim]{rel}    {escape(text)}[/]")
        for mid in s.message_ids:
            m = r.message(mid)
            if m is not None:
                out.print(f"message {m.id}: from {escape(printable(m.mail_from or '<>'))} to "
                          f"{escape(printable(', '.join(m.rcpt_tos)))}, {m.size} bytes, "
                          f"subject {escape(printable(m.subject or '-'))!s}")
    return 0


def show_message(msg: Any, relays: Sequence[Any], console: Console) -> None:
    """`harness show mID`: the envelope, the header block as sent, the parts
    and the analysis. Whatever the message's bytes, nothing raises and
    nothing reaches the terminal unescaped: bytes that are not UTF-8 and
    control characters are printed as \\xNN (harness.render)."""
    from harness.render import view

    console.print(f"[bold]message {msg.id}[/] (session {msg.session_id}, "
                  f"{_day(msg.received_at)}, {msg.size} bytes)")
    console.print(f"  from: {escape(printable(msg.mail_from or '<>'))} "
                  f"{escape(printable(' '.join(msg.mail_options)))}")
    console.print(f"  to:   {escape(printable(', '.join(msg.rcpt_tos)))}")
    raw = msg.raw or b""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("utf-8", "backslashreplace")
    console.print(escape(printable(head.replace("\r\n", "\n"))))
    shown = view(raw)
    for part in shown.parts:
        name = f" {part.filename}" if part.filename else ""
        console.print(f"[dim]part {part.index}: {escape(printable(part.content_type))}"
                      f"{escape(printable(name))}, {part.size} bytes[/]")
    for problem in shown.problems:
        console.print(f"[yellow]{escape(printable(problem))}[/]")
    analysis = msg.analysis or {}
    if analysis.get("authentication_results"):
        console.print(f"[dim]Authentication-Results:[/] "
                      f"{escape(printable(str(analysis['authentication_results'])))}")
    ndr = analysis.get("ndr")
    if ndr:
        console.print(f"[bold]{'delay notice' if ndr.get('is_delay') else 'NDR'}[/] "
                      f"({escape(str(ndr.get('format')))}): "
                      + "; ".join(escape(printable(
                          f"{r.get('final_recipient')} {r.get('action')} "
                          f"{r.get('status')} {r.get('diagnostic_text') or ''}"))
                                  for r in ndr.get("recipients", []))
                      + "  [dim](harness explain for what it means)[/]")
    for x in relays:
        console.print(f"[{'green' if x.ok else 'red'}]{escape(x.handler)}: "
                      f"{'ok' if x.ok else 'failed'}[/] {escape(printable(x.status))}")


def _explain(args: argparse.Namespace) -> int:
    from harness.explain import explain_command

    return explain_command(" ".join(args.target), as_json=args.json, console=out,
                           err_console=err)


def _evidence(args: argparse.Namespace) -> int:
    from harness.evidence import evidence_command

    return evidence_command(args, out, err)


def _predict(args: argparse.Namespace) -> int:
    from harness.predict import predict_command

    return predict_command(args, out)


def _queues(args: argparse.Namespace) -> int:
    from harness.queues import queues_command

    return queues_command(args.files, as_json=args.json, out=out, err=err)


def _probe(args: argparse.Namespace) -> int:
    from harness.probe.command import probe_command

    return probe_command(args, out, err)


def _lab(args: argparse.Namespace) -> int:
    from harness.lab.report import html_report, junit_xml, print_verdicts, verdicts_json
    from harness.lab.runner import run_lab

    if args.mta == "postfix":
        from harness.lab.postfix import PostfixLab

        reason = PostfixLab.unavailable()
    else:
        from harness.lab.exim import EximLab

        reason = EximLab.unavailable()
    if reason:
        raise HarnessError(f"the {args.mta} lab cannot run here: {reason}")
    if args.speed <= 0:
        raise HarnessError("--speed must be above 0")
    bad = [x for x in args.set if "=" not in x]
    if bad:
        raise HarnessError(f"--set takes KEY=VALUE, not {bad[0]!r}")
    for target in (args.junit, args.html):
        if target is not None and not target.parent.is_dir():
            raise HarnessError(f"cannot write {target}: no folder {target.parent}")
    names = args.scenarios or [n for n in library_names()
                               if load_file(library_dir() / f"{n}.yaml").expect is not None]
    scenarios = [load(n) for n in names]  # a bad file stops the run before anything starts
    settings = dict(x.split("=", 1) for x in args.set)
    verdicts = []
    for s in scenarios:
        if s.expect is None:
            err.print(f"[yellow]{escape(s.name)}: no expect:, skipped[/]")
            continue
        verdicts.append(run_lab(s, mta=args.mta, speed=args.speed, window=args.window,
                                settings=settings, seed=args.seed,
                                keep=args.keep / s.name if args.keep else None,
                                store=args.store,
                                    progress=None if args.quiet else
                                    (lambda m: err.print(f"[dim]{escape(m)}[/]"))))
    if args.json:
        print(verdicts_json(verdicts))
    else:
        print_verdicts(verdicts, out)
    if args.junit:
        args.junit.write_bytes(junit_xml(verdicts))
        err.print(f"JUnit XML: {args.junit}")
    if args.html:
        args.html.write_text(html_report(verdicts), encoding="utf-8")
        err.print(f"HTML report: {args.html}")
    if args.keep:  # what a run kept, and the command that lines it up
        for v in verdicts:
            if v.kept:
                err.print(f"kept {v.kept}: harness evidence {v.kept}/{v.mta_log} "
                          f"--store {v.kept}/harness.db")
    return 0 if verdicts and all(v.passed for v in verdicts) else 1


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness",
        description="SMTP Harness: a scriptable remote mail server for reproducing "
                    "delivery failures.")
    p.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", type=location, default=DEFAULT_PATH,
                        help=f"the capture store: an SQLite file (default {DEFAULT_PATH}) or "
                             "a postgresql://USER@HOST/DB URL")

    def retention_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--keep", type=int, default=None, metavar="N",
                        help="keep the newest N messages; older ones, and the sessions they "
                             "came in, are deleted as new ones arrive")
        sp.add_argument("--keep-days", type=float, default=None, metavar="D",
                        help="delete messages and sessions older than D days")
        sp.add_argument("--max-store-size", default=None, metavar="SIZE",
                        help="keep the store's data under SIZE (500MB, 2GiB): the oldest "
                             "messages go first")

    sp = sub.add_parser("serve", help="run the SMTP server")
    sp.add_argument("scenario", nargs="?", default=None,
                    help="a library scenario name or a YAML file (default: accept)")
    sp.add_argument("--listen", action="append", default=None, metavar="HOST:PORT[=SCENARIO]",
                    help="where SMTP listens (default 127.0.0.1:2525; port 0 picks one); "
                         "repeat for several listeners, each with its own scenario")
    sp.add_argument("--listen-tls", action="append", default=[],
                    metavar="HOST:PORT[=SCENARIO]",
                    help="a listener with implicit TLS (the port-465 style)")
    sp.add_argument("--proxy-protocol", action="store_true",
                    help="expect a PROXY v1/v2 header on every connection")
    sp.add_argument("--http", default="127.0.0.1:8025", metavar="HOST:PORT",
                    help="the web page and HTTP API (default 127.0.0.1:8025; off to disable); "
                         "bound beyond loopback it needs a token")
    sp.add_argument("--api-token", default=None,
                    help="the bearer token for the API (generated and printed when the API "
                         "is bound beyond loopback and none is given)")
    sp.add_argument("--config", type=Path, default=None,
                    help="a YAML file of listeners (listen, scenario, tls, proxy_protocol)")
    sp.add_argument("--seed", type=int, default=None,
                    help="seed the RNG (chance:, random delays) to replay a run")
    sp.add_argument("--quiet", action="store_true", help="do not print sessions live")
    sp.add_argument("--backlog", type=int, default=4096, metavar="N",
                    help="connections the kernel queues before they are accepted (bursts; "
                         "capped by net.core.somaxconn)")
    sp.add_argument("--workers", default="1", metavar="N",
                    help="serve the listeners from N processes (auto: one per core); "
                         "stateful scenarios (greylisting, attempt counts, limits) behave "
                         "as with one, their state shared through a file beside the store")
    sp.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="the event loop: uvloop when installed (auto), or asyncio's own")
    sp.add_argument("--forward", default=None, metavar="HOST:PORT",
                    help="pass each accepted message on to this SMTP server once stored "
                         "(a failure there is recorded; the reply given stands)")
    sp.add_argument("--dns", choices=("scenario", "system"), default="scenario",
                    help="where SPF/DKIM/DMARC look up records: the scenario's dns: zone "
                         "(default, offline) or the system resolver")
    retention_opts(sp)
    sp.add_argument("--bounce-via", default=None, metavar="HOST:PORT",
                    help="the next hop that rules' bounce: reports (DSN, Exchange NDR, "
                         "auto-reply, ARF complaint) are sent through, to the original "
                         "sender; without it they are recorded as not sent")
    store_opt(sp)

    sp = sub.add_parser("lab", help="send scenarios' test messages through a private Postfix "
                        "and judge what it did against their expect:")
    sp.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                    help="library names or files (default: every library scenario with expect:)")
    sp.add_argument("--mta", choices=("postfix", "exim"), default="postfix",
                    help="the sending MTA (default postfix; exim needs tools/install-exim.sh)")
    sp.add_argument("--speed", type=float, default=60.0,
                    help="the scenario clock runs this many times faster than the lab's "
                         "(default 60: a 1 s Postfix backoff is a minute)")
    sp.add_argument("--window", type=float, default=20.0,
                    help="longest wait per scenario for the outcome, in real seconds")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for the lab MTA (Postfix main.cf, Exim main options)")
    sp.add_argument("--seed", type=int, default=1)
    sp.add_argument("--junit", type=Path, default=None, help="write JUnit XML here")
    sp.add_argument("--html", type=Path, default=None, help="write the HTML report here")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("--store", type=location, default=None, metavar="STORE",
                    help="record the harness under test in this store (a file, or a "
                         "postgresql:// URL); each run is judged on its own sessions")
    sp.add_argument("--keep", type=Path, default=None, metavar="DIR",
                    help="keep each run in DIR/SCENARIO: the MTA's log, the harness's store "
                         "(and the collector's) and lab.json, for harness evidence")

    sp = sub.add_parser("evidence", help="the sending MTA's logs (Exchange protocol and "
                        "tracking logs, queues, message traces, Postfix, Exim) lined up with "
                        "what the harness recorded")
    sp.add_argument("files", nargs="+", metavar="FILE",
                    help="logs and exports; each file's kind is recognised from its content")
    sp.add_argument("--store", action="append", type=location, default=None,
                    help=f"a capture store, a file or a postgresql:// URL (default "
                         f"{DEFAULT_PATH}); give it twice for a "
                         "lab's harness.db and collector.db")
    sp.add_argument("--tz", default=None, metavar="ZONE",
                    help="the zone of times written without one (syslog, Exim, PowerShell "
                         "exports): UTC, +01:00, Europe/Berlin (default: this machine's)")
    sp.add_argument("--retry-interval", default=None, metavar="DURATION",
                    help="the sender's shortest configured retry interval (5m, 00:05:00): "
                         "sooner retries are flagged")
    sp.add_argument("--window", type=float, default=None, metavar="SECONDS",
                    help="the largest clock skew to look for (default 900)")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("explain", help="what a status code, a reply line or an NDR file "
                        "means, and what to check")
    sp.add_argument("target", nargs="+", metavar="CODE|REPLY|FILE",
                    help="5.7.1, '550 5.7.1 Unable to relay', or bounce.eml")
    sp.add_argument("--json", action="store_true")

    from harness.predict import add_arguments as add_predict_arguments

    sp = sub.add_parser("predict", help="when will a deferred message be retried, and when "
                        "will it bounce? (Exchange, Postfix, Exim retry models)")
    add_predict_arguments(sp)

    sp = sub.add_parser("queues", help="an Exchange queue's depth over time, from Get-Queue "
                        "exports (Export-Csv or ConvertTo-Json)")
    sp.add_argument("files", nargs="+", type=Path, metavar="FILE")
    sp.add_argument("--json", action="store_true")
    from harness.probe.command import DESCRIPTION as PROBE_DESCRIPTION
    from harness.probe.command import EPILOG as PROBE_EPILOG
    from harness.probe.command import add_arguments as add_probe_arguments

    sp = sub.add_parser("probe", help="talk to a recipient's mail servers as a sender would "
                        "(SMTPDiag): deliver, defer or bounce, and why; sends no message",
                        description=PROBE_DESCRIPTION, epilog=PROBE_EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_probe_arguments(sp)

    sp = sub.add_parser("check", help="validate scenario files")
    sp.add_argument("scenarios", nargs="+", metavar="SCENARIO")
    store_opt(sp)

    sp = sub.add_parser("scenarios", help="list the scenario library")
    sp.add_argument("--json", action="store_true")
    store_opt(sp)

    sp = sub.add_parser("prune", help="delete old captures from a store (not in use by "
                        "serve: give serve the same options to prune as it goes)")
    retention_opts(sp)
    sp.add_argument("--vacuum", action="store_true",
                    help="then rewrite the file to give the freed space back to the disk")
    store_opt(sp)

    sp = sub.add_parser("messages", help="list captured messages")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--limit", type=int, default=None)
    sp.add_argument("--rcpt", default=None, help="only messages to this recipient")
    store_opt(sp)

    sp = sub.add_parser("sessions", help="list captured sessions")
    sp.add_argument("--json", action="store_true",
                    help="with peer, HELO, envelope and every command and reply")
    sp.add_argument("--limit", type=int, default=None)
    store_opt(sp)

    sp = sub.add_parser("attempts", help="delivery attempts per sender and recipient, in order "
                                         "(the retry timeline)")
    sp.add_argument("--rcpt", metavar="ADDRESS", help="only attempts for this recipient")
    sp.add_argument("--from", dest="mail_from", metavar="ADDRESS",
                    help="only attempts from this sender")
    sp.add_argument("--json", action="store_true")
    store_opt(sp)

    sp = sub.add_parser("show", help="show a session's transcript (ID) or a message (mID)")
    sp.add_argument("id", metavar="ID")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--raw", action="store_true", help="a message's bytes as received")
    store_opt(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            with contextlib.suppress(KeyboardInterrupt):
                return _run_loop(_serve(args), args.loop)
            return 0
        handler = {"check": _check, "scenarios": _scenarios, "messages": _messages,
                   "sessions": _sessions, "attempts": _attempts, "show": _show, "lab": _lab,
                   "explain": _explain, "predict": _predict, "queues": _queues,
                   "evidence": _evidence, "probe": _probe, "prune": _prune}[args.command]
        return handler(args)
    except ScenarioError as e:
        for p in e.problems:
            err.print(escape(str(p)))
        return 1
    except HarnessError as e:
        err.print(f"harness: error: {escape(str(e))}")
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
