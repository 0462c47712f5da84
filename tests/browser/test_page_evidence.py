"""The page's "Sender's logs" tab in a real browser: a Postfix log of two real
deliveries, chosen with the file input, lined up with the harness's store by
POST /api/v1/evidence, drawn as a table; an edited reply is flagged."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import pytest

from harness.testing import Harness

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture fails every test with the install command
    expect = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from playwright.sync_api import Page

Serve = Callable[..., Harness]
RETRY_ONCE = """\
scenario: retry-once
rules:
  - name: defer first attempt
    on: rcpt
    when: {rcpt: bob@lab.test, attempt: 1}
    reply: 451 4.7.1 Try again later
"""


def postfix_log(h: Harness, first_reply: str | None = None) -> str:
    """What a Postfix that made these deliveries would have logged."""
    a1, a2 = h.attempts(rcpt="bob@lab.test")

    def when(t: float) -> str:
        return time.strftime("%b %d %H:%M:%S", time.gmtime(t))

    relay = f"relay={h.host}[{h.host}]:{h.port}"
    return "\n".join([
        f"{when(a1.t)} mta postfix/cleanup[7]: 4B2C1D0E9F: message-id=<page-1@client.test>",
        f"{when(a1.t)} mta postfix/smtp[8]: 4B2C1D0E9F: to=<bob@lab.test>, {relay}, delay=0.1, "
        f"dsn=4.7.1, status=deferred (host {h.host}[{h.host}] said: {first_reply or a1.reply} "
        "(in reply to RCPT TO command))",
        f"{when(a2.t)} mta postfix/smtp[8]: 4B2C1D0E9F: to=<bob@lab.test>, {relay}, delay=1, "
        f"dsn=2.0.0, status=sent ({a2.reply})", ""])


def deliver_twice(h: Harness) -> None:
    for _ in range(2):
        with smtplib.SMTP(h.host, h.port, local_hostname="mta.client.test", timeout=5) as c:
            c.ehlo()
            c.mail("alice@client.test")
            if c.rcpt("bob@lab.test")[0] == 250:
                c.data(b"Subject: page\r\nMessage-ID: <page-1@client.test>\r\n\r\nhi\r\n")
    h.wait_for_attempts(2, rcpt="bob@lab.test")


def choose(page: Page, text: str) -> None:
    page.locator("#tabs button[data-tab=evidence]").click()
    page.locator("#evidence-files").set_input_files(
        files=[{"name": "maillog", "mimeType": "text/plain", "buffer": text.encode()}])
    page.locator("#evidence-run").click()


@pytest.mark.parametrize("edited", [False, True])
def test_page_lines_up_a_senders_log(page: Page, serve: Serve, edited: bool) -> None:
    h = serve(RETRY_ONCE)
    deliver_twice(h)
    assert h.http_url is not None
    page.goto(h.http_url + "/")
    expect(page.locator("#status")).to_have_text("live")
    choose(page, postfix_log(h, "451 4.2.0 Edited" if edited else None))
    box = page.locator("#evidence")
    rows = box.locator("table.evidence tr")
    expect(rows).to_have_count(3)  # a header row and two steps
    expect(rows.nth(1)).to_contain_text("status=deferred")
    expect(rows.nth(2)).to_contain_text("status=sent")
    expect(rows.nth(2)).to_contain_text("250 2.0.0")
    expect(box.locator(".skew")).to_contain_text("clock skew")
    if edited:
        expect(rows.nth(1)).to_contain_text("reply-never-sent")
        expect(box.locator("ul.disagreements li")).to_contain_text("451 4.2.0 Edited")
        expect(page.locator("#evidence-summary")).to_have_text("1 message(s), 1 disagreement(s)")
    else:
        expect(rows.nth(1)).to_contain_text("451 4.7.1 Try again later")
        expect(page.locator("#evidence-summary")).to_have_text("1 message(s), no disagreement")
