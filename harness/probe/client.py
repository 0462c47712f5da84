"""The probe's client: the one part of the harness that dials out.

For each mail host, in order: connect (timed), read the banner, EHLO (HELO
if EHLO is refused), STARTTLS when offered (the handshake verifies nothing,
as an opportunistic MTA's does not; the certificate chain the server sent is
then checked by harness/analysis/certificate.py), EHLO again, MAIL FROM,
RCPT TO, then RSET and QUIT. DATA and a message only with `send` (the
user's --send), never otherwise. Every reply is kept as a `Step`; what they
mean is decided by harness/analysis/probe_verdict.py.

aiosmtplib speaks SMTP (replies, multi-line parsing, STARTTLS); this module
opens the TCP connection itself so the connect is timed apart from the
banner, and sends the message body through aiosmtplib's protocol object so
DATA's 354 and the reply after the final dot are two steps.

DNS only when asked: `dns="system"` (dnspython, in a thread), a zone file
(the scenario `dns:` format), or none at all with `mx` targets given as
addresses. Disk (the CA bundle, the zone file) is read in a thread too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
from aiosmtplib.esmtp import parse_esmtp_extensions

from harness.analysis.certificate import check_certificate, load_anchors
from harness.analysis.dns import Resolver, ScenarioDns, SystemDns
from harness.analysis.mx import DnsReport, Lookup, MxHost, mx_plan, static_hosts
from harness.analysis.probe_verdict import (
    STEP_TIMEOUTS,
    MxResult,
    ProbeReport,
    Step,
    TlsInfo,
    judge_mx,
    overall,
)
from harness.errors import HarnessError

__all__ = ["ProbeError", "ProbeOptions", "parse_target", "run_probe"]


class ProbeError(HarnessError):
    """A probe cannot start as asked (a bad --mx, a missing file, ...).
    str() names things as the command line does (--mx, --dns system);
    `api` says the same with the HTTP API's fields (mx, dns, ca_pem)."""

    def __init__(self, text: str, *, api: str | None = None) -> None:
        super().__init__(text)
        self.api = text if api is None else api


def _bad_mx(text: str, why: str) -> ProbeError:
    return ProbeError(f"--mx {text!r}: {why}", api=f"mx entry {text!r}: {why}")


@dataclass(frozen=True, kw_only=True)
class ProbeOptions:
    sender: str
    recipient: str
    helo: str
    timeouts: Mapping[str, float] = field(
        default_factory=lambda: {k: v for k, (v, _) in STEP_TIMEOUTS.items()})
    #: trusted roots as PEM (--ca); None: the system's bundle
    ca_pem: bytes | None = None
    ca_name: str = "system"
    #: go on to DATA with this message (--send); None: never DATA
    message: bytes | None = None


def parse_target(text: str, default_port: int = 25) -> tuple[str | None, str | None, int]:
    """--mx HOST[:PORT] as (name, address, port): an address ('127.0.0.1:2525',
    '[::1]:25'), a host name ('mx1.example.com', looked up only when DNS is
    asked for), or NAME=ADDRESS[:PORT] (connect to ADDRESS, check the
    certificate against NAME, no DNS)."""
    name: str | None = None
    rest = text.strip()
    if "=" in rest:
        name, _, rest = rest.partition("=")
        name = name.strip().lower().rstrip(".") or None
    host, port = rest, default_port
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise _bad_mx(text, "missing ]")
        host, tail = rest[1:end], rest[end + 1:]
        if tail:
            if not tail.startswith(":") or not tail[1:].isdigit():
                raise _bad_mx(text, "bad port")
            port = int(tail[1:])
    elif rest.count(":") == 1:
        host, _, p = rest.partition(":")
        if not p.isdigit():
            raise _bad_mx(text, f"bad port {p!r}")
        port = int(p)
    if not 0 < port < 65536:
        raise _bad_mx(text, f"port {port} is out of range")
    host = host.strip()
    if not host:
        raise _bad_mx(text, "no host")
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        if name is not None:
            raise _bad_mx(text, "after NAME= give an address") from None
        return host.lower().rstrip("."), None, port
    return name, address, port


# ----------------------------------------------------------------- one MX


def _reply_text(code: int, message: str) -> str:
    lines = message.split("\n") if message else [""]
    return "\n".join(f"{code}{'-' if i < len(lines) - 1 else ' '}{line}".rstrip()
                     for i, line in enumerate(lines))


