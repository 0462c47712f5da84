"""Lab verdicts rendered: a terminal table, JUnit XML for CI dashboards, and
a self-contained HTML report with a timeline picture per recipient."""

from __future__ import annotations

import html
import json
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.analysis.queue_series import QueueSample, summary
from harness.lab.runner import RecipientTimeline, Verdict, _span


def print_verdicts(verdicts: list[Verdict], console: Console) -> None:
    table = Table(title="Lab verdicts", show_lines=True)
    for col in ("scenario", "verdict", "expected", "observed"):
        table.add_column(col, overflow="fold")
    for v in verdicts:
        expected = "\n".join(f"{c.name}: {c.expected}" for c in v.checks) or "-"
        observed = "\n".join(
            f"[{'green' if c.ok else 'red'}]{escape(c.name)}: {escape(c.observed)}[/]"
            + ("" if c.ok or not c.why else f"\n  [red]why: {escape(c.why)}[/]")
            for c in v.checks) or "; ".join(v.notes)
        queue = _queue_line(v)
        if queue:
            observed += f"\n[dim]{escape(queue)}[/]"
        word = "[green]PASS[/]" if v.passed else "[red]FAIL[/]"
        table.add_row(f"{escape(v.scenario)}\n[dim]{v.mta}, {v.duration:.1f}s[/]", word,
                      escape(expected), observed)
    console.print(table)
    passed = sum(v.passed for v in verdicts)
    console.print(f"{passed} of {len(verdicts)} scenarios passed")


def _queue_line(v: Verdict) -> str:
    """The sender's queue during the run, in one line (scenario time)."""
    if not v.queue_samples:
        return ""
    p = summary(v.queue_samples)
    return (f"sender's queue: peak depth {p['peak_depth']}, deferred {p['peak_deferred']}, "
            f"oldest {_span(float(p['peak_oldest_age']))} ({p['samples']} samples)")


def junit_xml(verdicts: list[Verdict]) -> bytes:
    """JUnit XML: one testsuite per MTA, one testcase per scenario."""
    suites = ET.Element("testsuites", name="smtp-harness lab")
    by_mta: dict[str, list[Verdict]] = {}
    for v in verdicts:
        by_mta.setdefault(v.mta, []).append(v)
    for mta, vs in by_mta.items():
        suite = ET.SubElement(suites, "testsuite", name=f"lab.{mta}", tests=str(len(vs)),
                              failures=str(sum(not v.passed for v in vs)),
                              time=f"{sum(v.duration for v in vs):.3f}")
        for v in vs:
            case = ET.SubElement(suite, "testcase", classname=f"lab.{mta}", name=v.scenario,
                                 time=f"{v.duration:.3f}")
            if not v.passed:
                bad = [c for c in v.checks if not c.ok]
                text = "\n".join(f"{c.name}: expected {c.expected}, observed {c.observed}"
                                 + (f" ({c.why})" if c.why else "") for c in bad)
                failure = ET.SubElement(case, "failure",
                                        message="; ".join(c.name for c in bad) or
                                        "; ".join(v.notes))
                failure.text = text or "\n".join(v.notes)
            out = ET.SubElement(case, "system-out")
            out.text = "\n".join(
                f"{t.rcpt}: {t.outcome}: " + ", ".join(_attempt_text(a) for a in t.attempts)
                for t in v.timelines)
    data: bytes = ET.tostring(suites, encoding="utf-8", xml_declaration=True)
    return data


def _attempt_text(a: Any) -> str:
    code = a.code if a.code is not None else a.outcome
    return f"{code}" if a.interval is None else f"+{_span(a.interval)} {code}"


_COLOURS = {"accepted": "#2e9e6b", "deferred": "#d9a400", "rejected": "#d64545"}


_W, _PAD = 760, 40


def _axis(v: Verdict) -> tuple[float, float]:
    """(start, span) of the scenario-time axis every picture of a verdict
    shares: its attempts and its queue samples, so they line up."""
    times = [a.t for t in v.timelines for a in t.attempts] + [s.t for s in v.queue_samples]
    if not times:
        return 0.0, 1.0
    return min(times), max(1.0, max(times) - min(times))


