"""A private libvirt host for lockd's end-to-end tests: a real libvirtd 9.0 running real (TCG)
QEMU domains, with a pluggable lock daemon on ``/run/libvirt/virtlockd-sock``.

Theory of operation. :class:`LibvirtHost` boots :class:`sd_harness.SystemManager` (systemd as
PID 1 of private PID/mount/UTS/IPC/net/cgroup namespaces, a throw-away root: a tmpfs with the
host's ``/usr`` read-only and a copy of ``/etc``), with the project's units installed as on a
real host, then runs ``libvirtd`` inside it as a transient unit, with ``lock_manager = "lockd"``.
Domains are tiny TCG guests (64 MiB, no network, no graphics) on raw 16 MiB images in a host
directory bound at the same path inside, so the test process probes the very inodes the
daemons lock. The lock daemon is one of:

- :class:`Virtlockd` -- the real one (Debian's ``libvirt-daemon``), to document its bug;
- :class:`DirectLockd` -- lockd binding ``/run/libvirt/virtlockd-sock`` itself (a transient
  unit, only so it can be started, killed and timed; no socket activation, no fd store: after
  a crash it re-takes its leases from the journal);
- :class:`SystemdLockd` -- lockd run by the project's units exactly as deployed
  (``lockd-virtlockd.socket`` + ``lockd.service``, the fd store): libvirtd's first connection
  starts it.

Why libvirtd runs *inside* systemd's namespaces rather than systemd inside libvirt's: libvirt
names a lease's owner by the QEMU pid, as a number in REGISTER, and lockd reads
``/proc/<pid>`` and opens a pidfd on it. The two must share one PID namespace, as on a real
host; the system manager's container gives that, plus the units at their deployed paths
(``%t`` = ``/run``), plus a PID 1 that reaps the QEMU processes libvirtd daemonizes.

Pitfalls handled (the recipe this was adapted from found them on Debian 12 + libvirt 9.0.0):

1. libvirtd resolves its compiled-in qemu user ``libvirt-qemu`` before it reads qemu.conf, and
   only ``libvirt-daemon-system`` creates it: the container's copy of ``/etc/passwd`` and
   ``/etc/group`` gets it.
2. ``/var/lib/libvirt``, ``/var/log/libvirt``, ``/var/cache/libvirt`` and ``/run/libvirt`` need
   not exist on the host: the container's ``/var`` and ``/run`` are its own tmpfs. Its ``/var``
   starts empty, so ``/var/run`` (the path virsh connects to) is made a link to ``/run``.
3. The default UNIX socket auth is polkit, which needs D-Bus: ``auth_unix_rw = "none"``.
4. No D-Bus, dnsmasq, DMI or ``/dev/kvm`` here: libvirtd logs errors about each and carries on.
5. qemu.conf: ``cgroup_controllers = [ ]``, ``namespaces = [ ]``, ``security_driver = "none"``,
   ``dynamic_ownership = 0``, ``user/group = "root"``, ``stdio_handler = "file"``. A privileged
   libvirtd never spawns a lock daemon: the test starts one.
6. QEMU's own OFD image locks (bytes 100-101 and up) refuse a second writer before libvirt's
   lock manager is asked, which would hide the lock daemon on one host: the disks are raw and
   the disk device gets ``share-rw=on`` through ``<qemu:override>`` (libvirt >= 8.2), so only
   the lock daemon stands between two domains, as across hosts on NFS.
7. QEMU daemonizes; the container's systemd (PID 1) reaps it, so no zombie owner lingers.
8. ``type='qemu'`` forces TCG (``/dev/kvm`` is not in the container).

Nothing of the host changes: the container is torn down by ``SystemManager.stop`` (poweroff,
then SIGKILL by pid of whatever is left in its cgroup), and :meth:`LibvirtHost.check_gone`
asserts that no process of its namespaces and no mount of its directory is left.
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
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sd_harness as sd
from e2e import Conn, wait_until

BINARIES = (
    "/usr/sbin/libvirtd",
    "/usr/sbin/virtlockd",
    "/usr/bin/virsh",
    "/usr/bin/qemu-system-x86_64",
    "/usr/bin/qemu-img",
)
PACKAGES = "libvirt-daemon libvirt-clients qemu-system-x86 qemu-utils"
VIRTLOCKD_SOCK = "/run/libvirt/virtlockd-sock"
VIRTLOCKD_UNIT = "lockd-virtlockd.socket"
DAEMON_UNIT = "e2e-lockdaemon.service"  # virtlockd, or lockd on its own (one at a time)
DISK_MIB = 16

QEMU_CONF = """\
# written by tests/libvirt_harness.py
lock_manager = "lockd"
# the rest only makes libvirtd run in a container: no cgroups, namespaces or security driver
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
# qemu-lockd.conf's defaults, written out: direct leases (the disk file itself is locked)
QEMU_LOCKD_CONF = """\
auto_disk_leases = 1
require_lease_for_disks = 1
"""
LIBVIRTD_CONF = """\
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_group = "root"
log_filters = "1:locking 3:*"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
"""
VIRTLOCKD_CONF = """\
log_filters = "1:locking 3:*"
log_outputs = "1:file:/var/log/libvirt/virtlockd.log"
"""
QEMU_USER = "libvirt-qemu:x:64055:64055:libvirt-qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
QEMU_GROUP = "libvirt-qemu:x:64055:\n"


