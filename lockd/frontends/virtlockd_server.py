"""virtlockd's protocol on lockd's one lock service: the libvirt drop-in (DESIGN §10).

Theory of operation: libvirtd's ``lockd`` lock driver talks to ``/run/libvirt/virtlockd-sock``.
Each accepted connection is a :class:`VirtlockdConnection`, a
:class:`~lockd.frontends.connection.CallConnection` as the Varlink server's are: bytes go through
the
sans-IO :mod:`lockd.wire.virtlockd_rpc` decoder, and the connection's calls are answered one after
another, from ``data_received``, each before the next starts; ACQUIRE and RELEASE take the
service's fast path (no task; the reply leaves inside the commit that journals them).
The procedures map onto :class:`~lockd.service.service.LockService`:

- **REGISTER** binds the connection to an owner {uuid = the domain's uuid, name, domain id,
  pid = the QEMU process}: ``register`` of the service, journaled like any owner. libvirtd
  registers the QEMU pid from its own short connections too, so **leases belong to the
  process, never to the connection**: a connection closing releases nothing, the owner's
  death does (the service's pidfd, or recovery if lockd was down). A REGISTER repeated on a
  connection rebinds it, as in virtlockd.
- **RESTRICT** makes the connection unable to change anything (libvirtd restricts the one
  QEMU inherits): every later call is refused.
- **ACQUIRE_RESOURCE** / **RELEASE_RESOURCE** in lockspace ``""`` (direct: the name is the
  disk path) or in a directory lockspace (the name is a lease file's name in it). SHARED is
  ``F_RDLCK``; AUTOCREATE lets a missing lease file be created (0600), as virtlockd does.
  A RELEASE of what the owner does not hold answers as virtlockd does ("is not locked" if
  nobody holds it, "does not hold the resource lock" if others do), not with the service's
  idempotent repeat: libvirtd's pause sends two RELEASEs and expects that answer.
- **CREATE_LOCKSPACE** {path} and **NEW** add a directory lockspace (the service's *named*
  kind, lockspace.py), named by its directory and journaled, because libvirtd sends it only
  when libvirtd itself starts: after a restart of lockd, ACQUIREs in it must still work.
- **CREATE_RESOURCE** / **DELETE_RESOURCE** touch or unlink a lease file in a directory
  lockspace, refused while it is held, as virtlockd does.

Errors carry virtlockd's codes, domains and texts (what ``virsh`` shows), in virtlockd's
order of checks: flags, restricted, registered, lockspace, then the operation. Where lockd
refuses what virtlockd allows, the reply is a libvirt error of the nearest code with lockd's
reason (the README lists each difference and why).

Decisions:
- Peer credentials (``SO_PEERCRED``) as on the main socket: the socket is 0600 root, and a
  non-root peer (if an administrator opens it) may register only its own processes and lock
  only files it could open itself; creating lockspaces and lease files is root's only.
- lockd never creates or deletes files in the direct lockspace (those are disk images):
  CREATE_RESOURCE / DELETE_RESOURCE there are refused, and AUTOCREATE creates nothing there.
- Limits and hostile peers as for Varlink (lockd.frontends.connection): frames are bounded
  (virtlockd_rpc.MAX_FRAME), a framing error closes the connection (virtlockd does the
  same), a peer that sends faster than it reads is paused, and a connection that closes
  mid-call does not cancel the call.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import socket
from typing import Any

from lockd.config import Config
from lockd.errors import (
    InvalidParameter,
    InvalidResource,
    JournalError,
    LeaseLost,
    LimitExceeded,
    LockdError,
    NoSuchOwner,
    NotHeld,
    PermissionDenied,
    ProtocolError,
    ResourceBusy,
)
from lockd.frontends.connection import CallConnection, Listener
from lockd.locks import ofd
from lockd.locks.leases import Lease, Owner
from lockd.locks.lockspace import DIRECT, check_path
from lockd.service.service import LockService
from lockd.wire.virtlockd_rpc import (
    ACQUIRE_AUTOCREATE,
    ACQUIRE_SHARED,
    ERR_INTERNAL_ERROR,
    ERR_INVALID_ARG,
    ERR_OPERATION_DENIED,
    ERR_OPERATION_FAILED,
    ERR_OPERATION_INVALID,
    ERR_OPERATION_UNSUPPORTED,
    ERR_RESOURCE_BUSY,
    ERR_SYSTEM_ERROR,
    FROM_LOCKSPACE,
    FROM_RPC,
    Call,
    CreateLockspaceArgs,
    Decoder,
    Event,
    Header,
    Proc,
    RegisterArgs,
    Rejected,
    ResourceArgs,
    RestrictArgs,
    RpcError,
    encode_error,
    encode_ok,
)

log = logging.getLogger("lockd")

# the errno behind each reason ofd gives for a failed open (virtlockd reports the errno)
_ERRNO_OF_REASON = {reason: code for code, reason in ofd.OPEN_ERRORS.items()}
_ERRNO_OF_REASON["a directory"] = errno.EISDIR
# virtlockd's dispatch functions, named in its "unsupported flags" errors
_FUNCTION = {proc: "virLockSpaceProtocolDispatch" + name for proc, name in (
    (Proc.REGISTER, "Register"), (Proc.RESTRICT, "Restrict"), (Proc.NEW, "New"),
    (Proc.CREATE_RESOURCE, "CreateResource"), (Proc.DELETE_RESOURCE, "DeleteResource"),
    (Proc.ACQUIRE_RESOURCE, "AcquireResource"), (Proc.RELEASE_RESOURCE, "ReleaseResource"),
)}  # fmt: skip


class Refused(Exception):
    """A call's error reply (an RpcError), raised from deep inside a procedure."""

    def __init__(self, error: RpcError) -> None:
        super().__init__(error.message)
        self.error = error


