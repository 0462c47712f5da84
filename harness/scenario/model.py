"""The scenario model: frozen dataclasses built by the loader (or by code, with
the same validation) and read by the engine.

Knows nothing of YAML, sockets or storage. Matchers explain why they did not
match (`check` returns a reason, or None when the matcher holds), which the
engine uses for transcripts and near-miss reports."""

from __future__ import annotations

import enum
import fnmatch
import ipaddress
import math
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import regex

from harness.scenario.values import Compare, Reply

if TYPE_CHECKING:
    from email.message import Message


class Phase(enum.StrEnum):
    """The SMTP steps a rule can answer (`on:`)."""

    CONNECT = "connect"  # the banner
    HELO = "helo"  # HELO and EHLO
    STARTTLS = "starttls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command, before 354
    MESSAGE = "message"  # after the final dot, content known
    BDAT = "bdat"
    RSET = "rset"
    NOOP = "noop"
    VRFY = "vrfy"
    QUIT = "quit"

#: Phases at which a transaction (MAIL FROM) is known.
TRANSACTION_PHASES = frozenset({Phase.MAIL, Phase.RCPT, Phase.DATA, Phase.MESSAGE, Phase.BDAT})
#: Phases at which recipients are known (at RCPT: the one being asked for; at
#: DATA/MESSAGE/BDAT: the accepted ones; at VRFY: the argument).
RECIPIENT_PHASES = frozenset({Phase.RCPT, Phase.DATA, Phase.MESSAGE, Phase.BDAT, Phase.VRFY})

class Fault(enum.StrEnum):
    """Misbehaviour on the wire instead of (or while) replying."""

    DROP = "drop"  # close with no reply
    RESET = "reset"  # TCP RST
    HANG = "hang"  # never answer; the client gives up
    TARPIT = "tarpit"  # drip the reply one byte at a time
    TLS_FAIL = "tls_fail"  # on starttls: 220, then break the handshake


class TlsMode(enum.StrEnum):
    OFF = "off"  # STARTTLS not offered
    OFFER = "offer"  # offered, optional
    REQUIRE = "require"  # MAIL before STARTTLS gets 530 5.7.0


class CertKind(enum.StrEnum):
    """The certificate the harness makes at start when none is given."""

    SELF_SIGNED = "self_signed"  # for the hostname, signed by itself
    CA_SIGNED = "ca_signed"  # for the hostname, by the harness's own lab CA
    EXPIRED = "expired"  # by the lab CA, for the hostname, validity ended a year ago
    WRONG_HOST = "wrong_host"  # by the lab CA, valid, but for another name

class BounceKind(enum.StrEnum):
    """What a rule's `bounce:` sends back to the envelope sender, later."""

    DSN = "dsn"  # an RFC 3464 delivery status notification (multipart/report)
    EXCHANGE = "exchange"  # Exchange's NDR layout, with the same delivery-status part
    AUTOREPLY = "autoreply"  # an RFC 3834 automatic reply (an out-of-office)
    ARF = "arf"  # an RFC 5965 abuse report (a complaint from a feedback loop)


#: Kinds that report a delivery status (and take `status:`).
STATUS_BOUNCES = frozenset({BounceKind.DSN, BounceKind.EXCHANGE})


class Outcome(enum.StrEnum):
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    DEFERRED = "deferred"

# --------------------------------------------------------------------- facts

@dataclass
class Facts:
    """What the engine knows when a rule is tested; built per decision."""

    phase: Phase
    client: ipaddress.IPv4Address | ipaddress.IPv6Address
    tls: bool
    connection: int
    state: str
    rng: random.Random
    helo: str | None = None
    auth_user: str | None = None
    mail_from: str | None = None
    rcpts: tuple[str, ...] = ()
    #: attempts per recipient (aligned with rcpts), or one number before RCPT
    attempts: tuple[int, ...] = ()
    #: seconds since each client/sender/recipient triplet was first seen
    first_seen_ages: tuple[float, ...] = ()
    message_index: int = 0
    rcpt_index: int = 0  # Nth RCPT command of this transaction
    size: int | None = None
    headers: Message | None = None
    body: str | None = None
    #: authentication results (None: not checked at this step)
    spf: str | None = None
    dkim: str | None = None
    dmarc: str | None = None
    #: header and body conditions tested ahead, off the event loop
    checks: ContentChecks | None = None


