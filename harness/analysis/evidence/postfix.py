"""Postfix's mail log: what each daemon said about each queued message.

Lines come from syslog, the journal or Postfix's own maillog_file (see
syslog.py for the shapes). Postfix lines are those whose tag is
"NAME/DAEMON" (NAME is the syslog_name, "postfix" unless changed; DAEMON
smtp, qmgr, cleanup, bounce, ...); lines of other programs in the same file
are skipped and counted. A queue id starts a message line ("8CFC021408A:
to=<...>, relay=..., status=deferred (...)"). What is read:

- deliveries (smtp, lmtp, local, virtual, error, retry, ...): to=, orig_to=,
  relay=, delay=, delays=, dsn=, status= (sent, deferred, bounced,
  expired, undeliverable) and the reason in parentheses, with the remote
  reply it quotes ("host X[ip] said: 451 4.7.1 ... (in reply to RCPT TO
  command)", "(250 2.0.0 Ok: queued as 1)");
- cleanup's message-id=, qmgr's from=, size=, nrcpt= and "removed", pickup
  and smtpd's arrival, qmgr's "status=expired, returned to sender";
- bounce's "sender non-delivery notification: QID" (also delay and
  delivery status notifications): the notice's own queue id.

May know: the text handed in. May not know: files, sockets, storage."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from harness.analysis.evidence.base import (
    Endpoint,
    EvidenceFile,
    Problem,
    ReadOptions,
    Reply,
    find_reply,
)
from harness.analysis.evidence.syslog import SyslogLine, parse_syslog_line

__all__ = ["PostfixRecord", "read_postfix", "sniff"]

#: Postfix daemons (and commands) that log under syslog_name/NAME.
DAEMONS = frozenset({
    "anvil", "bounce", "cleanup", "discard", "dnsblog", "error", "flush", "lmtp", "local",
    "master", "oqmgr", "pickup", "pipe", "postdrop", "postfix-script", "postlogd", "postmap",
    "postqueue", "postscreen", "postsuper", "proxymap", "qmgr", "qmqpd", "retry", "scache",
    "sendmail", "showq", "smtp", "smtpd", "spawn", "tlsmgr", "tlsproxy", "trivial-rewrite",
    "verify", "virtual", "relay", "postmulti", "postlog", "defer", "trace", "submission",
    "smtps",
})
_QID = re.compile(r"^(?P<qid>[0-9A-F]{6,15}|[0-9B-DF-HJ-NP-TV-Zb-df-hj-np-tv-z]{10,20}):"
                  r"\s(?P<rest>.*)$")
_PAIR = re.compile(r"(?:^|,\s)(?P<k>[a-z_]+)=(?P<v><[^>]*>|[^,\s]*)")
_STATUS = re.compile(r"(?:^|,\s)status=(?P<status>\w+)(?:\s+\((?P<detail>.*)\))?(?:,|\s|$)")
_NOTICE = re.compile(r"^sender (?P<kind>non-delivery|delay|delivery status|success delivery "
                     r"status) notification: (?P<qid>\w+)$")
_RELAY = re.compile(r"^(?P<name>[^\[\s]*)\[(?P<ip>[^\]]*)\](?::(?P<port>\d+))?$")
_IN_REPLY = re.compile(r"\(in reply to (?P<what>[^)]*?)(?: command)?\)\s*$")


@dataclass(frozen=True, kw_only=True)
class PostfixRecord:
    """One Postfix log line about a message (or about no message: qid None)."""

    line: int
    t: float
    host: str
    daemon: str  # smtp, qmgr, cleanup, bounce, ...
    pid: int | None
    qid: str | None
    #: delivery, message-id, queued, arrival, notification, removed, expired, other
    kind: str
    text: str  # the message after "QID: "
    fields: dict[str, str] = field(default_factory=dict)
    rcpt: str | None = None
    orig_rcpt: str | None = None
    relay: str | None = None  # "127.0.0.1[127.0.0.1]:2525", "none", "local"
    relay_endpoint: Endpoint | None = None
    status: str | None = None  # sent, deferred, bounced, expired, ...
    detail: str | None = None  # the text in parentheses after status=
    reply: Reply | None = None  # the remote reply the detail quotes
    in_reply_to: str | None = None  # "RCPT TO", "end of DATA", ...
    dsn: str | None = None
    delay: float | None = None
    message_id: str | None = None
    sender: str | None = None
    notification: str | None = None  # the queue id of a notice bounce(8) made
    notification_kind: str | None = None  # non-delivery, delay, delivery status


def sniff(head: str) -> bool:
    opts = ReadOptions(year=2000)
    for line in head.splitlines()[:50]:
        got = parse_syslog_line(line, opts)
        if isinstance(got, SyslogLine) and _postfix_tag(got.tag) is not None:
            return True
    return False


def _postfix_tag(tag: str) -> str | None:
    """The daemon name of a Postfix tag ("postfix/smtp" -> "smtp"), or None."""
    if "/" not in tag:
        return None
    daemon = tag.rsplit("/", 1)[1]
    return daemon if daemon in DAEMONS else None


def _address(value: str | None) -> str | None:
    if value is None:
        return None
    return value[1:-1] if value.startswith("<") and value.endswith(">") else value


def _record(n: int, sl: SyslogLine, daemon: str) -> PostfixRecord:
    msg = sl.message
    m = _QID.match(msg)
    base = PostfixRecord(line=n, t=sl.t, host=sl.host, daemon=daemon, pid=sl.pid, qid=None,
                         kind="other", text=msg)
    if m is None:
        return base
    qid, rest = m["qid"], m["rest"]
    pairs = {p["k"]: p["v"] for p in _PAIR.finditer(rest)}
    st = _STATUS.search(rest)
    if st is not None and "to" in pairs:
        detail = st["detail"]
        relay = pairs.get("relay")
        rm = _RELAY.match(relay or "")
        reply = find_reply(detail) if detail else None
        into = _IN_REPLY.search(detail or "")
        delay = pairs.get("delay", "")
        return replace(base, qid=qid, kind="delivery", text=rest, fields=pairs,
            rcpt=_address(pairs.get("to")), orig_rcpt=_address(pairs.get("orig_to")),
            relay=relay, relay_endpoint=(rm["ip"], int(rm["port"]) if rm["port"] else None)
            if rm else None, status=st["status"], detail=detail, reply=reply,
            in_reply_to=into["what"] if into else None, dsn=pairs.get("dsn"),
            delay=float(delay) if re.fullmatch(r"\d+(?:\.\d+)?", delay) else None)
    if st is not None and st["status"] == "expired":
        return replace(base, qid=qid, kind="expired", text=rest, fields=pairs,
                             status="expired", sender=_address(pairs.get("from")),
                             detail=st["detail"])
    if rest.startswith("message-id="):
        return replace(base, qid=qid, kind="message-id", text=rest,
                             message_id=rest[len("message-id="):].strip() or None)
    nm = _NOTICE.match(rest)
    if nm is not None:
        return replace(base, qid=qid, kind="notification", text=rest,
                             notification=nm["qid"], notification_kind=nm["kind"])
    if rest.strip() == "removed":
        return replace(base, qid=qid, kind="removed", text=rest)
    if "from" in pairs and ("nrcpt" in pairs or "size" in pairs):
        return replace(base, qid=qid, kind="queued", text=rest, fields=pairs,
                             sender=_address(pairs.get("from")))
    if rest.startswith(("client=", "uid=")):
        return replace(base, qid=qid, kind="arrival", text=rest, fields=pairs)
    return replace(base, qid=qid, kind="other", text=rest, fields=pairs)


def read_postfix(path: str, text: str, options: ReadOptions | None = None) -> EvidenceFile:
    opts = options or ReadOptions()
    records: list[PostfixRecord] = []
    problems: list[Problem] = []
    others = 0
    resolution = 0.0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        got = parse_syslog_line(line, opts)
        if isinstance(got, str):
            problems.append(Problem(path, n, got))
            continue
        if got is None:
            problems.append(Problem(path, n, "not a syslog or journal line"))
            continue
        daemon = _postfix_tag(got.tag)
        if daemon is None:
            others += 1
            continue
        resolution = max(resolution, got.resolution)
        records.append(_record(n, got, daemon))
    notes = (f"{others} line(s) of other programs skipped",) if others else ()
    if not records and not problems:
        problems.append(Problem(path, 0, "no Postfix lines in it"))
    return EvidenceFile(path=path, kind="postfix", title="Postfix mail log",
                        records=tuple(records), problems=tuple(problems),
                        resolution=resolution or 1.0, notes=notes)