def _svg(t: RecipientTimeline, axis: tuple[float, float] | None = None) -> str:
    """One recipient's attempts on a time axis, in scenario time; times are
    shown from its first attempt."""
    w, h, pad = _W, 90, _PAD
    if not t.attempts:
        return '<p class="muted">no attempt reached the harness</p>'
    first = t.attempts[0].t
    t0, span = axis or (first, max(1.0, t.attempts[-1].t - first))
    parts = [f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="attempts of '
             f'{html.escape(t.rcpt)}">',
             f'<line x1="{pad}" y1="40" x2="{w - pad}" y2="40" stroke="#9aa5b1"/>']
    for a in t.attempts:
        x = pad + (a.t - t0) / span * (w - 2 * pad)
        colour = _COLOURS.get(a.outcome.split(" ")[0], "#7c5cbf")
        label = str(a.code) if a.code is not None else a.outcome.split(" ")[0]
        tip = html.escape(f"+{_span(a.t - first)}: {a.reply or a.outcome}")
        parts.append(f'<circle cx="{x:.1f}" cy="40" r="11" fill="{colour}"><title>{tip}'
                     f'</title></circle>')
        parts.append(f'<text x="{x:.1f}" y="72" text-anchor="middle" font-size="13">'
                     f'{html.escape(label)}</text>')
        parts.append(f'<text x="{x:.1f}" y="20" text-anchor="middle" font-size="11" '
                     f'fill="#5b6774">+{_span(a.t - first)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _queue_svg(samples: list[QueueSample], axis: tuple[float, float]) -> str:
    """The sending MTA's queue over the same time axis as the attempts: depth
    (blue area) and deferred (orange line) as steps, with the peak and the
    oldest message's age written beside."""
    if not samples:
        return ""
    w, h, pad, top, bottom = _W, 110, _PAD, 14, 86
    t0, span = axis
    peak = max(1, max(s.depth for s in samples))

    def x(t: float) -> float:
        return pad + (t - t0) / span * (w - 2 * pad)

    def y(n: int) -> float:
        return bottom - n / peak * (bottom - top)

    def steps(values: list[int]) -> str:
        pts: list[str] = []
        for i, (s, n) in enumerate(zip(samples, values, strict=True)):
            if i:
                pts.append(f"{x(s.t):.1f},{y(values[i - 1]):.1f}")
            pts.append(f"{x(s.t):.1f},{y(n):.1f}")
        return " ".join(pts)

    depth = steps([s.depth for s in samples])
    area = f"{x(samples[0].t):.1f},{bottom} {depth} {x(samples[-1].t):.1f},{bottom}"
    deferred = steps([s.deferred for s in samples])
    p = summary(samples)
    label = (f"peak {p['peak_depth']} queued, {p['peak_deferred']} deferred, oldest "
             f"{_span(float(p['peak_oldest_age']))}")
    return "".join([
        f'<svg class="queue" viewBox="0 0 {w} {h}" role="img" aria-label="sending MTA queue: '
        f'{html.escape(label)}">',
        f'<line x1="{pad}" y1="{bottom}" x2="{w - pad}" y2="{bottom}" stroke="#9aa5b1"/>',
        f'<text x="{pad - 6}" y="{y(peak) + 4:.1f}" text-anchor="end" font-size="11" '
        f'fill="#5b6774">{peak}</text>',
        f'<text x="{pad - 6}" y="{bottom + 4}" text-anchor="end" font-size="11" '
        f'fill="#5b6774">0</text>',
        f'<polygon points="{area}" fill="#3b7dd8" fill-opacity="0.25" stroke="none"/>',
        f'<polyline points="{depth}" fill="none" stroke="#3b7dd8" stroke-width="2"/>',
        f'<polyline points="{deferred}" fill="none" stroke="#d9a400" stroke-width="2" '
        f'stroke-dasharray="5 3"/>',
        f'<text x="{pad}" y="{h - 4}" font-size="12" fill="#1d2733">'
        f'<tspan fill="#3b7dd8">&#9632; queued</tspan>  '
        f'<tspan fill="#d9a400">&#9632; deferred</tspan>  {html.escape(label)}</text>',
        "</svg>"])


def html_report(verdicts: list[Verdict], title: str = "SMTP Harness lab report") -> str:
    """A self-contained page: no scripts, no external resources."""
    rows = []
    for v in verdicts:
        checks = "".join(
            f'<tr class="{"ok" if c.ok else "bad"}"><td>{html.escape(c.name)}</td>'
            f"<td>{html.escape(c.expected)}</td><td>{html.escape(c.observed)}</td>"
            f"<td>{html.escape(c.why)}</td></tr>" for c in v.checks)
        axis = _axis(v)
        timelines = "".join(
            f"<h4>{html.escape(t.rcpt)}: {html.escape(t.outcome)}, {len(t.attempts)} "
            f"attempt(s)</h4>{_svg(t, axis)}" for t in v.timelines)
        if v.queue_samples:
            timelines += (f"<h4>{html.escape(v.mta)}'s queue over the same time</h4>"
                          + _queue_svg(v.queue_samples, axis))
        ndrs = "".join(
            f"<li>{'delay notice' if n['delay'] else 'NDR'} ({html.escape(str(n['format']))}): "
            + "; ".join(html.escape(f"{r['recipient']} {r['action']} {r['status']} "
                                    f"{r['diagnostic'] or ''}") for r in n["recipients"])
            + "</li>" for n in v.ndrs)
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in v.notes)
        rows.append(f"""
<section class="{'pass' if v.passed else 'fail'}">
<h2>{html.escape(v.scenario)} <span class="badge">{'PASS' if v.passed else 'FAIL'}</span></h2>
<p class="muted">{html.escape(v.summary)} &middot; {html.escape(v.mta)} &middot;
{v.duration:.1f} s (scenario clock &times;{v.speed:g})</p>
<table><tr><th>check</th><th>expected</th><th>observed</th><th>why</th></tr>{checks}</table>
{timelines}
{f'<h3>NDRs</h3><ul>{ndrs}</ul>' if ndrs else ''}
{f'<ul>{notes}</ul>' if notes else ''}
{_evidence_html(v.evidence)}
</section>""")
    passed = sum(v.passed for v in verdicts)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1d2733; font-size: 17px; }}
