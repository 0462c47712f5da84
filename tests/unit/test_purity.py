"""The pure packages stay pure (DESIGN: "scenario/ and analysis/ import
nothing from asyncio, aiosmtpd, sqlite3 or HTTP libraries; a test enforces
it"). Checked twice: at run time, in a fresh interpreter that imports every
module of the packages, and statically, by reading their import statements.

One allowance, explained rather than hidden: the standard library's `email`
package imports `socket` (email/utils.py does `import socket` for
make_msgid()'s socket.getfqdn()), and `socket` imports `selectors`. The
engine parses headers with `email`, so `socket` is loaded, though nothing of
ours uses it. The run-time check accepts a forbidden module only when a fresh
interpreter importing just the standard-library modules our code names loads
it too, and only if it is listed in STDLIB_PULLS with the reason; the static
check allows no exception."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PURE_PACKAGES = ("harness.scenario", "harness.analysis")
FORBIDDEN = ("asyncio", "aiosmtpd", "sqlite3", "socket", "aiohttp", "http",
             # other HTTP and network clients
             "httpx", "requests", "urllib3", "urllib.request", "ssl")
#: The I/O halves of the harness: pure code does not reach into them either.
FORBIDDEN_INTERNAL = ("harness.smtp", "harness.store", "harness.api", "harness.cli",
                      "harness.pytest_plugin", "harness.testing")
#: Forbidden modules the standard library itself loads, and why.
STDLIB_PULLS = {
    "socket": "email.utils imports socket (make_msgid calls socket.getfqdn)",
}


def is_forbidden(name: str, roots: tuple[str, ...] = FORBIDDEN) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def package_files(package: str) -> list[Path]:
    folder = ROOT.joinpath(*package.split("."))
    return sorted(folder.rglob("*.py")) if folder.is_dir() else []


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def pure_modules() -> list[str]:
    return [module_name(p) for pkg in PURE_PACKAGES for p in package_files(pkg)]


def imported_names(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for every import in a file, relative ones resolved;
    also importlib.import_module("...") and __import__("...") with a literal."""
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(
        ".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def loaded_after_importing(modules: list[str]) -> list[str]:
    """sys.modules of a fresh interpreter after importing `modules`."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.splitlines()[-1]))


def stdlib_imports() -> list[str]:
    """The standard-library modules the pure packages name in imports."""
    names = set()
    for pkg in PURE_PACKAGES:
        for path in package_files(pkg):
            for _, name in imported_names(path):
                top = name.partition(".")[0]
                if top in sys.stdlib_module_names and top != "__future__":
                    names.add(name)
    # "from email.message import Message" names email.message.Message: keep the
    # importable prefix only
    return sorted({n if _importable(n) else n.rpartition(".")[0] for n in names})


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------ tests


def test_purity_finds_the_pure_modules() -> None:
    mods = pure_modules()
    assert {"harness.scenario", "harness.scenario.engine", "harness.scenario.loader",
            "harness.scenario.model", "harness.scenario.values"} <= set(mods)


def test_purity_runtime_imports_nothing_forbidden() -> None:
    mods = pure_modules()
    loaded = loaded_after_importing(mods)
    forbidden = sorted(n for n in loaded if is_forbidden(n))
    internal = sorted(n for n in loaded if is_forbidden(n, FORBIDDEN_INTERNAL))
    assert internal == [], f"pure code loads the I/O parts of the harness: {internal}"
    if not forbidden:
        return
    # Whatever forbidden module is loaded must be the standard library's doing:
    # the stdlib modules our code names, imported alone, load it too...
    baseline = {n for n in loaded_after_importing(stdlib_imports()) if is_forbidden(n)}
    unexplained = [n for n in forbidden if n not in baseline]
    assert unexplained == [], (
        f"importing {', '.join(PURE_PACKAGES)} loads {unexplained}, "
        "which the standard library alone does not")
    # ...and it must be a known, documented pull.
    undocumented = [n for n in forbidden if n.partition(".")[0] not in STDLIB_PULLS]
    assert undocumented == [], (
        f"the standard library loads {undocumented} for our imports; find out which "
        "module does and why, and record it in STDLIB_PULLS (or avoid the import)")


@pytest.mark.parametrize("module", sorted(STDLIB_PULLS))
def test_purity_stdlib_allowance_is_still_needed_and_explained(module: str) -> None:
    # the allowance holds only while `email` really loads the module
    assert module in loaded_after_importing(["email.message"]), (
        f"email no longer imports {module}: drop it from STDLIB_PULLS")


@pytest.mark.parametrize(
    "path", [p for pkg in PURE_PACKAGES for p in package_files(pkg)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_purity_static_imports_nothing_forbidden(path: Path) -> None:
    bad = [(line, name) for line, name in imported_names(path)
           if is_forbidden(name) or is_forbidden(name, FORBIDDEN_INTERNAL)]
    assert bad == [], "\n".join(f"{path.relative_to(ROOT)}:{line}: imports {name}"
                                for line, name in bad)


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("import asyncio", ["asyncio"]),
        ("import socket as s", ["socket"]),
        ("from http import client", ["http", "http.client"]),
        ("import http.client", ["http.client"]),
        ("from aiosmtpd.smtp import SMTP", ["aiosmtpd.smtp", "aiosmtpd.smtp.SMTP"]),
        ("def f():\n    import sqlite3\n", ["sqlite3"]),
        ("import importlib\nimportlib.import_module('aiohttp')", ["aiohttp"]),
        ("__import__('asyncio')", ["asyncio"]),
        ("from ..smtp import session", ["harness.smtp", "harness.smtp.session"]),
        ("import email.utils\nimport httpx", ["httpx"]),
        ("from urllib.parse import quote", []),
        ("from urllib.request import urlopen", ["urllib.request", "urllib.request.urlopen"]),
        ("from harness.scenario import model", []),
    ],
)
def test_purity_static_scan_sees_every_import_form(source: str, found: list[str]) -> None:
    # read as if the file lived in harness/scenario (nothing is written there)
    path = ROOT / "harness" / "scenario" / "_purity_probe.py"
    names = [name for _, name in imported_names(path, source)]
    assert [n for n in names if is_forbidden(n) or is_forbidden(n, FORBIDDEN_INTERNAL)] == found


# ------------------------------------------------ aiosmtpd, composed not subclassed


def _aiosmtpd_uses(path: Path) -> list[tuple[int, str]]:
    """Private aiosmtpd names a file touches: imports of underscore names,
    attributes with an underscore reached from an aiosmtpd name, and classes
    deriving from an aiosmtpd class (whose private state they would share)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    names: set[str] = set()
    bad: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("aiosmtpd"):
            for alias in node.names:
                names.add(alias.asname or alias.name)
                if alias.name.startswith("_") or "._" in (node.module or ""):
                    bad.append((node.lineno, f"imports {node.module}.{alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("aiosmtpd"):
                    names.add((alias.asname or alias.name).split(".")[0])
                    if "._" in alias.name:
                        bad.append((node.lineno, f"imports {alias.name}"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in names:
                bad.append((node.lineno, f"touches {base.id}....{node.attr}"))
        elif isinstance(node, ast.ClassDef):
            for b in node.bases:
                root = b
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id in names:
                    bad.append((node.lineno, f"class {node.name} derives from {ast.unparse(b)}"))
    return bad


@pytest.mark.parametrize("path", sorted((ROOT / "harness").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_purity_no_private_aiosmtpd_name(path: Path) -> None:
    bad = _aiosmtpd_uses(path)
    assert bad == [], "\n".join(f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in bad)


def test_purity_private_aiosmtpd_scan_sees_what_it_must() -> None:
    probe = ROOT / "harness" / "smtp" / "_probe_not_written.py"
    source = ("from aiosmtpd.smtp import SMTP, Envelope\n"
              "class X(SMTP):\n    pass\n"
              "e = Envelope()\nprint(e._private)\n")
    tree_file = probe.with_suffix(".txt")
    tree_file.write_text(source)
    try:
        found = [what for _, what in _aiosmtpd_uses(tree_file)]
    finally:
        tree_file.unlink()
    assert found == ["class X derives from SMTP"]  # e._private: e is a value, not a name
    tree_file.write_text("import aiosmtpd.smtp as s\nprint(s.SMTP._handle_client)\n")
    try:
        assert [w for _, w in _aiosmtpd_uses(tree_file)] == ["touches s...._handle_client"]
    finally:
        tree_file.unlink()


def test_purity_aiosmtpd_is_required_as_a_range() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [spec] = [d for d in project["dependencies"] if d.startswith("aiosmtpd")]
    assert "==" not in spec and "<2" in spec, spec
