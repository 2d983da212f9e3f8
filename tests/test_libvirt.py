"""lockd as libvirt's lock daemon, end to end: an unmodified libvirtd 9.0 starts, suspends,
resumes and destroys real (TCG) QEMU domains while lockd answers on
``/run/libvirt/virtlockd-sock`` (issue 9; DESIGN §10).

One private libvirt host (:class:`libvirt_harness.LibvirtHost`: systemd as PID 1 of private
namespaces, libvirtd inside it) serves the whole module; each test picks its lock daemon: the
real virtlockd (once, to show the bug lockd exists for), lockd on its own, or lockd under the
project's units with the fd store. What is held is checked from outside every daemon: another
process tries an OFD lock on byte 0 of the disk (``probe_setlk_elsewhere``), ``F_OFD_GETLK``
says which kind of lock is there (``probe``), ``lockctl locks -J`` lists the leases, and
``virsh`` says what libvirt did. Every test with lockd ends with ``lockctl verify`` (run
inside the container, in lockd's PID namespace): any drift between lockd's leases and the
kernel's locks (or, under the units, systemd's fd store) fails it; then no domain running,
every disk free and no lease left. Measured step timings are printed at the end of the
module (``-s`` shows them as they come).
"""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt_harness as lh
import pytest
import sd_harness as sd
from e2e import is_free, probe, probe_setlk_elsewhere, wait_until
from measured import Figures, printed_at_end

DOMAINS = {
    # two domains on one disk, and one on a disk of its own
    "vl-a": lh.DomainSpec("00000000-e2e0-4000-8000-00000000000a", ("shared.img",)),
    "vl-b": lh.DomainSpec("00000000-e2e0-4000-8000-00000000000b", ("shared.img",)),
    "vl-life": lh.DomainSpec("00000000-e2e0-4000-8000-000000000010", ("life.img",)),
    # two disks, the second one vl-a's
    "vl-two": lh.DomainSpec("00000000-e2e0-4000-8000-000000000020", ("two.img", "shared.img")),
    # <shareable/>: SHARED leases
    "vl-s1": lh.DomainSpec("00000000-e2e0-4000-8000-000000000031", ("pool.img",), True),
    "vl-s2": lh.DomainSpec("00000000-e2e0-4000-8000-000000000032", ("pool.img",), True),
}


def busy(disk: Path) -> str:
    """What virsh prints when the lock daemon refuses a disk (virtlockd's text, code 87)."""
    return f"resource busy: Lockspace resource '{disk}' is locked"


# --- figures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    yield from printed_at_end(request, "lockd as libvirt's lock daemon: measured")


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host(figures: Figures) -> Iterator[lh.LibvirtHost]:
    reason = lh.unavailable()
    if reason is not None:
        pytest.skip(f"cannot run a private libvirt host here: {reason}")
    t0 = time.monotonic()
    with lh.LibvirtHost(DOMAINS) as h:
        figures.ms("container boot + libvirtd answering virsh", time.monotonic() - t0)
        figures.ms("  of which libvirtd start to first virsh answer", h.libvirtd_ready_s)
        yield h


def _finish(host: lh.LibvirtHost, daemon: lh.LockDaemon, request: pytest.FixtureRequest) -> None:
    """After a test: diagnostics if it failed; every domain off, the daemon stopped, and no
    disk left locked by anyone."""
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(host.diagnose())
    try:
        host.destroy_all()
    finally:
        daemon.stop()
    for d in host.disks():  # F_OFD_GETLK sees virtlockd's POSIX locks too
        wait_until(lambda d=d: is_free(d), 30, 0.05, f"{d} free")


@pytest.fixture
def virtlockd(host: lh.LibvirtHost, request: pytest.FixtureRequest) -> Iterator[lh.Virtlockd]:
    d = lh.Virtlockd(host)
    yield d
    _finish(host, d, request)


# --- the real virtlockd: why lockd exists -------------------------------------------------


