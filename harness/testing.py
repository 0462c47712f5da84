"""`Harness`: the server in a background thread, for tests and scripts.

    with Harness("greylisting") as h:
        with smtplib.SMTP(h.host, h.port, local_hostname="client.test") as c: ...
        msg = h.wait_for_message(rcpt="user@lab.test", timeout=5)
        h.verify(rule="greylist", count=1)

SMTP runs on an ephemeral loopback port in the harness's own event loop (a
thread), with a temporary store unless one is given (a path, or a
postgresql:// URL: a database other hosts may share, so the harness then
reads back, and `reset()` deletes, only the sessions it served itself, and
what they left); `async with` works too
(the server still has its own loop, so a test's loop never waits on it).
`handlers=` passes each accepted message on, once stored, to aiosmtpd-style
handlers (`handle_DATA(server, session, envelope)`), e.g. aiosmtpd's Proxy.
Queries read the store after the writer has committed everything queued.
Waits wake on the server's own "something was recorded" events (a
condition variable), never by sleeping and polling. Errors raised inside the
server are collected and re-raised by `check()` (and at `stop()`)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from harness.analyst import Analyst
from harness.errors import HarnessError
from harness.scenario.engine import Engine
from harness.scenario.library import load
from harness.scenario.loader import build_rule, load_file, load_text
from harness.scenario.model import Scenario
from harness.smtp.listener import JournalEntry, ListenerContext
from harness.smtp.runner import Listener, close_connections, start_listener
from harness.store import Location, is_postgres
from harness.store.db import Attempt, MessageRecord, Reader, Relay, SessionRecord, Store

T = TypeVar("T")


class HarnessAssertionError(AssertionError):
    """An expectation about what the harness saw failed; the message says what
    was expected, what happened, the transcripts and the near misses."""


class HarnessServerError(HarnessError):
    """Errors raised inside the server while serving, re-raised in the test."""

    def __init__(self, errors: list[BaseException]) -> None:
        self.errors = list(errors)
        lines = [f"  {type(e).__name__}: {e}" for e in self.errors]
        super().__init__(f"{len(self.errors)} error(s) inside the harness while serving:\n"
                         + "\n".join(lines))


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


class _OwnStore(Store):
    """A store that remembers the sessions this harness started (a shared
    store holds other writers' too)."""

    def __init__(self, location: Location) -> None:
        super().__init__(location)
        self.started: set[int] = set()

    def session_started(self, *, listener: str, peer_ip: str, peer_port: int,
                        scenario: str, t: float | None = None) -> int:
        sid = super().session_started(listener=listener, peer_ip=peer_ip,
                                      peer_port=peer_port, scenario=scenario, t=t)
        self.started.add(sid)
        return sid


class Harness:
    """A running SMTP Harness; use as a context manager (sync or async)."""

    def __init__(self, scenario: str | Path | Scenario | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, store: Location | None = None,
                 seed: int | None = None, clock: Callable[[], float] | None = None,
                 implicit_tls: bool = False, proxy_protocol: bool = False,
                 keep_store: bool = False, http: bool = False,
                 api_token: str | None = None, handlers: Sequence[Any] = (),
                 bounce_via: str | tuple[str, int] | None = None) -> None:
        first = _scenario(scenario)
        self._bind = (host, port)
        self._tmp: str | None = None
        if store is None or is_postgres(store):  # (a database: a folder for the CA)
            self._tmp = tempfile.mkdtemp(prefix="harness-")
        if store is None:
            store = Path(self._tmp or ".") / "harness.db"
        #: the store: an SQLite file's Path, or a postgresql:// URL
        self.store_location: Location = store if is_postgres(store) else Path(store)
        self.keep_store = keep_store
        self.seed = seed
        self._offset = 0.0
        self._clock = clock or time.time
        self.engine = Engine(first, seed=seed, clock=self.now)
        self.store = _OwnStore(self.store_location)
        ca_dir = Path(self._tmp) if is_postgres(store) and self._tmp else Path(store).parent
        self.ctx = ListenerContext(engine=self.engine, store=self.store,
                                   implicit_tls=implicit_tls, proxy_protocol=proxy_protocol,
                                   ca_dir=ca_dir,
                                   handlers=list(handlers))
        # analyses in a thread: starts at once, and tests send little
        self.analyst = Analyst(self.store, mode="thread", errors=self.ctx.errors)
        self.ctx.analyst = self.analyst
        if bounce_via is not None:  # where rules' bounce: reports go (HOST:PORT)
            from harness.smtp.runner import parse_hostport

            self.ctx.bounce_via = (bounce_via if isinstance(bounce_via, tuple)
                                   else parse_hostport(bounce_via, 25))
        self._changed = threading.Condition()
        self._generation = 0
        self.ctx.on_change.append(self._notify)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        self._rule_seq = 0
        self.host, self.port = host, port
        self._http = http
        self._api_token = api_token
        self._api: Any = None
        self.http_url: str | None = None  # the web page and API, with http=True

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Harness:
        self.store.open()
        started: Future[None] = Future()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self.analyst.start())
                self.analyst.on_change = self._notify
                self._listener = self._loop.run_until_complete(
                    start_listener(self.ctx, *self._bind))
                if self._http:
                    from harness.api.app import ApiServer

                    self._api = ApiServer([self.ctx], self.store_location, self._bind[0], 0,
                                          token=self._api_token)
                    self._loop.run_until_complete(self._api.start())
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
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                assert self._thread is not None
                self._thread.join(5)
                if not self._loop.is_running():
                    self._loop.close()
                self._loop = None
            if self._tmp is not None and not self.keep_store:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            raise
        assert self._listener is not None
        self.host, self.port = self._listener.address
        if self._api is not None:
            self.http_url = f"http://{self._api.host}:{self._api.port}"
        return self

    def stop(self, *, check: bool = True) -> None:
        """Stop serving; re-raise errors from inside the server (unless check=False)."""
        if self._loop is not None and self._listener is not None:
            if self._api is not None:
                self._call(self._api.stop(), timeout=10)
            self._call(self._listener.close(), timeout=10)
            self._call(self.analyst.stop(drain=10), timeout=25)
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join(10)
            self._loop.close()
            self._loop = None
        self.store.close()
        if self._tmp is not None and not self.keep_store:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if check:
            self.check()

    def __enter__(self) -> Harness:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        # Do not hide the test's own exception behind the server's errors.
        self.stop(check=exc_type is None)

    async def __aenter__(self) -> Harness:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        await asyncio.to_thread(self.stop, check=exc_type is None)

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    # -- control ----------------------------------------------------------

    def now(self) -> float:
        """The harness's clock: the given clock (or the wall clock) plus any
        `advance()`; rules (first_seen, rate limits) and the store use it."""
        return self._clock() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the harness's clock forward: greylisting windows, rate-limit
        buckets and attempt intervals see the time pass, no test sleeps."""
        if seconds < 0:
            raise ValueError("time only moves forward")
        self._offset += seconds

    @property
    def scenario(self) -> Scenario:
        """The scenario the harness serves now (with any rules added)."""
        return self.ctx.scenario

    def use(self, scenario: str | Path | Scenario) -> None:
        """Switch scenario for new decisions (counters and state carry on)."""
        self.ctx.use(_scenario(scenario))

    def add_rule(self, *, on: str, name: str | None = None, **spec: Any) -> str:
        """Add a rule in code, checked exactly as one in a file; it goes before
        the scenario's own rules (first match wins). Returns its name."""
        self._rule_seq += 1
        rule_spec: dict[str, Any] = {"name": name or f"added rule {self._rule_seq}", "on": on}
        rule_spec.update(spec)
        rule = build_rule(rule_spec, index=self._rule_seq - 1, source="<add_rule>")
        self.ctx.add_rule(rule, position="first")
        return rule.name

    def reset(self, *, scenario: str | Path | Scenario | None = None) -> None:
        """Back to a clean slate: the base scenario (or `scenario`), no added
        rules, counters, state and journal forgotten, captures deleted."""
        self.disconnect_all()  # nothing sent before the reset lands after it
        self.ctx.reset(to_base=True,
                       scenario=_scenario(scenario) if scenario is not None else None)
        self._offset = 0.0
        if self._loop is not None:
            self._call(self._forget_analyses())
        if self.store.shared:  # others' captures stay
            self.store.clear(session_ids=self.store.started.copy())
            self.store.started.clear()
        else:
            self.store.clear()
        self.store.sync_barrier()
        self.store.error = None

    async def _forget_analyses(self) -> None:
        self.analyst.forget()

    @property
    def errors(self) -> list[BaseException]:
        return self.ctx.errors

    def check(self) -> None:
        """Raise the errors that happened inside the server, if any."""
        if self.ctx.errors:
            errors = list(self.ctx.errors)
            self.ctx.errors.clear()
            raise HarnessServerError(errors) from errors[0]

    # -- queries ----------------------------------------------------------

    @property
    def store_path(self) -> Path:
        """The SQLite file of the store (a PostgreSQL store has none: see
        `store_location`)."""
        if not isinstance(self.store_location, Path):
            raise HarnessError("this harness's store is a database, not a file: "
                               "use store_location")
        return self.store_location

    def _own(self) -> list[int] | None:
        """The sessions to read: this harness's own on a shared store, else
        all of them (None)."""
        return sorted(self.store.started.copy()) if self.store.shared else None

    def _read(self, fn: Callable[[Reader], T]) -> T:
        self.store.sync_barrier()
        if self.store.error is not None:
            raise HarnessError(f"store write failed: {self.store.error}")
        with Reader(self.store_location) as r:
            return fn(r)

    def messages(self, *, rcpt: str | None = None, raw: bool = True) -> list[MessageRecord]:
        own = self._own()
        return self._read(lambda r: r.messages(rcpt=rcpt, raw=raw, session_ids=own))

    def sessions(self) -> list[SessionRecord]:
        own = self._own()
        return self._read(lambda r: r.sessions(with_events=True, session_ids=own))

    def attempts(self, *, rcpt: str | None = None, mail_from: str | None = None
                 ) -> list[Attempt]:
        """Delivery attempts (one pair's verdict on one connection), oldest
        first, each with `interval` since the pair's previous attempt."""
        own = self._own()
        return self._read(lambda r: r.attempts(rcpt=rcpt, mail_from=mail_from,
                                               session_ids=own))

    def relays(self, message_id: int | None = None) -> list[Relay]:
        """What the handlers (forward:) did with stored messages; call
        `wait_idle()` first to see the ones still under way."""
        own = self._own()
        return self._read(lambda r: r.relays(message_id, session_ids=own))

    @property
    def journal(self) -> list[JournalEntry]:
        return list(self.ctx.journal)

    # -- waits ------------------------------------------------------------

    def _wait(self, ready: Callable[[], T | None], timeout: float) -> T | None:
        """Evaluate `ready` now and after each server event until it returns
        something, or the timeout passes (then None)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._generation
            result = ready()
            if result is not None:
                return result
            with self._changed:
                while self._generation == seen:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return ready()
                    self._changed.wait(remaining)

    def wait_for_message(self, *, rcpt: str | None = None, timeout: float = 5.0
                         ) -> MessageRecord:
        """The first message (to `rcpt`, if given); waits for it to arrive."""
        found = self._wait(lambda: next(iter(self.messages(rcpt=rcpt)), None), timeout)
        if found is None:
            what = f"a message to {rcpt}" if rcpt else "a message"
            raise HarnessAssertionError(
                f"waited {timeout:g}s for {what}; none arrived.\n" + self.report())
        return found

    def wait_for_attempts(self, n: int, *, rcpt: str | None = None,
                          mail_from: str | None = None, timeout: float = 5.0) -> list[Attempt]:
        """At least `n` attempts (of `rcpt`/`mail_from` if given); waits for them."""
        def ready() -> list[Attempt] | None:
            got = self.attempts(rcpt=rcpt, mail_from=mail_from)
            return got if len(got) >= n else None

        found = self._wait(ready, timeout)
        if found is None:
            got = self.attempts(rcpt=rcpt, mail_from=mail_from)
            what = f"{n} attempt(s)" + (f" to {rcpt}" if rcpt else "") + (
                f" from {mail_from}" if mail_from else "")
            raise HarnessAssertionError(
                f"waited {timeout:g}s for {what}; {len(got)} arrived.\n" + self.report())
        return found

    def disconnect_all(self, timeout: float = 10) -> int:
        """Close every open SMTP connection (e.g. a client's pooled one left
        over from a test) and wait for their sessions to end; returns how many."""
        if self._loop is None:
            return 0
        count: int = self._call(close_connections(self.ctx, abort=True, grace=timeout),
                                timeout + 1)
        return count

    def wait_idle(self, timeout: float = 10) -> None:
        """Wait until no connection is being served (sessions recorded as ended)
        and every stored message has been analysed."""
        async def idle() -> None:
            ctx = self.ctx
            while ctx.active or self.analyst.pending or ctx.pending_handlers:
                waits: list[asyncio.Future[Any]] = [p.closed for p in ctx.active]
                waits += list(ctx.pending_handlers)  # messages being passed on
                if self.analyst.pending:  # analyses of stored messages
                    waits.append(asyncio.ensure_future(self.analyst.idle()))
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        try:
            self._call(asyncio.wait_for(idle(), timeout), timeout + 1)
        except TimeoutError:
            open_ = ", ".join(
                f"session {p.session.id} from {p.session.peer[0]}:{p.session.peer[1]}"
                f" (last: {p.session.last_command!r})"
                for p in list(self.ctx.active) if p.session is not None) or "none"
            raise HarnessAssertionError(
                f"waited {timeout:g}s for the harness to be idle; still open: {open_}") from None

    # -- verification -----------------------------------------------------

    def verify(self, *, rule: str, count: int | None = None, at_least: int | None = None
               ) -> list[JournalEntry]:
        """Assert how often `rule` decided a step (exactly `count`, or
        `at_least`); on failure the message shows the near misses."""
        if rule not in {r.name for r in self.scenario.rules} and not rule.startswith("limit"):
            raise HarnessAssertionError(
                f"no rule named {rule!r}; the scenario has: "
                + ", ".join(repr(r.name) for r in self.scenario.rules))
        hits = [e for e in self.ctx.journal if e.rule == rule]
        ok = (count is None or len(hits) == count) and (at_least is None or
                                                         len(hits) >= at_least)
        if not ok:
            want = f"exactly {count}" if count is not None else f"at least {at_least}"
            raise HarnessAssertionError(
                f"rule {rule!r} decided {len(hits)} step(s), expected {want}.\n"
                + self.report(focus=rule))
        return hits

    def unmatched(self) -> list[tuple[int, str, str]]:
        """Replies the harness itself gave to commands it could not take (bad
        syntax, wrong sequence, unknown command, refused parameter): what a
        client under test should never cause. (session, command, reply)"""
        out = []
        for s in self.sessions():
            last = ""
            for e in s.events:
                if e.direction == "C":
                    last = e.text
                elif (e.direction == "S" and e.rule is None
                      and e.text[:3] in ("500", "501", "502", "503", "504", "555")):
                    out.append((s.id, last, e.text))
        return out

    def assert_no_unmatched(self) -> None:
        bad = self.unmatched()
        if bad:
            lines = [f"  session {sid}: {cmd!r} -> {reply}" for sid, cmd, reply in bad]
            raise HarnessAssertionError(
                f"{len(bad)} command(s) the harness could not take:\n" + "\n".join(lines)
                + "\n" + self.report())

    # -- the failure report -----------------------------------------------

    def near_misses(self, focus: str | None = None, limit: int = 8
                    ) -> list[tuple[JournalEntry, str, str]]:
        """(decision, rule, why it did not match), closest first: rules that
        failed on their last condition rank before those that failed early."""
        rules = {r.name: r for r in self.scenario.rules}
        found = []
        for entry in self.ctx.journal:
            for name, why in entry.misses:
                if focus is not None and name != focus:
                    continue
                rule = rules.get(name)
                keys = [m.key for m in rule.when] if rule else []
                failed = next((i for i, k in enumerate(keys) if why.startswith(k)), 0)
                found.append((len(keys) - failed, entry, name, why))
        found.sort(key=lambda x: (x[0], -x[1].t))
        return [(e, n, w) for _, e, n, w in found[:limit]]

    def report(self, focus: str | None = None, max_sessions: int = 5) -> str:
        """Transcripts of the latest sessions and the near misses, as text."""
        try:
            sessions = self.sessions()[-max_sessions:]
        except HarnessError as err:
            return f"(no transcript: {err})"
        lines = [f"transcript ({len(sessions)} latest session(s)):"]
        if not sessions:
            lines.append("  (no session: nothing connected)")
        for s in sessions:
            lines.append(f"  session {s.id} from {s.peer_ip}, ended: {s.end_reason or 'open'}")
            previous = ""
            for ev in s.events:
                if ev.direction == "I" and not ev.text.startswith(("fault", "delay", "stored")):
                    continue
                continued = ev.direction == "S" and len(ev.text) > 3 and ev.text[3] == "-"
                if continued and previous == "S-":
                    continue  # one line of a multi-line reply is enough here
                previous = "S-" if continued else ev.direction
                mark = {"C": "C:", "S": "S:", "I": "  "}[ev.direction]
                rule = f"  [{ev.rule}]" if ev.rule and ev.direction == "S" else ""
                lines.append(f"    {mark} {ev.text}{rule}")
        misses = self.near_misses(focus)
        lines.append("near misses (rules that did not match, and why):")
        if not misses:
            lines.append("  (none)")
        for entry, name, why in misses:
            lines.append(f"  {name!r} at {entry.phase} ({entry.command}): {why}")
        return "\n".join(lines)

