"""Access control with a real non-root user (issue 4, "Access control"; DESIGN §8).

Theory of operation: the setup creates (idempotently, and leaves in place) a system group
``lockd-test`` and a system user ``lockd-test-user`` whose *supplementary* group it is; nothing
else on the host changes. Clients run as that user through ``setpriv --reuid --regid
--init-groups`` with the system's ``/usr/bin/python3`` and a self-contained raw Varlink client
(the venv's interpreter lives under /root, which the user cannot enter); the files they name
live in a world-traversable directory under /tmp made for the test. Owner processes of the
user are ``sleep`` under the same ``setpriv``. Every held/free check is a probe by root from
outside the daemon.

tests/test_permissions.py already covers ``nobody`` with its *primary* group; these tests add
a supplementary group, another non-root user's processes, Watch, an admin socket that is
reachable by mistake, directories the user cannot enter, a symlink swapped under the daemon,
and what files the daemon may be made to create.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e import Daemon, Owners, probe, wait_until
from scale import size

from lockd import errors

USER, GROUP = "lockd-test-user", "lockd-test"
PY = "/usr/bin/python3"
NOBODY = 65534
RACE_SECONDS = size(5, 20)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(PY) or not shutil.which("setpriv"),
    reason="needs root, /usr/bin/python3 and setpriv",
)


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    group_gid: int  # the supplementary group allowed on the main socket

    def setpriv(self) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups"]


@pytest.fixture(scope="session")
def user() -> User:
    def sh(*argv: str) -> None:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            pytest.skip(f"{' '.join(argv)}: {out.stderr.strip()}")

    try:
        grp.getgrnam(GROUP)
    except KeyError:
        sh("groupadd", "--system", GROUP)
    try:
        pwd.getpwnam(USER)
    except KeyError:
        sh("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
           "--groups", GROUP, USER)  # fmt: skip
    if USER not in grp.getgrnam(GROUP).gr_mem:
        sh("usermod", "--append", "--groups", GROUP, USER)
    pw = pwd.getpwnam(USER)
    return User(USER, pw.pw_uid, pw.pw_gid, grp.getgrnam(GROUP).gr_gid)


@pytest.fixture
def shared(runtime_dir: Path) -> Iterator[Path]:
    """A directory under /tmp the user can traverse (tmp_path lives under a 0700 dir), and
    the sockets' directory made traversable too (the sockets' own modes then decide)."""
    os.chmod(runtime_dir, 0o711)
    d = Path(tempfile.mkdtemp(prefix="lkdacc", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


_CLIENT = r"""
import json, socket, sys
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect_error": exc.errno}), flush=True)
    sys.exit(0)
print(json.dumps({"connected": True}), flush=True)
buf = b""
for line in sys.stdin:
    try:
        s.sendall(line.strip().encode() + b"\0")
    except OSError:
        pass  # closed on us: whatever it said before closing is still to be read
    while b"\0" not in buf:
        try:
            chunk = s.recv(65536)
        except OSError:
            chunk = b""
        if not chunk:
            print(json.dumps({"closed": True}), flush=True)
            sys.exit(0)
        buf += chunk
    msg, _, buf = buf.partition(b"\0")
    print(msg.decode(), flush=True)
