"""Two libvirt hosts on one GlusterFS volume, lockd the lock daemon of each (issue 18).

The bed is :class:`cluster_harness.Cluster` (read its docstring): hosts A and B, each a
container with systemd, libvirtd 9.0 and lockd under the project's units, each with its own
FUSE mount of one volume (``client.strict-locks on``) at ``/var/lib/libvirt/images``, distinct
``host_uuid``. Every step is checked from outside on both hosts: ``F_OFD_GETLK`` on byte 0
through each host's mount, ``lockctl locks -J`` of each lockd, ``virsh domstate``.

Which tests run where. ``make test`` runs :func:`test_one_host_at_a_time_and_live_migration`
on the direct lockspace (one bed, ~15-20 s here in all); the rest needs ``LOCKD_CLUSTER=1``,
which ``make cluster`` sets: the same on ``file_lockspace_dir``, three round trips with lockd
and with virtlockd in the same bed (the downtime of each), a third party in libvirt's
release -> acquire gap, and a mount that stops answering (scenario 7). Measured figures are
printed at the end of the module.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import cluster_harness as ch
import libvirt_harness as lh
import pytest
from e2e import F_OFD_SETLK, FLOCK, probe, wait_until
from measured import Figures, printed_at_end

FULL = os.environ.get("LOCKD_CLUSTER") == "1"
full_bed = pytest.mark.skipif(not FULL, reason="the whole cluster bed: make cluster")

DISK = f"{ch.IMAGES}/shared.img"
VM1 = lh.DomainSpec("00000000-c1c1-4000-8000-000000000001", ("shared.img",))
VM2 = lh.DomainSpec("00000000-c1c1-4000-8000-000000000002", ("shared.img",))
# vm1 is defined on both hosts (as a cluster manager does); vm2, on B, shares its disk
DOMAINS = {"A": {"vm1": VM1}, "B": {"vm1": VM1, "vm2": VM2}}


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    yield from printed_at_end(request, "two libvirt hosts on GlusterFS: measured")


def _bed(leases: str, figures: Figures) -> Iterator[ch.Cluster]:
    reason = ch.unavailable()
    if reason is not None:
        pytest.skip(f"cannot run the cluster bed here: {reason}")
    t0 = time.monotonic()
    with ch.Cluster(DOMAINS, leases=leases) as c:
        figures.ms(f"[{leases}] bed up (storage, host A, host B)", time.monotonic() - t0)
        yield c


@pytest.fixture(scope="module")
def direct(figures: Figures) -> Iterator[ch.Cluster]:
    yield from _bed("direct", figures)


@pytest.fixture(scope="module")
def indirect(figures: Figures) -> Iterator[ch.Cluster]:
    yield from _bed("indirect", figures)


@pytest.fixture(params=["direct", pytest.param("indirect", marks=full_bed)])
def bed(request: pytest.FixtureRequest) -> Iterator[ch.Cluster]:
    c: ch.Cluster = request.getfixturevalue(request.param)
    yield c
    _finish(c, request)


def _finish(c: ch.Cluster, request: pytest.FixtureRequest) -> None:
    """Every domain off on both hosts, the lock free through both mounts, ``lockctl verify``
    clean on both."""
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for h in c.hosts.values():
            print(h.diagnose())
    for h in c.hosts.values():
        h.destroy_all()
    for h in c.hosts.values():
        wait_until(lambda h=h: probe(h.lease_file(DISK)) == "free", 30, 0.05, f"free via {h.name}")
        rc, report = h.lockd.verify()
        assert rc == 0, (h.name, report)


# --- what both hosts say -----------------------------------------------------------------------


def seen(c: ch.Cluster) -> tuple[str, str]:
    """Byte 0 of the disk's lock through A's mount and through B's."""
    return probe(c.a.lease_file(DISK)), probe(c.b.lease_file(DISK))


def lease(host: ch.ClusterHost) -> dict[str, Any] | None:
    """The one lease ``host``'s lockd lists (None: none)."""
    leases = host.leases()
    assert len(leases) <= 1, leases
    return leases[0] if leases else None


def state(host: ch.ClusterHost, dom: str) -> str:
    out = host.virsh("domstate", dom)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "(none)"


def busy_error(c: ch.Cluster) -> str:
    name = DISK if c.leases == "direct" else ch.lease_name(DISK)
    return f"resource busy: Lockspace resource '{name}' is locked"


