"""Lining up: the sender's records beside what the harness recorded.

`line_up(files, captures)` takes the files the readers produced and the
store's records (`capture.Capture`, handed in) and returns one timeline per
message: each step says what the sender logged and what the harness did at
that moment, and the places where the two disagree are flagged:

- reply-never-sent: the sender logged a reply the harness never gave
  (an edited log, another server answering, a proxy in between);
- attempt-not-logged: the harness saw an attempt (for a recipient and a
  time the sender's log covers) that the sender did not log;
- no-session: the sender logged a connection that reached a server, and
  the harness has no session for it;
- early-retry: a retry came sooner than the configured retry interval;
- dsn-not-captured: the sender generated a DSN that never reached the
  harness (or the store that was given);
- transcript-differs: a protocol log's commands and replies do not follow
  the harness's transcript of the same session.

Clock skew: the two machines' clocks differ; for each file the offset
(sender's clock minus the harness's) is searched first among steps that
agree on the reply, then used to pair the rest. With a log that shows whole
seconds the offset is a range: a step logged at :43 happened in [:43, :44).
The figure includes the time the reply took to reach the sender (a few
milliseconds on loopback).

How steps are paired, from strongest to weakest: the connection's ports
(Exim's I=, a protocol log's local endpoint, against the harness's peer
port); the recipient, the reply and the time (after the skew), the nearest
first. Everything here is a pure function of its arguments.

May know: the records handed in. May not know: files, sockets, storage."""

from __future__ import annotations

import bisect
import difflib
import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from statistics import median

from harness.analysis.evidence.base import Endpoint, EvidenceFile, Problem, Reply
from harness.analysis.evidence.capture import (
    Capture,
    CapturedAttempt,
    CapturedEvent,
    CapturedMessage,
    CapturedSession,
)
from harness.analysis.evidence.exchange_online import TraceDetailRow, TraceRow
from harness.analysis.evidence.exchange_protocol import ProtocolSession, sessions
from harness.analysis.evidence.exchange_queue import QueuedMessage, QueueRow
from harness.analysis.evidence.exchange_tracking import TrackingEvent
from harness.analysis.evidence.exim import EximRecord
from harness.analysis.evidence.postfix import PostfixRecord

__all__ = ["KINDS", "Disagreement", "FileSummary", "HarnessSide", "Lineup", "LineupOptions",
           "MessageTimeline", "SenderSide", "Skew", "Step", "line_up"]

#: The kinds of disagreement, and what each means.
KINDS: dict[str, str] = {
    "reply-never-sent": "the sender logged a reply the harness never sent",
    "attempt-not-logged": "the harness saw an attempt the sender did not log",
    "no-session": "the sender logged a connection the harness has no session for",
    "early-retry": "a retry came sooner than the configured retry interval",
    "dsn-not-captured": "the sender generated a DSN the harness never captured",
    "transcript-differs": "the sender's protocol log does not follow the harness's transcript",
}
#: Files that log every delivery attempt: an attempt they do not show is flagged.
_COMPLETE = {"postfix", "exim", "exchange-send-protocol", "exchange2003-smtp"}


@dataclass(frozen=True, kw_only=True)
class LineupOptions:
    #: The largest clock skew searched for, in seconds.
    window: float = 900.0
    #: Seconds allowed between two sides of a step once the skew is applied
    #: (plus the log's time resolution).
    tolerance: float = 2.0
    #: The sender's configured shortest retry interval (seconds), when known.
    retry_interval: float | None = None
    #: How much sooner than `retry_interval` a retry may come (a scheduler
    #: that counts whole seconds: Postfix takes a message back when its
    #: retry time is at most one second away).
    retry_slack: float = 1.0


@dataclass(frozen=True, kw_only=True)
class SenderSide:
    where: str  # path:line
    t: float  # on the sender's clock
    text: str
    reply: str | None = None


@dataclass(frozen=True, kw_only=True)
class HarnessSide:
    t: float
    text: str
    session: int | None = None
    attempt: int | None = None
    message: int | None = None
    reply: str | None = None
    store: str = ""


@dataclass(frozen=True, kw_only=True)
class Step:
    t: float  # on the harness's clock (sender times moved by the skew)
    kind: str = "attempt"  # attempt, dsn, info, queue
    rcpt: str | None = None
    sender: tuple[SenderSide, ...] = ()
    harness: HarnessSide | None = None
    flags: tuple[str, ...] = ()
    note: str | None = None


@dataclass(frozen=True, kw_only=True)
class Disagreement:
    kind: str
    message: str
    where: str | None = None
    t: float | None = None


@dataclass(frozen=True, kw_only=True)
class MessageTimeline:
    key: str
    message_id: str | None
    sender_ids: tuple[str, ...]
    mail_from: str | None
    recipients: tuple[str, ...]
    steps: tuple[Step, ...]
    disagreements: tuple[Disagreement, ...]


@dataclass(frozen=True, kw_only=True)
class Skew:
    """The sender's clock minus the harness's, for one file."""

    path: str
    seconds: float | None  # None: no step to measure it on
    low: float | None
    high: float | None
    pairs: int
    resolution: float

    def describe(self) -> str:
        if self.seconds is None:
            return f"{self.path}: clock skew not measured (no step matched both sides); " \
                   "clocks taken as equal"
        ahead = "ahead of" if self.seconds > 0 else "behind"
        span = ""
        if self.low is not None and self.high is not None:
            span = f", between {_signed(self.low)} and {_signed(self.high)}"
        res = f"; the log shows {_res(self.resolution)}" if self.resolution >= 0.5 else ""
        text = (f"{self.path}: clock skew {_signed(self.seconds)}: the sender's clock is "
                f"{abs(self.seconds):.3f} s {ahead} the harness's (measured on {self.pairs} "
                f"step(s){span}{res})")
        if self.low is not None and self.high is not None and self.low <= 0 <= self.high \
                and self.resolution >= 0.5:
            text += "; the clocks agree to within the log's resolution"
        return text


@dataclass(frozen=True, kw_only=True)
class FileSummary:
    path: str
    kind: str
    title: str
    records: int
    problems: tuple[Problem, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Lineup:
    files: tuple[FileSummary, ...]
    skews: tuple[Skew, ...]
    timelines: tuple[MessageTimeline, ...]
    notes: tuple[str, ...] = ()

    @property
    def disagreements(self) -> list[Disagreement]:
        return [d for t in self.timelines for d in t.disagreements]

    @property
    def problems(self) -> list[Problem]:
        return [p for f in self.files for p in f.problems]


def _signed(x: float) -> str:
    return f"{x:+.3f} s"


def _res(r: float) -> str:
    return "whole seconds" if r >= 0.999 else f"{r:g} s steps"


# ----------------------------------------------------------------- internals

@dataclass
class _Target:
    """Something of the harness's a sender's step can sit beside: an attempt,
    or a session that failed before any recipient was named."""

    t: float
    rcpt: str | None
    code: int | None
    reply: Reply | None
    outcome: str
    session: CapturedSession
    attempt: CapturedAttempt | None
    store: str

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.store, self.session.id, self.attempt.id if self.attempt else -1)


