"""The sender-authentication example of docs/scenarios.md does what the text
under it says, on real sockets: the SPF rule refuses at MAIL FROM; without
it, the DMARC rule refuses the message, and the transcript has the
Authentication-Results line."""

from __future__ import annotations

import re
import smtplib
from pathlib import Path

import pytest

from harness.testing import Harness

DOC = Path(__file__).resolve().parents[2] / "docs" / "scenarios.md"


def _example() -> str:
    blocks = re.findall(r"^```yaml\n(.*?)^```", DOC.read_text(), re.S | re.M)
    (block,) = [b for b in blocks if b.startswith("scenario: spf-fail-refused\n")]
    return block


def test_docs_spf_example_refuses_at_mail_from() -> None:
    with Harness(_example()) as h, smtplib.SMTP(h.host, h.port, local_hostname="client.lab.test",
                                                 timeout=10) as c:
        c.ehlo()
        assert c.mail("sender@lab.test") == (
            550, b"5.7.23 The message was rejected because of Sender Policy Framework violation")


def test_docs_dmarc_example_refuses_the_message_without_the_spf_rule() -> None:
    with Harness(_example()) as h:
        h.ctx.remove_rule("spf fail")
        with (smtplib.SMTP(h.host, h.port, local_hostname="client.lab.test", timeout=10) as c,
              pytest.raises(smtplib.SMTPDataError) as refused):
            c.sendmail("sender@lab.test", ["user@lab.test"],
                       b"From: sender@lab.test\r\nSubject: unsigned\r\n\r\nhello\r\n")
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            550, b"5.7.26 This message failed DMARC")
        h.wait_idle()
        notes = [e.text for e in h.sessions()[0].events if e.direction == "I"]
        assert any(re.fullmatch(r"Authentication-Results: \S+; spf=fail .*; dkim=none .*; "
                                r"dmarc=fail .*header\.from=lab\.test", n) for n in notes), notes
