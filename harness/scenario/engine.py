"""The scenario engine: SMTP events in, one decision out. Sans-IO.

It owns what spans connections: attempt counters per sender/recipient pair,
first-seen times of client/sender/recipient triplets, connection counts per
client, the scenario state, rule use counts and the seeded RNG. The caller
(the aiosmtpd adapter, or a test with plain lists) owns sockets and time:
the clock is injected, and a decision says what to do (reply, delay, close,
fault) without doing it.

May know: the scenario model, the standard library's pure parts.
Must not know: asyncio, aiosmtpd, sqlite3, sockets, HTTP."""

from __future__ import annotations

import ipaddress
import random
import re
import time
from collections import Counter
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from threading import Lock
from typing import TYPE_CHECKING, ClassVar, Protocol

from harness.records import Body
from harness.scenario.index import Misses, PhaseRules
from harness.scenario.model import (
    ContentChecks,
    Facts,
    Fault,
    Phase,
    Rule,
    Scenario,
)
from harness.scenario.values import Reply, parse_reply

if TYPE_CHECKING:
    from email.message import Message as EmailMessage

INITIAL_STATE = "started"

# Replies of the server limits (scenario `server.limits`), worded as real MTAs do.
_TOO_MANY_CONNECTIONS = parse_reply("421 4.7.0 Too many connections, try again later")
_TOO_MANY_FROM_YOU = parse_reply("421 4.7.0 Too many connections from your host")
_TOO_MANY_MESSAGES = parse_reply("421 4.7.0 Too many messages in this connection")
_TOO_MANY_RECIPIENTS = parse_reply("452 4.5.3 Too many recipients")
_RATE_CLIENT = parse_reply("421 4.7.0 Rate limit exceeded for your host, try again later")
_RATE_SENDER = parse_reply("451 4.7.1 Rate limit exceeded for this sender, try again later")

# ------------------------------------------------------------------- events


@dataclass(frozen=True, kw_only=True)
class Event:
    phase: ClassVar[Phase]


@dataclass(frozen=True, kw_only=True)
class Connect(Event):
    phase = Phase.CONNECT


@dataclass(frozen=True, kw_only=True)
class Helo(Event):
    phase = Phase.HELO
    name: str
    extended: bool = True


@dataclass(frozen=True, kw_only=True)
class StartTls(Event):
    phase = Phase.STARTTLS


@dataclass(frozen=True, kw_only=True)
class Auth(Event):
    phase = Phase.AUTH
    mechanism: str
    user: str
    valid: bool  # the credentials are right (the adapter checked them)


@dataclass(frozen=True, kw_only=True)
class Mail(Event):
    phase = Phase.MAIL
    sender: str
    size: int | None = None  # SIZE= as declared
    spf: str | None = None  # the SPF result, when the adapter checked it


@dataclass(frozen=True, kw_only=True)
class Rcpt(Event):
    phase = Phase.RCPT
    recipient: str


@dataclass(frozen=True, kw_only=True)
class Data(Event):
    phase = Phase.DATA


@dataclass(frozen=True, kw_only=True)
class Message(Event):
    phase = Phase.MESSAGE
    content: bytes | bytearray | Body  # a Body is joined only if a rule reads content
    dkim: str | None = None  # results, when the adapter checked them
    dmarc: str | None = None
    #: the rules' header and body conditions, tested ahead (Engine.content_checks)
    checks: ContentChecks | None = None


@dataclass(frozen=True, kw_only=True)
class Bdat(Event):
    phase = Phase.BDAT
    size: int  # this chunk
    last: bool
    total: int  # the message so far, this chunk included


@dataclass(frozen=True, kw_only=True)
class Rset(Event):
    phase = Phase.RSET


@dataclass(frozen=True, kw_only=True)
class Noop(Event):
    phase = Phase.NOOP


@dataclass(frozen=True, kw_only=True)
class Vrfy(Event):
    phase = Phase.VRFY
    argument: str


@dataclass(frozen=True, kw_only=True)
class Quit(Event):
    phase = Phase.QUIT


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True, kw_only=True)
class Decision:
    """What to do about one event. `reply` None means the normal reply."""

    phase: Phase
    rule: str | None = None
    reply: Reply | None = None
    delay: float = 0.0
    close: bool = False
    fault: Fault | None = None
    drip: float = 1.0
    after_bytes: int | None = None
    #: rules of this phase that did not match, each with the first reason
    misses: Sequence[tuple[str, str]] = ()
    #: True when the client will see a positive (or the normal) reply
    accepts: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # asked several times per step: worked out once
        object.__setattr__(self, "accepts", self.fault not in _REFUSING_FAULTS and (
            self.reply is None or self.reply.is_positive))


