"""DNS for the SPF, DKIM and DMARC checks, injected rather than global.

A `Resolver` answers `query(name, rtype)` with the records' text, or raises
`NotFound` (no such name, or no record of that type) or `TempError` (the
lookup failed: SERVFAIL, time-out). Two implementations:

`ScenarioDns(scenario.dns)` -- offline and deterministic, from a scenario's
`dns:` section (the default):

    dns:
      lab.test:             {TXT: ["v=spf1 ip4:127.0.0.1 -all"], MX: ["10 mx.lab.test"]}
      mx.lab.test:          {A: [127.0.0.1]}
      sel1._domainkey.lab.test: {TXT: ["v=DKIM1; k=rsa; p=MIIBIj..."]}
      _dmarc.lab.test:      {TXT: ["v=DMARC1; p=reject"]}
      broken.test:          {TXT: ["!TEMPERROR"]}     # every TXT lookup fails temporarily
      "*.wild.test":        {A: [192.0.2.1]}          # wildcard
      127.0.0.1:            {PTR: [mx.lab.test]}      # an address stands for its in-addr.arpa name

- Each TXT string is one whole record (no 255-byte splitting needed).
- MX values are "PREFERENCE HOST" or just "HOST" (preference 10); "0 ." is
  a null MX (RFC 7505: the domain takes no mail).
- SOA values are "MNAME RNAME SERIAL REFRESH RETRY EXPIRE MINIMUM" (the
  names alone will do for a probe).
- `"!TEMPERROR"` as a value of a record type makes every lookup of that type
  at that name raise TempError (the DNS equivalent of SERVFAIL), so SPF,
  DKIM and DMARC temperror results can be scripted. Other types at the name
  answer as usual.
- A name that has a CNAME and no record of the asked type is followed, as a
  recursive resolver would (8 steps at most; a loop is a TempError).
- A name not in the zone is matched against wildcards (`*.parent`), nearest
  parent first; otherwise it does not exist (NotFound, nxdomain=True).

`SystemDns()` -- the machine's resolver through dnspython, imported when the
first lookup is made. Only for `--dns system`; it blocks, so it refuses to run
on a thread with a running asyncio event loop (run the checks in a thread).
"""

from __future__ import annotations

import ipaddress
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

#: The value that scripts a temporary DNS failure in a scenario zone.
TEMPERROR = "!TEMPERROR"
RECORD_TYPES = ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "SOA")
MAX_CNAME_CHAIN = 8
DEFAULT_MX_PREFERENCE = 10


class DnsError(Exception):
    """A lookup gave no records. `name` and `rtype` say which lookup."""

    def __init__(self, name: str, rtype: str, detail: str = "") -> None:
        self.name = name
        self.rtype = rtype
        self.detail = detail
        text = f"{rtype} {name}" + (f": {detail}" if detail else "")
        super().__init__(text)


class NotFound(DnsError):
    """The name does not exist (`nxdomain`), or has no record of this type."""

    def __init__(self, name: str, rtype: str, *, nxdomain: bool) -> None:
        self.nxdomain = nxdomain
        super().__init__(name, rtype, "no such name" if nxdomain else "no record of this type")


class TempError(DnsError):
    """The lookup failed for now (SERVFAIL, time-out, no reachable server)."""


@runtime_checkable
class Resolver(Protocol):
    def query(self, name: str, rtype: str) -> list[str]:
        """Records of type `rtype` (one of RECORD_TYPES) at `name`, as text:
        A/AAAA an address, MX "PREF HOST", TXT the record's strings joined,
        PTR/CNAME a host name (no trailing dot). Never empty: raises NotFound
        or TempError instead."""
        ...

    def txt(self, name: str) -> list[str]:
        """query(name, "TXT")."""
        ...


def normalize_name(name: str) -> str:
    """Lower case, no trailing dot; an IP address becomes its reverse name."""
    name = name.strip().lower().rstrip(".")
    try:
        return ipaddress.ip_address(name).reverse_pointer
    except ValueError:
        return name


