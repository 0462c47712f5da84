"""The small test message `harness probe --send` delivers, optionally
DKIM-signed (dkimpy) with a key the user gives. Pure: bytes in, bytes out."""

from __future__ import annotations

from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid

from harness import __version__
from harness.errors import HarnessError

SIGNED_HEADERS = ("From", "To", "Subject", "Date", "Message-ID")


def test_message(sender: str, recipient: str, *, now: float, subject: str | None = None) -> bytes:
    """A short plain-text message from `sender` to `recipient`, CRLF ends."""
    domain = sender.rpartition("@")[2] or "probe.invalid"
    msg = EmailMessage()
    msg["From"] = sender or f"postmaster@{domain}"
    msg["To"] = recipient
    msg["Subject"] = subject or "SMTP Harness probe: test message"
    msg["Date"] = formatdate(now, usegmt=True)
    msg["Message-ID"] = make_msgid("probe", domain=domain)
    msg["X-Mailer"] = f"SMTP Harness {__version__} (harness probe --send)"
    msg.set_content(
        "This is a test message sent by `harness probe --send`, to check that this\n"
        "server accepts mail for the recipient. It needs no answer and can be deleted.\n")
    return msg.as_bytes(policy=SMTP)


def dkim_sign(message: bytes, *, key_pem: bytes, selector: str, domain: str) -> bytes:
    """The message with a DKIM-Signature (rsa-sha256, relaxed/simple, with
    an RSA private key in PEM) over the usual headers, put in front."""
    import dkim  # dkimpy: signing needs no DNS

    try:
        header = dkim.sign(message, selector.encode(), domain.encode(), key_pem,
                           include_headers=[h.encode() for h in SIGNED_HEADERS])
    except (dkim.DKIMException, ValueError) as e:
        raise HarnessError(f"cannot DKIM-sign with that key: {e}") from e
    return bytes(header) + message