def unavailable() -> str | None:
    """Why this machine cannot run a private libvirt host, or None if it can."""
    reason = sd.unavailable()
    if reason is not None:
        return reason
    missing = [b for b in BINARIES if not os.access(b, os.X_OK)]
    if missing:
        return f"missing {' '.join(missing)} (apt-get install {PACKAGES}; `make setup` does)"
    return None


@dataclass(frozen=True)
class DomainSpec:
    """A domain to define: its uuid, its disks (file names in the image directory, vda first)
    and whether they are ``<shareable/>`` (SHARED leases)."""

    uuid: str
    disks: tuple[str, ...]
    shareable: bool = False


@dataclass(frozen=True)
class Domain:
    name: str
    uuid: str
    disks: tuple[Path, ...]

    @property
    def disk(self) -> Path:
        return self.disks[0]


def domain_xml(name: str, uuid: str, disks: Sequence[Path], shareable: bool = False) -> str:
    """A tiny TCG domain on raw disks (aliases ``ua-disk0``...), each with ``share-rw=on``."""
    devices = []
    overrides = []
    for i, disk in enumerate(disks):
        devices.append(f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{disk}'/>
      <target dev='vd{"abcdefgh"[i]}' bus='virtio'/>{"<shareable/>" if shareable else ""}
      <alias name='ua-disk{i}'/>
    </disk>""")
        # QEMU's image locks would refuse a second writer on one host before libvirt asks the
        # lock daemon (pitfall 6): share-rw=on leaves the decision to the lock daemon alone
        overrides.append(f"""
    <qemu:device alias='ua-disk{i}'>
      <qemu:frontend>
        <qemu:property name='share-rw' type='bool' value='true'/>
      </qemu:frontend>
    </qemu:device>""")
    return f"""\
<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>{"".join(devices)}
    <controller type='usb' model='none'/>
    <serial type='null'><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <qemu:override>{"".join(overrides)}
  </qemu:override>
</domain>
"""


class Container(sd.SystemManager):
    """The system manager with one more unit of the project: ``lockd-virtlockd.socket``
    (installed, not enabled: :class:`SystemdLockd` starts it)."""

    def __init__(self) -> None:
        super().__init__()
        unit = sd.REPO / "systemd" / VIRTLOCKD_UNIT
        if unit.exists():
            shutil.copyfile(unit, self.units / VIRTLOCKD_UNIT)


class LibvirtHost:
    """The container, libvirtd in it, and the test's domains (see the module docstring)."""

    def __init__(self, domains: dict[str, DomainSpec]) -> None:
        """``domains``: name -> spec; the disks are made in the shared directory."""
        self.wanted = domains
        self.sm = Container()
        self.img = self.sm.shared / "img"
        self.domains: dict[str, Domain] = {}
        self.libvirtd_ready_s = 0.0
        self.libvirtd_starts = 0

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> LibvirtHost:
        try:
            self.sm.__enter__()
            self.root = Path(f"/proc/{self.sm.pid1}/root")
            self.ns = (os.readlink(f"/proc/{self.sm.pid1}/ns/pid"),
                       os.readlink(f"/proc/{self.sm.pid1}/ns/mnt"))  # fmt: skip
            self._configure()
            self.start_libvirtd()
            self._define()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        ns = getattr(self, "ns", None)
        self.sm.stop()
        if ns is not None:
            self.check_gone(ns)

    @staticmethod
    def processes(ns: tuple[str, str]) -> list[str]:
        """Pids (on the host) of the processes in the container's PID or mount namespace."""
        left = []
        for p in Path("/proc").iterdir():
            with contextlib.suppress(OSError):
                if p.name.isdigit() and (
                    os.readlink(p / "ns/pid") == ns[0] or os.readlink(p / "ns/mnt") == ns[1]
                ):
                    left.append(p.name)
        return left

    def check_gone(self, ns: tuple[str, str]) -> None:
        """No process of the container's PID or mount namespace is left on the host, and no
        mount of its directory (the host's mount table is as before)."""
        left = self.processes(ns)
        assert not left, f"processes left in the libvirt container's namespaces: {left}"
        mounts = Path("/proc/self/mountinfo").read_text()
        assert str(self.sm.w) not in mounts, f"mounts of {self.sm.w} left on the host"

    def _configure(self) -> None:
        """Pitfalls 1-5: the qemu user, /var/run, libvirt's directories and configs."""
        r = self.root
        with open(r / "etc/passwd", "a") as f:
            f.write(QEMU_USER)
        with open(r / "etc/group", "a") as f:
            f.write(QEMU_GROUP)
        if not os.path.lexists(r / "var/run"):
            os.symlink("/run", r / "var/run")  # resolved inside the container
        for d in ("var/lib/libvirt", "var/log/libvirt", "var/cache/libvirt", "run/libvirt",
                  "etc/libvirt"):  # fmt: skip
            (r / d).mkdir(parents=True, exist_ok=True)
        self.write_conf("qemu.conf", QEMU_CONF)
        self.write_conf("qemu-lockd.conf", QEMU_LOCKD_CONF)
        self.write_conf("libvirtd.conf", LIBVIRTD_CONF)
        self.write_conf("virtlockd.conf", VIRTLOCKD_CONF)
        self.path(str(self.img)).mkdir(parents=True, exist_ok=True)

    def write_conf(self, name: str, text: str) -> None:
        (self.root / "etc/libvirt" / name).write_text(text)

    def start_libvirtd(self) -> float:
        """Start libvirtd (a transient unit) and wait until virsh gets an answer; seconds."""
        t0 = time.monotonic()
        self.libvirtd_starts += 1
        # KillMode=process, as libvirt's own unit: domains outlive a stop of libvirtd; their
        # QEMUs keep that unit loaded, so each start gets a unit name of its own
        self.libvirtd_unit = f"e2e-libvirtd-{self.libvirtd_starts}.service"
        self.run_inside("systemd-run", f"--unit={self.libvirtd_unit}", "--property=Type=exec",
                        "--property=KillMode=process", "--property=CollectMode=inactive-or-failed",
                        "/usr/sbin/libvirtd", "-f", "/etc/libvirt/libvirtd.conf")  # fmt: skip

        def answers() -> bool:
            if self.sm.prop(self.libvirtd_unit, "ActiveState") != "active":
                raise AssertionError(f"libvirtd died at start:\n{self.libvirtd_log()[-3000:]}")
            return self.virsh("version").returncode == 0

        wait_until(answers, 60, 0.05, "libvirtd to answer virsh")
        self.libvirtd_ready_s = time.monotonic() - t0
        return self.libvirtd_ready_s

    def stop_libvirtd(self) -> None:
        """Stop libvirtd alone; the domains keep running (KillMode=process)."""
        self.sm.systemctl("kill", "--kill-who=main", "--signal=SIGTERM", self.libvirtd_unit)
        wait_until(lambda: self.sm.prop(self.libvirtd_unit, "ActiveState") != "active", 60, 0.05,
                   "libvirtd to stop")  # fmt: skip

    def _define(self) -> None:
        for name, spec in self.wanted.items():
            disks = tuple(self.img / f for f in spec.disks)
            for disk in disks:  # made through the container (a mount of its own may hold them)
                if not self.path(str(disk)).exists():
                    subprocess.run(["qemu-img", "create", "-q", "-f", "raw",
                                    str(self.path(str(disk))), f"{DISK_MIB}M"], check=True,
                                   timeout=60)  # fmt: skip
            xml = self.sm.shared / f"{name}.xml"
            xml.write_text(domain_xml(name, spec.uuid, disks, spec.shareable))
            self.virsh("define", str(xml), check=True)
            self.domains[name] = Domain(name, spec.uuid, disks)

    def disks(self) -> set[Path]:
        """Every disk of every domain."""
        return {disk for dom in self.domains.values() for disk in dom.disks}

    # -- inside the container ------------------------------------------------------------------

    def run_inside(
        self, *argv: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(self.sm.inside(*argv), capture_output=True, text=True,
                             timeout=timeout)  # fmt: skip
        if check and out.returncode != 0:
            raise AssertionError(f"{argv} exited {out.returncode}: {out.stderr}{out.stdout}")
        return out

    def virsh(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.run_inside("virsh", "-q", "-c", "qemu:///system", *args, check=check)

    def state(self, dom: str) -> str:
        """``running``, ``paused``, ``shut off``..."""
        return self.virsh("domstate", dom, check=True).stdout.strip().splitlines()[0]

    def qemu_pid(self, dom: str) -> int:
        """The domain's QEMU pid in the container (as libvirt registers it with the daemon)."""
        return int((self.root / f"run/libvirt/qemu/{dom}.pid").read_text())

    def start(self, dom: str) -> tuple[subprocess.CompletedProcess[str], float]:
        """``virsh start``: its result and how long it took (seconds)."""
        t0 = time.monotonic()
        out = self.virsh("start", dom)
        return out, time.monotonic() - t0

    def destroy_all(self) -> None:
        """Every domain shut off (waits for each QEMU to be gone)."""
        for dom in self.virsh("list", "--name", check=True).stdout.split():  # active ones
            self.virsh("destroy", dom, check=True)
        pidfiles = [self.root / f"run/libvirt/qemu/{d}.pid" for d in self.domains]
        wait_until(lambda: not any(p.exists() for p in pidfiles), 30, 0.05, "every QEMU gone")

    def libvirtd_log(self) -> str:
        try:
            return (self.root / "var/log/libvirt/libvirtd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        return len(self.libvirtd_log())

    def log_since(self, mark: int) -> str:
        return self.libvirtd_log()[mark:]

    def path(self, inside: str) -> Path:
        """A path of the container, reached from the host."""
        return self.root / inside.lstrip("/")

    def can_connect(self, inside: str) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(5)
            s.connect(str(self.path(inside)))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def diagnose(self) -> str:
        log = self.log_since(max(0, self.log_mark() - 4000))
        return f"{self.sm.diagnose()}\n----- libvirtd.log (tail) -----\n{log}"


# --- the lock daemons ----------------------------------------------------------------------


@dataclass
class Restart:
    """One kill and restart of a lock daemon, as the test process timed it."""

    old_pid: int
    new_pid: int
    killed_at: float  # CLOCK_MONOTONIC, seconds (the test's time.monotonic())
    ready_at: float  # the new instance ready (READY=1, or accepting connections)

    @property
    def kill_to_ready(self) -> float:
        return self.ready_at - self.killed_at


class LockDaemon:
    """What the scenarios need of a lock daemon on ``/run/libvirt/virtlockd-sock``."""

    name = "?"

    def __init__(self, host: LibvirtHost) -> None:
        self.host = host

    def start(self) -> float:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def pid(self) -> int:
        raise NotImplementedError


class _TransientDaemon(LockDaemon):
    """A daemon run as the transient unit ``DAEMON_UNIT`` (not socket-activated)."""

    def argv(self) -> list[str]:
        raise NotImplementedError

    def unit_props(self) -> list[str]:
        return ["--property=Type=exec"]

    def ready(self) -> bool:
        # a socket file left by a killed instance accepts nothing: connecting is the test
        return self.host.can_connect(VIRTLOCKD_SOCK)

    def ready_at(self) -> float:
        """When the running instance became ready (CLOCK_MONOTONIC): seen just now."""
        return time.monotonic()

    def pid(self) -> int:
        return int(self.host.sm.prop(DAEMON_UNIT, "MainPID") or 0)

    def start(self) -> float:
        sm = self.host.sm
        sm.systemctl("reset-failed", DAEMON_UNIT, check=False)
        t0 = time.monotonic()
        self.host.run_inside("systemd-run", f"--unit={DAEMON_UNIT}", *self.unit_props(),
                             *self.argv())  # fmt: skip
        wait_until(self.ready, 60, 0.01, f"{self.name} to accept connections")
        return time.monotonic() - t0

    def stop(self) -> None:
        sm = self.host.sm
        sm.systemctl("stop", DAEMON_UNIT, check=False)
        sm.systemctl("reset-failed", DAEMON_UNIT, check=False)

    def kill_and_restart(self, sig: int = signal.SIGKILL) -> Restart:
        sm = self.host.sm
        old = self.pid()
        assert old > 0, f"{self.name} is not running"
        t0 = time.monotonic()
        sm.systemctl("kill", "--kill-who=main", f"--signal={signal.Signals(sig).name}",
                     DAEMON_UNIT)  # fmt: skip
        wait_until(lambda: sm.prop(DAEMON_UNIT, "ActiveState") != "active", 30, 0.005,
                   f"{self.name} to die")  # fmt: skip
        sm.systemctl("reset-failed", DAEMON_UNIT, check=False)
        self.host.run_inside("systemd-run", f"--unit={DAEMON_UNIT}", *self.unit_props(),
                             *self.argv())  # fmt: skip
        wait_until(self.ready, 60, 0.005, f"{self.name} to accept connections again")
        return Restart(old, self.pid(), t0, self.ready_at())


class Virtlockd(_TransientDaemon):
    """The real virtlockd (it binds /run/libvirt/virtlockd-sock itself, in the foreground)."""

    name = "virtlockd"

    def argv(self) -> list[str]:
        return ["/usr/sbin/virtlockd", "-f", "/etc/libvirt/virtlockd.conf"]


def _verify_inside(host: LibvirtHost, socket_path: str, admin: str) -> tuple[int, Any]:
    """``lockctl verify -J`` run inside the container: it reads ``/proc/PID`` of lockd, so it
    needs lockd's PID namespace, and under the units it asks the container's systemd about the
    fd store. (exit status, the report)."""
    out = host.run_inside(sys.executable, "-m", "lockd.ctl.cli", "--socket", socket_path,
                          "--admin-socket", admin, "--timeout", "30", "verify", "-J",
                          check=False)  # fmt: skip
    assert out.returncode in (0, 7), f"lockctl verify exited {out.returncode}: {out.stderr}"
    return out.returncode, json.loads(out.stdout)["verify"]


def _lockctl(socket_path: Path, admin: Path, *args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKD_")}
    out = subprocess.run(
        [sys.executable, "-m", "lockd.ctl.cli", "--socket", str(socket_path),
         "--admin-socket", str(admin), "--timeout", "30", *args, "-J"],
        cwd=sd.REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, f"lockctl {' '.join(args)} exited {out.returncode}: {out.stderr}"
    return json.loads(out.stdout)


class DirectLockd(_TransientDaemon):
    """lockd binding /run/libvirt/virtlockd-sock itself; state and its own sockets in the
    shared directory (reached at the same path from the host)."""

    name = "lockd"
    # how lockd is told to listen on the virtlockd socket (the front end's option)
    VIRTLOCKD_OPTION = "--virtlockd-socket"

    def __init__(self, host: LibvirtHost, config: str = "") -> None:
        super().__init__(host)
        self.dir = host.sm.shared / "lockd"
        self.dir.mkdir(exist_ok=True)
        self.state_dir = self.dir / "state"
        self.socket = self.dir / "lockd.sock"
        self.admin_socket = self.dir / "admin.sock"
        self.config = self.dir / "lockd.conf"
        self.config.write_text(config)

    def argv(self) -> list[str]:
        return [str(Path(sys.executable).with_name("lockd")), "--config", str(self.config),
                "--state-dir", str(self.state_dir), "--socket", str(self.socket),
                "--admin-socket", str(self.admin_socket),
                self.VIRTLOCKD_OPTION, VIRTLOCKD_SOCK]  # fmt: skip

    def unit_props(self) -> list[str]:
        # READY=1 after recovery: systemd-run returns then
        return ["--property=Type=notify", "--property=NotifyAccess=main"]

    def ready(self) -> bool:
        return self.host.sm.prop(DAEMON_UNIT, "ActiveState") == "active" and (
            self.host.can_connect(VIRTLOCKD_SOCK)
        )

    def ready_at(self) -> float:
        # systemd's own time of READY=1 (Type=notify), on the same CLOCK_MONOTONIC as ours
        return int(self.host.sm.prop(DAEMON_UNIT, "ActiveEnterTimestampMonotonic")) / 1e6

    def lockctl(self, *args: str) -> Any:
        return _lockctl(self.socket, self.admin_socket, *args)

    def verify(self) -> tuple[int, Any]:
        """``lockctl verify`` of this lockd (its sockets are at the same path inside)."""
        return _verify_inside(self.host, str(self.socket), str(self.admin_socket))

    def admin(self, method: str) -> dict[str, Any]:
        """One io.lockd.Admin call in-process (for polling: no lockctl process each time)."""
        with Conn(self.admin_socket) as c:
            return c.call(f"io.lockd.Admin.{method}")

    def wipe(self) -> None:
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)


class SystemdLockd(LockDaemon):
    """lockd under the project's units: lockd-virtlockd.socket listening (libvirtd's first
    connection starts lockd.service), the fd store keeping every lease across a crash."""

    name = "lockd (systemd units)"

    def start(self) -> float:
        t0 = time.monotonic()
        # (no test connection: the first one starts lockd.service, which is libvirt's job)
        self.host.sm.systemctl("start", VIRTLOCKD_UNIT)
        assert self.host.sm.prop(VIRTLOCKD_UNIT, "SubState") == "listening"
        return time.monotonic() - t0

    def stop(self) -> None:
        sm = self.host.sm
        sm.systemctl("stop", VIRTLOCKD_UNIT, sd.SERVICE, check=False)
        sm.systemctl("reset-failed", sd.SERVICE, check=False)
        sm.clear_state()

    def pid(self) -> int:
        return self.host.sm.main_pid()

    def lockctl(self, *args: str) -> Any:
        return _lockctl(self.host.sm.socket, self.host.sm.admin_socket, *args)

    def verify(self) -> tuple[int, Any]:
        """``lockctl verify`` of this lockd, fd store included (lockd.service's count)."""
        return _verify_inside(self.host, "/run/lockd/lockd.sock", "/run/lockd/lockd-admin.sock")

    def admin(self, method: str) -> dict[str, Any]:
        """One io.lockd.Admin call in-process (for polling: no lockctl process each time)."""
        with Conn(self.host.sm.admin_socket) as c:
            return c.call(f"io.lockd.Admin.{method}")
