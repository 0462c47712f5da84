"""`EximLab`: a private, throw-away Exim 4 instance relaying to the harness.

    with Harness() as h, EximLab((h.host, h.port)) as ex:
        msg_id = ex.submit_smtp("sender@lab.test", ["user@lab.test"], message)
        ex.wait_queue_empty(timeout=10)
        h.messages()[0].raw        # what Exim's smtp transport sent
        h.sessions()[0].extensions # {"bdat": 3, ...}: Exim used CHUNKING

The instance lives in its own directory tree (configuration file, spool,
logs, pid file), listens on 127.0.0.1 only (a free port it picks), does no
DNS and no ident lookups, and sends everything to the relay: one
manualroute router routes every domain to the relay's IP address and port
(no local deliveries), except the addresses given in `routes=`, each sent
to its own host and port (the lab routes its sender, that is the bounces
Exim generates, to a collector). The smtp transport tries BDAT whenever the relay advertises
CHUNKING (`hosts_try_chunking = *`) and never TLS (`hosts_avoid_tls = *`;
override with `transport=`). Retries are shrunk to seconds: the daemon
starts a queue runner every second and the retry rule is `F,1m,1s`.

It needs root and Exim's binary, which `tools/install-exim.sh` unpacks from
Debian's exim4-daemon-light into /opt/harness-exim (the package itself
conflicts with postfix, which the other lab tests need), plus the
`Debian-exim` user that binary runs as. `EximLab.unavailable()` says why it
cannot run here. Set HARNESS_EXIM_BIN to use another exim binary.

How Exim runs here: the daemon is started by root as `exim -C CONF -bdf
-q1s` (in the foreground, so it stays our child, in a session of its own).
Root keeps its privilege with -C; the processes that receive a message run
as the Exim user and re-exec `exim_path -C CONF` to deliver it, which drops
privilege for good (the config is not in the binary's TRUSTED_CONFIG_LIST;
each such re-exec logs "exim user lost privilege for using -C option" to the
paniclog, which `paniclog()` leaves out).
Remote SMTP delivery needs none, so the spool, log and pid directories
belong to the Exim user. Every process of the instance carries `-C CONF` in
its command line (forks inherit it, re-execs pass it on): that is how
`processes()` finds them, orphans included. Stopping SIGTERMs the daemon,
then every process of the instance (SIGKILL for any that outlive that) until
none is left.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from harness.lab.base import (
    LOOPBACK,
    POLL_INTERVAL,
    LabMta,
    LabMtaError,
    QueueEntry,
    free_port,
    proc_stat,
    wait_gone,
)

DEFAULT_ROOT = Path("/opt/harness-exim")  # where tools/install-exim.sh unpacks the .deb
INSTALL_HINT = "run tools/install-exim.sh as root (after apt-get update)"
EXIM_USER = "Debian-exim"  # what Debian's build runs as (EXIM_USER=ref:Debian-exim)
#: An Exim message ID: 4.96 writes 6-6-2 characters (1tXyZa-000abc-12), 4.97+ 6-11-4.
MESSAGE_ID = r"[0-9A-Za-z]{6}-[0-9A-Za-z]{6,11}-[0-9A-Za-z]{2,4}"
_OPTION = re.compile(r"^[a-z][a-z0-9_]*$")
#: Written to the paniclog by every re-exec that drops privilege (expected here).
_EXPECTED_PANIC = re.compile(r"exim user lost privilege for using -C option")


class EximLabError(LabMtaError):
    """The lab Exim could not be set up, started, stopped or driven."""


def exim_binary() -> Path:
    """The exim binary the lab uses: $HARNESS_EXIM_BIN, else the one
    tools/install-exim.sh unpacked (whether or not it is there yet)."""
    env = os.environ.get("HARNESS_EXIM_BIN")
    return Path(env) if env else DEFAULT_ROOT / "usr" / "sbin" / "exim4"


def _env() -> dict[str, str]:
    # Exim purges its environment anyway (keep_environment is empty); C locale for its output
    return {**os.environ, "LANG": "C", "LC_ALL": "C"}


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (read from /proc/net/tcp, so
    no connection is made: a probe would be an SMTP session in Exim's log)."""
    local = f"0100007F:{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[1] == local and fields[3] == "0A":  # LISTEN
                return True
    return False


