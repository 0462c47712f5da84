"""``harness explain CODE|REPLY|FILE.eml``: what a status code, a reply line or
an NDR means, and what an Exchange administrator should check.

The CLI calls :func:`explain_command`. TARGET is read as

* a status code: ``5.7.1``, ``4.7.500``, ``4.7.500-699``, ``550``;
* otherwise an existing file: an NDR (a DSN, RFC 3464, or what
  ``harness.analysis.dsn.parse_ndr`` understands), e.g. a bounce saved as .eml;
* otherwise, when it looks like a path (a file suffix, or a slash and no
  spaces), a missing file: one-line error, exit status 1;
* otherwise a reply line: ``"550 5.7.1 Unable to relay"``, ``"#550 5.1.1
  RESOLVER.ADR.RecipNotFound; not found ##"``, a queue's LastError.

Exit status: 0 when something was explained (an unknown code is explained by
its class and says so), 1 for a missing or unreadable file, a file that is not
an NDR, or text with no status code in it.

JSON (``--json``), one object, schema ``harness.explain/1``; fields are only
ever added, never renamed or removed, within a schema version::

    {"schema": "harness.explain/1",
     "kind": "code" | "reply" | "ndr" | "error",
     "input": "<TARGET as given>",
     "code": CODE,          # kind "code"
     "reply": REPLY,        # kind "reply"
     "ndr": NDR,            # kind "ndr"
     "error": "<one line>",                                 # kind "error"
     "reason": "not_found" | "unreadable" | "not_ndr" | "no_code",
     "classified_as": "autoreply" | "complaint" | "read-receipt" | "automatic"}
                            # reason "not_ndr", when the file is one of those
                            # automatic messages (what a script tells from a
                            # file that is no report at all)

    CODE  = {"code": "4.7.500",          # as asked (normalised)
             "entry": "4.7.500-699",     # the catalogue entry that answered
             "match": "exact" | "range" | "subject" | "class",
             "known": bool,              # false: only the class(.subject) is known
             "kind": "enhanced" | "basic",
             "class": 2|3|4|5, "class_name": str,
             "subject": int|null, "subject_name": str|null,
             "title": str, "meaning": str,
             "outcome": "success" | "intermediate" | "transient" | "permanent",
             "transient": bool|null,
             "causes": [str], "checks": [str], "exchange": str|null,
             "vendor": str|null,         # null: IANA / RFC; "Microsoft": vendor value
             "typical_replies": [str],
             "source": [str]}            # URLs the meaning comes from, main one first

    REPLY = {"text": str, "basic_code": "550"|null, "enhanced_code": "5.7.1"|null,
             "message": str,             # the human text after the codes
             "outcome": ...|null, "transient": bool|null,   # what a sender acts on
             "enhanced": CODE|null, "basic": CODE|null,
             "component": {"name", "known", "meaning", "checks"}|null,
             "socket_error": {"code", "name", "meaning"}|null,
             "quoted": REPLY|null,       # a remote reply quoted inside this one
             "notes": [str], "checks": [str]}

    NDR   = {"path": str, "kind": "failure" | "delay" | "delivered" | "relayed"
             | "expanded", "format": str|null,   # "rfc3464", "exchange2007", ...
             "is_delay": bool,
             "reporting_mta": str|null,
             "original": {"message_id": str|null, "subject": str|null},
             "recipients": [RECIPIENT]}

    RECIPIENT = {"recipient": str|null, "action": str|null, "status": str|null,
                 "status_info": CODE|null, "outcome": "permanent" | "transient"
                 | "success" | null, "verdict": str, "remote_mta": str|null,
                 "diagnostic_type": str|null, "diagnostic_text": str|null,
                 "reply_code": int|null,   # the basic code in the diagnostic
                 "last_attempt_date": str|null, "will_retry_until": str|null,
                 "reply": REPLY|null,      # the diagnostic, explained
                 "notes": [str], "checks": [str]}
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from harness.analysis.codes import CodeInfo, Explanation, explain_reply, lookup

if TYPE_CHECKING:
    from harness.analysis.dsn import Ndr, RecipientResult

__all__ = ["SCHEMA", "RecipientReport", "explain_command", "recipient_report"]

SCHEMA = "harness.explain/1"

_CODE_RE = re.compile(r"^\s*#?(?:[245]\.\d{1,3}\.\d{1,3}(?:-\d{1,3})?|[2-5]\d\d)\s*$")
_FILE_SUFFIXES = {".eml", ".msg", ".txt", ".dsn", ".mbox", ".mime", ".ndr"}

_CLASS_STYLE = {2: "green", 3: "cyan", 4: "yellow", 5: "red"}
_OUTCOME_STYLE = {"success": "green", "intermediate": "cyan", "transient": "yellow",
                  "permanent": "red"}
_OUTCOME_TEXT = {
    "success": "success - accepted, nothing to fix at this step",
    "intermediate": "intermediate - accepted so far, the server waits for more",
    "transient": "temporary - a sending server keeps the message queued and retries",
    "permanent": "permanent - a sending server stops and returns an NDR to the sender",
}


# ------------------------------------------------------ the NDR parser


def _load_parser() -> Callable[[bytes], Ndr | None]:
    """harness.analysis.dsn.parse_ndr, imported on first use so that
    explaining a code never depends on the NDR parser."""
    from harness.analysis.dsn import parse_ndr

    return parse_ndr


def _str(value: object) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


# --------------------------------------------------- per-recipient analysis


@dataclass(frozen=True)
class RecipientReport:
    """One recipient of an NDR, explained."""

    recipient: str | None
    action: str | None
    status: str | None
    status_info: CodeInfo | None
    reply: Explanation | None
    remote_mta: str | None
    diagnostic_type: str | None
    diagnostic_text: str | None
    reply_code: int | None
    last_attempt_date: str | None
    will_retry_until: str | None
    outcome: str | None
    verdict: str
    notes: tuple[str, ...]
    checks: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "recipient": self.recipient, "action": self.action, "status": self.status,
            "status_info": (self.status_info.as_dict(self.status)
                            if self.status_info is not None else None),
            "outcome": self.outcome, "verdict": self.verdict, "remote_mta": self.remote_mta,
            "diagnostic_type": self.diagnostic_type, "diagnostic_text": self.diagnostic_text,
            "reply_code": self.reply_code, "last_attempt_date": self.last_attempt_date,
            "will_retry_until": self.will_retry_until,
            "reply": self.reply.as_dict() if self.reply is not None else None,
            "notes": list(self.notes), "checks": list(self.checks),
        }


def _status_code(status: str | None) -> str | None:
    if status is None:
        return None
    m = re.search(r"(?<![\d.])[245]\.\d{1,3}\.\d{1,3}(?![\d])", status)
    return m.group(0) if m else None


def recipient_report(r: RecipientResult, *, is_delay: bool = False) -> RecipientReport:
    """Explain one NDR recipient: its status, the remote reply, a verdict and checks."""
    recipient = _str(r.final_recipient)
    action = _str(r.action)
    status = _str(r.status)
    diag_text = _str(r.diagnostic_text)
    diag_type = _str(r.diagnostic_type)
    reply_code = r.reply_code
    code = _status_code(status)
    info = lookup(code) if code is not None else None

    reply: Explanation | None = None
    if diag_text is not None:
        reply = explain_reply(diag_text)
        if not reply.found and reply_code is not None:
            reply = explain_reply(f"{reply_code} {diag_text}")
    elif reply_code is not None:
        reply = explain_reply(str(reply_code))

    notes: list[str] = []
    reported = _str(r.reported_status)
    if reported and reported != status:
        notes.append(f"The report's Status field says {reported}; the diagnostic carries the "
                     f"more specific {status}, which is explained here.")
    if status is not None and info is None:
        notes.append(f"The Status field {status!r} is not a status code.")
    elif info is not None and not info.known:
        notes.append(f"{code} is not in the catalogue; explained by what {info.code} means.")
    if reply is not None and reply.enhanced_code and code and reply.enhanced_code != code:
        notes.append(f"The Status field says {code} but the remote reply carries "
                     f"{reply.enhanced_code}; both are explained.")

    act = (action or "").lower()
    status_class = info.status_class if info is not None else None
    outcome: str | None
    if act == "failed":
        outcome = "permanent"
        if status_class == 4:
            verdict = ("Failed after retrying: every attempt met a temporary error until the "
                       "message expired in the sender's queue. The last temporary error is the "
                       "cause; the message will not be retried.")
        else:
            verdict = ("Failed for good: the sending server gave up on this recipient and "
                       "will not retry.")
    elif act == "delayed" or (is_delay and not act):
        outcome = "transient"
        verdict = ("Not delivered yet: the sending server keeps retrying and this is only a "
                   "warning. A final NDR follows if it never succeeds (Exchange gives up after "
                   "MessageExpirationTimeout, 2 days by default).")
    elif act in ("delivered", "relayed", "expanded"):
        outcome = "success"
        verdict = {"delivered": "Delivered.",
                   "relayed": "Relayed to a system that sends no further delivery reports.",
                   "expanded": "Delivered to a list, which was expanded to its members."}[act]
    elif info is not None:
        outcome = info.outcome if info.outcome != "intermediate" else None
        verdict = f"No Action field; by its status this is {_OUTCOME_TEXT[info.outcome]}."
    else:
        outcome = None
        verdict = "Neither the action nor the status says what happened."

    parts: list[Iterable[str]] = []
    if reply is not None and reply.found:
        parts.append(reply.checks)
    if info is not None:
        parts.append(info.checks)
    checks = tuple(dict.fromkeys(c for part in parts for c in part))
    return RecipientReport(
        recipient=recipient, action=action, status=status, status_info=info,
        reply=reply,
        remote_mta=_str(r.remote_mta), diagnostic_type=diag_type, diagnostic_text=diag_text,
        reply_code=reply_code, last_attempt_date=_str(r.last_attempt_date),
        will_retry_until=_str(r.will_retry_until), outcome=outcome, verdict=verdict,
        notes=tuple(notes), checks=checks)


# ------------------------------------------------------------- the command


class _Failure(Exception):
    def __init__(self, reason: str, message: str, classified_as: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.classified_as = classified_as


def explain_command(target: str, *, as_json: bool, console: Console,
                    err_console: Console | None = None) -> int:
    """Explain TARGET (a code, a reply line, or an NDR file) on `console`.

    Errors are one line on `err_console` (default: `console`), or with
    `as_json` an object of kind "error" on `console`. Returns the exit status.
    """
    try:
        kind, payload, render = _explain_target(target)
    except _Failure as f:
        if as_json:
            error = {"schema": SCHEMA, "kind": "error", "input": target,
                     "error": f.message, "reason": f.reason}
            if f.classified_as is not None:
                error["classified_as"] = f.classified_as
            _print_json(console, error)
        else:
            (err_console or console).print(Text(f"harness: error: {f.message}"), soft_wrap=True)
        return 1
    if as_json:
        _print_json(console, {"schema": SCHEMA, "kind": kind, "input": target, kind: payload})
    else:
        # wrapped to the console's width even on a soft-wrapping console (the
        # CLI's): the layout is a grid, and soft wrapping would crop it
        console.print(render, soft_wrap=False)
    return 0


def _print_json(console: Console, data: dict[str, Any]) -> None:
    console.out(json.dumps(data, indent=2, ensure_ascii=False), highlight=False)


def _looks_like_path(target: str) -> bool:
    t = target.strip()
    if Path(t).suffix.lower() in _FILE_SUFFIXES:
        return True
    return ("/" in t or "\\" in t) and not any(c.isspace() for c in t)


def _explain_target(target: str) -> tuple[str, Any, RenderableType]:
    if _CODE_RE.match(target):
        asked = target.strip().lstrip("#")
        info = lookup(asked)
        if info is None:  # cannot happen for what _CODE_RE admits; kept for safety
            raise _Failure("no_code", f"{asked!r} is not a status code")
        return "code", info.as_dict(_canonical(asked, info)), _render_code(asked, info)
    path = Path(target)
    if path.is_dir():
        raise _Failure("unreadable", f"{target}: is a directory, not an NDR file")
    if path.is_file():
        return _explain_file(path)
    expl = explain_reply(target)
    spaced = any(c.isspace() for c in target.strip())
    if not (spaced and expl.found) and _looks_like_path(target):
        raise _Failure("not_found", f"{target}: no such file")
    if not expl.found:
        raise _Failure("no_code", f"{target!r} is not a status code, an SMTP reply or an NDR "
                                  "file (no status code found)")
    return "reply", expl.as_dict(), _render_reply(expl)


def _canonical(asked: str, info: CodeInfo) -> str:
    if info.match == "exact":
        return info.code
    parts = asked.strip().split(".")
    if len(parts) == 3:
        return ".".join(str(int(p)) if p.isdigit() else p for p in parts)
    return asked.strip()


def _explain_file(path: Path) -> tuple[str, Any, RenderableType]:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _Failure("unreadable", f"{path}: {e.strerror or e}") from None
    ndr = _load_parser()(raw)
    if ndr is None:
        hint = (" (an Outlook .msg file is not MIME; save the NDR as .eml)"
                if path.suffix.lower() == ".msg" else "")
        kind, what = _what_it_is(raw)
        raise _Failure("not_ndr", f"{path}: not an NDR - no delivery status report found "
                                  f"in it{hint}{what}", kind)
    is_delay = bool(ndr.is_delay)
    reports = [recipient_report(r, is_delay=is_delay) for r in ndr.recipients]
    original = {"message_id": _str(ndr.original.message_id),
                "subject": _str(ndr.original.subject)}
    payload = {"path": str(path), "kind": ndr.kind, "format": _str(ndr.format),
               "is_delay": is_delay,
               "reporting_mta": _str(ndr.reporting_mta), "original": original,
               "recipients": [r.as_dict() for r in reports]}
    return "ndr", payload, _render_ndr(path, ndr, original, reports)


_IT_IS = {"autoreply": "an automatic reply", "complaint": "an abuse complaint (ARF)",
          "read-receipt": "a read receipt (MDN)", "automatic": "an automatic message"}


def _what_it_is(raw: bytes) -> tuple[str | None, str]:
    """For the automatic messages that are not NDRs (issue 14: classify), their
    kind and '; it is an automatic reply (Auto-Submitted: auto-replied (RFC
    3834))'; else (None, '')."""
    from harness.analysis.classify import classify

    c = classify(raw)
    if c.kind not in _IT_IS:
        return None, ""
    return c.kind, f"; it is {_IT_IS[c.kind]} ({c.reason})"


