"""One call that analyses a stored message: the NDR parse and the SPF, DKIM
and DMARC results, as plain data (JSON-ready), for the server's background
analyst (a thread, in quiet moments)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any


def analyze_message(raw: bytes, *, client_ip: str, helo: str, mail_from: str,
                    zone: Mapping[str, Mapping[str, tuple[str, ...]]] | None,
                    hostname: str) -> dict[str, Any]:
    """{"ndr": ... or None, "auth": ..., "authentication_results": "..."}.
    DNS comes from `zone` (a scenario's dns:), or the system's when None."""
    from harness.analysis.auth import check_message
    from harness.analysis.dns import ScenarioDns, SystemDns
    from harness.analysis.dsn import parse_ndr

    ndr = parse_ndr(raw)
    resolver = SystemDns() if zone is None else ScenarioDns(zone)
    auth = check_message(raw, client_ip=client_ip, helo=helo, mail_from=mail_from,
                         resolver=resolver, hostname=hostname)
    return {"ndr": asdict(ndr) if ndr is not None else None, "auth": auth.as_dict(),
            "authentication_results": auth.authentication_results}


def analyze_batch(work: list[tuple[bytes, str, str, str, Any, str]]
                  ) -> list[dict[str, Any] | None]:
    """analyze_message for each (raw, client_ip, helo, mail_from, zone,
    hostname); None where one failed (the others still count)."""
    out: list[dict[str, Any] | None] = []
    for raw, client_ip, helo, mail_from, zone, hostname in work:
        try:
            out.append(analyze_message(raw, client_ip=client_ip, helo=helo,
                                       mail_from=mail_from, zone=zone, hostname=hostname))
        except Exception:
            out.append(None)
    return out

