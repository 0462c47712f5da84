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
`analysed(mid)` until one is done. On a shared store (several writers or
hosts; always PostgreSQL) other processes queue jobs and other analysts do
them: the queue is read every POLL_EVERY seconds, jobs queued elsewhere
join `pending` (the worker claims those nobody has claimed) and jobs done
elsewhere leave it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Literal

from harness.store import is_postgres
from harness.store.db import Reader, Store

log = logging.getLogger("harness.analysis")

Mode = Literal["process", "thread"]
#: seconds before a worker that died is started again
RESTART_DELAY = 1.0
#: seconds between looks at a shared store's queue
POLL_EVERY = 0.5
#: an idle worker is told of new jobs this much later, or at once when
#: this many wait (its batch: harness.analysis_worker.BATCH)
GATHER = 0.02
GATHER_BATCH = 64
#: an idle worker, with jobs waiting that it could not claim, is asked again
#: this much later (the claims of a worker that is gone are let go then)
RECHECK = 1.0


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
        #: the idle worker told later (GATHER after new jobs, RECHECK while jobs wait)
        self._tell_later: asyncio.TimerHandle | None = None
        self._results_due: list[tuple[int, str, bool]] = []
        self._poke_scheduled = False
        self._wake = threading.Event()  # thread mode: more work, or stop
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: queued here, their commit not seen yet; and queued since the
        #: last barrier was asked for
        self._uncommitted: set[int] = set()
        self._to_commit: list[int] = []
        self._fresh = False  # committed jobs the worker has not been told of
        self._done_lately: set[int] = set()  # analysed here since the last poll
        self._poller: asyncio.Task[None] | None = None
        self._poll_reader: Reader | None = None

    # -------------------------------------------------------------- life

    async def start(self) -> None:
        """Read back what waits (after a crash, or from an older store), and
        start the worker."""
        self._loop = asyncio.get_running_loop()
        where = self.store.location

        def waiting() -> list[int]:
            with Reader(where) as r:
                return r.analysis_pending()

        await self.store.barrier()  # the queue as this store's writer made it at open
        self.pending.update(await asyncio.to_thread(waiting))
        if self.store.shared:
            self._poller = self._loop.create_task(self._poll())
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
        if self._tell_later is not None:
            self._tell_later.cancel()
            self._tell_later = None
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        if self._poll_reader is not None:
            await asyncio.to_thread(self._poll_reader.close)
            self._poll_reader = None
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

    def queued(self, mid: int, durable: asyncio.Future[None] | None = None) -> None:
        """A message's job was handed to the store (call it on the loop): the
        worker is told once the commit that carries it is done, whatever
        becomes of the session (a client that resets at once included).
        `durable`: the store's future for the message, if the caller has one."""
        self.pending.add(mid)
        self._uncommitted.add(mid)
        if durable is None and self.store.writes_in_pieces(mid):  # when it is whole
            durable = self.store.durable(mid)
        if durable is not None:
            durable.add_done_callback(lambda fut: self._committed((mid,), fut))
        else:
            self._to_commit.append(mid)
            if not self._poke_scheduled:
                self._await_commit()

    def arrived(self, mid: int) -> None:
        """A message another process stored (a worker), its job committed
        with it: the worker is told now."""
        self.pending.add(mid)
        self._poke()

    def _await_commit(self) -> None:
        """One barrier at a time for the jobs queued since the last."""
        mids, self._to_commit = self._to_commit, []
        self._poke_scheduled = True

        def done(fut: asyncio.Future[None]) -> None:
            self._poke_scheduled = False
            self._committed(mids, fut)
            if self._to_commit:
                self._await_commit()
        self.store.barrier().add_done_callback(done)

    def _committed(self, mids: Iterable[int], fut: asyncio.Future[None]) -> None:
        self._uncommitted.difference_update(mids)
        if not fut.cancelled() and fut.exception() is None:
            self._poke()

    def forget(self) -> None:
        """The store was emptied (Harness.reset): nothing waits any more."""
        self.pending.clear()
        self._uncommitted.clear()
        for futures in (*self._waiters.values(), self._idle):
            for fut in futures:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()
        self._idle.clear()

    def _poke(self) -> None:
        """Tell the worker there may be jobs to claim (a busy one: when it
        is idle again). An idle process worker is told GATHER seconds after
        the first new job, or at once when a batch of them waits: one claim,
        one read and one result write per batch, not per message, while
        messages keep coming (one at a time from a single client)."""
        if self.mode == "thread":
            self._wake.set()
        elif self._worker_idle and self._proc is not None and self._proc.stdin is not None:
            if len(self.pending) >= GATHER_BATCH:
                self._tell_worker()
            elif self._tell_later is None:
                assert self._loop is not None
                self._tell_later = self._loop.call_later(GATHER, self._tell_worker)
        else:
            self._fresh = True

    def _tell_worker(self) -> None:
        if self._tell_later is not None:
            self._tell_later.cancel()
            self._tell_later = None
        if self._worker_idle and self._proc is not None and self._proc.stdin is not None:
            self._worker_idle = False
            self._fresh = False
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._proc.stdin.write(b"more\n")

    def _result(self, line: str) -> None:
        """One result line of the worker: written with the store's writer,
        with the others of this turn of the loop (one statement for them)."""
        mid_text, is_ndr, analysis = line.split("\t", 2)
        self._results_due.append((int(mid_text), analysis.rstrip("\n"), is_ndr == "1"))
        if len(self._results_due) == 1:
            assert self._loop is not None
            self._loop.call_soon(self._write_results)

    def _write_results(self) -> None:
        due, self._results_due = self._results_due, []
        if not due:
            return
        self.store.message_analyses(due)
        for mid, _, _ in due:
            self.analysed_count += 1
            self._done_lately.add(mid)
            self._done(mid)
        self._changed()

    def not_stored(self, mid: int) -> None:
        """Message `mid` was refused by the store (a full disk): its job
        went with it, nothing waits for it."""
        self._done(mid)

    def _done(self, mid: int) -> None:
        self.pending.discard(mid)
        self._uncommitted.discard(mid)
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
        from harness.analysis_worker import STORE_ENV

        where = self.store.location
        env = None
        if is_postgres(where):  # the URL (its password) stays off the process list
            env = {**os.environ, STORE_ENV: str(where)}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "harness.analysis_worker", "-" if env else str(where),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
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
                if self._fresh:  # committed while it was looking
                    self._poke()
                elif self.pending and self._tell_later is None:
                    # Jobs wait that it could not claim: another worker's,
                    # which may be gone (a worker of a killed server, its
                    # claims let go once it is): asked again in a while.
                    assert self._loop is not None
                    self._tell_later = self._loop.call_later(RECHECK, self._tell_worker)
                continue
            try:
                self._result(line)
            except Exception as e:  # a line we cannot read: kept, the rest goes on
                self.errors.append(e)
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

    # ------------------------------------------------- a shared store's queue

    async def _poll(self) -> None:
        """Every POLL_EVERY seconds: the queue as the store has it. Jobs
        that left it (analysed by another host's worker) leave `pending`;
        jobs other writers queued join it; the worker is told to claim."""
        while True:
            await asyncio.sleep(POLL_EVERY)
            before = self.pending - self._uncommitted
            done_before, self._done_lately = self._done_lately, set()
            try:
                waiting = set(await asyncio.to_thread(self._waiting))
            except Exception as e:  # the store out of reach: looked at again later
                log.debug("analysis queue not read: %s", e)
                continue
            gone = (before - waiting) & self.pending
            new = waiting - self.pending - done_before - self._done_lately
            for mid in gone:
                self._done(mid)
            self.pending.update(new)
            if waiting:
                self._poke()
            if gone or new:
                self._changed()

    def _waiting(self) -> list[int]:
        if self._poll_reader is None:
            self._poll_reader = Reader(self.store.location)
        try:
            return self._poll_reader.analysis_pending()
        except Exception:
            self._poll_reader.close()
            self._poll_reader = None
            raise

    # ------------------------------------------------------- thread worker

    def _thread_main(self) -> None:
        from harness.analysis_worker import Worker

        worker = Worker(self.store.location)
        loop = self._loop
        assert loop is not None
        try:
            while not self._stopping:
                self._wake.clear()
                lines = list(worker.batch())
                if lines:
                    loop.call_soon_threadsafe(self._results, lines)
                    continue
                # (jobs it could not claim: another worker's, looked at again
                # in a while, as for the process worker)
                self._wake.wait(RECHECK if self.pending else None)
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
        self._write_results()
