"""What the harness knows about a stored message once it has looked: the
NDR parse and the SPF, DKIM and DMARC results, as plain data (JSON-ready).
Pure: the analysis worker (harness/analysis_worker.py) feeds it bytes read
from the store.

An `Analyzer` looks at messages one after another and remembers what
repeats under a scripted DNS zone (the SPF result of a client, sender and
HELO; the Authentication-Results text of a set of results), which is most
of the cost of analysing plain mail. Mail that is plainly not a report is
told apart from its header block and first kilobytes (dsn.may_be_report).
A message over `LARGE` bytes is analysed on its head only (what the caller
passes), and says so."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

#: messages over this size are analysed on their first HEAD bytes only
LARGE = 10 * 1024 * 1024
HEAD = 1024 * 1024
_CACHE = 4096


class Analyzer:
    """Analyses messages, remembering what repeats (per DNS zone)."""

    def __init__(self) -> None:
        self._resolvers: dict[object, Any] = {}
        self._spf: OrderedDict[tuple[object, ...], Any] = OrderedDict()
        #: (Authentication-Results text, the results as data) per set of results:
        #: shared by the analyses that have them (made into JSON, not changed)
        self._headers: OrderedDict[tuple[object, ...], tuple[str, dict[str, Any]]] = (
            OrderedDict())

    def resolver(self, zone_key: object, zone: Mapping[str, Any] | None) -> Any:
        from harness.analysis.dns import ScenarioDns, SystemDns

        found = self._resolvers.get(zone_key)
        if found is None:
            found = self._resolvers[zone_key] = SystemDns() if zone is None else ScenarioDns(zone)
        return found

    def analyze(self, raw: bytes, *, client_ip: str, helo: str, mail_from: str,
                zone_key: object, zone: Mapping[str, Any] | None, hostname: str,
                size: int | None = None) -> dict[str, Any]:
        """{"ndr": ... or None, "auth": ..., "authentication_results": "..."}.
        `raw` may be the head of a larger message of `size` bytes (over
        LARGE): the NDR is read from the head, DKIM is not checked (its body
        hash needs every byte), and `partial` says so."""
        from harness.analysis.auth import (
            AuthResults,
            authentication_results,
            check_dkim,
            check_dmarc,
            check_spf,
        )
        from harness.analysis.dsn import parse_ndr

        whole = size is None or size <= len(raw)
        ndr = parse_ndr(raw)
        resolver = self.resolver(zone_key, zone)
        cached = zone is not None  # a scripted zone does not change: its answers keep
        key = (zone_key, client_ip, mail_from.lower(), helo.lower(), hostname)
        spf = self._spf.get(key) if cached else None
        if spf is None:
            spf = check_spf(client_ip, mail_from, helo, resolver, receiver=hostname)
            if cached:
                _remember(self._spf, key, spf)
        dkim = check_dkim(raw, resolver) if whole else ()
        dmarc = check_dmarc(raw, spf=spf, dkim=dkim, resolver=resolver)
        hkey = (hostname, spf, dkim, dmarc)
        known = self._headers.get(hkey)
        if known is None:  # the header and the results as data, made once per set
            header = authentication_results(hostname, spf, dkim, dmarc)
            auth = AuthResults(spf=spf, dkim=dkim, dmarc=dmarc, authentication_results=header,
                               hostname=hostname)
            known = (header, auth.as_dict())
            _remember(self._headers, hkey, known)
        header, auth_data = known
        out: dict[str, Any] = {"ndr": asdict(ndr) if ndr is not None else None,
                               "auth": auth_data, "authentication_results": header}
        if not whole:
            out["partial"] = (f"analysed on its first {len(raw) // 1024 // 1024} MB of "
                              f"{(size or 0) / 1024 / 1024:.0f} MB: the NDR parse reads the head, "
                              "DKIM was not checked")
        return out


def _remember(cache: OrderedDict[Any, Any], key: Any, value: Any) -> None:
    cache[key] = value
    if len(cache) > _CACHE:
        cache.popitem(last=False)


def analyze_message(raw: bytes, *, client_ip: str, helo: str, mail_from: str,
                    zone: Mapping[str, Mapping[str, tuple[str, ...]]] | None,
                    hostname: str) -> dict[str, Any]:
    """One message, nothing remembered. DNS comes from `zone` (a scenario's
    dns:), or the system's when None."""
    return Analyzer().analyze(raw, client_ip=client_ip, helo=helo, mail_from=mail_from,
                              zone_key=None, zone=zone, hostname=hostname)
