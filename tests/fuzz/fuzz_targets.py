"""Fuzz targets: what each one feeds, and what must hold for every input.

Shared by the suite's short mode (tests/fuzz/test_fuzz.py: a few hundred
inputs each, derandomized) and the bench mode (bench/fuzz.py: a million
inputs or N minutes per target, seeded). Each target is a hypothesis
strategy of inputs and a check that raises AssertionError (or whatever the
code under test raised) when an input breaks a promise:

  session   bytes and command sequences into the sans-IO SMTP session
            (tests/unit/conversation.py): never an Error action (an
            internal error), and every complete command line gets exactly
            one reply (a DATA body or BDAT chunk, once, at its end)
  loader    YAML texts (random, library scenarios mutated, mappings built
            from the format's own keys) and rule mappings: nothing but a
            ScenarioError, and each problem is `path:line:col: ...`
  api       HTTP requests (paths from the API's routes, query strings,
            headers, bodies) to a running Harness(http=True): never a 5xx,
            always an answer
  render    message bytes (MIME built from odd parts, then mutated) through
            the API's message view and `harness show`: never an exception;
            JSON and terminal text that can be written out

Everything runs on loopback. The api target never lets a probe dial out:
its probe bodies name only loopback targets and zones of loopback records."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st
from rich.console import Console

from harness.api.app import _parts
from harness.cli import show_message
from harness.errors import ScenarioError
from harness.scenario import loader
from harness.scenario.library import library_dir, load
from harness.scenario.loader import build_rule, load_text
from harness.scenario.model import Scenario
from harness.store.db import MessageRecord

# tests/unit/conversation.py drives the session without sockets
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from conversation import Conversation

# ===================================================================== session

#: Library scenarios the session target plays (rules at every phase, AUTH,
#: STARTTLS required, size limits, faults that close, delays, a tarpit).
SESSION_SCENARIOS = ("accept", "auth-required", "greylisting", "tls-required",
                     "message-too-large", "too-many-recipients", "magic", "tarpit",
                     "drop-mid-data", "rate-limited", "recipient-not-found", "no-banner")


@cache
def _scenarios() -> dict[str, Scenario]:
    return {name: load(name) for name in SESSION_SCENARIOS}


ADDRESSES = ["a@lab.test", "", "user@example.com", "full@lab.test", "drop@lab.test",
             "bad@lab.test", "\u00fc@lab.test", "a@[127.0.0.1]", "a@[IPv6:::1]", "@", "a@",
             "<>", "a b@c", "x" * 300 + "@lab.test"]
PARAMS = ["SIZE=100", "SIZE=99999999999999999999999", "SIZE=", "BODY=8BITMIME",
          "BODY=BINARYMIME", "BODY=7BIT", "SMTPUTF8", "RET=HDRS", "RET=FULL", "RET=x",
          "ENVID=abc+2B", "ENVID=", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=NEVER,DELAY",
          "ORCPT=rfc822;a@b", "ORCPT=x", "AUTH=<>", "AUTH=a+40b", "REQUIRETLS",
          "MT-PRIORITY=3", "FOO=BAR", "=", "SIZE=-1"]
VERBS = ["EHLO", "HELO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY", "EXPN",
         "HELP", "QUIT", "STARTTLS", "AUTH", "ehlo", "mail", "XCLIENT", "", "MAIL FROM",
         "\u00e9HLO"]

_no_line_end = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_text = st.text(max_size=30).map(lambda s: s.replace("\r", "").replace("\n", ""))


def _address_arg(keyword: str) -> st.SearchStrategy[str]:
    return st.builds(
        lambda kw, addr, params, bracket: f"{kw}:{'<' + addr + '>' if bracket else addr}"
        + "".join(" " + p for p in params),
        st.sampled_from([keyword, keyword.lower(), keyword + " ", keyword.replace(":", "")]),
        st.one_of(st.sampled_from(ADDRESSES), _text),
        st.lists(st.sampled_from(PARAMS), max_size=3), st.booleans())


_auth_arg = st.one_of(
    st.sampled_from(["PLAIN", "LOGIN", "CRAM-MD5", "PLAIN AGFsaWNlAHMzY3JldA==", "PLAIN =",
                     "PLAIN !!!", "LOGIN YWxpY2U=", "XOAUTH2 abc", "PLAIN " + "A" * 600]),
    _text)

#: A command line (no line end): a verb and what usually follows it.
command_line: st.SearchStrategy[bytes] = st.one_of(
    st.sampled_from(["EHLO client.lab.test", "HELO client.lab.test", "RSET", "NOOP", "QUIT",
                     "STARTTLS", "DATA", "VRFY a@lab.test", "HELP", "EXPN list", "EHLO",
                     "", " ", "MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>"]).map(str.encode),
    st.builds(lambda kw: kw, _address_arg("MAIL FROM")).map(str.encode),
    st.builds(lambda kw: kw, _address_arg("RCPT TO")).map(str.encode),
    st.builds(lambda a: f"AUTH {a}", _auth_arg).map(lambda s: s.encode("utf-8", "replace")),
    st.builds(lambda v, a: f"{v} {a}".strip(), st.sampled_from(VERBS), _text).map(
        lambda s: s.encode("utf-8", "surrogatepass")),
    st.builds(lambda v, a: v.encode() + b" " + a, st.sampled_from(VERBS), _no_line_end),
    _no_line_end,
    st.integers(990, 1100).map(lambda n: b"NOOP " + b"x" * n),  # around the line limit
)


@dataclass(frozen=True)
class Step:
    """One line to send, split in two writes at `cut`; for DATA, the body to
    send after a 354; for BDAT, the chunk to send when it is waited for."""

    line: bytes
    end: bytes = b"\r\n"
    cut: int = 0
    body: bytes = b""


def _body(lines: list[bytes]) -> bytes:
    # dot-stuffed (RFC 5321 4.5.2) so the terminator is where we put it
    return b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines) + b".\r\n"


#: Commands that move a session on (a greeting, TLS, a login, a
#: transaction), drawn as often as all the rest: random lines alone seldom
#: get past 503.
_VALID = [b"EHLO client.lab.test", b"STARTTLS", b"AUTH PLAIN AGFsaWNlAHMzY3JldA==",
          b"MAIL FROM:<a@lab.test>", b"MAIL FROM:<a@lab.test> SIZE=2000 BODY=8BITMIME",
          b"MAIL FROM:<> RET=HDRS ENVID=x", b"RCPT TO:<b@lab.test>",
          b"RCPT TO:<full@lab.test> NOTIFY=FAILURE", b"RCPT TO:<user@lab.test>",
          b"RCPT TO:<tempfail@sim.lab.test>", b"RCPT TO:<drop@lab.test>", b"RSET"]

_step = st.one_of(
    st.builds(Step, st.sampled_from(_VALID), st.just(b"\r\n"), st.integers(0, 60)),
    st.builds(Step, command_line, st.sampled_from([b"\r\n", b"\n"]), st.integers(0, 60)),
    st.builds(lambda lines, cut: Step(b"DATA", cut=cut, body=_body(lines)),
              st.lists(_no_line_end, max_size=8), st.integers(0, 6)),
    st.builds(lambda chunk, last, cut: Step(f"BDAT {len(chunk)}{' LAST' if last else ''}"
                                            .encode(), cut=cut, body=chunk),
              st.binary(max_size=60), st.booleans(), st.integers(0, 12)),
)


@dataclass(frozen=True)
class SessionInput:
    scenario: str
    steps: tuple[Step, ...]
    pipelined: tuple[bytes, ...]  # a last group of plain commands sent in one write


_plain_command = st.sampled_from(
    [b"NOOP", b"RSET", b"VRFY x", b"MAIL FROM:<a@lab.test>", b"RCPT TO:<b@lab.test>",
     b"RCPT TO:<bad@lab.test>", b"HELP", b"FOO", b"EHLO c.lab.test", b"MAIL FROM:<>"])

_PREFIXES = [(), (b"EHLO client.lab.test",),
             (b"EHLO client.lab.test", b"MAIL FROM:<a@lab.test>", b"RCPT TO:<b@lab.test>"),
             (b"EHLO client.lab.test", b"STARTTLS", b"EHLO client.lab.test",
              b"AUTH PLAIN AGFsaWNlAHMzY3JldA==", b"MAIL FROM:<a@lab.test>",
              b"RCPT TO:<user@lab.test>")]

session_input: st.SearchStrategy[SessionInput] = st.builds(
    SessionInput, st.sampled_from(SESSION_SCENARIOS),
    st.builds(lambda prefix, steps: tuple(Step(x) for x in prefix) + tuple(steps),
              st.sampled_from(_PREFIXES), st.lists(_step, max_size=25)),
    st.lists(_plain_command, max_size=6).map(tuple))

#: Random bytes in random writes: only "no internal error" is checked.
session_bytes: st.SearchStrategy[tuple[str, list[bytes]]] = st.tuples(
    st.sampled_from(SESSION_SCENARIOS),
    st.lists(st.one_of(st.binary(max_size=200),
                       command_line.map(lambda b: b + b"\r\n"),
                       st.just(b"DATA\r\n"), st.just(b"\r\n.\r\n"), st.just(b"BDAT 5\r\n")),
             max_size=30))


def _finals(lines: list[str]) -> list[str]:
    """The final lines of replies (a continuation line has a hyphen)."""
    return [x for x in lines if len(x) < 4 or x[3] != "-"]


def _no_internal_error(c: Conversation) -> None:
    assert c.errors == [], f"Error action: {c.errors!r}"
    bad = [x.text for x in c.lines if x.direction == "S" and x.text.startswith("451 4.3.0")]
    assert not bad, f"internal error reply: {bad}"


#: A BDAT size the target sends a chunk for (a larger one ends the input).
MAX_CHUNK = 10_000


def check_session(given: SessionInput) -> None:
    c = Conversation(_scenarios()[given.scenario])
    for step in given.steps:
        if c.closed:
            break
        data = step.line + step.end
        cut = min(step.cut, len(data))
        replies = _finals(c.feed(data[:cut]) + c.feed(data[cut:]))
        words = step.line.split(b" ")
        if words[0].upper() == b"BDAT" and not replies and not c.closed:
            # the reply comes once the chunk is read
            size = int(words[1]) if len(words) > 1 and words[1].isdigit() else -1
            if size > MAX_CHUNK or size < 0:
                break
            chunk = step.body if len(step.body) == size else bytes(size)
            replies = _finals(c.feed(chunk))
        if c.closed:
            assert len(replies) <= 1, (step, replies)
            break
        assert len(replies) == 1, f"{step.line!r}: {len(replies)} replies {replies}"
        if replies[0].startswith("354"):  # DATA goes on: the body, then one reply
            replies = _finals(c.feed(step.body or b".\r\n"))
            if c.closed:
                assert len(replies) <= 1, (step, replies)
                break
            assert len(replies) == 1, f"DATA body: {len(replies)} replies {replies}"
    if given.pipelined and not c.closed:
        replies = _finals(c.feed(b"".join(x + b"\r\n" for x in given.pipelined)))
        if not c.closed:
            assert len(replies) == len(given.pipelined), (given.pipelined, replies)
    c.eof()
    _no_internal_error(c)


def check_session_bytes(given: tuple[str, list[bytes]]) -> None:
    name, writes = given
    c = Conversation(_scenarios()[name])
    for data in writes:
        if c.closed:
            break
        c.feed(data)
    c.eof()
    _no_internal_error(c)


# ====================================================================== loader

_PROBLEM = re.compile(r"^(?P<path>.+?):(?P<line>\d+):(?P<col>\d+): \S")

_KEYS = sorted({*loader.TOP_KEYS, *loader.SERVER_KEYS, *loader.EXTENSION_KEYS,
                *loader.TLS_KEYS, *loader.AUTH_KEYS, *loader.LIMIT_KEYS, *loader.RATE_KEYS,
                *loader.RULE_KEYS, *loader.BOUNCE_KEYS, *loader.WHEN_KEYS,
                *loader.EXPECT_KEYS, *loader.NDR_KEYS, *loader.SEND_KEYS, *loader.DNS_TYPES,
                "regex", "contains", "uniform", "lognormal", "median", "sigma", "Subject"})
_WORDS = ["on", "off", "yes", "no", "true", "rcpt", "mail", "message", "data", "connect",
          "helo", "starttls", "bdat", "550 5.1.1 No such user", "451 4.7.1 Later", "250 ok",
          "354 go", "221 bye", "5s", "1m", "10MB", "0", "-1", "1e999", ">1MB", "< 60s",
          "2..3", "*@lab.test", "a@lab.test", "127.0.0.1", "10.0.0.0/8", "close", "drop",
          "reset", "hang", "tls_fail", "tarpit", "offer", "require", "PLAIN", "5.1.1",
          "dsn", "exchange", "delivered", "bounced", "50%", "1.5", "[", "(?P<", ".*",
          "/etc/passwd", "cert.pem", "self-signed", "expired", "~", "", "null",
          "127.0.0.1:2525", "0x1F"]

_scalar = st.one_of(st.sampled_from(_WORDS), st.integers(-2**70, 2**70), st.floats(),
                    st.booleans(), st.none(), st.text(max_size=20))
_key = st.one_of(st.sampled_from(_KEYS), st.text(max_size=10), st.integers(0, 3))


def _nest(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=4),
                     st.dictionaries(_key, children, max_size=5))


#: Values shaped like scenarios: the format's keys, its words, and junk.
scenario_value: st.SearchStrategy[Any] = st.recursive(_scalar, _nest, max_leaves=30)


@cache
def library_texts() -> list[str]:
    return [p.read_text(encoding="utf-8") for p in sorted(library_dir().glob("*.yaml"))]


def _mutate(text: str, edits: list[tuple[int, int, str]]) -> str:
    for kind, where, what in edits:
        if not text:
            text = what
            continue
        i = where % len(text)
        if kind == 0:  # delete a span
            text = text[:i] + text[i + len(what) + 1:]
        elif kind == 1:  # insert
            text = text[:i] + what + text[i:]
        elif kind == 2:  # replace a character
            text = text[:i] + (what[:1] or " ") + text[i + 1:]
        else:  # duplicate a line
            start = text.rfind("\n", 0, i) + 1
            end = text.find("\n", i)
            line = text[start:end if end >= 0 else len(text)]
            text = text[:start] + line + "\n" + text[start:]
    return text


def _dump(value: Any, flow: bool) -> str:
    try:
        return yaml.safe_dump(value, default_flow_style=flow, allow_unicode=True)
    except (yaml.YAMLError, ValueError, UnicodeError):
        return str(value)


_edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6),
                            st.one_of(st.sampled_from(["[", "{", ":", "- ", "\t", "&a ", "*a",
                                                       "!!python/object ", "\"", "'", "#",
                                                       "\n", "  ", "---\n", "%YAML 1.1\n"]),
                                      st.text(max_size=8))), max_size=6)

yaml_text: st.SearchStrategy[str] = st.one_of(
    st.text(max_size=200),
    st.builds(lambda i, e: _mutate(library_texts()[i % len(library_texts())], e),
              st.integers(0, 1000), _edits),
    st.builds(_dump, scenario_value, st.booleans()),
    st.builds(lambda v, e: _mutate(_dump({"rules": [v]}, False), e),
              st.dictionaries(st.sampled_from(loader.RULE_KEYS), scenario_value, max_size=6),
              _edits),
    st.integers(1, 2000).map(lambda n: "a: " + "[" * n + "]" * n),
    st.integers(1, 600).map(lambda n: "".join(f"{'  ' * i}k{i}:\n" for i in range(n))),
)

loader_input: st.SearchStrategy[tuple[str, Any, bool]] = st.tuples(
    yaml_text, st.dictionaries(st.one_of(st.sampled_from(loader.RULE_KEYS), _key),
                               scenario_value, max_size=6), st.booleans())


def _problems_positioned(e: ScenarioError, path: str) -> None:
    assert e.problems, "a ScenarioError without problems"
    for p in e.problems:
        m = _PROBLEM.match(str(p))
        assert m and m["path"] == path and int(m["line"]) >= 1 and int(m["col"]) >= 1, str(p)


def check_loader(given: tuple[str, Any, bool]) -> None:
    text, rule, allow_files = given
    try:
        s = load_text(text, "fuzz.yaml", allow_files=allow_files)
    except ScenarioError as e:
        _problems_positioned(e, "fuzz.yaml")
    else:
        assert s.path == "fuzz.yaml"
        if not allow_files:
            assert s.server.tls.cert is None and s.server.tls.key is None
    try:
        build_rule(rule, source="<api>")
    except ScenarioError as e:
        _problems_positioned(e, "<api>")


# ========================================================================= api


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: bytes  # path and query, as sent
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    token: bool  # to the harness that wants a bearer token


ROUTES = ["/livez", "/readyz", "/", "/app.js", "/app.css", "/api/v1", "/api/v1/openapi.json",
          "/api/v1/listeners", "/api/v1/listeners/{n}/scenario", "/api/v1/listeners/{n}/rules",
          "/api/v1/listeners/{n}/rules/{s}", "/api/v1/listeners/{n}/reset",
          "/api/v1/scenarios", "/api/v1/scenarios/{s}", "/api/v1/sessions",
          "/api/v1/sessions/{n}", "/api/v1/messages", "/api/v1/messages/{n}",
          "/api/v1/messages/{n}/raw", "/api/v1/messages/{n}/html", "/api/v1/attempts",
          "/api/v1/timelines", "/api/v1/ndrs", "/api/v1/evidence", "/api/v1/probe",
          "/api/v1/probes", "/api/v1/bounces", "/api/v1/sessions/{n}/bounces",
          "/api/v1/bounces/{n}/raw", "/api/v1/nothing", "/api/v2/messages"]
NUMBERS = ["0", "1", "2", "-1", "00001", "9223372036854775807", "9223372036854775808",
           "99999999999999999999999", "1e3", "0x10", "\u0661", "1.5", "", "%31", "9" * 5000,
           " 1", "1 "]
NAMES = ["accept", "greylisting", "..", "../../etc/passwd", "%2e%2e%2fetc", "a b", "%00",
         "\u00e9", "rule 1", "x" * 300]


def _percent(b: bytes) -> bytes:
    return b"".join(bytes([c]) if 0x21 <= c < 0x7F and c not in b"%?#" else b"%%%02X" % c
                    for c in b)


def _fill(route: str, n: str, s: str, raw: bool) -> bytes:
    path = route.replace("{n}", n).replace("{s}", s).encode("utf-8", "surrogatepass")
    return path if raw else _percent(path).replace(b"%2F", b"/")


_query = st.lists(st.tuples(st.sampled_from(["limit", "rcpt", "mail_from", "token", "id",
                                             "x", "limit", ""]),
                            st.one_of(st.sampled_from(NUMBERS), _text)), max_size=4).map(
    lambda kv: "&".join(f"{k}={v}" for k, v in kv).encode("utf-8", "surrogatepass"))

_probe_body = st.fixed_dictionaries(
    # a port always: hosts from a zone are dialled on it (25 when absent,
    # where a machine's own MTA may listen); 1 and 9 are closed on loopback
    {"port": st.sampled_from([1, 9, 0, -1, 70000, "25", True])}, optional={
        "sender": st.sampled_from(["a@lab.test", "", "<>", "x"]),
        "recipient": st.sampled_from(["b@lab.test", "nobody", "b@nowhere.test", ""]),
        # loopback targets only: a probe dials what it is given
        "mx": st.lists(st.sampled_from(["127.0.0.1:1", "[::1]:1", "localhost", "mx.lab.test",
                                        "127.0.0.1:99999", "", "not a host", "127.0.0.1:9"]),
                       max_size=2),
        "zone": st.sampled_from(["lab.test: {MX: ['10 mx.lab.test']}\n"
                                 "mx.lab.test: {A: [127.0.0.1]}\n", "[", "lab.test: 1",
                                 "server: {tls: {cert: /etc/passwd, key: /etc/shadow}}\n"
                                 "dns: {lab.test: {A: [127.0.0.1]}}\n"]),
        "timeouts": st.sampled_from([{"connect": 0.5}, {"x": 1}, {"connect": -1}, []]),
        "send": st.booleans(), "helo": _text, "ca_pem": st.sampled_from(["junk", ""]),
        "dns": st.sampled_from(["scenario", "", 1]), "extra": st.none()})

_json_body = st.one_of(
    st.fixed_dictionaries({"yaml": yaml_text}),
    st.fixed_dictionaries({"name": st.sampled_from(["accept", "nope", "", 1])}),
    st.dictionaries(st.one_of(st.sampled_from((*loader.RULE_KEYS, "position")), _key),
                    scenario_value, max_size=6),
    st.fixed_dictionaries({"files": st.lists(st.fixed_dictionaries(
        {"name": st.sampled_from(["maillog", "", "RECV.LOG", "x" * 300]),
         "text": st.one_of(st.text(max_size=200), st.sampled_from([
             "Dec  3 10:00:00 mx postfix/smtp[1]: ABC: to=<b@lab.test>, relay=x, "
             "status=deferred (451 4.7.1 Later)\n",
             "#Fields: date-time,connector-id,session-id,sequence-number,local-endpoint,"
             "remote-endpoint,event,data,context\n2026-12-03T10:00:00.000Z,a,b,0,,,+,,\n"]))}),
        max_size=3),
        "tz": st.sampled_from(["UTC", "+01:00", "Mars/Base", 5]),
        "retry_interval": st.sampled_from([60, -1, "5m", 1e300]),
        "window": st.sampled_from([900, 0, float("nan")])}),
    _probe_body,
    scenario_value,
)


def _json_bytes(value: Any) -> bytes:
    try:
        return json.dumps(value, allow_nan=True).encode()
    except (TypeError, ValueError):
        return b"{}"


_body_bytes = st.one_of(
    _json_body.map(_json_bytes),
    st.binary(max_size=300),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.just(b'{"yaml": "' + b"a" * (1024**2 + 10) + b'"}'),
)

_header = st.one_of(
    st.sampled_from([(b"Content-Type", b"application/json"),
                     (b"Content-Type", b"application/json; charset=latin-1"),
                     (b"Content-Type", b"application/json; charset=bogus"),
                     (b"Content-Type", b"text/plain"), (b"Content-Type", b""),
                     (b"Authorization", b"Bearer tok"), (b"Authorization", b"bearer tok"),
                     (b"Authorization", b"BEARER   tok"), (b"Authorization", b"Bearer"),
                     (b"Authorization", b"Basic dG9rOg=="), (b"Authorization", b"bearer \xff"),
                     (b"Origin", b"http://evil.test"), (b"Origin", b"null"),
                     (b"Accept", b"*/*"), (b"Content-Encoding", b"gzip"),
                     (b"Transfer-Encoding", b"chunked"), (b"Expect", b"100-continue"),
                     (b"Host", b"evil.test"), (b"Host", b"[::1"), (b"Cookie", b"a=b"),
                     (b"Last-Event-ID", b"\xff")]),
    st.tuples(st.sampled_from([b"X-A", b"Content-Type", b"Authorization", b"Origin"]),
              _no_line_end),
)

http_request: st.SearchStrategy[HttpRequest] = st.builds(
    HttpRequest,
    st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"]),
    st.builds(lambda r, n, s, raw, q: _fill(r, n, s, raw) + (b"?" + q if q else b""),
              st.sampled_from(ROUTES), st.one_of(st.sampled_from(NUMBERS), _text),
              st.one_of(st.sampled_from(NAMES), _text), st.booleans(),
              st.one_of(st.just(b""), _query)),
    st.lists(_header, max_size=4).map(tuple),
    _body_bytes,
    st.booleans(),
)


class HttpTarget:
    """Raw HTTP/1.1 to the API (every byte as generated), one connection
    per request; the answer's status line is read and must not be 5xx."""

    def __init__(self, urls: dict[bool, str]) -> None:
        self.addresses = {}
        for token, url in urls.items():
            host, port = url.removeprefix("http://").rsplit(":", 1)
            self.addresses[token] = (host, int(port))

    def status(self, req: HttpRequest) -> int:
        host, port = self.addresses[req.token]
        names = {k.lower() for k, _ in req.headers}
        head = [req.method.encode() + b" " + (req.target or b"/") + b" HTTP/1.1"]
        if b"host" not in names:
            head.append(b"Host: " + f"{host}:{port}".encode())
        head += [k + b": " + v for k, v in req.headers
                 if k.lower() not in (b"content-length", b"transfer-encoding")]
        if req.method in ("POST", "PUT", "PATCH", "DELETE") or req.body:
            head.append(b"Content-Length: " + str(len(req.body)).encode())
        head.append(b"Connection: close")
        data = b"\r\n".join(head) + b"\r\n\r\n" + req.body
        with socket.create_connection((host, port), timeout=30) as sock:
            # the server may answer early (413) and close: read what it said
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(data)
            answer = b""
            while b"\r\n" not in answer:
                try:
                    chunk = sock.recv(4096)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                answer += chunk
        status = answer.split(b"\r\n", 1)[0].split(b" ")
        assert len(status) >= 2 and status[1].isdigit(), f"no answer: {answer[:200]!r}"
        return int(status[1])

    def check(self, req: HttpRequest) -> None:
        code = self.status(req)
        assert code < 500, f"{req.method} {req.target[:200]!r}: {code}"


