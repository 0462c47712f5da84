"""The HTTP control API and the web page, on aiohttp, in SMTP's event loop.

Versioned under /api/v1. Reads of the store run in a thread (the loop never
touches SQLite); changes to scenarios go through the same loader and
validation as files. Live events reach the page over server-sent events.

Security: bound to loopback it needs no token; bound elsewhere every request
needs `Authorization: Bearer TOKEN`. Changes are accepted only as JSON
(a cross-site form cannot send that without a CORS preflight, which this API
never grants) and from a matching Origin when a browser sends one. Captured
HTML is served only with a sandboxing Content-Security-Policy, for a
sandboxed frame; no request path ever names a file."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from harness import __version__
from harness.errors import HarnessError, ScenarioError, StoreError
from harness.records import TranscriptLine
from harness.render import view
from harness.scenario.library import library_dir, library_names, load
from harness.scenario.loader import build_rule, load_text
from harness.smtp.listener import ListenerContext
from harness.store import display, is_postgres
from harness.store.db import MessageRecord, Reader, StoreFull

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CTX_KEY = web.AppKey("listeners", list[ListenerContext])
STORE_KEY: web.AppKey[Path | str] = web.AppKey("store_path")  # a file, or a postgresql:// URL
TOKEN_KEY = web.AppKey("token", str)

#: The page may load its own script and style, and talk to this origin only.
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-src 'self'; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")
#: Captured HTML: no script, no network, no forms, no navigation of the page.
MAIL_CSP = ("sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
            "font-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")


def _not_a_client_mistake(record: logging.LogRecord) -> bool:
    """aiohttp logs every request it cannot parse (and answers 400) with a
    traceback: a client's malformed bytes are not the server's error, and
    any client could fill the console with them. Handlers' own errors are
    still logged."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, HttpProcessingError)


logging.getLogger("aiohttp.server").addFilter(_not_a_client_mistake)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def problem(status: int, title: str, **extra: Any) -> web.Response:
    """An error body in the RFC 9457 shape."""
    body = {"status": status, "title": title, **extra}
    return web.json_response(body, status=status, content_type="application/problem+json")


# -------------------------------------------------------------------- events


class EventHub:
    """Fans live events out to server-sent-event clients (one queue each)."""

    def __init__(self) -> None:
        self.clients: set[asyncio.Queue[dict[str, Any] | None]] = set()
        #: told the number of subscribers when it changes (serve --workers
        #: relays transcript lines from its workers only while someone reads them)
        self.on_change: list[Callable[[int], None]] = []

    def subscribe(self, q: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.clients.add(q)
        self._changed()

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any] | None]) -> None:
        if q in self.clients:
            self.clients.discard(q)
            self._changed()

    def _changed(self) -> None:
        for cb in self.on_change:
            with contextlib.suppress(Exception):
                cb(len(self.clients))

    def publish(self, event: dict[str, Any]) -> None:
        for q in list(self.clients):
            if q.qsize() < 10_000:  # a stalled client loses events, never the server
                q.put_nowait(event)

    def attach(self, ctx: ListenerContext, index: int) -> None:
        def transcript(line: TranscriptLine) -> None:
            if self.clients:  # nobody watching: nothing to build
                self.publish({"type": "line", "listener": index, "session": line.session_id,
                              "t": line.t, "direction": line.direction, "phase": line.phase,
                              "text": line.text, "rule": line.rule})

        ctx.observers.append(transcript)
        def message(mid: int) -> None:
            if self.clients:  # (nobody watching: nothing built, per message or session)
                self.publish({"type": "message", "listener": index, "message": mid})

        def session_end(sid: int) -> None:
            if self.clients:
                self.publish({"type": "session_end", "listener": index, "session": sid})

        ctx.on_message.append(message)
        ctx.on_session_end.append(session_end)
        ctx.on_scenario.append(lambda: self.publish(
            {"type": "scenario", "listener": index, "scenario": ctx.scenario.name}))

    def close(self) -> None:
        for q in list(self.clients):
            q.put_nowait(None)


