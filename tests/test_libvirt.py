"""lockd as libvirt's lock daemon, end to end: an unmodified libvirtd 9.0 starts, suspends,
resumes and destroys real (TCG) QEMU domains while lockd answers on
``/run/libvirt/virtlockd-sock`` (issue 9; DESIGN §10).

One private libvirt host (:class:`libvirt_harness.LibvirtHost`: systemd as PID 1 of private
namespaces, libvirtd inside it) serves the whole module; each test picks its lock daemon: the
real virtlockd (once, to show the bug lockd exists for), lockd on its own, or lockd under the
project's units with the fd store. What is held is checked from outside every daemon: another
process tries an OFD lock on byte 0 of the disk (``probe_setlk_elsewhere``), ``F_OFD_GETLK``
says which kind of lock is there (``probe``), ``lockctl locks -J`` lists the leases, and
``virsh`` says what libvirt did. Every test ends with no domain running, every disk free and
no lease left. Measured step timings are printed at the end of the module (``-s`` shows them
as they come).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt_harness as lh
import pytest
from e2e import probe_setlk_elsewhere, wait_until

DOMAINS = {
    "vl-a": ("00000000-e2e0-4000-8000-00000000000a", "shared.img"),
    "vl-b": ("00000000-e2e0-4000-8000-00000000000b", "shared.img"),
    "vl-life": ("00000000-e2e0-4000-8000-000000000010", "life.img"),
}


def busy(disk: Path) -> str:
    """What virsh prints when the lock daemon refuses a disk (virtlockd's text, code 87)."""
    return f"resource busy: Lockspace resource '{disk}' is locked"


# --- figures ------------------------------------------------------------------------------------


class Figures:
    """Measured step timings, printed together at the end of the module."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)
        print(line)

    def ms(self, what: str, seconds: float) -> None:
        self.add(f"{what}: {seconds * 1000:.0f} ms")


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    f = Figures()
    yield f
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not f.lines:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_sep("-", "lockd as libvirt's lock daemon: measured")
        for line in f.lines:
            reporter.write_line(line)


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
    for d in {dom.disk for dom in host.domains.values()}:
        wait_until(lambda d=d: probe_setlk_elsewhere(d) == "free", 30, 0.05, f"{d} free")


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


def _unused(*_: Any) -> None:  # keeps imports used until the lockd scenarios land
    pass
