"""SMTP Harness: a scriptable remote mail server for reproducing delivery failures."""

from harness.errors import HarnessError, ScenarioError

__version__ = "0.1.0"
__all__ = ["HarnessError", "ScenarioError", "__version__"]