_REFUSING_FAULTS = frozenset({Fault.DROP, Fault.RESET, Fault.HANG, Fault.TLS_FAIL})


@dataclass
class Connection:
    """The engine's note of one open connection: who, and which of that
    client's connections it is (for the `connection` matcher and the
    concurrency limits). Everything else about the conversation lives in
    the SMTP session, which the engine reads through `SessionFacts`."""

    client: ipaddress.IPv4Address | ipaddress.IPv6Address
    number: int  # Nth connection from this client (0 until its Connect decision)
    open: bool = True
    key: str = ""  # the client address as text (the counters' key)
    counted: bool = False  # its Connect decision counted it
    shared: bool = False  # ... in a shared book (which counts its closing)

    def __post_init__(self) -> None:
        self.key = self.key or str(self.client)


class Book(Protocol):
    """What an engine remembers across connections: attempt counters,
    first-seen times, connection counts, rule uses, rate buckets, the
    scenario state. `MemoryBook` keeps it in this process; a shared book
    (harness.state) reads and writes it in a database, one transaction per
    decision, so that several processes or hosts decide as one engine."""

    state: str

    @property
    def attempts(self) -> MutableMapping[tuple[str, str, str], int]:
        """Per phase and pair (or client): a key not there counts 0."""

    @property
    def first_seen(self) -> MutableMapping[tuple[str, str, str], float]:
        """Per client, sender and recipient: when first seen."""

    @property
    def connections(self) -> MutableMapping[str, int]:
        """Per client, ever: a key not there counts 0."""

    @property
    def rule_uses(self) -> MutableMapping[str, int]:
        """Per rule name: a key not there counts 0."""

    @property
    def buckets(self) -> MutableMapping[str, tuple[float, float]]:
        """Rate key -> (tokens, when)."""

    def opened(self, client: str) -> None:
        """A connection from `client` is open (it counts for the limits)."""

    def closed(self, client: str) -> None:
        """... and is closed."""

    def active(self, client: str | None = None) -> int:
        """Connections open now: from `client`, or (None) from anyone."""


class MemoryBook:
    """The book kept in this process (one engine, one process)."""

    def __init__(self) -> None:
        self.attempts: Counter[tuple[str, str, str]] = Counter()
        self.first_seen: dict[tuple[str, str, str], float] = {}
        self.connections: Counter[str] = Counter()
        self.rule_uses: Counter[str] = Counter()
        self.buckets: dict[str, tuple[float, float]] = {}
        self.state = INITIAL_STATE
        #: open connections per client: facts of the sockets, not of a run
        #: (a reset keeps counting the ones still open)
        self.open: Counter[str] = Counter()

    def opened(self, client: str) -> None:
        self.open[client] += 1

    def closed(self, client: str) -> None:
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]

    def active(self, client: str | None = None) -> int:
        return self.open[client] if client is not None else sum(self.open.values())

    def forget(self) -> None:
        """Everything but the connections open now."""
        self.attempts.clear()
        self.first_seen.clear()
        self.connections.clear()
        self.rule_uses.clear()
        self.buckets.clear()
        self.state = INITIAL_STATE


#: matcher keys whose values span connections (a phase with a rule that uses
#: one is decided against the shared book when there is one)
SHARED_KEYS = frozenset({"attempt", "first_seen", "state", "connection"})


class SessionFacts(Protocol):
    """What the engine reads of a session when it decides. The session owns
    these (one transaction state, kept in one place) and changes them after
    each decision; the engine never writes them."""

    @property
    def connection(self) -> Connection: ...
    @property
    def tls(self) -> bool: ...
    @property
    def helo(self) -> str | None: ...
    @property
    def auth_user(self) -> str | None: ...
    @property
    def mail_from(self) -> str | None: ...  # None: no transaction
    @property
    def declared_size(self) -> int | None: ...
    @property
    def rcpts(self) -> Sequence[str]: ...  # accepted in this transaction
    @property
    def message_index(self) -> int: ...  # transactions begun on this connection
    @property
    def rcpt_index(self) -> int: ...  # RCPT commands in this transaction, this one included
    @property
    def spf(self) -> str | None: ...  # of this transaction's MAIL FROM


_PHASE_NAME = {p: p.value for p in Phase}
#: Phases whose attempts count per sender/recipient pair.
_PAIR_PHASES = frozenset({Phase.RCPT, Phase.DATA, Phase.MESSAGE, Phase.BDAT})


