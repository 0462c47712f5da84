"""The sans-IO engine (harness/scenario/engine.py) as tables: events in,
decisions out, no sockets and no event loop. Time is an injected clock and
randomness a seeded RNG, so every case replays exactly."""

from __future__ import annotations

import ipaddress
import random
import re
import statistics
import textwrap
from collections.abc import Sequence

import pytest
from dialogue import Dialogue

from harness.scenario import model as m
from harness.scenario.engine import (
    INITIAL_STATE,
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
    Vrfy,
)
from harness.scenario.loader import load_text
from harness.scenario.values import parse_reply

CLIENT = "192.0.2.10"
MSG = (b"From: a@lab.test\r\nTo: b@lab.test\r\nSubject: Quarterly invoice\r\n"
       b"X-Priority: 1\r\n\r\nHello,\r\nplease find the invoice attached.\r\n")


def scenario(rules: str) -> m.Scenario:
    """A scenario from the YAML of its rules list (dedented)."""
    return load_text("rules:\n" + textwrap.indent(textwrap.dedent(rules), "  "), "t.yaml")


def engine(rules: str, **kw: object) -> Engine:
    return Engine(scenario(rules), **kw)  # type: ignore[arg-type]


def play(eng: Engine, events: Sequence[Event], client: str = CLIENT,
         tls: bool = False) -> list[Decision]:
    """One connection: the decisions for `events` in order."""
    conn = Dialogue(eng, client, tls=tls)
    return [conn.decide(e) for e in events]


def transaction(sender: str = "a@lab.test", *rcpts: str, content: bytes = MSG,
                size: int | None = None) -> list[Event]:
    rcpts = rcpts or ("b@lab.test",)
    return [Connect(), Helo(name="client.lab.test"), Mail(sender=sender, size=size),
            *[Rcpt(recipient=r) for r in rcpts], Data(), Message(content=content), Quit()]


def code(d: Decision) -> int | None:
    """The reply code the client sees (None: the normal reply)."""
    return d.reply.code if d.reply is not None else None


def by_phase(decisions: list[Decision], phase: m.Phase) -> list[Decision]:
    return [d for d in decisions if d.phase is phase]


# ----------------------------------------------------------------- no rules


def test_engine_without_rules_accepts_everything() -> None:
    eng = Engine(m.Scenario(name="empty"))
    ds = play(eng, [*transaction(), Rset(), Noop(), Vrfy(argument="x")])
    assert [d.phase for d in ds] == [
        m.Phase.CONNECT, m.Phase.HELO, m.Phase.MAIL, m.Phase.RCPT, m.Phase.DATA,
        m.Phase.MESSAGE, m.Phase.QUIT, m.Phase.RSET, m.Phase.NOOP, m.Phase.VRFY]
    assert all(d == Decision(phase=d.phase) for d in ds)
    assert all(d.accepts for d in ds)


# ---------------------------------------------------------- first match wins

FIRST_MATCH = """\
- name: exact
  on: rcpt
  when: {rcpt: vip@lab.test}
  reply: 250 2.1.5 VIP
- name: domain
  on: rcpt
  when: {rcpt: "*@lab.test"}
  reply: 550 5.1.1 No such user
- name: also exact, never reached
  on: rcpt
  when: {rcpt: vip@lab.test}
  reply: 451 4.3.0 unreachable
- name: anything else
  on: rcpt
  reply: 452 4.2.2 Over quota
"""


@pytest.mark.parametrize(
    ("rcpt", "rule", "reply_code"),
    [
        ("vip@lab.test", "exact", 250),
        ("VIP@LAB.TEST", "exact", 250),  # globs are case-insensitive
        ("other@lab.test", "domain", 550),
        ("x@elsewhere.test", "anything else", 452),
    ],
)
def test_engine_first_match_wins_in_file_order(rcpt: str, rule: str, reply_code: int) -> None:
    (d,) = play(engine(FIRST_MATCH), [Rcpt(recipient=rcpt)])
    assert (d.rule, code(d)) == (rule, reply_code)


def test_engine_rules_answer_only_their_phase() -> None:
    eng = engine("""\
        - {name: banner, on: connect, reply: 220 hello there}
        - {name: quit, on: quit, reply: 221 2.0.0 see you}
        """)
    ds = play(eng, transaction())
    assert [(d.phase.value, d.rule) for d in ds if d.rule] == [
        ("connect", "banner"), ("quit", "quit")]


# ------------------------------------------------------ per-recipient verdicts

PER_RCPT = """\
- name: unknown user
  on: rcpt
  when: {rcpt: "nobody@*"}
  reply: 550 5.1.1 No such user
- name: full
  on: rcpt
  when: {rcpt: "full@*"}
  reply: 452 4.2.2 Mailbox full
- name: drop if a rejected recipient were in the message
  on: message
  when: {rcpt: [nobody@lab.test, full@lab.test]}
  fault: drop
- name: tag accepted ones
  on: message
  when: {rcpt: ok@lab.test}
  reply: 250 2.0.0 queued for ok
"""


def test_engine_decides_each_recipient_on_its_own() -> None:
    ds = play(engine(PER_RCPT), transaction(
        "a@lab.test", "ok@lab.test", "nobody@lab.test", "full@lab.test", "ok2@lab.test"))
    rcpts = by_phase(ds, m.Phase.RCPT)
    assert [(d.rule, code(d), d.accepts) for d in rcpts] == [
        (None, None, True),
        ("unknown user", 550, False),
        ("full", 452, False),
        (None, None, True),
    ]
    # at the message only the accepted recipients are known
    (msg,) = by_phase(ds, m.Phase.MESSAGE)
    assert (msg.rule, code(msg), msg.fault) == ("tag accepted ones", 250, None)


# --------------------------------------------------------- attempt counting

FAIL_TWICE = """\
- name: fail twice
  on: rcpt
  when: {attempt: 1..2}
  reply: 451 4.3.0 Try again later
"""


@pytest.mark.parametrize(
    ("sessions", "expected"),
    [
        # each session: one connection, one pair; expected: RCPT reply codes
        ([("a@x", "b@y")] * 4, [451, 451, None, None]),
        # another pair has its own counter
        ([("a@x", "b@y"), ("a@x", "c@y"), ("a@x", "b@y"), ("a@x", "b@y")],
         [451, 451, 451, None]),
        # case does not make a new pair
        ([("a@x", "b@y"), ("A@X", "B@Y"), ("a@x", "b@y")], [451, 451, None]),
        # the null sender is a sender like any other
        ([("", "b@y"), ("", "b@y"), ("", "b@y")], [451, 451, None]),
    ],
)
def test_engine_counts_attempts_across_connections(
    sessions: list[tuple[str, str]], expected: list[int | None]
) -> None:
    eng = engine(FAIL_TWICE)
    got = []
    for i, (sender, rcpt) in enumerate(sessions):
        # from changing client addresses: a pair is a pair wherever it comes from
        ds = play(eng, transaction(sender, rcpt), client=f"192.0.2.{i + 1}")
        (d,) = by_phase(ds, m.Phase.RCPT)
        got.append(code(d))
    assert got == expected


