"""The lab's side of `harness evidence`: the MTA's own log of a run, lined
up with the harness's records of it, for the verdict (and the HTML report),
and, with ``harness lab --keep DIR``, kept on disk for ``harness evidence``.

A kept run is a folder: the MTA's log (``maillog`` for Postfix, ``mainlog``
for Exim), the harness's store (``harness.db``), the collector's store
(``collector.db``, Postfix: where its bounces went) and ``lab.json``: the
scenario clock (``t0``, ``speed``: the lab's harness runs that many times
faster than the wall clock the MTA logs in) and the MTA's shortest retry
interval, which ``harness evidence`` reads back."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from harness.analysis.evidence import ReadOptions, read_evidence
from harness.analysis.evidence.lineup import LineupOptions, line_up
from harness.evidence import LAB_INFO, LabClock, capture_from_records, lineup_json
from harness.testing import Harness

#: The MTA log's file name in a kept run.
LOG_NAME = {"postfix": "maillog", "exim": "mainlog"}
_KEPT = ("harness.db", "collector.db", "maillog", "mainlog", LAB_INFO)


def keep_dir(folder: Path) -> Path:
    """Make the folder for a kept run, without an earlier run's files (a
    store that already holds a run would mix the two)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in _KEPT:
        for p in folder.glob(f"{name}*"):
            p.unlink()
    return folder


def retry_interval(mta: str, settings: dict[str, str]) -> float | None:
    """The lab MTA's shortest retry interval, from its settings."""
    from harness.analysis.retry import parse_duration

    try:
        if mta == "postfix":
            return parse_duration(settings.get("minimal_backoff_time", "300s"))
        rule = settings.get("retry", "F,1m,1s")  # EximLab's default rule
        m = re.match(r"F,[^,;]+,([^;]+)", rule)
        return parse_duration(m.group(1)) if m else None
    except ValueError:
        return None


def lab_evidence(maillog: str, mta: str, target: Harness, collector: Harness | None,
                 t0: float, speed: float, settings: dict[str, str],
                 keep: Path | None = None, scenario: str = "") -> dict[str, Any]:
    """The run's MTA log lined up with the harness(es) (JSON-ready, schema
    harness.evidence/1); with `keep`, the log and lab.json are written."""
    name = LOG_NAME.get(mta, "maillog")
    interval = retry_interval(mta, settings)
    clock = LabClock(t0, speed)
    # the MTA's log: wall clock, this machine's zone
    opts = ReadOptions(tz=_local_tz(), now=t0)
    file = read_evidence(name, maillog, opts)
    captures = [capture_from_records("", target.sessions(),
                                     target.attempts(), target.messages(raw=True), clock)]
    if collector is not None:
        captures.append(capture_from_records("collector", collector.sessions(),
                                             collector.attempts(),
                                             collector.messages(raw=True), clock))
    lineup = line_up([file], captures, LineupOptions(retry_interval=interval))
    if keep is not None:
        (keep / name).write_text(maillog, encoding="utf-8")
        (keep / LAB_INFO).write_text(json.dumps(
            {"scenario": scenario, "mta": mta, "t0": t0, "speed": speed,
             "retry_interval": interval, "mta_log": name}, indent=2) + "\n", encoding="utf-8")
    return lineup_json(lineup)


def _local_tz() -> Any:
    from harness.evidence import parse_tz

    return parse_tz("local")