def _check_type(rtype: str) -> str:
    rtype = rtype.upper()
    if rtype not in RECORD_TYPES:
        raise ValueError(f"unsupported record type {rtype!r} (known: {', '.join(RECORD_TYPES)})")
    return rtype


def zone_problems(zone: Mapping[str, Mapping[str, Iterable[str]]]) -> list[str]:
    """What is wrong with a scenario zone, one line per problem (for load-time
    checks): unknown record types, bad addresses, bad MX values."""
    problems: list[str] = []
    for name, records in zone.items():
        for rtype, values in records.items():
            if rtype.upper() not in RECORD_TYPES:
                problems.append(f"dns {name}: unknown record type {rtype}")
                continue
            for value in values:
                if value == TEMPERROR:
                    continue
                problem = _value_problem(rtype.upper(), value)
                if problem:
                    problems.append(f"dns {name} {rtype.upper()}: {problem}")
    return problems


def _value_problem(rtype: str, value: str) -> str | None:
    if rtype in ("A", "AAAA"):
        try:
            addr = ipaddress.ip_address(value.strip())
        except ValueError:
            return f"{value!r} is not an IP address"
        if (addr.version == 4) != (rtype == "A"):
            return f"{value} is not an IPv{4 if rtype == 'A' else 6} address"
    elif rtype == "MX":
        parts = value.split()
        if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[0].isdigit()):
            return f"{value!r} is not 'PREFERENCE HOST' or 'HOST'"
    elif rtype in ("PTR", "CNAME") and not value.strip():
        return "empty host name"
    elif rtype == "SOA":
        parts = value.split()
        if len(parts) not in (2, 7) or not all(p.isdigit() for p in parts[2:]):
            return f"{value!r} is not 'MNAME RNAME [SERIAL REFRESH RETRY EXPIRE MINIMUM]'"
    return None


def _normalize_value(rtype: str, value: str) -> str:
    if value == TEMPERROR:
        return value
    if rtype == "MX":
        parts = value.split()
        if len(parts) == 1:
            parts = [str(DEFAULT_MX_PREFERENCE), parts[0]]
        host = parts[1].lower().rstrip(".") or "."  # "." alone: a null MX (RFC 7505)
        return f"{int(parts[0])} {host}"
    if rtype in ("PTR", "CNAME"):
        return value.strip().lower().rstrip(".")
    if rtype in ("A", "AAAA"):
        return value.strip()
    return value


class ScenarioDns:
    """A resolver over a scripted zone, `{name: {TYPE: [values]}}` (Scenario.dns).
    Offline and deterministic; see the module docstring for the conventions.
    Raises ValueError at construction for values that could never be answered
    (see zone_problems)."""

    def __init__(self, zone: Mapping[str, Mapping[str, Iterable[str]]] | None = None) -> None:
        zone = zone or {}
        problems = zone_problems(zone)
        if problems:
            raise ValueError("; ".join(problems))
        self._zone: dict[str, dict[str, tuple[str, ...]]] = {}
        for name, records in zone.items():
            node = self._zone.setdefault(normalize_name(name), {})
            for rtype, values in records.items():
                rt = rtype.upper()
                node[rt] = node.get(rt, ()) + tuple(_normalize_value(rt, v) for v in values)

    def __repr__(self) -> str:
        return f"ScenarioDns({len(self._zone)} names)"

    def _node(self, name: str) -> dict[str, tuple[str, ...]] | None:
        node = self._zone.get(name)
        if node is not None:
            return node
        labels = name.split(".")
        for i in range(1, len(labels)):
            node = self._zone.get("*." + ".".join(labels[i:]))
            if node is not None:
                return node
        return None

    def query(self, name: str, rtype: str) -> list[str]:
        rtype = _check_type(rtype)
        asked = current = normalize_name(name)
        seen: set[str] = set()
        while True:
            node = self._node(current)
            if node is None:
                raise NotFound(asked, rtype, nxdomain=True)
            values = node.get(rtype, ())
            if TEMPERROR in values:
                raise TempError(asked, rtype, f"scripted {TEMPERROR} at {current}")
            if values:
                return list(values)
            cname = node.get("CNAME", ())
            if rtype == "CNAME" or not cname:
                raise NotFound(asked, rtype, nxdomain=False)
            if TEMPERROR in cname:
                raise TempError(asked, rtype, f"scripted {TEMPERROR} at {current} CNAME")
            seen.add(current)
            current = cname[0]
            if current in seen or len(seen) >= MAX_CNAME_CHAIN:
                raise TempError(asked, rtype, "CNAME loop or chain too long")

    def txt(self, name: str) -> list[str]:
        return self.query(name, "TXT")


