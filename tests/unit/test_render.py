"""harness.render: headers decoded for display, or shown as sent, escaped."""

from __future__ import annotations

import pytest

from harness.render import MAX_DEPTH, header_text, printable, view


@pytest.mark.parametrize(("value", "shown"), [
    ("a@", "a@"),
    ("<@>", "<@>"),
    ("=?utf-8?B?a?=", "=?utf-8?B?a?="),  # does not decode: as sent
    ("=?utf-8?Q?caf=C3=A9?=", "caf\u00e9"),
    ("=?x-nowhere?Q?abc?=", "=?x-nowhere?Q?abc?="),
    ("=?unknown-8bit?q?=FF?=", "\ufffd"),  # the email package replaces such bytes
    ("caf\udce9", "caf\\xe9"),  # a byte that is not UTF-8 (surrogate-escaped by the parser)
    ("gr\udcc3\udcbc\udcc3\udc9f", "gr\u00fc\u00df"),  # UTF-8 bytes (RFC 6532)
    ("folded\r\n line", "folded line"),
    ("  padded  ", "padded"),
])
def test_render_header_text(value: str, shown: str) -> None:
    assert header_text(value) == shown


def test_render_printable_escapes_controls_and_surrogates() -> None:
    assert printable("a\x1b[31m\x07\tb\nc\r\udcff\ud800") == (
        "a\\x1b[31m\\x07\tb\nc\\x0d\\xff\\ud800")


def test_render_view_of_nothing_and_of_junk() -> None:
    assert view(b"").headers == [] and view(b"").text == ""
    junk = view(bytes(range(256)) * 4)
    assert junk.parts and junk.problems == []


def test_render_view_depth_bound() -> None:
    raw = b"".join(f"Content-Type: multipart/mixed; boundary=b{i}\r\n\r\n--b{i}\r\n".encode()
                   for i in range(MAX_DEPTH + 5)) + b"Content-Type: text/plain\r\n\r\nx\r\n"
    shown = view(raw)
    assert shown.parts == [] and shown.problems == [
        f"parts nested deeper than {MAX_DEPTH} levels are not listed"]
