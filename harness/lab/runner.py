"""The lab: a real MTA sends a scenario's test message to the harness; what it
did is observed and judged against the scenario's `expect:`.

One run: a harness with the scenario (the remote MX), a second harness that
collects what comes back (the NDRs, routed there by the sender's address),
and a private Postfix relaying to the first. The harness's clock runs
`speed` times faster than the wall clock, so a scenario written in real
terms ("greylisted for 60 s") plays out against an MTA set for fast
retries; every time in the verdict is in scenario time.

The verdict lists each expectation with what was observed and why it passed
or failed; `verdicts.py` renders it (terminal, JUnit XML, HTML)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from harness.analysis.dsn import Ndr, parse_ndr
from harness.analysis.queue_series import QueueSample, sample
from harness.lab.base import LabMta, QueueEntry
from harness.lab.postfix import PostfixLab
from harness.records import Outcome as AttemptOutcome
from harness.scenario.model import Outcome, Scenario, Send
from harness.store import Location
from harness.store.db import Attempt
from harness.testing import Harness

#: Postfix lab timings (real seconds). With speed 60 a 1 s backoff is a
#: minute of scenario time: greylisting windows and retry intervals read as
#: they would on a production MTA with minute-scale retries.
POSTFIX_LAB = {
    "queue_run_delay": "1s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
    "maximal_queue_lifetime": "12s",
    "bounce_queue_lifetime": "12s",
    "delay_warning_time": "4s",
    "smtp_tls_security_level": "may",
    # a server that never answers is given up on sooner (the default is 300s)
    "smtp_helo_timeout": "2s",
    "smtp_connect_timeout": "2s",
}
SENDER = "lab-sender@sender.lab.test"


@dataclass
class Check:
    name: str
    expected: str
    observed: str
    ok: bool
    why: str = ""


@dataclass
class RecipientTimeline:
    rcpt: str
    attempts: list[Attempt]
    outcome: str  # delivered | bounced | deferred


@dataclass
class Verdict:
    scenario: str
    summary: str
    mta: str
    passed: bool
    checks: list[Check]
    timelines: list[RecipientTimeline]
    ndrs: list[dict[str, Any]]
    queue: list[QueueEntry]
    duration: float
    speed: float
    maillog_tail: str = ""
    notes: list[str] = field(default_factory=list)
    #: the sending MTA's whole queue (bounces included) sampled during the
    #: run, in scenario time: depth, oldest message's age, deferred count
    queue_samples: list[QueueSample] = field(default_factory=list)
    #: The MTA's log lined up with the harness (harness.evidence/1 JSON).
    evidence: dict[str, Any] = field(default_factory=dict)
    kept: str = ""  # the folder of a kept run (harness lab --keep), else ""
    mta_log: str = ""  # the MTA log's file name in it


def _message(send: Send, mail_from: str, token: str) -> bytes:
    body = b"This is a test message from the SMTP Harness lab.\r\n"
    if send.size > len(body):
        line = b"The quick brown fox jumps over the lazy dog 0123456789.\r\n"
        body += line * ((send.size - len(body)) // len(line) + 1)
    head = (f"From: <{mail_from}>\r\nTo: {', '.join(f'<{r}>' for r in send.rcpt)}\r\n"
            f"Subject: {send.subject} [{token}]\r\nMessage-ID: <{token}@sender.lab.test>\r\n"
            "Date: Sun, 29 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    return head.encode() + body


class _Clock:
    """Scenario time: starts at the wall clock and runs `speed` times faster."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.t0 = time.time()

    def __call__(self) -> float:
        return self.t0 + (time.time() - self.t0) * self.speed


def run_postfix(scenario: Scenario, **kw: Any) -> Verdict:
    """Send the scenario's test message through a private Postfix and judge."""
    return run_lab(scenario, mta="postfix", **kw)