# ====================================================================== render

_HEADER_NAMES = ["From", "To", "Cc", "Subject", "Message-ID", "Date", "Reply-To", "Sender",
                 "Content-Type", "Content-Transfer-Encoding", "Content-Disposition",
                 "MIME-Version", "References", "In-Reply-To", "Received", "X-Odd", "Resent-From",
                 "Return-Path", "Comments", "Keywords", "Content-ID"]
_HEADER_VALUES = [b"a@", b"<@>", b"=?utf-8?B?a?=", b"=?utf-8?Q?caf=E9?=", b"=?bogus?B?YWJj?=",
                  b"=?utf-8?X?abc?=", b"=?unknown-8bit?q?=FF?=", b"\xff\xfe\xe9", b"caf\xc3\xa9",
                  b"<a@b>", b"\"a\" <a@b>, <c@d>", b"Undisclosed recipients:;", b"(", b"<",
                  b"\"", b"\\", b"a@b@c", b"=?utf-8?b?" + b"QUJD" * 50 + b"?=", b"",
                  b"text/plain; charset=bogus", b"text/html; charset=utf-8",
                  b"text/plain; charset*=utf-8''%FF", b"text/plain; charset=\"\"",
                  b"base64", b"quoted-printable", b"x-uuencode", b"bogus-encoding", b"8bit",
                  b"attachment; filename*=bogus''%FF", b"attachment; filename=\"\xff.txt\"",
                  b"attachment; filename*0*=utf-8''a; filename*1=b", b"\x1b[31mred",
                  b"message/rfc822", b"multipart/mixed", b"multipart/mixed; boundary=",
                  b"text/plain; charset=punycode", b"text/plain; charset=utf-16",
                  b"Mon, 99 Foo 2026 99:99:99 +9999", b"1.0 (x)"]

