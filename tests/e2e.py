"""End-to-end test harness: the real daemon in a subprocess, real sockets, real OFD locks.

Theory of operation: every test talks to ``python -m lockd.daemon`` started by :class:`Daemon`
on private paths (state directory, sockets, a notify socket), kills it with real signals and
checks what is held from *outside* the daemon, with :func:`probe`: ``F_OFD_GETLK`` on a fresh
file descriptor of the resource file in the test process. GETLK never takes a lock, so probing
cannot disturb what it observes. Nothing here imports the daemon; the wire is spoken by
:class:`Conn` (a deliberately small Varlink client of its own, so a bug in ``lockd.client``
cannot hide a daemon bug); only ``lockd.errors`` (to raise the named errors) and
``lockd.failpoint.POINTS`` (so no failpoint goes untested) are shared.

Readiness follows systemd's protocol: the harness binds an ``AF_UNIX``/``SOCK_DGRAM`` socket,
passes it as ``$NOTIFY_SOCKET`` and waits for a ``READY=1`` datagram whose ``SCM_CREDENTIALS``
name the daemon's pid. A background thread keeps draining that socket and *closes* any file
descriptor sent with it (``FDSTORE=1``): the harness is not an fd store, so a lock fd parked
in its receive queue must not outlive the daemon and mask a crash.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lockd import errors

REPO = Path(__file__).resolve().parent.parent
# The tree whose daemon and lockctl run (their cwd, hence first on sys.path with -m); another
# tree can be put under test, e.g. a mutated copy to check that these tests can fail.
TREE = Path(os.environ.get("LOCKD_E2E_TREE", REPO))

F_OFD_GETLK = 36
F_OFD_SETLK = 37
FLOCK = "hhqqi4x"  # struct flock on x86_64/aarch64: type, whence, start, len, pid

READY_TIMEOUT = 15.0  # generous: a loaded 2-core machine
EXIT_TIMEOUT = 15.0
CALL_TIMEOUT = 15.0


def failpoints() -> tuple[str, ...]:
    """Every failpoint of the daemon."""
    from lockd.failpoint import POINTS

    return tuple(POINTS)


# --- probing the kernel ----------------------------------------------------------------------


def _getlk(fd: int, l_type: int) -> tuple[int, int]:
    """(l_type, l_pid) of the first lock that conflicts with ``l_type`` on byte 0."""
    req = struct.pack(FLOCK, l_type, os.SEEK_SET, 0, 1, 0)
    res = fcntl.fcntl(fd, F_OFD_GETLK, req)
    got_type, _whence, _start, _len, got_pid = struct.unpack(FLOCK, res)
    return got_type, got_pid


def probe(path: str | os.PathLike[str]) -> str:
    """What the kernel says about byte 0 of ``path``: ``free``, ``shared`` or ``exclusive``.

    Asks for F_WRLCK (any lock conflicts) and, if something is there, for F_RDLCK (only an
    exclusive lock conflicts). Opened O_NONBLOCK so a FIFO cannot hang the probe.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        wr_type, wr_pid = _getlk(fd, fcntl.F_WRLCK)
        if wr_type == fcntl.F_UNLCK:
            return "free"
        # an OFD lock reports l_pid -1; anything else is a process-owned POSIX lock, which
        # lockd must never use (DESIGN §2)
        assert wr_pid == -1, f"{path}: lock with l_pid {wr_pid}: not an OFD lock"
        rd_type, _ = _getlk(fd, fcntl.F_RDLCK)
        if rd_type == fcntl.F_UNLCK:
            assert wr_type == fcntl.F_RDLCK, (path, wr_type)
            return "shared"
        assert rd_type == fcntl.F_WRLCK, (path, rd_type)
        return "exclusive"
    finally:
        os.close(fd)


def is_free(path: str | os.PathLike[str]) -> bool:
    """One F_WRLCK GETLK: the cheapest probe, for tight polling."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        return _getlk(fd, fcntl.F_WRLCK)[0] == fcntl.F_UNLCK
    finally:
        os.close(fd)


_SETLK_SCRIPT = r"""
import errno, fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY)
try:
    fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0))
except OSError as exc:
    if exc.errno in (errno.EAGAIN, errno.EACCES):
        print("held")
        sys.exit(0)
    raise