def run_lab(scenario: Scenario, *, mta: str = "postfix", speed: float = 60.0,
            window: float = 20.0, settings: dict[str, str] | None = None,
            seed: int | None = 1, progress: Callable[[str], None] | None = None,
            keep: Path | None = None, store: Location | None = None) -> Verdict:
    """Send the scenario's test message through a private MTA (postfix or
    exim) relaying to a harness with the scenario, and judge what it did.
    `keep`: a folder for the run's MTA log, stores and lab.json (evidence).
    `store`: where the harness under test records (a postgresql:// URL:
    judged on this run's sessions only; other records stay)."""
    from harness.lab.evidence import LOG_NAME, keep_dir, lab_evidence  # (evidence)

    kept = keep_dir(keep) if keep else None
    send = scenario.send or Send()
    # The scenario's own sender (its SPF, DMARC and mail_from rules see it).
    # Postfix and Exim route mail to that one address, their bounces, to the
    # collector: the harness under test may refuse the sender's domain.
    mail_from = send.mail_from or SENDER
    token = uuid.uuid4().hex[:12]
    say = progress or (lambda _msg: None)
    clock = _Clock(speed)
    started = time.monotonic()
    with Harness(scenario, seed=seed, clock=clock,
                 store=store if store is not None else kept / "harness.db" if kept else None
                 ) as target, \
            Harness("accept", clock=clock,
                    store=kept / "collector.db" if kept else None) as collector:
        lab_settings = {**(POSTFIX_LAB if mta == "postfix" else {}), **(settings or {})}
        lab = _start_mta(mta, target, collector, mail_from, lab_settings)
        try:
            say(f"{scenario.name}: {mta} -> harness {target.host}:{target.port}")
            submitted = time.time()  # no queue entry of this run arrived earlier
            queue_id = lab.submit_smtp(mail_from, list(send.rcpt),
                                       _message(send, mail_from, token))
            expected = scenario.expect.outcome if scenario.expect else None
            returns = collector  # the sender's bounces are routed there
            deadline = time.monotonic() + window
            queue: list[QueueEntry] = []
            samples = _Sampler(clock, submitted)
            empty = 0
            while time.monotonic() < deadline:
                # An MTA offers no event for "this message left the queue":
                # poll its queue (50 ms); the harness side is read as it is.
                # Two empty looks in a row: a message moving between queue
                # directories (active -> deferred) is briefly in none.
                # Each look is also a sample of the whole queue over time.
                queue = samples.take(lab, queue_id)
                empty = 0 if queue else empty + 1
                if empty >= 2:
                    break
                if not queue:
                    time.sleep(0.05)
                    continue
                if expected is Outcome.DEFERRED and _deferred_enough(
                        target, returns, scenario, send):
                    break
                time.sleep(0.05)
            queue = samples.take(lab, queue_id, force=True)
            if not queue:
                with contextlib.suppress(Exception):
                    lab.wait_queue_empty(window)  # the bounce, if any, on its way out
            target.wait_idle()
            collector.wait_idle()
            maillog = lab.maillog()
        finally:
            lab.stop()
        verdict = _judge(scenario, send, target, returns, queue, token, speed, lab_settings,
                         mta)
        kicks = getattr(lab, "kicks", 0)
        if kicks:
            verdict.notes.append(
                f"Postfix put the message off in its incoming queue {kicks} time(s) (its queue"
                " manager found it still locked by the agent that deferred it); the lab took"
                " it up at once (see PostfixLab.queue)")
        verdict.duration = time.monotonic() - started
        verdict.queue_samples = samples.samples
        verdict.maillog_tail = "\n".join(maillog.splitlines()[-40:])
        # (evidence) the MTA's own log beside the harness's records
        verdict.evidence = lab_evidence(maillog, mta, target, collector, clock.t0,
                                        speed, lab_settings, keep, scenario.name)
        verdict.kept, verdict.mta_log = (str(keep), LOG_NAME[mta]) if keep else ("", "")
    say(f"{scenario.name}: {'PASS' if verdict.passed else 'FAIL'}")
    return verdict