_header_line = st.builds(
    lambda name, value, fold: name.encode() + b": " + (value.replace(b" ", b"\r\n ", 1)
                                                        if fold else value),
    st.sampled_from(_HEADER_NAMES),
    st.one_of(st.sampled_from(_HEADER_VALUES), _no_line_end), st.booleans())

_leaf_part = st.builds(
    lambda ctype, cte, charset, body: (
        f"Content-Type: {ctype}; charset={charset}\r\nContent-Transfer-Encoding: {cte}\r\n\r\n"
        .encode() + body),
    st.sampled_from(["text/plain", "text/html", "application/octet-stream", "image/png",
                     "message/delivery-status", "text/rfc822-headers", "text/x", "bogus"]),
    st.sampled_from(["7bit", "8bit", "base64", "quoted-printable", "x-uuencode", "junk", ""]),
    st.sampled_from(["utf-8", "us-ascii", "iso-8859-1", "bogus", "utf-16", "punycode", "idna",
                     "unicode_escape", "cp1252", "\"\"", "utf-7", "koi8-r", "gb2312"]),
    st.one_of(st.binary(max_size=80),
              st.sampled_from([b"!!!a\r\n", b"QUJD\r\n", b"=FF=\r\n", b"begin 644 x\r\n#86)C\r\n"
                               b"end\r\n", b"\\N{foo", b"+AGE-", b"<b>\xff</b>", b"xn--"])),
)


