"""Scenario files into the model (harness/scenario/loader.py): positioned
problems, all at once, "did you mean", the YAML 1.1 trap, phase-aware
matchers, impossible combinations, and build_rule() for rules made in code."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from harness.errors import Problem, ScenarioError
from harness.scenario import model as m
from harness.scenario.loader import build_rule, load_file, load_text

LIBRARY = Path(__file__).resolve().parents[2] / "scenarios"


def load(text: str, path: str = "s.yaml") -> m.Scenario:
    return load_text(textwrap.dedent(text), path)


def problems(text: str, path: str = "s.yaml") -> list[Problem]:
    with pytest.raises(ScenarioError) as info:
        load(text, path)
    return info.value.problems


def one_rule(text: str) -> m.Rule:
    (rule,) = load(text).rules
    return rule


# --------------------------------------------------------------- error format

PROBLEM_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+):(?P<col>\d+): (?P<msg>.+?)"
                          r"(?: \((?P<hint>.+)\))?$")


def test_loader_error_reads_path_line_col_problem_hint() -> None:
    text = """\
        rules:
          - name: a
            on: rcpt
            whn: {rcpt: x}
            reply: 550 5.1.1 no
        """
    with pytest.raises(ScenarioError) as info:
        load(text, "lab/greylist.yaml")
    assert str(info.value) == (
        "lab/greylist.yaml:4:5: unknown key whn in rule 1 (did you mean when?)")
    match = PROBLEM_LINE.match(str(info.value))
    assert match is not None
    assert match.group("path", "line", "col") == ("lab/greylist.yaml", "4", "5")


def test_loader_error_without_hint_has_no_parentheses() -> None:
    (p,) = problems("""\
        rules:
          - on: rcpt
            reply: 550 5.1.1 no
            times: 0
        """)
    assert str(p) == "s.yaml:4:12: times must be at least 1, not 0"


def test_loader_error_is_a_value_error_and_harness_error() -> None:
    from harness.errors import HarnessError

    with pytest.raises(ScenarioError) as info:
        load("rules: 3\n")
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, HarnessError)
    assert info.value.path == "s.yaml"


def test_loader_reports_three_mistakes_at_once_with_positions() -> None:
    text = """\
        scenario: three-mistakes
        rules:
          - name: a
            on: rcpt
            whn: {rcpt: x}
            reply: 550 4.1.1 nope
          - name: b
            on: connect
            when: {rcpt: x}
            reply: 554 5.7.1 no
        """
    found = problems(text)
    assert [(p.line, p.column) for p in found] == [(5, 5), (6, 12), (9, 12)]
    assert "unknown key whn" in found[0].message
    assert found[0].hint == "did you mean when?"
    assert "disagrees with reply code 550" in found[1].message
    assert "rcpt is not known at on: connect" in found[2].message
    with pytest.raises(ScenarioError) as info:
        load(text)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert all(PROBLEM_LINE.match(line) for line in lines)


def test_loader_problems_are_sorted_by_position() -> None:
    found = problems("""\
        rules:
          - on: rcpt
            reply: 999 bad
        server:
          hostnmae: x
        tags: [a]
        summry: x
        """)
    positions = [(p.line, p.column) for p in found]
    assert positions == sorted(positions)
    assert len(found) == 3


def test_loader_rule_without_on_and_misplaced_key_reports_both() -> None:
    # Both mistakes at once: a when-key at rule level, and no on: at all.
    found = problems("""\
        rules:
          - {name: a, connection: 2, reply: 250 ok}
        """)
    assert sorted(p.message for p in found) == [
        "rule 1 has no on:", "unknown key connection in rule 1"]


def test_loader_misspelt_on_is_reported_once() -> None:
    (p,) = problems("""\
        rules:
          - onn: rcpt
            reply: 550 5.1.1 no
        """)
    assert (p.line, p.column, p.message, p.hint) == (
        2, 5, "unknown key onn in rule 1", "did you mean on?")


# ------------------------------------------------------------- did you mean

@pytest.mark.parametrize(
    ("text", "position", "message", "hint"),
    [
        ("rules:\n  - on: rcpt\n    whn: {rcpt: x}\n    reply: 550 5.1.1 x\n",
         (3, 5), "unknown key whn in rule 1", "did you mean when?"),
        ("rules:\n  - on: mial\n    reply: 550 5.1.1 x\n",
         (2, 9), "on cannot be 'mial'", "did you mean mail?"),
        ("rules:\n  - on: rcpt\n    rpely: 550 5.1.1 x\n",
         (3, 5), "unknown key rpely in rule 1", "did you mean reply?"),
        ("rules:\n  - on: rcpt\n    when: {mial_from: x}\n    reply: 550 5.1.1 x\n",
         (3, 12), "unknown key mial_from in when", "did you mean mail_from?"),
        ("rules:\n  - on: rcpt\n    when: {rctp: x}\n    reply: 550 5.1.1 x\n",
         (3, 12), "unknown key rctp in when", "did you mean rcpt?"),
        ("rulez: []\n", (1, 1), "unknown key rulez in the scenario", "did you mean rules?"),
        ("server: {hostnmae: x}\n", (1, 10), "unknown key hostnmae in server",
         "did you mean hostname?"),
        ("server: {extensions: {pipelinig: true}}\n", (1, 23),
         "unknown key pipelinig in extensions", "did you mean pipelining?"),
        ("rules:\n  - on: rcpt\n    fault: dorp\n", (3, 12), "fault cannot be 'dorp'",
         "did you mean drop?"),
        ("rules:\n  - on: rcpt\n    reply: 421 bye\n    then: clsoe\n", (4, 11),
         "then cannot be 'clsoe'", "did you mean close?"),
        ("expect: {outcome: bounce}\n", (1, 19), "outcome cannot be 'bounce'",
         "did you mean bounced?"),
        ("expect: {min_attempt: 2}\n", (1, 10), "unknown key min_attempt in expect",
         "did you mean min_attempts?"),
        ("send: {mail_form: a@b}\n", (1, 8), "unknown key mail_form in send",
         "did you mean mail_from?"),
    ],
)
def test_loader_suggests_did_you_mean(text: str, position: tuple[int, int], message: str,
                                      hint: str) -> None:
    (p,) = problems(text)
    assert ((p.line, p.column), p.message, p.hint) == (position, message, hint)


def test_loader_unknown_key_far_from_any_lists_known_keys() -> None:
    (p,) = problems("rules:\n  - on: rcpt\n    zzzzzz: 1\n    reply: 550 5.1.1 x\n")
    assert p.hint is not None and p.hint.startswith("known keys: name, on, when")


# ----------------------------------------------------------- YAML 1.1 trap
# Spec: "YAML 1.1 parsers read the key `on` and values `off`, `yes`, `no` as
# booleans: the loader keeps them as words (and a test proves it)."


def test_loader_yaml11_on_off_yes_no_stay_words() -> None:
    s = load("""\
        server:
          extensions: {pipelining: off, smtputf8: yes, 8bitmime: no, enhancedstatuscodes: on}
        rules:
          - name: yes
            on: rcpt
            when: {state: off, helo: yes, rcpt: no}
            reply: 550 5.1.1 no
            set_state: no
          - name: off
            on: helo
            when: {helo: [on, off, y, n, true]}
            set_state: off
        """)
    first, second = s.rules
    # the key `on` is the word "on", not True
    assert first.on is m.Phase.RCPT
    assert second.on is m.Phase.HELO
    # values where a word is expected keep their spelling
    assert first.name == "yes"
    assert second.name == "off"
    assert first.set_state == "no"
    assert second.set_state == "off"
    matchers = {mt.key: mt for mt in first.when}
    assert isinstance(matchers["state"], m.StateMatcher)
    assert matchers["state"].states == ("off",)
    assert isinstance(matchers["helo"], m.TextMatcher)
    assert matchers["helo"].pattern.globs == ("yes",)
    assert isinstance(matchers["rcpt"], m.RcptMatcher)
    assert matchers["rcpt"].pattern.globs == ("no",)
    (helo,) = second.when
    assert isinstance(helo, m.TextMatcher)
    assert helo.pattern.globs == ("on", "off", "y", "n", "true")
    assert first.reply is not None and first.reply.lines == ("no",)
    # where a boolean is expected, YAML 1.1's words read as booleans
    ext = s.server.extensions
    assert (ext.pipelining, ext.smtputf8, ext.eightbitmime, ext.enhancedstatuscodes) == (
        False, True, False, True)


@pytest.mark.parametrize(
    ("word", "value"),
    [("on", True), ("off", False), ("yes", True), ("no", False), ("true", True),
     ("false", False), ("True", True), ("OFF", False), ("y", True), ("n", False)],
)
def test_loader_boolean_field_reads_yaml11_words(word: str, value: bool) -> None:
    s = load(f"server:\n  extensions: {{pipelining: {word}}}\nexpect: {{delay_notice: {word}}}\n")
    assert s.server.extensions.pipelining is value
    assert s.expect is not None and s.expect.delay_notice is value


@pytest.mark.parametrize("word", ["on", "off", "yes", "no", "true", "1", "0x1F", "1_000",
                                  "2001-01-01", "3.0", ".nan"])
def test_loader_word_fields_keep_implicitly_typed_scalars_verbatim(word: str) -> None:
    rule = one_rule(f"rules:\n  - name: {word}\n    on: rcpt\n    when: {{state: {word}}}\n"
                    f"    set_state: {word}\n")
    assert rule.name == word
    assert rule.set_state == word
    (state,) = rule.when
    assert isinstance(state, m.StateMatcher) and state.states == (word,)


@pytest.mark.parametrize("word", ["", "~", "null", "Null", "NULL"])
def test_loader_null_is_empty_not_the_word_null(word: str) -> None:
    (p,) = problems(f"rules:\n  - on: rcpt\n    set_state: {word}\n")
    assert p.message == "set_state is empty"


def test_loader_quoted_null_is_a_word() -> None:
    assert one_rule("rules:\n  - on: rcpt\n    set_state: 'null'\n").set_state == "null"


def test_loader_on_key_works_in_flow_style_and_uppercase_value() -> None:
    (a, b) = load("rules:\n  - {on: RCPT, reply: 250 ok}\n  - {'on': mail, reply: 250 ok}\n"
                  ).rules
    assert (a.on, b.on) == (m.Phase.RCPT, m.Phase.MAIL)


@pytest.mark.parametrize("value", ["maybe", "1", "enabled"])
def test_loader_boolean_field_rejects_other_words(value: str) -> None:
    (p,) = problems(f"server:\n  extensions: {{pipelining: {value}}}\n")
    assert p.message == f"extensions pipelining must be true or false, not {value!r}"


# --------------------------------------------------------------- YAML syntax


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("rules:\n  - on: rcpt\n    when: {rcpt: x\n", (4, 1)),
        ("rules:\n  - on: rcpt\n   reply: 250 ok\n", (3, 4)),
        ("rules:\n\t- on: rcpt\n", (2, 1)),
        ("summary: 'unterminated\n", (2, 1)),
        ("a: b\n c: d\n", (2, 3)),
        ("rules: [a, b\nsummary: x\n", (2, 8)),
        ("x: *nowhere\n", (1, 4)),
    ],
)
def test_loader_yaml_syntax_errors_are_positioned(text: str, position: tuple[int, int]) -> None:
    (p,) = problems(text)
    assert p.message.startswith("not valid YAML: ")
    assert (p.line, p.column) == position


def test_loader_rejects_several_documents() -> None:
    (p,) = problems("summary: a\n---\nsummary: b\n")
    assert p.message.startswith("not valid YAML")
    assert p.line == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("# only a comment\n", "the file is empty"),
        ("- a\n- b\n", "the scenario must be a mapping of keys to values"),
        ("just words\n", "the scenario must be a mapping of keys to values"),
        ("rules: {on: rcpt}\n", "rules must be a list of rules"),
        ("rules:\n  - just a word\n", "rule 1 must be a mapping of keys to values"),
        ("summary: [a, b]\n", "summary must be a single value, not a list"),
        ("summary:\n", "summary is empty"),
        ("tags: []\n", "tags is an empty list"),
        ("summary: a\nsummary: b\n", "summary is given twice in the scenario"),
        ("? [a, b]\n: c\n", "a key in the scenario must be a plain word"),
    ],
)
def test_loader_rejects_badly_shaped_files(text: str, message: str) -> None:
    found = problems(text)
    assert message in [p.message for p in found]


def test_loader_duplicate_key_hints_first_line() -> None:
    (p,) = problems("rules:\n  - on: rcpt\n    reply: 250 a\n    reply: 250 b\n")
    assert (p.line, p.message, p.hint) == (4, "reply is given twice in rule 1",
                                           "first at line 3")


# ---------------------------------------------------------- phase-aware keys


@pytest.mark.parametrize(
    ("on", "key", "value"),
    [
        ("connect", "rcpt", "x@y"),
        ("connect", "helo", "x"),
        ("connect", "mail_from", "x@y"),
        ("helo", "mail_from", "x@y"),
        ("mail", "rcpt", "x@y"),
        ("rcpt", "header", "{Subject: x}"),
        ("data", "body", "x"),
        ("rcpt", "size", "'>1MB'"),
        ("vrfy", "first_seen", "'< 60s'"),
        ("helo", "message_index", "1"),
        ("noop", "rcpt", "x@y"),
        ("quit", "mail_from", "x@y"),
        ("helo", "auth_user", "alice"),
    ],
)
def test_loader_rejects_matcher_unknown_at_phase(on: str, key: str, value: str) -> None:
    reply = {"data": "451 4.3.0 x", "quit": "221 bye"}.get(on, "550 5.7.1 x")
    (p,) = problems(f"rules:\n  - on: {on}\n    when: {{{key}: {value}}}\n"
                    f"    reply: {reply}\n")
    assert p.message == f"{key} is not known at on: {on}"
    assert p.hint is not None and p.hint.startswith("it can be used on: ")
    assert (p.line, p.column) == (3, 12)


@pytest.mark.parametrize(
    ("on", "key", "value"),
    [
        ("connect", "client", "127.0.0.1"),
        ("connect", "connection", "2"),
        ("connect", "state", "started"),
        ("connect", "chance", "0.5"),
        ("connect", "attempt", "1..2"),
        ("helo", "helo", "'*.example'"),
        ("mail", "mail_from", "'<>'"),
        ("mail", "size", "'>1MB'"),
        ("mail", "message_index", "2"),
        ("rcpt", "rcpt", "x@y"),
        ("rcpt", "first_seen", "'< 60s'"),
        ("data", "rcpt", "x@y"),
        ("message", "header", "{Subject: '*x*'}"),
        ("message", "body", "x"),
        ("message", "size", "'>1MB'"),
        ("vrfy", "rcpt", "x@y"),
        ("rcpt", "auth_user", "alice"),
    ],
)
def test_loader_accepts_matcher_known_at_phase(on: str, key: str, value: str) -> None:
    reply = {"data": "451 4.3.0 x", "connect": "554 5.7.1 x"}.get(on, "550 5.7.1 x")
    rule = one_rule(f"rules:\n  - on: {on}\n    when: {{{key}: {value}}}\n    reply: {reply}\n")
    assert [mt.key for mt in rule.when] == [key]


@pytest.mark.parametrize("on", ["starttls", "auth", "bdat"])
def test_loader_takes_the_protocol_phases(on: str) -> None:
    rule = one_rule(f"rules:\n  - on: {on}\n    reply: 554 5.7.1 x\n")
    assert rule.on.value == on


def test_loader_auth_matchers_take_result_words_at_their_phases() -> None:
    rule = one_rule("rules:\n  - on: mail\n    when: {spf: [fail, softfail]}\n"
                    "    reply: 550 5.7.23 SPF validation failed\n")
    assert [(mt.key, mt.results) for mt in rule.when] == [("spf", ("fail", "softfail"))]
    (p,) = problems("rules:\n  - on: rcpt\n    when: {dkim: fail}\n    reply: 550 5.7.1 x\n")
    assert p.message == "dkim is not known at on: rcpt"
    (p,) = problems("rules:\n  - on: message\n    when: {dmarc: failed}\n"
                    "    reply: 550 5.7.26 x\n")
    assert p.message == "dmarc cannot be 'failed'"


# ------------------------------------------------------- impossible combos


@pytest.mark.parametrize(
    ("rule", "position", "message"),
    [
        ("on: rcpt\n    reply: 550 5.1.1 x\n    fault: drop", (4, 12),
         "fault: drop sends no reply, yet the rule has one"),
        ("on: rcpt\n    reply: 550 5.1.1 x\n    fault: reset", (4, 12),
         "fault: reset sends no reply, yet the rule has one"),
        ("on: message\n    reply: 451 4.3.0 x\n    fault: hang", (4, 12),
         "fault: hang sends no reply, yet the rule has one"),
        ("on: rcpt\n    fault: drop\n    then: close", (4, 11),
         "then: close cannot follow fault: drop"),
        ("on: rcpt\n    reply: 550 5.1.1 x\n    drip: 1s", (4, 11),
         "drip only applies to fault: tarpit"),
        ("on: rcpt\n    reply: 354 go on", (3, 12),
         "a 354 reply means 'go on' and only fits on: data"),
        ("on: data\n    reply: 250 ok", (3, 12),
         "on: data takes 354 to go on, or a 4xx/5xx to refuse"),
        ("on: quit\n    reply: 421 4.3.0 no", (3, 12),
         "QUIT can only be answered 221; use a fault to misbehave"),
        ("on: rcpt\n    when: {rcpt: x}", (2, 5), "rule 1 does nothing"),
        ("on: rcpt\n    times: 2", (2, 5), "rule 1 does nothing"),
        ("on: rcpt\n    reply: 550 5.1.1 x\n    times: 0", (4, 12),
         "times must be at least 1, not 0"),
        ("on: rcpt\n    reply: 550 5.1.1 x\n    times: two", (4, 12),
         "times must be a whole number, not 'two'"),
        ("on: rcpt\n    delay: {uniform: [5s, 1s]}", (3, 22),
         "delay uniform high (1s) is below low (5s)"),
        ("on: rcpt\n    delay: {uniform: [1s]}", (3, 22),
         "delay uniform takes two durations [low, high]"),
        ("on: rcpt\n    delay: {lognormal: {median: 2s}}", (3, 24),
         "delay lognormal needs median and sigma"),
        ("on: rcpt\n    delay: {lognormal: {median: 0s, sigma: 1}}", (3, 24),
         "delay lognormal needs median > 0 and a finite sigma >= 0"),
        ("on: rcpt\n    delay: {lognormal: {median: 1s, sigma: nan}}", (3, 24),
         "delay lognormal needs median > 0 and a finite sigma >= 0"),
        ("on: rcpt\n    delay: {lognormal: {median: 1s, sigma: -inf}}", (3, 24),
         "delay lognormal needs median > 0 and a finite sigma >= 0"),
        ("on: rcpt\n    delay: {uniform: [1s, 2s], lognormal: {median: 1s, sigma: 1}}",
         (3, 12), "delay takes a duration, {uniform: [low, high]} or "
         "{lognormal: {median, sigma}}"),
        ("on: rcpt\n    delay: soon", (3, 12),
         "delay: expected a duration such as 5s, 250ms or 2m, got 'soon'"),
        ("on: rcpt\n    when: {chance: 1.5}\n    reply: 250 ok", (3, 20),
         "chance must be between 0 and 1, not 1.5"),
        ("on: rcpt\n    when: {chance: often}\n    reply: 250 ok", (3, 20),
         "chance must be a probability such as 0.25 or 25%, not 'often'"),
        ("on: rcpt\n    when: {client: 300.1.1.1}\n    reply: 250 ok", (3, 20),
         "client '300.1.1.1' is not an IP address or CIDR network"),
        ("on: rcpt\n    when: {rcpt: {regex: '('}}\n    reply: 250 ok", (3, 26),
         "rcpt regex does not compile: missing ), unterminated subpattern at position 0"),
        ("on: rcpt\n    when: {rcpt: {glob: x}}\n    reply: 250 ok", (3, 19),
         "unknown key glob in rcpt"),
        ("on: message\n    when: {body: {contains: a, regex: b}}\n    reply: 250 ok",
         (3, 18), "body takes contains or regex, not both"),
        ("on: message\n    when: {header: [Subject]}\n    reply: 250 ok", (3, 20),
         "header must map header names to patterns"),
        ("on: message\n    when: {header: {'Bad Name': x}}\n    reply: 250 ok", (3, 21),
         "'Bad Name' is not a header field name"),
        ("on: rcpt\n    when: {attempt: 5..2}\n    reply: 250 ok", (3, 21),
         "attempt: range '5..2' is empty: 2 is below 5"),
        ("on: rcpt\n    when: {first_seen: '< soon'}\n    reply: 250 ok", (3, 24),
         "first_seen: expected a duration such as 5s, 250ms or 2m, got 'soon'"),
        ("on: rcpt\n    reply: 550 4.1.1 x", (3, 12),
         "reply: enhanced status 4.1.1 disagrees with reply code 550: its class must be 5"),
        ("on: rcpt\n    reply: [550 5.7.1 a, 451 4.7.1 b]", (3, 12),
         "reply: all lines of a multi-line reply need the same code, got [451, 550]"),
        ("on: rcpt\n    reply:", (3, 11), "reply is empty"),
    ],
)
def test_loader_rejects_impossible_rules(rule: str, position: tuple[int, int],
                                         message: str) -> None:
    found = problems(f"rules:\n  - {rule}\n")
    assert [((p.line, p.column), p.message) for p in found] == [(position, message)]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("on: rcpt\n    reply: 421 4.3.2 bye\n    then: close", {"close": True}),
        ("on: rcpt\n    fault: drop", {"fault": m.Fault.DROP}),
        ("on: rcpt\n    fault: reset", {"fault": m.Fault.RESET}),
        ("on: rcpt\n    fault: hang", {"fault": m.Fault.HANG}),
        ("on: rcpt\n    reply: 451 4.3.0 slow\n    fault: tarpit\n    drip: 250ms",
         {"fault": m.Fault.TARPIT, "drip": 0.25}),
        ("on: data\n    reply: 354 go ahead", {"reply": "354 go ahead"}),
        ("on: quit\n    reply: 221 2.0.0 bye", {"reply": "221 2.0.0 bye"}),
        ("on: rcpt\n    set_state: second", {"set_state": "second"}),
        ("on: rcpt\n    delay: 5s", {"delay": m.Delay("fixed", 5.0)}),
        ("on: rcpt\n    delay: {uniform: [1s, 5s]}", {"delay": m.Delay("uniform", 1.0, 5.0)}),
        ("on: rcpt\n    delay: {lognormal: {median: 2s, sigma: 0.5}}",
         {"delay": m.Delay("lognormal", 2.0, 0.5)}),
        ("on: rcpt\n    reply: 550 5.1.1 x\n    times: 3", {"times": 3}),
        ("on: rcpt\n    reply: [550 5.7.1 a, 550 5.7.1 b]",
         {"reply": "550-5.7.1 a / 550 5.7.1 b"}),
    ],
)
def test_loader_reads_rule_outcomes(rule: str, expected: dict[str, object]) -> None:
    r = one_rule(f"rules:\n  - {rule}\n")
    for key, value in expected.items():
        got = getattr(r, key)
        assert (str(got) if key == "reply" else got) == value


@pytest.mark.parametrize(
    ("when", "matcher"),
    [
        ("{client: 10.0.0.0/8}", "client"),
        ("{client: [127.0.0.1, '::1']}", "client"),
        ("{rcpt: [a@x, b@x]}", "rcpt"),
        ("{rcpt: {regex: '^a'}}", "rcpt"),
        ("{chance: 25%}", "chance"),
        ("{state: [a, b]}", "state"),
    ],
)
def test_loader_reads_matcher_forms(when: str, matcher: str) -> None:
    r = one_rule(f"rules:\n  - on: rcpt\n    when: {when}\n    reply: 250 ok\n")
    assert [mt.key for mt in r.when] == [matcher]


def test_loader_chance_percent_is_a_probability() -> None:
    (chance,) = one_rule("rules:\n  - on: rcpt\n    when: {chance: 25%}\n"
                         "    reply: 250 ok\n").when
    assert isinstance(chance, m.ChanceMatcher) and chance.probability == 0.25


# --------------------------------------------------------------- rule names


def test_loader_rejects_duplicate_rule_names() -> None:
    (p,) = problems("""\
        rules:
          - name: same
            on: rcpt
            reply: 550 5.1.1 x
          - name: same
            on: mail
            reply: 550 5.1.1 x
        """)
    assert ((p.line, p.column), p.message, p.hint) == (
        (5, 11), "rule name 'same' is used twice", "first at line 2")


def test_loader_rejects_name_clashing_with_unnamed_rule() -> None:
    # an unnamed rule is "rule N"; a second rule of that name would share its
    # `times` counter in the engine
    (p,) = problems("""\
        rules:
          - on: rcpt
            reply: 550 5.1.1 x
          - name: rule 1
            on: mail
            reply: 550 5.1.1 x
        """)
    assert (p.line, p.message, p.hint) == (4, "rule name 'rule 1' is used twice",
                                           "first at line 2")


def test_loader_unnamed_rules_are_named_by_position() -> None:
    s = load("rules:\n  - {on: rcpt, reply: 250 a}\n  - {on: mail, reply: 250 b}\n")
    assert [r.name for r in s.rules] == ["rule 1", "rule 2"]
    assert [r.line for r in s.rules] == [2, 3]


# ------------------------------------------------------------- whole files


def test_loader_reads_the_design_example() -> None:
    s = load("""\
        scenario: greylisting
        summary: First attempt of each sender/recipient pair is greylisted for 60 s
        tags: [transient, retry]
        server:
          hostname: mx.harness.test
          greeting: ESMTP ready
          size_limit: 10MB
          extensions: {pipelining: true, smtputf8: true, 8bitmime: true,
                       enhancedstatuscodes: true}
        rules:
          - name: greylist
            on: rcpt
            when: {rcpt: "*@lab.test", first_seen: "< 60s"}
            reply: 451 4.7.1 Greylisted, try again later
          - name: mailbox full
            on: rcpt
            when: {rcpt: full@lab.test}
            reply: 552 5.2.2 Mailbox full
          - name: slow then drop after the dot
            on: message
            when: {rcpt: drop@lab.test}
            delay: 5s
            fault: drop
        expect:
          outcome: delivered
          min_attempts: 2
        """)
    assert s.name == "greylisting"
    assert s.tags == ("transient", "retry")
    assert s.server.size_limit == 10_000_000
    assert s.server.greeting == "ESMTP ready"
    assert [r.name for r in s.rules] == ["greylist", "mailbox full",
                                         "slow then drop after the dot"]
    assert s.rules[2].fault is m.Fault.DROP and s.rules[2].delay == m.Delay("fixed", 5.0)
    assert s.expect == m.Expect(outcome=m.Outcome.DELIVERED, min_attempts=2)


def test_loader_name_defaults_to_file_stem(tmp_path: Path) -> None:
    f = tmp_path / "my-case.yaml"
    f.write_text("summary: x\n", encoding="utf-8")
    s = load_file(f)
    assert (s.name, s.path) == ("my-case", str(f))


def test_loader_file_problems_carry_the_path(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("rules:\n  - on: rcpt\n    whn: {}\n    reply: 250 ok\n", encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        load_file(f)
    assert str(info.value).startswith(f"{f}:3:5: unknown key whn")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"summary: \xff\xfe\n", "not UTF-8 text"), (None, "cannot read")],
)
def test_loader_file_unreadable_is_a_problem(tmp_path: Path, content: bytes | None,
                                             message: str) -> None:
    f = tmp_path / "x.yaml"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises(ScenarioError) as info:
        load_file(f)
    (p,) = info.value.problems
    assert (p.path, p.line, p.column) == (str(f), 1, 1)
    assert p.message.startswith(message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: {hostname: 'not a host'}\n", "hostname 'not a host' is not a host name"),
        ("server: {size_limit: huge}\n", "size_limit: expected a size such as 10MB"),
        ("server: {size_limit: " + "9" * 400 + "}\n", "size_limit: size"),
        ("server: {timeout: 0s}\n", "timeout must be above zero"),
        ("expect: {min_attempts: 3, max_attempts: 2}\n", "max_attempts is below min_attempts"),
        ("expect: {ndr: {status: 5.1}}\n", "ndr status '5.1' is not an enhanced status code"),
        ("expect: {ndr: {action: bounced}}\n", "ndr action cannot be 'bounced'"),
        ("dns: [a]\n", "dns must map names to records"),
        ("dns: {lab.test: {SPF: [x]}}\n", "unknown key SPF in dns lab.test"),
    ],
)
def test_loader_checks_other_sections(text: str, message: str) -> None:
    found = problems(text)
    assert any(p.message.startswith(message) for p in found), found


def test_loader_reads_send_and_dns() -> None:
    s = load("""\
        dns:
          Lab.Test.: {TXT: ["v=spf1 ip4:127.0.0.1 -all"], MX: [mx.lab.test]}
        send: {mail_from: a@lab.test, rcpt: [b@lab.test, c@lab.test], size: 1KB}
        """)
    assert s.dns == {"lab.test": {"TXT": ("v=spf1 ip4:127.0.0.1 -all",),
                                  "MX": ("mx.lab.test",)}}
    assert s.send == m.Send(mail_from="a@lab.test", rcpt=("b@lab.test", "c@lab.test"),
                            size=1000)


# ------------------------------------------------------------------ library


@pytest.mark.parametrize("path", sorted(LIBRARY.glob("*.yaml")), ids=lambda p: p.stem)
def test_loader_loads_library_scenario(path: Path) -> None:
    s = load_file(path)
    assert s.name
    assert s.summary, f"{path.name} has no summary (harness scenarios shows it)"
    assert len({r.name for r in s.rules}) == len(s.rules)


def test_loader_library_is_not_empty() -> None:
    assert len(list(LIBRARY.glob("*.yaml"))) >= 2


# ---------------------------------------------------------------- build_rule


def test_build_rule_builds_a_rule_from_python_values() -> None:
    r = build_rule({"name": "greylist", "on": "rcpt",
                    "when": {"rcpt": "*@lab.test", "first_seen": "< 60s", "attempt": 1},
                    "reply": "451 4.7.1 Greylisted", "times": 2, "delay": 0.5})
    assert (r.name, r.on, str(r.reply), r.times, r.delay) == (
        "greylist", m.Phase.RCPT, "451 4.7.1 Greylisted", 2, m.Delay("fixed", 0.5))
    assert [mt.key for mt in r.when] == ["rcpt", "first_seen", "attempt"]


def test_build_rule_accepts_enums_and_tuples() -> None:
    r = build_rule({"on": m.Phase.RCPT, "when": {"rcpt": ("a@x", "b@x")},
                    "fault": m.Fault.DROP})
    assert (r.on, r.fault) == (m.Phase.RCPT, m.Fault.DROP)
    (rcpt,) = r.when
    assert isinstance(rcpt, m.RcptMatcher) and rcpt.pattern.globs == ("a@x", "b@x")


def test_build_rule_keeps_on_and_off_as_words() -> None:
    r = build_rule({"name": "off", "on": "rcpt", "when": {"state": "off"},
                    "set_state": "no"})
    assert (r.name, r.set_state, r.when[0]) == ("off", "no", m.StateMatcher("state", ("off",)))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"on": "rcpt", "reply": "550 5.1.1 x", "fault": "drop"},
         "fault: drop sends no reply, yet the rule has one"),
        ({"on": "connect", "when": {"rcpt": "x"}, "reply": "554 5.7.1 x"},
         "rcpt is not known at on: connect"),
        ({"on": "rcpt", "reply": "550 4.1.1 x"},
         "reply: enhanced status 4.1.1 disagrees with reply code 550: its class must be 5"),
        ({"on": "rcpt", "reply": "354 2.0.0 go"},
         "reply: a 354 reply takes no enhanced status code"),
        ({"on": "rcpt", "reply": "600 x"}, "reply: reply code 600 is outside 200-599"),
        ({"on": "rcpt", "whn": {}, "reply": "250 ok"}, "unknown key whn in rule 1"),
        ({"on": "mial", "reply": "250 ok"}, "on cannot be 'mial'"),
        ({"on": "rcpt"}, "rule 1 does nothing"),
        ({"reply": "250 ok"}, "rule 1 has no on:"),
        ({"on": "rcpt", "reply": None}, "reply is empty"),
        ({"on": "rcpt", "reply": "250 ok", "times": 0}, "times must be at least 1, not 0"),
        ({"on": "rcpt", "reply": "250 ok", "when": {"attempt": "lots"}},
         "attempt: expected a whole number, got 'lots'"),
        ({"on": "rcpt", "reply": "250 ok", "when": {"chance": 2}},
         "chance must be between 0 and 1, not 2"),
    ],
)
def test_build_rule_validates_like_a_file(spec: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError) as in_code:
        build_rule(spec)
    assert message in [p.message for p in in_code.value.problems]
    # the same rule in a file gives the same problem
    import yaml

    text = yaml.safe_dump({"rules": [spec]}, sort_keys=False)
    with pytest.raises(ScenarioError) as in_file:
        load_text(text)
    assert [p.message for p in in_file.value.problems] == [
        p.message for p in in_code.value.problems]


@pytest.mark.parametrize("spec", [["on", "rcpt"], "on: rcpt", {"on": "rcpt", "reply": {1, 2}}])
def test_build_rule_rejects_non_rules(spec: object) -> None:
    with pytest.raises(ScenarioError) as info:
        build_rule(spec)  # type: ignore[arg-type]
    assert info.value.problems
    assert all(p.path == "<code>" for p in info.value.problems)


def test_build_rule_names_its_source() -> None:
    with pytest.raises(ScenarioError) as info:
        build_rule({"on": "rcpt"}, index=4, source="api")
    (p,) = info.value.problems
    assert (p.path, p.message) == ("api", "rule 5 does nothing")


# ------------------------------------------------------------ later additions


def test_loader_did_you_mean_ignores_case() -> None:
    (p,) = problems("""\
        rules:
          - On: rcpt
            reply: 550 5.1.1 no
        """)
    assert p.hint == "did you mean on?"


def test_loader_condition_at_rule_level_is_pointed_under_when() -> None:
    (p,) = problems("""\
        rules:
          - on: rcpt
            rcpt: a@lab.test
            reply: 550 5.1.1 no
        """)
    assert p.message == "unknown key rcpt in rule 1"
    assert p.hint == "rcpt is a condition: put it under when:"


def test_loader_banner_reply_must_be_220_or_a_refusal() -> None:
    (p,) = problems("""\
        rules:
          - on: connect
            reply: 250 hello
        """)
    assert "a banner is 220" in p.message
    assert one_rule("rules: [{on: connect, reply: 554 5.7.1 go away}]").reply is not None


def test_loader_after_bytes_only_with_a_fault_on_data() -> None:
    rule = one_rule("rules: [{on: data, fault: reset, after_bytes: 2KB}]")
    assert rule.after_bytes == 2000
    (p,) = problems("rules: [{on: message, fault: drop, after_bytes: 2KB}]")
    assert "after_bytes applies to on: data" in p.message


def test_loader_rcpt_index_only_at_rcpt() -> None:
    rule = one_rule("rules: [{on: rcpt, when: {rcpt_index: '> 3'}, reply: 452 4.5.3 no}]")
    assert [mt.key for mt in rule.when] == ["rcpt_index"]
    (p,) = problems("rules: [{on: message, when: {rcpt_index: 2}, reply: 550 5.0.0 no}]")
    assert "rcpt_index is not known at on: message" in p.message


def test_loader_expect_interval_is_a_duration_range() -> None:
    s = load("expect: {outcome: delivered, min_attempts: 2, interval: '1m..15m'}\n")
    assert s.expect is not None and s.expect.interval is not None
    assert s.expect.interval.holds(300) and not s.expect.interval.holds(30)
    (p,) = problems("expect: {interval: soon}\n")
    assert p.message.startswith("interval:")
