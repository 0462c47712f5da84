"""Bounces on demand, the I/O half: sending what a rule's `bounce:` asks for.

When a rule with `bounce:` decides an accepted message, the SMTP session
makes one call, `after_message(...)`, after the message is stored and its
reply decided. That call only schedules a background task on the server's
loop and returns: the reply to the client is neither delayed nor changed,
and the capture is already queued. The task waits for the store's commit
(the message is durable first), waits the rule's `after`, builds the
reports (harness/analysis/bounces.py, pure) and sends each to the original
envelope sender, MAIL FROM:<>, through the next hop the harness was given
(`harness serve --bounce-via HOST:PORT`, `bounce_via:` in the --config
file, `Harness(bounce_via=...)`), with aiosmtplib.

Whatever happens is recorded with the session: transcript "I" lines (what
was scheduled, sent with the next hop's reply, skipped with the reason,
failed with the error) and a row in the store's `bounces` table. A failure
to send is one try, recorded, never retried and never raised into a session.
`close(ctx)` (when a listener stops) cancels what is still waiting and
records it as cancelled."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.analysis.bounces import Accepted, Report, Skipped, plan_reports
from harness.scenario.model import Bounce, RcptMatcher, Rule
from harness.store import bounces as bounce_store

if TYPE_CHECKING:
    from harness.smtp.listener import ListenerContext

log = logging.getLogger("harness.bounces")

#: Seconds for the whole conversation with the next hop.
SEND_TIMEOUT = 30.0
NO_NEXT_HOP = ("no next hop to send it through: start the harness with --bounce-via HOST:PORT "
               "(bounce_via: in a --config file, Harness(bounce_via=...))")

#: Bounces waiting or being sent, per listener (keyed by the context's id:
#: ListenerContext is a mutable dataclass, so not hashable).
_TASKS: dict[int, set[asyncio.Task[None]]] = {}


@dataclass(frozen=True)
class _Job:
    ctx: ListenerContext
    session_id: int
    message_id: int
    rule: str
    bounce: Bounce
    accepted: Accepted
    hostname: str
    scheduled_at: float


def _rule(ctx: ListenerContext, name: str | None) -> Rule | None:
    if name is None:
        return None
    return next((r for r in ctx.scenario.rules if r.name == name), None)


def _recipients(rule: Rule, rcpts: Iterable[str]) -> tuple[str, ...]:
    """The recipients the bounce is about: those the rule's `when: rcpt`
    names, or all of the message's when it names none."""
    matchers = [m for m in rule.when if isinstance(m, RcptMatcher)]
    rcpts = tuple(rcpts)
    if not matchers:
        return rcpts
    return tuple(r for r in rcpts if all(m.pattern.matches(r) for m in matchers))


def via_text(ctx: ListenerContext) -> str | None:
    via = ctx.bounce_via
    if via is None:
        return None
    host, port = via
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _note(ctx: ListenerContext, sid: int, text: str, rule: str | None) -> None:
    """A transcript "I" line for the session (which may be over by now)."""
    ctx.note(sid, text, rule)


def after_message(ctx: ListenerContext, *, session_id: int, rule: str | None, accepted: bool,
                  mail_from: str, rcpts: Iterable[str], content: bytes, message_id: int,
                  dsn: dict[str, Any], client_ip: str | None, helo: str | None) -> None:
    """The session's one call: schedule the deciding rule's bounce, if it has
    one and the message was accepted. Never raises, never waits."""
    try:
        found = _rule(ctx, rule)
        if found is None or found.bounce is None or not accepted:
            return
        about = _recipients(found, rcpts)
        if not about:
            return
        notify = {r: tuple(p.get("notify") or ()) for r, p in
                  (dsn.get("recipients") or {}).items()}
        orcpt = {r: p["orcpt"] for r, p in (dsn.get("recipients") or {}).items()
                 if p.get("orcpt")}
        now = ctx.engine.clock()
        job = _Job(ctx=ctx, session_id=session_id, message_id=message_id, rule=found.name,
                   bounce=found.bounce, hostname=ctx.scenario.server.hostname,
                   scheduled_at=now, accepted=Accepted(
                       mail_from=mail_from, rcpts=about, raw=content, received_at=now,
                       client_ip=client_ip, helo=helo, envid=dsn.get("envid"),
                       ret=dsn.get("ret"), notify=notify, orcpt=orcpt))
        b = found.bounce
        what = f"{b.kind.value}" + (f" {b.status}" if b.status else "")
        _note(ctx, session_id, f"bounce scheduled: {what} about {', '.join(about)} to "
              f"<{mail_from}> in {b.after:g}s via {via_text(ctx) or '(no next hop)'}",
              found.name)
        task = asyncio.get_running_loop().create_task(_run(job))
        tasks = _TASKS.setdefault(id(ctx), set())
        tasks.add(task)
        task.add_done_callback(lambda t: _forget(id(ctx), t))
    except Exception as e:  # a bounce must never break the session that accepted
        ctx.errors.append(e)
        log.exception("scheduling a bounce failed")


