"""`harness serve --workers N`: N processes serve the same listeners.

Each worker is a process of its own (spawned, not forked: the primary has
threads) that listens on every listener's address with SO_REUSEPORT, so
the kernel spreads connections over them, and runs the SMTP sessions with
its own event loop, its own store writer (the store in shared mode: ids
reserved in blocks, several writers on one database) and the scenario's
shared book (harness.state), so that stateful scenarios decide exactly as
one process would.

The primary process serves no SMTP. It holds one context per listener (a
mirror: the same scenario, control surface and watchers), which the API,
the page and the console use as with one process:

- what a worker records (transcript lines, messages stored, sessions
  ended, connections open) is relayed to the primary in batches, one per
  turn of the worker's loop, and handed to the mirror's watchers;
- a change through the mirror's control surface (switch scenario, add or
  remove a rule, reset) is passed on to every worker, with the TLS
  certificates the primary made for it, so every worker presents the same
  certificate and lab CA;
- a worker that dies is started again (its clients' connections are lost,
  as with any crashed server; what it acknowledged is in the store).

The channel is a socketpair per worker carrying length-prefixed pickles:
both ends are our own processes."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.records import TranscriptLine
from harness.scenario.engine import Engine
from harness.scenario.model import Scenario
from harness.smtp import tls
from harness.smtp.listener import ListenerContext

#: a worker's relay stops sending transcript lines (it counts them) while
#: this much waits unread by the primary: a stalled console never grows a
#: worker's memory
RELAY_LIMIT = 8 << 20
#: seconds a worker has to start listening
START_TIMEOUT = 60.0
#: seconds a worker has to finish its sessions when stopped
STOP_TIMEOUT = 15.0
#: how long a change through the API waits for every worker to make it
CONTROL_TIMEOUT = 10.0
#: how long a worker's store is given to say it can write (the primary's /readyz)
PROBE_TIMEOUT = 2.0
_HEADER = struct.Struct("!I")


@dataclass(frozen=True)
class ListenerPlan:
    host: str
    port: int
    implicit_tls: bool = False
    proxy_protocol: bool = False
    forward: tuple[str, int] | None = None


@dataclass(frozen=True)
class WorkerPlan:
    """What a worker needs to serve (picklable)."""

    index: int
    listeners: tuple[ListenerPlan, ...]
    #: per listener: (the base scenario, the scenario served now)
    scenarios: tuple[tuple[Scenario, Scenario], ...]
    store: str
    seed: int | None
    dns: str
    bounce_via: tuple[str, int] | None
    backlog: int
    loop: str
    certificates: dict[Any, tls.Material]
    ca_dir: str | None
    #: relay each transcript line to the primary (someone reads them there:
    #: its console, or the page's live feed); changed by a "watch" message
    watch: bool = True


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    head = await reader.readexactly(_HEADER.size)
    (size,) = _HEADER.unpack(head)
    return pickle.loads(await reader.readexactly(size))


def _apply(ctx: ListenerContext, operation: str, args: tuple[Any, ...]) -> None:
    """A change the primary made through its control surface, made here."""
    if operation == "use":
        ctx.use(args[0])
    elif operation == "add_rule":
        ctx.add_rule(args[0], position=args[1])
    elif operation == "remove_rule":
        ctx.remove_rule(args[0])
    elif operation == "reset":
        ctx.reset(to_base=args[0], scenario=args[1])
    else:  # pragma: no cover - the primary sends only the above
        raise HarnessError(f"unknown control operation {operation!r}")


# ------------------------------------------------------------- the worker


class _Relay:
    """What this worker records, sent to the primary once per loop turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.pending: list[tuple[Any, ...]] = []
        self.scheduled = False
        self.dropped = 0
        self.watching = True

    def send(self, item: tuple[Any, ...]) -> None:
        self.pending.append(item)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def line(self, index: int) -> Callable[[TranscriptLine], None]:
        def observe(line: TranscriptLine) -> None:
            if not self.watching:  # nobody reads them at the primary
                return
            if self.writer.transport.get_write_buffer_size() > RELAY_LIMIT:
                self.dropped += 1
                return
            self.send(("line", index, line))
        return observe

    def tell(self, kind: str, index: int) -> Callable[[int], None]:
        def told(ident: int) -> None:
            self.send((kind, index, ident))
        return told

    def flush(self) -> None:
        self.scheduled = False
        if self.pending and not self.writer.is_closing():
            items, self.pending = self.pending, []
            if self.dropped:
                items.append(("dropped", self.dropped))
                self.dropped = 0
            self.writer.write(_frame(("events", items)))


