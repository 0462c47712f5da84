"""``harness evidence FILE... [--store PATH] [--json]``: the sending side's
logs lined up with what the harness recorded.

This module does the I/O around the pure readers and lining up of
`harness.analysis.evidence`: it reads the files (bytes; the readers decode
them), reads the stores into `Capture` records, and renders the result as
rich tables or JSON. The API's POST /api/v1/evidence and the lab's report
call `lineup_for` and `lineup_json` too.

A store written by ``harness lab --keep DIR`` has a ``lab.json`` beside it:
the lab's scenario clock runs `speed` times faster than the wall clock from
`t0`, and its times are mapped back to the wall clock here, so that they
stand beside the MTA's log (which the lab's MTA wrote in wall-clock time).
Its `retry_interval` (the lab MTA's shortest retry) is used unless
``--retry-interval`` says otherwise.

Exit status: 0 when everything lined up and nothing disagrees; 3 when a
disagreement was flagged; 1 when no file could be read or a store is
missing (one line on stderr).

JSON (``--json``), one object, schema ``harness.evidence/1``; fields are only
added, never renamed or removed, within a schema version::

    {"schema": "harness.evidence/1",
     "files": [{"path", "kind", "title", "records", "problems": [str], "notes": [str]}],
     "skews": [{"path", "seconds"|null, "low"|null, "high"|null, "pairs",
                "resolution", "text"}],
     "messages": [{"key", "message_id"|null, "sender_ids": [str], "mail_from"|null,
                   "recipients": [str],
                   "steps": [{"t", "kind", "rcpt"|null, "flags": [str], "note"|null,
                              "sender": [{"where", "t", "text", "reply"|null}],
                              "harness": {"t", "text", "session"|null, "attempt"|null,
                                          "message"|null, "reply"|null, "store"}|null}],
                   "disagreements": [{"kind", "message", "where"|null, "t"|null}]}],
     "disagreements": int, "problems": [str], "notes": [str],
     "stores": [{"path", "label", "clock": {"t0", "speed"}|null}]}
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.analysis.evidence import ReadOptions, read_evidence
from harness.analysis.evidence.base import EvidenceFile, Problem
from harness.analysis.evidence.capture import (
    Capture,
    CapturedAttempt,
    CapturedEvent,
    CapturedMessage,
    CapturedSession,
)
from harness.analysis.evidence.lineup import KINDS, Lineup, LineupOptions, line_up
from harness.errors import HarnessError
from harness.store import Location, display, is_postgres
from harness.store.db import Reader

SCHEMA = "harness.evidence/1"
LAB_INFO = "lab.json"
#: The API takes at most this many files per request (and, like every
#: request, at most 1 MiB).
MAX_FILES = 16
MAX_NAME = 200


@dataclass(frozen=True)
class LabClock:
    """A lab store's scenario clock: scenario = t0 + (wall - t0) * speed."""

    t0: float
    speed: float

    def to_wall(self, t: float) -> float:
        return self.t0 + (t - self.t0) / self.speed


def parse_tz(text: str | None) -> tzinfo:
    """'UTC', '+01:00', '-0500', 'local', or a zone name ('Europe/Berlin')."""
    if text is None or text == "local":
        local = datetime.now().astimezone().tzinfo
        return local if local is not None else UTC
    t = text.strip()
    if t.upper() in ("UTC", "Z", "GMT"):
        return UTC
    digits = t[1:].replace(":", "")
    if t[:1] in "+-" and digits.isdigit() and len(digits) == 4:
        sign = -1 if t[0] == "-" else 1
        try:
            return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))
        except ValueError as e:
            raise HarnessError(f"--tz {text!r}: an offset lies between -23:59 and +23:59") from e
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(t)
    except (ValueError, KeyError, OSError) as e:
        raise HarnessError(f"--tz {text!r}: give UTC, an offset such as +01:00, or a zone "
                           "name such as Europe/Berlin") from e


