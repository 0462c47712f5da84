"""Sender authentication of a received message: SPF, DKIM, DMARC, and the
Authentication-Results header (RFC 8601) a receiving MX would add.

    results = check_message(raw, client_ip="127.0.0.1", helo="client.lab.test",
                            mail_from="alice@lab.test", resolver=ScenarioDns(scenario.dns),
                            hostname="mx.harness.test")
    results.spf.result, [d.result for d in results.dkim], results.dmarc.result
    results.authentication_results     # "mx.harness.test; spf=pass ...; dkim=...; dmarc=..."

Everything is synchronous and pure apart from the injected resolver (see
harness.analysis.dns). dkimpy, pyspf and authres are imported inside the
functions (dkimpy and pyspf load dnspython and socket at import); with
SystemDns the checks block on the network, so callers on an event loop run
`check_message` in a thread (asyncio.to_thread).

Results (RFC 8601 words):

- SPF (RFC 7208, pyspf): pass, fail, softfail, neutral, none, permerror,
  temperror. The MAIL FROM identity is checked; with a null MAIL FROM, the
  HELO identity (postmaster@HELO), as RFC 7208 section 2.4 says.
- DKIM (RFC 6376, dkimpy), one result per DKIM-Signature, in header order:
  pass; fail (body hash or signature did not verify); neutral (no key
  published for the selector, or an ed25519 key without PyNaCl installed);
  policy (verified, but not acceptable: rsa-sha1, RFC 8301, or an RSA key
  under 1024 bits); permerror (malformed signature or key record, From not
  signed, expired, the key's h= excludes the hash, ...); temperror (the key
  lookup failed temporarily). No signature: an empty tuple (dkim=none in the
  header).
- DMARC (RFC 7489): pass, fail, none (no policy record), temperror,
  permerror (no single RFC5322.From domain, or a record without a valid p=
  and no rua=). `policy` is what the domain asks for (p=, or sp= when the
  record came from the organizational domain), `disposition` what a
  receiver applying it would do. pct= is reported, never sampled.

The organizational domain (for the DMARC record fallback and relaxed
alignment) comes from a simple rule, not the Public Suffix List: the last two
labels of the name, or the last three when the last two are one of the
common two-label public suffixes in MULTI_LABEL_SUFFIXES (co.uk, com.au,
...). Scenario domains (*.test, example.com/net/org) are all two-label
registrable domains under it. Pass `org_domain=` to check_dmarc /
check_message for another rule.
"""

from __future__ import annotations

import binascii
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from functools import cache
from typing import Any

from harness.analysis.dns import NotFound, Resolver, TempError

# ----------------------------------------------------------------- results


@dataclass(frozen=True)
class SpfResult:
    result: str
    """pass, fail, softfail, neutral, none, permerror or temperror."""
    identity: str
    """Which identity was checked: "mailfrom", or "helo" for a null MAIL FROM."""
    domain: str
    """The domain checked (the MAIL FROM domain, or the HELO name)."""
    sender: str
    """The address checked (postmaster@HELO for a null MAIL FROM)."""
    client_ip: str
    explanation: str = ""
    """pyspf's explanation, or why no check could be made."""
    mechanism: str = ""
    """The mechanism that decided (e.g. "ip4:127.0.0.1", "-all"), when one did."""


@dataclass(frozen=True)
class DkimResult:
    result: str
    """pass, fail, neutral, policy, permerror or temperror."""
    domain: str
    """d= of the signature ("" if it could not be read)."""
    selector: str
    """s= of the signature."""
    reason: str = ""
    """Why it did not pass (empty for pass)."""
    algorithm: str = ""
    """a= of the signature (rsa-sha256, rsa-sha1, ed25519-sha256)."""
    identity: str = ""
    """i= of the signature, when present."""
    b: str = ""
    """The start of the signature's b= value (RFC 6008 header.b), to tell
    several signatures of one domain apart."""
    key_bits: int = 0
    """Size of the public key, when it was found."""


