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

Group commit (:class:`~lockd.journaling.groupcommit.GroupCommit`): the writes of the requests that
arrive in one loop iteration are journaled in one transaction; then, in submission order,
each request's post-commit step (settle the lease, drop a released lock) runs and its answer
goes to whoever waits for it. A reply is never sent before its commit.

One way in for every front end: :meth:`~LockService.acquire_nowait` and
:meth:`~LockService.release_nowait` take plain values and return plain values. They run
every step up to the journal commit at once and raise a refusal known at once
(``ResourceBusy``, ``NotHeld``, ...) at once. They return the answer (the :class:`Lease`;
Release's reply dict) when nothing needs journaling (an idempotent repeat), else None: then
``done(answer, None)`` (or ``done(None, exc)``) is called inside the flush, right after that
request's commit (no loop iteration in between, no future, no task). Only a request that
must wait for another request on the same lease to settle gets a task, which calls ``done``
the same way. The coroutines (:meth:`LockService.acquire`, :meth:`~LockService.release`) wrap
them for callers that await.

A lease with a commit in flight has ``Lease.settled`` set: to the service's marker
(``in_flight``, one future for all, never resolved) until somebody needs to wait for it, who
then puts a future of its own there (:meth:`LockService.settled`): a request pays no future.

Invariants: a lease is in ``LeaseTable`` iff its kernel lock is held by us (or it is
``lost``); ``token`` values only grow; a request of a non-root peer touches only owners of
its own uid.

Owners (register, find_owner, the pidfd watch, unregister, fence, Watch's queues) are the
service's other half, :class:`lockd.service.owners.Owners`, which LockService inherits: the methods
are the service's, the code is there. Owner death stays here: it is a release, in the order
above.

General capabilities that the libvirt drop-in (virtlockd_server.py) needed, added here
because any front end may use them (nothing here knows virtlockd's protocol):
- ``register`` of a uuid whose process has exited but whose death is not processed yet
  (lockd/service/owners.py); an owner's ``domain_id``.
- ``held_by`` / ``holders``: who holds a resource, for a protocol whose answers depend on it
  (virtlockd tells "not locked" from "held by another owner").
- ``add_lockspace``: a named lockspace (lease files named by the client, lockspace.py)
  created at run time and journaled, so it outlives a restart.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lockd import failpoint
from lockd.config import Config
from lockd.errors import (
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
from lockd.journaling.groupcommit import Done, T, resolving
from lockd.journaling.groupcommit import (
    GroupCommit as GroupCommit,  # importable from here too, as before
)
from lockd.journaling.journal import (
    Journal,
    delete_owner,
    end_writes,
    grant_writes,
    lease_event,
    owner_event,
    put_lockspace,
    set_lease_state,
)
from lockd.locks import ofd, process
from lockd.locks.leases import Event, FdNames, Lease, LeaseTable, Owner, State
from lockd.locks.lockspace import DIRECT, Lockspaces
from lockd.service.counters import Counters
from lockd.service.owners import Owners
from lockd.service.sharedio import StorageWorker
from lockd.systemd.notify import FdStore

log = logging.getLogger("lockd")

MODES = ("exclusive", "shared")
# the reason of a loss journaled before this daemon started whose "lost" event history no
# longer holds (pruned past history_retention)
LOST_EARLIER = "lost before lockd last started; its event is no longer in the history"


def _log_lease(template: str, lease: Lease, event: str) -> None:
    # DEBUG (the caller checks the level: a call less per request): one record per grant
    # would cost more than the grant; journald's fields make `journalctl
    # LOCKD_RESOURCE=/path` work when the level is raised
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


class LockService(Owners):
    """The one lock service (see the module docstring); its owner side is
    :class:`lockd.service.owners.Owners`."""

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
        # cumulative since start (lockd.service.metrics): plain integer increments on the hot path
        self.counters = Counters()
        # Lease.settled of a lease whose commit is in flight and whom nobody waits for yet
        # (see the module docstring): never resolved, never awaited
        self.in_flight: asyncio.Future[None] = loop.create_future()
        # when this daemon started serving (the time given to a loss it found journaled
        # without a reason history still holds)
        self.started_at = time.time()
        # called with the lockspace before a new lease in an indirect lockspace is locked;
        # raises to refuse it (lockd/service/sharedfs.py: storage that can drop a lock silently)
        self.admit_indirect: Callable[[str], None] | None = None
        # called with (name, directory) before a named lockspace is added, and when an
        # existing one is asked for again; raises to refuse it (lockd/service/sharedfs.py)
        self.admit_lockspace: Callable[[str, str], None] | None = None
        # lockspace -> the thread its blocking file operations run in: those on shared
        # storage, which can stop answering (lockd/service/sharedio.py; filled by
        # lockd/service/sharedfs.py)
        self.shared_io: dict[str, StorageWorker] = {}

    # -- owner death (the rest of an owner's life: lockd/service/owners.py) ------------------------
    async def owner_died(self, owner: Owner, reason: str) -> None:
        """Release every lease of a dead owner (commit first, then drop the kernel locks)."""
        self.forget_owner(owner)  # no new request can name it from here on
        # Requests that named the owner before it died may still be in flight (a ReleaseAll
        # racing the death): wait until none is, then claim every lease in one step, with no
        # await in between, so that a late request waits for this release instead.
        while pending := [self.settled(x) for x in owner.leases.values() if x.settled]:
            await asyncio.wait([asyncio.shield(fut) for fut in pending])
        leases = list(owner.leases.values())
        for lease in leases:
            lease.apply(Event.RELEASE)
            lease.settled = self.in_flight
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
            self.settle(lease)
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
        lease: Lease = await self._wait(
            self.acquire_nowait, owner, lockspace, resource, mode, token, peer
        )
        return lease

    def acquire_nowait(
        self,
        owner: Owner,
        lockspace: str | None,
        resource: str,
        mode: str,
        token: int | None,
        peer: process.Peer,
        done: Done,
    ) -> Lease | None:
        """:meth:`acquire` without a coroutine: every step up to the journal commit runs now,
        a refusal known at once raises now; the lease is returned at once for a repeat of a
        granted request, else ``done(lease, None)`` is called once its grant is journaled
        (``done(None, exc)`` if it failed) and None returned."""
        # ``mode`` is one of MODES: the server checks it with the other parameters
        ls = self.lockspaces.resolve(lockspace, resource)
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
            self._after(existing, done, self.acquire_nowait, owner, lockspace, resource, mode,
                        token, peer)  # fmt: skip
            return None
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
        if ls != DIRECT:
            if self.admit_indirect is not None:
                self.admit_indirect(ls)
            worker = self.shared_io.get(ls)
            if worker is not None:  # shared storage: off the event loop, with a bound
                failpoint.hit("acquire.before-lock")
                request = (owner, lockspace, resource, mode, token, peer)
                worker.acquire(self, request, ls, rkey, done)
                return None
        failpoint.hit("acquire.before-lock")
        try:
            locked = self.lockspaces.lock(ls, resource, rkey, exclusive, check=check, seen=seen)
        except ResourceBusy:
            raise self.busy(ls, resource, mode) from None
        self.grant(owner, ls, resource, rkey, mode, locked, done)
        return None

    def busy(self, ls: str, resource: str, mode: str) -> ResourceBusy:
        self.counters.conflicts += 1
        return ResourceBusy(f"{resource} is busy", lockspace=ls, resource=resource, mode=mode)

    def grant(
        self,
        owner: Owner,
        ls: str,
        resource: str,
        rkey: str,
        mode: str,
        locked: ofd.Locked,
        done: Done,
    ) -> None:
        """A lock taken: its lease, parked in the fd store, journaled (DESIGN §4 rule 1);
        ``done(lease, None)`` once the grant is journaled."""
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
        # positional (owner, lockspace, rkey, resource, path, mode, token, acquired_at,
        # fdname, state, fd): keywords cost a look-up each, on every grant
        lease = Lease(owner, ls, rkey, resource, path, mode, new_token, time.time(),
                      self.fdnames.take(), State.ACQUIRING, locked.fd)  # fmt: skip
        lease.settled = self.in_flight
        self.table.add(lease)
        if self.fdstore.enabled:
            try:
                self.fdstore.add(lease.fdname, locked.fd)
            except OSError as exc:  # not parked in the fd store: nothing was granted
                self._acquired(lease, exc)
        self.commit.add(grant_writes(lease), self._acquired, lease, done)

    def _acquired(self, lease: Lease, error: Exception | None) -> Lease:
        """After the grant's commit (or its failure: then nothing was granted)."""
        if error is not None:
            lease.apply(Event.FAILED)
            self._drop(lease)
            self.settle(lease)
            if isinstance(error, OSError) and not isinstance(error, LockdError):
                raise JournalError(
                    f"the fd store refused the lease fd: {error}", reason=str(error)
                ) from None
            raise error
        lease.apply(Event.COMMITTED)
        if lease.settled is self.in_flight:  # nobody waits for it (the usual case)
            lease.settled = None
        else:
            self.settle(lease)
        self.counters.grants += 1
        if log.isEnabledFor(logging.DEBUG):
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
        released: dict[str, Any] = await self._wait(self.release_nowait, owner, lockspace, resource)
        return released

    def release_nowait(
        self,
        owner: Owner,
        lockspace: str | None,
        resource: str,
        done: Done,
        repeat: bool = True,
    ) -> dict[str, Any] | None:
        """:meth:`release` without a coroutine, as :meth:`acquire_nowait`: the reply is
        returned at once for a repeat (the journal's last release of it, unless ``repeat``
        is False: then NotHeld), else ``done(reply, None)`` is called once the release is
        journaled and the lock dropped."""
        ls = self.lockspaces.resolve(lockspace, resource)
        lease, rkey = self._find(owner, ls, resource)
        if lease is None:
            last = self.journal.last_release(owner.uuid, ls, rkey) if rkey and repeat else None
            if last is None:
                raise NotHeld(lockspace=ls, resource=resource)
            return released_wire(
                lockspace=ls,
                resource=last["resource"],
                mode=last["mode"],
                owner=owner.ref(),
                token=last["token"],
            )
        if lease.settled is not None:
            again = functools.partial(self.release_nowait, repeat=repeat)
            self._after(lease, done, again, owner, lockspace, resource)
            return None
        self.release_lease_nowait(lease, "release", None, done)
        return None

    async def release_lease(self, lease: Lease, event: str, reason: str | None) -> None:
        """Journal the end of a lease, then drop its kernel lock (DESIGN §4 rule 2)."""
        await self._wait(self.release_lease_nowait, lease, event, reason)

    def release_lease_nowait(
        self, lease: Lease, event: str, reason: str | None, done: Done
    ) -> None:
        """:meth:`release_lease` without a coroutine: ``done(released_wire(lease), None)``
        once the release is journaled and the lock dropped."""
        lease.apply(Event.RELEASE)
        lease.settled = self.in_flight
        failpoint.hit("release.before-commit")
        if lease.lockspace != DIRECT and lease.lockspace in self.shared_io:
            # the reply waits for the unlock in the storage thread
            done = self.shared_io[lease.lockspace].after_close(lease, done)
        self.commit.add(
            end_writes(lease, event, reason), self._released, (lease, event, reason), done
        )

    def _released(
        self, step: tuple[Lease, str, str | None], error: JournalError | None
    ) -> dict[str, Any]:
        """After the release's commit: drop the lock (or keep it: the commit failed); the
        answer is Release's reply."""
        lease, event, reason = step
        if error is not None:
            lease.apply(Event.FAILED)
            self.settle(lease)
            raise error
        lease.apply(Event.COMMITTED)
        if event == "release":
            self.counters.releases += 1
        else:
            self.counters.force_releases += 1
        failpoint.hit("release.after-commit")
        self._drop(lease)
        failpoint.hit("release.after-close")
        if lease.settled is self.in_flight:  # nobody waits for it (the usual case)
            lease.settled = None
        else:
            self.settle(lease)
        if log.isEnabledFor(logging.DEBUG):
            _log_lease("released %s %s token %d", lease, event)
        if event != "release":
            self.publish(lease.owner, lease.as_event(event, reason, time.time()))
        return released_wire(lease)

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
        ls = self.lockspaces.resolve(lockspace, resource)
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
                await asyncio.shield(self.settled(lease))
            if lease.state in (State.HELD, State.LOST):
                await self.release_lease(lease, "force-release", "released by an administrator")
                out.append(released_wire(lease))
        return out

    # -- queries and lockspaces -------------------------------------------------------------
    def held_by(self, owner: Owner, lockspace: str | None, resource: str) -> Lease | None:
        """The owner's lease on the resource (by file identity, or by the name it was taken
        with if the file is gone), or None."""
        ls = self.lockspaces.resolve(lockspace, resource)
        return self._find(owner, ls, resource)[0]

    def holders(self, lockspace: str | None, resource: str) -> list[Lease]:
        """Every lease on the resource, whoever holds it."""
        ls = self.lockspaces.resolve(lockspace, resource)
        rkey = self.lockspaces.key(ls, resource)
        if rkey is not None:
            return self.table.holders(ls, rkey)
        # the file is gone: match by the name the leases were taken with
        return [x for x in self.table.leases() if x.lockspace == ls and x.resource == resource]

    async def add_lockspace(self, name: str, directory: str) -> bool:
        """Add a named lockspace (lease files named by the client, lockspace.py) at run time,
        journaled so that it outlives a restart. False if it exists already. The directory
        must exist (the caller makes it, with the errors its protocol wants). Its storage is
        checked first, also for one that exists (InvalidResource: refused,
        lockd/service/sharedfs.py)."""
        if self.admit_lockspace is not None:
            self.admit_lockspace(name, directory)
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
        lease.lost = (time.time(), reason)
        lease.settled = self.in_flight
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
            self._close(lease)
        self.settle(lease)
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
        self.publish(lease.owner, self.lost_event(lease))
        if lease.owner.uuid in self.table.owners:
            self.fence(lease.owner, [lease])

    def lost_event(self, lease: Lease) -> dict[str, Any]:
        """The Watch event of a lost lease, with the loss's own time and reason (what a
        subscriber is sent again when it subscribes later). A loss found by this daemon
        (at run time, or by its recovery) is kept on the lease; one journaled before this
        daemon started is read back from the journal's history once, in one query for all of
        that owner's lost leases (~17 ms over 100,000 events, measured); a loss that history
        no longer holds (pruned) gets a reason that says so."""
        if lease.lost is None:
            pending = {
                x.token: x
                for x in lease.owner.leases.values()
                if x.state is State.LOST and x.lost is None
            }
            # one lease (the usual case): its owner's events on its resource alone
            only = lease.resource if len(pending) == 1 else None
            events = self.journal.history(
                self.config.history_retention, owner=lease.owner.uuid, resource=only
            )
            for e in events[::-1]:  # newest first
                found = pending.pop(e["token"], None) if e["event"] == "lost" else None
                if found is not None:
                    found.lost = (float(e["at"]), str(e["reason"] or LOST_EARLIER))
            for x in pending.values():
                x.lost = (self.started_at, LOST_EARLIER)
        assert lease.lost is not None
        at, reason = lease.lost
        return lease.as_event("lost", reason, at)

    # -- helpers --------------------------------------------------------------------------
    def _drop(self, lease: Lease) -> None:
        """After the release is journaled: FDSTOREREMOVE, unlock, close, forget."""
        if lease.fd is not None:
            if self.fdstore.enabled:
                self.fdstore.remove(lease.fdname)
            if lease.lockspace == DIRECT:  # never shared storage's thread (the hot path)
                ofd.unlock_and_close(lease.fd)
                lease.fd = None
            else:
                self._close(lease)
        self.table.remove(lease)
        self.fdnames.give_back(lease.fdname)

    def _close(self, lease: Lease) -> None:
        """Unlock and close the lease's fd: in its lockspace's storage thread if it has one
        (a close on a mount that does not answer waits as long as a lock would)."""
        fd, lease.fd = lease.fd, None
        worker = self.shared_io.get(lease.lockspace) if lease.lockspace != DIRECT else None
        if worker is not None and fd is not None:
            worker.close(lease, fd)
        elif fd is not None:
            ofd.unlock_and_close(fd)

    def settle(self, lease: Lease) -> None:
        """The lease's commit in flight is over: wake whoever waits for it."""
        fut, lease.settled = lease.settled, None
        if fut is not self.in_flight and fut is not None and not fut.done():
            fut.set_result(None)

    def settled(self, lease: Lease) -> asyncio.Future[None]:
        """A future done when the lease's commit in flight (``lease.settled`` set) settles."""
        fut = lease.settled
        if fut is None:  # nothing in flight: done already
            fut = self.loop.create_future()
            fut.set_result(None)
        elif fut is self.in_flight:  # the first to wait for it
            fut = lease.settled = self.loop.create_future()
        return fut

    def _after(self, lease: Lease, done: Done, nowait: Callable[..., Any], *args: Any) -> None:
        """Wait until a lease in flight settled, then start the request over; its answer
        goes to ``done`` as if it had not waited."""

        async def again() -> None:
            await asyncio.shield(self.settled(lease))
            try:
                answer = nowait(*args, done)
            except Exception as exc:
                done(None, exc)
            else:
                if answer is not None:
                    done(answer, None)

        self.loop.create_task(again())

    async def _wait(self, nowait: Callable[..., T | None], *args: Any) -> T:
        """Await a ``*_nowait`` call's answer (for callers that await)."""
        fut: asyncio.Future[T] = self.loop.create_future()
        answer = nowait(*args, resolving(fut))
        if answer is not None:
            return answer
        return await fut