def _no_reply(e: BaseException, timeout: float) -> str:
    if isinstance(e, (aiosmtplib.SMTPTimeoutError, TimeoutError)):
        return f"no reply within {timeout:g}s"
    if isinstance(e, (aiosmtplib.SMTPServerDisconnected, ConnectionError, EOFError)):
        return "the server closed the connection"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _peer_chain(ssl_object: Any) -> list[bytes]:
    """The certificates the server sent, its own first (DER). Python 3.13's
    SSLObject.get_unverified_chain() gives them all; before 3.13 the public
    API gives the server's own certificate only (the chain check then says
    so when an intermediate is missing)."""
    if ssl_object is None:
        return []
    fn = getattr(ssl_object, "get_unverified_chain", None)
    if fn is not None:
        try:
            chain = [c for c in fn() or [] if isinstance(c, bytes)]
        except (ValueError, ssl.SSLError):
            chain = []
        if chain:
            return chain
    leaf = ssl_object.getpeercert(binary_form=True)
    return [leaf] if leaf else []


def _tls_context() -> ssl.SSLContext:
    """Opportunistic, as MTAs do it: any certificate is taken for the
    session; the chain is checked afterwards, to report on."""
    # a bare client context: create_default_context() would read the system
    # CA bundle from disk, on the event loop, for roots this context never uses
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _Conversation:
    """One SMTP conversation with one address, step by step."""

    def __init__(self, host: MxHost, address: str, opts: ProbeOptions,
                 anchors: Sequence[Any]) -> None:
        self.host, self.address, self.opts, self.anchors = host, address, opts, anchors
        self.steps: list[Step] = []
        self.extensions: dict[str, str] = {}
        self.starttls_offered = False
        self.banner_name: str | None = None
        self.tls: TlsInfo | None = None
        self.loop = asyncio.get_running_loop()

    def t(self, step: str) -> float:
        return float(self.opts.timeouts.get(step, STEP_TIMEOUTS[step][0]))

    async def connect(self) -> socket.socket | None:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        start = self.loop.time()
        target = f"{self.address}:{self.host.port}" if family == socket.AF_INET else (
            f"[{self.address}]:{self.host.port}")
        try:
            await asyncio.wait_for(self.loop.sock_connect(sock, (self.address, self.host.port)),
                                   self.t("connect"))
        except (OSError, TimeoutError) as e:
            sock.close()
            if isinstance(e, TimeoutError):
                error = f"no answer within {self.t('connect'):g}s ({target})"
            else:
                error = f"{os.strerror(e.errno) if e.errno else e} ({target})"
            self.steps.append(Step(name="connect", sent=target, error=error,
                                   seconds=self.loop.time() - start))
            return None
        self.steps.append(Step(name="connect", sent=target, seconds=self.loop.time() - start,
                               detail="connected"))
        return sock

    async def command(self, smtp: aiosmtplib.SMTP, name: str, *args: bytes) -> Step:
        sent = b" ".join(args).decode("ascii", "replace")
        start = self.loop.time()
        try:
            r = await smtp.execute_command(*args, timeout=self.t(name.removesuffix("-tls")))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            step = Step(name=name, sent=sent, error=_no_reply(e, self.t(name.removesuffix(
                "-tls"))), seconds=self.loop.time() - start)
        else:
            step = Step(name=name, sent=sent, code=r.code, reply=_reply_text(r.code, r.message),
                        seconds=self.loop.time() - start)
            if name in ("ehlo", "ehlo-tls") and r.code == 250:
                smtp.last_ehlo_response = r  # aiosmtplib reads the extensions from it
                self.extensions = dict(parse_esmtp_extensions(r.message)[0])
        self.steps.append(step)
        return step

    async def run(self, sock: socket.socket) -> None:
        opts = self.opts
        smtp = aiosmtplib.SMTP(sock=sock, local_hostname=opts.helo, start_tls=False,
                               timeout=self.t("banner"))
        start = self.loop.time()
        try:
            r = await smtp.connect(timeout=self.t("banner"))
        except aiosmtplib.SMTPConnectResponseError as e:
            self.steps.append(Step(name="banner", code=e.code,
                                   reply=_reply_text(e.code, e.message),
                                   seconds=self.loop.time() - start))
            self.banner_name = _banner_name(e.message)
            return  # aiosmtplib has closed the connection: nothing more to say
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            sock.close()
            self.steps.append(Step(name="banner", error=_no_reply(e, self.t("banner")),
                                   seconds=self.loop.time() - start))
            return
        self.steps.append(Step(name="banner", code=r.code, reply=_reply_text(r.code, r.message),
                               seconds=self.loop.time() - start))
        self.banner_name = _banner_name(r.message)
        try:
            await self._session(smtp)
        finally:
            smtp.close()

    async def _session(self, smtp: aiosmtplib.SMTP) -> None:
        opts = self.opts
        helo = opts.helo.encode("ascii", "replace")
        ehlo = await self.command(smtp, "ehlo", b"EHLO", helo)
        if ehlo.error is not None or (ehlo.code or 0) // 100 == 4:
            return
        if (ehlo.code or 0) // 100 == 5:
            step = await self.command(smtp, "helo", b"HELO", helo)
            if step.failed:
                return
        elif "starttls" in self.extensions:
            self.starttls_offered = True
            if not await self._starttls(smtp):
                return
        sender = opts.sender.strip("<>")
        size = ""
        if opts.message is not None and "size" in self.extensions:
            size = f" SIZE={len(opts.message)}"
        mail = await self.command(smtp, "mail", f"MAIL FROM:<{sender}>{size}".encode())
        if mail.error is not None:
            return
        if not mail.failed:
            rcpt = await self.command(smtp, "rcpt",
                                      f"RCPT TO:<{opts.recipient}>".encode())
            if rcpt.error is not None:
                return
            if opts.message is not None and not rcpt.failed:
                if not await self._data(smtp, opts.message):
                    return
                await self.command(smtp, "quit", b"QUIT")
                return
        rset = await self.command(smtp, "rset", b"RSET")
        if rset.error is None:
            await self.command(smtp, "quit", b"QUIT")

    async def _starttls(self, smtp: aiosmtplib.SMTP) -> bool:
        """STARTTLS, the handshake and EHLO again; False when the connection
        is gone (a refused STARTTLS goes on in plain text)."""
        start = self.loop.time()
        sni = self.host.name if self.host.name and not _is_address(self.host.name) else None
        try:
            r = await smtp.starttls(tls_context=_tls_context(), server_hostname=sni,
                                    timeout=self.t("starttls"))
        except aiosmtplib.SMTPResponseException as e:
            self.steps.append(Step(name="starttls", sent="STARTTLS", code=e.code,
                                   reply=_reply_text(e.code, e.message),
                                   seconds=self.loop.time() - start))
            return e.code != 421
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as e:
            error = _no_reply(e, self.t("starttls"))
            if isinstance(e, ssl.SSLError) or "upgrading transport" in str(e):
                error = f"the TLS handshake failed: {e}"
            self.steps.append(Step(name="tls", sent="STARTTLS", error=error,
                                   seconds=self.loop.time() - start))
            self.tls = TlsInfo(error=error)
            return False
        elapsed = self.loop.time() - start
        self.steps.append(Step(name="starttls", sent="STARTTLS", code=r.code,
                               reply=_reply_text(r.code, r.message), seconds=elapsed))
        obj = smtp.get_transport_info("ssl_object")
        version = obj.version() if obj is not None else None
        cipher = obj.cipher()[0] if obj is not None and obj.cipher() else None
        name, source = (self.host.name, "mx") if self.host.name else (self.banner_name, "banner")
        cert = await asyncio.to_thread(
            check_certificate, _peer_chain(obj), self.anchors, name=name,
            name_source=source if name else None, now=dt.datetime.now(dt.UTC),
            trust=self.opts.ca_name)
        self.tls = TlsInfo(version=version, cipher=cipher, certificate=cert)
        self.steps.append(Step(name="tls", detail=f"{version} {cipher}", seconds=0.0))
        ehlo = await self.command(smtp, "ehlo-tls", b"EHLO", self.opts.helo.encode())
        return not ehlo.failed

    async def _data(self, smtp: aiosmtplib.SMTP, message: bytes) -> bool:
        data = await self.command(smtp, "data", b"DATA")
        if data.failed or data.code != 354:
            return False
        # The body goes through aiosmtplib's protocol object so the reply
        # after the final dot is its own step (SMTP.data() does both). The
        # read follows the write with no await between, as aiosmtplib's own
        # commands do, so the reply cannot arrive unlooked-for.
        body = _dot_stuffed(message) + b".\r\n"
        start = self.loop.time()
        protocol = smtp.protocol
        assert protocol is not None
        try:
            protocol.write(body)
            r = await protocol.read_response(timeout=self.t("message"))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
            self.steps.append(Step(name="message", sent=f"<message: {len(message)} bytes>",
                                   error=_no_reply(e, self.t("message")),
                                   seconds=self.loop.time() - start))
            return False
        self.steps.append(Step(name="message", sent=f"<message: {len(message)} bytes>",
                               code=r.code, reply=_reply_text(r.code, r.message),
                               seconds=self.loop.time() - start))
        return True


