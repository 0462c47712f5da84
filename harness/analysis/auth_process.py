"""DKIM and DMARC of large messages in a process of their own.

dkimpy canonicalizes a message's body in Python, holding the interpreter
lock: in a thread of the server a signed 20 MB message held the event loop
(every other session) for 0.3 to 4 s. `AuthProcess.check` (called from a
worker thread) hands the check to `python -m harness.analysis.auth_process`
and waits for its answer; the thread waits on a pipe, the lock let go.

The protocol, between this module and itself: each job and each answer is a
pickle (the server's own process talks to its own child: nothing else writes
to these pipes) after its length as 8 bytes, big-endian. A job is
(parts, zone, client_ip, helo, mail_from, hostname) for check_message_apart;
the answer is its AuthResults, or the exception it raised. The child ignores
Ctrl-C and SIGTERM (a terminal sends them to the whole process group: the
server ends the child when it stops) and ends when its input does.

Written with subprocess rather than multiprocessing: multiprocessing's
spawn and forkserver import the parent's __main__ again in the child, which
runs a user's script (one that starts a Harness without a __main__ guard) a
second time; fork is unsafe in a process with threads."""

from __future__ import annotations

import contextlib
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import IO, Any

from harness.analysis.auth import AuthResults, check_message_apart

#: a job's or an answer's length, before it
_LENGTH = 8


class AuthProcessError(Exception):
    """The checks' process could not answer (it died, twice in a row)."""


def _write(out: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(len(data).to_bytes(_LENGTH, "big"))
    out.write(data)
    out.flush()


def _read(src: IO[bytes]) -> Any:
    head = src.read(_LENGTH)
    if len(head) < _LENGTH:
        raise EOFError("the other end closed")
    n = int.from_bytes(head, "big")
    data = src.read(n)
    if len(data) < n:
        raise EOFError("the other end closed mid-answer")
    return pickle.loads(data)


class AuthProcess:
    """The parent's side: one child, started when first needed, one check
    at a time (callers queue on a lock). Thread-safe; `check` blocks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self.started = 0  # children started (a dead one is replaced)

    def check(self, parts: Sequence[bytes | bytearray],
              zone: Mapping[str, Mapping[str, Sequence[str]]] | None, *, client_ip: str,
              helo: str, mail_from: str, hostname: str) -> AuthResults:
        job = (tuple(parts), zone, client_ip, helo, mail_from, hostname)
        with self._lock:
            for again in (False, True):
                proc = self._running()
                assert proc.stdin is not None and proc.stdout is not None
                try:
                    _write(proc.stdin, job)
                    answer = _read(proc.stdout)
                except (OSError, EOFError) as e:  # it died (killed, out of memory)
                    self._end(proc)
                    if again:
                        raise AuthProcessError(f"the DKIM/DMARC process died: {e}") from e
                    continue
                if isinstance(answer, BaseException):
                    raise answer
                assert isinstance(answer, AuthResults)
                return answer
        raise AssertionError("unreachable")

    @property
    def pid(self) -> int | None:
        """The child's process id (None: none running)."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def close(self) -> None:
        """End the child (its input closed; killed if it does not end)."""
        with self._lock:
            if self._proc is not None:
                self._end(self._proc)

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "harness.analysis.auth_process"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self.started += 1
        return self._proc

    def _end(self, proc: subprocess.Popen[bytes]) -> None:
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._proc is proc:
            self._proc = None


def main() -> int:
    """The child: jobs in, answers out, until its input ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    src, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            parts, zone, client_ip, helo, mail_from, hostname = _read(src)
        except EOFError:
            return 0
        try:
            answer: Any = check_message_apart(parts, zone, client_ip=client_ip, helo=helo,
                                              mail_from=mail_from, hostname=hostname)
        except Exception as e:  # told to the server: the session answers 451
            answer = e
        try:
            try:
                _write(out, answer)
            except (pickle.PicklingError, TypeError, AttributeError):  # an odd exception
                _write(out, RuntimeError(f"{type(answer).__name__}: {answer}"))
        except OSError:  # the server is gone
            return 0


if __name__ == "__main__":
    sys.exit(main())
