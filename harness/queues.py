"""`harness queues FILE...`: an Exchange queue's depth over time, from a
series of Get-Queue exports (Export-Csv or ConvertTo-Json; one file per
sample, or one file whose rows carry several SampledAt times).

    harness queues q-0900.csv q-0905.csv q-0910.csv
    harness queues lab-run-queues.json --json

This module reads the files (each file's modification time stands in for a
sample time the export does not carry) and renders; the parsing is
harness.analysis.queue_series. A file that cannot be read or a row that
does not parse is reported as `path:line: problem` on stderr and the rest is
read; nothing readable at all is an error (exit 1).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.analysis import queue_series, retry
from harness.errors import HarnessError

__all__ = ["QueuesError", "queues_command", "read_files"]


class QueuesError(HarnessError):
    """No queue sample could be read from the files given."""


def read_files(paths: Sequence[Path]) -> tuple[list[queue_series.QueueSample], list[str]]:
    """Every sample of the files, in time order (samples at the same time from
    several files are added up: one export per server), and the problems."""
    by_time: dict[float, list[queue_series.QueueSample]] = {}
    problems: list[str] = []
    for path in paths:
        try:
            data = path.read_bytes()
            mtime = path.stat().st_mtime
        except OSError as e:
            problems.append(f"{path}: cannot read: {e.strerror or e}")
            continue
        text = data.decode("utf-8-sig", errors="replace")
        if b"\x00" in data[:200]:  # Windows PowerShell 5.1's Out-File writes UTF-16
            text = data.decode("utf-16", errors="replace")
        got = queue_series.read_get_queue(text, path=str(path), file_time=mtime)
        problems += got.problems
        for s in got.samples:
            by_time.setdefault(s.t, []).append(s)
    samples = [queue_series.QueueSample(
        t=t, depth=sum(s.depth for s in group), deferred=sum(s.deferred for s in group),
        oldest_age=max(s.oldest_age for s in group)) for t, group in sorted(by_time.items())]
    return samples, problems


def queues_command(paths: Sequence[Path], *, as_json: bool, out: Console,
                   err: Console) -> int:
    samples, problems = read_files(paths)
    for p in problems:
        err.print(escape(p), highlight=False)
    if not samples:
        raise QueuesError("no Get-Queue sample in " + ", ".join(str(p) for p in paths))
    peaks = queue_series.summary(samples)
    if as_json:
        out.out(json.dumps({
            "samples": [{"t": s.t, "time": _iso(s.t), "depth": s.depth,
                         "oldest_age": s.oldest_age, "deferred": s.deferred}
                        for s in samples],
            "summary": peaks, "problems": problems}, indent=2), highlight=False)
        return 0
    table = Table(title="Exchange queues over time (Get-Queue)", box=None, pad_edge=False)
    table.add_column("time (UTC)")
    table.add_column("depth", justify="right")
    table.add_column("deferred (Retry)", justify="right")
    table.add_column("retrying for", justify="right")
    table.add_column("")
    top = max(1, int(peaks["peak_depth"]))
    for s in samples:
        bar = "█" * round(20 * s.depth / top)
        table.add_row(_iso(s.t), f"{s.depth:,}", f"{s.deferred:,}",
                      retry.format_duration(s.oldest_age) if s.oldest_age else "-", bar)
    out.print(table)
    plural = "" if len(samples) == 1 else "s"
    out.print(f"{len(samples)} sample{plural}; peak depth {peaks['peak_depth']:,}, peak deferred "
              f"{peaks['peak_deferred']:,}, longest retrying "
              f"{retry.format_duration(float(peaks['peak_oldest_age']))}")
    return 0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
