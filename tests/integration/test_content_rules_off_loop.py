"""A large message's header and body conditions are tested in a worker
thread, the event loop serving the other sessions meanwhile (on real
sockets): while one message's checks are held, another client's commands
are answered; then the held message gets its verdict."""

from __future__ import annotations

import smtplib
import threading
from typing import Any

from harness.smtp import session as ss
from harness.testing import Harness

RULES = """scenario: content
rules:
  - name: lottery
    on: message
    when: {body: {regex: '(?i)you won the lottery'}}
    reply: 554 5.7.1 no lotteries here
"""
BIG = b"x" * 76 + b"\r\n"


def _send(h: Harness, body: bytes, out: list[Any]) -> None:
    with smtplib.SMTP(h.host, h.port, local_hostname="c.lab.test", timeout=30) as c:
        try:
            c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: hi\r\n\r\n" + body)
            out.append(250)
        except smtplib.SMTPDataError as e:
            out.append((e.smtp_code, e.smtp_error))


def test_large_message_content_checks_leave_the_loop_serving() -> None:
    with Harness(RULES) as h:
        engine = h.ctx.engine
        started, release = threading.Event(), threading.Event()
        real = engine.content_checks

        def held(content: Any) -> Any:
            started.set()
            assert release.wait(20), "never released"
            return real(content)

        engine.content_checks = held  # type: ignore[method-assign]
        body = BIG * (2 * ss.CONTENT_INLINE // len(BIG)) + b"and YOU WON THE LOTTERY\r\n"
        verdict: list[Any] = []
        sender = threading.Thread(target=_send, args=(h, body, verdict))
        sender.start()
        try:
            assert started.wait(20)
            # the first message's checks are held in their thread: the loop
            # answers another client all the same
            with smtplib.SMTP(h.host, h.port, local_hostname="d.lab.test", timeout=10) as c:
                assert c.noop()[0] == 250
                c.sendmail("a@lab.test", ["b@lab.test"], b"Subject: small\r\n\r\nhello\r\n")
        finally:
            release.set()
            sender.join(30)
        assert verdict == [(554, b"5.7.1 no lotteries here")]
        plain: list[Any] = []
        engine.content_checks = real  # type: ignore[method-assign]
        _send(h, BIG * (2 * ss.CONTENT_INLINE // len(BIG)), plain)
        assert plain == [250]