@dataclass
class _Obs:
    """A step the sender logged."""

    where: str
    t: float
    text: str
    kind: str  # attempt, dsn, info, queue, session
    key: str | None = None  # the message it belongs to
    rcpt: str | None = None
    outcome: str | None = None  # sent, deferred, bounced
    reply: Reply | None = None
    host: Endpoint | None = None  # the server it talked to
    local: Endpoint | None = None  # its own end of the connection
    reached: bool = True  # False: the connection never reached a server
    elsewhere: str | None = None  # it went to a server that is not the harness
    dsn_id: str | None = None
    dsn_about: str | None = None
    dsn_rcpt: str | None = None
    sender_id: str | None = None
    mail_from: str | None = None
    message_id: str | None = None
    session_match: tuple[str, int] | None = None  # (store, session id) known from ports
    matched: _Target | None = None
    harness_text: HarnessSide | None = None
    flags: list[str] = field(default_factory=list)


@dataclass
class _FileWork:
    file: EvidenceFile
    obs: list[_Obs]
    skew: float = 0.0
    skew_info: Skew | None = None
    disagreements: list[tuple[str | None, Disagreement]] = field(default_factory=list)
    steps: list[tuple[str | None, Step]] = field(default_factory=list)
    #: (store, session id) -> the Message-ID of the message stored in it
    session_mids: dict[tuple[str, int], str | None] = field(default_factory=dict)


_OUTCOME = {"sent": "accepted", "deferred": "deferred", "bounced": "rejected"}


def _mid(value: str | None) -> str | None:
    """A Message-ID compared as '<local@domain>', lower-case."""
    if not value:
        return None
    v = value.strip().lower()
    if not v:
        return None
    return v if v.startswith("<") else f"<{v}>"


