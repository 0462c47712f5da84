"""Which rules of a phase could match a step: an index over the first
condition of each rule, so a scenario of a thousand rules costs a lookup
per step, not a thousand pattern matches.

A rule whose first condition (in the order the engine tests them, chance
last) is a recipient, sender, HELO or client condition made of exact values,
`*@domain` or `local@*` globs, single addresses, a regular expression
anchored at the start with a literal prefix (`^bounce-`, `^user1@lab`), or
one that must contain a literal text of three letters or more (`user1@lab`,
under a three-letter piece of it, as code search engines index text), is
filed under those values; any other rule is always tested. A rule not
among the candidates is known not to match on that first condition: its
near-miss reason is worked out only when someone reads it (`Misses`).

May know: the scenario model. Must not know: I/O of any kind."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from harness.scenario.model import (
    ClientMatcher,
    Facts,
    Matcher,
    Pattern,
    RcptMatcher,
    Rule,
    TextMatcher,
)

_WILD = frozenset("*?[")
_INDEXED_KEYS = ("rcpt", "mail_from", "helo")


def evaluation_order(rule: Rule) -> tuple[Matcher, ...]:
    """A rule's conditions as the engine tests them: chance draws from the
    RNG, so it comes last (drawn only when everything else holds, and a
    seeded run replays exactly)."""
    return tuple(sorted(rule.when, key=lambda mt: mt.key == "chance"))


@dataclass
class _Files:
    """Rule positions filed by value: exact, by domain (`*@d`), by local part (`l@*`)."""

    exact: dict[str, list[int]] = field(default_factory=dict)
    domain: dict[str, list[int]] = field(default_factory=dict)
    local: dict[str, list[int]] = field(default_factory=dict)
    #: anchored regular expressions, by their literal prefix (lower case: a
    #: superset of what the case-sensitive expression matches)
    prefix: dict[str, list[int]] = field(default_factory=dict)
    #: other expressions, by one three-letter piece of a literal text each
    #: must contain: (position, the literal), lower case
    literal: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    #: every position filed under an expression's text (a value that is not
    #: ASCII tries them all: under re.IGNORECASE a few letters match others
    #: that str.lower() does not turn them into, such as U+017F and "s")
    by_text: list[int] = field(default_factory=list)

    def file(self, pos: int, globs: Sequence[str]) -> bool:
        """File `pos` under each glob; False (nothing filed) if one of them
        is not of a kind the index knows."""
        places: list[tuple[dict[str, list[int]], str]] = []
        for glob in globs:
            g = glob.lower()
            if not _WILD & set(g):
                places.append((self.exact, g))
            elif g.startswith("*@") and not _WILD & set(g[2:]):
                places.append((self.domain, g[2:]))
            elif g.endswith("@*") and "@" not in g[:-2] and not _WILD & set(g[:-2]):
                places.append((self.local, g[:-1]))
            else:
                return False
        for table, value in places:
            table.setdefault(value, []).append(pos)
        return True

    def file_prefix(self, pos: int, prefix: str) -> None:
        self.prefix.setdefault(prefix.lower(), []).append(pos)
        self.by_text.append(pos)

    def file_literal(self, pos: int, literal: str) -> None:
        """File an expression that matches only text containing `literal`
        (three letters or more) under the piece of it that fewest others
        are filed under."""
        low = literal.lower()
        pieces = {low[i:i + 3] for i in range(len(low) - 2)}
        piece = min(sorted(pieces), key=lambda t: len(self.literal.get(t, ())))
        self.literal.setdefault(piece, []).append((pos, low))
        self.by_text.append(pos)

    def find(self, value: str, into: set[int]) -> None:
        low = value.lower()
        if self.by_text and not low.isascii():
            into.update(self.by_text)
        elif self.by_text:
            if self.prefix:
                for end in range(1, len(low) + 1):
                    found = self.prefix.get(low[:end])
                    if found:
                        into.update(found)
            literal = self.literal
            if literal:
                for piece in {low[i:i + 3] for i in range(len(low) - 2)}:
                    hits = literal.get(piece)
                    if hits:
                        into.update(pos for pos, text in hits if text in low)
        for table, key in ((self.exact, low),
                           (self.domain, low.rpartition("@")[2] if "@" in low else None),
                           (self.local, low.partition("@")[0] + "@" if "@" in low else None)):
            if key is not None:
                found = table.get(key)
                if found:
                    into.update(found)


class PhaseRules:
    """The rules of one phase, in file order, with their index."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self.order = tuple(evaluation_order(r) for r in self.rules)
        self.files = {key: _Files() for key in _INDEXED_KEYS}
        self.clients: dict[str, list[int]] = {}
        always = []
        for pos, (rule, order) in enumerate(zip(self.rules, self.order, strict=True)):
            if not (order and rule.times is None and self._file(pos, order[0])):
                always.append(pos)
        self.always = frozenset(always)
        #: whether the index spares any work (else every rule is tested)
        self.indexed = len(always) < len(self.rules)

    def _file(self, pos: int, first: Matcher) -> bool:
        if isinstance(first, RcptMatcher) or (
                isinstance(first, TextMatcher) and first.key in ("mail_from", "helo")):
            pattern = first.pattern
            if pattern.regex is not None:
                prefix = literal_prefix(pattern.regex)
                if prefix and prefix.isascii():
                    self.files[first.key].file_prefix(pos, prefix)
                    return True
                literal = required_literal(pattern.regex)
                if len(literal) >= 3 and literal.isascii():
                    self.files[first.key].file_literal(pos, literal)
                    return True
                return False
            return bool(pattern.globs) and self.files[first.key].file(pos, pattern.globs)
        if isinstance(first, ClientMatcher) and first.networks and all(
                n.num_addresses == 1 for n in first.networks):
            for n in first.networks:
                self.clients.setdefault(str(n.network_address), []).append(pos)
            return True
        return False

    def candidates(self, facts: Facts) -> list[int]:
        """The positions of the rules that could match `facts`, in order."""
        found = set(self.always)
        files = self.files
        for r in facts.rcpts:
            files["rcpt"].find(r, found)
        if facts.mail_from is not None:
            files["mail_from"].find(facts.mail_from or "<>", found)
            if facts.mail_from == "":
                files["mail_from"].find("", found)
        if facts.helo is not None:
            files["helo"].find(facts.helo, found)
        hit = self.clients.get(str(facts.client))
        if hit:
            found.update(hit)
        return sorted(found)


