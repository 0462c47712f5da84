"""`harness probe SENDER RECIPIENT`: the command line around the probe
client: its options, the table, the JSON and the exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.analysis.probe_verdict import (
    EXIT_CODES,
    STEP_TIMEOUTS,
    VERDICT_TEXT,
    MxResult,
    ProbeReport,
    Step,
)
from harness.errors import HarnessError

DESCRIPTION = """\
Talk to a recipient's mail servers as a sending MTA would, and say what it
would do: deliver, defer or bounce, and why. For each mail host, in order:
connect, banner, EHLO, STARTTLS when offered (protocol, cipher, the
certificate chain, names and expiry), MAIL FROM, RCPT TO, then RSET and QUIT.

It sends nothing beyond those steps: no DATA and no message, unless you give
--send (then a short test message, for testing your own receive connector).
It talks to whatever you name, so name only servers you may test.

DNS only when asked: --mx names the servers (no DNS at all when they are
addresses); --dns system looks the recipient domain up (SOA, MX in
preference order, null MX, MX that are CNAMEs or addresses, A/AAAA);
--dns ZONE.yaml reads records in the scenario dns: format instead."""

_STEPS = ", ".join(f"{k} {v:g}" for k, (v, _) in STEP_TIMEOUTS.items())
EPILOG = f"""\
exit status: {EXIT_CODES['deliver']} would deliver, {EXIT_CODES['defer']} would defer, \
{EXIT_CODES['bounce']} would bounce, 1 an error (bad file, bad --mx), 2 bad usage.

timeouts (seconds, --timeout STEP=SECONDS): {_STEPS}. RFC 5321 gives MTAs
minutes per step (5 for the banner, MAIL and RCPT, 10 after the message);
these are shorter for a person waiting at a prompt.

