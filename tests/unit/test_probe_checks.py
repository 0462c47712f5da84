"""The probe's pure parts: where mail goes (analysis/mx.py over a scripted
zone), the certificate checks (analysis/certificate.py over certificates
made here), the verdicts (analysis/probe_verdict.py: steps in, verdict
out), the zone file loader and the --mx parser."""

from __future__ import annotations

import datetime as dt
import textwrap

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from harness.analysis.certificate import check_certificate, load_anchors, name_matches
from harness.analysis.dns import ScenarioDns
from harness.analysis.mx import MxHost, mx_plan, static_hosts
from harness.analysis.probe_verdict import (
    EXIT_CODES,
    MxResult,
    ProbeReport,
    Step,
    judge_mx,
    overall,
)
from harness.errors import ScenarioError
from harness.probe.client import ProbeError, parse_target
from harness.scenario.loader import load_zone_text
from harness.scenario.model import CertKind
from harness.smtp.tls import lab_ca, make_certificate

ZONE = {
    "lab.test": {"SOA": ["ns1.lab.test hostmaster.lab.test 7 3600 600 86400 300"],
                 "MX": ["20 mx2.lab.test", "10 mx1.lab.test", "30 alias.lab.test",
                        "40 127.0.0.9"]},
    "mx1.lab.test": {"A": ["127.0.0.1"]},
    "mx2.lab.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
    "alias.lab.test": {"CNAME": ["mx1.lab.test"]},
    "null.test": {"MX": ["0 ."]},
    "mixed.test": {"MX": ["0 .", "10 mx1.lab.test"]},
    "implicit.test": {"A": ["127.0.0.3"]},
    "nohost.test": {"TXT": ["v=spf1 -all"]},
    "flaky.test": {"MX": ["!TEMPERROR"]},
    "ghost.test": {"MX": ["10 nowhere.ghost.test"]},
}


def plan(domain: str):  # type: ignore[no-untyped-def]
    return mx_plan(domain, ScenarioDns(ZONE), port=2525, source="zone.yaml")


# ------------------------------------------------------------------ DNS


def test_mx_in_preference_order_with_soa_addresses_and_flags() -> None:
    report, hosts = plan("lab.test")
    assert report.soa == "ns1.lab.test hostmaster.lab.test 7 3600 600 86400 300"
    assert report.mx == ((10, "mx1.lab.test"), (20, "mx2.lab.test"), (30, "alias.lab.test"),
                         (40, "127.0.0.9"))
    assert [(h.label, h.addresses, h.flags, h.port) for h in hosts] == [
        ("MX 10 mx1.lab.test", ("127.0.0.1",), (), 2525),
        ("MX 20 mx2.lab.test", ("127.0.0.2", "::1"), (), 2525),
        ("MX 30 alias.lab.test", ("127.0.0.1",), ("cname",), 2525),
        ("MX 40 127.0.0.9", ("127.0.0.9",), ("address-literal",), 2525),
    ]
    assert "RFC 2181" in hosts[2].notes[0] and "RFC 5321" in hosts[3].notes[0]
    assert not (report.null_mx or report.nxdomain or report.implicit_mx or report.no_host)


@pytest.mark.parametrize(("domain", "facts", "hosts"), [
    ("null.test", {"null_mx": True}, []),
    ("nope.test", {"nxdomain": True}, []),
    ("nohost.test", {"implicit_mx": True, "no_host": True}, []),
    ("implicit.test", {"implicit_mx": True}, [("implicit.test", ("127.0.0.3",), "implicit")]),
    ("ghost.test", {}, [("nowhere.ghost.test", (), "mx")]),
])
def test_mx_plan_special_cases(domain: str, facts: dict[str, bool],
                               hosts: list[tuple[str, tuple[str, ...], str]]) -> None:
    report, found = plan(domain)
    for key in ("null_mx", "nxdomain", "implicit_mx", "no_host"):
        assert getattr(report, key) is facts.get(key, False), key
    assert [(h.name, h.addresses, h.source) for h in found] == hosts


