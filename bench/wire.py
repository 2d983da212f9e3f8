"""The benchmark's own Varlink: a minimal blocking client and a do-nothing server.

Both sides of the round-trip floor live here, and the *same* client class drives lockd's hot
loop, so the client's own cost is identical in the floor and in the measurement: the ratio
lockd / floor is then the daemon's cost only. The client sends pre-encoded calls (one
``sendall``), reads until the NUL and decodes the reply with orjson, exactly like the floor.

The floor server (``python -m bench.wire SOCKET [uvloop]``; the benchmark runs it on uvloop,
lockd's event loop) is what an asyncio-protocol Varlink server costs when it does nothing:
protocol-level I/O, split on NUL, ``orjson.loads`` the call, ``orjson.dumps`` a reply of the
same shape and size as lockd's, write. It announces readiness like lockd does (``READY=1``
to ``$NOTIFY_SOCKET``) so its spawn-to-ready time is the interpreter floor of a
restart.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any, cast

import orjson

RECV = 65536


class VarlinkError(Exception):
    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__(f"{reply.get('error')}: {reply.get('parameters')}")
        self.name = str(reply.get("error"))
        self.reply = reply


def encode(method: str, parameters: dict[str, Any] | None = None) -> bytes:
    msg: dict[str, Any] = {"method": method}
    if parameters:
        msg["parameters"] = parameters
    return orjson.dumps(msg) + b"\0"


class Raw:
    """One blocking Varlink connection; one call at a time."""

    __slots__ = ("sock", "_buf")

    def __init__(self, path: str, timeout: float | None = 60.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def roundtrip(self, data: bytes) -> dict[str, Any]:
        """Send one encoded call, return the decoded reply (errors are returned, not raised)."""
        self.sock.sendall(data)
        buf = self._buf
        while True:
            end = buf.find(b"\0")
            if end >= 0:
                self._buf = buf[end + 1 :]
                reply: dict[str, Any] = orjson.loads(buf[:end])
                return reply
            chunk = self.sock.recv(RECV)
            if not chunk:
                raise ConnectionResetError("server closed the connection")
            buf += chunk

    def call(self, method: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.roundtrip(encode(method, parameters))
        if "error" in reply:
            raise VarlinkError(reply)
        params: dict[str, Any] = reply.get("parameters", {})
        return params


class PairDriver:
    """Pre-encoded io.lockd.Acquire + io.lockd.Release of one resource for one owner."""

    __slots__ = ("conn", "acq", "rel")

    def __init__(self, conn: Raw, owner: str, resource: str) -> None:
        self.conn = conn
        self.acq = encode("io.lockd.Acquire", {"owner": owner, "resource": resource})
        self.rel = encode("io.lockd.Release", {"owner": owner, "resource": resource})

    def pair(self) -> None:
        rt = self.conn.roundtrip
        if "error" in (r := rt(self.acq)) or "error" in (r := rt(self.rel)):
            raise VarlinkError(r)

    def acquire(self) -> None:
        if "error" in (r := self.conn.roundtrip(self.acq)):
            raise VarlinkError(r)

    def release(self) -> None:
        if "error" in (r := self.conn.roundtrip(self.rel)):
            raise VarlinkError(r)

    def close(self) -> None:
        self.conn.close()


# -- the do-nothing server ------------------------------------------------------------------

# Replies shaped (and sized, within a few bytes) like lockd's Acquire and Release replies.
_OWNER = {"uuid": "00000000-0000-4000-8000-000000000000", "name": "pid-123456", "pid": 123456}
_LEASE = {
    "lockspace": "",
    "resource": "/tmp/lkbench.xxxxxxxx/files/disk00000.img",
    "path": "/tmp/lkbench.xxxxxxxx/files/disk00000.img",
    "mode": "exclusive",
    "owner": _OWNER,
    "token": 1234567,
    "state": "held",
    "acquired_at": 1700000000.123456,
    "continuity": "new",
}
_RELEASED = {k: _LEASE[k] for k in ("lockspace", "resource", "mode", "owner", "token")}
REPLIES: dict[str, dict[str, Any]] = {
    "io.lockd.Acquire": {"lease": _LEASE},
    "io.lockd.Release": {"lease": {**_RELEASED, "state": "released"}},
}


class _Nothing(asyncio.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # an asyncio.Transport, or uvloop's equivalent (not a subclass of it)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(0)) >= 0:
            call = orjson.loads(bytes(self.buf[:end]))
            del self.buf[: end + 1]
            params = REPLIES.get(call.get("method"), {})
            assert self.transport is not None
            self.transport.write(orjson.dumps({"parameters": params}) + b"\0")


def notify_ready() -> None:
    path = os.environ.get("NOTIFY_SOCKET")
    if path:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.send(b"READY=1")


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(_Nothing, path, backlog=1024)
    notify_ready()
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "uvloop":
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    asyncio.run(serve(sys.argv[1]))
