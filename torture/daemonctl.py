"""Starting, killing and talking to the daemon under torture.

Theory of operation: :class:`Lockd` runs one lockd on private paths and restarts it as often
as the killer wants. A start goes through a :class:`Spawner`: ``fork`` (the default) asks the
zygote (:mod:`torture.zygote`) to fork a pre-imported daemon, ``exec`` runs ``python -m
lockd.daemon`` like systemd would. Either way the harness holds a pidfd for the daemon, so it
signals exactly that process and learns of its death by ``select`` (a failpoint abort is a
death the harness did not cause). Readiness is systemd's: READY=1 on a datagram socket bound
here, whose ``SCM_CREDENTIALS`` must name the daemon's pid; any fd passed along is closed at
once (the harness is not an fd store, so no lock may outlive the daemon in our queue).

:func:`varlink_call` is the checker's own minimal Varlink client (NUL-terminated JSON):
the checker must not trust ``lockd.client``, whose retry logic is part of what is tested.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class StartFailed(Exception):
    """The daemon exited before READY=1 (``rc`` is its exit code) or never got ready."""

    def __init__(self, message: str, rc: int | None) -> None:
        super().__init__(message)
        self.rc = rc


class Handle:
    """A started daemon process: its pid, a pidfd, and a way to reap it."""

    def __init__(self, pid: int, reap: Any) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self._reap = reap
        self.rc: int | None = None

    def exited(self, timeout: float = 0.0) -> bool:
        if self.rc is not None:
            return True
        r, _, _ = select.select([self.pidfd], [], [], timeout)
        return bool(r)

    def signal(self, sig: int) -> None:
        if self.rc is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def wait(self, timeout: float = 15.0) -> int:
        if self.rc is None:
            if not self.exited(timeout):
                self.signal(signal.SIGKILL)
                self.exited(5.0)
            self.rc = int(self._reap(self.pid))
            os.close(self.pidfd)
        return self.rc


class Spawner:
    """``fork``: through the zygote; ``exec``: a new interpreter per start."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.zygote: subprocess.Popen[str] | None = None
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        if mode == "fork":
            self.zygote = subprocess.Popen(
                [sys.executable, "-m", "torture.zygote"],
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )

    def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        z = self.zygote
        assert z is not None and z.stdin is not None and z.stdout is not None
        z.stdin.write(json.dumps(req) + "\n")
        z.stdin.flush()
        line = z.stdout.readline()
        if not line:
            raise RuntimeError("the zygote died")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> Handle:
        if self.mode == "fork":
            pid = int(self._ask({"spawn": {"argv": argv, "env": env, "log": str(log)}})["pid"])
            return Handle(pid, lambda p: self._ask({"reap": p})["rc"])
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lockd.daemon", *argv],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        self.children[proc.pid] = proc
        return Handle(proc.pid, lambda p: self.children.pop(p).wait())

    def close(self) -> None:
        for proc in self.children.values():
            proc.kill()
            proc.wait()
        if self.zygote is not None:
            assert self.zygote.stdin is not None
            self.zygote.stdin.close()
            self.zygote.wait(10)
            if self.zygote.stdout is not None:
                self.zygote.stdout.close()


