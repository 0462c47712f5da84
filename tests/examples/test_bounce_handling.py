# Bounces on demand: the harness accepts a list server's mail, then bounces
# it later through a second harness that holds the list's bounce address.
# Shown in docs/pytest.md.
import smtplib
from email import message_from_bytes

from harness.assertions import assert_ndr

LATE_BOUNCES = """
rules:
  - name: gone
    on: message
    when: {rcpt: gone@lab.test}
    bounce: {kind: dsn, diagnostic: "550 5.1.1 No such user", after: 100ms}
  - name: on holiday
    on: message
    when: {rcpt: away@lab.test}
    bounce: {kind: autoreply}
"""


def handle_returned_mail(raw):
    """The code under test: what a list server does with its bounce mail."""
    msg = message_from_bytes(raw)
    if msg.get_content_type() == "multipart/report":
        for part in msg.walk():
            if part.get_content_type() == "message/delivery-status":
                for rcpt in part.get_payload()[1:]:
                    if rcpt["Status"].startswith("5."):
                        return "unsubscribe " + rcpt["Final-Recipient"].split(";")[1].strip()
    return "ignore"


def post(gateway, rcpt):
    with smtplib.SMTP(gateway.host, gateway.port, local_hostname="list.test") as smtp:
        smtp.sendmail("bounces@list.test", [rcpt], b"Subject: News\r\n\r\nHello\r\n")


def test_a_hard_bounce_unsubscribes_and_an_out_of_office_does_not(harness_factory):
    mailbox = harness_factory()  # where bounces@list.test is delivered
    gateway = harness_factory(LATE_BOUNCES, bounce_via=(mailbox.host, mailbox.port))

    post(gateway, "gone@lab.test")  # accepted with 250; the DSN follows
    dsn = mailbox.wait_for_message(rcpt="bounces@list.test")
    assert_ndr(dsn, status="5.1.1", recipient="gone@lab.test")
    assert handle_returned_mail(dsn.raw) == "unsubscribe gone@lab.test"

    mailbox.reset()
    post(gateway, "away@lab.test")
    reply = mailbox.wait_for_message(rcpt="bounces@list.test")
    assert handle_returned_mail(reply.raw) == "ignore"
