#!/usr/bin/env python3
"""Measure harness.analysis.dsn against the Sisimai bounce corpus.

    .venv/bin/python tools/ndr_corpus.py [CORPUS] [--failures] [--json]

CORPUS defaults to ../shared/corpus/sisimai next to the repository (read in
place, never copied). For every bounce listed in expected.csv the parser's
status for recipient `index` is compared with Sisimai's expectation:

- go-sisimai rows are used where they exist, p5-sisimai rows otherwise; for
  a sample whose go rows repeat an index (a slip in the go test table), the
  p5 rows are used.
- A file that is an mbox of several reports (two are) counts the recipients
  of all of them, in order, as Sisimai does.
- Sisimai's test suites number every recipient it reports, delivered ones
  included (they decode with delivered=true) but not those a report marks
  relayed or expanded: those are skipped before counting `index`.
- Expected statuses of the form X.0.9NN are Sisimai's own pseudo-codes
  ("no code in the bounce; inferred from the text"): counted apart, as
  "pseudo", with what the parser said (an honest parser says None).
- Rows with no expected status are feedback reports (arf) and auto-replies
  (rfc3834): they agree when the parser says "not an NDR".

Targets (tests/unit/test_dsn.py asserts them): no exception on any file; no
file in not-bounces/ reported as an NDR; >= 98% agreement on real-code
samples of group (a) rfc3464 + Postfix + Exim + Sendmail; >= 90% on all
real-code samples (b); 100% on real-code samples of group (c), the Exchange
and Office 365 families.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.analysis.dsn import Ndr, RecipientResult, parse_ndr  # noqa: E402  (needs ROOT on sys.path)

DEFAULT_CORPUS = ROOT.parent / "shared" / "corpus" / "sisimai"
PSEUDO = re.compile(r"^[245]\.0\.9\d\d$")
GROUP_A = ("rfc3464", "lhost-postfix", "lhost-exim", "lhost-sendmail")
GROUP_C = ("lhost-exchange2003", "lhost-exchange2007", "lhost-office365", "rhost-microsoft",
           "lhost-outlook", "rhost-outlook")
TARGETS = {"a": 0.98, "b": 0.90, "c": 1.0}


@dataclass
class Row:
    sample: str  # "bounces/x-01.eml"
    index: int
    status: str  # expected; "" for feedback / vacation
    reason: str
    impl: str
    replycode: str = ""

    @property
    def family(self) -> str:
        return family_of(self.sample)

    @property
    def kind(self) -> str:
        if not self.status:
            return "none"
        return "pseudo" if PSEUDO.match(self.status) else "real"


@dataclass
class Outcome:
    sample: str
    index: int
    family: str
    kind: str  # real | pseudo | none
    expected: str
    got: str | None
    agree: bool
    reason: str
    format: str | None = None
    error: str | None = None
    reply_expected: str = ""
    reply_got: str = ""


@dataclass
class Tally:
    samples: int = 0
    real: int = 0
    real_agree: int = 0
    pseudo: int = 0
    pseudo_none: int = 0  # parser reported no code for a pseudo-code sample
    none: int = 0
    none_agree: int = 0
    exceptions: int = 0
    not_ndr: int = 0  # the parser said "not an NDR" for a listed bounce

    def add(self, o: Outcome) -> None:
        self.samples += 1
        if o.error:
            self.exceptions += 1
        if o.kind == "real":
            self.real += 1
            self.real_agree += o.agree
        elif o.kind == "pseudo":
            self.pseudo += 1
            self.pseudo_none += o.got is None
        else:
            self.none += 1
            self.none_agree += o.agree
        if o.format is None and o.kind != "none":
            self.not_ndr += 1

    @property
    def rate(self) -> float | None:
        return self.real_agree / self.real if self.real else None


@dataclass
class Report:
    corpus: str
    files: int = 0
    exceptions: list[str] = field(default_factory=list)
    not_bounces: int = 0
    not_bounces_as_ndr: list[str] = field(default_factory=list)
    unlisted_files: int = 0
    families: dict[str, Tally] = field(default_factory=dict)
    total: Tally = field(default_factory=Tally)
    groups: dict[str, Tally] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def targets_met(self) -> dict[str, bool]:
        met = {
            "no exceptions": not self.exceptions,
            "no not-bounce reported as an NDR": not self.not_bounces_as_ndr,
        }
        for name, need in TARGETS.items():
            rate = self.groups[name].rate
            met[f"group ({name}) >= {need:.0%}"] = rate is not None and rate >= need
        return met


def family_of(sample: str) -> str:
    return re.sub(r"-\d+\.eml$", "", Path(sample).name)


def load_rows(corpus: Path) -> list[Row]:
    by_sample: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    with (corpus / "expected.csv").open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            by_sample[r["sample"]][r["impl"]].append(
                Row(r["sample"], int(r["index"]), r["status"].strip(), r["reason"], r["impl"],
                    r["replycode"].strip()))
    rows: list[Row] = []
    for sample, impls in sorted(by_sample.items()):
        if not (corpus / sample).is_file():
            continue
        go = impls.get("go-sisimai", [])
        if go and len({r.index for r in go}) != len(go) and impls.get("p5-sisimai"):
            go = []  # the go table repeats an index: use p5's numbering
        rows += go or impls.get("p5-sisimai", [])
    return rows


def split_mbox(data: bytes) -> list[bytes]:
    """The messages of an mbox file (a file that starts with a "From " line
    holds one or more, each opened by a "From sender ctime-date" line); any
    other file is one message."""
    if not data.startswith(b"From "):
        return [data]
    data = data.replace(b"\r\n", b"\n")
    parts = re.split(rb"\n(?=From \S+ +\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\s*\n)", data)
    return [p for p in parts if p.strip()]


def parse_file(data: bytes) -> list[Ndr]:
    """Every report in a corpus file (two files are mboxes of two reports)."""
    return [n for n in (parse_ndr(m) for m in split_mbox(data)) if n is not None]


def bounced(ndrs: list[Ndr]) -> list[RecipientResult]:
    """The recipients Sisimai would number, in its order."""
    return [r for ndr in ndrs for r in ndr.recipients if r.action not in ("relayed", "expanded")]


def run(corpus: Path) -> Report:
    start = time.monotonic()
    rep = Report(corpus=str(corpus))
    parsed: dict[str, list[Ndr]] = {}
    errors: dict[str, str] = {}
    files = sorted((corpus / "bounces").glob("*.eml")) + sorted(
        (corpus / "not-bounces").glob("*.eml"))
    for path in files:
        key = f"{path.parent.name}/{path.name}"
        try:
            parsed[key] = parse_file(path.read_bytes())
        except Exception:  # the measurement counts them; one bad file must not stop it
            parsed[key] = []
            errors[key] = traceback.format_exc(limit=3)
    rep.files = len(files)
    rep.exceptions = sorted(errors)
    nb = [k for k in parsed if k.startswith("not-bounces/")]
    rep.not_bounces = len(nb)
    rep.not_bounces_as_ndr = sorted(k for k in nb if parsed[k])

    rows = load_rows(corpus)
    listed = {r.sample for r in rows}
    rep.unlisted_files = len([k for k in parsed if k not in listed
                              and not k.startswith("not-bounces/")])
    for row in rows:
        ndrs = parsed.get(row.sample, [])
        recipients = bounced(ndrs)
        mine = recipients[row.index - 1] if 0 < row.index <= len(recipients) else None
        got = mine.status if mine else None
        agree = not ndrs if row.kind == "none" else got == row.status
        rep.outcomes.append(Outcome(
            sample=row.sample, index=row.index, family=row.family, kind=row.kind,
            expected=row.status, got=got, agree=agree, reason=row.reason,
            format=ndrs[0].format if ndrs else None, error=errors.get(row.sample),
            reply_expected=row.replycode,
            reply_got=str(mine.reply_code) if mine and mine.reply_code else ""))

    families: dict[str, Tally] = defaultdict(Tally)
    groups = {"a": Tally(), "b": Tally(), "c": Tally()}
    for o in rep.outcomes:
        families[o.family].add(o)
        rep.total.add(o)
        groups["b"].add(o)
        if o.family in GROUP_A:
            groups["a"].add(o)
        if o.family in GROUP_C:
            groups["c"].add(o)
    rep.families = dict(sorted(families.items()))
    rep.groups = groups
    rep.seconds = time.monotonic() - start
    return rep


def _pct(t: Tally) -> str:
    return "-" if t.rate is None else f"{t.rate:7.1%}"


def _line(name: str, t: Tally) -> str:
    return (f"{name:24} {t.samples:5} {t.real:5} {t.real_agree:5} {_pct(t):>7} "
            f"{t.pseudo:6} {t.pseudo_none:6} {t.none:5} {t.none_agree:5} {t.not_ndr:6} "
            f"{t.exceptions:4}")


def print_report(rep: Report, failures: bool) -> None:
    head = (f"{'family':24} {'rows':>5} {'real':>5} {'agree':>5} {'rate':>7} "
            f"{'pseudo':>6} {'p:none':>6} {'none':>5} {'ok':>5} {'notndr':>6} {'exc':>4}")
    print(head)
    print("-" * len(head))
    for name, t in rep.families.items():
        print(_line(name, t))
    print("-" * len(head))
    print(_line("TOTAL", rep.total))
    print()
    print("columns: rows = expected.csv rows used; real = rows whose expected status is a")
    print("real code, agree = parser gave the same; pseudo = Sisimai X.0.9NN pseudo-codes,")
    print("p:none = parser honestly gave no code; none = feedback/vacation rows, ok = parser")
    print("said 'not an NDR'; notndr = listed bounces the parser did not recognise.")
    print()
    print(f"files read: {rep.files} ({rep.unlisted_files} bounces without expected rows), "
          f"exceptions: {len(rep.exceptions)}, "
          f"not-bounces reported as NDR: {len(rep.not_bounces_as_ndr)} of {rep.not_bounces}, "
          f"{rep.seconds:.1f} s")
    replies = [o for o in rep.outcomes if o.kind != "none"]
    same = sum(o.reply_expected == o.reply_got for o in replies)
    print(f"reply codes (informative): {same}/{len(replies)} rows give the same basic code "
          "as Sisimai (or none where it has none)")
    labels = {"a": "(a) rfc3464+postfix+exim+sendmail", "b": "(b) all real-code samples",
              "c": "(c) Exchange + Office 365"}
    for key, label in labels.items():
        t = rep.groups[key]
        print(f"{label:36} {t.real_agree:4}/{t.real:<4} {_pct(t)}  target {TARGETS[key]:.0%}")
    print()
    for name, ok in rep.targets_met().items():
        print(f"  [{'x' if ok else ' '}] {name}")
    for path in rep.exceptions:
        print(f"EXCEPTION {path}")
    for path in rep.not_bounces_as_ndr:
        print(f"NOT-BOUNCE AS NDR {path}")
    if failures:
        print()
        print("disagreements (sample #index: expected -> got [format] reason):")
        for o in rep.outcomes:
            if o.kind in ("real", "none") and not o.agree:
                print(f"  {o.sample} #{o.index}: {o.expected or '(not an NDR)'} -> "
                      f"{o.got if o.format else '(not an NDR)'} [{o.format}] {o.reason}")
        print()
        print("pseudo-code samples where the parser gave a code of its own:")
        for o in rep.outcomes:
            if o.kind == "pseudo" and o.got is not None:
                print(f"  {o.sample} #{o.index}: {o.expected} -> {o.got} [{o.format}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("corpus", nargs="?", type=Path, default=DEFAULT_CORPUS,
                    help=f"the sisimai corpus folder (default {DEFAULT_CORPUS})")
    ap.add_argument("--failures", action="store_true", help="list the disagreements")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    if not (args.corpus / "expected.csv").is_file():
        print(f"ndr_corpus: no expected.csv in {args.corpus}", file=sys.stderr)
        return 2
    rep = run(args.corpus)
    if args.json:
        out = {
            "corpus": rep.corpus, "files": rep.files, "exceptions": rep.exceptions,
            "not_bounces": rep.not_bounces, "not_bounces_as_ndr": rep.not_bounces_as_ndr,
            "families": {k: asdict(v) | {"rate": v.rate} for k, v in rep.families.items()},
            "total": asdict(rep.total) | {"rate": rep.total.rate},
            "groups": {k: asdict(v) | {"rate": v.rate} for k, v in rep.groups.items()},
            "targets": rep.targets_met(),
            "reply_codes_same": sum(o.reply_expected == o.reply_got for o in rep.outcomes
                                    if o.kind != "none"),
            "outcomes": [asdict(o) for o in rep.outcomes] if args.failures else None,
            "seconds": round(rep.seconds, 2),
        }
        json.dump(out, sys.stdout, indent=2)
        print()
    else:
        print_report(rep, args.failures)
    return 0 if all(rep.targets_met().values()) else 1


if __name__ == "__main__":
    sys.exit(main())