"""


class UserClient:
    """A Varlink connection made by a process running as the test user."""

    def __init__(self, user: User, sock: Path) -> None:
        self.proc = subprocess.Popen(
            [*user.setpriv(), PY, "-c", _CLIENT, str(sock)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"user client died (rc {self.proc.poll()})"
        out = json.loads(line)
        assert isinstance(out, dict)
        return out

    @property
    def connect_errno(self) -> int | None:
        return self.hello.get("connect_error")

    def call_raw(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"method": method, "parameters": params or {}}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.call_raw(method, params)
        if "error" in reply:
            raise errors.from_wire(reply["error"], reply.get("parameters"))
        assert "parameters" in reply, reply
        return reply["parameters"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def clients() -> Iterator[Callable[[User, Path], UserClient]]:
    made: list[UserClient] = []

    def make(user: User, sock: Path) -> UserClient:
        c = UserClient(user, sock)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def procs() -> Iterator[Callable[[list[str]], subprocess.Popen[bytes]]]:
    """``sleep 1000`` under a setpriv prefix (an owner process of another user)."""
    made: list[subprocess.Popen[bytes]] = []

    def spawn(prefix: list[str]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen([*prefix, "sleep", "1000"], stdin=subprocess.DEVNULL)
        made.append(p)
        # setpriv execs sleep: wait until the pid is sleep under the new uid
        wait_until(lambda: _comm(p.pid) == "sleep", 10, what="the owner process")
        return p

    yield spawn
    for p in made:
        Owners.kill(p)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def make_file(path: Path, mode: int, uid: int = 0, gid: int = 0) -> Path:
    path.write_bytes(b"\0" * 512)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


GROUP_CONFIG = f'socket_group = "{GROUP}"\n'


# --- sockets --------------------------------------------------------------------------------------


def test_default_sockets_refuse_the_user(
    make_daemon: Callable[..., Daemon], shared: Path, user: User, clients: Any
) -> None:
    d = make_daemon()
    for sock in (d.socket, d.admin_socket):
        st = os.stat(sock)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0), sock
        assert clients(user, sock).connect_errno == 13  # EACCES


def test_socket_group_lets_members_in_admin_stays_root(
    make_daemon: Callable[..., Daemon], shared: Path, user: User, clients: Any
) -> None:
    d = make_daemon(config=GROUP_CONFIG)
    st = os.stat(d.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, user.group_gid)
    st = os.stat(d.admin_socket)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    c = clients(user, d.socket)
    assert c.hello == {"connected": True}
    assert "io.lockd" in c.call("org.varlink.service.GetInfo")["interfaces"]
    assert clients(user, d.admin_socket).connect_errno == 13

    # Even if the admin socket is reachable (an administrator's chmod), SO_PEERCRED decides:
    # a non-root peer gets PermissionDenied and the connection is closed.
    os.chmod(d.admin_socket, 0o666)
    a = clients(user, d.admin_socket)
    assert a.hello == {"connected": True}
    reply = a.call_raw("io.lockd.Admin.Status")
    assert reply.get("error") == "io.lockd.PermissionDenied", reply
    assert a.call_raw("io.lockd.Admin.ListLeases") == {"closed": True}


# --- owners and leases of other users -------------------------------------------------------------


def test_user_touches_only_its_own_owners(
    make_daemon: Callable[..., Daemon],
    owners: Owners,
    shared: Path,
    user: User,
    clients: Any,
    procs: Any,
) -> None:
    d = make_daemon(config=GROUP_CONFIG)
    mine_f = make_file(shared / "user.img", 0o600, user.uid, user.gid)
    roots_f = make_file(shared / "root.img", 0o666)  # the user could open it: ownership decides
    root_proc = owners.spawn()
    root_owner = d.register(root_proc.pid, name="root-vm")
    root_lease = d.acquire(roots_f, owner=root_owner["uuid"])
    their = procs(user.setpriv())
    nobodys = procs(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"])

    c = clients(user, d.socket)
    me = c.call("io.lockd.Register", {"pid": their.pid, "name": "user-vm"})["owner"]
    assert me["uid"] == user.uid
    for pid in (root_proc.pid, nobodys.pid):  # root's process, another non-root user's
        with pytest.raises(errors.PermissionDenied):
            c.call("io.lockd.Register", {"pid": pid})
    for ref in ({"owner": root_owner["uuid"]}, {"pid": root_proc.pid}):
        for method, extra in (
            ("io.lockd.Acquire", {"resource": str(mine_f)}),
            ("io.lockd.Release", {"resource": str(roots_f)}),
            ("io.lockd.ReleaseAll", {}),
            ("io.lockd.Inquire", {}),
        ):
            with pytest.raises(errors.PermissionDenied):
                c.call(method, {**ref, **extra})
    # Watch (a streaming call, "more": true) of root's owner is refused before it streams
    watch = subprocess.run(
        [*user.setpriv(), PY, "-c", _WATCH, str(d.socket), root_owner["uuid"]],
        capture_output=True, text=True, timeout=30, cwd="/",
    )  # fmt: skip
    assert json.loads(watch.stdout).get("error") == "io.lockd.PermissionDenied", watch

    lease = c.call("io.lockd.Acquire", {"resource": str(mine_f), "owner": me["uuid"]})["lease"]
    assert lease["state"] == "held" and probe(mine_f) == "exclusive"
    with pytest.raises(errors.ResourceBusy):  # root's lease holds: the kernel arbitrates
        c.call("io.lockd.Acquire", {"resource": str(roots_f), "owner": me["uuid"]})
    assert probe(roots_f) == "exclusive"
    assert [x["token"] for x in d.inquire(owner=root_owner["uuid"])["leases"]] == [
        root_lease["token"]
    ]
    assert {o["uid"] for o in d.owners()} == {0, user.uid}
    Owners.kill(their)  # the user's owner dies: its lease goes, root's stays
    wait_until(lambda: probe(mine_f) == "free", 5, what="the user's lease to go")
    assert probe(roots_f) == "exclusive"


_WATCH = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
msg = {"method": "io.lockd.Watch", "parameters": {"owner": sys.argv[2]}, "more": True}
s.sendall(json.dumps(msg).encode() + b"\0")
buf = b""
while b"\0" not in buf:
    buf += s.recv(65536)
print(buf.partition(b"\0")[0].decode())
"""


