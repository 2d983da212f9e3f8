"""A real GlusterFS volume mounted twice on this machine: two "hosts" sharing storage.

Theory of operation: :class:`GlusterBed` starts a private ``glusterd`` (its own working and
run directories, no hook scripts), creates and starts one single-brick volume on a local
directory, and mounts it twice through FUSE with two ``glusterfs`` client processes. The brick
tells its clients apart by their connections, so mount A and mount B behave as two hosts
sharing one volume: an OFD lock taken through A is refused through B (EAGAIN), and a lock is
dropped when its holder, its fd or its client connection goes. Measured on GlusterFS 10.3
(Debian 12): glusterd answers the CLI after 1.3-3 s, create + start 0.3 s, a mount 0.1 s,
teardown ~1.5 s; an fcntl through FUSE ~100-130 us (a FUSE round trip and an RPC to the brick).

Facts this harness is built on (found by running GlusterFS 10.3 here, and in its source):

- Port 24007 (glusterd's management port) is fixed: one bed per machine at a time.
  :func:`unavailable` says why a bed cannot run (not root, no /dev/fuse, packages missing,
  the port taken and by whom), for a clean skip; nothing is started then. A bed in a
  :class:`PrivateNet` (network and mount namespaces of its own) has the port to itself and
  writes nothing of the host: tests/cluster_harness.py runs its storage so.
- The CLI refuses ``localhost`` / 127.0.0.1 as a brick host; a name that merely resolves to a
  local address is accepted (``$(hostname)`` here, through /etc/hosts). :func:`brick_host`
  picks the host name, or the first non-loopback address of the machine.
- glusterd and the brick write to hard-coded paths despite a private working directory:
  ``/var/log/glusterfs/`` (brick log, cmd_history.log, geo-replication*, gfproxy, snaps),
  ``/var/run/gluster/`` (the brick's socket, snaps) and ``/var/lib/glusterd/``
  (geo-replication, ss_brick). Their entries are listed before the start and only the new
  ones are removed at the end.
- ``glusterd -N`` and ``glusterfs -N`` stay in the foreground as our children; the brick
  (``glusterfsd``) daemonizes and is found by its pid file. Every process is signalled by
  its recorded pid, never by name, and teardown checks that each one is gone (a zombie
  counts as gone: PID 1 here may reap late).
- A client's TCP connection to the brick reset with ``ss -K`` (SOCK_DESTROY) makes the brick
  drop every lock of that client at once; the client reconnects after ~3 s. With
  ``client.strict-locks=off`` (the default) it reopens the fds silently *without* their
  locks; with ``on`` it does not reopen an fd that held a lock, and every later operation on
  it fails with EBADFD (``client_get_remote_fd`` in xlators/protocol/client). That is
  :meth:`GlusterBed.reset_connection`.

The bed is a context manager; a test module holds one for all its tests (a module-scoped
fixture), since the port allows only one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

GLUSTERD_PORT = 24007
# entries glusterd and the brick create here whatever their working directory says
HARD_CODED_DIRS = (
    "/var/log/glusterfs",
    "/var/log/glusterfs/bricks",
    "/var/run/gluster",
    "/var/lib/glusterd",
)
TOOLS = ("glusterd", "gluster", "glusterfs", "ss", "umount", "mountpoint")
PACKAGES = "glusterfs-server glusterfs-client"


class BedError(RuntimeError):
    """The bed could not be set up (the message says which step and shows the log)."""


def port_owner(port: int) -> str | None:
    """Who listens on TCP ``port`` (``ss`` output), or None if nobody does."""
    out = subprocess.run(
        ["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, timeout=30
    )
    line = out.stdout.strip()
    return line or None


def brick_host() -> str | None:
    """A name or address of this machine that gluster's CLI accepts as a brick host."""
    name = socket.gethostname()
    if name and not name.startswith("localhost"):
        with contextlib.suppress(OSError):
            socket.getaddrinfo(name, None)
            return name
    # no usable host name: the first non-loopback address (glusterd checks it is local)
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=30)
    for addr in out.stdout.split():
        if not addr.startswith("127.") and ":" not in addr:
            return addr
    return None


