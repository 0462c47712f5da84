"""The API of issue 14 on a real socket: POST /api/v1/probe against loopback
listeners the request names, the recent results, and the bounces rules
sent (per session, all, and each report's bytes); bad requests answered
with a problem, never a probe."""

from __future__ import annotations

import json
import smtplib
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from harness.analysis.dsn import parse_ndr
from harness.testing import Harness


@pytest.fixture
def api() -> Iterator[Harness]:
    with Harness(http=True) as h:
        yield h


def call(h: Harness, path: str, body: Any = None, *, raw: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"{h.http_url}{path}", data=data,
                                 method="POST" if data is not None else "GET",
                                 headers={"Content-Type": content_type} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            payload, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        payload, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
    return status, json.loads(payload) if "json" in ctype else payload


def test_probe_relay_denied_through_the_api(api: Harness) -> None:
    with Harness("relay-denied") as target:
        status, report = call(api, "/api/v1/probe", {
            "sender": "a@lab.test", "recipient": "someone@elsewhere.example",
            "mx": [f"127.0.0.1:{target.port}"], "helo": "probe.lab.test"})
        target.wait_idle()
        assert next(e.text for s in target.sessions() for e in s.events
                    if e.direction == "C") == "EHLO probe.lab.test"
    assert status == 200, report
    assert report["schema"] == "harness.probe/1"
    assert (report["verdict"], report["exit_code"]) == ("bounce", 4)
    rcpt = next(s for s in report["mx"][0]["steps"] if s["step"] == "rcpt")
    assert rcpt["code"] == 550 and rcpt["explanation"]["code"] == "5.7.1"
    assert not any(s["step"] in ("data", "message") for s in report["mx"][0]["steps"])
    status, recent = call(api, "/api/v1/probes")
    assert status == 200 and recent[-1] == report


def test_probe_zone_with_the_first_mx_down(api: Harness) -> None:
    zone = textwrap.dedent("""\
        lab.test: {MX: ['10 mx1.lab.test', '20 mx2.lab.test']}
        mx1.lab.test: {A: [127.0.0.2]}
        mx2.lab.test: {A: [127.0.0.1]}
        """)
    with Harness("accept") as target:
        status, report = call(api, "/api/v1/probe", {
            "sender": "a@lab.test", "recipient": "b@lab.test", "zone": zone,
            "port": target.port, "timeouts": {"connect": 5}})
    assert status == 200, report
    assert [(m["label"], m["verdict"]) for m in report["mx"]] == [
        ("MX 10 mx1.lab.test", "defer"), ("MX 20 mx2.lab.test", "deliver")]
    assert report["dns"]["source"] == "<zone>" and report["verdict"] == "deliver"


def test_probe_with_send_delivers_the_test_message(api: Harness) -> None:
    with Harness("accept") as target:
        status, report = call(api, "/api/v1/probe", {
            "sender": "a@lab.test", "recipient": "b@lab.test", "send": True,
            "mx": [f"127.0.0.1:{target.port}"]})
        assert status == 200 and report["send"] is True
        assert target.wait_for_message(rcpt="b@lab.test").subject == \
            "SMTP Harness probe: test message"


@pytest.mark.parametrize(("body", "status", "title"), [
    ({"recipient": "b@lab.test", "mx": ["127.0.0.1:1"]}, 400, "sender is required"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "mx": "127.0.0.1:1"}, 400,
     "mx must be a list"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "mx": ["127.0.0.1:1"], "colour": 1},
     400, "unknown field 'colour'"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "dns": "8.8.8.8"}, 400,
     "dns is 'system'"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "dns": "system", "zone": "x: {}"},
     400, "give dns or zone, not both"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "mx": ["mx.partner.example"]}, 400,
     "mx entry 'mx.partner.example' is a host name and no DNS was asked for"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "mx": ["127.0.0.1:x"]}, 400,
     "mx entry '127.0.0.1:x': bad port 'x'"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test"}, 400,
     'nothing to probe: give mx (a list of HOST[:PORT]), or dns "system"'),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "mx": ["127.0.0.1:1"],
      "ca_pem": "not a certificate"}, 400, "ca_pem: "),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "mx": ["127.0.0.1:1"],
      "timeouts": {"dot": 5}}, 400, "timeouts: 'dot' is not a step"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "port": 0, "mx": ["127.0.0.1"]}, 400,
     "port 0 is out of range"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "port": True, "mx": ["127.0.0.1"]},
     400, "port must be a whole number"),
    ({"sender": "a@lab.test", "recipient": "nobody", "mx": ["127.0.0.1:1"]}, 400,
     "is not an address"),
    ({"sender": "a@lab.test", "recipient": "b@lab.test", "zone": "lab.test: {MX: [a b c]}"},
     422, "the scenario or rule is invalid"),
])
def test_probe_refuses_bad_requests(api: Harness, body: dict[str, Any], status: int,
                                    title: str) -> None:
    got, problem = call(api, "/api/v1/probe", body)
    assert got == status, problem
    assert title in problem["title"], problem
    assert "--" not in problem["title"], problem  # the request's words, not the command's
    if status == 422:
        assert problem["problems"] == ["<zone>:1:17: 'a b c' is not 'PREFERENCE HOST' or 'HOST'"]


def test_probe_takes_json_only(api: Harness) -> None:
    status, _ = call(api, "/api/v1/probe", raw=b"sender=a", content_type="text/plain")
    assert status == 415


BOUNCER = textwrap.dedent("""\
    rules:
      - name: bounce later
        on: message
        when: {rcpt: "bounce@lab.test"}
        bounce: {kind: exchange, status: 5.1.1}
    """)


def test_bounces_per_session_all_and_raw() -> None:
    with Harness() as hop, Harness(BOUNCER, http=True, bounce_via=(hop.host, hop.port)) as h:
        with smtplib.SMTP(h.host, h.port, local_hostname="c.test", timeout=10) as c:
            c.sendmail("app@sender.test", ["bounce@lab.test"], b"Subject: Order\r\n\r\nhi\r\n")
        hop.wait_for_message(rcpt="app@sender.test", timeout=10)
        rows: list[dict[str, Any]] = []

        def sent() -> list[dict[str, Any]] | None:
            nonlocal rows
            rows = call(h, "/api/v1/bounces")[1]
            return rows or None

        assert h._wait(sent, 10) is not None
        (b,) = rows
        assert (b["kind"], b["status"], b["outcome"], b["recipients"], b["mail_to"]) == (
            "exchange", "5.1.1", "sent", ["bounce@lab.test"], "app@sender.test")
        assert b["classified_as"] == "ndr" and b["rule"] == "bounce later"
        assert b["reply"].startswith("250 ") and b["subject"] == "Undeliverable: Order"
        status, per_session = call(h, f"/api/v1/sessions/{b['session_id']}/bounces")
        assert status == 200 and per_session == rows
        status, raw = call(h, f"/api/v1/bounces/{b['id']}/raw")
        assert status == 200
        ndr = parse_ndr(raw)
        assert ndr is not None and ndr.recipients[0].status == "5.1.1"
        assert call(h, "/api/v1/bounces/999/raw")[0] == 404
        assert call(h, "/api/v1/sessions/999/bounces")[0] == 404
        # the rule's bounce is part of the listener's rules
        (listener,) = call(h, "/api/v1/listeners")[1]
        assert listener["scenario"]["rules"][0]["bounce"] == {
            "kind": "exchange", "status": "5.1.1", "diagnostic": None, "after": 0.0}