print("free")
"""


def probe_setlk_elsewhere(path: str | os.PathLike[str]) -> str:
    """The strong probe: another process tries F_OFD_SETLK F_WRLCK on byte 0.

    Returns ``held`` (EAGAIN) or ``free`` (it got the lock, and dropped it by exiting).
    """
    out = subprocess.run(
        [sys.executable, "-c", _SETLK_SCRIPT, os.fspath(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike[str], exclusive: bool = True) -> Iterator[int]:
    """An OFD lock on byte 0 of ``path`` held by the test process itself."""
    fd = os.open(path, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        l_type = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        fcntl.fcntl(fd, F_OFD_SETLK, struct.pack(FLOCK, l_type, os.SEEK_SET, 0, 1, 0))
        yield fd
    finally:
        os.close(fd)


def wait_until(pred: Any, timeout: float, interval: float = 0.01, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- the wire ---------------------------------------------------------------------------------


def message(method: str, params: dict[str, Any] | None = None, **extra: Any) -> bytes:
    """One Varlink call, encoded and NUL-terminated."""
    msg: dict[str, Any] = {"method": method}
    if params is not None:
        msg["parameters"] = params
    msg.update(extra)
    return json.dumps(msg).encode() + b"\0"


class ConnectionLost(Exception):
    """The daemon closed the connection (or died) before replying."""


class Conn:
    """A minimal blocking Varlink connection: NUL-terminated JSON objects."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = CALL_TIMEOUT) -> None:
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except BaseException:
            self.sock.close()
            raise
        self.buf = b""
        self.before_eof: list[bytes] = []

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise ConnectionLost(str(exc)) from exc

    def recv_message(self) -> dict[str, Any]:
        """The next message; ConnectionLost on EOF or reset."""
        while b"\0" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError as exc:
                raise ConnectionLost(str(exc)) from exc
            if not chunk:
                raise ConnectionLost("EOF")
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        msg = json.loads(raw)
        assert isinstance(msg, dict), msg
        return msg

    def call_raw(
        self, method: str, params: dict[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        self.send_raw(message(method, params, **extra))
        return self.recv_message()

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The reply's parameters, or the named error raised as its lockd.errors class."""
        reply = self.call_raw(method, params)
        if "error" in reply:
            raise errors.from_wire(reply["error"], reply.get("parameters"))
        assert isinstance(reply.get("parameters", {}), dict), reply
        return reply.get("parameters", {})

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True if the peer closes the connection within ``timeout`` (messages before EOF are
        collected in ``self.before_eof``)."""
        self.before_eof = []
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.before_eof.append(chunk)
        return False


def params(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


# --- the daemon -------------------------------------------------------------------------------


class Daemon:
    """One lockd instance on private paths; may be started, killed and restarted many times.

    ``base`` holds the state directory, the config and the stderr log; ``runtime`` (short: a
    UNIX socket path is limited to 108 bytes) holds the sockets.
    """

    def __init__(
        self,
        base: Path,
        runtime: Path,
        config: str | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.base = base
        self.runtime = runtime
        self.state_dir = state_dir or base / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket = runtime / "lockd.sock"
        self.admin_socket = runtime / "admin.sock"
        self.notify_path = runtime / "notify.sock"
        self.stderr_path = base / "daemon.stderr"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = base / "lockd.conf"
            self.config_path.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.notify_log: list[tuple[int | None, str]] = []
        self.fds_received = 0
        self._ready: set[int] = set()
        self._cond = threading.Condition()
        self._stop = False
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify.bind(os.fspath(self.notify_path))
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.setblocking(False)
        self._thread = threading.Thread(target=self._drain_loop, daemon=True)
        self._thread.start()

    # -- notify socket ---------------------------------------------------------------------

    def _drain_once(self) -> bool:
        anc = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(struct.calcsize("3i"))
        try:
            data, ancdata, _flags, _addr = self._notify.recvmsg(65536, anc)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False
        pid: int | None = None
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                n = len(cdata) // 4
                for fd in struct.unpack(f"{n}i", cdata[: n * 4]):
                    os.close(fd)  # we are not an fd store: see the module docstring
                    self.fds_received += 1
            elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", cdata[:12])[0]
        text = data.decode(errors="replace")
        with self._cond:
            self.notify_log.append((pid, text))
            if "READY=1" in text.split("\n"):
                if pid is None and self.proc is not None:
                    pid = self.proc.pid
                if pid is not None:
                    self._ready.add(pid)
                self._cond.notify_all()
        return True

    def _drain_loop(self) -> None:
        while not self._stop:
            try:
                r, _, _ = select.select([self._notify], [], [], 0.1)
            except (OSError, ValueError):
                return
            if r:
                while self._drain_once():
                    pass

    def drain_notify(self) -> None:
        """Read (and close the fds of) every datagram queued now."""
        while self._drain_once():
            pass

    # -- process control ---------------------------------------------------------------------

    def argv(self, *extra: str) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "lockd.daemon",
            "--state-dir",
            os.fspath(self.state_dir),
            "--socket",
            os.fspath(self.socket),
            "--admin-socket",
            os.fspath(self.admin_socket),
        ]
        if self.config_path is not None:
            argv += ["--config", os.fspath(self.config_path)]
        return argv + list(extra)

    def env(self, failpoint: str | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LOCKD_", "LISTEN_", "NOTIFY_", "FDSTORE", "WATCHDOG_"))
        }
        env["NOTIFY_SOCKET"] = os.fspath(self.notify_path)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        if failpoint:
            env["LOCKD_FAILPOINT"] = failpoint
        return env

    def spawn(self, failpoint: str | None = None, *extra: str) -> subprocess.Popen[bytes]:
        """Start the daemon without waiting for it."""
        assert not self.running, "daemon already running"
        self.starts += 1
        with open(self.stderr_path, "ab") as log:
            log.write(f"\n===== start #{self.starts} failpoint={failpoint or '-'} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(*extra),
                cwd=TREE,
                env=self.env(failpoint),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        return self.proc

    def start(self, failpoint: str | None = None, timeout: float = READY_TIMEOUT) -> Daemon:
        self.spawn(failpoint)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        proc = self.proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        with self._cond:
            while proc.pid not in self._ready:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"lockd exited with {proc.returncode} before READY=1\n{self.stderr_tail()}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    proc.kill()
                    proc.wait()
                    raise AssertionError(
                        f"lockd sent no READY=1 within {timeout} s\n{self.stderr_tail()}"
                    )
                self._cond.wait(min(left, 0.05))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"lockd did not exit within {timeout} s\n{self.stderr_tail()}"
            ) from None
        self.drain_notify()
        return rc

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` and wait for the exit; returns the return code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit()

    def stop(self) -> None:
        """SIGTERM: a clean exit 0."""
        rc = self.kill(signal.SIGTERM)
        assert rc == 0, f"lockd exited {rc} on SIGTERM\n{self.stderr_tail()}"

    def restart(self, failpoint: str | None = None) -> Daemon:
        if self.running:
            self.kill(signal.SIGKILL)
        return self.start(failpoint)

    def expect_abort_at_start(self, failpoint: str) -> None:
        """Start with a recovery failpoint: it must abort (SIGABRT) before READY=1."""
        proc = self.spawn(failpoint)
        rc = self.wait_exit()
        assert rc == -signal.SIGABRT, (
            f"start with {failpoint} exited {rc}, expected SIGABRT\n{self.stderr_tail()}"
        )
        with self._cond:
            assert proc.pid not in self._ready, f"READY=1 sent before {failpoint}"

    def close(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        self._stop = True
        self._thread.join(2)
        self._notify.close()

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stderr_tail(self, lines: int = 60) -> str:
        text = self.stderr_text().splitlines()[-lines:]
        return "----- lockd stderr (tail) -----\n" + "\n".join(text)

    # -- talking to it -------------------------------------------------------------------------

    def connect(self, admin: bool = False, timeout: float = CALL_TIMEOUT) -> Conn:
        return Conn(self.admin_socket if admin else self.socket, timeout)

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        admin = method.startswith("io.lockd.Admin.")
        with self.connect(admin=admin) as c:
            return c.call(method, params)

    def register(self, pid: int, **kw: Any) -> dict[str, Any]:
        return self.call("io.lockd.Register", params(pid=pid, **kw))["owner"]

    def acquire(
        self, resource: str | os.PathLike[str], shared: bool = False, **kw: Any
    ) -> dict[str, Any]:
        p = params(resource=os.fspath(resource), mode="shared" if shared else "exclusive", **kw)
        return self.call("io.lockd.Acquire", p)["lease"]

    def release(self, resource: str | os.PathLike[str], **kw: Any) -> dict[str, Any]:
        return self.call("io.lockd.Release", params(resource=os.fspath(resource), **kw))["lease"]

    def inquire(self, **kw: Any) -> dict[str, Any]:
        return self.call("io.lockd.Inquire", params(**kw))

    def status(self) -> dict[str, Any]:
        return self.call("io.lockd.Admin.Status")["status"]

    def leases(self, **kw: Any) -> list[dict[str, Any]]:
        return self.call("io.lockd.Admin.ListLeases", params(**kw))["leases"]

    def owners(self) -> list[dict[str, Any]]:
        return self.call("io.lockd.Admin.ListOwners")["owners"]

    def history(self, **kw: Any) -> list[dict[str, Any]]:
        return self.call("io.lockd.Admin.History", params(**kw))["events"]

    def lockctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return lockctl(
            "--socket", os.fspath(self.socket), "--admin-socket", os.fspath(self.admin_socket),
            *args, timeout=timeout,
        )  # fmt: skip

    def lockctl_json(self, *args: str) -> Any:
        out = self.lockctl(*args, "-J")
        assert out.returncode == 0, f"lockctl {args} exited {out.returncode}: {out.stderr}"
        return json.loads(out.stdout)

    def assert_alive(self) -> None:
        """The process runs and a brand-new connection is answered."""
        assert self.running, f"lockd died (rc {self.proc and self.proc.returncode})\n" + (
            self.stderr_tail()
        )
        info = self.call("org.varlink.service.GetInfo")
        assert "io.lockd" in info["interfaces"], info


@contextlib.contextmanager
def module_daemon(base: Path, config: Callable[[Path], str] | None = None) -> Iterator[Daemon]:
    """A started lockd for a whole test module (``config``: its config text, made from its
    runtime directory). The runtime directory is a short one under /tmp (a socket path
    holds at most 108 bytes); a daemon that died meanwhile prints its stderr at the end."""
    run = Path(tempfile.mkdtemp(prefix="lkd", dir="/tmp"))
    d = Daemon(base, run, config=None if config is None else config(run))
    try:
        d.start()
        yield d
    finally:
        if not d.running:
            print(d.stderr_tail(200))
        d.close()
        shutil.rmtree(run, ignore_errors=True)


def lockctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKD_")}
    return subprocess.run(
        [sys.executable, "-m", "lockd.ctl.cli", *args],
        cwd=TREE,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- owner processes --------------------------------------------------------------------------

_IGNORE_TERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(1000)\n"
)


class Owners:
    """Owner processes (a VM's QEMU stand-in): ``sleep 1000``, killed at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, ignore_term: bool = False, uid: int | None = None) -> subprocess.Popen[bytes]:
        if uid is not None:
            p = subprocess.Popen(
                ["sleep", "1000"], stdin=subprocess.DEVNULL, user=uid, group=uid, extra_groups=[]
            )
        elif ignore_term:
            p = subprocess.Popen(
                [sys.executable, "-c", _IGNORE_TERM],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            assert p.stdout is not None
            assert p.stdout.readline().strip() == b"ready"
        else:
            p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def spawn_with_pid(self, pid: int, attempts: int = 200) -> subprocess.Popen[bytes] | None:
        """A new process with exactly ``pid`` (which must be free), via ns_last_pid (CRIU's
        trick; root only). None if another process kept winning the race."""
        for _ in range(attempts):
            try:
                with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                    f.write(str(pid - 1))
            except OSError:
                return None
            p = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
            if p.pid == pid:
                self.procs.append(p)
                return p
            p.kill()
            p.wait()
        return None

    @staticmethod
    def kill(p: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Kill and reap (a zombie is dead too, but reaping removes any doubt)."""
        if p.poll() is None:
            p.send_signal(sig)
        p.wait(30)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            with contextlib.suppress(Exception):
                p.wait(10)
            if p.stdout is not None:
                p.stdout.close()


def alive(p: subprocess.Popen[bytes]) -> bool:
    return p.poll() is None


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_files(directory: Path, n: int, prefix: str = "disk") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = directory / f"{prefix}{i}.img"
        p.write_bytes(b"\0" * 512)
        out.append(p)
    return out


def held_by_journal(leases: list[dict[str, Any]]) -> dict[str, str]:
    """resource path -> ``shared``/``exclusive`` from lease objects whose state is held."""
    out: dict[str, str] = {}
    for lease in leases:
        if lease.get("state") != "held":
            continue
        path = lease.get("path") or lease["resource"]
        if lease["mode"] == "exclusive" or out.get(path) == "exclusive":
            out[path] = "exclusive"
        else:
            out[path] = "shared"
    return out


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


# --- the wire contract: a small Varlink IDL reader and validator ------------------------------

SCHEMA_DIR = REPO / "schema"


class Interface:
    """Types, methods and errors of one ``.varlink`` file (the subset lockd uses: scalars,
    ``object``, ``?T``, ``[]T``, ``[string]T``, named and inline struct types, enums)."""

    def __init__(self, text: str) -> None:
        self.name = ""
        self.types: dict[str, Any] = {}
        self.methods: dict[str, tuple[Any, Any]] = {}
        self.errors: dict[str, Any] = {}
        self._toks = self._tokenize(text)
        self._i = 0
        self._parse()

    @staticmethod
    def _tokenize(text: str) -> list[str]:
        import re

        text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
        return re.findall(r"->|[A-Za-z_][A-Za-z0-9_.]*|[()\[\]?:,]", text)

    def _next(self) -> str:
        tok = self._toks[self._i]
        self._i += 1
        return tok

    def _peek(self) -> str | None:
        return self._toks[self._i] if self._i < len(self._toks) else None

    def _expect(self, tok: str) -> None:
        got = self._next()
        assert got == tok, f"schema: expected {tok!r}, got {got!r}"

    def _parse(self) -> None:
        while self._peek() is not None:
            kw = self._next()
            if kw == "interface":
                self.name = self._next()
            elif kw == "type":
                name = self._next()
                self.types[name] = self._struct()
            elif kw == "method":
                name = self._next()
                ins = self._struct()
                self._expect("->")
                self.methods[name] = (ins, self._struct())
            elif kw == "error":
                name = self._next()
                self.errors[name] = self._struct()
            else:
                raise AssertionError(f"schema: unexpected {kw!r}")

    def _struct(self) -> Any:
        """``(a: T, ...)`` -> ("struct", {name: type}); ``(a, b)`` -> ("enum", [names])."""
        self._expect("(")
        fields: dict[str, Any] = {}
        names: list[str] = []
        while self._peek() != ")":
            name = self._next()
            if self._peek() == ":":
                self._next()
                fields[name] = self._type()
            else:
                names.append(name)
            if self._peek() == ",":
                self._next()
        self._expect(")")
        return ("enum", names) if names and not fields else ("struct", fields)

    def _type(self) -> Any:
        tok = self._peek()
        if tok == "?":
            self._next()
            return ("maybe", self._type())
        if tok == "[":
            self._next()
            if self._peek() == "]":
                self._next()
                return ("array", self._type())
            self._expect("string")
            self._expect("]")
            return ("map", self._type())
        if tok == "(":
            return self._struct()
        return ("name", self._next())


def load_interfaces() -> dict[str, Interface]:
    out = {}
    for path in sorted(SCHEMA_DIR.glob("*.varlink")):
        iface = Interface(path.read_text())
        out[iface.name] = iface
    return out


def conforms(value: Any, typ: Any, iface: Interface, where: str = "$", strict: bool = True) -> None:
    """AssertionError naming the first place where ``value`` is not of ``typ``. ``strict``:
    fields the type does not declare are errors too."""
    kind = typ[0]
    if kind == "maybe":
        if value is not None:
            conforms(value, typ[1], iface, where, strict)
        return
    assert value is not None, f"{where}: null where {typ} is required"
    if kind == "array":
        assert isinstance(value, list), f"{where}: {value!r} is not an array"
        for i, v in enumerate(value):
            conforms(v, typ[1], iface, f"{where}[{i}]", strict)
    elif kind == "map":
        assert isinstance(value, dict), f"{where}: {value!r} is not a map"
        for k, v in value.items():
            conforms(v, typ[1], iface, f"{where}.{k}", strict)
    elif kind == "enum":
        assert value in typ[1], f"{where}: {value!r} not one of {typ[1]}"
    elif kind == "struct":
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        for name, ftyp in typ[1].items():
            if ftyp[0] != "maybe":
                assert name in value, f"{where}: required field {name!r} missing in {value}"
            conforms(value.get(name), ftyp, iface, f"{where}.{name}", strict)
        if strict:
            extra = set(value) - set(typ[1])
            assert not extra, f"{where}: fields {sorted(extra)} are not in the schema"
    else:
        name = typ[1]
        if name == "string":
            assert isinstance(value, str), f"{where}: {value!r} is not a string"
        elif name == "int":
            assert isinstance(value, int) and not isinstance(value, bool), (
                f"{where}: {value!r} is not an int"
            )
        elif name == "float":
            assert isinstance(value, int | float) and not isinstance(value, bool), (
                f"{where}: {value!r} is not a float"
            )
        elif name == "bool":
            assert isinstance(value, bool), f"{where}: {value!r} is not a bool"
        elif name == "object":
            assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        else:
            assert name in iface.types, f"schema: unknown type {name}"
            conforms(value, iface.types[name], iface, where, strict)


# --- freezing the daemon at its abort: the kernel's state *at* a failpoint ---------------------

_TRACER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
PTRACE_CONT, PTRACE_SEIZE, WALL = 7, 0x4206, 0x40000000
pid = int(sys.argv[1])
if libc.ptrace(PTRACE_SEIZE, pid, None, None) != 0:
    print("error", os.strerror(ctypes.get_errno()), flush=True)
    sys.exit(1)
print("attached", flush=True)
caught = False
while True:
    try:
        _, status = os.waitpid(pid, WALL)
    except ChildProcessError:
        break
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        break
    sig, event = os.WSTOPSIG(status), status >> 16
    if event:  # a ptrace event stop (group-stop under SEIZE): resume, no signal
        libc.ptrace(PTRACE_CONT, pid, None, None)
        continue
    if sig == signal.SIGABRT and not caught:
        caught = True
        print("abort", flush=True)  # the daemon sits in signal-delivery-stop, fds intact
        sys.stdin.readline()
    libc.ptrace(PTRACE_CONT, pid, None, ctypes.c_void_p(sig))
print("exited", flush=True)
"""


class AbortCatcher:
    """ptrace the daemon's main thread and hold it in signal-delivery-stop when it aborts.

    ``os.abort()`` raises SIGABRT; under ptrace the signal stops the thread before it acts,
    with every fd (every lock) still open and the journal as committed. The test can then
    look at the kernel and the journal exactly at the failpoint, and :meth:`let_die` delivers
    the signal (the daemon dies of SIGABRT as it would have).
    """

    def __init__(self, pid: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _TRACER, str(pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "attached", f"ptrace attach failed: {line!r}"

    def wait_abort(self, timeout: float = 15.0) -> bool:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            return False
        return self.proc.stdout.readline().strip() == "abort"

    def let_die(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write("\n")
            self.proc.stdin.flush()
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.let_die()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def journal_leases(state_dir: Path) -> dict[tuple[str, str], tuple[str, int, str]]:
    """(owner uuid, resource) -> (mode, token, state) as committed in the journal right now,
    read with SQLite directly. The daemon may be running, stopped or dead: while it lives it
    holds the journal's exclusive lock, so this reads a copy of the database and its WAL,
    which is exactly what a restart would recover (every committed frame, nothing else)."""
    import sqlite3

    with tempfile.TemporaryDirectory() as tmp:
        for suffix in ("", "-wal"):
            src = state_dir / f"journal.sqlite{suffix}"
            if src.exists():
                shutil.copyfile(src, Path(tmp) / src.name)
        db = sqlite3.connect(Path(tmp) / "journal.sqlite")
        try:
            rows = db.execute("SELECT owner, resource, mode, token, state FROM leases").fetchall()
        finally:
            db.close()
    return {(o, r): (m, t, s) for o, r, m, t, s in rows}