HUB_KEY = web.AppKey("hub", EventHub)


# ---------------------------------------------------------------- middleware


def _host_part(host: str) -> str:
    """The name or address of a Host header value, without the port."""
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _loopback_name(host: str) -> bool:
    name = _host_part(host).lower()
    return name == "localhost" or is_loopback(name)


def _bearer(header: bytes) -> bytes:
    """The credentials of `Authorization: Bearer TOKEN`, the scheme in any
    case (RFC 7235 2.1: auth-scheme is case-insensitive; one or more spaces
    after it); b"" when the header is not a bearer one."""
    scheme, _, credentials = header.partition(b" ")
    return credentials.lstrip(b" ") if scheme.lower() == b"bearer" else b""


@web.middleware
async def security(request: web.Request, handler: Handler) -> web.StreamResponse:
    token: str = request.app[TOKEN_KEY]
    if token:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        query = request.query.get("token", "").encode("utf-8", "surrogateescape")
        # EventSource, frames and links cannot send a header: those GETs may
        # carry the token in the query instead
        by_query = request.method == "GET" and (
            request.path == "/api/v1/events" or request.path.endswith(("/raw", "/html")))
        ok = hmac.compare_digest(_bearer(given), token.encode()) or (
            by_query and hmac.compare_digest(query, token.encode()))
        # health checks and the page itself (no data in it) stay open
        if not ok and request.path not in ("/livez", "/readyz", "/", "/app.js", "/app.css"):
            return problem(401, "a bearer token is required",
                           detail="send Authorization: Bearer TOKEN (printed at start)")
    elif not _loopback_name(request.host):
        # Without a token the API trusts loopback only, and a browser's Host
        # says which name it used: a foreign name pointed at 127.0.0.1 (DNS
        # rebinding) must not reach captured mail or change scenarios.
        return problem(421, "this API answers to loopback names only",
                       detail="use http://127.0.0.1:PORT/, or bind elsewhere with a token")
    if request.method in ("POST", "PUT", "DELETE", "PATCH"):
        origin = request.headers.get("Origin")
        if origin is not None and (
            origin not in (f"http://{request.host}", f"https://{request.host}")
            or (not token and not _loopback_name(origin.split("://", 1)[-1]))
        ):
            return problem(403, "cross-origin change refused")
        if request.body_exists and request.content_type != "application/json":
            return problem(415, "changes are JSON", detail="send Content-Type: application/json")
    try:
        response = await handler(request)
    except web.HTTPException:
        raise
    except ScenarioError as e:
        return problem(422, "the scenario or rule is invalid",
                       problems=[str(p) for p in e.problems])
    except HarnessError as e:
        return problem(400, str(e))
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


# ------------------------------------------------------------------- helpers


async def read(request: web.Request, fn: Callable[[Reader], Any], *,
               analysed: bool = False, message: int | None = None) -> Any:
    """Run a store query in a thread, after the writer has committed what is
    queued; with `analysed`, first give running analyses up to a second."""
    path = request.app[STORE_KEY]
    listeners: list[ListenerContext] = request.app[CTX_KEY]
    if analysed:  # give the analyses under way up to a second
        analysts = {id(c.analyst): c.analyst for c in listeners if c.analyst is not None}
        waits = [a.idle() if message is None else a.analysed(message)
                 for a in analysts.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), 1.0)
    if listeners:  # read what the writer has queued so far, committed
        with contextlib.suppress(StoreError):  # a store that cannot write: what it has
            await listeners[0].store.barrier()

    def run() -> Any:
        with Reader(path) as r:
            return fn(r)

    return await asyncio.to_thread(run)


#: The largest id the store can hold (SQLite's INTEGER is 64-bit signed):
#: a larger one in a request is a 400, never an overflow inside the query.
MAX_ID = 2**63 - 1
#: The largest `limit` a list takes (0: no limit), as the OpenAPI document says.
MAX_LIMIT = 100_000
#: How deep a JSON body may nest (objects and arrays): a scenario rule needs
#: five or six levels; deeper is refused before anything walks it.
MAX_DEPTH = 32
#: Request bodies above this size get 413 (aiohttp's client_max_size).
MAX_BODY = 1024**2