def _config_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if "\n" in text or "\r" in text:
        raise EximLabError(f"configuration value {text!r}: one line only")
    return text


class EximLab(LabMta):
    """A private Exim daemon on loopback that sends every message to `relay`.

    `settings`: main-section options that override the lab defaults (values
    as Exim writes them: "30s", "true"). `transport`: options of the smtp
    transport that override or add to the defaults (e.g. `hosts_try_chunking
    = ""` to stop Exim from using BDAT). `retry`: the retry rule for every
    address and error (default `F,1m,1s`: retry every second for a minute,
    then bounce). `queue_interval`: how often the daemon starts a queue run
    (`-q1s`; a deferred message is retried at the first run after its retry
    time). `workdir`: where to build the instance (kept after stop);
    default a temporary directory, removed by `stop()`.
    """

    kind = "exim"
    error = EximLabError
    queue_id_reply = re.compile(rb"id=(" + MESSAGE_ID.encode() + rb")")

    def __init__(self, relay: tuple[str, int], workdir: str | Path | None = None, *,
                 settings: Mapping[str, str | int | bool] | None = None,
                 transport: Mapping[str, str | int | bool] | None = None,
                 retry: str = "F,1m,1s", queue_interval: str = "1s",
                 keep: bool = False,
                 routes: Mapping[str, tuple[str, int]] | None = None) -> None:
        reason = self.unavailable()
        if reason:
            raise EximLabError(reason)
        self.binary = exim_binary()
        self.token = secrets.token_hex(4)
        #: address -> (host, port): mail to these goes there instead of the relay
        #: (the lab sends its sender's bounces to a collector, as with Postfix)
        self.routes = dict(routes or {})
        for address in self.routes:
            if not re.fullmatch(r"[^\s@{}$]+@[^\s@{}$]+", address):
                raise EximLabError(f"route for {address!r}: not a plain address")
        self._init_common(relay, Path(tempfile.mkdtemp(prefix="exim-lab-")
                                      if workdir is None else workdir).resolve(),
                          temporary=workdir is None, keep=keep)
        self.config_path = self.root / "exim.conf"
        self.spool_directory = self.root / "spool"
        self.log_directory = self.root / "log"
        self.pid_path = self.root / "run" / "exim.pid"
        self.daemon_output_path = self.log_directory / "daemon.out"
        self._name = f"exim-lab-{self.token}"
        self._daemon: subprocess.Popen[bytes] | None = None
        try:
            self.port = free_port()
            self.retry = _config_value(retry)
            if not re.fullmatch(r"\d+[smhdw]?", queue_interval):
                raise EximLabError(f"queue_interval {queue_interval!r}: a time such as 1s")
            self.queue_interval = queue_interval
            self.settings = self._settings(settings or {})
            self.transport = self._transport(transport or {})
            self._write_tree()
        except BaseException:
            if self.temporary:
                shutil.rmtree(self.root, ignore_errors=True)
            raise
        self._register()

    # -- configuration ---------------------------------------------------

    @staticmethod
    def unavailable() -> str | None:
        """Why a lab Exim cannot run on this machine, or None if it can."""
        binary = exim_binary()
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            return f"Exim is not installed ({binary} is missing): {INSTALL_HINT}"
        if os.geteuid() != 0:
            return "a private Exim instance needs root (its daemon and deliveries change user)"
        try:
            pwd.getpwnam(EXIM_USER)
            grp.getgrnam(EXIM_USER)
        except KeyError:
            return f"the {EXIM_USER} user or group is missing: {INSTALL_HINT}"
        try:
            p = subprocess.run([str(binary), "-C", "/dev/null", "-bV"], capture_output=True,
                               timeout=10, env=_env(), check=False)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{binary} does not run ({e}): {INSTALL_HINT}"
        if p.returncode != 0 or b"Exim version" not in p.stdout:
            out = (p.stdout + p.stderr).decode(errors="replace").strip().splitlines()
            return f"{binary} -bV failed ({'; '.join(out[-2:]) or p.returncode}): {INSTALL_HINT}"
        return None

    @property
    def name(self) -> str:
        return self._name

    @property
    def log_path(self) -> Path:
        """Exim's mainlog (log_file_path; the reject and panic logs beside it)."""
        return self.log_directory / "mainlog"

    @property
    def primary_hostname(self) -> str:
        return self.settings["primary_hostname"]

    def _settings(self, overrides: Mapping[str, str | int | bool]) -> dict[str, str]:
        s: dict[str, str] = {
            # -- the binary is not at its compiled-in path: its re-execs need it
            "exim_path": str(self.binary),
            "exim_user": EXIM_USER,
            "exim_group": EXIM_USER,
            # -- identity; bare addresses get @lab.test
            "primary_hostname": f"exim-{self.token}.lab.test",
            "qualify_domain": "lab.test",
            # -- instance isolation
            "spool_directory": str(self.spool_directory),
            "log_file_path": f"{self.log_directory}/%slog",
            "pid_file_path": str(self.pid_path),
            # -- loopback only; a taken port fails at once (start() picks another)
            "daemon_smtp_ports": str(self.port),
            "local_interfaces": LOOPBACK,
            "disable_ipv6": "true",
            "daemon_startup_retries": "0",
            # -- no DNS or ident lookups for incoming connections
            "host_lookup": "",
            "rfc1413_hosts": "",
            "rfc1413_query_timeout": "0s",
            # -- no TLS on our side; silence the environment warning
            "tls_advertise_hosts": "",
            "keep_environment": "",
            "acl_smtp_rcpt": "acl_check_rcpt",
            # -- fast timing for tests
            "delay_warning": "0s",  # no delay warnings (set e.g. "5s" to get them)
            "ignore_bounce_errors_after": "1m",
            "timeout_frozen_after": "2m",
            "log_selector": "+all -arguments",
        }
        for key, value in overrides.items():
            if not _OPTION.match(key):
                raise EximLabError(f"setting {key!r}: not an Exim option name")
            s[key] = _config_value(value)
        return s

    def _transport(self, overrides: Mapping[str, str | int | bool]) -> dict[str, str]:
        t: dict[str, str] = {
            "driver": "smtp",
            "allow_localhost": "true",  # the relay is on this host (another port)
            "hosts_try_chunking": "*",  # BDAT whenever CHUNKING is advertised
            "hosts_avoid_tls": "*",
            "connect_timeout": "5s",
            "command_timeout": "5s",
            "data_timeout": "5s",
            "final_timeout": "5s",
        }
        for key, value in overrides.items():
            if not _OPTION.match(key) or key == "driver":
                raise EximLabError(f"transport option {key!r}: not an smtp transport option")
            t[key] = _config_value(value)
        return t

    def config_text(self) -> str:
        host, port = self.relay
        routes = "".join(
            f"route_{i}:\n  driver = manualroute\n"
            f"  condition = ${{if eqi{{$local_part@$domain}}{{{address}}}}}\n"
            f"  route_list = * {h}::{p} byname\n  transport = relay_smtp\n  self = send\n"
            f"  no_more\n\n"
            for i, (address, (h, p)) in enumerate(sorted(self.routes.items())))
        main = "\n".join(f"{k} = {v}" if v else f"{k} =" for k, v in self.settings.items())
        transport = "\n".join(f"  {k} = {v}" if v else f"  {k} ="
                              for k, v in self.transport.items())
        return f"""\
# A private lab Exim written by harness.lab.exim.EximLab; run as exim -C {self.config_path}
{main}

begin acl
acl_check_rcpt:
  accept hosts = 127.0.0.0/8
  deny   message = relay not permitted

begin routers
{routes}# every other address goes to the relay: an IP address with a port, so no
# DNS; "self = send" because it is this host
to_relay:
  driver = manualroute
  route_list = * {host}::{port} byname
  transport = relay_smtp
  self = send
  no_more

begin transports
relay_smtp:
{transport}

begin retry
*   *   {self.retry}
"""

    def _write_tree(self) -> None:
        user = pwd.getpwnam(EXIM_USER)
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # the Exim user reads the config below it
        for d in (self.spool_directory, self.log_directory, self.pid_path.parent):
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, user.pw_uid, user.pw_gid)
            d.chmod(0o750)
        self.config_path.write_text(self.config_text())
        self.config_path.chmod(0o644)

    # -- commands --------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        return [str(self.binary), "-C", str(self.config_path), *args]

    def _run(self, *args: str, input: bytes | None = None, timeout: float = 30,
             check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """`exim -C CONF ARGS`, output captured; a failure raises with the logs' tail."""
        argv = self._argv(*args)
        try:
            p = subprocess.run(argv, input=input, capture_output=True, timeout=timeout,
                               env=_env(), check=False)
        except subprocess.TimeoutExpired as e:
            raise EximLabError(f"exim {' '.join(args)}: no answer after {timeout:g}s"
                               f"{self._log_tail()}") from e
        if check and p.returncode != 0:
            out = (p.stdout + p.stderr).decode(errors="replace").strip()
            raise EximLabError(f"exim -C {self.config_path} {' '.join(args)} failed "
                               f"(exit {p.returncode}){': ' + out if out else ''}"
                               f"{self._log_tail()}")
        return p

    def check_config(self) -> None:
        """`exim -bV` with this configuration: an error raises EximLabError
        with Exim's message and the configuration line it names."""
        p = self._run("-bV", check=False)
        if p.returncode == 0:
            return
        err = p.stderr.decode(errors="replace").strip() or f"exit {p.returncode}"
        m = re.search(r"error in line (\d+) of ", err)
        if m:
            lines = self.config_text().splitlines()
            n = int(m.group(1))
            if 0 < n <= len(lines):
                err += f"\n  line {n}: {lines[n - 1].strip()}"
        raise EximLabError(f"exim -C {self.config_path} -bV: {err}")

    # -- lifecycle -------------------------------------------------------

    def start(self) -> EximLab:
        """Check the configuration, start the daemon (`-bdf -q1s`) and wait
        until it listens; raises with its output and the logs on failure."""
        if self._started:
            return self
        self._check_restartable()
        try:
            self.check_config()
            for tries in range(3, 0, -1):
                if self._start_daemon():
                    break
                if tries > 1 and "Address already in use" in self._daemon_output():
                    self.port = free_port()  # lost a race for the port: pick another
                    self.settings["daemon_smtp_ports"] = str(self.port)
                    self.config_path.write_text(self.config_text())
                    continue
                raise EximLabError(f"exim -C {self.config_path} -bdf exited "
                                   f"(status {self._daemon.returncode if self._daemon else '?'})"
                                   f": {self._daemon_output() or '(no output)'}"
                                   f"{self._log_tail()}")
        except BaseException:
            self.stop()  # the error carries the logs' tail; a temporary tree is removed
            raise
        self._started = True
        return self

    def _start_daemon(self, timeout: float = 10) -> bool:
        """Start the daemon; True once it listens, False if it exited."""
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()
        with open(self.daemon_output_path, "wb") as out:
            self._daemon = subprocess.Popen(
                self._argv("-bdf", f"-q{self.queue_interval}"), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._daemon.poll() is not None:
                return False
            if self.pid_path.exists() and _listening(self.port):
                return True
            time.sleep(0.01)
        raise EximLabError(f"exim daemon did not listen on {self.host}:{self.port} within "
                           f"{timeout:g}s: {self._daemon_output()}{self._log_tail()}")

    def _daemon_output(self) -> str:
        try:
            return self.daemon_output_path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        state = "running" if self._started else "stopped"
        return (f"<EximLab {self.name} {state} smtp {self.host}:{self.port}"
                f" relay {self.relay[0]}:{self.relay[1]} dir {self.root}>")

    def processes(self) -> list[int]:
        """PIDs of this instance's live processes: every process whose command
        line has `-C <our config file>` (a unique path), plus the daemon."""
        marker = f"\0-C\0{self.config_path}\0".encode()
        me = os.getpid()
        found: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline + b"\0":
                st = proc_stat(pid)
                if st is not None and st[0] != "Z":
                    found.add(pid)
        if self._daemon is not None and self._daemon.poll() is None:
            found.add(self._daemon.pid)
        return sorted(found)

    def _kill_instance(self, timeout: float = 10) -> None:
        """Stop the daemon first (so it starts no more queue runs), then signal
        every process of the instance until none is left: SIGTERM, then
        SIGKILL. A process caught forking (a queue run starting a delivery)
        has its child found by the next scan. Waits are pidfd events."""
        daemon = self._daemon
        if daemon is not None and daemon.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                daemon.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(5)
        deadline = time.monotonic() + timeout
        sig = signal.SIGTERM
        while True:
            procs = set(self.processes())
            if not procs or time.monotonic() >= deadline:
                break
            for pid in procs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            wait_gone(procs, timeout=1 if sig == signal.SIGTERM else 5)
            sig = signal.SIGKILL
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.wait(5)

    # -- submission ------------------------------------------------------

    def submit_local(self, mail_from: str, rcpts: str | Iterable[str], message: bytes | str, *,
                     timeout: float = 30) -> str:
        """`exim -C CONF -odi -oi -f SENDER -- RCPT... < message`: a local
        submission (as root, a trusted user) whose delivery attempt happens
        before this returns. Returns the message ID (from the mainlog)."""
        rcpt_list = [rcpts] if isinstance(rcpts, str) else list(rcpts)
        if not rcpt_list:
            raise EximLabError("submit_local: no recipients")
        data = message.encode() if isinstance(message, str) else bytes(message)
        mark = len(self._read_log("main"))
        self._run("-odi", "-oi", "-f", mail_from, "--", *rcpt_list, input=data, timeout=timeout)
        new = self._read_log("main")[mark:]
        m = re.search(rf"^\S+ \S+ (?:\[\d+\] )?({MESSAGE_ID}) <= .* P=local\b", new, re.M)
        if m is None:
            raise EximLabError(f"submit_local: no arrival logged{self._log_tail()}")
        return m.group(1)

    # -- the queue -------------------------------------------------------

    def exim_queue(self) -> list[dict[str, Any]]:
        """The queue as `exim -bp` lists it: one dict per message (id, age,
        size, sender, frozen, recipients [undelivered], delivered)."""
        out = self._run("-bp").stdout.decode(errors="replace")
        entries: list[dict[str, Any]] = []
        head = re.compile(rf"^\s*(\S+)\s+(\S+)\s+({MESSAGE_ID})\s+<(.*?)>(.*)$")
        for line in out.splitlines():
            m = head.match(line)
            if m:
                entries.append({"id": m.group(3), "age": m.group(1), "size": m.group(2),
                                "sender": m.group(4), "frozen": "*** frozen ***" in m.group(5),
                                "recipients": [], "delivered": []})
            elif line.strip() and entries:
                words = line.split()
                if words[0] == "D" and len(words) == 2:
                    entries[-1]["delivered"].append(words[1])
                else:
                    entries[-1]["recipients"].append(words[-1])
        return entries

    def queue(self) -> list[QueueEntry]:
        """The queue (`exim -bp`), one typed entry per message. Exim keeps
        one spool, so the status is read from the mainlog: `hold` if frozen,
        `deferred` once a delivery attempt was deferred (a `==` line, whose
        text after the address is the reason), else `active`. The arrival
        time is the one Exim encodes in the message ID."""
        reasons = self._defer_reasons()
        out = []
        for q in self.exim_queue():
            reason = reasons.get(q["id"])
            out.append(QueueEntry(
                queue_id=q["id"], sender=q["sender"], recipients=tuple(q["recipients"]),
                arrival=id_time(q["id"]), size=_size(q["size"]),
                status="hold" if q["frozen"] else "deferred" if reason else "active",
                reason=reason))
        return out

    def _defer_reasons(self) -> dict[str, str]:
        """Each message's last deferral in the mainlog: what follows its address."""
        rx = re.compile(rf"^\S+ \S+ (?:\[\d+\] )?({MESSAGE_ID}) == \S+ (.*)$", re.M)
        return {m.group(1): m.group(2) for m in rx.finditer(self.mainlog())}

    def _queued_count(self) -> int:
        return len(self.queued_ids())

    def queued_ids(self) -> list[str]:
        """IDs of the messages in the spool (read from the spool directory:
        cheap enough to poll)."""
        ids = []
        for _dir, _subdirs, files in os.walk(self.spool_directory / "input"):
            ids += [f[:-2] for f in files if f.endswith("-H")]
        return sorted(ids)

    def flush(self, *, timeout: float = 30) -> None:
        """One queue run that ignores retry times (`exim -qf`), in the
        foreground: every queued message gets a delivery attempt now."""
        self._run("-qf", timeout=timeout)

    def deliver(self, message_id: str, *, timeout: float = 30) -> None:
        """Force a delivery attempt of one message now (`exim -M ID`); its
        outcome is in the mainlog (the exit status does not tell a deferral
        from a message another process is delivering)."""
        self._run("-M", message_id, timeout=timeout, check=False)

    def wait_log(self, pattern: str, timeout: float = 10, *, start: int = 0) -> re.Match[str]:
        """Wait until the mainlog (from offset `start`) has a line matching the
        regular expression `pattern` (multiline mode); return the match."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.mainlog(), start)
            if m:
                return m
            self._raise_if_failed()
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_INTERVAL)
        raise EximLabError(f"{self.name}: no mainlog line matching {pattern!r} after "
                           f"{timeout:g}s{self._log_tail()}")

    def wait_completed(self, message_id: str, timeout: float = 10) -> str:
        """Wait until Exim is done with the message (`Completed`); return its
        log lines."""
        self.wait_log(rf"^.* {re.escape(message_id)} Completed\b", timeout)
        return self.log_lines(message_id)

    def log_lines(self, message_id: str) -> str:
        """The mainlog lines about one message."""
        return "\n".join(line for line in self.mainlog().splitlines()
                         if f" {message_id} " in f"{line} ")

    # -- logs ------------------------------------------------------------

    def _read_logs(self) -> dict[str, str]:
        logs = {}
        for name in ("main", "reject", "panic"):
            try:
                logs[name] = (self.log_directory / f"{name}log").read_text(errors="replace")
            except FileNotFoundError:
                logs[name] = ""
        return logs

    def _read_log(self, name: str) -> str:
        return self._log(name)

    def mainlog(self) -> str:
        """Exim's mainlog so far (log_selector +all -arguments)."""
        return self._log("main")

    def maillog(self) -> str:
        """The mainlog (the name every lab MTA has); the panic log is
        appended when it has anything."""
        panic = self.paniclog()
        return self.mainlog() + (f"\n--- paniclog ---\n{panic}" if panic else "")

    def paniclog(self) -> str:
        """The paniclog, less the expected "exim user lost privilege for using
        -C option" lines (one per delivery process: see the module doc)."""
        return "".join(line for line in self._read_log("panic").splitlines(keepends=True)
                       if not _EXPECTED_PANIC.search(line))

    def rejectlog(self) -> str:
        return self._read_log("reject")

    def _raise_if_failed(self) -> None:
        if self._started and self._daemon is not None and self._daemon.poll() is not None:
            raise EximLabError(f"{self.name}: the Exim daemon exited (status "
                               f"{self._daemon.returncode}): {self._daemon_output()}"
                               f"{self._log_tail()}")
        panic = self.paniclog().strip()
        if panic:
            raise EximLabError(f"{self.name}: Exim wrote to its paniclog: "
                               f"{panic.splitlines()[-1]}{self._log_tail()}")

    def _log_tail(self, lines: int = 25) -> str:
        tail = self.mainlog().splitlines()[-lines:]
        panic = self.paniclog().strip()
        text = ("\n--- mainlog tail ---\n" + "\n".join(tail)) if tail else ""
        return text + (f"\n--- paniclog ---\n{panic}" if panic else "")


_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def id_time(message_id: str) -> float:
    """When Exim received a message: the first part of its ID is the time in
    base 62 (Exim's spec, "Message identification")."""
    seconds = 0
    for c in message_id.split("-", 1)[0]:
        seconds = seconds * 62 + _B62.index(c)
    return float(seconds)


def _size(text: str) -> int:
    """`exim -bp`'s size column (412, 2.3K, 1.1M) in bytes."""
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        return int(float(number) * scale)
    except ValueError:
        return 0