# --- files the user may not open ------------------------------------------------------------------


def test_user_cannot_lock_files_it_could_not_open(
    make_daemon: Callable[..., Daemon], shared: Path, user: User, clients: Any, procs: Any
) -> None:
    d = make_daemon(config=GROUP_CONFIG)
    their = procs(user.setpriv())
    c = clients(user, d.socket)
    me = c.call("io.lockd.Register", {"pid": their.pid})["owner"]["uuid"]
    udir = shared / "user"
    udir.mkdir()
    os.chown(udir, user.uid, user.gid)
    cases = {  # file -> (shared allowed, exclusive allowed)
        make_file(shared / "root-0600.img", 0o600): (False, False),
        make_file(shared / "root-0644.img", 0o644): (True, False),
        make_file(shared / "root-0666.img", 0o666): (True, True),
        make_file(shared / "grp-0660.img", 0o660, 0, user.group_gid): (True, True),
        make_file(shared / "grp-0640.img", 0o640, 0, user.group_gid): (True, False),
        make_file(shared / "grp-0600.img", 0o600, 0, user.group_gid): (False, False),
        make_file(shared / "own-0400.img", 0o400, user.uid, user.gid): (True, False),
    }
    link = udir / "link-to-root-0600.img"  # the user's own symlink to root's file
    os.symlink(shared / "root-0600.img", link)
    os.lchown(link, user.uid, user.gid)
    cases[link] = (False, False)
    for f, allowed in cases.items():
        for mode, ok in zip(("shared", "exclusive"), allowed, strict=True):
            reply = c.call_raw("io.lockd.Acquire", {"resource": str(f), "owner": me, "mode": mode})
            if ok:
                assert "error" not in reply, (f.name, mode, reply)
                assert probe(f) == mode
                c.call("io.lockd.Release", {"resource": str(f), "owner": me})
            else:
                assert reply.get("error") == "io.lockd.PermissionDenied", (f.name, mode, reply)
            assert probe(f) == "free", (f.name, mode)
    # a path that does not exist is never created, wherever it points
    for missing in (udir / "new.img", shared / "new.img"):
        reply = c.call_raw("io.lockd.Acquire", {"resource": str(missing), "owner": me})
        assert reply.get("error") in ("io.lockd.InvalidResource", "io.lockd.PermissionDenied")
        assert not missing.exists()


def _private_dir(shared: Path) -> Path:
    """A root 0700 directory: the user cannot enter it, whatever the modes inside."""
    priv = shared / "private"
    priv.mkdir(mode=0o700)
    return priv


