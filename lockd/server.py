"""The Varlink server: connections, peer credentials, dispatch, the admin interface.

Theory of operation: each accepted connection is an :class:`asyncio.Protocol` (protocol-level
I/O, no stream wrappers). Bytes go through the sans-IO :class:`~lockd.varlink.Decoder`; each
complete call is queued and the connection's calls run one after another, so replies leave
in call order as Varlink requires, while calls of different connections interleave (and share
group commits).

Hostile or broken peers (DESIGN §8):
- a framing error (not JSON, too big, too deep, no method) gets one ``io.lockd.ProtocolError``
  reply and the connection is closed: nothing after a framing error can be trusted;
- a bad parameter gets a named error and the connection stays usable;
- a peer that sends faster than it reads is paused (``pause_reading``) once its queue or our
  write buffer is full, so it cannot grow our memory or delay other connections;
- a connection that closes mid-request does not cancel the request: the acquire or release
  completes and is journaled, only the reply is dropped. That is what makes a client's retry
  after reconnecting safe (it gets the same answer);
- every connection is tagged with its peer's ``SO_PEERCRED`` at accept; the admin socket
  refuses any peer that is not root, and on the main socket a non-root peer only ever touches
  owners of its own uid.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from lockd import __version__, metrics
from lockd.config import Config
from lockd.errors import (
    InterfaceNotFound,
    InvalidParameter,
    LimitExceeded,
    LockdError,
    MethodNotFound,
    PermissionDenied,
    ProtocolError,
)
from lockd.leases import WIRE_STATE, Owner, State
from lockd.process import Peer
from lockd.recovery import Report
from lockd.service import MODES, LockService
from lockd.varlink import Call, Decoder, Params, encode_error, encode_reply

log = logging.getLogger("lockd")

Handler = Callable[["Connection", Params], Awaitable[dict[str, Any]]]
MAX_QUEUED_CALLS = 64


def interface_description(name: str) -> str:
    from importlib import resources

    path = resources.files("lockd") / "schema" / f"{name}.varlink"
    if not path.is_file():
        raise InterfaceNotFound(interface=name)
    return path.read_text()


class Connection(asyncio.Protocol):
    def __init__(self, server: Server, admin: bool) -> None:
        self.server = server
        self.admin = admin
        self.decoder = Decoder(server.config.max_message)
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.worker: asyncio.Task[None] | None = None
        self.closed: asyncio.Future[None] = server.loop.create_future()
        self.peer = Peer(-1, -1, frozenset())
        # set while the peer does not read its replies (transport above its high-water mark)
        self._writable: asyncio.Future[None] | None = None

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # an asyncio.Transport (or uvloop's equivalent, which is not a subclass)
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        self.peer = Peer.of_socket(sock)
        if len(self.server.connections) > self.server.config.max_connections:
            self._fail(LockdError("too many connections"), "connections")
        elif self.admin and self.peer.uid != 0:
            self._fail(
                PermissionDenied("the admin interface is root only", reason="not root"), "admin"
            )

    def _fail(self, err: LockdError, why: str) -> None:
        assert self.transport is not None
        log.warning(
            "refused connection of pid %d uid %d: %s",
            self.peer.pid,
            self.peer.uid,
            why,
            extra={"LOCKD_EVENT": "refused"},
        )
        self.transport.write(encode_error(err))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._decode(data)
        if self.worker is None and self.queue:
            self.worker = self.server.loop.create_task(self._work())
        self._flow()

    def _decode(self, data: bytes) -> None:
        # Decode only up to the queue's bound: a single read may carry thousands of small
        # calls, and their replies must not pile up in memory for a peer that does not read.
        room = max(0, MAX_QUEUED_CALLS - len(self.queue))
        try:
            self.queue.extend(self.decoder.feed(data, limit=room))
        except ProtocolError as exc:
            self._protocol_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.queue.clear()
        self._wake_writer()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self.server.loop.create_future()
        self._flow()

    def resume_writing(self) -> None:
        self._wake_writer()
        self._flow()

    def _wake_writer(self) -> None:
        fut, self._writable = self._writable, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    # -- internals ------------------------------------------------------------------------
    def _flow(self) -> None:
        """Stop reading from a peer that is ahead of us, resume when it is not."""
        t = self.transport
        if t is None or t.is_closing():
            return
        if (
            self._writable is not None
            or len(self.queue) >= MAX_QUEUED_CALLS
            or self.decoder.pending > self.server.config.max_message  # calls not yet queued
        ):
            if t.is_reading():
                t.pause_reading()
        elif not t.is_reading():
            t.resume_reading()

    def _protocol_error(self, exc: ProtocolError) -> None:
        log.warning(
            "protocol error from pid %d: %s",
            self.peer.pid,
            exc,
            extra={"LOCKD_EVENT": "protocol-error"},
        )
        self.queue.clear()
        if self.transport is not None:
            self.transport.write(encode_error(exc))
            self.transport.close()

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def _work(self) -> None:
        try:
            while not self.closed.done():  # calls still queued from a closed peer are dropped
                if not self.queue:
                    if self.decoder.pending:
                        self._decode(b"")  # calls left buffered in the decoder
                    if not self.queue:
                        break
                    # a handler that never awaits never yields: let other peers in between
                    # batches of pipelined calls
                    await asyncio.sleep(0)
                if self._writable is not None:
                    # the peer is not reading: answer nothing more until it does
                    await self._writable
                    continue
                msg = self.queue.popleft()
                if self.transport is not None and not self.transport.is_reading():
                    self._flow()  # paused: the queue may have room again
                await self._handle(msg)
        finally:
            self.worker = None

    async def _handle(self, msg: dict[str, Any]) -> None:
        try:
            call = Call.from_message(msg)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        except LockdError as exc:
            self.send(encode_error(exc))
            return
        try:
            handler = self.server.handlers(self.admin).get(call.method)
            if handler is None:
                raise MethodNotFound(method=call.method)
            if call.method.endswith(".Watch") and not call.more:
                raise InvalidParameter('Watch needs "more": true', parameter="more")
            reply = await handler(self, Params(call.parameters))
            if not call.oneway:
                self.send(encode_reply(reply))
        except LockdError as exc:
            if not call.oneway:
                self.send(encode_error(exc))
        except MemoryError:
            os.abort()  # DESIGN §8: abort and let recovery bring the state back
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # out of fds anywhere on the way
                self.send(
                    encode_error(
                        LimitExceeded("out of file descriptors", limit="open-files", value=0)
                    )
                )
                return
            log.exception("internal error in %s", call.method)
            self.send(encode_error(LockdError("internal error", method=call.method)))
        except Exception:
            log.exception("internal error in %s", call.method)
            self.send(encode_error(LockdError("internal error", method=call.method)))


class Server:
    def __init__(
        self,
        config: Config,
        service: LockService,
        report: Report,
        request_reexec: Callable[[], None],
    ) -> None:
        self.config = config
        self.request_reexec = request_reexec
        self.service = service
        self.report = report
        self.loop = service.loop
        self.started_at = time.time()
        self.connections: set[Connection] = set()
        self.servers: list[asyncio.AbstractServer] = []
        self._main: dict[str, Handler] = {
            "io.lockd.Register": self.register,
            "io.lockd.Acquire": self.acquire,
            "io.lockd.Release": self.release,
            "io.lockd.ReleaseAll": self.release_all,
            "io.lockd.Inquire": self.inquire,
            "io.lockd.Unregister": self.unregister,
            "io.lockd.Watch": self.watch,
            **self._service_methods(),
        }
        self._admin: dict[str, Handler] = {
            "io.lockd.Admin.Status": self.status,
            "io.lockd.Admin.ListLeases": self.list_leases,
            "io.lockd.Admin.ListOwners": self.list_owners,
            "io.lockd.Admin.History": self.history,
            "io.lockd.Admin.ForceRelease": self.force_release,
            "io.lockd.Admin.Reexec": self.reexec,
            "io.lockd.Admin.Metrics": self.metrics,
            "io.lockd.Admin.ListDescriptors": self.list_descriptors,
            **self._service_methods(),
        }

    def handlers(self, admin: bool) -> dict[str, Handler]:
        return self._admin if admin else self._main

    async def start(self, main_sock: socket.socket, admin_sock: socket.socket) -> None:
        for sock, admin in ((main_sock, False), (admin_sock, True)):
            srv = await self.loop.create_unix_server(
                functools.partial(Connection, self, admin), sock=sock, backlog=1024
            )
            self.servers.append(srv)

    async def close(self) -> None:
        for srv in self.servers:
            srv.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()

    def _service_methods(self) -> dict[str, Handler]:
        return {
            "org.varlink.service.GetInfo": self.get_info,
            "org.varlink.service.GetInterfaceDescription": self.get_interface_description,
        }

    # -- org.varlink.service ----------------------------------------------------------------
    async def get_info(self, conn: Connection, p: Params) -> dict[str, Any]:
        interfaces = ["org.varlink.service", "io.lockd.Admin" if conn.admin else "io.lockd"]
        return {
            "vendor": "lockd",
            "product": "lockd",
            "version": __version__,
            # no public home page exists: Varlink's url is a plain string, empty is honest
            "url": "",
            "interfaces": interfaces,
        }

    async def get_interface_description(self, conn: Connection, p: Params) -> dict[str, Any]:
        name = p.string("interface", max_len=255)
        allowed = "io.lockd.Admin" if conn.admin else "io.lockd"
        if name == "org.varlink.service":
            return {"description": _VARLINK_SERVICE}
        if name != allowed:
            raise InterfaceNotFound(interface=name)
        return {"description": interface_description(name)}

    # -- io.lockd -----------------------------------------------------------------------------
    def _owner(self, conn: Connection, p: Params) -> Owner:
        return self.service.find_owner(
            p.opt_string("owner", 64), p.opt_int("pid", 1, 2**22), conn.peer
        )

    async def register(self, conn: Connection, p: Params) -> dict[str, Any]:
        owner = await self.service.register(
            p.integer("pid", 1, 2**22),
            p.opt_string("uuid", 64),
            p.opt_string("name", 255),
            p.opt_string("fence", 16),
            conn.peer,
        )
        return {"owner": owner.wire()}

    async def acquire(self, conn: Connection, p: Params) -> dict[str, Any]:
        # every parameter is checked before anything is looked up: a malformed call is an
        # InvalidParameter whatever else is wrong with it
        lockspace, resource = p.opt_string("lockspace", 64), p.string("resource")
        mode, token = p.string("mode", "exclusive", 16), p.opt_int("token")
        if mode not in MODES:
            raise InvalidParameter("mode must be exclusive or shared", parameter="mode")
        owner = self._owner(conn, p)
        lease = await self.service.acquire(owner, lockspace, resource, mode, token, conn.peer)
        return {"lease": lease.wire()}

    async def release(self, conn: Connection, p: Params) -> dict[str, Any]:
        lockspace, resource = p.opt_string("lockspace", 64), p.string("resource")
        owner = self._owner(conn, p)
        released = await self.service.release(owner, lockspace, resource)
        return {"lease": released}

    async def release_all(self, conn: Connection, p: Params) -> dict[str, Any]:
        return {"leases": await self.service.release_all(self._owner(conn, p))}

    async def inquire(self, conn: Connection, p: Params) -> dict[str, Any]:
        owner = self._owner(conn, p)
        return {"owner": owner.wire(), "leases": [lease.wire() for lease in owner.leases.values()]}

    async def unregister(self, conn: Connection, p: Params) -> dict[str, Any]:
        await self.service.unregister(self._owner(conn, p))
        return {}

    async def watch(self, conn: Connection, p: Params) -> dict[str, Any]:
        owner = self._owner(conn, p)
        q = self.service.subscribe(owner)
        try:
            conn.send(
                encode_reply(
                    {
                        "event": {
                            "event": "watching",
                            "owner": owner.uuid,
                            "pid": owner.pid,
                            "at": time.time(),
                        }
                    },
                    True,
                )
            )
            for lease in owner.leases.values():
                if lease.state == State.LOST:
                    event = lease.as_event("lost", "taken while lockd was down", time.time())
                    conn.send(encode_reply({"event": event}, True))
            while True:
                get: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(q.get())
                waiting: set[asyncio.Future[Any]] = {get, conn.closed}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return {}
                event = get.result()
                if event["event"] == "owner-dead":
                    return {"event": event}
                conn.send(encode_reply({"event": event}, True))
        finally:
            self.service.unsubscribe(owner, q)

    # -- io.lockd.Admin -------------------------------------------------------------------------
    async def status(self, conn: Connection, p: Params) -> dict[str, Any]:
        table = self.service.table
        return {
            "status": {
                "pid": os.getpid(),
                "version": __version__,
                "boot_id": self.service.journal.get_meta("boot_id") or "",
                "state_dir": str(self.config.state_dir),
                "journal": str(self.config.journal_path),
                "started_at": self.started_at,
                "leases": table.count,
                "lost": table.lost(),
                "owners": len(table.owners),
                "connections": len(self.connections),
                "next_token": self.service.commit.last_token + 1,
                "recovery": self.report.wire(),
            }
        }

    async def list_leases(self, conn: Connection, p: Params) -> dict[str, Any]:
        lockspace = p.opt_string("lockspace", 64)
        owner = p.opt_string("owner", 64)
        ls = None if lockspace is None else self.service.lockspaces.canonical(lockspace)
        leases = [
            lease.wire()
            for lease in self.service.table.leases()
            if (ls is None or lease.lockspace == ls)
            and (owner is None or lease.owner.uuid == owner)
        ]
        leases.sort(key=lambda w: w["token"])
        return {"leases": leases}

    async def list_owners(self, conn: Connection, p: Params) -> dict[str, Any]:
        owners = sorted(self.service.table.owners.values(), key=lambda o: o.registered_at)
        return {"owners": [o.wire() for o in owners]}

    async def history(self, conn: Connection, p: Params) -> dict[str, Any]:
        limit = p.opt_int("limit", 1, 100_000) or 50
        return {
            "events": self.service.journal.history(
                limit, p.opt_string("owner", 64), p.opt_string("resource")
            )
        }

    async def reexec(self, conn: Connection, p: Params) -> dict[str, Any]:
        # after this reply is written: transport.write sends at once when the buffer is empty
        self.loop.call_soon(self.request_reexec)
        return {}

    async def metrics(self, conn: Connection, p: Params) -> dict[str, Any]:
        return {
            "metrics": metrics.snapshot(
                self.service, self.report, self.started_at, len(self.connections)
            )
        }

    async def list_descriptors(self, conn: Connection, p: Params) -> dict[str, Any]:
        # what `lockctl verify` compares with the kernel: which fd of this process carries
        # which lease, and under which name it is parked in systemd's fd store
        return {
            "pid": os.getpid(),
            "fd_store": self.service.fdstore.enabled,
            "descriptors": sorted(
                (
                    {
                        "token": lease.token,
                        "lockspace": lease.lockspace,
                        "resource": lease.resource,
                        "path": lease.path,
                        "mode": lease.mode,
                        "state": WIRE_STATE[lease.state],
                        "fd": lease.fd,
                        "fdname": lease.fdname,
                    }
                    for lease in self.service.table.leases()
                ),
                key=lambda d: d["token"],
            ),
        }

    def status_line(self) -> str:
        table = self.service.table
        return (
            f"{table.count} leases ({table.lost()} lost), {len(table.owners)} owners, "
            f"{len(self.connections)} connections; last recovery: {self.report.summary()}"
        )

    async def force_release(self, conn: Connection, p: Params) -> dict[str, Any]:
        return {
            "leases": await self.service.force_release(
                p.opt_string("lockspace", 64), p.string("resource"), p.opt_string("owner", 64)
            )
        }


_VARLINK_SERVICE = """\
interface org.varlink.service
method GetInfo() -> (vendor: string, product: string, version: string, url: string,
  interfaces: []string)
method GetInterfaceDescription(interface: string) -> (description: string)
error InterfaceNotFound (interface: string)
error MethodNotFound (method: string)
error MethodNotImplemented (method: string)
error InvalidParameter (parameter: string)
"""