class Lockd:
    """One lockd on private paths: ``base`` holds state and log, ``runtime`` the sockets."""

    def __init__(self, base: Path, runtime: Path, spawner: Spawner, config: str = "") -> None:
        self.state_dir = base / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log = base / "daemon.log"
        self.config = base / "lockd.conf"
        self.config.write_text(config)
        self.socket = runtime / "lockd.sock"
        self.admin_socket = runtime / "admin.sock"
        self.notify_path = runtime / "notify.sock"
        self.spawner = spawner
        self.proc: Handle | None = None
        self.starts = 0
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._notify.bind(os.fspath(self.notify_path))
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.setblocking(False)
        self._ready: set[int] = set()

    def argv(self) -> list[str]:
        return [
            "--state-dir", os.fspath(self.state_dir),
            "--socket", os.fspath(self.socket),
            "--admin-socket", os.fspath(self.admin_socket),
            "--config", os.fspath(self.config),
        ]  # fmt: skip

    def env(self, failpoint: str | None) -> dict[str, str]:
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

    def _drain(self) -> None:
        anc = socket.CMSG_SPACE(253 * 4) + socket.CMSG_SPACE(struct.calcsize("3i"))
        while True:
            try:
                data, ancdata, _flags, _addr = self._notify.recvmsg(4096, anc)
            except (BlockingIOError, InterruptedError):
                return
            pid = None
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    n = len(cdata) // 4
                    for fd in struct.unpack(f"{n}i", cdata[: n * 4]):
                        os.close(fd)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", cdata[:12])[0]
            if pid is not None and "READY=1" in data.decode(errors="replace").split("\n"):
                self._ready.add(pid)

    def start(self, failpoint: str | None = None, timeout: float = 20.0) -> float:
        """Start and wait for READY=1; returns the monotonic time it came.

        StartFailed if it exits first (a recovery failpoint does exactly that).
        """
        assert self.proc is None, "daemon already running"
        self.starts += 1
        with open(self.log, "a") as f:
            f.write(f"\n===== start #{self.starts} failpoint={failpoint or '-'} =====\n")
        proc = self.spawner.spawn(self.argv(), self.env(failpoint), self.log)
        self.proc = proc
        deadline = time.monotonic() + timeout
        while True:
            self._drain()
            if proc.pid in self._ready:
                self._ready.discard(proc.pid)
                return time.monotonic()
            left = deadline - time.monotonic()
            if left <= 0:
                rc = self.stop_hard()
                raise StartFailed(f"no READY=1 within {timeout} s", rc)
            r, _, _ = select.select([self._notify.fileno(), proc.pidfd], [], [], left)
            if proc.pidfd in r:
                self._drain()
                if proc.pid in self._ready:
                    continue
                rc = proc.wait()
                self.proc = None
                raise StartFailed(f"exited {rc} before READY=1", rc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def died(self, timeout: float = 0.0) -> bool:
        return self.proc is None or self.proc.exited(timeout)

    def kill(self, sig: int) -> int:
        """Send ``sig``, wait for the death, reap; returns the exit code."""
        assert self.proc is not None
        self.proc.signal(sig)
        return self.reap()

    def reap(self) -> int:
        assert self.proc is not None
        rc = self.proc.wait()
        self.proc = None
        self._drain()
        return rc

    def stop_hard(self) -> int | None:
        if self.proc is None:
            return None
        return self.kill(signal.SIGKILL)

    def close(self) -> None:
        self.stop_hard()
        self._notify.close()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(text[-lines:])


class VarlinkError(Exception):
    def __init__(self, name: str, parameters: dict[str, Any]) -> None:
        super().__init__(f"{name} {parameters}")
        self.name = name
        self.parameters = parameters


def varlink_call(
    path: Path, method: str, parameters: dict[str, Any] | None = None, timeout: float = 10.0
) -> dict[str, Any]:
    """One call on a new connection; the reply's parameters, or VarlinkError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(os.fspath(path))
        s.sendall(json.dumps({"method": method, "parameters": parameters or {}}).encode() + b"\0")
        buf = b""
        while b"\0" not in buf:
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionResetError(f"{method}: connection closed before the reply")
            buf += chunk
    msg: dict[str, Any] = json.loads(buf[: buf.index(b"\0")])
    if "error" in msg:
        raise VarlinkError(str(msg["error"]), msg.get("parameters") or {})
    params: dict[str, Any] = msg.get("parameters", {})
    return params


def lockctl_verify(
    admin_socket: Path, timeout: float
) -> tuple[dict[str, Any] | None, list[tuple[str, str]]]:
    """``lockctl verify`` of one daemon: its report when it found no drift, and the findings
    as (kind, text): each drift (exit code 7), or the command's own failure."""
    out = subprocess.run(
        [sys.executable, "-m", "lockd.ctl.cli", "--admin-socket", str(admin_socket), "verify",
         "-J"],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if out.returncode == 7:
        drift = json.loads(out.stdout)["verify"]["drift"]
        return None, [("verify-drift", f"lockctl verify: {f}") for f in drift]
    if out.returncode != 0:
        return None, [("verify", f"lockctl verify exited {out.returncode}: {out.stderr}")]
    return json.loads(out.stdout)["verify"], []
