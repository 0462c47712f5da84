"""The certificate an MX presented at STARTTLS, checked as a verifying
sender would: the chain against trusted roots (the system's, or a file the
user gives, such as the harness's lab CA), the names against the MX host
name, and the days left before it expires.

The TLS handshake itself (done by the probe client) verifies nothing, as an
opportunistic SMTP client does not: the session goes on whatever the
certificate is, and this module says what a sender that does verify
(MTA-STS, DANE, Exchange with a TLS auth level, Postfix at "verify") would
make of it. Pure: DER and PEM bytes in, a frozen report out (cryptography's
X.509 parser and path builder do the work).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

__all__ = ["CertReport", "check_certificate", "load_anchors", "name_matches"]

#: Fewer days than this left is worth a warning.
EXPIRY_WARNING_DAYS = 14

# Chain checks follow the Web PKI profile, with one relaxation that mail
# servers' OpenSSL does not insist on either: the key identifier extensions
# may be missing (many private and lab CAs leave them out).
_EE_POLICY = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
    x509.AuthorityKeyIdentifier, verification.Criticality.AGNOSTIC, None)
_CA_POLICY = (verification.ExtensionPolicy.webpki_defaults_ca()
              .may_be_present(x509.AuthorityKeyIdentifier, verification.Criticality.AGNOSTIC,
                              None)
              .may_be_present(x509.SubjectKeyIdentifier, verification.Criticality.AGNOSTIC,
                              None))
_ENCOUNTERED = re.compile(r"\s*\(encountered processing .*\)\s*$", re.S)


@dataclass(frozen=True, kw_only=True)
class CertReport:
    subject: str | None = None
    issuer: str | None = None
    names: tuple[str, ...] = ()  # subjectAltName DNS names and addresses
    not_before: str | None = None  # ISO 8601, UTC
    not_after: str | None = None
    days_left: int | None = None
    self_signed: bool = False
    chain_length: int = 0  # certificates the server sent
    trust: str = "system"  # "system" or the --ca file
    chain_ok: bool = False
    chain_error: str | None = None
    expected_name: str | None = None
    name_source: str | None = None  # "mx" (the MX host name) or "banner"
    name_ok: bool | None = None  # None: no name to check against
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.chain_ok and self.name_ok is not False and not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"subject": self.subject, "issuer": self.issuer, "names": list(self.names),
                "not_before": self.not_before, "not_after": self.not_after,
                "days_left": self.days_left, "self_signed": self.self_signed,
                "chain_length": self.chain_length, "trust": self.trust,
                "chain_ok": self.chain_ok, "chain_error": self.chain_error,
                "expected_name": self.expected_name, "name_source": self.name_source,
                "name_ok": self.name_ok, "ok": self.ok, "problems": list(self.problems)}


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def load_anchors(pem: bytes) -> list[x509.Certificate]:
    """Trusted roots from PEM text (a CA bundle), one certificate at a time:
    one a strict parser refuses (system bundles hold a few old roots with a
    negative serial number) is left out, not the whole bundle. Raises
    ValueError when nothing in it is a certificate."""
    out = []
    for block in _PEM_BLOCK.findall(pem):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cryptography's notice about such roots
            try:
                out.append(x509.load_pem_x509_certificate(block))
            except ValueError:
                continue
    if not out:
        raise ValueError("no PEM certificate in it")
    return out


def _cn(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else name.rfc4514_string()


def _san(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    dns = [str(n) for n in ext.get_values_for_type(x509.DNSName)]
    ips = [str(a) for a in ext.get_values_for_type(x509.IPAddress)]
    return dns, ips


def name_matches(name: str, dns_names: Sequence[str], ip_names: Sequence[str] = ()) -> bool:
    """Does a certificate with these subjectAltNames serve `name`? RFC 6125
    section 6.4: case-insensitive, a wildcard only as the whole left-most
    label and matching exactly one label; an address only an IP name.

    Written here rather than taken from a library: Python's ssl removed
    match_hostname (3.12), and cryptography's verifier checks the name only
    together with the chain, while a probe must report the two apart."""
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if address is not None:
        return any(ipaddress.ip_address(ip) == address for ip in ip_names)
    wanted = name.lower().rstrip(".").split(".")
    for pattern in dns_names:
        labels = pattern.lower().rstrip(".").split(".")
        if len(labels) != len(wanted) or len(labels) < 2:
            continue
        first_ok = labels[0] == wanted[0] or (labels[0] == "*" and len(labels) > 2)
        if first_ok and labels[1:] == wanted[1:]:
            return True
    return False


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _reason(error: Exception, cert: x509.Certificate, now: dt.datetime,
            self_signed: bool, trust: str) -> str:
    text = _ENCOUNTERED.sub("", str(error)).removeprefix("validation failed: ")
    if "not valid at validation time" in text:
        if now > cert.not_valid_after_utc:
            return f"expired on {_iso(cert.not_valid_after_utc)}"
        return f"not valid before {_iso(cert.not_valid_before_utc)}"
    if "candidates exhausted" in text or "no issuer" in text.lower():
        if self_signed:
            return "self-signed, and not one of the trusted roots"
        where = "the system's trusted roots" if trust == "system" else trust
        return (f"does not chain to a root in {where} (issued by {_cn(cert.issuer)}; an "
                "intermediate certificate missing from the server's chain does this too)")
    return text


def check_certificate(chain: Sequence[bytes], anchors: Sequence[x509.Certificate], *,
                      name: str | None, name_source: str | None, now: dt.datetime,
                      trust: str = "system") -> CertReport:
    """What a verifying sender makes of `chain` (DER, the server's
    certificate first) with `anchors` as its trusted roots, for `name`."""
    if not chain:
        return CertReport(trust=trust, chain_error="the server sent no certificate",
                          problems=("the server sent no certificate",))
    try:
        leaf = x509.load_der_x509_certificate(chain[0])
        intermediates = [x509.load_der_x509_certificate(c) for c in chain[1:]]
    except ValueError as e:
        return CertReport(trust=trust, chain_length=len(chain), chain_error=f"unreadable: {e}",
                          problems=(f"the certificate cannot be read: {e}",))
    dns, ips = _san(leaf)
    self_signed = leaf.issuer == leaf.subject
    days_left = int((leaf.not_valid_after_utc - now).total_seconds() // 86400)
    problems: list[str] = []
    # the chain alone: verified for a name the certificate itself carries
    chain_ok, chain_error = False, None
    own = dns[0] if dns else (ips[0] if ips else None)
    if own is None:
        chain_error = ("no subjectAltName: current clients ignore the subject's CN, so it "
                       "serves no name")
    elif not anchors:
        chain_error = "no trusted roots to check against"
    else:
        subject: verification.Subject = (
            x509.DNSName(own) if dns else x509.IPAddress(ipaddress.ip_address(own)))
        builder = (verification.PolicyBuilder().store(verification.Store(list(anchors)))
                   .time(now).extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY))
        try:
            builder.build_server_verifier(subject).verify(leaf, intermediates)
            chain_ok = True
        except (verification.VerificationError, ValueError) as e:
            chain_error = _reason(e, leaf, now, self_signed, trust)
            if len(chain) == 1 and not self_signed:
                chain_error += (" (only the server's own certificate could be read: "
                                "intermediates it sent are not seen before Python 3.13)")
    if chain_error:
        problems.append(f"chain: {chain_error}")
    if days_left < 0 and not (chain_error or "").startswith("expired"):
        problems.append(f"expired on {_iso(leaf.not_valid_after_utc)}")
    elif 0 <= days_left < EXPIRY_WARNING_DAYS:
        problems.append(f"expires in {days_left} day(s), on {_iso(leaf.not_valid_after_utc)}")
    name_ok = None
    if name is not None:
        name_ok = name_matches(name, dns, ips)
        if not name_ok:
            shown = ", ".join(dns + ips) or f"no subjectAltName (CN {_cn(leaf.subject)})"
            where = {"mx": "the MX host name",
                     "banner": "the name the server gave in its banner"}.get(
                         name_source or "", "the expected name")
            problems.append(f"name mismatch: the certificate is for {shown}, not {name} "
                            f"({where})")
    return CertReport(
        subject=_cn(leaf.subject), issuer=_cn(leaf.issuer), names=tuple(dns + ips),
        not_before=_iso(leaf.not_valid_before_utc), not_after=_iso(leaf.not_valid_after_utc),
        days_left=days_left, self_signed=self_signed, chain_length=len(chain), trust=trust,
        chain_ok=chain_ok, chain_error=chain_error, expected_name=name,
        name_source=name_source, name_ok=name_ok, problems=tuple(problems))