def _start_mta(mta: str, target: Harness, collector: Harness, mail_from: str,
               settings: dict[str, str]) -> LabMta:
    lab: LabMta
    if mta == "postfix":
        lab = PostfixLab((target.host, target.port), settings=settings,
                         transports={mail_from: (collector.host, collector.port)})
    elif mta == "exim":
        from harness.lab.exim import EximLab

        lab = EximLab((target.host, target.port), settings=settings,
                      routes={mail_from: (collector.host, collector.port)})
    else:
        raise ValueError(f"no lab for MTA {mta!r}: postfix or exim")
    try:
        return lab.start()
    except BaseException:
        lab.stop()  # nothing of a half-started instance is left behind
        raise


class _Sampler:
    """Samples of the lab MTA's queue in scenario time. Arrival times are the
    MTA's (Postfix counts whole seconds, so an age is known to a second of
    wall time: `speed` seconds of scenario time; an arrival is taken as no
    earlier than the submission, which the lab timed). A sample is kept when
    the queue changed, or half a second (wall) after the last one kept."""

    def __init__(self, clock: _Clock, submitted: float) -> None:
        self.clock = clock
        self.submitted = submitted
        self.samples: list[QueueSample] = []
        self._kept_at = 0.0

    def take(self, lab: LabMta, queue_id: str, *, force: bool = False) -> list[QueueEntry]:
        entries = lab.queue()
        wall = time.time()
        c = self.clock
        s = sample(c(), [(c.t0 + (max(e.arrival, self.submitted) - c.t0) * c.speed,
                          e.status == "deferred") for e in entries])
        last = self.samples[-1] if self.samples else None
        if force or last is None or (s.depth, s.deferred) != (last.depth, last.deferred) \
                or wall - self._kept_at >= 0.5:
            self.samples.append(s)
            self._kept_at = wall
        return [e for e in entries if e.queue_id == queue_id]


def _queued(lab: LabMta, queue_id: str) -> list[QueueEntry]:
    """The message's queue entries (its bounces have other queue IDs)."""
    return [q for q in lab.queue() if q.queue_id == queue_id]


def _deferred_enough(target: Harness, collector: Harness, scenario: Scenario,
                     send: Send) -> bool:
    """Seen enough of a deferral: the attempts it expects, and the delay
    notice when it expects one."""
    expect = scenario.expect
    want = (expect.min_attempts if expect else None) or 2
    timelines = timeline(target, list(send.rcpt))
    if not all(len(timelines[r]) >= want for r in send.rcpt):
        return False
    if expect is not None and expect.delay_notice:
        return any((n := parse_ndr(m.raw or b"")) is not None and n.is_delay
                   for m in collector.messages())
    return True


def timeline(target: Harness, rcpts: list[str]) -> dict[str, list[Attempt]]:
    """Each recipient's delivery attempts as the sending MTA made them: the
    pair's verdicts, and the connections that ended before any recipient
    was named (a 421 banner, a drop, a hang, broken TLS), which an MTA
    counts as attempts too. The lab sends one message, so every connection
    belongs to it."""
    pair = {r: target.attempts(rcpt=r) for r in rcpts}
    by_session = {r: {a.session_id for a in pair[r]} for r in rcpts}
    out: dict[str, list[Attempt]] = {r: list(pair[r]) for r in rcpts}
    for s in target.sessions():
        replies = [e for e in s.events if e.direction == "S"]
        if any(e.direction == "C" and e.text.upper().startswith("RCPT") for e in s.events):
            continue  # the pair's own attempts say what happened here
        last = replies[-1] if replies else None
        code = int(last.text[:3]) if last and last.text[:3].isdigit() else None
        reason = s.end_reason or ""
        if reason.startswith(("drop", "reset", "hang", "tls_fail", "TLS")):
            code = None  # the connection broke: the last reply is not the verdict
        elif code is not None and code < 400:
            # everything went well and the client left without naming a
            # recipient (a cached connection closed, a probe): no attempt
            continue
        outcome = ("deferred" if code is not None and 400 <= code < 500 else
                   "rejected" if code is not None and code >= 500 else
                   reason.split(" ")[0] or "lost")
        for r in rcpts:
            if s.id in by_session[r]:
                continue
            out[r].append(Attempt(
                id=0, session_id=s.id, t=s.started_at, mail_from="", rcpt=r,
                phase=(last.phase or "connect") if last else "connect", code=code,
                enhanced=None, reply=last.text if last else None,
                # a connection-level attempt: its outcome says how it ended
                outcome=cast(AttemptOutcome, outcome if code is None or code >= 400
                              else f"{outcome} ({reason})"),
                rule=last.rule if last else None, message_id=None))
    for r in rcpts:
        out[r].sort(key=lambda a: a.t)
        previous: float | None = None
        for a in out[r]:
            a.interval = None if previous is None else a.t - previous
            previous = a.t
    return out


