"""The probe's judgement: the steps of each SMTP conversation in, a verdict
per MX and overall out (would deliver, would defer, would bounce, and why),
as a sending MTA would act on the same replies.

How a sender acts, which the verdicts follow (RFC 5321 sections 4.2 and 5,
and what Postfix, Exim and Exchange do by default):

- A failure before a transaction starts (no connection, a 4xx or 5xx
  banner, a 4xx to EHLO/HELO, a broken TLS handshake, a timeout or a
  connection lost) belongs to that host: the sender moves on to the next MX,
  and when none is left it keeps the message queued (defer). A 5xx banner
  is skipped the same way (Postfix's smtp_skip_5xx_greeting default).
- The first MX that answers within a transaction decides: 2xx to RCPT (and,
  with --send, to the message) delivers, 4xx defers, 5xx bounces; a 5xx to
  HELO/EHLO (after the HELO fall-back) bounces too.
- A refused STARTTLS (4xx/5xx) changes nothing for an opportunistic sender,
  which goes on in plain text; certificate problems likewise only matter
  to senders that verify (noted, not judged).
- DNS decides before any connection: a domain that does not exist, a null
  MX (RFC 7505) or no host at all bounce; a lookup that fails for now defers.

`ProbeReport.as_dict()` is the JSON of `harness probe --json` and of the
API, schema `harness.probe/1` (fields are only ever added). Exit codes:
`EXIT_CODES`. Pure: no I/O; the replies are explained from the catalogue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.analysis.certificate import CertReport
from harness.analysis.codes import explain_reply
from harness.analysis.mx import DnsReport, Lookup, MxHost

__all__ = ["EXIT_CODES", "SCHEMA", "STEP_TIMEOUTS", "MxResult", "ProbeReport", "Step",
           "TlsInfo", "judge_mx", "overall"]

SCHEMA = "harness.probe/1"

Verdict = Literal["deliver", "defer", "bounce"]
VERDICT_TEXT: dict[str, str] = {"deliver": "would deliver", "defer": "would defer",
                                "bounce": "would bounce"}
#: What `harness probe` exits with, for scripts (1: an error, 2: bad usage).
EXIT_CODES: dict[str, int] = {"deliver": 0, "defer": 3, "bounce": 4}

#: Seconds each step may take: RFC 5321 section 4.5.3.2's minimums (in the
#: comment) are for MTAs with a queue; a person waiting at a prompt wants to
#: know sooner, so the defaults are shorter. `harness probe --timeout STEP=S`.
STEP_TIMEOUTS: dict[str, tuple[float, str]] = {
    "connect": (10.0, "no RFC value; TCP's own is minutes"),
    "banner": (30.0, "RFC 5321: 5 minutes for the initial 220"),
    "ehlo": (30.0, "RFC 5321: none given; MTAs use 5 minutes"),
    "starttls": (30.0, "the 220 and the TLS handshake"),
    "mail": (30.0, "RFC 5321: 5 minutes"),
    "rcpt": (30.0, "RFC 5321: 5 minutes"),
    "data": (30.0, "RFC 5321: 2 minutes for the 354"),
    "message": (60.0, "RFC 5321: 10 minutes after the final dot"),
    "rset": (10.0, "RFC 5321: none given"),
    "quit": (10.0, "RFC 5321: none given"),
}

#: Steps before a transaction: a failure there sends a sender to the next MX.
_SESSION_STEPS = ("connect", "banner", "ehlo", "helo", "starttls", "tls", "ehlo-tls")
_TRANSACTION_STEPS = ("mail", "rcpt", "data", "message")


@dataclass(frozen=True, kw_only=True)
class Step:
    """One step of a conversation: what was sent, what came back, how long."""

    name: str  # connect banner ehlo helo starttls tls ehlo-tls mail rcpt data message rset quit
    sent: str | None = None  # the command as sent ("RCPT TO:<b@lab.test>")
    code: int | None = None
    reply: str | None = None  # the reply as received, its lines joined with "\n"
    seconds: float = 0.0
    error: str | None = None  # no reply: refused, timed out, connection lost, ...
    detail: str | None = None  # what the step learnt (the TLS version and cipher, ...)

    @property
    def failed(self) -> bool:
        return self.error is not None or (self.code is not None and self.code >= 400)

    def explanation(self) -> dict[str, Any] | None:
        """The reply explained from the status-code catalogue."""
        if self.reply is None:
            return None
        expl = explain_reply(self.reply.split("\n")[-1] if self.name != "banner"
                             else self.reply.split("\n")[0])
        info, code = expl.enhanced, expl.enhanced_code
        generic = code is not None and code.endswith(".0.0")
        if info is None or (generic and expl.basic is not None):
            # "2.0.0 Other undefined status" says less than "250 Requested
            # action okay": the basic code's entry then
            info, code = expl.basic, expl.basic_code
        if info is None:
            return None
        return {"code": code, "title": info.title, "meaning": info.meaning,
                "outcome": expl.outcome, "checks": list(expl.checks[:3])}

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.name, "sent": self.sent, "code": self.code, "reply": self.reply,
                "seconds": round(self.seconds, 4), "error": self.error, "detail": self.detail,
                "explanation": self.explanation()}


@dataclass(frozen=True, kw_only=True)
class TlsInfo:
    version: str | None = None
    cipher: str | None = None
    certificate: CertReport | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "cipher": self.cipher, "error": self.error,
                "certificate": self.certificate.as_dict() if self.certificate else None}


@dataclass(frozen=True, kw_only=True)
class MxResult:
    host: MxHost
    address: str | None = None  # the address the conversation was with
    steps: tuple[Step, ...] = ()
    #: the extensions of the last EHLO (after STARTTLS, those apply)
    extensions: Mapping[str, str] = field(default_factory=dict)
    starttls_offered: bool = False
    size_limit: int | None = None
    banner_name: str | None = None  # the host name the 220 gave
    tls: TlsInfo | None = None
    verdict: Verdict = "defer"
    reason: str = ""
    #: the answer came within a transaction: a sender would not try another MX
    decisive: bool = False
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {**self.host.as_dict(), "label": self.host.label, "address": self.address,
                "steps": [s.as_dict() for s in self.steps],
                "extensions": dict(self.extensions),
                "starttls_offered": self.starttls_offered, "size_limit": self.size_limit,
                "banner_name": self.banner_name,
                "tls": self.tls.as_dict() if self.tls else None,
                "verdict": self.verdict, "verdict_text": VERDICT_TEXT[self.verdict],
                "reason": self.reason, "decisive": self.decisive, "notes": list(self.notes)}


def _reply_line(step: Step) -> str:
    if step.reply is None:
        return step.error or "no reply"
    lines = step.reply.split("\n")
    return lines[-1] if step.name != "banner" else lines[0]


def _why(step: Step) -> str:
    """'550 5.7.1 Unable to relay (Delivery not authorized, message refused)'"""
    if step.reply is None:
        return step.error or "no reply"
    expl = step.explanation()
    title = f" ({expl['title']})" if expl and expl.get("title") else ""
    return f"{_reply_line(step)}{title}"


_AT = {"connect": "connecting", "banner": "the banner", "ehlo": "EHLO", "helo": "HELO",
       "starttls": "STARTTLS", "tls": "the TLS handshake", "ehlo-tls": "EHLO after STARTTLS",
       "mail": "MAIL FROM", "rcpt": "RCPT TO", "data": "DATA", "message": "the end of the message"}


def judge_mx(steps: Sequence[Step], *, send: bool = False, tls: TlsInfo | None = None
             ) -> tuple[Verdict, str, bool, tuple[str, ...]]:
    """(verdict, reason, decisive, notes) for one MX's conversation."""
    notes: list[str] = []
    names = [s.name for s in steps]
    failure: Step | None = None
    for i, s in enumerate(steps):
        if not s.failed or s.name in ("rset", "quit"):
            continue
        if s.name == "connect" and "connect" in names[i + 1:]:
            notes.append(f"{s.sent or 'an address'} did not answer ({s.error}); a sender "
                         "tries the host's next address, as here")
            continue
        if s.name == "ehlo" and "helo" in names[i + 1:]:
            notes.append(f"EHLO refused ({_reply_line(s)}): a sender falls back to HELO, "
                         "without extensions (no SIZE, no STARTTLS, no 8BITMIME)")
            continue
        if s.name == "starttls" and s.code is not None:
            notes.append(f"STARTTLS refused ({_reply_line(s)}): an opportunistic sender goes "
                         "on in plain text; one that requires TLS defers")
            continue
        failure = s
        break
    if tls is not None and tls.certificate is not None and not tls.certificate.ok:
        notes.append("a sender that verifies certificates (MTA-STS, DANE, a required TLS "
                     "auth level) would defer here: " + "; ".join(tls.certificate.problems))
    if failure is None:
        last = steps[-1] if steps else None
        decided = next((s for s in reversed(steps) if s.name in ("message", "rcpt")), None)
        if decided is None:
            return "defer", (f"the conversation ended at {_AT.get(last.name, last.name)}"
                             if last else "nothing was tried"), False, tuple(notes)
        if decided.name == "message":
            return "deliver", f"the message was accepted: {_why(decided)}", True, tuple(notes)
        tail = "" if send else " (the content was not sent: --send tests DATA too)"
        return ("deliver", f"the recipient was accepted at RCPT TO: {_why(decided)}{tail}",
                True, tuple(notes))
    at = _AT.get(failure.name, failure.name)
    if failure.error is not None:
        if failure.name == "connect":
            return "defer", f"unreachable: {failure.error}", False, tuple(notes)
        return ("defer", f"{failure.error} at {at}: a sender retries, trying the next MX "
                "first", False, tuple(notes))
    assert failure.code is not None
    klass = failure.code // 100
    why = _why(failure)
    if failure.name in ("banner",):
        if klass == 5:
            notes.append("a 5xx banner refuses every message from this client; Postfix "
                         "skips such a host by default (smtp_skip_5xx_greeting), others "
                         "bounce")
        return ("defer" if klass == 4 else "bounce",
                f"refused at the banner: {why}", False, tuple(notes))
    if failure.name in _SESSION_STEPS:
        if klass == 5 and failure.name in ("ehlo", "helo", "ehlo-tls"):
            return "bounce", f"refused at {at}: {why}", True, tuple(notes)
        return ("defer", f"{why} at {at}: a sender tries the next MX, then retries later",
                False, tuple(notes))
    verdict: Verdict = "defer" if klass == 4 else "bounce"
    return verdict, f"{why} at {at}", True, tuple(notes)


