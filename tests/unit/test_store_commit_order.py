"""How the store's writer orders one commit's statements (harness.store.db
._grouped): rows gathered per statement, parents first, a session's updates
merged into one after the rows, the analysis queue's deletions after them,
and a deletion of clear() or retention a fence nothing crosses."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.store.db import _DEQUEUE, _QUEUE_JOB, INSERT_ROWS, _grouped, _insert_many
from harness.store.dialect import dialect

SESSION = "INSERT INTO sessions (id) VALUES (?)"
LINES = "INSERT INTO lines (session_id, n, packed) VALUES (?, ?, ?)"


def test_rows_per_statement_parents_first_then_updates_merged_then_dequeues() -> None:
    ops = [(LINES, [(1, 1, "a")], True),
           (SESSION, (1,), False),
           ("UPDATE sessions SET helo = ? WHERE id = ?", ("h", 1), False),
           (_DEQUEUE, [(5,), (6,)], True),
           (LINES, [(1, 2, "b")], True),
           ("UPDATE sessions SET ended_at = ?, end_reason = ?, helo = ? WHERE id = ?",
            (2.0, "quit", "h2", 1), False),
           ("UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ?", (3.0, "quit", 2),
            False),
           (_DEQUEUE, (7,), False)]
    assert list(_grouped(ops)) == [
        (SESSION, [(1,)]),
        (LINES, [(1, 1, "a"), (1, 2, "b")]),
        # the later value of a field wins; one statement per session
        ("UPDATE sessions SET helo = ?, ended_at = ?, end_reason = ? WHERE id = ?",
         [("h2", 2.0, "quit", 1)]),
        ("UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ?", [(3.0, "quit", 2)]),
        (_DEQUEUE, [(5,), (6,), (7,)]),
    ]


def test_a_deletion_is_a_fence() -> None:
    ops = [(SESSION, (1,), False),
           ("UPDATE sessions SET helo = ? WHERE id = ?", ("h", 1), False),
           ("DELETE FROM sessions", (), False),
           (SESSION, (2,), False),
           ("UPDATE sessions SET helo = ? WHERE id = ?", ("i", 2), False)]
    assert list(_grouped(ops)) == [
        (SESSION, [(1,)]),
        ("UPDATE sessions SET helo = ? WHERE id = ?", [("h", 1)]),
        ("DELETE FROM sessions", [()]),
        (SESSION, [(2,)]),
        ("UPDATE sessions SET helo = ? WHERE id = ?", [("i", 2)]),
    ]


def test_a_job_queued_again_after_its_deletion_stays() -> None:
    ops = [(_DEQUEUE, (2,), False), (_QUEUE_JOB, (2, "127.0.0.1", "c", "mx", None), False)]
    assert list(_grouped(ops)) == [(_DEQUEUE, [(2,)]),
                                   (_QUEUE_JOB, [(2, "127.0.0.1", "c", "mx", None)])]


def test_sqlite_rows_go_in_as_few_statements_as_the_limit_allows(tmp_path: Path) -> None:
    # every statement sqlite3 steps is a wait for the interpreter lock the
    # event loop holds: 100 rows are two statements (64 and 36), not 64+32+4
    d = dialect(tmp_path / "s.db")
    db = d.connect("writer")
    db.execute("CREATE TABLE t (a INTEGER, b TEXT)")
    sent: list[str] = []
    real = db.execute

    def execute(sql: str, params: Sequence[Any] = ()) -> Any:
        sent.append(sql)
        return real(sql, params)

    db.execute = execute  # type: ignore[method-assign]
    rows = [(i, f"r{i}") for i in range(100)]
    _insert_many(db, "INSERT INTO t (a, b) VALUES (?, ?)", rows)
    assert [s.count("(?, ?)") for s in sent] == [INSERT_ROWS, 100 - INSERT_ROWS]
    assert real("SELECT a, b FROM t ORDER BY rowid").fetchall() == rows
    db.close()
