"""The lock service: what Register, Acquire, Release and owner death do, in protocol order.

Theory of operation: one event loop, no threads. Each request runs its synchronous steps
(kernel lock, fd store) at once, then waits for the group commit that journals it, then
replies. The ordering rules of DESIGN §4 are the order of statements below, and each step
has a failpoint so tests can crash the daemon between any two of them:

- acquire: kernel lock -> fd store -> commit -> reply. A crash before the commit leaves no
  journal row, and the kernel lock died with the process.
- release (by the client, by owner death, by an administrator): commit -> FDSTOREREMOVE ->
  unlock and close -> reply. A lock is never dropped before its release is journaled, so
  recovery can never re-grab a lock someone else took after us.

Group commit (:class:`~lockd.groupcommit.GroupCommit`): the writes of the requests that
arrive in one loop iteration are journaled in one transaction; then, in submission order,
each request's post-commit step (``then``: settle the lease, drop a released lock) runs and
its future resolves. A reply is never sent before its commit.

Two ways in, with the same checks and the same order of steps. The coroutines
(:meth:`LockService.acquire`, :meth:`~LockService.release`, ...) are for callers that await.
A front end's hot path uses :meth:`~LockService.acquire_nowait` and
:meth:`~LockService.release_nowait` instead: plain functions that run every step up to the
journal commit at once, raise a refusal known at once (``ResourceBusy``, ``NotHeld``, ...)
at once, and return an :class:`asyncio.Future` of the answer (the :class:`Lease`; Release's
reply dict), already done when nothing needs journaling (an idempotent repeat). A request
costs no task and no coroutine; only one that must wait for another request on the same
lease to settle gets a task. Reply at once if the future is done; otherwise hand it to
``service.commit.call_after_commit(fut, reply)``, which calls ``reply(fut)`` inside the
flush right after that request's commit (no loop iteration in between: one connection's
pair costs ~15% less CPU), and fall back to ``fut.add_done_callback(reply)`` when it
returns False (a task). lockd.connection (both front ends) does exactly that.

Invariants: a lease is in ``LeaseTable`` iff its kernel lock is held by us (or it is
``lost``); ``token`` values only grow; a request of a non-root peer touches only owners of
its own uid.

General capabilities that the libvirt drop-in (virtlockd_server.py) needed, added here
because any front end may use them (nothing here knows virtlockd's protocol):
- ``register`` of a uuid whose process has exited but whose death is not processed yet
  first finishes that death (``owner_gone``, one task per owner), then registers the new
  process: a VM manager restarts a VM under the same uuid at once. An owner may carry the
  manager's own number for it (``domain_id``), journaled and listed.
- ``held_by`` / ``holders``: who holds a resource, for a protocol whose answers depend on it
  (virtlockd tells "not locked" from "held by another owner").
- ``add_lockspace``: a named lockspace (lease files named by the client, lockspace.py)
  created at run time and journaled, so it outlives a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lockd import failpoint, ofd, process
from lockd.config import FENCE_POLICIES, Config
from lockd.errors import (
    InvalidParameter,
    JournalError,
    LeaseLost,
    LimitExceeded,
    LockdError,
    NoSuchOwner,
    NotHeld,
    PermissionDenied,
    ResourceBusy,
    TokenMismatch,
)
from lockd.groupcommit import GroupCommit as GroupCommit  # importable from here too, as before
from lockd.groupcommit import T
from lockd.journal import (
    Journal,
    delete_lease,
    delete_owner,
    insert_lease,
    lease_event,
    owner_event,
    put_grant,
    put_lockspace,
    put_owner,
    set_lease_state,
    touch_grant,
)
from lockd.leases import Event, FdNames, Lease, LeaseTable, Owner, State
from lockd.lockspace import DIRECT, Lockspaces
from lockd.metrics import Counters
from lockd.notify import FdStore

log = logging.getLogger("lockd")

MODES = ("exclusive", "shared")
# Owner uuids derived from (boot id, pid, start time) live in this namespace, so registering
# one process twice without a uuid names the same owner.
OWNER_NAMESPACE = uuidlib.UUID("6c0c4a0e-7d5b-4c8e-9a51-0f3c1d2b9e77")


def _log_lease(template: str, lease: Lease, event: str) -> None:
    # DEBUG: one record per grant would cost more than the grant; journald's fields make
    # `journalctl LOCKD_RESOURCE=/path` work when the level is raised
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            template,
            lease.mode,
            lease.resource,
            lease.token,
            extra={
                "LOCKD_RESOURCE": lease.resource,
                "LOCKD_OWNER": lease.owner.uuid,
                "LOCKD_TOKEN": lease.token,
                "LOCKD_EVENT": event,
            },
        )


def released_wire(lease: Lease | None = None, **fields: Any) -> dict[str, Any]:
    """What Release answers: the same shape the first time and on every repeat."""
    if lease is not None:
        return {
            "lockspace": lease.lockspace,
            "resource": lease.resource,
            "mode": lease.mode,
            "owner": lease.owner.ref(),
            "token": lease.token,
            "state": "released",
        }
    return {**fields, "state": "released"}


class LockService:
    def __init__(
        self,
        config: Config,
        journal: Journal,
        commit: GroupCommit,
        lockspaces: Lockspaces,
        table: LeaseTable,
        fdstore: FdStore,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.config = config
        self.journal = journal
        self.commit = commit
        self.table = table
        self.fdstore = fdstore
        self.loop = loop
        self.lockspaces = lockspaces
        self.fdnames = FdNames([lease.fdname for lease in table.leases()])
        # owner uuid -> done when its first registration is journaled
        self._registering: dict[str, asyncio.Future[None]] = {}
        # owner uuid -> queues of Watch subscribers
        self.watchers: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        # cumulative since start (lockd.metrics): plain integer increments on the hot path
        self.counters = Counters()
        # called with the lockspace before a new lease in an indirect lockspace is locked;
        # raises to refuse it (lockd/sharedfs.py: storage that can drop a lock silently)
        self.admit_indirect: Callable[[str], None] | None = None

    # -- owners ---------------------------------------------------------------------------
    def find_owner(self, owner: str | None, pid: int | None, peer: process.Peer) -> Owner:
        if (owner is None) == (pid is None):
            raise InvalidParameter("give exactly one of owner (uuid) and pid", parameter="owner")
        found = (
            self.table.owners.get(owner) if owner is not None else self.table.by_pid.get(pid or 0)
        )
        if found is None:
            raise NoSuchOwner(owner=owner if owner is not None else str(pid))
        if not peer.root and found.uid != peer.uid:
            raise PermissionDenied(
                "owner belongs to another user", reason="owner belongs to another user"
            )
        return found

    async def register(
        self,
        pid: int,
        uuid: str | None,
        name: str | None,
        fence: str | None,
        peer: process.Peer,
        domain_id: int | None = None,
    ) -> Owner:
        """Register (or find again) the owner ``uuid`` for process ``pid``.

        An owner whose process has exited but whose death is not processed yet (its pidfd's
        readiness still queued) does not block a new process under the same uuid: the old
        one's leases are released first, then the new one registers. That is a VM restarted
        at once with the same uuid, which a VM manager does all the time.
        ``domain_id``: the VM manager's own number for the owner (libvirt's domain id)."""
        if fence is not None and fence not in FENCE_POLICIES:
            raise InvalidParameter("fence must be kill, term or none", parameter="fence")
        start = process.start_time(pid)
        if start is None or pid <= 1:
            raise NoSuchOwner(f"no process {pid}", owner=str(pid))
        uid = process.uid_of(pid)
        if uid is None:
            raise NoSuchOwner(f"no process {pid}", owner=str(pid))
        if not peer.root and uid != peer.uid:
            raise PermissionDenied(
                f"process {pid} belongs to another user", reason="process of another user"
            )
        boot = process.boot_id()
        by_pid = self.table.by_pid.get(pid)
        if by_pid is not None and by_pid.start_time != start:
            by_pid = None  # a stale entry: its death is being processed
        if uuid is None:
            uuid = (
                by_pid.uuid
                if by_pid
                else str(uuidlib.uuid5(OWNER_NAMESPACE, f"{boot}:{pid}:{start}"))
            )
        else:
            try:
                uuid = str(uuidlib.UUID(uuid))
            except ValueError:
                raise InvalidParameter("uuid is not a UUID", parameter="uuid") from None
        existing = self.table.owners.get(uuid)
        if (
            existing is not None
            and (existing.pid != pid or existing.start_time != start)
            and not process.is_same_process(existing.pid, existing.start_time, existing.boot_id)
        ):
            await asyncio.shield(self.owner_gone(existing, "owner exited"))
            return await self.register(pid, uuid, name, fence, peer, domain_id)
        if existing is not None:
            if existing.pid != pid or existing.start_time != start:
                raise InvalidParameter(
                    f"owner {uuid} is registered to another process (pid {existing.pid})",
                    parameter="uuid",
                )
            pending = self._registering.get(uuid)
            if pending is not None:  # its first registration is still being journaled
                await asyncio.shield(pending)
                return await self.register(pid, uuid, name, fence, peer, domain_id)
            changed = (
                (name is not None and name != existing.name)
                or (fence is not None and fence != existing.fence)
                or (domain_id is not None and domain_id != existing.domain_id)
            )
            if changed:  # re-registering may rename the owner or change its fence policy
                existing.name = name if name is not None else existing.name
                existing.fence = fence if fence is not None else existing.fence
                if domain_id is not None:
                    existing.domain_id = domain_id
                await self.commit.submit(put_owner(existing.row()))
            return existing
        if by_pid is not None:
            raise InvalidParameter(
                f"process {pid} is already registered as owner {by_pid.uuid}", parameter="pid"
            )
        if len(self.table.owners) >= self.config.max_owners:
            raise LimitExceeded(limit="owners", value=self.config.max_owners)
        owner = Owner(
            uuid=uuid,
            name=name if name is not None else f"pid-{pid}",
            pid=pid,
            uid=uid,
            start_time=start,
            boot_id=boot,
            fence=fence or self.config.default_fence,
            registered_at=time.time(),
            domain_id=domain_id,
        )
        if not self.watch_owner(owner):
            raise NoSuchOwner(f"process {pid} exited while registering", owner=str(pid))
        self.table.add_owner(owner)
        self._registering[uuid] = self.loop.create_future()
        try:
            await self.commit.submit(
                put_owner(owner.row()),
                owner_event("register", uuid, pid, owner.name),
            )
        except JournalError:
            self.forget_owner(owner)
            raise
        finally:
            done = self._registering.pop(uuid)
            done.set_result(None)
        log.info(
            "registered owner %s pid %d",
            owner.name,
            pid,
            extra={"LOCKD_OWNER": uuid, "LOCKD_EVENT": "register"},
        )
        return owner

    def watch_owner(self, owner: Owner) -> bool:
        """Open a pidfd for the owner and watch it. False if it is already gone."""
        pidfd = process.open_pidfd(owner.pid)
        # the start time is checked after pidfd_open: if it still matches, the pidfd is ours
        if pidfd is None or process.start_time(owner.pid) != owner.start_time:
            if pidfd is not None:
                os.close(pidfd)
            return False
        owner.pidfd = pidfd
        self.loop.add_reader(pidfd, self._owner_exited, owner)
        return True

    def forget_owner(self, owner: Owner) -> None:
        self.table.remove_owner(owner)
        if owner.pidfd is not None:
            self.loop.remove_reader(owner.pidfd)
            os.close(owner.pidfd)
            owner.pidfd = None

    def _owner_exited(self, owner: Owner) -> None:
        if owner.pidfd is not None:
            self.loop.remove_reader(owner.pidfd)
        self.owner_gone(owner, "owner exited")

    def owner_gone(self, owner: Owner, reason: str) -> asyncio.Task[None]:
        """Start releasing a dead owner's leases (once: a second call gets the same task)."""
        if owner.dying is None:
            if owner.pidfd is not None:
                self.loop.remove_reader(owner.pidfd)
            owner.dying = self.loop.create_task(self.owner_died(owner, reason))
        return owner.dying

    async def owner_died(self, owner: Owner, reason: str) -> None:
        """Release every lease of a dead owner (commit first, then drop the kernel locks)."""
        self.forget_owner(owner)  # no new request can name it from here on
        # Requests that named the owner before it died may still be in flight (a ReleaseAll
        # racing the death): wait until none is, then claim every lease in one step, with no
        # await in between, so that a late request waits for this release instead.
        while pending := [lease.settled for lease in owner.leases.values() if lease.settled]:
            await asyncio.wait([asyncio.shield(fut) for fut in pending])
        leases = list(owner.leases.values())
        for lease in leases:
            lease.apply(Event.RELEASE)
            lease.settled = self.loop.create_future()
        failpoint.hit("owner-death.before-commit")
        writes = delete_owner(owner.uuid)
        writes += [lease_event("owner-dead", lease, reason) for lease in leases]
        writes.append(owner_event("owner-dead", owner.uuid, owner.pid, reason))
        while True:
            try:
                await self.commit.submit(*writes)
                break
            except JournalError:
                # The owner is dead and its locks must go, but never before the journal
                # says so; keep them and try again shortly.
                await asyncio.sleep(0.5)
        failpoint.hit("owner-death.after-commit")
        self.counters.owner_releases += len(leases)
        for lease in leases:
            lease.apply(Event.COMMITTED)
            self._drop(lease)
            self._settle(lease)
        log.info(
            "owner %s pid %d died: released %d leases",
            owner.name,
            owner.pid,
            len(leases),
            extra={"LOCKD_OWNER": owner.uuid, "LOCKD_EVENT": "owner-dead"},
        )
        self.publish(
            owner,
            {
                "event": "owner-dead",
                "at": time.time(),
                "owner": owner.uuid,
                "pid": owner.pid,
                "reason": reason,
            },
        )

    async def unregister(self, owner: Owner) -> None:
        """Forget an owner that holds no lease (what lockctl does when the Acquire that
        followed its Register failed). An owner with leases is refused: leases end only by
        a release, the owner's death or an administrator, never as a side effect."""
        pending = self._registering.get(owner.uuid)
        if pending is not None:
            await asyncio.shield(pending)
        if owner.uuid not in self.table.owners:
            raise NoSuchOwner(owner=owner.uuid)
        if owner.leases:
            raise InvalidParameter(
                f"owner {owner.uuid} holds {len(owner.leases)} leases; release them first",
                parameter="owner",
            )
        self.forget_owner(owner)  # no await before this: no acquire can slip in between
        try:
            await self.commit.submit(
                *delete_owner(owner.uuid), owner_event("unregister", owner.uuid, owner.pid, None)
            )
        except JournalError:
            self.table.add_owner(owner)
            if not self.watch_owner(owner):
                self.loop.create_task(self.owner_died(owner, "owner exited"))
            raise

    # -- acquire --------------------------------------------------------------------------
    async def acquire(
        self,
        owner: Owner,
        lockspace: str | None,
        resource: str,
        mode: str,
        token: int | None,
        peer: process.Peer,
    ) -> Lease:
        return await self.acquire_nowait(owner, lockspace, resource, mode, token, peer)

    def acquire_nowait(
        self,
        owner: Owner,
        lockspace: str | None,
        resource: str,
        mode: str,
        token: int | None,
        peer: process.Peer,
    ) -> asyncio.Future[Lease]:
        """:meth:`acquire` without a coroutine: every step up to the journal commit runs now,
        a refusal known at once raises now, and the future resolves to the lease once its
        grant is journaled (at once for a repeat of a granted request)."""
        # ``mode`` is one of MODES: the server checks it with the other parameters
        ls = self.lockspaces.canonical(lockspace)
        self.lockspaces.check(ls, resource)
        exclusive = mode == "exclusive"
        check = None
        if not peer.root and ls == DIRECT:
            # A non-root client may lock only what it could open itself (DESIGN §8).
            denied = PermissionDenied(
                f"{resource}: the client may not open it for "
                + ("writing" if exclusive else "reading"),
                reason="the client has no access to the file",
            )
            if not peer.may_search(resource):
                raise denied

            def check(st: os.stat_result) -> None:
                if not peer.may_open(st, exclusive):
                    raise denied

        rkey, seen = self.lockspaces.identify(ls, resource)
        if rkey is None:
            ofd.lock_existing(resource, exclusive)  # raises the precise error
            raise AssertionError("unreachable: stat failed but open succeeded")
        existing = owner.leases.get((ls, rkey))
        if existing is not None and existing.settled is not None:
            # a commit for this (owner, resource) is in flight: answer once it settled
            return self.loop.create_task(
                self._after(
                    existing.settled,
                    self.acquire_nowait,
                    owner,
                    lockspace,
                    resource,
                    mode,
                    token,
                    peer,
                )
            )
        if owner.uuid not in self.table.owners:
            raise NoSuchOwner(owner=owner.uuid)
        if existing is not None:
            if existing.state == State.LOST:
                raise LeaseLost(lockspace=ls, resource=existing.resource, token=existing.token)
            if existing.mode != mode:
                self.counters.conflicts += 1
                why = f"already held {existing.mode} by this owner; release it first"
                raise ResourceBusy(
                    f"{resource} is {why}", lockspace=ls, resource=resource, mode=mode, reason=why
                )
            return self._resolved(existing)  # idempotent repeat: same lease, same token
        if len(owner.leases) >= self.config.max_leases_per_owner:
            raise LimitExceeded(limit="leases-per-owner", value=self.config.max_leases_per_owner)
        if self.table.count >= self.config.max_leases:
            raise LimitExceeded(limit="leases", value=self.config.max_leases)
        if self.fdstore.enabled and not self.fdnames.fits():
            raise LimitExceeded(
                "systemd's fd store is full: LISTEN_FDNAMES would exceed 128 KiB",
                limit="fd-store",
                value=self.table.count,
            )
        if token is not None:
            current = max(
                [self.journal.resource_token(ls, rkey)]
                + [lease.token for lease in self.table.holders(ls, rkey)]
            )
            if current != token:
                raise TokenMismatch(expected=token, current=current)
        if ls != DIRECT and self.admit_indirect is not None:
            self.admit_indirect(ls)
        failpoint.hit("acquire.before-lock")
        try:
            locked = self.lockspaces.lock(ls, resource, rkey, exclusive, check=check, seen=seen)
        except ResourceBusy:
            self.counters.conflicts += 1
            raise ResourceBusy(
                f"{resource} is busy", lockspace=ls, resource=resource, mode=mode
            ) from None
        failpoint.hit("acquire.after-lock")
        new_token = self.commit.next_token()
        # the file that carries the lock, symlinks resolved: recovery locks it again there
        # even if a symlink named in the request was retargeted meanwhile (usually it is the
        # resource's own path: then one string serves both, 10,000 leases hold 10,000 fewer)
        path = ofd.real_path(locked.fd) if ls == DIRECT else None
        if path is None:
            path = self.lockspaces.lease_path(ls, resource, rkey)
        elif path == resource:
            path = resource
        lease = Lease(
            owner=owner,
            lockspace=ls,
            rkey=rkey,
            resource=resource,
            path=path,
            mode=mode,
            token=new_token,
            acquired_at=time.time(),
            fdname=self.fdnames.take(),
            state=State.ACQUIRING,
            fd=locked.fd,
        )
        lease.settled = self.loop.create_future()
        self.table.add(lease)
        try:
            self.fdstore.add(lease.fdname, locked.fd)
        except OSError as exc:  # not parked in the fd store: nothing was granted
            self._acquired(lease, exc)
        return self.commit.submit(
            insert_lease(lease),
            put_grant(lease),
            lease_event("acquire", lease),
            then=lambda error: self._acquired(lease, error),
        )

    def _acquired(self, lease: Lease, error: Exception | None) -> Lease:
        """After the grant's commit (or its failure: then nothing was granted)."""
        if error is not None:
            lease.apply(Event.FAILED)
            self._drop(lease)
            self._settle(lease)
            if isinstance(error, OSError) and not isinstance(error, LockdError):
                raise JournalError(
                    f"the fd store refused the lease fd: {error}", reason=str(error)
                ) from None
            raise error
        lease.apply(Event.COMMITTED)
        self._settle(lease)
        self.counters.grants += 1
        _log_lease("acquired %s %s token %d", lease, "acquire")
        failpoint.hit("acquire.after-commit")
        return lease

    # -- release --------------------------------------------------------------------------
    def _find(self, owner: Owner, ls: str, resource: str) -> tuple[Lease | None, str | None]:
        """The owner's lease a Release names: the one taken under that name (no stat), else
        the one on the file the name leads to now (another path to it), else any taken
        under that name (the file may be gone, or now another inode)."""
        lease = owner.by_name.get(resource)
        if lease is not None and lease.lockspace == ls:
            return lease, lease.rkey
        try:
            rkey = self.lockspaces.key(ls, resource)
        except LockdError:
            rkey = None
        if rkey is not None and (ls, rkey) in owner.leases:
            return owner.leases[(ls, rkey)], rkey
        for lease in owner.leases.values():
            if lease.lockspace == ls and lease.resource == resource:
                return lease, lease.rkey
        return None, rkey

    async def release(self, owner: Owner, lockspace: str | None, resource: str) -> dict[str, Any]:
        return await self.release_nowait(owner, lockspace, resource)

    def release_nowait(
        self, owner: Owner, lockspace: str | None, resource: str
    ) -> asyncio.Future[dict[str, Any]]:
        """:meth:`release` without a coroutine, as :meth:`acquire_nowait`: the future
        resolves to the reply once the release is journaled and the lock dropped."""
        ls = self.lockspaces.canonical(lockspace)
        self.lockspaces.check(ls, resource)
        lease, rkey = self._find(owner, ls, resource)
        if lease is not None and lease.settled is not None:
            return self.loop.create_task(
                self._after(lease.settled, self.release_nowait, owner, lockspace, resource)
            )
        if lease is None:
            last = self.journal.last_release(owner.uuid, ls, rkey) if rkey else None
            if last is None:
                raise NotHeld(lockspace=ls, resource=resource)
            return self._resolved(
                released_wire(
                    lockspace=ls,
                    resource=last["resource"],
                    mode=last["mode"],
                    owner=owner.ref(),
                    token=last["token"],
                )
            )
        return self.release_lease_nowait(lease, "release", None, released_wire)

    async def release_lease(self, lease: Lease, event: str, reason: str | None) -> None:
        """Journal the end of a lease, then drop its kernel lock (DESIGN §4 rule 2)."""
        await self.release_lease_nowait(lease, event, reason, lambda lease: None)

    def release_lease_nowait(
        self, lease: Lease, event: str, reason: str | None, answer: Callable[[Lease], T]
    ) -> asyncio.Future[T]:
        """:meth:`release_lease` without a coroutine; the future resolves to
        ``answer(lease)`` once the lock is dropped."""
        lease.apply(Event.RELEASE)
        lease.settled = self.loop.create_future()
        failpoint.hit("release.before-commit")
        return self.commit.submit(
            delete_lease(lease.token),
            touch_grant(lease),
            lease_event(event, lease, reason),
            then=lambda error: answer(self._released(lease, event, reason, error)),
        )

    def _released(
        self, lease: Lease, event: str, reason: str | None, error: JournalError | None
    ) -> Lease:
        """After the release's commit: drop the lock (or keep it: the commit failed)."""
        if error is not None:
            lease.apply(Event.FAILED)
            self._settle(lease)
            raise error
        lease.apply(Event.COMMITTED)
        if event == "release":
            self.counters.releases += 1
        else:
            self.counters.force_releases += 1
        failpoint.hit("release.after-commit")
        self._drop(lease)
        failpoint.hit("release.after-close")
        self._settle(lease)
        _log_lease("released %s %s token %d", lease, event)
        if event != "release":
            self.publish(lease.owner, lease.as_event(event, reason, time.time()))
        return lease

    async def release_all(self, owner: Owner) -> list[dict[str, Any]]:
        leases = list(owner.leases.values())
        results = await asyncio.gather(
            *(self.release(owner, lease.lockspace, lease.resource) for lease in leases),
            return_exceptions=True,
        )
        out = []
        for r in results:
            if isinstance(r, BaseException):
                if not isinstance(r, NotHeld):
                    raise r
            else:
                out.append(r)
        return out

    async def force_release(
        self, lockspace: str | None, resource: str, owner: str | None
    ) -> list[dict[str, Any]]:
        ls = self.lockspaces.canonical(lockspace)
        self.lockspaces.check(ls, resource)
        rkey = self.lockspaces.key(ls, resource)
        found = self.table.holders(ls, rkey) if rkey else []
        if not found:
            found = [
                lease
                for lease in self.table.leases()
                if lease.lockspace == ls and lease.resource == resource
            ]
        if owner is not None:
            found = [lease for lease in found if lease.owner.uuid == owner]
        out = []
        for lease in found:
            while lease.settled is not None:
                await asyncio.shield(lease.settled)
            if lease.state in (State.HELD, State.LOST):
                await self.release_lease(lease, "force-release", "released by an administrator")
                out.append(released_wire(lease))
        return out

    # -- queries and lockspaces -------------------------------------------------------------
    def held_by(self, owner: Owner, lockspace: str | None, resource: str) -> Lease | None:
        """The owner's lease on the resource (by file identity, or by the name it was taken
        with if the file is gone), or None."""
        ls = self.lockspaces.canonical(lockspace)
        self.lockspaces.check(ls, resource)
        return self._find(owner, ls, resource)[0]

    def holders(self, lockspace: str | None, resource: str) -> list[Lease]:
        """Every lease on the resource, whoever holds it."""
        ls = self.lockspaces.canonical(lockspace)
        self.lockspaces.check(ls, resource)
        rkey = self.lockspaces.key(ls, resource)
        if rkey is not None:
            return self.table.holders(ls, rkey)
        # the file is gone: match by the name the leases were taken with
        return [x for x in self.table.leases() if x.lockspace == ls and x.resource == resource]

    async def add_lockspace(self, name: str, directory: str) -> bool:
        """Add a named lockspace (lease files named by the client, lockspace.py) at run time,
        journaled so that it outlives a restart. False if it exists already. The directory
        must exist (the caller makes it, with the errors its protocol wants)."""
        if name in self.lockspaces.named:
            return False
        self.lockspaces.add_named(name, Path(directory))
        try:
            await self.commit.submit(put_lockspace(name, directory))
        except JournalError:
            self.lockspaces.remove_named(name)
            raise
        log.info(
            "lockspace %s created (lease files in %s)",
            name,
            directory,
            extra={"LOCKD_EVENT": "lockspace"},
        )
        return True

    # -- a lock dropped behind our back ---------------------------------------------------
    def lease_lost(self, lease: Lease, reason: str) -> asyncio.Task[None]:
        """A held lease whose kernel lock the filesystem dropped while we ran (a shared
        lockspace: EBADFD after a reconnect, or another holder on the byte). It is lost from
        this moment (HELD -> LOST, so nothing answers "held" any more); the task journals it,
        then drops the fd (FDSTOREREMOVE, close), tells the owner's watchers and fences the
        owner by its policy. The caller checked that no commit is in flight for it."""
        lease.apply(Event.LOSE)
        lease.continuity = "lost"
        lease.settled = self.loop.create_future()
        return self.loop.create_task(self._journal_lost(lease, reason))

    async def _journal_lost(self, lease: Lease, reason: str) -> None:
        while True:
            try:
                await self.commit.submit(
                    set_lease_state(lease.token, "lost"), lease_event("lost", lease, reason)
                )
                break
            except JournalError:
                await asyncio.sleep(0.5)  # the lock is gone either way; the record must be made
        self.counters.lost += 1
        if lease.fd is not None:  # journaled first: a crash here leaves a stray stored fd
            self.fdstore.remove(lease.fdname)
            ofd.unlock_and_close(lease.fd)
            lease.fd = None
        self._settle(lease)
        log.error(
            "lease on %s of owner %s lost: %s",
            lease.resource,
            lease.owner.name,
            reason,
            extra={
                "LOCKD_RESOURCE": lease.resource,
                "LOCKD_OWNER": lease.owner.uuid,
                "LOCKD_TOKEN": lease.token,
                "LOCKD_EVENT": "lost",
            },
        )
        self.publish(lease.owner, lease.as_event("lost", reason, time.time()))
        if lease.owner.uuid in self.table.owners:
            self.fence(lease.owner, [lease])

    # -- helpers --------------------------------------------------------------------------
    def _drop(self, lease: Lease) -> None:
        """After the release is journaled: FDSTOREREMOVE, unlock, close, forget."""
        if lease.fd is not None:
            self.fdstore.remove(lease.fdname)
            ofd.unlock_and_close(lease.fd)
            lease.fd = None
        self.table.remove(lease)
        self.fdnames.give_back(lease.fdname)

    @staticmethod
    def _settle(lease: Lease) -> None:
        fut, lease.settled = lease.settled, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _resolved(self, value: T) -> asyncio.Future[T]:
        fut: asyncio.Future[T] = self.loop.create_future()
        fut.set_result(value)
        return fut

    @staticmethod
    async def _after(
        settled: asyncio.Future[None], nowait: Callable[..., asyncio.Future[T]], *args: Any
    ) -> T:
        """Wait until a lease in flight settled, then start the request over."""
        await asyncio.shield(settled)
        return await nowait(*args)

    # -- fencing and watchers -------------------------------------------------------------
    def fence(self, owner: Owner, leases: Iterable[Lease]) -> None:
        names = ", ".join(lease.resource for lease in leases)
        if owner.fence == "none":
            log.warning(
                "owner %s pid %d lost leases (%s); fence policy none",
                owner.name,
                owner.pid,
                names,
                extra={"LOCKD_OWNER": owner.uuid, "LOCKD_EVENT": "lost"},
            )
            return
        sig = signal.SIGKILL if owner.fence == "kill" else signal.SIGTERM
        sent = process.signal_owner(owner.pidfd, owner.pid, owner.start_time, sig)
        self.counters.fenced += sent
        log.warning(
            "owner %s pid %d lost leases (%s): sent %s",
            owner.name,
            owner.pid,
            names,
            sig.name if sent else "nothing (already gone)",
            extra={"LOCKD_OWNER": owner.uuid, "LOCKD_EVENT": "fence"},
        )
        if sent and sig == signal.SIGTERM:
            self.loop.call_later(
                self.config.fence_grace,
                lambda: (
                    owner.uuid in self.table.owners
                    and process.signal_owner(
                        owner.pidfd, owner.pid, owner.start_time, signal.SIGKILL
                    )
                ),
            )

    def subscribe(self, owner: Owner) -> asyncio.Queue[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1024)
        self.watchers.setdefault(owner.uuid, set()).add(q)
        return q

    def unsubscribe(self, owner: Owner, q: asyncio.Queue[dict[str, Any]]) -> None:
        subs = self.watchers.get(owner.uuid)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self.watchers[owner.uuid]

    def publish(self, owner: Owner, event: dict[str, Any]) -> None:
        for q in self.watchers.get(owner.uuid, ()):
            if not q.full():  # a watcher that does not read loses events, not our memory
                q.put_nowait(event)