def test_user_cannot_lock_a_file_behind_a_closed_directory(
    make_daemon: Callable[..., Daemon], shared: Path, user: User, clients: Any, procs: Any
) -> None:
    d = make_daemon(config=GROUP_CONFIG)
    f = make_file(_private_dir(shared) / "vm.img", 0o666)
    cat = subprocess.run([*user.setpriv(), "cat", str(f)], capture_output=True, timeout=30)
    assert cat.returncode != 0, "the user can open it after all"
    their = procs(user.setpriv())
    c = clients(user, d.socket)
    me = c.call("io.lockd.Register", {"pid": their.pid})["owner"]["uuid"]
    reply = c.call_raw("io.lockd.Acquire", {"resource": str(f), "owner": me, "mode": "shared"})
    held = probe(f)
    assert reply.get("error") == "io.lockd.PermissionDenied" and held == "free", (reply, held)


def test_user_learns_nothing_about_files_it_cannot_see(
    make_daemon: Callable[..., Daemon], shared: Path, user: User, clients: Any, procs: Any
) -> None:
    d = make_daemon(config=GROUP_CONFIG)
    priv = _private_dir(shared)
    make_file(priv / "secret.img", 0o600)
    their = procs(user.setpriv())
    c = clients(user, d.socket)
    me = c.call("io.lockd.Register", {"pid": their.pid})["owner"]["uuid"]
    answers = {
        name: c.call_raw("io.lockd.Acquire", {"resource": str(priv / name), "owner": me}).get(
            "error"
        )
        for name in ("secret.img", "no-such.img")
    }
    assert answers["secret.img"] == answers["no-such.img"], answers


_FLIP = r"""
import os, sys
link, mine, theirs = sys.argv[1:4]
tmp = link + ".tmp"
i = 0
while True:
    os.symlink(mine if i % 2 else theirs, tmp)
    os.rename(tmp, link)
    i += 1
"""

_RACE = r"""
import json, socket, sys, time
sock, pid, link, budget = sys.argv[1:5]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(sock)
def call(method, params):
    s.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
    buf = b""
    while not buf.endswith(b"\0"):
        buf += s.recv(65536)
    return json.loads(buf[:-1])
deadline = time.monotonic() + float(budget)
n = 0
while time.monotonic() < deadline:
    n += 1
    r = call("io.lockd.Acquire", {"resource": link, "pid": int(pid), "mode": "shared"})
    if "error" in r:
        continue
    print("granted", n, flush=True)
    if sys.stdin.readline().strip() == "stop":
        break
    call("io.lockd.Release", {"resource": link, "pid": int(pid)})
print("done", n, flush=True)
"""


