"""The live web page in a real browser: feed, messages, scenario switching,
retry timelines, NDRs, and the sandbox around captured HTML.

No sleeps: every wait is a Playwright expectation on the page (or a harness
wait that wakes on the server's own events). With HARNESS_SCREENSHOTS=DIR the
screenshot test writes the documentation's images to DIR (docs/images):

    HARNESS_SCREENSHOTS=docs/images .venv/bin/pytest tests/browser -k screenshots
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import re
import smtplib
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harness.testing import Harness

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture fails every test with the install command
    expect = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from conftest import Console
    from playwright.sync_api import Page

Serve = Callable[..., Harness]
HELO = "client.lab.test"

RETRY_ONCE = """\
scenario: retry-once
summary: The first attempt for bob@lab.test is deferred at RCPT
rules:
  - name: defer first attempt
    on: rcpt
    when: {rcpt: bob@lab.test, attempt: 1}
    reply: 451 4.7.1 Try again later
"""

HOSTILE_HTML = """\
<html><head>
<meta http-equiv="refresh" content="0;url=/?navigated-by-mail">
<title>PWNED</title>
<base href="http://127.0.0.1:9/">
</head><body>
<script>console.log("PWNED: script ran"); parent.document.body.innerHTML = "PWNED";
top.document.title = "PWNED"; top.location = "/?navigated-by-mail";</script>
<img src="x" onerror="console.log('PWNED: onerror ran'); top.document.title = 'PWNED'">
<a id="bait" href="/?navigated-by-mail" target="_top">click me</a>
<form action="/api/v1/listeners/0/reset" method="post"><button>reset</button></form>
<p id="marker">Quarterly numbers inside</p>
</body></html>
"""

DSN = b"""\
From: Mail Delivery System <MAILER-DAEMON@mx.sender.test>
To: app@sender.test
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="B"

--B
Content-Type: text/plain

Your message could not be delivered to full@lab.test: the mailbox is full.

--B
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.sender.test

Final-Recipient: rfc822; full@lab.test
Action: failed
Status: 5.2.2
Remote-MTA: dns; mx.lab.test
Diagnostic-Code: smtp; 552 5.2.2 Mailbox full

--B
Content-Type: text/rfc822-headers

From: app@sender.test
To: full@lab.test
Subject: Quarterly report

--B--
""".replace(b"\n", b"\r\n")


def open_page(page: Page, h: Harness) -> None:
    """Load the page and wait until it is live (history loaded, events
    streaming): whatever happens from now on reaches it."""
    assert h.http_url is not None
    page.goto(h.http_url + "/")
    expect(page.locator("#status")).to_have_text("live")


def mail(subject: str = "Quarterly report", *, to: str = "bob@lab.test",
         text: str = "Hello Bob,\n\nthe report is attached.\n",
         html: str | None = None) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "Alice <alice@client.test>"
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = "<q3-report.0001@client.test>"
    m.set_content(text)
    if html is not None:
        m.add_alternative(html, subtype="html")
    return m


def send(h: Harness, message: EmailMessage | bytes | None = None, *,
         sender: str = "alice@client.test", rcpt: str = "bob@lab.test"
         ) -> dict[str, tuple[int, bytes]]:
    if message is None:
        message = mail(to=rcpt)
    # CRLF line ends, as on the wire (smtplib sends bytes as they are)
    body = message if isinstance(message, bytes) else message.as_bytes(policy=SMTP)
    with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=5) as c:
        return c.sendmail(sender, [rcpt], body)


def session(page: Page, text: str):  # type: ignore[no-untyped-def]
    """The feed's session block that contains a transcript line with `text`."""
    return page.locator("#feed .session").filter(
        has=page.locator(".line", has_text=text))


# ---------------------------------------------------------------------------