def test_engine_counts_attempts_per_recipient_within_a_transaction() -> None:
    eng = engine(FAIL_TWICE)
    first = play(eng, transaction("a@x", "b@y", "c@y"))
    second = play(eng, transaction("a@x", "c@y", "d@y"))
    third = play(eng, transaction("a@x", "b@y", "c@y", "d@y"))
    assert [code(d) for d in by_phase(first, m.Phase.RCPT)] == [451, 451]
    assert [code(d) for d in by_phase(second, m.Phase.RCPT)] == [451, 451]
    assert [code(d) for d in by_phase(third, m.Phase.RCPT)] == [451, None, 451]


@pytest.mark.parametrize(
    ("rule", "events_per_connection", "expected"),
    [
        # on connect: attempts are per client
        ("{name: r, on: connect, when: {attempt: 2}, reply: 421 4.3.2 busy}",
         [[Connect()]] * 3, [[None], [421], [None]]),
        # on mail: per client and sender
        ("{name: r, on: mail, when: {attempt: '>= 2'}, reply: 451 4.3.0 later}",
         [[Mail(sender="a@x"), Mail(sender="b@x")], [Mail(sender="a@x")]],
         [[None, None], [451]]),
        # on message: per sender/recipient pair
        ("{name: r, on: message, when: {attempt: 1}, reply: 451 4.3.0 later}",
         [transaction("a@x", "b@y"), transaction("a@x", "b@y")],
         [[None, None, None, None, None, 451, None], [None] * 7]),
    ],
)
def test_engine_counts_attempts_by_phase(rule: str, events_per_connection: list[list[Event]],
                                         expected: list[list[int | None]]) -> None:
    eng = engine(f"- {rule}\n")
    assert [[code(d) for d in play(eng, evs)] for evs in events_per_connection] == expected


# ----------------------------------------------------------- greylisting

GREYLIST = """\
- name: greylist
  on: rcpt
  when: {rcpt: "*@lab.test", first_seen: "< 60s"}
  reply: 451 4.7.1 Greylisted, try again later
"""


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [
        # (seconds since start, client, sender, recipient)
        ([(0, CLIENT, "a@x", "b@lab.test"), (59.9, CLIENT, "a@x", "b@lab.test"),
          (60, CLIENT, "a@x", "b@lab.test"), (3600, CLIENT, "a@x", "b@lab.test")],
         [451, 451, None, None]),
        # another client, sender or recipient is a new triplet with its own clock
        ([(0, CLIENT, "a@x", "b@lab.test"), (61, "192.0.2.99", "a@x", "b@lab.test"),
          (62, CLIENT, "c@x", "b@lab.test"), (63, CLIENT, "a@x", "d@lab.test"),
          (64, CLIENT, "a@x", "b@lab.test")],
         [451, 451, 451, 451, None]),
        # the rule only covers *@lab.test
        ([(0, CLIENT, "a@x", "b@other.test")], [None]),
    ],
)
def test_engine_greylists_by_first_seen_with_injected_clock(
    attempts: list[tuple[float, str, str, str]], expected: list[int | None]
) -> None:
    t = [1_000_000.0]
    eng = Engine(scenario(GREYLIST), clock=lambda: t[0])
    start = t[0]
    got = []
    for offset, client, sender, rcpt in attempts:
        t[0] = start + offset
        (d,) = by_phase(play(eng, transaction(sender, rcpt), client=client), m.Phase.RCPT)
        got.append(code(d))
    assert got == expected


def test_engine_first_seen_miss_reports_the_age() -> None:
    t = [0.0]
    eng = Engine(scenario(GREYLIST), clock=lambda: t[0])
    play(eng, [Rcpt(recipient="b@lab.test")])
    t[0] = 75.0
    (d,) = play(eng, [Rcpt(recipient="b@lab.test")])
    assert d.misses == (("greylist", "first_seen is 75.0s, wanted < 60s"),)


def test_engine_clock_going_backwards_never_gives_negative_age() -> None:
    t = [100.0]
    eng = Engine(scenario(GREYLIST), clock=lambda: t[0])
    play(eng, [Rcpt(recipient="b@lab.test")])
    t[0] = 0.0
    (d,) = play(eng, [Rcpt(recipient="b@lab.test")])
    assert code(d) == 451  # age 0, not -100


# ---------------------------------------------------------- connection Nth


@pytest.mark.parametrize(
    ("when", "clients", "expected"),
    [
        ("2", [CLIENT, CLIENT, CLIENT], [None, 421, None]),
        ("3..", [CLIENT] * 5, [None, None, 421, 421, 421]),
        ("1", [CLIENT, "192.0.2.20", CLIENT, "192.0.2.20"], [421, 421, None, None]),
        # the same client however it is written
        ("2", ["10.0.0.1", "::ffff:10.0.0.1"], [None, 421]),
        ("2", ["fe80::1%eth0", "fe80::1"], [None, 421]),
    ],
)
def test_engine_matches_nth_connection_from_a_client(when: str, clients: list[str],
                                                     expected: list[int | None]) -> None:
    eng = engine(f"- {{name: n, on: connect, when: {{connection: '{when}'}}, "
                 f"reply: 421 4.3.2 Too many connections}}\n")
    got = [code(play(eng, [Connect()], client=c)[0]) for c in clients]
    assert got == expected


# ------------------------------------------------------------ message_index


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # the second MAIL on the connection is refused, and so is every later
        # one: a refused MAIL starts no message, so the next is still the 2nd
        ([Mail(sender="a@x"), Rcpt(recipient="b@y"), Data(), Message(content=MSG),
          Mail(sender="a@x"), Mail(sender="a@x")],
         [None, None, None, None, 452, 452]),
        # RSET does not count as a message, a refused MAIL neither
        ([Mail(sender="a@x"), Rset(), Mail(sender="a@x"), Mail(sender="a@x")],
         [None, None, 452, 452]),
    ],
)
def test_engine_matches_message_index_on_a_connection(events: list[Event],
                                                      expected: list[int | None]) -> None:
    eng = engine("- {name: second, on: mail, when: {message_index: 2}, "
                 "reply: 452 4.5.3 One message per connection}\n")
    assert [code(d) for d in play(eng, events)] == expected
    # a new connection counts from 1 again
    assert [code(d) for d in play(eng, [Mail(sender="a@x")])] == [None]


