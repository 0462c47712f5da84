"""The analysis worker: works through the store's analysis queue, reading
each message's bytes from the store (never from the SMTP side's memory), and
hands back one result line per message:

    MESSAGE_ID <tab> 0|1 (an NDR) <tab> the analysis as JSON

It only reads the store (a read-only connection); the server writes the
results with everything else. Run as a process by `harness serve`
(`python -m harness.analysis_worker STORE`: lines out on stdout, "idle" when
the queue is empty, then it waits for a line on stdin that says there is
more; EOF ends it), or in a thread by the Python `Harness`."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from harness.analysis.summary import HEAD, LARGE, Analyzer

#: jobs read from the queue at a time (their bytes are read one by one)
BATCH = 64


class Worker:
    """Analyses queued messages, in id order, from a read-only connection."""

    def __init__(self, store: str | Path) -> None:
        self.conn = sqlite3.connect(f"file:{Path(store)}?mode=ro", uri=True,
                                    check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 5000")
        self.analyzer = Analyzer()
        self.zones: dict[int, dict[str, Any]] = {}
        self.after = 0  # the last message id analysed

    def close(self) -> None:
        self.conn.close()

    def _zone(self, zone_id: int | None) -> dict[str, Any] | None:
        if zone_id is None:
            return None
        zone = self.zones.get(zone_id)
        if zone is None:
            row = self.conn.execute("SELECT json FROM zones WHERE id = ?", (zone_id,)).fetchone()
            zone = self.zones[zone_id] = json.loads(row[0]) if row else {}
        return zone

    def batch(self) -> Iterator[str]:
        """Result lines for the next jobs of the queue (none: it is empty)."""
        jobs = self.conn.execute(
            "SELECT q.message_id, q.client_ip, q.helo, q.hostname, q.zone_id, m.mail_from,"
            " m.size FROM analysis_queue q JOIN messages m ON m.id = q.message_id"
            " WHERE q.message_id > ? ORDER BY q.message_id LIMIT ?",
            (self.after, BATCH)).fetchall()
        for mid, client_ip, helo, hostname, zone_id, mail_from, size in jobs:
            self.after = mid
            yield self.one(mid, client_ip, helo or "", hostname, zone_id, mail_from, size)

    def _raw(self, mid: int, size: int, take: int) -> bytes:
        """The first `take` bytes of a message: from its row, or from its
        parts when it was stored in parts (harness.store.db.CHUNK)."""
        row = self.conn.execute("SELECT substr(raw, 1, ?) FROM messages WHERE id = ?",
                                (take, mid)).fetchone()
        raw = bytes(row[0]) if row and row[0] is not None else b""
        if raw or not size:
            return raw
        out = bytearray()
        for (data,) in self.conn.execute(
                "SELECT data FROM message_parts WHERE message_id = ? ORDER BY seq", (mid,)):
            out += data
            if len(out) >= take:
                break
        return bytes(out[:take])

    def one(self, mid: int, client_ip: str, helo: str, hostname: str, zone_id: int | None,
            mail_from: str, size: int) -> str:
        raw = self._raw(mid, size, size if size <= LARGE else HEAD)
        try:
            analysis = self.analyzer.analyze(
                raw, client_ip=client_ip, helo=helo, mail_from=mail_from, zone_key=zone_id,
                zone=self._zone(zone_id), hostname=hostname, size=size)
        except Exception as e:  # an analysis bug: said, and the queue moves on
            analysis = {"ndr": None, "error": f"analysis failed: {type(e).__name__}: {e}"}
        is_ndr = analysis.get("ndr") is not None
        return f"{mid}\t{int(is_ndr)}\t{json.dumps(analysis, default=str)}\n"


def serve(store: str, inp: TextIO, out: TextIO) -> int:
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
    with contextlib.suppress(OSError):
        os.nice(5)  # the SMTP side comes first when the cores are busy
    return serve(args[0], sys.stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