def _parse_client(client: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return ipaddress.ip_address("0.0.0.0")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


#: the conditions that read the message itself (known at the message step)
CONTENT_KEYS = frozenset({"header", "body"})


class Engine:
    """Decides each SMTP step by the scenario's rules (first match wins).

    Thread-safe: one lock guards the cross-connection bookkeeping, so the
    synchronous test wrapper and the event loop may share an engine."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        clock: Callable[[], float] = time.time,
        seed: int | None = None,
    ) -> None:
        self.clock = clock
        self.seed = seed
        #: exceptions raised by matchers (taken as "no match"; the adapter
        #: collects them so a test can re-raise them)
        self.errors: list[Exception] = []
        self._lock = Lock()
        self.use(scenario)
        self.reset()

    # -- configuration ----------------------------------------------------

    def use(self, scenario: Scenario) -> None:
        """Switch to another scenario; counters and state carry on."""
        with getattr(self, "_lock", Lock()):
            self.scenario = scenario
            by_phase: dict[Phase, list[Rule]] = {p: [] for p in Phase}
            for rule in scenario.rules:
                by_phase[rule.on].append(rule)
            self._rules = {p: tuple(rs) for p, rs in by_phase.items()}
            self._tables = {p: PhaseRules(rs) for p, rs in self._rules.items()}
            self._needs_content = {
                p: any(mt.key in CONTENT_KEYS for r in rs for mt in r.when)
                for p, rs in self._rules.items()
            }
            #: the header and body conditions a message's decision tests
            self._content_matchers = tuple(
                mt for r in self._rules[Phase.MESSAGE] for mt in r.when
                if mt.key in CONTENT_KEYS)
            self.uses = frozenset(mt.key for r in scenario.rules for mt in r.when)
            self._normal = {p: Decision(phase=p) for p in Phase}
            limits = scenario.server.limits
            self._limited = {
                Phase.CONNECT: (limits.max_connections is not None
                                or limits.max_connections_per_client is not None),
                Phase.MAIL: limits.messages_per_connection is not None or limits.rate is not None,
                Phase.RCPT: limits.recipients_per_message is not None,
            }
            self._limited.update({p: False for p in Phase if p not in self._limited})
            # The phases decided against a shared book when there is one:
            # those whose rules read or write what spans connections, the
            # connect phase when connections are counted, the mail phase
            # under a rate limit. Any other decision is this process's own.
            shared: set[Phase] = set()
            for rule in scenario.rules:
                keys = {mt.key for mt in rule.when}
                if keys & SHARED_KEYS or rule.times is not None or rule.set_state is not None:
                    shared.add(rule.on)
            if "connection" in self.uses or self._limited[Phase.CONNECT]:
                shared.add(Phase.CONNECT)
            if limits.rate is not None:
                shared.add(Phase.MAIL)
            self.shared_phases = frozenset(shared)

    def reset(self) -> None:
        """Forget attempts, first-seen times, rule uses and state; reseed.
        (Connections open now keep counting for the limits.)"""
        with self._lock:
            self.rng = random.Random(self.seed)
            if not hasattr(self, "book"):
                self.book = MemoryBook()
            self.book.forget()

    @property
    def state(self) -> str:
        """The scenario state (this process's book)."""
        return self.book.state

    # -- events -----------------------------------------------------------

    def connect(self, client: str) -> Connection:
        """A new connection, counted in this process's book (its number, the
        connections open)."""
        ip = _parse_client(client)
        key = str(ip)
        with self._lock:
            book = self.book
            n = book.connections[key] = book.connections[key] + 1
            book.opened(key)
            return Connection(client=ip, number=n, key=key, counted=True)

    def uncounted(self, client: str) -> Connection:
        """A new connection that its Connect decision will count, in the
        book that decision is made against (a shared one)."""
        ip = _parse_client(client)
        return Connection(client=ip, number=0, key=str(ip))

    def disconnect(self, conn: Connection) -> None:
        """The connection is closed (counts for the concurrency limits)."""
        with self._lock:
            if conn.open and conn.counted and not conn.shared:
                self.book.closed(conn.key)
            conn.open = False

    def decide(self, session: SessionFacts, event: Event) -> Decision:
        """The decision for `event` in `session`, updating the engine's own
        bookkeeping (attempts, first-seen times, rule uses, state, rate
        buckets); the session applies the decision to itself."""
        with self._lock:
            return self._decide(session, event, self.book)

    def decide_with(self, session: SessionFacts, event: Event, book: Book) -> Decision:
        """The decision for `event` against `book` (a shared book, inside
        the caller's transaction, in the caller's thread). Without the
        engine's lock: the book is the transaction's, and this process's own
        decisions must not wait behind its database round trips (what else
        is read, the rules and the RNG, is safe to share)."""
        return self._decide(session, event, book)

    def content_checks(self, content: bytes | bytearray | Body) -> ContentChecks:
        """The header and body conditions of the message rules, tested on
        `content` ahead of the decision: for a worker thread (a large
        message's split, decoding and searches are no work for the event
        loop). Reads only the rules (the engine's state is not touched); the
        decision then takes these results (Message.checks)."""
        matchers = self._content_matchers  # this scenario's, whatever comes next
        out = ContentChecks()
        if not matchers:
            return out
        headers, body = _split_message(content)
        facts = Facts(phase=Phase.MESSAGE, client=ipaddress.ip_address("0.0.0.0"), tls=False,
                      connection=0, state="", rng=self.rng, headers=headers, body=body)
        for mt in matchers:
            try:
                reason = mt.check(facts)
            except Exception as e:  # as _match does: the condition fails, reported
                reason = f"{mt.key} failed: {type(e).__name__}: {e}"
                out.errors.append(e)
            out.add(mt, reason)
        return out

    def _decide(self, session: SessionFacts, event: Event, book: Book) -> Decision:
        phase = event.phase
        name = _PHASE_NAME[phase]
        now = self.clock()
        conn = session.connection
        client = conn.key
        mail_from = event.sender if isinstance(event, Mail) else session.mail_from
        sender = mail_from.lower() if mail_from else ""
        attempts = book.attempts
        if isinstance(event, Connect) and not conn.counted:
            conn.counted = True
            conn.shared = not isinstance(book, MemoryBook)
            n = book.connections[client] = book.connections[client] + 1
            conn.number = n
            book.opened(client)

        # Attempt counters: per pair once recipients are known, else per client
        # (connect, helo, ...) or client and sender (mail).
        rcpts: tuple[str, ...] = ()
        counts: tuple[int, ...]
        ages: tuple[float, ...] = ()
        if phase in _PAIR_PHASES:
            rcpts = (event.recipient,) if isinstance(event, Rcpt) else tuple(session.rcpts)
            cl, al = [], []
            first_seen = book.first_seen
            for r in rcpts:
                low = r.lower()
                key = (name, sender, low)
                n = attempts[key] = attempts[key] + 1
                cl.append(n)
                first = first_seen.setdefault((client, sender, low), now)
                al.append(now - first if now > first else 0.0)
            counts, ages = tuple(cl), tuple(al)
        else:
            if isinstance(event, Vrfy):
                rcpts = (event.argument,)
            key = (name, client, sender if phase is Phase.MAIL else "")
            n = attempts[key] = attempts[key] + 1
            counts = (n,)

        if self._limited[phase]:
            limited = self._limit(session, event, now, book)
            if limited is not None:
                return limited
        if not self._rules[phase]:  # nothing to match: the normal behaviour
            return self._normal[phase]
        facts = Facts(
            phase=phase,
            client=conn.client,
            tls=session.tls,
            connection=conn.number,
            state=book.state,
            rng=self.rng,
            helo=session.helo,
            auth_user=session.auth_user,
            mail_from=mail_from,
            rcpts=rcpts,
            attempts=counts,
            first_seen_ages=ages,
            message_index=session.message_index,
            rcpt_index=session.rcpt_index,
            size=session.declared_size,
            spf=session.spf,
        )
        if isinstance(event, Helo):
            facts.helo = event.name
        elif isinstance(event, Mail):
            facts.size = event.size
            facts.spf = event.spf
            facts.message_index = session.message_index + 1
        elif isinstance(event, Message):
            facts.size = len(event.content)
            facts.dkim, facts.dmarc = event.dkim, event.dmarc
            if self._needs_content[phase]:
                checks = event.checks
                if checks is not None and checks.covers(self._content_matchers):
                    facts.checks = checks
                    self.errors.extend(checks.errors)
                else:
                    facts.headers, facts.body = _split_message(event.content)
        elif isinstance(event, Bdat):
            facts.size = event.total
        elif isinstance(event, Auth):
            facts.auth_user = event.user
        return self._match(facts, book)

    def _limit(self, session: SessionFacts, event: Event, now: float,
               book: Book) -> Decision | None:
        """The scenario's server limits, checked before its rules."""
        limits = self.scenario.server.limits
        phase = event.phase
        conn = session.connection

        def refuse(name: str, reply: Reply, close: bool) -> Decision:
            return Decision(phase=phase, rule=f"limit {name}", reply=reply, close=close)

        if isinstance(event, Connect):
            if (limits.max_connections is not None
                    and book.active() > limits.max_connections):
                return refuse("max_connections", _TOO_MANY_CONNECTIONS, True)
            if (limits.max_connections_per_client is not None
                    and book.active(conn.key) > limits.max_connections_per_client):
                return refuse("max_connections_per_client", _TOO_MANY_FROM_YOU, True)
        elif isinstance(event, Mail):
            if (limits.messages_per_connection is not None
                    and session.message_index >= limits.messages_per_connection):
                return refuse("messages_per_connection", _TOO_MANY_MESSAGES, True)
            rate = limits.rate
            if rate is not None:
                key = (f"client {conn.client}" if rate.key == "client"
                       else f"sender {event.sender.lower()}")
                tokens, then = book.buckets.get(key, (float(rate.messages), now))
                tokens = min(float(rate.messages),
                             tokens + (now - then) * rate.messages / rate.per)
                if tokens < 1.0:
                    book.buckets[key] = (tokens, now)
                    if rate.reply is not None:
                        return refuse("rate", rate.reply, rate.reply.code == 421)
                    if rate.key == "client":
                        return refuse("rate", _RATE_CLIENT, True)
                    return refuse("rate", _RATE_SENDER, False)
                book.buckets[key] = (tokens - 1.0, now)
        elif (isinstance(event, Rcpt) and limits.recipients_per_message is not None
                and len(session.rcpts) >= limits.recipients_per_message):
            return refuse("recipients_per_message", _TOO_MANY_RECIPIENTS, False)
        return None

    def _match(self, facts: Facts, book: Book) -> Decision:
        table = self._tables[facts.phase]
        rules, order = table.rules, table.order
        positions = table.candidates(facts) if table.indexed else range(len(rules))
        tested: dict[int, str] = {}
        for pos in positions:
            rule = rules[pos]
            if rule.times is not None and book.rule_uses[rule.name] >= rule.times:
                tested[pos] = f"retired after {rule.times} use(s)"
                continue
            reason = None
            for matcher in order[pos]:  # chance last: see index.evaluation_order
                try:
                    reason = matcher.check(facts)
                except Exception as e:  # a matcher must never take the server down
                    reason = f"{matcher.key} failed: {type(e).__name__}: {e}"
                    self.errors.append(e)
                if reason is not None:
                    break
            if reason is not None:
                tested[pos] = reason
                continue
            book.rule_uses[rule.name] = book.rule_uses[rule.name] + 1
            if rule.set_state is not None:
                book.state = rule.set_state
            delay = rule.delay.sample(self.rng) if rule.delay is not None else 0.0
            return Decision(
                phase=facts.phase,
                rule=rule.name,
                reply=rule.reply,
                delay=delay,
                close=rule.close,
                fault=rule.fault,
                drip=rule.drip,
                after_bytes=rule.after_bytes,
                misses=_misses(table, pos, tested, facts),
            )
        return Decision(phase=facts.phase, misses=_misses(table, len(rules), tested, facts))


def _misses(table: PhaseRules, upto: int, tested: dict[int, str],
            facts: Facts) -> Sequence[tuple[str, str]]:
    """The rules before position `upto` that did not match, with why."""
    if upto == 0:
        return ()
    if not table.indexed:  # every one was tested
        return tuple((table.rules[p].name, tested[p]) for p in range(upto))
    return Misses(table, upto, tested, facts)


#: The blank line that ends the header section, as the email parser reads it:
#: CRLF or a bare LF, and possibly at the very start (no header fields).
_END_OF_HEADERS = re.compile(rb"(?:\A|\n)\r?\n")


def _split_message(content: bytes | bytearray | Body) -> tuple[EmailMessage, str]:
    # imported here: the email package loads socket (email.utils, for
    # make_msgid), which the SMTP session must not pull in by importing us
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    if isinstance(content, Body):
        content = content.whole()
    sep = _END_OF_HEADERS.search(content)
    end = len(content) if sep is None else sep.end()  # no blank line: all header section
    # the header section alone: the parser reads all it is given, line by
    # line, even for the headers only (a 20 MB body was 190 ms of it); the
    # body decoded in place, not copied first
    headers = BytesHeaderParser(policy=compat32).parsebytes(bytes(content[:end]))
    return headers, str(memoryview(content)[end:], "utf-8", "replace")