def test_engine_message_index_holds_for_the_whole_transaction() -> None:
    eng = engine("""\
        - {name: second msg rcpt, on: rcpt, when: {message_index: 2}, reply: 550 5.7.1 no}
        - {name: second msg body, on: message, when: {message_index: 2}, reply: 554 5.7.1 no}
        """)
    ds = play(eng, transaction()[:-1] + transaction()[2:])
    assert [(d.phase.value, d.rule) for d in ds if d.rule] == [
        ("rcpt", "second msg rcpt"), ("message", "second msg body")]


# -------------------------------------------------------------- state


STATEFUL = """\
- name: first refuses and moves on
  on: mail
  when: {state: started}
  reply: 451 4.3.0 Not yet
  set_state: warming
- name: second is slow
  on: mail
  when: {state: warming}
  delay: 2s
  set_state: ready
- name: all good
  on: mail
  when: {state: [ready, "off"]}
  reply: 250 2.1.0 Sender ok
"""


def test_engine_state_starts_as_started_and_moves_with_set_state() -> None:
    eng = engine(STATEFUL)
    assert eng.state == INITIAL_STATE == "started"
    table = []
    for _ in range(4):
        (d,) = play(eng, [Mail(sender="a@x")])
        table.append((d.rule, code(d), d.delay, eng.state))
    assert table == [
        ("first refuses and moves on", 451, 0.0, "warming"),
        ("second is slow", None, 2.0, "ready"),
        ("all good", 250, 0.0, "ready"),
        ("all good", 250, 0.0, "ready"),
    ]


def test_engine_state_is_shared_by_all_connections_and_reset_restarts_it() -> None:
    eng = engine(STATEFUL)
    play(eng, [Mail(sender="a@x")], client="192.0.2.1")
    (d,) = play(eng, [Mail(sender="a@x")], client="192.0.2.2")
    assert d.rule == "second is slow"
    eng.reset()
    assert eng.state == "started"
    (d,) = play(eng, [Mail(sender="a@x")])
    assert d.rule == "first refuses and moves on"


def test_engine_state_off_stays_a_word() -> None:
    eng = engine("""\
        - {name: switch off, on: helo, set_state: off}
        - {name: when off, on: mail, when: {state: off}, reply: 421 4.3.2 off}
        """)
    ds = play(eng, [Mail(sender="a@x"), Helo(name="h"), Mail(sender="a@x")])
    assert [code(d) for d in ds] == [None, None, 421]
    assert eng.state == "off"


# -------------------------------------------------------------- times


def test_engine_times_retires_a_rule_after_n_uses() -> None:
    eng = engine("""\
        - {name: twice, on: rcpt, reply: 451 4.3.0 later, times: 2}
        - {name: then this, on: rcpt, reply: 550 5.1.1 gone}
        """)
    ds = [play(eng, [Rcpt(recipient=f"r{i}@x")])[0] for i in range(4)]
    assert [(d.rule, code(d)) for d in ds] == [
        ("twice", 451), ("twice", 451), ("then this", 550), ("then this", 550)]
    assert ds[2].misses == (("twice", "retired after 2 use(s)"),)
    eng.reset()
    assert play(eng, [Rcpt(recipient="x@x")])[0].rule == "twice"


def test_engine_times_counts_only_matches() -> None:
    eng = engine("- {name: once for b, on: rcpt, when: {rcpt: b@x}, reply: 550 5.1.1 no, "
                 "times: 1}\n")
    codes = [code(play(eng, [Rcpt(recipient=r)])[0]) for r in ["a@x", "a@x", "b@x", "b@x"]]
    assert codes == [None, None, 550, None]


def test_engine_use_switches_scenario_and_keeps_counters() -> None:
    eng = engine(FAIL_TWICE)
    play(eng, [Rcpt(recipient="b@y")])
    eng.use(scenario(FAIL_TWICE.replace("1..2", "2")))
    (d,) = play(eng, [Rcpt(recipient="b@y")])
    assert (d.rule, code(d)) == ("fail twice", 451)


# -------------------------------------------------------------- chance

CHANCE = "- {name: coin, on: rcpt, when: {chance: 0.5}, reply: 451 4.3.0 unlucky}\n"


def flips(seed: int | None, n: int = 64, rules: str = CHANCE) -> list[str | None]:
    eng = engine(rules, seed=seed)
    conn = Dialogue(eng, CLIENT)
    return [conn.decide(Rcpt(recipient=f"r{i}@x")).rule for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31])
def test_engine_chance_replays_identically_for_a_seed(seed: int) -> None:
    first = flips(seed)
    assert flips(seed) == first
    assert 0 < first.count("coin") < len(first)


@pytest.mark.parametrize(("a", "b"), [(0, 1), (1, 2), (42, 43), (7, 7000)])
def test_engine_chance_differs_across_seeds(a: int, b: int) -> None:
    assert flips(a) != flips(b)


def test_engine_reset_reseeds_the_rng() -> None:
    eng = engine(CHANCE, seed=5)
    conn = Dialogue(eng, CLIENT)
    first = [conn.decide(Rcpt(recipient="r@x")).rule for _ in range(32)]
    eng.reset()
    conn = Dialogue(eng, CLIENT)
    assert [conn.decide(Rcpt(recipient="r@x")).rule for _ in range(32)] == first


@pytest.mark.parametrize(("p", "hits"), [("0", 0), ("0%", 0), ("1", 64), ("100%", 64)])
def test_engine_chance_extremes(p: str, hits: int) -> None:
    rules = f"- {{name: coin, on: rcpt, when: {{chance: '{p}'}}, reply: 451 4.3.0 x}}\n"
    assert flips(3, rules=rules).count("coin") == hits


def test_engine_chance_is_drawn_only_when_the_rest_holds() -> None:
    # a rule whose other matchers fail must not consume the RNG, so adding
    # traffic that no chance rule concerns does not change a seeded run
    rules = ("- {name: coin, on: rcpt, when: {chance: 0.5, rcpt: 'c@x'}, "
             "reply: 451 4.3.0 x}\n")
    quiet = engine(rules, seed=9)
    noisy = engine(rules, seed=9)
    qc, nc = Dialogue(quiet, CLIENT), Dialogue(noisy, CLIENT)
    got_q, got_n = [], []
    for _ in range(32):
        got_q.append(qc.decide(Rcpt(recipient="c@x")).rule)
        nc.decide(Rcpt(recipient="other@x"))
        got_n.append(nc.decide(Rcpt(recipient="c@x")).rule)
    assert got_q == got_n


# -------------------------------------------------------------- delays