def test_virtlockd_loses_its_locks_in_a_crash(
    host: lh.LibvirtHost, virtlockd: lh.Virtlockd, figures: Figures
) -> None:
    """The bug, end to end (recipe S2-S4, X4-X6): after ``kill -9 virtlockd`` and a restart a
    second domain starts on the disk a running one writes; and a domain resumed after the
    restart leaves a lock that nothing releases (no domain runs, yet the disk is refused)."""
    disk = host.domains["vl-a"].disk
    figures.ms("virtlockd: start to accepting connections", virtlockd.start())
    out, took = host.start("vl-a")
    assert out.returncode == 0, out.stderr
    figures.ms("virtlockd: virsh start vl-a", took)
    assert probe_setlk_elsewhere(disk) == "held"
    out, _ = host.start("vl-b")
    assert out.returncode != 0 and busy(disk) in out.stderr, out.stderr
    assert host.state("vl-b") == "shut off"

    r = virtlockd.kill_and_restart(signal.SIGKILL)
    figures.ms("virtlockd: kill -9 to the new instance accepting connections", r.kill_to_ready)
    assert host.state("vl-a") == "running"
    # BUG 1: the disk of a running domain is free, and a second domain starts on it
    assert probe_setlk_elsewhere(disk) == "free"
    out, _ = host.start("vl-b")
    assert out.returncode == 0, out.stderr
    assert (host.state("vl-a"), host.state("vl-b")) == ("running", "running")

    # BUG 2 (X4-X6): vl-a, resumed in virtlockd #2, has no connection there that its death
    # could close: after it is destroyed its lock stays, and vl-b is refused with none running
    host.virsh("destroy", "vl-b", check=True)
    wait_until(lambda: probe_setlk_elsewhere(disk) == "free", 30, 0.05, "vl-b's lock gone")
    host.virsh("suspend", "vl-a", check=True)
    host.virsh("resume", "vl-a", check=True)
    assert probe_setlk_elsewhere(disk) == "held"
    host.virsh("destroy", "vl-a", check=True)
    wait_until(lambda: not host.path("/run/libvirt/qemu/vl-a.pid").exists(), 30, 0.05, "vl-a off")
    out, _ = host.start("vl-b")
    assert out.returncode != 0 and busy(disk) in out.stderr, out.stderr
    assert all(host.state(d) == "shut off" for d in host.domains)
    assert probe_setlk_elsewhere(disk) == "held"  # the orphan: until virtlockd restarts


# --- lockd on the compatibility socket ----------------------------------------------------------


def leases(d: lh.DirectLockd | lh.SystemdLockd) -> list[dict[str, Any]]:
    """lockd's leases (io.lockd.Admin.ListLeases, what ``lockctl locks`` prints), in-process."""
    result: list[dict[str, Any]] = d.admin("ListLeases")["leases"]
    return result


def lease_of(host: lh.LibvirtHost, d: lh.DirectLockd | lh.SystemdLockd, dom: str) -> dict[str, Any]:
    """The one lease on ``dom``'s disk as ``lockctl locks -J`` shows it, checked against the
    domain: its name, uuid and QEMU pid."""
    disk = str(host.domains[dom].disk)
    listed = d.lockctl("locks")["leases"]
    mine = [x for x in listed if x["resource"] == disk]
    assert len(mine) == 1, listed
    lease = mine[0]
    assert lease["owner"]["name"] == dom, lease
    assert lease["owner"]["uuid"] == host.domains[dom].uuid, lease
    assert lease["owner"]["pid"] == host.qemu_pid(dom), lease
    assert (lease["mode"], lease["state"]) == ("exclusive", "held"), lease
    return lease


def recovery(d: lh.DirectLockd | lh.SystemdLockd) -> dict[str, Any]:
    """What lockd's last start-up recovery did (``lockctl status``: kept, re-taken...)."""
    result: dict[str, Any] = d.admin("Status")["status"]["recovery"]
    return result


def held_by_lockd(disk: Path) -> bool:
    """An exclusive OFD lock (lockd's kind) on byte 0, and another process cannot take it."""
    return probe(disk) == "exclusive" and probe_setlk_elsewhere(disk) == "held"


def verified(d: lh.DirectLockd | lh.SystemdLockd) -> dict[str, Any]:
    """``lockctl verify`` finds no drift: every held lease's lock where lockd says it is, no
    lock held for no lease, and under the units as many fds in systemd's store as leases."""
    rc, report = d.verify()
    assert rc == 0 and report["drift"] == [], report
    held = [x for x in leases(d) if x["state"] == "held"]
    assert report["held"] == report["locks"] == len(held), (report, held)
    if isinstance(d, lh.SystemdLockd):
        assert report["fd_store"] == len(held), report
    return report


