"""Certificates and TLS contexts for STARTTLS and implicit TLS.

With no certificate files in the scenario, the harness makes one at start for
its hostname (cryptography), of the kind the scenario asks for: self-signed,
signed by the harness's own lab CA (whose certificate is written beside the
store as harness-ca.pem, so a sender can be told to trust it), expired, or for
the wrong host (these two are signed by the lab CA too, so a sender that trusts
it fails for that one reason).
Runs once per listener at start, never on the event loop while serving."""

from __future__ import annotations

import datetime as dt
import functools
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness.errors import HarnessError
from harness.scenario.model import CertKind, Tls

WRONG_HOST = "wrong-host.harness.invalid"


@dataclass(frozen=True)
class Material:
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes | None = None  # the lab CA, for ca_signed


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SMTP Harness lab")])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@functools.cache
def lab_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The lab CA of this process (made once: every certificate it signs,
    and the harness-ca.pem a sender is told to trust, agree)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name("SMTP Harness lab CA"))
            .issuer_name(_name("SMTP Harness lab CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_certificate(hostname: str, kind: CertKind = CertKind.SELF_SIGNED) -> Material:
    """A server certificate for `hostname` of the given kind (EC P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = WRONG_HOST if kind is CertKind.WRONG_HOST else hostname
    if kind is CertKind.EXPIRED:
        start, end = now - dt.timedelta(days=730), now - dt.timedelta(days=365)
    else:
        start, end = now - dt.timedelta(days=1), now + dt.timedelta(days=825)
    issuer_name = _name(name)
    signer: ec.EllipticCurvePrivateKey = key
    ca_pem = None
    if kind is not CertKind.SELF_SIGNED:
        # Signed by the lab CA, so a sender that trusts it fails for the one
        # reason this kind is about (expiry, name), not for self-signing.
        ca_cert, signer = lab_ca()
        issuer_name = ca_cert.subject
        ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(signer, hashes.SHA256()))
    return Material(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key), ca_pem)


#: certificates made in this process, by host name and kind: made once, and
#: handed to the worker processes that serve the same listener (one
#: certificate, one lab CA, whichever worker a connection lands on)
_MADE: dict[tuple[str, CertKind], Material] = {}


def certificate(hostname: str, kind: CertKind = CertKind.SELF_SIGNED) -> Material:
    """This process's certificate for `hostname` of `kind` (made once)."""
    found = _MADE.get((hostname, kind))
    if found is None:
        found = _MADE[(hostname, kind)] = make_certificate(hostname, kind)
    return found


def made() -> dict[tuple[str, CertKind], Material]:
    """The certificates made so far (for the workers)."""
    return dict(_MADE)


def adopt(materials: dict[tuple[str, CertKind], Material]) -> None:
    """Use these certificates (the primary's) rather than make new ones."""
    _MADE.update(materials)


def server_context(tls: Tls, hostname: str, ca_dir: Path | None = None) -> ssl.SSLContext:
    """The SSL context a listener presents; writes the lab CA to `ca_dir`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    # Old clients (Exchange 2010, old Postfix) may still offer TLS 1.0/1.1;
    # a lab server takes what the sender can do and records it.
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    try:
        if tls.cert and tls.key:
            ctx.load_cert_chain(tls.cert, tls.key)
            return ctx
        material = certificate(hostname, tls.certificate)
        # ssl loads certificates from files only: a private temporary file.
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(material.cert_pem + material.key_pem)
            f.flush()
            ctx.load_cert_chain(f.name)
    except (ssl.SSLError, OSError) as e:
        raise HarnessError(f"cannot load the TLS certificate: {e}") from e
    if material.ca_pem is not None and ca_dir is not None:
        ca_dir.mkdir(parents=True, exist_ok=True)
        (ca_dir / "harness-ca.pem").write_bytes(material.ca_pem)
    return ctx


#: A fatal TLS alert record, handshake_failure (RFC 8446 6.2): what a client
#: reads when the `tls_fail` fault breaks the handshake after the 220.
HANDSHAKE_FAILURE_ALERT = bytes([0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x28])