def _refuse(code: int, domain: int, detail: str, int1: int = -1) -> Refused:
    return Refused(RpcError.of(code, domain, detail, int1))


def _system_error(detail: str, code: int) -> Refused:
    # virReportSystemError: "<detail>: <strerror>", the errno in int1
    return _refuse(ERR_SYSTEM_ERROR, FROM_LOCKSPACE, f"{detail}: {os.strerror(code)}", code)


def flags_error(proc: Proc, flags: int) -> RpcError:
    """virCheckFlags' error: VIR_ERR_INVALID_ARG, naming the dispatch function."""
    function = _FUNCTION[proc]
    return RpcError(ERR_INVALID_ARG, FROM_RPC,
                    f"unsupported flags (0x{flags:x}) in function {function}",
                    str1=function, str2="flags", int1=0, int2=0)  # fmt: skip


RESTRICTED = RpcError.of(
    ERR_OPERATION_DENIED, FROM_RPC, "lock manager connection has been restricted"
)
NOT_REGISTERED = RpcError.of(
    ERR_OPERATION_INVALID, FROM_RPC, "lock owner details have not been registered"
)


# what a procedure returns when its answer comes later (to CallConnection.answered)
LATER = object()


def busy(name: str) -> Refused:
    return _refuse(ERR_RESOURCE_BUSY, FROM_LOCKSPACE, f"Lockspace resource '{name}' is locked")


