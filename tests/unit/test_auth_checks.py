"""SPF, DKIM, DMARC and Authentication-Results over scripted DNS zones
(harness.analysis.auth, harness.analysis.dns). Offline: every record comes
from a ScenarioDns zone; DKIM keys are made here and messages signed with
dkimpy."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.analysis.auth import (
    AuthResults,
    DkimResult,
    SpfResult,
    aligned,
    check_dkim,
    check_dmarc,
    check_message,
    check_spf,
    from_domain,
    organizational_domain,
)
from harness.analysis.dns import (
    TEMPERROR,
    NotFound,
    Resolver,
    ScenarioDns,
    SystemDns,
    TempError,
    zone_problems,
)
from harness.scenario.loader import load_text

ROOT = Path(__file__).resolve().parents[2]
Zone = Mapping[str, Mapping[str, Sequence[str]]]

CLIENT = "192.0.2.10"
OTHER = "192.0.2.99"
HOST = "mx.harness.test"


def spf(zone: Zone, ip: str = CLIENT, mail_from: str = "alice@lab.test",
        helo: str = "client.lab.test") -> SpfResult:
    return check_spf(ip, mail_from, helo, ScenarioDns(zone), receiver=HOST)


# ------------------------------------------------------------------ the DNS


def test_scenario_dns_answers_and_normalizes() -> None:
    dns = ScenarioDns({
        "Lab.Test.": {"TXT": ["v=spf1 -all", "other"], "MX": ["mx.lab.test", "5 MX2.lab.test."]},
        "127.0.0.1": {"PTR": ["mx.lab.test."]},
    })
    assert dns.txt("lab.test") == ["v=spf1 -all", "other"]
    assert dns.query("LAB.test.", "mx") == ["10 mx.lab.test", "5 mx2.lab.test"]
    assert dns.query("1.0.0.127.in-addr.arpa", "PTR") == ["mx.lab.test"]
    assert dns.query("127.0.0.1", "PTR") == ["mx.lab.test"]
    assert isinstance(dns, Resolver)


def test_scenario_dns_not_found_tells_nxdomain_from_nodata() -> None:
    dns = ScenarioDns({"lab.test": {"A": ["192.0.2.1"]}})
    with pytest.raises(NotFound) as nodata:
        dns.txt("lab.test")
    assert not nodata.value.nxdomain
    with pytest.raises(NotFound) as nx:
        dns.txt("nowhere.test")
    assert nx.value.nxdomain


def test_scenario_dns_temperror_is_scoped_to_its_type() -> None:
    dns = ScenarioDns({"flaky.test": {"TXT": [TEMPERROR], "A": ["192.0.2.1"]}})
    with pytest.raises(TempError):
        dns.txt("flaky.test")
    assert dns.query("flaky.test", "A") == ["192.0.2.1"]


def test_scenario_dns_follows_cnames_and_stops_loops() -> None:
    dns = ScenarioDns({
        "alias.test": {"CNAME": ["target.test"]},
        "target.test": {"TXT": ["hello"]},
        "loop1.test": {"CNAME": ["loop2.test"]},
        "loop2.test": {"CNAME": ["loop1.test"]},
    })
    assert dns.txt("alias.test") == ["hello"]
    assert dns.query("alias.test", "CNAME") == ["target.test"]
    with pytest.raises(TempError):
        dns.txt("loop1.test")


def test_scenario_dns_wildcards() -> None:
    dns = ScenarioDns({"*.wild.test": {"A": ["192.0.2.7"]}, "exact.wild.test": {"TXT": ["x"]}})
    assert dns.query("a.b.wild.test", "A") == ["192.0.2.7"]
    with pytest.raises(NotFound):  # an existing name is not covered by the wildcard
        dns.query("exact.wild.test", "A")


def test_zone_problems_and_bad_zones() -> None:
    zone = {"lab.test": {"A": ["not-an-ip", "2001:db8::1"], "MX": ["x y z"], "SRV": ["1"]}}
    problems = zone_problems(zone)
    assert len(problems) == 4, problems
    with pytest.raises(ValueError, match="not an IP address"):
        ScenarioDns(zone)
    with pytest.raises(ValueError, match="unsupported record type"):
        ScenarioDns({}).query("lab.test", "SRV")


def test_scenario_dns_from_a_scenario_file() -> None:
    scenario = load_text("""
