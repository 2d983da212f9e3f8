"""Lease semantics against the real daemon (issue item 1, plus GetInfo).

Every "held"/"free" is read from the kernel with e2e.probe, never from the daemon's word.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path

import pytest
from e2e import Daemon, Owners, hold_lock, message, probe, probe_setlk_elsewhere

from lockd import errors

REPO = Path(__file__).resolve().parent.parent


def reg(daemon: Daemon, owners: Owners, **kw: object) -> dict:
    p = owners.spawn()
    return daemon.register(p.pid, **kw)


# --- exclusive / shared -----------------------------------------------------------------------


def test_exclusive_excludes_other_owner(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    a, b = reg(daemon, owners, name="a"), reg(daemon, owners, name="b")
    f = files[0]
    assert probe(f) == "free"
    lease = daemon.acquire(f, owner=a["uuid"])
    assert lease["mode"] == "exclusive"
    assert lease["state"] == "held"
    assert lease["owner"]["uuid"] == a["uuid"]
    assert probe(f) == "exclusive"
    assert probe_setlk_elsewhere(f) == "held"
    with pytest.raises(errors.ResourceBusy) as ei:
        daemon.acquire(f, owner=b["uuid"])
    assert ei.value.parameters.get("resource") == str(f)
    with pytest.raises(errors.ResourceBusy):
        daemon.acquire(f, owner=b["uuid"], shared=True)
    assert probe(f) == "exclusive"
    daemon.release(f, owner=a["uuid"])
    assert probe(f) == "free"
    assert probe_setlk_elsewhere(f) == "free"
    # now b gets it
    assert daemon.acquire(f, owner=b["uuid"])["owner"]["uuid"] == b["uuid"]
    assert probe(f) == "exclusive"


def test_shared_with_shared_not_with_exclusive(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    a, b, c = (reg(daemon, owners) for _ in range(3))
    f = files[1]
    la = daemon.acquire(f, owner=a["uuid"], shared=True)
    lb = daemon.acquire(f, owner=b["uuid"], shared=True)
    assert la["mode"] == lb["mode"] == "shared"
    assert probe(f) == "shared"
    with pytest.raises(errors.ResourceBusy):
        daemon.acquire(f, owner=c["uuid"])
    daemon.release(f, owner=a["uuid"])
    assert probe(f) == "shared"  # b still holds it
    with pytest.raises(errors.ResourceBusy):
        daemon.acquire(f, owner=c["uuid"])
    daemon.release(f, owner=b["uuid"])
    assert probe(f) == "free"
    daemon.acquire(f, owner=c["uuid"])
    assert probe(f) == "exclusive"
    with pytest.raises(errors.ResourceBusy):
        daemon.acquire(f, owner=a["uuid"], shared=True)


def test_owner_by_pid(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    p = owners.spawn()
    o = daemon.register(p.pid, name="vm-pid")
    lease = daemon.acquire(files[0], pid=p.pid)
    assert lease["owner"]["uuid"] == o["uuid"]
    assert lease["owner"]["pid"] == p.pid
    # the same lease named by uuid
    assert daemon.acquire(files[0], owner=o["uuid"])["token"] == lease["token"]
    daemon.release(files[0], pid=p.pid)
    assert probe(files[0]) == "free"


def test_lock_held_outside_lockd_is_busy(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    """virtlockd (or anyone) holding byte 0 excludes lockd: the kernel is the arbiter."""
    a = reg(daemon, owners)
    with hold_lock(files[2]), pytest.raises(errors.ResourceBusy):
        daemon.acquire(files[2], owner=a["uuid"])
    with hold_lock(files[3], exclusive=False):
        with pytest.raises(errors.ResourceBusy):
            daemon.acquire(files[3], owner=a["uuid"])
        lease = daemon.acquire(files[3], owner=a["uuid"], shared=True)
        assert lease["mode"] == "shared"
    assert probe(files[2]) == "free"
    assert probe(files[3]) == "shared"


def test_lock_is_byte_zero_only(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    """QEMU's image locks (bytes 100-103, 200-203) must stay free (DESIGN §2)."""
    import fcntl
    import struct

    from e2e import F_OFD_GETLK, FLOCK

    a = reg(daemon, owners)
    daemon.acquire(files[0], owner=a["uuid"])
    fd = os.open(files[0], os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start in (1, 100, 200, 4096):
            req = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, start, 4, 0)
            got = struct.unpack(FLOCK, fcntl.fcntl(fd, F_OFD_GETLK, req))
            assert got[0] == fcntl.F_UNLCK, f"byte {start} is locked: {got}"
    finally:
        os.close(fd)


