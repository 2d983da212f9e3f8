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

Group commit (:class:`GroupCommit`): every journal write is queued with a future; the queue
is flushed by a callback scheduled with ``call_soon``, i.e. after every request that arrived
in the same loop iteration has queued its writes. One transaction, one ``COMMIT``, then all
their futures resolve. A reply is never sent before its commit.

Invariants: a lease is in ``LeaseTable`` iff its kernel lock is held by us (or it is
``lost``); ``token`` values only grow; a request of a non-root peer touches only owners of
its own uid.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
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
from lockd.journal import (
    REGROUPED,
    Journal,
    Write,
    delete_lease,
    delete_owner,
    insert_lease,
    lease_event,
    owner_event,
    put_owner,
    set_lease_state,
    set_meta,
)
from lockd.leases import Event, FdNames, Lease, LeaseTable, Owner, State
from lockd.lockspace import DIRECT, Lockspaces
from lockd.notify import FdStore

log = logging.getLogger("lockd")

MODES = ("exclusive", "shared")
# Owner uuids derived from (boot id, pid, start time) live in this namespace, so registering
# one process twice without a uuid names the same owner.
OWNER_NAMESPACE = uuidlib.UUID("6c0c4a0e-7d5b-4c8e-9a51-0f3c1d2b9e77")


TOKEN_BLOCK = 1024


