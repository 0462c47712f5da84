"""Where mail for a domain goes, as a sending MTA works it out (RFC 5321
section 5.1), with what is wrong on the way: the probe's DNS step.

`mx_plan(domain, resolver, port)` asks an injected `Resolver` (the scripted
`ScenarioDns` of a zone file, or `SystemDns` when the user asked for
`--dns system`) for:

- the SOA of the domain (does the zone exist; who is its primary);
- the MX records, in preference order (equal preferences keep their order
  here; a sender picks among them at random);
- a null MX ("0 .", RFC 7505: the domain takes no mail) and a null MX mixed
  with other records (a misconfiguration);
- for each MX host: whether it is an address literal instead of a name
  (RFC 5321 section 5.1 wants a name; many senders refuse it) or a CNAME
  (RFC 2181 section 10.3 forbids it; most senders follow it), and its A and
  AAAA records;
- no MX at all: the implicit MX, the domain's own A/AAAA (RFC 5321 5.1).

It returns what was found (`DnsReport`) and the hosts to try, in order
(`MxHost`). Pure: every lookup goes through the resolver; SystemDns blocks,
so an event loop calls this in a thread.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from harness.analysis.dns import NotFound, Resolver, TempError

__all__ = ["DnsReport", "Lookup", "MxHost", "mx_plan", "static_hosts"]

#: At most this many MX hosts are probed (a sender stops somewhere too).
MAX_MX = 10


@dataclass(frozen=True, kw_only=True)
class Lookup:
    """One DNS question and what came back."""

    name: str
    rtype: str
    answers: tuple[str, ...] = ()
    error: str | None = None  # "no such name", "no record of this type", or why it failed

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "type": self.rtype, "answers": list(self.answers),
                "error": self.error}


@dataclass(frozen=True, kw_only=True)
class MxHost:
    """One host to try, in order: from an MX record, the implicit MX, or --mx."""

    name: str | None  # the host name (None: given as an address)
    port: int
    addresses: tuple[str, ...] = ()
    preference: int | None = None
    source: str = "mx"  # "mx" | "implicit" | "given"
    #: what is wrong with this MX, for a person (flags keep the short form)
    flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        pref = f"MX {self.preference} " if self.preference is not None else ""
        return f"{pref}{self.name or (self.addresses[0] if self.addresses else '?')}"

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "port": self.port, "addresses": list(self.addresses),
                "preference": self.preference, "source": self.source,
                "flags": list(self.flags), "notes": list(self.notes)}


@dataclass(frozen=True, kw_only=True)
class DnsReport:
    domain: str
    source: str | None  # "system", a zone file's path, or None (no DNS: --mx)
    soa: str | None = None
    mx: tuple[tuple[int, str], ...] = ()
    null_mx: bool = False
    implicit_mx: bool = False
    #: the domain does not exist (NXDOMAIN): a sender bounces (5.1.2)
    nxdomain: bool = False
    #: a lookup that decides where mail goes failed for now: a sender defers
    temp_error: str | None = None
    #: no host to deliver to (no MX and no address): a sender bounces
    no_host: bool = False
    notes: tuple[str, ...] = ()
    lookups: tuple[Lookup, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {"domain": self.domain, "source": self.source, "soa": self.soa,
                "mx": [{"preference": p, "host": h} for p, h in self.mx],
                "null_mx": self.null_mx, "implicit_mx": self.implicit_mx,
                "nxdomain": self.nxdomain, "temp_error": self.temp_error,
                "no_host": self.no_host, "notes": list(self.notes),
                "lookups": [x.as_dict() for x in self.lookups]}


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


class _Asker:
    """Runs lookups and keeps each question and answer for the report."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.lookups: list[Lookup] = []

    def ask(self, name: str, rtype: str) -> list[str]:
        """The answers; raises NotFound or TempError (recorded either way)."""
        try:
            answers = self.resolver.query(name, rtype)
        except NotFound as e:
            self.lookups.append(Lookup(name=name, rtype=rtype,
                                       error="no such name" if e.nxdomain else
                                       "no record of this type"))
            raise
        except TempError as e:
            self.lookups.append(Lookup(name=name, rtype=rtype,
                                       error=f"lookup failed: {e.detail or e}"))
            raise
        self.lookups.append(Lookup(name=name, rtype=rtype, answers=tuple(answers)))
        return answers

    def addresses(self, host: str) -> tuple[tuple[str, ...], list[str]]:
        """A and AAAA of `host` (IPv4 first, as most senders try), and notes."""
        found: list[str] = []
        notes: list[str] = []
        for rtype in ("A", "AAAA"):
            try:
                found += self.ask(host, rtype)
            except NotFound:
                continue
            except TempError as e:
                notes.append(f"{rtype} {host}: lookup failed for now ({e.detail or e})")
        return tuple(found), notes


