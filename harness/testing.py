"""`Harness`: the server in a background thread, for tests and scripts.

    with Harness("greylisting") as h:
        smtplib.SMTP(h.host, h.port)...
        h.attempts(rcpt="user@lab.test")

SMTP runs on an ephemeral loopback port in the harness's own event loop (a
thread), with a temporary store unless one is given. Queries read the store
after the writer has committed everything queued so far."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from harness.errors import HarnessError
from harness.scenario.engine import Engine
from harness.scenario.library import load
from harness.scenario.loader import load_file, load_text
from harness.scenario.model import Scenario
from harness.smtp.runner import Listener, start_listener
from harness.smtp.server import ListenerContext
from harness.store.db import Attempt, MessageRecord, Reader, SessionRecord, Store

T = TypeVar("T")


def _scenario(spec: str | Path | Scenario | None) -> Scenario:
    if spec is None:
        return load(None)
    if isinstance(spec, Scenario):
        return spec
    if isinstance(spec, Path):
        return load_file(spec)
    if "\n" in spec:
        return load_text(spec, "<text>", default_name="inline")
    return load(spec)


class Harness:
    """A running SMTP Harness; use as a context manager (sync)."""

    def __init__(self, scenario: str | Path | Scenario | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, store: str | Path | None = None,
                 seed: int | None = None, clock: Callable[[], float] | None = None,
                 implicit_tls: bool = False, proxy_protocol: bool = False) -> None:
        self.scenario = _scenario(scenario)
        self._bind = (host, port)
        self._tmp: str | None = None
        if store is None:
            self._tmp = tempfile.mkdtemp(prefix="harness-")
            store = Path(self._tmp) / "harness.db"
        self.store_path = Path(store)
        self.seed = seed
        engine_kw: dict[str, Any] = {"seed": seed}
        if clock is not None:
            engine_kw["clock"] = clock
        self.engine = Engine(self.scenario, **engine_kw)
        self.store = Store(self.store_path)
        self.ctx = ListenerContext(engine=self.engine, store=self.store,
                                   implicit_tls=implicit_tls, proxy_protocol=proxy_protocol,
                                   ca_dir=self.store_path.parent)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        self.host, self.port = host, port

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Harness:
        self.store.open()
        started: Future[None] = Future()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._listener = self._loop.run_until_complete(
                    start_listener(self.ctx, *self._bind))
            except BaseException as e:
                started.set_exception(e)
                return
            started.set_result(None)
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="harness-loop", daemon=True)
        self._thread.start()
        try:
            started.result(timeout=10)
        except BaseException:
            self.store.close()
            raise
        assert self._listener is not None
        self.host, self.port = self._listener.address
        return self

    def stop(self) -> None:
        if self._loop is not None and self._listener is not None:
            self._call(self._listener.close(), timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(10)
            self._loop.close()
            self._loop = None
        self.store.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> Harness:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # -- control ----------------------------------------------------------

    def use(self, scenario: str | Path | Scenario) -> None:
        """Switch scenario for new decisions (counters and state carry on)."""
        self.scenario = _scenario(scenario)
        self.engine.use(self.scenario)
        self.ctx.prepare_tls()

    def reset(self) -> None:
        self.engine.reset()

    @property
    def errors(self) -> list[BaseException]:
        return self.ctx.errors

    # -- queries ----------------------------------------------------------

    def _read(self, fn: Callable[[Reader], T]) -> T:
        self.store.sync_barrier()
        if self.store.error is not None:
            raise HarnessError(f"store write failed: {self.store.error}")
        with Reader(self.store_path) as r:
            return fn(r)

    def messages(self, *, rcpt: str | None = None, raw: bool = True) -> list[MessageRecord]:
        return self._read(lambda r: r.messages(rcpt=rcpt, raw=raw))

    def sessions(self) -> list[SessionRecord]:
        return self._read(lambda r: r.sessions(with_events=True))

    def attempts(self, *, rcpt: str | None = None, mail_from: str | None = None
                 ) -> list[Attempt]:
        return self._read(lambda r: r.attempts(rcpt=rcpt, mail_from=mail_from))

    def wait_idle(self, timeout: float = 10) -> None:
        """Wait until no connection is being served (sessions recorded as ended)."""
        async def idle() -> None:
            while self.ctx.active:
                tasks = [p.task for p in self.ctx.active if p.task is not None]
                if not tasks:
                    break
                await asyncio.wait(tasks)
        self._call(asyncio.wait_for(idle(), timeout), timeout + 1)