@pytest.mark.parametrize(
    ("delay", "low", "high"),
    [
        ("5s", 5.0, 5.0),
        ("250ms", 0.25, 0.25),
        ("0s", 0.0, 0.0),
        ("{uniform: [1s, 5s]}", 1.0, 5.0),
        ("{uniform: [2s, 2s]}", 2.0, 2.0),
        ("{lognormal: {median: 2s, sigma: 0.5}}", 0.0, float("inf")),
        ("{lognormal: {median: 2s, sigma: 0}}", 2.0, 2.0),
    ],
)
def test_engine_delays_are_sampled_within_bounds(delay: str, low: float, high: float) -> None:
    eng = engine(f"- {{name: slow, on: rcpt, delay: {delay}}}\n", seed=11)
    ds = play(eng, [Rcpt(recipient="b@y")] * 200)
    samples = [d.delay for d in ds]
    assert all(low <= s <= high for s in samples)
    assert all(s > 0 for s in samples) or low == 0.0


@pytest.mark.parametrize(
    "delay",
    ["{uniform: [1s, 5s]}", "{lognormal: {median: 2s, sigma: 0.5}}"],
)
def test_engine_random_delays_replay_with_a_seed(delay: str) -> None:
    def run(seed: int) -> list[float]:
        eng = engine(f"- {{name: slow, on: rcpt, delay: {delay}}}\n", seed=seed)
        return [d.delay for d in play(eng, [Rcpt(recipient="b@y")] * 20)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert len(set(run(1))) == 20


def test_engine_uniform_delay_spreads_over_its_range() -> None:
    eng = engine("- {name: slow, on: rcpt, delay: {uniform: [1s, 5s]}}\n", seed=3)
    samples = [d.delay for d in play(eng, [Rcpt(recipient="b@y")] * 400)]
    assert min(samples) < 1.2 and max(samples) > 4.8
    assert 2.7 < statistics.mean(samples) < 3.3


def test_engine_lognormal_delay_has_its_median() -> None:
    eng = engine("- {name: slow, on: rcpt, delay: {lognormal: {median: 2s, sigma: 0.5}}}\n",
                 seed=3)
    samples = [d.delay for d in play(eng, [Rcpt(recipient="b@y")] * 801)]
    assert 1.8 < statistics.median(samples) < 2.2


def test_engine_lognormal_wide_sigma_never_overflows() -> None:
    # exp() overflows above about 709.8; sigma 1000 would hit that on ~24% of draws
    eng = engine("- {name: slow, on: rcpt, delay: {lognormal: {median: 1s, sigma: 1000}}}\n",
                 seed=0)
    samples = [d.delay for d in play(eng, [Rcpt(recipient="b@y")] * 100)]
    assert all(0 <= s < float("inf") for s in samples)


# ------------------------------------------------- content matchers at message


@pytest.mark.parametrize(
    ("when", "content", "matched"),
    [
        ("{header: {Subject: '*invoice*'}}", MSG, True),
        ("{header: {subject: '*INVOICE*'}}", MSG, True),  # names and globs ignore case
        ("{header: {Subject: '*receipt*'}}", MSG, False),
        ("{header: {Subject: '*invoice*', X-Priority: '1'}}", MSG, True),
        ("{header: {Subject: '*invoice*', X-Priority: '5'}}", MSG, False),
        ("{header: {X-Missing: '*'}}", MSG, False),
        ("{header: {Subject: {regex: '^Quarterly'}}}", MSG, True),
        ("{body: invoice attached}", MSG, True),
        ("{body: INVOICE ATTACHED}", MSG, True),  # contains ignores case
        ("{body: Subject}", MSG, False),  # the body, not the headers
        ("{body: {regex: 'find the \\w+'}}", MSG, True),
        ("{body: {regex: '^Subject'}}", MSG, False),
        ("{body: hello}", b"Subject: x\n\nhello, bare LF", True),
        ("{body: hello}", b"\r\nhello, no header fields", True),
        ("{body: hello}", b"Subject: hello", False),  # no body at all
        ("{size: '>1KB'}", MSG + b"x" * 1000, True),
        ("{size: '>1KB'}", MSG, False),
        ("{size: '< 300'}", MSG, True),
    ],
)
def test_engine_matches_content_at_message(when: str, content: bytes, matched: bool) -> None:
    eng = engine(f"- {{name: content, on: message, when: {when}, reply: 554 5.7.1 no}}\n")
    (d,) = by_phase(play(eng, transaction(content=content)), m.Phase.MESSAGE)
    assert (d.rule == "content") is matched


@pytest.mark.parametrize(
    ("when", "declared", "matched"),
    [("'>1MB'", 2_000_000, True), ("'>1MB'", 1000, False), ("'>1MB'", None, False)],
)
def test_engine_matches_declared_size_at_mail(when: str, declared: int | None,
                                              matched: bool) -> None:
    eng = engine(f"- {{name: big, on: mail, when: {{size: {when}}}, "
                 f"reply: 552 5.3.4 too big}}\n")
    (d,) = play(eng, [Mail(sender="a@x", size=declared)])
    assert (d.rule == "big") is matched
    if declared is None:
        assert d.misses == (("big", "size is not known (no SIZE= declared)"),)


# ----------------------------------------------------------- senders


@pytest.mark.parametrize(
    ("pattern", "sender", "matched"),
    [
        ("'<>'", "", True),  # the null sender, as aiosmtpd passes it
        ("'<>'", "<>", True),
        ("'<>'", "a@lab.test", False),
        ("'*@lab.test'", "", False),
        ("'*@lab.test'", "A@Lab.Test", True),
        ("['<>', 'postmaster@*']", "", True),
        ("['<>', 'postmaster@*']", "postmaster@lab.test", True),
        ("{regex: '^bounce-'}", "bounce-123@x", True),
        ("{regex: '^bounce-'}", "", False),
    ],
)
def test_engine_matches_mail_from_including_null_sender(pattern: str, sender: str,
                                                        matched: bool) -> None:
    eng = engine(f"""\
        - {{name: m, on: mail, when: {{mail_from: {pattern}}}, reply: 550 5.7.1 no}}
        - {{name: r, on: rcpt, when: {{mail_from: {pattern}}}, reply: 550 5.7.1 no}}
        """)
    mail, rcpt = play(eng, [Mail(sender=sender), Rcpt(recipient="b@y")])
    assert (mail.rule == "m") is matched
    if not matched:  # the transaction goes on, and RCPT sees the same sender
        assert (rcpt.rule == "r") is matched


def test_engine_null_sender_miss_shows_angle_brackets() -> None:
    eng = engine("- {name: m, on: mail, when: {mail_from: '*@x'}, reply: 550 5.7.1 no}\n")
    (d,) = play(eng, [Mail(sender="")])
    assert d.misses == (("m", "mail_from <> does not match *@x"),)


# ------------------------------------------------------------ client, tls


@pytest.mark.parametrize(
    ("networks", "client", "matched"),
    [
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "11.1.2.3", False),
        ("10.1.2.3", "10.1.2.3", True),
        ("10.1.2.3/32", "10.1.2.4", False),
        ("10.0.0.0/8", "::ffff:10.1.2.3", True),  # IPv4-mapped IPv6
        ("'::1'", "::1", True),
        ("'2001:db8::/32'", "2001:db8::42", True),
        ("'2001:db8::/32'", "10.1.2.3", False),
        ("[127.0.0.0/8, '::1']", "127.0.0.5", True),
        ("[127.0.0.0/8, '::1']", "::1", True),
        ("[127.0.0.0/8, '::1']", "192.0.2.1", False),
        ("10.1.2.0/24", "10.1.2.77", True),  # host bits in a network are fine
        ("0.0.0.0/0", "not an address", True),  # unparsable peers count as 0.0.0.0
    ],
)
def test_engine_matches_client_by_cidr(networks: str, client: str, matched: bool) -> None:
    eng = engine(f"- {{name: c, on: connect, when: {{client: {networks}}}, "
                 f"reply: 554 5.7.1 go away}}\n")
    (d,) = play(eng, [Connect()], client=client)
    assert (d.rule == "c") is matched


