"""A real systemd for lockd's tests: the project's units under a private service manager.

Theory of operation: two managers, both context managers that a module-scoped pytest fixture
holds for a whole test module, both started by the shell scripts in ``tests/systemd/`` (which
also work by hand, for debugging):

- :class:`UserManager` -- ``systemd --user`` in a private mount namespace
  (``user-manager.sh``): 0.3 s to start, the units' sockets at ``$XDG_RUNTIME_DIR/lockd/``
  (``%t``), the state directory at ``$XDG_CONFIG_HOME/lockd`` (where systemd 252's user
  manager puts ``StateDirectory=``). Every path is reachable from the test process directly.
- :class:`SystemManager` -- systemd as PID 1 of private PID/mount/UTS/IPC/net/cgroup
  namespaces (``system-manager.sh``): the *system* manager with the units exactly as
  deployed, sockets in ``/run/lockd/``, state in ``/var/lib/lockd``. Its files are reached from
  the host through ``/proc/PID1/root``; processes that must be seen by lockd (owners, whose
  pid it records) run inside with :meth:`SystemManager.spawn_inside`.

In both, the units are copied byte for byte from ``systemd/``, plus a ``lockd-test.target``
that wants the two sockets (what ``systemctl enable --now`` of the sockets does on a real
host). ``ExecStart=/usr/local/bin/lockd`` is satisfied by a directory holding a one-line
wrapper (``exec .venv/bin/lockd``) that is bound over ``/usr/local/bin`` inside the
manager's mount namespace only: the host's ``/usr/local/bin`` is never written.

Host safety (kept from the recipe the scripts were adapted from): private namespaces, a
sub-cgroup of our own, ``/proc/sys`` read-only for PID 1, units that would touch the kernel
or the host's files masked in the container (among them systemd-tmpfiles-setup, which would
empty ``/tmp`` at boot), and ``stop`` kills only what is in that cgroup. :func:`unavailable`
says why a machine cannot run them (not root, no ``unshare``, no systemd), for a clean
``pytest.skip``.

Also here: :class:`Observer` (a separate process that polls byte 0 of every lease file with
``F_OFD_GETLK`` and counts what it saw free) and :func:`bulk_acquire` (many leases at once:
several connections, each pipelining its calls, so group commits batch them; under systemd
252 the manager is the bottleneck past a few thousand leases, as it compares every new
fd-store entry with each stored one, kcmp(2) per pair).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent / "systemd"
USER_SCRIPT = HERE / "user-manager.sh"
SYSTEM_SCRIPT = HERE / "system-manager.sh"
OBSERVER = HERE / "observer.py"
UNITS = ("lockd.service", "lockd.socket", "lockd-admin.socket", "lockd-virtlockd.socket")
# installed, not enabled: the test target wants only lockd's own sockets (switching from
# virtlockd is the administrator's decision; tests start lockd-virtlockd.socket themselves)
SERVICE = "lockd.service"
TARGET = "lockd-test.target"
TARGET_TEXT = """\
[Unit]
Description=lockd under test: its sockets listening, as after `systemctl enable --now`
Wants=lockd.socket lockd-admin.socket
"""
SYSTEMD = "/lib/systemd/systemd"


# --- can this machine do it? ---------------------------------------------------------------


def unavailable() -> str | None:
    """Why a private systemd cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (mount namespaces, cgroups, a service manager)"
    for tool in ("unshare", "nsenter", "setpriv", "systemctl", "journalctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(SYSTEMD, os.X_OK):
        return f"{SYSTEMD} is not installed"
    if not os.path.isdir("/sys/fs/cgroup/unified") and not os.path.exists(
        "/sys/fs/cgroup/cgroup.procs"
    ):
        return "no cgroup2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified"
    try:
        subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a mount namespace: {exc}"
    return None


# --- the units and the wrapper -------------------------------------------------------------


def lockd_command() -> str:
    """How the wrapper starts lockd: the venv's console script, or ``python -m``."""
    script = Path(sys.executable).with_name("lockd")
    if script.exists():
        return f'exec {script} "$@"'
    return f'exec {sys.executable} -m lockd.daemon "$@"'


def prepare(workdir: Path) -> tuple[Path, Path]:
    """The unit directory (the project's units, unchanged, + the test target) and the
    directory to bind over /usr/local/bin (a ``lockd`` wrapper)."""
    units = workdir / "units"
    units.mkdir(parents=True, exist_ok=True)
    for name in UNITS:
        shutil.copyfile(REPO / "systemd" / name, units / name)
    (units / TARGET).write_text(TARGET_TEXT)
    bindir = workdir / "bin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / "lockd"
    wrapper.write_text(f"#!/bin/sh\n{lockd_command()}\n")
    wrapper.chmod(0o755)
    return units, bindir


def python_dirs() -> list[str]:
    """Directories the system manager's container needs read-only at the same path: the
    project (the editable install points there), the venv, the interpreter it was made from."""
    dirs = {REPO, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    outside = [d for d in dirs if not d.is_relative_to("/usr")]
    return sorted(
        str(d) for d in outside if not any(d != o and d.is_relative_to(o) for o in outside)
    )


# --- a manager -------------------------------------------------------------------------------


@dataclass
class Restart:
    """What systemd and the client saw of one death and restart of lockd."""

    old_pid: int
    new_pid: int
    killed_at: float  # CLOCK_MONOTONIC, seconds (the test's time.monotonic())
    started_at: float  # the new main process's exec (systemd's ExecMainStartTimestamp)
    ready_at: float  # READY=1 (systemd's ActiveEnterTimestamp)

    @property
    def to_ready(self) -> float:
        """Seconds from the kill to the new instance's READY=1."""
        return self.ready_at - self.killed_at

    @property
    def start_to_ready(self) -> float:
        """Seconds from the new instance's exec to its READY=1 (start-up + recovery)."""
        return self.ready_at - self.started_at


class Manager:
    """What both managers offer; see the module docstring."""

    script: Path

    def __init__(self, workdir: str | os.PathLike[str] | None = None, keep: bool = False):
        # short: UNIX socket paths are limited to 108 bytes
        self.w = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lkd-sd.", dir="/tmp"))
        self.keep = keep
        self.units, self.bindir = prepare(self.w)

    # -- life cycle
    def script_env(self) -> dict[str, str]:
        return dict(os.environ, BIN_DIR=str(self.bindir), PYTHON=sys.executable)

    def __enter__(self) -> Manager:
        try:
            subprocess.run(
                ["bash", str(self.script), "start", str(self.w), str(self.units), TARGET],
                env=self.script_env(),
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.CalledProcessError as exc:
            self.stop()
            raise RuntimeError(
                f"{self.script.name} start failed ({exc.returncode}):\n{exc.stdout}{exc.stderr}"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        subprocess.run(
            ["bash", str(self.script), "stop", str(self.w)],
            env=self.script_env(),
            check=False,
            capture_output=True,
            timeout=60,
        )
        if not self.keep:
            shutil.rmtree(self.w, ignore_errors=True)

    # -- systemd
    def systemctl_argv(self, *args: str) -> list[str]:
        raise NotImplementedError

    def systemctl(self, *args: str, check: bool = True) -> str:
        out = subprocess.run(
            self.systemctl_argv("--no-pager", *args),
            env=self.client_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"systemctl {' '.join(args)} exited {out.returncode}: {out.stderr}{out.stdout}"
            )
        return out.stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, unit: str, prop: str) -> str:
        return self.show(unit, prop).get(prop, "")

    def main_pid(self) -> int:
        """lockd's pid as its manager sees it (0: not running)."""
        return int(self.prop(SERVICE, "MainPID") or 0)

    def signal_main(self, sig: int) -> None:
        """Send ``sig`` to lockd's main process (as an abort or a kill -9 would come)."""
        os.kill(self.main_pid(), sig)

    def journal(self, *args: str) -> str:
        raise NotImplementedError

    def client_env(self) -> dict[str, str]:
        return dict(os.environ)

    # -- lockd's paths, reachable from the test process
    socket: Path
    admin_socket: Path
    state_dir: Path

    def lockctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKD_")}
        return subprocess.run(
            [sys.executable, "-m", "lockd.ctl.cli", "--socket", str(self.socket),
             "--admin-socket", str(self.admin_socket), "--timeout", "30", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def lockctl_json(self, *args: str) -> Any:
        out = self.lockctl(*args, "-J")
        assert out.returncode == 0, (
            f"lockctl {' '.join(args)} exited {out.returncode}: {out.stderr}"
        )
        return json.loads(out.stdout)

    def client(self, admin: bool = False, timeout: float = 30.0) -> Any:
        from lockd.client import Client

        return Client(self.admin_socket if admin else self.socket, admin=admin, timeout=timeout)

    # -- between tests
    def reset(self) -> None:
        """lockd stopped (the store flushed), its state gone, its counters reset; the
        sockets keep listening, so the next connection starts it afresh."""
        self.systemctl("stop", SERVICE)
        self.systemctl("reset-failed", SERVICE, check=False)
        self.clear_state()

    def clear_state(self) -> None:
        if self.state_dir.is_dir():
            for p in self.state_dir.iterdir():
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()

    # -- waiting for lockd
    def wait_for(self, pred: Any, timeout: float = 30.0, step: float = 0.01, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = pred()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout} s waiting for {what or pred}\n{self.diagnose()}"
                )
            time.sleep(step)

    def wait_running(self, not_pid: int = 0, timeout: float = 60.0) -> dict[str, str]:
        """Wait until lockd is active/running (READY=1 received) with a main pid other
        than ``not_pid``; returns the unit's properties then."""
        props = ("MainPID", "ActiveState", "SubState", "NRestarts",
                 "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")  # fmt: skip

        def ready() -> dict[str, str] | None:
            s = self.show(SERVICE, *props)
            running = (s.get("ActiveState"), s.get("SubState")) == ("active", "running")
            return s if running and int(s.get("MainPID") or 0) not in (0, not_pid) else None

        return self.wait_for(ready, timeout, what=f"lockd active with a pid other than {not_pid}")

    def kill_and_wait(self, sig: int, timeout: float = 60.0) -> Restart:
        """Send ``sig`` to lockd's main process and wait for systemd to bring it back."""
        old = self.main_pid()
        assert old > 0, f"lockd is not running\n{self.diagnose()}"
        killed_at = time.monotonic()
        self.signal_main(sig)
        s = self.wait_running(not_pid=old, timeout=timeout)
        return Restart(
            old_pid=old,
            new_pid=int(s["MainPID"]),
            killed_at=killed_at,
            started_at=int(s["ExecMainStartTimestampMonotonic"]) / 1e6,
            ready_at=int(s["ActiveEnterTimestampMonotonic"]) / 1e6,
        )

    def kill_observed(
        self, files: Sequence[str | os.PathLike[str]], sig: int
    ) -> tuple[Restart, Observation]:
        """:meth:`kill_and_wait` while an :class:`Observer` sweeps ``files``, from 50 ms
        before the signal to 50 ms after the restart: what another process saw meanwhile."""
        with Observer(files) as obs:
            time.sleep(0.05)
            restart = self.kill_and_wait(sig)
            time.sleep(0.05)
            return restart, obs.stop()

    def diagnose(self) -> str:
        try:
            status = self.systemctl("status", SERVICE, "-n", "0", check=False)
            log = self.journal("-n", "40")
        except Exception as exc:  # diagnostics must never hide the real failure
            return f"(no diagnostics: {exc})"
        return f"----- systemctl status -----\n{status}\n----- journal (tail) -----\n{log}"


class UserManager(Manager):
    """``systemd --user`` in a private mount namespace (see the module docstring)."""

    script = USER_SCRIPT

    def __init__(self, workdir: str | os.PathLike[str] | None = None, keep: bool = False):
        super().__init__(workdir, keep)
        self.runtime = self.w / "xdg"
        self.socket = self.runtime / "lockd" / "lockd.sock"
        self.admin_socket = self.runtime / "lockd" / "lockd-admin.sock"
        # StateDirectory= of a user unit: $XDG_CONFIG_HOME under systemd 252; newer ones may
        # use $XDG_STATE_HOME
        self.state_dirs = (self.w / "config" / "lockd", self.w / "state" / "lockd")

    @property
    def state_dir(self) -> Path:
        return next((d for d in self.state_dirs if d.is_dir()), self.state_dirs[0])

    def clear_state(self) -> None:
        for d in self.state_dirs:
            if d.is_dir():
                shutil.rmtree(d)

    def client_env(self) -> dict[str, str]:
        return dict(os.environ, XDG_RUNTIME_DIR=str(self.runtime))

    def systemctl_argv(self, *args: str) -> list[str]:
        return ["systemctl", "--user", *args]

    def manager_pid(self) -> int:
        return int((self.w / "manager.pid").read_text())

    def journal(self, *args: str) -> str:
        out = subprocess.run(
            ["journalctl", "-D", str(self.w / "journal"), "--no-pager", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return out.stdout + out.stderr


class SystemManager(Manager):
    """systemd as PID 1 of private namespaces: the system manager (module docstring)."""

    script = SYSTEM_SCRIPT

    def __init__(self, workdir: str | os.PathLike[str] | None = None, keep: bool = False):
        super().__init__(workdir, keep)
        # a directory of the host bound read-write at the same path inside (resource files)
        self.shared = self.w / "shared"
        self.shared.mkdir(exist_ok=True)

    def script_env(self) -> dict[str, str]:
        return dict(super().script_env(), RO_BINDS=" ".join(python_dirs()), BIND=str(self.shared))

    def __enter__(self) -> SystemManager:
        super().__enter__()
        self.pid1 = int((self.w / "pid1.pid").read_text())
        root = Path(f"/proc/{self.pid1}/root")
        self.socket = root / "run/lockd/lockd.sock"
        self.admin_socket = root / "run/lockd/lockd-admin.sock"
        self.state_dir = root / "var/lib/lockd"
        return self

    def inside(self, *argv: str) -> list[str]:
        return ["nsenter", "-t", str(self.pid1), "-a", "--", *argv]

    def run_inside(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(self.inside(*argv), capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise AssertionError(f"{argv} exited {out.returncode}: {out.stderr}{out.stdout}")
        return out

    def spawn_inside(self, *argv: str) -> tuple[subprocess.Popen[str], int]:
        """Start ``argv`` inside the container; returns the Popen (nsenter, on the host) and
        the process's pid as the container (and lockd) sees it."""
        p = subprocess.Popen(
            self.inside("/bin/sh", "-c", 'echo $$; exec "$@"', "sh", *argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None
        return p, int(p.stdout.readline())

    def systemctl_argv(self, *args: str) -> list[str]:
        return self.inside("systemctl", *args)

    def signal_main(self, sig: int) -> None:
        # MainPID is a pid of the container's namespace: let its manager send the signal
        name = signal.Signals(sig).name
        self.systemctl("kill", "--kill-who=main", f"--signal={name}", SERVICE)

    def journal(self, *args: str) -> str:
        out = self.run_inside("journalctl", "--no-pager", *args, check=False)
        return out.stdout + out.stderr


# --- the observer ----------------------------------------------------------------------------


@dataclass
class Observation:
    """What the observer saw: every sweep's (start, end) and the free lease files."""

    files: int
    probes: int
    sweeps: list[tuple[float, float]]
    free: int
    free_examples: list[str]
    min_held: int

    def during(self, start: float, end: float) -> tuple[int, float]:
        """(sweeps begun within [start, end], the longest time in it without a sweep begun)."""
        starts = [s[0] for s in self.sweeps if start <= s[0] <= end]
        edges = [start, *starts, end]
        return len(starts), max(b - a for a, b in zip(edges, edges[1:], strict=False))

    def summary(self) -> str:
        return (
            f"{self.probes} probes in {len(self.sweeps)} sweeps of {self.files} files, "
            f"{self.free} seen free, fewest held in a sweep {self.min_held}"
        )


class Observer:
    """A separate process that sweeps F_OFD_GETLK over byte 0 of every file, over and over,
    ``interval`` seconds apart, until :meth:`stop`; it takes no lock, so it disturbs nothing."""

    def __init__(self, files: Sequence[str | os.PathLike[str]], interval: float = 0.002):
        fd, listing = tempfile.mkstemp(prefix="lkd-obs.", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{os.fspath(p)}\n" for p in files))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, str(OBSERVER), listing, str(interval)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline()
        finally:
            os.unlink(listing)
        assert line.startswith("ready"), f"observer did not start: {line!r}"
        self.result: Observation | None = None

    def stop(self) -> Observation:
        if self.result is None:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            raw = json.loads(self.proc.stdout.readline())
            self.proc.wait(30)
            self.result = Observation(
                files=raw["files"],
                probes=raw["probes"],
                sweeps=[(a, b) for a, b in raw["sweeps"]],
                free=raw["free"],
                free_examples=raw["free_examples"],
                min_held=raw["min_held"],
            )
        return self.result

    def __enter__(self) -> Observer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.stop()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- many leases, fast ------------------------------------------------------------------------


def _pipelined(path: Path, calls: list[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """Send ``calls`` on one connection ``window`` at a time; their replies, in order."""
    replies: list[dict[str, Any]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(str(path))
        buf = b""
        for i in range(0, len(calls), window):
            chunk = calls[i : i + window]
            s.sendall(b"".join(json.dumps(c).encode() + b"\0" for c in chunk))
            got = 0
            while got < len(chunk):
                data = s.recv(1 << 20)
                if not data:
                    raise ConnectionResetError("lockd closed the connection")
                buf += data
                *done, buf = buf.split(b"\0")
                replies.extend(json.loads(m) for m in done)
                got += len(done)
    return replies


def bulk_acquire(
    sock: Path,
    jobs: Iterable[tuple[str, str | os.PathLike[str]]],
    connections: int = 8,
    window: int = 32,
) -> dict[str, int]:
    """Acquire an exclusive lease for every (owner uuid, file); returns file -> token.

    Several connections, each sending ``window`` calls before reading their replies: calls of
    different connections share group commits, and nobody waits a round trip per lease."""
    calls = [
        {
            "method": "io.lockd.Acquire",
            "parameters": {"resource": os.fspath(f), "owner": o, "mode": "exclusive"},
        }
        for o, f in jobs
    ]
    shares = [calls[i::connections] for i in range(connections)]
    results: list[list[dict[str, Any]]] = [[] for _ in shares]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = _pipelined(sock, shares[i], window)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(shares)) if shares[i]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    tokens: dict[str, int] = {}
    for share, replies in zip(shares, results, strict=True):
        for call, reply in zip(share, replies, strict=True):
            assert "error" not in reply, (call, reply)
            lease = reply["parameters"]["lease"]
            tokens[call["parameters"]["resource"]] = lease["token"]
    return tokens


def make_files(directory: Path, n: int, prefix: str = "disk") -> list[str]:
    """``n`` small files (stand-ins for disk images)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = directory / f"{prefix}{i:05d}.img"
        with open(p, "wb") as f:
            f.write(b"\0" * 512)
        paths.append(str(p))
    return paths


class Owners:
    """Owner processes (a VM's QEMU stand-in): ``sleep``, killed and reaped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def spawn(self) -> subprocess.Popen[Any]:
        p = subprocess.Popen(["sleep", "100000"], stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            with contextlib.suppress(Exception):
                p.wait(10)

    def __enter__(self) -> Owners:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
