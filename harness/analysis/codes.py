"""The status-code catalogue: what an SMTP reply code means and what to check.

Two kinds of code are covered:

* enhanced status codes (RFC 3463, RFC 5248: ``class.subject.detail`` such as
  ``5.7.1``), including the vendor values Microsoft Exchange and Exchange Online
  use outside the IANA registry, some of them as ranges (``4.7.500-699``);
* basic reply codes (RFC 5321: three digits such as ``550``).

The catalogue is package data (``catalogue.yaml`` next to this module), read
once. Every entry says which class it is (success, transient, permanent), the
subject and detail names, what it means, what typically causes it, and what an
Exchange administrator should check. Codes that are not in the catalogue fall
back to the meaning of their ``class.subject`` (``5.1.x``) or class (``5.x.x``,
``5xx``), and say so: :attr:`CodeInfo.match` tells how an answer was found.

:func:`lookup` explains one code; :func:`explain_reply` reads a whole reply
line (``550 5.7.1 Unable to relay``, Exchange's ``#550 5.1.1
RESOLVER.ADR.RecipNotFound; not found ##``, a queue's LastError with the remote
server's reply quoted inside it) and explains what it finds in it.

Pure: no I/O apart from reading the package data.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any, Literal

import yaml

__all__ = [
    "CatalogueError",
    "CodeInfo",
    "ComponentInfo",
    "Explanation",
    "SocketError",
    "all_entries",
    "component",
    "explain_reply",
    "lookup",
]

Kind = Literal["enhanced", "basic"]
Match = Literal["exact", "range", "subject", "class"]
Outcome = Literal["success", "intermediate", "transient", "permanent"]

_ENHANCED_CLASSES = (2, 4, 5)
_BASIC_CLASSES = (2, 3, 4, 5)


@dataclass(frozen=True)
class CodeInfo:
    """One catalogue entry, or the fallback that stands in for an unknown code.

    ``code`` is the catalogue's key: ``5.7.1``, ``4.7.500-699`` (a range),
    ``5.1.x`` / ``5.x.x`` (fallbacks for an unknown detail or subject), ``550``
    or ``5xx``. ``match`` says how a :func:`lookup` reached it.
    """

    code: str
    kind: Kind
    status_class: int
    class_name: str
    subject: int | None
    subject_name: str | None
    title: str
    meaning: str
    transient: bool | None
    causes: tuple[str, ...]
    checks: tuple[str, ...]
    exchange: str = ""
    typical_replies: tuple[str, ...] = ()
    vendor: str | None = None
    match: Match = "exact"
    #: Where the meaning comes from: the IANA registry or an RFC for standard
    #: codes, Microsoft's own page for Exchange's; the first is the main one.
    source: tuple[str, ...] = ()

    @property
    def known(self) -> bool:
        """True when the code itself is catalogued (exactly or as part of a range)."""
        return self.match in ("exact", "range")

    @property
    def outcome(self) -> Outcome:
        if self.status_class == 2:
            return "success"
        if self.status_class == 3:
            return "intermediate"
        return "transient" if self.status_class == 4 else "permanent"

    def as_dict(self, asked: str | None = None) -> dict[str, Any]:
        """The JSON shape (see harness/explain.py for the documented contract)."""
        return {
            "code": asked if asked is not None else self.code,
            "entry": self.code,
            "match": self.match,
            "known": self.known,
            "kind": self.kind,
            "class": self.status_class,
            "class_name": self.class_name,
            "subject": self.subject,
            "subject_name": self.subject_name,
            "title": self.title,
            "meaning": self.meaning,
            "outcome": self.outcome,
            "transient": self.transient,
            "causes": list(self.causes),
            "checks": list(self.checks),
            "exchange": self.exchange or None,
            "vendor": self.vendor,
            "typical_replies": list(self.typical_replies),
            "source": list(self.source),
        }


@dataclass(frozen=True)
class ComponentInfo:
    """An Exchange transport component string such as ``RESOLVER.ADR.RecipNotFound``."""

    name: str
    meaning: str
    checks: tuple[str, ...] = ()
    known: bool = True  # False: only a prefix (RESOLVER.ADR) was recognised

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "known": self.known, "meaning": self.meaning,
                "checks": list(self.checks)}


@dataclass(frozen=True)
class SocketError:
    """A Windows socket error quoted in an Exchange queue error (``Winsock error code: 10060``)."""

    code: int
    name: str
    meaning: str

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "meaning": self.meaning}


@dataclass(frozen=True)
class Explanation:
    """What :func:`explain_reply` found in a reply line, and what it means.

    The enhanced code is the more precise one and is explained first; the
    basic code is what a sending MTA acts on (retry or bounce).
    """

    text: str
    basic_code: str | None = None
    enhanced_code: str | None = None
    message: str = ""
    basic: CodeInfo | None = None
    enhanced: CodeInfo | None = None
    component: ComponentInfo | None = None
    socket_error: SocketError | None = None
    quoted: Explanation | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def found(self) -> bool:
        return self.basic_code is not None or self.enhanced_code is not None

    @property
    def primary(self) -> CodeInfo | None:
        """The enhanced code's entry when there is one, else the basic code's."""
        return self.enhanced or self.basic

    @property
    def status_class(self) -> int | None:
        """The class a sender acts on: the basic code's when present."""
        if self.basic is not None:
            return self.basic.status_class
        return self.enhanced.status_class if self.enhanced is not None else None

    @property
    def transient(self) -> bool | None:
        if self.basic is not None:
            return self.basic.transient
        return self.enhanced.transient if self.enhanced is not None else None

    @property
    def outcome(self) -> Outcome | None:
        if self.basic is not None:
            return self.basic.outcome
        return self.enhanced.outcome if self.enhanced is not None else None

    @property
    def checks(self) -> tuple[str, ...]:
        """What to check, most specific first: the quoted remote reply, the
        Exchange component, the enhanced code, then (when the enhanced code is
        missing or not catalogued) the basic code."""
        parts: list[Iterable[str]] = []
        if self.quoted is not None:
            parts.append(self.quoted.checks)
        if self.component is not None:
            parts.append(self.component.checks)
        if self.enhanced is not None:
            parts.append(self.enhanced.checks)
        if self.basic is not None and (self.enhanced is None or not self.enhanced.known):
            parts.append(self.basic.checks)
        return _dedupe(c for part in parts for c in part)

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "basic_code": self.basic_code,
            "enhanced_code": self.enhanced_code,
            "message": self.message,
            "outcome": self.outcome,
            "transient": self.transient,
            "enhanced": (self.enhanced.as_dict(self.enhanced_code)
                         if self.enhanced is not None else None),
            "basic": self.basic.as_dict(self.basic_code) if self.basic is not None else None,
            "component": self.component.as_dict() if self.component is not None else None,
            "socket_error": (self.socket_error.as_dict()
                             if self.socket_error is not None else None),
            "quoted": self.quoted.as_dict() if self.quoted is not None else None,
            "notes": list(self.notes),
            "checks": list(self.checks),
        }