# --------------------------------------------------------------- rendering


def _grid(rows: Iterable[tuple[str, RenderableType]]) -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, v)
    return t


def _bullets(items: Iterable[str], mark: str = "•", style: str = "") -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(no_wrap=True, style=style)
    t.add_column(overflow="fold")
    for item in items:
        t.add_row(mark, Text(item))
    return t


def _section(title: str, body: RenderableType, indent: int = 2) -> Group:
    return Group(Text(title, style="bold underline"), Padding(body, (0, 0, 0, indent)))


def _code_line(code: str, info: CodeInfo) -> Text:
    style = _CLASS_STYLE.get(info.status_class, "")
    line = Text(code, style=f"bold {style}")
    line.append(" · ")
    line.append(info.title if info.known else f"not in the catalogue ({info.title})")
    return line


def _outcome(outcome: str | None) -> Text:
    if outcome is None:
        return Text("unknown")
    return Text(_OUTCOME_TEXT.get(outcome, outcome), style=_OUTCOME_STYLE.get(outcome, ""))


def _render_code(asked: str, info: CodeInfo) -> RenderableType:
    code = _canonical(asked, info)
    style = _CLASS_STYLE.get(info.status_class, "")
    head = Text(code, style=f"bold {style}")
    head.append("  ")
    head.append(info.title if info.known else "not in the catalogue",
                style="bold" if info.known else f"bold {style}")
    parts: list[RenderableType] = [head]
    if not info.known:
        scope = "class and subject" if info.match == "subject" else "class"
        parts.append(Text(f"{code} is not a catalogued code; what follows is the meaning of its "
                          f"{scope} ({info.code}, {info.title.lower()}).", style=style))
    rows: list[tuple[str, RenderableType]] = [
        ("class", Text(f"{info.status_class} · {info.class_name}", style=style))]
    if info.subject is not None and info.subject_name:
        rows.append(("subject", Text(f"{info.subject} · {info.subject_name}")))
    if info.match == "range":
        rows.append(("range", Text(f"{code} is in the range {info.code}")))
    rows.append(("outcome", _outcome(info.outcome)))
    rows.append(("meaning", Text(info.meaning)))
    if info.kind == "enhanced" and info.known:
        rows.append(("registry", Text(
            f"{info.vendor} value, not in the IANA registry" if info.vendor
            else "IANA enhanced status code (RFC 3463, RFC 5248)")))
    if info.source:
        rows.append(("source", _sources(info.source)))
    parts.append(Padding(_grid(rows), (0, 0, 0, 2)))
    parts.extend(_details(info.causes, info.checks, [info.exchange], info.typical_replies))
    return Group(*parts)


