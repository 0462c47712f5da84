"""The status-code catalogue (harness/analysis/catalogue.yaml) and its API:
complete against the shared reference, every entry filled in, lookups with
ranges and fallbacks, and reply lines read the way Exchange writes them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.analysis import codes
from harness.analysis.codes import CatalogueError, CodeInfo, explain_reply, lookup

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared/reference/status-codes.yaml"

#: Codes whose registry title the catalogue words differently, and why.
TITLE_EXCEPTIONS = {
    "5.1.5": "Exchange reuses X.1.5 (a success detail) for a refusal; titled by that use",
    "4.6.10": "deprecated duplicate; titled 'Deprecated (duplicate of X.6.8)'",
    "5.6.10": "deprecated duplicate; titled 'Deprecated (duplicate of X.6.8)'",
}


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    if not REFERENCE.is_file():
        pytest.skip(f"no reference catalogue at {REFERENCE}")
    data: dict[str, Any] = yaml.safe_load(REFERENCE.read_text(encoding="utf-8"))
    return data


def entries() -> dict[str, CodeInfo]:
    return {e.code: e for e in codes.all_entries()}


# ------------------------------------------------------------ completeness


def test_catalogue_has_every_enhanced_code_of_the_reference(reference: dict[str, Any]) -> None:
    have = entries()
    ref = reference["enhanced_status_codes"]
    assert len(ref) >= 233
    missing = [str(r["code"]) for r in ref if str(r["code"]) not in have]
    assert missing == []
    vendor = [str(r["code"]) for r in ref if r["vendor_specific"]]
    assert len(vendor) >= 60  # the Exchange / Exchange Online values, ranges included
    assert all(have[c].vendor == "Microsoft" for c in vendor)


def test_catalogue_has_every_basic_code_of_the_reference(reference: dict[str, Any]) -> None:
    have = entries()
    missing = [str(r["code"]) for r in reference["basic_reply_codes"] if str(r["code"]) not in have]
    assert missing == []
    assert len([e for e in have.values() if e.kind == "basic"]) >= 36


def test_catalogue_agrees_with_the_reference_on_the_facts(reference: dict[str, Any]) -> None:
    have = entries()
    for r in reference["enhanced_status_codes"]:
        e = have[str(r["code"])]
        assert (e.kind, e.status_class, e.subject) == ("enhanced", r["class"], r["subject"]), e.code
        assert e.transient is r["transient"], e.code
        assert e.class_name.lower() == r["class_name"].lower(), e.code
        assert e.subject_name is not None
        assert e.subject_name.lower() == r["subject_name"].lower(), e.code
        if r["iana_title"] and e.code not in TITLE_EXCEPTIONS:
            assert e.title == r["iana_title"], e.code
        if not r["vendor_specific"] and e.code not in TITLE_EXCEPTIONS:
            assert e.vendor is None, e.code
    for r in reference["basic_reply_codes"]:
        e = have[str(r["code"])]
        assert (e.kind, e.status_class, e.transient) == ("basic", r["class"], r["transient"])


#: Where the reference was wrong and Microsoft's own page says otherwise: the
#: reference's 4.4.317 line ("STARTTLS is required to send mail") is not what
#: Microsoft documents (Cannot connect to remote server [Message=UntrustedRoot]).
REFERENCE_CORRECTED = {"4.4.317"}


def test_typical_replies_carry_over_verbatim(reference: dict[str, Any]) -> None:
    have = entries()
    for r in reference["enhanced_status_codes"] + reference["basic_reply_codes"]:
        if str(r["code"]) in REFERENCE_CORRECTED:
            continue
        e = have[str(r["code"])]
        assert list(e.typical_replies[: len(r["typical_replies"])]) == r["typical_replies"], e.code


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def test_descriptions_are_the_catalogues_own_words(reference: dict[str, Any]) -> None:
    # codes, titles and reply strings are facts; meanings, causes and advice
    # are written here. No 9-word run of the reference's prose reappears.
    def runs(text: str, n: int = 9) -> set[tuple[str, ...]]:
        w = _words(text)
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    theirs: set[tuple[str, ...]] = set()
    for r in reference["enhanced_status_codes"]:
        for key in ("meaning", "exchange_notes", "exchange_handling"):
            theirs |= runs(r.get(key) or "")
    for r in reference["basic_reply_codes"]:
        theirs |= runs(r["meaning"]) | runs(r.get("notes") or "")
    copied = []
    for e in codes.all_entries():
        for text in (e.meaning, e.exchange, *e.causes, *e.checks):
            if runs(text) & theirs:
                copied.append((e.code, text))
    assert copied == []


# ------------------------------------------------------------- every entry


@pytest.mark.parametrize("info", codes.all_entries(), ids=lambda i: i.code)
def test_every_entry_is_complete(info: CodeInfo) -> None:
    assert info.match == "exact"
    for name in ("code", "class_name", "subject_name", "title", "meaning"):
        value = getattr(info, name)
        assert isinstance(value, str) and value.strip(), name
    assert info.causes and all(c.strip() for c in info.causes)
    assert info.checks and all(c.strip() for c in info.checks)
    assert info.subject is not None
    assert info.transient is {2: None, 3: None, 4: True, 5: False}[info.status_class]
    if info.kind == "enhanced":
        assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}(-\d{1,3})?", info.code)
        assert info.code.split(".")[:2] == [str(info.status_class), str(info.subject)]
    else:
        assert re.fullmatch(r"[2-5]\d\d", info.code)
    json.dumps(info.as_dict())


def test_counts() -> None:
    kinds = [e.kind for e in codes.all_entries()]
    assert kinds.count("enhanced") >= 233
    assert kinds.count("basic") >= 36


def test_catalogue_is_loaded_once() -> None:
    assert codes._catalogue() is codes._catalogue()
    assert codes._catalogue.cache_info().hits >= 1


@pytest.mark.parametrize("cls", [2, 4, 5])
@pytest.mark.parametrize("subject", range(8))
def test_fallbacks_exist_for_every_class_and_subject(cls: int, subject: int) -> None:
    info = lookup(f"{cls}.{subject}.777")  # a detail no range covers
    assert info is not None
    assert info.match == "subject" and info.code == f"{cls}.{subject}.x"
    assert info.subject == subject and info.status_class == cls and not info.known
    assert info.meaning and info.causes and info.checks
    whole = lookup(f"{cls}.99.1")
    assert whole is not None and whole.match == "class" and whole.code == f"{cls}.x.x"


# ------------------------------------------------------------------ lookup


@pytest.mark.parametrize(
    ("code", "entry", "match", "cls", "transient", "title"),
    [
        ("5.1.1", "5.1.1", "exact", 5, False, "Bad destination mailbox address"),
        ("5.2.2", "5.2.2", "exact", 5, False, "Mailbox full"),
        ("4.7.1", "4.7.1", "exact", 4, True, "Delivery not authorized, message refused"),
        ("5.7.1", "5.7.1", "exact", 5, False, "Delivery not authorized, message refused"),
        ("4.4.7", "4.4.7", "exact", 4, True, "Delivery time expired"),
        ("5.4.6", "5.4.6", "exact", 5, False, "Routing loop detected"),
        ("5.7.23", "5.7.23", "exact", 5, False, "SPF validation failed"),
        ("5.7.26", "5.7.26", "exact", 5, False, "Multiple authentication checks failed"),
        ("4.7.500", "4.7.500-699", "range", 4, True, None),
        ("5.7.708", "5.7.708", "exact", 5, False, None),
        ("550", "550", "exact", 5, False, "Requested action not taken, mailbox unavailable"),
        ("421", "421", "exact", 4, True, "Service not available, closing transmission channel"),
    ],
)
def test_lookup(code: str, entry: str, match: str, cls: int, transient: bool,
                title: str | None) -> None:
    info = lookup(code)
    assert info is not None
    assert (info.code, info.match, info.status_class, info.transient) == (
        entry, match, cls, transient)
    assert info.known
    if title is not None:
        assert info.title == title
    assert info.checks


@pytest.mark.parametrize(
    ("code", "entry", "match"),
    [
        ("4.7.699", "4.7.500-699", "range"),
        ("4.7.650", "4.7.650", "exact"),          # an exact code inside a range wins
        ("4.7.700", "4.7.x", "subject"),
        ("4.7.851", "4.7.850-899", "range"),
        ("5.7.606", "5.7.606-649", "range"),
        ("5.7.705", "5.7.705", "exact"),
        ("5.7.749", "5.7.700-749", "range"),
        ("5.7.750", "5.7.750", "exact"),
        ("5.7.950", "5.7.900-999", "range"),
        ("4.7.500-699", "4.7.500-699", "exact"),  # the range by its own name
        (" #5.07.001 ", "5.7.1", "exact"),
        ("2.1.5", "2.1.5", "exact"),
        ("5.1.5", "5.1.5", "exact"),
        ("599", "5xx", "class"),
        ("299", "2xx", "class"),
        ("441", "441", "exact"),
    ],
)
def test_lookup_ranges_and_fallbacks(code: str, entry: str, match: str) -> None:
    info = lookup(code)
    assert info is not None
    assert (info.code, info.match) == (entry, match)


@pytest.mark.parametrize("code", ["", "hello", "9.1.1", "3.1.1", "600", "1.2.3", "55", "5.7",
                                  "5.7.1.2"])
def test_lookup_rejects_what_is_not_a_code(code: str) -> None:
    assert lookup(code) is None


def test_vendor_and_success_codes() -> None:
    info = lookup("5.7.509")
    assert info is not None and info.vendor == "Microsoft" and "DMARC" in info.title
    ok = lookup("2.0.0")
    assert ok is not None and ok.outcome == "success" and ok.transient is None
    go_on = lookup("354")
    assert go_on is not None and go_on.outcome == "intermediate"


def test_component_lookup() -> None:
    c = codes.component("RESOLVER.ADR.RecipNotFound")
    assert c is not None and c.known and c.checks
    partial = codes.component("RESOLVER.ADR.SomethingNew")
    assert partial is not None and not partial.known and partial.name == "RESOLVER.ADR.SomethingNew"
    assert codes.component("NOPE.X") is None


# ----------------------------------------------------------- explain_reply


@pytest.mark.parametrize(
    ("text", "basic", "enhanced", "component", "message"),
    [
        ("550 5.7.1 Unable to relay", "550", "5.7.1", None, "Unable to relay"),
        ("451 4.7.500 Server busy. Please try again later", "451", "4.7.500", None,
         "Server busy. Please try again later"),
        ("#550 5.1.1 RESOLVER.ADR.RecipNotFound; not found ##", "550", "5.1.1",
         "RESOLVER.ADR.RecipNotFound", "RESOLVER.ADR.RecipNotFound; not found"),
        ("550 4.4.7 QUEUE.Expired; message expired", "550", "4.4.7", "QUEUE.Expired",
         "QUEUE.Expired; message expired"),
        ("smtp; 550 5.1.1 <bob@lab.test>: Recipient address rejected", "550", "5.1.1", None,
         "<bob@lab.test>: Recipient address rejected"),
        ("550-5.7.1 first line\r\n550-5.7.1 second line\r\n550 5.7.1 last", "550", "5.7.1", None,
         "first line second line last"),
        ("550-5.7.25 [192.0.2.202] no PTR 550-5.7.25 record", "550", "5.7.25", None,
         "[192.0.2.202] no PTR record"),
        ("421 Service not available", "421", None, None, "Service not available"),
        ("421.4.4.2 unable to connect.", "421", "4.4.2", None, "unable to connect."),
        ("<server.example.com #5.0.0>", None, "5.0.0", None, "<server.example.com #5.0.0>"),
        ("5.7.321 starttls-not-supported: Destination mail server must support TLS", None,
         "5.7.321", None, "starttls-not-supported: Destination mail server must support TLS"),
        ("Remote Server returned '550 5.1.1 RESOLVER.ADR.RecipNotFound; not found'", "550",
         "5.1.1", "RESOLVER.ADR.RecipNotFound", "RESOLVER.ADR.RecipNotFound; not found"),
        ("250 2.6.0 <a@b> [InternalId=1] Queued mail for delivery", "250", "2.6.0", None,
         "<a@b> [InternalId=1] Queued mail for delivery"),
        ("421 4.7.0 [TSS04] deferred from 192.0.2.25 - 4.16.55.1; see", "421", "4.7.0", None,
         "[TSS04] deferred from 192.0.2.25 - 4.16.55.1; see"),
        ("550 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain", "550", "5.4.4",
         "SMTPSEND.DNS.NonExistentDomain", "SMTPSEND.DNS.NonExistentDomain; nonexistent domain"),
    ],
)
def test_explain_reply_parses(text: str, basic: str | None, enhanced: str | None,
                              component: str | None, message: str) -> None:
    e = explain_reply(text)
    assert (e.basic_code, e.enhanced_code) == (basic, enhanced)
    assert (e.component.name if e.component else None) == component
    assert e.message == message
    assert e.found
    json.dumps(e.as_dict())


def test_explain_reply_puts_the_enhanced_code_first() -> None:
    e = explain_reply("550 5.7.1 Unable to relay")
    assert e.primary is e.enhanced and e.enhanced is not None and e.enhanced.code == "5.7.1"
    assert e.basic is not None and e.basic.code == "550"
    assert e.outcome == "permanent" and e.transient is False
    assert e.checks[: len(e.enhanced.checks)] == e.enhanced.checks
    # the basic code's generic advice is left out when the enhanced code is known
    assert not set(e.basic.checks) & set(e.checks)


def test_explain_reply_range_code() -> None:
    e = explain_reply("451 4.7.500 Server busy. Please try again later")
    assert e.enhanced is not None and e.enhanced.code == "4.7.500-699"
    assert e.enhanced.match == "range" and e.transient is True
    assert e.as_dict()["enhanced"]["code"] == "4.7.500"
    assert e.as_dict()["enhanced"]["entry"] == "4.7.500-699"


def test_explain_reply_notes_exchange_expiry_class_mismatch() -> None:
    e = explain_reply("550 4.4.7 QUEUE.Expired; message expired")
    assert e.outcome == "permanent"  # a sender acts on the basic code
    assert e.enhanced is not None and e.enhanced.transient is True
    [note] = e.notes
    assert "550" in note and "4.4.7" in note and "expired" in note


def test_explain_reply_notes_any_class_mismatch() -> None:
    e = explain_reply("451 5.7.3 Cannot achieve Exchange Server authentication")
    assert e.outcome == "transient"
    assert any("class 4" in n and "class 5" in n and "retries" in n for n in e.notes)


def test_explain_reply_agreeing_classes_have_no_note() -> None:
    assert explain_reply("550 5.1.1 User unknown").notes == ()


def test_explain_reply_unknown_codes_fall_back_and_say_so() -> None:
    e = explain_reply("550 5.7.777 custom policy")
    assert e.enhanced is not None and e.enhanced.code == "5.7.x" and not e.enhanced.known
    assert any("5.7.777 is not in the catalogue" in n for n in e.notes)
    # with the enhanced code only roughly known, the basic code's advice joins in
    assert e.basic is not None and set(e.basic.checks) <= set(e.checks)


def test_explain_reply_without_a_code() -> None:
    e = explain_reply("hello world")
    assert not e.found and e.primary is None and e.outcome is None
    assert e.notes == ("No SMTP status code was found in this text.",)


def test_explain_reply_explains_a_quoted_remote_reply() -> None:
    e = explain_reply('451 4.4.0 Primary target IP address responded with: "451 5.7.3 Cannot '
                      'achieve Exchange Server authentication." Attempted failover to alternate '
                      'host, but that did not succeed.')
    assert (e.basic_code, e.enhanced_code) == ("451", "4.4.0")
    assert e.quoted is not None
    assert (e.quoted.basic_code, e.quoted.enhanced_code) == ("451", "5.7.3")
    assert e.quoted.message == "Cannot achieve Exchange Server authentication."
    # the quoted reply's advice comes first: it is the real reason
    assert e.checks[0] == e.quoted.checks[0]
    assert e.as_dict()["quoted"]["enhanced_code"] == "5.7.3"


def test_explain_reply_reads_winsock_errors() -> None:
    e = explain_reply('441 4.4.1 Error encountered while communicating with primary target IP '
                      'address: "Failed to connect. Winsock error code: 10060, Win32 error code: '
                      '10060." The last endpoint attempted was 10.1.1.3:25')
    assert e.socket_error is not None and e.socket_error.name == "WSAETIMEDOUT"
    assert e.basic is not None and e.basic.code == "441"
    assert e.quoted is None  # the quoted text holds no reply
    assert e.enhanced_code == "4.4.1"  # not 1.1.3 or 1.3 from the IP address


def test_explain_reply_ignores_ip_addresses_and_versions() -> None:
    e = explain_reply("550 Access denied for 192.4.5.6 (v5.1.1 filter)")
    assert e.enhanced_code is None and e.basic_code == "550"


# ------------------------------------------------------- a broken catalogue


def _minimal() -> dict[str, Any]:
    text = {"name": "n", "title": "t", "meaning": "m", "causes": ["c"], "checks": ["k"]}
    return {
        "classes": {2: text, 4: text, 5: text},
        "subjects": {s: {"name": f"s{s}", "meaning": "m", "causes": ["c"], "checks": ["k"]}
                     for s in range(8)},
        "enhanced": [{"code": "X.1.1", "classes": [4, 5], "title": "t", "meaning": "m",
                      "causes": ["c"], "checks": ["k"], "source": "https://example.org/x"}],
        "basic_classes": {c: text for c in (2, 3, 4, 5)},
        "basic_subjects": dict.fromkeys(range(6), "x"),
        "basic": [], "components": {"RESOLVER": {"meaning": "m"}}, "socket_errors": {},
        "typical_replies": {"5.1.1": ["550 5.1.1 x"]},
    }


def test_minimal_catalogue_builds() -> None:
    cat = codes._build(_minimal())
    assert set(cat.exact) == {"4.1.1", "5.1.1"}
    assert cat.exact["5.1.1"].typical_replies == ("550 5.1.1 x",)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d["enhanced"][0].update(meaning=""), "'meaning' must be a non-empty string"),
        (lambda d: d["enhanced"][0].update(causes=[]), "'causes' must be a list"),
        (lambda d: d["enhanced"][0].update(checks=["ok", {"a": "b"}]), "'checks' must be a list"),
        (lambda d: d["enhanced"][0].update(colour="red"), "unknown keys ['colour']"),
        (lambda d: d["enhanced"].append(dict(d["enhanced"][0], code="5.1.1", classes=None)),
         "code must be X.s.d (with classes)"),
        (lambda d: d["enhanced"].append({k: v for k, v in d["enhanced"][0].items()
                                         if k != "classes"} | {"code": "5.1.1"}),
         "5.1.1: listed twice"),
        (lambda d: d["typical_replies"].update({"5.9.9": ["x"]}), "no such code"),
        (lambda d: d["enhanced"].extend([
            {"code": "5.7.500-600", "title": "t", "meaning": "m", "causes": ["c"],
             "checks": ["k"], "source": "https://example.org/a"},
            {"code": "5.7.550-650", "title": "t", "meaning": "m", "causes": ["c"],
             "checks": ["k"], "source": "https://example.org/b"}]), "overlap"),
        (lambda d: d["enhanced"][0].pop("source"), "'source' must be an https URL"),
        (lambda d: d["enhanced"][0].update(source=["http://insecure.example"]),
         "'source' must be an https URL"),
        (lambda d: d["enhanced"][0].update(source=[]), "'source' must be an https URL"),
        (lambda d: d["enhanced"][0].update(class_5={"vendor": "x"}), "class_5 may only set"),
    ],
)
def test_malformed_catalogue_is_refused_with_the_place(change: Any, problem: str) -> None:
    data = _minimal()
    change(data)
    with pytest.raises(CatalogueError, match=re.escape(problem)):
        codes._build(data)


def _other_meaning(**over: Any) -> dict[str, Any]:
    return {"text": ["Other words"], "title": "other title", "meaning": "other meaning",
            "causes": ["oc"], "checks": ["ok"], "source": "https://example.org/other"} | over


def test_a_class_override_can_give_another_meaning_by_text() -> None:
    data = _minimal()
    data["enhanced"][0]["class_5"] = {"by_text": [_other_meaning(vendor="Vendor")]}
    cat = codes._build(data)
    assert cat.exact["5.1.1"].title == "t" and "4.1.1" not in cat.by_text
    [other] = cat.by_text["5.1.1"]
    assert other.phrases == ("Other words",)
    assert (other.info.title, other.info.vendor, other.info.source, other.info.status_class) == (
        "other title", "Vendor", ("https://example.org/other",), 5)


@pytest.mark.parametrize(
    ("by_text", "problem"),
    [
        ("Other words", ": 'by_text' must be a list of meanings"),
        ([], ": 'by_text' must be a list of meanings"),
        (["Other words"], " by_text[0]: must be a mapping"),
        ([_other_meaning(text=[])], " by_text[0]: 'text' must be a list"),
        ([_other_meaning(colour="red")], " by_text[0]: unknown keys ['colour']"),
        ([{k: v for k, v in _other_meaning().items() if k != "source"}],
         " by_text[0]: 'source' must be an https URL"),
    ],
)
def test_a_malformed_other_meaning_is_refused_with_the_place(by_text: Any, problem: str) -> None:
    data = _minimal()
    data["enhanced"][0]["class_5"] = {"by_text": by_text}
    with pytest.raises(CatalogueError, match=re.escape("enhanced 5.1.1" + problem)):
        codes._build(data)


# ------------------------------------------------------ Microsoft's own pages

MS_NDR = "https://learn.microsoft.com/en-us/troubleshoot/exchange/email-delivery/ndr/"


@pytest.mark.parametrize(
    ("code", "words", "page"),
    [
        ("4.4.8", "mta-sts", "non-delivery-reports-in-exchange-online"),
        ("5.4.8", "mta-sts", "non-delivery-reports-in-exchange-online"),
        ("4.4.62", "wrong office 365 region", "wrong-office-365-region-exo"),
        ("5.1.20", "from", "non-delivery-reports-in-exchange-online"),
        ("5.7.60", "send as", "how-to-set-up-a-multifunction-device"),
        ("5.7.367", "relay", "forwarded-message-rejected-5-7-367-ndr"),
        ("5.7.520", "forwarding", "non-delivery-reports-in-exchange-online"),
        ("4.4.317", "untrusted root", "fix-error-code-450-4-4-317-in-exchange-online"),
        ("5.7.703", "tenant allow/block list", "non-delivery-reports-in-exchange-online"),
        ("5.4.9", "loop", "fix-error-code-5-4-6-through-5-4-20-in-exchange-online"),
        ("5.4.20", "loop", "fix-error-code-5-4-6-through-5-4-20-in-exchange-online"),
    ],
)
def test_microsoft_codes_mean_what_microsoft_says(code: str, words: str, page: str) -> None:
    info = lookup(code)
    assert info is not None and info.known, code
    assert words in (info.title + " " + info.meaning).lower(), (code, info.title)
    assert any(page in url for url in info.source), (code, info.source)
    assert info.vendor == "Microsoft"


def test_4_4_317_is_not_starttls_and_5_7_703_is_not_a_tenant_ban() -> None:
    # what the catalogue said before Microsoft's pages were checked
    assert "starttls is required" not in lookup("4.4.317").title.lower()  # type: ignore[union-attr]
    info = lookup("5.7.703")
    assert info is not None and info.match == "exact" and "banned" not in info.title.lower()
    assert lookup("5.7.705").code == "5.7.705"  # type: ignore[union-attr]


def test_every_entry_names_its_source() -> None:
    for e in entries().values():
        assert e.source and all(u.startswith("https://") for u in e.source), e.code
        if e.vendor == "Microsoft" and e.code not in SISIMAI_ONLY:
            assert any("microsoft.com" in u for u in e.source), e.code
        if e.vendor is None and e.kind == "enhanced":
            assert e.source[0].startswith("https://www.iana.org/"), e.code
    for fallback in ("5.9.9", "4.6.99", "599"):
        info = lookup(fallback)
        assert info is not None and info.source[0].startswith("https://www.rfc-editor.org/")


#: Microsoft values with no Microsoft page, known from real bounces collected by
#: sisimai (their source names that project's table or sample).
SISIMAI_ONLY = {"5.1.351", "5.2.14", "5.4.11", "5.4.310", "4.4.312", "5.4.312", "4.4.318",
                "5.4.318", "4.4.24", "4.4.25", "4.4.28", "4.7.650", "4.7.652", "5.7.51",
                "5.7.54"}


EXO_5_4_1 = "Recipient address rejected, access denied (Exchange Online)"


@pytest.mark.parametrize("text", [
    "550 5.4.1 Relay Access Denied",
    "550 5.4.1 RELAY ACCESS   DENIED",
    "550 5.4.1 [kijitora@example.org]: Recipient address rejected: Access denied.",
    "smtp; 550 5.4.1 Recipient address rejected: Access denied. AS(201806281)",
])
def test_5_4_1_in_exchange_onlines_words_takes_exchange_onlines_meaning(text: str) -> None:
    e = explain_reply(text)
    assert e.enhanced is not None and e.enhanced_code == "5.4.1"
    assert (e.enhanced.title, e.enhanced.code, e.enhanced.vendor) == (EXO_5_4_1, "5.4.1",
                                                                      "Microsoft")
    assert (e.enhanced.status_class, e.enhanced.transient, e.outcome) == (5, False, "permanent")
    assert "Directory-Based Edge Blocking" in " ".join(e.enhanced.causes)
    assert any("fix-error-code-550-5-4-1" in u for u in e.enhanced.source)
    assert e.enhanced.typical_replies == lookup("5.4.1").typical_replies  # type: ignore[union-attr]
    assert any("'No answer from host' in the IANA registry" in n for n in e.notes), e.notes


def test_5_4_1_in_other_words_and_4_4_1_keep_the_registry_meaning() -> None:
    for text in ("541 5.4.1 Mail rejected by destination domain", "550 5.4.1 No route",
                 "451 4.4.1 Relay Access Denied"):
        e = explain_reply(text)
        assert e.enhanced is not None and e.enhanced.title == "No answer from host", text
        assert not any("IANA registry" in n for n in e.notes), text
    assert lookup("5.4.1").title == "No answer from host"  # type: ignore[union-attr]


def test_a_quoted_5_4_1_in_exchange_onlines_words_is_read_the_same_way() -> None:
    e = explain_reply('451 4.4.0 Primary target IP address responded with: "550 5.4.1 Relay '
                      'Access Denied." Attempted failover to alternate host')
    assert e.quoted is not None and e.quoted.enhanced is not None
    assert e.quoted.enhanced.title == EXO_5_4_1


def test_every_other_meaning_names_its_source_and_is_in_our_words(
        reference: dict[str, Any]) -> None:
    others = [m for ms in codes._catalogue().by_text.values() for m in ms]
    assert others
    theirs = " ".join(_words(" ".join(
        str(r.get(k) or "") for r in reference["enhanced_status_codes"]
        for k in ("meaning", "exchange_notes", "exchange_handling"))))
    for m in others:
        info = m.info
        assert info.source and all(u.startswith("https://") for u in info.source)
        if info.vendor == "Microsoft":
            assert any("microsoft.com" in u for u in info.source)
        for text in (info.meaning, info.exchange, *info.causes, *info.checks):
            w = _words(text)
            assert not any(" ".join(w[i:i + 9]) in theirs for i in range(len(w) - 8)), text
