"""The wheel carries the scenario library: `harness serve greylisting` works
from an installed wheel in any directory, not only from a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_library_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = (tmp_path / "dist").glob("smtp_harness-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    library = sorted(p.name for p in (ROOT / "scenarios").glob("*.yaml"))
    assert sorted(Path(n).name for n in names
                  if n.startswith("harness/scenarios/") and n.endswith(".yaml")) == library
    assert "harness/py.typed" in names
    # every module of the source tree is in the wheel (a package left out of
    # pyproject's list works from a checkout and fails once installed)
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "harness").rglob("*.py"))
    assert [m for m in modules if m not in names] == []

    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)  # a wheel is an installable zip: its files are the install
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-c",
                        "import harness, sys; from harness.cli import main;"
                        "assert 'site' in harness.__file__, harness.__file__;"
                        "sys.exit(main(['check', 'mailbox-full', 'accept']))"],
                       capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok:" in r.stdout and str(target) in r.stdout
