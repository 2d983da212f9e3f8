"""The Varlink server: connections, peer credentials, dispatch, the admin interface.

Theory of operation: each accepted connection is a
:class:`~lockd.frontends.connection.CallConnection`
(an :class:`asyncio.Protocol`; what every front end shares: calls answered in order from
``data_received``, the reply of a journaled request sent inside its commit, flow control)
whose calls come out of the sans-IO :class:`~lockd.wire.varlink.Decoder`. Replies leave in call
order as Varlink requires, while calls of different connections interleave (and share group
commits). A handler answers with the reply (a dict), None (Acquire and Release waiting for
their commit: the service calls the connection's ``answered`` after it, no future, no
task), or a coroutine (run as a task: it awaits more than the journal).

Hostile or broken peers (DESIGN §8):
- a framing error (not JSON, too big, too deep, no method) gets one ``io.lockd.ProtocolError``
  reply and the connection is closed: nothing after a framing error can be trusted;
- a bad parameter gets a named error and the connection stays usable;
- a peer that sends faster than it reads is paused (``pause_reading``) once its queue or our
  write buffer is full, so it cannot grow our memory or delay other connections
  (lockd.frontends.connection);
- a connection that closes mid-request does not cancel the request: the acquire or release
  completes and is journaled, only the reply is dropped. That is what makes a client's retry
  after reconnecting safe (it gets the same answer);
- every connection is tagged with its peer's ``SO_PEERCRED`` at accept; the admin socket
  refuses any peer that is not root, and on the main socket a non-root peer only ever touches
  owners of its own uid.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from lockd import __version__
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
from lockd.frontends.connection import CallConnection, Listener
from lockd.locks.leases import WIRE_STATE, Lease, Owner, State
from lockd.service import metrics
from lockd.service.recovery import Report
from lockd.service.service import MODES, LockService
from lockd.wire.varlink import Decoder, Params, call_fields, encode_error, encode_reply

log = logging.getLogger("lockd")


def interface_description(name: str) -> str:
    from importlib import resources

    path = resources.files("lockd") / "schema" / f"{name}.varlink"
    if not path.is_file():
        raise InterfaceNotFound(interface=name)
    return path.read_text()


# What a handler returns: the reply now, None (the reply comes to Connection.answered, shaped
# by Connection.shape), or a coroutine (run as a task)
Answer = dict[str, Any] | None | Coroutine[Any, Any, dict[str, Any]]
Handler = Callable[["Connection", Params], Answer]


def _as_is(reply: dict[str, Any]) -> dict[str, Any]:
    return reply


def _lease_reply(lease: Lease) -> dict[str, Any]:
    return {"lease": lease.wire()}


def _released_reply(released: dict[str, Any]) -> dict[str, Any]:
    return {"lease": released}


class Connection(CallConnection[dict[str, Any]]):
    """A Varlink connection (lockd.frontends.connection: calls answered in order, flow control)."""

    def __init__(self, server: Server, admin: bool) -> None:
        decoder = Decoder(server.config.max_message)
        super().__init__(server.loop, decoder, decoder.max_message, server.connections)
        self.server = server
        self.admin = admin
        self.handlers = server.handlers(admin)
        # the call being answered (its method, whether it is oneway) and the shape of its
        # reply (set by a handler whose answer comes later)
        self._method = ""
        self._oneway = False
        self.shape: Callable[[Any], dict[str, Any]] = _as_is

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.server.count_connections() > self.server.config.max_connections:
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

    def framing_error(self, exc: ProtocolError) -> None:
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

    def start(self, msg: dict[str, Any]) -> bool:
        try:
            method, params, more, self._oneway = call_fields(msg)
        except ProtocolError as exc:
            self.framing_error(exc)
            return False
        except LockdError as exc:
            self.send(encode_error(exc))
            return False
        self._method = method
        try:
            handler = self.handlers.get(method)
            if handler is None:
                raise MethodNotFound(method=method)
            if not more and method.endswith(".Watch"):
                raise InvalidParameter('Watch needs "more": true', parameter="more")
            answer = handler(self, Params(params))
        except Exception as exc:
            self._failed(exc)
            return False
        if answer is None:  # Acquire, Release: the service calls self.answered
            return True
        if isinstance(answer, dict):
            if not self._oneway:
                self.send(encode_reply(answer))
            return False
        self.shape = _as_is  # a coroutine: it awaits more than the journal
        return self.run(answer)

    def finish(self, answer: Any, failure: BaseException | None) -> None:
        if failure is None:
            try:
                reply = self.shape(answer)
            except Exception as exc:
                failure = exc
            else:
                if not self._oneway:
                    self.send(encode_reply(reply))
                return
        self._failed(failure)

    def _failed(self, exc: BaseException) -> None:
        if isinstance(exc, LockdError):
            if not self._oneway:
                self.send(encode_error(exc))
        elif isinstance(exc, MemoryError):
            os.abort()  # DESIGN §8: abort and let recovery bring the state back
        elif isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            # out of fds anywhere on the way
            self.send(
                encode_error(LimitExceeded("out of file descriptors", limit="open-files", value=0))
            )
        else:
            log.error("internal error in %s", self._method, exc_info=exc)
            self.send(encode_error(LockdError("internal error", method=self._method)))


class Server(Listener):
    """The Varlink listeners (main and admin socket) and their calls' handlers."""

    def __init__(
        self,
        config: Config,
        service: LockService,
        report: Report,
        request_reexec: Callable[[], None],
    ) -> None:
        super().__init__(service.loop)
        self.config = config
        self.request_reexec = request_reexec
        self.service = service
        self.report = report
        self.started_at = time.time()
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
            await self.listen(sock, functools.partial(Connection, self, admin))

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
    def acquire(self, conn: Connection, p: Params) -> dict[str, Any] | None:
        # every parameter is checked before anything is looked up: a malformed call is an
        # InvalidParameter whatever else is wrong with it
        lockspace, resource = p.opt_string("lockspace", 64), p.string("resource")
        mode, token = p.string("mode", "exclusive", 16), p.opt_int("token")
        if mode not in MODES:
            raise InvalidParameter("mode must be exclusive or shared", parameter="mode")
        owner = self._owner(conn, p)
        conn.shape = _lease_reply
        lease = self.service.acquire_nowait(
            owner, lockspace, resource, mode, token, conn.peer, conn.answered
        )
        return None if lease is None else _lease_reply(lease)

    def release(self, conn: Connection, p: Params) -> dict[str, Any] | None:
        lockspace, resource = p.opt_string("lockspace", 64), p.string("resource")
        owner = self._owner(conn, p)
        conn.shape = _released_reply
        released = self.service.release_nowait(owner, lockspace, resource, conn.answered)
        return None if released is None else _released_reply(released)

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
                    # or an earlier one's): lockd/service/service.py, lost_event
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
                "connections": self.count_connections(),
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
                self.service, self.report, self.started_at, self.count_connections()
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
            f"{self.count_connections()} connections; last recovery: {self.report.summary()}"
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
