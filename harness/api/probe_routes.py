"""API routes for issue 14: running a probe, and the bounces rules sent.

    POST /api/v1/probe                 run `harness probe` against the targets
                                       the request names; the JSON of --json
    GET  /api/v1/probes                the latest probe results (this process)
    GET  /api/v1/bounces               bounces sent (or not) by rules, newest last
    GET  /api/v1/sessions/{id}/bounces those of one session
    GET  /api/v1/bounces/{id}/raw      one report as built (text/plain)

A probe follows the command's rules: it dials only the `mx` targets given,
or looks the recipient domain up when the request asks for it (`dns:
"system"`, or `zone`: records in the scenario dns: format, as YAML text);
it sends no message unless `send` is true. Kept apart from app.py, which
adds these routes in one line."""

from __future__ import annotations

import asyncio
import collections
import socket
import time
import weakref
from typing import Any

from aiohttp import web

from harness.api.app import body_json, int_param, problem, read
from harness.errors import HarnessError

routes = web.RouteTableDef()

#: probes at once from the API (each may wait on timeouts)
MAX_CONCURRENT = 4
#: results kept for GET /api/v1/probes
KEEP = 20
#: per application (two harnesses in one process keep their own)
_RECENT: weakref.WeakKeyDictionary[web.Application, collections.deque[dict[str, Any]]] = (
    weakref.WeakKeyDictionary())
_SLOTS: dict[int, asyncio.Semaphore] = {}  # per event loop
_MAX_ID = 2**63 - 1  # SQLite's largest integer


def _slots() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    return _SLOTS.setdefault(id(loop), asyncio.Semaphore(MAX_CONCURRENT))


_FIELDS = {"sender": str, "recipient": str, "mx": list, "dns": str, "zone": str, "port": int,
           "ca_pem": str, "helo": str, "send": bool, "timeouts": dict}


def _options(data: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise HarnessError(f"unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    for key, kind in _FIELDS.items():
        value = data.get(key)
        if value is None:
            continue
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise HarnessError(f"{key} must be a whole number")
        if not isinstance(value, kind):
            raise HarnessError(f"{key} must be a {kind.__name__}")
    for key in ("sender", "recipient"):
        if not isinstance(data.get(key), str):
            raise HarnessError(f"{key} is required (an address)")
    if not all(isinstance(x, str) for x in data.get("mx") or []):
        raise HarnessError("mx is a list of HOST[:PORT] strings")
    if data.get("dns") not in (None, "system"):
        raise HarnessError("dns is 'system'; give a zone as YAML text in zone")
    if data.get("dns") and data.get("zone"):
        raise HarnessError("give dns or zone, not both")
    return data


@routes.post("/api/v1/probe")
async def run(request: web.Request) -> web.Response:
    from harness.analysis.probe_verdict import STEP_TIMEOUTS
    from harness.probe.client import ProbeError, ProbeOptions, run_probe
    from harness.probe.message import test_message
    from harness.scenario.loader import load_zone_text

    data = _options(await body_json(request))
    timeouts = {k: v for k, (v, _) in STEP_TIMEOUTS.items()}
    for step, seconds in (data.get("timeouts") or {}).items():
        if step not in timeouts or isinstance(seconds, bool) or not isinstance(
                seconds, (int, float)) or not 0 < seconds <= 3600:
            raise HarnessError(f"timeouts: {step!r} is not a step, or its seconds are not "
                               f"between 0 and 3600 (steps: {', '.join(timeouts)})")
        timeouts[step] = float(seconds)
    zone = None
    dns = data.get("dns")
    if data.get("zone"):
        zone = await asyncio.to_thread(load_zone_text, data["zone"], "<zone>",
                                       allow_files=False)  # a request names no server file
        dns = "<zone>"
    sender = "" if data["sender"].strip() in ("", "<>") else data["sender"].strip()
    port = 25 if data.get("port") is None else data["port"]
    if not 0 < port < 65536:
        raise HarnessError(f"port {port} is out of range")
    opts = ProbeOptions(
        sender=sender, recipient=data["recipient"].strip(),
        helo=data.get("helo") or socket.gethostname() or "probe.invalid", timeouts=timeouts,
        ca_pem=data["ca_pem"].encode() if data.get("ca_pem") else None,
        ca_name="the given CA" if data.get("ca_pem") else "system",
        message=test_message(sender, data["recipient"].strip(), now=time.time())
        if data.get("send") else None)
    async with _slots():
        try:
            report = await run_probe(opts, mx=data.get("mx") or [], dns=dns, zone=zone,
                                     port=port)
        except ProbeError as e:  # in the request's words (mx, dns), not the command's
            raise HarnessError(e.api) from None
    result = report.as_dict()
    _RECENT.setdefault(request.app, collections.deque(maxlen=KEEP)).append(result)
    return web.json_response(result)


@routes.get("/api/v1/probes")
async def recent(request: web.Request) -> web.Response:
    return web.json_response(list(_RECENT.get(request.app, ())))


def _bounce_json(b: Any) -> dict[str, Any]:
    from harness.analysis.classify import classify

    d: dict[str, Any] = b.as_dict()
    d["classified_as"] = classify(b.raw).kind if b.raw else None
    return d


@routes.get("/api/v1/bounces")
async def bounces(request: web.Request) -> web.Response:
    from harness.store.bounces import bounces as list_bounces

    limit = min(int_param(request, "limit", 100) or 0, 100_000)
    found = await read(request, lambda r: list_bounces(r, raw=True, limit=limit))
    return web.json_response([_bounce_json(b) for b in found])


@routes.get("/api/v1/sessions/{id}/bounces")
async def session_bounces(request: web.Request) -> web.Response:
    from harness.store.bounces import bounces as list_bounces

    sid = int_param(request, "id")
    assert sid is not None
    if sid > _MAX_ID:
        return problem(404, f"no session {sid}")
    session = await read(request, lambda r: r.session(sid))
    if session is None:
        return problem(404, f"no session {sid}")
    found = await read(request, lambda r: list_bounces(r, session_id=sid, raw=True))
    return web.json_response([_bounce_json(b) for b in found])


@routes.get("/api/v1/bounces/{id}/raw")
async def bounce_raw(request: web.Request) -> web.Response:
    from harness.api.app import MAIL_CSP
    from harness.store.bounces import bounce

    bid = int_param(request, "id")
    assert bid is not None
    if bid > _MAX_ID:
        return problem(404, f"no bounce {bid}")
    found = await read(request, lambda r: bounce(r, bid))
    if found is None or found.raw is None:
        return problem(404, f"no bounce {bid} with a report" if found else f"no bounce {bid}")
    # text/plain: a browser shows the source and never renders it
    return web.Response(body=found.raw, content_type="text/plain", charset="utf-8",
                        headers={"Content-Security-Policy": MAIL_CSP})
