# Rules added in code, per-recipient replies, and the store read back. Shown in docs/pytest.md.
import smtplib

from harness.assertions import assert_replied


def test_one_recipient_is_over_quota(smtp_harness):
    smtp_harness.add_rule(on="rcpt", when={"rcpt": "full@*"},
                          reply="552 5.2.2 Mailbox full", name="quota")

    with smtplib.SMTP(smtp_harness.host, smtp_harness.port, local_hostname="app.test") as s:
        refused = s.sendmail("app@example.test", ["ok@lab.test", "full@lab.test"],
                             b"Subject: Report\r\n\r\nQ3 numbers\r\n")

    assert refused == {"full@lab.test": (552, b"5.2.2 Mailbox full")}
    message = smtp_harness.wait_for_message(rcpt="ok@lab.test")
    assert message.rcpt_tos == ["ok@lab.test"]
    [session] = smtp_harness.sessions()
    assert_replied(session, phase="rcpt", code=552, enhanced="5.2.2", rule="quota")
    smtp_harness.assert_no_unmatched()