def _sources(urls: Sequence[str]) -> Text:
    """The pages the meaning comes from, one a line, the main one first."""
    text = Text()
    for n, url in enumerate(urls):
        if n:
            text.append("\n")
        text.append(url, style="link " + url if n == 0 else "dim")
    return text


def _details(causes: Sequence[str], checks: Sequence[str], exchange: Sequence[str],
             replies: Sequence[str]) -> list[RenderableType]:
    out: list[RenderableType] = []
    if causes:
        out.append(_section("Typical causes", _bullets(causes)))
    if checks:
        out.append(_section("What to check", _bullets(checks, "→", "bold")))
    notes = [e for e in exchange if e]
    if notes:
        out.append(_section("Exchange", Group(*(Text(n) for n in notes))))
    if replies:
        out.append(_section("Seen in real replies", Group(*(Text(r, style="dim")
                                                            for r in replies))))
    return out


def _reply_rows(expl: Explanation) -> list[tuple[str, RenderableType]]:
    rows: list[tuple[str, RenderableType]] = []
    if expl.enhanced is not None and expl.enhanced_code is not None:
        rows.append(("enhanced code", _code_line(expl.enhanced_code, expl.enhanced)))
    if expl.basic is not None and expl.basic_code is not None:
        rows.append(("basic code", _code_line(expl.basic_code, expl.basic)))
    if expl.component is not None:
        comp = Text(expl.component.name, style="bold")
        comp.append(" · " + expl.component.meaning)
        rows.append(("component", comp))
    if expl.socket_error is not None:
        s = expl.socket_error
        rows.append(("socket error", Text(f"{s.code} {s.name} · {s.meaning}")))
    rows.append(("outcome", _outcome(expl.outcome)))
    primary = expl.primary
    if primary is not None:
        rows.append(("meaning", Text(primary.meaning)))
        if primary.source:
            rows.append(("source", _sources(primary.source)))
    return rows


