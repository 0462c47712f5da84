"""The evidence examples in the docs: every `harness evidence` and `harness
lab --keep` command line parses, and what the PowerShell in
docs/exchange-lab.md exports (its Select-Object columns) is read by the
readers, times, recipients and all."""

from __future__ import annotations

import csv
import io
import re
import shlex
from pathlib import Path

import pytest

from harness.analysis.evidence import ReadOptions, read_evidence
from harness.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAB = (ROOT / "docs" / "exchange-lab.md").read_text()


def _commands() -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        for block in re.findall(r"^```sh\n(.*?)^```", doc.read_text(), re.S | re.M):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith(("harness evidence", "harness lab")):
                    out.append((doc.name, line))
    return out


@pytest.mark.parametrize(("doc", "line"), _commands(), ids=[c for _, c in _commands()])
def test_docs_evidence_command_parses(doc: str, line: str) -> None:
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert args.command in ("evidence", "lab")


def test_docs_evidence_examples_exist() -> None:
    assert sum(1 for _, c in _commands() if c.startswith("harness evidence")) >= 6
    assert any("--keep" in c for _, c in _commands())


def _powershell() -> str:
    blocks = re.findall(r"^```powershell\n(.*?)^```", LAB, re.S | re.M)
    return next(b for b in blocks if "Get-MessageTrackingLog -Server EX01 -Start $start" in b)


def _columns(block: str, cmdlet: str) -> list[str]:
    """The column names a Select-Object after `cmdlet` produces."""
    part = block[block.index(cmdlet):]
    part = part[part.index("Select-Object") + len("Select-Object"):part.index("Export-Csv")]
    names = []
    for item in re.findall(r"@\{n='([^']+)'[^}]*\}[^,|]*|([A-Za-z]+)", part):
        names.append(item[0] or item[1])
    return [n for n in names if n]


def _csv(header: list[str], row: dict[str, str]) -> str:
    out = io.StringIO()
    w = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
    w.writerow(header)
    w.writerow([row.get(h, "") for h in header])
    return out.getvalue()


def test_docs_tracking_export_columns_are_read() -> None:
    header = _columns(_powershell(), "Get-MessageTrackingLog")
    assert header[:3] == ["Timestamp", "EventId", "Source"]
    text = _csv(header, {
        "Timestamp": "2026-11-30T09:00:01.1210000Z", "EventId": "DEFER", "Source": "SMTP",
        "MessageId": "<a@b>", "Recipients": "user@lab.test;full@lab.test",
        "RecipientStatus": "[{LRT=};{LED=451 4.7.1 Greylisted};{FQDN=};{IP=}];"
                           "550 5.1.1 unknown; not found",
        "Reference": "<x@y>;<z@w>"})
    f = read_evidence("tracking.csv", text, ReadOptions())
    assert f.kind == "exchange-tracking-csv" and f.problems == ()
    [ev] = f.records
    assert ev.recipients == ("user@lab.test", "full@lab.test")
    assert ev.reply_for("user@lab.test").code == 451
    assert ev.reply_for("full@lab.test").text == "550 5.1.1 unknown; not found"
    assert ev.reference == ("<x@y>", "<z@w>")
    assert ev.t == 1796029201.121


def test_docs_queue_export_columns_are_read() -> None:
    header = _columns(_powershell(), "Get-Queue -Server EX01 |\n  Select-Object")
    assert "LastError" in header and "LastRetryTime" in header
    text = _csv(header, {"Identity": "EX01\\7", "DeliveryType": "SmartHostConnectorDelivery",
                         "NextHopDomain": "[192.0.2.10]", "Status": "Retry",
                         "MessageCount": "1", "LastError": "421 4.3.2 Try later",
                         "LastRetryTime": "2026-11-30T09:05:00.0000000Z"})
    f = read_evidence("queues.csv", text, ReadOptions())
    assert f.kind == "exchange-queue-csv" and f.problems == ()
    [q] = f.records
    assert q.last_reply.code == 421 and q.last_retry == 1796029500.0 and q.next_retry is None