def test_feed_shows_history_and_a_new_session_within_a_second(page: Page, serve: Serve) -> None:
    h = serve()
    send(h, rcpt="before@lab.test")  # before the page opens: comes from the history
    open_page(page, h)
    expect(session(page, "rcpt TO:<before@lab.test>")).to_be_visible()
    # the header says what the store holds and its size
    expect(page.locator("#store")).to_have_text(re.compile(r"^store \d+\.\d MB, 1 message$"))

    send(h, rcpt="bob@lab.test")
    line = page.locator("#feed .line", has_text="rcpt TO:<bob@lab.test>")
    expect(line).to_be_visible(timeout=1000)
    new = session(page, "rcpt TO:<bob@lab.test>")
    expect(new.locator(".line", has_text="250 2.0.0 Ok")).to_be_visible(timeout=1000)
    expect(new.locator(".badge")).to_have_text("delivered")
    # newest first, each session exactly once (history and live do not overlap)
    expect(page.locator("#feed .session")).to_have_count(2)
    expect(page.locator("#feed .session").first).to_contain_text("rcpt TO:<bob@lab.test>")
    expect(page.locator("#feed .line", has_text="rcpt TO:<before@lab.test>")).to_have_count(1)
    # the EHLO extensions fold into one line that opens to the reply as sent
    ehlo = new.locator("details.ehlo")
    expect(ehlo.locator("summary")).to_contain_text("extensions: SIZE")
    expect(ehlo.locator(".line", has_text="250-PIPELINING")).to_be_hidden()
    ehlo.locator("summary").click()
    expect(ehlo.locator(".line", has_text="250-PIPELINING")).to_be_visible()


def test_open_a_message_shows_headers_and_text(page: Page, serve: Serve) -> None:
    h = serve()
    open_page(page, h)
    send(h, mail("Quarterly report"))
    item = page.locator("#messages li", has_text="Quarterly report")
    expect(item).to_be_visible()
    item.click()
    box = page.locator("#message")
    expect(box.locator("h2").first).to_have_text("Message 1")
    expect(item).to_have_class(re.compile(r"\bselected\b"))
    expect(box.locator(".envelope")).to_contain_text("alice@client.test → bob@lab.test")
    headers = box.locator("table.headers tr")
    expect(headers.filter(has_text="Subject")).to_contain_text("Quarterly report")
    expect(headers.filter(has_text="From")).to_contain_text("Alice <alice@client.test>")
    expect(headers.filter(has_text="Message-ID")).to_contain_text("<q3-report.0001@client.test>")
    expect(box.locator("pre")).to_contain_text("Hello Bob,\n\nthe report is attached.")
    expect(box.locator("iframe")).to_have_count(0)  # no HTML part, no frame
    expect(box.get_by_role("link", name="Raw source")).to_have_attribute(
        "href", "/api/v1/messages/1/raw")


def test_switch_scenario_from_the_page_rejects_the_next_delivery(page: Page,
                                                                  serve: Serve) -> None:
    h = serve()
    open_page(page, h)
    expect(page.locator("#active")).to_have_text("accept")
    page.locator("#scenario-select").select_option("mailbox-full")
    expect(page.locator("#scenario-summary")).to_contain_text("552 5.2.2")
    page.locator("#activate").click()
    expect(page.locator("#active")).to_have_text("mailbox-full")

    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(h, rcpt="full@lab.test")
    code, reply = refused.value.recipients["full@lab.test"]
    assert code == 552 and reply.startswith(b"5.2.2"), (code, reply)

    rejected = session(page, "rcpt TO:<full@lab.test>")
    line = rejected.locator(".line.c5", has_text="552 5.2.2 Mailbox full")
    expect(line).to_be_visible()
    expect(line.locator(".rule")).to_have_text("rule: mailbox full")
    expect(rejected.locator(".badge")).to_have_text("rejected")