def test_mx_plan_temporary_failure_and_a_null_mx_among_others() -> None:
    report, hosts = plan("flaky.test")
    assert report.temp_error is not None and "TEMPERROR" in report.temp_error and hosts == []
    report, hosts = plan("mixed.test")
    assert not report.null_mx and [h.name for h in hosts] == ["mx1.lab.test"]
    assert any("RFC 7505" in n for n in report.notes)
    _, hosts = plan("ghost.test")
    assert hosts[0].flags == ("no-address",)


def test_static_hosts_use_dns_only_for_names() -> None:
    hosts, lookups = static_hosts([(None, "127.0.0.5", 25), ("mx.named.test", "127.0.0.6", 26)])
    assert [(h.name, h.addresses, h.port, h.source) for h in hosts] == [
        (None, ("127.0.0.5",), 25, "given"), ("mx.named.test", ("127.0.0.6",), 26, "given")]
    assert lookups == ()
    hosts, lookups = static_hosts([("mx2.lab.test", None, 25)], ScenarioDns(ZONE))
    assert hosts[0].addresses == ("127.0.0.2", "::1")
    assert [(x.rtype, x.answers) for x in lookups] == [("A", ("127.0.0.2",)),
                                                       ("AAAA", ("::1",))]


@pytest.mark.parametrize(("text", "parsed"), [
    ("127.0.0.1:2525", (None, "127.0.0.1", 2525)),
    ("127.0.0.1", (None, "127.0.0.1", 25)),
    ("[::1]:2526", (None, "::1", 2526)),
    ("::1", (None, "::1", 25)),
    ("MX1.Partner.Example.", ("mx1.partner.example", None, 25)),
    ("mx1.partner.example:587", ("mx1.partner.example", None, 587)),
    ("mx.lab.test=127.0.0.1:2525", ("mx.lab.test", "127.0.0.1", 2525)),
])
def test_parse_target(text: str, parsed: tuple[str | None, str | None, int]) -> None:
    assert parse_target(text) == parsed


@pytest.mark.parametrize("text", ["127.0.0.1:x", "127.0.0.1:0", "[::1", "mx=name.test", ":25",
                                  "127.0.0.1:70000"])
def test_parse_target_refuses_bad_input(text: str) -> None:
    with pytest.raises(ProbeError, match="--mx"):
        parse_target(text)


def test_zone_file_in_scenario_format_or_bare_with_positioned_problems() -> None:
    bare = "lab.test: {MX: ['10 mx1.lab.test']}\nmx1.lab.test: {A: [127.0.0.1]}\n"
    assert load_zone_text(bare, "z.yaml") == {"lab.test": {"MX": ("10 mx1.lab.test",)},
                                              "mx1.lab.test": {"A": ("127.0.0.1",)}}
    scenario = "scenario: x\ndns:\n  lab.test: {MX: [mx.lab.test]}\n"
    assert load_zone_text(scenario, "z.yaml") == {"lab.test": {"MX": ("mx.lab.test",)}}
    bad = textwrap.dedent("""\
        lab.test: {MX: ['x y z'], A: [300.1.1.1]}
        mx.lab.test: {AAAA: [127.0.0.1], TXX: [a], SOA: [just-one]}
        """)
    with pytest.raises(ScenarioError) as info:
        load_zone_text(bad, "z.yaml")
    assert [str(p) for p in info.value.problems] == [
        "z.yaml:1:17: 'x y z' is not 'PREFERENCE HOST' or 'HOST'",
        "z.yaml:1:31: '300.1.1.1' is not an IP address",
        "z.yaml:2:22: 127.0.0.1 is not an IPv6 address",
        "z.yaml:2:34: unknown key TXX in dns mx.lab.test (did you mean TXT?)",
        "z.yaml:2:50: 'just-one' is not 'MNAME RNAME [SERIAL REFRESH RETRY EXPIRE MINIMUM]'",
    ]
    with pytest.raises(ScenarioError, match=r"z\.yaml:1:1: the zone names no records"):
        load_zone_text("lab.test: {}\n", "z.yaml")


# ----------------------------------------------------------- certificates

NOW = dt.datetime.now(dt.UTC)


def cert(kind: CertKind, host: str = "mx.lab.test") -> tuple[bytes, list[x509.Certificate]]:
    m = make_certificate(host, kind)
    der = x509.load_pem_x509_certificate(m.cert_pem).public_bytes(Encoding.DER)
    return der, load_anchors(m.ca_pem) if m.ca_pem else []


