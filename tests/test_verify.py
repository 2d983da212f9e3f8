"""``lockctl verify`` (issue 12): no drift where there is none, and real drift found.

Drift is made for real, behind the daemon's back, the way an administrator's mistake or
another root process could: ``pidfd_getfd(2)`` duplicates one of the daemon's fds into the
test (the same open file description, so its OFD locks are the daemon's) and unlocks it, or
locks byte 0 of a file the daemon has open for another reason; a lease's file is replaced on
disk by a rename; and under a real systemd, the unit's ``FileDescriptorStoreMax=`` is set
below the number of leases, so systemd refuses fds that lockd believes are parked.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sd_harness as sd
from e2e import F_OFD_SETLK, FLOCK, REPO, Daemon, Owners, hold_lock, probe, wait_until

EXIT_DRIFT = 7
SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 (the generic syscall table)


def steal_fd(pid: int, fd: int) -> int:
    """A copy, in this process, of fd ``fd`` of process ``pid`` (pidfd_getfd(2), 5.6+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err in (38, 1):  # ENOSYS, EPERM: no way to do it here
                pytest.skip(f"pidfd_getfd: {os.strerror(err)}")
            raise OSError(err, os.strerror(err))
        return int(got)
    finally:
        os.close(pidfd)


def setlk(fd: int, l_type: int) -> None:
    fcntl.fcntl(fd, F_OFD_SETLK, struct.pack(FLOCK, l_type, os.SEEK_SET, 0, 1, 0))


def verify(d: Daemon, *args: str) -> tuple[int, dict[str, Any]]:
    out = d.lockctl("verify", "-J", *args)
    assert out.returncode in (0, EXIT_DRIFT), (out.returncode, out.stderr)
    return out.returncode, json.loads(out.stdout)["verify"]


def kinds(report: dict[str, Any]) -> list[tuple[str, int | None]]:
    return sorted((f["kind"], f.get("token")) for f in report["drift"])


@pytest.fixture
def busy(make_daemon: Callable[..., Daemon], tmp_path: Path, owners: Owners, files: list[Path]):
    """A daemon with every kind of lease: exclusive, two shared on one file, indirect, lost."""
    (tmp_path / "leases").mkdir()
    d = make_daemon(config=f'[lockspaces]\nls1 = "{tmp_path / "leases"}"\n')
    vm1, vm2 = owners.spawn(), owners.spawn()
    u2 = d.register(vm2.pid, fence="none")["uuid"]
    u1 = d.register(vm1.pid)["uuid"]
    tokens = {
        "excl": d.acquire(files[0], owner=u1)["token"],
        "sh1": d.acquire(files[1], owner=u1, shared=True)["token"],
        "sh2": d.acquire(files[1], owner=u2, shared=True)["token"],
        "ind": d.acquire("vm1-disk", owner=u1, lockspace="ls1")["token"],
        "lost": d.acquire(files[2], owner=u2)["token"],
    }
    d.kill(signal.SIGKILL)
    with hold_lock(files[2]):  # taken in the gap: lost (fence none: vm2 lives on)
        d.start()
    assert [x["state"] for x in d.leases() if x["token"] == tokens["lost"]] == ["lost"]
    d.tokens = tokens  # type: ignore[attr-defined]
    return d


def test_no_drift(busy: Daemon) -> None:
    rc, report = verify(busy)
    assert rc == 0, report
    assert report["drift"] == []
    assert (report["leases"], report["held"], report["locks"]) == (5, 4, 4)
    assert report["pid"] == busy.pid and report["fd_store"] is None
    text = busy.lockctl("verify")
    assert text.returncode == 0 and "no drift" in text.stdout


def descriptor(d: Daemon, token: int) -> dict[str, Any]:
    reply = d.call("io.lockd.Admin.ListDescriptors")
    return next(x for x in reply["descriptors"] if x["token"] == token)


def test_lock_dropped_behind_lockds_back(busy: Daemon, files: list[Path]) -> None:
    token = busy.tokens["excl"]  # type: ignore[attr-defined]
    fd = steal_fd(busy.pid, descriptor(busy, token)["fd"])
    try:
        setlk(fd, fcntl.F_UNLCK)  # the daemon's open file description: its lock is gone
        assert probe(files[0]) == "free"
        rc, report = verify(busy)
        assert rc == EXIT_DRIFT
        assert kinds(report) == [("lock-missing", token)], report
        text = busy.lockctl("verify")
        assert text.returncode == EXIT_DRIFT
        assert f"drift: lock-missing: {files[0]} (token {token})" in text.stdout
        # put it back as it was: no drift again
        setlk(fd, fcntl.F_WRLCK)
    finally:
        os.close(fd)
    assert verify(busy) == (0, verify(busy)[1])
    assert verify(busy)[1]["drift"] == []


def test_shared_lock_dropped(busy: Daemon) -> None:
    token = busy.tokens["sh2"]  # type: ignore[attr-defined]
    fd = steal_fd(busy.pid, descriptor(busy, token)["fd"])
    try:
        setlk(fd, fcntl.F_UNLCK)
        rc, report = verify(busy)
    finally:
        os.close(fd)
    # the other shared lease still holds the file: only the kernel's own account shows it
    assert rc == EXIT_DRIFT and kinds(report) == [("lock-missing", token)], report


def test_file_replaced_on_disk(busy: Daemon, files: list[Path]) -> None:
    token = busy.tokens["excl"]  # type: ignore[attr-defined]
    new = files[0].with_name("replacement.img")
    new.write_bytes(b"\0" * 512)
    os.rename(new, files[0])  # the lock stays on the old, now unlinked, inode
    rc, report = verify(busy)
    assert rc == EXIT_DRIFT
    assert kinds(report) == [("wrong-file", token)], report
    assert "leads to" in report["drift"][0]["detail"]


def test_orphan_lock(busy: Daemon) -> None:
    # the daemon's fd on its journal: locked on byte 0, that is a lock held for no lease
    fds = {
        int(n): os.readlink(f"/proc/{busy.pid}/fd/{n}") for n in os.listdir(f"/proc/{busy.pid}/fd")
    }
    journal = next(n for n, target in fds.items() if target.endswith("/journal.sqlite"))
    fd = steal_fd(busy.pid, journal)
    try:
        setlk(fd, fcntl.F_RDLCK)
        rc, report = verify(busy)
        setlk(fd, fcntl.F_UNLCK)
    finally:
        os.close(fd)
    assert rc == EXIT_DRIFT
    assert kinds(report) == [("orphan-lock", None)], report
    assert "journal.sqlite" in report["drift"][0]["detail"]


def test_verify_needs_a_daemon(busy: Daemon) -> None:
    busy.kill(signal.SIGKILL)
    out = busy.lockctl("--timeout", "0.5", "verify")
    assert out.returncode == 4, out.stderr


# --- under a real systemd: the fd store -------------------------------------------------------


@pytest.fixture(scope="module")
def user_manager() -> Iterator[sd.UserManager]:
    reason = sd.unavailable()
    if reason is not None:
        pytest.skip(f"cannot run a private systemd here: {reason}")
    with sd.UserManager() as m:
        yield m


def systemd_verify(m: sd.UserManager) -> tuple[int, dict[str, Any]]:
    env = {k: v for k, v in m.client_env().items() if not k.startswith("LOCKD_")}
    out = subprocess.run(
        [sys.executable, "-m", "lockd.ctl.cli", "--socket", str(m.socket), "--admin-socket",
         str(m.admin_socket), "--timeout", "30", "verify", "--user", "-J"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode in (0, EXIT_DRIFT), (out.returncode, out.stderr)
    return out.returncode, json.loads(out.stdout)["verify"]


def test_fd_store_under_systemd(user_manager: sd.UserManager, tmp_path: Path) -> None:
    m = user_manager
    m.reset()
    files = sd.make_files(tmp_path / "res", 4)
    with sd.Owners() as owners, m.client() as c:
        uuid = c.register(owners.spawn().pid)["uuid"]
        for f in files[:3]:
            c.acquire(f, owner=uuid)
        m.wait_for(lambda: int(m.prop(sd.SERVICE, "NFileDescriptorStore") or 0) == 3)
        rc, report = systemd_verify(m)
        assert rc == 0 and report["drift"] == [], report
        assert report["fd_store"] == 3
        # a store too small for the leases: systemd refuses the fourth fd ("Too many fds in
        # fd store"), and lockd cannot know
        dropin = m.w / "config" / "systemd" / "user" / f"{sd.SERVICE}.d"
        dropin.mkdir(parents=True, exist_ok=True)
        (dropin / "50-small-store.conf").write_text("[Service]\nFileDescriptorStoreMax=3\n")
        try:
            m.systemctl("daemon-reload")
            c.acquire(files[3], owner=uuid)
            rc, report = systemd_verify(m)
            assert rc == EXIT_DRIFT, report
            assert kinds(report) == [("fd-store", None)], report
            assert "stores 3 fds, lockd parked 4" in report["drift"][0]["detail"]
        finally:
            (dropin / "50-small-store.conf").unlink()
            m.systemctl("daemon-reload")
            m.reset()
    wait_until(lambda: all(probe(f) == "free" for f in files), 30, what="locks dropped")