def test_captured_html_cannot_touch_the_page(page: Page, serve: Serve, console: Console) -> None:
    h = serve()
    open_page(page, h)
    url = page.url
    send(h, mail("hostile html", text="see the HTML part", html=HOSTILE_HTML))
    item = page.locator("#messages li", has_text="hostile html")
    with page.expect_response(re.compile(r"/api/v1/messages/1/html$")) as html_response:
        item.click()
        frame_el = page.locator("#message iframe")
        expect(frame_el).to_be_visible()
    response = html_response.value
    assert response.ok
    csp = response.headers["content-security-policy"]
    assert csp.split(";")[0].strip() == "sandbox", csp
    assert "script-src" not in csp and "default-src 'none'" in csp, csp

    # the frame element is sandboxed with no permissions at all
    assert frame_el.get_attribute("sandbox") == ""
    # wait for the frame's document: the marker comes after the script, the
    # hostile image and the refresh, so they have all been parsed by now
    frame = page.frame_locator("#message iframe")
    expect(frame.locator("#marker")).to_have_text("Quarterly numbers inside")
    mail_frame = next(f for f in page.frames if f.url.endswith("/api/v1/messages/1/html"))
    mail_frame.wait_for_load_state("load")
    assert mail_frame.evaluate("() => self.origin") == "null"  # an opaque origin

    # the page is untouched: title, body, address, and its own script still runs
    assert page.title() == "SMTP Harness"
    assert page.url == url
    expect(page.locator("body")).not_to_contain_text("PWNED")
    expect(page.locator("#feed-pane h2")).to_have_text("Live sessions")
    expect(page.locator("#status")).to_have_text("live")
    page.locator("#tabs button[data-tab=attempts]").click()  # the page still works
    expect(page.locator("#timelines .timeline")).to_have_count(1)
    assert not [m.text for m in console.messages if "PWNED" in m.text], \
        "a script in the captured HTML ran"
    assert not console.page_errors
    assert not console.page_origin_errors()
    # no navigation happened anywhere, the frame included
    assert [f.url for f in page.frames] == [url, h.http_url + "/api/v1/messages/1/html"]


def test_attempts_timeline_and_ndr_tab(page: Page, serve: Serve) -> None:
    h = serve(RETRY_ONCE)
    open_page(page, h)
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(h, rcpt="bob@lab.test")
    assert refused.value.recipients["bob@lab.test"][0] == 451
    send(h, rcpt="bob@lab.test")
    h.wait_for_attempts(2, rcpt="bob@lab.test")

    page.locator("#tabs button[data-tab=attempts]").click()
    timeline = page.locator("#timelines .timeline").filter(has_text="bob@lab.test")
    expect(timeline).to_have_count(1)
    circles = timeline.locator("svg circle")
    expect(circles).to_have_count(2)
    assert [circles.nth(i).get_attribute("data-outcome") for i in range(2)] == \
        ["deferred", "accepted"]
    expect(timeline.locator(".summary")).to_contain_text("2 attempts")
    rows = timeline.locator("table.attempts tr")
    expect(rows.nth(0)).to_contain_text("451 4.7.1 Try again later")
    expect(rows.nth(0)).to_contain_text("rule: defer first attempt")
    expect(rows.nth(1)).to_contain_text("250 2.0.0")

    # NDR tab: what the API holds is what the page shows
    page.locator("#tabs button[data-tab=ndrs]").click()
    expect(page.locator("#ndrs")).to_contain_text("No NDRs captured.")
    send(h, DSN, sender="", rcpt="app@sender.test")  # a bounce, MAIL FROM:<>
    h.wait_for_message(rcpt="app@sender.test")
    assert h.http_url is not None
    ndrs = page.request.get(h.http_url + "/api/v1/ndrs").json()
    ndr = page.locator("#ndrs .ndr")
    if importlib.util.find_spec("harness.analysis.dsn") is None:
        assert ndrs == []
        expect(page.locator("#ndrs")).to_contain_text("No NDRs captured.")
        return
    assert [r["status"] for x in ndrs for r in x["ndr"]["recipients"]] == ["5.2.2"]
    expect(ndr).to_have_count(1)  # refreshed live while the tab is open
    expect(ndr.locator(".code")).to_contain_text("5.2.2 full@lab.test")
    expect(ndr).to_contain_text("552 5.2.2 Mailbox full")
    expect(ndr).to_contain_text("Non-delivery report · rfc3464 · from mx.sender.test")