def _judge(scenario: Scenario, send: Send, target: Harness, collector: Harness,
           queue: list[QueueEntry], token: str, speed: float,
           lab_settings: dict[str, str], mta: str = "postfix") -> Verdict:
    expect = scenario.expect
    stored = target.messages()
    reports: list[tuple[Ndr, int]] = []
    for m in collector.messages():
        if m.mail_from != "":
            continue  # bounces come from the null sender
        ndr = parse_ndr(m.raw or b"")
        if ndr is not None:
            reports.append((ndr, m.id))
    failures = [n for n, _ in reports if not n.is_delay]
    delays = [n for n, _ in reports if n.is_delay]
    queued = {r.lower() for q in queue for r in q.recipients}
    timelines = []
    per_rcpt = timeline(target, list(send.rcpt))
    for rcpt in send.rcpt:
        attempts = per_rcpt[rcpt]
        # delivered: a stored copy the harness answered with 2xx (it stores
        # what it refuses after the dot too, and what a fault cut off)
        accepted = {a.message_id for a in attempts if a.outcome == "accepted"}
        got = any(m.id in accepted and token in (m.subject or "") for m in stored)
        failed = any((r.final_recipient or "").lower().endswith(rcpt.lower())
                     for n in failures for r in n.recipients)
        outcome = ("deferred" if rcpt.lower() in queued else "bounced" if failed and not got
                   else "delivered" if got else "bounced" if failed else "deferred")
        timelines.append(RecipientTimeline(rcpt, attempts, outcome))
    checks: list[Check] = []
    if expect is not None and expect.outcome is not None:
        observed = sorted({t.outcome for t in timelines})
        ok = observed == [expect.outcome.value]
        checks.append(Check("outcome", expect.outcome.value, ", ".join(observed), ok,
                            "" if ok else _why_outcome(timelines)))
    if expect is not None and (expect.min_attempts or expect.max_attempts):
        for t in timelines:
            n = len(t.attempts)
            lo, hi = expect.min_attempts, expect.max_attempts
            ok = (lo is None or n >= lo) and (hi is None or n <= hi)
            want = (f"{lo}..{hi}" if lo and hi else f">= {lo}" if lo else f"<= {hi}")
            checks.append(Check(f"attempts {t.rcpt}", want, f"{n}: {_intervals(t, speed)}", ok,
                                "" if ok else f"the harness saw {n} attempt(s)"))
    if expect is not None and expect.ndr is not None:
        want_ndr = expect.ndr
        rows = [r for n in failures for r in n.recipients]

        def seen(values: list[str | None]) -> str:
            return ", ".join(str(v) for v in values) if rows else "no NDR arrived"

        if want_ndr.status is not None:
            ok = any(r.status == want_ndr.status for r in rows)
            checks.append(Check("NDR status", want_ndr.status,
                                seen([r.status for r in rows]), ok,
                                "" if ok else "no recipient in the NDR has this status"))
        if want_ndr.action is not None:
            ok = any((r.action or "") == want_ndr.action for r in rows)
            checks.append(Check("NDR action", want_ndr.action,
                                seen([r.action for r in rows]), ok,
                                "" if ok else "no recipient in the NDR has this action"))
        if want_ndr.diagnostic is not None:
            ok = any(want_ndr.diagnostic in (r.diagnostic_text or "") for r in rows)
            checks.append(Check("NDR diagnostic", f"contains {want_ndr.diagnostic!r}",
                                seen([r.diagnostic_text for r in rows]), ok,
                                "" if ok else "the diagnostic code does not carry it"))
    if expect is not None and expect.interval is not None:
        for t in timelines:
            gaps = [a.interval for a in t.attempts if a.interval is not None]
            # Postfix and Exim keep their retry times in whole seconds: a retry
            # may come up to a second (of wall time: `speed` seconds here)
            # before its backoff is up; only an interval short by more is early
            bad = [g for g in gaps
                   if not (expect.interval.holds(g) or expect.interval.holds(g + speed))]
            checks.append(Check(f"intervals {t.rcpt}", str(expect.interval),
                                ", ".join(_span(g) for g in gaps) or "no retry", not bad,
                                "" if not bad else "outside the range: "
                                + ", ".join(_span(g) for g in bad)))
    if expect is not None and expect.delay_notice is not None:
        ok = bool(delays) == expect.delay_notice
        checks.append(Check("delay notice", "yes" if expect.delay_notice else "no",
                            f"{len(delays)} delay notice(s)", ok))
    ndr_rows = [{"message": mid, "delay": n.is_delay, "format": n.format,
                 "recipients": [{"recipient": r.final_recipient, "action": r.action,
                                 "status": r.status, "diagnostic": r.diagnostic_text,
                                 "remote_mta": r.remote_mta} for r in n.recipients]}
                for n, mid in reports]
    notes = []
    if not checks:
        notes.append("the scenario has no expect: nothing to judge")
    if mta == "postfix":
        notes += _retry_notes(timelines, speed, lab_settings)
    return Verdict(scenario=scenario.name, summary=scenario.summary, mta=mta,
                   passed=bool(checks) and all(c.ok for c in checks), checks=checks,
                   timelines=timelines, ndrs=ndr_rows, queue=queue, duration=0.0,
                   speed=speed, notes=notes)