def _dot_stuffed(message: bytes) -> bytes:
    message = re.sub(rb"\r\n|\r|\n", b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", message)


#: An enhanced status code (RFC 3463: class.subject.detail) that some servers
#: put before the host name in their greeting: "220 2.0.0 mx.example ESMTP".
_ENHANCED_CODE_RE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


def _banner_name(text: str) -> str | None:
    """The host name a greeting gives: its first word, after an enhanced status
    code if the greeting starts with one; None when that word is no name."""
    words = text.split()
    if words and _ENHANCED_CODE_RE.fullmatch(words[0]):
        words = words[1:]
    if not words:
        return None
    word = words[0].strip("[]").lower().rstrip(".")
    return word if "." in word or _is_address(word) else None


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


async def probe_mx(host: MxHost, opts: ProbeOptions, anchors: Sequence[Any]) -> MxResult:
    """One mail host: its addresses in turn until one answers, then the steps."""
    tried: list[Step] = []
    if not host.addresses:
        step = Step(name="connect", error="no address to connect to")
        verdict, reason, decisive, notes = judge_mx([step], send=opts.message is not None)
        return MxResult(host=host, steps=(step,), verdict=verdict, reason=reason,
                        decisive=decisive, notes=notes + host.notes)
    conv: _Conversation | None = None
    for address in host.addresses:
        conv = _Conversation(host, address, opts, anchors)
        sock = await conv.connect()
        if sock is None:
            tried += conv.steps
            continue
        await conv.run(sock)
        break
    assert conv is not None
    # the addresses that did not answer, then the conversation with the one that did
    steps = tuple(tried) if conv.steps[0].error is not None else (*tried, *conv.steps)
    verdict, reason, decisive, notes = judge_mx(steps, send=opts.message is not None,
                                                tls=conv.tls)
    size = conv.extensions.get("size")
    return MxResult(
        host=host, address=conv.address, steps=tuple(steps), extensions=conv.extensions,
        starttls_offered=conv.starttls_offered,
        size_limit=int(size) if size and size.isdigit() else None,
        banner_name=conv.banner_name, tls=conv.tls, verdict=verdict, reason=reason,
        decisive=decisive,
        notes=host.notes + notes)


# ----------------------------------------------------------------- a probe


async def _anchors(opts: ProbeOptions) -> list[Any]:
    if opts.ca_pem is not None:
        try:
            return await asyncio.to_thread(load_anchors, opts.ca_pem)
        except ValueError as e:
            raise ProbeError(f"--ca {opts.ca_name}: {e}", api=f"ca_pem: {e}") from None
    return await asyncio.to_thread(_system_anchors)


def _system_anchors() -> list[Any]:
    """The system's trusted roots (OpenSSL's default bundle); none if it has none."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            try:
                return load_anchors(Path(candidate).read_bytes())
            except (OSError, ValueError):
                continue
    return []


async def run_probe(opts: ProbeOptions, *, mx: Sequence[str] = (), dns: str | None = None,
                    zone: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
                    port: int = 25) -> ProbeReport:
    """Probe the recipient's mail hosts: `mx` targets as given (no DNS unless
    one is a host name and `dns` was asked for), or the recipient domain's MX
    from `dns` ("system", or the name of a zone given as `zone`)."""
    if "@" not in opts.recipient:
        raise ProbeError(f"recipient {opts.recipient!r} is not an address (user@domain)")
    resolver: Resolver | None = None
    if dns == "system":
        resolver = SystemDns()
    elif dns is not None:
        if zone is None:
            raise ProbeError("a zone name without its records")
        try:
            resolver = ScenarioDns(zone)
        except ValueError as e:
            raise ProbeError(f"{dns}: {e}") from e
    targets = [parse_target(t, port) for t in mx]
    report: DnsReport | None = None
    lookups: tuple[Lookup, ...] = ()
    if targets:
        names = [t[0] for t in targets if t[1] is None]
        if names and resolver is None:
            keep = "NAME=ADDRESS[:PORT] keeps the name for the certificate check"
            raise ProbeError(f"--mx {names[0]} is a host name and no DNS was asked for: give "
                             f"its address ({keep}), or add --dns system",
                             api=f"mx entry {names[0]!r} is a host name and no DNS was asked "
                             f"for: give its address ({keep}), or set dns to \"system\"")
        hosts, lookups = await asyncio.to_thread(static_hosts, targets, resolver)
    elif resolver is None:
        raise ProbeError("nothing to probe: give --mx HOST[:PORT], or --dns system (or a "
                         "zone file) to look up the recipient domain's MX",
                         api="nothing to probe: give mx (a list of HOST[:PORT]), or dns "
                         "\"system\" (or a zone) to look up the recipient domain's MX")
    else:
        domain = opts.recipient.rpartition("@")[2]
        report, hosts = await asyncio.to_thread(mx_plan, domain, resolver, port=port,
                                                source=dns or "system")
    anchors = await _anchors(opts) if hosts else []
    results = [await probe_mx(h, opts, anchors) for h in hosts]
    verdict, reason, notes = overall(report, results)
    return ProbeReport(sender=opts.sender, recipient=opts.recipient,
                       send=opts.message is not None, dns=report, lookups=lookups,
                       results=tuple(results), verdict=verdict, reason=reason, notes=notes)
