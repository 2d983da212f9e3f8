"""Two libvirt hosts on one GlusterFS volume: the bed for lockd's cluster workflows (issue 18).

Theory of operation. :class:`Cluster` builds, on this one machine:

- **storage**: a private ``glusterd`` and its brick (:class:`gluster_harness.GlusterBed`) in
  network and mount namespaces of their own (:class:`gluster_harness.PrivateNet`), so its
  fixed port 24007, the brick port and the migration port are nobody else's: other beds on
  the machine run beside this one. The volume has ``client.strict-locks on``, the deployment
  the README prescribes. A bridge ``br0`` there, at :data:`STORAGE_ADDR`.
- **two hosts** A and B, each a :class:`libvirt_harness.LibvirtHost` (systemd as PID 1 of
  private namespaces, libvirtd 9.0 in it, lockd under the project's units): a veth pair links
  its network namespace to the bridge (A at ``.11``, B at ``.12``), its own ``glusterfs``
  client (a unit of the host, so the host's death takes it) mounts the volume at
  :data:`IMAGES`, the same path on both, and the disk images live there. Each has its own
  ``host_uuid`` (libvirt refuses to migrate to a host with the same one).

The hosts talk over those addresses only: QEMU's migration stream goes to the destination's
address (``--migrateuri``/``--listen-address``; qemu.conf's ``migration_host`` may not name
a local address, the recipe's pitfall 1); libvirt to libvirt is the orchestrator's virsh, on
this machine, reaching each libvirtd through ``/proc/PID1/root/run/libvirt/libvirt-sock``.
Everything is checked from outside, on both hosts: a byte-0 lock probe through *each* host's
mount (``/proc/PID1/root`` + the path), ``lockctl locks -J`` on each lockd, ``virsh domstate``.

Leases are direct (the images themselves, byte 0) or, with ``leases="indirect"``, lease files
in ``file_lockspace_dir`` = :data:`LEASES` on the volume (libvirt names them by the SHA-256 of
the disk path; lockd serves them as a named lockspace).

Measured on this machine (2 vCPU, shared with other work): storage up 3.2-3.8 s, each host
2.6-3.5 s (container boot, libvirtd answering) when idle; the whole bed 7-22 s under load;
teardown ~2 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gluster_harness as gh
import libvirt_harness as lh
from e2e import Conn, ConnectionLost, is_free, wait_until

IMAGES = "/var/lib/libvirt/images"
LEASES = f"{IMAGES}/leases"
SUBNET = "10.77.0"  # private to the bed's namespaces: no address of the machine is used
STORAGE_ADDR = f"{SUBNET}.1"
VOLUME = "lkdcluster"
FUSE_DEV = os.makedev(10, 229)  # /dev/fuse (devices.txt: misc 229)
CLIENT_UNIT = "glusterfs-client.service"


def unavailable() -> str | None:
    """Why this machine cannot run the bed, or None if it can."""
    return lh.unavailable() or gh.unavailable(private_net=True)


def lease_name(disk: str) -> str:
    """The lease file libvirt's lockd driver names for a disk in file_lockspace_dir."""
    return hashlib.sha256(disk.encode()).hexdigest()


class ClusterHost(lh.LibvirtHost):
    """One host of the cluster: a LibvirtHost whose images are on the volume (module doc)."""

    def __init__(
        self, name: str, index: int, cluster: Cluster, domains: dict[str, lh.DomainSpec]
    ) -> None:
        super().__init__(domains)
        self.name = name
        self.addr = f"{SUBNET}.{10 + index}"
        self.host_uuid = f"0000000{index}-c1c1-4000-8000-00000000c1c1"
        self.cluster = cluster
        self.img = Path(IMAGES)
        self.lockd = lh.SystemdLockd(self)

    def _configure(self) -> None:
        super()._configure()
        self.write_conf("libvirtd.conf", lh.LIBVIRTD_CONF + f'host_uuid = "{self.host_uuid}"\n')
        conf = lh.QEMU_LOCKD_CONF
        if self.cluster.leases == "indirect":
            conf += f'file_lockspace_dir = "{LEASES}"\n'
        self.write_conf("qemu-lockd.conf", conf)
        self.cluster.attach(self)
        # lockd's socket listening before libvirtd starts: with file_lockspace_dir its lock
        # driver sends CREATE_LOCKSPACE as it loads (and fails to load without an answer)
        self.lockd.start()

    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.path('/run/libvirt/libvirt-sock')}"

    def mounted(self) -> bool:
        mounts = Path(f"/proc/{self.sm.pid1}/mounts").read_text()
        return any(ln.split()[1] == IMAGES and "fuse.glusterfs" in ln for ln in mounts.splitlines())

    def lease_file(self, disk: str) -> Path:
        """Where the lock of ``disk`` is, through this host's mount (host-side path)."""
        if self.cluster.leases == "indirect":
            return self.path(f"{LEASES}/{lease_name(disk)}")
        return self.path(disk)

    def leases(self) -> list[dict[str, Any]]:
        """``lockctl locks -J`` of this host's lockd."""
        return list(self.lockd.lockctl("locks")["leases"])