def worker_main(plan: WorkerPlan, sock: socket.socket) -> None:
    """A worker process's entry point."""
    # Ctrl-C (and a TERM to the group: `timeout`, a service manager) reaches
    # the whole process group: the primary stops its workers, which also end
    # when its channel closes (the primary killed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    runner: Callable[[Any], Any] = asyncio.run
    if plan.loop != "asyncio":
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            if plan.loop == "uvloop":
                raise
    runner(_work(plan, sock))


async def _work(plan: WorkerPlan, sock: socket.socket) -> None:
    from harness.smtp.runner import Listener, start_listener
    from harness.state.shared import open_shared
    from harness.store.db import Store

    tls.adopt(plan.certificates)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    relay = _Relay(writer)
    relay.watching = plan.watch
    store = Store(plan.store, shared=True)
    loop = asyncio.get_running_loop()

    def state() -> str | None:
        return None if store.error is None else str(store.error)

    def health(line: str) -> None:  # from the store's writer thread: to the console
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: relay.send(("health", line, state())))
    store.on_health = health

    async def probe() -> None:  # the primary asks (its /readyz): can it write now?
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.probe(), PROBE_TIMEOUT)
        relay.send(("store", state()))
    probes: set[asyncio.Task[None]] = set()
    await asyncio.to_thread(store.open)
    shared = await asyncio.to_thread(open_shared, plan.store)
    listeners: list[Listener] = []
    try:
        for i, (lp, (base, current)) in enumerate(zip(plan.listeners, plan.scenarios,
                                                      strict=True)):
            ctx = ListenerContext(engine=Engine(base, seed=plan.seed), store=store,
                                  implicit_tls=lp.implicit_tls,
                                  proxy_protocol=lp.proxy_protocol,
                                  ca_dir=Path(plan.ca_dir) if plan.ca_dir else None,
                                  dns=plan.dns, shared=shared, queue_analysis=True,
                                  worker=f"worker {plan.index}, pid {os.getpid()}")
            if current is not base:
                ctx.engine.use(current)  # rules added since the last switch
            if lp.forward is not None:
                from harness.smtp.handlers import Forward

                ctx.handlers.append(Forward(*lp.forward, local_hostname=base.server.hostname))
            ctx.bounce_via = plan.bounce_via
            ctx.observers.append(relay.line(i))
            ctx.on_message.append(relay.tell("message", i))
            ctx.on_session_end.append(relay.tell("session_end", i))
            listeners.append(await start_listener(ctx, lp.host, lp.port, backlog=plan.backlog,
                                                  reuse_port=True))
        relay.send(("ready", os.getpid()))
        counts = asyncio.get_running_loop().create_task(_count_connections(listeners, relay))
        try:
            while True:
                try:
                    message = await _read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break  # the primary is gone: stop
                if message[0] == "stop":
                    break
                if message[0] == "watch":
                    relay.watching = bool(message[1])
                    continue
                if message[0] == "probe":
                    probing = loop.create_task(probe())
                    probes.add(probing)
                    probing.add_done_callback(probes.discard)
                    continue
                _, seq, index, operation, args, certificates = message
                tls.adopt(certificates)
                await asyncio.to_thread(_apply, listeners[index].ctx, operation, args)
                relay.send(("applied", seq))
        finally:
            counts.cancel()
    finally:
        for listener in listeners:
            await listener.close()
        relay.flush()
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        await asyncio.to_thread(store.close)
        await asyncio.to_thread(shared.close)
        writer.close()


async def _count_connections(listeners: list[Any], relay: _Relay) -> None:
    """The connections open here, told to the primary when they change
    (at most twice a second)."""
    last: list[int] = [-1] * len(listeners)
    while True:
        for i, listener in enumerate(listeners):
            n = len(listener.ctx.active)
            if n != last[i]:
                last[i] = n
                relay.send(("active", i, n))
        await asyncio.sleep(0.5)


# ------------------------------------------------------------- the primary


@dataclass
class _Worker:
    index: int
    process: Any  # multiprocessing.Process (spawn context)
    writer: asyncio.StreamWriter
    ready: asyncio.Future[int]
    reading: asyncio.Task[None]
    #: the last control change it has made (numbered by the primary); a
    #: worker started after change n has it from its plan
    applied: int = 0