# --------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class _Range:
    status_class: int
    subject: int
    low: int
    high: int
    code: str


@dataclass(frozen=True)
class _TextMeaning:
    """Another meaning of one code, which a reply carries when its text is
    one that code's other user documents (Exchange Online's "550 5.4.1 Relay
    Access Denied" is not the registry's X.4.1, "no answer from host")."""

    phrases: tuple[str, ...]  # the documented texts, spaces folded
    info: CodeInfo


@dataclass(frozen=True)
class _Catalogue:
    exact: Mapping[str, CodeInfo]
    #: by entry code: the other meanings a reply's text can select
    by_text: Mapping[str, tuple[_TextMeaning, ...]]
    ranges: tuple[_Range, ...]
    subjects: Mapping[tuple[int, int], CodeInfo]
    classes: Mapping[int, CodeInfo]
    basic_classes: Mapping[int, CodeInfo]
    components: Mapping[str, ComponentInfo]
    socket_errors: Mapping[int, SocketError]
    component_re: re.Pattern[str]


class CatalogueError(ValueError):
    """The packaged catalogue is malformed (a bug in catalogue.yaml)."""


_ENHANCED_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
_RANGE_RE = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})-(\d{1,3})$")
_GENERIC_RE = re.compile(r"^X\.(\d{1,3})\.(\d{1,3})$")
_BASIC_RE = re.compile(r"^([2-5])(\d)(\d)$")


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


