"""Lost leases are never silent (issue item 4, DESIGN §3 and §5.4).

A lease is lost when someone else takes its resource while lockd is down (here: the test
process holds an OFD lock on it across the restart). Then the owner's fence policy runs.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from e2e import Daemon, Owners, hold_lock, message, probe, probe_setlk_elsewhere, wait_until
from test_verify import setlk, steal_fd

from lockd import errors
from lockd.service.service import LOST_EARLIER


def wait_exit(p, timeout: float = 15.0) -> int:
    return p.wait(timeout)


@pytest.mark.parametrize("mode", ["exclusive", "shared"])
def test_lost_lease_fence_kill(
    daemon: Daemon, owners: Owners, files: list[Path], mode: str
) -> None:
    owner, bystander = owners.spawn(), owners.spawn()
    o = daemon.register(owner.pid, name="vm-lost")  # default fence policy: kill
    assert o["fence"] == "kill"
    b = daemon.register(bystander.pid, name="bystander", fence="kill")
    lease = daemon.acquire(files[0], owner=o["uuid"], shared=(mode == "shared"))
    daemon.acquire(files[1], owner=o["uuid"])
    daemon.acquire(files[2], owner=b["uuid"])
    daemon.kill()
    with hold_lock(files[0]):  # taken in the gap, exclusively
        daemon.start()
        assert wait_exit(owner) == -signal.SIGKILL, "the owner of a lost lease must be killed"
        # its other lease goes with it (owner death), the bystander is untouched
        deadline = time.monotonic() + 5
        while probe(files[1]) != "free":
            assert time.monotonic() < deadline, "dead owner's lease still held"
            time.sleep(0.005)
        assert bystander.poll() is None
        assert probe(files[2]) == "exclusive"
        assert probe(files[0]) == "exclusive"  # ours
        events = daemon.history(limit=200)
        lost = [e for e in events if e["event"] == "lost"]
        assert [(e["resource"], e["owner"], e["token"]) for e in lost] == [
            (str(files[0]), o["uuid"], lease["token"])
        ], events
        assert daemon.status()["recovery"]["lost"] == 1
    # lockd did not grab it after we let go
    time.sleep(0.1)
    assert probe(files[0]) == "free"


def test_lost_lease_fence_none(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    owner = owners.spawn()
    o = daemon.register(owner.pid, name="vm-report-only", fence="none")
    u = o["uuid"]
    lost_lease = daemon.acquire(files[0], owner=u)
    daemon.acquire(files[1], owner=u, shared=True)
    daemon.kill()
    with hold_lock(files[0]):
        daemon.start()
        time.sleep(0.3)
        assert owner.poll() is None, "fence policy none must leave the owner alone"
        assert probe(files[1]) == "shared"  # re-taken
        # lockctl shows it as lost
        listed = {x["resource"]: x for x in daemon.lockctl_json("locks")["leases"]}
        assert listed[str(files[0])]["state"] == "lost"
        assert listed[str(files[0])]["token"] == lost_lease["token"]
        assert listed[str(files[1])]["state"] == "held"
        # the owner's client sees it
        inq = daemon.inquire(owner=u)
        states = {x["resource"]: x["state"] for x in inq["leases"]}
        assert states == {str(files[0]): "lost", str(files[1]): "held"}
        # it cannot be acquired again before it is acknowledged
        with pytest.raises(errors.LeaseLost) as ei:
            daemon.acquire(files[0], owner=u)
        assert ei.value.parameters.get("token") == lost_lease["token"]
        out = daemon.lockctl("acquire", str(files[0]), "--pid", str(owner.pid))
        assert out.returncode == 6, (out.returncode, out.stdout, out.stderr)
        assert any(
            e["event"] == "lost" and e["resource"] == str(files[0])
            for e in daemon.history(limit=100)
        )
        # releasing acknowledges it
        ack = daemon.release(files[0], owner=u)
        assert ack["token"] == lost_lease["token"]
        assert probe(files[0]) == "exclusive"  # still ours: lockd never held it again
        listed = daemon.lockctl_json("locks")["leases"]
        assert [x["resource"] for x in listed if x["state"] in ("held", "lost")] == [str(files[1])]
        # repeating the acknowledgement gives the same answer
        assert daemon.release(files[0], owner=u)["token"] == lost_lease["token"]
    assert probe(files[0]) == "free"
    again = daemon.acquire(files[0], owner=u)
    assert again["token"] > lost_lease["token"]
    assert probe(files[0]) == "exclusive"
    assert owner.poll() is None


def test_lost_lease_fence_term(make_daemon, owners: Owners, files: list[Path]) -> None:
    """term: SIGTERM, then SIGKILL after fence_grace if the owner ignores it."""
    d = make_daemon(config="fence_grace = 0.5\n")
    polite, stubborn = owners.spawn(), owners.spawn(ignore_term=True)
    p = d.register(polite.pid, fence="term")["uuid"]
    s = d.register(stubborn.pid, fence="term")["uuid"]
    d.acquire(files[0], owner=p)
    d.acquire(files[1], owner=s)
    d.kill()
    with hold_lock(files[0]), hold_lock(files[1]):
        d.start()
        assert wait_exit(polite) == -signal.SIGTERM
        assert wait_exit(stubborn) == -signal.SIGKILL
    assert {e["resource"] for e in d.history(limit=100) if e["event"] == "lost"} == {
        str(files[0]),
        str(files[1]),
    }


def test_lost_default_fence_from_config(make_daemon, owners: Owners, files: list[Path]) -> None:
    """default_fence in the config applies to owners registered without a policy."""
    d = make_daemon(config='default_fence = "none"\n')
    owner = owners.spawn()
    o = d.register(owner.pid)
    assert o["fence"] == "none"
    d.acquire(files[0], owner=o["uuid"])
    d.kill()
    with hold_lock(files[0]):
        d.start()
        time.sleep(0.3)
        assert owner.poll() is None
        out = d.lockctl("locks", "-J")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["leases"][0]["state"] == "lost"


def test_lost_lease_stays_lost_across_a_later_restart(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    """A lost lease is journaled as lost (DESIGN §3, §5.4): a later crash and restart, with
    the file free by then, must not lock it again behind the owner's back; it stays lost
    until the owner acknowledges it with a release."""
    owner = owners.spawn()
    o = daemon.register(owner.pid, name="vm-lost-twice", fence="none")["uuid"]
    daemon.acquire(files[0], owner=o)
    daemon.acquire(files[1], owner=o)
    daemon.kill()
    with hold_lock(files[0]):  # taken in the gap
        daemon.start()
        assert daemon.status()["recovery"]["lost"] == 1
    assert probe(files[0]) == "free"
    daemon.kill()  # crash again, with the file free this time
    assert probe(files[0]) == probe(files[1]) == "free"
    daemon.start()
    assert probe(files[0]) == "free", "a lost lease was locked again by recovery"
    assert probe_setlk_elsewhere(files[0]) == "free"
    assert probe(files[1]) == "exclusive"  # the other lease came back as usual
    states = {x["resource"]: x["state"] for x in daemon.inquire(owner=o)["leases"]}
    assert states == {str(files[0]): "lost", str(files[1]): "held"}
    assert daemon.status()["recovery"]["retaken"] == 1
    daemon.release(files[0], owner=o)  # the owner acknowledges
    assert probe(files[0]) == "free" and owner.poll() is None


def replayed(d: Daemon, owner: str, n: int) -> dict[str, dict[str, Any]]:
    """The ``n`` lost events a new Watch subscriber is sent at once, by resource."""
    with d.connect() as conn:
        conn.send_raw(message("io.lockd.Watch", {"owner": owner}, more=True))
        assert conn.recv_message()["parameters"]["event"]["event"] == "watching"
        events = [conn.recv_message()["parameters"]["event"] for _ in range(n)]
    assert {e["event"] for e in events} == {"lost"}, events
    return {e["resource"]: e for e in events}


def test_watch_replays_each_loss_with_its_own_reason(
    make_daemon, owners: Owners, files: list[Path], tmp_path: Path
) -> None:
    """A Watch subscriber is sent every lost lease of its owner again, each with the loss's
    own reason and time: a lock dropped at run time (found by the verifier), one taken in a
    crash's gap (found by recovery), and both again after a restart (read back from the
    journal's history); once history no longer holds them, a reason that says so."""
    (tmp_path / "ls").mkdir()
    conf = (
        'verify_interval = 0.1\nshared_lockspaces = ["ls"]\n'
        f'[lockspaces]\nls = "{tmp_path / "ls"}"\n'
    )
    d = make_daemon(config=conf)
    vm = owners.spawn()
    o = d.register(vm.pid, fence="none")["uuid"]
    run = d.acquire("vm-disk", owner=o, lockspace="ls")
    d.acquire(files[0], owner=o)
    # the lock dropped behind lockd's back at run time: the verifier finds it
    fd = steal_fd(
        d.pid,
        next(
            x["fd"]
            for x in d.call("io.lockd.Admin.ListDescriptors")["descriptors"]
            if x["token"] == run["token"]
        ),
    )
    try:
        setlk(fd, fcntl.F_UNLCK)
    finally:
        os.close(fd)
    dropped = "the filesystem dropped the lock: nobody holds it any more"
    wait_until(lambda: [x["state"] for x in d.leases() if x["token"] == run["token"]] == ["lost"],
               10, 0.02, "the run-time loss")  # fmt: skip
    assert replayed(d, o, 1)["vm-disk"]["reason"] == dropped
    # and one taken in the gap of a crash
    d.kill()
    with hold_lock(files[0]):
        d.start()
    events = replayed(d, o, 2)
    assert events["vm-disk"]["reason"] == dropped  # from the journal's history
    journaled = [e for e in d.history(limit=100) if e["event"] == "lost"]
    assert events["vm-disk"]["at"] == next(e["at"] for e in journaled if e["resource"] == "vm-disk")
    assert events[str(files[0])]["reason"] == "taken by another holder while lockd was down"
    assert all(e["owner"] == o for e in events.values())
    # the same after one more restart, both from history now
    d.kill()
    d.start()
    again = replayed(d, o, 2)
    assert {r: e["reason"] for r, e in again.items()} == {r: e["reason"] for r, e in events.items()}
    # history pruned past them: said so, not made up
    assert d.config_path is not None
    d.config_path.write_text(
        conf.replace("verify_interval", "history_retention = 1\nverify_interval")
    )
    d.kill()
    d.start()
    d.register(owners.spawn().pid)  # a newer event: the retention keeps only that one
    wait_until(lambda: not [e for e in d.history(limit=100) if e["event"] == "lost"], 10, 0.05,
               "the lost events pruned")  # fmt: skip
    pruned = replayed(d, o, 2)
    assert {e["reason"] for e in pruned.values()} == {LOST_EARLIER}
    assert vm.poll() is None  # fence none: reported only