def _retry_notes(timelines: list[RecipientTimeline], speed: float,
                 settings: dict[str, str]) -> list[str]:
    """Each retried recipient's attempts against Postfix's retry model for
    the lab's settings (in lab seconds: scenario time / speed)."""
    from harness.analysis.retry import compare, predict

    keys = ("queue_run_delay", "minimal_backoff_time", "maximal_backoff_time",
            "maximal_queue_lifetime", "bounce_queue_lifetime", "delay_warning_time")
    model = predict("postfix", {k: settings[k] for k in keys if k in settings})
    notes = []
    for t in timelines:
        if len(t.attempts) < 2:
            continue
        observed = [a.t / speed for a in t.attempts]
        result = compare(model, observed, tolerance=1.5)
        notes.append(f"{t.rcpt}: retry model (Postfix, lab settings): {result.verdict}")
    return notes


def _intervals(t: RecipientTimeline, speed: float) -> str:
    parts = []
    for a in t.attempts:
        code = a.code if a.code is not None else a.outcome
        parts.append(f"{code}" if a.interval is None else f"+{_span(a.interval)} {code}")
    return ", ".join(parts) or "none"


def _span(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f}s".replace(".0s", "s")
    if seconds < 5400:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _why_outcome(timelines: list[RecipientTimeline]) -> str:
    return "; ".join(f"{t.rcpt}: {t.outcome} after {len(t.attempts)} attempt(s)"
                     for t in timelines)
