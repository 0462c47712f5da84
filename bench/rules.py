"""Rule evaluation: microseconds of the scenario engine per SMTP command with
a scenario of 1,000 rules (target: under 50 us). See bench/README.md.

    .venv/bin/python bench/rules.py              # every shape, 20,000 commands each
    .venv/bin/python bench/rules.py --quick      # a short mode (the suite runs it)

Shapes of scenario, each of 1,000 rules on `rcpt` (first match wins, so a
command that matches no rule, or the last, is the worst case):

  exact      a mailbox simulator: `rcpt: userN@lab.test` -> 550 5.1.1 each
  domains    one rule per domain: `rcpt: "*@domainN.test"` (a glob)
  mixed      a recipient, a sender domain and a client address per rule
  regex      `rcpt: {regex: "^userN@lab\\.test$"}` per rule: anchored, filed by
             the literal prefix every match starts with
  regex-any  `rcpt: {regex: "userN@lab"}` per rule: unanchored, filed by a
             three-letter piece of the text every match contains
  regex-alt  `rcpt: {regex: "(userN|uN)@lab"}` per rule: alternation, which
             the index does not read, so every rule is tested (the worst
             case; shown, not held to the target)

The time is the engine's decide() for one RCPT, state bookkeeping included,
measured with time.process_time over many commands, best of --repeat."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.scenario.engine import Connection, Engine, Rcpt  # noqa: E402
from harness.scenario.loader import load_text  # noqa: E402

TARGET_US = 50.0
#: shapes the index does not read: every rule is tested
UNINDEXED = frozenset({"regex-alt"})
RULES = 1000


def scenario(shape: str, n: int) -> str:
    lines = ["scenario: rules-" + shape, "rules:"]
    for i in range(n):
        if shape == "exact":
            when = f"{{rcpt: user{i}@lab.test}}"
        elif shape == "domains":
            when = f'{{rcpt: "*@domain{i}.test"}}'
        elif shape == "mixed":
            when = (f'{{rcpt: "user{i}@*", mail_from: "*@sender{i % 50}.test", '
                    f'client: 192.0.2.{i % 250}/32}}')
        elif shape == "regex":
            when = f'{{rcpt: {{regex: "^user{i}@lab\\\\.test$"}}}}'
        elif shape == "regex-any":
            when = f'{{rcpt: {{regex: "user{i}@lab"}}}}'
        else:
            when = f'{{rcpt: {{regex: "(user{i}|u{i})@lab"}}}}'
        lines.append(f"  - {{name: r{i}, on: rcpt, when: {when}, reply: 550 5.1.1 No {i}}}")
    return "\n".join(lines) + "\n"


class Facts:
    """What a session shows the engine (SessionFacts), held still."""

    def __init__(self, engine: Engine) -> None:
        self.connection: Connection = engine.connect("192.0.2.7")
        self.tls = False
        self.helo = "client.lab.test"
        self.auth_user: str | None = None
        self.mail_from = "someone@sender7.test"
        self.declared_size: int | None = None
        self.rcpts: list[str] = []
        self.message_index = 1
        self.rcpt_index = 1
        self.spf: str | None = None


def measure(shape: str, commands: int, repeat: int) -> dict[str, float]:
    engine = Engine(load_text(scenario(shape, RULES), f"{shape}.yaml"))
    facts = Facts(engine)
    out: dict[str, float] = {}
    for case, rcpt in (("last rule", f"user{RULES - 1}@lab.test" if shape != "domains"
                        else f"x@domain{RULES - 1}.test"),
                       ("no rule", "nobody@elsewhere.test")):
        event = Rcpt(recipient=rcpt)
        best = float("inf")
        for _ in range(repeat):
            started = time.process_time()
            for _ in range(commands):
                engine.decide(facts, event)
            best = min(best, (time.process_time() - started) / commands * 1e6)
        d = engine.decide(facts, event)
        expected = None if case == "no rule" or shape == "mixed" else f"r{RULES - 1}"
        if shape == "mixed" and case == "last rule":  # its sender and client must hold too
            expected = None
        if d.rule != expected:
            raise SystemExit(f"{shape}/{case}: decided by {d.rule}, expected {expected}")
        out[case] = best
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commands", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="500 commands, one run")
    p.add_argument("--json", type=Path)
    p.add_argument("--check", action="store_true", help="exit 2 above the target")
    args = p.parse_args(argv)
    if args.quick:
        args.commands, args.repeat = 500, 1
    results = {shape: measure(shape, args.commands, args.repeat)
               for shape in ("exact", "domains", "mixed", "regex", "regex-any", "regex-alt")}
    print(f"engine decide() per RCPT with {RULES} rules, us (best of {args.repeat}):")
    print("| scenario | matches the last rule | matches no rule |")
    print("|---|---|---|")
    for shape, r in results.items():
        print(f"| {shape} | {r['last rule']:.1f} | {r['no rule']:.1f} |")
    print(f"target: under {TARGET_US:g} us per command (not held: "
          f"{', '.join(sorted(UNINDEXED))}, which the index does not read)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    worst = max(v for shape, r in results.items() for v in r.values()
                if shape not in UNINDEXED)
    return 2 if args.check and not args.quick and worst >= TARGET_US else 0


if __name__ == "__main__":
    sys.exit(main())