def migrate(c: ch.Cluster, src: ch.ClusterHost, dst: ch.ClusterHost) -> tuple[ch.Samples, str]:
    """Live-migrate vm1 ``src`` -> ``dst`` under the sampler; asserts the lease moved and was
    never held twice. (samples, a figure line)."""
    before = lease(src)
    assert before is not None and before["owner"]["uuid"] == VM1.uuid, before
    with ch.Sampler(c, DISK) as sampler:
        time.sleep(0.2)
        out, took = c.migrate("vm1", src, dst)
        time.sleep(0.2)
    samples = sampler.stop()
    assert out.returncode == 0, out.stderr
    assert (state(dst, "vm1"), state(src, "vm1")) in {
        ("running", "shut off"),
        ("running", "(none)"),
    }
    after = lease(dst)
    assert lease(src) is None
    assert after is not None and after["owner"]["uuid"] == VM1.uuid and after["state"] == "held"
    assert seen(c) == ("exclusive", "exclusive")
    assert not samples.errors, samples.errors
    assert not samples.both_held(), samples.both_held()[:5]
    # the handover as both tables showed it: src held, then nobody, then dst
    assert samples.holders(src.name)[0] is not None and samples.holders(src.name)[-1] is None
    assert samples.holders(dst.name)[0] is None and samples.holders(dst.name)[-1] is not None
    down = c.downtime_ms("vm1", dst)
    line = (f"{src.name}->{dst.name}: virsh migrate {took * 1000:.0f} ms, downtime {down} ms, "
            f"byte 0 free {samples.longest_free_ms():.1f} ms, {len(samples.tables)} table "
            f"samples")  # fmt: skip
    return samples, line


# --- scenarios 1 and 2 -------------------------------------------------------------------------


def test_one_host_at_a_time_and_live_migration(bed: ch.Cluster, figures: Figures) -> None:
    """Scenario 1: vm1 runs on A; vm1 itself, or vm2 on the same disk, is refused on B.
    Scenario 2: ``virsh migrate --live`` A -> B -> A moves the lease with the domain, never
    held by both lockds at once (the sampler), each host's token growing."""
    c = bed
    out, took = c.a.start("vm1")
    assert out.returncode == 0, out.stderr
    figures.ms(f"[{c.leases}] virsh start vm1 on A", took)
    assert seen(c) == ("exclusive", "exclusive")
    first = lease(c.a)
    assert first is not None and first["owner"]["uuid"] == VM1.uuid, first
    for dom in ("vm1", "vm2"):
        out, took = c.b.start(dom)
        assert out.returncode != 0 and busy_error(c) in out.stderr, out.stderr
        assert state(c.b, dom) == "shut off"
    figures.ms(f"[{c.leases}] virsh start vm2 on B, refused", took)
    assert lease(c.b) is None and state(c.a, "vm1") == "running"

    _, line = migrate(c, c.a, c.b)
    figures.add(f"[{c.leases}] lockd {line}")
    on_b = lease(c.b)
    assert on_b is not None
    out, _ = c.b.start("vm2")  # refused by B's own lockd now
    assert out.returncode != 0 and busy_error(c) in out.stderr, out.stderr

    _, line = migrate(c, c.b, c.a)
    figures.add(f"[{c.leases}] lockd {line}")
    back = lease(c.a)
    assert back is not None and back["token"] > first["token"]  # A's sequence went on


@full_bed
def test_migration_downtime_lockd_beside_virtlockd(
    direct: ch.Cluster, figures: Figures, request: pytest.FixtureRequest
) -> None:
    """Three round trips A -> B -> A with lockd, then three with the real virtlockd on both
    hosts, in the same bed: libvirt's downtime and how long byte 0 was free, side by side."""
    c = direct
    try:
        for daemon in ("lockd", "virtlockd"):
            if daemon == "virtlockd":
                for h in c.hosts.values():
                    h.lockd.stop()
                    lh.Virtlockd(h).start()
            out, _ = c.a.start("vm1")
            assert out.returncode == 0, out.stderr
            for _ in range(3):
                for src, dst in ((c.a, c.b), (c.b, c.a)):
                    if daemon == "lockd":
                        _, line = migrate(c, src, dst)
                    else:  # no lockctl: what the kernel saw, and libvirt's figures
                        with ch.Sampler(c, DISK, tables=False) as sampler:
                            time.sleep(0.2)
                            out, took = c.migrate("vm1", src, dst)
                            time.sleep(0.2)
                        assert out.returncode == 0, out.stderr
                        line = (f"{src.name}->{dst.name}: virsh migrate {took * 1000:.0f} ms, "
                                f"downtime {c.downtime_ms('vm1', dst)} ms, byte 0 free "
                                f"{sampler.stop().longest_free_ms():.1f} ms")  # fmt: skip
                    figures.add(f"[direct] {daemon} {line}")
            for h in c.hosts.values():
                h.destroy_all()
    finally:
        for h in c.hosts.values():
            lh.Virtlockd(h).stop()
            h.lockd.start()
    _finish(c, request)


