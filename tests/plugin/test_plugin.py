"""The pytest plugin as a user meets it: test files run with pytester."""

from __future__ import annotations

import pytest

GREYLIST_TEST = '''
import smtplib
import pytest

def send(h):
    with smtplib.SMTP(h.host, h.port, local_hostname="app.lab.test", timeout=5) as c:
        try:
            c.sendmail("app@lab.test", ["user@lab.test"], b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
            return 250
        except smtplib.SMTPRecipientsRefused as e:
            return e.recipients["user@lab.test"][0]

@pytest.mark.scenario("greylisting")
def test_my_app_retries_after_greylisting(smtp_harness):
    assert send(smtp_harness) == 451
    smtp_harness.advance(61)          # the greylisting window passes, no sleep
    assert send(smtp_harness) == 250
    first, second = smtp_harness.wait_for_attempts(2, rcpt="user@lab.test")
    assert (first.code, second.code) == (451, 250)
    assert second.interval >= 60
    smtp_harness.verify(rule="greylist new triplets", count=1)
'''


def test_plugin_greylisting_test_passes(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(GREYLIST_TEST)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_plugin_broken_variant_shows_transcript_and_near_misses(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile(GREYLIST_TEST.replace(
        'smtp_harness.verify(rule="greylist new triplets", count=1)',
        'smtp_harness.verify(rule="greylist new triplets", count=2)'))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "rule 'greylist new triplets' decided 1 step(s), expected exactly 2" in out
    assert "C: rcpt TO:<user@lab.test>" in out  # smtplib's spelling, as sent
    assert "S: 451 4.7.1" in out
    assert "near misses" in out
    assert "first_seen is 61.0s, wanted < 60s" in out


def test_plugin_wait_for_message_timeout_names_what_it_waited_for(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile('''
import smtplib

def test_waits(smtp_harness):
    with smtplib.SMTP(smtp_harness.host, smtp_harness.port, local_hostname="a.test") as c:
        c.sendmail("a@lab.test", ["other@lab.test"], b"Subject: x\\r\\n\\r\\nx\\r\\n")
    smtp_harness.wait_for_message(rcpt="wanted@lab.test", timeout=0.3)
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "waited 0.3s for a message to wanted@lab.test; none arrived" in out
    assert "C: rcpt TO:<other@lab.test>" in out  # what did arrive


def test_plugin_each_test_starts_clean_and_markers_switch_scenarios(
        pytester: pytest.Pytester) -> None:
    pytester.makepyfile('''
import smtplib
import pytest

def send(h, rcpt):
    with smtplib.SMTP(h.host, h.port, local_hostname="a.test", timeout=5) as c:
        return c.sendmail("a@lab.test", [rcpt], b"Subject: x\\r\\n\\r\\nx\\r\\n")

@pytest.mark.scenario("mailbox-full")
def test_one(smtp_harness):
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(smtp_harness, "full@lab.test")
    smtp_harness.add_rule(on="rcpt", when={"rcpt": "x@*"}, reply="550 5.1.1 nope")
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(smtp_harness, "x@lab.test")

def test_two(smtp_harness):
    assert smtp_harness.messages() == []          # nothing left from test_one
    assert smtp_harness.scenario.name == "accept"  # nor its scenario or rules
    send(smtp_harness, "full@lab.test")
    send(smtp_harness, "x@lab.test")
    assert len(smtp_harness.messages()) == 2
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_plugin_harness_factory_mx_pair(pytester: pytest.Pytester) -> None:
    pytester.makepyfile('''
import smtplib
import pytest

def test_failover(harness_factory):
    primary = harness_factory("service-unavailable")
    secondary = harness_factory(host="127.0.0.2")
    with pytest.raises(smtplib.SMTPConnectError):
        smtplib.SMTP(primary.host, primary.port, local_hostname="a.test", timeout=5)
    with smtplib.SMTP(secondary.host, secondary.port, local_hostname="a.test") as c:
        c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: x\\r\\n\\r\\nx\\r\\n")
    assert secondary.wait_for_message(rcpt="b@lab.test").subject == "x"
    primary.wait_idle()
    assert len(primary.sessions()) == 1
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_plugin_reraises_errors_from_inside_the_server(pytester: pytest.Pytester) -> None:
    pytester.makepyfile('''
import smtplib

def test_observer_crashes(smtp_harness):
    def broken(*args):
        raise RuntimeError("observer blew up")
    smtp_harness.ctx.observers.append(broken)
    try:
        with smtplib.SMTP(smtp_harness.host, smtp_harness.port, local_hostname="a.test") as c:
            c.noop()
    finally:
        smtp_harness.wait_idle()
        smtp_harness.ctx.observers.remove(broken)
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    assert "RuntimeError: observer blew up" in result.stdout.str()


def test_plugin_seed_option_and_assert_no_unmatched(pytester: pytest.Pytester) -> None:
    pytester.makepyfile('''
import smtplib
import pytest

@pytest.mark.scenario("intermittent-421" if False else "accept")
def test_seeded(smtp_harness, pytestconfig):
    assert smtp_harness.seed == pytestconfig.getoption("harness_seed") == 5

def test_unmatched(smtp_harness):
    with smtplib.SMTP(smtp_harness.host, smtp_harness.port, local_hostname="a.test") as c:
        c.docmd("RCPT TO:<a@b>")   # out of sequence: the harness answers 503
    smtp_harness.wait_idle()
    smtp_harness.assert_no_unmatched()
''')
    result = pytester.runpytest("-p", "no:cacheprovider", "--harness-seed", "5")
    result.assert_outcomes(passed=1, failed=1)
    assert "1 command(s) the harness could not take" in result.stdout.str()
    assert "'RCPT TO:<a@b>' -> 503 5.5.1 Error: need MAIL command" in result.stdout.str()


def test_plugin_is_safe_under_xdist(pytester: pytest.Pytester) -> None:
    tests = "\n".join(f'''
def test_{i}(smtp_harness):
    with smtplib.SMTP(smtp_harness.host, smtp_harness.port, local_hostname="a.test") as c:
        c.sendmail("a@lab.test", ["r{i}@lab.test"], b"Subject: {i}\\r\\n\\r\\nx\\r\\n")
    [m] = smtp_harness.messages()
    assert m.rcpt_tos == ["r{i}@lab.test"]
''' for i in range(12))
    pytester.makepyfile("import smtplib\n" + tests)
    result = pytester.runpytest("-p", "no:cacheprovider", "-n", "2")
    result.assert_outcomes(passed=12)