# ---------------------------------------------------------------- screenshots

SCREENSHOTS = os.environ.get("HARNESS_SCREENSHOTS")

REPORT_HTML = """\
<html><body style="font-family: Georgia, serif; font-size: 18px; color: #222; margin: 24px">
<h1 style="color: #0b5394; font-size: 26px">Quarterly report</h1>
<p>Hello Bob,</p>
<p>the figures for the third quarter are in the attached sheet. Highlights:</p>
<ul><li>Revenue <b>+12&nbsp;%</b></li><li>New customers: <b>48</b></li></ul>
<p>Best regards,<br>Alice</p>
</body></html>
"""


def fits(page: Page) -> dict[str, object]:
    """Layout facts that make a page unreadable when they fail."""
    return page.evaluate("""() => {
      const over = [...document.querySelectorAll("header, section, .line, #messages li, .timeline")]
        .filter((e) => e.scrollWidth > e.clientWidth + 1)
        .map((e) => (e.id || e.className || e.tagName) + ": " + e.textContent.slice(0, 40));
      const small = [...document.querySelectorAll("body *")]
        .filter((e) => [...e.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim()))
        .filter((e) => e.offsetParent !== null && parseFloat(getComputedStyle(e).fontSize) < 14)
        .map((e) => e.tagName + "." + e.className + " " + getComputedStyle(e).fontSize);
      const svgText = [...document.querySelectorAll("svg text")]
        .filter((t) => t.getBoundingClientRect().height && t.getBoundingClientRect().height < 14)
        .map((t) => "svg text " + t.textContent + " " + t.getBoundingClientRect().height);
      small.push(...svgText);
      return { pageScroll: document.documentElement.scrollWidth > innerWidth,
               headerHeight: document.querySelector("header").offsetHeight,
               over, small };
    }""")


def test_screenshots_for_the_docs(page: Page, serve: Serve, tmp_path: Path) -> None:
    """The page in use at projector size: the docs' images (written to
    $HARNESS_SCREENSHOTS when set), and a layout check of each view."""
    out = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    start = datetime(2025, 3, 4, 9, 30, 0, tzinfo=UTC).timestamp()
    ticks = itertools.count()
    # a deterministic clock: 09:30:00 UTC plus a millisecond per reading
    h = serve("greylisting", clock=lambda: start + next(ticks) / 1000)
    open_page(page, h)

    report = mail("Quarterly report", html=REPORT_HTML)
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(h, report)
    expect(session(page, "451 4.7.1").locator(".badge")).to_have_text("deferred")
    h.advance(5 * 60 + 12)  # the sender retries 5 min 12 s later
    send(h, report)
    expect(session(page, "250 2.0.0 Ok: queued").locator(".badge")).to_have_text("delivered")
    expect(page.locator("#messages li")).to_have_count(1)

    def check(name: str) -> None:
        facts = fits(page)
        assert not facts["pageScroll"], f"{name}: the page scrolls sideways"
        assert facts["headerHeight"] <= 70, f"{name}: the header wraps ({facts['headerHeight']}px)"
        assert not facts["over"], f"{name}: text overflows its box: {facts['over']}"
        assert not facts["small"], f"{name}: text below 14px: {facts['small']}"
        page.screenshot(path=str(out / f"{name}.png"))

    check("live-feed")

    page.locator("#messages li").first.click()
    frame = page.frame_locator("#message iframe")
    expect(frame.locator("h1")).to_have_text("Quarterly report")
    check("message")

    page.locator("#tabs button[data-tab=attempts]").click()
    expect(page.locator("#timelines svg circle")).to_have_count(2)
    expect(page.locator("#timelines .summary")).to_contain_text("accepted after 5 min 12 s")
    check("attempts")
    for name in ("live-feed", "message", "attempts"):
        assert (out / f"{name}.png").stat().st_size > 10_000