examples:
  harness probe app@example.com user@partner.example --dns system
  harness probe a@lab.test b@lab.test --mx 127.0.0.1:2525
  harness probe a@lab.test b@lab.test --mx mx.lab.test=192.0.2.25 --ca lab-ca.pem
  harness probe a@lab.test b@lab.test --dns zone.yaml --port 2525 --json"""

_STEP_LABEL = {"connect": "connect", "banner": "banner", "ehlo": "EHLO", "helo": "HELO",
               "starttls": "STARTTLS", "tls": "TLS", "ehlo-tls": "EHLO (TLS)", "mail": "MAIL",
               "rcpt": "RCPT", "data": "DATA", "message": "message", "rset": "RSET",
               "quit": "QUIT"}
_VERDICT_STYLE = {"deliver": "bold green", "defer": "bold yellow", "bounce": "bold red"}


def add_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("sender", metavar="SENDER", help="the MAIL FROM address (<> for none)")
    sp.add_argument("recipient", metavar="RECIPIENT", help="the RCPT TO address")
    sp.add_argument("--mx", action="append", default=[], metavar="HOST[:PORT]",
                    help="a server to probe, in order (repeat for several): an address "
                         "(127.0.0.1:2525, [::1]:25), NAME=ADDRESS[:PORT] (checks the "
                         "certificate against NAME), or a host name (needs --dns)")
    sp.add_argument("--dns", default=None, metavar="system|ZONE.yaml",
                    help="look up the recipient domain: 'system' (your resolver), or a "
                         "zone file in the scenario dns: format; without it, no DNS at all")
    sp.add_argument("--port", type=int, default=25,
                    help="the port of servers found through DNS, and of --mx without a "
                         "port (default 25)")
    sp.add_argument("--ca", type=Path, default=None, metavar="FILE",
                    help="trusted roots (PEM) for the certificate check instead of the "
                         "system's, e.g. the harness's harness-ca.pem beside its store")
    sp.add_argument("--helo", default=None, metavar="NAME",
                    help="the EHLO name (default: this machine's host name)")
    sp.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                    help="a step's timeout (steps: " + ", ".join(STEP_TIMEOUTS) + ")")
    sp.add_argument("--send", action="store_true",
                    help="go on to DATA and send a short test message (for your own "
                         "servers); without it, never")
    sp.add_argument("--dkim-key", type=Path, default=None, metavar="FILE",
                    help="with --send: DKIM-sign the test message with this RSA key (PEM)")
    sp.add_argument("--dkim-selector", default=None, metavar="SELECTOR",
                    help="with --dkim-key: the selector (s= tag)")
    sp.add_argument("--dkim-domain", default=None, metavar="DOMAIN",
                    help="with --dkim-key: the signing domain (default: the sender's)")
    sp.add_argument("--json", action="store_true",
                    help="one JSON object (schema harness.probe/1) instead of the table")


def _timeouts(items: list[str]) -> dict[str, float]:
    out = {k: v for k, (v, _) in STEP_TIMEOUTS.items()}
    for item in items:
        step, sep, value = item.partition("=")
        step = step.strip().lower()
        if not sep or step not in out:
            raise HarnessError(f"--timeout {item!r}: give STEP=SECONDS, STEP one of "
                               + ", ".join(STEP_TIMEOUTS))
        try:
            seconds = float(value)
        except ValueError:
            raise HarnessError(f"--timeout {item!r}: {value!r} is not a number") from None
        if not 0 < seconds <= 3600:
            raise HarnessError(f"--timeout {item!r}: give 0 < SECONDS <= 3600")
        out[step] = seconds
    return out


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise HarnessError(f"{what} {path}: {e.strerror or e}") from None


def probe_command(args: argparse.Namespace, out: Console, err: Console) -> int:
    from harness.probe.client import ProbeOptions, run_probe
    from harness.probe.message import dkim_sign, test_message
    from harness.scenario.loader import load_zone_file

    if args.dkim_key is not None and not args.send:
        raise HarnessError("--dkim-key signs the test message: add --send")
    if args.dkim_key is not None and not args.dkim_selector:
        raise HarnessError("--dkim-key needs --dkim-selector")
    if not 0 < args.port < 65536:
        raise HarnessError(f"--port {args.port} is out of range")
    sender = "" if args.sender.strip() in ("<>", "") else args.sender.strip()
    message = None
    if args.send:
        message = test_message(sender, args.recipient, now=time.time())
        if args.dkim_key is not None:
            domain = args.dkim_domain or sender.rpartition("@")[2]
            if not domain:
                raise HarnessError("--dkim-key with a null sender needs --dkim-domain")
            message = dkim_sign(message, key_pem=_read(args.dkim_key, "--dkim-key"),
                                selector=args.dkim_selector, domain=domain)
    zone = None
    dns = args.dns
    if dns is not None and dns != "system":
        zone = load_zone_file(dns)  # ScenarioError: path:line:col lines
    ca_pem = _read(args.ca, "--ca") if args.ca is not None else None
    opts = ProbeOptions(sender=sender, recipient=args.recipient,
                        helo=args.helo or socket.gethostname() or "probe.invalid",
                        timeouts=_timeouts(args.timeout), ca_pem=ca_pem,
                        ca_name=str(args.ca) if args.ca is not None else "system",
                        message=message)
    report = asyncio.run(run_probe(opts, mx=args.mx, dns=dns, zone=zone, port=args.port))
    if args.json:
        out.out(json.dumps(report.as_dict(), indent=2, ensure_ascii=False), highlight=False)
    else:
        render(report, out)
    return report.exit_code


# ------------------------------------------------------------------ the table


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _reply_cell(step: Step) -> str:
    if step.error is not None:
        return f"[red]{escape(step.error)}[/]"
    if step.reply is None:
        return escape(step.detail or "")
    lines = step.reply.split("\n")
    style = {"2": "green", "3": "cyan", "4": "yellow", "5": "red"}.get(lines[0][:1], "white")
    if step.name in ("ehlo", "ehlo-tls") and len(lines) > 1:
        names = [x[4:] for x in lines[1:]]
        return (f"[{style}]{escape(lines[0])}[/]\n[dim]{len(names)} extensions: "
                f"{escape(', '.join(names))}[/]")
    shown = lines[0] if step.name == "banner" else lines[-1]
    extra = f" [dim](+{len(lines) - 1} lines)[/]" if len(lines) > 1 else ""
    return f"[{style}]{escape(shown)}[/]{extra}"


def _meaning_cell(step: Step) -> str:
    expl = step.explanation()
    if expl is None:
        return ""
    text = f"{escape(str(expl['code']))} {escape(expl['title'])}"
    if step.code is not None and step.code >= 400 and step.name not in ("rset", "quit"):
        meaning = str(expl.get("meaning") or "").split(". ")[0].rstrip(".")
        text += f"\n[dim]{escape(meaning)}.[/]" if meaning else ""
        for check in expl.get("checks", [])[:1]:
            text += f"\n[dim]check: {escape(check)}[/]"
    return text


def _tls_lines(r: MxResult) -> list[str]:
    tls = r.tls
    if tls is None:
        return []
    if tls.error:
        return [f"  TLS: [red]{escape(tls.error)}[/]"]
    lines = [f"  TLS: {escape(str(tls.version))}, {escape(str(tls.cipher))}"]
    c = tls.certificate
    if c is not None:
        lines.append(f"  certificate: {escape(str(c.subject))} issued by {escape(str(c.issuer))}"
                     f", names {escape(', '.join(c.names) or '-')}")
        days = c.days_left if c.days_left is not None else 0
        expiry = (f"[red]expired {-days} day(s) ago[/]" if days < 0
                  else f"{'[yellow]' if days < 14 else ''}{days} day(s) left"
                       f"{'[/]' if days < 14 else ''}")
        lines.append(f"  valid until {escape(str(c.not_after))} ({expiry})")
        trust = "the system's roots" if c.trust == "system" else escape(c.trust)
        lines.append(f"  chain against {trust}: "
                     + ("[green]verified[/]" if c.chain_ok else
                        f"[red]{escape(str(c.chain_error))}[/]"))
        if c.name_ok is not None:
            source = {"mx": "the MX host name", "banner": "the banner's name"}.get(
                c.name_source or "", "the name")
            lines.append(f"  name {escape(str(c.expected_name))} ({source}): "
                         + ("[green]matches[/]" if c.name_ok else "[red]does not match[/]"))
    return lines


def render(report: ProbeReport, out: Console) -> None:
    what = "DATA and a test message included (--send)" if report.send else \
        "no DATA, no message"
    out.print(f"[bold]probe[/] {escape(report.sender or '<>')} -> "
              f"{escape(report.recipient)} [dim]({what})[/]")
    dns = report.dns
    if dns is not None:
        out.print(f"\n[bold]DNS[/] for {escape(dns.domain)} [dim](from {escape(str(dns.source))})"
                  "[/]")
        out.print(f"  SOA: {escape(dns.soa or '-')}")
        if dns.mx:
            out.print("  MX:  " + escape(", ".join(f"{p} {h}" for p, h in dns.mx)))
        for line in dns.notes:
            out.print(f"  [yellow]note:[/] {escape(line)}")
        for lookup in dns.lookups:
            # a missing CNAME or AAAA is normal; failures and missing names are not
            if lookup.error and lookup.error != "no record of this type":
                out.print(f"  [dim]{escape(lookup.rtype)} {escape(lookup.name)}: "
                          f"{escape(lookup.error)}[/]")
    for lookup in report.lookups:
        answer = ", ".join(lookup.answers) or lookup.error or ""
        out.print(f"  [dim]{escape(lookup.rtype)} {escape(lookup.name)}: {escape(answer)}[/]")
    for r in report.results:
        target = r.address or "-"
        title = r.host.label if r.host.source != "given" else "server"
        if r.host.source == "given" and r.host.name:
            title = f"server {r.host.name}"
        out.print(f"\n[bold]{escape(title)}[/] {escape(target)} port {r.host.port}"
                  + (f" [dim](banner name {escape(r.banner_name)})[/]" if r.banner_name else ""))
        for flag_note in r.host.notes:
            out.print(f"  [yellow]note:[/] {escape(flag_note)}")
        table = Table(box=None, pad_edge=False, show_edge=False, padding=(0, 1))
        for col in ("step", "sent", "reply", "time", "meaning"):
            table.add_column(col, overflow="fold")
        for s in r.steps:
            table.add_row(_STEP_LABEL.get(s.name, s.name), escape(s.sent or ""), _reply_cell(s),
                          _ms(s.seconds), _meaning_cell(s))
        out.print(table)
        if r.size_limit is not None:
            out.print(f"  SIZE limit: {r.size_limit:,} bytes")
        for line in _tls_lines(r):
            out.print(line)
        style = _VERDICT_STYLE[r.verdict]
        out.print(f"  verdict: [{style}]{VERDICT_TEXT[r.verdict]}[/] - {escape(r.reason)}")
        for note in r.notes:
            if note not in r.host.notes:
                out.print(f"  [yellow]note:[/] {escape(note)}")
    style = _VERDICT_STYLE[report.verdict]
    out.print(f"\n[{style}]{VERDICT_TEXT[report.verdict].upper()}[/] - {escape(report.reason)}")
    for note in report.notes:
        out.print(f"  [yellow]note:[/] {escape(note)}")


def as_json(report: ProbeReport) -> dict[str, Any]:
    return report.as_dict()
