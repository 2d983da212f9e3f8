"""Re-exec in place (DESIGN §5, upgrades): no lease is ever free, nothing is lost.

A prober thread reads the kernel's view of every leased file in a tight loop for the whole
re-exec; a single "free" sighting is a gap.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from e2e import TREE, Daemon, Owners, is_free, probe

from lockd import errors


class Prober(threading.Thread):
    def __init__(self, paths: list[Path]) -> None:
        super().__init__(daemon=True)
        self.paths = paths
        self.stop = threading.Event()
        self.gaps: list[tuple[float, str]] = []
        self.rounds = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for p in self.paths:
                if is_free(p):
                    self.gaps.append((time.monotonic(), str(p)))
            self.rounds += 1


def wait_new_image(daemon: Daemon, started_at: float, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            status = daemon.status()
            if status["started_at"] != started_at:
                return status
        except (OSError, errors.LockdError, Exception):  # noqa: BLE001 - transient
            pass
        assert time.monotonic() < deadline, "no new image answered after re-exec"
        time.sleep(0.01)


@pytest.mark.parametrize("how", ["varlink", "SIGUSR1", "lockctl"])
def test_reexec_keeps_every_lock(
    daemon: Daemon, owners: Owners, files: list[Path], how: str
) -> None:
    a, b = owners.spawn(), owners.spawn()
    ua = daemon.register(a.pid, name="a")["uuid"]
    ub = daemon.register(b.pid, name="b")["uuid"]
    before = {}
    for f in files[:3]:
        before[str(f)] = daemon.acquire(f, owner=ua)["token"]
    daemon.acquire(files[3], owner=ua, shared=True)
    daemon.acquire(files[3], owner=ub, shared=True)
    status = daemon.status()
    pid = daemon.pid
    prober = Prober(files[:4])
    prober.start()
    time.sleep(0.05)
    if how == "varlink":
        with daemon.connect(admin=True) as c:
            assert c.call("io.lockd.Admin.Reexec") == {}
    elif how == "SIGUSR1":
        daemon.proc.send_signal(signal.SIGUSR1)
    else:
        out = daemon.lockctl("reexec")
        assert out.returncode == 0, out.stderr
    new = wait_new_image(daemon, status["started_at"])
    time.sleep(0.05)
    prober.stop.set()
    prober.join()
    assert prober.rounds > 10
    assert not prober.gaps, f"locks were free during re-exec: {prober.gaps[:5]}"
    assert daemon.running and new["pid"] == pid, "re-exec must keep the pid"
    assert new["recovery"]["adopted"] == 5 and new["recovery"]["retaken"] == 0, new
    leases = daemon.leases()
    for x in leases:
        assert x["state"] == "held" and x["continuity"] == "kept", x
        if x["resource"] in before and x["mode"] == "exclusive":
            assert x["token"] == before[x["resource"]]
    assert [probe(f) for f in files[:4]] == ["exclusive"] * 3 + ["shared"]
    # owners are still watched by the new image: b's death releases its share (the kernel
    # still shows a's), then a's death frees everything within 100 ms
    t0 = time.monotonic()
    b.kill()
    b.wait()
    while any(x["owner"]["uuid"] == ub for x in daemon.leases()):
        assert time.monotonic() - t0 < 5, "dead owner's lease kept after re-exec"
        time.sleep(0.005)
    assert probe(files[3]) == "shared"
    t0 = time.monotonic()
    a.kill()
    while not all(is_free(f) for f in files[:4]):
        assert time.monotonic() - t0 < 5, [probe(f) for f in files[:4]]
        time.sleep(0.002)
    assert time.monotonic() - t0 < 0.100
    a.wait()
    # the state directory is still ours: a second daemon is refused
    second = subprocess.run(
        daemon.argv(), cwd=TREE, env=daemon.env(), capture_output=True, text=True, timeout=30
    )
    assert second.returncode == 3, second.stderr
    assert str(pid) in second.stderr


def test_reexec_twice_and_serve(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    u = daemon.register(owners.spawn().pid)["uuid"]
    t = daemon.acquire(files[0], owner=u)["token"]
    for _ in range(2):
        started = daemon.status()["started_at"]
        with daemon.connect(admin=True) as c:
            c.call("io.lockd.Admin.Reexec")
        wait_new_image(daemon, started)
        assert probe(files[0]) == "exclusive"
    t2 = daemon.acquire(files[1], owner=u)["token"]
    assert t2 > t
    assert daemon.acquire(files[0], owner=u)["token"] == t
    daemon.stop()
