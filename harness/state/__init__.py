"""Scenario state shared by several processes or hosts: the engine's book
(attempt counters, first-seen times, connection counts, rule uses, rate
buckets, the scenario state) kept in a database, each stateful decision made
in one transaction that serializes it with every other process's, so that N
workers or hosts decide exactly as one engine would.

One process alone keeps its book in memory (harness.scenario.engine.MemoryBook);
this package is used when a listener is served by several workers (`harness
serve --workers N`: a SQLite file beside the store) or by several hosts (the
PostgreSQL store: tables in that database)."""

from harness.state.shared import SharedState, open_shared

__all__ = ["SharedState", "open_shared"]
