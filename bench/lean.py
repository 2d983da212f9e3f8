"""``python -m bench.lean SOCKET STATE_DIR``: the lean prototype, a floor with lockd's work in it.

The do-nothing server (:mod:`bench.wire`) measures what a round trip costs in Python on
uvloop; lockd measures that plus its work plus its layers. This server does lockd's *work*
for a plain Acquire and Release of a direct resource, and nothing else, in as few Python
steps as it can: the same syscalls (``stat``, ``open``, ``fstat``, ``fcntl``, ``readlink``
on a grant through :mod:`lockd.locks.ofd`; ``fcntl``, ``close`` on a release), the same SQLite
journal (:class:`lockd.journaling.journal.Journal`, its schema, pragmas and statements: a lease
row, a
grant row and a packed history row per group commit, a release deleting the lease and
touching its grant; the grant rows by the journal's triggers, as for lockd), every grant
and release committed before its reply, one commit per loop iteration. It has no lease
state machine, no fd store names, no owner checks beyond a dictionary, no Watch,
failpoints, counters or logs, no error beyond "busy" and "not found".

What it is for: the ratio lockd ÷ lean is the cost of lockd's layers (codec, service, group
commit, state machine) around the work; lean ÷ do-nothing is the cost of the work itself.
It is the measured prototype of the design step "a request path that makes no objects per
request besides its rows" (issue 11): if lean reaches a target lockd misses, flattening the
path is the step that reaches it; if lean misses it too, no flattening of lockd's Python will.
It is a benchmark instrument, not a lock manager: it keeps nothing across a crash.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, cast

import orjson

from bench.wire import notify_ready
from lockd.journaling import journal as jn
from lockd.locks import ofd


class Lean:
    """The state of the prototype: owners, leases, the batch of the next commit."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.journal = jn.Journal(state_dir / "journal.sqlite")
        self.cur = self.journal.conn.cursor()
        self.owners: dict[str, dict[str, Any]] = {}
        # (owner uuid, resource) -> (fd, token, rkey, path)
        self.leases: dict[tuple[str, str], tuple[int, int, str, str]] = {}
        self.token = 0
        self.seq = self.journal.next_seq
        self.inserts: list[tuple[Any, ...]] = []
        self.deletes: list[tuple[Any, ...]] = []
        self.events: list[tuple[Any, ...]] = []
        # after the commit: (transport, reply, fd to unlock and close or -1)
        self.replies: list[tuple[asyncio.Transport, bytes, int]] = []
        self.scheduled = False
        self.loop = asyncio.get_running_loop()  # made inside the served loop

    def flush(self) -> None:
        self.scheduled = False
        cur = self.cur
        cur.execute("BEGIN")
        if self.inserts:
            cur.executemany(jn._INSERT_LEASE, self.inserts)
        if self.deletes:
            cur.executemany(jn._DELETE_LEASE, self.deletes)
        cur.execute(jn._INSERT_HISTORY, (self.seq, time.time(), orjson.dumps(self.events).decode()))
        cur.execute("COMMIT")
        self.seq += len(self.events)
        self.inserts, self.deletes, self.events = [], [], []
        replies, self.replies = self.replies, []
        for transport, reply, fd in replies:
            if fd >= 0:
                ofd.unlock_and_close(fd)
            transport.write(reply)

    def later(self, transport: asyncio.Transport, reply: dict[str, Any], fd: int = -1) -> None:
        self.replies.append((transport, orjson.dumps({"parameters": reply}) + b"\0", fd))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def acquire(self, t: asyncio.Transport, owner: str, resource: str) -> bytes | None:
        o = self.owners.get(owner)
        if o is None:
            return _error("io.lockd.NoSuchOwner")
        st = os.stat(resource)
        rkey = f"{st.st_dev}:{st.st_ino}"
        try:
            locked = ofd.lock_existing(resource, True, (st.st_dev, st.st_ino), None, st)
        except ofd.ResourceBusy:
            return _error("io.lockd.ResourceBusy")
        path = ofd.real_path(locked.fd) or resource
        self.token += 1
        token, now = self.token, time.time()
        self.leases[(owner, resource)] = (locked.fd, token, rkey, path)
        self.inserts.append(
            (token, owner, "", rkey, resource, path, "exclusive", "held", now, "lease-0")
        )
        self.events.append(("acquire", "", resource, owner, o["pid"], token, "exclusive", None))
        lease = {"lockspace": "", "resource": resource, "path": path, "mode": "exclusive"}
        lease |= {"owner": o, "token": token, "state": "held", "acquired_at": now}
        self.later(t, {"lease": lease | {"continuity": "new"}})
        return None

    def release(self, t: asyncio.Transport, owner: str, resource: str) -> bytes | None:
        lease = self.leases.pop((owner, resource), None)
        if lease is None:
            return _error("io.lockd.NotHeld")
        fd, token, rkey, _ = lease
        o = self.owners[owner]
        self.deletes.append((token,))
        self.events.append(("release", "", resource, owner, o["pid"], token, "exclusive", None))
        done = {"lockspace": "", "resource": resource, "mode": "exclusive", "owner": o}
        self.later(t, {"lease": done | {"token": token, "state": "released"}}, fd)
        return None

    def register(self, pid: int, name: str) -> str:
        o = {"uuid": str(uuid.uuid4()), "name": name, "pid": pid}
        self.owners[o["uuid"]] = o
        return o["uuid"]


def _error(name: str) -> bytes:
    return orjson.dumps({"error": name, "parameters": {}}) + b"\0"


class LeanConnection(asyncio.Protocol):
    def __init__(self, lean: Lean) -> None:
        self.lean = lean
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        t = self.transport
        assert t is not None
        while (end := buf.find(0)) >= 0:
            call = orjson.loads(buf[:end])
            buf = buf[end + 1 :]
            method, p = call["method"], call.get("parameters", {})
            if method == "io.lockd.Acquire":
                now = self.lean.acquire(t, p["owner"], p["resource"])
            elif method == "io.lockd.Release":
                now = self.lean.release(t, p["owner"], p["resource"])
            elif method == "io.lockd.Register":
                owner = self.lean.owners[self.lean.register(p["pid"], p.get("name", ""))]
                now = orjson.dumps({"parameters": {"owner": owner}}) + b"\0"
            else:
                now = _error("org.varlink.service.MethodNotFound")
            if now is not None:
                t.write(now)
        self.buf = buf


async def serve(path: str, state_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    lean = Lean(state_dir)
    server = await loop.create_unix_server(lambda: LeanConnection(lean), path, backlog=1024)
    notify_ready()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop  # type: ignore[import-not-found]

    uvloop.install()
    asyncio.run(serve(sys.argv[1], Path(sys.argv[2])))