class ContentChecks:
    """The header and body conditions of a scenario's rules, tested on one
    message ahead of the decision (for a large message, in a worker thread:
    splitting, decoding and searching megabytes is no work for the event
    loop). A condition tests itself against a result here only when it is
    that very condition's (the scenario may have changed meanwhile)."""

    __slots__ = ("_results", "errors")

    def __init__(self) -> None:
        self._results: dict[int, tuple[Matcher, str | None]] = {}
        #: what went wrong testing (a pattern that gave up), for the engine to report
        self.errors: list[Exception] = []

    def add(self, matcher: Matcher, reason: str | None) -> None:
        self._results[id(matcher)] = (matcher, reason)

    def get(self, matcher: Matcher) -> tuple[bool, str | None]:
        """(known, why not): known False when `matcher` was not tested here."""
        got = self._results.get(id(matcher))
        if got is None or got[0] is not matcher:
            return False, None
        return True, got[1]

    def covers(self, matchers: Iterable[Matcher]) -> bool:
        return all(self.get(mt)[0] for mt in matchers)

# ------------------------------------------------------------------ matchers

#: A rule's regular expression gives up on one value (an address, a HELO
#: name, a header's value) after this many seconds, and on a message body
#: after BODY_TIMEOUT. A pattern that backtracks without end on what a
#: client sent ((a|aa)+$ on a long run of a's) would otherwise hold the
#: event loop, and every other session with it, for minutes. Python's re
#: has no time limit and holds the interpreter lock while it searches; the
#: regex module reads the same syntax, has a timeout, and lets go of the
#: lock for a body (`concurrent`).
VALUE_TIMEOUT = 0.25
BODY_TIMEOUT = 5.0

#: a rule's compiled expression: the regex module's (re's when the regex
#: module reads the text otherwise; none known)
Pattern = regex.Pattern[str] | re.Pattern[str]


class PatternTimeout(Exception):
    """A rule's regular expression took too long on a value: not matched."""


def compile_pattern(text: str) -> Pattern:
    """`text` read as Python's re reads it (its syntax, its errors: re.error
    is raised), searched by the regex module (a time limit)."""
    checked = re.compile(text)
    try:
        return regex.compile(text)
    except regex.error:  # pragma: no cover - no such text known
        return checked


def search(pattern: Pattern, value: str, timeout: float, *, concurrent: bool = False) -> bool:
    """Whether `pattern` is found in `value`; PatternTimeout when it could
    not tell within `timeout` seconds."""
    if isinstance(pattern, re.Pattern):  # pragma: no cover - see compile_pattern
        return pattern.search(value) is not None
    try:
        return pattern.search(value, timeout=timeout, concurrent=concurrent) is not None
    except TimeoutError:
        raise PatternTimeout(f"/{pattern.pattern}/ gave up after {timeout:g} s on "
                             f"{len(value):,} characters (taken as not matching)") from None


@dataclass(frozen=True)
class TextPattern:
    """Globs (case-insensitive, any of) or one regular expression."""

    globs: tuple[str, ...] = ()
    regex: Pattern | None = None

    def matches(self, value: str) -> bool:
        if self.regex is not None:
            return search(self.regex, value, VALUE_TIMEOUT)
        v = value.lower()
        return any(fnmatch.fnmatchcase(v, g.lower()) for g in self.globs)

    def __str__(self) -> str:
        if self.regex is not None:
            return f"/{self.regex.pattern}/"
        return self.globs[0] if len(self.globs) == 1 else "[" + ", ".join(self.globs) + "]"

def _null_sender(value: str) -> str:
    return "<>" if value == "" else value

@dataclass(frozen=True)
class Matcher:
    """Base: `key` names the `when:` entry; `check` returns None or why not."""

    key: str

    def check(self, facts: Facts) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError

@dataclass(frozen=True)
class ClientMatcher(Matcher):
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def check(self, facts: Facts) -> str | None:
        if any(facts.client in n for n in self.networks):
            return None
        return f"client {facts.client} is not in {', '.join(map(str, self.networks))}"

@dataclass(frozen=True)
class TextMatcher(Matcher):
    """helo, mail_from, auth_user: one value compared with a pattern."""

    pattern: TextPattern = field(default_factory=TextPattern)

    def check(self, facts: Facts) -> str | None:
        value = {"helo": facts.helo, "mail_from": facts.mail_from,
                 "auth_user": facts.auth_user}[self.key]
        if value is None and self.key == "auth_user":
            # the word "<none>" (not a glob such as "*") names a session
            # nobody has logged in to
            named = any(g.lower() == "<none>" for g in self.pattern.globs)
            return None if named else "nobody has authenticated"
        if value is None:
            return f"{self.key} is not known yet"
        if self.key == "mail_from":
            if self.pattern.matches(_null_sender(value)) or (
                value == "" and self.pattern.matches("")
            ):
                return None
            return f"mail_from {_null_sender(value)} does not match {self.pattern}"
        if self.pattern.matches(value):
            return None
        return f"{self.key} {value} does not match {self.pattern}"

@dataclass(frozen=True)
class RcptMatcher(Matcher):
    """Holds when any recipient in question matches."""

    pattern: TextPattern = field(default_factory=TextPattern)

    def check(self, facts: Facts) -> str | None:
        if any(self.pattern.matches(r) for r in facts.rcpts):
            return None
        got = ", ".join(facts.rcpts) or "no recipient"
        return f"rcpt {got} does not match {self.pattern}"

