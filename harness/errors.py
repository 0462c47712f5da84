"""The error tree. Every error a user can cause is a HarnessError; the CLI
prints it as one line and exits non-zero."""

from __future__ import annotations

from dataclasses import dataclass


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One problem in a scenario file, with its position (1-based)."""

    path: str
    line: int
    column: int
    message: str
    hint: str | None = None

    def __str__(self) -> str:
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.path}:{self.line}:{self.column}: {self.message}{hint}"


class ScenarioError(HarnessError, ValueError):
    """A scenario file (or rule built in code) is invalid; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    @property
    def path(self) -> str:
        return self.problems[0].path if self.problems else ""


class ScenarioNotFoundError(HarnessError, LookupError):
    """A scenario name is neither a file nor in the library."""


class StoreError(HarnessError):
    """The capture store cannot be opened or is in use."""
