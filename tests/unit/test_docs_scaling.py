"""docs/scaling.md's PostgreSQL commands are commands the CLI takes: each
`harness ...` line of its shell blocks parses, its --store read as a
database URL (what they do is tested against a real cluster in
tests/integration/test_store_postgres.py)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from harness.cli import build_parser
from harness.store import is_postgres

DOC = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"


def _commands(heading: str = "## The PostgreSQL store") -> list[str]:
    text = DOC.read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    out = []
    for block in re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith(".venv/bin/harness "):
                out.append(line.removeprefix(".venv/bin/harness "))
    return out


def test_the_section_has_commands() -> None:
    assert len(_commands()) >= 6


@pytest.mark.parametrize("command", _commands())
def test_docs_scaling_command_parses(command: str) -> None:
    args = build_parser().parse_args(shlex.split(command))
    stores = args.store if isinstance(args.store, list) else [args.store]
    assert stores and all(is_postgres(s) for s in stores)


@pytest.mark.parametrize("command", _commands("## Several processes"))
def test_docs_scaling_workers_command_parses(command: str) -> None:
    args = build_parser().parse_args(shlex.split(command))
    assert args.command in ("serve", "attempts")
    if args.command == "serve":
        assert args.workers == "2"