def _text(where: str, data: Mapping[str, Any], key: str, *, required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise CatalogueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return " ".join(value.split())


def _texts(where: str, data: Mapping[str, Any], key: str, *, required: bool = True
           ) -> tuple[str, ...]:
    value = data.get(key, [] if not required else None)
    if not isinstance(value, list) or (required and not value) or not all(
            isinstance(v, str) and v.strip() for v in value):
        raise CatalogueError(f"{where}: {key!r} must be a list of non-empty strings, "
                             f"got {value!r}")
    return tuple(" ".join(v.split()) for v in value)


_ENTRY_KEYS = {"code", "classes", "title", "meaning", "causes", "checks", "exchange",
               "vendor", "source", "class_2", "class_4", "class_5", "by_text"}
_TEXT_MEANING_KEYS = {"text", "title", "meaning", "causes", "checks", "exchange", "vendor",
                      "source"}
#: The fallbacks (c.x.x, c.s.x, cxx) say what the standards say.
RFC_3463 = "https://www.rfc-editor.org/rfc/rfc3463"
RFC_5321 = "https://www.rfc-editor.org/rfc/rfc5321"


def _sources(where: str, data: Mapping[str, Any]) -> tuple[str, ...]:
    """An entry's `source:`: one https URL or a list of them (required)."""
    value = data.get("source")
    urls = [value] if isinstance(value, str) else value
    if not isinstance(urls, list) or not urls or not all(
            isinstance(u, str) and re.fullmatch(r"https://[^\s]+", u) for u in urls):
        raise CatalogueError(f"{where}: 'source' must be an https URL or a list of them "
                             f"(where the meaning comes from), got {value!r}")
    return tuple(urls)
_OVERRIDE_KEYS = {"title", "meaning", "causes", "checks", "exchange", "by_text"}


def _build(raw: Any) -> _Catalogue:
    if not isinstance(raw, dict):
        raise CatalogueError("catalogue.yaml: top level must be a mapping")
    class_data = raw.get("classes")
    subject_data = raw.get("subjects")
    if not isinstance(class_data, dict) or not isinstance(subject_data, dict):
        raise CatalogueError("catalogue.yaml: 'classes' and 'subjects' must be mappings")

    class_names: dict[int, str] = {}
    classes: dict[int, CodeInfo] = {}
    for cls in _ENHANCED_CLASSES:
        c = class_data.get(cls)
        if not isinstance(c, dict):
            raise CatalogueError(f"classes: class {cls} is missing")
        where = f"classes.{cls}"
        class_names[cls] = _text(where, c, "name")
        classes[cls] = CodeInfo(
            code=f"{cls}.x.x", kind="enhanced", status_class=cls,
            class_name=class_names[cls], subject=None, subject_name=None,
            title=_text(where, c, "title"), meaning=_text(where, c, "meaning"),
            transient=_transient(cls), causes=_texts(where, c, "causes"),
            checks=_texts(where, c, "checks"), match="class", source=(RFC_3463,))

    subject_names: dict[int, str] = {}
    subjects: dict[tuple[int, int], CodeInfo] = {}
    for subj in range(8):
        s = subject_data.get(subj)
        if not isinstance(s, dict):
            raise CatalogueError(f"subjects: subject {subj} is missing")
        where = f"subjects.{subj}"
        subject_names[subj] = _text(where, s, "name")
        for cls in _ENHANCED_CLASSES:
            base = classes[cls]
            # a success is a success whatever the subject: class 2 keeps the class text
            subjects[(cls, subj)] = CodeInfo(
                code=f"{cls}.{subj}.x", kind="enhanced", status_class=cls,
                class_name=class_names[cls], subject=subj, subject_name=subject_names[subj],
                title=subject_names[subj],
                meaning=(_text(where, s, "meaning") if cls != 2 else
                         f"{base.meaning} The subject is {subject_names[subj].lower()}."),
                transient=_transient(cls),
                causes=_texts(where, s, "causes") if cls != 2 else base.causes,
                checks=_texts(where, s, "checks") if cls != 2 else base.checks,
                match="subject", source=(RFC_3463,))

    exact: dict[str, CodeInfo] = {}
    by_text: dict[str, tuple[_TextMeaning, ...]] = {}
    ranges: list[_Range] = []
    entries = raw.get("enhanced")
    if not isinstance(entries, list):
        raise CatalogueError("catalogue.yaml: 'enhanced' must be a list")
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("code"), str):
            raise CatalogueError(f"enhanced[{n}]: an entry needs a 'code' string")
        code: str = e["code"]
        where = f"enhanced {code}"
        unknown = set(e) - _ENTRY_KEYS
        if unknown:
            raise CatalogueError(f"{where}: unknown keys {sorted(unknown)}")
        generic = _GENERIC_RE.match(code)
        if generic:
            cls_list = e.get("classes")
            if not isinstance(cls_list, list) or not cls_list or not all(
                    c in _ENHANCED_CLASSES for c in cls_list):
                raise CatalogueError(f"{where}: 'classes' must list some of 2, 4, 5")
            subj, detail = int(generic.group(1)), int(generic.group(2))
            for cls in cls_list:
                over = e.get(f"class_{cls}", {})
                if not isinstance(over, dict) or set(over) - _OVERRIDE_KEYS:
                    raise CatalogueError(f"{where}: class_{cls} may only set "
                                         f"{sorted(_OVERRIDE_KEYS)}")
                merged = {**e, **over}
                key = f"{cls}.{subj}.{detail}"
                _add(exact, key, _entry(f"enhanced {key}", merged, cls, subj, class_names,
                                        subject_names))
                if "by_text" in merged:
                    by_text[key] = _text_meanings(f"enhanced {key}", merged, exact[key])
            for cls in (2, 4, 5):
                if cls not in cls_list and f"class_{cls}" in e:
                    raise CatalogueError(f"{where}: class_{cls} given but {cls} not in classes")
            continue
        single = _ENHANCED_RE.match(code)
        ranged = _RANGE_RE.match(code)
        if not (single or ranged) or "classes" in e or any(f"class_{c}" in e for c in (2, 4, 5)):
            raise CatalogueError(f"{where}: code must be X.s.d (with classes), c.s.d or "
                                 "c.s.low-high (without classes)")
        m = single or ranged
        assert m is not None
        cls, subj = int(m.group(1)), int(m.group(2))
        _add(exact, code, _entry(where, e, cls, subj, class_names, subject_names))
        if "by_text" in e:
            by_text[code] = _text_meanings(where, e, exact[code])
        if ranged:
            low, high = int(ranged.group(3)), int(ranged.group(4))
            if not low < high:
                raise CatalogueError(f"{where}: empty range")
            ranges.append(_Range(cls, subj, low, high, code))

    basic_classes: dict[int, CodeInfo] = {}
    basic_data = raw.get("basic_classes")
    basic_subjects = raw.get("basic_subjects")
    if not isinstance(basic_data, dict) or not isinstance(basic_subjects, dict):
        raise CatalogueError("catalogue.yaml: 'basic_classes' and 'basic_subjects' "
                             "must be mappings")
    basic_subject_names = {int(k): str(v) for k, v in basic_subjects.items()}
    if sorted(basic_subject_names) != list(range(6)):
        raise CatalogueError("basic_subjects: need 0 to 5")
    basic_class_names: dict[int, str] = {}
    for cls in _BASIC_CLASSES:
        c = basic_data.get(cls)
        if not isinstance(c, dict):
            raise CatalogueError(f"basic_classes: class {cls} is missing")
        where = f"basic_classes.{cls}"
        basic_class_names[cls] = _text(where, c, "name")
        basic_classes[cls] = CodeInfo(
            code=f"{cls}xx", kind="basic", status_class=cls,
            class_name=basic_class_names[cls], subject=None, subject_name=None,
            title=_text(where, c, "title"), meaning=_text(where, c, "meaning"),
            transient=_transient(cls), causes=_texts(where, c, "causes"),
            checks=_texts(where, c, "checks"), match="class", source=(RFC_5321,))
    basics = raw.get("basic")
    if not isinstance(basics, list):
        raise CatalogueError("catalogue.yaml: 'basic' must be a list")
    for n, b in enumerate(basics):
        if not isinstance(b, dict):
            raise CatalogueError(f"basic[{n}]: must be a mapping")
        code = str(b.get("code"))
        where = f"basic {code}"
        bm = _BASIC_RE.match(code)
        if not bm:
            raise CatalogueError(f"{where}: not a basic reply code")
        unknown = set(b) - {"code", "title", "meaning", "causes", "checks", "exchange",
                            "source"}
        if unknown:
            raise CatalogueError(f"{where}: unknown keys {sorted(unknown)}")
        cls, subj = int(bm.group(1)), int(bm.group(2))
        _add(exact, code, CodeInfo(
            code=code, kind="basic", status_class=cls, class_name=basic_class_names[cls],
            subject=subj, subject_name=basic_subject_names[subj],
            title=_text(where, b, "title"), meaning=_text(where, b, "meaning"),
            transient=_transient(cls), causes=_texts(where, b, "causes"),
            checks=_texts(where, b, "checks"),
            exchange=_text(where, b, "exchange", required=False),
            source=_sources(where, b)))

    replies = raw.get("typical_replies")
    if not isinstance(replies, dict):
        raise CatalogueError("catalogue.yaml: 'typical_replies' must be a mapping")
    for code, lines in replies.items():
        where = f"typical_replies {code}"
        if str(code) not in exact:
            raise CatalogueError(f"{where}: no such code in the catalogue")
        if not isinstance(lines, list) or not lines or not all(
                isinstance(line, str) and line for line in lines):
            raise CatalogueError(f"{where}: must be a list of reply lines")
        # verbatim: no whitespace folding
        exact[str(code)] = replace(exact[str(code)], typical_replies=tuple(lines))

    components: dict[str, ComponentInfo] = {}
    comp_data = raw.get("components")
    if not isinstance(comp_data, dict):
        raise CatalogueError("catalogue.yaml: 'components' must be a mapping")
    for name, c in comp_data.items():
        where = f"components.{name}"
        if not isinstance(name, str) or not isinstance(c, dict):
            raise CatalogueError(f"{where}: must map a name to a mapping")
        components[name] = ComponentInfo(
            name=name, meaning=_text(where, c, "meaning"),
            checks=_texts(where, c, "checks", required=False))
    prefixes = sorted({name.split(".")[0] for name in components}, key=len, reverse=True)
    component_re = re.compile(
        r"(?<![\w.])((?:" + "|".join(map(re.escape, prefixes)) + r")(?:\.[A-Za-z]\w*)+)")

    sockets: dict[int, SocketError] = {}
    sock_data = raw.get("socket_errors")
    if not isinstance(sock_data, dict):
        raise CatalogueError("catalogue.yaml: 'socket_errors' must be a mapping")
    for num, s in sock_data.items():
        where = f"socket_errors.{num}"
        if not isinstance(num, int) or not isinstance(s, dict):
            raise CatalogueError(f"{where}: must map a number to a mapping")
        sockets[num] = SocketError(num, _text(where, s, "name"), _text(where, s, "meaning"))

    for r in ranges:
        for other in ranges:
            if other is not r and (other.status_class, other.subject) == (
                    r.status_class, r.subject) and other.low <= r.high and r.low <= other.high:
                raise CatalogueError(f"ranges {r.code} and {other.code} overlap")
    return _Catalogue(exact=exact, by_text=by_text, ranges=tuple(ranges), subjects=subjects,
                      classes=classes,
                      basic_classes=basic_classes, components=components,
                      socket_errors=sockets, component_re=component_re)