def _multipart(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda kind, boundary, parts, close: (
            f"Content-Type: multipart/{kind}; boundary=\"{boundary}\"\r\n\r\n".encode()
            + b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
            + (b"--" + boundary.encode() + b"--\r\n" if close else b"")),
        st.sampled_from(["mixed", "alternative", "report", "related", "digest"]),
        st.sampled_from(["b", "b1", "=_x", "", " ", "a" * 80]),
        st.lists(children, max_size=4), st.booleans())


_mime = st.recursive(_leaf_part, _multipart, max_leaves=8)


def _nested(depth: int) -> bytes:
    return (b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n" + b"".join(
        f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n".encode()
        for i in range(depth)) + f"--b{depth}\r\nContent-Type: text/plain\r\n\r\nx\r\n".encode())


def _flip(raw: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(raw)
    for where, value in flips:
        if out:
            out[where % len(out)] = value
    return bytes(out)


message_bytes: st.SearchStrategy[bytes] = st.one_of(
    st.builds(lambda headers, body, lf: (b"\r\n".join(headers) + b"\r\n" + body).replace(
        b"\r\n", b"\n" if lf else b"\r\n"),
              st.lists(_header_line, max_size=8), _mime, st.booleans()),
    st.builds(lambda headers, body, flips: _flip(b"\r\n".join(headers) + b"\r\n" + body, flips),
              st.lists(_header_line, max_size=6), _mime,
              st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6)),
    st.binary(max_size=400),
    st.sampled_from([900, 1000, 1500]).map(_nested),
)


