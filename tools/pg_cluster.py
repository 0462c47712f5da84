"""A private PostgreSQL cluster for the tests and benchmarks.

    with PgCluster() as pg:
        url = pg.create_database("t1")   # postgresql://harness@/t1?host=DIR&port=PORT

Debian's server binaries (package postgresql: /usr/lib/postgresql/N/bin,
not on PATH) are run from a temporary folder: initdb there, the server
listening on a unix socket in that folder and on 127.0.0.1 at a free port,
never anywhere else; stopped and the folder removed at the end. The
machine's own cluster (Debian starts one when the package is installed) is
never touched: every URL names this folder's socket, or this port.

initdb refuses to run as root: as root, the cluster is the `postgres`
system user's (the package makes it), run through runuser. fsync stays on
(the tests check durability); initdb --no-sync only skips initdb's own
flush of the files it made, which a test cluster started from scratch
every time has no use for."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

ROOT = Path("/usr/lib/postgresql")
USER = "harness"  # the cluster's superuser (trust authentication, local only)
SYSTEM_USER = "postgres"


class PgUnavailable(RuntimeError):
    """No PostgreSQL server binaries here (or no user to run them as)."""


def bindir() -> Path:
    """The newest installed server's bin folder."""
    found = sorted((p for p in ROOT.glob("*/bin") if (p / "initdb").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not found:
        raise PgUnavailable(f"no PostgreSQL server under {ROOT} (apt-get install postgresql)")
    return found[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PgCluster:
    def __init__(self) -> None:
        self.bin = bindir()
        self.dir: Path | None = None
        self.port = 0
        self._as: list[str] = []

    @property
    def data(self) -> Path:
        assert self.dir is not None
        return self.dir / "data"

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*self._as, *argv], capture_output=True, text=True,
                              timeout=timeout, check=False, cwd="/")
        if done.returncode != 0:
            raise PgUnavailable(f"{Path(argv[0]).name} failed: {done.stderr.strip()}"
                                f"{self._log_tail()}")
        return done

    def _log_tail(self) -> str:
        log = self.dir / "server.log" if self.dir else None
        if log is None or not log.exists():
            return ""
        return "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-10:])

    def start(self) -> PgCluster:
        self.dir = Path(tempfile.mkdtemp(prefix="harness-pg-"))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PgUnavailable(f"no {SYSTEM_USER} user to run the server as "
                                    "(apt-get install postgresql makes it)") from None
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", SYSTEM_USER, "--"]
        os.chmod(self.dir, 0o700)
        try:
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER,
                      "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
            self.port = _free_port()
            options = " ".join([
                "-c listen_addresses=127.0.0.1", f"-p {self.port}",
                f"-c unix_socket_directories={self.dir}",
                "-c fsync=on", "-c synchronous_commit=on",  # as a real server: durable commits
                "-c shared_buffers=32MB", "-c max_connections=200",
                "-c log_min_messages=warning"])
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                      str(self.dir / "server.log"), "-w", "-t", "60", "-o", options, "start")
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, database: str = "postgres", *, tcp: bool = False) -> str:
        if tcp:
            return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"
        return f"postgresql://{USER}@/{database}?host={self.dir}&port={self.port}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the cluster's superuser (psql, no psycopg needed)."""
        done = subprocess.run(
            [str(self.bin / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h",
             str(self.dir), "-p", str(self.port), "-U", USER, "-d", database, "-c", sql],
            capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"psql: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str) -> str:
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.dir is None:
            return
        if (self.data / "postmaster.pid").exists():
            subprocess.run([*self._as, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                            "immediate", "-w", "-t", "60", "stop"], capture_output=True,
                           timeout=90, check=False, cwd="/")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