_META = frozenset(".^$*+?{}[]|()\\")


def literal_prefix(regex: Pattern) -> str:
    """The text every string the expression matches starts with, when the
    expression is anchored at the start (`^` or `\\A`, no flags that change
    what `^` means) and has no alternation; "" when that cannot be told.

    Written by hand: the standard library's parser of expressions is
    private (re._parser); this reads only the simple prefix, conservatively."""
    p = regex.pattern
    if regex.flags & (re.MULTILINE | re.VERBOSE) or "|" in p:
        return ""
    if p.startswith("^"):
        i = 1
    elif p.startswith("\\A"):
        i = 2
    else:
        return ""
    out: list[str] = []
    while i < len(p):
        c = p[i]
        if c == "\\":
            if i + 1 >= len(p) or p[i + 1].isalnum() or p[i + 1].isspace():
                break  # a class (\\d), an anchor (\\b, \\Z), a reference (\\1)
            out.append(p[i + 1])
            i += 2
            continue
        if c in _META:
            break
        out.append(c)
        i += 1
    if i < len(p) and p[i] in "*?{" and out:
        out.pop()  # the last character may be absent
    return "".join(out)


def required_literal(regex: Pattern) -> str:
    """The longest text every string the expression matches contains, read
    from an expression without alternation, groups or character sets
    (`user1@lab`, `bounce-\\d+@`); "" when that cannot be told. Written by
    hand, conservatively, for the reason literal_prefix gives."""
    p = regex.pattern
    if regex.flags & re.VERBOSE or any(c in p for c in "|()[]"):
        return ""
    best = ""
    run: list[str] = []

    def end() -> None:
        nonlocal best
        if len(run) > len(best):
            best = "".join(run)
        run.clear()

    i = 0
    while i < len(p):
        c = p[i]
        if c == "\\":
            nxt = p[i + 1] if i + 1 < len(p) else ""
            if nxt == "N":
                return ""  # \\N{NAME}: a character by its name
            if not nxt or nxt.isalnum() or nxt.isspace():
                end()  # a class (\\d), an anchor (\\b), a reference (\\1), a code
                i += 2
                if nxt in "xuU0123456789":  # \\x41, \\u00e9, \\012, \\12: its digits too
                    while i < len(p) and p[i].isalnum():
                        i += 1
                continue
            run.append(nxt)
            i += 2
            continue
        if c in "*?{":  # the character before may be absent
            if run:
                run.pop()
            end()
            if c == "{":
                close = p.find("}", i)
                if close < 0:
                    return ""
                i = close
        elif c in ".^$+}":  # (after "+" its character repeats: the text so far stays)
            end()
        else:
            run.append(c)
        i += 1
    end()
    return best


class Misses(Sequence[tuple[str, str]]):
    """The rules before the deciding one (or all of the phase's) that did
    not match, each with why: those tested, with the reason found then;
    those the index passed over, with the reason of their first condition,
    worked out when read (a near-miss report), from the values it was
    filed by."""

    __slots__ = ("_done", "_facts", "_items", "_table", "_tested", "_upto")

    def __init__(self, table: PhaseRules, upto: int, tested: dict[int, str],
                 facts: Facts) -> None:
        self._table = table
        self._upto = upto
        self._tested = tested
        # only what the first conditions of passed-over rules read
        self._facts = Facts(phase=facts.phase, client=facts.client, tls=False, connection=0,
                            state="", rng=_NO_DRAWS, helo=facts.helo,
                            mail_from=facts.mail_from, rcpts=facts.rcpts)
        self._items: tuple[tuple[str, str], ...] | None = None

    def _all(self) -> tuple[tuple[str, str], ...]:
        if self._items is None:
            out = []
            rules, order = self._table.rules, self._table.order
            for pos in range(self._upto):
                why = self._tested.get(pos)
                if why is None:
                    why = order[pos][0].check(self._facts) or "did not match"
                out.append((rules[pos].name, why))
            self._items = tuple(out)
        return self._items

    def __len__(self) -> int:
        return self._upto

    def __bool__(self) -> bool:
        return self._upto > 0

    @overload
    def __getitem__(self, i: int) -> tuple[str, str]: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[str, str]]: ...
    def __getitem__(self, i: int | slice) -> tuple[str, str] | Sequence[tuple[str, str]]:
        return self._all()[i]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Misses):
            return self._all() == other._all()
        return isinstance(other, (tuple, list)) and self._all() == tuple(other)

    def __hash__(self) -> int:
        return hash(self._all())

    def __repr__(self) -> str:
        return repr(self._all())


class _NoDraws(random.Random):
    """A passed-over rule's first condition is never chance: nothing draws."""

    def random(self) -> float:  # pragma: no cover - never called
        raise AssertionError("a near-miss reason does not draw")


_NO_DRAWS = _NoDraws()
