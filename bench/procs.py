"""Processes the benchmark runs: lockd, the floor server, owner processes; /proc readings.

Readiness is systemd's protocol, as in the tests: we bind an ``AF_UNIX`` datagram socket,
pass it as ``$NOTIFY_SOCKET`` and wait for ``READY=1``. Any fd sent along (``FDSTORE=1``) is
closed at once: the benchmark is not an fd store, and a lock fd parked here would outlive a
``kill -9`` and falsify the recovery figures. Every process started here is stopped by its pid.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.wire import Raw

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 60.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_s(pid: int) -> float:
    """On-CPU time of all threads of ``pid`` in seconds (schedstat: ns resolution)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


class Notify:
    """A ``$NOTIFY_SOCKET`` of our own, drained by a thread.

    Draining must never stop: ``sd_notify`` sends on a blocking socket, so a daemon that
    sends ``STATUS=`` or ``WATCHDOG=1`` periodically would block its event loop once our
    receive queue (``net.unix.max_dgram_qlen``, 512) were full.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.ready = threading.Event()
        self.messages = 0
        self._thread = threading.Thread(target=self._drain, name="notify", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        fds = array.array("i")
        space = socket.CMSG_SPACE(253 * fds.itemsize)
        while True:
            try:
                msg, anc, _flags, _addr = self.sock.recvmsg(4096, space)
            except OSError:
                return  # closed
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(data[: len(data) - len(data) % got.itemsize])
                    for fd in got:
                        os.close(fd)
            self.messages += 1
            if b"READY=1" in msg.split(b"\n"):
                self.ready.set()

    def wait_ready(self, proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.002):
            if proc.poll() is not None:
                raise RuntimeError(f"pid {proc.pid} exited ({proc.returncode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"pid {proc.pid} sent no READY=1 in {timeout:g} s")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(1.0)
        self.path.unlink(missing_ok=True)


class Service:
    """A daemon with ``$NOTIFY_SOCKET`` readiness, started and stopped by pid."""

    def __init__(
        self,
        base: Path,
        argv: list[str],
        env: dict[str, str] | None = None,
        unset: tuple[str, ...] = (),
    ) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.argv = argv
        self.env = env or {}
        self.unset = unset  # variables of our environment the daemon must not inherit
        self.notify = Notify(base / "notify.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "stderr.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Spawn and wait for READY=1; returns seconds from spawn to READY."""
        self.notify.ready.clear()
        env = {**os.environ, **self.env, "NOTIFY_SOCKET": str(self.notify.path)}
        for name in self.unset:
            env.pop(name, None)
        with open(self.log, "ab") as err:
            t0 = time.perf_counter()
            # cwd: ``python -m`` puts it first on sys.path, ahead of $PYTHONPATH
            self.proc = subprocess.Popen(
                self.argv, env=env, cwd=self.base, stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        try:
            self.notify.wait_ready(self.proc)
        except BaseException:
            self.kill9()
            sys.stderr.write(self.log.read_text()[-3000:])
            raise
        return time.perf_counter() - t0

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def cpu_s(self) -> float:
        return cpu_s(self.pid)

    def close(self) -> None:
        self.stop()
        self.notify.close()


def compile_tree(
    src: Path | None = None, python: str = sys.executable, package: str = "lockd"
) -> None:
    """Byte-compile a lockd tree (default: this one), as installing it would.

    This environment may set ``PYTHONDONTWRITEBYTECODE=1``; a daemon started under it
    recompiles every lockd module at every start (~50 ms of a restart), which no installed
    lockd does. So the daemon under test runs without the variable, on bytecode compiled
    here once."""
    pkg = (src or REPO) / package
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([python, "-m", "compileall", "-q", str(pkg)], env=env, check=True)


def compiled_tree(src: Path | None, into: Path) -> Path:
    """The optional compiled build of a lockd tree (setup.py, ``LOCKD_MYPYC=1``: the hot
    path through mypyc), made by ``scripts/build-mypyc.sh`` into ``into``."""
    script = REPO / "scripts" / "build-mypyc.sh"
    subprocess.run(
        [str(script), str(src or REPO), str(into)],
        env={**os.environ, "PYTHON": sys.executable},
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return into


class Lockd(Service):
    """``python -m lockd.daemon`` on private paths (``src``: a lockd tree to run instead),
    bytecode-compiled as deployed (:func:`compile_tree`)."""

    def __init__(
        self,
        base: Path,
        src: Path | None = None,
        python: str = sys.executable,
        config: str | None = None,
    ) -> None:
        self.state_dir = base / "state"
        self.socket = base / "lockd.sock"
        self.admin_socket = base / "admin.sock"
        argv = [python, "-m", "lockd.daemon", "--state-dir", str(self.state_dir)]
        argv += ["--socket", str(self.socket), "--admin-socket", str(self.admin_socket)]
        if config is not None:
            base.mkdir(parents=True, exist_ok=True)
            (base / "lockd.conf").write_text(config)
            argv += ["--config", str(base / "lockd.conf")]
        env = {"PYTHONPATH": str(src)} if src is not None else {}
        super().__init__(base, argv, env, unset=("PYTHONDONTWRITEBYTECODE",))

    def connect(self) -> Raw:
        return Raw(str(self.socket))

    def status(self) -> dict[str, Any]:
        conn = Raw(str(self.admin_socket))
        try:
            status: dict[str, Any] = conn.call("io.lockd.Admin.Status")["status"]
            return status
        finally:
            conn.close()

    def journal_bytes(self) -> dict[str, int]:
        out = {}
        for suffix in ("", "-wal", "-shm"):
            p = self.state_dir / f"journal.sqlite{suffix}"
            out[f"journal.sqlite{suffix}"] = p.stat().st_size if p.exists() else 0
        return out


class FloorServer(Service):
    """The do-nothing Varlink server of :mod:`bench.wire`, on uvloop by default: the event
    loop lockd runs on (``event_loop = "uvloop"``), so lockd ÷ floor is lockd's own cost and
    not the difference between two loops. Bytecode-compiled, like the daemon."""

    def __init__(self, base: Path, python: str = sys.executable, uvloop: bool = True) -> None:
        self.socket = base / "floor.sock"
        self.socket.unlink(missing_ok=True)
        argv = [python, "-m", "bench.wire", str(self.socket)] + (["uvloop"] if uvloop else [])
        super().__init__(base, argv, {"PYTHONPATH": str(REPO)}, unset=("PYTHONDONTWRITEBYTECODE",))

    def start(self) -> float:
        self.socket.unlink(missing_ok=True)
        return super().start()


class LeanServer(Service):
    """The lean prototype (:mod:`bench.lean`): lockd's work per Acquire and Release (the
    same syscalls, the same journal rows, committed before the reply) without lockd's
    layers, on uvloop, bytecode-compiled like the daemon."""

    def __init__(self, base: Path, python: str = sys.executable) -> None:
        self.socket = base / "lean.sock"
        self.state_dir = base / "state"
        argv = [python, "-m", "bench.lean", str(self.socket), str(self.state_dir)]
        super().__init__(base, argv, {"PYTHONPATH": str(REPO)}, unset=("PYTHONDONTWRITEBYTECODE",))

    def start(self) -> float:
        self.socket.unlink(missing_ok=True)
        return super().start()


def _die_with_us() -> None:
    """In the child: SIGKILL when the benchmark dies, so no owner outlives a crashed run."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Owners:
    """Real owner processes (``sleep``), one per owner, killed by pid at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, n: int = 1) -> list[int]:
        argv = ["sleep", "100000"]
        new = [
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=_die_with_us)
            for _ in range(n)
        ]
        self.procs += new
        return [p.pid for p in new]

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.procs.clear()


def register(conn: Raw, pid: int, name: str) -> str:
    """io.lockd.Register a process; returns the owner's uuid."""
    owner: dict[str, Any] = conn.call("io.lockd.Register", {"pid": pid, "name": name})["owner"]
    return str(owner["uuid"])