@pytest.mark.parametrize(("wanted", "tls", "matched"),
                         [(True, True, True), (True, False, False), (False, False, True),
                          (False, True, False)])
def test_engine_matches_tls(wanted: bool, tls: bool, matched: bool) -> None:
    # the loader holds `tls:` back until STARTTLS lands; the engine has it now
    rule = m.Rule(name="plain", on=m.Phase.MAIL, when=(m.BoolMatcher("tls", wanted),),
                  reply=parse_reply("530 5.7.0 Must issue a STARTTLS command first"))
    eng = Engine(m.Scenario(name="tls", rules=(rule,)))
    (d,) = play(eng, [Mail(sender="a@x")], tls=tls)
    assert (d.rule == "plain") is matched
    if not matched:
        assert d.misses == (("plain", f"tls is {str(tls).lower()}"),)


@pytest.mark.parametrize(
    ("when", "events", "matched"),
    [
        ("{helo: '*.lab.test'}", [Helo(name="mx.lab.test")], True),
        ("{helo: '*.lab.test'}", [Helo(name="localhost")], False),
        ("{helo: '[[]*]'}", [Helo(name="[192.0.2.1]")], True),  # address literal
        # at MAIL the HELO name of the connection is known
        ("{helo: localhost}", [Helo(name="localhost"), Mail(sender="a@x")], True),
        # before any HELO the name is not known
        ("{helo: localhost}", [Mail(sender="a@x")], False),
    ],
)
def test_engine_matches_helo(when: str, events: list[Event], matched: bool) -> None:
    on = events[-1].phase.value
    eng = engine(f"- {{name: h, on: {on}, when: {when}, reply: 550 5.7.1 no}}\n")
    assert (play(eng, events)[-1].rule == "h") is matched


def test_engine_refused_helo_name_is_not_remembered() -> None:
    eng = engine("""\
        - {name: refuse, on: helo, when: {helo: localhost}, reply: 550 5.7.1 name yourself}
        - {name: seen at mail, on: mail, when: {helo: localhost}, reply: 550 5.7.1 no}
        """)
    ds = play(eng, [Helo(name="localhost"), Mail(sender="a@x")])
    assert [d.rule for d in ds] == ["refuse", None]
    assert ds[1].misses == (("seen at mail", "helo is not known yet"),)


# ------------------------------------------------------- transaction context


def test_engine_rset_and_helo_forget_the_transaction() -> None:
    eng = engine("- {name: r, on: data, when: {rcpt: 'b@y'}, reply: 554 5.5.1 no}\n")
    d = play(eng, [Mail(sender="a@x"), Rcpt(recipient="b@y"), Rset(), Mail(sender="a@x"),
                   Data()])
    assert d[-1].rule is None
    d = play(eng, [Mail(sender="a@x"), Rcpt(recipient="b@y"), Helo(name="h"),
                   Mail(sender="a@x"), Data()])
    assert d[-1].rule is None
    d = play(eng, [Mail(sender="a@x"), Rcpt(recipient="b@y"), Data()])
    assert d[-1].rule == "r"


def test_engine_refused_rcpt_is_not_part_of_the_transaction() -> None:
    eng = engine("""\
        - {name: refuse, on: rcpt, when: {rcpt: 'b@y'}, reply: 550 5.1.1 no}
        - {name: seen at data, on: data, when: {rcpt: 'b@y'}, reply: 554 5.5.1 no}
        """)
    ds = play(eng, [Mail(sender="a@x"), Rcpt(recipient="b@y"), Rcpt(recipient="c@y"), Data()])
    assert [d.rule for d in ds] == [None, "refuse", None, None]


def test_engine_message_ends_the_transaction() -> None:
    eng = engine("- {name: r, on: rcpt, when: {mail_from: 'a@x'}, reply: 550 5.7.1 no}\n")
    ds = play(eng, [Mail(sender="a@x"), Data(), Message(content=MSG), Rcpt(recipient="b@y")])
    assert ds[-1].rule is None
    assert ds[-1].misses == (("r", "mail_from is not known yet"),)


# ------------------------------------------------------------ Decision


@pytest.mark.parametrize(
    ("decision", "accepts"),
    [
        (Decision(phase=m.Phase.RCPT), True),
        (Decision(phase=m.Phase.RCPT, reply=parse_reply("250 2.1.5 ok")), True),
        (Decision(phase=m.Phase.DATA, reply=parse_reply("354 go ahead")), True),
        (Decision(phase=m.Phase.RCPT, reply=parse_reply("451 4.3.0 later")), False),
        (Decision(phase=m.Phase.RCPT, reply=parse_reply("550 5.1.1 no")), False),
        (Decision(phase=m.Phase.RCPT, delay=5.0), True),
        (Decision(phase=m.Phase.RCPT, fault=m.Fault.DROP), False),
        (Decision(phase=m.Phase.RCPT, fault=m.Fault.RESET), False),
        (Decision(phase=m.Phase.RCPT, fault=m.Fault.HANG), False),
        (Decision(phase=m.Phase.RCPT, fault=m.Fault.TARPIT), True),
        (Decision(phase=m.Phase.RCPT, fault=m.Fault.TARPIT, reply=parse_reply("550 no")),
         False),
        (Decision(phase=m.Phase.RCPT, reply=parse_reply("421 4.3.2 bye"), close=True), False),
    ],
)
def test_engine_decision_accepts(decision: Decision, accepts: bool) -> None:
    assert decision.accepts is accepts


