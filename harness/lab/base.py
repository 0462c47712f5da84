"""What every lab MTA shares: `LabMta`, the interface the lab runner drives
(Postfix and Exim implement it), and `QueueEntry`, one queued message as
either MTA reports it.

    with PostfixLab(relay) as mta:          # or EximLab(relay)
        qid = mta.submit_smtp(sender, [rcpt], message)
        entry = mta.wait_deferred(qid)      # a QueueEntry: status, reason, ...
        mta.wait_queue_empty()
        mta.log_path, mta.maillog()         # where the MTA logs, and what it wrote

This module knows processes, sockets and files of a private instance on
loopback; it knows nothing of Postfix's or Exim's commands (their modules
do). The shared parts are: submission over SMTP with smtplib, the waits on
the queue (bounded polls: neither MTA offers an event for "queue empty" or
"message deferred"), stopping with a check that no process survived,
removing a temporary directory while keeping the log texts, and the
at-exit safety net for a lab its owner never stopped.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import os
import re
import select
import shutil
import smtplib
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Self

from harness.errors import HarnessError

LOOPBACK = "127.0.0.1"
SUBMIT_HELO = "submit.lab.test"  # our EHLO name toward the MTA: no getfqdn() lookup
POLL_INTERVAL = 0.05
_NOTIFY = ("SUCCESS", "FAILURE", "DELAY", "NEVER")

QueueStatus = Literal["active", "deferred", "hold"]


class LabMtaError(HarnessError):
    """A lab MTA could not be set up, started, stopped or driven."""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueEntry:
    """One message in a lab MTA's queue.

    `arrival` is when the MTA queued it (Unix time); `status` is where it is:
    `active` (new, or being delivered now), `deferred` (an attempt failed
    temporarily; it waits for a retry) or `hold` (held or frozen: no retry
    until someone releases it). `reason` is the last delivery attempt's
    reason as the MTA recorded it (the remote reply, quoted), or None before
    any attempt. `recipients` are those still to be delivered."""

    queue_id: str
    sender: str
    recipients: tuple[str, ...]
    arrival: float
    size: int
    status: QueueStatus
    reason: str | None = None

    def age(self, now: float | None = None) -> float:
        """Seconds since the MTA queued the message."""
        return max(0.0, (time.time() if now is None else now) - self.arrival)


# ---------------------------------------------------------------- process helpers


def free_port() -> int:
    """An ephemeral port on 127.0.0.1 that is free right now.

    The MTA binds it a moment later (with SO_REUSEADDR); if someone else
    took it in between, `start()` picks another and retries."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, session id) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return fields[0], int(fields[3])


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until the processes exit; return those still alive at the timeout.

    A pidfd becomes readable when its process exits: an event, not a poll.
    (Kernels without pidfd_open fall back to a 50 ms check of /proc.)"""
    deadline = time.monotonic() + timeout
    fds: dict[int, int] = {}
    poller = select.poll()
    polled: set[int] = set()
    try:
        for pid in set(pids):
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            except OSError:
                polled.add(pid)
                continue
            fds[fd] = pid
            poller.register(fd, select.POLLIN)
        while fds or polled:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            wait_ms = int(min(left, POLL_INTERVAL) * 1000) if polled else int(left * 1000) + 1
            for fd, _ in poller.poll(wait_ms):
                poller.unregister(fd)
                os.close(fd)
                del fds[fd]
            polled = {p for p in polled if (proc_stat(p) or ("Z", 0))[0] != "Z"}
        return set(fds.values()) | polled
    finally:
        for fd in fds:
            os.close(fd)


#: Every lab not yet stopped, strongly held: a lab its owner dropped without
#: stop() still has processes and a directory to clean up at exit.
_labs: set[LabMta] = set()


@atexit.register
def _stop_all() -> None:
    """An interpreter that exits without stop() leaves no MTA and no temp dir behind."""
    for lab in list(_labs):
        with contextlib.suppress(Exception):
            lab.stop()


# ---------------------------------------------------------------- the interface


class LabMta(abc.ABC):
    """A private MTA instance on loopback relaying everything to `relay`.

    Subclasses set `kind` ("postfix", "exim"), `error` (their LabMtaError
    subclass) and `queue_id_reply` (how the MTA names the queue ID in its
    250 after DATA), and implement the MTA-specific parts below. The
    constructor of a subclass calls `_init_common()` before anything that
    can fail, and `_register()` once the instance exists on disk."""

    kind: ClassVar[str]
    error: ClassVar[type[LabMtaError]] = LabMtaError
    queue_id_reply: ClassVar[re.Pattern[bytes]]

    relay: tuple[str, int]
    host: str
    port: int
    root: Path
    temporary: bool
    keep: bool

    def _init_common(self, relay: tuple[str, int], root: Path, *, temporary: bool,
                     keep: bool) -> None:
        self.relay = (str(relay[0]), int(relay[1]))
        self.host = LOOPBACK
        self.root = root
        self.temporary = temporary  # ours to remove at stop()
        self.keep = keep
        self._started = False
        self._final_logs: dict[str, str] | None = None

    def _register(self) -> None:
        _labs.add(self)

    # -- what each MTA provides ----------------------------------------

    @staticmethod
    @abc.abstractmethod
    def unavailable() -> str | None:
        """Why this MTA's lab cannot run on this machine, or None if it can."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The instance's name as its log lines carry it."""

    @property
    @abc.abstractmethod
    def log_path(self) -> Path:
        """The file the MTA logs deliveries to (its main log). Removed with a
        temporary instance's directory at stop(); `maillog()` keeps the text."""

    @abc.abstractmethod
    def start(self) -> Self:
        """Start the instance; raise `error` with the log's tail on failure."""

    @abc.abstractmethod
    def queue(self) -> list[QueueEntry]:
        """The messages queued now, as the MTA lists them."""

    @abc.abstractmethod
    def _queued_count(self) -> int:
        """How many messages are queued, read cheaply enough to poll."""

    @abc.abstractmethod
    def _raise_if_failed(self) -> None:
        """Raise `error` if a daemon of the instance died or reported a failure."""

    @abc.abstractmethod
    def _kill_instance(self) -> None:
        """Stop every process of the instance."""

    @abc.abstractmethod
    def processes(self) -> list[int]:
        """PIDs of this instance's live processes."""

    @abc.abstractmethod
    def _read_logs(self) -> dict[str, str]:
        """Every log of the instance by name ("main" first), read from disk."""

    def _verify_stopped(self) -> None:
        left = self.processes()
        if left:
            raise self.error(f"{self.kind} processes of {self.name} survived stop: {left}")

    # -- lifecycle -------------------------------------------------------

    def stop(self) -> None:
        """Stop every process of this instance (always safe to call), then
        remove a temporary directory (the log texts are kept in memory)."""
        _labs.discard(self)
        try:
            if self.root.exists():
                self._kill_instance()
                self._verify_stopped()
        finally:
            self._started = False
            if self._final_logs is None and self.temporary and not self.keep:
                self._final_logs = self._read_logs()
                shutil.rmtree(self.root, ignore_errors=True)

    def _check_restartable(self) -> None:
        if self._final_logs is not None:
            raise self.error("this lab was stopped and its directory removed; make a new one")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._started

    # -- logs ------------------------------------------------------------

    def _log(self, name: str) -> str:
        if self._final_logs is not None:
            return self._final_logs.get(name, "")
        return self._read_logs().get(name, "")

    def maillog(self) -> str:
        """The MTA's main log so far (kept after a temporary directory is gone)."""
        return self._log("main")

    def _log_tail(self, lines: int = 25) -> str:
        tail = self.maillog().splitlines()[-lines:]
        return (f"\n--- {self.log_path.name} tail ---\n" + "\n".join(tail)) if tail else ""

    # -- submission ------------------------------------------------------

    def dsn_notify(self, value: str | Iterable[str]) -> list[str]:
        """RFC 3461 NOTIFY words, checked."""
        words = value.split(",") if isinstance(value, str) else list(value)
        out = [w.strip().upper() for w in words if w.strip()]
        bad = [w for w in out if w not in _NOTIFY]
        if not out or bad:
            raise self.error(f"dsn_notify {value!r}: use NEVER or any of SUCCESS, FAILURE,"
                             " DELAY")
        if "NEVER" in out and len(out) > 1:
            raise self.error("dsn_notify: NEVER cannot be combined with other values")
        return out

    def dsn_ret(self, value: str) -> str:
        ret = value.strip().upper()
        if ret not in ("FULL", "HDRS"):
            raise self.error(f"ret {value!r}: use FULL or HDRS")
        return ret

    def submit_smtp(self, mail_from: str, rcpts: str | Iterable[str], message: bytes | str, *,
                    dsn_notify: str | Iterable[str] | None = None, envid: str | None = None,
                    ret: str | None = None, timeout: float = 10) -> str:
        """Submit through the instance's SMTP listener with smtplib (explicit
        EHLO name, no DNS; SMTPUTF8 and BODY=8BITMIME where the message needs
        them). DSN parameters go on MAIL (RET, ENVID) and RCPT (NOTIFY).
        Returns the MTA's queue ID; any refusal raises `error`."""
        rcpt_list = [rcpts] if isinstance(rcpts, str) else list(rcpts)
        data = message.encode() if isinstance(message, str) else bytes(message)
        mail_opts: list[str] = []
        rcpt_opts: list[str] = []
        if any(not a.isascii() for a in (mail_from, *rcpt_list)):
            mail_opts.append("SMTPUTF8")
        if not data.isascii():
            mail_opts.append("BODY=8BITMIME")
        if ret is not None:
            mail_opts.append(f"RET={self.dsn_ret(ret)}")
        if envid is not None:
            mail_opts.append(f"ENVID={xtext(envid)}")
        if dsn_notify is not None:
            rcpt_opts.append("NOTIFY=" + ",".join(self.dsn_notify(dsn_notify)))
        where = f"{self.kind} {self.host}:{self.port}"
        try:
            with smtplib.SMTP(self.host, self.port, local_hostname=SUBMIT_HELO,
                              timeout=timeout) as s:
                s.ehlo()
                code, reply = s.mail(mail_from, mail_opts)
                if code != 250:
                    raise self.error(f"{where}: MAIL FROM:<{mail_from}> got {code} "
                                     f"{reply.decode(errors='replace')}")
                refused = {}
                for r in rcpt_list:
                    code, reply = s.rcpt(r, rcpt_opts)
                    if code not in (250, 251):
                        refused[r] = f"{code} {reply.decode(errors='replace')}"
                if refused or not rcpt_list:
                    s.rset()
                    raise self.error(f"{where}: recipients refused: {refused or 'none given'}")
                code, reply = s.data(data)
                if code != 250:
                    raise self.error(f"{where}: DATA got {code} "
                                     f"{reply.decode(errors='replace')}")
        except (OSError, smtplib.SMTPException) as e:
            raise self.error(f"{where}: {e}{self._log_tail()}") from e
        m = self.queue_id_reply.search(reply)
        if m is None:
            raise self.error(f"{where}: no queue ID in {reply!r}")
        return m.group(1).decode()

    # -- the queue -------------------------------------------------------

    def wait_queue_empty(self, timeout: float = 10) -> float:
        """Wait until no message is queued (bounces the MTA has just generated
        included); return the seconds waited.

        Polls every 50 ms, bounded by `timeout`: neither MTA offers an event
        for it. Two empty looks in a row are required: a message moving
        between queue directories during one look could be missed."""
        start = time.monotonic()
        deadline = start + timeout
        empty_seen = 0
        while True:
            self._raise_if_failed()
            if self._queued_count() == 0:
                empty_seen += 1
                if empty_seen >= 2:
                    return time.monotonic() - start
            else:
                empty_seen = 0
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
        queued = self.queue() if self._started else "(not running)"
        raise self.error(f"{self.name}: queue not empty after {timeout:g}s: "
                         f"{queued}{self._log_tail()}")

    def wait_deferred(self, queue_id: str, timeout: float = 10) -> QueueEntry:
        """Wait until a delivery attempt of the message failed temporarily
        and it waits for a retry; return its queue entry (with the reason).

        Polls the queue every 50 ms, bounded by `timeout`: there is no event
        for "message deferred" either."""
        deadline = time.monotonic() + timeout
        while True:
            self._raise_if_failed()
            for entry in self.queue():
                if entry.queue_id == queue_id and entry.status == "deferred":
                    return entry
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
        raise self.error(f"{self.name}: {queue_id} not deferred after {timeout:g}s: "
                         f"{self.queue()}{self._log_tail()}")


def xtext(value: str) -> str:
    """RFC 3461 xtext, for ENVID."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}"
                   for c in value)