def _reply_text(expl: Explanation) -> Text:
    style = _CLASS_STYLE.get(expl.status_class or 0, "")
    return Text(" ".join(expl.text.split()), style=f"bold {style}")


def _render_reply(expl: Explanation, *, quoted: bool = False) -> RenderableType:
    head = Text("Quoted reply  " if quoted else "Reply  ", style="bold")
    head.append_text(_reply_text(expl))
    parts: list[RenderableType] = [head, Padding(_grid(_reply_rows(expl)), (0, 0, 0, 2))]
    if expl.notes:
        parts.append(Padding(_bullets(expl.notes, "!", "bold yellow"), (0, 0, 0, 2)))
    if expl.quoted is not None:
        parts.append(Padding(_render_reply(expl.quoted, quoted=True), (0, 0, 0, 4)))
    if not quoted:
        infos = [i for i in (expl.enhanced, expl.basic) if i is not None]
        if expl.enhanced is not None and expl.enhanced.known:
            infos = [expl.enhanced]  # the basic code's notes only when nothing finer is known
        primary = expl.primary
        causes = primary.causes if primary is not None else ()
        parts.extend(_details(causes, expl.checks, [i.exchange for i in infos], ()))
    return Group(*parts)


def _render_ndr(path: Path, ndr: Ndr, original: dict[str, str | None],
                reports: Sequence[RecipientReport]) -> RenderableType:
    delay = bool(ndr.is_delay)
    title = {"failure": "Non-delivery report", "delay": "Delay notification",
             "delivered": "Delivery report", "relayed": "Relay report",
             "expanded": "Expansion report"}.get(ndr.kind, "Delivery status report")
    head = Text("Delay notification" if delay else title,
                style="bold yellow" if delay else "bold")
    head.append("  " + str(path), style="dim")
    rows: list[tuple[str, RenderableType]] = []
    if delay:
        rows.append(("kind", Text("a warning: the message is still queued and being retried",
                                  style="yellow")))
    fmt = _str(ndr.format)
    if fmt:
        rows.append(("format", Text(fmt)))
    mta = _str(ndr.reporting_mta)
    if mta:
        rows.append(("reported by", Text(mta)))
    if original["message_id"] or original["subject"]:
        orig = Text(original["message_id"] or "")
        if original["subject"]:
            orig.append((" · " if original["message_id"] else "") + repr(original["subject"]))
        rows.append(("original", orig))
    rows.append(("recipients", Text(str(len(reports)))))
    parts: list[RenderableType] = [head, Padding(_grid(rows), (0, 0, 0, 2))]
    if not reports:
        parts.append(Text("The report lists no recipients.", style="yellow"))
    for n, rep in enumerate(reports, 1):
        parts.append(Text(""))
        parts.append(_render_recipient(rep, n, len(reports)))
    return Group(*parts)


