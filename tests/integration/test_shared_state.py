"""The scenario state shared by several servers (harness.state) on real
sockets and a real SQLite file: two listeners on 127.0.0.1 and 127.0.0.2,
each with its own SharedState (its own thread, connection and owner, as two
worker processes or two hosts have), decide as one engine would:
greylisting across them, attempt counts, a rate limit in total, a
connection limit counting both, a dead owner's connections not counted."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from harness.scenario.engine import Engine, Mail, Rcpt
from harness.scenario.loader import load_text
from harness.scenario.model import Scenario
from harness.smtp.listener import ListenerContext
from harness.smtp.runner import Listener, start_listener
from harness.state.shared import STALE, SharedState, open_shared, state_path
from harness.store.db import Reader, Store


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Host:
    listener: Listener
    shared: SharedState

    @property
    def port(self) -> int:
        return self.listener.address[1]

    @property
    def host(self) -> str:
        return self.listener.address[0]


@asynccontextmanager
async def two_hosts(tmp_path: Path, scenario: Scenario,
                    clock: Callable[[], float]) -> AsyncIterator[tuple[Host, Host, Path]]:
    path = tmp_path / "h.db"
    store = Store(path).open()
    hosts: list[Host] = []
    try:
        for address in ("127.0.0.1", "127.0.0.2"):
            shared = await asyncio.to_thread(open_shared, path)
            ctx = ListenerContext(engine=Engine(scenario, clock=clock), store=store,
                                  shared=shared)
            hosts.append(Host(await start_listener(ctx, address, 0), shared))
        yield hosts[0], hosts[1], path
    finally:
        for h in hosts:
            await h.listener.close()
            await asyncio.to_thread(h.shared.close)
        store.close()


async def rcpt_reply(h: Host, rcpt: str = "user@lab.test",
                     sender: str = "app@lab.test") -> int:
    """The RCPT reply's code on a new connection to `h`."""
    client = aiosmtplib.SMTP(hostname=h.host, port=h.port, local_hostname="client.lab.test",
                             start_tls=False)
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(sender)
        try:
            code, _ = await client.rcpt(rcpt)
        except aiosmtplib.SMTPRecipientRefused as e:
            code = e.code
        return int(code)
    finally:
        client.close()


GREYLIST = load_text("""\
scenario: shared-greylist
rules:
  - name: greylist
    on: rcpt
    when: {first_seen: "< 60s"}
    reply: 451 4.7.1 Greylisted, try again later
""", "greylist.yaml")


def test_greylisted_on_one_host_accepted_on_the_other_after_the_window(
        tmp_path: Path) -> None:
    clock = Clock()

    async def run() -> None:
        async with two_hosts(tmp_path, GREYLIST, clock) as (a, b, path):
            assert await rcpt_reply(a) == 451
            clock.t += 30
            assert await rcpt_reply(b) == 451  # the other host knows the triplet
            clock.t += 31
            assert await rcpt_reply(b) == 250
            assert await rcpt_reply(a) == 250
            assert await rcpt_reply(a, rcpt="new@lab.test") == 451  # a new triplet
            await a.listener.ctx.store.barrier()
            with Reader(path) as r:
                got = [(x.outcome, x.code) for x in r.attempts(rcpt="user@lab.test")]
            # two deferrals, then two accepted RCPTs whose clients left
            # without sending (lost: no verdict on the message)
            assert got == [("deferred", 451), ("deferred", 451), ("lost", None),
                           ("lost", None)]

    asyncio.run(run())


def test_attempt_numbers_count_across_hosts(tmp_path: Path) -> None:
    scenario = load_text("""\
scenario: fail-twice
rules:
  - name: fail twice
    on: rcpt
    when: {attempt: "<= 2"}
    reply: 451 4.3.0 Try again
""", "fail.yaml")

    async def run() -> None:
        async with two_hosts(tmp_path, scenario, time.time) as (a, b, _):
            assert [await rcpt_reply(h) for h in (a, b, a, b)] == [451, 451, 250, 250]

    asyncio.run(run())


