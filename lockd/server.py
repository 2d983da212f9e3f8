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
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, cast

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
from lockd.leases import WIRE_STATE, Lease, Owner, State
from lockd.process import Peer
from lockd.recovery import Report
from lockd.service import MODES, LockService
from lockd.varlink import Call, Decoder, Params, encode_error, encode_reply

log = logging.getLogger("lockd")

MAX_QUEUED_CALLS = 64


def interface_description(name: str) -> str:
    from importlib import resources

    path = resources.files("lockd") / "schema" / f"{name}.varlink"
    if not path.is_file():
        raise InterfaceNotFound(interface=name)
    return path.read_text()


class Pending(NamedTuple):
    """An answer that waits (for the journal, or a task): the reply is ``shape`` of the
    future's result."""

    future: asyncio.Future[Any]
    shape: Callable[[Any], dict[str, Any]]


# What a handler returns: the reply now, a reply to come, or a coroutine (run as a task)
Answer = dict[str, Any] | Pending | Coroutine[Any, Any, dict[str, Any]]
Handler = Callable[["Connection", Params], Answer]


def _as_is(reply: dict[str, Any]) -> dict[str, Any]:
    return reply


def _lease_reply(lease: Lease) -> dict[str, Any]:
    return {"lease": lease.wire()}


def _released_reply(released: dict[str, Any]) -> dict[str, Any]:
    return {"lease": released}


class Connection(asyncio.Protocol):
    def __init__(self, server: Server, admin: bool) -> None:
        self.server = server
        self.admin = admin
        self.handlers = server.handlers(admin)
        self.decoder = Decoder(server.config.max_message)
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = server.loop.create_future()
        self.peer = Peer(-1, -1, frozenset())
        # the call being answered (calls are answered one at a time, in order) and the
        # shape of its reply
        self._call: Call | None = None
        self._shape: Callable[[Any], dict[str, Any]] = _as_is
        # set while the peer does not read its replies (transport above its high-water mark)
        self._peer_behind = False
        self._paused = False  # whether we paused reading
        self._yielded = False  # a turn given to the other connections (see _answer_queued)

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
        self._answer_queued()
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
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._peer_behind = True
        self._flow()

    def resume_writing(self) -> None:
        self._peer_behind = False
        self._answer_queued()
        self._flow()

    # -- internals ------------------------------------------------------------------------
    def _flow(self) -> None:
        """Stop reading from a peer that is ahead of us, resume when it is not."""
        ahead = (
            self._peer_behind
            or len(self.queue) >= MAX_QUEUED_CALLS
            or self.decoder.pending > self.decoder.max_message  # calls not yet queued
        )
        if ahead is self._paused:  # the common case: reading, and nothing to pause for
            return
        t = self.transport
        if t is None or t.is_closing():
            return
        if ahead:
            t.pause_reading()
        else:
            t.resume_reading()
        self._paused = ahead

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

    def _answer_queued(self) -> None:
        """Answer the queued calls in order: each one that needs no wait at once; at the
        first that waits, stop until it is answered (:meth:`_answered` comes back here).
        Nothing more is answered while the peer does not read, nor to a closed peer; and
        after MAX_QUEUED_CALLS answered in one go, the other connections get their turn
        first (a peer pipelining thousands of calls that need no wait would otherwise hold
        the loop for as long as they take)."""
        queue = self.queue
        budget = MAX_QUEUED_CALLS
        while (
            self._call is None
            and not self._yielded
            and not self._peer_behind
            and not self.closed.done()
        ):
            if not queue:
                if not self.decoder.pending:
                    return
                self._decode(b"")  # calls left buffered in the decoder
                if not queue:
                    return
            if budget == 0:
                self._yielded = True
                self.server.loop.call_soon(self._resume)
                return
            budget -= 1
            self._start(queue.popleft())

    def _resume(self) -> None:
        self._yielded = False
        self._answer_queued()
        self._flow()

    def _start(self, msg: dict[str, Any]) -> None:
        try:
            call = Call.from_message(msg)
        except ProtocolError as exc:
            self._protocol_error(exc)
            return
        except LockdError as exc:
            self.send(encode_error(exc))
            return
        try:
            handler = self.handlers.get(call.method)
            if handler is None:
                raise MethodNotFound(method=call.method)
            if not call.more and call.method.endswith(".Watch"):
                raise InvalidParameter('Watch needs "more": true', parameter="more")
            answer = handler(self, Params(call.parameters))
        except Exception as exc:
            self._failed(call, exc)
            return
        if isinstance(answer, dict):
            self._reply(call, answer)
            return
        if isinstance(answer, Pending):
            fut, shape = answer
        else:  # a coroutine: it awaits more than the journal
            fut, shape = self.server.loop.create_task(answer), _as_is
        if fut.done():
            self._finish(call, shape, fut)
            return
        self._call, self._shape = call, shape
        # reply in the loop iteration of the commit when the answer waits for one
        if not self.server.service.commit.call_after_commit(fut, self._answered):
            fut.add_done_callback(self._answered)

    def _answered(self, fut: asyncio.Future[Any]) -> None:
        call, shape = self._call, self._shape
        assert call is not None
        self._call = None
        self._finish(call, shape, fut)
        self._answer_queued()
        self._flow()

    def _finish(
        self, call: Call, shape: Callable[[Any], dict[str, Any]], fut: asyncio.Future[Any]
    ) -> None:
        if fut.cancelled():  # only at shutdown
            return
        error = fut.exception()
        if error is not None:
            self._failed(call, error)
            return
        try:
            reply = shape(fut.result())
        except Exception as exc:
            self._failed(call, exc)
            return
        self._reply(call, reply)

    def _reply(self, call: Call, reply: dict[str, Any]) -> None:
        if not call.oneway:
            self.send(encode_reply(reply))

    def _failed(self, call: Call, exc: BaseException) -> None:
        if isinstance(exc, LockdError):
            if not call.oneway:
                self.send(encode_error(exc))
        elif isinstance(exc, MemoryError):
            os.abort()  # DESIGN §8: abort and let recovery bring the state back
        elif isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            # out of fds anywhere on the way
            self.send(
                encode_error(LimitExceeded("out of file descriptors", limit="open-files", value=0))
            )
        else:
            log.error("internal error in %s", call.method, exc_info=exc)
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

    # Acquire and Release: no coroutine, no task (the service's *_nowait paths); the reply
    # leaves when the journal commit that carries the request has returned.
    def acquire(self, conn: Connection, p: Params) -> Pending:
        # every parameter is checked before anything is looked up: a malformed call is an
        # InvalidParameter whatever else is wrong with it
        lockspace, resource = p.opt_string("lockspace", 64), p.string("resource")
        mode, token = p.string("mode", "exclusive", 16), p.opt_int("token")
        if mode not in MODES:
            raise InvalidParameter("mode must be exclusive or shared", parameter="mode")
        owner = self._owner(conn, p)
        return Pending(
            self.service.acquire_nowait(owner, lockspace, resource, mode, token, conn.peer),
            _lease_reply,
        )

    def release(self, conn: Connection, p: Params) -> Pending:
        lockspace, resource = p.opt_string("lockspace", 64), p.string("resource")
        owner = self._owner(conn, p)
        return Pending(self.service.release_nowait(owner, lockspace, resource), _released_reply)

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
                    # the loss's own time and reason (run time or recovery, this daemon's
                    # or an earlier one's): lockd/service.py, lost_event
                    event = self.service.lost_event(lease)
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