def _bad_request(title: str, status: int = 400) -> web.HTTPException:
    """A 400, 413 or 422 problem to raise from a helper."""
    text = json.dumps({"status": status, "title": title})
    kind = "application/problem+json"
    if status == 413:
        return web.HTTPRequestEntityTooLarge(MAX_BODY, 0, text=text, content_type=kind)
    if status == 422:
        return web.HTTPUnprocessableEntity(text=text, content_type=kind)
    return web.HTTPBadRequest(text=text, content_type=kind)


def int_param(request: web.Request, name: str, default: int | None = None, *,
              maximum: int | None = None) -> int | None:
    """A whole number from the path or the query: 0 to `maximum` (ids: up
    to MAX_ID; `limit`: up to MAX_LIMIT); anything else is a 400."""
    raw = request.match_info.get(name, request.query.get(name))
    if raw is None:
        return default
    top = maximum if maximum is not None else MAX_LIMIT if name == "limit" else MAX_ID
    digits = raw.lstrip("0") if raw.isascii() else raw
    # the length first: int() of thousands of digits is slow, then refused
    if not (raw.isascii() and raw.isdigit()) or len(digits) > len(str(top)) or int(raw) > top:
        raise _bad_request(f"{name} is a whole number from 0 to {top}")
    return int(raw)


def listener(request: web.Request) -> tuple[int, ListenerContext]:
    listeners = request.app[CTX_KEY]
    index = int_param(request, "index", 0) or 0
    if index >= len(listeners):
        raise web.HTTPNotFound(text=json.dumps({"status": 404, "title": "no such listener"}),
                               content_type="application/problem+json")
    return index, listeners[index]


def rule_json(rule: Any) -> dict[str, Any]:
    return {
        "name": rule.name, "on": rule.on.value,
        "when": [{"key": m.key, "matcher": repr(m)} for m in rule.when],
        "reply": str(rule.reply) if rule.reply else None,
        "delay": str(rule.delay) if rule.delay else None, "close": rule.close,
        "fault": rule.fault.value if rule.fault else None, "set_state": rule.set_state,
        "times": rule.times, "line": rule.line,
        "bounce": ({"kind": rule.bounce.kind.value, "status": rule.bounce.status,
                    "diagnostic": rule.bounce.diagnostic, "after": rule.bounce.after}
                   if rule.bounce else None),  # issue 14
    }


def scenario_json(s: Any) -> dict[str, Any]:
    return {"name": s.name, "summary": s.summary, "tags": list(s.tags), "path": s.path,
            "rules": [rule_json(r) for r in s.rules]}


def json_depth(value: Any) -> int:
    """How deep objects and arrays nest in a decoded JSON value (a scalar: 0),
    walked without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            depth += 1
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:  # deeper is refused anyway: no need to walk on
                stack.extend((x, depth) for x in item)
    return deepest


async def body_json(request: web.Request) -> dict[str, Any]:
    """The request's JSON object: over MAX_BODY bytes 413, not JSON (UTF-8,
    RFC 8259) 400, nested deeper than MAX_DEPTH 422, not an object 400."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise _bad_request(f"the request body is over {MAX_BODY} bytes", 413) from None
    try:
        data = json.loads(body.decode("utf-8"))
    except RecursionError:  # the decoder's own guard, far past MAX_DEPTH
        raise _bad_request(f"the body nests deeper than {MAX_DEPTH} levels", 422) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(
            text=json.dumps({"status": 400, "title": "the body is not JSON"}),
            content_type="application/problem+json") from None
    if json_depth(data) > MAX_DEPTH:
        raise _bad_request(f"the body nests deeper than {MAX_DEPTH} levels", 422)
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"status": 400, "title": "the body must be a JSON object"}),
            content_type="application/problem+json")
    return data


# -------------------------------------------------------------------- routes

routes = web.RouteTableDef()


