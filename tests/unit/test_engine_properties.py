"""Property tests of the engine: whatever a client sends, in whatever order,
against any scenario (the library's, or rules generated here and built with
build_rule), `Engine.decide` never raises and always returns a valid Decision.

Deterministic (derandomize) and small enough to run in a few seconds."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from dialogue import Dialogue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import ScenarioError
from harness.scenario import model as m
from harness.scenario.engine import (
    Auth,
    Bdat,
    Connect,
    Data,
    Decision,
    Engine,
    Event,
    Helo,
    Mail,
    Message,
    Noop,
    Quit,
    Rcpt,
    Rset,
    StartTls,
    Vrfy,
)
from harness.scenario.loader import NOT_YET, WHEN_PHASES, build_rule, load_file
from harness.scenario.values import Reply

settings.register_profile(
    "engine-properties",
    max_examples=120,
    derandomize=True,  # the same examples on every run, CI or laptop
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile("engine-properties")



def _library() -> list[m.Scenario]:
    """The library scenarios that load (test_loader reports any that do not)."""
    out = []
    for path in sorted((Path(__file__).resolve().parents[2] / "scenarios").glob("*.yaml")):
        try:
            out.append(load_file(path))
        except ScenarioError:
            continue
    return out


LIBRARY = _library()

# ------------------------------------------------------------- rule specs

WORDS = st.sampled_from(["a", "lab", "test", "invoice", "b@lab.test", "*", "*@lab.test",
                         "<>", "full@*", "x?y", "[ab]*", "off", "yes", "no", "on"])
SAFE_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                    min_size=1, max_size=12)
GLOB = st.one_of(WORDS, SAFE_TEXT)
REGEX = st.sampled_from(["^a", "lab\\.test$", "(?i)invoice", ".*", "x+y?", "^$", "\\d{3}"])
PATTERN = st.one_of(GLOB, st.lists(GLOB, min_size=1, max_size=3),
                    st.fixed_dictionaries({"regex": REGEX}))
COUNT = st.one_of(st.integers(0, 5), st.sampled_from(["1", "1..2", "3..", ">= 2", "!= 1",
                                                      "< 3", "2..2"]))

WHEN_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "client": st.one_of(
        st.sampled_from(["127.0.0.1", "10.0.0.0/8", "::1", "0.0.0.0/0", "2001:db8::/32",
                         "192.0.2.0/24"]),
        st.lists(st.sampled_from(["127.0.0.0/8", "::1", "10.1.2.3"]), min_size=1,
                 max_size=3)),
    "helo": PATTERN,
    "mail_from": PATTERN,
    "rcpt": PATTERN,
    "auth_user": PATTERN,
    "header": st.dictionaries(st.sampled_from(["Subject", "From", "X-Test", "to"]),
                              st.one_of(GLOB, st.fixed_dictionaries({"regex": REGEX})),
                              min_size=1, max_size=2),
    "body": st.one_of(GLOB, st.fixed_dictionaries({"regex": REGEX}),
                      st.fixed_dictionaries({"contains": GLOB})),
    "size": st.sampled_from([">1KB", "< 100", "0..", "1MB..2MB", ">= 10", 100]),
    "attempt": COUNT,
    "first_seen": st.sampled_from(["< 60s", ">= 1s", "0s..5m", "> 250ms", "1.5s..3s"]),
    "connection": COUNT,
    "message_index": COUNT,
    "rcpt_index": COUNT,
    "tls": st.sampled_from([True, False, "yes", "off"]),
    "spf": st.sampled_from(["pass", "fail", ["softfail", "neutral"], "temperror"]),
    "dkim": st.sampled_from(["pass", "fail", ["none", "policy"]]),
    "dmarc": st.sampled_from(["pass", "fail", ["none", "permerror"]]),
    "state": st.one_of(st.sampled_from(["started", "a", "b", "off", "no"]),
                       st.lists(st.sampled_from(["started", "a", "b"]), min_size=1,
                                max_size=2)),
    "chance": st.one_of(st.floats(0, 1), st.sampled_from(["25%", "0", "1", "100%"])),
}
assert set(WHEN_VALUES) == set(WHEN_PHASES) - set(NOT_YET), "a when: key is not covered"

REPLY_CODES: dict[m.Phase, list[int]] = {
    m.Phase.CONNECT: [220, 421, 554],
    m.Phase.DATA: [354, 421, 451, 452, 503, 554],
    m.Phase.QUIT: [221],
    m.Phase.STARTTLS: [220, 454, 501, 554],
}
OTHER_CODES = [220, 250, 251, 252, 421, 450, 451, 452, 500, 501, 503, 530, 550, 552, 553, 554]


@st.composite
def replies(draw: st.DrawFn, phase: m.Phase) -> str | list[str]:
    code = draw(st.sampled_from(REPLY_CODES.get(phase, OTHER_CODES)))
    enhanced = ""
    if code // 100 != 3 and draw(st.booleans()):
        enhanced = f"{code // 100}.{draw(st.integers(0, 7))}.{draw(st.integers(0, 20))} "
    texts = draw(st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                                  max_size=20), min_size=1, max_size=3))
    lines = [f"{code} {enhanced}{t}".strip() for t in texts]
    return lines[0] if len(lines) == 1 and draw(st.booleans()) else lines


DELAYS = st.one_of(
    st.sampled_from(["0s", "10ms", "1s", "2m", 0, 0.5]),
    st.tuples(st.integers(0, 5), st.integers(0, 5)).map(
        lambda ab: {"uniform": [f"{min(ab)}s", f"{max(ab)}s"]}),
    st.fixed_dictionaries({"lognormal": st.fixed_dictionaries({
        "median": st.sampled_from(["1ms", "1s", "10s"]),
        # wide sigmas too: exp() must not overflow inside decide()
        "sigma": st.one_of(st.sampled_from([1000, 1e6, 50, 0]), st.floats(0, 3))})}),
)


@st.composite
def rule_specs(draw: st.DrawFn, index: int) -> dict[str, Any]:
    phase = draw(st.sampled_from(sorted(m.Phase)))
    keys = sorted(k for k, phases in WHEN_PHASES.items() if phase in phases and k not in NOT_YET)
    spec: dict[str, Any] = {"name": f"generated {index}", "on": phase.value}
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=2))
    if chosen:
        spec["when"] = {k: draw(WHEN_VALUES[k]) for k in chosen}
    faults = [None, None, None, "drop", "reset", "hang", "tarpit"]
    if phase is m.Phase.STARTTLS:
        faults.append("tls_fail")
    fault = draw(st.sampled_from(faults))
    if fault is not None:
        spec["fault"] = fault
        if fault == "tarpit" and draw(st.booleans()):
            spec["drip"] = draw(st.sampled_from(["1ms", "10ms", 0]))
    if fault in (None, "tarpit") and draw(st.booleans()):
        spec["reply"] = draw(replies(phase))
        if draw(st.booleans()):
            spec["then"] = "close"
    if draw(st.booleans()):
        spec["delay"] = draw(DELAYS)
    if draw(st.booleans()):
        spec["set_state"] = draw(st.sampled_from(["a", "b", "started", "off"]))
    if draw(st.booleans()):
        spec["times"] = draw(st.integers(1, 3))
    if not any(k in spec for k in ("reply", "delay", "then", "fault", "set_state")):
        spec["set_state"] = "a"
    return spec


@st.composite
def scenarios(draw: st.DrawFn) -> m.Scenario:
    specs = [draw(rule_specs(i)) for i in range(draw(st.integers(0, 6)))]
    generated = tuple(build_rule(spec, index=i) for i, spec in enumerate(specs))
    base = draw(st.sampled_from([m.Scenario(name="generated"), *LIBRARY]))
    rules = base.rules + generated if draw(st.booleans()) else generated + base.rules
    return dataclasses.replace(base, rules=rules)


# ------------------------------------------------------------------ events

ANY_TEXT = st.text(max_size=40)
ADDRESS = st.one_of(
    st.sampled_from(["", "<>", "a@lab.test", "b@lab.test", "full@lab.test",
                     "POSTMASTER@LAB.TEST", "x@y"]),
    st.builds(lambda a, b: f"{a}@{b}", ANY_TEXT, ANY_TEXT),
    ANY_TEXT,
)
HEADER_LINE = st.builds(lambda n, v: f"{n}: {v}\r\n".encode("utf-8", "surrogatepass"),
                        st.sampled_from(["Subject", "From", "To", "X-Test", "Bad Name"]),
                        ANY_TEXT)
MESSAGES = st.one_of(
    st.binary(max_size=400),
    st.builds(lambda hs, sep, body: b"".join(hs) + sep + body,
              st.lists(HEADER_LINE, max_size=4), st.sampled_from([b"\r\n", b"\n", b""]),
              st.binary(max_size=100)),
)
EVENTS: st.SearchStrategy[Event] = st.one_of(
    st.just(Connect()),
    st.builds(Helo, name=st.one_of(ANY_TEXT, st.just("mx.lab.test")), extended=st.booleans()),
    st.builds(Mail, sender=ADDRESS, size=st.one_of(st.none(), st.integers(0, 10**12))),
    st.builds(Rcpt, recipient=ADDRESS),
    st.just(Data()),
    st.builds(Message, content=MESSAGES),
    st.just(Rset()),
    st.just(Noop()),
    st.builds(Vrfy, argument=ANY_TEXT),
    st.just(Quit()),
    st.just(StartTls()),
    st.builds(Auth, mechanism=st.sampled_from(["PLAIN", "LOGIN", "CRAM-MD5"]),
              user=ANY_TEXT, valid=st.booleans()),
    st.builds(Bdat, size=st.integers(0, 10**9), last=st.booleans(),
              total=st.integers(0, 10**12)),
)
CLIENTS = st.one_of(
    st.sampled_from(["127.0.0.1", "10.1.2.3", "192.0.2.1", "::1", "::ffff:10.0.0.1",
                     "fe80::1%eth0", "2001:db8::1", "not an address", ""]),
    ANY_TEXT,
)
CONNECTIONS = st.lists(
    st.tuples(CLIENTS, st.booleans(),
              st.lists(st.tuples(st.floats(0, 120), EVENTS), min_size=1, max_size=16)),
    min_size=1, max_size=4,
)


# -------------------------------------------------------------- properties


def assert_valid(d: object, event: Event, scenario: m.Scenario) -> None:
    assert isinstance(d, Decision)
    assert d.phase is event.phase
    assert d.reply is None or (isinstance(d.reply, Reply) and 200 <= d.reply.code <= 599)
    assert isinstance(d.delay, float) and d.delay >= 0 and math.isfinite(d.delay)
    assert d.fault is None or isinstance(d.fault, m.Fault)
    assert isinstance(d.close, bool)
    assert d.drip >= 0
    rules = {r.name: r for r in scenario.rules if r.on is event.phase}
    if d.rule is not None:
        rule = rules[d.rule]
        assert (d.reply, d.fault, d.close) == (rule.reply, rule.fault, rule.close)
    for name, reason in d.misses:
        assert name in rules and name != d.rule
        assert isinstance(reason, str) and reason


def run(scenario: m.Scenario, seed: int,
        connections: list[tuple[str, bool, list[tuple[float, Event]]]]) -> list[Decision]:
    t = [1_700_000_000.0]
    eng = Engine(scenario, clock=lambda: t[0], seed=seed)
    out = []
    for client, tls, events in connections:
        conn = Dialogue(eng, client, tls=tls)
        for step, event in events:
            t[0] += step
            d = conn.decide(event)
            assert_valid(d, event, scenario)
            out.append(d)
    return out


@PROFILE
@given(scenario=scenarios(), seed=st.integers(0, 2**32), connections=CONNECTIONS)
def test_engine_decide_never_raises_and_returns_valid_decisions(
    scenario: m.Scenario, seed: int,
    connections: list[tuple[str, bool, list[tuple[float, Event]]]],
) -> None:
    run(scenario, seed, connections)


@PROFILE
@given(scenario=scenarios(), seed=st.integers(0, 2**32), connections=CONNECTIONS)
def test_engine_replays_identically_for_a_seed(
    scenario: m.Scenario, seed: int,
    connections: list[tuple[str, bool, list[tuple[float, Event]]]],
) -> None:
    assert run(scenario, seed, connections) == run(scenario, seed, connections)


@settings(PROFILE, max_examples=60)
@given(spec=st.integers(0, 9).flatmap(rule_specs))
def test_engine_generated_rules_build_and_round_trip(spec: dict[str, Any]) -> None:
    # every spec the generator makes is valid, and its phase is where it lands
    rule = build_rule(spec)
    assert rule.on.value == spec["on"]
    assert rule.name == spec["name"]
    assert [mt.key for mt in rule.when] == list(spec.get("when", {}))
