"""Drive the sans-IO SMTP session with bytes, no socket and no event loop:
requests are answered at once (a delay passes, a commit succeeds, TLS
"starts"), and what the session did is kept for the test to read."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any

from harness.records import AttemptRecord, MessageDraft, TranscriptLine
from harness.scenario.engine import Engine
from harness.scenario.loader import load_text
from harness.scenario.model import Scenario
from harness.smtp import session as ss


@dataclass
class SpfAnswer:
    result: str = "pass"
    domain: str = "lab.test"
    client_ip: str = "192.0.2.10"
    mechanism: str | None = "ip4:192.0.2.10"


def scenario(text: str = "") -> Scenario:
    return load_text("scenario: t\n" + textwrap.dedent(text), "t.yaml")


@dataclass
class Conversation:
    """One session fed from a test. `send()` returns the reply lines the
    bytes caused; everything else the session did piles up in the lists."""

    scen: Scenario = field(default_factory=scenario)
    peer: tuple[str, int] = ("192.0.2.10", 40000)
    tls: bool = False
    tls_available: bool = True
    engine: Engine | None = None
    spf: SpfAnswer = field(default_factory=SpfAnswer)
    lines: list[TranscriptLine] = field(default_factory=list)
    attempts: list[AttemptRecord] = field(default_factory=list)
    messages: list[MessageDraft] = field(default_factory=list)
    updates: dict[str, Any] = field(default_factory=dict)
    errors: list[BaseException] = field(default_factory=list)
    closed: str | None = None  # how the session asked to close
    requests: list[ss.Request] = field(default_factory=list)
    wire: bytearray = field(default_factory=bytearray)  # everything sent, in order
    t: float = 1_700_000_000.0
    #: what the store does at a commit: raise this into the session, or
    #: (hold_commits) nothing yet, the session left waiting
    commit_error: BaseException | None = None
    hold_commits: bool = False

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = Engine(self.scen, clock=self.clock)
        self.session = ss.ServerSession(
            session_id=1, server=self.scen.server, decider=self.engine, clock=self.clock,
            peer=self.peer, scenario=self.scen.name,
            tls=ss.TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384") if self.tls else None,
            tls_available=self.tls_available)
        self.greeting = self._replies(self._run(self.session.start()))

    def clock(self) -> float:
        return self.t

    def _run(self, actions: list[ss.Out]) -> bytes:
        sent = bytearray()
        while True:
            request = None
            for a in actions:
                if isinstance(a, TranscriptLine):
                    self.lines.append(a)
                elif isinstance(a, ss.Send):
                    sent += a.data
                elif isinstance(a, ss.Attempt):
                    self.attempts.append(a.record)
                elif isinstance(a, ss.Update):
                    self.updates.update(a.fields)
                elif isinstance(a, ss.Error):
                    self.errors.append(a.error)
                elif isinstance(a, ss.Close):
                    self.closed = a.how
                elif isinstance(a, ss.TlsFail):
                    self.closed = "tls_fail"
                elif isinstance(a, ss.Request):
                    request = a
            if request is None:
                break
            self.requests.append(request)
            if isinstance(request, ss.StoreMessage):
                # the bytes, as the store gets them (a Body of one part or several)
                self.messages.append(request.draft._replace(
                    raw=bytes(request.draft.raw.whole())))
                actions = self.session.resume(len(self.messages))
            elif isinstance(request, ss.StartTls):
                actions = self.session.resume(ss.TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384"))
            elif isinstance(request, ss.CheckSpf):
                actions = self.session.resume(self.spf)
            elif isinstance(request, ss.CheckContent):  # the transport: in a thread
                assert self.engine is not None
                actions = self.session.resume(self.engine.content_checks(request.content))
            elif isinstance(request, ss.Delay):
                self.t += request.seconds
                actions = self.session.resume(None)
            elif isinstance(request, ss.Commit) and self.hold_commits:
                break
            elif isinstance(request, ss.Commit) and self.commit_error is not None:
                actions = self.session.throw(self.commit_error)
            elif isinstance(request, ss.Drip):
                sent += request.data
                actions = self.session.resume(None)
            else:
                actions = self.session.resume(None)
        self.wire += sent
        return bytes(sent)

    @staticmethod
    def _replies(data: bytes) -> list[str]:
        return [line.decode("utf-8", "replace") for line in data.split(b"\r\n") if line]

    def feed(self, data: bytes) -> list[str]:
        """All reply lines `data` caused."""
        return self._replies(self._run(self.session.receive_data(data)))

    def send(self, *commands: str) -> list[str]:
        """Commands in one segment (pipelined when more than one)."""
        return self.feed("".join(f"{c}\r\n" for c in commands).encode())

    def cmd(self, command: str) -> str:
        """The final reply line of one command."""
        return self.send(command)[-1]

    def eof(self) -> list[str]:
        return self._replies(self._run(self.session.receive_eof()))

    def lost(self) -> None:
        self._run(self.session.connection_lost(None))

    def ehlo(self, name: str = "client.lab.test") -> list[str]:
        return self.send(f"EHLO {name}")

    def transaction(self, sender: str = "a@lab.test", *rcpts: str,
                    body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> list[str]:
        rcpts = rcpts or ("b@lab.test",)
        out = self.send(f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in rcpts), "DATA")
        return out + self.feed(body + b".\r\n")

    def codes(self, lines: list[str]) -> list[int]:
        """The codes of the final lines of replies."""
        return [int(x[:3]) for x in lines if len(x) < 4 or x[3] != "-"]