@pytest.mark.parametrize(
    ("rule", "fields"),
    [
        ("{name: r, on: rcpt, reply: 421 4.3.2 bye, then: close}",
         {"close": True, "fault": None}),
        ("{name: r, on: rcpt, fault: reset}", {"fault": m.Fault.RESET, "reply": None}),
        ("{name: r, on: rcpt, reply: 451 4.3.0 slow, fault: tarpit, drip: 100ms}",
         {"fault": m.Fault.TARPIT, "drip": 0.1}),
        ("{name: r, on: rcpt, delay: 3s, fault: drop}", {"fault": m.Fault.DROP, "delay": 3.0}),
    ],
)
def test_engine_decision_carries_rule_outcome(rule: str, fields: dict[str, object]) -> None:
    (d,) = play(engine(f"- {rule}\n"), [Rcpt(recipient="b@y")])
    assert d.rule == "r"
    assert {k: getattr(d, k) for k in fields} == fields


def test_engine_faulted_mail_starts_no_transaction() -> None:
    eng = engine("""\
        - {name: drop, on: mail, fault: drop}
        - {name: r, on: rcpt, when: {mail_from: '*'}, reply: 550 5.7.1 no}
        """)
    ds = play(eng, [Mail(sender="a@x"), Rcpt(recipient="b@y")])
    assert [d.rule for d in ds] == ["drop", None]


# ------------------------------------------------------------- misses


def test_engine_misses_name_rules_that_did_not_match_with_reasons() -> None:
    t = [0.0]
    eng = Engine(scenario("""\
        - {name: wrong domain, on: rcpt, when: {rcpt: '*@other.test'}, reply: 550 5.1.1 a}
        - {name: wrong sender, on: rcpt, when: {mail_from: 'boss@*'}, reply: 550 5.1.1 b}
        - {name: later state, on: rcpt, when: {state: done}, reply: 550 5.1.1 c}
        - {name: second conn, on: rcpt, when: {connection: '>= 2'}, reply: 550 5.1.1 d}
        - {name: third try, on: rcpt, when: {attempt: 3}, reply: 550 5.1.1 e}
        - {name: only local, on: rcpt, when: {client: 127.0.0.0/8}, reply: 550 5.1.1 f}
        - {name: retired, on: rcpt, when: {rcpt: 'zz@*'}, reply: 550 5.1.1 g, times: 1}
        - {name: hit, on: rcpt, reply: 451 4.3.0 h}
        - {name: after the hit, on: rcpt, reply: 550 5.1.1 i}
        - {name: other phase, on: helo, reply: 550 5.1.1 j}
        """), clock=lambda: t[0])
    play(eng, [Rcpt(recipient="zz@lab.test")], client="192.0.2.200")  # uses "retired"
    conn = Dialogue(eng, CLIENT)
    conn.decide(Mail(sender="a@lab.test"))
    d = conn.decide(Rcpt(recipient="b@lab.test"))
    assert d.rule == "hit"
    reasons = dict(d.misses)
    assert list(reasons) == ["wrong domain", "wrong sender", "later state", "second conn",
                             "third try", "only local", "retired"]
    assert reasons["wrong domain"] == "rcpt b@lab.test does not match *@other.test"
    assert reasons["wrong sender"] == "mail_from a@lab.test does not match boss@*"
    assert reasons["later state"] == "state is 'started', wanted 'done'"
    assert reasons["second conn"] == "connection is 1, wanted >= 2"
    assert reasons["third try"] == "attempt is 1, wanted 3"
    assert reasons["only local"] == f"client {CLIENT} is not in 127.0.0.0/8"
    assert reasons["retired"] == "retired after 1 use(s)"


@pytest.mark.parametrize(
    ("when", "event", "reason"),
    [
        ("{helo: 'x'}", Mail(sender="a@x"), "helo is not known yet"),
        ("{header: {Subject: x}}", Message(content=b"From: a\r\n\r\nx"),
         "header Subject is absent"),
        ("{header: {Subject: 'x*'}}", Message(content=b"Subject: hello\r\n\r\nx"),
         "header Subject: hello does not match x*"),
        ("{body: zzz}", Message(content=b"Subject: a\r\n\r\nbody"),
         "body does not contain 'zzz'"),
        ("{body: {regex: 'z+'}}", Message(content=b"Subject: a\r\n\r\nbody"),
         "body does not match /z+/"),
        ("{rcpt: x@y}", Data(), "rcpt no recipient does not match x@y"),
        ("{rcpt: {regex: '^x'}}", Rcpt(recipient="b@y"), "rcpt b@y does not match /^x/"),
        ("{rcpt: [x@y, z@y]}", Rcpt(recipient="b@y"), "rcpt b@y does not match [x@y, z@y]"),
        ("{size: '>1MB'}", Message(content=b"tiny"), "size is 4, wanted >1MB"),
        ("{message_index: 2}", Mail(sender="a@x"), "message_index is 1, wanted 2"),
        ("{state: [a, b]}", Noop(), "state is 'started', wanted 'a' or 'b'"),
        ("{chance: 0}", Noop(), "chance 0 not drawn"),
    ],
)
def test_engine_miss_reasons(when: str, event: Event, reason: str) -> None:
    on = event.phase.value
    reply = "451 4.3.0 x" if on in ("data",) else "550 5.7.1 x"
    eng = engine(f"- {{name: r, on: {on}, when: {when}, reply: {reply}}}\n", seed=1)
    (d,) = play(eng, [event])
    ((name, why),) = d.misses
    assert name == "r"
    assert why.startswith(reason)


def test_engine_misses_only_list_rules_before_the_match() -> None:
    (d,) = play(engine(FIRST_MATCH), [Rcpt(recipient="vip@lab.test")])
    assert d.misses == ()
    (d,) = play(engine(FIRST_MATCH), [Rcpt(recipient="x@elsewhere.test")])
    assert [name for name, _ in d.misses] == ["exact", "domain", "also exact, never reached"]


# ------------------------------------------------------------- robustness


def test_engine_matcher_error_is_a_miss_not_a_crash() -> None:
    class Broken(m.Matcher):
        def check(self, facts: m.Facts) -> str | None:
            raise RuntimeError("boom")

    rule = m.Rule(name="broken", on=m.Phase.NOOP, when=(Broken("broken"),),
                  reply=parse_reply("250 ok"))
    (d,) = play(Engine(m.Scenario(name="b", rules=(rule,))), [Noop()])
    assert d.rule is None
    assert d.misses == (("broken", "broken failed: RuntimeError: boom"),)