@routes.get("/livez")
async def livez(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready: listening, and the store writes (a store whose disk was full
    is asked again, with one small write, before the answer)."""
    listeners: list[ListenerContext] = request.app[CTX_KEY]
    stores = {id(c.store): c.store for c in listeners}.values()
    for store in stores:
        if isinstance(store.error, StoreFull):
            with contextlib.suppress(StoreError, TimeoutError):
                await asyncio.wait_for(store.probe(), 2.0)
    problems = [str(s.error) for s in stores if s.error is not None]
    for c in listeners:  # workers (--workers): each writes the store itself
        if c.remote_health is not None:
            problems += [p for p in await c.remote_health() if p not in problems]
    ready = bool(listeners) and not problems
    body: dict[str, Any] = {"status": "ready" if ready else "not ready",
                            "listeners": [c.name for c in listeners]}
    if problems:
        body["problems"] = problems
    return web.json_response(body, status=200 if ready else 503)


@routes.get("/api/v1/store")
async def store_info(request: web.Request) -> web.Response:
    """The store: its size on disk, what it holds, whether it can write,
    what retention keeps and has deleted."""
    listeners: list[ListenerContext] = request.app[CTX_KEY]
    path = request.app[STORE_KEY]

    def measure(r: Reader) -> dict[str, Any]:
        free = None if is_postgres(path) else shutil.disk_usage(Path(path).parent).free
        return {**r.usage(), "disk_free_bytes": free,  # (a database server's: not known)
                "counts": r.counts(("sessions", "messages"))}

    out: dict[str, Any] = {"path": display(path), **await read(request, measure)}
    if listeners:
        store = listeners[0].store
        keep = store.retention
        out.update({
            "writable": store.error is None,
            "error": None if store.error is None else str(store.error),
            "refused_messages": store.refused,
            "pruned_messages": store.pruned,
            "retention": {"keep": keep.keep, "keep_days": keep.keep_days,
                          "max_bytes": keep.max_bytes, "summary": keep.describe()},
        })
    return web.json_response(out)


@routes.get("/api/v1")
async def root(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__, "openapi": "/api/v1/openapi.json"})


@routes.get("/api/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    text = resources.files("harness.api").joinpath("openapi.json").read_text()
    return web.json_response(json.loads(text))


@routes.get("/api/v1/listeners")
async def listeners_list(request: web.Request) -> web.Response:
    out = []
    listeners: list[ListenerContext] = request.app[CTX_KEY]
    for i, c in enumerate(listeners):
        out.append({"index": i, "address": c.name, "scenario": scenario_json(c.scenario),
                    "state": await c.current_state(),
                    "active_connections": c.open_connections(),
                    "implicit_tls": c.implicit_tls})
    return web.json_response(out)


@routes.put("/api/v1/listeners/{index}/scenario")
async def activate(request: web.Request) -> web.Response:
    _, ctx = listener(request)
    data = await body_json(request)
    if isinstance(data.get("yaml"), str):
        # a scenario from a request cannot name files on the server
        scenario = load_text(data["yaml"], "<api>", default_name="api", allow_files=False)
    elif isinstance(data.get("name"), str):
        name = data["name"]
        if name not in library_names():
            return problem(404, f"no library scenario named {name!r}",
                           known=library_names())
        scenario = load(name)  # a library name only: no path from a request
    else:
        return problem(400, "give name (a library scenario) or yaml (a scenario text)")
    await asyncio.to_thread(ctx.use, scenario)  # may make a certificate: off the loop
    await ctx.settled()  # answered once every worker serves it
    return web.json_response(scenario_json(scenario))


@routes.post("/api/v1/listeners/{index}/rules")
async def add_rule(request: web.Request) -> web.Response:
    _, ctx = listener(request)
    data = await body_json(request)
    where = data.pop("position", "first")
    if where not in ("first", "last"):
        return problem(400, "position is first or last")
    rule = build_rule(data, index=len(ctx.scenario.rules), source="<api>")
    if any(r.name == rule.name for r in ctx.scenario.rules):
        return problem(409, f"a rule named {rule.name!r} exists")
    ctx.add_rule(rule, position=where)
    await ctx.settled()
    return web.json_response(rule_json(rule), status=201)


@routes.delete("/api/v1/listeners/{index}/rules/{name}")
async def remove_rule(request: web.Request) -> web.Response:
    _, ctx = listener(request)
    name = request.match_info["name"]
    if not any(r.name == name for r in ctx.scenario.rules):
        return problem(404, f"no rule named {name!r}")
    ctx.remove_rule(name)
    await ctx.settled()
    return web.json_response({"removed": name})


@routes.post("/api/v1/listeners/{index}/reset")
async def reset(request: web.Request) -> web.Response:
    index, ctx = listener(request)
    await asyncio.to_thread(ctx.reset)  # a shared state's reset is a database write
    await ctx.settled()
    return web.json_response({"reset": index, "state": await ctx.current_state()})


@routes.get("/api/v1/scenarios")
async def scenarios(request: web.Request) -> web.Response:
    def all_() -> list[dict[str, Any]]:
        return [scenario_json(load(n)) for n in library_names()]
    return web.json_response(await asyncio.to_thread(all_))


@routes.get("/api/v1/scenarios/{name}")
async def scenario_show(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in library_names():
        return problem(404, f"no library scenario named {name!r}")
    s = await asyncio.to_thread(load, name)
    text = await asyncio.to_thread((library_dir() / f"{name}.yaml").read_text)
    return web.json_response({**scenario_json(s), "yaml": text})


@routes.get("/api/v1/sessions")
async def sessions(request: web.Request) -> web.Response:
    limit = int_param(request, "limit", 100)
    found = await read(request, lambda r: r.sessions(limit=limit))
    return web.json_response([{k: v for k, v in s.as_dict().items() if k != "events"}
                              for s in found])


@routes.get("/api/v1/sessions/{id}")
async def session_show(request: web.Request) -> web.Response:
    sid = int_param(request, "id")
    assert sid is not None
    s = await read(request, lambda r: r.session(sid))
    if s is None:
        return problem(404, f"no session {sid}")
    return web.json_response(s.as_dict())


def _parts(raw: bytes) -> dict[str, Any]:
    """The message view's headers, parts, text and HTML (harness.render:
    never an error, whatever the bytes; what could not be shown is said in
    problems)."""
    v = view(raw)
    return {"headers": [[k, x] for k, x in v.headers],
            "parts": [p.as_dict() for p in v.parts], "text": v.text,
            "has_html": v.html is not None, "html": v.html, "problems": v.problems}


@routes.get("/api/v1/messages")
async def messages(request: web.Request) -> web.Response:
    limit = int_param(request, "limit", 100)
    rcpt = request.query.get("rcpt")
    found = await read(request, lambda r: r.messages(limit=limit, rcpt=rcpt))
    return web.json_response([m.as_dict() for m in found])


async def _message(request: web.Request, *, analysed: bool = False) -> MessageRecord:
    """The message the path names, or a 404 problem."""
    mid = int_param(request, "id")
    assert mid is not None
    m: MessageRecord | None = await read(request, lambda r: r.message(mid), analysed=analysed,
                                         message=mid)
    if m is None:
        raise web.HTTPNotFound(text=json.dumps({"status": 404, "title": f"no message {mid}"}),
                               content_type="application/problem+json")
    return m


@routes.get("/api/v1/messages/{id}")
async def message_show(request: web.Request) -> web.Response:
    m = await _message(request, analysed=True)
    parsed = await asyncio.to_thread(_parts, m.raw or b"")
    parsed.pop("html")
    # the analysis stored with the message (done once, in the background)
    stored = m.analysis or {}
    analysis = {**stored, "explained": _explain_recipients(stored.get("ndr")),
                "pending": m.analysis is None}  # not "analysed, nothing found"
    relays = await read(request, lambda r: r.relays(m.id))
    return web.json_response({**m.as_dict(), **parsed, "analysis": analysis,
                              "relays": [asdict(x) for x in relays]})


@routes.get("/api/v1/messages/{id}/raw")
async def message_raw(request: web.Request) -> web.Response:
    m = await _message(request)
    # text/plain: a browser shows the source and never renders it
    return web.Response(body=m.raw or b"", content_type="text/plain", charset="utf-8",
                        headers={"Content-Security-Policy": MAIL_CSP})


@routes.get("/api/v1/messages/{id}/html")
async def message_html(request: web.Request) -> web.Response:
    """The message's HTML part, for a sandboxed frame: the CSP sandbox gives
    it a unique origin with no script, no forms, no network, no navigation."""
    m = await _message(request)
    mid = m.id
    parsed = await asyncio.to_thread(_parts, m.raw or b"")
    if parsed["html"] is None:
        return problem(404, f"message {mid} has no HTML part")
    return web.Response(text=parsed["html"], content_type="text/html",
                        headers={"Content-Security-Policy": MAIL_CSP,
                                 "X-Frame-Options": "SAMEORIGIN"})


@routes.get("/api/v1/attempts")
async def attempts(request: web.Request) -> web.Response:
    rcpt = request.query.get("rcpt")
    sender = request.query.get("mail_from")
    found = await read(request, lambda r: r.attempts(rcpt=rcpt, mail_from=sender))
    return web.json_response([asdict(a) for a in found])


@routes.get("/api/v1/timelines")
async def timelines(request: web.Request) -> web.Response:
    """Attempts grouped per sender/recipient pair: the retry timeline."""
    found = await read(request, lambda r: r.attempts())
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for a in found:
        pairs.setdefault((a.mail_from, a.rcpt), []).append(asdict(a))
    return web.json_response([{"mail_from": k[0], "rcpt": k[1], "attempts": v}
                              for k, v in pairs.items()])


@routes.get("/api/v1/ndrs")
async def ndrs(request: web.Request) -> web.Response:
    """The captured bounces and delay notices (flagged by the analysis that
    runs on every stored message), newest last, with their explanation."""
    limit = int_param(request, "limit", 100)
    found, pending = await read(
        request, lambda r: (r.messages(limit=limit, ndr=True), len(r.analysis_pending())),
        analysed=True)
    out = []
    for m in found:
        ndr = (m.analysis or {}).get("ndr")
        out.append({"message": {k: v for k, v in m.as_dict().items() if k != "analysis"},
                    "ndr": ndr, "explained": _explain_recipients(ndr)})
    # messages not analysed yet may be NDRs too: how many, so a reader knows
    return web.json_response(out, headers={"X-Analysis-Pending": str(pending)})


@routes.post("/api/v1/evidence")
async def evidence(request: web.Request) -> web.Response:
    """The sending side's logs, their text as JSON, lined up with the store
    (what `harness evidence --json` prints). Parsing and lining up run in a
    thread: the loop never waits on them."""
    from harness.evidence import MAX_FILES, MAX_NAME, evidence_from_texts, parse_tz

    try:
        data = await body_json(request)
    except web.HTTPRequestEntityTooLarge:
        return problem(413, "the request is larger than the API takes (1 MiB)",
                       detail="send fewer or smaller files (a lab run's window is enough)")
    files = data.get("files")
    if not isinstance(files, list) or not files:
        return problem(400, "give files: [{\"name\": \"maillog\", \"text\": \"...\"}, ...]")
    if len(files) > MAX_FILES:
        return problem(413, f"at most {MAX_FILES} files per request")
    texts: list[tuple[str, str]] = []
    for i, f in enumerate(files):
        if not (isinstance(f, dict) and isinstance(f.get("name"), str)
                and isinstance(f.get("text"), str) and 0 < len(f["name"]) <= MAX_NAME):
            return problem(400, f"files[{i}] needs a name (1 to {MAX_NAME} characters) and a "
                           "text")
        texts.append((f["name"], f["text"]))
    tz = data.get("tz")
    retry = data.get("retry_interval")
    window = data.get("window")
    if tz is not None and not isinstance(tz, str):
        return problem(400, "tz is a string: UTC, +01:00 or a zone name")
    if retry is not None and (isinstance(retry, bool) or not isinstance(retry, int | float)
                              or not 0 <= retry <= 86400 * 365):
        return problem(400, "retry_interval is a number of seconds")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int | float)
                               or not 0 < window <= 86400 * 30):
        return problem(400, "window is a number of seconds, above 0")
    zone = parse_tz(tz or "UTC")
    result = await read(request, lambda r: evidence_from_texts(
        r, texts, tz=zone, retry_interval=float(retry) if retry is not None else None,
        window=float(window) if window is not None else None))
    return web.json_response(result)


def _explain_recipients(ndr: dict[str, Any] | None) -> list[dict[str, Any]]:
    from harness.analysis.codes import explain_reply, lookup

    out = []
    for r in (ndr or {}).get("recipients", []):
        info = lookup(r["status"]) if r.get("status") else None
        reply = explain_reply(r["diagnostic_text"]) if r.get("diagnostic_text") else None
        out.append({"recipient": r.get("final_recipient"),
                    "status": asdict(info) if info else None,
                    "reply": asdict(reply) if reply else None})
    return out


@routes.get("/api/v1/events")
async def events(request: web.Request) -> web.StreamResponse:
    hub: EventHub = request.app[HUB_KEY]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store"})
    # Subscribe before the response opens: a page that loads the history
    # once the stream is open misses nothing in between.
    q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    hub.subscribe(q)
    try:
        await response.prepare(request)
        await response.write(b": connected\n\n")
        while True:
            try:
                event = await asyncio.wait_for(q.get(), 15)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if event is None:
                break
            await response.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                                 .encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.unsubscribe(q)
    return response


# ----------------------------------------------------------------- the page


def _static(name: str, content_type: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        data = resources.files("harness.api").joinpath("static", name).read_bytes()
        return web.Response(body=data, content_type=content_type,
                            headers={"Content-Security-Policy": PAGE_CSP,
                                     "X-Frame-Options": "DENY"})
    return handler


def make_app(listeners: list[ListenerContext], store_path: Path | str, token: str = ""
             ) -> web.Application:
    app = web.Application(middlewares=[security], client_max_size=MAX_BODY)
    app[CTX_KEY] = listeners
    app[STORE_KEY] = store_path
    app[TOKEN_KEY] = token
    hub = EventHub()
    for i, c in enumerate(listeners):
        hub.attach(c, i)
    app[HUB_KEY] = hub
    app.add_routes(routes)
    from harness.api.probe_routes import routes as probe_routes  # issue 14

    app.add_routes(probe_routes)
    app.router.add_get("/", _static("index.html", "text/html"))
    app.router.add_get("/app.js", _static("app.js", "text/javascript"))
    app.router.add_get("/app.css", _static("app.css", "text/css"))

    async def on_shutdown(app: web.Application) -> None:
        hub.close()

    app.on_shutdown.append(on_shutdown)
    return app


class ApiServer:
    """The API and page on HOST:PORT in the running loop."""

    def __init__(self, listeners: list[ListenerContext], store_path: Path | str, host: str,
                 port: int, token: str | None = None) -> None:
        if token is None and not is_loopback(host):
            token = secrets.token_urlsafe(24)
        self.token = token or ""
        self.app = make_app(listeners, store_path, self.token)
        self.host, self.port = host, port
        self.runner: web.AppRunner | None = None
        self.hub: EventHub = self.app[HUB_KEY]

    async def start(self) -> tuple[str, int]:
        self.runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            raise HarnessError(f"cannot listen for HTTP on {self.host}:{self.port}: "
                               f"{e.strerror}") from e
        # the bound address (the port, when 0 was asked for)
        self.host, self.port = self.runner.addresses[0][:2]
        return self.host, self.port

    async def stop(self) -> None:
        if self.runner is not None:
            with contextlib.suppress(Exception):
                await self.runner.cleanup()
            self.runner = None