def read_lab_info(store: Location) -> dict[str, Any] | None:
    """The lab.json beside a store (a file), or None."""
    if is_postgres(store):
        return None
    path = Path(store).parent / LAB_INFO
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise HarnessError(f"{path}: {e}") from e
    return data if isinstance(data, dict) else None


def _clock(info: dict[str, Any] | None) -> LabClock | None:
    if not info:
        return None
    try:
        speed, t0 = float(info["speed"]), float(info["t0"])
    except (KeyError, TypeError, ValueError):
        return None
    return LabClock(t0, speed) if speed > 0 and speed != 1 else None


def capture_from_records(label: str, sessions: Sequence[Any], attempts: Sequence[Any],
                         messages: Sequence[Any], clock: LabClock | None = None) -> Capture:
    """A Capture from the store's records (Reader's or a Harness's)."""
    wall = clock.to_wall if clock is not None else (lambda t: t)
    return Capture(
        label=label,
        sessions=tuple(CapturedSession(
            id=s.id, started_at=wall(s.started_at),
            ended_at=wall(s.ended_at) if s.ended_at is not None else None,
            peer=(s.peer_ip, s.peer_port), listener=_endpoint(s.listener), helo=s.helo,
            end_reason=s.end_reason, store=label,
            events=tuple(CapturedEvent(t=wall(e.t), direction=e.direction, phase=e.phase,
                                       text=e.text, rule=e.rule) for e in s.events))
            for s in sessions),
        attempts=tuple(CapturedAttempt(
            id=a.id, session_id=a.session_id, t=wall(a.t), mail_from=a.mail_from, rcpt=a.rcpt,
            phase=a.phase, code=a.code, enhanced=a.enhanced, reply=a.reply, outcome=a.outcome,
            rule=a.rule, message_id=a.message_id, store=label) for a in attempts),
        messages=tuple(_message(m, label, wall) for m in messages))


def _message(m: Any, label: str, wall: Any) -> CapturedMessage:
    ndr = (m.analysis or {}).get("ndr") if isinstance(m.analysis, dict) else None
    if ndr is None and m.analysis is None and getattr(m, "raw", None):
        from harness.analysis.dsn import parse_ndr

        parsed = parse_ndr(m.raw)
        ndr = asdict(parsed) if parsed is not None else None
    return CapturedMessage(
        id=m.id, session_id=m.session_id, received_at=wall(m.received_at),
        mail_from=m.mail_from, rcpt_tos=tuple(m.rcpt_tos), message_id=m.message_id,
        subject=m.subject, is_ndr=ndr is not None or bool(m.is_ndr),
        ndr_kind=(ndr or {}).get("kind"),
        ndr_original_id=((ndr or {}).get("original") or {}).get("message_id"),
        ndr_recipients=tuple((r.get("final_recipient"), r.get("status"))
                             for r in (ndr or {}).get("recipients", [])), store=label)


def _endpoint(text: str | None) -> tuple[str, int | None] | None:
    if not text:
        return None
    host, _, port = text.rpartition(":")
    return (host.strip("[]"), int(port)) if port.isdigit() else (text, None)


def capture_from_reader(r: Reader, label: str, clock: LabClock | None = None) -> Capture:
    # the analysis runs after the 250: a message not analysed yet is parsed here
    return capture_from_records(label, r.sessions(with_events=True), r.attempts(),
                                r.messages(raw=True), clock)


def load_capture(path: Location, label: str) -> tuple[Capture, dict[str, Any] | None]:
    """A store's records (read-only), and the lab.json beside it."""
    info = read_lab_info(path)
    with Reader(path) as r:
        return capture_from_reader(r, label, _clock(info)), info


def evidence_from_texts(r: Reader, texts: Sequence[tuple[str, str]], *, tz: tzinfo = UTC,
                        retry_interval: float | None = None, window: float | None = None,
                        now: float | None = None) -> dict[str, Any]:
    """The API's lining up: files given as (name, text), the store open in `r`."""
    opts = ReadOptions(tz=tz, now=time.time() if now is None else now)
    files = [read_evidence(name, text, opts) for name, text in texts]
    lopts = LineupOptions(retry_interval=retry_interval,
                          **({"window": window} if window is not None else {}))
    lineup = line_up(files, [capture_from_reader(r, "")], lopts)
    return lineup_json(lineup, [{"path": str(r.path), "label": "", "clock": None}])


