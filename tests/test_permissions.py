"""Non-root peers (DESIGN §8): sockets 0600 root by default; with ``socket_group`` a group
member may use the main socket, register only its own processes, lock only files it could
open itself, and touch only its own owners' leases. The admin socket stays root only.

The peer is a real process running as ``nobody`` (uid 65534) with the system's python3 and a
raw Varlink exchange (the venv's interpreter lives under /root, which nobody cannot enter).
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from e2e import Daemon, Owners, probe

NOBODY = 65534
PY = "/usr/bin/python3"

_PEER = r"""
import json, socket, sys
path = sys.argv[1]
out = []
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(path)
except OSError as exc:
    print(json.dumps({"connect_error": exc.errno}))
    sys.exit(0)
buf = b""
for line in sys.stdin:
    method, params = json.loads(line)
    s.sendall(json.dumps({"method": method, "parameters": params}).encode() + b"\0")
    while b"\0" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            print(json.dumps({"closed": True}))
            sys.exit(0)
        buf += chunk
    msg, _, buf = buf.partition(b"\0")
    print(msg.decode(), flush=True)
"""


def as_nobody(sock: Path, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    out = subprocess.run(
        [PY, "-c", _PEER, str(sock)],
        input="".join(json.dumps(c) + "\n" for c in calls),
        capture_output=True,
        text=True,
        timeout=60,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def error_of(reply: dict[str, Any]) -> str | None:
    return reply.get("error")


pytestmark = pytest.mark.skipif(
    not os.path.exists(PY) or os.geteuid() != 0, reason="needs root and /usr/bin/python3"
)


@pytest.fixture
def open_runtime(runtime_dir: Path) -> Path:
    # nobody must be able to reach the sockets' directory (the sockets' modes decide)
    os.chmod(runtime_dir, 0o711)
    try:
        pwd.getpwuid(NOBODY)
    except KeyError:
        pytest.skip("no user 65534")
    return runtime_dir


def test_default_sockets_are_root_only(make_daemon, open_runtime: Path) -> None:
    d = make_daemon()
    for sock in (d.socket, d.admin_socket):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        [reply] = as_nobody(sock, [("org.varlink.service.GetInfo", {})])
        assert reply == {"connect_error": 13}, reply  # EACCES


def test_socket_group_member(make_daemon, open_runtime: Path, owners: Owners) -> None:
    d: Daemon = make_daemon(config='socket_group = "nogroup"\n')
    st = os.stat(d.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == NOBODY
    assert stat.S_IMODE(os.stat(d.admin_socket).st_mode) == 0o600
    [reply] = as_nobody(d.admin_socket, [("io.lockd.Admin.Status", {})])
    assert reply == {"connect_error": 13}, reply

    # files: one nobody may open read-write, one only root may open
    fdir = open_runtime / "files"
    fdir.mkdir()
    os.chmod(fdir, 0o755)
    theirs, roots, shared_ro = fdir / "theirs.img", fdir / "root.img", fdir / "ro.img"
    for f, mode in ((theirs, 0o666), (roots, 0o600), (shared_ro, 0o644)):
        f.write_bytes(b"\0" * 512)
        os.chmod(f, mode)

    root_owner = d.register(owners.spawn().pid, name="root-vm")
    root_lease = d.acquire(fdir / "root.img", owner=root_owner["uuid"], shared=True)
    their_proc = owners.spawn(uid=NOBODY)

    replies = as_nobody(
        d.socket,
        [
            ("io.lockd.Register", {"pid": their_proc.pid, "name": "nobody-vm"}),
            ("io.lockd.Register", {"pid": root_owner["pid"], "name": "steal"}),
            ("io.lockd.Acquire", {"resource": str(theirs), "pid": their_proc.pid}),
            ("io.lockd.Acquire", {"resource": str(roots), "pid": their_proc.pid}),
            (
                "io.lockd.Acquire",
                {"resource": str(shared_ro), "pid": their_proc.pid, "mode": "shared"},
            ),
            ("io.lockd.Acquire", {"resource": str(shared_ro), "pid": their_proc.pid}),
            ("io.lockd.Release", {"resource": str(roots), "owner": root_owner["uuid"]}),
            ("io.lockd.ReleaseAll", {"owner": root_owner["uuid"]}),
            ("io.lockd.Inquire", {"owner": root_owner["uuid"]}),
            ("io.lockd.Acquire", {"resource": str(theirs), "owner": root_owner["uuid"]}),
        ],
    )
    reg, steal, acq, acq_root, acq_ro_shared, acq_ro_excl, rel, rel_all, inq, acq_as = replies
    assert "error" not in reg and reg["parameters"]["owner"]["uid"] == NOBODY, reg
    assert error_of(steal) == "io.lockd.PermissionDenied", steal
    assert "error" not in acq, acq
    assert error_of(acq_root) == "io.lockd.PermissionDenied", acq_root
    assert "error" not in acq_ro_shared, acq_ro_shared  # readable: a shared lease is fine
    # exclusive needs O_RDWR (DESIGN §2): not on a file nobody cannot write
    assert error_of(acq_ro_excl) in ("io.lockd.PermissionDenied", "io.lockd.ResourceBusy")
    for r in (rel, rel_all, inq, acq_as):
        assert error_of(r) in ("io.lockd.PermissionDenied", "io.lockd.NoSuchOwner"), r

    assert probe(theirs) == "exclusive"
    assert probe(shared_ro) == "shared"
    assert probe(roots) == "shared"  # root's lease, untouched
    assert [x["token"] for x in d.inquire(owner=root_owner["uuid"])["leases"]] == [
        root_lease["token"]
    ]
    # root (admin) sees the peer's owner with its uid
    owners_by_uid = {o["uid"] for o in d.owners()}
    assert owners_by_uid == {0, NOBODY}
    # and the peer's owner death is handled like any other
    their_proc.kill()
    their_proc.wait()
    deadline = time.monotonic() + 5
    while probe(theirs) != "free":
        assert time.monotonic() < deadline
        time.sleep(0.005)
