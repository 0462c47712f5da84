"""Regression tests from a review of the API, the Harness and the plugin:
DNS rebinding, tokens, documented request keys, the NDR list, connections
left open across a reset, an idle wait that names what is still open."""

from __future__ import annotations

import contextlib
import json
import smtplib
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from harness.testing import Harness

HELO = "client.lab.test"


@pytest.fixture
def h() -> Iterator[Harness]:
    with Harness(http=True) as harness:
        yield harness


def call(h: Harness, path: str, method: str = "GET", body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request((h.http_url or "") + path, data=data, method=method,
                                 headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            payload, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        payload, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    return status, ctype, json.loads(payload) if "json" in ctype else payload


# ------------------------------------------------------------ API security



def test_api_refuses_foreign_host_on_tokenless_loopback(h: Harness) -> None:
    port = h.http_url.rsplit(":", 1)[1]  # type: ignore[union-attr]
    evil = f"attacker.example:{port}"
    status, _, _ = call(h, "/api/v1/listeners/0/scenario", "PUT",
                        {"name": "mailbox-full"},
                        headers={"Host": evil, "Origin": f"http://{evil}"})
    assert status in (403, 421), f"scenario switched from a foreign origin ({status})"
    status, _, _ = call(h, "/api/v1/messages", headers={"Host": evil})
    assert status in (403, 421), "captured mail readable through a foreign Host"



def test_api_non_ascii_token_is_a_401_not_a_500() -> None:
    with Harness(http=True, api_token="s3cret") as hh:
        req = urllib.request.Request(hh.http_url + "/api/v1/messages",  # type: ignore[operator]
                                     headers={"Authorization": "Bearer \u00e9"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 401


# ------------------------------------------------------------- API behaviour



def test_api_add_rule_with_documented_position_last(h: Harness) -> None:
    status, _, body = call(h, "/api/v1/listeners/0/rules", "POST",
                           {"name": "block", "on": "rcpt", "when": {"rcpt": "x@*"},
                            "reply": "550 5.1.1 No such user", "position": "last"})
    assert status == 201, body
    _, _, listeners = call(h, "/api/v1/listeners")
    assert listeners[0]["scenario"]["rules"][-1]["name"] == "block"



def test_api_unicode_digit_id_is_a_400(h: Harness) -> None:
    status, ctype, _ = call(h, "/api/v1/sessions/%C2%B2")
    assert status == 400 and "json" in ctype
    status, ctype, _ = call(h, "/api/v1/messages?limit=%C2%B2")
    assert status == 400 and "json" in ctype


NDR = (b"From: MAILER-DAEMON@mx.example\r\nTo: app@lab.test\r\n"
       b"Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n"
       b"--B\r\nContent-Type: text/plain\r\n\r\nCould not deliver.\r\n"
       b"--B\r\nContent-Type: message/delivery-status\r\n\r\n"
       b"Reporting-MTA: dns; mx.example\r\n\r\n"
       b"Final-Recipient: rfc822; gone@lab.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
       b"Diagnostic-Code: smtp; 550 5.1.1 User unknown\r\n\r\n--B--\r\n")



def test_api_ndrs_keeps_a_bounce_after_100_ordinary_messages(h: Harness) -> None:
    with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=10) as c:
        c.sendmail("", ["app@lab.test"], NDR)
        assert len(call(h, "/api/v1/ndrs")[2]) == 1  # the bounce is recognised
        for i in range(100):
            c.sendmail("app@lab.test", ["user@lab.test"], f"Subject: {i}\r\n\r\nx\r\n".encode())
    h.wait_idle()
    _, _, ndrs = call(h, "/api/v1/ndrs")
    assert len(ndrs) == 1


# ------------------------------------------------- Harness reset / teardown



def test_reset_does_not_let_an_open_connection_leak_into_the_next_test() -> None:
    with Harness() as hh:
        c = smtplib.SMTP(hh.host, hh.port, local_hostname=HELO, timeout=5)
        try:
            c.sendmail("app@lab.test", ["old@lab.test"], b"Subject: test 1\r\n\r\nx\r\n")
            hh.reset()  # what the smtp_harness fixture does before the next test
            # if reset closed the old connection, this fails: fine
            with contextlib.suppress(smtplib.SMTPException, OSError):
                c.sendmail("app@lab.test", ["late@lab.test"], b"Subject: late\r\n\r\nx\r\n")
            assert hh.messages() == [], "a previous test's connection delivered after reset"
        finally:
            with contextlib.suppress(OSError):
                c.close()



def test_wait_idle_timeout_says_which_connection_is_open() -> None:
    with Harness() as hh:
        c = smtplib.SMTP(hh.host, hh.port, local_hostname=HELO, timeout=5)
        try:
            c.noop()
            with pytest.raises(AssertionError, match=r"(?i)open|session"):
                hh.wait_idle(timeout=0.3)
        finally:
            c.close()
