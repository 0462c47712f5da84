"""A rule's regular expression that backtracks without end on what a client
sent: on real sockets, the server answers that command (the rule taken as
not matching, the next rule deciding) and the others, and says which pattern
gave up, where a user looks (the near misses, the errors)."""

from __future__ import annotations

import smtplib

from harness.scenario import model as m
from harness.testing import Harness

RULES = """scenario: runaway
rules:
  - name: runaway
    on: rcpt
    when: {rcpt: {regex: '(a|aa)+$'}}
    reply: 550 5.7.1 never reached
  - name: next
    on: rcpt
    when: {rcpt: '*!@lab.test'}
    reply: 451 4.3.0 the next rule decides
"""


def test_runaway_rcpt_pattern_gives_up_and_the_session_goes_on() -> None:
    runaway = "a" * 60 + "!@lab.test"
    with Harness(RULES) as h, smtplib.SMTP(h.host, h.port, local_hostname="c.lab.test",
                                            timeout=10) as c:
        c.ehlo()
        c.mail("s@lab.test")
        code, text = c.rcpt(runaway)
        assert (code, text) == (451, b"4.3.0 the next rule decides")
        assert c.rcpt("b@lab.test")[0] == 250  # the pattern, quick on this one: no match
        assert c.noop()[0] == 250
        assert [type(e) for e in h.errors] == [m.PatternTimeout]
        said = f"gave up after {m.VALUE_TIMEOUT:g} s on {len(runaway)} characters"
        assert said in str(h.errors[0])
        h.errors.clear()
        whys = [why for _, rule, why in h.near_misses() if rule == "runaway"]
        assert any(w.startswith("rcpt failed: PatternTimeout: /(a|aa)+$/ gave up") for w in whys)