@pytest.mark.scale
def test_user_cannot_race_a_symlink_onto_a_file_it_cannot_open(
    make_daemon: Callable[..., Daemon], shared: Path, user: User, procs: Any
) -> None:
    """The user flips its own symlink between its own file and root's 0600 file while asking
    for a shared lease through it: root's file must never end up locked (checked by probe
    after every grant), for up to 5 s of trying (20 s under make test-scale)."""
    d = make_daemon(config=GROUP_CONFIG)
    udir = shared / "user"
    udir.mkdir()
    os.chown(udir, user.uid, user.gid)
    mine = make_file(udir / "mine.img", 0o600, user.uid, user.gid)
    theirs = make_file(shared / "root-secret.img", 0o600)
    their = procs(user.setpriv())
    d.call("io.lockd.Register", {"pid": their.pid})  # root registers it for the user
    link = udir / "link"
    os.symlink(mine, link)
    os.lchown(link, user.uid, user.gid)
    flip = subprocess.Popen(
        [*user.setpriv(), PY, "-c", _FLIP, str(link), str(mine), str(theirs)], cwd="/"
    )
    race = subprocess.Popen(
        [*user.setpriv(), PY, "-c", _RACE, str(d.socket), str(their.pid), str(link),
         str(RACE_SECONDS)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    assert race.stdin is not None and race.stdout is not None
    stolen, grants, attempts = 0, 0, 0
    t0 = time.monotonic()
    try:
        for line in race.stdout:
            word, n = line.split()
            attempts = int(n)
            if word == "done":
                break
            grants += 1
            stolen += probe(theirs) != "free"
            race.stdin.write("stop\n" if stolen else "go\n")
            race.stdin.flush()
    finally:
        for p in (race, flip):
            p.kill()
            p.wait()
    print(
        f"\nsymlink race: {attempts} attempts in {time.monotonic() - t0:.1f} s, {grants} "
        f"grants, {stolen} of them on root's 0600 file"
    )
    assert stolen == 0


# --- files the daemon may be made to create -------------------------------------------------------


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_requests_create_files_only_as_named_lease_files(
    make_daemon: Callable[..., Daemon], shared: Path, user: User, clients: Any, procs: Any
) -> None:
    """Indirect lockspace: any resource string, however path-like, becomes DIR/sha256(it),
    a 0600 root regular file, and nothing else anywhere; a lease file replaced by a symlink or
    a FIFO (someone else writing in the lockspace's directory) is refused, without following
    or blocking. Direct lockspace: nothing is ever created."""
    leases_dir = shared / "leases"
    leases_dir.mkdir(mode=0o700)
    d = make_daemon(config=GROUP_CONFIG + f'[lockspaces]\nvols = "{leases_dir}"\n')
    udir = shared / "user"
    udir.mkdir()
    os.chown(udir, user.uid, user.gid)
    outside = make_file(shared / "outside.img", 0o644)
    before = tree(shared)
    their = procs(user.setpriv())
    c = clients(user, d.socket)
    me = c.call("io.lockd.Register", {"pid": their.pid})["owner"]["uuid"]

    names = [
        "../../../../tmp/lkd-escape", str(udir / "x.img"), "a/b/c", "/etc/passwd", "..", ".",
        "-rf", "vm\nname", "\u00e9\u00e8 \u2603", "x" * 4096, str(outside),
    ]  # fmt: skip
    for name in names:
        lease = c.call("io.lockd.Acquire", {"resource": name, "lockspace": "vols", "owner": me})[
            "lease"
        ]
        digest = hashlib.sha256(name.encode()).hexdigest()
        assert lease["path"] == str(leases_dir / digest)
        st = os.lstat(leases_dir / digest)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_size) == (0, 0)
        assert probe(leases_dir / digest) == "exclusive"
    made = {hashlib.sha256(n.encode()).hexdigest() for n in names}
    assert set(os.listdir(leases_dir)) == made
    assert tree(shared) == before | {f"leases/{h}" for h in made}
    assert not Path("/tmp/lkd-escape").exists()
    assert probe(outside) == "free" and outside.read_bytes() == b"\0" * 512

    # unknown or path-like lockspace names are refused, not resolved
    for ls in ("../leases", "vols/..", "VOLS", str(leases_dir), "vols\0"):
        reply = c.call_raw("io.lockd.Acquire", {"resource": "r", "lockspace": ls, "owner": me})
        assert reply.get("error") in (
            "io.lockd.InvalidResource",
            "org.varlink.service.InvalidParameter",
        ), (ls, reply)

    # someone swapped lease files for a symlink (to a root file) and a FIFO
    target = make_file(shared / "target.img", 0o600)
    os.symlink(target, leases_dir / hashlib.sha256(b"planted-link").hexdigest())
    os.mkfifo(leases_dir / hashlib.sha256(b"planted-fifo").hexdigest())
    for name in ("planted-link", "planted-fifo"):
        t0 = time.monotonic()
        reply = c.call_raw("io.lockd.Acquire", {"resource": name, "lockspace": "vols", "owner": me})
        assert time.monotonic() - t0 < 5
        assert reply.get("error") == "io.lockd.InvalidResource", (name, reply)
    assert probe(target) == "free" and target.read_bytes() == b"\0" * 512

    # the direct lockspace never creates
    for path in (udir / "new.img", shared / "new.img", leases_dir / "new"):
        reply = c.call_raw("io.lockd.Acquire", {"resource": str(path), "owner": me})
        assert reply.get("error") in ("io.lockd.InvalidResource", "io.lockd.PermissionDenied")
        assert not path.exists()