@dataclass(frozen=True, kw_only=True)
class ProbeReport:
    sender: str
    recipient: str
    send: bool = False
    dns: DnsReport | None = None  # None: --mx, no DNS asked
    lookups: tuple[Lookup, ...] = ()  # --mx host names looked up with --dns
    results: tuple[MxResult, ...] = ()
    verdict: Verdict = "defer"
    reason: str = ""
    notes: tuple[str, ...] = ()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    @property
    def domain(self) -> str:
        return self.recipient.rpartition("@")[2].lower()

    def as_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "sender": self.sender, "recipient": self.recipient,
                "domain": self.domain, "send": self.send,
                "dns": self.dns.as_dict() if self.dns else None,
                "lookups": [x.as_dict() for x in self.lookups],
                "mx": [r.as_dict() for r in self.results],
                "verdict": self.verdict, "verdict_text": VERDICT_TEXT[self.verdict],
                "reason": self.reason, "notes": list(self.notes),
                "exit_code": self.exit_code}


def overall(dns: DnsReport | None, results: Sequence[MxResult]
            ) -> tuple[Verdict, str, tuple[str, ...]]:
    """The sender's verdict over every MX, in order (see the module docstring)."""
    notes: list[str] = []
    if dns is not None:
        if dns.nxdomain:
            return "bounce", (f"{dns.domain} does not exist (NXDOMAIN): a sender bounces at "
                              "once, 5.1.2 bad destination system"), ()
        if dns.null_mx:
            return "bounce", (f"{dns.domain} publishes a null MX (RFC 7505): it takes no "
                              "mail; a sender bounces at once, 556 5.1.10"), ()
        if dns.temp_error:
            return "defer", (f"DNS failed for now ({dns.temp_error}): a sender keeps the "
                             "message queued and looks again"), ()
        if dns.no_host:
            return "bounce", (f"{dns.domain} has no MX and no address: there is nowhere to "
                              "deliver, a sender bounces (5.1.2)"), ()
    if not results:
        return "defer", "no mail host to try", ()
    skipped: list[str] = []
    for r in results:
        if r.decisive:
            if skipped:
                notes.append("before it, a sender would skip " + "; ".join(skipped))
            return r.verdict, f"{r.host.label}: {r.reason}", tuple(notes)
        skipped.append(f"{r.host.label} ({r.reason})")
    if all(r.verdict == "bounce" for r in results):
        notes.append("every MX refuses at the banner with 5xx: Postfix (skipping them) "
                     "defers, senders that do not skip bounce")
    return "defer", ("no MX took a transaction (" + "; ".join(skipped) + "): a sender keeps "
                     "the message queued and retries until its queue lifetime ends, then "
                     "bounces"), tuple(notes)