@dataclass(frozen=True)
class DmarcResult:
    result: str
    """pass, fail, none, temperror or permerror."""
    domain: str
    """The RFC5322.From domain ("" if there was no single one)."""
    policy: str = ""
    """none, quarantine or reject: the p= (or sp=) that applies; "" without a record."""
    record_domain: str = ""
    """Where the record was found: the From domain or its organizational domain."""
    record: str = ""
    """The DMARC TXT record used."""
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str = ""

    @property
    def disposition(self) -> str:
        """What a receiver applying the policy does: the policy on fail, else none."""
        return self.policy if self.result == "fail" and self.policy else "none"


@dataclass(frozen=True)
class AuthResults:
    spf: SpfResult
    dkim: tuple[DkimResult, ...]
    dmarc: DmarcResult
    authentication_results: str
    """The Authentication-Results header value (RFC 8601), unfolded, without
    the field name: "mx.harness.test; spf=pass ...; dkim=pass ...; dmarc=pass ..."."""
    hostname: str = field(default="")

    @property
    def dkim_result(self) -> str:
        """One word for all signatures: pass if any passed, else the first
        signature's result, none if unsigned (what a `when: {dkim: ...}` matches)."""
        if not self.dkim:
            return "none"
        if any(d.result == "pass" for d in self.dkim):
            return "pass"
        return self.dkim[0].result

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus dkim_result and dmarc.disposition."""
        out = asdict(self)
        out["dkim"] = list(out["dkim"])
        out["dkim_result"] = self.dkim_result
        out["dmarc"]["disposition"] = self.dmarc.disposition
        return out

    def header_field(self, linesep: str = "\r\n") -> str:
        """The whole header field, folded one result per line, ready to
        prepend to the message (without a final line break)."""
        parts = _split_resinfo(self.authentication_results)
        return f"Authentication-Results: {parts[0]};" + ";".join(
            f"{linesep}\t{p}" for p in parts[1:])


def _split_resinfo(value: str) -> list[str]:
    """Split a header value at the semicolons between results, not at those
    inside quoted strings or comments."""
    parts: list[str] = []
    start, depth, quoted, escaped = 0, 0, False, False
    for i, ch in enumerate(value):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == ";" and depth == 0:
            parts.append(value[start:i].strip())
            start = i + 1
    parts.append(value[start:].strip())
    return parts


# --------------------------------------------------------------------- SPF

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")


def _strip_path(mail_from: str) -> str:
    s = mail_from.strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    if ":" in s and s.startswith("@"):  # source route <@a,@b:user@host>
        s = s.split(":", 1)[1]
    return s


def check_spf(client_ip: str, mail_from: str, helo: str, resolver: Resolver, *,
              receiver: str = "") -> SpfResult:
    """SPF for a client IP and MAIL FROM address ("" or "<>" for the null
    sender, when HELO is checked instead), with DNS from `resolver`."""
    sender = _strip_path(mail_from)
    helo = helo.strip()
    if sender:
        identity, domain = "mailfrom", sender.rpartition("@")[2]
        checked = sender if "@" in sender else f"postmaster@{sender}"
    else:
        identity, domain, checked = "helo", helo, f"postmaster@{helo}" if helo else ""
    domain = domain.lower().rstrip(".")

    def result(res: str, explanation: str = "", mechanism: str = "") -> SpfResult:
        return SpfResult(result=res, identity=identity, domain=domain, sender=checked,
                         client_ip=client_ip, explanation=explanation, mechanism=mechanism)

    try:
        ipaddress.ip_address(client_ip)
    except ValueError:
        return result("none", f"no client IP address to check ({client_ip!r})")
    if not domain:
        return result("none", "no domain to check (null MAIL FROM and no HELO name)")

    import spf  # lazy: pyspf imports socket and dnspython

    query = _spf_query_class()(resolver, i=client_ip, s=sender, h=helo,
                               receiver=receiver or "unknown", strict=True)
    try:
        res, _code, explanation = query.check()
    except Exception as e:  # pyspf on input it did not expect
        return result("permerror", f"SPF check failed: {type(e).__name__}: {e}")
    res = str(res)
    if res not in SPF_RESULTS:  # "ambiguous" only in harsh mode; kept for safety
        res = spf.RESULTS.get(res, "permerror")
    mechanism = query.mechanism if isinstance(getattr(query, "mechanism", None), str) else ""
    return result(res, str(explanation or ""), mechanism)


@cache
def _spf_query_class() -> Any:
    """A pyspf query whose DNS comes from our Resolver.

    pyspf looks everything up through `query.dns(name, qtype)`, which calls a
    module-global DNSLookup (dnspython or pydns). Overriding that method keeps
    the resolver per query (no global patching, safe across threads) and
    keeps pyspf's own semantics: its cache, the void-lookup limit of RFC 7208
    4.6.4, and its answer shapes (TXT as a list of byte strings, MX as
    (preference, host), A/AAAA/PTR as text). CNAMEs are followed by the
    resolver, as a recursive resolver does. The obsolete SPF RR type (99)
    is never asked (pyspf asks for it only in harsh mode)."""
    import spf

    class ResolverQuery(spf.query):  # type: ignore[misc]
        def __init__(self, resolver: Resolver, **kw: Any) -> None:
            self._resolver = resolver
            super().__init__(**kw)

        def dns(self, name: str, qtype: str, cnames: Any = None,
                ignore_void: bool = False) -> list[Any]:
            if not name:
                raise spf.PermError("empty domain name in DNS query")
            name = str(name).rstrip(".").lower()
            if not all(0 < len(label) < 64 for label in name.split(".")):
                return []  # not a valid DNS name: no data, as pyspf does
            key = (name, qtype)
            if key in self.cache:
                result: list[Any] = self.cache[key]
            else:
                result = self._lookup(name, qtype)
                self.cache[key] = result
            if not result and not ignore_void:
                self.void_lookups += 1
                if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                    raise spf.PermError(
                        f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
            return result

        def _lookup(self, name: str, qtype: str) -> list[Any]:
            if qtype not in ("A", "AAAA", "MX", "TXT", "PTR"):
                return []
            try:
                values = self._resolver.query(name, qtype)
            except NotFound:
                return []
            except TempError as e:
                raise spf.TempError(f"DNS {e}") from e
            if qtype == "TXT":
                return [[v.encode("utf-8")] for v in values]
            if qtype == "MX":
                out = []
                for v in values:
                    pref, _, host = v.partition(" ")
                    out.append((int(pref), host))
                return out
            return list(values)

    return ResolverQuery


# -------------------------------------------------------------------- DKIM

#: RSA keys below this size are not acceptable (RFC 8301 section 3.2).
MIN_RSA_BITS = 1024


class _KeyRecord:
    """The TXT record dkimpy's dnsfunc returned, kept to check its h= tag."""

    def __init__(self) -> None:
        self.text: bytes = b""