class Farm:
    """The primary's side: starts the workers, relays, restarts the dead."""

    def __init__(self, contexts: list[ListenerContext], listeners: list[ListenerPlan], *,
                 count: int, store: str, seed: int | None, dns: str,
                 bounce_via: tuple[str, int] | None, backlog: int, loop: str,
                 ca_dir: str | None, say: Callable[[str], None], watch: bool = True) -> None:
        self.contexts, self.count, self.say = contexts, count, say
        self.watching = watch
        self.template = dict(store=store, seed=seed, dns=dns, bounce_via=bounce_via,
                             backlog=backlog, loop=loop, ca_dir=ca_dir)
        self.listeners = list(listeners)
        self.workers: dict[int, _Worker] = {}
        self.restarts = 0
        self._stopping = False
        self._holders: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._mp = multiprocessing.get_context("spawn")
        self._sent = 0  # control changes numbered, 1, 2, ...
        self._sent_lock = threading.Lock()
        #: woken when a worker reports a change made or its store's state
        self._waiters: list[asyncio.Future[None]] = []
        #: why a worker's store cannot write, by worker (gone when it can)
        self.store_problems: dict[int, str] = {}
        for i, ctx in enumerate(contexts):
            ctx.on_control.append(self._relay_control(i))
            ctx.control_done = self.applied
            ctx.remote_health = self.store_health

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [(lp.host, lp.port) for lp in self.listeners]

    async def start(self) -> None:
        self._reserve_ports()
        for w in range(self.count):
            await self._spawn(w)
        for worker in list(self.workers.values()):
            await self._wait_ready(worker)

    def _reserve_ports(self) -> None:
        """A listener on port 0: the primary picks the port (a socket bound
        with SO_REUSEPORT, never listening, held while the farm runs) and
        every worker listens on it."""
        for i, lp in enumerate(self.listeners):
            family = socket.AF_INET6 if ":" in lp.host else socket.AF_INET
            holder = socket.socket(family, socket.SOCK_STREAM)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                holder.bind((lp.host, lp.port))
            except OSError as e:
                holder.close()
                raise HarnessError(f"cannot listen on {lp.host}:{lp.port}: {e.strerror}"
                                   ) from e
            self._holders.append(holder)
            port = holder.getsockname()[1]
            self.listeners[i] = ListenerPlan(lp.host, port, lp.implicit_tls, lp.proxy_protocol,
                                             lp.forward)
            self.contexts[i].name = f"{lp.host}:{port}"

    def _plan(self, index: int) -> WorkerPlan:
        return WorkerPlan(
            index=index, listeners=tuple(self.listeners),
            scenarios=tuple((c.base, c.scenario) for c in self.contexts),
            certificates=tls.made(), watch=self.watching,
            **self.template)  # type: ignore[arg-type]

    async def _spawn(self, index: int) -> _Worker:
        mine, theirs = socket.socketpair()
        process = self._mp.Process(target=worker_main, args=(self._plan(index), theirs),
                                   name=f"harness-worker-{index}", daemon=True)
        process.start()
        theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[int] = loop.create_future()
        worker = _Worker(index, process, writer, ready,
                         loop.create_task(self._read(index, reader, ready)), self._sent)
        self.workers[index] = worker
        loop.add_reader(process.sentinel, self._ended, worker)
        return worker

    async def _wait_ready(self, worker: _Worker) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError) as e:
            raise HarnessError(f"worker {worker.index} did not start "
                               f"(exit code {worker.process.exitcode})") from e

    async def _read(self, index: int, reader: asyncio.StreamReader,
                    ready: asyncio.Future[int]) -> None:
        try:
            while True:
                _, items = await _read_frame(reader)
                for item in items:
                    self._event(index, item, ready)
        except (asyncio.IncompleteReadError, ConnectionError):
            if not ready.done():
                ready.set_exception(ConnectionError(f"worker {index} closed its channel"))

    def _event(self, worker: int, item: tuple[Any, ...], ready: asyncio.Future[int]) -> None:
        kind = item[0]
        if kind == "applied":
            self.workers[worker].applied = max(self.workers[worker].applied, item[1])
            self._wake()
            return
        if kind == "ready":
            if not ready.done():
                ready.set_result(item[1])
            return
        if kind in ("health", "store"):  # its store cannot write, or writes again
            if kind == "health":
                self.say(f"worker {worker}: {item[1]}")
            if item[-1] is None:
                self.store_problems.pop(worker, None)
            else:
                self.store_problems[worker] = item[-1]
            self._wake()
            return
        if kind == "dropped":
            self.say(f"worker {worker}: {item[1]:,} transcript line(s) not shown "
                     "(the console could not keep up)")
            return
        ctx = self.contexts[item[1]]
        if kind == "line":
            for observer in ctx.observers:
                try:
                    observer(item[2])
                except Exception as e:  # a watcher must not stop the relay
                    ctx.errors.append(e)
        elif kind == "message":
            for cb in ctx.on_message:
                cb(item[2])
            if ctx.analyst is not None:
                ctx.analyst.arrived(item[2])
        elif kind == "session_end":
            for cb in ctx.on_session_end:
                cb(item[2])
        elif kind == "active":
            ctx.remote_active[worker] = item[2]
        ctx.changed()

    def _ended(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        for ctx in self.contexts:
            ctx.remote_active.pop(worker.index, None)
        if self._stopping or self.workers.get(worker.index) is not worker:
            return
        self.restarts += 1
        task = loop.create_task(self._restart(worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, dead: _Worker) -> None:
        # the sentinel closes as the process exits, a moment before it can be
        # reaped: its exit status is waited for off the loop
        await asyncio.to_thread(dead.process.join, 5)
        code = dead.process.exitcode
        how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        self.say(f"worker {dead.index} (pid {dead.process.pid}) ended ({how}); "
                 "starting it again")
        if self._stopping:
            return
        worker = await self._spawn(dead.index)
        try:
            await self._wait_ready(worker)
        except HarnessError as e:
            self.say(str(e))

    def _relay_control(self, index: int) -> Callable[[str, tuple[Any, ...]], None]:
        def relay(operation: str, args: tuple[Any, ...]) -> None:
            self._control(index, operation, args)
        return relay

    def _control(self, index: int, operation: str, args: tuple[Any, ...]) -> None:
        """A change through a mirror's control surface: to every worker
        (possibly from another thread: the API makes certificates off the
        loop)."""
        with self._sent_lock:
            self._sent += 1
            frame = _frame(("control", self._sent, index, operation, args, tls.made()))
        loop = self.contexts[index].loop
        for worker in list(self.workers.values()):
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(_write, worker.writer, frame)

    def watch(self, on: bool) -> None:
        """Whether the workers relay every transcript line (the console
        prints them, or the page's live feed is open) or only messages and
        sessions' ends: a line relayed costs both sides a pickle."""
        if on == self.watching:
            return
        self.watching = on
        frame = _frame(("watch", on))
        for worker in self.workers.values():
            _write(worker.writer, frame)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def store_health(self) -> list[str]:
        """What keeps the workers' stores from writing (their /readyz
        part): those that could not are asked again, with one small write
        each, and answer within PROBE_TIMEOUT."""
        if not self.store_problems:
            return []
        loop = asyncio.get_running_loop()
        asked = {w for w in self.store_problems if w in self.workers}
        for w in asked:
            _write(self.workers[w].writer, _frame(("probe",)))
        deadline = loop.time() + PROBE_TIMEOUT + 0.5
        while asked & self.store_problems.keys() and loop.time() < deadline:
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
        return [f"worker {w}: {p}" for w, p in sorted(self.store_problems.items())]

    async def applied(self) -> None:
        """Until every running worker has made the changes sent so far (a
        change through the API is answered once all of them serve it), at
        most CONTROL_TIMEOUT: a worker that died is started again with them."""
        target = self._sent
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONTROL_TIMEOUT
        while any(w.applied < target and w.process.is_alive()
                  for w in self.workers.values()):
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            try:
                await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError:
                return

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self.workers.values()]

    async def stop(self) -> None:
        self._stopping = True
        loop = asyncio.get_running_loop()
        for worker in self.workers.values():
            _write(worker.writer, _frame(("stop",)))
        for worker in self.workers.values():
            loop.remove_reader(worker.process.sentinel)
            done = await asyncio.to_thread(worker.process.join, STOP_TIMEOUT)
            del done
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 5)
            worker.reading.cancel()
            worker.writer.close()
        for holder in self._holders:
            holder.close()


def _write(writer: asyncio.StreamWriter, frame: bytes) -> None:
    if not writer.is_closing():
        writer.write(frame)