class GroupCommit:
    """Batch the journal writes of requests that arrive together into one transaction.

    Within a batch, the writes of the hot path (lease inserts, lease deletes, history events)
    are gathered per statement, so that N requests cost three ``executemany`` calls rather
    than 2N ``execute``; every other write runs first, in submission order. Regrouping is
    safe because no two of them in one batch touch the same row: a release waits until its
    lease's acquire has settled (so a lease is never inserted and deleted in one batch), an
    owner's death waits for its leases to settle and forgets the owner first (so no insert
    races the owner's ``DELETE ... WHERE owner``), and events keep their relative order.
    """

    def __init__(self, journal: Journal, loop: asyncio.AbstractEventLoop) -> None:
        self.journal = journal
        self.loop = loop
        self._writes: list[Write] = []  # in submission order
        self._runs: dict[str, list[Write]] = {sql: [] for sql in REGROUPED}
        self._waiters: list[asyncio.Future[None]] = []
        self._scheduled = False
        # the token sequence: allocated in memory, stored by the batch that grants it
        self.last_token = 0
        self._stored_token = 0

    def next_token(self) -> int:
        self.last_token += 1
        return self.last_token

    def submit(self, *writes: Write) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self.loop.create_future()
        for write in writes:
            self._runs.get(write[0], self._writes).append(write)
        self._waiters.append(fut)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)
        return fut

    def flush(self) -> None:
        writes, waiters = self._writes, self._waiters
        self._writes, self._waiters, self._scheduled = [], [], False
        if not waiters:
            return
        for run in self._runs.values():
            writes += run
            run.clear()
        token = self.last_token
        reserve = self._stored_token
        if token > reserve:
            # Store a bound a block ahead, not every token: one meta write per TOKEN_BLOCK
            # grants. Recovery starts above the bound, so a token that was ever replied is
            # never reused; a crash skips the rest of a block.
            reserve = token + TOKEN_BLOCK
            writes.append(set_meta("last_token", str(reserve)))
        try:
            self.journal.commit(writes)
        except JournalError as exc:
            log.error("journal commit failed: %s", exc, extra={"LOCKD_EVENT": "journal-error"})
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self._stored_token = reserve
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


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
        fields = {
            "lockspace": lease.lockspace,
            "resource": lease.resource,
            "mode": lease.mode,
            "owner": lease.owner.ref(),
            "token": lease.token,
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
        self, pid: int, uuid: str | None, name: str | None, fence: str | None, peer: process.Peer
    ) -> Owner:
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
        if existing is not None:
            if existing.pid != pid or existing.start_time != start:
                raise InvalidParameter(
                    f"owner {uuid} is registered to another process (pid {existing.pid})",
                    parameter="uuid",
                )
            pending = self._registering.get(uuid)
            if pending is not None:  # its first registration is still being journaled
                await asyncio.shield(pending)
                return await self.register(pid, uuid, name, fence, peer)
            changed = (name is not None and name != existing.name) or (
                fence is not None and fence != existing.fence
            )
            if changed:  # re-registering may rename the owner or change its fence policy
                existing.name = name if name is not None else existing.name
                existing.fence = fence if fence is not None else existing.fence
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
        self.loop.create_task(self.owner_died(owner, "owner exited"))

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
        while True:
            existing = owner.leases.get((ls, rkey))
            if existing is None or existing.settled is None:
                break
            seen = None  # stale after a wait: lock() looks at the path again
            await asyncio.shield(existing.settled)
        if owner.uuid not in self.table.owners:
            raise NoSuchOwner(owner=owner.uuid)
        if existing is not None:
            if existing.state == State.LOST:
                raise LeaseLost(lockspace=ls, resource=existing.resource, token=existing.token)
            if existing.mode != mode:
                raise ResourceBusy(
                    f"{resource} is already held {existing.mode} by this owner; release it first",
                    lockspace=ls,
                    resource=resource,
                    mode=mode,
                )
            return existing  # idempotent repeat: same lease, same token
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
            await self.commit.submit(
                insert_lease(lease),
                lease_event("acquire", lease, at=lease.acquired_at),
            )
        except BaseException as exc:
            # not journaled (or not parked in the fd store): nothing was granted
            lease.apply(Event.FAILED)
            self._drop(lease)
            self._settle(lease)
            if isinstance(exc, OSError) and not isinstance(exc, LockdError):
                raise JournalError(
                    f"the fd store refused the lease fd: {exc}", reason=str(exc)
                ) from None
            raise
        lease.apply(Event.COMMITTED)
        self._settle(lease)
        _log_lease("acquired %s %s token %d", lease, "acquire")
        failpoint.hit("acquire.after-commit")
        return lease

    # -- release --------------------------------------------------------------------------
    def _find(self, owner: Owner, ls: str, resource: str) -> tuple[Lease | None, str | None]:
        try:
            rkey = self.lockspaces.key(ls, resource)
        except LockdError:
            rkey = None
        if rkey is not None and (ls, rkey) in owner.leases:
            return owner.leases[(ls, rkey)], rkey
        # the file may be gone, or now another inode: match by the name it was taken with
        for lease in owner.leases.values():
            if lease.lockspace == ls and lease.resource == resource:
                return lease, lease.rkey
        return None, rkey

    async def release(self, owner: Owner, lockspace: str | None, resource: str) -> dict[str, Any]:
        ls = self.lockspaces.canonical(lockspace)
        self.lockspaces.check(ls, resource)
        while True:
            lease, rkey = self._find(owner, ls, resource)
            if lease is None or lease.settled is None:
                break
            await asyncio.shield(lease.settled)
        if lease is None:
            last = self.journal.last_release(owner.uuid, ls, rkey) if rkey else None
            if last is None:
                raise NotHeld(lockspace=ls, resource=resource)
            return released_wire(
                lockspace=ls,
                resource=last["resource"],
                mode=last["mode"],
                owner=owner.ref(),
                token=last["token"],
            )
        await self.release_lease(lease, "release", None)
        return released_wire(lease)

    async def release_lease(self, lease: Lease, event: str, reason: str | None) -> None:
        """Journal the end of a lease, then drop its kernel lock (DESIGN §4 rule 2)."""
        lease.apply(Event.RELEASE)
        lease.settled = self.loop.create_future()
        failpoint.hit("release.before-commit")
        try:
            await self.commit.submit(delete_lease(lease.token), lease_event(event, lease, reason))
        except JournalError:
            lease.apply(Event.FAILED)
            self._settle(lease)
            raise
        lease.apply(Event.COMMITTED)
        failpoint.hit("release.after-commit")
        self._drop(lease)
        failpoint.hit("release.after-close")
        self._settle(lease)
        _log_lease("released %s %s token %d", lease, event)
        if event != "release":
            self.publish(lease.owner, lease.as_event(event, reason, time.time()))

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