@pytest.mark.parametrize(("name", "patterns", "ips", "ok"), [
    ("mx.lab.test", ["mx.lab.test"], [], True),
    ("MX.Lab.Test.", ["mx.lab.test"], [], True),
    ("mx.lab.test", ["*.lab.test"], [], True),
    ("a.mx.lab.test", ["*.lab.test"], [], False),  # one label only
    ("lab.test", ["*.lab.test"], [], False),
    ("mx.lab.test", ["*.test"], [], False),  # not a wildcard over a whole domain
    ("mx.lab.test", ["mx*.lab.test"], [], False),  # partial wildcards are not taken
    ("mx.lab.test", ["other.lab.test"], [], False),
    ("127.0.0.1", ["127.0.0.1"], [], False),  # an address needs an IP name
    ("127.0.0.1", [], ["127.0.0.1"], True),
    ("::1", [], ["0:0:0:0:0:0:0:1"], True),
])
def test_name_matches_rfc_6125(name: str, patterns: list[str], ips: list[str], ok: bool) -> None:
    assert name_matches(name, patterns, ips) is ok


def test_ca_signed_certificate_verifies_against_its_ca() -> None:
    der, ca = cert(CertKind.CA_SIGNED)
    r = check_certificate([der], ca, name="mx.lab.test", name_source="mx", now=NOW,
                          trust="harness-ca.pem")
    assert (r.chain_ok, r.name_ok, r.ok, r.problems) == (True, True, True, ())
    assert (r.subject, r.issuer, r.names) == ("mx.lab.test", "SMTP Harness lab CA",
                                              ("mx.lab.test",))
    assert 820 <= (r.days_left or 0) <= 825 and r.trust == "harness-ca.pem"


def test_wrong_host_certificate_chain_is_fine_but_the_name_is_not() -> None:
    der, ca = cert(CertKind.WRONG_HOST)
    r = check_certificate([der], ca, name="mx.lab.test", name_source="banner", now=NOW)
    assert r.chain_ok and r.name_ok is False and not r.ok
    assert r.problems == ("name mismatch: the certificate is for wrong-host.harness.invalid, "
                          "not mx.lab.test (the name the server gave in its banner)",)


def test_expired_self_signed_and_untrusted_certificates_say_why() -> None:
    der, ca = cert(CertKind.EXPIRED)
    r = check_certificate([der], ca, name="mx.lab.test", name_source="mx", now=NOW)
    assert not r.chain_ok and r.chain_error is not None
    assert r.chain_error.startswith("expired on ") and (r.days_left or 0) < -360
    der, _ = cert(CertKind.SELF_SIGNED)
    _, other_ca = cert(CertKind.CA_SIGNED)
    r = check_certificate([der], other_ca, name="mx.lab.test", name_source="mx", now=NOW)
    assert r.self_signed and r.chain_error == "self-signed, and not one of the trusted roots"
    lab_ca.cache_clear()  # a lab CA of its own: not the one other_ca holds
    der, _ = cert(CertKind.CA_SIGNED)
    r = check_certificate([der], other_ca, name=None, name_source=None, now=NOW, trust="ca.pem")
    assert r.chain_error is not None and r.chain_error.startswith(
        "does not chain to a root in ca.pem") and r.name_ok is None


def test_soon_to_expire_certificate_is_a_warning() -> None:
    der, ca = cert(CertKind.CA_SIGNED)
    later = NOW + dt.timedelta(days=820)
    r = check_certificate([der], ca, name="mx.lab.test", name_source="mx", now=later)
    assert r.chain_ok and len(r.problems) == 1 and r.problems[0].startswith("expires in ")


def test_no_certificate_and_garbage() -> None:
    assert check_certificate([], [], name=None, name_source=None, now=NOW).problems == (
        "the server sent no certificate",)
    r = check_certificate([b"not DER"], [], name=None, name_source=None, now=NOW)
    assert r.problems[0].startswith("the certificate cannot be read")
    with pytest.raises(ValueError, match="no PEM certificate"):
        load_anchors(b"hello")