class VirtlockdConnection(CallConnection[Event]):
    """A virtlockd-protocol connection (lockd.frontends.connection: calls answered in order, flow
    control). ACQUIRE and RELEASE take the service's fast path (``acquire_nowait``,
    ``release_nowait``: no future, no task, the reply sent inside the commit); REGISTER, NEW and
    CREATE_LOCKSPACE await the service and run as a task; the others answer at once.
    Nothing is released when a connection closes: leases belong to the owner process."""

    def __init__(self, server: VirtlockdServer) -> None:
        decoder = Decoder()
        super().__init__(server.loop, decoder, decoder.max_frame, server.connections)
        self.server = server
        self.service = server.service
        self.owner: Owner | None = None
        self.restricted = False
        # the call being answered (calls are answered one at a time), and what its answer
        # depends on: the name it gives (for the error texts), whether a missing lease file
        # may be created, and for an exclusive ACQUIRE the newest token before it (a lease
        # not newer is the owner's own: virtlockd answers "is locked")
        self._header: Header | None = None
        self._name: str | None = None  # set by ACQUIRE and RELEASE only
        self._create = False
        self._newest = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.server.count_connections() > self.server.config.max_connections:
            log.warning(
                "refused virtlockd-protocol connection of pid %d uid %d: too many connections",
                self.peer.pid,
                self.peer.uid,
                extra={"LOCKD_EVENT": "refused"},
            )
            transport.close()  # virtlockd stops accepting past max_clients

    def framing_error(self, exc: ProtocolError) -> None:
        # a bad length: nothing after it can be framed; virtlockd closes too
        log.warning(
            "virtlockd-protocol framing error from pid %d: %s",
            self.peer.pid,
            exc,
            extra={"LOCKD_EVENT": "protocol-error"},
        )
        if self.transport is not None:
            self.transport.close()

    def start(self, event: Event) -> bool:
        if not isinstance(event, Call):
            if isinstance(event, Rejected):
                self.send(encode_error(event.header, event.error))
            return False  # Dropped: not a call, nothing to answer
        self._header, self._name, self._newest = event.header, None, 0
        try:
            answer = self._dispatch(event)
        except Exception as exc:
            self._failed(exc)
            return False
        if answer is LATER:
            return True
        self.finish(answer, None)
        return False

    def finish(self, answer: Any, failure: BaseException | None) -> None:
        if failure is not None:
            self._failed(failure)
            return
        if self._newest and answer.token <= self._newest:
            # an exclusive ACQUIRE of what the owner held already: the service answers an
            # idempotent repeat, virtlockd "is locked" (a second shared acquire joins, in both)
            self._failed(busy(self._name or ""))
            return
        assert self._header is not None
        self.send(encode_ok(self._header))

    def _failed(self, exc: BaseException) -> None:
        header = self._header
        assert header is not None
        if isinstance(exc, Refused):
            self.send(encode_error(header, exc.error))
        elif isinstance(exc, LockdError) and self._name is not None:
            # the service refused an ACQUIRE or a RELEASE
            self.send(encode_error(header, _translate(exc, self._name, self._create).error))
        elif isinstance(exc, MemoryError):
            os.abort()  # DESIGN §8: abort and let recovery bring the state back
        else:
            log.error(
                "internal error in virtlockd procedure %s",
                Proc(header.procedure).name,
                exc_info=exc,
            )
            self.send(
                encode_error(
                    header,
                    RpcError.of(ERR_INTERNAL_ERROR, FROM_RPC, "lockd failed to handle the call"),
                )
            )

    # -- the procedures ------------------------------------------------------------------
    def _dispatch(self, call: Call) -> Any:
        """Run a call: its answer when it succeeded at once (None, or an ACQUIRE's repeated
        lease), LATER when its outcome comes later (to :attr:`answered`), Refused (or the
        service's error) when it is refused at once."""
        args = call.args
        proc = call.header.procedure
        if isinstance(args, ResourceArgs):  # the hot path first
            allowed = (ACQUIRE_SHARED | ACQUIRE_AUTOCREATE) if proc == Proc.ACQUIRE_RESOURCE else 0
            if args.flags & ~allowed:
                raise Refused(flags_error(Proc(proc), args.flags))
            if self.restricted:
                raise Refused(RESTRICTED)
            owner = self.owner
            if owner is None:
                raise Refused(NOT_REGISTERED)
            if proc == Proc.ACQUIRE_RESOURCE:
                return self._acquire(owner, args)
            if proc == Proc.RELEASE_RESOURCE:
                return self._release(owner, args)
            self._touch_or_delete(Proc(proc), args)
            return None
        if isinstance(args, CreateLockspaceArgs):  # no flags, no owner needed
            if self.restricted:
                raise Refused(RESTRICTED)
            self.run(self._create_lockspace(args.path, exists_ok=True))
            return LATER
        if args.flags:  # REGISTER, RESTRICT, NEW take no flags
            raise Refused(flags_error(Proc(proc), args.flags))
        if self.restricted:
            raise Refused(RESTRICTED)
        if isinstance(args, RegisterArgs):
            self.run(self._register(args))
            return LATER
        if self.owner is None:
            raise Refused(NOT_REGISTERED)
        if isinstance(args, RestrictArgs):
            self.restricted = True
            return None
        if args.path == "":
            raise _refuse(ERR_OPERATION_INVALID, FROM_RPC, "the default lockspace already exists")
        self.run(self._create_lockspace(args.path, exists_ok=False))
        return LATER

    async def _register(self, args: RegisterArgs) -> None:
        if args.id == 0:  # libvirt's lockd driver never sends 0: virtlockd refuses it
            raise Refused(NOT_REGISTERED)
        uuid = args.owner_uuid
        try:
            self.owner = await self.service.register(
                args.pid, uuid, args.name, None, self.peer, domain_id=args.id
            )
        except NoSuchOwner:
            raise _refuse(
                ERR_OPERATION_INVALID,
                FROM_RPC,
                f"lock owner process {args.pid} does not exist",
            ) from None
        except InvalidParameter as exc:  # the uuid or the pid is another owner's
            raise _refuse(ERR_OPERATION_INVALID, FROM_RPC, str(exc)) from None
        except PermissionDenied as exc:
            raise _refuse(ERR_OPERATION_DENIED, FROM_RPC, str(exc)) from None
        except LockdError as exc:
            raise _translate(exc, args.name) from None

    def _lockspace(self, path: str) -> str:
        """lockd's lockspace for virtlockd's lockspace path."""
        if path == "":
            return DIRECT
        if path not in self.service.lockspaces.named:
            raise _refuse(ERR_INTERNAL_ERROR, FROM_RPC, f"Lockspace for path {path} does not exist")
        return path

    async def _create_lockspace(self, path: str, exists_ok: bool) -> None:
        if path in self.service.lockspaces.named:
            if exists_ok:  # its storage is checked again (a remount may have changed it)
                await self._add_lockspace(path)
                return
            raise _refuse(ERR_INTERNAL_ERROR, FROM_RPC, f"Lockspace for path {path} already exists")
        if not self.peer.root:
            raise _refuse(ERR_OPERATION_DENIED, FROM_RPC, "only root may create lockspaces")
        try:
            check_path(path)
        except InvalidResource as exc:
            raise _refuse(ERR_INVALID_ARG, FROM_LOCKSPACE, f"lockspace {exc}") from None
        # virLockSpaceNew: an existing directory is used, a missing one made 0700
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except FileExistsError:
            raise _refuse(
                ERR_INTERNAL_ERROR,
                FROM_LOCKSPACE,
                f"Lockspace location {path} exists, but is not a directory",
            ) from None
        except OSError as exc:
            raise _system_error(
                f"Unable to create lockspace {path}", exc.errno or errno.EIO
            ) from None
        if not os.path.isdir(path):
            raise _refuse(
                ERR_INTERNAL_ERROR,
                FROM_LOCKSPACE,
                f"Lockspace location {path} exists, but is not a directory",
            )
        await self._add_lockspace(path)

    async def _add_lockspace(self, path: str) -> None:
        try:
            await self.service.add_lockspace(path, path)
        except InvalidResource as exc:
            # on storage whose locks do not keep hosts apart (lockd/service/sharedfs.py): libvirt's
            # lock driver fails to load on this error, naming the mount and the fix
            reason = str(exc.parameters.get("reason", exc))
            raise _refuse(ERR_OPERATION_UNSUPPORTED, FROM_LOCKSPACE, reason) from None
        except LockdError as exc:
            raise _translate(exc, path) from None

    def _lease_file(self, ls: str, name: str) -> str:
        try:
            self.service.lockspaces.check(ls, name)
        except InvalidResource as exc:
            raise _refuse(ERR_INVALID_ARG, FROM_LOCKSPACE, str(exc)) from None
        return self.service.lockspaces.lease_path(ls, name, name)

    def _acquire(self, owner: Owner, args: ResourceArgs) -> Lease | object:
        ls = self._lockspace(args.path)
        shared = bool(args.flags & ACQUIRE_SHARED)
        autocreate = bool(args.flags & ACQUIRE_AUTOCREATE)
        if ls != DIRECT and not autocreate:
            path = self._lease_file(ls, args.name)
            try:
                os.stat(path)
            except OSError as exc:
                raise _system_error(
                    f"Unable to open resource {path}", exc.errno or errno.EIO
                ) from None
        # the service's errors from here on are translated (_failed) with these
        self._name, self._create = args.name, autocreate and ls != DIRECT
        if not shared:  # a lease granted now gets a larger token
            self._newest = self.service.commit.last_token
        mode = "shared" if shared else "exclusive"
        lease = self.service.acquire_nowait(
            owner, ls, args.name, mode, None, self.peer, self.answered
        )
        return LATER if lease is None else lease  # a repeat: answered now

    def _release(self, owner: Owner, args: ResourceArgs) -> object:
        ls = self._lockspace(args.path)
        self._name, self._create = args.name, False
        # by the name it was taken with, else by the file (LockService._find); not the
        # service's idempotent repeat (virtlockd answers what is not held with an error)
        try:
            self.service.release_nowait(owner, ls, args.name, self.answered, repeat=False)
        except NotHeld:
            if self.service.holders(ls, args.name):
                raise _refuse(
                    ERR_INTERNAL_ERROR,
                    FROM_LOCKSPACE,
                    f"owner {owner.pid} does not hold the resource lock",
                ) from None
            raise _refuse(
                ERR_RESOURCE_BUSY,
                FROM_LOCKSPACE,
                f"Lockspace resource '{args.name}' is not locked",
            ) from None
        return LATER

    def _touch_or_delete(self, proc: Proc, args: ResourceArgs) -> None:
        ls = self._lockspace(args.path)
        if ls == DIRECT:
            raise _refuse(
                ERR_OPERATION_UNSUPPORTED,
                FROM_LOCKSPACE,
                "lockd creates and deletes no files in the direct lockspace (disk images)",
            )
        if not self.peer.root:
            raise _refuse(
                ERR_OPERATION_DENIED, FROM_RPC, "only root may create or delete lease files"
            )
        path = self._lease_file(ls, args.name)
        if self.service.holders(ls, args.name):
            raise busy(args.name)
        if proc == Proc.CREATE_RESOURCE:
            try:  # virFileTouch(path, 0600)
                os.close(
                    os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
                )
            except OSError as exc:
                raise _system_error(
                    f"Failed to create file '{path}'", exc.errno or errno.EIO
                ) from None
            return
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _system_error(
                f"Unable to delete lockspace resource {path}", exc.errno or errno.EIO
            ) from None