def _short(text: str, n: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def _targets(captures: Sequence[Capture]) -> list[_Target]:
    """Every attempt, and every session that ended badly before a recipient
    was named (a 421 banner, a drop, a hang, broken TLS): an MTA counts
    those as delivery attempts too."""
    out: list[_Target] = []
    for cap in captures:
        by_id = {s.id: s for s in cap.sessions}
        with_attempts = {a.session_id for a in cap.attempts}
        for a in cap.attempts:
            s = by_id.get(a.session_id)
            if s is None:
                continue
            out.append(_Target(t=a.t, rcpt=a.rcpt, code=a.code,
                               reply=Reply.parse(a.reply) if a.reply else None,
                               outcome=a.outcome, session=s, attempt=a, store=cap.label))
        for s in cap.sessions:
            if s.id in with_attempts or any(
                    e.direction == "C" and e.text.upper().startswith("RCPT") for e in s.events):
                continue
            replies = [e for e in s.events if e.direction == "S"]
            last = replies[-1] if replies else None
            reply = Reply.parse(last.text) if last else None
            reason = s.end_reason or ""
            broken = reason.startswith(("drop", "reset", "hang", "tls_fail", "TLS", "lost"))
            if not broken and (reply is None or reply.code < 400):
                continue  # a connection that ended well without a recipient: no attempt
            out.append(_Target(t=last.t if last and not broken else s.started_at, rcpt=None,
                               code=None if broken else (reply.code if reply else None),
                               reply=None if broken else reply,
                               outcome=(reason.split(" ")[0] or "lost") if broken else (
                                   "deferred" if reply and reply.code < 500 else "rejected"),
                               session=s, attempt=None, store=cap.label))
    out.sort(key=lambda x: x.t)
    return out


def _harness_side(tg: _Target) -> HarnessSide:
    s = tg.session
    label = f"{tg.store}:" if tg.store else ""
    if tg.attempt is not None:
        a = tg.attempt
        cmd = next((e.text for e in reversed(s.events)
                    if e.direction == "C" and e.t <= a.t + 1e-6 and e.phase == a.phase), None)
        if cmd is None and a.phase in ("message", "bdat"):
            cmd = "end of data"
        said = a.reply or a.outcome
        rule = f" [rule {a.rule}]" if a.rule else ""
        stored = f", stored as {label}m{a.message_id}" if a.message_id else ""
        return HarnessSide(t=a.t, text=_short(f"{label}session {s.id}: {cmd or a.phase} -> "
                                              f"{said}{rule}{stored}", 200),
                           session=s.id, attempt=a.id, message=a.message_id, reply=a.reply,
                           store=tg.store)
    what = tg.reply.text if tg.reply else tg.outcome
    return HarnessSide(t=tg.t, text=_short(f"{label}session {s.id}: no recipient named; "
                                           f"{what} (ended: {s.end_reason or 'open'})", 200),
                       session=s.id, reply=tg.reply.text if tg.reply else None, store=tg.store)


# ------------------------------------------------------ observations per kind

def _postfix_obs(f: EvidenceFile) -> list[_Obs]:
    recs = [r for r in f.records if isinstance(r, PostfixRecord)]
    mids = {r.qid: r.message_id for r in recs if r.kind == "message-id" and r.qid}
    senders = {r.qid: r.sender for r in recs if r.kind == "queued" and r.qid}
    parent: dict[str, str] = {}  # a notice's qid -> the message it is about
    for r in recs:
        if r.kind == "notification" and r.qid and r.notification:
            parent[r.notification] = r.qid

    def key(qid: str | None) -> str | None:
        if qid is None:
            return None
        root = qid
        seen = {root}
        while root in parent and parent[root] not in seen:
            root = parent[root]
            seen.add(root)
        return _mid(mids.get(root)) or f"postfix:{root}"

    out: list[_Obs] = []
    queued: set[str] = set()
    for r in recs:
        where = f"{f.path}:{r.line}"
        if r.kind == "delivery" and r.qid:
            reached = r.relay not in (None, "none") and r.relay_endpoint is not None and (
                r.reply is not None or not (r.detail or "").startswith(("connect to",
                                                                        "delivery temporarily")))
            if r.relay in ("local", "virtual") or r.daemon in ("local", "virtual", "pipe"):
                reached = False
            text = f"{r.daemon}: to=<{r.rcpt}> status={r.status}" + (
                f" ({r.detail})" if r.detail else "")
            out.append(_Obs(where=where, t=r.t, text=_short(text, 220), kind="attempt",
                            key=key(r.qid), rcpt=r.rcpt, outcome=r.status, reply=r.reply,
                            host=r.relay_endpoint, reached=reached, sender_id=r.qid,
                            mail_from=senders.get(r.qid), message_id=mids.get(r.qid)))
        elif r.kind == "notification" and r.qid and r.notification:
            out.append(_Obs(where=where, t=r.t, kind="dsn", key=key(r.qid),
                            text=f"bounce: sender {r.notification_kind} notification: "
                                 f"{r.notification}",
                            dsn_id=_mid(mids.get(r.notification)),
                            dsn_about=_mid(mids.get(r.qid)), dsn_rcpt=senders.get(r.qid),
                            sender_id=r.notification, mail_from=senders.get(r.qid)))
        elif r.kind in ("expired", "queued", "removed") and r.qid:
            if r.kind == "queued":
                if r.qid in queued:
                    continue  # qmgr says "queue active" at every retry: once is enough
                queued.add(r.qid)
            text = {"expired": "qmgr: expired, returned to sender",
                    "queued": f"qmgr: queued, from=<{r.sender or ''}>",
                    "removed": "qmgr: removed from the queue"}[r.kind]
            out.append(_Obs(where=where, t=r.t, text=text, kind="info", key=key(r.qid),
                            sender_id=r.qid, mail_from=senders.get(r.qid)))
    return out


def _exim_obs(f: EvidenceFile) -> list[_Obs]:
    recs = [r for r in f.records if isinstance(r, EximRecord)]
    arrivals = {r.msgid: r for r in recs if r.kind == "arrival" and r.msgid}

    def key(msgid: str | None) -> str | None:
        if msgid is None:
            return None
        arr = arrivals.get(msgid)
        if arr is not None and arr.bounce_of and arr.bounce_of in arrivals:
            return key(arr.bounce_of)
        return _mid(arr.message_id) if arr is not None and arr.message_id else f"exim:{msgid}"

    out: list[_Obs] = []
    for r in recs:
        where = f"{f.path}:{r.line}"
        arr = arrivals.get(r.msgid or "")
        sender = arr.address if arr is not None else None
        if r.kind in ("delivery", "failed", "deferred"):
            attempt = r.host is not None
            outcome = {"delivery": "sent", "failed": "bounced", "deferred": "deferred"}[r.kind]
            host = f" H={_ep(r.host)}" if r.host else ""
            local = f" I={_ep(r.local)}" if r.local else ""
            said = r.error or (f'C="{r.fields["C"]}"' if "C" in r.fields else "")
            out.append(_Obs(where=where, t=r.t,
                            text=_short(f"{r.flag} {r.address}{host}{local}: {said}", 220),
                            kind="attempt" if attempt else "info", key=key(r.msgid),
                            rcpt=r.address, outcome=outcome if attempt else None,
                            reply=r.reply, host=r.host, local=r.local, reached=attempt,
                            sender_id=r.msgid, mail_from="" if sender == "<>" else sender,
                            message_id=arr.message_id if arr else None))
        elif r.kind == "arrival" and r.address == "<>" and r.bounce_of:
            orig = arrivals.get(r.bounce_of)
            m = re.search(r"\bfor (.+)$", r.text)
            out.append(_Obs(where=where, t=r.t, kind="dsn", key=key(r.msgid),
                            text=_short(f"<= <> bounce of {r.bounce_of}, id {r.message_id}"),
                            dsn_id=_mid(r.message_id),
                            dsn_about=_mid(orig.message_id) if orig else None,
                            dsn_rcpt=m.group(1).split()[0] if m else None, sender_id=r.msgid))
        elif r.kind == "completed":
            out.append(_Obs(where=where, t=r.t, text="Completed (left the queue)", kind="info",
                            key=key(r.msgid), sender_id=r.msgid))
    return out


def _tracking_obs(f: EvidenceFile) -> list[_Obs]:
    out: list[_Obs] = []
    for ev in f.records:
        if not isinstance(ev, TrackingEvent):
            continue
        where = f"{f.path}:{ev.line}"
        key = _mid(ev.message_id)
        label = f"{ev.event_id}" + (f" ({ev.meaning})" if ev.schema == "exchange2003" else "") \
            + (f" {ev.source}" if ev.source else "")
        host = (ev.server_ip, None) if ev.server_ip else None
        if ev.canonical == "DSN":
            about = next((_mid(r) for r in ev.reference if r), None)
            out.append(_Obs(where=where, t=ev.t, kind="dsn", key=about or key,
                            text=_short(f"{label}: a notification to "
                                        f"{', '.join(ev.recipients) or '?'}"),
                            dsn_id=key, dsn_about=about,
                            dsn_rcpt=ev.recipients[0] if ev.recipients else None,
                            sender_id=ev.internal_id, message_id=ev.message_id))
            continue
        if ev.canonical in ("SEND", "DEFER", "FAIL") and ev.recipients:
            outcome = {"SEND": "sent", "DEFER": "deferred", "FAIL": "bounced"}[ev.canonical]
            for rcpt in ev.recipients:
                status = ev.status_for(rcpt)
                reply = ev.reply_for(rcpt)
                # a FAIL that no server caused (routing, an agent) is not an attempt
                attempt = reply is not None or ev.canonical == "SEND"
                out.append(_Obs(where=where, t=ev.t, kind="attempt" if attempt else "info",
                                text=_short(f"{label}: {rcpt} {status or ''}", 220), key=key,
                                rcpt=rcpt, outcome=outcome if attempt else None, reply=reply,
                                host=host, sender_id=ev.internal_id, mail_from=ev.sender,
                                message_id=ev.message_id))
            continue
        out.append(_Obs(where=where, t=ev.t, kind="info", key=key,
                        text=_short(f"{label}: {', '.join(ev.recipients)}"),
                        sender_id=ev.internal_id, mail_from=ev.sender,
                        message_id=ev.message_id))
    return out


def _online_obs(f: EvidenceFile) -> list[_Obs]:
    out: list[_Obs] = []
    for r in f.records:
        where = f"{f.path}:{r.line}"
        if isinstance(r, TraceDetailRow):
            reply = r.reply
            attempt = r.canonical in ("SEND", "DEFER", "FAIL") and (
                reply is not None or r.canonical == "SEND")
            outcome = {"SEND": "sent", "DEFER": "deferred", "FAIL": "bounced"}.get(
                r.canonical or "")
            out.append(_Obs(where=where, t=r.t, kind="attempt" if attempt else "info",
                            text=_short(f"{r.event}: {r.detail or ''}", 220),
                            key=_mid(r.message_id), rcpt=r.recipient,
                            outcome=outcome if attempt else None, reply=reply,
                            mail_from=r.sender, message_id=r.message_id))
        elif isinstance(r, TraceRow):
            out.append(_Obs(where=where, t=r.t, kind="info", key=_mid(r.message_id),
                            text=f"message trace: {r.recipient} {r.status}",
                            mail_from=r.sender, message_id=r.message_id))
    return out


def _queue_obs(f: EvidenceFile) -> list[_Obs]:
    out: list[_Obs] = []
    for r in f.records:
        where = f"{f.path}:{r.line}"
        if isinstance(r, QueueRow):
            out.append(_Obs(where=where, t=r.last_retry or 0.0, kind="queue",
                            key=f"queue {r.identity or r.next_hop}", reply=r.last_reply,
                            text=_short(f"queue {r.identity} to {r.next_hop}: {r.status}, "
                                        f"{r.message_count} message(s); LastError "
                                        f"{r.last_error or '-'}", 240)))
        elif isinstance(r, QueuedMessage):
            rcpt_errors = [x for x in r.recipients if x.last_reply is not None]
            if rcpt_errors:
                for x in rcpt_errors:
                    out.append(_Obs(where=where, t=r.received or 0.0, kind="queue",
                                    key=_mid(r.message_id), rcpt=x.address, reply=x.last_reply,
                                    text=_short(f"queued message for {x.address}: {x.status}; "
                                                f"LastError {x.last_error}", 240),
                                    message_id=r.message_id, mail_from=r.sender))
            else:
                out.append(_Obs(where=where, t=r.received or 0.0, kind="queue",
                                key=_mid(r.message_id), reply=r.last_reply,
                                text=_short(f"queued message {r.status}, retry count "
                                            f"{r.retry_count}; LastError "
                                            f"{r.last_error or '-'}", 240),
                                message_id=r.message_id, mail_from=r.sender))
    return out


_OBSERVERS: dict[str, Callable[[EvidenceFile], list[_Obs]]] = {
    "postfix": _postfix_obs,
    "exim": _exim_obs,
    "exchange-tracking": _tracking_obs,
    "exchange-tracking-csv": _tracking_obs,
    "exchange-online-extended": _tracking_obs,
    "exchange2003-tracking": _tracking_obs,
    "exchange-online-trace": _online_obs,
    "exchange-online-trace-detail": _online_obs,
    "exchange-queue-csv": _queue_obs,
    "exchange-queue-json": _queue_obs,
}


# ---------------------------------------------------------- protocol sessions

_ADDR = re.compile(r"<([^>]*)>")


def _command_token(text: str) -> str:
    words = text.strip().split()
    if not words:
        return "C:"
    verb = words[0].upper()
    if verb in ("MAIL", "RCPT"):
        m = _ADDR.search(text)
        return f"C:{verb} {m.group(1).lower() if m else ''}"
    if verb in ("EHLO", "HELO"):
        return f"C:{verb} {(words[1] if len(words) > 1 else '').lower()}"
    return f"C:{verb}"


@dataclass
class _Tok:
    token: str
    t: float
    text: str
    reply: Reply | None = None
    line: int | None = None


def _fold(items: Iterable[tuple[str, float, str, int | None]]) -> list[_Tok]:
    """(kind 'C'/'S', t, text, line) into tokens; a multi-line reply becomes
    one token (its first line's text, the time of its last line)."""
    out: list[_Tok] = []
    cont: _Tok | None = None
    for kind, t, text, line in items:
        if kind == "C":
            cont = None
            out.append(_Tok(_command_token(text), t, text, line=line))
            continue
        m = re.match(r"^(\d{3})([ -])", text + " ")
        if cont is not None and m and int(m.group(1)) == (cont.reply.code if cont.reply else 0):
            cont.t = t
            if m.group(2) == " ":
                cont = None
            continue
        reply = Reply.parse(text)
        tok = _Tok(f"S:{reply.code}" if reply else "S:?", t, text, reply=reply, line=line)
        out.append(tok)
        cont = tok if m and m.group(2) == "-" else None
    return out


def _sender_tokens(ps: ProtocolSession) -> list[_Tok]:
    items = []
    for x in ps.lines:
        if x.command is not None:
            items.append(("C", x.t, x.command, x.line))
        elif x.reply is not None:
            items.append(("S", x.t, x.data, x.line))
    return _fold(items)


def _our_tokens(s: CapturedSession) -> list[_Tok]:
    # "<message: 903 bytes>" stands for the content, which no sender's log shows
    return _fold((e.direction, e.t, e.text, None) for e in s.events
                 if e.direction in "CS" and not (e.direction == "C" and e.text.startswith("<")))


def _protocol_work(f: EvidenceFile, captures: Sequence[Capture], options: LineupOptions,
                   work: _FileWork) -> None:
    """Each Send-connector session beside the harness's session: endpoints,
    then commands and replies in order; every recipient's deciding reply
    becomes a step of the message's timeline."""
    ours = [s for c in captures for s in c.sessions]
    store_of = {id(s): c.label for c in captures for s in c.sessions}
    by_port: dict[int, list[CapturedSession]] = {}
    for s in ours:
        if s.peer[1] is not None:
            by_port.setdefault(s.peer[1], []).append(s)
    ports = {s.listener[1] for s in ours if s.listener and s.listener[1] is not None}
    psessions = [p for p in sessions(f.records) if p.direction == "send"]
    other = [p for p in psessions if ours and p.remote and p.remote[1] is not None
             and p.remote[1] not in ports]
    if other:
        psessions = [p for p in psessions if p not in other]
        work.file = replace(work.file, notes=(*work.file.notes, f"{len(other)} session(s) "
                            "to other servers (" + ", ".join(sorted({_ep(p.remote)
                                                                     for p in other}))
                            + ") left out: the harness was not there"))
    receive = [p for p in sessions(f.records) if p.direction == "receive"]
    if receive:
        work.file = replace(work.file, notes=(*work.file.notes, f"{len(receive)} "
                            "Receive-connector session(s): "
                                      "Exchange was the server there, so there is no harness "
                                      "session to line them up with"))
    pairs: list[tuple[ProtocolSession, CapturedSession | None]] = []
    for ps in psessions:
        local, remote = ps.local, ps.remote
        found: CapturedSession | None = None
        if local and local[1] is not None:
            near = [s for s in by_port.get(local[1], [])
                    if (remote is None or remote[1] is None or s.listener is None
                        or s.listener[1] == remote[1])
                    and abs(s.started_at - ps.start) <= options.window]
            found = min(near, key=lambda s: abs(s.started_at - ps.start), default=None)
        pairs.append((ps, found))
    # skew from the sessions matched by port: each reply, sent by us, logged by them
    diffs: list[float] = []
    for ps, got in pairs:
        if got is not None:
            diffs += [a.t - b.t for a, b in _aligned(_sender_tokens(ps), _our_tokens(got))
                      if a.token.startswith("S:")]
    if not diffs and psessions:
        # no ports to go by (an old log, NAT): by time and the banner
        offsets: list[float] = []
        for ps in psessions:
            banner = next((t for t in _sender_tokens(ps) if t.reply), None)
            for s in ours:
                first = next((t for t in _our_tokens(s) if t.reply), None)
                if banner and first and banner.reply and first.reply and \
                        banner.reply.agrees(first.reply) and \
                        abs(banner.t - first.t) <= options.window:
                    offsets.append(banner.t - first.t)
        guess = _mode(offsets, options.tolerance + f.resolution) if offsets else 0.0
        used: set[int] = set()
        by_time: list[tuple[ProtocolSession, CapturedSession | None]] = []
        for ps, _ in pairs:
            near = [s for s in ours if id(s) not in used
                    and abs(s.started_at + guess - ps.start) <= options.tolerance + f.resolution]
            pick = min(near, key=lambda s: abs(s.started_at + guess - ps.start), default=None)
            if pick is not None:
                used.add(id(pick))
            by_time.append((ps, pick))
        pairs = by_time
        for ps, got in pairs:
            if got is not None:
                diffs += [a.t - b.t for a, b in _aligned(_sender_tokens(ps), _our_tokens(got))
                          if a.token.startswith("S:")]
    work.skew = median(diffs) if diffs else 0.0
    work.skew_info = _skew_from(f.path, diffs, f.resolution)
    for ps, got in pairs:
        _session_steps(f, ps, got, store_of.get(id(got), "") if got else "", work)


def _aligned(theirs: list[_Tok], mine: list[_Tok]) -> list[tuple[_Tok, _Tok]]:
    """Pairs of the same command or reply, commands and replies matched as
    two sequences: a client that pipelines logs MAIL, RCPT, RCPT before the
    replies, while the server's transcript interleaves them."""
    out = []
    for kind in ("C:", "S:"):
        a = [t for t in theirs if t.token.startswith(kind)]
        b = [t for t in mine if t.token.startswith(kind)]
        sm = difflib.SequenceMatcher(a=[t.token for t in a], b=[t.token for t in b],
                                     autojunk=False)
        for block in sm.get_matching_blocks():
            out += [(a[block.a + k], b[block.b + k]) for k in range(block.size)]
    return out


def _session_steps(f: EvidenceFile, ps: ProtocolSession, s: CapturedSession | None,
                   store: str, work: _FileWork) -> None:
    theirs = _sender_tokens(ps)
    key = _mid(ps.message_ids[0]) if ps.message_ids else None
    where0 = f"{f.path}:{ps.lines[0].line}"
    label = f"{store}:" if store else ""
    if s is None:
        if any(t.reply for t in theirs):
            work.disagreements.append((key, Disagreement(
                kind="no-session", where=where0, t=ps.start - work.skew,
                message=f"{where0}: Send-connector session {ps.session} "
                        f"({_ep(ps.local)} -> {_ep(ps.remote)}) has no harness session")))
        return
    mine = _our_tokens(s)
    if key is None:
        key = _mid(work.session_mids.get((store, s.id))) or f"session {label}{s.id}"
    our_replies = [t.reply for t in mine if t.reply]
    for kind in ("C:", "S:"):
        a = [t for t in theirs if t.token.startswith(kind)]
        b = [t for t in mine if t.token.startswith(kind)]
        sm = difflib.SequenceMatcher(a=[t.token for t in a], b=[t.token for t in b],
                                     autojunk=False)
        for op, a0, a1, b0, b1 in sm.get_opcodes():
            if op == "equal":
                for x, y in zip(a[a0:a1], b[b0:b1], strict=True):
                    if x.reply and y.reply and not x.reply.agrees(y.reply):
                        _never_sent(f, x, y.reply, s, label, key, work)
                continue
            for x in a[a0:a1]:
                if x.reply is not None and not any(x.reply.agrees(r) for r in our_replies):
                    _never_sent(f, x, b[b0].reply if b0 < len(b) else None, s, label, key,
                                work)
                else:
                    where = f"{f.path}:{x.line}"
                    work.disagreements.append((key, Disagreement(
                        kind="transcript-differs", where=where, t=x.t - work.skew,
                        message=f"{where}: the sender logged {x.text!r} where the harness's "
                                f"session {label}{s.id} has "
                                + (", ".join(repr(y.text) for y in b[b0:b1]) or "nothing"))))
            if op == "insert":
                prev = a[a0 - 1] if a0 else None
                where = f"{f.path}:{prev.line if prev else ps.lines[0].line}"
                work.disagreements.append((key, Disagreement(
                    kind="transcript-differs", where=where, t=b[b0].t,
                    message=f"{where}: the harness's session {label}{s.id} has "
                            + ", ".join(repr(y.text) for y in b[b0:b1])
                            + " which the sender did not log")))
    # each recipient's deciding reply: a step of the message's timeline
    pending: list[_Tok] = []
    rcpts: list[tuple[str, _Tok, _Tok | None]] = []
    data_reply: _Tok | None = None
    for tok in theirs:
        if tok.token.startswith("C:"):
            pending.append(tok)
            continue
        cmd = pending.pop(0) if pending else None
        if cmd is None:
            continue
        verb = cmd.token[2:].split(" ")[0]
        if verb == "RCPT":
            m = _ADDR.search(cmd.text)
            rcpts.append((m.group(1) if m else "", tok, None))
        elif verb == "DATA" and tok.reply and tok.reply.code == 354:
            pending.insert(0, _Tok("C:.", tok.t, "end of data"))
        elif verb in (".", "BDAT") and (verb == "." or "LAST" in cmd.text.upper()):
            data_reply = tok
    for rcpt, rtok, _ in rcpts:
        decisive = rtok if (rtok.reply and rtok.reply.code >= 400) or data_reply is None \
            else data_reply
        work.obs.append(_Obs(
            where=f"{f.path}:{decisive.line}", t=decisive.t, kind="attempt", key=key,
            text=_short(f"session {ps.session}: RCPT TO:<{rcpt}> -> {rtok.text}"
                        + (f"; end of data -> {data_reply.text}"
                           if decisive is data_reply else ""), 220),
            rcpt=rcpt, reply=decisive.reply,
            outcome="sent" if decisive.reply and decisive.reply.code < 300 else
            "deferred" if decisive.reply and decisive.reply.code < 500 else "bounced",
            host=ps.remote, local=ps.local, session_match=(store, s.id),
            message_id=ps.message_ids[0] if ps.message_ids else work.session_mids.get(
                (store, s.id))))
    if not rcpts:
        last = next((t for t in reversed(theirs) if t.reply), None)
        if last is not None and last.reply and last.reply.code >= 400:
            work.obs.append(_Obs(where=f"{f.path}:{last.line}", t=last.t, kind="attempt",
                                 key=key, text=_short(f"session {ps.session}: {last.text}"),
                                 reply=last.reply, outcome="deferred" if last.reply.code < 500
                                 else "bounced", host=ps.remote, local=ps.local,
                                 session_match=(store, s.id)))


def _ep(e: Endpoint | None) -> str:
    if e is None:
        return "?"
    return f"{e[0]}:{e[1]}" if e[1] is not None else e[0]


def _never_sent(f: EvidenceFile, a: _Tok, ours: Reply | None, s: CapturedSession, label: str,
                key: str | None, work: _FileWork) -> None:
    where = f"{f.path}:{a.line}"
    instead = f"; it answered {ours.text!r} there" if ours else ""
    work.disagreements.append((key, Disagreement(
        kind="reply-never-sent", where=where, t=a.t - work.skew,
        message=f"{where}: the sender logged {a.text!r}, which the harness never sent in "
                f"session {label}{s.id}{instead}")))


# ------------------------------------------------------------------- skew

def _mode(values: list[float], width: float) -> float:
    """The middle of the densest run of values within `width` of one value
    (ties: the one nearest 0); two pointers over the sorted values."""
    vals = sorted(values)
    best, best_n = 0.0, -1
    j = k = 0
    for i, v in enumerate(vals):
        while vals[j] < v - width:
            j += 1
        k = max(k, i)
        while k + 1 < len(vals) and vals[k + 1] <= v + width:
            k += 1
        n = k - j + 1
        centre = vals[(j + k) // 2]
        if n > best_n or (n == best_n and abs(centre) < abs(best)):
            best, best_n = centre, n
    return best


def _skew_from(path: str, diffs: list[float], resolution: float) -> Skew:
    if not diffs:
        return Skew(path=path, seconds=None, low=None, high=None, pairs=0,
                    resolution=resolution)
    if resolution >= 0.5:
        # logged = floor(true): the offset lies in [d, d + resolution) for every d
        low, high = max(diffs), min(diffs) + resolution
        if low < high:
            return Skew(path=path, seconds=(low + high) / 2, low=low, high=high,
                        pairs=len(diffs), resolution=resolution)
        return Skew(path=path, seconds=median(diffs) + resolution / 2, low=min(diffs),
                    high=max(diffs) + resolution, pairs=len(diffs), resolution=resolution)
    return Skew(path=path, seconds=median(diffs), low=min(diffs), high=max(diffs),
                pairs=len(diffs), resolution=resolution)


class _Index:
    """The harness's targets by session, by peer port and by recipient, each
    list in time order, so a step looks only at what lies near it in time
    (a day's mail log against a busy store stays linear)."""

    def __init__(self, targets: list[_Target]) -> None:
        self.by_session: dict[tuple[str, int], list[_Target]] = {}
        self.by_port: dict[int, list[_Target]] = {}
        self.by_rcpt: dict[str, list[_Target]] = {}
        self.no_rcpt: list[_Target] = []
        self.all = sorted(targets, key=lambda x: x.t)
        for t in self.all:
            self.by_session.setdefault((t.store, t.session.id), []).append(t)
            if t.session.peer[1] is not None:
                self.by_port.setdefault(t.session.peer[1], []).append(t)
            if t.rcpt is None:
                self.no_rcpt.append(t)
            else:
                self.by_rcpt.setdefault(t.rcpt.lower(), []).append(t)
        self._times = {id(v): [t.t for t in v] for v in (self.all, self.no_rcpt,
                                                         *self.by_rcpt.values())}

    def _window(self, seq: list[_Target], lo: float, hi: float) -> list[_Target]:
        if not seq:
            return []
        times = self._times[id(seq)]
        return seq[bisect.bisect_left(times, lo):bisect.bisect_right(times, hi)]

    def candidates(self, o: _Obs, lo: float, hi: float) -> list[_Target]:
        """What of ours may sit beside `o`, among targets in [lo, hi] (the
        connection's ports, when the log gives them, settle it at once)."""
        def same_rcpt(got: list[_Target]) -> list[_Target]:
            return [t for t in got if t.rcpt is None or o.rcpt is None
                    or t.rcpt.lower() == o.rcpt.lower()]

        if o.session_match is not None:
            return same_rcpt(self.by_session.get(o.session_match, []))
        if o.local is not None and o.local[1] is not None and o.local[1] in self.by_port:
            got = [t for t in self.by_port[o.local[1]] if lo <= t.t <= hi]
            if o.host is not None and o.host[1] is not None:
                got = [t for t in got if t.session.listener is None
                       or t.session.listener[1] == o.host[1]] or got
            return same_rcpt(got)
        if o.rcpt is None:
            return self._window(self.all, lo, hi)
        return self._window(self.by_rcpt.get(o.rcpt.lower(), []), lo, hi) + \
            self._window(self.no_rcpt, lo, hi)


def _score(o: _Obs, t: _Target, skew: float) -> tuple[int, float]:
    if o.reply is not None and t.reply is not None:
        miss = 0 if o.reply.agrees(t.reply) else 2 if o.reply.code != t.code else 1
    elif o.reply is not None:
        miss = 3  # a reply against a broken connection
    else:
        miss = 0 if _OUTCOME.get(o.outcome or "") == t.outcome.split(" ")[0] else (
            1 if t.reply is None else 2)
    return miss, abs(o.t - skew - t.t)


def _attempt_skew(f: EvidenceFile, obs: list[_Obs], index: _Index, options: LineupOptions
                  ) -> tuple[float, Skew]:
    diffs: list[float] = []
    w = options.window
    for o in obs:
        if o.kind != "attempt" or o.reply is None:
            continue
        for t in index.candidates(o, o.t - w, o.t + w):
            if t.reply is not None and o.reply.agrees(t.reply) and \
                    abs(o.t - t.t) <= options.window:
                diffs.append(o.t - t.t)
    if not diffs:
        return 0.0, _skew_from(f.path, [], f.resolution)
    centre = _mode(diffs, options.tolerance / 2 + f.resolution)
    near: list[float] = []
    for o in obs:
        if o.kind != "attempt" or o.reply is None:
            continue
        best = min((o.t - t.t for t in index.candidates(o, o.t - w, o.t + w)
                    if t.reply is not None and o.reply.agrees(t.reply)),
                   key=lambda d: abs(d - centre), default=None)
        if best is not None and abs(best - centre) <= options.tolerance + f.resolution:
            near.append(best)
    info = _skew_from(f.path, near, f.resolution)
    return (info.seconds if info.seconds is not None else centre), info


# ------------------------------------------------------------------ line up

def line_up(files: Sequence[EvidenceFile], captures: Sequence[Capture],
            options: LineupOptions | None = None) -> Lineup:
    """The sender's files beside the harness's records: one timeline per message."""
    opts = options or LineupOptions()
    targets = _targets(captures)
    index = _Index(targets)
    messages = [m for c in captures for m in c.messages]
    replies = _Replies.of(captures)
    session_mids = {(m.store, m.session_id): m.message_id for m in messages}
    works: list[_FileWork] = []
    notes: list[str] = []
    for f in files:
        work = _FileWork(file=f, obs=[], session_mids=session_mids)
        if f.kind in ("exchange-send-protocol", "exchange-receive-protocol",
                      "exchange2003-smtp"):
            _protocol_work(f, captures, opts, work)
        elif f.kind in _OBSERVERS:
            work.obs = _OBSERVERS[f.kind](f)
            if any(o.kind == "attempt" for o in work.obs):
                work.skew, work.skew_info = _attempt_skew(f, work.obs, index, opts)
        works.append(work)
    # a file without attempts of its own (queues, traces) takes the skew of
    # another file of the same sender, when there is exactly one measured
    measured = [w.skew for w in works if w.skew_info is not None
                and w.skew_info.seconds is not None]
    matched_by: dict[tuple[str, int, int], list[_Obs]] = {}
    listeners = {s.listener[1] for c in captures for s in c.sessions
                 if s.listener and s.listener[1] is not None}
    judge = bool(captures)  # without a store there is nothing to disagree with
    for w in works:
        if w.skew_info is None and len(measured) == 1:
            w.skew = measured[0]
        for o in w.obs:
            if listeners and o.host and o.host[1] is not None and o.host[1] not in listeners:
                o.reached, o.elsewhere = False, f"it went to {_ep(o.host)}, not to the harness"
        _match(w, index, opts)
        for o in w.obs:
            if o.matched is not None:
                matched_by.setdefault(o.matched.key, []).append(o)
        if judge:
            _check_replies(w, replies, opts)
            _check_dsns(w, messages, opts)
    if judge:
        _check_unlogged(works, targets, matched_by, opts)
    timelines = _timelines(works, targets, matched_by, opts, judge)
    if not captures:
        notes.append("no store was given: only the sender's side is shown")
    skews = tuple(w.skew_info for w in works if w.skew_info is not None)
    files_out = tuple(FileSummary(path=w.file.path, kind=w.file.kind, title=w.file.title,
                                  records=len(w.file.records), problems=w.file.problems,
                                  notes=w.file.notes) for w in works)
    return Lineup(files=files_out, skews=skews, timelines=timelines, notes=tuple(notes))


def _match(w: _FileWork, index: _Index, opts: LineupOptions) -> None:
    tol = opts.tolerance + w.file.resolution
    used: set[tuple[str, int, int]] = set()
    for o in sorted((o for o in w.obs if o.kind == "attempt" and o.reached),
                    key=lambda o: o.t):
        at = o.t - w.skew
        cands = [t for t in index.candidates(o, at - tol, at + tol)
                 if t.key not in used and (o.session_match is not None
                                           or abs(at - t.t) <= tol)]
        if not cands:
            continue
        best = min(cands, key=lambda t: _score(o, t, w.skew))
        o.matched = best
        used.add(best.key)
        if o.reply is not None and best.reply is not None and not o.reply.agrees(best.reply):
            said = [Reply.parse(e.text) for e in best.session.events if e.direction == "S"]
            if not any(r is not None and o.reply.agrees(r) for r in said):
                label = f"{best.store}:" if best.store else ""
                o.flags.append("reply-never-sent")
                w.disagreements.append((o.key, Disagreement(
                    kind="reply-never-sent", where=o.where, t=o.t - w.skew,
                    message=f"{o.where}: the sender logged {o.reply.text!r}, which the harness "
                            f"never sent; it answered {best.reply.text!r} in session "
                            f"{label}{best.session.id}")))


@dataclass
class _Replies:
    """Every reply the harness sent, by code, in time order."""

    by_code: dict[int, list[tuple[CapturedSession, CapturedEvent, Reply, str]]]
    times: dict[int, list[float]]

    @classmethod
    def of(cls, captures: Sequence[Capture]) -> _Replies:
        by_code: dict[int, list[tuple[CapturedSession, CapturedEvent, Reply, str]]] = {}
        for c in captures:
            for s in c.sessions:
                for e in s.events:
                    r = Reply.parse(e.text) if e.direction == "S" else None
                    if r is not None:
                        by_code.setdefault(r.code, []).append((s, e, r, c.label))
        for v in by_code.values():
            v.sort(key=lambda x: x[1].t)
        return cls(by_code, {k: [x[1].t for x in v] for k, v in by_code.items()})

    def near(self, reply: Reply, lo: float, hi: float
             ) -> list[tuple[CapturedSession, CapturedEvent, str]]:
        seq = self.by_code.get(reply.code, [])
        times = self.times.get(reply.code, [])
        return [(s, e, label) for s, e, r, label in
                seq[bisect.bisect_left(times, lo):bisect.bisect_right(times, hi)]
                if reply.agrees(r)]


def _check_replies(w: _FileWork, replies: _Replies, opts: LineupOptions) -> None:
    """A logged reply with no attempt beside it must at least be a reply the
    harness sent around then (a queue's LastError, an unmatched log line)."""
    tol = opts.tolerance + w.file.resolution
    for o in w.obs:
        if o.matched is not None or o.reply is None or o.kind not in ("attempt", "queue") \
                or not o.reached:
            continue
        timed = o.t > 0
        span = tol if o.kind == "attempt" else opts.window
        at = o.t - w.skew
        found = replies.near(o.reply, at - span, at + span) if timed else \
            replies.near(o.reply, float("-inf"), float("inf"))
        if found:
            s, e, label = min(found, key=lambda x: abs(o.t - w.skew - x[1].t))
            lab = f"{label}:" if label else ""
            o.harness_text = HarnessSide(t=e.t, session=s.id, store=label,
                                         reply=e.text,
                                         text=_short(f"{lab}session {s.id} sent "
                                                     f"{e.text!r}", 200))
            continue
        o.flags.append("reply-never-sent")
        w.disagreements.append((o.key, Disagreement(
            kind="reply-never-sent", where=o.where, t=o.t - w.skew if timed else None,
            message=f"{o.where}: the sender logged {o.reply.text!r}, which the harness never "
                    "sent" + (" around then" if timed else ""))))


def _check_dsns(w: _FileWork, messages: list[CapturedMessage], opts: LineupOptions) -> None:
    notices = [m for m in messages if m.is_ndr or m.mail_from == ""]
    by_id = {k: m for m in notices if (k := _mid(m.message_id))}
    by_about = {k: m for m in notices if (k := _mid(m.ndr_original_id))}
    for o in w.obs:
        if o.kind != "dsn":
            continue
        found = (by_id.get(o.dsn_id) if o.dsn_id else None) or (
            by_about.get(o.dsn_about) if o.dsn_about else None)
        if found is None and not o.dsn_id and not o.dsn_about and o.dsn_rcpt:
            t0 = o.t - w.skew
            rcpt = o.dsn_rcpt.lower()
            found = next((m for m in notices if rcpt in (r.lower() for r in m.rcpt_tos)
                          and t0 - opts.tolerance <= m.received_at <= t0 + opts.window), None)
        if found is not None:
            label = f"{found.store}:" if found.store else ""
            status = ", ".join(f"{r or '?'} {s or ''}".strip() for r, s in found.ndr_recipients)
            o.harness_text = HarnessSide(
                t=found.received_at, session=found.session_id, message=found.id,
                store=found.store,
                text=_short(f"captured the {found.ndr_kind or 'notification'} as message "
                            f"{label}m{found.id}" + (f" ({status})" if status else ""), 200))
            continue
        o.flags.append("dsn-not-captured")
        ident = o.dsn_id or (f"about {o.dsn_about}" if o.dsn_about else "")
        w.disagreements.append((o.key, Disagreement(
            kind="dsn-not-captured", where=o.where, t=o.t - w.skew,
            message=f"{o.where}: the sender generated a DSN {ident}".rstrip()
                    + (f" to {o.dsn_rcpt}" if o.dsn_rcpt else "")
                    + ", and no store given holds it")))


def _check_unlogged(works: list[_FileWork], targets: list[_Target],
                    matched_by: dict[tuple[str, int, int], list[_Obs]],
                    opts: LineupOptions) -> None:
    for w in works:
        if w.file.kind not in _COMPLETE:
            continue
        att = [o for o in w.obs if o.kind == "attempt"]
        if not att:
            continue
        tol = opts.tolerance + w.file.resolution
        lo = min(o.t for o in att) - w.skew - tol
        hi = max(o.t for o in att) - w.skew + tol
        senders = {o.mail_from.lower() for o in att if o.mail_from is not None}
        listeners = {o.host[1] for o in att if o.host and o.host[1] is not None}
        for t in targets:
            if t.key in matched_by or not lo <= t.t <= hi:
                continue
            if listeners and t.session.listener and t.session.listener[1] not in listeners:
                continue
            if t.attempt is not None and senders and t.attempt.mail_from.lower() not in senders:
                continue
            side = _harness_side(t)
            key = _key_for_target(t, w)
            w.steps.append((key, Step(t=t.t, kind="attempt", rcpt=t.rcpt, harness=side,
                                      flags=("attempt-not-logged",))))
            w.disagreements.append((key, Disagreement(
                kind="attempt-not-logged", t=t.t, where=None,
                message=f"{side.text}: the harness saw this attempt; {w.file.path} "
                        "does not log it")))
            matched_by.setdefault(t.key, [])


def _key_for_target(t: _Target, w: _FileWork) -> str | None:
    """The message an attempt of ours belongs to: the sender's message with
    that recipient nearest in time."""
    best = None
    for o in w.obs:
        if o.kind != "attempt" or o.key is None:
            continue
        if t.rcpt is not None and (o.rcpt or "").lower() != t.rcpt.lower():
            continue
        d = abs(o.t - w.skew - t.t)
        if best is None or d < best[0]:
            best = (d, o.key)
    return best[1] if best else None


@dataclass
class _Group:
    steps: list[Step] = field(default_factory=list)
    disagreements: list[Disagreement] = field(default_factory=list)
    sender_ids: list[str] = field(default_factory=list)
    mail_from: str | None = None
    recipients: list[str] = field(default_factory=list)
    message_id: str | None = None


def _timelines(works: list[_FileWork], targets: list[_Target],
               matched_by: dict[tuple[str, int, int], list[_Obs]],
               opts: LineupOptions, judge: bool) -> tuple[MessageTimeline, ...]:
    groups: dict[str, _Group] = {}
    # a notification's own delivery belongs to the message it is about
    notices = {o.dsn_id: o.key for w in works for o in w.obs
               if o.kind == "dsn" and o.dsn_id and o.key and o.key != o.dsn_id}

    def group(key: str | None) -> _Group:
        key = notices.get(key or "", key)
        return groups.setdefault(key or "(no message)", _Group())

    def side(x: _Obs) -> SenderSide:
        return SenderSide(where=x.where, t=x.t, text=x.text,
                          reply=x.reply.text if x.reply else None)

    done: set[tuple[str, int, int]] = set()
    for w in works:
        for o in w.obs:
            g = group(o.key)
            if o.sender_id and o.sender_id not in g.sender_ids:
                g.sender_ids.append(o.sender_id)
            if o.mail_from is not None and g.mail_from is None and o.key not in notices:
                g.mail_from = o.mail_from
            if o.rcpt and o.kind == "attempt" and o.rcpt not in g.recipients and (
                    o.key not in notices):
                g.recipients.append(o.rcpt)
            if o.message_id and g.message_id is None and o.key not in notices:
                g.message_id = o.message_id
            if o.matched is not None:
                if o.matched.key in done:
                    continue  # another file's line for the same attempt: merged above
                done.add(o.matched.key)
                same = matched_by.get(o.matched.key, [o])
                g.steps.append(Step(t=o.matched.t, kind="attempt", rcpt=o.rcpt,
                                    sender=tuple(side(x) for x in same),
                                    harness=_harness_side(o.matched),
                                    flags=tuple(fl for x in same for fl in x.flags)))
                continue
            note = None
            if o.kind == "attempt" and not o.reached:
                note = o.elsewhere or "the connection never reached the harness"
            elif o.kind == "attempt" and o.harness_text is None and not o.flags:
                note = "no harness attempt beside it"
                if o.reply is None and judge:
                    o.flags.append("no-session")
                    w.disagreements.append((o.key, Disagreement(
                        kind="no-session", where=o.where, t=o.t - w.skew,
                        message=f"{o.where}: the sender logged an attempt that reached a "
                                "server, and the harness has no session for it")))
            t = o.t - w.skew if o.t else (o.harness_text.t if o.harness_text else 0.0)
            g.steps.append(Step(t=t, kind=o.kind, rcpt=o.rcpt, sender=(side(o),),
                                harness=o.harness_text, flags=tuple(o.flags), note=note))
        for key, st in w.steps:
            group(key).steps.append(st)
    seen: set[tuple[str, str | None, str]] = set()
    for w in works:
        for key, d in w.disagreements:
            mark = (d.kind, d.where, d.message if d.where is None else "")
            if mark not in seen:  # a session's check and its step's may find the same line
                seen.add(mark)
                group(key).disagreements.append(d)
    if judge:
        _check_retries(groups, works, opts)
    out = []
    for key, g in groups.items():
        _keep_file_order(g)
        g.steps.sort(key=lambda s: s.t)
        g.disagreements.sort(key=lambda d: d.t or 0.0)
        out.append(MessageTimeline(key=key, message_id=g.message_id,
                                   sender_ids=tuple(g.sender_ids), mail_from=g.mail_from,
                                   recipients=tuple(g.recipients), steps=tuple(g.steps),
                                   disagreements=tuple(g.disagreements)))
    out.sort(key=lambda m: m.steps[0].t if m.steps else 0.0)
    return tuple(out)


def _keep_file_order(g: _Group) -> None:
    """A step only the sender logged has only the sender's (often whole
    second) time: it must not be shown before a line its log wrote earlier,
    so it takes at least the time of the step before it in the same file."""
    def position(st: Step) -> tuple[str, int] | None:
        if not st.sender:
            return None
        path, _, line = st.sender[0].where.rpartition(":")
        return (path, int(line)) if line.isdigit() else None

    ordered = sorted((p, i) for i, st in enumerate(g.steps) if (p := position(st)))
    last: dict[str, float] = {}
    for (path, _), i in ordered:
        st = g.steps[i]
        if st.harness is None and path in last and st.t < last[path]:
            st = g.steps[i] = replace(st, t=last[path])
        last[path] = st.t


def _check_retries(groups: dict[str, _Group], works: list[_FileWork],
                   opts: LineupOptions) -> None:
    """Consecutive attempts for one recipient of one message, closer than
    the configured retry interval allows."""
    if opts.retry_interval is None:
        return
    res = max((w.file.resolution for w in works), default=0.0)
    limit = opts.retry_interval - opts.retry_slack - res
    for g in groups.values():
        per_rcpt: dict[str, list[Step]] = {}
        for st in g.steps:
            if st.kind == "attempt" and st.rcpt and not st.note:
                per_rcpt.setdefault(st.rcpt.lower(), []).append(st)
        for rcpt, seq in per_rcpt.items():
            for prev, cur in itertools.pairwise(seq):
                gap = cur.t - prev.t
                if gap < limit:
                    where = cur.sender[0].where if cur.sender else None
                    g.disagreements.append(Disagreement(
                        kind="early-retry", where=where, t=cur.t,
                        message=f"{where or 'the harness'}: {rcpt} was retried {gap:.1f} s "
                                f"after the previous attempt, sooner than the configured "
                                f"{opts.retry_interval:g} s"))
