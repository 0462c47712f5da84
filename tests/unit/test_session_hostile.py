"""Session cases the fuzz target found (issue 11)."""

from __future__ import annotations

import pytest
from conversation import Conversation

from harness.scenario.library import load


@pytest.mark.parametrize("writes", [
    [b".\r\n"],  # the empty message, right after 354
    [b"Subject: x\r\n\r\nshort\r\n", b".\r\n"],  # the terminator in a read of its own
    [b"Subject: x\r\n\r\nshort\r", b"\n.", b"\r\n"],  # split inside the terminator
])
def test_session_hostile_fault_after_bytes_sees_an_early_end(writes: list[bytes]) -> None:
    """drop-mid-data drops after 1 KB of the body; a message that ends
    sooner ends the wait there (it used to wait on for bytes that never
    come, the client waiting for a reply)."""
    c = Conversation(load("drop-mid-data"))
    c.ehlo()
    assert c.codes(c.send("MAIL FROM:<a@lab.test>", "RCPT TO:<b@lab.test>", "DATA")) == [
        250, 250, 354]
    for data in writes:
        assert c.feed(data) == []
    assert c.closed == "fin"
    assert c.errors == []
