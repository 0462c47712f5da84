"""Keeps stored messages analysed. The analysis queue is a table of the store:
a message's job is written in the commit that stores it, so a crash, a
client's reset or a restart never loses one; at start the queue is read
back. A worker (harness/analysis_worker.py) works through it from the
store's bytes: in a process of its own under `harness serve`, where the
parsing cannot take the interpreter from the SMTP conversations, or in a
thread for the Python `Harness` (it starts at once and tests send little).
Its results come back here and are written by the store's writer, with
everything else; nothing of a message is held in this process for it.

`pending` is the ids still waiting; `idle()` waits until there are none,
`analysed(mid)` until one is done."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
from collections.abc import Callable
from typing import Literal

from harness.store.db import Reader, Store

log = logging.getLogger("harness.analysis")

Mode = Literal["process", "thread"]
#: seconds before a worker that died is started again
RESTART_DELAY = 1.0


class Analyst:
    def __init__(self, store: Store, *, mode: Mode = "process",
                 errors: list[BaseException] | None = None,
                 on_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self.mode = mode
        self.errors = errors if errors is not None else []
        self.on_change = on_change
        self.pending: set[int] = set()
        self.analysed_count = 0
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._idle: list[asyncio.Future[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._worker_idle = False
        self._poke_scheduled = False
        self._wake = threading.Event()  # thread mode: more work, or stop
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -------------------------------------------------------------- life

    async def start(self) -> None:
        """Read back what waits (after a crash, or from an older store), and
        start the worker."""
        self._loop = asyncio.get_running_loop()
        path = self.store.path

        def waiting() -> list[int]:
            with Reader(path) as r:
                return r.analysis_pending()

        await self.store.barrier()  # the queue as this store's writer made it at open
        self.pending.update(await asyncio.to_thread(waiting))
        if self.mode == "process":
            await self._spawn()
        else:
            self._thread = threading.Thread(target=self._thread_main, name="harness-analysis",
                                            daemon=True)
            self._thread.start()

    async def stop(self, *, drain: float = 0.0) -> None:
        """Stop the worker, after up to `drain` seconds for what waits."""
        if drain and self.pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.idle(), drain)
        self._stopping = True
        if self._proc is not None:
            proc = self._proc
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._thread is not None:
            self._wake.set()
            await asyncio.to_thread(self._thread.join, 10)

    # ----------------------------------------------------------- the queue

    def queued(self, mid: int) -> None:
        """A message's job was handed to the store (call it on the loop): the
        worker is told once the commit that carries it is done, whatever
        becomes of the session (a client that resets at once included)."""
        self.pending.add(mid)
        if self.store.writes_in_pieces(mid):  # a large message: when it is whole
            self.store.durable(mid).add_done_callback(self._committed)
        elif not self._poke_scheduled:
            self._poke_scheduled = True
            self.store.barrier().add_done_callback(self._committed)

    def arrived(self, mid: int) -> None:
        """A message another process stored (a worker), its job committed
        with it: the worker is told now."""
        self.pending.add(mid)
        self._poke()

    def _committed(self, fut: asyncio.Future[None]) -> None:
        self._poke_scheduled = False
        if not fut.cancelled() and fut.exception() is None:
            self._poke()

    def forget(self) -> None:
        """The store was emptied (Harness.reset): nothing waits any more."""
        self.pending.clear()
        for futures in (*self._waiters.values(), self._idle):
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()
        self._idle.clear()

    def _poke(self) -> None:
        if self.mode == "thread":
            self._wake.set()
        elif self._worker_idle and self._proc is not None and self._proc.stdin is not None:
            self._worker_idle = False
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._proc.stdin.write(b"more\n")

    def _result(self, line: str) -> None:
        """One result line of the worker: written with the store's writer."""
        mid_text, is_ndr, analysis = line.split("\t", 2)
        mid = int(mid_text)
        self.store.message_analysis(mid, analysis.rstrip("\n"), is_ndr == "1")
        self.analysed_count += 1
        self._done(mid)

    def not_stored(self, mid: int) -> None:
        """Message `mid` was refused by the store (a full disk): its job
        went with it, nothing waits for it."""
        self._done(mid)

    def _done(self, mid: int) -> None:
        self.pending.discard(mid)
        for fut in self._waiters.pop(mid, ()):
            if not fut.done():
                fut.set_result(None)
        if not self.pending:
            for fut in self._idle:
                if not fut.done():
                    fut.set_result(None)
            self._idle.clear()

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception as e:  # a waiter must not stop the analyses
                self.errors.append(e)

    async def idle(self) -> None:
        """Until no stored message waits for its analysis."""
        if not self.pending:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._idle.append(fut)
        await fut

    async def analysed(self, mid: int) -> None:
        """Until message `mid` has its analysis (at once if it is not waiting)."""
        if mid not in self.pending:
            return
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.setdefault(mid, []).append(fut)
        await fut

    # ------------------------------------------------------ process worker

    async def _spawn(self) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "harness.analysis_worker", str(self.store.path),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=1 << 26)  # a result line can be long (an NDR's every recipient)
        self._worker_idle = False
        self._reader = asyncio.get_running_loop().create_task(self._read(self._proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                break
            line = raw.decode("utf-8")
            if line == "idle\n":
                self._worker_idle = True
                if self.pending:  # queued while it was looking
                    self._poke()
                continue
            try:
                self._result(line)
            except Exception as e:  # a line we cannot read: kept, the rest goes on
                self.errors.append(e)
            self._changed()
        code = await proc.wait()
        if self._stopping:
            return
        # The worker died (a crash, the OOM killer): the queue is in the
        # store; a new worker starts from its beginning.
        error = RuntimeError(f"the analysis worker exited with {code}; starting another")
        log.error("%s", error)
        self.errors.append(error)
        await asyncio.sleep(RESTART_DELAY)
        if not self._stopping:
            await self._spawn()

    # ------------------------------------------------------- thread worker

    def _thread_main(self) -> None:
        from harness.analysis_worker import Worker

        worker = Worker(self.store.path)
        loop = self._loop
        assert loop is not None
        try:
            while not self._stopping:
                self._wake.clear()
                lines = list(worker.batch())
                if lines:
                    loop.call_soon_threadsafe(self._results, lines)
                    continue
                self._wake.wait()
        except Exception as e:  # the store went away under it: said, not raised
            loop.call_soon_threadsafe(self.errors.append, e)
        finally:
            worker.close()

    def _results(self, lines: list[str]) -> None:
        for line in lines:
            try:
                self._result(line)
            except Exception as e:
                self.errors.append(e)
        self._changed()