def assert_no_orphan(host: lh.LibvirtHost, d: lh.DirectLockd | lh.SystemdLockd) -> None:
    """lockctl verify finds no drift with the test's domains still running; then every
    domain off, lockd lists no lease, and the kernel knows no lock of any kind on any disk
    (F_OFD_GETLK from this process)."""
    verified(d)
    host.destroy_all()
    wait_until(lambda: leases(d) == [], 30, 0.05, "no lease left")
    for disk in host.disks():
        assert probe(disk) == "free", disk


def refused(host: lh.LibvirtHost, dom: str) -> None:
    """``virsh start dom`` fails with libvirt's "resource busy" and leaves it shut off."""
    out, _ = host.start(dom)
    assert out.returncode != 0 and busy(host.domains[dom].disk) in out.stderr, out.stderr
    assert host.state(dom) == "shut off"


def started(host: lh.LibvirtHost, dom: str, figures: Figures | None = None, what: str = "") -> None:
    out, took = host.start(dom)
    assert out.returncode == 0, out.stderr
    assert host.state(dom) == "running"
    if figures is not None:
        figures.ms(what or f"virsh start {dom}", took)


@pytest.fixture
def lockd_direct(host: lh.LibvirtHost, request: pytest.FixtureRequest) -> Iterator[lh.DirectLockd]:
    d = lh.DirectLockd(host)
    d.wipe()
    yield d
    _finish(host, d, request)
    d.wipe()


@pytest.fixture
def lockd_systemd(
    host: lh.LibvirtHost, request: pytest.FixtureRequest
) -> Iterator[lh.SystemdLockd]:
    d = lh.SystemdLockd(host)
    d.stop()
    yield d
    _finish(host, d, request)


def test_lockd_start_busy_destroy(
    host: lh.LibvirtHost, lockd_direct: lh.DirectLockd, figures: Figures
) -> None:
    """virsh start -> the lease, with the domain's name and uuid; a second domain on the disk
    is refused with libvirt's "resource busy"; a restart of libvirtd changes nothing; virsh
    destroy -> the lease is gone."""
    d = lockd_direct
    disk = host.domains["vl-a"].disk
    figures.ms("lockd on its own: start to READY=1", d.start())
    started(host, "vl-a", figures, "lockd: virsh start vl-a")
    lease_of(host, d, "vl-a")
    assert held_by_lockd(disk)
    out, took = host.start("vl-b")
    figures.ms("lockd: virsh start vl-b refused (resource busy)", took)
    assert out.returncode != 0 and busy(disk) in out.stderr, out.stderr
    assert host.state("vl-b") == "shut off"
    assert host.state("vl-a") == "running" and len(leases(d)) == 1
    # libvirtd restarted (an upgrade) while vl-a runs: the lease stays, destroy still frees it
    host.stop_libvirtd()
    host.start_libvirtd()
    assert host.state("vl-a") == "running"
    lease_of(host, d, "vl-a")
    t0 = time.monotonic()
    host.virsh("destroy", "vl-a", check=True)
    wait_until(lambda: probe(disk) == "free", 30, 0.01, "vl-a's disk free after destroy")
    figures.ms("lockd: virsh destroy vl-a to its disk free", time.monotonic() - t0)
    assert leases(d) == []
    assert_no_orphan(host, d)


def test_lockd_kill9_and_restart_keeps_the_lease(
    host: lh.LibvirtHost, lockd_direct: lh.DirectLockd, figures: Figures
) -> None:
    """kill -9 lockd and start it again: the lease is re-taken from the journal (same token,
    same owner) and the second domain is still refused."""
    d = lockd_direct
    disk = host.domains["vl-a"].disk
    d.start()
    started(host, "vl-a")
    before = lease_of(host, d, "vl-a")
    r = d.kill_and_restart(signal.SIGKILL)
    figures.ms("lockd on its own: kill -9 to the new instance's READY=1", r.kill_to_ready)
    assert r.new_pid != r.old_pid
    after = lease_of(host, d, "vl-a")
    assert after["token"] == before["token"], (before, after)
    assert held_by_lockd(disk)
    assert recovery(d)["retaken"] == 1
    refused(host, "vl-b")
    assert host.state("vl-a") == "running"
    assert_no_orphan(host, d)