def _sorted_mx(values: Sequence[str]) -> list[tuple[int, str]]:
    out = []
    for v in values:
        pref, _, host = v.partition(" ")
        out.append((int(pref) if pref.isdigit() else 0, host.strip()))
    # stable: equal preferences keep the order the answer gave
    return sorted(out, key=lambda x: x[0])


def mx_plan(domain: str, resolver: Resolver, *, port: int = 25, source: str = "system",
            max_mx: int = MAX_MX) -> tuple[DnsReport, list[MxHost]]:
    """The DNS facts for `domain` and the hosts to try, in order."""
    domain = domain.strip().lower().rstrip(".")
    asker = _Asker(resolver)
    notes: list[str] = []
    soa = None
    try:
        soa = asker.ask(domain, "SOA")[0]
    except NotFound as e:
        if not e.nxdomain:
            notes.append(f"{domain} has no SOA of its own: it is a name inside a zone, not "
                         "the zone's top (fine for mail)")
    except TempError as e:
        notes.append(f"SOA {domain}: lookup failed ({e.detail or e})")

    def report(**kw: object) -> DnsReport:
        return DnsReport(domain=domain, source=source, soa=soa, notes=tuple(notes),
                         lookups=tuple(asker.lookups), **kw)  # type: ignore[arg-type]

    try:
        records = _sorted_mx(asker.ask(domain, "MX"))
    except TempError as e:
        return report(temp_error=f"MX {domain}: {e.detail or e}"), []
    except NotFound as e:
        if e.nxdomain:
            return report(nxdomain=True), []
        # RFC 5321 5.1: no MX, so the domain itself is the mail host
        addresses, more = asker.addresses(domain)
        notes.extend(more)
        if not addresses:
            if more:
                return report(implicit_mx=True, temp_error="; ".join(more)), []
            return report(implicit_mx=True, no_host=True), []
        notes.append(f"{domain} has no MX record: mail goes to its own address "
                     "(the implicit MX, RFC 5321 section 5.1)")
        host = MxHost(name=domain, port=port, addresses=addresses, source="implicit")
        return report(implicit_mx=True), [host]

    null = [r for r in records if r[1] in (".", "")]
    if null and len(records) == 1:
        return report(mx=tuple(records), null_mx=True), []
    if null:
        notes.append("a null MX (0 .) stands beside other MX records: RFC 7505 says it must "
                     "be the only one; senders differ in what they do")
    hosts: list[MxHost] = []
    for pref, name in [r for r in records if r[1] not in (".", "")][:max_mx]:
        flags: list[str] = []
        host_notes: list[str] = []
        if _is_address(name):
            flags.append("address-literal")
            host_notes.append(f"the MX names an address ({name}), not a host: RFC 5321 "
                              "section 5.1 asks for a name, and many senders will not use it")
            hosts.append(MxHost(name=None, port=port, addresses=(name.strip("[]"),),
                                preference=pref, flags=tuple(flags),
                                notes=tuple(host_notes)))
            continue
        try:
            target = asker.ask(name, "CNAME")[0]
        except (NotFound, TempError):
            target = None
        if target is not None:
            flags.append("cname")
            host_notes.append(f"{name} is a CNAME for {target}: RFC 2181 section 10.3 says an "
                              "MX must name a host's own name; most senders follow it")
        addresses, more = asker.addresses(name)
        host_notes.extend(more)
        if not addresses:
            flags.append("no-address")
            if not more:
                host_notes.append(f"{name} has no A or AAAA record: no sender can reach it")
        hosts.append(MxHost(name=name, port=port, addresses=addresses, preference=pref,
                            flags=tuple(flags), notes=tuple(host_notes)))
    if len(records) - len(null) > max_mx:
        notes.append(f"only the first {max_mx} of {len(records) - len(null)} MX hosts are "
                     "probed")
    return report(mx=tuple(records)), hosts


def static_hosts(targets: Sequence[tuple[str | None, str | None, int]],
                 resolver: Resolver | None = None
                 ) -> tuple[list[MxHost], tuple[Lookup, ...]]:
    """Hosts named on the command line (--mx), in the order given: each
    (name, address, port). A name without an address is looked up (A and
    AAAA) only when a resolver is given, i.e. when DNS was asked for."""
    asker = _Asker(resolver) if resolver is not None else None
    hosts = []
    for name, address, port in targets:
        if address is not None:
            hosts.append(MxHost(name=name, port=port, addresses=(address,), source="given"))
            continue
        assert name is not None and asker is not None
        addresses, notes = asker.addresses(name)
        flags = () if addresses else ("no-address",)
        if not addresses and not notes:
            notes.append(f"{name} has no A or AAAA record")
        hosts.append(MxHost(name=name, port=port, addresses=addresses, source="given",
                            flags=flags, notes=tuple(notes)))
    return hosts, tuple(asker.lookups) if asker is not None else ()