def test_engine_connect_counts_per_client_address() -> None:
    eng = Engine(m.Scenario(name="e"))
    numbers = [eng.connect(c).number for c in
               ["10.0.0.1", "10.0.0.2", "10.0.0.1", "::ffff:10.0.0.1", "10.0.0.2"]]
    assert numbers == [1, 1, 2, 3, 2]
    assert eng.connect("10.0.0.9").client == ipaddress.ip_address("10.0.0.9")


def test_engine_rcpt_index_counts_per_transaction_on_each_connection() -> None:
    eng = engine("""\
        - on: rcpt
          when: {rcpt_index: "> 2"}
          reply: 452 4.5.3 Too many recipients
        """)
    a = Dialogue(eng, CLIENT)
    b = Dialogue(eng, CLIENT)
    for conn in (a, b):
        conn.decide(Helo(name="c.lab.test"))
        conn.decide(Mail(sender="s@lab.test"))
    # interleaved transactions keep their own counts
    got = [code(conn.decide(Rcpt(recipient=f"r{i}@lab.test")))
           for i in range(3) for conn in (a, b)]
    assert got == [None, None, None, None, 452, 452]
    a.decide(Rset())
    a.decide(Mail(sender="s@lab.test"))
    assert code(a.decide(Rcpt(recipient="x@lab.test"))) is None


def test_engine_auth_user_none_names_an_anonymous_session() -> None:
    eng = engine("""\
        - name: anonymous
          on: mail
          when: {auth_user: "<none>"}
          reply: 530 5.7.57 Client not authenticated
        - name: any user
          on: rcpt
          when: {auth_user: "*"}
          reply: 250 2.1.5 Hello user
        """)
    conn = Dialogue(eng, CLIENT)
    conn.decide(Helo(name="c.lab.test"))
    assert code(conn.decide(Mail(sender="a@lab.test"))) == 530
    conn.auth_user = "alice"  # as after AUTH
    assert conn.decide(Mail(sender="a@lab.test")).rule is None
    assert conn.decide(Rcpt(recipient="b@lab.test")).rule == "any user"


# ------------------------------------------------------------ the rule index


INDEXED = """\
- {name: exact, on: rcpt, when: {rcpt: [Boss@Lab.test, ceo@lab.test]}, reply: 550 5.1.1 a}
- {name: domain, on: rcpt, when: {rcpt: "*@other.test", mail_from: "x@*"}, reply: 550 5.1.1 b}
- {name: local, on: rcpt, when: {rcpt: "info@*"}, reply: 550 5.1.1 c}
- {name: glob, on: rcpt, when: {rcpt: "*temp*"}, reply: 451 4.2.0 d}
- {name: regex, on: rcpt, when: {rcpt: {regex: "^r[0-9]+@"}}, reply: 550 5.1.1 e}
- {name: client, on: rcpt, when: {client: 192.0.2.10/32, rcpt: "c*@*"}, reply: 550 5.7.1 f}
- {name: sender, on: rcpt, when: {mail_from: ["<>", ""]}, reply: 550 5.7.1 g}
- {name: helo, on: rcpt, when: {helo: bad.test}, reply: 550 5.7.1 h}
- {name: twice, on: rcpt, when: {rcpt: "once@*"}, reply: 550 5.1.1 i, times: 1}
- {name: anchored, on: rcpt, when: {rcpt: {regex: "^Admin@lab\\\\.test$"}}, reply: 550 5.1.1 j}
- {name: maybe, on: rcpt, when: {rcpt: {regex: "\\\\Abou?nce-"}}, reply: 550 5.1.1 k}
- {name: either, on: rcpt, when: {rcpt: {regex: "^zz|yy"}}, reply: 550 5.1.1 l}
- {name: inside, on: rcpt, when: {rcpt: {regex: "ser7@la"}}, reply: 550 5.1.1 m}
- {name: inside2, on: rcpt, when: {rcpt: {regex: "(?i)x-?ray\\\\d+@"}}, reply: 550 5.1.1 n}
- {name: digits, on: rcpt, when: {rcpt: {regex: "ops\\\\d{2}\\\\.ab+c"}}, reply: 550 5.1.1 o}
- {name: folded, on: rcpt, when: {rcpt: {regex: "list"}}, reply: 550 5.1.1 p}
"""


@pytest.mark.parametrize("sender", ["a@lab.test", "x@elsewhere.test", ""])
@pytest.mark.parametrize("client", ["192.0.2.10", "198.51.100.1"])
def test_engine_index_decides_and_explains_as_testing_every_rule(sender: str,
                                                                 client: str) -> None:
    """The index passes over rules that cannot match; the decisions and the
    near-miss reasons are exactly those of testing every rule in order."""
    fast, slow = engine(INDEXED), engine(INDEXED)
    for table in slow._tables.values():
        table.indexed = False  # the plain loop over every rule
    rcpts = ["boss@LAB.TEST", "ceo@lab.test", "u@other.test", "info@x.test", "temp1@x.test",
             "r12@x.test", "carol@x.test", "nobody@x.test", "once@x.test", "once@y.test",
             "a@b@other.test", "Admin@lab.test", "admin@lab.test", "bonce-1@x.test",
             "bounce-2@x.test", "xyy@x.test", "zz@x.test", "user7@lab.test", "USER7@LAB.test",
             "user8@lab.test", "Xray12@x.test", "xray@x.test", "ops12.abbbc@x.test",
             "ops1.abc@x.test", "LIST@x.test", "li\u017ft@x.test", "ser7@l\u00e4b.test"]
    for helo in ("client.lab.test", "bad.test"):
        got = []
        for eng in (fast, slow):
            conn = Dialogue(eng, client)
            conn.decide(Helo(name=helo))
            conn.decide(Mail(sender=sender))
            got.append([(d.rule, list(d.misses))
                        for d in (conn.decide(Rcpt(recipient=r)) for r in rcpts)])
        assert got[0] == got[1]
    table = fast._tables[m.Phase.RCPT]
    assert table.indexed
    filed = {table.rules[pos].name for pos in range(len(table.rules))} - {
        table.rules[pos].name for pos in table.always}
    assert {"inside", "digits", "folded", "anchored", "regex"} <= filed
    assert {"either", "inside2", "glob", "twice"}.isdisjoint(filed)


@pytest.mark.parametrize(("pattern", "prefix"), [
    (r"^user5@lab\.test$", "user5@lab.test"), (r"^bounce-", "bounce-"), (r"\Afoo\d", "foo"),
    (r"^ab*c", "a"), (r"^ab+c", "ab"), (r"^ab?", "a"), (r"^a{2}", ""), (r"^\.x", ".x"),
    (r"bounce", ""), (r"^a|b", ""), (r"(?i)^x", ""), (r"(?m)^x", ""), (r"^x\s", "x"),
    (r"^[ab]c", ""), (r"^(ab)", "")])
