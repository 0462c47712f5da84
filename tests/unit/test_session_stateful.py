"""Random conversations against the sans-IO session (hypothesis stateful):
commands in pipelined groups, bytes split at random places, DATA bodies with
dots, BDAT chunks, STARTTLS with plain text after it. Whatever the order, the
invariants hold: every command gets exactly one reply, in order; a stored
message carries the envelope of its own transaction and nothing else; RSET,
EHLO and STARTTLS leave no transaction; each recipient's verdict is one
attempt; nothing a client sends is an internal error."""

from __future__ import annotations

import os

from conversation import Conversation, scenario
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

RULES = """\
rules:
  - {name: unknown, on: rcpt, when: {rcpt: bad@lab.test}, reply: 550 5.1.1 No such user}
  - {name: grey, on: rcpt, when: {rcpt: grey@lab.test}, reply: 451 4.7.1 Try later}
  - {name: no data, on: data, when: {mail_from: nodata@lab.test}, reply: 554 5.7.1 No}
"""
SENDERS = ["a@lab.test", "", "nodata@lab.test", "x@lab.test"]
RCPTS = ["ok1@lab.test", "ok2@lab.test", "bad@lab.test", "grey@lab.test"]

simple = st.one_of(
    st.sampled_from(["EHLO client.lab.test", "HELO client.lab.test", "RSET", "NOOP",
                     "VRFY someone", "FOO", "", "MAIL FROM:", "RCPT TO:", "MAIL FROM:<a@[1"]),
    st.sampled_from(SENDERS).map(lambda s: f"MAIL FROM:<{s}>"),
    st.sampled_from(RCPTS).map(lambda r: f"RCPT TO:<{r}>"),
)
body_line = st.one_of(st.just(b"."), st.just(b".."), st.just(b""),
                      st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(
                          b"\n", b"")))


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.c = Conversation(scenario(RULES))
        self.group: list[bytes] = []  # pipelined commands not yet sent
        self.kinds: list[str] = []
        self.helo = False
        self.tx: tuple[str, list[str]] | None = None  # the transaction as replies said
        self.expected: list[tuple[str, tuple[str, ...], bytes]] = []
        self.chunks: bytes | None = None
        self.verdicts = 0  # attempts the replies imply

    # ------------------------------------------------------------- sending

    def _send(self, data: bytes, cuts: list[int]) -> list[str]:
        got: list[str] = []
        last = 0
        for cut in sorted({min(max(c, 0), len(data)) for c in cuts}):
            got += self.c.feed(data[last:cut])
            last = cut
        return got + self.c.feed(data[last:])

    def _flush(self, cuts: list[int]) -> None:
        if not self.group:
            return
        data = b"".join(self.group)
        kinds, self.group, self.kinds = self.kinds, [], []
        replies = self.c.codes(self._send(data, cuts))
        assert len(replies) == len(kinds), (kinds, replies)  # one reply each, in order
        for kind, code in zip(kinds, replies, strict=True):
            self._model(kind, code)

    def _model(self, kind: str, code: int) -> None:
        verb, _, arg = kind.partition(" ")
        if verb in ("EHLO", "HELO") and code == 250:
            self.helo, self.tx, self.chunks = True, None, None
        elif verb == "RSET" and code == 250:
            self.tx, self.chunks = None, None
        elif verb == "MAIL" and code == 250:
            self.tx = (arg, [])
        elif verb == "RCPT" and self.tx is not None and code in (250, 451, 550):
            self.verdicts += code != 250
            if code == 250:
                self.tx[1].append(arg)
        elif verb == "BDAT" and code == 250 and self.tx is not None:
            _, last, chunk = arg.split(" ", 2)
            self.chunks = (self.chunks or b"") + chunk.encode("latin-1")
            if last == "LAST":
                self._stored(self.chunks)
        elif verb == "BDAT" and self.tx is not None and code != 250:
            self.verdicts += len(self.tx[1]) if code in (552, 554) else 0
            self.tx = (self.tx[0], []) if code in (552, 554) else self.tx

    def _stored(self, raw: bytes) -> None:
        assert self.tx is not None
        self.expected.append((self.tx[0], tuple(self.tx[1]), raw))
        self.verdicts += len(self.tx[1])
        self.tx, self.chunks = None, None

    # --------------------------------------------------------------- rules

    @rule(command=simple)
    def command(self, command: str) -> None:
        verb = command.split(" ")[0]
        arg = ""
        if command.startswith(("MAIL FROM:<", "RCPT TO:<")) and command.endswith(">"):
            arg = command[command.index("<") + 1:-1]
        self.group.append(command.encode() + b"\r\n")
        self.kinds.append(f"{verb} {arg}".strip() if arg or verb in ("MAIL", "RCPT")
                          else verb)

    @rule(size=st.integers(0, 12), last=st.booleans(), data=st.data())
    def bdat(self, size: int, last: bool, data: st.DataObject) -> None:
        chunk = data.draw(st.binary(min_size=size, max_size=size))
        self.group.append(f"BDAT {size}{' LAST' if last else ''}\r\n".encode() + chunk)
        self.kinds.append(f"BDAT {size} {'LAST' if last else 'MORE'} "
                          f"{chunk.decode('latin-1')}")

    @rule(cuts=st.lists(st.integers(0, 400), max_size=4))
    def flush(self, cuts: list[int]) -> None:
        self._flush(cuts)

    @rule(lines=st.lists(body_line, max_size=6), cuts=st.lists(st.integers(0, 200), max_size=3))
    def data(self, lines: list[bytes], cuts: list[int]) -> None:
        self._flush([])
        [code] = self.c.codes(self.c.send("DATA"))
        if code != 354:
            if self.tx is not None and self.tx[1] and code == 554:
                self.verdicts += len(self.tx[1])
                self.tx = None
            return
        wire = b"".join(b"." + x + b"\r\n" if x.startswith(b".") else x + b"\r\n"
                        for x in lines)
        [code] = self.c.codes(self._send(wire + b".\r\n", cuts))
        assert code == 250
        self._stored(b"".join(x + b"\r\n" for x in lines))

    @rule(junk=st.binary(max_size=20))
    def starttls(self, junk: bytes) -> None:
        self._flush([])
        if self.c.session.tls:  # once only (and what follows is answered)
            assert self.c.codes(self.c.feed(b"STARTTLS\r\n")) == [503]
            return
        replies = self.c.codes(self.c.feed(b"STARTTLS\r\n" + junk))
        assert replies == [220]  # the junk after it is never answered
        assert self.c.session.tls
        self.helo, self.tx, self.chunks = False, None, None

    # ---------------------------------------------------------- invariants

    @invariant()
    def no_internal_error(self) -> None:
        assert self.c.errors == []
        assert not any(x.text.startswith("451 4.3.0") for x in self.c.lines)

    @invariant()
    def messages_carry_their_own_envelope(self) -> None:
        got = [(m.mail_from, m.rcpt_tos, m.raw) for m in self.c.messages]
        assert got == self.expected

    @invariant()
    def one_transaction_in_one_place(self) -> None:
        if self.group:
            return  # commands not sent yet
        tx = self.c.session.transaction
        if self.tx is None:
            assert tx is None
        else:
            assert tx is not None and tx.mail_from == self.tx[0]
            assert tx.rcpts == self.tx[1] or tx.chunk_failed

    @invariant()
    def each_verdict_is_one_attempt(self) -> None:
        if not self.group:
            assert len(self.c.attempts) == self.verdicts


SessionMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("HARNESS_STATEFUL_EXAMPLES", "150")),
    stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
test_session_random_conversations = SessionMachine.TestCase