def test_lockd_suspend_and_resume(
    host: lh.LibvirtHost, lockd_direct: lh.DirectLockd, figures: Figures
) -> None:
    """virsh suspend releases the lease (libvirt sends RELEASE twice), resume takes it again;
    while paused the disk is free, as with virtlockd (trace.txt)."""
    d = lockd_direct
    disk = host.domains["vl-life"].disk
    d.start()
    started(host, "vl-life")
    first = lease_of(host, d, "vl-life")
    mark = host.log_mark()
    t0 = time.monotonic()
    host.virsh("suspend", "vl-life", check=True)
    figures.ms("lockd: virsh suspend", time.monotonic() - t0)
    assert host.state("vl-life") == "paused"
    assert leases(d) == [] and probe(disk) == "free"
    log = host.log_since(mark)
    # what the daemon answered to libvirt's second RELEASE: libvirtd logs every error reply
    errors = [x.split(" : ", 2)[-1] for x in log.splitlines() if "ProgramDispatchError" in x]
    warnings = log.count("Unable to release lease on vl-life")
    figures.add(
        f"lockd: libvirt's two RELEASEs at suspend: error replies {errors or 'none'}, "
        f"{warnings} 'Unable to release lease' warning(s) (virtlockd, trace.txt: the second "
        "gets ERROR 87 '... is not locked', one warning)"
    )
    t0 = time.monotonic()
    host.virsh("resume", "vl-life", check=True)
    figures.ms("lockd: virsh resume", time.monotonic() - t0)
    assert host.state("vl-life") == "running"
    again = lease_of(host, d, "vl-life")
    assert again["token"] > first["token"]
    assert held_by_lockd(disk)
    assert_no_orphan(host, d)


def test_lockd_domain_resumed_after_a_restart_leaves_no_orphan(
    host: lh.LibvirtHost, lockd_direct: lh.DirectLockd
) -> None:
    """virtlockd's second bug (X4-X6) with lockd: a domain suspended and resumed after a
    restart of the daemon (its hook connection died with the old instance) and then destroyed
    leaves no lock: lockd follows the QEMU process, not the connection."""
    d = lockd_direct
    disk = host.domains["vl-a"].disk
    d.start()
    started(host, "vl-a")
    d.kill_and_restart(signal.SIGKILL)
    refused(host, "vl-b")  # virtlockd let it in here (X4's premise)
    host.virsh("suspend", "vl-a", check=True)
    assert leases(d) == [] and probe(disk) == "free"
    host.virsh("resume", "vl-a", check=True)
    lease_of(host, d, "vl-a")
    assert held_by_lockd(disk)
    host.virsh("destroy", "vl-a", check=True)
    wait_until(lambda: leases(d) == [], 30, 0.02, "vl-a's lease gone with its QEMU")
    assert probe(disk) == "free"
    started(host, "vl-b")  # virtlockd refused it here (X6)
    lease_of(host, d, "vl-b")
    assert_no_orphan(host, d)


def test_lockd_shareable_disks_two_disks_and_a_crashed_qemu(
    host: lh.LibvirtHost, lockd_direct: lh.DirectLockd
) -> None:
    """``<shareable/>`` disks get SHARED leases (two domains on one disk); a domain whose
    second disk is busy is refused and keeps no lease on its first; a QEMU killed by a signal
    (libvirt sends nothing) loses its lease."""
    d = lockd_direct
    pool = host.domains["vl-s1"].disk
    two, shared = host.domains["vl-two"].disks
    d.start()
    started(host, "vl-s1")
    started(host, "vl-s2")
    on_pool = [x for x in leases(d) if x["resource"] == str(pool)]
    assert sorted(x["owner"]["name"] for x in on_pool) == ["vl-s1", "vl-s2"], on_pool
    assert {x["mode"] for x in on_pool} == {"shared"}
    assert probe(pool) == "shared" and probe_setlk_elsewhere(pool) == "held"
    started(host, "vl-a")
    # vl-two: ACQUIRE two.img succeeds, ACQUIRE shared.img is refused, libvirt kills its QEMU
    out, _ = host.start("vl-two")
    assert out.returncode != 0 and busy(shared) in out.stderr, out.stderr
    assert host.state("vl-two") == "shut off"
    wait_until(lambda: probe(two) == "free", 30, 0.02, "vl-two's first disk free")
    assert not [x for x in leases(d) if x["owner"]["name"] == "vl-two"], leases(d)
    # vl-a's QEMU dies of SIGKILL: libvirt calls nothing, lockd sees the process go
    host.run_inside("kill", "-KILL", str(host.qemu_pid("vl-a")))
    wait_until(lambda: probe(shared) == "free", 30, 0.02, "vl-a's disk free after its QEMU died")
    wait_until(lambda: host.state("vl-a") == "shut off", 30, 0.05, "libvirt to see vl-a crashed")
    started(host, "vl-two")
    mine = {x["resource"] for x in leases(d) if x["owner"]["name"] == "vl-two"}
    assert mine == {str(two), str(shared)}, leases(d)
    assert held_by_lockd(two) and held_by_lockd(shared)
    assert_no_orphan(host, d)