def _render_recipient(rep: RecipientReport, n: int, total: int) -> RenderableType:
    style = _OUTCOME_STYLE.get(rep.outcome or "", "")
    head = Text(f"Recipient {n} of {total}  ", style="bold")
    head.append(rep.recipient or "(no Final-Recipient)", style=f"bold {style}")
    rows: list[tuple[str, RenderableType]] = [("action", Text(rep.action or "-", style=style))]
    if rep.status is not None:
        rows.append(("status", _code_line(rep.status, rep.status_info) if rep.status_info
                     else Text(rep.status)))
        if rep.status_info is not None:
            rows.append(("meaning", Text(rep.status_info.meaning)))
    if rep.remote_mta:
        rows.append(("remote server", Text(rep.remote_mta)))
    if rep.diagnostic_text:
        said = Text(" ".join(rep.diagnostic_text.split()),
                    style=_CLASS_STYLE.get(rep.reply.status_class or 0, "")
                    if rep.reply is not None else "")
        rows.append(("remote reply", said))
    elif rep.reply_code is not None:
        rows.append(("reply code", Text(str(rep.reply_code))))
    if rep.reply is not None and rep.reply.found:
        r = rep.reply
        if r.enhanced is not None and r.enhanced_code and r.enhanced_code != (
                _status_code(rep.status)):
            rows.append(("reply's code", _code_line(r.enhanced_code, r.enhanced)))
        if r.component is not None:
            comp = Text(r.component.name, style="bold")
            comp.append(" · " + r.component.meaning)
            rows.append(("component", comp))
        if r.socket_error is not None:
            s = r.socket_error
            rows.append(("socket error", Text(f"{s.code} {s.name} · {s.meaning}")))
    transient = rep.status_info.transient if rep.status_info is not None else None
    kind = {True: "transient", False: "permanent", None: "-"}[transient]
    rows.append(("status class", Text(kind, style=_OUTCOME_STYLE.get(kind, ""))))
    if rep.last_attempt_date:
        rows.append(("last attempt", Text(rep.last_attempt_date)))
    if rep.will_retry_until:
        rows.append(("retrying until", Text(rep.will_retry_until)))
    rows.append(("verdict", Text(rep.verdict, style=style)))
    parts: list[RenderableType] = [head, Padding(_grid(rows), (0, 0, 0, 2))]
    notes = list(rep.notes) + (list(rep.reply.notes) if rep.reply is not None and
                               rep.reply.found else [])
    if notes:
        parts.append(Padding(_bullets(dict.fromkeys(notes), "!", "bold yellow"), (0, 0, 0, 2)))
    if rep.reply is not None and rep.reply.quoted is not None:
        parts.append(Padding(_render_reply(rep.reply.quoted, quoted=True), (0, 0, 0, 4)))
    if rep.checks:
        parts.append(Padding(_section("What to check", _bullets(rep.checks, "→", "bold")),
                             (0, 0, 0, 2)))
    return Group(*parts)