# --- one file, two paths ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hardlink", "symlink"])
def test_two_paths_one_resource(
    daemon: Daemon, owners: Owners, files: list[Path], kind: str
) -> None:
    a, b = reg(daemon, owners), reg(daemon, owners)
    f = files[0]
    other = f.parent / f"other-{kind}.img"
    if kind == "hardlink":
        os.link(f, other)
    else:
        os.symlink(f, other)
    first = daemon.acquire(f, owner=a["uuid"])
    again = daemon.acquire(other, owner=a["uuid"])
    assert again["token"] == first["token"], "one inode must be one lease"
    assert again["state"] == "held"
    with pytest.raises(errors.ResourceBusy):
        daemon.acquire(other, owner=b["uuid"])
    # the journal sees one lease, not two
    mine = [x for x in daemon.leases(owner=a["uuid"]) if x["state"] == "held"]
    assert len(mine) == 1, mine
    # releasing through the other path releases the one lease
    daemon.release(other, owner=a["uuid"])
    assert probe(f) == "free"
    assert [x for x in daemon.leases(owner=a["uuid"]) if x["state"] == "held"] == []


# --- named errors for bad resources -----------------------------------------------------------


def _bad(daemon: Daemon, owner: str, resource: str, shared: bool = False) -> errors.LockdError:
    with pytest.raises(errors.LockdError) as ei:
        daemon.acquire(resource, owner=owner, shared=shared)
    return ei.value


@pytest.mark.parametrize("shared", [False, True], ids=["exclusive", "shared"])
def test_invalid_resources_are_named_errors(
    daemon: Daemon, owners: Owners, tmp_path: Path, files: list[Path], shared: bool
) -> None:
    a = reg(daemon, owners)["uuid"]
    d = tmp_path / "adir"
    d.mkdir()
    cases = {
        "missing": str(tmp_path / "no-such-file.img"),
        "relative": "res/disk0.img",
        "nul": str(files[0]) + "\0x",
        "not-normalized": str(files[0].parent / ".." / "res" / files[0].name),
        "dot": str(files[0].parent) + "/./" + files[0].name,
        "double-slash": str(files[0].parent) + "//" + files[0].name,
        "directory": str(d),
        "empty": "",
    }
    for why, resource in cases.items():
        err = _bad(daemon, a, resource, shared)
        assert isinstance(err, errors.InvalidResource), (why, resource, err)
        assert probe(files[0]) == "free", why
    # lockd never creates a resource in the direct lockspace
    assert not (tmp_path / "no-such-file.img").exists()
    daemon.assert_alive()