@dataclass(frozen=True)
class HeaderMatcher(Matcher):
    headers: tuple[tuple[str, TextPattern], ...] = ()

    def check(self, facts: Facts) -> str | None:
        if facts.checks is not None:
            known, reason = facts.checks.get(self)
            if known:
                return reason
        if facts.headers is None:
            return "headers are not known yet"
        for name, pattern in self.headers:
            values = facts.headers.get_all(name) or []
            if not any(pattern.matches(str(v)) for v in values):
                if not values:
                    return f"header {name} is absent"
                return f"header {name}: {values[0]!s} does not match {pattern}"
        return None

@dataclass(frozen=True)
class BodyMatcher(Matcher):
    contains: str | None = None
    regex: Pattern | None = None

    def check(self, facts: Facts) -> str | None:
        if facts.checks is not None:
            known, reason = facts.checks.get(self)
            if known:
                return reason
        if facts.body is None:
            return "the body is not known yet"
        if self.regex is not None:
            return None if search(self.regex, facts.body, BODY_TIMEOUT, concurrent=True) else (
                f"body does not match /{self.regex.pattern}/")
        assert self.contains is not None
        return None if self.contains.lower() in facts.body.lower() else (
            f"body does not contain {self.contains!r}")

@dataclass(frozen=True)
class BoolMatcher(Matcher):
    """tls: true/false."""

    value: bool = True

    def check(self, facts: Facts) -> str | None:
        return None if facts.tls == self.value else f"tls is {str(facts.tls).lower()}"

@dataclass(frozen=True)
class CompareMatcher(Matcher):
    """size, attempt, first_seen, connection, message_index, rcpt_index."""

    compare: Compare = field(default_factory=lambda: Compare("==", 0))

    def check(self, facts: Facts) -> str | None:
        values: tuple[float, ...]
        if self.key == "size":
            if facts.size is None:
                return "size is not known (no SIZE= declared)"
            values = (float(facts.size),)
        elif self.key == "attempt":
            values = tuple(float(a) for a in facts.attempts)
        elif self.key == "first_seen":
            values = facts.first_seen_ages
        elif self.key == "connection":
            values = (float(facts.connection),)
        elif self.key == "rcpt_index":
            values = (float(facts.rcpt_index),)
        else:
            values = (float(facts.message_index),)
        if any(self.compare.holds(v) for v in values):
            return None
        shown = ", ".join(_show(self.key, v) for v in values) or "nothing"
        return f"{self.key} is {shown}, wanted {self.compare}"

def _show(key: str, v: float) -> str:
    if key == "first_seen":
        return f"{v:.1f}s"
    return str(int(v)) if v == int(v) else str(v)

AUTH_RESULTS = {
    "spf": ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror"),
    "dkim": ("pass", "fail", "neutral", "policy", "none", "permerror", "temperror"),
    "dmarc": ("pass", "fail", "none", "permerror", "temperror"),
}


@dataclass(frozen=True)
class AuthMatcher(Matcher):
    """spf, dkim, dmarc: the check's result is one of these words."""

    results: tuple[str, ...] = ()

    def check(self, facts: Facts) -> str | None:
        value = {"spf": facts.spf, "dkim": facts.dkim, "dmarc": facts.dmarc}[self.key]
        if value is None:
            return f"{self.key} was not checked"
        if value in self.results:
            return None
        return f"{self.key} is {value}, wanted {' or '.join(self.results)}"


@dataclass(frozen=True)
class StateMatcher(Matcher):
    states: tuple[str, ...] = ()

    def check(self, facts: Facts) -> str | None:
        if facts.state in self.states:
            return None
        return f"state is {facts.state!r}, wanted {' or '.join(map(repr, self.states))}"

@dataclass(frozen=True)
class ChanceMatcher(Matcher):
    probability: float = 1.0

    def check(self, facts: Facts) -> str | None:
        draw = facts.rng.random()
        return None if draw < self.probability else (
            f"chance {self.probability:g} not drawn ({draw:.3f})")

# --------------------------------------------------------------------- delay

#: exp() of more than about 709.8 overflows a float; e**700 s is "forever" anyway.
_MAX_EXPONENT = 700.0

@dataclass(frozen=True)
class Delay:
    """fixed seconds, uniform [low, high], or lognormal (median, sigma)."""

    kind: Literal["fixed", "uniform", "lognormal"]
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        # rng.lognormvariate(mu, sigma) is exp(normalvariate(mu, sigma)); the
        # same draw, with the exponent capped so a wide sigma cannot overflow.
        return math.exp(min(rng.normalvariate(math.log(self.a), self.b), _MAX_EXPONENT))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.a:g}s"
        if self.kind == "uniform":
            return f"uniform {self.a:g}s..{self.b:g}s"
        return f"lognormal median {self.a:g}s sigma {self.b:g}"

