"""POST /api/v1/evidence: the sending side's logs, as text, lined up with the
running harness's store (the same JSON as `harness evidence --json`)."""

from __future__ import annotations

import json
import smtplib
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.testing import Harness

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "evidence"
GREYLIST_ONCE = """\
scenario: greylist-once
rules:
  - name: greylist once
    on: rcpt
    when: {rcpt: user@lab.test, attempt: 1}
    reply: 451 4.7.1 Greylisted, this sender is new here; please try again later
"""


@pytest.fixture
def api() -> Iterator[Harness]:
    with Harness(GREYLIST_ONCE, http=True) as h:
        yield h


def post(h: Harness, body: Any, raw: bytes | None = None) -> tuple[int, Any]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(f"{h.http_url}/api/v1/evidence", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body.startswith(b"{") else body.decode()


def test_api_evidence_lines_up_a_postfix_log_written_for_the_sessions(api: Harness) -> None:
    # two deliveries as a Postfix would make them, and its log of them
    for _ in range(2):
        with smtplib.SMTP(api.host, api.port, local_hostname="mta1.test") as c:
            c.ehlo()
            c.mail("app@contoso.test")
            if c.rcpt("user@lab.test")[0] == 250:
                c.data(b"Subject: x\r\nMessage-ID: <api-1@mta1.test>\r\n\r\nhi\r\n")
    api.wait_idle()
    attempts = api.attempts()
    stamp = [a.t for a in attempts]

    def when(t: float) -> str:
        return time.strftime("%b %d %H:%M:%S", time.gmtime(t))

    log = "\n".join([
        f"{when(stamp[0])} mta1 postfix/cleanup[1]: 1A2B3C4D5E: message-id=<api-1@mta1.test>",
        f"{when(stamp[0])} mta1 postfix/smtp[2]: 1A2B3C4D5E: to=<user@lab.test>, "
        f"relay={api.host}[{api.host}]:{api.port}, delay=0.1, delays=0/0/0/0, dsn=4.7.1, "
        f"status=deferred (host {api.host}[{api.host}] said: {attempts[0].reply} (in reply to "
        "RCPT TO command))",
        f"{when(stamp[1])} mta1 postfix/smtp[2]: 1A2B3C4D5E: to=<user@lab.test>, "
        f"relay={api.host}[{api.host}]:{api.port}, delay=1, delays=0/0/0/0, dsn=2.0.0, "
        f"status=sent ({attempts[1].reply})", "not a log line"])
    status, body = post(api, {"files": [{"name": "maillog", "text": log}], "tz": "UTC"})
    assert status == 200, body
    assert body["schema"] == "harness.evidence/1"
    assert body["disagreements"] == 0, body
    assert body["problems"] == ["maillog:4: not a syslog or journal line"]
    [m] = body["messages"]
    assert m["message_id"] == "<api-1@mta1.test>"
    both = [(st["sender"][0]["where"], st["harness"]["reply"][:3]) for st in m["steps"]
            if st["harness"]]
    assert both == [("maillog:2", "451"), ("maillog:3", "250")]
    assert body["skews"][0]["resolution"] == 1.0


def test_api_evidence_exchange_fixtures_and_problems(api: Harness) -> None:
    files = [{"name": p.name, "text": p.read_text(encoding="utf-8-sig")}
             for p in (FIXTURES / "SEND20261130-1.LOG", FIXTURES / "get-queue.json")]
    status, body = post(api, {"files": files})
    assert status == 200
    assert [f["kind"] for f in body["files"]] == ["exchange-send-protocol",
                                                  "exchange-queue-json"]
    # the harness never answered these sessions: the edited queue reply and the
    # greylisting reply are flagged, the protocol sessions have no harness session
    kinds = {d["kind"] for m in body["messages"] for d in m["disagreements"]}
    assert "reply-never-sent" in kinds


@pytest.mark.parametrize(("body", "status", "title"), [
    ({}, 400, "give files"),
    ({"files": []}, 400, "give files"),
    ({"files": [{"name": "", "text": "x"}]}, 400, "files[0] needs a name"),
    ({"files": [{"name": "a", "text": 3}]}, 400, "files[0] needs a name"),
    ({"files": [{"name": "a", "text": "x"}] * 17}, 413, "at most 16 files"),
    ({"files": [{"name": "a", "text": "x"}], "tz": "Mars/Olympus"}, 400, "--tz"),
    ({"files": [{"name": "a", "text": "x"}], "retry_interval": "soon"}, 400, "retry_interval"),
    ({"files": [{"name": "a", "text": "x"}], "tz": "+99:00"}, 400, "an offset lies between"),
    ({"files": [{"name": "a", "text": "x"}], "window": -1}, 400, "window"),
])
def test_api_evidence_refuses_bad_requests_in_one_line(api: Harness, body: Any, status: int,
                                                       title: str) -> None:
    got, answer = post(api, body)
    assert got == status
    assert title in answer["title"]


def test_api_evidence_another_kind_of_file_is_a_problem_not_an_error(api: Harness) -> None:
    status, body = post(api, {"files": [{"name": "notes.txt", "text": "hello"}],
                              "tz": "+01:00", "retry_interval": 60})
    assert status == 200
    assert body["messages"] == [] and body["disagreements"] == 0
    assert body["problems"][0].startswith("notes.txt:1: it is none of the kinds this reads (")


def test_api_evidence_body_limit(api: Harness) -> None:
    big = json.dumps({"files": [{"name": "a", "text": "x" * (1024 * 1024 + 10)}]}).encode()
    status, answer = post(api, None, raw=big)
    assert status == 413
    assert "1 MiB" in answer["title"]
