"""Scenario files (YAML) into the frozen model, with every check at load time.

The YAML is composed into nodes (PyYAML's composer keeps line and column of
every node) and each scalar is interpreted here by what the key expects, never
by YAML 1.1's implicit typing: the key `on` stays the word "on" and a value
`off` stays "off" where a word is expected. All problems of a file are
collected and raised together as one ScenarioError whose lines read
`path:line:col: problem (hint)`.

Reads files only in `load_file`; everything else works on text."""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from harness.errors import Problem, ScenarioError
from harness.scenario import model as m
from harness.scenario.values import (
    Reply,
    parse_compare,
    parse_duration,
    parse_next_hop,
    parse_reply,
    parse_size,
)

T = TypeVar("T")

_TRUE = {"true", "yes", "on", "y"}
_FALSE = {"false", "no", "off", "n"}

TOP_KEYS = ("scenario", "summary", "tags", "server", "dns", "rules", "expect", "send",
            "forward")
SERVER_KEYS = ("hostname", "greeting", "size_limit", "timeout", "data_timeout", "extensions",
               "starttls", "tls", "auth", "limits", "max_line_length")
EXTENSION_KEYS = ("pipelining", "smtputf8", "8bitmime", "enhancedstatuscodes",
                  "dsn", "chunking", "requiretls")
TLS_KEYS = ("cert", "key", "certificate")
AUTH_KEYS = ("mechanisms", "users", "required", "before_tls")
AUTH_MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")
LIMIT_KEYS = ("max_connections", "max_connections_per_client", "messages_per_connection",
              "recipients_per_message", "rate")
RATE_KEYS = ("messages", "per", "key", "reply")
RULE_KEYS = ("name", "on", "when", "reply", "delay", "then", "fault", "drip",
             "after_bytes", "set_state", "times", "bounce")
BOUNCE_KEYS = ("kind", "status", "diagnostic", "after")
WHEN_KEYS = ("client", "helo", "mail_from", "rcpt", "header", "body", "size", "tls",
             "auth_user", "attempt", "first_seen", "connection", "message_index",
             "rcpt_index", "state", "chance", "spf", "dkim", "dmarc")
EXPECT_KEYS = ("outcome", "min_attempts", "max_attempts", "ndr", "delay_notice", "interval")
NDR_KEYS = ("status", "action", "diagnostic")
SEND_KEYS = ("mail_from", "rcpt", "subject", "size")
DNS_TYPES = ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "SOA")

#: Keys of the contract that this version does not implement yet: named in
#: the error so a user knows the key is right but the feature is not here.
NOT_YET: dict[str, str] = {}

#: Which `when:` keys are known at which phases.
_ANY = frozenset(m.Phase)
_AFTER_HELO = _ANY - {m.Phase.CONNECT}
WHEN_PHASES: dict[str, frozenset[m.Phase]] = {
    "client": _ANY,
    "connection": _ANY,
    "state": _ANY,
    "chance": _ANY,
    "tls": _ANY,
    "attempt": _ANY,
    "helo": _AFTER_HELO - {m.Phase.HELO} | {m.Phase.HELO},
    "auth_user": _AFTER_HELO - {m.Phase.HELO},
    "mail_from": m.TRANSACTION_PHASES,
    "message_index": m.TRANSACTION_PHASES,
    "rcpt_index": frozenset({m.Phase.RCPT}),
    "rcpt": m.RECIPIENT_PHASES,
    "first_seen": m.RECIPIENT_PHASES - {m.Phase.VRFY},
    "size": frozenset({m.Phase.MAIL, m.Phase.MESSAGE, m.Phase.BDAT}),
    "header": frozenset({m.Phase.MESSAGE}),
    "body": frozenset({m.Phase.MESSAGE}),
    # SPF is known from MAIL FROM on; DKIM and DMARC need the message
    "spf": frozenset({m.Phase.MAIL, m.Phase.RCPT, m.Phase.DATA, m.Phase.MESSAGE}),
    "dkim": frozenset({m.Phase.MESSAGE}),
    "dmarc": frozenset({m.Phase.MESSAGE}),
}


#: How deep a scenario's YAML may nest (mappings and lists): the deepest
#: part of the format (a rule's header pattern) is seven levels down. Deeper
#: text is refused at the first node too deep, before PyYAML's composer
#: (which recurses once per level) can run out of stack.
MAX_DEPTH = 32

#: Why a scenario that came over the API (or from any caller that says
#: allow_files=False) may not name a file: the answer would tell the caller
#: whether the file exists and what is in it.
FILES_REFUSED = ("file paths are only for scenarios loaded from the CLI or a config, "
                 "not for one sent over the API")


