# A test of code that sends mail, against a greylisting MX. Shown in docs/pytest.md.
import smtplib

import pytest


def deliver(host: str, port: int, rcpt: str) -> int:
    """The code under test: one delivery attempt; returns the reply code."""
    with smtplib.SMTP(host, port, local_hostname="app.example.test", timeout=5) as smtp:
        try:
            smtp.sendmail("app@example.test", [rcpt], b"Subject: Invoice\r\n\r\nHello\r\n")
        except smtplib.SMTPRecipientsRefused as e:
            return e.recipients[rcpt][0]
    return 250


@pytest.mark.scenario("greylisting")
def test_delivery_succeeds_after_greylisting(smtp_harness):
    assert deliver(smtp_harness.host, smtp_harness.port, "user@lab.test") == 451

    smtp_harness.advance(5 * 60)  # five minutes pass for the harness; the test does not wait
    assert deliver(smtp_harness.host, smtp_harness.port, "user@lab.test") == 250

    first, retry = smtp_harness.wait_for_attempts(2, rcpt="user@lab.test")
    assert (first.outcome, retry.outcome) == ("deferred", "accepted")
    assert retry.interval >= 60
    smtp_harness.verify(rule="greylist new triplets", count=1)