def test_lockd_down_while_its_domain_is_destroyed(
    host: lh.LibvirtHost, lockd_direct: lh.DirectLockd
) -> None:
    """A domain destroyed while lockd is dead (libvirt sends nothing at destroy): the lease is
    released when lockd comes back and finds its QEMU gone, not left behind."""
    d = lockd_direct
    disk = host.domains["vl-a"].disk
    d.start()
    started(host, "vl-a")
    lease_of(host, d, "vl-a")
    old = d.pid()
    host.sm.systemctl("kill", "--kill-who=main", "--signal=SIGKILL", lh.DAEMON_UNIT)
    wait_until(lambda: d.pid() != old, 30, 0.01, "lockd dead")
    host.virsh("destroy", "vl-a", check=True)
    assert host.state("vl-a") == "shut off"
    d.start()
    assert leases(d) == [] and probe(disk) == "free"
    assert recovery(d)["released"] == 1
    started(host, "vl-b")
    lease_of(host, d, "vl-b")
    assert_no_orphan(host, d)


def test_lockd_indirect_leases_in_a_file_lockspace_dir(
    host: lh.LibvirtHost, lockd_direct: lh.DirectLockd, figures: Figures
) -> None:
    """``file_lockspace_dir`` in qemu-lockd.conf: libvirtd sends CREATE_LOCKSPACE when it
    starts, then leases on lease files named by the SHA-256 of each disk path (AUTOCREATE);
    lockd locks those files, not the disks, and refuses a second domain the same way."""
    d = lockd_direct
    lockspace = host.sm.shared / "lockspace"
    lockspace.mkdir(exist_ok=True)
    disk = host.domains["vl-a"].disk
    lease_file = lockspace / hashlib.sha256(str(disk).encode()).hexdigest()
    d.start()  # before libvirtd: its lock driver creates the lockspace as it starts
    host.stop_libvirtd()
    host.write_conf("qemu-lockd.conf", lh.QEMU_LOCKD_CONF + f'file_lockspace_dir = "{lockspace}"\n')
    try:
        figures.ms("lockd: libvirtd restart with file_lockspace_dir", host.start_libvirtd())
        started(host, "vl-a")
        assert held_by_lockd(lease_file)
        assert probe(disk) == "free"  # the disk itself is not locked: its lease file is
        assert verified(d)["held"] == 1
        [lease] = leases(d)
        assert (lease["owner"]["name"], lease["owner"]["uuid"]) == (
            "vl-a",
            host.domains["vl-a"].uuid,
        )
        assert lease["resource"] == lease_file.name or lease["path"] == str(lease_file), lease
        out, _ = host.start("vl-b")
        assert out.returncode != 0 and "resource busy: Lockspace resource" in out.stderr, out.stderr
        assert host.state("vl-b") == "shut off"
        host.virsh("destroy", "vl-a", check=True)
        wait_until(lambda: leases(d) == [], 30, 0.02, "vl-a's lease gone")
        assert probe_setlk_elsewhere(lease_file) == "free"
    finally:
        host.destroy_all()
        host.stop_libvirtd()
        host.write_conf("qemu-lockd.conf", lh.QEMU_LOCKD_CONF)
        host.start_libvirtd()
    assert_no_orphan(host, d)