def test_a_rate_limit_is_a_total_over_the_hosts(tmp_path: Path) -> None:
    scenario = load_text("""\
scenario: rate
server:
  limits:
    rate: {messages: 5, per: 1m, key: sender}
""", "rate.yaml")
    clock = Clock()

    async def mail_reply(h: Host) -> int:
        client = aiosmtplib.SMTP(hostname=h.host, port=h.port, start_tls=False,
                                 local_hostname="client.lab.test")
        await client.connect()
        try:
            await client.ehlo()
            try:
                code, _ = await client.mail("bulk@lab.test")
            except aiosmtplib.SMTPSenderRefused as e:
                code = e.code
            return int(code)
        finally:
            client.close()

    async def run() -> None:
        async with two_hosts(tmp_path, scenario, clock) as (a, b, _):
            codes = [await mail_reply(h) for h in (a, b) * 4]
            assert codes == [250] * 5 + [451] * 3

    asyncio.run(run())


def test_a_connection_limit_counts_every_hosts_connections(tmp_path: Path) -> None:
    scenario = load_text("""\
scenario: conns
server:
  limits:
    max_connections: 2
""", "conns.yaml")

    async def banner(h: Host) -> tuple[int, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(h.host, h.port)
        line = await reader.readline()
        return int(line[:3]), writer

    async def run() -> None:
        async with two_hosts(tmp_path, scenario, time.time) as (a, b, _):
            first, w1 = await banner(a)
            second, w2 = await banner(b)
            third, w3 = await banner(a)
            assert (first, second, third) == (220, 220, 421)
            w1.close()
            await w1.wait_closed()
            # the close is counted in the shared book (its own thread): the
            # next connection is taken once it is
            for _ in range(200):
                code, w4 = await banner(b)
                w4.close()
                if code == 220:
                    break
                await asyncio.sleep(0.01)
            assert code == 220
            for w in (w2, w3):
                w.close()

    asyncio.run(run())


def test_a_dead_owners_open_connections_stop_counting(tmp_path: Path) -> None:
    """An owner whose heartbeat stopped (a killed worker) no longer counts:
    its rows are in the file as a kill -9 leaves them."""
    scenario = load_text("""\
scenario: conns
server:
  limits:
    max_connections: 1
""", "conns.yaml")
    path = tmp_path / "h.db"
    with Store(path):
        pass
    shared = open_shared(path)
    shared.close()
    db = sqlite3.connect(state_path(path))
    with db:
        db.execute("INSERT INTO engine_owners (owner, seen) VALUES ('dead:1:x', ?)",
                   (time.time() - STALE - 1,))
        db.execute("INSERT INTO engine_open (ns, client, owner, n) VALUES"
                   " ('conns', '192.0.2.1', 'dead:1:x', 5)")
        db.execute("INSERT INTO engine_owners (owner, seen) VALUES ('alive:1:x', ?)",
                   (time.time(),))
    db.close()

    async def run() -> None:
        async with two_hosts(tmp_path, scenario, time.time) as (a, _, _):
            reader, writer = await asyncio.open_connection(a.host, a.port)
            assert (await reader.readline()).startswith(b"220")
            writer.close()

    asyncio.run(run())


def test_concurrent_decisions_from_two_owners_number_attempts_without_gaps(
        tmp_path: Path) -> None:
    """Eight threads through two SharedStates, 50 RCPT decisions each for
    one pair: the counter ends at 400 (no update lost: no two decisions saw
    the same attempt number)."""
    scenario = load_text("""\
scenario: counted
rules:
  - name: never
    on: rcpt
    when: {attempt: "> 100000"}
    reply: 550 5.0.0 never
""", "counted.yaml")
    path = tmp_path / "h.db"
    engine = Engine(scenario)
    states = [open_shared(path), open_shared(path)]
    seen: list[int] = []
    lock = threading.Lock()

    class Facts:
        def __init__(self) -> None:
            self.connection = engine.connect("192.0.2.7")
            self.tls, self.helo, self.auth_user = False, "c", None
            self.mail_from, self.declared_size, self.spf = "a@lab.test", None, None
            self.rcpts: list[str] = []
            self.message_index, self.rcpt_index = 1, 1

    def work(state: SharedState) -> None:
        facts = Facts()
        for _ in range(50):
            state.decide("counted", engine, facts, Rcpt(recipient="b@lab.test")).result(30)
            with lock:
                seen.append(0)

    try:
        threads = [threading.Thread(target=work, args=(states[i % 2],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        db = sqlite3.connect(state_path(path))
        (n,) = db.execute("SELECT num FROM engine_state WHERE kind = 'attempt'").fetchone()
        db.close()
        assert n == 400 and len(seen) == 400
        # and the next decision sees attempt 401
        facts = Facts()
        d = states[0].decide("counted", engine, facts, Mail(sender="a@lab.test")).result(30)
        assert d.accepts
    finally:
        for s in states:
            s.close()