section {{ border-left: 6px solid #2e9e6b; padding: .2rem 1rem 1rem; margin: 0 0 1.5rem;
  background: #f6f8fa; }}
section.fail {{ border-color: #d64545; }}
.badge {{ font-size: .8rem; padding: .1rem .5rem; border-radius: 4px; color: #fff;
  background: #2e9e6b; vertical-align: middle; }}
section.fail .badge {{ background: #d64545; }}
table {{ border-collapse: collapse; margin: .5rem 0; }}
td, th {{ border: 1px solid #d0d7de; padding: .25rem .5rem; text-align: left;
  vertical-align: top; }}
tr.bad td {{ background: #fde8e8; }}
table.evidence td {{ font-size: .85rem; }}
table.evidence td.where {{ color: #5b6774; white-space: nowrap; }}
.muted {{ color: #5b6774; }}
svg {{ width: 100%; max-width: 760px; height: 90px; display: block; }}
svg.queue {{ height: 110px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{passed} of {len(verdicts)} scenarios passed.</p>
{''.join(rows)}
</body></html>
"""


def _evidence_html(evidence: dict[str, Any]) -> str:
    """The MTA's own log beside the harness's records (harness.evidence/1)."""
    if not evidence or not evidence.get("messages"):
        return ""
    parts = ["<h3>The sender's log beside the harness</h3>"]
    for sk in evidence.get("skews", []):
        parts.append(f'<p class="muted">{html.escape(sk["text"])}</p>')
    for m in evidence["messages"]:
        rows = []
        for st in m["steps"]:
            sender = "<br>".join(f'<span class="muted">{html.escape(x["where"])}</span> '
                                 f'{html.escape(x["text"])}' for x in st["sender"]) or "-"
            did = html.escape(st["harness"]["text"]) if st["harness"] else html.escape(
                st["note"] or "-")
            flag = ", ".join(st["flags"])
            when = time.strftime("%H:%M:%S", time.localtime(st["t"])) + \
                f".{int(st['t'] % 1 * 1000):03d}"
            rows.append(f'<tr class="{"bad" if flag else ""}"><td class="where">{when}</td>'
                        f"<td>{sender}</td><td>{did}</td><td>{html.escape(flag)}</td></tr>")
        dis = "".join(f'<li class="bad">{html.escape(d["kind"])}: {html.escape(d["message"])}'
                      "</li>" for d in m["disagreements"])
        parts.append(f"<h4>message {html.escape(m['message_id'] or m['key'])}</h4>"
                     '<table class="evidence"><tr><th>time</th><th>sender logged</th>'
                     f"<th>harness did</th><th></th></tr>{''.join(rows)}</table>"
                     + (f"<ul>{dis}</ul>" if dis else
                        '<p class="muted">the sender\'s log and the harness agree</p>'))
    return "".join(parts)


def verdicts_json(verdicts: list[Verdict]) -> str:
    return json.dumps([asdict(v) for v in verdicts], indent=2, default=str)