def check_dkim(raw: bytes, resolver: Resolver) -> tuple[DkimResult, ...]:
    """Verify every DKIM-Signature of `raw`, top to bottom, with keys from `resolver`."""
    if not re.search(rb"(?im)^dkim-signature[ \t]*:", _head(raw)):
        return ()  # unsigned: nothing for dkimpy to read (it would parse it all)
    import dkim  # lazy: dkimpy imports dnspython (and socket) at import

    try:
        d = dkim.DKIM(raw, minkey=0)
    except Exception as e:  # MessageFormatError, or dkimpy tripping (IndexError on a
        # message that starts with white space)
        # the header section does not parse: every signature-looking line is a permerror
        head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0]
        count = len(re.findall(rb"(?im)^dkim-signature[ \t]*:", head))
        return tuple(DkimResult("permerror", "", "", f"message does not parse: {_why(e)}")
                     for _ in range(count))
    sigs = [value for name, value in d.headers if name.lower() == b"dkim-signature"]
    return tuple(_verify_one(dkim, d, idx, value, resolver) for idx, value in enumerate(sigs))


def _why(e: BaseException) -> str:
    """dkimpy's message without its Python 2 leftovers ("missing b'bh'=")."""
    return re.sub(r"""\bb(['"])(.*?)\1""", r"\2", str(e))


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("ascii", errors="replace")