# --------------------------------------------------------------------- rules

@dataclass(frozen=True, kw_only=True)
class Bounce:
    """`bounce:` on an `on: message` rule: accept the message, then, `after`
    seconds, send a report of `kind` to the envelope sender through the next
    hop the harness was given (--bounce-via)."""

    kind: BounceKind = BounceKind.DSN
    status: str | None = None  # enhanced status code (dsn, exchange)
    diagnostic: str | None = None  # the remote reply quoted, or the reply's text
    after: float = 0.0


@dataclass(frozen=True, kw_only=True)
class Rule:
    name: str
    on: Phase
    when: tuple[Matcher, ...] = ()
    reply: Reply | None = None
    delay: Delay | None = None
    close: bool = False  # `then: close`
    fault: Fault | None = None
    drip: float = 1.0  # tarpit: seconds between bytes
    after_bytes: int | None = None  # on: data faults: 354, read this much, then the fault
    set_state: str | None = None
    times: int | None = None
    bounce: Bounce | None = None  # on: message only: a report sent back later
    line: int = 0  # where the rule starts in its file (0: built in code)

@dataclass(frozen=True, kw_only=True)
class Extensions:
    pipelining: bool = True
    smtputf8: bool = True
    eightbitmime: bool = True
    enhancedstatuscodes: bool = True
    dsn: bool = True
    chunking: bool = True  # CHUNKING (BDAT) and BINARYMIME
    requiretls: bool = True  # advertised once TLS is on (RFC 8689)


@dataclass(frozen=True, kw_only=True)
class Tls:
    cert: str | None = None  # PEM file; with key, used instead of a made one
    key: str | None = None
    certificate: CertKind = CertKind.SELF_SIGNED


@dataclass(frozen=True, kw_only=True)
class Auth:
    mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    users: Mapping[str, str] = field(default_factory=dict)
    required: bool = False  # MAIL before AUTH gets 530 5.7.0
    before_tls: bool = False  # offer AUTH on a plaintext connection too


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    """A token bucket: `messages` per `per` seconds, per client IP or sender."""

    messages: int
    per: float
    key: Literal["client", "sender"] = "client"
    reply: Reply | None = None  # instead of the default 421 4.7.0 / 451 4.7.1


@dataclass(frozen=True, kw_only=True)
class Limits:
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    messages_per_connection: int | None = None
    recipients_per_message: int | None = None
    rate: RateLimit | None = None

@dataclass(frozen=True, kw_only=True)
class Server:
    hostname: str = "mx.harness.test"
    greeting: str = "ESMTP SMTP Harness"
    size_limit: int = 32 * 1024 * 1024
    timeout: float = 300.0  # idle timeout, RFC 5321 4.5.3.2.7 asks for 5 minutes
    #: the whole of one message's transfer (DATA's body, or a transaction's
    #: BDAT chunks): a client that drips, each byte within the idle
    #: timeout, is cut when this has passed
    data_timeout: float = 600.0
    extensions: Extensions = field(default_factory=Extensions)
    starttls: TlsMode = TlsMode.OFFER
    tls: Tls = field(default_factory=Tls)
    auth: Auth | None = None
    limits: Limits = field(default_factory=Limits)
    max_line_length: int | None = None  # longest DATA line taken, CRLF included

@dataclass(frozen=True, kw_only=True)
class ExpectedNdr:
    status: str | None = None
    action: str | None = None
    diagnostic: str | None = None  # a text the diagnostic code contains

@dataclass(frozen=True, kw_only=True)
class Expect:
    """What a correct sending MTA does (checked by lab verdicts)."""

    outcome: Outcome | None = None
    min_attempts: int | None = None
    max_attempts: int | None = None
    ndr: ExpectedNdr | None = None
    delay_notice: bool | None = None
    #: every interval between two attempts of a recipient lies in this range
    interval: Compare | None = None

@dataclass(frozen=True, kw_only=True)
class Send:
    """A test message that exercises the scenario (for tests and labs)."""

    mail_from: str = "sender@lab.test"
    rcpt: tuple[str, ...] = ("user@lab.test",)
    subject: str = "SMTP Harness test"
    size: int = 0  # pad the body to about this many bytes (0: a short text)

@dataclass(frozen=True, kw_only=True)
class Forward:
    """A server each accepted message is passed on to, after it is stored."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class Scenario:
    name: str
    summary: str = ""
    tags: tuple[str, ...] = ()
    server: Server = field(default_factory=Server)
    dns: Mapping[str, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    expect: Expect | None = None
    send: Send | None = None
    forward: Forward | None = None
    path: str = "<code>"