# ---------------------------------------------------------------- verdicts


def ok(name: str, code: int, text: str = "Ok") -> Step:
    return Step(name=name, code=code, reply=f"{code} {text}")


SESSION = [Step(name="connect", detail="connected"), ok("banner", 220, "mx ESMTP"),
           ok("ehlo", 250), ok("mail", 250, "2.1.0 Ok")]


@pytest.mark.parametrize(("steps", "verdict", "decisive", "reason"), [
    ([*SESSION, ok("rcpt", 250, "2.1.5 Ok"), ok("rset", 250), ok("quit", 221)],
     "deliver", True, "the recipient was accepted at RCPT TO: 250 2.1.5 Ok"),
    ([*SESSION, ok("rcpt", 550, "5.7.1 Unable to relay")],
     "bounce", True, "550 5.7.1 Unable to relay (Delivery not authorized, message refused) "
                     "at RCPT TO"),
    ([*SESSION, ok("rcpt", 451, "4.7.1 Greylisted")], "defer", True, "451 4.7.1 Greylisted"),
    ([*SESSION[:3], ok("mail", 553, "5.1.8 Sender domain does not exist")],
     "bounce", True, "553 5.1.8"),
    ([Step(name="connect", error="Connection refused (127.0.0.2:25)")],
     "defer", False, "unreachable: Connection refused (127.0.0.2:25)"),
    ([Step(name="connect"), ok("banner", 421, "4.3.2 Service not available")],
     "defer", False, "refused at the banner: 421 4.3.2 Service not available"),
    ([Step(name="connect"), ok("banner", 554, "5.7.1 Go away")],
     "bounce", False, "refused at the banner: 554 5.7.1 Go away"),
    ([Step(name="connect"), Step(name="banner", error="no reply within 30s")],
     "defer", False, "no reply within 30s at the banner"),
    ([*SESSION[:3], Step(name="tls", error="the TLS handshake failed: alert")],
     "defer", False, "the TLS handshake failed: alert at the TLS handshake"),
    ([*SESSION[:2], ok("ehlo", 502, "5.5.1 No EHLO"), ok("helo", 250), ok("mail", 250),
      ok("rcpt", 250)], "deliver", True, "the recipient was accepted"),
    ([*SESSION[:2], ok("ehlo", 502, "5.5.1 No EHLO"), ok("helo", 550, "5.7.1 No")],
     "bounce", True, "refused at HELO"),
    ([*SESSION[:2], ok("ehlo", 421, "4.7.0 Too busy")], "defer", False, "421 4.7.0 Too busy"),
    ([*SESSION[:3], ok("starttls", 454, "4.7.0 TLS not available"), ok("mail", 250),
      ok("rcpt", 250)], "deliver", True, "the recipient was accepted"),
    ([*SESSION, ok("rcpt", 250), ok("data", 354, "Go ahead"), ok("message", 250, "2.0.0 Ok")],
     "deliver", True, "the message was accepted: 250 2.0.0 Ok"),
    ([*SESSION, ok("rcpt", 250), ok("data", 354, "Go ahead"),
      ok("message", 554, "5.7.1 Spam")], "bounce", True, "at the end of the message"),
    ([*SESSION, ok("rcpt", 250), ok("data", 451, "4.3.0 Later")],
     "defer", True, "451 4.3.0 Later (Other or undefined mail system status) at DATA"),
    ([*SESSION, Step(name="rcpt", error="the server closed the connection")],
     "defer", False, "the server closed the connection at RCPT TO"),
])
def test_judge_mx(steps: list[Step], verdict: str, decisive: bool, reason: str) -> None:
    got, why, dec, _ = judge_mx(steps)
    assert (got, dec) == (verdict, decisive), why
    assert reason in why


def test_judge_mx_notes_refused_starttls_ehlo_fallback_and_certificate() -> None:
    steps = [*SESSION[:2], ok("ehlo", 500, "5.5.1 Unknown"), ok("helo", 250), ok("mail", 250),
             ok("rcpt", 250)]
    _, _, _, notes = judge_mx(steps)
    assert any(n.startswith("EHLO refused (500 5.5.1 Unknown): a sender falls back to HELO")
               for n in notes)
    steps = [*SESSION[:3], ok("starttls", 454, "4.7.0 No TLS"), ok("mail", 250), ok("rcpt", 250)]
    _, _, _, notes = judge_mx(steps)
    assert any("opportunistic sender goes on in plain text" in n for n in notes)


