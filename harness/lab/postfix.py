"""`PostfixLab`: a private, throw-away Postfix instance relaying to the harness.

    with Harness("mailbox-full") as h, PostfixLab((h.host, h.port)) as pf:
        pf.submit("sender@lab.test", ["full@lab.test"], message)
        pf.wait_queue_empty(timeout=10)
        h.messages(rcpt="sender@lab.test")     # Postfix's NDR, MAIL FROM:<>

The instance lives in its own directory tree (config, queue, log), listens on
127.0.0.1 only (its smtpd on an ephemeral port it picks), does no DNS at all,
and sends *everything* to the relay: ordinary mail and the bounces it
generates for the sender (`mydestination =`, no local delivery). Timings are
shrunk to seconds so retries, delay warnings and expiry happen within a test.
Any main.cf key can be overridden with `settings`; `transports` routes
domains elsewhere (e.g. to a second harness port).

It needs Debian's postfix package and root (the master drops privileges to
the `postfix` user); `PostfixLab.unavailable()` says why it cannot run here.
Several instances coexist: each has its own directories, port, syslog name
and myhostname.

Retry timing, as Postfix 3.7 does it (qmgr, whole seconds): a deferred
message is dated int(now) + backoff and taken back once that date is at most
int(now) + 1, at a deferred-queue scan (every queue_run_delay). So with
queue_run_delay = 1s a retry comes about minimal_backoff_time - 1 s after
the failed attempt (measured: 1.01 s for 2s, 2.01 s for 3s), never earlier
than that whole second.

Postfix commands used: `postfix -c DIR check|start|status`, `postqueue -c DIR
-j|-f|-i`, `postsuper -c DIR -e`, `sendmail -C DIR`, `postconf`. Stopping
signals the instance's master directly (what `postfix stop` does, without its
one-second sleeps) and waits for every process of the instance to exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from harness.lab.base import (
    LOOPBACK,
    POLL_INTERVAL,
    LabMta,
    LabMtaError,
    QueueEntry,
    QueueStatus,
    free_port,
    proc_stat,
    wait_gone,
)

_SBIN = ("/usr/sbin", "/sbin", "/usr/lib/sendmail")
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")
_DOMAIN = re.compile(r"^[^\s:]+$")
#: a message in the incoming queue dated more than this many seconds ahead
#: was put off by the queue manager (see PostfixLab.queue)
INCOMING_AHEAD = 5.0
#: postqueue -j's queue names: maildrop and incoming are on their way in
_STATUS: dict[str, QueueStatus] = {"maildrop": "active", "incoming": "active",
                                   "active": "active", "deferred": "deferred", "hold": "hold"}


class PostfixLabError(LabMtaError):
    """The lab Postfix could not be set up, started, stopped or driven."""


# ---------------------------------------------------------------- helpers


def _tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


def _env() -> dict[str, str]:
    env = {**os.environ, "LANG": "C", "LC_ALL": "C"}
    env.pop("MAIL_CONFIG", None)  # -c / -C say which instance
    return env


def _read_until_exit(proc: subprocess.Popen[bytes], fd: int, timeout: float) -> bytes:
    """Collect what `proc` writes to the pty `fd` until it exits.

    Waits on the output and on the process's pidfd (both events); daemons it
    started may keep the terminal open, so EOF is not awaited."""
    deadline = time.monotonic() + timeout
    out = bytearray()
    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except OSError:
        pidfd = None
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            waitables = [fd] if pidfd is None else [fd, pidfd]
            ready, _, _ = select.select(waitables, [], [],
                                        min(left, POLL_INTERVAL) if pidfd is None else left)
            if fd in ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    chunk = b""
                if chunk:
                    out += chunk
                    continue
                proc.wait(max(0.0, deadline - time.monotonic()))
                return bytes(out)
            if proc.poll() is not None:  # exited; take what is still buffered
                while select.select([fd], [], [], 0)[0]:
                    try:
                        chunk = os.read(fd, 65536)
                    except OSError:
                        break
                    if not chunk:
                        break
                    out += chunk
                return bytes(out)
    finally:
        if pidfd is not None:
            os.close(pidfd)


# ---------------------------------------------------------------- the lab


class PostfixLab(LabMta):
    """A private Postfix instance on loopback whose relayhost is `relay`.

    `workdir`: where to build the instance (created if missing, kept after
    `stop()`); default a temporary directory, removed by `stop()`.
    `settings`: main.cf keys that override the lab defaults (values as
    Postfix writes them, with units: "2s").
    `transports`: domain -> (host, port) routes (texthash transport_maps),
    or domain -> a raw Postfix transport such as "error:5.1.1 no such user".
    """

    kind = "postfix"
    error = PostfixLabError
    queue_id_reply = re.compile(rb"queued as ([0-9A-Za-z]+)")

    def __init__(self, relay: tuple[str, int], workdir: str | Path | None = None, *,
                 settings: Mapping[str, str] | None = None,
                 transports: Mapping[str, tuple[str, int] | str] | None = None,
                 keep: bool = False) -> None:
        missing = [t for t in ("postfix", "postconf", "postqueue", "postsuper") if not _tool(t)]
        if missing:
            raise PostfixLabError(f"Postfix is not installed (missing {', '.join(missing)}):"
                                  " apt-get install postfix")
        self.token = secrets.token_hex(4)
        self._init_common(relay, Path(tempfile.mkdtemp(prefix="postfix-lab-")
                                      if workdir is None else workdir).resolve(),
                          temporary=workdir is None, keep=keep)
        self.config_dir = self.root / "etc"
        self.queue_directory = self.root / "spool"
        self.data_directory = self.root / "data"  # created by `postfix check`, not by us
        self.maillog_path = self.root / "log" / "maillog"
        self.syslog_name = f"postfix-lab-{self.token}"
        self._master_pid: int | None = None
        self._log_mark = 0  # maillog offset at the last start attempt
        #: messages put off in the incoming queue that queue() took up (and
        #: when it last asked the queue manager to scan for them)
        self.kicks = 0
        self._taken: dict[str, float] = {}
        try:
            self.port = free_port()
            self.transports = dict(transports or {})
            self.settings = self._settings(dict(settings or {}))
            self._write_tree()
        except BaseException:
            if self.temporary:
                shutil.rmtree(self.root, ignore_errors=True)
            raise
        self._register()

    # -- configuration ---------------------------------------------------

    @staticmethod
    def unavailable() -> str | None:
        """Why a lab Postfix cannot run on this machine, or None if it can."""
        missing = [t for t in ("postfix", "postconf", "postqueue", "postsuper", "sendmail")
                   if not _tool(t)]
        if missing:
            return f"Postfix is not installed (missing {', '.join(missing)})"
        if os.geteuid() != 0:
            return "a private Postfix instance needs root (its master drops privileges)"
        return None

    @property
    def name(self) -> str:
        return self.syslog_name

    @property
    def log_path(self) -> Path:
        """The instance's maillog_file (Postfix's own log format, as syslog writes it)."""
        return self.maillog_path

    @property
    def myhostname(self) -> str:
        return self.settings["myhostname"]

    def _settings(self, overrides: dict[str, str]) -> dict[str, str]:
        host, port = self.relay
        root = str(self.root)
        s: dict[str, str] = {
            "compatibility_level": _compatibility_level(),
            # -- instance isolation (config_directory comes from -c)
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self.data_directory),
            "syslog_name": self.syslog_name,
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": root,
            # -- identity; nothing is delivered locally, bounces go out via the relay
            "myhostname": f"mta-{self.token}.lab.test",
            "mydomain": "lab.test",
            "myorigin": "$mydomain",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            # -- loopback only, relaying for loopback only
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtp_bind_address": LOOPBACK,
            "relayhost": f"[{host}]:{port}",
            # -- no DNS at all
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            # -- fast queue, retry and DSN timing (Postfix counts in whole seconds)
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "maximal_queue_lifetime": "20s",
            "bounce_queue_lifetime": "20s",
            "delay_warning_time": "0s",
            "in_flow_delay": "0s",
            "bounce_template_file": str(self.config_dir / "bounce.cf"),
            # -- short SMTP client timeouts (the wait for the banner is smtp_helo_timeout)
            **{f"smtp_{phase}_timeout": "5s" for phase in (
                "connect", "helo", "mail", "rcpt", "data_init", "data_xfer", "data_done",
                "rset", "quit")},
            "smtpd_timeout": "30s",
        }
        if self.transports:
            s["transport_maps"] = f"texthash:{self.config_dir / 'transport'}"
        for key, value in overrides.items():
            value = str(value)
            if not _KEY.match(key) or "\n" in value or "\r" in value:
                raise PostfixLabError(f"setting {key!r} = {value!r}: one main.cf key, one line")
            s[key] = value
        return s

    def _master_cf(self) -> str:
        # service   type  private unpriv chroot wakeup maxproc command; chroot off everywhere
        services = [
            (f"{LOOPBACK}:{self.port}", "inet", "n", "-", "n", "-", "-", "smtpd"),
            ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
            ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
            ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
            ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
            ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
            ("verify", "unix", "-", "-", "n", "-", "1", "verify"),
            ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
            ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
            ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("relay", "unix", "-", "-", "n", "-", "-", "smtp"),
            ("error", "unix", "-", "-", "n", "-", "-", "error"),
            ("retry", "unix", "-", "-", "n", "-", "-", "error"),
            ("discard", "unix", "-", "-", "n", "-", "-", "discard"),
            ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
            ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
            # TLS session cache and PRNG seeding, needed for smtp_tls_security_level
            ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr"),
            ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
        ]
        lines = ["# Written by harness.lab.postfix; the smtpd port is picked per instance."]
        lines += ["  ".join(f"{f:<10}" for f in row).rstrip() for row in services]
        return "\n".join(lines) + "\n"

    def _main_cf(self) -> str:
        lines = [f"# Written by harness.lab.postfix for a private lab instance ({self.token}).",
                 f"# Start by hand: postfix -c {self.config_dir} start"]
        lines += [f"{k} = {v}" for k, v in self.settings.items()]
        return "\n".join(lines) + "\n"

    def _transport_map(self) -> str:
        lines = ["# domain  transport:nexthop (texthash: read at start-up, no postmap)"]
        for domain, route in self.transports.items():
            if not _DOMAIN.match(domain):
                raise PostfixLabError(f"transports: bad domain {domain!r}")
            target = route if isinstance(route, str) else f"smtp:[{route[0]}]:{int(route[1])}"
            if "\n" in target:
                raise PostfixLabError(f"transports: bad route {route!r}")
            lines.append(f"{domain}\t{target}")
        return "\n".join(lines) + "\n"

    def _write_tree(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the postfix user must reach its queue below it
        for d in (self.config_dir, self.queue_directory, self.maillog_path.parent):
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
        self._write_config("main.cf", self._main_cf())
        self._write_config("master.cf", self._master_cf())
        self._write_config("bounce.cf", _BOUNCE_TEMPLATES)
        if self.transports:
            self._write_config("transport", self._transport_map())

    def _write_config(self, name: str, text: str) -> None:
        """Write a config file, dated a few seconds back.

        Postfix treats a file modified within the last second or so as "hot"
        (it may still be being written) and re-reads it every 300 ms until it
        has cooled down: every command run right after the file was written
        (postfix check, start, postqueue) would stall for about 2 s."""
        path = self.config_dir / name
        path.write_text(text)
        past = time.time() - 10
        os.utime(path, (past, past))

    # -- commands --------------------------------------------------------

    def _run(self, *argv: str, input: bytes | None = None, timeout: float = 30,
             check: bool = True) -> subprocess.CompletedProcess[bytes]:
        tool = _tool(argv[0])
        if tool is None:
            raise PostfixLabError(f"{argv[0]}: not installed")
        try:
            p = subprocess.run([tool, *argv[1:]], input=input, capture_output=True,
                               timeout=timeout, env=_env(), check=False)
        except subprocess.TimeoutExpired as e:
            raise PostfixLabError(f"{' '.join(argv)}: no answer after {timeout:g}s"
                                  f"{self._log_tail()}") from e
        if check and p.returncode != 0:
            out = (p.stdout + p.stderr).decode(errors="replace").strip()
            raise PostfixLabError(f"{' '.join(argv)} failed (exit {p.returncode})"
                                  f"{': ' + out if out else ''}{self._log_tail()}")
        return p

    def _postfix(self, command: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """`postfix -c DIR COMMAND`, its output captured through a pseudo-terminal:
        Postfix commands write their messages to stderr only when it is a
        terminal (else only to syslog/maillog, and errors found while reading
        main.cf go nowhere: there is no syslog here)."""
        argv = ["postfix", "-c", str(self.config_dir), command]
        tool = _tool("postfix")
        if tool is None:
            raise PostfixLabError("postfix: not installed")
        primary, secondary = os.openpty()
        out = bytearray()
        try:
            proc = subprocess.Popen([tool, *argv[1:]], stdin=subprocess.DEVNULL,
                                    stdout=secondary, stderr=secondary, env=_env())
        except BaseException:
            os.close(primary)
            os.close(secondary)
            raise
        os.close(secondary)
        try:
            out += _read_until_exit(proc, primary, timeout=30)
        except subprocess.TimeoutExpired as e:
            proc.kill()
            proc.wait()
            raise PostfixLabError(f"{' '.join(argv)}: no answer after 30s"
                                  f"{self._log_tail()}") from e
        finally:
            os.close(primary)
        text = out.decode(errors="replace").replace("\r\n", "\n").strip()
        if check and proc.returncode != 0:
            raise PostfixLabError(f"{' '.join(argv)} failed (exit {proc.returncode})"
                                  f"{': ' + text if text else ''}{self._log_tail()}")
        return subprocess.CompletedProcess(argv, proc.returncode, text.encode(), b"")

    def postconf(self, name: str) -> str:
        """A parameter's value as this instance sees it (`postconf -c DIR -xh NAME`)."""
        p = self._run("postconf", "-c", str(self.config_dir), "-xh", name)
        return p.stdout.decode().strip()

    # -- lifecycle -------------------------------------------------------

    def start(self) -> PostfixLab:
        """`postfix check` then `postfix start`; raises with the maillog tail on failure."""
        if self._started:
            return self
        self._check_restartable()
        try:
            self._postfix("check")
            for tries in range(3, 0, -1):
                self._log_mark = len(self.maillog())
                p = self._postfix("start", check=False)
                if p.returncode == 0:
                    break
                if tries > 1 and "Address already in use" in self.maillog()[self._log_mark:]:
                    self.port = free_port()  # lost a race for the port: pick another
                    self._write_config("master.cf", self._master_cf())
                    self._kill_instance()
                    continue
                out = (p.stdout + p.stderr).decode(errors="replace").strip()
                raise PostfixLabError(f"postfix -c {self.config_dir} start failed "
                                      f"(exit {p.returncode}){': ' + out if out else ''}"
                                      f"{self._log_tail()}")
            self._master_pid = self._read_master_pid()
            if self._master_pid is None:
                raise PostfixLabError(f"postfix started but wrote no master.pid{self._log_tail()}")
            # A round trip through the master (showq) proves it serves requests;
            # a daemon that already died on its settings is reported now (the
            # queue waits report later ones as soon as they are logged).
            self.queue()
            self._raise_if_failed()
        except BaseException:
            self._kill_instance()
            raise
        self._started = True
        return self

    def __repr__(self) -> str:
        state = "running" if self._started else "stopped"
        return (f"<PostfixLab {self.syslog_name} {state} smtpd {self.host}:{self.port}"
                f" relay [{self.relay[0]}]:{self.relay[1]} dir {self.root}>")

    def _read_master_pid(self) -> int | None:
        try:
            return int((self.queue_directory / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def processes(self) -> list[int]:
        """PIDs of this instance's live processes.

        Every Postfix daemon runs in the queue directory (the master chdirs
        there before it forks), and ours is a unique path: that identifies
        the instance's processes, orphans included, and never another
        program's. The master's session (it calls setsid) is added, once the
        master itself is identified that way; a stale master.pid is ignored."""
        spool = str(self.queue_directory)
        me = os.getpid()
        stats: dict[int, tuple[str, int]] = {}
        found: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            st = proc_stat(pid)
            if st is None or st[0] == "Z":
                continue
            stats[pid] = st
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/cwd") == spool:
                    found.add(pid)
        master = self._read_master_pid()
        if master in found:
            found |= {pid for pid, st in stats.items() if st[1] == master}
        return sorted(found)

    def _kill_instance(self) -> None:
        """SIGTERM the master (it terminates its process group, as on `postfix
        stop`) and wait for every process of the instance; SIGKILL stragglers."""
        procs = set(self.processes())
        if not procs:
            return
        master = self._read_master_pid()
        targets = [master] if master in procs else sorted(procs)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        left = wait_gone(procs, timeout=5)
        left |= set(self.processes())
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_gone(left, timeout=5)

    def _verify_stopped(self) -> None:
        if (self.queue_directory / "pid" / "master.pid").exists():  # a master ever ran
            status = self._postfix("status", check=False)
            if status.returncode == 0:
                raise PostfixLabError(f"postfix -c {self.config_dir} status: still running"
                                      f"{self._log_tail()}")
        super()._verify_stopped()

    # -- submission ------------------------------------------------------

    def submit(self, mail_from: str, rcpts: str | Iterable[str], message: bytes | str, *,
               dsn_notify: str | Iterable[str] | None = None, envid: str | None = None,
               ret: str | None = None, via: Literal["smtp", "sendmail"] = "smtp"
               ) -> str | None:
        """Hand a message to Postfix: `via="smtp"` (its smtpd; returns the queue
        ID) or `via="sendmail"` (the sendmail command; returns None)."""
        if via == "smtp":
            return self.submit_smtp(mail_from, rcpts, message, dsn_notify=dsn_notify,
                                    envid=envid, ret=ret)
        if via == "sendmail":
            self.submit_sendmail(mail_from, rcpts, message, dsn_notify=dsn_notify,
                                 envid=envid, ret=ret)
            return None
        raise PostfixLabError(f"via {via!r}: use 'smtp' or 'sendmail'")

    def submit_sendmail(self, mail_from: str, rcpts: str | Iterable[str],
                        message: bytes | str, *, dsn_notify: str | Iterable[str] | None = None,
                        envid: str | None = None, ret: str | None = None,
                        timeout: float = 10) -> None:
        """Submit with `sendmail -C DIR` (-N notify, -V envid, -R ret); the
        message goes through maildrop and pickup, like a local program's mail.
        The queue ID is assigned later by pickup, so none is returned."""
        rcpt_list = [rcpts] if isinstance(rcpts, str) else list(rcpts)
        if not rcpt_list:
            raise PostfixLabError("submit_sendmail: no recipients")
        data = message.encode() if isinstance(message, str) else bytes(message)
        argv = ["sendmail", "-C", str(self.config_dir), "-i", "-f", mail_from]
        if dsn_notify is not None:
            argv += ["-N", ",".join(self.dsn_notify(dsn_notify)).lower()]
        if envid is not None:
            # Postfix's sendmail reads "-V xy" (two characters) as the pre-2.3 VERP
            # option, not as an envelope ID, and ignores unprintable or long ones.
            if len(envid) == 2 or len(envid) > 100 or not envid.isascii() \
                    or not envid.isprintable():
                raise PostfixLabError(f"envid {envid!r}: sendmail -V takes 1 or 3-100 printable"
                                      " ASCII characters (two would mean VERP); use"
                                      " submit_smtp() for others")
            argv += ["-V", envid]
        if ret is not None:
            argv += ["-R", self.dsn_ret(ret).lower()]
        self._run(*argv, "--", *rcpt_list, input=data, timeout=timeout)

    # -- the queue -------------------------------------------------------

    def postqueue(self) -> list[dict[str, Any]]:
        """The queue as `postqueue -j` reports it: one dict per message
        (queue_name, queue_id, arrival_time, message_size, forced_expire,
        sender, recipients [{address, delay_reason}])."""
        p = self._run("postqueue", "-c", str(self.config_dir), "-j")
        return [json.loads(line) for line in p.stdout.decode().splitlines() if line.strip()]

    def queue(self) -> list[QueueEntry]:
        """The queue (`postqueue -j`), one typed entry per message; the
        reason is the first recipient's delay_reason that has one.

        A message put off in the incoming queue is taken up now. Postfix's
        queue manager, finding a deferred message still locked by the
        delivery agent that deferred it ("skipped, still being delivered":
        with the lab's one-second queue runs the agent can still hold it),
        moves it to the incoming queue dated 60 s ahead; no retry came in
        the lab's 20 s window (seen on a loaded machine). Its date is set
        to now and the queue manager asked to scan (`postkick ... qmgr I`,
        as `postqueue -i` does for a deferred message); `kicks` counts it."""
        entries = self.postqueue()
        now = time.time()
        incoming = {str(q["queue_id"]) for q in entries if q.get("queue_name") == "incoming"}
        for qid in set(self._taken) - incoming:
            del self._taken[qid]
        kick = False
        for qid in incoming:
            path = self.queue_directory / "incoming" / qid
            with contextlib.suppress(OSError):  # (it may have moved on meanwhile)
                if path.stat().st_mtime > now + INCOMING_AHEAD:
                    os.utime(path, (now, now))
                    self.kicks += 1
                    self._taken[qid] = now
                    kick = True
                elif qid in self._taken and now - self._taken[qid] >= 1.0:
                    self._taken[qid] = now  # still there: the scan asked for again
                    kick = True
        if kick:  # (a kick can be lost: postkick ends with SIGPIPE while qmgr restarts)
            self._run("postkick", "-c", str(self.config_dir), "public", "qmgr", "I",
                      check=False)
        out = []
        for q in entries:
            rcpts = q.get("recipients", [])
            reasons = [r["delay_reason"] for r in rcpts if r.get("delay_reason")]
            out.append(QueueEntry(
                queue_id=str(q["queue_id"]), sender=str(q.get("sender", "")),
                recipients=tuple(str(r.get("address", "")) for r in rcpts),
                arrival=float(q.get("arrival_time", 0)), size=int(q.get("message_size", 0)),
                status=_STATUS.get(str(q.get("queue_name")), "active"),
                reason=reasons[0] if reasons else None))
        return out

    def flush(self) -> None:
        """Attempt delivery of all queued mail now (`postqueue -f`)."""
        self._run("postqueue", "-c", str(self.config_dir), "-f")

    def expire(self, queue_id: str, *, now: bool = True) -> None:
        """Expire a message (`postsuper -e`): Postfix returns it to the sender
        at its next delivery attempt, which `now` schedules at once
        (`postqueue -i`; for a message that is not deferred it is a no-op)."""
        self._run("postsuper", "-c", str(self.config_dir), "-e", queue_id)
        if now:
            if queue_id.upper() == "ALL":
                self.flush()
            else:
                self._run("postqueue", "-c", str(self.config_dir), "-i", queue_id, check=False)

    def _queued_count(self) -> int:
        """Files in the queue directories (cheap enough to poll every 50 ms)."""
        count = 0
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _dir, _subdirs, files in os.walk(self.queue_directory / name):
                count += len(files)
        return count

    # -- logs ------------------------------------------------------------

    def _read_logs(self) -> dict[str, str]:
        try:
            return {"main": self.maillog_path.read_text(errors="replace")}
        except FileNotFoundError:
            return {"main": ""}

    def failures(self) -> list[str]:
        """The maillog's fatal/panic lines since the last start: a daemon died
        (often on a setting only it reads, which `postfix check` does not check)."""
        marker = re.compile(rf"\s{re.escape(self.syslog_name)}/[\w.-]+\[\d+\]: (fatal|panic): ")
        log = self.maillog()[self._log_mark:]
        return [line for line in log.splitlines() if marker.search(line)]

    def _raise_if_failed(self) -> None:
        failed = self.failures()
        if failed:
            raise PostfixLabError(f"{self.syslog_name}: a Postfix daemon failed: {failed[0]}"
                                  f"{self._log_tail()}")

_compat: str | None = None


def _compatibility_level() -> str:
    """3.6 where Postfix knows it (3.6+), else 2 (the oldest current default)."""
    global _compat
    if _compat is None:
        _compat = "2"
        tool = _tool("postconf")
        if tool is not None:
            with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
                out = subprocess.run([tool, "-dh", "mail_version"], capture_output=True,
                                     text=True, timeout=10, check=True).stdout
                major, minor = (int(x) for x in out.strip().split(".")[:2])
                if (major, minor) >= (3, 6):
                    _compat = "3.6"
    return _compat


# Postfix's stock delay notice counts in hours ("0 hour(s)" with lab timings);
# this one counts in seconds. The other templates are Postfix's own.
_BOUNCE_TEMPLATES = """\
delay_template = <<EOF
Charset: us-ascii
From: Mail Delivery System <MAILER-DAEMON>
Subject: Delayed Mail (still being retried)
Postmaster-Subject: Postmaster Warning: Delayed Mail

This is the mail system at host $myhostname.

Your message has not been delivered yet: it has been delayed for
$delay_warning_time_seconds second(s). Delivery will be retried until the
message is $maximal_queue_lifetime_seconds second(s) old. This is a warning
only; there is no need to send the message again.

The attached report says why delivery was delayed.

                   The mail system
EOF
"""
