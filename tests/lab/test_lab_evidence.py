"""`harness evidence` on the logs our own lab runs produce: a private Postfix
and a private Exim sent through the harness, their logs lined up with what
the harness recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.analysis.evidence import ReadOptions
from harness.evidence import lineup_for, read_file
from harness.lab.exim import EximLab
from harness.lab.postfix import PostfixLab
from harness.lab.report import html_report
from harness.lab.runner import run_lab
from harness.scenario.library import load

pytestmark = pytest.mark.slow


def _postfix() -> None:
    reason = PostfixLab.unavailable()
    if reason:
        pytest.skip(reason)


def _exim() -> None:
    if os.geteuid() != 0:
        pytest.skip("a private Exim instance needs root")
    reason = EximLab.unavailable()
    if reason:
        pytest.fail(reason, pytrace=False)


def _attempt_steps(evidence: dict[str, Any]) -> list[dict[str, Any]]:
    [message] = [m for m in evidence["messages"] if any(st["kind"] == "attempt"
                                                         for st in m["steps"])]
    return [st for st in message["steps"] if st["kind"] == "attempt"]


def test_lab_evidence_postfix_greylisting_deferred_beside_451_sent_beside_250(
        tmp_path: Path) -> None:
    _postfix()
    verdict = run_lab(load("greylisting"), mta="postfix", keep=tmp_path / "greylisting")
    assert verdict.passed, verdict.maillog_tail
    ev = verdict.evidence
    assert ev["disagreements"] == 0, json.dumps(ev["messages"], indent=1)
    steps = _attempt_steps(ev)
    deferred = [st for st in steps if "status=deferred" in st["sender"][0]["text"]]
    sent = [st for st in steps if "status=sent" in st["sender"][0]["text"]]
    assert deferred and len(sent) == 1
    assert all(st["harness"]["reply"].startswith("451 4.7.1") for st in deferred)
    assert sent[0]["harness"]["reply"].startswith("250")
    assert steps[-1] is sent[0]  # the final step
    [skew] = ev["skews"]
    assert skew["seconds"] is not None and skew["resolution"] == 1.0
    assert skew["low"] <= 0.05 and skew["high"] >= -0.05  # one machine: the range holds ~0
    # the kept run
    kept = tmp_path / "greylisting"
    assert {p.name for p in kept.iterdir()} >= {"maillog", "harness.db", "collector.db",
                                                 "lab.json"}
    info = json.loads((kept / "lab.json").read_text())
    assert info["speed"] == 60.0 and info["mta"] == "postfix" and info["retry_interval"] == 1.0
    page = html_report([verdict])
    assert "The sender's log beside the harness" in page and "status=sent" in page


def test_lab_evidence_command_on_a_kept_postfix_run(tmp_path: Path) -> None:
    """As a user would: harness lab --keep, then harness evidence."""
    _postfix()
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "harness.cli", "lab", "greylisting",
                        "--mta", "postfix", "--keep", str(tmp_path), "--quiet"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "greylisting"
    assert f"harness evidence {run}/maillog --store {run}/harness.db" in r.stderr
    r = subprocess.run([sys.executable, "-m", "harness.cli", "evidence", str(run / "maillog"),
                        "--store", str(run / "harness.db")], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "clock skew" in out and "its clock ran x60" in out
    assert "no disagreement" in out
    rows = [ln for ln in out.splitlines() if "status=deferred" in ln or "status=sent" in ln]
    assert any("status=deferred" in ln and "-> 451 4.7.1" in ln for ln in rows), out
    assert any("status=sent" in ln for ln in rows), out


def test_lab_evidence_postfix_bounce_needs_the_collector_store(tmp_path: Path) -> None:
    _postfix()
    verdict = run_lab(load("mailbox-full"), mta="postfix", keep=tmp_path / "run")
    assert verdict.passed
    assert verdict.evidence["disagreements"] == 0
    run = tmp_path / "run"
    log = read_file(run / "maillog", ReadOptions())
    both, _ = lineup_for([log], [run / "harness.db", run / "collector.db"])
    assert both.disagreements == []
    dsn = [st for m in both.timelines for st in m.steps if st.kind == "dsn"]
    assert dsn and dsn[0].harness is not None and dsn[0].harness.store == "collector"
    # without the collector's store, the NDR is nowhere to be found
    only, _ = lineup_for([log], [run / "harness.db"])
    assert [d.kind for d in only.disagreements] == ["dsn-not-captured"]


def test_lab_evidence_postfix_edited_line_is_flagged(tmp_path: Path) -> None:
    _postfix()
    run_lab(load("greylisting"), mta="postfix", keep=tmp_path / "run")
    run = tmp_path / "run"
    lines = (run / "maillog").read_text().splitlines()
    n = next(i for i, ln in enumerate(lines) if "status=deferred" in ln)
    lines[n] = lines[n].replace("said: 451 4.7.1", "said: 450 4.2.0")
    edited = run / "maillog-edited"
    edited.write_text("\n".join(lines) + "\n")
    lineup, _ = lineup_for([read_file(edited, ReadOptions())], [run / "harness.db"])
    assert [(d.kind, d.where) for d in lineup.disagreements] == [
        ("reply-never-sent", f"{edited}:{n + 1}")]


def test_lab_evidence_exim_greylisting_and_mailbox_full(tmp_path: Path) -> None:
    _exim()
    grey = run_lab(load("greylisting"), mta="exim", keep=tmp_path / "grey")
    assert grey.passed
    assert grey.evidence["disagreements"] == 0, json.dumps(grey.evidence["messages"], indent=1)
    steps = _attempt_steps(grey.evidence)
    assert steps[0]["sender"][0]["text"].startswith("== user@lab.test")
    assert steps[0]["harness"]["reply"].startswith("451")
    assert steps[-1]["sender"][0]["text"].startswith("=> user@lab.test")
    assert steps[-1]["harness"]["reply"].startswith("250")
    [skew] = grey.evidence["skews"]
    assert skew["resolution"] == 0.001 and abs(skew["seconds"]) < 0.5
    full = run_lab(load("mailbox-full"), mta="exim", keep=tmp_path / "full")
    assert full.passed
    assert full.evidence["disagreements"] == 0, json.dumps(full.evidence["messages"], indent=1)
    dsn = [st for m in full.evidence["messages"] for st in m["steps"] if st["kind"] == "dsn"]
    assert dsn and dsn[0]["harness"] is not None  # Exim's bounce reached the harness
    assert (tmp_path / "full" / "mainlog").exists()
