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
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import Message as EmailMessage
from email.parser import BytesHeaderParser
from email.policy import compat32
from threading import Lock
from typing import ClassVar

from harness.scenario.model import (
    Facts,
    Fault,
    Phase,
    Rule,
    Scenario,
)
from harness.scenario.values import Reply, parse_reply

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
    content: bytes
    dkim: str | None = None  # results, when the adapter checked them
    dmarc: str | None = None


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
    misses: tuple[tuple[str, str], ...] = ()

    @property
    def accepts(self) -> bool:
        """True when the client will see a positive (or the normal) reply."""
        if self.fault in (Fault.DROP, Fault.RESET, Fault.HANG, Fault.TLS_FAIL):
            return False
        return self.reply is None or self.reply.is_positive


@dataclass
class Connection:
    """Per-connection context the engine keeps between events."""

    client: ipaddress.IPv4Address | ipaddress.IPv6Address
    number: int  # Nth connection from this client
    tls: bool = False
    helo: str | None = None
    auth_user: str | None = None
    mail_from: str | None = None
    declared_size: int | None = None
    rcpts: list[str] = field(default_factory=list)
    message_index: int = 0
    rcpt_commands: int = 0  # RCPT commands in this transaction, accepted or not
    spf: str | None = None  # of this transaction's MAIL FROM
    open: bool = True

    def reset_transaction(self) -> None:
        self.spf = None
        self.mail_from = None
        self.declared_size = None
        self.rcpts = []
        self.rcpt_commands = 0


