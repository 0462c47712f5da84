"""Odd mail, sent for real (smtplib to a Harness on loopback), read back
through the API (message view, /raw, /html) and the CLI (`harness show
mID`): every message is stored byte for byte and still renders; what cannot
be decoded is shown escaped and said in `problems`, never a 500 or a
traceback, and nothing reaches a terminal as a control character."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from harness.cli import main
from harness.testing import Harness


def nested(depth: int) -> bytes:
    return (b"Subject: nested\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n"
            + b"".join(f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n"
                       .encode() for i in range(depth))
            + f"--b{depth}\r\nContent-Type: text/plain\r\n\r\ndeep down\r\n".encode())


#: name -> (bytes sent, a header [name, value] the view must show, a problem
#: the view must say (a fragment), or None)
ODD: dict[str, tuple[bytes, list[str] | None, str | None]] = {
    "from-a-at": (b"From: a@\r\nTo: b@\r\nSubject: from a@\r\n\r\nhi\r\n", ["From", "a@"], None),
    "message-id-at": (b"Message-ID: <@>\r\nSubject: odd id\r\n\r\nhi\r\n",
                      ["Message-ID", "<@>"], None),
    "bad-encoded-word": (b"Subject: =?utf-8?B?a?=\r\n\r\nhi\r\n",
                         ["Subject", "=?utf-8?B?a?="], None),
    "unknown-charset-word": (b"Subject: =?x-nowhere?B?YWJj?=\r\n\r\nhi\r\n",
                             ["Subject", "=?x-nowhere?B?YWJj?="], None),
    "good-encoded-word": (b"Subject: =?utf-8?Q?caf=C3=A9?=\r\n\r\nhi\r\n",
                          ["Subject", "caf\u00e9"], None),
    "not-utf8-header": (b"Subject: caf\xe9 \xff\r\nFrom: \xe9@lab.test\r\n\r\nbody \xff\r\n",
                        ["Subject", "caf\\xe9 \\xff"], None),
    "utf8-header": ("Subject: gr\u00fc\u00df dich\r\n\r\nhi\r\n".encode(),
                    ["Subject", "gr\u00fc\u00df dich"], None),
    "escape-in-header": (b"Subject: \x1b[31mred\x07\r\n\r\nhi\r\n", None, None),
    "nested-1000": (nested(1000), ["Subject", "nested"], "nest too deeply"),
    "nested-80": (nested(80), ["Subject", "nested"], "deeper than 64 levels"),
    "unknown-charset-part": (b"Content-Type: text/plain; charset=x-nowhere\r\n\r\nabc \xff\r\n",
                             None, "unknown charset 'x-nowhere'"),
    "wrong-charset-part": (b"Content-Type: text/html; charset=us-ascii\r\n\r\n<b>caf\xc3\xa9"
                           b"</b>\r\n", None, "are shown escaped"),
    "broken-base64": (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                      b"!!!a\r\n", None, "base64 is damaged"),
    "unknown-transfer-encoding": (b"Content-Type: text/plain\r\nContent-Transfer-Encoding: "
                                  b"x-zap\r\n\r\nabc\r\n", None, "unknown transfer encoding"),
    "rfc2231-junk": (b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n"
                     b"Content-Type: application/octet-stream; name*=x-nope''%FF%FE\r\n"
                     b"Content-Disposition: attachment; filename*=x-nope''%FF\r\n\r\nab\r\n"
                     b"--z--\r\n", None, None),
    "headers-only": (b"Subject: no body at all\r\n", ["Subject", "no body at all"], None),
}


def api_get(h: Harness, path: str) -> tuple[int, str, bytes]:
    assert h.http_url
    try:
        with urllib.request.urlopen(h.http_url + path, timeout=30) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


@pytest.fixture(scope="module")
def stored() -> Iterator[tuple[Harness, dict[str, tuple[int, bytes]]]]:
    """Each odd message sent with smtplib; name -> (message id, bytes sent)."""
    ids: dict[str, tuple[int, bytes]] = {}
    with Harness(http=True) as h:
        for name, (raw, _, _) in ODD.items():
            rcpt = f"{name}@lab.test"
            with smtplib.SMTP(h.host, h.port, local_hostname="client.lab.test") as c:
                c.sendmail("a@lab.test", [rcpt], raw)  # bytes go as they are
            m = h.wait_for_message(rcpt=rcpt)
            ids[name] = (m.id, raw if raw.endswith(b"\r\n") else raw + b"\r\n")
        yield h, ids


@pytest.mark.parametrize("name", list(ODD))
def test_odd_message_stored_and_shown_by_the_api(
        stored: tuple[Harness, dict[str, tuple[int, bytes]]], name: str) -> None:
    h, ids = stored
    mid, sent = ids[name]
    _, header, problem = ODD[name]
    status, _, body = api_get(h, f"/api/v1/messages/{mid}")
    assert status == 200, body[:500]
    view: dict[str, Any] = json.loads(body)
    if header is not None:
        assert header in view["headers"], view["headers"]
    if problem is not None:
        assert any(problem in p for p in view["problems"]), view["problems"]
    # byte for byte, as received
    status, _, raw = api_get(h, f"/api/v1/messages/{mid}/raw")
    assert status == 200 and raw == sent
    status, _, html = api_get(h, f"/api/v1/messages/{mid}/html")
    assert (status, view["has_html"]) in ((200, True), (404, False)), html[:300]
    if status == 200:
        html.decode("utf-8")  # always a UTF-8 body; undecodable bytes escaped


def test_odd_message_text_shown_escaped(
        stored: tuple[Harness, dict[str, tuple[int, bytes]]]) -> None:
    h, ids = stored
    view = json.loads(api_get(h, f"/api/v1/messages/{ids['unknown-charset-part'][0]}")[2])
    assert view["text"].startswith("abc \\xff")
    html = api_get(h, f"/api/v1/messages/{ids['wrong-charset-part'][0]}/html")[2].decode()
    assert "caf\\xc3\\xa9" in html
    view = json.loads(api_get(h, f"/api/v1/messages/{ids['nested-80'][0]}")[2])
    assert len(view["parts"]) == 0  # the leaf is below the depth listed


@pytest.mark.parametrize("name", list(ODD))
def test_odd_message_shown_by_harness_show(
        stored: tuple[Harness, dict[str, tuple[int, bytes]]], name: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    h, ids = stored
    mid, _ = ids[name]
    assert main(["show", f"m{mid}", "--store", str(h.store_path)]) == 0
    shown = capsys.readouterr()
    assert f"message {mid}" in shown.out and shown.err == ""
    assert not any(ch in shown.out for ch in "\x1b\x07\x00\r"), repr(shown.out)
    problem = ODD[name][2]
    if problem is not None:
        assert problem in shown.out


def test_odd_message_terminal_output_of_a_real_process(
        stored: tuple[Harness, dict[str, tuple[int, bytes]]]) -> None:
    h, ids = stored
    for name in ("escape-in-header", "nested-1000", "not-utf8-header"):
        done = subprocess.run([sys.executable, "-m", "harness.cli", "show",
                               f"m{ids[name][0]}", "--store", str(h.store_path)],
                              capture_output=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert b"Traceback" not in done.stderr and b"\x1b" not in done.stdout
        if name == "escape-in-header":
            assert b"Subject: \\x1b[31mred\\x07" in done.stdout
        if name == "not-utf8-header":
            assert b"Subject: caf\\xe9 \\xff" in done.stdout


def test_odd_client_bytes_never_reach_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """A HELO name with terminal escapes (accepted: a name is not checked) is
    shown escaped by `harness sessions`, `harness show` and the live console."""
    import io
    import socket

    from rich.console import Console

    from harness.cli import LivePrinter

    live = io.StringIO()
    with Harness(keep_store=False) as h:
        h.ctx.observers.append(LivePrinter(Console(file=live, highlight=False,
                                                   color_system=None)))
        with socket.create_connection((h.host, h.port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"HELO \x1b[2J\x1b[31mevil\r\nQUIT\r\n")
            assert f.readline().startswith(b"250") and f.readline().startswith(b"221")
        h.wait_idle()
        assert [x.helo for x in h.sessions()] == ["\x1b[2J\x1b[31mevil"]  # committed
        for args in (["sessions"], ["show", "1"]):
            assert main([*args, "--store", str(h.store_path)]) == 0
            out = capsys.readouterr().out
            assert "\x1b" not in out and "\\x1b[2J" in out, out  # (a table may cut the rest)
    assert "\x1b" not in live.getvalue() and "HELO \\x1b[2J" in live.getvalue()
