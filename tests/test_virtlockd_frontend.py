"""lockd's virtlockd front end where it goes beyond virtlockd (DESIGN §10, issue 9).

Real daemons, real sockets, real OFD locks probed from outside; the protocol is spoken by
the tests' own client (``vlharness``). What is checked here has no virtlockd counterpart to
compare with: directory lockspaces journaled across restarts, a VM restarted under the same
uuid while its old process's death is still being processed, peer credentials, re-exec with
the virtlockd listener, an owner dead while lockd was down, a peer that does not read, and
the domain id in ``lockctl``.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import vlharness as vl
from e2e import TREE, Daemon, Owners, make_files, probe, wait_until

NOBODY = 65534


@pytest.fixture
def vld(make_daemon: Callable[..., Daemon], runtime_dir: Path) -> Daemon:
    """lockd with the virtlockd protocol on ``.vl_socket`` (the config key)."""
    sock = runtime_dir / "vl.sock"
    d = make_daemon(config=f'virtlockd_socket = "{sock}"\n')
    d.vl_socket = sock  # type: ignore[attr-defined]
    return d


def vsock(d: Daemon) -> Path:
    return d.vl_socket  # type: ignore[attr-defined, no-any-return]


def uid() -> bytes:
    return uuidlib.uuid4().bytes


def test_socket_is_root_only_and_removed_at_stop(vld: Daemon) -> None:
    st = os.stat(vsock(vld))
    assert (oct(st.st_mode & 0o777), st.st_uid) == ("0o600", 0)
    vld.stop()
    assert not vsock(vld).exists()


def test_option_names_the_socket(
    make_daemon: Callable[..., Daemon], runtime_dir: Path, owners: Owners, files: list[Path]
) -> None:
    d = make_daemon(start=False)
    sock = runtime_dir / "opt.sock"
    d.spawn(None, "--virtlockd-socket", str(sock))
    d.wait_ready()
    with vl.Conn(sock) as c:
        assert c.register(uid(), "vm", 1, owners.spawn().pid).ok
        assert c.acquire(str(files[0])).ok
    assert probe(files[0]) == "exclusive"


def test_lockspace_survives_a_restart(
    vld: Daemon, owners: Owners, runtime_dir: Path, tmp_path: Path
) -> None:
    """libvirtd sends CREATE_LOCKSPACE only when it starts. After lockd is killed and started
    again, the lease in the lockspace is re-taken from the journal, and an ACQUIRE in the same
    lockspace still works without a new CREATE_LOCKSPACE."""
    ls = str(tmp_path / "lockd" / "files")
    a, b = owners.spawn(), owners.spawn()
    ua = uid()
    with vl.Conn(vsock(vld)) as c:
        assert c.create_lockspace(ls).ok
        assert c.register(ua, "vm-a", 7, a.pid).ok
        assert c.acquire("aa" * 32, ls, vl.AUTOCREATE).ok
    lease_file = os.path.join(ls, "aa" * 32)
    assert probe(lease_file) == "exclusive"
    [lease] = vld.leases()
    assert (lease["lockspace"], lease["resource"], lease["path"]) == (ls, "aa" * 32, lease_file)
    assert (lease["owner"]["name"], lease["owner"]["uuid"]) == ("vm-a", str(uuidlib.UUID(bytes=ua)))
    vld.kill()
    vld.start()
    assert probe(lease_file) == "exclusive"
    [again] = vld.leases()
    assert (again["token"], again["continuity"]) == (lease["token"], "retaken")
    with vl.Conn(vsock(vld)) as c:
        assert c.register(uid(), "vm-b", 8, b.pid).ok
        r = c.acquire("aa" * 32, ls, vl.AUTOCREATE)
        assert r.code == 87 and "is locked" in (r.message or ""), r
        assert c.acquire("bb" * 32, ls, vl.AUTOCREATE).ok
    with vl.Conn(vsock(vld)) as c:
        assert c.register(ua, "vm-a", 7, a.pid).ok
        assert c.release("aa" * 32, ls).ok
    assert probe(lease_file) == "free"
    out = vld.lockctl("owners", "-o", "NAME,PID,DOMID", "-n")
    assert out.returncode == 0, out.stderr
    assert sorted(line.split() for line in out.stdout.splitlines()) == [
        ["vm-a", str(a.pid), "7"],
        ["vm-b", str(b.pid), "8"],
    ]


def test_lockspace_paths_are_checked(vld: Daemon, owners: Owners, tmp_path: Path) -> None:
    """virtlockd takes a relative path relative to its working directory; lockd wants an
    absolute, normalized one. A name in a directory lockspace is one path component."""
    top = tmp_path / "spaces"
    top.mkdir()
    with vl.Conn(vsock(vld)) as c:
        for bad in ("relative/dir", str(top / "a" / ".." / "b"), "//srv"):
            r = c.create_lockspace(bad)
            assert (r.code, r.error and r.error[1]) == (8, 51), (bad, r)
        ls = str(top / "ls")
        assert c.create_lockspace(ls).ok
        assert c.register(uid(), "vm", 1, owners.spawn().pid).ok
        for bad in ("../escape", "a/b", ".", ""):
            r = c.acquire(bad, ls, vl.AUTOCREATE)
            assert (r.code, r.error and r.error[1]) == (8, 51), (bad, r)
    assert os.listdir(top) == ["ls"] and os.listdir(ls) == []
    assert not Path(TREE, "relative").exists()


def test_a_vm_restarted_at_once_under_its_uuid(
    vld: Daemon, owners: Owners, files: list[Path]
) -> None:
    """libvirt restarts a domain (reboot with on_reboot=destroy+start, or a crash and
    autostart): the new QEMU registers the same uuid right after the old one died, possibly
    before lockd has processed that death. The REGISTER must succeed, and the old lease goes.
    lockd is stopped (SIGSTOP) while the old QEMU dies and the new REGISTER is sent, so both
    are pending at once when it resumes."""
    u = uid()
    for round_ in range(3):
        old = owners.spawn()
        with vl.Conn(vsock(vld)) as c:
            assert c.register(u, "vm", 2 * round_ + 1, old.pid).ok
            assert c.acquire(str(files[0])).ok
        new = owners.spawn()
        hook = vl.Conn(vsock(vld))
        os.kill(vld.pid, signal.SIGSTOP)
        try:
            Owners.kill(old)
            hook.send(vl.frame(vl.REGISTER, vl.register_body(u, "vm", 2 * round_ + 2, new.pid)))
        finally:
            os.kill(vld.pid, signal.SIGCONT)
        r = hook.recv()
        assert r.ok, r
        assert hook.acquire(str(files[0])).ok
        [lease] = vld.leases()
        assert lease["owner"]["pid"] == new.pid
        hook.close()
        Owners.kill(new)
        wait_until(lambda: probe(files[0]) == "free", 10, what="the lease of the dead VM to go")


def test_register_waits_for_the_death_in_process(tmp_path: Path, owners: Owners) -> None:
    """The same, deterministic, against the lock service in this process: the old owner is
    dead and reaped, and the event loop has not yet run its pidfd callback, when the new
    process registers under the same uuid."""
    from lockd.config import Config
    from lockd.journaling.journal import Journal
    from lockd.locks.leases import LeaseTable
    from lockd.locks.lockspace import Lockspaces
    from lockd.locks.process import Peer
    from lockd.service.service import GroupCommit, LockService
    from lockd.systemd.notify import FdStore

    disk = make_files(tmp_path / "res", 1)[0]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        journal = Journal(tmp_path / "journal.sqlite")
        svc = LockService(
            Config(state_dir=tmp_path), journal, GroupCommit(journal, loop), Lockspaces({}),
            LeaseTable(), FdStore(False), loop,
        )  # fmt: skip
        peer = Peer(os.getpid(), 0, frozenset({0}))
        u = str(uuidlib.uuid4())
        old = owners.spawn()
        first = await svc.register(old.pid, u, "vm", None, peer, domain_id=1)
        await svc.acquire(first, "", str(disk), "exclusive", None, peer)
        Owners.kill(old)  # dead and reaped; its pidfd callback has not run: no await since
        new = owners.spawn()
        second = await svc.register(new.pid, u, "vm", None, peer, domain_id=2)
        assert second is not first and (second.pid, second.domain_id) == (new.pid, 2)
        assert probe(disk) == "free" and not first.leases
        await svc.acquire(second, "", str(disk), "exclusive", None, peer)
        assert probe(disk) == "exclusive"
        journal.close()

    asyncio.run(scenario())


def test_owner_dead_while_lockd_was_down(vld: Daemon, owners: Owners, files: list[Path]) -> None:
    """The domain is destroyed while lockd is down: the next start releases its lease."""
    o = owners.spawn()
    with vl.Conn(vsock(vld)) as c:
        assert c.register(uid(), "vm", 1, o.pid).ok
        assert c.acquire(str(files[0])).ok
        assert c.acquire(str(files[1]), flags=vl.SHARED).ok
    vld.kill()
    Owners.kill(o)
    vld.start()
    assert [probe(f) for f in files[:2]] == ["free", "free"]
    assert vld.leases() == []
    assert vld.status()["recovery"]["released"] == 2


def test_reexec_hands_over_the_virtlockd_socket(
    vld: Daemon, owners: Owners, files: list[Path]
) -> None:
    o = owners.spawn()
    hook = vl.Conn(vsock(vld))
    assert hook.register(uid(), "vm", 1, o.pid).ok
    assert hook.restrict().ok
    with vl.Conn(vsock(vld)) as c:
        assert c.register(uid(), "vm2", 2, owners.spawn().pid).ok
        assert c.acquire(str(files[0])).ok
    started = vld.status()["started_at"]
    pid = vld.pid
    os.kill(pid, signal.SIGUSR1)

    def new_image() -> dict[str, Any] | None:
        try:
            status = vld.status()
        except Exception:  # noqa: BLE001 - the old image closes its connections at exec
            return None
        return status if status["started_at"] != started else None

    status = wait_until(new_image, 15, what="the new image")
    assert vld.pid == pid and status["recovery"]["adopted"] == 1
    with vl.Conn(vsock(vld)) as c:  # the listener crossed the exec
        assert c.register(uid(), "vm3", 3, o.pid).code == 55  # o is another owner's
        assert c.register(uid(), "vm3", 3, owners.spawn().pid).ok
        r = c.acquire(str(files[0]))
        assert r.code == 87, r
    assert probe(files[0]) == "exclusive"
    # the hook connection died with the old image (as with virtlockd's re-exec, connections
    # do not cross); nothing was released
    assert hook.outcome(wait=2) == "eof"
    hook.close()


def test_a_peer_that_does_not_read(vld: Daemon, owners: Owners, files: list[Path]) -> None:
    """Calls sent without reading a reply: once the replies fill the socket and lockd's
    buffer, the connection is paused (lockd stops reading it), another client is served
    meanwhile, and every reply arrives in order once the peer reads."""
    # REGISTERs with owner id 0: refused at once (no journal), 1 KiB each, 244-byte replies
    n = 3000
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(vsock(vld)))
    s.setblocking(False)
    body = vl.register_body(uid(), "x" * 1000, 0, 1)
    calls = b"".join(vl.frame(vl.REGISTER, body, serial=i) for i in range(n))
    sent, stalled = 0, time.monotonic()
    while sent < len(calls) and time.monotonic() - stalled < 1.0:  # until 1 s without room
        try:
            sent += s.send(calls[sent : sent + 65536])
            stalled = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    assert sent < len(calls), "the daemon read everything without the peer reading a reply"
    with vl.Conn(vsock(vld)) as other:  # served while the first one is paused
        assert other.register(uid(), "vm2", 2, owners.spawn().pid).ok
        assert other.acquire(str(files[0])).ok
    s.setblocking(True)
    s.settimeout(30)
    rest = threading.Thread(target=s.sendall, args=(calls[sent:],))
    rest.start()
    f = s.makefile("rb")
    serials = []
    for _ in range(n):
        (length,) = struct.unpack(">I", f.read(4))
        body = f.read(length - 4)
        serials.append(struct.unpack_from(">I", body, 16)[0])
        assert struct.unpack_from(">i", body, 20)[0] == vl.ERROR
    rest.join()
    assert serials == list(range(n))
    s.close()
    assert probe(files[0]) == "exclusive"


def test_garbage_never_hurts_a_bystander(vld: Daemon, owners: Owners, files: list[Path]) -> None:
    o = owners.spawn()
    with vl.Conn(vsock(vld)) as c:
        assert c.register(uid(), "bystander", 1, o.pid).ok
        assert c.acquire(str(files[0])).ok
    rnd = __import__("random").Random(9)
    for i in range(200):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(vsock(vld)))
            data = bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 120)))
            if i % 3 == 0:  # a plausible header, then junk
                data = vl.frame(rnd.randrange(-2, 12), data, serial=i)
            s.sendall(data)
    assert vld.running
    assert probe(files[0]) == "exclusive"
    [lease] = vld.leases()
    assert lease["owner"]["name"] == "bystander"


_PEER = r"""
import socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(15)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect", exc.errno)
    sys.exit(0)