def _parse_client(client: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        addr = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return ipaddress.ip_address("0.0.0.0")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


_CONTENT_KEYS = frozenset({"header", "body"})


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
            self._needs_content = {
                p: any(mt.key in _CONTENT_KEYS for r in rs for mt in r.when)
                for p, rs in self._rules.items()
            }
            self.uses = frozenset(mt.key for r in scenario.rules for mt in r.when)

    def reset(self) -> None:
        """Forget attempts, first-seen times, rule uses and state; reseed."""
        with self._lock:
            self.state = INITIAL_STATE
            self.rng = random.Random(self.seed)
            self.attempts: Counter[tuple[str, ...]] = Counter()
            self.first_seen: dict[tuple[str, str, str], float] = {}
            self.connections: Counter[str] = Counter()
            self.rule_uses: Counter[str] = Counter()
            self.buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
            if not hasattr(self, "active"):
                # Open connections are facts of the sockets, not of a run:
                # a reset keeps counting the ones still open.
                self.active: Counter[str] = Counter()

    # -- events -----------------------------------------------------------

    def connect(self, client: str, *, tls: bool = False) -> Connection:
        ip = _parse_client(client)
        with self._lock:
            self.connections[str(ip)] += 1
            self.active[str(ip)] += 1
            return Connection(client=ip, number=self.connections[str(ip)], tls=tls)

    def disconnect(self, conn: Connection) -> None:
        """The connection is closed (counts for the concurrency limits)."""
        with self._lock:
            if conn.open:
                conn.open = False
                key = str(conn.client)
                self.active[key] -= 1
                if self.active[key] <= 0:
                    del self.active[key]

    def decide(self, conn: Connection, event: Event) -> Decision:
        """The decision for `event` on `conn`, updating the bookkeeping."""
        with self._lock:
            return self._decide(conn, event)

    def _decide(self, conn: Connection, event: Event) -> Decision:
        phase = event.phase
        now = self.clock()
        facts = Facts(
            phase=phase,
            client=conn.client,
            tls=conn.tls,
            connection=conn.number,
            state=self.state,
            rng=self.rng,
            helo=conn.helo,
            auth_user=conn.auth_user,
            mail_from=conn.mail_from,
            message_index=conn.message_index,
            size=conn.declared_size,
            spf=conn.spf,
        )
        client = str(conn.client)
        if isinstance(event, Helo):
            facts.helo = event.name
        elif isinstance(event, Mail):
            facts.mail_from = event.sender
            facts.size = event.size
            facts.spf = event.spf
            facts.message_index = conn.message_index + 1
        elif isinstance(event, Message):
            facts.size = len(event.content)
            facts.dkim, facts.dmarc = event.dkim, event.dmarc
            if self._needs_content[phase]:
                facts.headers, facts.body = _split_message(event.content)
        elif isinstance(event, Bdat):
            facts.size = event.total
        elif isinstance(event, Auth):
            facts.auth_user = event.user

        # Attempt counters: per pair once recipients are known, else per client
        # (connect, helo, ...) or client and sender (mail).
        if isinstance(event, Rcpt):
            facts.rcpts = (event.recipient,)
            conn.rcpt_commands += 1
            facts.rcpt_index = conn.rcpt_commands
        elif isinstance(event, Vrfy):
            facts.rcpts = (event.argument,)
        elif phase in (Phase.DATA, Phase.MESSAGE, Phase.BDAT):
            facts.rcpts = tuple(conn.rcpts)
        sender = (facts.mail_from or "").lower()
        if phase in (Phase.RCPT, Phase.DATA, Phase.MESSAGE, Phase.BDAT):
            counts = []
            ages = []
            for r in facts.rcpts:
                key = (phase.value, sender, r.lower())
                self.attempts[key] += 1
                counts.append(self.attempts[key])
                triplet = (client, sender, r.lower())
                first = self.first_seen.setdefault(triplet, now)
                ages.append(max(0.0, now - first))
            facts.attempts = tuple(counts)
            facts.first_seen_ages = tuple(ages)
        else:
            key = (phase.value, client, sender if phase is Phase.MAIL else "")
            self.attempts[key] += 1
            facts.attempts = (self.attempts[key],)

        decision = self._limit(conn, event, now) or self._match(facts)
        self._apply(conn, event, decision)
        return decision

    def _limit(self, conn: Connection, event: Event, now: float) -> Decision | None:
        """The scenario's server limits, checked before its rules."""
        limits = self.scenario.server.limits
        phase = event.phase

        def refuse(name: str, reply: Reply, close: bool) -> Decision:
            return Decision(phase=phase, rule=f"limit {name}", reply=reply, close=close)

        if isinstance(event, Connect):
            total = sum(self.active.values())
            if limits.max_connections is not None and total > limits.max_connections:
                return refuse("max_connections", _TOO_MANY_CONNECTIONS, True)
            if (limits.max_connections_per_client is not None
                    and self.active[str(conn.client)] > limits.max_connections_per_client):
                return refuse("max_connections_per_client", _TOO_MANY_FROM_YOU, True)
        elif isinstance(event, Mail):
            if (limits.messages_per_connection is not None
                    and conn.message_index >= limits.messages_per_connection):
                return refuse("messages_per_connection", _TOO_MANY_MESSAGES, True)
            rate = limits.rate
            if rate is not None:
                key = (f"client {conn.client}" if rate.key == "client"
                       else f"sender {event.sender.lower()}")
                tokens, then = self.buckets.get(key, (float(rate.messages), now))
                tokens = min(float(rate.messages),
                             tokens + (now - then) * rate.messages / rate.per)
                if tokens < 1.0:
                    self.buckets[key] = (tokens, now)
                    if rate.reply is not None:
                        return refuse("rate", rate.reply, rate.reply.code == 421)
                    if rate.key == "client":
                        return refuse("rate", _RATE_CLIENT, True)
                    return refuse("rate", _RATE_SENDER, False)
                self.buckets[key] = (tokens - 1.0, now)
        elif (isinstance(event, Rcpt) and limits.recipients_per_message is not None
                and len(conn.rcpts) >= limits.recipients_per_message):
            return refuse("recipients_per_message", _TOO_MANY_RECIPIENTS, False)
        return None

    def _match(self, facts: Facts) -> Decision:
        misses: list[tuple[str, str]] = []
        for rule in self._rules[facts.phase]:
            if rule.times is not None and self.rule_uses[rule.name] >= rule.times:
                misses.append((rule.name, f"retired after {rule.times} use(s)"))
                continue
            reason = None
            # chance draws from the RNG: test it last, so draws happen only
            # when everything else holds and a seeded run replays exactly.
            for matcher in sorted(rule.when, key=lambda mt: mt.key == "chance"):
                try:
                    reason = matcher.check(facts)
                except Exception as e:  # a matcher must never take the server down
                    reason = f"{matcher.key} failed: {type(e).__name__}: {e}"
                    self.errors.append(e)
                if reason is not None:
                    break
            if reason is not None:
                misses.append((rule.name, reason))
                continue
            self.rule_uses[rule.name] += 1
            if rule.set_state is not None:
                self.state = rule.set_state
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
                misses=tuple(misses),
            )
        return Decision(phase=facts.phase, misses=tuple(misses))

    @staticmethod
    def _apply(conn: Connection, event: Event, decision: Decision) -> None:
        """Carry the decision into the connection's context."""
        ok = decision.accepts
        if isinstance(event, Helo):
            if ok:
                conn.helo = event.name
                conn.reset_transaction()
        elif isinstance(event, Mail):
            if ok:
                conn.reset_transaction()
                conn.mail_from = event.sender
                conn.declared_size = event.size
                conn.spf = event.spf
                conn.message_index += 1
        elif isinstance(event, Rcpt):
            if ok:
                conn.rcpts.append(event.recipient)
        elif isinstance(event, Auth):
            positive = decision.reply.is_positive if decision.reply is not None else event.valid
            if ok and positive:
                conn.auth_user = event.user
        elif isinstance(event, Bdat):
            if not ok:
                conn.reset_transaction()
        elif isinstance(event, Message) or (isinstance(event, Rset) and ok):
            conn.reset_transaction()


#: The blank line that ends the header section, as the email parser reads it:
#: CRLF or a bare LF, and possibly at the very start (no header fields).
_END_OF_HEADERS = re.compile(rb"(?:\A|\n)\r?\n")


def _split_message(content: bytes) -> tuple[EmailMessage, str]:
    headers = BytesHeaderParser(policy=compat32).parsebytes(content)
    sep = _END_OF_HEADERS.search(content)
    body = content[sep.end():] if sep is not None else b""
    return headers, body.decode("utf-8", errors="replace")
