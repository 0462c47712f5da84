"""Issue 11, item 3, over real HTTP on loopback: what a client sends that is
out of range, too big, too deep or names server files gets its 4xx (a
problem+json body that says why), never a 500; the bearer scheme is read in
any case."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.testing import Harness

BIG = "99999999999999999999999"
JUST_OVER = str(2**63)  # one past SQLite's largest INTEGER


def call(h: Harness, method: str, path: str, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any] | bytes]:
    assert h.http_url
    req = urllib.request.Request(h.http_url + path, data=body, method=method, headers={
        "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, data, kind = r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        status, data, kind = e.code, e.read(), e.headers.get("Content-Type", "")
    return status, json.loads(data) if "json" in kind else data


@pytest.fixture(scope="module")
def api() -> Iterator[Harness]:
    with Harness(http=True) as h:
        yield h


# The issue's requests that answered 500: each now gets its 4xx.
ISSUE_REQUESTS = [
    ("GET", f"/api/v1/messages/{BIG}", None, 400),
    ("GET", f"/api/v1/messages/{JUST_OVER}", None, 400),
    ("GET", f"/api/v1/messages/{BIG}/raw", None, 400),
    ("GET", f"/api/v1/messages/{BIG}/html", None, 400),
    ("GET", f"/api/v1/messages?limit={BIG}", None, 400),
    ("GET", f"/api/v1/sessions/{BIG}", None, 400),
    ("GET", f"/api/v1/sessions?limit={BIG}", None, 400),
    ("GET", f"/api/v1/ndrs?limit={BIG}", None, 400),
    ("GET", f"/api/v1/bounces?limit={BIG}", None, 400),
    ("GET", f"/api/v1/bounces/{BIG}/raw", None, 400),
    ("GET", f"/api/v1/sessions/{BIG}/bounces", None, 400),
    ("POST", f"/api/v1/listeners/{BIG}/reset", b"{}", 400),
    ("GET", "/api/v1/messages/" + "9" * 5000, None, 400),  # int() of it would be refused
    ("PUT", "/api/v1/listeners/0/scenario", b"[" * 100_000 + b"]" * 100_000, 422),
    ("PUT", "/api/v1/listeners/0/scenario",
     json.dumps({"yaml": "a: " + "[" * 5000 + "]" * 5000}).encode(), 422),
    ("POST", "/api/v1/listeners/0/rules",
     json.dumps({"on": "rcpt", "reply": "550 5.1.1 x",
                 "when": {"rcpt": json.loads("[" * 900 + "]" * 900)}}).encode(), 422),
    ("POST", "/api/v1/evidence", b'{"files": ' + b"[" * 50 + b"]" * 50 + b"}", 422),
    ("POST", "/api/v1/probe", b'{"sender": ' + b"[" * 50 + b"]" * 50 + b"}", 422),
    ("PUT", "/api/v1/listeners/0/scenario",
     b'{"yaml": "' + b"a" * (1024**2 + 1) + b'"}', 413),
    ("PUT", "/api/v1/listeners/0/scenario", b'{"yaml": "\xff"}', 400),
]


@pytest.mark.parametrize(("method", "path", "body", "status"), ISSUE_REQUESTS,
                         ids=[f"{m} {p[:50]} {len(b or b'')}B" for m, p, b, _ in ISSUE_REQUESTS])
def test_api_hostile_request_gets_its_4xx(api: Harness, method: str, path: str,
                                          body: bytes | None, status: int) -> None:
    got, data = call(api, method, path, body)
    assert got == status, data
    assert isinstance(data, dict) and data["status"] == status and data["title"]


def test_api_hostile_largest_id_is_looked_up(api: Harness) -> None:
    got, data = call(api, "GET", f"/api/v1/messages/{2**63 - 1}")
    assert got == 404, data  # in range: looked up, and not there
    got, data = call(api, "GET", "/api/v1/messages?limit=100000")
    assert got == 200
    got, data = call(api, "GET", "/api/v1/messages?limit=100001")
    assert got == 400 and isinstance(data, dict) and "0 to 100000" in data["title"]


def test_api_hostile_deep_body_leaves_the_scenario_alone(api: Harness) -> None:
    before = api.scenario.name
    got, _ = call(api, "PUT", "/api/v1/listeners/0/scenario",
                  json.dumps({"yaml": "rules: " + "[" * 40 + "]" * 40}).encode())
    assert got == 422
    assert api.scenario.name == before
    # the nesting the format needs (seven levels) still loads
    text = ("scenario: deep-enough\nrules:\n  - name: h\n    on: message\n"
            "    when: {header: {Subject: {regex: '^x$'}}}\n    reply: 550 5.7.1 No\n")
    got, data = call(api, "PUT", "/api/v1/listeners/0/scenario",
                      json.dumps({"yaml": text}).encode())
    assert got == 200, data
    call(api, "PUT", "/api/v1/listeners/0/scenario", json.dumps({"name": before}).encode())


@pytest.mark.parametrize("files", [
    "server: {tls: {cert: /etc/passwd, key: /etc/shadow}}",
    "server: {tls: {cert: /no/such/file.pem, key: /no/such/key.pem}}",
    "server: {tls: {cert: cert.pem}}",
    "server:\n  tls:\n    key: ../../../../etc/ssl/private/ssl-cert-snakeoil.key\n",
])
def test_api_hostile_scenario_cannot_name_server_files(api: Harness, files: str) -> None:
    got, data = call(api, "PUT", "/api/v1/listeners/0/scenario",
                     json.dumps({"yaml": f"scenario: sneaky\n{files}\n"}).encode())
    assert got == 422 and isinstance(data, dict)
    problems = data["problems"]
    assert problems and all("names a file on the server" in p for p in problems), problems
    assert all("only for scenarios loaded from the CLI or a config" in p for p in problems)
    # the same answer whether the file exists or not: nothing about the file
    assert not any(w in " ".join(problems) for w in ("exist", "PEM", "permission", "looked"))
    assert api.scenario.name != "sneaky"


def test_api_hostile_scenario_files_same_answer_existing_or_not(api: Harness,
                                                                 tmp_path: Path) -> None:
    real = tmp_path / "real.pem"
    real.write_text("not a certificate\n")
    answers = []
    for cert in (str(real), str(tmp_path / "none.pem")):  # same length: same columns
        text = f"server: {{tls: {{cert: {cert}, key: {cert}}}}}\n"
        got, data = call(api, "PUT", "/api/v1/listeners/0/scenario",
                         json.dumps({"yaml": text}).encode())
        assert isinstance(data, dict)
        answers.append((got, [p.replace(cert, "PATH") for p in data["problems"]]))
    assert answers[0] == answers[1] and answers[0][0] == 422


def test_api_hostile_probe_zone_cannot_name_server_files(api: Harness) -> None:
    zone = ("server: {tls: {cert: /etc/passwd, key: /etc/shadow}}\n"
            "dns: {lab.test: {A: [127.0.0.1]}}\n")
    got, data = call(api, "POST", "/api/v1/probe", json.dumps(
        {"sender": "a@lab.test", "recipient": "b@lab.test", "zone": zone}).encode())
    assert got == 422 and isinstance(data, dict), data
    assert any("names a file on the server" in p for p in data["problems"])


@pytest.fixture(scope="module")
def guarded() -> Iterator[Harness]:
    with Harness(http=True, api_token="s3cret-token") as h:
        yield h


@pytest.mark.parametrize("header", ["Bearer s3cret-token", "bearer s3cret-token",
                                    "BEARER s3cret-token", "bEaReR  s3cret-token"])
def test_api_hostile_bearer_scheme_in_any_case(guarded: Harness, header: str) -> None:
    got, _ = call(guarded, "GET", "/api/v1/messages", headers={"Authorization": header})
    assert got == 200


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer wrong", "Basic czNjcmV0LXRva2Vu",
                                    "s3cret-token", "Bearers3cret-token", "Token s3cret-token"])
def test_api_hostile_other_credentials_refused(guarded: Harness, header: str) -> None:
    got, data = call(guarded, "GET", "/api/v1/messages", headers={"Authorization": header})
    assert got == 401, data