def _transient(cls: int) -> bool | None:
    return {4: True, 5: False}.get(cls)


def _add(exact: dict[str, CodeInfo], key: str, info: CodeInfo) -> None:
    if key in exact:
        raise CatalogueError(f"{key}: listed twice")
    exact[key] = info


def _entry(where: str, e: Mapping[str, Any], cls: int, subj: int, class_names: Mapping[int, str],
           subject_names: Mapping[int, str]) -> CodeInfo:
    if subj not in subject_names:
        raise CatalogueError(f"{where}: subject {subj} is not defined")
    code = where.split()[-1]
    return CodeInfo(
        code=code, kind="enhanced", status_class=cls, class_name=class_names[cls],
        subject=subj, subject_name=subject_names[subj],
        title=_text(where, e, "title"), meaning=_text(where, e, "meaning"),
        transient=_transient(cls), causes=_texts(where, e, "causes"),
        checks=_texts(where, e, "checks"),
        exchange=_text(where, e, "exchange", required=False),
        vendor=_text(where, e, "vendor", required=False) or None,
        source=_sources(where, e))


def _text_meanings(where: str, e: Mapping[str, Any], base: CodeInfo
                   ) -> tuple[_TextMeaning, ...]:
    """An entry's `by_text:` list: other meanings of the code, each with the
    reply texts that carry it (`text:`) and its own title, meaning, causes,
    checks and source; the class, subject and outcome stay the code's."""
    raw = e.get("by_text")
    if not isinstance(raw, list) or not raw:
        raise CatalogueError(f"{where}: 'by_text' must be a list of meanings")
    out: list[_TextMeaning] = []
    for n, m in enumerate(raw):
        w = f"{where} by_text[{n}]"
        if not isinstance(m, dict):
            raise CatalogueError(f"{w}: must be a mapping")
        unknown = set(m) - _TEXT_MEANING_KEYS
        if unknown:
            raise CatalogueError(f"{w}: unknown keys {sorted(unknown)}")
        info = replace(
            base, title=_text(w, m, "title"), meaning=_text(w, m, "meaning"),
            causes=_texts(w, m, "causes"), checks=_texts(w, m, "checks"),
            exchange=_text(w, m, "exchange", required=False),
            vendor=_text(w, m, "vendor", required=False) or base.vendor,
            source=_sources(w, m))
        out.append(_TextMeaning(_texts(w, m, "text"), info))
    return tuple(out)


