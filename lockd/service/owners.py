"""Owners of the lock service: registration, the watch on their processes, fencing, Watch.

Theory of operation: :class:`Owners` is the half of :class:`lockd.service.service.LockService` that
deals with owner processes rather than leases (LockService inherits it; front ends call these
methods on the service, as before). An owner is a process, named by a uuid (given, or derived
from boot id, pid and start time, so registering one process twice without a uuid names the
same owner), journaled with its fence policy.

- ``register`` checks the process (it exists, ``pid`` > 1, the peer may name it: a non-root
  peer only processes of its own uid), journals the owner and opens a pidfd whose readiness
  is its death (``watch_owner``). Registering again is idempotent and may rename the owner,
  change its fence policy or its ``domain_id`` (the VM manager's own number for it, libvirt's
  domain id). A uuid whose process has exited but whose death is not processed yet does not
  block a new process under it: that death is finished first (``owner_gone``), then the new
  process registers -- a VM manager restarts a VM under the same uuid at once.
- A death is started once per owner (``owner_gone``: the task is kept on ``Owner.dying``);
  what it releases, in crash-protocol order, is the lease side's
  (:meth:`lockd.service.service.LockService.owner_died`).
- ``unregister`` forgets an owner that holds no lease (lockctl's undo of a Register whose
  Acquire failed); leases end only by a release, the owner's death or an administrator.
- ``fence`` applies an owner's policy when it lost a lease (``kill``: SIGKILL; ``term``:
  SIGTERM, then SIGKILL after ``fence_grace``; ``none``: a warning), signalling through the
  pidfd so a reused pid is never hit. ``subscribe`` / ``publish``: the owner's Watch queues;
  a watcher that does not read loses events, not our memory.

Invariants: a request of a non-root peer touches only owners of its own uid; an owner in the
table has a pidfd watched, until its death starts or it is forgotten; an owner dies once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid as uuidlib
from collections.abc import Iterable
from typing import Any

from lockd.config import FENCE_POLICIES, Config
from lockd.errors import (
    InvalidParameter,
    JournalError,
    LimitExceeded,
    NoSuchOwner,
    PermissionDenied,
)
from lockd.journaling.groupcommit import GroupCommit
from lockd.journaling.journal import delete_owner, owner_event, put_owner
from lockd.locks import process
from lockd.locks.leases import Lease, LeaseTable, Owner
from lockd.service.counters import Counters

log = logging.getLogger("lockd")

# Owner uuids derived from (boot id, pid, start time) live in this namespace, so registering
# one process twice without a uuid names the same owner.
OWNER_NAMESPACE = uuidlib.UUID("6c0c4a0e-7d5b-4c8e-9a51-0f3c1d2b9e77")


class Owners:
    """LockService's owner side (see the module docstring); the state is LockService's."""

    config: Config
    table: LeaseTable
    commit: GroupCommit
    loop: asyncio.AbstractEventLoop
    counters: Counters
    # owner uuid -> done when its first registration is journaled
    _registering: dict[str, asyncio.Future[None]]
    # owner uuid -> queues of Watch subscribers
    watchers: dict[str, set[asyncio.Queue[dict[str, Any]]]]

    async def owner_died(self, owner: Owner, reason: str) -> None:
        """Release every lease of a dead owner: LockService's (lease side)."""
        raise NotImplementedError

    # -- registration -------------------------------------------------------------------
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
        # readable once the process exited: start its death (owner_gone removes this reader)
        self.loop.add_reader(pidfd, self.owner_gone, owner, "owner exited")
        return True

    def stop_watching_owners(self) -> None:
        """At a clean stop, before the journal closes: no owner's death is processed any
        more (its release would be a commit to a closed journal). The dead owner's leases
        stay journaled, and the next start's recovery releases them."""
        for owner in self.table.owners.values():
            if owner.pidfd is not None:
                self.loop.remove_reader(owner.pidfd)

    def forget_owner(self, owner: Owner) -> None:
        self.table.remove_owner(owner)
        if owner.pidfd is not None:
            self.loop.remove_reader(owner.pidfd)
            os.close(owner.pidfd)
            owner.pidfd = None

    def owner_gone(self, owner: Owner, reason: str) -> asyncio.Task[None]:
        """Start releasing a dead owner's leases (once: a second call gets the same task)."""
        if owner.dying is None:
            if owner.pidfd is not None:
                self.loop.remove_reader(owner.pidfd)
            owner.dying = self.loop.create_task(self.owner_died(owner, reason))
        return owner.dying

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
                self.owner_gone(owner, "owner exited")  # one death per owner, as elsewhere
            raise

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