def result(label: str, verdict: str, decisive: bool, reason: str = "why") -> MxResult:
    return MxResult(host=MxHost(name=label, port=25, addresses=("127.0.0.1",), preference=10),
                    verdict=verdict, decisive=decisive, reason=reason)  # type: ignore[arg-type]


def test_overall_the_first_decisive_mx_decides_after_skipping_others() -> None:
    verdict, reason, notes = overall(None, [result("a", "defer", False, "unreachable"),
                                            result("b", "bounce", True, "550 5.1.1"),
                                            result("c", "deliver", True)])
    assert verdict == "bounce" and reason == "MX 10 b: 550 5.1.1"
    assert notes == ("before it, a sender would skip MX 10 a (unreachable)",)


def test_overall_without_a_decisive_mx_defers() -> None:
    verdict, reason, _ = overall(None, [result("a", "defer", False, "unreachable")])
    assert verdict == "defer" and reason.startswith("no MX took a transaction")
    verdict, _, notes = overall(None, [result("a", "bounce", False)])
    assert verdict == "defer" and "smtp_skip" not in notes[0] and "Postfix" in notes[0]


@pytest.mark.parametrize(("domain", "verdict", "words"), [
    ("null.test", "bounce", "null MX (RFC 7505)"),
    ("nope.test", "bounce", "does not exist (NXDOMAIN)"),
    ("nohost.test", "bounce", "no MX and no address"),
    ("flaky.test", "defer", "DNS failed for now"),
])
def test_overall_dns_decides_before_any_connection(domain: str, verdict: str, words: str) -> None:
    report, hosts = plan(domain)
    got, reason, _ = overall(report, [])
    assert got == verdict and words in reason and hosts == []


def test_report_json_and_exit_codes() -> None:
    rep = ProbeReport(sender="a@lab.test", recipient="b@Lab.Test",
                      results=(result("a", "bounce", True),), verdict="bounce", reason="x")
    d = rep.as_dict()
    assert d["schema"] == "harness.probe/1" and d["domain"] == "lab.test"
    assert (d["verdict"], d["verdict_text"], d["exit_code"]) == ("bounce", "would bounce", 4)
    assert d["mx"][0]["label"] == "MX 10 a"
    assert EXIT_CODES == {"deliver": 0, "defer": 3, "bounce": 4}


def test_step_explanation_prefers_the_precise_code() -> None:
    assert ok("rcpt", 550, "5.7.1 Unable to relay").explanation()["code"] == "5.7.1"  # type: ignore[index]
    assert ok("starttls", 220, "2.0.0 Ready").explanation()["code"] == "220"  # type: ignore[index]
    assert Step(name="connect", error="x").explanation() is None


def test_system_dns_answers_read_like_the_zone_format() -> None:
    # dnspython's record objects, made from text: no lookup happens
    import dns.rdata

    from harness.analysis.dns import _rdata_text

    soa = dns.rdata.from_text("IN", "SOA",
                              "NS1.lab.test. hostmaster.lab.test. 7 3600 600 86400 300")
    assert _rdata_text("SOA", soa) == "ns1.lab.test hostmaster.lab.test 7 3600 600 86400 300"
    assert _rdata_text("MX", dns.rdata.from_text("IN", "MX", "0 .")) == "0 ."
    assert ScenarioDns({"n.test": {"MX": ["0 ."]}}).query("n.test", "MX") == ["0 ."]


def test_an_address_that_does_not_answer_sends_a_sender_to_the_next_one() -> None:
    steps = [Step(name="connect", sent="[::1]:25", error="Connection refused ([::1]:25)"),
             Step(name="connect", sent="127.0.0.1:25"), *SESSION[1:], ok("rcpt", 250)]
    verdict, _, decisive, notes = judge_mx(steps)
    assert (verdict, decisive) == ("deliver", True)
    assert notes[0].startswith("[::1]:25 did not answer (Connection refused ([::1]:25))")