@functools.cache
def _catalogue() -> _Catalogue:
    text = resources.files(__package__ or "harness.analysis").joinpath(
        "catalogue.yaml").read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return _build(yaml.load(text, Loader=loader))  # a safe loader (C or Python)


def all_entries() -> tuple[CodeInfo, ...]:
    """Every catalogued code (enhanced, ranges, basic), in catalogue order;
    fallbacks are not included."""
    return tuple(_catalogue().exact.values())


# ------------------------------------------------------------------ lookup


def _normalise(code: str) -> str:
    c = code.strip().strip("#<>()[]'\".,;:").strip()
    m = re.fullmatch(r"(\d)\.(\d{1,3})\.(\d{1,3})", c)
    if m:
        return ".".join(str(int(g)) for g in m.groups())
    m = re.fullmatch(r"(\d)\.(\d{1,3})\.(\d{1,3})-(\d{1,3})", c)
    if m:
        cls, subj, low, high = (int(g) for g in m.groups())
        return f"{cls}.{subj}.{low}-{high}"
    return c


def lookup(code: str) -> CodeInfo | None:
    """Explain one code: ``"5.7.1"``, ``"4.7.500"`` (found in the range
    4.7.500-699), ``"550"``. An enhanced code whose detail (or subject) is not
    catalogued falls back to its ``class.subject`` (or class) entry, and a
    basic code to its class; ``match`` on the result says which. None when the
    text is not a status code at all (``"9.1.1"``, ``"600"``, ``"hello"``)."""
    cat = _catalogue()
    key = _normalise(code)
    info = cat.exact.get(key)
    if info is not None:
        return info
    m = _ENHANCED_RE.match(key)
    if m:
        cls, subj, detail = (int(g) for g in m.groups())
        for r in cat.ranges:
            if (r.status_class, r.subject) == (cls, subj) and r.low <= detail <= r.high:
                return replace(cat.exact[r.code], match="range")
        return cat.subjects.get((cls, subj)) or cat.classes[cls]
    b = _BASIC_RE.match(key)
    if b:
        return cat.basic_classes[int(b.group(1))]
    return None