@pytest.mark.parametrize("shared", [False, True], ids=["exclusive", "shared"])
def test_fifo_is_refused_without_hanging(
    daemon: Daemon, owners: Owners, tmp_path: Path, files: list[Path], shared: bool
) -> None:
    """Opening a FIFO O_RDONLY blocks until a writer comes: the daemon must not."""
    a = reg(daemon, owners)["uuid"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    daemon.acquire(files[0], owner=a)
    from e2e import Conn

    t0 = time.monotonic()
    with Conn(daemon.socket, timeout=10) as c, pytest.raises(errors.InvalidResource):
        c.call(
            "io.lockd.Acquire",
            {"resource": str(fifo), "owner": a, "mode": "shared" if shared else "exclusive"},
        )
    assert time.monotonic() - t0 < 10
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    daemon.assert_alive()
    assert probe(files[0]) == "exclusive"


def test_unknown_lockspace(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    a = reg(daemon, owners)["uuid"]
    with pytest.raises((errors.InvalidResource, errors.InvalidParameter)) as ei:
        daemon.acquire("some-volume", owner=a, lockspace="nosuchspace")
    assert "nosuchspace" in str(ei.value) or "nosuchspace" in str(ei.value.parameters)
    with pytest.raises((errors.InvalidResource, errors.InvalidParameter)):
        daemon.acquire(files[0], owner=a, lockspace="../etc")
    assert probe(files[0]) == "free"


def test_no_such_owner(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    p = owners.spawn()  # alive but never registered
    with pytest.raises(errors.NoSuchOwner):
        daemon.acquire(files[0], pid=p.pid)
    with pytest.raises(errors.NoSuchOwner):
        daemon.acquire(files[0], owner="00000000-0000-4000-8000-000000000000")
    assert probe(files[0]) == "free"


def test_register_dead_or_missing_pid(daemon: Daemon, owners: Owners) -> None:
    p = owners.spawn()
    owners.kill(p)
    with pytest.raises(errors.LockdError) as ei:
        daemon.register(p.pid)
    assert isinstance(ei.value, errors.NoSuchOwner | errors.InvalidParameter), ei.value


# --- idempotency and tokens -------------------------------------------------------------------


def test_acquire_and_release_are_idempotent(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    a = reg(daemon, owners)["uuid"]
    first = daemon.acquire(files[0], owner=a)
    for _ in range(3):
        again = daemon.acquire(files[0], owner=a)
        assert again["token"] == first["token"]
        assert again["state"] == "held"
    shared = daemon.acquire(files[1], owner=a, shared=True)
    assert daemon.acquire(files[1], owner=a, shared=True)["token"] == shared["token"]
    assert probe(files[0]) == "exclusive"
    assert probe(files[1]) == "shared"
    rel = daemon.release(files[0], owner=a)
    assert rel["token"] == first["token"]
    assert probe(files[0]) == "free"
    rel2 = daemon.release(files[0], owner=a)  # the reply was "lost": ask again
    assert rel2["token"] == rel["token"]
    assert rel2["state"] == rel["state"]
    assert rel2["resource"] == rel["resource"]
    assert probe(files[0]) == "free"
    assert probe(files[1]) == "shared"


def test_release_of_never_held_is_not_held(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    a, b = reg(daemon, owners)["uuid"], reg(daemon, owners)["uuid"]
    with pytest.raises(errors.NotHeld):
        daemon.release(files[0], owner=a)
    daemon.acquire(files[0], owner=a)
    with pytest.raises(errors.NotHeld):  # b cannot release a's lease
        daemon.release(files[0], owner=b)
    assert probe(files[0]) == "exclusive"


def test_tokens_strictly_increase(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    a, b = reg(daemon, owners)["uuid"], reg(daemon, owners)["uuid"]
    seen: list[int] = []
    for i in range(3):
        for f in files[:4]:
            who = a if i % 2 == 0 else b
            lease = daemon.acquire(f, owner=who, shared=(f == files[3]))
            seen.append(lease["token"])
        for f in files[:4]:
            daemon.release(f, owner=a if i % 2 == 0 else b)
    assert seen == sorted(seen) and len(set(seen)) == len(seen), seen
    # and across a restart (SIGKILL: no clean shutdown)
    daemon.restart()
    lease = daemon.acquire(files[5], owner=a)
    assert lease["token"] > max(seen)
    assert daemon.status()["next_token"] > lease["token"]


def test_token_handoff(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    a, b = reg(daemon, owners)["uuid"], reg(daemon, owners)["uuid"]
    la = daemon.acquire(files[0], owner=a)
    daemon.release(files[0], owner=a)
    with pytest.raises(errors.TokenMismatch):
        daemon.acquire(files[0], owner=b, token=la["token"] + 1000)
    assert probe(files[0]) == "free"
    lb = daemon.acquire(files[0], owner=b, token=la["token"])
    assert lb["token"] > la["token"]
    assert probe(files[0]) == "exclusive"


def test_connection_close_is_not_release(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    """Leases belong to the owner process, not to the connection (DESIGN §3)."""
    p = owners.spawn()
    c = daemon.connect()
    o = c.call("io.lockd.Register", {"pid": p.pid})["owner"]
    c.call("io.lockd.Acquire", {"resource": str(files[0]), "owner": o["uuid"]})
    c.close()
    time.sleep(0.2)
    assert probe(files[0]) == "exclusive"
    assert daemon.inquire(owner=o["uuid"])["leases"][0]["state"] == "held"


def test_register_is_idempotent(daemon: Daemon, owners: Owners) -> None:
    p = owners.spawn()
    o1 = daemon.register(p.pid, name="vm1")
    o2 = daemon.register(p.pid, name="vm1")
    assert o1["uuid"] == o2["uuid"]
    assert o1["pid"] == p.pid
    with open(f"/proc/{p.pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    assert o1["start_time"] == int(fields[19])
    assert o1["fence"] == "kill"  # the default policy
    uuid = "6f2d3b1c-0c59-4c1d-9a43-3f1a2b4c5d6e"
    p2 = owners.spawn()
    o3 = daemon.register(p2.pid, uuid=uuid, name="vm2", fence="none")
    assert o3["uuid"] == uuid and o3["fence"] == "none"
    listed = {o["uuid"]: o for o in daemon.owners()}
    assert {o1["uuid"], uuid} <= set(listed)
    with pytest.raises(errors.InvalidParameter):
        daemon.register(p2.pid, fence="explode")


# --- indirect lockspaces ----------------------------------------------------------------------


def test_indirect_lockspace(make_daemon, owners: Owners, tmp_path: Path) -> None:
    ls_dir = tmp_path / "leases"
    ls_dir.mkdir()
    d = make_daemon(config=f'[lockspaces]\nvm = "{ls_dir}"\n')
    a, b = reg(d, owners)["uuid"], reg(d, owners)["uuid"]
    name = "volume-5a7e"
    lease = d.acquire(name, owner=a, lockspace="vm")
    lease_file = ls_dir / hashlib.sha256(name.encode()).hexdigest()
    assert lease_file.exists()
    assert stat.S_IMODE(os.stat(lease_file).st_mode) == 0o600
    assert probe(lease_file) == "exclusive"
    assert lease["lockspace"] == "vm" and lease["resource"] == name
    with pytest.raises(errors.ResourceBusy):
        d.acquire(name, owner=b, lockspace="vm")
    # the same string in another lockspace is another resource
    with pytest.raises(errors.InvalidResource):
        d.acquire(name, owner=b)  # direct: not an absolute path
    d.release(name, owner=a, lockspace="vm")
    assert probe(lease_file) == "free"


def test_indirect_lease_is_retaken_or_lost_after_a_crash(
    make_daemon, owners: Owners, tmp_path: Path
) -> None:
    """Recovery (DESIGN §5.4) for an indirect lockspace: the lease file is locked again after
    a crash; if another holder took the lease file in the gap, the lease is lost and lockd
    does not lock it behind that holder's back once it lets go."""
    ls_dir = tmp_path / "leases"
    ls_dir.mkdir()
    d = make_daemon(config=f'[lockspaces]\nvm = "{ls_dir}"\n')
    o = owners.spawn()
    a = d.register(o.pid, fence="none")["uuid"]
    names = ["volume-1", "volume-2"]
    files = [ls_dir / hashlib.sha256(n.encode()).hexdigest() for n in names]
    tokens = [d.acquire(n, owner=a, lockspace="vm")["token"] for n in names]
    d.kill()
    assert probe(files[0]) == probe(files[1]) == "free"
    with hold_lock(files[1]):
        d.start()
        assert probe(files[0]) == "exclusive"  # re-taken
        assert probe_setlk_elsewhere(files[0]) == "held"
        leases = {x["resource"]: (x["state"], x["token"]) for x in d.inquire(owner=a)["leases"]}
        assert leases == {names[0]: ("held", tokens[0]), names[1]: ("lost", tokens[1])}
    assert probe(files[1]) == "free"  # not grabbed once we let go
    d.release(names[0], owner=a, lockspace="vm")
    assert probe(files[0]) == "free"


# --- GetInfo ----------------------------------------------------------------------------------


def test_getinfo_and_interfaces_on_the_right_sockets(daemon: Daemon) -> None:
    with daemon.connect() as c:
        info = c.call("org.varlink.service.GetInfo")
        assert "io.lockd" in info["interfaces"]
        assert "org.varlink.service" in info["interfaces"]
        assert "io.lockd.Admin" not in info["interfaces"]
        desc = c.call("org.varlink.service.GetInterfaceDescription", {"interface": "io.lockd"})
        assert "interface io.lockd" in desc["description"]
        assert "method Acquire" in desc["description"]
        # the admin interface is not reachable on the main socket
        with pytest.raises(errors.LockdError) as ei:
            c.call("io.lockd.Admin.Status")
        assert not isinstance(ei.value, errors.InvalidParameter)
    with daemon.connect(admin=True) as c:
        info = c.call("org.varlink.service.GetInfo")
        assert "io.lockd.Admin" in info["interfaces"]
        desc = c.call(
            "org.varlink.service.GetInterfaceDescription", {"interface": "io.lockd.Admin"}
        )
        assert "interface io.lockd.Admin" in desc["description"]
        status = c.call("io.lockd.Admin.Status")["status"]
        assert status["pid"] == daemon.pid
        assert status["state_dir"] == str(daemon.state_dir)
    for s in (daemon.socket, daemon.admin_socket):
        st = os.stat(s)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) & 0o007 == 0, f"{s} is world-accessible"


# --- concurrency ------------------------------------------------------------------------------


def _send(c, method: str, params: dict) -> None:
    c.send_raw(message(method, params))


def test_concurrent_acquires(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    """Requests that arrive together (group commit) behave as if run one by one."""
    a = reg(daemon, owners)["uuid"]
    # the same owner, the same file, ten connections at once: one lease, one token
    conns = [daemon.connect() for _ in range(10)]
    for c in conns:
        _send(c, "io.lockd.Acquire", {"resource": str(files[0]), "owner": a})
    replies = [c.recv_message() for c in conns]
    assert all("error" not in r for r in replies), replies
    assert len({r["parameters"]["lease"]["token"] for r in replies}) == 1
    for c in conns:
        c.close()
    # eight owners race for one file: exactly one wins
    others = [reg(daemon, owners)["uuid"] for _ in range(8)]
    conns = [daemon.connect() for _ in others]
    for c, o in zip(conns, others, strict=True):
        _send(c, "io.lockd.Acquire", {"resource": str(files[1]), "owner": o})
    replies = [c.recv_message() for c in conns]
    winners = [r for r in replies if "error" not in r]
    assert len(winners) == 1, replies
    assert {r["error"] for r in replies if "error" in r} == {"io.lockd.ResourceBusy"}
    for c in conns:
        c.close()
    assert probe(files[1]) == "exclusive"
    # acquire, release, acquire, pipelined on one connection: answered in order, in effect
    with daemon.connect() as c:
        for method in ("Acquire", "Release", "Acquire"):
            _send(c, f"io.lockd.{method}", {"resource": str(files[2]), "owner": a})
        r1, r2, r3 = (c.recv_message() for _ in range(3))
    assert r1["parameters"]["lease"]["token"] == r2["parameters"]["lease"]["token"]
    assert r3["parameters"]["lease"]["token"] > r1["parameters"]["lease"]["token"]
    assert probe(files[2]) == "exclusive"
    held = {(x["owner"]["uuid"], x["resource"]) for x in daemon.leases() if x["state"] == "held"}
    assert (a, str(files[2])) in held and (a, str(files[0])) in held


def test_release_after_file_deleted_or_renamed(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    """A lease is released by the name it was taken with, even if that name is gone."""
    a = reg(daemon, owners)["uuid"]
    daemon.acquire(files[0], owner=a)
    daemon.acquire(files[1], owner=a)
    os.unlink(files[0])
    moved = files[1].parent / "moved.img"
    os.rename(files[1], moved)
    assert daemon.release(files[0], owner=a)["state"] == "released"
    assert daemon.release(files[1], owner=a)["state"] == "released"
    assert probe(moved) == "free"
    assert [x for x in daemon.leases() if x["state"] == "held"] == []


def test_release_names_the_lease_taken_under_that_name(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    """A name that now leads to another file the owner also holds releases the lease taken
    under that name, not the other one (docs/decisions.md: which lease a Release names)."""
    a = reg(daemon, owners)["uuid"]
    first = daemon.acquire(files[0], owner=a)
    second = daemon.acquire(files[1], owner=a)
    os.replace(files[1], files[0])  # files[0] now names the second file; the first is unlinked
    assert daemon.release(files[0], owner=a)["token"] == first["token"]
    assert probe(files[0]) == "exclusive"  # the second file's lease is untouched
    assert daemon.release(files[1], owner=a)["token"] == second["token"]
    assert probe(files[0]) == "free"
    assert [x for x in daemon.leases() if x["state"] == "held"] == []


def test_register_cannot_take_over_another_owner(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    """A uuid names one process: another process cannot register under it (and so inherit
    its leases), nor can a registered process switch to another uuid."""
    pa, pb = owners.spawn(), owners.spawn()
    a = daemon.register(pa.pid, uuid="11111111-1111-4111-8111-111111111111")
    daemon.acquire(files[0], owner=a["uuid"])
    with pytest.raises((errors.InvalidParameter, errors.PermissionDenied)):
        daemon.register(pb.pid, uuid=a["uuid"])
    with pytest.raises((errors.InvalidParameter, errors.PermissionDenied)):
        daemon.register(pa.pid, uuid="22222222-2222-4222-8222-222222222222")
    with pytest.raises(errors.InvalidParameter):
        daemon.register(pb.pid, uuid="not-a-uuid")
    assert daemon.register(pa.pid)["uuid"] == a["uuid"]
    with pytest.raises(errors.NoSuchOwner):
        daemon.inquire(pid=pb.pid)
    assert [o["uuid"] for o in daemon.owners()] == [a["uuid"]]
    assert probe(files[0]) == "exclusive"
