"""A store whose disk fills up, on a real small file system (a tmpfs of a
few megabytes, mounted by the test): messages are answered 452 4.3.1 and not
kept, the server says so once and again when it writes again, /readyz is
503 meanwhile, nothing acknowledged is lost, and the sessions' records held
while the disk was full are written once it is not."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving import ServeProcess

from harness.store.db import Reader


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (the README's test command runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill_up(disk: Path) -> Path:
    filler = disk / "filler"
    # unbuffered: a write the full disk refused leaves nothing for close() to
    # write again (and fail on, outside the suppress)
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as f:
        while True:
            f.write(b"\0" * 65536)
    return filler


def test_a_full_disk_defers_messages_and_the_server_recovers(small_disk: Path) -> None:
    store = small_disk / "harness.db"
    serve = ServeProcess(store, cwd=store.parent)
    try:
        assert serve.send("before").startswith("250 2.0.0 Ok: queued as 1")
        filler = fill_up(small_disk)

        assert serve.send("small") == "452 4.3.1 Insufficient system storage"
        serve.read_until(r"cannot write .*452 4\.3\.1 until it can")
        assert serve.send("large", size=3 << 20) == "452 4.3.1 Insufficient system storage"
        status, ready = serve.get("/readyz")
        assert status == 503 and "cannot write" in str(ready["problems"])
        status, info = serve.get("/api/v1/store")  # reads still work
        assert status == 200 and info["writable"] is False and info["refused_messages"] == 2
        assert info["counts"] == {"sessions": 1, "messages": 1}

        filler.unlink()
        status, ready = serve.get("/readyz")  # asked again: one small write
        assert status == 200, ready
        assert serve.send("after").startswith("250 2.0.0 Ok: queued as 4")
        serve.read_until(r"writes again \(2 message\(s\) refused with 452 4\.3\.1")
    finally:
        serve.proc.send_signal(signal.SIGINT)
        out, _ = serve.proc.communicate(timeout=30)
    assert "2 message(s) refused (452) for want of space" in out
    with Reader(store) as r:
        assert [m.subject for m in r.messages()] == ["before", "after"]
        # the refused sessions' records, held while the disk was full, are there
        assert [s.id for s in r.sessions()] == [1, 2, 3, 4]
        attempts = [(a.session_id, a.outcome, a.code) for a in r.attempts()
                    if a.phase == "message"]
        assert attempts == [(1, "accepted", 250), (2, "deferred", 452), (3, "deferred", 452),
                            (4, "accepted", 250)]
        left = r.conn.execute("SELECT (SELECT COUNT(*) FROM messages WHERE partial = 1),"
                              " (SELECT COUNT(*) FROM message_parts)").fetchone()
        assert tuple(left) == (0, 0)  # nothing of the large message left half written
        assert r.analysis_pending() == []


def test_with_workers_a_full_disk_defers_and_the_console_says_which_worker(
        small_disk: Path) -> None:
    """--workers 2: each worker writes the store itself; a worker that cannot
    write answers 452 4.3.1, the console (the primary's) says so, /readyz
    is 503, and both take messages again once there is space."""
    store = small_disk / "harness.db"
    serve = ServeProcess(store, "--workers", "2", cwd=store.parent)
    try:
        assert serve.send("before").startswith("250 2.0.0 Ok: queued as")
        filler = fill_up(small_disk)
        replies = {serve.send(f"full {i}") for i in range(4)}
        assert replies == {"452 4.3.1 Insufficient system storage"}
        serve.read_until(r"worker \d: .*cannot write .*452 4\.3\.1 until it can")
        status, _ = serve.get("/readyz")
        assert status == 503
        filler.unlink()
        status, ready = serve.get("/readyz")
        assert status == 200, ready
        assert all(serve.send(f"after {i}").startswith("250 2.0.0 Ok: queued as")
                   for i in range(4))
    finally:
        serve.proc.send_signal(signal.SIGINT)
        serve.proc.communicate(timeout=30)
    with Reader(store) as r:
        subjects = sorted(m.subject or "" for m in r.messages())
    assert subjects == ["after 0", "after 1", "after 2", "after 3", "before"]