scenario: dns
dns:
  lab.test: {TXT: ["v=spf1 ip4:192.0.2.10 -all"]}
  _dmarc.lab.test: {TXT: ["v=DMARC1; p=quarantine"]}
""")
    dns = ScenarioDns(scenario.dns)
    assert dns.txt("_dmarc.lab.test") == ["v=DMARC1; p=quarantine"]
    assert check_spf(CLIENT, "a@lab.test", "h.lab.test", dns).result == "pass"


def test_system_dns_refuses_the_event_loop() -> None:
    import asyncio

    async def on_loop() -> None:
        SystemDns().txt("lab.test")  # refused before any lookup is made

    with pytest.raises(RuntimeError, match="thread"):
        asyncio.run(on_loop())


def test_analysis_imports_no_dns_library_until_used() -> None:
    code = ("import sys, json, harness.analysis.auth, harness.analysis.dns\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('dkim', 'spf', 'dns', 'authres', 'socket', 'asyncio'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    # socket alone: the standard library's email.utils imports it (see test_purity)
    assert json.loads(out.splitlines()[-1]) == ["socket"]


# ----------------------------------------------------------------------- SPF

SPF_CASES = {
    # result: (zone, client ip)
    "pass": ({"lab.test": {"TXT": ["v=spf1 ip4:192.0.2.0/28 -all"]}}, CLIENT),
    "fail": ({"lab.test": {"TXT": ["v=spf1 ip4:192.0.2.0/28 -all"]}}, OTHER),
    "softfail": ({"lab.test": {"TXT": ["v=spf1 ip4:198.51.100.1 ~all"]}}, CLIENT),
    "neutral": ({"lab.test": {"TXT": ["v=spf1 ip4:198.51.100.1 ?all"]}}, CLIENT),
    "none": ({"lab.test": {"TXT": ["some other text"], "A": ["192.0.2.10"]}}, CLIENT),
    "permerror": ({"lab.test": {"TXT": ["v=spf1 ip4:192.0.2.10 bogus -all"]}}, CLIENT),
    "temperror": ({"lab.test": {"TXT": [TEMPERROR]}}, CLIENT),
}


@pytest.mark.parametrize("expected", list(SPF_CASES))
def test_spf_every_result_from_a_scripted_zone(expected: str) -> None:
    zone, ip = SPF_CASES[expected]
    r = spf(zone, ip)
    assert r.result == expected, r
    assert (r.identity, r.domain, r.sender, r.client_ip) == (
        "mailfrom", "lab.test", "alice@lab.test", ip)


def test_spf_pass_names_the_mechanism() -> None:
    assert spf(SPF_CASES["pass"][0]).mechanism == "ip4:192.0.2.0/28"
    assert spf(SPF_CASES["fail"][0], OTHER).mechanism == "-all"


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        # mx: and a: through MX and A records
        ({"lab.test": {"TXT": ["v=spf1 mx -all"], "MX": ["10 mx.lab.test"]},
          "mx.lab.test": {"A": [CLIENT]}}, "pass"),
        ({"lab.test": {"TXT": ["v=spf1 a:relay.lab.test -all"]},
          "relay.lab.test": {"A": [CLIENT]}}, "pass"),
        # include: and redirect=
        ({"lab.test": {"TXT": ["v=spf1 include:_spf.provider.test -all"]},
          "_spf.provider.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}}, "pass"),
        ({"lab.test": {"TXT": ["v=spf1 redirect=_spf.provider.test"]},
          "_spf.provider.test": {"TXT": ["v=spf1 -all"]}}, "fail"),
        # an include that has no SPF record, and one whose lookup fails
        ({"lab.test": {"TXT": ["v=spf1 include:nothing.test -all"]}}, "permerror"),
        ({"lab.test": {"TXT": ["v=spf1 include:flaky.test -all"]},
          "flaky.test": {"TXT": [TEMPERROR]}}, "temperror"),
        # exists: against a wildcard, macros expanded
        ({"lab.test": {"TXT": ["v=spf1 exists:%{i}.allow.lab.test -all"]},
          "*.allow.lab.test": {"A": ["127.0.0.2"]}}, "pass"),
        # ptr: the client's PTR name, validated by its A record
        ({"lab.test": {"TXT": ["v=spf1 ptr -all"]},
          CLIENT: {"PTR": ["out.lab.test"]}, "out.lab.test": {"A": [CLIENT]}}, "pass"),
        # two SPF records, a CNAME'd record, no name at all
        ({"lab.test": {"TXT": ["v=spf1 -all", "v=spf1 +all"]}}, "permerror"),
        ({"lab.test": {"CNAME": ["spf.host.test"]},
          "spf.host.test": {"TXT": ["v=spf1 +all"]}}, "pass"),
        ({}, "none"),
        # RFC 7208 4.6.4: more than two void lookups
        ({"lab.test": {"TXT": ["v=spf1 a:v1.test a:v2.test a:v3.test -all"]}}, "permerror"),
    ],
)
def test_spf_mechanisms_resolve_through_the_zone(zone: Zone, expected: str) -> None:
    assert spf(zone).result == expected


def test_spf_ipv6_and_ipv4_mapped_clients() -> None:
    zone = {"lab.test": {"TXT": ["v=spf1 ip6:2001:db8::/32 a -all"], "A": [CLIENT]}}
    assert spf(zone, "2001:db8::25").result == "pass"
    assert spf(zone, "2001:db9::25").result == "fail"
    assert spf(zone, f"::ffff:{CLIENT}").result == "pass"


def test_spf_null_sender_checks_helo() -> None:
    zone = {"client.lab.test": {"TXT": ["v=spf1 ip4:192.0.2.10 -all"]}}
    for null in ("", "<>"):
        r = spf(zone, mail_from=null)
        assert (r.result, r.identity, r.domain, r.sender) == (
            "pass", "helo", "client.lab.test", "postmaster@client.lab.test")
    assert spf(zone, mail_from="<alice@client.lab.test>").identity == "mailfrom"


def test_spf_without_an_ip_or_a_domain_is_none() -> None:
    assert spf({}, ip="unknown").result == "none"
    assert spf({}, mail_from="", helo="").result == "none"


def test_spf_fail_explanation_from_exp() -> None:
    zone = {"lab.test": {"TXT": ["v=spf1 -all exp=why.lab.test"]},
            "why.lab.test": {"TXT": ["%{i} may not send for %{d}"]}}
    r = spf(zone)
    assert r.result == "fail"
    assert r.explanation == "192.0.2.10 may not send for lab.test"


# ---------------------------------------------------------------------- DKIM


def make_key(bits: int = 2048) -> tuple[bytes, str]:
    """(PKCS#1 PEM private key, base64 public key for p=)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def key() -> tuple[bytes, str]:
    return make_key()


MESSAGE = (b"From: Alice <alice@lab.test>\r\n"
           b"To: Bob <bob@example.net>\r\n"
           b"Subject: quarterly numbers\r\n"
           b"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n"
           b"Message-ID: <1@lab.test>\r\n"
           b"\r\n"
           b"Hello Bob,\r\nthe numbers are in.\r\n")


def sign(message: bytes, pem: bytes, domain: str = "lab.test", selector: str = "sel1",
         headers: Sequence[bytes] = (b"from", b"to", b"subject", b"date", b"message-id"),
         algorithm: bytes = b"rsa-sha256") -> bytes:
    sig = dkim.sign(message, selector.encode(), domain.encode(), pem,
                    include_headers=list(headers), signature_algorithm=algorithm)
    return bytes(sig) + message


def key_zone(pub: str, name: str = "sel1._domainkey.lab.test", extra: str = "") -> Zone:
    return {name: {"TXT": [f"v=DKIM1; k=rsa;{extra} p={pub}"]}}


def flip_body_byte(message: bytes) -> bytes:
    head, _, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + body.replace(b"numbers", b"numbirs", 1)


def test_dkim_pass(key: tuple[bytes, str]) -> None:
    pem, pub = key
    (r,) = check_dkim(sign(MESSAGE, pem), ScenarioDns(key_zone(pub)))
    assert (r.result, r.domain, r.selector, r.algorithm, r.reason) == (
        "pass", "lab.test", "sel1", "rsa-sha256", "")
    assert r.key_bits == 2048 and len(r.b) == 8


def test_dkim_fails_after_one_body_byte_changes(key: tuple[bytes, str]) -> None:
    pem, pub = key
    (r,) = check_dkim(flip_body_byte(sign(MESSAGE, pem)), ScenarioDns(key_zone(pub)))
    assert (r.result, r.reason) == ("fail", "body hash did not verify")


def test_dkim_fails_after_a_signed_header_changes(key: tuple[bytes, str]) -> None:
    pem, pub = key
    changed = sign(MESSAGE, pem).replace(b"quarterly", b"quarterlY")
    (r,) = check_dkim(changed, ScenarioDns(key_zone(pub)))
    assert (r.result, r.reason) == ("fail", "signature did not verify")


def test_dkim_with_another_key_fails(key: tuple[bytes, str]) -> None:
    _, other_pub = make_key()
    (r,) = check_dkim(sign(MESSAGE, key[0]), ScenarioDns(key_zone(other_pub)))
    assert r.result == "fail"


@pytest.mark.parametrize(
    ("zone", "expected", "reason"),
    [
        ({}, "neutral", "no key for signature"),
        ({"sel1._domainkey.lab.test": {"TXT": [TEMPERROR]}}, "temperror", "key lookup failed"),
        ({"sel1._domainkey.lab.test": {"TXT": ["v=DKIM1; k=rsa; p="]}}, "permerror",
         "key revoked"),
        ({"sel1._domainkey.lab.test": {"TXT": ["v=DKIM1; k=rsa; p=bm90IGEga2V5"]}},
         "permerror", "bad key record"),
    ],
)
def test_dkim_key_problems(key: tuple[bytes, str], zone: Zone, expected: str,
                           reason: str) -> None:
    (r,) = check_dkim(sign(MESSAGE, key[0]), ScenarioDns(zone))
    assert r.result == expected
    assert r.reason.startswith(reason), r.reason
    assert (r.domain, r.selector) == ("lab.test", "sel1")


def test_dkim_key_behind_a_cname(key: tuple[bytes, str]) -> None:
    zone = {"sel1._domainkey.lab.test": {"CNAME": ["sel1.keys.provider.test"]},
            **key_zone(key[1], "sel1.keys.provider.test")}
    (r,) = check_dkim(sign(MESSAGE, key[0]), ScenarioDns(zone))
    assert r.result == "pass"


def test_dkim_rsa_sha1_is_policy_and_key_h_tag_is_enforced(key: tuple[bytes, str]) -> None:
    pem, pub = key
    signed = sign(MESSAGE, pem, algorithm=b"rsa-sha1")
    (r,) = check_dkim(signed, ScenarioDns(key_zone(pub)))
    assert (r.result, r.algorithm) == ("policy", "rsa-sha1")
    assert "RFC 8301" in r.reason
    (r,) = check_dkim(signed, ScenarioDns(key_zone(pub, extra=" h=sha256;")))
    assert (r.result, r.reason) == (
        "permerror", "inappropriate hash algorithm: key allows h=sha256")
    (r,) = check_dkim(sign(MESSAGE, pem), ScenarioDns(key_zone(pub, extra=" h=sha256;")))
    assert r.result == "pass"


def test_dkim_from_must_be_signed(key: tuple[bytes, str]) -> None:
    # dkimpy refuses to sign without From: take From out of h= afterwards
    signed = re.sub(rb"h=[^;]*;", b"h=to : subject;", sign(MESSAGE, key[0]), count=1)
    (r,) = check_dkim(signed, ScenarioDns(key_zone(key[1])))
    assert (r.result, r.reason) == ("permerror", "From field not signed")


def test_dkim_malformed_signature_is_permerror() -> None:
    message = b"DKIM-Signature: v=1; a=rsa-sha256; d=lab.test; s=sel1; h=from; b=AAAA\r\n" + MESSAGE
    (r,) = check_dkim(message, ScenarioDns({}))
    assert r.result == "permerror"
    assert "missing bh=" in r.reason
    assert (r.domain, r.selector) == ("lab.test", "sel1")


def test_dkim_every_signature_in_order(key: tuple[bytes, str]) -> None:
    pem, pub = key
    twice = sign(sign(MESSAGE, pem), pem, domain="esp.test", selector="k1")
    results = check_dkim(twice, ScenarioDns(key_zone(pub)))
    assert [(r.domain, r.selector, r.result) for r in results] == [
        ("esp.test", "k1", "neutral"), ("lab.test", "sel1", "pass")]


def test_dkim_unsigned_and_unparseable_messages() -> None:
    assert check_dkim(MESSAGE, ScenarioDns({})) == ()
    garbage = b"DKIM-Signature: v=1\r\n\x00\x01 not a header\r\n\r\nbody"
    (r,) = check_dkim(garbage, ScenarioDns({}))
    assert r.result == "permerror"


# --------------------------------------------------------------------- DMARC


def spf_pass(domain: str) -> SpfResult:
    return SpfResult("pass", "mailfrom", domain, f"bounce@{domain}", CLIENT)


def dkim_pass(domain: str) -> DkimResult:
    return DkimResult("pass", domain, "sel1")


NO_SPF = SpfResult("none", "mailfrom", "other.test", "x@other.test", CLIENT)


def dmarc_zone(record: str, name: str = "_dmarc.lab.test") -> ScenarioDns:
    return ScenarioDns({name: {"TXT": [record]}})


def test_dmarc_pass_through_relaxed_spf_alignment() -> None:
    r = check_dmarc(MESSAGE, spf=spf_pass("mail.lab.test"), dkim=(),
                    resolver=dmarc_zone("v=DMARC1; p=reject"))
    assert (r.result, r.policy, r.disposition, r.spf_aligned, r.dkim_aligned) == (
        "pass", "reject", "none", True, False)
    assert r.domain == "lab.test" and r.record_domain == "lab.test"


def test_dmarc_strict_spf_alignment_fails_with_p_reject() -> None:
    r = check_dmarc(MESSAGE, spf=spf_pass("mail.lab.test"), dkim=(),
                    resolver=dmarc_zone("v=DMARC1; p=reject; aspf=s"))
    assert (r.result, r.policy, r.disposition, r.aspf) == ("fail", "reject", "reject", "s")
    assert "not aligned (strict)" in r.reason


def test_dmarc_dkim_alignment_relaxed_and_strict() -> None:
    relaxed = check_dmarc(MESSAGE, spf=NO_SPF, dkim=[dkim_pass("news.lab.test")],
                          resolver=dmarc_zone("v=DMARC1; p=reject"))
    assert (relaxed.result, relaxed.dkim_aligned) == ("pass", True)
    strict = check_dmarc(MESSAGE, spf=NO_SPF, dkim=[dkim_pass("news.lab.test")],
                         resolver=dmarc_zone("v=DMARC1; p=reject; adkim=s"))
    assert (strict.result, strict.disposition) == ("fail", "reject")
    exact = check_dmarc(MESSAGE, spf=NO_SPF, dkim=[dkim_pass("lab.test")],
                        resolver=dmarc_zone("v=DMARC1; p=reject; adkim=s"))
    assert exact.result == "pass"


def test_dmarc_needs_a_pass_not_just_alignment() -> None:
    failed = DkimResult("fail", "lab.test", "sel1", "body hash did not verify")
    softfail = SpfResult("softfail", "mailfrom", "lab.test", "a@lab.test", CLIENT)
    r = check_dmarc(MESSAGE, spf=softfail, dkim=[failed],
                    resolver=dmarc_zone("v=DMARC1; p=quarantine"))
    assert (r.result, r.disposition) == ("fail", "quarantine")


def test_dmarc_organizational_domain_fallback_uses_sp() -> None:
    message = MESSAGE.replace(b"alice@lab.test", b"alice@news.lab.test")
    r = check_dmarc(message, spf=NO_SPF, dkim=(),
                    resolver=dmarc_zone("v=DMARC1; p=reject; sp=quarantine"))
    assert (r.result, r.domain, r.record_domain, r.policy) == (
        "fail", "news.lab.test", "lab.test", "quarantine")


def test_dmarc_none_temperror_permerror() -> None:
    assert check_dmarc(MESSAGE, spf=NO_SPF, dkim=(), resolver=ScenarioDns({})).result == "none"
    r = check_dmarc(MESSAGE, spf=NO_SPF, dkim=(), resolver=ScenarioDns(
        {"_dmarc.lab.test": {"TXT": ["v=DMARC1; p=none", "v=DMARC1; p=reject"]}}))
    assert r.result == "none" and "2 DMARC records" in r.reason
    r = check_dmarc(MESSAGE, spf=NO_SPF, dkim=(), resolver=dmarc_zone(TEMPERROR))
    assert r.result == "temperror"
    r = check_dmarc(MESSAGE, spf=NO_SPF, dkim=(), resolver=dmarc_zone("v=DMARC1; p=maybe"))
    assert r.result == "permerror"
    # RFC 7489 6.6.3: an invalid p= with rua= is read as p=none
    r = check_dmarc(MESSAGE, spf=NO_SPF, dkim=(),
                    resolver=dmarc_zone("v=DMARC1; p=maybe; rua=mailto:d@lab.test"))
    assert (r.result, r.policy, r.disposition) == ("fail", "none", "none")
    # not a DMARC record at all
    assert check_dmarc(MESSAGE, spf=NO_SPF, dkim=(),
                       resolver=dmarc_zone("v=spf1 -all")).result == "none"


def test_dmarc_from_field_problems() -> None:
    two = b"From: a@lab.test\r\n" + MESSAGE
    r = check_dmarc(two, spf=NO_SPF, dkim=(), resolver=ScenarioDns({}))
    assert (r.result, r.reason) == ("permerror", "2 From header fields")
    assert from_domain(b"Subject: x\r\n\r\n") == ("", "no From header field")
    assert from_domain(b"From: a@lab.test, b@LAB.test\r\n\r\n") == ("lab.test", "")
    assert from_domain(b"From: a@lab.test, b@other.test\r\n\r\n")[0] == ""


def test_organizational_domain_and_alignment() -> None:
    assert organizational_domain("lab.test") == "lab.test"
    assert organizational_domain("a.b.mail.lab.test.") == "lab.test"
    assert organizational_domain("mail.example.co.uk") == "example.co.uk"
    assert organizational_domain("co.uk") == "co.uk"
    assert aligned("mail.lab.test", "lab.test", "r")
    assert not aligned("mail.lab.test", "lab.test", "s")
    assert not aligned("a.example.co.uk", "b.other.co.uk", "r")
    assert not aligned("", "lab.test", "r")


# --------------------------------------------------- check_message and A-R


def full_zone(pub: str, dmarc: str = "v=DMARC1; p=reject") -> ScenarioDns:
    return ScenarioDns({
        "lab.test": {"TXT": ["v=spf1 ip4:192.0.2.10 -all"]},
        "_dmarc.lab.test": {"TXT": [dmarc]},
        **key_zone(pub),
    })


def check(raw: bytes, pub: str, ip: str = CLIENT, mail_from: str = "alice@lab.test",
          **kw: str) -> AuthResults:
    return check_message(raw, client_ip=ip, helo="client.lab.test", mail_from=mail_from,
                         resolver=full_zone(pub, **kw), hostname=HOST)


def test_check_message_all_pass_and_the_header_text(key: tuple[bytes, str]) -> None:
    pem, pub = key
    r = check(sign(MESSAGE, pem), pub)
    assert (r.spf.result, r.dkim_result, r.dmarc.result) == ("pass", "pass", "pass")
    b = r.dkim[0].b
    # a value is quoted when it holds an RFC 2045 tspecial ("+" is not one)
    b_value = f'"{b}"' if any(ch in '()<>@,;:\\"/[]?=' for ch in b) else b
    assert r.authentication_results == (
        "mx.harness.test; "
        "spf=pass (domain of alice@lab.test designates 192.0.2.10 as permitted sender) "
        "smtp.mailfrom=alice@lab.test; "
        f"dkim=pass (2048-bit key) header.d=lab.test header.i=@lab.test header.s=sel1 "
        f"header.b={b_value}; "
        "dmarc=pass (p=reject dis=none) header.from=lab.test")


def test_check_message_failures_in_the_header(key: tuple[bytes, str]) -> None:
    pem, pub = key
    r = check(flip_body_byte(sign(MESSAGE, pem)), pub, ip=OTHER)
    assert (r.spf.result, r.dkim_result, r.dmarc.result, r.dmarc.disposition) == (
        "fail", "fail", "fail", "reject")
    text = r.authentication_results
    assert "spf=fail (domain of alice@lab.test does not designate 192.0.2.99" in text
    assert 'dkim=fail (2048-bit key) reason="body hash did not verify" header.d=lab.test' in text
    assert text.endswith("dmarc=fail (p=reject dis=reject) header.from=lab.test")


def test_check_message_unsigned_null_sender(key: tuple[bytes, str]) -> None:
    zone = ScenarioDns({"client.lab.test": {"TXT": ["v=spf1 ip4:192.0.2.10 -all"]}})
    r = check_message(MESSAGE, client_ip=CLIENT, helo="client.lab.test", mail_from="",
                      resolver=zone, hostname=HOST)
    assert r.dkim == () and r.dkim_result == "none"
    assert r.authentication_results == (
        "mx.harness.test; "
        "spf=pass (domain of postmaster@client.lab.test designates 192.0.2.10 as permitted "
        "sender) smtp.helo=client.lab.test; "
        "dkim=none (message not signed); "
        "dmarc=none (no DMARC record) header.from=lab.test")


def test_authentication_results_parse_back_with_authres(key: tuple[bytes, str]) -> None:
    pem, pub = key
    for raw, ip in ((sign(MESSAGE, pem), CLIENT), (flip_body_byte(sign(MESSAGE, pem)), OTHER),
                    (MESSAGE, CLIENT)):
        r = check(raw, pub, ip=ip)
        parsed = authres.all_features().parse(r.header_field().replace("\r\n\t", " "))
        assert parsed.authserv_id == HOST
        methods = [(res.method, res.result) for res in parsed.results]
        assert methods == [("spf", r.spf.result), ("dkim", r.dkim_result),
                           ("dmarc", r.dmarc.result)]


def test_as_dict_is_json_ready(key: tuple[bytes, str]) -> None:
    pem, pub = key
    d = check(flip_body_byte(sign(MESSAGE, pem)), pub, ip=OTHER).as_dict()
    assert json.loads(json.dumps(d)) == d
    assert (d["spf"]["result"], d["dkim"][0]["result"], d["dkim_result"]) == (
        "fail", "fail", "fail")
    assert (d["dmarc"]["result"], d["dmarc"]["disposition"]) == ("fail", "reject")


def test_checks_never_touch_the_network(key: tuple[bytes, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("network used")

    for name in ("socket", "create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse)
    pem, pub = key
    r = check(sign(MESSAGE, pem), pub)
    assert (r.spf.result, r.dkim_result, r.dmarc.result) == ("pass", "pass", "pass")


def test_header_field_folds_between_results_only(key: tuple[bytes, str]) -> None:
    zone = ScenarioDns({"lab.test": {"TXT": ["v=spf1 -all exp=why.lab.test"]},
                        "why.lab.test": {"TXT": ["no; really (not) you"]}})
    r = check_message(MESSAGE, client_ip=CLIENT, helo="h", mail_from="a@lab.test",
                      resolver=zone, hostname=HOST)
    lines = r.header_field().split("\r\n\t")
    assert lines[0] == "Authentication-Results: mx.harness.test;"
    assert [line.split("=")[0] for line in lines[1:]] == ["spf", "dkim", "dmarc"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(
    st.binary(max_size=400),
    st.lists(st.sampled_from([
        b"From: a@lab.test", b"From: <>", b"From:", b"To: b@x.test", b"Subject: \xff\xfe",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=lab.test; s=sel1; h=from; bh=AAAA; b=AAAA",
        b"DKIM-Signature: ;;;=", b"DKIM-Signature: v=1; a=ed25519-sha256; d=lab.test; s=k",
        b" folded", b"", b"body line", b"\x00",
    ]), max_size=12).map(b"\r\n".join),
), mail_from=st.sampled_from(["", "<>", "a@lab.test", "@", "x", "a@[127.0.0.1]"]),
   helo=st.sampled_from(["", "[127.0.0.1]", "client.lab.test", "bad..name"]))
def test_check_message_never_raises(raw: bytes, mail_from: str, helo: str) -> None:
    zone = ScenarioDns({
        "lab.test": {"TXT": ["v=spf1 include:flaky.test -all"]},
        "flaky.test": {"TXT": [TEMPERROR]},
        "_dmarc.lab.test": {"TXT": ["v=DMARC1; p=reject"]},
        "sel1._domainkey.lab.test": {"TXT": ["v=DKIM1; p=AAAA"]},
        "k._domainkey.lab.test": {"TXT": ["v=DKIM1; k=ed25519; p=AAAA"]},
    })
    r = check_message(raw, client_ip=CLIENT, helo=helo, mail_from=mail_from, resolver=zone,
                      hostname=HOST)
    assert r.spf.result in ("pass", "fail", "softfail", "neutral", "none", "permerror",
                            "temperror")
    assert all(d.result in ("pass", "fail", "neutral", "policy", "permerror", "temperror")
               for d in r.dkim)
    assert r.dmarc.result in ("pass", "fail", "none", "permerror", "temperror")
    assert r.authentication_results.startswith(HOST + "; spf=")


@pytest.mark.parametrize("head", [
    b"From: a@lab.test\r\nTo: b@x.test\r\n\r\nbody",
    b"To: b@x.test\r\nFROM: A <a@Lab.Test>\r\n\r\n",
    b"From: a@lab.test\r\nFrom: c@lab.test\r\n\r\n",
    b"From: =?utf-8?q?A?=\r\n <a@lab.test>\r\n\r\n",
    b"From :a@lab.test\r\n\r\n",           # "From " is not From: no field
    b"From a@lab.test Mon Dec  1\r\nFrom: a@lab.test\r\n\r\n",  # an mbox line first
    b"X: 1\r\nnot a field\r\nFrom: a@lab.test\r\n\r\n",  # the fields end at a bad line
    b"From: a@lab.test\nTo: b\n\n",
    b"Subject: x\r\n\r\n",
    b"From: \"x@y\" <>\r\n\r\n",
])
def test_from_domain_remembered_is_what_the_parser_says(head: bytes) -> None:
    """The From domain remembered by its fields' bytes is the parser's, each time."""
    from harness.analysis.auth import _from_domain, _head

    want = _from_domain(_head(head))
    assert from_domain(head) == want
    assert from_domain(head) == want  # from what was remembered