def test_lockd_aborted_under_systemd_never_frees_the_disk(
    host: lh.LibvirtHost, lockd_systemd: lh.SystemdLockd, figures: Figures
) -> None:
    """lockd under the project's units (lockd-virtlockd.socket, the fd store), aborted while a
    domain runs: an observer polling the disk never sees it free, the lease is adopted (kept,
    not re-taken), and a second domain started right after the abort -- its calls wait in the
    socket's queue until systemd has lockd back -- is refused."""
    d = lockd_systemd
    m = host.sm
    disk = host.domains["vl-a"].disk
    d.start()
    assert m.prop(sd.SERVICE, "ActiveState") == "inactive"
    started(host, "vl-a", figures, "lockd under systemd: virsh start vl-a (socket-activates lockd)")
    before = lease_of(host, d, "vl-a")
    assert held_by_lockd(disk)
    assert int(m.prop(sd.SERVICE, "NFileDescriptorStore")) == 1
    with sd.Observer([disk]) as obs:
        time.sleep(0.05)
        old = m.main_pid()
        killed_at = time.monotonic()
        m.signal_main(signal.SIGABRT)
        out, took = host.start("vl-b")
        props = m.wait_running(not_pid=old)
        ready_at = int(props["ActiveEnterTimestampMonotonic"]) / 1e6
        time.sleep(0.05)
        seen = obs.stop()
    assert out.returncode != 0 and busy(disk) in out.stderr, out.stderr
    assert host.state("vl-b") == "shut off"
    figures.ms("lockd under systemd: SIGABRT to the new instance's READY=1", ready_at - killed_at)
    figures.ms("lockd under systemd: virsh start vl-b issued right after the abort, refused", took)
    figures.add(f"lockd under systemd: observer during the abort: {seen.summary()}")
    assert seen.free == 0, seen.free_examples
    n, longest = seen.during(killed_at, ready_at)
    figures.add(
        f"  {n} sweeps between the abort and READY=1, at most {longest * 1000:.1f} ms apart"
    )
    assert n > 0
    after = lease_of(host, d, "vl-a")
    assert after["token"] == before["token"] and after["continuity"] == "kept", after
    assert recovery(d)["adopted"] == 1
    refused(host, "vl-b")
    assert host.state("vl-a") == "running"
    assert_no_orphan(host, d)


def test_lockd_reexec_while_domains_run(
    host: lh.LibvirtHost, lockd_systemd: lh.SystemdLockd, figures: Figures
) -> None:
    """An upgrade in place (``lockctl reexec``) while two domains run: no lock is ever free
    (observer), every lease keeps its token, and libvirt's later calls work."""
    d = lockd_systemd
    disks = [host.domains["vl-a"].disk, host.domains["vl-life"].disk]
    d.start()
    started(host, "vl-a")
    started(host, "vl-life")
    before = {x["resource"]: x["token"] for x in leases(d)}
    assert len(before) == 2
    status = d.lockctl("status")["status"]
    with sd.Observer(disks) as obs:
        time.sleep(0.05)
        t0 = time.monotonic()
        d.lockctl("reexec")
        new = wait_until(
            lambda: (s := d.admin("Status")["status"])["started_at"] != status["started_at"] and s,
            60,
            0.02,
            "the re-executed lockd to answer",
        )
        took = time.monotonic() - t0
        time.sleep(0.05)
        seen = obs.stop()
    figures.ms("lockd under systemd: lockctl reexec to the new image answering", took)
    figures.add(f"lockd under systemd: observer during the re-exec: {seen.summary()}")
    assert seen.free == 0, seen.free_examples
    n, longest = seen.during(t0, t0 + took)
    figures.add(f"  {n} sweeps during the re-exec, at most {longest * 1000:.1f} ms apart")
    assert n > 0
    assert new["pid"] == status["pid"] == d.pid()
    assert {x["resource"]: x["token"] for x in leases(d)} == before
    # later operations: suspend/resume, a refusal, destroy, a new start
    host.virsh("suspend", "vl-life", check=True)
    assert probe(disks[1]) == "free"
    host.virsh("resume", "vl-life", check=True)
    lease_of(host, d, "vl-life")
    refused(host, "vl-b")
    host.virsh("destroy", "vl-a", check=True)
    wait_until(lambda: probe(disks[0]) == "free", 30, 0.02, "vl-a's disk free")
    started(host, "vl-b")
    lease_of(host, d, "vl-b")
    assert_no_orphan(host, d)