def _verify_one(dkim: Any, d: Any, idx: int, value: bytes, resolver: Resolver) -> DkimResult:
    from dkim.util import InvalidTagValueList, parse_tag_value

    try:
        tags: dict[bytes, bytes] = parse_tag_value(value)
    except InvalidTagValueList:
        tags = {}
    b_value = re.sub(rb"\s+", b"", tags.get(b"b", b""))
    base = dict(domain=_text(tags.get(b"d")).lower(), selector=_text(tags.get(b"s")),
                algorithm=_text(tags.get(b"a")), identity=_text(tags.get(b"i")),
                b=_text(b_value[:8]))

    def result(res: str, reason: str = "", key_bits: int = 0) -> DkimResult:
        return DkimResult(res, reason=reason, key_bits=key_bits, **base)

    # 1. the signature itself
    try:
        prep = d.verify_headerprep(idx)
    except Exception as e:  # DKIMException, or dkimpy tripping over odd input
        return result("permerror", f"bad signature: {_why(e)}")
    if not prep:
        return result("permerror", "bad signature")
    sig, include_headers, sigheaders = prep
    if b"from" not in include_headers:
        return result("permerror", "From field not signed")

    # 2. the key: what dkimpy's verify_sig does, with our errors kept apart
    #    (it turns every DNS and key problem into a bare False)
    record = _KeyRecord()

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        # dkimpy calls dnsfunc(b"sel._domainkey.example.com.", timeout=N) and
        # wants the TXT record's bytes (None for none); `timeout` is the
        # resolver's business here
        txts = resolver.txt(name.decode("ascii", errors="replace"))
        keys = [t for t in txts if "p=" in t] or txts
        record.text = keys[0].encode("utf-8")
        return record.text

    name = sig[b"s"] + b"._domainkey." + sig[b"d"] + b"."
    try:
        d.pk, d.keysize, d.ktag, d.seqtlsrpt = dkim.load_pk_from_dns(name, dnsfunc)
    except TempError as e:
        return result("temperror", f"key lookup failed: {_why(e)}")
    except NotFound:
        return result("neutral", "no key for signature")
    except dkim.NaClNotFoundError:
        return result("neutral", "ed25519 key: PyNaCl is not installed")
    except (dkim.KeyFormatError, binascii.Error, ValueError) as e:
        reason = "key revoked" if re.search(rb"(^|;)\s*p=\s*(;|$)", record.text) else \
            f"bad key record: {_why(e)}"
        return result("permerror", reason)
    except Exception as e:  # dkimpy tripping over an odd key record
        return result("permerror", f"bad key record: {type(e).__name__}: {_why(e)}")
    if d.pk is None:
        return result("permerror", "key record is for another service (s=)")
    key_bits = int(d.keysize or 0)
    try:
        hashes = parse_tag_value(record.text).get(b"h")
    except InvalidTagValueList:
        hashes = None
    sig_hash = sig[b"a"].partition(b"-")[2]
    if hashes is not None and sig_hash not in [h.strip() for h in hashes.split(b":")]:
        return result("permerror", f"inappropriate hash algorithm: key allows h={_text(hashes)}",
                      key_bits)

    # 3. the body hash and the signature
    try:
        ok = d.verify_sig_process(sig, include_headers, sigheaders[idx], dnsfunc)
    except dkim.ValidationError as e:
        if "body hash mismatch" in str(e):
            return result("fail", "body hash did not verify", key_bits)
        return result("permerror", _why(e), key_bits)
    except dkim.DKIMException as e:
        return result("permerror", _why(e), key_bits)
    except Exception as e:  # dkimpy on input it did not expect
        return result("permerror", f"verifier error: {type(e).__name__}: {_why(e)}", key_bits)
    if not ok:
        return result("fail", "signature did not verify", key_bits)
    if sig[b"a"] == b"rsa-sha1":
        return result("policy", "rsa-sha1 signatures are not accepted (RFC 8301)", key_bits)
    if d.ktag == b"rsa" and key_bits < MIN_RSA_BITS:
        return result("policy", f"{key_bits}-bit RSA key is too small (RFC 8301)", key_bits)
    return result("pass", "", key_bits)


# ------------------------------------------------------------------- DMARC

