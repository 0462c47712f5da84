"""The analysis worker: works through the store's analysis queue, reading
each message's bytes from the store (never from the SMTP side's memory), and
hands back one result line per message:

    MESSAGE_ID <tab> 0|1 (an NDR) <tab> the analysis as JSON

It writes nothing but its claims: a job is taken by one worker (its owner
token in the queue row's claimed_by, one short UPDATE for a batch), so
several workers, of several processes or hosts on one store, never analyse
a message twice, and none relies on ids growing in the order they were
committed. A worker that dies leaves its claims to whoever finds it gone
(its owner lock free). The server writes the results with everything else.

Run as a process by `harness serve` (`python -m harness.analysis_worker
STORE`, or `-` with the store's location in $HARNESS_STORE, which keeps a
database URL's password off the process list: lines out on stdout, "idle"
when nothing is left to claim, then it waits for a line on stdin that says
there is more; EOF ends it), or in a thread by the Python `Harness`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

from harness.analysis.summary import HEAD, LARGE, Analyzer
from harness.errors import StoreError
from harness.store import Location, location
from harness.store.dialect import Db, Owner, dialect

#: jobs claimed from the queue at a time (their bytes read with them up to
#: INLINE bytes a message, one by one above)
BATCH = 64
INLINE = 64 * 1024
#: seconds between looks for the claims of workers that are gone
RECLAIM_EVERY = 1.0
#: where `-` finds the store's location
STORE_ENV = "HARNESS_STORE"


class Worker:
    """Claims queued messages and analyses them, oldest first."""

    def __init__(self, store: Location) -> None:
        self.dialect = dialect(location(store))
        self.db: Db | None = None
        self.owner: Owner | None = None
        self.analyzer = Analyzer()
        self.zones: dict[int, dict[str, Any]] = {}
        #: JSON of shared authentication results, by the object (kept with it)
        self._auth_json: dict[int, tuple[dict[str, Any], str, str]] = {}
        self._reclaim_at = 0.0
        # a store that cannot take its owner token now (read-only, out of
        # reach): it is asked again at the first batch
        with contextlib.suppress(self.dialect.Error, StoreError):
            self._setup()
        self._claim = (
            "UPDATE analysis_queue SET claimed_by = ? WHERE claimed_by IS NULL AND message_id IN"
            " (SELECT message_id FROM analysis_queue WHERE claimed_by IS NULL"
            f" ORDER BY message_id LIMIT ?{self.dialect.claim_lock}) RETURNING message_id")

    def close(self) -> None:
        if self.db is not None:
            self.db.close()  # PostgreSQL: its owner lock goes with its connection
        if self.owner is not None:
            self.dialect.release_owner(self.owner)

    def _setup(self) -> tuple[Db, Owner]:
        """The connection and the owner token (made again after a lost
        connection: the same token, its lock taken again)."""
        if self.db is None:
            db = self.dialect.connect("worker")
            try:
                if self.owner is not None:
                    self.dialect.retake_owner(db, self.owner)
            except BaseException:
                db.close()
                raise
            self.db = db
        if self.owner is None:
            self.owner = self.dialect.take_owner(self.db)
        return self.db, self.owner

    def _zone(self, zone_id: int | None) -> dict[str, Any] | None:
        if zone_id is None:
            return None
        zone = self.zones.get(zone_id)
        if zone is None:
            row = self._setup()[0].execute("SELECT json FROM zones WHERE id = ?",
                                           (zone_id,)).fetchone()
            zone = self.zones[zone_id] = json.loads(row[0]) if row else {}
        return zone

    def claim(self) -> list[int]:
        """Up to BATCH jobs nobody has, taken for this worker; when there
        are none, the claims of workers that are gone are let go first."""
        db, owner = self._setup()
        token = owner.token
        mids = self._take(token)
        if mids or time.monotonic() < self._reclaim_at:
            return mids
        self._reclaim_at = time.monotonic() + RECLAIM_EVERY
        tokens = {r[0] for r in db.execute(
            "SELECT DISTINCT claimed_by FROM analysis_queue WHERE claimed_by IS NOT NULL"
            " AND claimed_by <> ?", (token,))}
        dead = sorted(tokens - self.dialect.live_owners(db, tokens))
        if not dead:
            return []
        db.execute("UPDATE analysis_queue SET claimed_by = NULL WHERE claimed_by IN"
                        f" ({','.join('?' * len(dead))})", dead)
        return self._take(token)

    def _take(self, token: int) -> list[int]:
        db, _ = self._setup()
        db.begin()  # SQLite: the write lock first (a read turned write can fail busy)
        try:
            mids = [r[0] for r in db.execute(self._claim, (token, BATCH)).fetchall()]
            db.commit()
        except BaseException:
            db.rollback()
            raise
        return mids

    def batch(self) -> Iterator[str]:
        """Result lines for the next jobs claimed (none: nothing to claim,
        or the store cannot take a claim now: a read-only or full store, a
        lost connection, made again at the next batch)."""
        try:
            db, _ = self._setup()
            mids = sorted(self.claim())
            if not mids:
                return
            # (a small message's bytes come with its job: one query a batch)
            jobs = db.execute(
                "SELECT q.message_id, q.client_ip, q.helo, q.hostname, q.zone_id, m.mail_from,"
                " m.size, CASE WHEN m.size <= ? THEN m.raw END"
                " FROM analysis_queue q JOIN messages m ON m.id = q.message_id"
                f" WHERE q.message_id IN ({','.join('?' * len(mids))}) ORDER BY q.message_id",
                (INLINE, *mids)).fetchall()
            lines = [self.one(mid, client_ip, helo or "", hostname, zone_id, mail_from, size,
                              bytes(raw) if raw else None)
                     for mid, client_ip, helo, hostname, zone_id, mail_from, size, raw in jobs]
        except (self.dialect.Error, StoreError) as e:
            if self.db is not None and self.dialect.lost(e):
                self.db.close()
                self.db = None
            return
        yield from lines

    def _raw(self, mid: int, size: int, take: int) -> bytes:
        """The first `take` bytes of a message: from its row, or from its
        parts when it was stored in parts (harness.store.db.CHUNK)."""
        db, _ = self._setup()
        row = db.execute("SELECT substr(raw, 1, ?) FROM messages WHERE id = ?",
                         (take, mid)).fetchone()
        raw = bytes(row[0]) if row and row[0] is not None else b""
        if raw or not size:
            return raw
        out = bytearray()
        for (data,) in db.execute(
                "SELECT data FROM message_parts WHERE message_id = ? ORDER BY seq", (mid,)):
            out += data
            if len(out) >= take:
                break
        return bytes(out[:take])

    def one(self, mid: int, client_ip: str, helo: str, hostname: str, zone_id: int | None,
            mail_from: str, size: int, raw: bytes | None = None) -> str:
        if raw is None or len(raw) != size:
            raw = self._raw(mid, size, size if size <= LARGE else HEAD)
        try:
            analysis = self.analyzer.analyze(
                raw, client_ip=client_ip, helo=helo, mail_from=mail_from, zone_key=zone_id,
                zone=self._zone(zone_id), hostname=hostname, size=size)
        except Exception as e:  # an analysis bug: said, and the queue moves on
            analysis = {"ndr": None, "error": f"analysis failed: {type(e).__name__}: {e}"}
        is_ndr = analysis.get("ndr") is not None
        return f"{mid}\t{int(is_ndr)}\t{self._json(analysis)}\n"

    def _json(self, analysis: dict[str, Any]) -> str:
        """The analysis as JSON. Plain mail's is mostly its authentication
        results, shared by the messages that have the same ones
        (summary.Analyzer): their JSON is made once."""
        auth = analysis.get("auth")
        if analysis.get("ndr") is not None or not isinstance(auth, dict) or set(analysis) != {
                "ndr", "auth", "authentication_results"}:
            return json.dumps(analysis, default=str)
        known = self._auth_json.get(id(auth))
        if known is None or known[0] is not auth:
            if len(self._auth_json) >= 4096:
                self._auth_json.clear()
            known = self._auth_json[id(auth)] = (
                auth, json.dumps(auth, default=str),
                json.dumps(analysis["authentication_results"], default=str))
        return f'{{"ndr": null, "auth": {known[1]}, "authentication_results": {known[2]}}}'


def serve(store: Location, inp: TextIO, out: TextIO) -> int:
    """The process's loop: analyse until the queue is empty, say "idle",
    wait for word of more, again; EOF on `inp` ends it."""
    worker = Worker(store)
    try:
        while True:
            done = 0
            for line in worker.batch():
                out.write(line)
                done += 1
            if done:
                out.flush()
                continue
            out.write("idle\n")
            out.flush()
            if not inp.readline():
                return 0
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m harness.analysis_worker STORE", file=sys.stderr)
        return 2
    store = os.environ.get(STORE_ENV, "") if args[0] == "-" else args[0]
    if not store:
        print(f"analysis worker: - names no store (${STORE_ENV} is empty)", file=sys.stderr)
        return 2
    # Ctrl-C or a TERM to the process group: serve stops its worker when it
    # has drained what it can; a worker whose serve is gone sees its input end
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(5)  # the SMTP side comes first when the cores are busy
    return serve(location(store), sys.stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
