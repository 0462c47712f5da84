"""What all connections of one SMTP listener share: the scenario engine, the
store, the watchers, the journal of decisions, the analyst, the TLS
context; and the one control surface (switch scenario, add or remove a
rule, reset) that the API, the `Harness` and the CLI go through, each change
announced once."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import ssl
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from harness.errors import HarnessError
from harness.records import TranscriptLine
from harness.scenario import engine as ev
from harness.scenario.engine import Connection, Decision, Engine
from harness.scenario.model import Phase, Rule, Scenario, TlsMode
from harness.scenario.values import parse_reply
from harness.smtp.session import Consult
from harness.smtp.tls import server_context
from harness.store.db import Store

if TYPE_CHECKING:
    from harness.analysis.auth_process import AuthProcess
    from harness.analyst import Analyst
    from harness.smtp.session import ServerSession
    from harness.smtp.transport import SmtpTransport
    from harness.state.shared import SharedState

#: Sees every transcript line as it happens (the console, the page).
Observer = Callable[[TranscriptLine], None]

JOURNAL_LIMIT = 50_000

#: the reply when the shared state cannot be reached: the sender tries again
_STATE_UNAVAILABLE = parse_reply("451 4.3.0 Temporary failure: the server's shared state is "
                                 "unavailable")


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One decision: the step, the client's command, the deciding rule (None:
    the normal behaviour), and the rules that did not match, with why."""

    session_id: int
    t: float
    phase: str
    command: str
    rule: str | None
    reply: str | None
    fault: str | None
    misses: Sequence[tuple[str, str]]  # worked out when read (see scenario/index.py)