def component(name: str) -> ComponentInfo | None:
    """Explain an Exchange component string (``RESOLVER.ADR.RecipNotFound``):
    the string itself when catalogued, else its longest catalogued prefix
    (``RESOLVER.ADR``), marked ``known=False``. None for anything else."""
    comps = _catalogue().components
    if name in comps:
        return comps[name]
    parts = name.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in comps:
            return replace(comps[prefix], name=name, known=False)
    return None


# ----------------------------------------------------------- reply parsing

#: an enhanced code inside text, not part of an IP address or a longer number
_FIND_ENHANCED_RE = re.compile(r"(?<![\w.])([245])\.(\d{1,3})\.(\d{1,3})(?![\w]|\.\d)")
#: the start of a reply: "550 5.7.1", "550-5.7.1", "#550 5.1.1", "421.4.4.2", "550"
_HEAD_RE = re.compile(
    r"^\s*#?\s*(?P<basic>[2-5][0-5]\d)"
    r"(?:(?P<sep>[ \-.])\s*#?(?P<enhanced>[245]\.\d{1,3}\.\d{1,3})(?![\w]|\.\d))?"
    r"(?=[\s\-.;:,]|$)")
#: "550 5.1.1" anywhere (Exchange: Remote Server returned '550 5.1.1 ...')
_PAIR_RE = re.compile(r"(?<![\w.])(?P<basic>[2-5][0-5]\d)[ \-.]#?"
                      r"(?P<enhanced>[245]\.\d{1,3}\.\d{1,3})(?![\w]|\.\d)")
