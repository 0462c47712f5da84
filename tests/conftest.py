"""Fixtures every test folder may use: a private PostgreSQL cluster (once
per test session and xdist worker; tools/pg_cluster.py), a fresh database
in it per test, and `store_at`: a store location for each backend, to run
one test over SQLite and PostgreSQL alike."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from pg_cluster import PgCluster, PgUnavailable

from harness.store import Location


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A private cluster: initdb in a temp dir, a unix socket there and a
    free port on 127.0.0.1; stopped and removed at the end."""
    try:
        cluster = PgCluster().start()
    except PgUnavailable as e:
        pytest.skip(f"PostgreSQL: {e} (the README's test command installs it)")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A new, empty database of the private cluster (a postgresql:// URL)."""
    return pg_cluster.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """A store location: an SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "s.db"
    url: str = request.getfixturevalue("pg_url")
    return url
