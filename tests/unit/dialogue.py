"""A scripted session for the engine's unit tests: what an SMTP session
keeps between decisions (the SessionFacts the engine reads), applied after
each decision the way harness/smtp/session.py applies it. The engine's tests
feed it events; the session's own tests (test_session.py) check that the real
session keeps the same state from bytes on the wire."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.scenario.engine import (
    Auth,
    Bdat,
    Connection,
    Decision,
    Engine,
    Event,
    Helo,
    Mail,
    Message,
    Rcpt,
    Rset,
)


@dataclass
class Dialogue:
    engine: Engine
    client: str = "192.0.2.10"
    tls: bool = False
    helo: str | None = None
    auth_user: str | None = None
    mail_from: str | None = None
    declared_size: int | None = None
    rcpts: list[str] = field(default_factory=list)
    message_index: int = 0
    rcpt_index: int = 0
    spf: str | None = None

    def __post_init__(self) -> None:
        self.connection: Connection = self.engine.connect(self.client)

    def reset_transaction(self) -> None:
        self.mail_from = self.declared_size = self.spf = None
        self.rcpts = []
        self.rcpt_index = 0

    def decide(self, event: Event) -> Decision:
        if isinstance(event, Rcpt):
            self.rcpt_index += 1
        d = self.engine.decide(self, event)
        ok = d.accepts
        if isinstance(event, Helo) and ok:
            self.helo = event.name
            self.reset_transaction()
        elif isinstance(event, Mail) and ok:
            self.reset_transaction()
            self.mail_from, self.declared_size, self.spf = event.sender, event.size, event.spf
            self.message_index += 1
        elif isinstance(event, Rcpt) and ok:
            self.rcpts.append(event.recipient)
        elif isinstance(event, Auth):
            positive = d.reply.is_positive if d.reply is not None else event.valid
            if ok and positive:
                self.auth_user = event.user
        elif (isinstance(event, Bdat) and not ok) or isinstance(event, Message) or (
                isinstance(event, Rset) and ok):
            self.reset_transaction()
        return d

    def close(self) -> None:
        self.engine.disconnect(self.connection)