#: Two-label public suffixes that the simple organizational-domain rule
#: knows; everything else is taken to be a one-label suffix (a TLD).
MULTI_LABEL_SUFFIXES = frozenset({
    "ac.uk", "co.uk", "gov.uk", "ltd.uk", "me.uk", "net.uk", "nhs.uk", "org.uk", "plc.uk",
    "sch.uk", "asn.au", "com.au", "edu.au", "gov.au", "id.au", "net.au", "org.au", "ac.nz",
    "co.nz", "geek.nz", "gen.nz", "govt.nz", "net.nz", "org.nz", "school.nz", "ac.jp", "co.jp",
    "ed.jp", "go.jp", "gr.jp", "lg.jp", "ne.jp", "or.jp", "ac.kr", "co.kr", "go.kr", "ne.kr",
    "or.kr", "ac.in", "co.in", "edu.in", "gov.in", "net.in", "org.in", "ac.za", "co.za", "gov.za",
    "net.za", "org.za", "ac.il", "co.il", "gov.il", "net.il", "org.il", "com.ar", "com.br",
    "com.cn", "com.co", "com.hk", "com.mx", "com.my", "com.pe", "com.ph", "com.pk", "com.sg",
    "com.tr", "com.tw", "com.ua", "com.vn", "edu.cn", "gov.cn", "net.cn", "org.cn", "net.br",
    "org.br", "gov.br", "co.id", "co.th", "co.ke",
})


def organizational_domain(domain: str) -> str:
    """The registrable domain of `domain` by the simple rule (see the module doc)."""
    labels = domain.lower().rstrip(".").split(".")
    if len(labels) <= 2:
        return ".".join(labels)
    n = 3 if ".".join(labels[-2:]) in MULTI_LABEL_SUFFIXES else 2
    return ".".join(labels[-n:])


