"""DKIM against a real signer: Debian's OpenDKIM (packages opendkim and
opendkim-tools). `opendkim-genkey` makes the key pair and the TXT record;
`opendkim -t -` (test mode: the milter's code, one message from stdin, no
MTA) signs with a private configuration. The TXT record is served from a
scenario's `dns:` section, and harness.analysis.auth verifies.

Why not `opendkim-testmsg`, which can sign too: Debian 12's signs with
rsa-sha1 only (no option to change it), and without -C it garbles the
folded b= value. The last test pins what we report for it.

Offline, unprivileged, a second or two. Skipped where OpenDKIM is not
installed, except under CI, where a missing package fails loudly."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.analysis.auth import AuthResults, check_message
from harness.analysis.dns import ScenarioDns
from harness.scenario.loader import load_text

pytestmark = pytest.mark.slow

TOOLS = ("opendkim", "opendkim-genkey", "opendkim-testmsg")
HOST = "mx.harness.test"
CLIENT = "127.0.0.1"

MESSAGE = (b"From: Lab Sender <sender@lab.test>\r\n"
           b"To: <user@example.net>\r\n"
           b"Subject: signed by OpenDKIM\r\n"
           b"Date: Sun, 29 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <opendkim-1@lab.test>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n"
           b"\r\n"
           b"Hello,\r\n"
           b"this message was signed by OpenDKIM.\r\n")


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        why = (f"OpenDKIM is not installed (missing {', '.join(missing)}): "
               "apt-get install opendkim opendkim-tools")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def key(tools: None, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(private key file, TXT record value) made by opendkim-genkey."""
    folder = tmp_path_factory.mktemp("opendkim-key")
    subprocess.run(["opendkim-genkey", "--bits=2048", "-D", str(folder), "-d", "lab.test",
                    "-s", "sel1"], check=True, capture_output=True, timeout=60)
    return folder / "sel1.private", txt_record(folder / "sel1.txt")


def txt_record(path: Path) -> str:
    """The record value of opendkim-genkey's zone file stub:
    `sel1._domainkey IN TXT ( "v=DKIM1; h=sha256; k=rsa; " "p=MIIB..." "..." ) ; comment`."""
    text = path.read_text()
    inside = text[text.index("(") + 1:text.index(")")]
    return "".join(re.findall(r'"([^"]*)"', inside))


def opendkim_sign(message: bytes, key_file: Path, folder: Path,
                  canonicalization: str = "relaxed/simple") -> bytes:
    """The message with the DKIM-Signature that `opendkim -t -` makes for it."""
    conf = folder / f"opendkim-{canonicalization.replace('/', '-')}.conf"
    conf.write_text(
        "Mode s\n"
        "Domain lab.test\n"
        "Selector sel1\n"
        f"KeyFile {key_file}\n"
        f"Canonicalization {canonicalization}\n"
        "SignatureAlgorithm rsa-sha256\n"
        "Syslog no\n"
        # pytest's temporary folders live under /tmp, which anyone can write:
        # OpenDKIM refuses such key paths unless told otherwise
        "RequireSafeKeys false\n")
    done = subprocess.run(["opendkim", "-x", str(conf), "-t", "-"], input=message,
                          capture_output=True, timeout=60, check=False)
    out = done.stdout
    assert done.returncode == 0 and b"DKIM-Signature:" in out, (
        f"opendkim exited {done.returncode}: {out!r} {done.stderr!r}")
    # stdout: "opendkim: (stdin):\n" then the header field, folded, no final newline
    header = out[out.index(b"DKIM-Signature:"):].rstrip(b"\r\n")
    return re.sub(rb"\r?\n", b"\r\n", header) + b"\r\n" + message


