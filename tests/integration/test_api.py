"""The HTTP API on a real socket, in the same loop as SMTP, driven with urllib."""

from __future__ import annotations

import json
import smtplib
import socket
import threading
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
         headers: dict[str, str] | None = None, raw: bytes | None = None,
         base: str | None = None) -> tuple[int, dict[str, str], Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    req = urllib.request.Request((base or h.http_url or "") + path, data=data, method=method,
                                 headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            payload = r.read()
            status, got = r.status, dict(r.headers)
    except urllib.error.HTTPError as e:
        payload, status, got = e.read(), e.code, dict(e.headers)
    ctype = got.get("Content-Type", "")
    return status, got, json.loads(payload) if "json" in ctype else payload


def send(h: Harness, rcpt: str = "user@lab.test", body: bytes = b"Subject: hi\r\n\r\nx\r\n"
         ) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(h.host, h.port, local_hostname=HELO, timeout=5) as c:
        return c.sendmail("app@lab.test", [rcpt], body)


def test_api_health_and_openapi(h: Harness) -> None:
    assert call(h, "/livez")[0] == 200
    status, _, body = call(h, "/readyz")
    assert status == 200 and body["status"] == "ready"
    status, _, spec = call(h, "/api/v1/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert "/api/v1/messages/{id}" in spec["paths"]


def test_api_switch_scenario_and_next_delivery_is_rejected(h: Harness) -> None:
    send(h, "full@lab.test")
    status, _, scenario = call(h, "/api/v1/listeners/0/scenario", "PUT", {"name": "mailbox-full"})
    assert status == 200 and scenario["name"] == "mailbox-full"
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(h, "full@lab.test")
    [listener] = call(h, "/api/v1/listeners")[2]
    assert listener["scenario"]["name"] == "mailbox-full"
    status, _, err = call(h, "/api/v1/listeners/0/scenario", "PUT", {"name": "../../etc/passwd"})
    assert status == 404 and "no library scenario" in err["title"]


def test_api_rules_are_validated_like_files(h: Harness) -> None:
    status, _, err = call(h, "/api/v1/listeners/0/rules", "POST",
                          {"on": "rcpt", "whn": {"rcpt": "x@*"}, "reply": "550 4.1.1 bad"})
    assert status == 422
    assert any("did you mean when?" in p for p in err["problems"])
    assert any("disagrees with reply code 550" in p for p in err["problems"])
    status, _, rule = call(h, "/api/v1/listeners/0/rules", "POST",
                           {"name": "block x", "on": "rcpt", "when": {"rcpt": "x@*"},
                            "reply": "550 5.1.1 No such user"})
    assert status == 201 and rule["name"] == "block x"
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        send(h, "x@lab.test")
    assert call(h, "/api/v1/listeners/0/rules", "POST", {"name": "block x", "on": "rcpt",
                                                         "reply": "550 5.1.1 x"})[0] == 409
    assert call(h, "/api/v1/listeners/0/rules/block%20x", "DELETE")[0] == 200
    send(h, "x@lab.test")
    assert call(h, "/api/v1/listeners/0/reset", "POST", {})[0] == 200


def test_api_sessions_messages_attempts(h: Harness) -> None:
    html = (b"Subject: report\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative;"
            b" boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nplain text\r\n"
            b"--b\r\nContent-Type: text/html\r\n\r\n<p>rich <b>text</b></p>\r\n--b--\r\n")
    send(h, body=html)
    h.wait_idle()
    [s] = call(h, "/api/v1/sessions")[2]
    status, _, full = call(h, f"/api/v1/sessions/{s['id']}")
    assert status == 200 and any(e["text"].startswith("rcpt TO:") for e in full["events"])
    [m] = call(h, "/api/v1/messages")[2]
    status, _, detail = call(h, f"/api/v1/messages/{m['id']}")
    assert detail["subject"] == "report" and detail["text"].strip() == "plain text"
    assert detail["has_html"] is True
    assert [p["content_type"] for p in detail["parts"]] == ["text/plain", "text/html"]
    status, headers, raw = call(h, f"/api/v1/messages/{m['id']}/raw")
    assert raw == html and headers["Content-Type"].startswith("text/plain")
    status, headers, page = call(h, f"/api/v1/messages/{m['id']}/html")
    assert b"<b>text</b>" in page
    assert headers["Content-Security-Policy"].startswith("sandbox;")
    assert "script-src" not in headers["Content-Security-Policy"]
    [a] = call(h, "/api/v1/attempts?rcpt=user@lab.test")[2]
    assert (a["outcome"], a["code"]) == ("accepted", 250)
    [pair] = call(h, "/api/v1/timelines")[2]
    assert pair["rcpt"] == "user@lab.test" and len(pair["attempts"]) == 1
    assert call(h, "/api/v1/messages/999")[0] == 404
    assert call(h, "/api/v1/messages/abc")[0] == 400


def test_api_event_stream_carries_the_conversation(h: Harness) -> None:
    got: list[str] = []
    ready = threading.Event()
    done = threading.Event()

    def listen() -> None:
        assert h.http_url is not None
        with urllib.request.urlopen(h.http_url + "/api/v1/events", timeout=5) as r:
            for raw in r:
                line = raw.decode().strip()
                if line == ": connected":
                    ready.set()
                if line.startswith("data: "):
                    got.append(line)
                    if '"type": "session_end"' in line:
                        done.set()
                        return

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    assert ready.wait(5)
    send(h)
    assert done.wait(5)
    events = [json.loads(x[6:]) for x in got]
    texts = [e["text"] for e in events if e["type"] == "line"]
    assert any(e["type"] == "message" for e in events)
    assert "rcpt TO:<user@lab.test>" in texts
    assert any(x.startswith("250 2.0.0 Ok: queued") for x in texts)


def test_api_changes_must_be_json_from_the_same_origin(h: Harness) -> None:
    form = call(h, "/api/v1/listeners/0/reset", "POST", raw=b"a=b",
                headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form[0] == 415
    foreign = call(h, "/api/v1/listeners/0/scenario", "PUT", {"name": "accept"},
                   headers={"Origin": "http://evil.example"})
    assert foreign[0] == 403


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_api_beyond_loopback_needs_the_token() -> None:
    import asyncio

    from harness.api.app import ApiServer

    with Harness() as h:
        assert h._loop is not None
        api = ApiServer([h.ctx], h.store_path, "0.0.0.0", 0)  # any address: token needed
        asyncio.run_coroutine_threadsafe(api.start(), h._loop).result(5)
        try:
            assert len(api.token) >= 20  # generated, since none was given
            base = f"http://127.0.0.1:{api.port}"
            status, _, err = call(h, "/api/v1/messages", base=base)
            assert status == 401 and "bearer token" in err["title"]
            wrong = call(h, "/api/v1/messages", base=base,
                         headers={"Authorization": "Bearer nope"})
            assert wrong[0] == 401
            status, _, msgs = call(h, "/api/v1/messages", base=base,
                                   headers={"Authorization": f"Bearer {api.token}"})
            assert status == 200 and msgs == []
            assert call(h, "/livez", base=base)[0] == 200  # health stays open
        finally:
            asyncio.run_coroutine_threadsafe(api.stop(), h._loop).result(5)


def test_api_event_stream_tells_of_a_scenario_switched_in_python(h: Harness) -> None:
    got: list[dict[str, Any]] = []
    ready = threading.Event()
    done = threading.Event()

    def listen() -> None:
        assert h.http_url is not None
        with urllib.request.urlopen(h.http_url + "/api/v1/events", timeout=5) as r:
            for raw in r:
                line = raw.decode().strip()
                if line == ": connected":
                    ready.set()
                if line.startswith("data: "):
                    got.append(json.loads(line[6:]))
                    if got[-1]["type"] == "scenario":
                        done.set()
                        return

    threading.Thread(target=listen, daemon=True).start()
    assert ready.wait(5)
    h.use("mailbox-full")
    assert done.wait(5)
    assert got[-1] == {"type": "scenario", "listener": 0, "scenario": "mailbox-full"}