def _forget(key: int, task: asyncio.Task[None]) -> None:
    tasks = _TASKS.get(key)
    if tasks is not None:
        tasks.discard(task)
        if not tasks:
            del _TASKS[key]


def pending(ctx: ListenerContext) -> int:
    """How many bounces of this listener are waiting or being sent."""
    return len(_TASKS.get(id(ctx), ()))


async def close(ctx: ListenerContext) -> None:
    """Cancel this listener's waiting bounces (recorded as cancelled)."""
    tasks = list(_TASKS.get(id(ctx), ()))
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5)


async def _run(job: _Job) -> None:
    ctx = job.ctx
    b = job.bounce
    reports: list[Report] = []
    try:
        await ctx.store.barrier()  # the message is durable before anything leaves
        if b.after > 0:
            await asyncio.sleep(b.after)
        reports, skipped = plan_reports(
            b.kind.value, job.accepted, status=b.status, diagnostic=b.diagnostic,
            hostname=job.hostname, now=ctx.engine.clock())
        for s in skipped:
            _skipped(job, s)
        for report in reports:
            await _send_one(job, report)
    except asyncio.CancelledError:
        _finish(job, outcome="cancelled", report=None, recipients=job.accepted.rcpts,
                error="the harness stopped before the bounce was sent")
        raise
    except Exception as e:  # a builder bug: recorded like a failure to send
        ctx.errors.append(e)
        _finish(job, outcome="failed", report=None, recipients=job.accepted.rcpts,
                error=f"could not build the report: {type(e).__name__}: {e}")


def _skipped(job: _Job, s: Skipped) -> None:
    _finish(job, outcome="skipped", report=None, recipients=s.recipients, error=s.reason)


async def _send_one(job: _Job, report: Report) -> None:
    ctx = job.ctx
    if ctx.bounce_via is None:
        _finish(job, outcome="failed", report=report, recipients=report.recipients,
                error=NO_NEXT_HOP)
        return
    try:
        reply = await send(ctx.bounce_via, report, helo=job.hostname)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        _finish(job, outcome="failed", report=report, recipients=report.recipients,
                error=_error_text(e))
        return
    _finish(job, outcome="sent", report=report, recipients=report.recipients, reply=reply)


def _error_text(e: BaseException) -> str:
    import aiosmtplib

    if isinstance(e, aiosmtplib.SMTPRecipientRefused):
        return f"the next hop refused the recipient: {e.code} {e.message}"
    if isinstance(e, aiosmtplib.SMTPResponseException):
        return f"the next hop answered {e.code} {e.message}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def send(via: tuple[str, int], report: Report, *, helo: str,
               timeout: float = SEND_TIMEOUT) -> str:  # noqa: ASYNC109 - aiosmtplib's per step
    """One report to the next hop, in plain SMTP (the hop is one the user
    names, like a relayhost); the reply to the message, or raises."""
    import aiosmtplib

    host, port = via
    smtp = aiosmtplib.SMTP(hostname=host, port=port, local_hostname=helo, timeout=timeout,
                           start_tls=False)
    await smtp.connect()
    try:
        await smtp.ehlo()
        await smtp.mail(report.mail_from)  # "" is MAIL FROM:<>
        await smtp.rcpt(report.to)
        response = await smtp.data(report.raw)
        return f"{response.code} {response.message}"
    finally:
        with contextlib.suppress(Exception):
            await smtp.quit()
        smtp.close()


def _finish(job: _Job, *, outcome: str, report: Report | None, recipients: Iterable[str],
            reply: str | None = None, error: str | None = None) -> None:
    ctx = job.ctx
    b = job.bounce
    recipients = tuple(recipients)
    status = report.status if report is not None else b.status
    about = ", ".join(recipients)
    via = via_text(ctx)
    what = f"{b.kind.value}" + (f" {status}" if status else "")
    if outcome == "sent":
        text = f"bounce sent: {what} about {about} to <{job.accepted.mail_from}> via {via}: {reply}"
    elif outcome == "skipped":
        text = f"bounce not sent: {what} about {about}: {error}"
    else:
        text = f"bounce {outcome}: {what} about {about} to <{job.accepted.mail_from}>: {error}"
    _note(ctx, job.session_id, text, job.rule)
    bounce_store.record(
        ctx.store, session_id=job.session_id, message_id=job.message_id, rule=job.rule,
        kind=b.kind.value, status=status, recipients=list(recipients),
        mail_to=job.accepted.mail_from, via=via, scheduled_at=job.scheduled_at,
        done_at=ctx.engine.clock(), outcome=outcome, reply=reply, error=error,
        subject=report.subject if report is not None else None,
        raw=report.raw if report is not None else None)
