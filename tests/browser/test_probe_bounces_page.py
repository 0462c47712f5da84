"""The page's views of issue 14 in Debian's chromium: the Probe tab runs a
probe against a loopback listener and shows each step, the explanation
and the verdict; the Bounces tab lists what rules sent, live.

No sleeps: every wait is a Playwright expectation or a harness wait."""

from __future__ import annotations

import os
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from harness.testing import Harness

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture fails every test with the install command
    expect = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from conftest import Console
    from playwright.sync_api import Page

Serve = Callable[..., Harness]
SCREENSHOTS = os.environ.get("HARNESS_SCREENSHOTS")

BOUNCER = """\
scenario: late-bounce
rules:
  - name: bounce later
    on: message
    when: {rcpt: bounce@lab.test}
    bounce: {kind: dsn, diagnostic: "550 5.1.1 <bounce@lab.test>: no such user"}
"""


def open_page(page: Page, h: Harness) -> None:
    assert h.http_url is not None
    page.goto(h.http_url + "/")
    expect(page.locator("#status")).to_have_text("live")


def no_overflow(page: Page) -> None:
    facts = page.evaluate("""() => ({
      pageScroll: document.documentElement.scrollWidth > innerWidth,
      over: [...document.querySelectorAll("section, .mx, table.steps, .bounce")]
        .filter((e) => e.scrollWidth > e.clientWidth + 1).map((e) => e.className || e.tagName),
      small: [...document.querySelectorAll("#tab-probe *, #tab-bounces *")]
        .filter((e) => [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim()))
        .filter((e) => e.offsetParent !== null && parseFloat(getComputedStyle(e).fontSize) < 14)
        .map((e) => e.tagName + "." + e.className)})""")
    assert not facts["pageScroll"], "the page scrolls sideways"
    assert not facts["over"], f"text overflows its box: {facts['over']}"
    assert not facts["small"], f"text below 14px: {facts['small']}"


def test_probe_tab_runs_a_probe_and_shows_steps_and_verdict(page: Page, serve: Serve,
                                                            console: Console) -> None:
    h = serve()
    target = serve("relay-denied")
    open_page(page, h)
    page.locator("#tabs button[data-tab=probe]").click()
    expect(page.locator("#probe-form")).to_contain_text("Sends nothing beyond connect")
    page.locator("#probe-sender").fill("a@lab.test")
    page.locator("#probe-recipient").fill("someone@elsewhere.example")
    page.locator("#probe-mx").fill(f"127.0.0.1:{target.port}")
    page.locator("#probe-run").click()
    result = page.locator("#probe-result .probe")
    expect(result).to_have_attribute("data-verdict", "bounce")
    expect(result.locator(".overall .badge")).to_have_text("would bounce")
    rcpt = result.locator("tr[data-step=rcpt]")
    expect(rcpt.locator(".sent")).to_have_text("RCPT TO:<someone@elsewhere.example>")
    expect(result.locator("tr[data-step=ehlo] .reply")).to_contain_text("extensions: SIZE")
    expect(rcpt.locator(".reply")).to_contain_text("550 5.7.1 Unable to relay")
    expect(rcpt.locator(".meaning")).to_contain_text(
        "5.7.1 Delivery not authorized, message refused")
    steps = result.locator("table.steps tr")
    assert [steps.nth(i).get_attribute("data-step") for i in range(steps.count())] == [
        "connect", "banner", "ehlo", "starttls", "tls", "ehlo-tls", "mail", "rcpt", "rset",
        "quit"]
    expect(result.locator(".mx .tls")).to_contain_text("chain: self-signed")
    no_overflow(page)
    if SCREENSHOTS:
        page.screenshot(path=str(Path(SCREENSHOTS) / "probe.png"))
    # a refused request says why, and probes nothing
    page.locator("#probe-mx").fill("mx.partner.example")
    page.locator("#probe-run").click()
    expect(page.locator("#probe-result .probe-error")).to_contain_text(
        "probe refused: mx entry 'mx.partner.example' is a host name and no DNS was asked "
        "for")
    # the browser logs the 400 it was expected to get; nothing else may be there
    refused = [m for m in console.messages
               if (m.location.get("url") or "").endswith("/api/v1/probe")]
    assert len(refused) == 1 and "400" in refused[0].text
    console.messages.remove(refused[0])


def test_bounces_tab_lists_what_rules_sent_live(page: Page, serve: Serve) -> None:
    hop = serve()
    h = serve(BOUNCER, bounce_via=(hop.host, hop.port))
    open_page(page, h)
    page.locator("#tabs button[data-tab=bounces]").click()
    expect(page.locator("#bounces")).to_contain_text("No bounces sent.")
    with smtplib.SMTP(h.host, h.port, local_hostname="client.lab.test", timeout=10) as c:
        c.sendmail("app@sender.test", ["bounce@lab.test"],
                   b"Subject: Welcome\r\nMessage-ID: <w1@sender.test>\r\n\r\nHello\r\n")
    hop.wait_for_message(rcpt="app@sender.test", timeout=10)
    card = page.locator("#bounces .bounce")
    expect(card).to_have_count(1)  # refreshed live while the tab is open
    expect(card).to_have_attribute("data-outcome", "sent")
    expect(card.locator(".code")).to_contain_text("sent dsn 5.1.1 about bounce@lab.test")
    expect(card).to_contain_text("rule bounce later")
    expect(card).to_contain_text(f"to <app@sender.test> via {hop.host}:{hop.port}")
    expect(card).to_contain_text("Subject: Delivery failed: Welcome")
    expect(card).to_contain_text("our parser reads it as: ndr")
    link = card.get_by_role("link", name="Report source")
    expect(link).to_have_attribute("href", "/api/v1/bounces/1/raw")
    # the feed shows the bounce on the session that accepted the message
    expect(page.locator("#feed .line", has_text="bounce sent: dsn 5.1.1")).to_be_visible()
    no_overflow(page)