for line in sys.stdin:
    s.sendall(bytes.fromhex(line.strip()))
    buf = b""
    while len(buf) < 4 or len(buf) < struct.unpack(">I", buf[:4])[0]:
        chunk = s.recv(65536)
        if not chunk:
            print("eof")
            sys.exit(0)
        buf += chunk
    print(buf.hex(), flush=True)
"""


def test_a_non_root_peer(vld: Daemon, owners: Owners, runtime_dir: Path) -> None:
    """The socket is 0600 root. If an administrator opens it (SocketMode=), a non-root peer
    gets the main socket's rules: it registers only its own processes, locks only files it
    could open itself, and creates no lockspace."""
    try:
        pwd.getpwuid(NOBODY)
    except KeyError:
        pytest.skip("no user 65534")
    if not os.path.exists("/usr/bin/python3"):
        pytest.skip("no /usr/bin/python3")
    os.chmod(runtime_dir, 0o711)
    fdir = Path(tempfile.mkdtemp(prefix="lkvn", dir="/tmp"))
    try:
        os.chmod(fdir, 0o755)
        theirs, roots = fdir / "theirs.img", fdir / "root.img"
        for f, mode in ((theirs, 0o666), (roots, 0o600)):
            f.write_bytes(b"\0" * 512)
            os.chmod(f, mode)

        def as_nobody(calls: list[bytes]) -> list[vl.Reply | str]:
            out = subprocess.run(
                ["/usr/bin/python3", "-c", _PEER, str(vsock(vld))],
                input="".join(c.hex() + "\n" for c in calls), capture_output=True, text=True,
                timeout=60, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/",
            )  # fmt: skip
            assert out.returncode == 0, out.stderr
            replies: list[vl.Reply | str] = []
            for line in out.stdout.splitlines():
                if line == "eof" or line.startswith("connect"):
                    replies.append(line)
                    continue
                raw = bytes.fromhex(line)
                prog, vers, proc, mtype, serial, status = struct.unpack_from(">IIiiIi", raw, 4)
                err = vl.decode_error(raw[28:]) if status == vl.ERROR else None
                replies.append(vl.Reply(len(raw), prog, vers, proc, mtype, serial, status, err))
            return replies

        assert as_nobody([vl.frame(vl.RESTRICT, vl.u32(0))]) == ["connect 13"]  # 0600: EACCES
        os.chmod(vsock(vld), 0o666)
        mine = owners.spawn(uid=NOBODY)
        roots_vm = owners.spawn()
        steal, reg, acq, acq_root, mkls = as_nobody([
            vl.frame(vl.REGISTER, vl.register_body(uid(), "steal", 1, roots_vm.pid)),
            vl.frame(vl.REGISTER, vl.register_body(uid(), "mine", 2, mine.pid)),
            vl.frame(vl.ACQUIRE, vl.resource_body("", str(theirs))),
            vl.frame(vl.ACQUIRE, vl.resource_body("", str(roots))),
            vl.frame(vl.CREATE_LOCKSPACE, vl.xstr(str(fdir / "ls"))),
        ])  # fmt: skip
        assert isinstance(steal, vl.Reply) and steal.code == 29, steal
        assert isinstance(reg, vl.Reply) and reg.ok, reg
        assert isinstance(acq, vl.Reply) and acq.ok, acq
        assert isinstance(acq_root, vl.Reply) and acq_root.code == 29, acq_root
        assert isinstance(mkls, vl.Reply) and mkls.code == 29, mkls
        assert not (fdir / "ls").exists()
        assert probe(roots) == "free"
        # its lease outlives its connection, as any
        assert probe(theirs) == "exclusive"
        [lease] = vld.leases()
        assert lease["owner"]["pid"] == mine.pid
    finally:
        shutil.rmtree(fdir, ignore_errors=True)


def test_max_connections_counts_both_front_ends(
    make_daemon: Callable[..., Daemon], runtime_dir: Path
) -> None:
    """max_connections bounds every connection lockd holds, Varlink and virtlockd's protocol
    together (the Varlink side used to count only its own): with a limit of 3, two Varlink
    connections and one virtlockd-protocol connection fill it, and a fourth is refused on
    either socket; the ones already open keep working."""
    sock = runtime_dir / "vl.sock"
    d = make_daemon(config=f'virtlockd_socket = "{sock}"\nmax_connections = 3\n')
    with d.connect() as a, d.connect() as b, vl.Conn(sock) as v:
        assert a.call("org.varlink.service.GetInfo")["product"] == "lockd"
        assert b.call("org.varlink.service.GetInfo")["product"] == "lockd"
        assert v.outcome(wait=0.3) == "silent"  # accepted, nothing to say
        with d.connect() as extra:
            assert extra.closed_by_peer(), "a fourth connection (Varlink) was accepted"
        with vl.Conn(sock) as extra_vl:
            assert extra_vl.outcome(wait=5) == "eof", "a fourth connection (virtlockd) stayed"
        assert a.call("org.varlink.service.GetInfo")["product"] == "lockd"
