"""Evidence: what the sending side wrote, read and lined up with the store.

`read_evidence(path, data)` sniffs what a file is and reads it with the
reader `READERS` names for that kind; every reader is a pure function of
the text (one module per family: exchange_protocol, exchange_tracking,
exchange_queue, exchange_online, exchange2003, postfix, exim). A file no
reader recognises, and each line a reader cannot read, becomes a
`Problem` ("path:line: problem"); the rest of the file is still read.
`lineup.line_up(files, captures)` puts the records beside what the harness
recorded.

May know: text and bytes handed in. May not know: files, sockets, storage,
asyncio, HTTP (tests/unit/test_purity.py enforces it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from harness.analysis.evidence import (
    exchange2003,
    exchange_online,
    exchange_protocol,
    exchange_queue,
    exchange_tracking,
    exim,
    postfix,
)
from harness.analysis.evidence.base import EvidenceFile, Problem, ReadOptions, Reply, decode

__all__ = ["READERS", "EvidenceFile", "Problem", "ReadOptions", "ReaderSpec", "Reply",
           "read_evidence", "sniff"]


@dataclass(frozen=True)
class ReaderSpec:
    kind: str
    title: str
    sniff: Callable[[str], bool]
    read: Callable[[str, str, ReadOptions], EvidenceFile]


#: Every kind of file, tried in this order (the more specific first).
READERS: tuple[ReaderSpec, ...] = (
    ReaderSpec("exchange-send-protocol", "Exchange SMTP Send/Receive protocol log",
               exchange_protocol.sniff, exchange_protocol.read_protocol_log),
    ReaderSpec("exchange-tracking", "Exchange message tracking log (MSGTRK*.LOG)",
               exchange_tracking.sniff_log, exchange_tracking.read_tracking_log),
    ReaderSpec("exchange2003-smtp", "Exchange 2003 SMTP virtual server log (W3C)",
               exchange2003.sniff_smtp, exchange2003.read_smtp_log),
    ReaderSpec("exchange2003-tracking", "Exchange 2003 message tracking log",
               exchange2003.sniff_tracking, exchange2003.read_tracking_2003),
    ReaderSpec("exchange-online-extended", "Exchange Online extended message trace (CSV)",
               exchange_online.sniff_extended, exchange_online.read_extended),
    ReaderSpec("exchange-tracking-csv", "Get-MessageTrackingLog | Export-Csv",
               exchange_tracking.sniff_csv, exchange_tracking.read_tracking_csv),
    ReaderSpec("exchange-online-trace-detail", "Get-MessageTraceDetailV2 | Export-Csv",
               exchange_online.sniff_detail, exchange_online.read_trace_detail),
    ReaderSpec("exchange-online-trace", "Get-MessageTraceV2 | Export-Csv",
               exchange_online.sniff_trace, exchange_online.read_trace),
    ReaderSpec("exchange-queue-csv", "Get-Queue / Get-Message | Export-Csv",
               exchange_queue.sniff_csv, exchange_queue.read_queue_csv),
    ReaderSpec("exchange-queue-json", "Get-Queue / Get-Message | ConvertTo-Json",
               exchange_queue.sniff_json, exchange_queue.read_queue_json),
    ReaderSpec("exim", "Exim main log", exim.sniff, exim.read_exim),
    ReaderSpec("postfix", "Postfix mail log (syslog, journal, maillog_file)",
               postfix.sniff, postfix.read_postfix),
)
_BY_KIND = {r.kind: r for r in READERS}


def sniff(text: str) -> ReaderSpec | None:
    """The reader for a file's text, from its first lines."""
    head = "\n".join(text.splitlines()[:60])[:16_000]
    return next((r for r in READERS if r.sniff(head)), None)


def read_evidence(path: str, data: bytes | str, options: ReadOptions | None = None, *,
                  kind: str | None = None) -> EvidenceFile:
    """Read one file of evidence; `kind` skips the sniffing."""
    opts = options or ReadOptions()
    text = decode(data)
    spec = _BY_KIND.get(kind) if kind else sniff(text)
    if spec is None:
        known = ", ".join(r.title for r in READERS)
        what = "it is empty" if not text.strip() else "it is none of the kinds this reads"
        return EvidenceFile(path=path, kind="unknown", title="not evidence", records=(),
                            problems=(Problem(path, 1, f"{what} ({known})"),))
    return spec.read(path, text, opts)
