"""The capture store: where a location points, SQLite or PostgreSQL.

A store is named by a *location*: a path (an SQLite file, the embedded
default) or a `postgresql://` (or `postgres://`) URL. This module only looks
at the name; db.py opens it, dialect.py knows how each database is spoken
to. Nothing here does I/O."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeAlias
from urllib.parse import urlsplit, urlunsplit

#: a store's name: an SQLite path, or a PostgreSQL URL (str)
Location: TypeAlias = str | Path

_SCHEMES = ("postgresql://", "postgres://")
#: files a store keeps beside it (the lab CA) go here when it has no folder
LOCAL_DIR = Path(".harness")


def is_postgres(location: Location) -> bool:
    """A PostgreSQL URL (postgresql://... or postgres://...), not a path."""
    return isinstance(location, str) and location.lower().startswith(_SCHEMES)


def location(text: str | Path) -> Location:
    """What a user typed (--store, store: in a config): a URL stays a
    string, anything else is a path."""
    if isinstance(text, Path):
        return text
    return text if is_postgres(text) else Path(text)


def display(location: Location) -> str:
    """The location as it may be printed or served: a URL's password
    replaced by ***, in its user part and in a password= parameter."""
    if not is_postgres(location):
        return str(location)
    text = str(location)
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def local_dir(location: Location) -> Path:
    """The folder for files that go with a store (the lab CA's
    certificate): an SQLite file's own folder; for a database server,
    ./.harness."""
    return LOCAL_DIR if is_postgres(location) else Path(location).parent