def resolver(txt: str) -> ScenarioDns:
    """The zone as a scenario file would give it (the DKIM key from genkey)."""
    scenario = load_text(f"""
scenario: opendkim
dns:
  lab.test: {{TXT: ["v=spf1 ip4:127.0.0.1 -all"]}}
  _dmarc.lab.test: {{TXT: ["v=DMARC1; p=reject"]}}
  sel1._domainkey.lab.test: {{TXT: [{json.dumps(txt)}]}}
""")
    return ScenarioDns(scenario.dns)


def check(raw: bytes, txt: str, client_ip: str = CLIENT) -> AuthResults:
    return check_message(raw, client_ip=client_ip, helo="client.lab.test",
                         mail_from="sender@lab.test", resolver=resolver(txt), hostname=HOST)


def change_one_body_byte(message: bytes) -> bytes:
    head, sep, body = message.partition(b"\r\n\r\n")
    assert b"signed" in body
    return head + sep + body.replace(b"signed", b"signad", 1)


def test_genkey_record_is_a_dkim_key(key: tuple[Path, str]) -> None:
    _, txt = key
    assert txt.startswith("v=DKIM1;") and "k=rsa" in txt and "p=MII" in txt


def test_opendkim_signature_verifies_as_pass(key: tuple[Path, str], tmp_path: Path) -> None:
    key_file, txt = key
    signed = opendkim_sign(MESSAGE, key_file, tmp_path)
    r = check(signed, txt)
    (sig,) = r.dkim
    assert (sig.result, sig.domain, sig.selector, sig.algorithm, sig.key_bits) == (
        "pass", "lab.test", "sel1", "rsa-sha256", 2048), sig
    assert (r.spf.result, r.dmarc.result) == ("pass", "pass")
    assert "dkim=pass (2048-bit key) header.d=lab.test header.s=sel1" in r.authentication_results


def test_one_body_byte_changed_fails(key: tuple[Path, str], tmp_path: Path) -> None:
    key_file, txt = key
    tampered = change_one_body_byte(opendkim_sign(MESSAGE, key_file, tmp_path))
    (sig,) = check(tampered, txt).dkim
    assert (sig.result, sig.reason) == ("fail", "body hash did not verify")
    # with SPF failing too, nothing aligned passes: DMARC fails, p=reject applies
    r = check(tampered, txt, client_ip="127.0.0.2")
    assert (r.spf.result, r.dmarc.result, r.dmarc.disposition) == ("fail", "fail", "reject")
    assert 'dkim=fail (2048-bit key) reason="body hash did not verify"' in r.authentication_results


@pytest.mark.parametrize("canonicalization", ["simple/simple", "relaxed/relaxed"])
def test_canonicalizations(key: tuple[Path, str], tmp_path: Path, canonicalization: str) -> None:
    key_file, txt = key
    signed = opendkim_sign(MESSAGE, key_file, tmp_path, canonicalization)
    assert f"c={canonicalization}".encode() in signed
    assert check(signed, txt).dkim[0].result == "pass"
    # what relaxed forgives and simple does not: re-spaced header and body lines
    respaced = signed.replace(b"Subject: signed by", b"Subject:  signed   by").replace(
        b"this message", b"this  message  ")
    expected = "pass" if canonicalization == "relaxed/relaxed" else "fail"
    assert check(respaced, txt).dkim[0].result == expected


def test_opendkim_testmsg_signs_rsa_sha1(key: tuple[Path, str]) -> None:
    """Debian 12's opendkim-testmsg signs with rsa-sha1, which genkey's own
    record (h=sha256) forbids: RFC 6376 6.1.2 makes that a permerror. A
    future testmsg signing rsa-sha256 would pass."""
    key_file, txt = key
    done = subprocess.run(["opendkim-testmsg", "-C", "-d", "lab.test", "-k", str(key_file),
                           "-s", "sel1"], input=MESSAGE, capture_output=True, timeout=60,
                          check=True)
    (sig,) = check(done.stdout, txt).dkim
    if sig.algorithm == "rsa-sha1":
        assert (sig.result, sig.reason) == (
            "permerror", "inappropriate hash algorithm: key allows h=sha256")
    else:
        assert sig.result == "pass"