def _on_event_loop() -> bool:
    """True when called on a thread that runs an asyncio event loop. Looks
    asyncio up in sys.modules rather than importing it: if it was never
    imported, no loop can be running."""
    aio = sys.modules.get("asyncio")
    if aio is None:
        return False
    try:
        aio.get_running_loop()
    except RuntimeError:
        return False
    return True


class SystemDns:
    """The machine's resolver (/etc/resolv.conf) through dnspython, or the
    given `nameservers`. Each lookup blocks for up to `timeout` seconds: never
    call it on an event loop thread (it raises RuntimeError there)."""

    def __init__(self, timeout: float = 5.0, nameservers: Iterable[str] | None = None) -> None:
        self.timeout = timeout
        self.nameservers = list(nameservers) if nameservers is not None else None
        self._resolver: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SystemDns(timeout={self.timeout}, nameservers={self.nameservers})"

    def _get_resolver(self) -> Any:
        with self._lock:
            if self._resolver is None:
                import dns.resolver  # lazy: dnspython imports socket

                try:
                    resolver = dns.resolver.Resolver(configure=self.nameservers is None)
                except dns.resolver.NoResolverConfiguration as e:
                    raise TempError("", "", f"no resolver configuration: {e}") from e
                if self.nameservers is not None:
                    resolver.nameservers = self.nameservers
                resolver.lifetime = self.timeout
                self._resolver = resolver
            return self._resolver

    def query(self, name: str, rtype: str) -> list[str]:
        rtype = _check_type(rtype)
        if _on_event_loop():
            raise RuntimeError("SystemDns blocks: run the checks in a thread, not on the "
                               "event loop (asyncio.to_thread)")
        name = normalize_name(name)
        import dns.exception  # lazy: dnspython imports socket
        import dns.resolver

        resolver = self._get_resolver()
        try:
            answer = resolver.resolve(name + ".", rtype, search=False, lifetime=self.timeout)
        except dns.resolver.NXDOMAIN as e:
            raise NotFound(name, rtype, nxdomain=True) from e
        except (dns.resolver.NoAnswer, dns.resolver.YXDOMAIN) as e:
            raise NotFound(name, rtype, nxdomain=False) from e
        except dns.exception.DNSException as e:  # Timeout, NoNameservers, ...
            raise TempError(name, rtype, f"{type(e).__name__}: {e}") from e
        out = [_rdata_text(rtype, rdata) for rdata in answer]
        if not out:
            raise NotFound(name, rtype, nxdomain=False)
        return out

    def txt(self, name: str) -> list[str]:
        return self.query(name, "TXT")


def _rdata_text(rtype: str, rdata: Any) -> str:
    if rtype in ("A", "AAAA"):
        return str(rdata.address)
    if rtype == "MX":
        return f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True).lower()}"
    if rtype == "TXT":
        return b"".join(rdata.strings).decode("utf-8", errors="replace")
    if rtype == "SOA":
        names = (n.to_text(omit_final_dot=True).lower() for n in (rdata.mname, rdata.rname))
        return " ".join((*names, *(str(v) for v in (rdata.serial, rdata.refresh, rdata.retry,
                                                    rdata.expire, rdata.minimum))))
    return str(rdata.target.to_text(omit_final_dot=True)).lower()  # PTR, CNAME
