"""The scenario library shipped with the package, and name-or-path lookup.

Reads files (the loader does the parsing); no sockets, no event loop."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from harness.errors import ScenarioNotFoundError
from harness.scenario.loader import load_file
from harness.scenario.model import Scenario

DEFAULT = "accept"


def library_dir() -> Path:
    """Where the library's YAML files are (inside the installed package)."""
    return Path(str(resources.files("harness.scenarios")))


def library_names() -> list[str]:
    return sorted(p.stem for p in library_dir().glob("*.yaml"))


def resolve(name_or_path: str) -> Path:
    """A path to an existing file, or the library scenario of that name."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path or p.exists():
        if not p.is_file():
            raise ScenarioNotFoundError(f"no scenario file {name_or_path}")
        return p
    candidate = library_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    import difflib

    close = difflib.get_close_matches(name_or_path, library_names(), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see `harness scenarios`"
    raise ScenarioNotFoundError(f"no scenario named {name_or_path!r}{hint}")


def load(name_or_path: str | None = None) -> Scenario:
    return load_file(resolve(name_or_path or DEFAULT))


def load_library() -> list[Scenario]:
    return [load_file(library_dir() / f"{n}.yaml") for n in library_names()]