#: a basic code alone, at a line start or just inside a quote or bracket
_QUOTED_BASIC_RE = re.compile(r"(?:^|(?<=['\"(\[]))(?P<basic>[2-5][0-5]\d)(?=[ \-]|$)", re.M)
#: a reply quoted inside another (Exchange's queue LastError quotes the remote's)
_QUOTED_REPLY_RE = re.compile(r"(?P<q>[\"'])(?P<inner>#?[2-5][0-5]\d[ \-.].*?)(?P=q)", re.S)
#: a DSN diagnostic type in front of the reply ("smtp; 550 ...")
_DIAG_TYPE_RE = re.compile(r"^\s*(?:smtp|x-[\w-]+)\s*;\s*", re.I)
_SOCKET_RE = re.compile(r"(?:winsock|socket)\s+error(?:\s+code)?\s*:?\s*(\d{4,5})", re.I)


def explain_reply(text: str) -> Explanation:
    """Find and explain the codes in a reply line.

    Understands ``550 5.7.1 text``, multi-line replies (``550-5.7.25 ...``), a
    DSN diagnostic (``smtp; 550 ...``), Exchange's NDR form (``#550 5.1.1
    RESOLVER.ADR.RecipNotFound; not found ##``), Exchange 2003's ``<host
    #5.1.1>``, an enhanced code without a basic code, Exchange component
    strings, Winsock error numbers, and a remote reply quoted inside a queue
    error (``451 4.4.0 Primary target IP address responded with: "451 5.7.3
    ..."``), which is explained as :attr:`Explanation.quoted`.
    """
    return _explain(text, depth=0)


def _explain(text: str, depth: int) -> Explanation:
    original = text
    body = _DIAG_TYPE_RE.sub("", text.strip(), count=1)
    basic_code: str | None = None
    enhanced_code: str | None = None
    head_end = 0
    head = _HEAD_RE.match(body)
    if head:
        basic_code, enhanced_code = head.group("basic"), head.group("enhanced")
        head_end = head.end()
    else:
        pair = _PAIR_RE.search(body)
        if pair:
            basic_code, enhanced_code = pair.group("basic"), pair.group("enhanced")
            head_end = pair.end()
            # Remote Server returned '550 5.1.1 ...': the reply ends at the closing quote
            opener = body[pair.start() - 1: pair.start()]
            if opener in ("'", '"'):
                close = body.find(opener, head_end)
                if close != -1:
                    body = body[:close]
    # a reply quoted inside this one is explained on its own, and its codes
    # are not taken for this reply's
    inner = _QUOTED_REPLY_RE.search(body, head_end) if head is not None and depth < 3 else None
    own = body[: inner.start()] if inner else body
    if enhanced_code is None:
        # an enhanced code on its own: "5.7.321 starttls-not-supported", "<host #5.1.1>"
        found = _FIND_ENHANCED_RE.search(own)
        if found:
            enhanced_code = found.group(0)
            if head is None and not own[: found.start()].strip(" #"):
                head_end = found.end()
    if basic_code is None:
        quoted_basic = _QUOTED_BASIC_RE.search(own)
        if quoted_basic:
            basic_code = quoted_basic.group("basic")
    if enhanced_code is not None:
        enhanced_code = _normalise(enhanced_code)

    message = _message(body, head_end, basic_code, enhanced_code)
    cat = _catalogue()
    basic = lookup(basic_code) if basic_code is not None else None
    enhanced = lookup(enhanced_code) if enhanced_code is not None else None

    comp_match = cat.component_re.search(own)
    comp = component(comp_match.group(1).rstrip(".")) if comp_match else None
    sock_match = _SOCKET_RE.search(body)
    sock = cat.socket_errors.get(int(sock_match.group(1))) if sock_match else None

    quoted: Explanation | None = None
    if inner is not None:
        quoted = _explain(inner.group("inner"), depth + 1)
        if not quoted.found:
            quoted = None

    notes = _notes(basic_code, enhanced_code, basic, enhanced, quoted, sock)
    if enhanced is not None and enhanced_code is not None:
        chosen = _meaning_by_text(cat, enhanced, message)
        if chosen is not None:
            registry = enhanced
            enhanced, phrase = chosen
            where = ("in the IANA registry" if registry.vendor is None
                     else f"in {registry.vendor}'s main use")
            notes += (f"{enhanced_code} is '{registry.title}' {where}; the reply's text "
                      f"('{phrase}') is how {enhanced.vendor or 'another server'} uses it, so "
                      "that meaning is explained here.",)
    return Explanation(text=original, basic_code=basic_code, enhanced_code=enhanced_code,
                       message=message, basic=basic, enhanced=enhanced, component=comp,
                       socket_error=sock, quoted=quoted, notes=notes)