def unavailable(private_net: bool = False) -> str | None:
    """Why a bed cannot run here, or None if it can (``private_net``: the bed runs in a
    :class:`PrivateNet` of its own, where port 24007 is its own)."""
    if os.geteuid() != 0:
        return "needs root (FUSE mounts, a brick with trusted.* xattrs)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages: {PACKAGES}, iproute2)"
    if private_net:
        return None if shutil.which("ip") else "ip is not installed (Debian package: iproute2)"
    owner = port_owner(GLUSTERD_PORT)
    if owner is not None:
        return (
            f"TCP port {GLUSTERD_PORT} is in use (another glusterd or test bed: one bed per "
            f"machine at a time): {owner}"
        )
    if brick_host() is None:
        return "no host name or address usable as a brick host (gluster refuses localhost)"
    return None


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _stop_pid(pid: int | None, timeout: float = 10.0) -> None:
    """TERM, then KILL: only pids this bed recorded."""
    if pid is None or not _alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_gone(pid, 5)


def _is_mounted(path: Path) -> bool:
    target = os.fspath(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def answers(path: Path) -> bool:
    """Whether a path on a mount answers a stat (a FUSE mount mid-reconnect does not)."""
    try:
        os.stat(path)
    except OSError:
        return False
    return True


# tmpfs mounts over these in a PrivateNet: glusterd writes there whatever it is told
PRIVATE_DIRS = ("/var/log/glusterfs", "/var/lib/glusterd", "/run/gluster")


class PrivateNet:
    """A network and a mount namespace of their own for glusterd and its brick: port 24007
    and the brick ports are theirs alone (other beds on the machine run beside), and the
    hard-coded directories (:data:`HARD_CODED_DIRS`) are tmpfs mounts there, so nothing of
    the host is written. A ``sleep`` holds the namespaces; :meth:`wrap` runs a command in
    them. Hosts reach it over links the caller makes (``ip`` in it, :meth:`ip`)."""

    def __init__(self) -> None:
        mounts = "".join(f"mount -t tmpfs -o mode=755,size=64m lkd-gl {d}; " for d in PRIVATE_DIRS)
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-ec",
             f"{mounts}ip link set lo up; echo ready; exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.close()
            raise BedError(f"private namespaces for glusterd did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wrap(self, *argv: str) -> list[str]:
        # nsenter enters net and mount namespaces without forking: the pid is the command's
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", f"--mount=/proc/{self.pid}/ns/mnt",
                "--", *argv]  # fmt: skip

    def ip(self, *args: str) -> str:
        out = subprocess.run(self.wrap("ip", *args), capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise BedError(f"ip {' '.join(args)}: {out.stderr}")
        return out.stdout

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


class GlusterBed:
    """One private glusterd, one volume, mounted at ``mount("a")`` and ``mount("b")``.

    ``options``: volume options set before the volume starts (so both mounts build their
    client graph with them), e.g. ``{"client.strict-locks": "on"}``. ``net``: run glusterd,
    the brick and these mounts' clients in a :class:`PrivateNet`, the brick on ``host`` (an
    address of it); then the bed needs no free port and writes nothing of the host, and
    its clients are the caller's to mount (in namespaces that reach ``host``).
    """

    def __init__(
        self,
        volume: str = "lockdvol",
        options: dict[str, str] | None = None,
        mounts: tuple[str, ...] = ("a", "b"),
        workdir: str | os.PathLike[str] | None = None,
        net: PrivateNet | None = None,
        host: str | None = None,
    ) -> None:
        self.volume = volume
        self.net = net
        if net is not None and mounts:
            raise ValueError("a bed in a PrivateNet mounts no client itself: mounts=()")
        self.options = dict(options or {})
        self.names = mounts
        self.w = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lkd-gl.", dir="/tmp"))
        self.host = host or brick_host() or ""
        self.glusterd: subprocess.Popen[bytes] | None = None
        self.brick_pid: int | None = None
        self.brick_port = 0
        self.clients: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: list[int] = []  # every process started, for the final check
        self._before: set[str] = set()
        self.timings: dict[str, float] = {}

    # -- paths ---------------------------------------------------------------------------
    def mount(self, name: str) -> Path:
        return self.w / "mnt" / name

    @property
    def log_dir(self) -> Path:
        return self.w / "log"

    # -- the CLI -------------------------------------------------------------------------
    def cmd(self, *argv: str) -> list[str]:
        """``argv`` as the bed runs it (in its PrivateNet, if it has one)."""
        return self.net.wrap(*argv) if self.net is not None else list(argv)

    def gluster(self, *args: str, check: bool = True) -> str:
        argv = self.cmd("gluster", "--mode=script", f"--glusterd-sock={self.w}/run/glusterd.socket",
                        f"--log-file={self.log_dir}/cli.log", *args)  # fmt: skip
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise BedError(f"gluster {' '.join(args)}: {out.stdout}{out.stderr}")
        return out.stdout

    def set_option(self, key: str, value: str) -> None:
        """``gluster volume set``; mounted clients see it only after :meth:`remount`."""
        self.gluster("volume", "set", self.volume, key, value)
        self.options[key] = value

    # -- life cycle ----------------------------------------------------------------------
    def __enter__(self) -> GlusterBed:
        reason = unavailable(private_net=self.net is not None)
        if reason is not None:
            raise BedError(f"cannot run a GlusterFS bed here: {reason}")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _snapshot(self) -> set[str]:
        seen = set()
        for d in HARD_CODED_DIRS:
            if os.path.isdir(d):
                seen.add(d)
                seen.update(os.path.join(d, e) for e in os.listdir(d))
        return seen

    def _start(self) -> None:
        t0 = time.monotonic()
        for sub in ("wd", "run", "log", "brick"):
            (self.w / sub).mkdir(parents=True, exist_ok=True)
        for name in self.names:
            self.mount(name).mkdir(parents=True, exist_ok=True)
        if self.net is None:  # (a PrivateNet's glusterd writes only to its own tmpfs)
            self._before = self._snapshot()
        vol = self.w / "glusterd.vol"
        vol.write_text(
            "volume management\n"
            "    type mgmt/glusterd\n"
            f"    option working-directory {self.w}/wd\n"
            f"    option run-directory {self.w}/run\n"
            f"    option glusterd-sockfile {self.w}/run/glusterd.socket\n"
            "    option transport-type socket\n"
            f"    option transport.socket.listen-port {GLUSTERD_PORT}\n"
            "    option transport.socket.read-fail-log off\n"
            "    option ping-timeout 0\n"
            "    option event-threads 1\n"
            "    option max-port 60999\n"
            "end-volume\n"
        )
        with open(self.log_dir / "glusterd.out", "wb") as out:
            self.glusterd = subprocess.Popen(
                self.cmd(
                    "glusterd",
                    "-N",
                    "-f",
                    str(vol),
                    "-p",
                    f"{self.w}/run/glusterd.pid",
                    f"--log-file={self.log_dir}/glusterd.log",
                ),  # fmt: skip
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.pids.append(self.glusterd.pid)
        deadline = time.monotonic() + 60
        while True:
            if self.glusterd.poll() is not None:
                raise BedError(f"glusterd exited {self.glusterd.returncode}\n{self.tail()}")
            with contextlib.suppress(BedError):
                self.gluster("volume", "list")
                break
            if time.monotonic() > deadline:
                raise BedError(f"glusterd did not answer within 60 s\n{self.tail()}")
            time.sleep(0.1)
        self.timings["glusterd_up_s"] = time.monotonic() - t0
        t1 = time.monotonic()
        # "force": a brick on the root filesystem (ext4 carries trusted.* xattrs fine)
        self.gluster("volume", "create", self.volume, f"{self.host}:{self.w}/brick/data", "force")
        for key, value in self.options.items():
            self.gluster("volume", "set", self.volume, key, value)
        self.gluster("volume", "start", self.volume)
        pidfiles = list((self.w / "run" / "vols" / self.volume).glob("*.pid"))
        if not pidfiles:
            raise BedError(f"no brick pid file\n{self.tail()}")
        self.brick_pid = int(pidfiles[0].read_text().split()[0])
        self.pids.append(self.brick_pid)
        argv = Path(f"/proc/{self.brick_pid}/cmdline").read_bytes().split(b"\0")
        self.brick_port = int(argv[argv.index(b"--brick-port") + 1])
        self.timings["volume_up_s"] = time.monotonic() - t1
        for name in self.names:
            self.mount_client(name)
        self.timings["setup_s"] = time.monotonic() - t0

    def mount_client(self, name: str) -> float:
        """Mount the volume at ``mount(name)`` with a client of its own; seconds taken."""
        t0 = time.monotonic()
        target = self.mount(name)
        with open(self.log_dir / f"client-{name}.out", "ab") as out:
            proc = subprocess.Popen(
                [
                    "glusterfs",
                    "-N",
                    f"--volfile-server={self.host}",
                    f"--volfile-id={self.volume}",
                    "-l",
                    f"{self.log_dir}/client-{name}.log",
                    str(target),
                ],  # fmt: skip
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.clients[name] = proc
        self.pids.append(proc.pid)
        deadline = time.monotonic() + 30
        while not (_is_mounted(target) and answers(target)):
            if proc.poll() is not None:
                raise BedError(f"client {name} exited {proc.returncode}\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise BedError(f"mount {name} did not come up in 30 s\n{self.tail(name)}")
            time.sleep(0.02)
        return time.monotonic() - t0

    def umount_client(self, name: str) -> None:
        """Unmount ``name`` and wait for its client to exit (lazily if files are open)."""
        target = self.mount(name)
        proc = self.clients.pop(name, None)
        if _is_mounted(target):
            out = subprocess.run(["umount", str(target)], capture_output=True, timeout=60)
            if out.returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=60)
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def remount(self, name: str) -> float:
        """Unmount and mount again (a client picks up volume options at mount)."""
        self.umount_client(name)
        return self.mount_client(name)

    def client_pid(self, name: str) -> int:
        return self.clients[name].pid

    def kill_client(self, name: str) -> None:
        """SIGKILL the client process of ``name`` (the mount stays, dead: ENOTCONN)."""
        proc = self.clients[name]
        proc.kill()
        proc.wait(10)

    # -- the brick connection ------------------------------------------------------------
    def brick_connections(self, name: str) -> list[int]:
        """Local ports of ``name``'s client's established TCP connections to the brick."""
        out = subprocess.run(
            ["ss", "-tnpH", "state", "established", "dport", "=", f":{self.brick_port}"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        tag = f"pid={self.client_pid(name)},"
        ports = []
        for line in out.splitlines():
            if tag in line:
                local = line.split()[2]  # Recv-Q Send-Q Local Peer Process (no State column)
                ports.append(int(local.rsplit(":", 1)[1]))
        return ports

    def reset_connection(self, name: str) -> list[int]:
        """Reset ``name``'s client connection to the brick (``ss -K``: the kernel aborts
        the socket and sends RST). The brick drops every lock of that client at once; the
        client reconnects by itself after ~3 s. Returns the ports reset."""
        ports = self.brick_connections(name)
        if not ports:
            raise BedError(f"client {name} has no connection to the brick")
        for port in ports:
            subprocess.run(
                ["ss", "-K", "dport", "=", f":{self.brick_port}", "sport", "=", f":{port}"],
                capture_output=True,
                timeout=30,
            )
        left = set(self.brick_connections(name)) & set(ports)
        if left:
            raise BedError(f"ss -K did not close client {name}'s port(s) {sorted(left)}")
        return ports

    def wait_reconnected(self, name: str, timeout: float = 30.0) -> float:
        """Seconds until ``name``'s client is connected to the brick again."""
        t0 = time.monotonic()
        while not self.brick_connections(name):
            if time.monotonic() - t0 > timeout:
                raise BedError(f"client {name} did not reconnect within {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - t0

    # -- teardown ------------------------------------------------------------------------
    def tail(self, name: str | None = None, lines: int = 20) -> str:
        logs = [self.log_dir / "glusterd.log"]
        if name is not None:
            logs = [self.log_dir / f"client-{name}.log", self.log_dir / f"client-{name}.out"]
        out = []
        for p in logs:
            with contextlib.suppress(OSError):
                out.append(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-lines:]))
        return "\n".join(out)

    def close(self) -> None:
        """Tear everything down; BedError if anything of ours is left behind."""
        t0 = time.monotonic()
        for name in list(self.clients):
            self.umount_client(name)
        for name in self.names:  # a mount whose client died (kill_client)
            if _is_mounted(self.mount(name)):
                subprocess.run(["umount", "-l", str(self.mount(name))], capture_output=True)
        if self.glusterd is not None and self.glusterd.poll() is None:
            self.gluster("volume", "stop", self.volume, "force", check=False)
            self.gluster("volume", "delete", self.volume, check=False)
        _stop_pid(self.brick_pid)
        if self.glusterd is not None:
            _stop_pid(self.glusterd.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.glusterd.wait(10)
        if self._before:
            for entry in sorted(self._snapshot() - self._before, reverse=True):
                if entry in HARD_CODED_DIRS:  # one of the list's directories, made now
                    with contextlib.suppress(OSError):
                        os.rmdir(entry)
                    continue
                if os.path.isdir(entry) and not os.path.islink(entry):
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry)
        mounts_left = [n for n in self.names if _is_mounted(self.mount(n))]
        shutil.rmtree(self.w, ignore_errors=True)
        self.timings["teardown_s"] = time.monotonic() - t0
        alive = [p for p in self.pids if _alive(p)]
        if alive or mounts_left:
            raise BedError(f"teardown left processes {alive} and mounts {mounts_left}")
