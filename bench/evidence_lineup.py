"""How long `harness evidence` takes on a big mail log: read a synthetic
Postfix log of N messages (each deferred once at RCPT, then sent) and line it
up with N x 2 matching attempts, all in memory (no store, no sockets).

    .venv/bin/python bench/evidence_lineup.py              # 2000, 10000 and 20000 messages
    .venv/bin/python bench/evidence_lineup.py --messages 50000
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from harness.analysis.evidence import ReadOptions, read_evidence
from harness.analysis.evidence.capture import (
    Capture,
    CapturedAttempt,
    CapturedEvent,
    CapturedSession,
)
from harness.analysis.evidence.lineup import line_up

GREY = "451 4.7.1 Greylisted, this sender is new here; please try again later"
T0 = datetime(2026, 11, 30, 0, 0, tzinfo=UTC).timestamp()


def build(n: int) -> tuple[str, Capture]:
    lines, sessions, attempts = [], [], []
    for i in range(n):
        qid = f"{0xA00000 + i:X}"
        rcpt = f"user{i}@lab.test"
        t1, t2 = T0 + i * 2.0, T0 + i * 2.0 + 301
        stamp = [time.strftime("%b %d %H:%M:%S", time.gmtime(t)) for t in (t1, t2)]
        lines += [
            f"{stamp[0]} mta postfix/cleanup[1]: {qid}: message-id=<m{i}@app.test>",
            f"{stamp[0]} mta postfix/smtp[2]: {qid}: to=<{rcpt}>, relay=192.0.2.10[192.0.2.10]"
            f":2525, delay=0.1, delays=0/0/0/0, dsn=4.7.1, status=deferred (host 192.0.2.10"
            f"[192.0.2.10] said: {GREY} (in reply to RCPT TO command))",
            f"{stamp[1]} mta postfix/smtp[2]: {qid}: to=<{rcpt}>, relay=192.0.2.10[192.0.2.10]"
            f":2525, delay=301, delays=0/0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued "
            f"as {i})"]
        for k, (t, reply) in enumerate(((t1, GREY), (t2, f"250 2.0.0 Ok: queued as {i}"))):
            sid = 2 * i + k + 1
            sessions.append(CapturedSession(
                id=sid, started_at=t - 0.01, ended_at=t + 0.01,
                peer=("10.0.0.9", 10000 + sid % 50000),
                listener=("192.0.2.10", 2525),
                events=(CapturedEvent(t=t - 0.001, direction="C", phase="rcpt",
                                      text=f"RCPT TO:<{rcpt}>"),
                        CapturedEvent(t=t, direction="S", phase="rcpt", text=reply))))
            attempts.append(CapturedAttempt(
                id=sid, session_id=sid, t=t - 0.3, mail_from="app@app.test", rcpt=rcpt,
                phase="rcpt", code=int(reply[:3]), enhanced=reply.split()[1], reply=reply,
                outcome="deferred" if k == 0 else "accepted"))
    return "\n".join(lines), Capture(label="", sessions=tuple(sessions), attempts=tuple(attempts))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--messages", type=int, action="append")
    args = p.parse_args()
    for n in args.messages or [2000, 10000, 20000]:
        text, cap = build(n)
        t = time.perf_counter()
        f = read_evidence("maillog", text, ReadOptions(now=T0 + 86400))
        read_s = time.perf_counter() - t
        t = time.perf_counter()
        lineup = line_up([f], [cap])
        line_s = time.perf_counter() - t
        both = sum(1 for m in lineup.timelines for s in m.steps if s.harness and s.sender)
        print(f"{n:>6} messages, {len(f.records):>6} log lines, {len(cap.attempts):>6} attempts: "
              f"read {read_s:6.2f} s, line up {line_s:6.2f} s, {both} steps on both sides, "
              f"{len(lineup.disagreements)} disagreement(s)")


if __name__ == "__main__":
    main()