def aligned(a: str, b: str, mode: str, org_domain: Callable[[str], str] = organizational_domain
            ) -> bool:
    """Identifier alignment (RFC 7489 3.1): strict "s" is equality, relaxed
    "r" equal organizational domains."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a) == org_domain(b)


def _head(raw: bytes) -> bytes:
    """The header block and the blank line after it (the parser would decode
    and carry the whole body along, for nothing)."""
    end = raw.find(b"\r\n\r\n")
    bare = raw.find(b"\n\n", 0, end if end >= 0 else len(raw))
    if bare >= 0:
        return raw[:bare + 2]
    return raw[:end + 4] if end >= 0 else raw


#: a header block the parser reads line by line as it is: each line a field
#: (a name of printable characters, a colon) or a continuation of one
_PLAIN_HEAD = re.compile(rb"(?:[!-9;-~]+:[^\r\n]*\r?\n(?:[ \t][^\r\n]*\r?\n)*)*\r?\n?")
_FROM_FIELDS = re.compile(rb"(?im)^from:[^\r\n]*(?:\r?\n[ \t][^\r\n]*)*")
_FROM_KNOWN: dict[tuple[bytes, ...], tuple[str, str]] = {}


def from_domain(raw: bytes) -> tuple[str, str]:
    """(domain, problem) of the RFC5322.From: one From field with one address
    (several addresses of one domain pass, as RFC 7489 6.6.1 allows).

    Remembered by the From fields' bytes for a plain header block (where
    the parser's fields are its lines): parsing the header block was about
    a third of analysing a plain message, and senders repeat."""
    head = _head(raw)
    if _PLAIN_HEAD.fullmatch(head):
        key = tuple(_FROM_FIELDS.findall(head))
        found = _FROM_KNOWN.get(key)
        if found is None:
            found = _from_domain(head)
            if len(_FROM_KNOWN) >= 4096:
                _FROM_KNOWN.clear()
            _FROM_KNOWN[key] = found
        return found
    return _from_domain(head)


def _from_domain(head: bytes) -> tuple[str, str]:
    headers = BytesHeaderParser(policy=compat32).parsebytes(head)
    fields = headers.get_all("From") or []
    if not fields:
        return "", "no From header field"
    if len(fields) > 1:
        return "", f"{len(fields)} From header fields"
    addresses = [addr for _, addr in getaddresses([str(f) for f in fields]) if addr]
    domains = {addr.rpartition("@")[2].lower().rstrip(".") for addr in addresses}
    domains.discard("")
    if not addresses or not domains or any("@" not in a for a in addresses):
        return "", "no domain in the From header field"
    if len(domains) > 1:
        return "", "From addresses of several domains: " + ", ".join(sorted(domains))
    return domains.pop(), ""


def parse_dmarc_record(text: str) -> dict[str, str]:
    """Tags of a DMARC record, names lower-cased, values stripped."""
    tags: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq and name.strip():
            tags.setdefault(name.strip().lower(), value.strip())
    return tags


def _dmarc_record(resolver: Resolver, domain: str) -> list[str]:
    """DMARC records at _dmarc.<domain> (TempError propagates)."""
    try:
        txts = resolver.txt(f"_dmarc.{domain}")
    except NotFound:
        return []
    return [t for t in txts if re.match(r"v\s*=\s*DMARC1\s*(;|$)", t.strip())]


def check_dmarc(raw: bytes, *, spf: SpfResult, dkim: Sequence[DkimResult],
                resolver: Resolver,
                org_domain: Callable[[str], str] = organizational_domain) -> DmarcResult:
    """DMARC of a message given its SPF and DKIM results."""
    domain, problem = from_domain(raw)
    if problem:
        return DmarcResult("permerror", "", reason=problem)
    org = org_domain(domain)
    record_domain = domain
    try:
        records = _dmarc_record(resolver, domain)
        if not records and org != domain:
            record_domain = org
            records = _dmarc_record(resolver, org)
    except TempError as e:
        return DmarcResult("temperror", domain, reason=f"policy lookup failed: {e}")
    if not records:
        return DmarcResult("none", domain, reason="no DMARC record")
    if len(records) > 1:
        return DmarcResult("none", domain, record_domain=record_domain,
                           reason=f"{len(records)} DMARC records at _dmarc.{record_domain}")
    text = records[0]
    tags = parse_dmarc_record(text)
    policies = ("none", "quarantine", "reject")
    p = tags.get("p", "").lower()
    if p not in policies:
        if not tags.get("rua"):
            return DmarcResult("permerror", domain, record_domain=record_domain, record=text,
                               reason="DMARC record without a valid p= tag")
        p = "none"  # RFC 7489 6.6.3 step 6: act as p=none when rua= is there
    policy = p
    if record_domain != domain:
        sp = tags.get("sp", "").lower()
        policy = sp if sp in policies else p
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    try:
        pct = max(0, min(100, int(tags.get("pct", "100"))))
    except ValueError:
        pct = 100

    spf_aligned = spf.result == "pass" and aligned(spf.domain, domain, aspf, org_domain)
    aligned_dkim = [d for d in dkim if d.result == "pass"
                    and aligned(d.domain, domain, adkim, org_domain)]
    dkim_aligned = bool(aligned_dkim)
    mode = {"s": "strict", "r": "relaxed"}
    if spf_aligned or dkim_aligned:
        how = []
        if dkim_aligned:
            how.append(f"DKIM d={aligned_dkim[0].domain} aligned ({mode[adkim]})")
        if spf_aligned:
            how.append(f"SPF {spf.domain} aligned ({mode[aspf]})")
        result, reason = "pass", "; ".join(how)
    else:
        why = []
        passing = [d for d in dkim if d.result == "pass"]
        if passing:
            why.append(f"DKIM d={passing[0].domain} not aligned ({mode[adkim]})")
        else:
            why.append("no DKIM pass")
        if spf.result == "pass":
            why.append(f"SPF {spf.domain} not aligned ({mode[aspf]})")
        else:
            why.append(f"SPF {spf.result}")
        result, reason = "fail", "; ".join(why)
    return DmarcResult(result, domain, policy=policy, record_domain=record_domain, record=text,
                       adkim=adkim, aspf=aspf, pct=pct, spf_aligned=spf_aligned,
                       dkim_aligned=dkim_aligned, reason=reason)


# ------------------------------------------------- Authentication-Results


def _comment(text: str) -> str:
    """Safe inside an RFC 5322 comment: printable ASCII, no parentheses or backslashes."""
    text = re.sub(r"[^\x20-\x7e]", "?", text)
    return re.sub(r"[()\\]", "", text).strip()


_SPF_COMMENTS = {
    "pass": "domain of {s} designates {ip} as permitted sender",
    "fail": "domain of {s} does not designate {ip} as permitted sender",
    "softfail": "domain of transitioning {s} does not designate {ip} as permitted sender",
    "neutral": "{ip} is neither permitted nor denied by domain of {s}",
    "none": "domain of {s} does not designate permitted sender hosts",
    "temperror": "error in processing during lookup of {s}: {e}",
    "permerror": "error in processing during lookup of {s}: {e}",
}


def authentication_results(hostname: str, spf: SpfResult, dkim: Iterable[DkimResult],
                           dmarc: DmarcResult) -> str:
    """The Authentication-Results header value (RFC 8601) for these results,
    with `hostname` as the authserv-id, built with the authres package."""
    import authres  # pure Python; imported here with the other checkers
    import authres.dmarc

    results: list[Any] = []
    comment = _SPF_COMMENTS[spf.result].format(s=spf.sender or spf.domain, ip=spf.client_ip,
                                               e=spf.explanation)
    if spf.result == "none" and not spf.domain:
        comment = spf.explanation
    spf_props = {"smtp_mailfrom": spf.sender} if spf.identity == "mailfrom" else \
        {"smtp_helo": spf.domain}
    results.append(authres.SPFAuthenticationResult(
        result=spf.result, result_comment=_comment(comment) or None,
        **{k: v for k, v in spf_props.items() if v}))

    dkim = list(dkim)
    for d in dkim:
        props = [authres.AuthenticationResultProperty("header", "d", d.domain)] if d.domain else []
        if d.identity:
            props.append(authres.AuthenticationResultProperty("header", "i", d.identity))
        if d.selector:
            props.append(authres.AuthenticationResultProperty("header", "s", d.selector))
        if d.b:
            props.append(authres.AuthenticationResultProperty("header", "b", d.b))
        bits = f"{d.key_bits}-bit key" if d.key_bits else None
        results.append(authres.DKIMAuthenticationResult(
            result=d.result, result_comment=bits,
            reason=_comment(d.reason) or None, properties=props))
    if not dkim:
        results.append(authres.DKIMAuthenticationResult(result="none",
                                                        result_comment="message not signed"))

    if dmarc.policy:
        dmarc_comment = f"p={dmarc.policy} dis={dmarc.disposition}"
    else:
        dmarc_comment = _comment(dmarc.reason)
    results.append(authres.dmarc.DMARCAuthenticationResult(
        result=dmarc.result, result_comment=dmarc_comment or None,
        header_from=dmarc.domain or None))

    header = authres.AuthenticationResultsHeader(authserv_id=hostname, results=results)
    return str(header.header_value())


# ------------------------------------------------------------- one call


def check_message(raw: bytes, *, client_ip: str, helo: str, mail_from: str,
                  resolver: Resolver, hostname: str,
                  org_domain: Callable[[str], str] = organizational_domain) -> AuthResults:
    """SPF, DKIM and DMARC of one received message, and the
    Authentication-Results header value for `hostname`. Synchronous: with
    SystemDns it blocks on DNS, so run it in a thread from an event loop.
    Never raises for what a message or a zone contains."""
    spf = check_spf(client_ip, mail_from, helo, resolver, receiver=hostname)
    dkim = check_dkim(raw, resolver)
    dmarc = check_dmarc(raw, spf=spf, dkim=dkim, resolver=resolver, org_domain=org_domain)
    header = authentication_results(hostname, spf, dkim, dmarc)
    return AuthResults(spf=spf, dkim=dkim, dmarc=dmarc, authentication_results=header,
                       hostname=hostname)


def check_message_apart(parts: Sequence[bytes | bytearray],
                        zone: Mapping[str, Mapping[str, Sequence[str]]] | None, *,
                        client_ip: str, helo: str, mail_from: str,
                        hostname: str) -> AuthResults:
    """check_message for a process of its own (auth_process.py: what it is
    given is pickled): the message in its parts, joined here, and the
    resolver made here from `zone`, a scenario's dns (None: the system's
    resolver)."""
    from harness.analysis.dns import ScenarioDns, SystemDns

    resolver: Resolver = SystemDns() if zone is None else ScenarioDns(zone)
    return check_message(b"".join(parts), client_ip=client_ip, helo=helo, mail_from=mail_from,
                         resolver=resolver, hostname=hostname)