def test_index_reads_an_anchored_expressions_literal_prefix(pattern: str, prefix: str) -> None:
    from harness.scenario.index import literal_prefix

    assert literal_prefix(re.compile(pattern)) == prefix


@pytest.mark.parametrize(("pattern", "literal"), [
    (r"user1@lab", "user1@lab"), (r"bounce-\d+@", "bounce-"), (r"ab*c", "a"), (r"ab+c", "ab"),
    (r"a{2}bcd", "bcd"), (r"x\.test$", "x.test"), (r"foo.bar", "foo"), (r"\bword\b", "word"),
    (r"abc?", "ab"), (r"(?i)hello", ""), (r"a|bcd", ""), (r"[ab]cde", ""), (r"\x41bcd", ""),
    (r"ab\u0041cdef", "ab"), (r"\N{DIGIT ONE}23", ""), (r"a\12345", "a")])
def test_index_reads_the_text_an_expression_must_contain(pattern: str, literal: str) -> None:
    from harness.scenario.index import required_literal

    assert required_literal(re.compile(pattern)) == literal


def test_index_literal_is_in_every_string_an_expression_matches() -> None:
    """Random expressions of literals, escapes, classes and quantifiers
    (seeded): whatever one finds contains the text the index files it by."""
    from harness.scenario.index import required_literal

    rng = random.Random(10)
    atoms = ["a", "b", "c", "@", "-", "\\.", ".", "\\d", "\\w", "x", "y", "\\-", "1"]
    quants = ["", "", "", "*", "+", "?", "{0,2}", "{2}", "*?"]
    alphabet = "abcxy@-.1_"
    for _ in range(3000):
        pattern = "".join(rng.choice(atoms) + rng.choice(quants)
                          for _ in range(rng.randint(1, 6)))
        regex = re.compile(pattern, re.IGNORECASE)
        literal = required_literal(regex).lower()
        for _ in range(20):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
            m = regex.search(text)
            if m:
                assert literal in text.lower(), (pattern, text, literal)


# A pattern that backtracks without end ((a|aa)+$ on a run of a's ending in
# something else) gives up after the time limit: the rule does not match,
# the next one decides, and the engine reports the pattern, never hangs.
_RUNAWAY = "'(a|aa)+$'"


@pytest.mark.parametrize(
    ("when", "event"),
    [
        (f"{{rcpt: {{regex: {_RUNAWAY}}}}}", Rcpt(recipient="a" * 60 + "!")),
        (f"{{helo: {{regex: {_RUNAWAY}}}}}", Helo(name="a" * 60 + "!")),
        (f"{{header: {{Subject: {{regex: {_RUNAWAY}}}}}}}",
         Message(content=b"Subject: " + b"a" * 60 + b"!\r\n\r\nx")),
    ],
)
def test_engine_runaway_pattern_gives_up(when: str, event: Event,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "VALUE_TIMEOUT", 0.05)  # the suite's time, not the default's
    on = event.phase.value
    eng = engine(f"- {{name: slow, on: {on}, when: {when}, reply: 550 5.7.1 slow}}\n"
                 f"- {{name: next, on: {on}, reply: 451 4.3.0 next}}\n", seed=1)
    (d,) = play(eng, [event])
    assert d.rule == "next"
    ((name, why),) = d.misses
    assert name == "slow"
    assert "PatternTimeout" in why and "/(a|aa)+$/ gave up after 0.05 s" in why
    assert [type(e) for e in eng.errors] == [m.PatternTimeout]


def test_engine_runaway_body_pattern_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "BODY_TIMEOUT", 0.05)
    eng = engine(f"- {{name: slow, on: message, when: {{body: {{regex: {_RUNAWAY}}}}},"
                 " reply: 554 5.7.1 slow}\n", seed=1)
    (d,) = play(eng, [Message(content=b"Subject: x\r\n\r\n" + b"a" * 60 + b"!")])
    assert d.rule is None and d.accepts
    assert "body failed: PatternTimeout: /(a|aa)+$/ gave up after 0.05 s on 61 characters" \
        in d.misses[0][1]


def test_engine_patterns_keep_re_syntax() -> None:
    # what re reads is read (the regex module's own additions are not
    # promised), and re's error is what the loader reports
    with pytest.raises(re.error):
        m.compile_pattern("(")
    p = m.TextPattern(regex=m.compile_pattern(r"(?i)^bounce-\d+@"))
    assert p.matches("BOUNCE-12@lab.test") and not p.matches("x-bounce-12@lab.test")


def test_engine_content_checks_ahead_decide_as_the_decision_would() -> None:
    rules = """
    - {name: invoice, on: message, when: {header: {Subject: '*invoice*'}}, reply: 554 5.7.1 a}
    - {name: attached, on: message, when: {body: attached}, reply: 554 5.7.1 b}
    - {name: priority, on: message, when: {header: {X-Priority: {regex: '^1'}}}, reply: 451 c}
    """
    for content in (MSG, MSG.replace(b"invoice\r\n", b"report\r\n"),
                    b"X-Priority: 1\r\n\r\nplain", b"Subject: none\r\n\r\nnone"):
        inline = play(engine(rules, seed=1), [Message(content=content)])
        eng = engine(rules, seed=1)
        ahead = play(eng, [Message(content=content, checks=eng.content_checks(content))])
        assert [(d.rule, d.reply, d.misses) for d in ahead] == \
            [(d.rule, d.reply, d.misses) for d in inline]


def test_engine_content_checks_of_another_scenario_are_not_taken() -> None:
    # the scenario changed between the checks and the decision: its own
    # conditions are tested in the decision, not taken from the checks
    eng = engine("- {name: old, on: message, when: {body: invoice}, reply: 554 5.7.1 old}\n")
    checks = eng.content_checks(MSG)
    eng.use(scenario("- {name: new, on: message, when: {body: zzz}, reply: 554 5.7.1 new}\n"))
    (d,) = play(eng, [Message(content=MSG, checks=checks)])
    assert d.rule is None and d.misses == (("new", "body does not contain 'zzz'"),)


def test_engine_content_checks_report_a_pattern_that_gave_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "BODY_TIMEOUT", 0.05)
    eng = engine(f"- {{name: slow, on: message, when: {{body: {{regex: {_RUNAWAY}}}}},"
                 " reply: 554 5.7.1 slow}\n")
    content = b"Subject: x\r\n\r\n" + b"a" * 60 + b"!"
    checks = eng.content_checks(content)  # (a worker thread's part)
    assert eng.errors == []
    (d,) = play(eng, [Message(content=content, checks=checks)])
    assert d.accepts and [type(e) for e in eng.errors] == [m.PatternTimeout]
