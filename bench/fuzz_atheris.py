"""Does atheris (coverage-guided, libFuzzer) find more than hypothesis in the
same time? Measured on code whose failures are known: the message view and
the scenario loader as they were before issue 11 (commit 1aeecad), run for
the same minutes by each tool. See bench/README.md (fuzz.py).

    pip install atheris        # into any environment: not a project dependency
    .venv/bin/python bench/fuzz_atheris.py --tool hypothesis --target render --minutes 5
    .venv/bin/python bench/fuzz_atheris.py --tool atheris --target render --minutes 5

Targets (the code of commit 1aeecad, read with git show):
  render   the API's message view `_parts` (email's policy.default parser)
  loader   `load_text` of the scenario loader (no depth bound, PyYAML's errors)

Each failure is filed under its exception type and innermost frame; the run
prints how many inputs it tried, each distinct failure and the second it was
first seen. hypothesis draws from the suite's strategies (message_bytes,
yaml_text); atheris mutates bytes, guided by the coverage of the email,
yaml and loader modules, from an empty corpus (or --corpus DIR)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "fuzz"))
BEFORE = "1aeecad"  # main before issue 11's fixes


def _old_module(path: str, name: str) -> types.ModuleType:
    source = subprocess.run(["git", "show", f"{BEFORE}:{path}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(name)
    module.__file__ = f"<{BEFORE}:{path}>"
    sys.modules[name] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def old_render() -> Callable[[bytes], Any]:
    from email import policy
    from email.parser import BytesParser

    def parts(raw: bytes) -> Any:  # _parts of harness/api/app.py at BEFORE, as it was
        msg = BytesParser(policy=policy.default).parsebytes(raw)
        headers = [[k, str(v)] for k, v in msg.items()]
        for part in msg.walk():
            if part.is_multipart():
                continue
            part.get_content_type()
            part.get_filename()
            part.get_payload(decode=True)
            try:
                part.get_content()
            except (LookupError, ValueError, AssertionError):
                continue
        return json.dumps(headers)
    return parts


def old_loader() -> Callable[[str], Any]:
    from harness.errors import ScenarioError

    loader = _old_module("harness/scenario/loader.py", "loader_before_issue_11")

    def load(text: str) -> None:
        with contextlib.suppress(ScenarioError):
            loader.load_text(text, "fuzz.yaml")
    return load


class Tally:
    def __init__(self) -> None:
        self.start = time.monotonic()
        self.inputs = 0
        self.found: dict[str, tuple[float, int]] = {}

    def run(self, fn: Callable[[Any], Any], value: Any) -> None:
        self.inputs += 1
        try:
            fn(value)
        except Exception as e:
            frames = traceback.extract_tb(e.__traceback__)
            f = frames[-1] if frames else None
            key = (f"{type(e).__name__} at {Path(f.filename).name}:{f.lineno} {f.name}" if f
                   else type(e).__name__)
            if key not in self.found:
                self.found[key] = (time.monotonic() - self.start, self.inputs)

    def report(self, tool: str, target: str) -> dict[str, Any]:
        seconds = time.monotonic() - self.start
        print(f"{tool} {target}: {self.inputs:,} inputs in {seconds:,.0f} s "
              f"({self.inputs / seconds:,.0f}/s), {len(self.found)} distinct failure(s)")
        for key, (t, n) in sorted(self.found.items(), key=lambda kv: kv[1][0]):
            print(f"  {t:7.1f} s  input {n:>9,}  {key}")
        return {"tool": tool, "target": target, "inputs": self.inputs, "seconds": seconds,
                "found": {k: {"second": t, "input": n} for k, (t, n) in self.found.items()}}


def with_hypothesis(target: str, fn: Callable[[Any], Any], minutes: float, seed_: int,
                    tally: Tally) -> None:
    import fuzz_targets as ft
    from hypothesis import HealthCheck, Phase, given, seed, settings

    strategy = ft.message_bytes if target == "render" else ft.yaml_text
    deadline = time.monotonic() + minutes * 60
    batch = 0
    while time.monotonic() < deadline:
        one = given(strategy)(lambda v: tally.run(fn, v))
        one = settings(max_examples=2000, database=None, deadline=None,
                       phases=[Phase.generate], suppress_health_check=list(HealthCheck))(one)
        seed(seed_ * 1_000_003 + batch)(one)()
        batch += 1


def with_atheris(target: str, fn: Callable[[Any], Any], minutes: float, seed_: int,
                 tally: Tally, corpus: Path | None, done: Callable[[], None]) -> None:
    import atheris

    atheris.instrument_all()  # email, yaml and the loader: the code the inputs reach

    deadline = time.monotonic() + minutes * 60

    def one(data: bytes) -> None:
        tally.run(fn, data if target == "render" else data.decode("utf-8", "replace"))
        if time.monotonic() > deadline:  # libFuzzer's own exit skips Python's atexit
            done()
            os._exit(0)

    work = corpus or Path(tempfile.mkdtemp(prefix="atheris-"))
    atheris.Setup([sys.argv[0], f"-seed={seed_}",
                   "-rss_limit_mb=4096", "-max_len=4096", "-print_final_stats=0", str(work)],
                  one)
    with contextlib.suppress(SystemExit):
        atheris.Fuzz()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tool", choices=("hypothesis", "atheris"), required=True)
    p.add_argument("--target", choices=("render", "loader"), required=True)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--corpus", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    sys.setrecursionlimit(1000)
    fn = old_render() if args.target == "render" else old_loader()
    tally = Tally()

    def done() -> None:
        result = tally.report(args.tool, args.target)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    if args.tool == "hypothesis":
        with_hypothesis(args.target, fn, args.minutes, args.seed, tally)
        done()
    else:
        with_atheris(args.target, fn, args.minutes, args.seed, tally, args.corpus, done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
