"""Stall: how long the other sessions wait while large messages arrive.

    .venv/bin/python bench/stall.py                       # 20 MB, 3 messages, each scenario
    .venv/bin/python bench/stall.py --size 50 --messages 5 --json stall.json
    .venv/bin/python bench/stall.py --harness-src /tmp/old --scenario content
    .venv/bin/python bench/stall.py --quick               # a short mode (the suite runs it)

`harness serve` (a fresh store each run) receives large messages from one
client while another client, in a process of its own, sends NOOP after
NOOP on one connection and times each reply. The longest wait is how long
the event loop was kept from the other sessions. Scenarios: `accept` (no
rule reads the message) and `content` (a rule with a case-insensitive
body regex, the example of docs/scenarios.md, which matches: each message
is refused 554 after its checks). One message is sent first and not timed
(first-use imports). `--harness-src DIR` runs the harness from another
checkout (PYTHONPATH), to compare two versions in one run. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SCENARIOS = {
    "accept": None,
    "content": ("scenario: content\nrules:\n  - name: lottery\n    on: message\n"
                "    when: {body: {regex: '(?i)viagra|lottery'}}\n"
                "    reply: 554 5.7.1 no lotteries here\n"),
    "dmarc": ("scenario: dmarc\ndns:\n  bench.test: {TXT: ['v=spf1 -all']}\n"
              "  _dmarc.bench.test: {TXT: ['v=DMARC1; p=reject']}\nrules:\n"
              "  - name: dmarc\n    on: message\n    when: {dmarc: fail}\n"
              "    reply: 550 5.7.26 This message failed DMARC\n"),
    # {key}: the public key of the signature the bench makes (dkimpy)
    "dkim": ("scenario: dkim\ndns:\n"
             "  s1._domainkey.bench.test: {{TXT: ['v=DKIM1; k=rsa; p={key}']}}\nrules:"
             "\n  - name: signed\n    on: message\n    when: {{dkim: pass}}\n"
             "    reply: 550 5.7.1 verified, and refused\n"),
}
LINE = b"x" * 76 + b"\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _key() -> tuple[bytes, str]:
    """A fresh RSA key: the private one (PEM) to sign with, the public one
    (base64 DER) for the scenario's DNS."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    der = k.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode()


def pinger(port: int, stop: Event, out: Any) -> None:
    """NOOP after NOOP on one connection: each reply's wait, in seconds."""
    waits = []
    with smtplib.SMTP(HOST, port, local_hostname="pinger.bench.test", timeout=60) as c:
        while not stop.is_set():
            t = time.perf_counter()
            c.noop()
            waits.append(time.perf_counter() - t)
    out.put(waits)


def run(scenario: str, size_mb: float, messages: int, src: str | None) -> dict[str, Any]:
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="harness-stall-"))
    target = "accept"
    text = SCENARIOS[scenario]
    pem = b""
    if scenario == "dkim":
        pem, public = _key()
        text = (text or "").format(key=public)
    if text is not None:
        target = str(folder / "scenario.yaml")
        Path(target).write_text(text)
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    code = "import sys; from harness.cli import main; sys.argv[0] = 'harness'; sys.exit(main())"
    server = subprocess.Popen(
        [sys.executable, "-c", code, "serve", target, "--listen", f"{HOST}:{port}",
         "--http", f"{HOST}:0", "--store", str(folder / "store.db"), "--quiet"],
        env=env, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"harness serve did not start: {server.stderr.read()}"
                                     if server.stderr else "harness serve did not start"
                                     ) from None
                time.sleep(0.05)
        body = (b"From: a@bench.test\r\nSubject: stall bench\r\n\r\n"
                + LINE * int(size_mb * 1e6 / len(LINE)) + b"you won the LOTTERY\r\n")
        if pem:
            import dkim

            body = dkim.sign(body, b"s1", b"bench.test", pem,
                             canonicalize=(b"relaxed", b"relaxed")) + body
        verdicts: list[int] = []

        def send(content: bytes) -> None:
            with smtplib.SMTP(HOST, port, local_hostname="sender.bench.test", timeout=120) as c:
                try:
                    c.sendmail("a@bench.test", ["b@bench.test"], content)
                    verdicts.append(250)
                except smtplib.SMTPDataError as e:
                    verdicts.append(e.smtp_code)

        send(b"Subject: warm-up\r\n\r\nfirst use\r\n")
        verdicts.clear()
        stop, out = mp.Event(), mp.Queue()
        ping = mp.Process(target=pinger, args=(port, stop, out))
        ping.start()
        time.sleep(0.2)
        started = time.perf_counter()
        for _ in range(messages):
            send(body)
        seconds = time.perf_counter() - started
        stop.set()
        waits: list[float] = out.get(timeout=60)
        ping.join(10)
    finally:
        server.terminate()
        server.wait(30)
    waits.sort()
    return {"scenario": scenario, "size_mb": size_mb, "messages": messages,
            "harness_src": src or str(ROOT), "verdicts": verdicts, "seconds": round(seconds, 2),
            "noops": len(waits), "median_ms": round(statistics.median(waits) * 1e3, 3),
            "p99_ms": round(waits[int(len(waits) * 0.99)] * 1e3, 2),
            "max_ms": round(waits[-1] * 1e3, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=float, default=20.0, help="message size in MB (default 20)")
    p.add_argument("--messages", type=int, default=3, help="timed messages (default 3)")
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                   help="accept, content, dmarc or dkim (default all four)")
    p.add_argument("--harness-src", help="run the harness from this checkout (PYTHONPATH)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quick", action="store_true", help="1 MB, 1 message: the short mode")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.messages = 1.0, 1
    results = [run(s, args.size, args.messages, args.harness_src)
               for s in args.scenario or sorted(SCENARIOS)]
    print(f"{args.size:g} MB messages, {args.messages} each; another client's NOOP replies:")
    print("| scenario | verdicts | NOOPs answered | median | p99 | longest wait |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['scenario']} | {', '.join(map(str, r['verdicts']))} | {r['noops']:,} | "
              f"{r['median_ms']:.2f} ms | {r['p99_ms']:.1f} ms | {r['max_ms']:,.0f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
