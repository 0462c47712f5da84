"""Odd messages in the live page (issue 11): each opens, shows its headers
as sent and its text with undecodable bytes escaped, and the page throws
nothing (the `page` fixture fails the test on any page error)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from test_page import Serve, open_page, send

try:
    from playwright.sync_api import expect
except ImportError:  # the `browser` fixture fails every test with the install command
    expect = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from playwright.sync_api import Page


def nested(depth: int) -> bytes:
    return (b"Subject: nested deep\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
            + b"".join(f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n"
                       .encode() for i in range(depth))
            + f"--b{depth}\r\nContent-Type: text/plain\r\n\r\nx\r\n".encode())


ODD = [
    (b"From: a@\r\nMessage-ID: <@>\r\nSubject: odd addresses\r\n\r\nhi\r\n",
     ("From", "a@"), "hi"),
    (b"Subject: =?utf-8?B?a?=\r\n\r\nword\r\n", ("Subject", "=?utf-8?B?a?="), "word"),
    (b"Subject: caf\xe9 bytes\r\nContent-Type: text/plain; charset=x-nowhere\r\n\r\n"
     b"abc \xff\r\n", ("Subject", "caf\\xe9 bytes"), "abc \\xff"),
    (nested(1000), ("Subject", "nested deep"), None),
]


def test_page_odd_messages_open_and_render(page: Page, serve: Serve) -> None:
    h = serve()
    open_page(page, h)
    for i, (raw, (name, value), text) in enumerate(ODD, 1):
        send(h, raw, rcpt=f"odd{i}@lab.test")
        item = page.locator("#messages li", has_text=f"odd{i}@lab.test")
        expect(item).to_be_visible()
        item.click()
        box = page.locator("#message")
        expect(box.locator("h2").first).to_have_text(f"Message {i}")
        row = box.locator("table.headers tr").filter(has_text=name)
        expect(row.first).to_contain_text(value)
        if text is not None:
            expect(box.locator("pre")).to_contain_text(text)
