"""How long do 100 tests using `smtp_harness` take? (issue: under 10 s)

Generates a test file of N tests that each send one message through the
smtp_harness fixture and read it back, and the same N tests without the
harness (an empty body) as a baseline in the same run; runs each with pytest
in a subprocess and prints the wall times and the per-test overhead.

    .venv/bin/python bench/fixture_overhead.py [--tests 100] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WITH_HARNESS = '''
def test_{i}(smtp_harness):
    with smtplib.SMTP(smtp_harness.host, smtp_harness.port, local_hostname="b.test") as c:
        c.sendmail("a@lab.test", ["r{i}@lab.test"], b"Subject: {i}\\r\\n\\r\\nx\\r\\n")
    assert smtp_harness.wait_for_message(rcpt="r{i}@lab.test").subject == "{i}"
'''
BASELINE = '''
def test_{i}():
    assert True
'''


def run(source: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "test_generated.py"
        path.write_text("import smtplib\n" + "".join(source.format(i=i) for i in range(n)))
        start = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(path)], cwd=d, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if r.returncode != 0 or f"{n} passed" not in r.stdout:
            raise SystemExit(f"pytest failed:\n{r.stdout}\n{r.stderr}")
        return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tests", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    harness = [run(WITH_HARNESS, args.tests) for _ in range(args.repeat)]
    base = [run(BASELINE, args.tests) for _ in range(args.repeat)]
    h, b = statistics.median(harness), statistics.median(base)
    print(f"{args.tests} tests with smtp_harness (one message each): {h:.2f} s "
          f"(median of {args.repeat}: {', '.join(f'{x:.2f}' for x in harness)})")
    print(f"{args.tests} empty tests (pytest start-up baseline):      {b:.2f} s")
    print(f"overhead per test (send, store, read back, reset):     "
          f"{(h - b) / args.tests * 1000:.1f} ms")
    print("target: under 10 s for 100 tests:", "met" if h < 10 else "NOT met")


if __name__ == "__main__":
    main()