@dataclass(eq=False)
class ListenerContext:
    """What all connections of one listener share."""

    engine: Engine
    store: Store
    name: str = "127.0.0.1:2525"
    observers: list[Observer] = field(default_factory=list)
    #: exceptions raised while serving (re-raised by test fixtures, never lost)
    errors: list[BaseException] = field(default_factory=list)
    #: called with (session id) when a session ends; (message id) when stored
    on_session_end: list[Callable[[int], None]] = field(default_factory=list)
    on_message: list[Callable[[int], None]] = field(default_factory=list)
    #: connections being served now
    active: set[SmtpTransport] = field(default_factory=set)
    #: decisions rules took part in, newest last (bounded): for verification
    #: and near misses
    journal: collections.deque[JournalEntry] = field(
        default_factory=lambda: collections.deque(maxlen=JOURNAL_LIMIT))
    #: called (on the loop) whenever something was recorded: waiters wake up
    on_change: list[Callable[[], None]] = field(default_factory=list)
    #: called (on the loop), once per change, when the scenario was switched
    #: or changed, or the listener reset (see `use`, `add_rule`, `reset`)
    on_scenario: list[Callable[[], None]] = field(default_factory=list)
    #: the port-465 style: TLS from the first byte
    implicit_tls: bool = False
    #: a PROXY protocol v1/v2 header precedes SMTP (behind a load balancer)
    proxy_protocol: bool = False
    #: where a made lab CA certificate is written (beside the store)
    ca_dir: Path | None = None
    #: where SPF/DKIM/DMARC look things up: the scenario's dns: zone, or
    #: "system" (the machine's resolver, only when a user asks for it)
    dns: str = "scenario"
    #: keeps stored messages analysed (one for all listeners of a store;
    #: its owner starts and stops it); None: no analysis
    analyst: Analyst | None = None
    #: aiosmtpd-style handlers (`handle_DATA(server, session, envelope)`)
    #: each accepted message is passed to once stored (see handlers.py)
    handlers: list[Any] = field(default_factory=list)
    #: handlers still running, and the thread they run in
    pending_handlers: set[asyncio.Future[Any]] = field(default_factory=set)
    handler_runner: Any = None
    #: the process a large message's DKIM and DMARC are checked in (made
    #: when first needed; see SmtpTransport._check_message_apart)
    auth_checker: AuthProcess | None = None
    #: where rules' bounce: reports are sent (HOST, PORT); see outbound.py
    bounce_via: tuple[str, int] | None = None
    #: the book several processes or hosts share (harness.state); None: this
    #: process's own
    shared: SharedState | None = None
    #: queue stored messages' analysis jobs though no analyst runs here (a
    #: worker process: the primary's analyst takes them)
    queue_analysis: bool = False
    #: told of every change made through the control surface, as
    #: (operation, arguments): the primary passes them on to its workers
    on_control: list[Callable[[str, tuple[Any, ...]], None]] = field(default_factory=list)
    #: until every process serving this listener has made the changes made
    #: so far (the primary's workers); None: this process serves it alone
    control_done: Callable[[], Awaitable[None]] | None = None
    #: what keeps the other processes serving this listener from writing
    #: their store (the primary's workers; asked again when called)
    remote_health: Callable[[], Awaitable[list[str]]] | None = None
    #: connections open in worker processes, by worker (the primary's view)
    remote_active: dict[int, int] = field(default_factory=dict)
    #: which worker process this is ("worker 1, pid 4242"; None: the only one):
    #: said in each session's transcript
    worker: str | None = None
    #: the loop serving this listener (set when it starts listening)
    loop: asyncio.AbstractEventLoop | None = None
    _base: Scenario | None = None
    _tls: tuple[object, ssl.SSLContext] | None = None
    _resolver: tuple[object, Any] | None = None

    def __post_init__(self) -> None:
        self._base = self.engine.scenario
        self._control = threading.Lock()

    @property
    def scenario(self) -> Scenario:
        return self.engine.scenario

    @property
    def base(self) -> Scenario:
        """The scenario last switched to (what `reset(to_base=True)` restores)."""
        assert self._base is not None
        return self._base

    # ------------------------------------------------- the Decider protocol

    @property
    def uses(self) -> frozenset[str]:
        return self.engine.uses

    @property
    def namespace(self) -> str:
        """Whose rows of the shared book this listener reads: its
        scenario's (hosts serving one scenario share its state)."""
        return self.engine.scenario.name

    def connect(self, client: str) -> Connection:
        if self.shared is not None and Phase.CONNECT in self.engine.shared_phases:
            return self.engine.uncounted(client)  # its Connect decision counts it
        return self.engine.connect(client)

    def disconnect(self, conn: Connection) -> None:
        if conn.shared and self.shared is not None:
            if conn.open:
                conn.open = False
                self.shared.closed(self.namespace, conn.key).add_done_callback(
                    self._shared_done)
            return
        self.engine.disconnect(conn)

    def _shared_done(self, fut: concurrent.futures.Future[Any]) -> None:
        error = fut.exception()
        if error is not None:
            self.errors.append(error)

    def decide(self, session: ServerSession, event: ev.Event) -> Decision | Consult:
        """The engine's decision, noted in the journal when a rule decided it
        or nearly did (the normal behaviour with no rule in question says
        nothing a verification or a near-miss report could use; the
        transcript has it). One the shared book must make is asked for."""
        engine = self.engine
        if self.shared is not None and event.phase in engine.shared_phases:
            return Consult(event)
        return self._decided(session, engine.decide(session, event))

    def consult(self, session: ServerSession, event: ev.Event) -> asyncio.Future[Decision]:
        """The decision of the shared book (in its thread; call it on the
        loop). A book that cannot be reached defers (451 4.3.0), recorded."""
        assert self.shared is not None
        loop = asyncio.get_running_loop()
        out: asyncio.Future[Decision] = loop.create_future()
        asked = self.shared.decide(self.namespace, self.engine, session, event)

        def done(fut: concurrent.futures.Future[Decision]) -> None:
            error = fut.exception()
            if error is not None:
                self.errors.append(error)
                d = Decision(phase=event.phase, rule="shared state unavailable",
                             reply=_STATE_UNAVAILABLE)
            else:
                d = self._decided(session, fut.result())
            if not out.done():
                out.set_result(d)
        asked.add_done_callback(lambda fut: loop.call_soon_threadsafe(done, fut))
        return out

    def _decided(self, session: ServerSession, d: Decision) -> Decision:
        engine = self.engine
        if d.rule is not None or d.misses:
            self.journal.append(JournalEntry(
                session.id, engine.clock(), d.phase.value, session.last_command, d.rule,
                str(d.reply) if d.reply else None, d.fault.value if d.fault else None,
                d.misses))
        if engine.errors:
            self.errors.extend(engine.errors)
            engine.errors.clear()
        return d

    # ------------------------------------------------ the control surface

    def open_connections(self) -> int:
        """Connections being served now (here, and by workers)."""
        return len(self.active) + sum(self.remote_active.values())

    async def current_state(self) -> str:
        """The scenario state (from the shared book, when there is one)."""
        if self.shared is None:
            return self.engine.state
        return await asyncio.wrap_future(self.shared.state(self.namespace))

    def use(self, scenario: Scenario) -> None:
        """Serve `scenario` from the next decision on (counters and state
        carry on; connections already open keep their server settings).
        Makes its TLS certificate if it needs a new one: call it off the
        event loop."""
        with self._control:
            self.engine.use(scenario)
            self._base = scenario
            self.prepare_tls()
        self._tell("use", scenario)
        self._announce()

    def add_rule(self, rule: Rule, *, position: Literal["first", "last"] = "first") -> None:
        """Add a rule before (or after) the scenario's own (first match wins)."""
        with self._control:
            current = self.scenario
            if any(r.name == rule.name for r in current.rules):
                raise HarnessError(f"a rule named {rule.name!r} exists already")
            rules = (rule, *current.rules) if position == "first" else (*current.rules, rule)
            self.engine.use(replace(current, rules=rules))
        self._tell("add_rule", rule, position)
        self._announce()

    def remove_rule(self, name: str) -> None:
        with self._control:
            current = self.scenario
            rules = tuple(r for r in current.rules if r.name != name)
            if len(rules) == len(current.rules):
                raise HarnessError(f"no rule named {name!r}")
            self.engine.use(replace(current, rules=rules))
        self._tell("remove_rule", name)
        self._announce()

    def reset(self, *, to_base: bool = False, scenario: Scenario | None = None) -> None:
        """Forget attempt counters, first-seen times, rule uses, state and the
        journal; with `to_base`, also drop the rules added since the last
        switch; with `scenario`, switch to it as well (and make it the base).
        May make a TLS certificate: call it off the event loop."""
        with self._control:
            if scenario is not None:
                self._base = scenario
                to_base = True
            if to_base:
                self.engine.use(self.base)
                self.prepare_tls()
            self.engine.reset()
            if self.shared is not None:
                self.shared.reset(self.namespace).result(30)
            self.journal.clear()
        self._tell("reset", to_base, scenario)
        self._announce()

    async def settled(self) -> None:
        """Until the changes made through this control surface are made
        wherever the listener is served (at once with one process)."""
        if self.control_done is not None:
            await self.control_done()

    def _tell(self, operation: str, *args: Any) -> None:
        for cb in self.on_control:
            try:
                cb(operation, args)
            except Exception as e:  # a relay must not break the control surface
                self.errors.append(e)

    def _announce(self) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for cb in self.on_scenario:
            if running is loop:
                cb()
            else:
                loop.call_soon_threadsafe(cb)

    # ------------------------------------------------------------- others

    def note(self, session_id: int, text: str, rule: str | None = None,
             phase: str | None = "message") -> TranscriptLine:
        """A line of the harness's own in a session's transcript, from work
        done beside the session (a forward, a bounce), which may be over by
        then: stored, shown to watchers, waiters woken."""
        line = TranscriptLine(session_id, self.engine.clock(), "I", phase, text[:2000], rule)
        self.store.transcript([line])
        for obs in self.observers:
            try:
                obs(line)
            except Exception as e:  # an observer must not break the serving
                self.errors.append(e)
        self.changed()
        return line

    def changed(self) -> None:
        """Something was recorded: wake whoever waits for it."""
        for cb in self.on_change:
            try:
                cb()
            except Exception as e:  # a waiter must not break the serving
                self.errors.append(e)

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for the current scenario, made once per scenario
        (`prepare_tls` makes it: before serving and after switching)."""
        return self._tls[1] if self._tls is not None else None

    def prepare_tls(self) -> None:
        server = self.scenario.server
        if server.starttls is TlsMode.OFF and not self.implicit_tls:
            self._tls = None
            return
        key = (server.tls, server.hostname)
        if self._tls is None or self._tls[0] != key:
            self._tls = (key, server_context(server.tls, server.hostname, self.ca_dir))

    def auth_process(self) -> AuthProcess:
        """The process large messages' DKIM and DMARC are checked in (see
        harness.analysis.auth_process), started when first needed."""
        if self.auth_checker is None:
            from harness.analysis.auth_process import AuthProcess

            self.auth_checker = AuthProcess()
        return self.auth_checker

    def resolver(self) -> Any:
        """The DNS the authentication checks use, made once per scenario."""
        from harness.analysis.dns import ScenarioDns, SystemDns

        key = self.scenario.dns if self.dns == "scenario" else "system"
        if self._resolver is None or self._resolver[0] is not key:
            self._resolver = (key, SystemDns() if self.dns == "system"
                              else ScenarioDns(self.scenario.dns))
        return self._resolver[1]