class Cluster:
    """Storage and hosts A and B (module docstring); a context manager."""

    def __init__(
        self,
        domains: dict[str, dict[str, lh.DomainSpec]],
        leases: str = "direct",
    ) -> None:
        """``domains``: host name ("A", "B") -> the domains defined there."""
        assert leases in ("direct", "indirect"), leases
        self.leases = leases
        self.wanted = domains
        self.w = Path(tempfile.mkdtemp(prefix="lkd-cl.", dir="/tmp"))
        self.net: gh.PrivateNet | None = None
        self.storage: gh.GlusterBed | None = None
        self.hosts: dict[str, ClusterHost] = {}
        self.timings: dict[str, float] = {}
        # the orchestrator's virsh: its HOME and XDG directories in scratch, not /root
        home = self.w / "home"
        self.env = dict(os.environ, HOME=str(home), XDG_CONFIG_HOME=str(home / "config"),
                        XDG_CACHE_HOME=str(home / "cache"),
                        XDG_RUNTIME_DIR=str(home / "run"))  # fmt: skip

    def __enter__(self) -> Cluster:
        try:
            t0 = time.monotonic()
            self.net = gh.PrivateNet()
            self.net.ip("link", "add", "br0", "type", "bridge")
            self.net.ip("addr", "add", f"{STORAGE_ADDR}/24", "dev", "br0")
            self.net.ip("link", "set", "br0", "up")
            self.storage = gh.GlusterBed(VOLUME, {"client.strict-locks": "on"}, mounts=(),
                                         workdir=self.w / "gluster", net=self.net,
                                         host=STORAGE_ADDR).__enter__()  # fmt: skip
            self.timings["storage_s"] = time.monotonic() - t0
            for i, name in enumerate(("A", "B"), start=1):
                t1 = time.monotonic()
                host = ClusterHost(name, i, self, self.wanted.get(name, {}))
                self.hosts[name] = host
                host.__enter__()
                self.timings[f"host_{name}_s"] = time.monotonic() - t1
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def a(self) -> ClusterHost:
        return self.hosts["A"]

    @property
    def b(self) -> ClusterHost:
        return self.hosts["B"]

    def attach(self, host: ClusterHost) -> None:
        """Link ``host`` to the storage bridge and mount the volume there with its own
        client, a unit of the host's systemd."""
        assert self.net is not None and self.storage is not None
        link = f"h{host.name.lower()}"
        self.net.ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns",
                    str(host.sm.pid1))  # fmt: skip
        self.net.ip("link", "set", link, "master", "br0", "up")
        host.run_inside("ip", "addr", "add", f"{host.addr}/24", "dev", "eth0")
        host.run_inside("ip", "link", "set", "eth0", "up")
        # the container's /dev is a minimal tmpfs: the FUSE client needs the device node
        os.mknod(host.path("/dev/fuse"), 0o666 | stat.S_IFCHR, FUSE_DEV)
        host.run_inside("mkdir", "-p", IMAGES)
        host.run_inside("systemd-run", f"--unit={CLIENT_UNIT}", "--property=Type=exec",
                        "glusterfs", "-N", f"--volfile-server={STORAGE_ADDR}",
                        f"--volfile-id={VOLUME}", "-l", "/var/log/glusterfs-client.log",
                        IMAGES)  # fmt: skip
        wait_until(lambda: host.mounted() and gh.answers(host.path(IMAGES)), 30, 0.05,
                   f"host {host.name}'s GlusterFS mount")  # fmt: skip
        if self.leases == "indirect":
            host.path(LEASES).mkdir(exist_ok=True)

    def close(self) -> None:
        errors = []
        for host in reversed(list(self.hosts.values())):
            try:
                host.close()
            except Exception as exc:  # every host and the storage are torn down regardless
                errors.append(exc)
        if self.storage is not None:
            try:
                self.storage.close()
            except Exception as exc:
                errors.append(exc)
        if self.net is not None:
            self.net.close()
        shutil.rmtree(self.w, ignore_errors=True)
        if errors:
            raise errors[0]

    # -- migration --------------------------------------------------------------------------

    def virsh(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """virsh on this machine (the orchestrator), e.g. with ``-c host.uri()``."""
        return subprocess.run(["virsh", "-q", *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def migrate(
        self, dom: str, src: ClusterHost, dst: ClusterHost, *extra: str
    ) -> tuple[subprocess.CompletedProcess[str], float]:
        """``virsh migrate --live`` of ``dom`` from ``src`` to ``dst`` over the hosts' own
        addresses, with ``extra`` options (``--bandwidth 1``); (result, seconds)."""
        t0 = time.monotonic()
        out = self.virsh("-c", src.uri(), "migrate", "--live", *extra, "--migrateuri",
                         f"tcp://{dst.addr}", "--listen-address", dst.addr, dom,
                         dst.uri())  # fmt: skip
        return out, time.monotonic() - t0

    def downtime_ms(self, dom: str, dst: ClusterHost) -> int | None:
        """The last migration's downtime as libvirt measured it (``domjobinfo --completed``
        on the destination)."""
        out = self.virsh("-c", dst.uri(), "domjobinfo", dom, "--completed")
        for line in out.stdout.splitlines():
            if line.startswith("Total downtime:"):
                return int(line.split()[2])
        return None


# --- the sampler: never two holders -----------------------------------------------------------


@dataclass
class Samples:
    """What :class:`Sampler` saw: (t, host, held token or None) from each lockd's table, and
    (t, free) of byte 0 through A's mount."""

    tables: list[tuple[float, str, int | None]] = field(default_factory=list)
    kernel: list[tuple[float, bool]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    gaps: int = 0  # table queries that found no lockd answering

    def both_held(self) -> list[tuple[float, float, float]]:
        """Moments that prove two holders: host X held token t at s1 and still t at s3 (so
        throughout), and host Y held at s2 between them. Returns those (s1, s2, s3)."""
        out = []
        seq = self.tables
        for i in range(len(seq) - 2):
            (t1, h1, k1), (t2, h2, k2), (t3, h3, k3) = seq[i : i + 3]
            if h1 == h3 != h2 and k1 is not None and k1 == k3 and k2 is not None:
                out.append((t1, t2, t3))
        return out

    def longest_free_ms(self) -> float:
        """The longest run of samples that found byte 0 free (its first to its last)."""
        best, start = 0.0, None
        for t, free in self.kernel:
            if free:
                start = t if start is None else start
                best = max(best, (t - start) * 1000)
            else:
                start = None
        return best

    def holders(self, host: str) -> list[int | None]:
        """The tokens (None: not held) ``host`` showed, each change once."""
        out: list[int | None] = []
        for _, h, k in self.tables:
            if h == host and (not out or out[-1] != k):
                out.append(k)
        return out


class Sampler:
    """A thread that asks A's and B's lockd in turn (``io.lockd.Admin.ListLeases``) whether
    they hold a lease on ``disk`` and probes byte 0 through A's mount, until :meth:`stop`.
    ``tables=False``: the probe alone (another lock daemon than lockd)."""

    def __init__(self, cluster: Cluster, disk: str, tables: bool = True) -> None:
        self.cluster = cluster
        self.disk = disk
        self.tables = tables
        self.samples = Samples()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> Samples:
        self._stop.set()
        self._thread.join(30)
        return self.samples

    def _token(self, conn: Conn) -> int | None:
        want = {self.disk, lease_name(self.disk)}
        for lease in conn.call("io.lockd.Admin.ListLeases")["leases"]:
            if lease["state"] == "held" and lease["resource"] in want:
                return int(lease["token"])
        return None

    def _run(self) -> None:
        hosts = (self.cluster.a, self.cluster.b) if self.tables else ()
        probe_path = self.cluster.a.lease_file(self.disk)
        conns: dict[str, Conn] = {}
        try:
            while not self._stop.is_set():
                for h in hosts:
                    try:
                        if h.name not in conns:
                            conns[h.name] = Conn(h.sm.admin_socket, timeout=5)
                        token = self._token(conns[h.name])
                    except (OSError, ConnectionLost):
                        # that lockd died (a test kills it): no sample until it answers again
                        # (a missing sample never makes two holders, see Samples.both_held)
                        if h.name in conns:
                            conns.pop(h.name).close()
                        self.samples.gaps += 1
                        continue
                    self.samples.tables.append((time.monotonic(), h.name, token))
                with contextlib.suppress(OSError):
                    self.samples.kernel.append((time.monotonic(), is_free(probe_path)))
        except Exception as exc:  # reported by the test, which asserts there are none
            self.samples.errors.append(repr(exc))
        finally:
            for conn in conns.values():
                conn.close()