def read_file(path: Path, options: ReadOptions) -> EvidenceFile:
    """Read one file from disk; an unreadable file is a problem, not an error."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return EvidenceFile(path=str(path), kind="unreadable", title="unreadable", records=(),
                            problems=(Problem(str(path), 0, f"cannot read it: "
                                              f"{e.strerror or e}"),))
    try:
        now = path.stat().st_mtime  # a log's lines were written before its last change
    except OSError:
        now = time.time()
    return read_evidence(str(path), data, ReadOptions(tz=options.tz, year=options.year,
                                                      now=options.now or now))


def lineup_for(files: Sequence[EvidenceFile], stores: Sequence[Location], *,
               retry_interval: float | None = None, window: float | None = None
               ) -> tuple[Lineup, list[dict[str, Any]]]:
    """Read the stores and line the files up with them."""
    captures = []
    infos: list[dict[str, Any]] = []
    used: set[str] = set()
    for i, store in enumerate(stores):
        # the first store needs no name; others are named after their file
        stem = "" if is_postgres(store) else Path(store).stem
        label = "" if i == 0 else (stem if stem and stem not in used else f"store{i + 1}")
        used.add(label)
        cap, info = load_capture(store, label)
        captures.append(cap)
        clock = _clock(info)
        infos.append({"path": display(store), "label": label,
                      "clock": {"t0": clock.t0, "speed": clock.speed} if clock else None})
        if retry_interval is None and info and isinstance(info.get("retry_interval"),
                                                          int | float):
            retry_interval = float(info["retry_interval"])
    opts = LineupOptions(retry_interval=retry_interval,
                         **({"window": window} if window is not None else {}))
    return line_up(files, captures, opts), infos


def lineup_json(lineup: Lineup, stores: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "files": [{"path": f.path, "kind": f.kind, "title": f.title, "records": f.records,
                   "problems": [str(p) for p in f.problems], "notes": list(f.notes)}
                  for f in lineup.files],
        "skews": [{**asdict(s), "text": s.describe()} for s in lineup.skews],
        "messages": [{"key": m.key, "message_id": m.message_id,
                      "sender_ids": list(m.sender_ids), "mail_from": m.mail_from,
                      "recipients": list(m.recipients),
                      "steps": [{"t": st.t, "kind": st.kind, "rcpt": st.rcpt,
                                 "flags": list(st.flags), "note": st.note,
                                 "sender": [asdict(x) for x in st.sender],
                                 "harness": asdict(st.harness) if st.harness else None}
                                for st in m.steps],
                      "disagreements": [asdict(d) for d in m.disagreements]}
                     for m in lineup.timelines],
        "disagreements": len(lineup.disagreements),
        "problems": [str(p) for p in lineup.problems],
        "notes": list(lineup.notes),
        "stores": list(stores),
    }


# ------------------------------------------------------------------- render

def _when(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"


def _style(reply: str | None) -> str:
    return {"2": "green", "3": "cyan", "4": "yellow", "5": "red"}.get((reply or "")[:1],
                                                                       "white")


def _where(where: str) -> str:
    """'/long/path/maillog:12' -> 'maillog:12' (the files are listed above in full)."""
    path, _, line = where.rpartition(":")
    return f"{Path(path).name}:{line}" if line.isdigit() else where


def render(lineup: Lineup, console: Console, stores: Sequence[dict[str, Any]] = ()) -> None:
    for f in lineup.files:
        console.print(f"[bold]{escape(f.path)}[/]: {escape(f.title)}, {f.records} record(s)"
                      + "".join(f"\n  [dim]{escape(n)}[/]" for n in f.notes))
        for p in f.problems:
            console.print(f"  [yellow]{escape(str(p))}[/]")
    for s in stores:
        if s.get("clock"):
            c = s["clock"]
            console.print(f"[dim]{escape(s['path'])}: a lab store; its clock ran x{c['speed']:g}"
                          " and is shown here in wall-clock time[/]")
    for sk in lineup.skews:
        console.print(f"[cyan]clock:[/] {escape(sk.describe())}")
    for n in lineup.notes:
        console.print(f"[dim]{escape(n)}[/]")
    for m in lineup.timelines:
        console.print()
        head = m.message_id or m.key
        bits = [f"{escape(', '.join(m.sender_ids))}"] if m.sender_ids else []
        if m.mail_from is not None:
            bits.append(f"from {escape(m.mail_from or '<>')}")
        if m.recipients:
            bits.append(f"to {escape(', '.join(m.recipients))}")
        console.print(f"[bold]Message {escape(head)}[/]"
                      + (f"  [dim]{' · '.join(bits)}[/]" if bits else ""))
        table = Table(box=None, pad_edge=False, show_edge=False, expand=False)
        table.add_column("time", no_wrap=True, style="dim")
        table.add_column("sender logged", overflow="fold", ratio=1)
        table.add_column("harness did", overflow="fold", ratio=1)
        table.add_column("", no_wrap=True)
        for st in m.steps:
            sender = "\n".join(
                f"[dim]{escape(_where(x.where))}[/] [{_style(x.reply)}]{escape(x.text)}[/]"
                for x in st.sender) or "[dim]-[/]"
            harness = (f"[{_style(st.harness.reply)}]{escape(st.harness.text)}[/]"
                       if st.harness else f"[dim]{escape(st.note or '-')}[/]")
            if st.harness and st.note:
                harness += f"\n[dim]{escape(st.note)}[/]"
            flag = "[red]! " + ", ".join(st.flags) + "[/]" if st.flags else "[green]ok[/]" \
                if st.harness and st.sender else ""
            table.add_row(_when(st.t), sender, harness, flag)
        console.print(table)
        for d in m.disagreements:
            console.print(f"  [red]! {escape(d.kind)}:[/] {escape(d.message)}")
        if not m.disagreements:
            console.print("  [green]the sender's log and the harness agree[/]")
    count = len(lineup.disagreements)
    both = sum(1 for m in lineup.timelines for st in m.steps if st.harness and st.sender)
    console.print()
    console.print(f"{len(lineup.timelines)} message(s), {both} step(s) seen on both sides, "
                  + (f"[red]{count} disagreement(s)[/]" if count else
                     "[green]no disagreement[/]"))
    if count:
        kinds = sorted({d.kind for d in lineup.disagreements})
        for k in kinds:
            console.print(f"  [dim]{k}: {KINDS.get(k, '')}[/]")


def evidence_command(args: Any, out: Console, err: Console) -> int:
    """The CLI command (args: files, store (list), json, tz, retry_interval, window)."""
    from harness.analysis.retry import parse_duration

    opts = ReadOptions(tz=parse_tz(args.tz))
    retry = None
    if args.retry_interval is not None:
        try:
            retry = parse_duration(args.retry_interval)
        except ValueError as e:
            raise HarnessError(f"--retry-interval: {e}") from e
    files = [read_file(Path(p), opts) for p in args.files]
    if all(f.kind in ("unknown", "unreadable") for f in files):
        raise HarnessError("; ".join(str(p) for f in files for p in f.problems))
    from harness.store.db import DEFAULT_PATH

    stores: list[Location] = list(args.store or [DEFAULT_PATH])
    for s in stores:
        if not is_postgres(s) and not Path(s).exists():
            raise HarnessError(f"no store at {s} (give --store PATH; harness lab --keep DIR "
                               "keeps a lab run's store)")
    lineup, infos = lineup_for(files, stores, retry_interval=retry, window=args.window)
    if args.json:
        print(json.dumps(lineup_json(lineup, infos), indent=2))
    else:
        render(lineup, out, infos)
    return 3 if lineup.disagreements else 0