class _Collector:
    """Problems of one file, and helpers that read nodes into values."""

    def __init__(self, path: str, *, allow_files: bool = True) -> None:
        self.path = path
        self.allow_files = allow_files
        self.problems: list[Problem] = []

    def error(self, node: Node | None, message: str, hint: str | None = None) -> None:
        line, col = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
        self.problems.append(Problem(self.path, line, col, message, hint))

    # -- shapes ------------------------------------------------------------

    def mapping(self, node: Node, what: str, allowed: tuple[str, ...]) -> dict[str, Node]:
        """Keys to value nodes; unknown or duplicate keys are problems."""
        if not isinstance(node, MappingNode):
            self.error(node, f"{what} must be a mapping of keys to values")
            return {}
        out: dict[str, Node] = {}
        keynodes: dict[str, Node] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, ScalarNode):
                self.error(knode, f"a key in {what} must be a plain word")
                continue
            key = str(knode.value)
            if key in out:
                self.error(knode, f"{key} is given twice in {what}",
                           f"first at line {keynodes[key].start_mark.line + 1}")
                continue
            if key not in allowed:
                lowered = {a.lower(): a for a in allowed}
                close = difflib.get_close_matches(key.lower(), list(lowered), n=1, cutoff=0.6)
                if close:
                    hint = f"did you mean {lowered[close[0]]}?"
                elif what.startswith("rule") and key in WHEN_KEYS:
                    hint = f"{key} is a condition: put it under when:"
                else:
                    hint = "known keys: " + ", ".join(allowed)
                self.error(knode, f"unknown key {key} in {what}", hint)
                continue
            if key in NOT_YET:
                self.error(knode, f"{key} is not supported by this version", NOT_YET[key])
                continue
            out[key] = vnode
            keynodes[key] = knode
        return out

    def scalar(self, node: Node, what: str) -> str | None:
        if not isinstance(node, ScalarNode):
            self.error(node, f"{what} must be a single value, not a "
                       f"{'list' if isinstance(node, SequenceNode) else 'mapping'}")
            return None
        if node.tag == "tag:yaml.org,2002:null" and node.style is None and (
            node.value in ("", "~", "null", "Null", "NULL")
        ):
            self.error(node, f"{what} is empty")
            return None
        return str(node.value)

    def word(self, node: Node, what: str, choices: tuple[str, ...] | None = None) -> str | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        if choices is not None and value.lower() not in choices:
            close = difflib.get_close_matches(value.lower(), choices, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else "one of: " + ", ".join(choices)
            self.error(node, f"{what} cannot be {value!r}", hint)
            return None
        return value.lower() if choices is not None else value

    def boolean(self, node: Node, what: str) -> bool | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        self.error(node, f"{what} must be true or false, not {value!r}")
        return None

    def integer(self, node: Node, what: str, minimum: int = 0) -> int | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        if not re.fullmatch(r"\d+", value.strip()):
            self.error(node, f"{what} must be a whole number, not {value!r}")
            return None
        n = int(value)
        if n < minimum:
            self.error(node, f"{what} must be at least {minimum}, not {n}")
            return None
        return n

    def parsed(self, node: Node, what: str, fn: Callable[[str], T]) -> T | None:
        value = self.scalar(node, what)
        if value is None:
            return None
        try:
            return fn(value)
        except ValueError as e:
            self.error(node, f"{what}: {e}")
            return None

    def strings(self, node: Node, what: str) -> list[tuple[str, Node]]:
        """A word or a list of words, each with its node."""
        if isinstance(node, SequenceNode):
            out = []
            for item in node.value:
                v = self.scalar(item, f"an item of {what}")
                if v is not None:
                    out.append((v, item))
            if not node.value:
                self.error(node, f"{what} is an empty list")
            return out
        v = self.scalar(node, what)
        return [(v, node)] if v is not None else []


# ------------------------------------------------------------------ pieces


def _pattern(c: _Collector, node: Node, what: str) -> m.TextPattern | None:
    if isinstance(node, MappingNode):
        keys = c.mapping(node, what, ("regex",))
        if "regex" not in keys:
            if keys or not node.value:
                c.error(node, f"{what} as a mapping takes one key, regex")
            return None
        text = c.scalar(keys["regex"], f"{what} regex")
        if text is None:
            return None
        try:
            return m.TextPattern(regex=m.compile_pattern(text))
        except re.error as e:
            c.error(keys["regex"], f"{what} regex does not compile: {e}")
            return None
    globs = [v for v, _ in c.strings(node, what)]
    return m.TextPattern(globs=tuple(globs)) if globs else None


def _client(c: _Collector, node: Node) -> m.Matcher | None:
    nets = []
    for text, item in c.strings(node, "client"):
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            c.error(item, f"client {text!r} is not an IP address or CIDR network",
                    "e.g. 127.0.0.1 or 10.0.0.0/8")
    return m.ClientMatcher("client", tuple(nets)) if nets else None


def _headers(c: _Collector, node: Node) -> m.Matcher | None:
    if not isinstance(node, MappingNode):
        c.error(node, "header must map header names to patterns",
                "e.g. header: {Subject: '*invoice*'}")
        return None
    pairs = []
    for knode, vnode in node.value:
        name = c.scalar(knode, "a header name")
        if name is None:
            continue
        if not re.fullmatch(r"[!-9;-~]+", name):
            c.error(knode, f"{name!r} is not a header field name")
            continue
        p = _pattern(c, vnode, f"header {name}")
        if p is not None:
            pairs.append((name, p))
    return m.HeaderMatcher("header", tuple(pairs)) if pairs else None


def _body(c: _Collector, node: Node) -> m.Matcher | None:
    if isinstance(node, MappingNode):
        keys = c.mapping(node, "body", ("contains", "regex"))
        if len(keys) != 1:
            if keys:
                c.error(node, "body takes contains or regex, not both")
            return None
        (key, vnode), = keys.items()
        text = c.scalar(vnode, f"body {key}")
        if text is None:
            return None
        if key == "contains":
            return m.BodyMatcher("body", contains=text)
        try:
            return m.BodyMatcher("body", regex=m.compile_pattern(text))
        except re.error as e:
            c.error(vnode, f"body regex does not compile: {e}")
            return None
    text = c.scalar(node, "body")
    return m.BodyMatcher("body", contains=text) if text is not None else None


def _when(c: _Collector, node: Node, phase: m.Phase | None) -> tuple[m.Matcher, ...]:
    keys = c.mapping(node, "when", WHEN_KEYS)
    out: list[m.Matcher] = []
    for key, vnode in keys.items():
        knode = _key_node(node, key)
        if phase is not None and phase not in WHEN_PHASES[key]:
            known = sorted(p.value for p in WHEN_PHASES[key])
            c.error(knode, f"{key} is not known at on: {phase.value}",
                    f"it can be used on: {', '.join(known)}")
            continue
        matcher: m.Matcher | None = None
        if key == "client":
            matcher = _client(c, vnode)
        elif key in ("helo", "mail_from", "auth_user"):
            p = _pattern(c, vnode, key)
            matcher = m.TextMatcher(key, p) if p else None
        elif key == "rcpt":
            p = _pattern(c, vnode, key)
            matcher = m.RcptMatcher(key, p) if p else None
        elif key == "header":
            matcher = _headers(c, vnode)
        elif key == "body":
            matcher = _body(c, vnode)
        elif key == "tls":
            b = c.boolean(vnode, "tls")
            matcher = m.BoolMatcher(key, b) if b is not None else None
        elif key in ("size", "attempt", "first_seen", "connection", "message_index",
                     "rcpt_index"):
            unit = {"size": "size", "first_seen": "duration"}.get(key, "count")
            cmp = c.parsed(vnode, key, lambda s, u=unit: parse_compare(s, u))  # type: ignore[misc]
            matcher = m.CompareMatcher(key, cmp) if cmp is not None else None
        elif key == "state":
            states = [v for v, _ in c.strings(vnode, "state")]
            matcher = m.StateMatcher(key, tuple(states)) if states else None
        elif key == "chance":
            matcher = _chance(c, vnode)
        elif key in m.AUTH_RESULTS:
            words = []
            for text, item in c.strings(vnode, key):
                if text.lower() not in m.AUTH_RESULTS[key]:
                    c.error(item, f"{key} cannot be {text!r}",
                            "one of: " + ", ".join(m.AUTH_RESULTS[key]))
                else:
                    words.append(text.lower())
            matcher = m.AuthMatcher(key, tuple(words)) if words else None
        if matcher is not None:
            out.append(matcher)
    return tuple(out)


def _chance(c: _Collector, node: Node) -> m.Matcher | None:
    text = c.scalar(node, "chance")
    if text is None:
        return None
    try:
        p = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        c.error(node, f"chance must be a probability such as 0.25 or 25%, not {text!r}")
        return None
    if not 0.0 <= p <= 1.0:
        c.error(node, f"chance must be between 0 and 1, not {text}")
        return None
    return m.ChanceMatcher("chance", p)


def _delay(c: _Collector, node: Node) -> m.Delay | None:
    if isinstance(node, MappingNode):
        keys = c.mapping(node, "delay", ("uniform", "lognormal"))
        if len(keys) != 1:
            if not keys and node.value:
                return None
            c.error(node, "delay takes a duration, {uniform: [low, high]} "
                    "or {lognormal: {median, sigma}}")
            return None
        (kind, vnode), = keys.items()
        if kind == "uniform":
            items = c.strings(vnode, "delay uniform")
            if len(items) != 2:
                c.error(vnode, "delay uniform takes two durations [low, high]")
                return None
            lo = c.parsed(items[0][1], "delay uniform low", parse_duration)
            hi = c.parsed(items[1][1], "delay uniform high", parse_duration)
            if lo is None or hi is None:
                return None
            if hi < lo:
                c.error(vnode, f"delay uniform high ({items[1][0]}) is below low ({items[0][0]})")
                return None
            return m.Delay("uniform", lo, hi)
        keys2 = c.mapping(vnode, "delay lognormal", ("median", "sigma"))
        if set(keys2) != {"median", "sigma"}:
            if len(keys2) == len(getattr(vnode, "value", [])):
                c.error(vnode, "delay lognormal needs median and sigma",
                        "e.g. {median: 2s, sigma: 0.5}")
            return None
        median = c.parsed(keys2["median"], "delay lognormal median", parse_duration)
        sigma = c.parsed(keys2["sigma"], "delay lognormal sigma", float)
        if median is None or sigma is None:
            return None
        if median <= 0 or not math.isfinite(sigma) or sigma < 0:
            c.error(vnode, "delay lognormal needs median > 0 and a finite sigma >= 0")
            return None
        return m.Delay("lognormal", median, sigma)
    seconds = c.parsed(node, "delay", parse_duration)
    return m.Delay("fixed", seconds) if seconds is not None else None


def _reply(c: _Collector, node: Node) -> Reply | None:
    try:
        if isinstance(node, SequenceNode):
            lines: list[str] = []
            for item in node.value:
                v = c.scalar(item, "a reply line")
                if v is None:
                    return None
                lines.append(v)
            return parse_reply(lines)
        v = c.scalar(node, "reply")
        return parse_reply(v) if v is not None else None
    except ValueError as e:
        c.error(node, f"reply: {e}")
        return None


def _key_node(mapping: Node, key: str) -> Node:
    for knode, _ in mapping.value:
        if isinstance(knode, ScalarNode) and knode.value == key:
            return knode
    return mapping


def _rule(c: _Collector, node: Node, index: int, names: dict[str, Node]) -> m.Rule | None:
    first = len(c.problems)
    keys = c.mapping(node, f"rule {index + 1}", RULE_KEYS)
    if not isinstance(node, MappingNode):
        return None
    before = len(c.problems)
    phase: m.Phase | None = None
    if "on" not in keys:
        # A misspelt `on` was already reported with "did you mean on?".
        if not any(p.hint == "did you mean on?" for p in c.problems[first:]):
            c.error(node, f"rule {index + 1} has no on:",
                    "on: connect, helo, mail, rcpt, data, message, ...")
    else:
        word = c.word(keys["on"], "on", tuple(p.value for p in m.Phase))
        if word is not None:
            phase = m.Phase(word)
    # Unnamed rules are called "rule N"; those names take part in the
    # duplicate check too (the engine counts `times` uses by name).
    name = f"rule {index + 1}"
    name_node: Node = node
    if "name" in keys:
        given = c.scalar(keys["name"], "name")
        if given is not None and not given.strip():
            c.error(keys["name"], "name is empty", "leave it out to be called "
                    f"'rule {index + 1}'")  # found by the loader fuzz target
        elif given is not None:
            name = given
            name_node = keys["name"]
    if name in names:
        c.error(name_node, f"rule name {name!r} is used twice",
                f"first at line {names[name].start_mark.line + 1}")
    else:
        names[name] = name_node
    when = _when(c, keys["when"], phase) if "when" in keys else ()
    reply = _reply(c, keys["reply"]) if "reply" in keys else None
    delay = _delay(c, keys["delay"]) if "delay" in keys else None
    close = False
    if "then" in keys:
        close = c.word(keys["then"], "then", ("close",)) == "close"
    fault: m.Fault | None = None
    if "fault" in keys:
        f = c.word(keys["fault"], "fault", tuple(x.value for x in m.Fault))
        fault = m.Fault(f) if f else None
    drip = 1.0
    if "drip" in keys:
        d = c.parsed(keys["drip"], "drip", parse_duration)
        drip = d if d is not None else drip
        if fault is not m.Fault.TARPIT:
            c.error(keys["drip"], "drip only applies to fault: tarpit")
    after_bytes: int | None = None
    if "after_bytes" in keys:
        after_bytes = c.parsed(keys["after_bytes"], "after_bytes", parse_size)
        if phase is not m.Phase.DATA or fault not in (m.Fault.DROP, m.Fault.RESET,
                                                        m.Fault.HANG):
            c.error(keys["after_bytes"],
                    "after_bytes applies to on: data with fault: drop, reset or hang",
                    "the server answers 354, reads that much of the body, then the fault")
    set_state = c.scalar(keys["set_state"], "set_state") if "set_state" in keys else None
    times = c.integer(keys["times"], "times", minimum=1) if "times" in keys else None
    bounce = _bounce(c, keys, phase, reply, fault) if "bounce" in keys else None

    # Combinations that cannot be played on the wire.
    if fault is m.Fault.TLS_FAIL:
        if phase is not None and phase is not m.Phase.STARTTLS:
            c.error(keys["fault"], "fault: tls_fail only fits on: starttls")
        if reply is not None:
            c.error(keys["fault"], "fault: tls_fail answers 220 itself, then breaks the "
                    "handshake; remove reply (or reply 454 4.7.0 without the fault)")
    if fault in (m.Fault.DROP, m.Fault.RESET, m.Fault.HANG):
        if reply is not None:
            c.error(keys["fault"], f"fault: {fault.value} sends no reply, yet the rule has one",
                    "remove reply, or use then: close to reply and hang up")
        if close:
            c.error(keys["then"], f"then: close cannot follow fault: {fault.value}")
    if reply is not None and phase is not None:
        if reply.code // 100 == 3 and phase is not m.Phase.DATA:
            c.error(keys["reply"], f"a {reply.code} reply means 'go on' and only fits on: data")
        if phase is m.Phase.DATA and reply.code // 100 == 2:
            c.error(keys["reply"], "on: data takes 354 to go on, or a 4xx/5xx to refuse")
        if phase is m.Phase.STARTTLS and reply.code // 100 == 2 and reply.code != 220:
            c.error(keys["reply"], f"STARTTLS goes ahead with 220, not {reply.code}")
        if phase is m.Phase.CONNECT and reply.code // 100 == 2 and reply.code != 220:
            c.error(keys["reply"], f"a banner is 220 (or 421/554 to refuse), not {reply.code}")
        if phase is m.Phase.QUIT and reply.code // 100 != 2:
            c.error(keys["reply"], "QUIT can only be answered 221; use a fault to misbehave")
    outcomes = ("reply", "delay", "then", "fault", "set_state", "bounce")
    misspelt = {f"did you mean {k}?" for k in outcomes}
    if not any(k in keys for k in outcomes) and not any(
        p.hint in misspelt for p in c.problems[first:]  # reported already
    ):
        c.error(node, f"{name} does nothing",
                "give it a reply, delay, then, fault, set_state or bounce")
    if len(c.problems) > before or phase is None:
        return None
    return m.Rule(name=name, on=phase, when=when, reply=reply, delay=delay, close=close,
                  fault=fault, drip=drip, after_bytes=after_bytes, set_state=set_state, times=times,
                  bounce=bounce, line=node.start_mark.line + 1)


_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
#: An enhanced status code inside a text ("550 5.1.1 User unknown").
_STATUS_IN_TEXT = re.compile(r"(?<![\w.])([245]\.\d{1,3}\.\d{1,3})(?![\w.]*\d)")
_LEADING_CODE = re.compile(r"^\s*#?([245])\d\d(?:[ -]|$)")


def _bounce(c: _Collector, keys: dict[str, Node], phase: m.Phase | None,
            reply: Reply | None, fault: m.Fault | None) -> m.Bounce | None:
    """`bounce:` of a rule: what is sent back to the sender, and when."""
    node = keys["bounce"]
    before = len(c.problems)
    bkeys = c.mapping(node, "bounce", BOUNCE_KEYS)
    if not isinstance(node, MappingNode):
        return None
    if phase is not None and phase is not m.Phase.MESSAGE:
        c.error(node, "bounce applies to on: message",
                "the message must be accepted and known before it can be bounced")
    if reply is not None and not reply.is_positive:
        c.error(keys["reply"], f"a rule that bounces later accepts the message first; "
                f"{reply.code} refuses it", "give a 2xx reply, or none (250)")
    if fault in (m.Fault.DROP, m.Fault.RESET, m.Fault.HANG):
        c.error(keys["fault"], f"fault: {fault.value} never accepts the message, so nothing "
                "is bounced later", "remove the fault, or the bounce")
    kind = m.BounceKind.DSN
    if "kind" in bkeys:
        word = c.word(bkeys["kind"], "bounce kind", tuple(k.value for k in m.BounceKind))
        if word is not None:
            kind = m.BounceKind(word)
    status: str | None = None
    if "status" in bkeys:
        status = c.scalar(bkeys["status"], "bounce status")
        if status is not None and not _STATUS.fullmatch(status.strip()):
            c.error(bkeys["status"], f"bounce status {status!r} is not an enhanced status code",
                    "e.g. 5.1.1: class 2, 4 or 5, then subject and detail, RFC 3463")
            status = None
        elif status is not None:
            status = status.strip()
            if kind not in m.STATUS_BOUNCES:
                c.error(bkeys["status"], f"status applies to kind dsn or exchange, not "
                        f"{kind.value}", "an auto-reply or a complaint reports no status")
                status = None
            elif kind is m.BounceKind.EXCHANGE and status[0] == "2":
                c.error(bkeys["status"], "Exchange writes an NDR for a failure (5) or a "
                        "delay (4), not for a success", "use kind: dsn for a success notice")
    diagnostic = None
    if "diagnostic" in bkeys:
        diagnostic = c.scalar(bkeys["diagnostic"], "bounce diagnostic")
    if diagnostic is not None and kind in m.STATUS_BOUNCES:
        stated = _STATUS_IN_TEXT.search(diagnostic)
        lead = _LEADING_CODE.match(diagnostic)
        if status is None and stated is not None:
            status = stated.group(1)  # "550 5.1.1 User unknown" says the status
        elif status is not None and stated is not None and stated.group(1) != status:
            c.error(bkeys["diagnostic"], f"the diagnostic states {stated.group(1)} but status "
                    f"is {status}", "give the same code, or leave status out to take the "
                    "diagnostic's")
        # 550 with 4.4.7 is what Exchange writes when a message expires; a
        # success and a failure cannot mix
        if status is not None and lead is not None and (lead.group(1) == "2") != (
                status[0] == "2"):
            c.error(bkeys["diagnostic"], f"the diagnostic's reply code is class "
                    f"{lead.group(1)}, the status class {status[0]}",
                    "e.g. 550 with 5.x.x, 451 with 4.x.x, 250 with 2.x.x")
    if kind in m.STATUS_BOUNCES and status is None and len(c.problems) == before:
        c.error(node, f"bounce kind {kind.value} needs a status",
                "e.g. status: 5.1.1, or a diagnostic such as '550 5.1.1 User unknown'")
    after = 0.0
    if "after" in bkeys:
        got = c.parsed(bkeys["after"], "bounce after", parse_duration)
        after = got if got is not None else after
    if len(c.problems) > before:
        return None
    return m.Bounce(kind=kind, status=status, diagnostic=diagnostic, after=after)


def _server(c: _Collector, node: Node) -> m.Server:
    keys = c.mapping(node, "server", SERVER_KEYS)
    kw: dict[str, Any] = {}
    if "hostname" in keys:
        host = c.scalar(keys["hostname"], "hostname")
        if host is not None:
            if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", host):
                c.error(keys["hostname"], f"hostname {host!r} is not a host name")
            else:
                kw["hostname"] = host
    if "greeting" in keys:
        g = c.scalar(keys["greeting"], "greeting")
        if g is not None:
            kw["greeting"] = g
    if "size_limit" in keys:
        size = c.parsed(keys["size_limit"], "size_limit", parse_size)
        if size is not None:
            kw["size_limit"] = size
    if "data_timeout" in keys:
        t = c.parsed(keys["data_timeout"], "data_timeout", parse_duration)
        if t is not None:
            if t <= 0:
                c.error(keys["data_timeout"], "data_timeout must be above zero")
            else:
                kw["data_timeout"] = t
    if "timeout" in keys:
        t = c.parsed(keys["timeout"], "timeout", parse_duration)
        if t is not None:
            if t <= 0:
                c.error(keys["timeout"], "timeout must be above zero")
            else:
                kw["timeout"] = t
    if "extensions" in keys:
        ext = c.mapping(keys["extensions"], "extensions", EXTENSION_KEYS)
        ekw: dict[str, bool] = {}
        for key, vnode in ext.items():
            b = c.boolean(vnode, f"extensions {key}")
            if b is not None:
                ekw["eightbitmime" if key == "8bitmime" else key] = b
        kw["extensions"] = m.Extensions(**ekw)
    if "starttls" in keys:
        mode = c.word(keys["starttls"], "starttls", tuple(x.value for x in m.TlsMode))
        if mode is not None:
            kw["starttls"] = m.TlsMode(mode)
    if "tls" in keys:
        kw["tls"] = _tls(c, keys["tls"])
    if "auth" in keys:
        kw["auth"] = _auth(c, keys["auth"])
        if (kw["auth"] is not None and not kw["auth"].before_tls
                and kw.get("starttls") is m.TlsMode.OFF):
            c.error(keys["auth"], "auth is offered only after STARTTLS, which is off",
                    "set starttls: offer, or auth before_tls: true")
    if "limits" in keys:
        kw["limits"] = _limits(c, keys["limits"])
    if "max_line_length" in keys:
        n = c.parsed(keys["max_line_length"], "max_line_length", parse_size)
        if n is not None:
            if n < 3:
                c.error(keys["max_line_length"], "max_line_length must be at least 3 bytes")
            else:
                kw["max_line_length"] = n
    return m.Server(**kw)


def _tls(c: _Collector, node: Node) -> m.Tls:
    keys = c.mapping(node, "tls", TLS_KEYS)
    kw: dict[str, Any] = {}
    base = Path(c.path).parent if not c.path.startswith("<") else Path(".")
    for key in ("cert", "key"):
        if key in keys:
            text = c.scalar(keys[key], f"tls {key}")
            if text is None:
                continue
            if not c.allow_files:  # refused before any look at the file system
                c.error(keys[key], f"tls {key} names a file on the server", FILES_REFUSED
                        + "; use tls: {certificate: ...} to have one made")
                continue
            path = Path(text) if Path(text).is_absolute() else base / text
            if not path.is_file():
                c.error(keys[key], f"tls {key} file {text} does not exist",
                        f"looked at {path}")
                continue
            kw[key] = str(path)
    if ("cert" in keys) != ("key" in keys) and c.allow_files:
        c.error(node, "tls needs both cert and key, or neither")
    if "certificate" in keys:
        kind = c.word(keys["certificate"], "tls certificate", tuple(x.value for x in m.CertKind))
        if kind is not None:
            kw["certificate"] = m.CertKind(kind)
            if "cert" in keys:
                c.error(keys["certificate"], "tls certificate makes a certificate; "
                        "it cannot go with cert and key files")
    return m.Tls(**kw)


def _auth(c: _Collector, node: Node) -> m.Auth | None:
    keys = c.mapping(node, "auth", AUTH_KEYS)
    if not isinstance(node, MappingNode):
        return None
    kw: dict[str, Any] = {}
    if "mechanisms" in keys:
        mechs = []
        for text, item in c.strings(keys["mechanisms"], "auth mechanisms"):
            if text.upper() not in AUTH_MECHANISMS:
                c.error(item, f"auth mechanism {text!r} is not supported",
                        "one of: " + ", ".join(AUTH_MECHANISMS))
            else:
                mechs.append(text.upper())
        kw["mechanisms"] = tuple(mechs)
    if "users" in keys:
        unode = keys["users"]
        if not isinstance(unode, MappingNode):
            c.error(unode, "auth users must map user names to passwords",
                    "e.g. users: {alice: s3cret}")
        else:
            users: dict[str, str] = {}
            for knode, vnode in unode.value:
                name = c.scalar(knode, "a user name")
                password = c.scalar(vnode, f"the password of {name}")
                if name is not None and password is not None:
                    users[name] = password
            kw["users"] = users
    for key in ("required", "before_tls"):
        if key in keys:
            b = c.boolean(keys[key], f"auth {key}")
            if b is not None:
                kw[key] = b
    return m.Auth(**kw)


def _limits(c: _Collector, node: Node) -> m.Limits:
    keys = c.mapping(node, "limits", LIMIT_KEYS)
    kw: dict[str, Any] = {}
    for key in LIMIT_KEYS[:-1]:
        if key in keys:
            kw[key] = c.integer(keys[key], key, minimum=1)
    if "rate" in keys:
        rkeys = c.mapping(keys["rate"], "limits rate", RATE_KEYS)
        messages = c.integer(rkeys["messages"], "rate messages", 1) if "messages" in rkeys \
            else None
        per = c.parsed(rkeys["per"], "rate per", parse_duration) if "per" in rkeys else None
        key = "client"
        if "key" in rkeys:
            key = c.word(rkeys["key"], "rate key", ("client", "sender")) or key
        rate_reply = _reply(c, rkeys["reply"]) if "reply" in rkeys else None
        if rate_reply is not None and rate_reply.code < 400:
            c.error(rkeys["reply"], "a rate limit refuses: give a 4xx or 5xx reply")
        missing = isinstance(keys["rate"], MappingNode) and not {"messages", "per"} <= set(rkeys)
        if missing:
            c.error(keys["rate"], "limits rate needs messages and per",
                    "e.g. rate: {messages: 5, per: 1m}")
        if messages is None or per is None:
            pass  # reported above, or by the value's own check
        elif per <= 0:
            c.error(rkeys["per"], "rate per must be above zero")
        else:
            kw["rate"] = m.RateLimit(messages=messages, per=per, key=key,  # type: ignore[arg-type]
                                     reply=rate_reply)
    return m.Limits(**kw)


def _dns(c: _Collector, node: Node) -> dict[str, dict[str, tuple[str, ...]]]:
    if not isinstance(node, MappingNode):
        c.error(node, "dns must map names to records", "e.g. lab.test: {TXT: ['v=spf1 -all']}")
        return {}
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for knode, vnode in node.value:
        name = c.scalar(knode, "a DNS name")
        if name is None:
            continue
        records = c.mapping(vnode, f"dns {name}", DNS_TYPES)
        out[name.lower().rstrip(".")] = {
            rtype: tuple(v for v, _ in c.strings(rnode, f"dns {name} {rtype}"))
            for rtype, rnode in records.items()
        }
    return out


def _expect(c: _Collector, node: Node) -> m.Expect:
    keys = c.mapping(node, "expect", EXPECT_KEYS)
    kw: dict[str, Any] = {}
    if "outcome" in keys:
        o = c.word(keys["outcome"], "outcome", tuple(x.value for x in m.Outcome))
        if o:
            kw["outcome"] = m.Outcome(o)
    for key in ("min_attempts", "max_attempts"):
        if key in keys:
            kw[key] = c.integer(keys[key], key, minimum=1)
    if kw.get("min_attempts") and kw.get("max_attempts") and (
        kw["min_attempts"] > kw["max_attempts"]
    ):
        c.error(keys["max_attempts"], "max_attempts is below min_attempts")
    if "delay_notice" in keys:
        kw["delay_notice"] = c.boolean(keys["delay_notice"], "delay_notice")
    if "interval" in keys:
        kw["interval"] = c.parsed(keys["interval"], "interval",
                                  lambda t: parse_compare(t, "duration"))
    if "ndr" in keys:
        nd = c.mapping(keys["ndr"], "expect ndr", NDR_KEYS)
        nkw: dict[str, str | None] = {}
        if "status" in nd:
            s = c.scalar(nd["status"], "ndr status")
            if s is not None and not re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", s):
                c.error(nd["status"], f"ndr status {s!r} is not an enhanced status code",
                        "e.g. 5.1.1")
            nkw["status"] = s
        if "action" in nd:
            nkw["action"] = c.word(nd["action"], "ndr action",
                                   ("failed", "delayed", "delivered", "relayed", "expanded"))
        if "diagnostic" in nd:
            nkw["diagnostic"] = c.scalar(nd["diagnostic"], "ndr diagnostic")
        kw["ndr"] = m.ExpectedNdr(**nkw)
    return m.Expect(**kw)


def _send(c: _Collector, node: Node) -> m.Send:
    keys = c.mapping(node, "send", SEND_KEYS)
    kw: dict[str, Any] = {}
    if "mail_from" in keys:
        kw["mail_from"] = c.scalar(keys["mail_from"], "send mail_from") or ""
    if "rcpt" in keys:
        kw["rcpt"] = tuple(v for v, _ in c.strings(keys["rcpt"], "send rcpt"))
    if "subject" in keys:
        kw["subject"] = c.scalar(keys["subject"], "send subject") or ""
    if "size" in keys:
        size = c.parsed(keys["size"], "send size", parse_size)
        if size is not None:
            kw["size"] = size
    return m.Send(**kw)


def _scenario(c: _Collector, root: Node, default_name: str) -> m.Scenario | None:
    keys = c.mapping(root, "the scenario", TOP_KEYS)
    if not isinstance(root, MappingNode):
        return None
    name = default_name
    if "scenario" in keys:
        name = c.scalar(keys["scenario"], "scenario") or name
    summary = c.scalar(keys["summary"], "summary") or "" if "summary" in keys else ""
    tags = tuple(v for v, _ in c.strings(keys["tags"], "tags")) if "tags" in keys else ()
    server = _server(c, keys["server"]) if "server" in keys else m.Server()
    dns = _dns(c, keys["dns"]) if "dns" in keys else {}
    rules: list[m.Rule] = []
    if "rules" in keys:
        rnode = keys["rules"]
        if not isinstance(rnode, SequenceNode):
            c.error(rnode, "rules must be a list of rules", "each item starts with '- on: ...'")
        else:
            names: dict[str, Node] = {}
            for i, item in enumerate(rnode.value):
                rule = _rule(c, item, i, names)
                if rule is not None:
                    rules.append(rule)
    expect = _expect(c, keys["expect"]) if "expect" in keys else None
    send = _send(c, keys["send"]) if "send" in keys else None
    forward = None
    if "forward" in keys:
        hop = c.parsed(keys["forward"], "forward", parse_next_hop)
        forward = m.Forward(host=hop[0], port=hop[1]) if hop is not None else None
    return m.Scenario(name=name, summary=summary, tags=tags, server=server, dns=dns,
                      rules=tuple(rules), expect=expect, send=send, forward=forward,
                      path=c.path)


class _TooDeepError(yaml.MarkedYAMLError):
    """YAML nested deeper than MAX_DEPTH (raised by the composer below)."""


class _DepthLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a bound on nesting: its composer recurses
    once per level, so a text of thousands of `[` would end in RecursionError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise _TooDeepError(problem=f"nested deeper than {MAX_DEPTH} levels",
                                    problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


_ESCAPE = re.compile(r"\\(?:U([0-9A-Fa-f]{8})|u([0-9A-Fa-f]{4})|x([0-9A-Fa-f]{2}))")


def _bad_escape(text: str) -> tuple[int, int]:
    """Line and column of the first escape beyond Unicode (found by the
    loader fuzz target; PyYAML raises a bare ValueError for it)."""
    for found in _ESCAPE.finditer(text):
        if int(next(g for g in found.groups() if g), 16) > 0x10FFFF:
            before = text[:found.start()]
            return before.count("\n") + 1, found.start() - (before.rfind("\n") + 1) + 1
    return 1, 1


def _compose(c: _Collector, text: str) -> Node | None:
    try:
        node = yaml.compose(text, Loader=_DepthLoader)
    except _TooDeepError as e:
        mark = e.problem_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        c.problems.append(Problem(c.path, line, col, f"the text is {e.problem}",
                                  "a scenario needs no more than seven"))
        return None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        c.problems.append(Problem(c.path, line, col, f"not valid YAML: {e.problem}",
                                  e.context or None))
        return None
    except yaml.YAMLError as e:
        c.problems.append(Problem(c.path, 1, 1, f"not valid YAML: {e}"))
        return None
    except ValueError:  # PyYAML's chr() of a "\UXXXXXXXX" escape past U+10FFFF
        line, col = _bad_escape(text)
        c.problems.append(Problem(c.path, line, col, "not valid YAML: an escape names no "
                                  "Unicode character", "the largest is \\U0010FFFF"))
        return None
    if node is None:
        c.problems.append(Problem(c.path, 1, 1, "the file is empty",
                                  "a scenario needs at least a summary or rules"))
    return node


def load_text(text: str, path: str = "<string>", default_name: str | None = None, *,
              allow_files: bool = True) -> m.Scenario:
    """Parse scenario YAML; raises ScenarioError listing every problem.

    `allow_files=False` (the API's scenarios) refuses every key that names a
    file on this machine (tls cert and key) without looking at the file."""
    c = _Collector(path, allow_files=allow_files)
    root = _compose(c, text)
    scenario = _scenario(c, root, default_name or Path(path).stem) if root is not None else None
    if c.problems or scenario is None:
        c.problems.sort(key=lambda p: (p.line, p.column))
        raise ScenarioError(c.problems)
    return scenario


def load_file(path: str | Path) -> m.Scenario:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError([Problem(str(p), 1, 1, f"not UTF-8 text: {e.reason}")]) from e
    except OSError as e:
        raise ScenarioError([Problem(str(p), 1, 1, f"cannot read: {e.strerror}")]) from e
    return load_text(text, str(p), default_name=p.stem)


def load_zone_text(text: str, path: str = "<string>", *, allow_files: bool = True
                   ) -> dict[str, dict[str, tuple[str, ...]]]:
    """A DNS zone in the scenario `dns:` format, for `harness probe --dns
    ZONE.yaml`: either a scenario file (its dns: section; the rest is
    checked too) or the mapping alone (`lab.test: {MX: [10 mx1.lab.test]}`).
    Every value is checked (addresses, MX and SOA shapes); problems are
    raised together, positioned, as for a scenario."""
    from harness.analysis.dns import zone_problems

    c = _Collector(path, allow_files=allow_files)
    root = _compose(c, text)
    zone: dict[str, dict[str, tuple[str, ...]]] = {}
    if root is not None and isinstance(root, MappingNode) and any(
            isinstance(k, ScalarNode) and k.value == "dns" for k, _ in root.value):
        zone = {k: dict(v) for k, v in load_text(text, path,
                                                 allow_files=allow_files).dns.items()}
        node = next(v for k, v in root.value if k.value == "dns")
    elif root is not None:
        zone = _dns(c, root)
        node = root
    if root is not None and isinstance(node, MappingNode):
        for knode, vnode in node.value:
            if not isinstance(vnode, MappingNode):
                continue
            for tnode, values in vnode.value:
                if str(tnode.value) not in DNS_TYPES:
                    continue  # reported as an unknown key
                items = values.value if isinstance(values, SequenceNode) else [values]
                for item in items:
                    if isinstance(item, ScalarNode):
                        found = zone_problems({str(knode.value): {
                            str(tnode.value).upper(): [str(item.value)]}})
                        for problem in found:
                            c.error(item, problem.split(": ", 1)[-1] if ": " in problem
                                    else problem)
    if root is not None and not any(zone.values()) and not c.problems:
        c.error(root, "the zone names no records",
                "e.g. lab.test: {MX: ['10 mx1.lab.test']}")
    if c.problems:
        c.problems.sort(key=lambda p: (p.line, p.column))
        raise ScenarioError(c.problems)
    return zone


def load_zone_file(path: str | Path) -> dict[str, dict[str, tuple[str, ...]]]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ScenarioError([Problem(str(p), 1, 1, f"not UTF-8 text: {e.reason}")]) from e
    except OSError as e:
        raise ScenarioError([Problem(str(p), 1, 1, f"cannot read: {e.strerror}")]) from e
    return load_zone_text(text, str(p))


def build_rule(spec: dict[str, Any], *, index: int = 0, source: str = "<code>") -> m.Rule:
    """A rule from Python values, with exactly the checks a file gets.

    The values are written out as YAML and read back through the same code,
    so a rule added in code or over the API is validated like one in a file."""
    c = _Collector(source)
    if _depth(spec) > MAX_DEPTH:  # also a value that contains itself
        raise ScenarioError([Problem(source, 1, 1, f"the rule nests deeper than {MAX_DEPTH} "
                                     "levels", "a rule needs no more than six")])
    try:
        text = yaml.safe_dump([_plain(spec)], sort_keys=False, allow_unicode=True)
    except (yaml.YAMLError, ValueError, UnicodeError) as e:
        raise ScenarioError([Problem(source, 1, 1, f"the rule cannot be read: {e}",
                                     "use strings, numbers, booleans, lists and dicts")]) from e
    root = _compose(c, text)
    rule = None
    if isinstance(root, SequenceNode) and root.value:
        rule = _rule(c, root.value[0], index, {})
    if c.problems or rule is None:
        raise ScenarioError(c.problems or [Problem(source, 1, 1, "not a rule")])
    return rule


def _depth(value: Any) -> int:
    """How deep mappings and lists nest in Python values, walked without
    recursion and no further than one level past MAX_DEPTH."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            item = [*item.keys(), *item.values()]
        if isinstance(item, (list, tuple)):
            depth += 1
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((x, depth) for x in item)
    return deepest


def _plain(value: Any) -> Any:
    """Python values as YAML can write them: enums by value, tuples as lists."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def iter_problems(error: ScenarioError) -> Iterator[str]:
    yield from (str(p) for p in error.problems)