def _grab(path: str, stop: threading.Event, got: list[float]) -> None:
    """A third party: F_OFD_SETLK F_WRLCK on byte 0 in a loop until it gets it, then hold it
    until ``stop``."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        req = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        while not stop.is_set():
            try:
                fcntl.fcntl(fd, F_OFD_SETLK, req)
            except BlockingIOError:
                continue
            got.append(time.monotonic())
            stop.wait(60)
            return
    finally:
        os.close(fd)


@full_bed
def test_third_party_in_the_handover_gap(
    direct: ch.Cluster, figures: Figures, request: pytest.FixtureRequest
) -> None:
    """libvirt releases on the source before the destination acquires. A third party that
    takes the disk in that gap makes the migration fail; the guest stays paused on A with no
    lease, nothing runs on the disk. The operator's move: once the third party is gone,
    ``virsh resume`` on A (lockd takes the lease again)."""
    c = direct
    out, _ = c.a.start("vm1")
    assert out.returncode == 0, out.stderr
    stop, got = threading.Event(), []
    grabber = threading.Thread(target=_grab, args=(str(c.b.lease_file(DISK)), stop, got))
    grabber.start()
    try:
        out, took = c.migrate("vm1", c.a, c.b)
        assert got, "the third party never got the lock"
        assert out.returncode != 0 and "resource busy" in out.stderr, out.stderr
        assert state(c.b, "vm1") != "running"
        assert c.a.virsh("domstate", "vm1", "--reason").stdout.startswith("paused")
        assert lease(c.a) is None and lease(c.b) is None
        figures.ms("[direct] migrate A->B with a third party in the gap (fails)", took)
    finally:
        stop.set()
        grabber.join(30)
    wait_until(lambda: seen(c) == ("free", "free"), 30, 0.02, "the third party gone")
    c.a.virsh("resume", "vm1", check=True)
    assert state(c.a, "vm1") == "running" and lease(c.a) is not None
    _finish(c, request)


# --- scenario 7: a hung mount stalls nobody else ------------------------------------------------


@full_bed
def test_hung_mount_stalls_nobody_else(direct: ch.Cluster, figures: Figures) -> None:
    """The brick stopped (SIGSTOP) while A's lockd holds a lease on the volume and one on a
    local directory: calls for the local lockspace and the direct lockspace keep answering,
    one for the hung lockspace fails within its bound with a named error, the watchdog does
    not fire; after SIGCONT everything answers and the held lease is still held."""
    import signal

    c, host = direct, direct.a
    sm = host.sm
    host.lockd.stop()
    for d in ("/var/lib/libvirt/images/ls", "/var/lib/lockd-local"):
        host.run_inside("mkdir", "-p", d)
    host.run_inside("touch", "/var/lib/local.img")
    host.path("/etc/lockd").mkdir(exist_ok=True)
    host.path("/etc/lockd/lockd.conf").write_text(
        '[lockspaces]\nshared = "/var/lib/libvirt/images/ls"\nlocal = "/var/lib/lockd-local"\n'
    )
    host.lockd.start()
    owner, pid = sm.spawn_inside("sleep", "1000")

    def acquire(resource: str, lockspace: str | None = None) -> tuple[int, str, float]:
        extra = ["--lockspace", lockspace] if lockspace else []
        t0 = time.monotonic()
        out = sm.lockctl("acquire", resource, "--pid", str(pid), *extra)
        return out.returncode, out.stderr, time.monotonic() - t0

    try:
        assert acquire("held-shared", "shared")[0] == 0
        assert acquire("held-local", "local")[0] == 0
        lockd_pid = sm.main_pid()
        restarts = sm.prop(lh.sd.SERVICE, "NRestarts")
        brick = c.storage.brick_pid if c.storage else None
        assert brick
        os.kill(brick, signal.SIGSTOP)
        try:
            hung: list[tuple[int, str, float]] = []
            t = threading.Thread(target=lambda: hung.append(acquire("new-shared", "shared")))
            t.start()
            time.sleep(1)  # the shared call is stuck in the storage thread now
            for resource, ls in (("new-local", "local"), ("/var/lib/local.img", None)):
                rc, err, took = acquire(resource, ls)
                assert rc == 0, err
                figures.ms(f"hung brick: lockctl acquire in {ls or 'direct'} (local)", took)
            t.join(60)
            rc, err, took = hung[0]
            assert rc != 0 and "shared-storage-timeout" in err, err
            figures.ms("hung brick: lockctl acquire in the hung lockspace, refused", took)
            rc, err, took = acquire("new-shared-2", "shared")
            assert rc != 0 and "shared-storage-timeout" in err, err
            figures.ms("hung brick: the next one, refused at once", took)
            time.sleep(12)  # past WatchdogSec=20 s since the stop
            assert (sm.main_pid(), sm.prop(lh.sd.SERVICE, "NRestarts")) == (lockd_pid, restarts)
        finally:
            os.kill(brick, signal.SIGCONT)
        wait_until(lambda: acquire("after", "shared")[0] == 0, 60, 0.5, "the shared lockspace back")
        leases = {x["resource"]: x["state"] for x in host.leases()}
        assert leases.get("held-shared") == "held" and leases.get("held-local") == "held", leases
        rc, report = host.lockd.verify()
        assert rc == 0, report
    finally:
        sm.run_inside("kill", "-KILL", str(pid), check=False)  # nsenter's child, in there
        owner.wait(30)
        host.lockd.stop()
        host.path("/etc/lockd/lockd.conf").unlink()
        host.lockd.start()