def _meaning_by_text(cat: _Catalogue, info: CodeInfo, message: str
                     ) -> tuple[CodeInfo, str] | None:
    """The code's other meaning whose documented text the reply's message
    contains (case and spacing aside), with that text; None when none does."""
    folded = " ".join(message.split()).casefold()
    for meaning in cat.by_text.get(info.code, ()):
        for phrase in meaning.phrases:
            if phrase.casefold() in folded:
                return (replace(meaning.info, match=info.match,
                                typical_replies=info.typical_replies), phrase)
    return None


def _message(body: str, head_end: int, basic_code: str | None,
             enhanced_code: str | None) -> str:
    """The human text of the reply, continuation prefixes removed."""
    rest = body[head_end:]
    if basic_code is not None:
        cont = re.escape(basic_code) + r"[ \-]"
        if enhanced_code is not None:
            cont += r"(?:#?" + re.escape(enhanced_code) + r"\b)?"
        rest = re.sub(r"(?:^|(?<=\s))" + cont, " ", rest)
    rest = re.sub(r"\s+", " ", rest).strip()
    rest = re.sub(r"^[-:;,.]\s*", "", rest)
    rest = re.sub(r"\s*##\s*$", "", rest)
    return rest.strip()


def _notes(basic_code: str | None, enhanced_code: str | None, basic: CodeInfo | None,
           enhanced: CodeInfo | None, quoted: Explanation | None,
           sock: SocketError | None) -> tuple[str, ...]:
    notes: list[str] = []
    if basic_code is None and enhanced_code is None:
        notes.append("No SMTP status code was found in this text.")
    for asked, info in ((enhanced_code, enhanced), (basic_code, basic)):
        if asked is None or info is None or info.known:
            continue
        scope = (f"{info.code} ({info.subject_name.lower() if info.subject_name else ''})"
                 if info.match == "subject" else f"{info.code} ({info.class_name.lower()})")
        notes.append(f"{asked} is not in the catalogue; explained by what {scope} means.")
    if basic is not None and enhanced is not None and basic.status_class != enhanced.status_class:
        if (basic.status_class, enhanced_code) == (5, "4.4.7"):
            notes.append(
                f"The basic code {basic_code} is permanent but the enhanced code {enhanced_code} "
                "is class 4: this is how Exchange words a message that expired in its queue. "
                "Every attempt met a temporary error until MessageExpirationTimeout ran out, "
                "so the message failed for good; the cause is the last temporary error.")
        else:
            act = {2: "accepts", 3: "continues", 4: "retries", 5: "gives up"}[basic.status_class]
            notes.append(
                f"The basic code {basic_code} is class {basic.status_class} "
                f"({basic.class_name.lower()}) but the enhanced code {enhanced_code} is class "
                f"{enhanced.status_class} ({enhanced.class_name.lower()}). RFC 3463 wants both "
                f"to agree; a sending MTA acts on the basic code, so it {act}. The enhanced "
                "code still names the reason.")
    if enhanced_code == "5.1.5":
        notes.append("IANA defines X.1.5 as a success detail (destination address valid); "
                     "Exchange reuses 5.1.5 for a refusal, explained here.")
    if quoted is not None:
        notes.append("The reply quotes another server's reply: the quoted reply is the "
                     "real reason and is explained separately.")
    if sock is not None:
        notes.append(f"Socket error {sock.code} ({sock.name}): {sock.meaning}")
    return tuple(notes)
