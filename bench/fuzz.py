"""Fuzzing in bulk: the suite's fuzz targets (tests/fuzz/fuzz_targets.py) for
a million inputs each, or for N minutes, seeded. See bench/README.md.

    .venv/bin/python bench/fuzz.py                            # every target, 1,000,000 inputs
    .venv/bin/python bench/fuzz.py --target render --minutes 5 --seed 7
    .venv/bin/python bench/fuzz.py --target api --minutes 5 --json api.json
    .venv/bin/python bench/fuzz.py --quick                    # the short mode

Inputs come from the targets' hypothesis strategies, in batches: batch b of
a run with seed S is hypothesis's generate phase seeded with S * 1,000,003
+ b, so the same seed and target give the same inputs (a batch bounds the
memory hypothesis keeps of what it tried). A failing input does not stop the
run: each distinct failure (exception type and the innermost frame of our
code) is counted, with the first input that caused it and its batch, and
printed at the end. The exit status is 1 when anything was found.

The api target starts two harnesses with the HTTP API on loopback (one
wanting a bearer token) and sends each request over its own connection."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))

import fuzz_targets as ft  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

from harness.testing import Harness  # noqa: E402

BATCH = 2000
DEFAULT_INPUTS = 1_000_000


@dataclass
class Finding:
    kind: str
    where: str
    count: int
    first_batch: int
    example: str


@dataclass
class Result:
    target: str
    seed: int
    inputs: int = 0
    seconds: float = 0.0
    findings: dict[str, Finding] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds else 0.0


def _where(e: BaseException) -> str:
    """The innermost frame in the project (harness/ or the targets), else the
    innermost of all: the place a finding is filed under."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if "/harness/" in f.filename or "fuzz_targets" in f.filename]
    f = (ours or frames)[-1] if (ours or frames) else None
    return f"{Path(f.filename).name}:{f.lineno} {f.name}" if f else "?"


def _counted(result: Result, check: Callable[[Any], None], batch: int
             ) -> Callable[[Any], None]:
    """`check` for hypothesis to call: counts inputs, files what fails and
    lets the run go on."""
    def one(value: Any) -> None:
        result.inputs += 1
        try:
            check(value)
        except Exception as e:  # a finding: counted, the run goes on
            key = f"{type(e).__name__} at {_where(e)}"
            found = result.findings.get(key)
            if found is None:
                result.findings[key] = Finding(type(e).__name__, _where(e), 1, batch,
                                               f"{value!r}"[:600] + f"\n  -> {e}"[:400])
            else:
                found.count += 1
    return one


def run_target(name: str, strategy: Any, check: Callable[[Any], None], *, seed_: int,
               inputs: int, minutes: float | None, quiet: bool) -> Result:
    result = Result(name, seed_)
    deadline = time.monotonic() + minutes * 60 if minutes else None
    start = time.monotonic()
    batch = 0
    last_print = start
    while result.inputs < inputs and (deadline is None or time.monotonic() < deadline):
        one = given(strategy)(_counted(result, check, batch))
        one = settings(max_examples=min(BATCH, inputs - result.inputs), database=None,
                       deadline=None, phases=[Phase.generate], derandomize=False,
                       suppress_health_check=list(HealthCheck))(one)
        one = seed(seed_ * 1_000_003 + batch)(one)
        before = result.inputs
        one()
        batch += 1
        now = time.monotonic()
        if not quiet and now - last_print > 15:
            last_print = now
            print(f"  {name}: {result.inputs:,} inputs, {result.inputs / (now - start):,.0f}/s, "
                  f"{len(result.findings)} finding(s)", file=sys.stderr, flush=True)
        if result.inputs == before:  # the strategy has nothing new to give
            break
    result.seconds = time.monotonic() - start
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", action="append", default=None,
                   choices=["session", "session-bytes", "loader", "api", "render"],
                   help="repeat for several (default: all)")
    p.add_argument("--inputs", type=int, default=None,
                   help=f"inputs per target (default {DEFAULT_INPUTS:,}, or unbounded with "
                        "--minutes)")
    p.add_argument("--minutes", type=float, default=None, help="time per target")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--quick", action="store_true", help="200 inputs per target")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    # aiohttp logs each malformed request it answers 400 with a traceback
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    inputs = 200 if args.quick else args.inputs or (
        DEFAULT_INPUTS if args.minutes is None else 10**12)
    names = args.target or ["session", "session-bytes", "loader", "api", "render"]
    results: list[Result] = []
    with Harness(http=True) as open_, Harness(http=True, api_token="tok") as guarded:
        assert open_.http_url and guarded.http_url
        http = ft.HttpTarget({False: open_.http_url, True: guarded.http_url})
        table = {t.name: t for t in ft.targets(http)}
        for name in names:
            t = table[name]
            if not args.quiet:
                print(f"{name}: seed {args.seed}", file=sys.stderr, flush=True)
            results.append(run_target(name, t.strategy, t.check, seed_=args.seed,
                                      inputs=inputs, minutes=args.minutes, quiet=args.quiet))
        open_.check()
        guarded.check()
    print("| target | seed | inputs | seconds | inputs/s | findings |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r.target} | {r.seed} | {r.inputs:,} | {r.seconds:,.0f} | {r.rate:,.0f} | "
              f"{sum(f.count for f in r.findings.values())} in {len(r.findings)} kind(s) |")
    for r in results:
        for key, f in r.findings.items():
            print(f"\n{r.target}: {key}: {f.count} input(s), first in batch {f.first_batch}\n"
                  f"  {f.example}")
    if args.json:
        args.json.write_text(json.dumps([{
            "target": r.target, "seed": r.seed, "inputs": r.inputs, "seconds": r.seconds,
            "rate": r.rate, "findings": [{"key": k, **f.__dict__} for k, f in r.findings.items()]}
            for r in results], indent=2))
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