def _record(raw: bytes) -> MessageRecord:
    return MessageRecord(id=1, session_id=1, received_at=1_700_000_000.0,
                         mail_from="a@lab.test", rcpt_tos=["b@lab.test"], mail_options=[],
                         rcpt_options=[], size=len(raw), dsn={}, subject=None, message_id=None,
                         raw=raw)


_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def check_render(raw: bytes) -> None:
    shown = _parts(raw)
    # what the API writes: JSON of it, and the HTML part as a UTF-8 body
    json.dumps(shown, ensure_ascii=False).encode("utf-8")
    if shown["html"] is not None:
        shown["html"].encode("utf-8")
    out = io.StringIO()
    show_message(_record(raw), [], Console(file=out, width=120, highlight=False,
                                           soft_wrap=True, color_system=None))
    text = out.getvalue()
    text.encode("utf-8")
    bad = _TERMINAL_UNSAFE.search(text)
    assert bad is None, f"a control character reaches the terminal: {bad.group()!r}"


# ===================================================================== table

@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    check: Callable[[Any], None]


def targets(http: HttpTarget | None = None) -> Sequence[Target]:
    table = [Target("session", session_input, check_session),
             Target("session-bytes", session_bytes, check_session_bytes),
             Target("loader", loader_input, check_loader),
             Target("render", message_bytes, check_render)]
    if http is not None:
        table.append(Target("api", http_request, http.check))
    return table