def _translate(exc: LockdError, name: str, create: bool = False) -> Refused:
    """The virtlockd-protocol error for an error of the lock service."""
    if isinstance(exc, ResourceBusy):
        return busy(name)
    if isinstance(exc, LeaseLost):
        return _refuse(
            ERR_RESOURCE_BUSY,
            FROM_LOCKSPACE,
            f"Lockspace resource '{name}' was lost (lockctl history says why)",
        )
    if isinstance(exc, InvalidResource):
        code = _ERRNO_OF_REASON.get(str(exc.parameters.get("reason", "")))
        if code is not None:
            what = "open/create" if create else "open"
            return _system_error(f"Unable to {what} resource {name}", code)
        return _refuse(ERR_INVALID_ARG, FROM_LOCKSPACE, str(exc))
    if isinstance(exc, PermissionDenied):
        if exc.parameters.get("reason") == "open":
            return _system_error(f"Unable to open resource {name}", errno.EACCES)
        return _refuse(ERR_OPERATION_DENIED, FROM_RPC, str(exc))
    if isinstance(exc, NoSuchOwner):
        return Refused(NOT_REGISTERED)  # the owner died meanwhile: it is registered no more
    if isinstance(exc, LimitExceeded):
        return _refuse(ERR_OPERATION_FAILED, FROM_LOCKSPACE, str(exc))
    if isinstance(exc, JournalError):
        return _refuse(ERR_INTERNAL_ERROR, FROM_LOCKSPACE, str(exc))
    return _refuse(ERR_INTERNAL_ERROR, FROM_LOCKSPACE, str(exc))


class VirtlockdServer(Listener):
    """The listener of virtlockd's protocol; its connections share the daemon's limits."""

    def __init__(self, config: Config, service: LockService) -> None:
        super().__init__(service.loop)
        self.config = config
        self.service = service

    async def start(self, sock: socket.socket) -> None:
        await self.listen(sock, functools.partial(VirtlockdConnection, self))
