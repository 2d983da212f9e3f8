"""Recovery: start-up after a crash, before the first request is accepted (DESIGN §5).

Theory of operation: the journal says which leases were granted and not released. For each
one, in journal order:

1. its owner is dead (the pid is gone, or its start time or boot id differ) -> release it;
2. its fd came back from systemd's fd store (matched by FDNAME, never by position) -> held,
   continuity ``kept``: the kernel lock never dropped; unless locking it again fails with an
   errno of :data:`lockd.locks.ofd.LOCK_DROPPED_ERRNOS` (EBADFD: a shared filesystem dropped the
   lock while the fd sat in the store) -> ``lost``, as someone may have held it meanwhile;
3. otherwise open and lock again -> held, continuity ``retaken`` (a gap: the lock was free
   between our death and now), or EAGAIN / the file is gone -> ``lost``, and the owner's
   fence policy runs once the loop is up.

A journal written under another boot id is closed out as ``host-rebooted`` without looking
at a single lease: every owner died with the host and so did every lock (§4.3).

All decisions are committed in one transaction before any stored fd is closed, so a crash
during recovery (the ``recovery.*`` failpoints) leaves a journal that the next recovery
handles the same way: recovery is idempotent. Clients that connect meanwhile wait in the
listen backlog; nobody sees a half-recovered table.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from lockd import failpoint
from lockd.errors import InvalidResource, LimitExceeded, PermissionDenied, ResourceBusy
from lockd.journaling.journal import (
    Journal,
    Write,
    delete_owner,
    lease_event,
    owner_event,
    set_lease_state,
    set_meta,
)
from lockd.locks import ofd, process
from lockd.locks.leases import Event, Lease, LeaseTable, Owner, State
from lockd.locks.lockspace import DIRECT, Lockspaces, direct_key
from lockd.service.sharedio import StorageWorker

log = logging.getLogger("lockd")
EXCLUSIVE, SHARED = "exclusive", "shared"


@dataclass
class Report:
    at: float = 0.0
    duration_ms: float = 0.0
    adopted: int = 0
    retaken: int = 0
    lost: int = 0
    released: int = 0
    host_rebooted: int = 0

    def wire(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.adopted} kept, {self.retaken} re-taken, {self.lost} lost, "
            f"{self.released} released (owner dead) in {self.duration_ms:.0f} ms"
        )


@dataclass
class Outcome:
    table: LeaseTable
    report: Report
    last_token: int
    # owners with lost leases, to fence once the event loop runs
    to_fence: dict[str, list[Lease]]
    # leases whose shared storage did not answer in time: re-taken in the background
    # (lockd/service/sharedio.py), recovering meanwhile
    pending: list[Lease]


def _owner(row: dict[str, Any]) -> Owner:
    return Owner(
        uuid=row["uuid"],
        name=row["name"],
        pid=row["pid"],
        uid=row["uid"],
        start_time=row["start_time"],
        boot_id=row["boot_id"],
        fence=row["fence"],
        registered_at=row["registered_at"],
        domain_id=row.get("domain_id"),
    )


def _adopt(fd: int, lease: Lease) -> bool | str:
    """Use a stored fd if it is the right file; it already holds the lock (same OFD).
    True: adopt it; False: not usable, lock the file again; a string: the filesystem dropped
    the lock on this fd (a shared lockspace, DESIGN §2), which makes the lease lost."""
    try:
        st = os.fstat(fd)
        if lease.lockspace == DIRECT and direct_key(st.st_dev, st.st_ino) != lease.rkey:
            return False
        # Setting the lock we already hold on this open file description is a no-op that
        # proves we hold it; EAGAIN here would mean the fd is not the one that held it.
        ofd.relock(fd, lease.exclusive, lease.resource)
    except ResourceBusy:
        return False
    except OSError as exc:
        if exc.errno in ofd.LOCK_DROPPED_ERRNOS:
            # (GlusterFS: EBADFD once the client lost the brick connection, which released
            # every lock of that client; someone may have held the resource since)
            return f"the filesystem dropped the lock ({errno.errorcode[exc.errno]})"
        return False
    return True


def recover(
    journal: Journal,
    lockspaces: Lockspaces,
    stored: dict[str, int],
    workers: dict[str, StorageWorker] | None = None,
) -> Outcome:
    """Rebuild the lease table from the journal. ``stored``: FDNAME -> fd from the fd store;
    the fds used are removed from it, the rest are strays for the caller to close.
    ``workers``: the lockspaces on shared storage, whose lease files are touched only in
    their own thread, with a bound (lockd/service/sharedio.py): a stored fd whose check does not
    answer is adopted unchecked (the verifier probes it once the loop runs); a lease that
    must be locked again and cannot be in time stays recovering (``Outcome.pending``)."""
    t0 = time.monotonic()
    report = Report(at=time.time())
    boot = process.boot_id()
    snap = journal.load()
    writes: list[Write] = []
    events: list[Write] = []
    journal_boot = snap.meta.get("boot_id")
    if journal_boot is not None and journal_boot != boot and journal.has_leases():
        with journal.transaction():
            report.host_rebooted = journal.close_all(
                "host-rebooted", f"journal written during boot {journal_boot}"
            )
            journal.set_meta("boot_id", boot)
        log.warning(
            "journal is from boot %s: closed %d leases as host-rebooted",
            journal_boot,
            report.host_rebooted,
            extra={"LOCKD_EVENT": "host-rebooted"},
        )
        snap = journal.load()
    last_token = int(snap.meta.get("last_token", "0"))
    failpoint.hit("recovery.before-replay")

    table = LeaseTable()
    owners = {row["uuid"]: _owner(row) for row in snap.owners}
    alive = {u: process.is_same_process(o.pid, o.start_time, o.boot_id) for u, o in owners.items()}
    to_fence: dict[str, list[Lease]] = {}
    pending: list[Lease] = []
    first_retake = True
    # the row's columns: journal.LEASE_COLUMNS
    for token, uuid, ls, rkey, resource, path, mode, state, at, fdname in snap.leases:
        owner = owners[uuid]
        lease = Lease(
            owner=owner,
            lockspace=ls,
            rkey=rkey,
            resource=resource,
            # one string for both when they are equal, as in the daemon that journaled it
            path=resource if path == resource else path,
            # the constants, not 10,000 copies of them read from the rows
            mode=EXCLUSIVE if mode == EXCLUSIVE else SHARED,
            token=token,
            acquired_at=at,
            fdname=fdname,
            state=State.RECOVERING,
        )
        last_token = max(last_token, lease.token)
        fd = stored.pop(lease.fdname, None)
        if not alive[owner.uuid]:
            lease.apply(Event.OWNER_DEAD)
            report.released += 1
            if fd is not None:
                stored[lease.fdname] = fd  # closed by the caller after this commit
            events.append(lease_event("owner-dead", lease, "owner exited while lockd was down"))
            continue
        if state == "lost":
            lease.apply(Event.LOSE)
            lease.continuity = "lost"
            table.add(lease)
            if fd is not None:
                stored[lease.fdname] = fd
            continue
        worker = workers.get(ls) if workers else None
        if fd is None:
            adopted: bool | str = False
        elif worker is None:
            adopted = _adopt(fd, lease)
        else:
            try:
                adopted = worker.call_sync(functools.partial(_adopt, fd, lease))
            except LimitExceeded as exc:
                log.warning(
                    "lease on %s adopted unchecked: %s",
                    lease.resource,
                    exc,
                    extra={"LOCKD_RESOURCE": lease.resource, "LOCKD_EVENT": "storage-timeout"},
                )
                adopted = True
        if adopted is True:
            lease.fd = fd
            lease.apply(Event.ADOPT)
            lease.continuity = "kept"
            report.adopted += 1
        else:
            if fd is not None:
                stored[lease.fdname] = fd
            reason = adopted or None
            if reason is None:
                args = (lease.lockspace, lease.resource, lease.rkey, lease.exclusive, lease.path)
                try:
                    if worker is None:
                        locked = lockspaces.lock(*args)
                    else:
                        locked = worker.call_sync(
                            functools.partial(lockspaces.lock, *args),
                            lambda got: ofd.unlock_and_close(got.fd),
                        )
                except LimitExceeded as exc:
                    if worker is None or exc.parameters.get("limit") != "shared-storage-timeout":
                        raise
                    log.warning(
                        "lease on %s re-taken once its storage answers: %s",
                        lease.resource,
                        exc,
                        extra={"LOCKD_RESOURCE": lease.resource, "LOCKD_EVENT": "storage-timeout"},
                    )
                    pending.append(lease)
                    table.add(lease)
                    continue
                except (ResourceBusy, InvalidResource, PermissionDenied) as exc:
                    # (LimitExceeded, out of fds, is not a loss: it propagates and the daemon
                    # stops with the journal untouched, to be recovered with a higher limit)
                    reason = (
                        "taken by another holder while lockd was down"
                        if isinstance(exc, ResourceBusy)
                        else f"cannot lock again: {exc}"
                    )
                else:
                    lease.fd = locked.fd
                    lease.apply(Event.RETAKE)
                    lease.continuity = "retaken"
                    report.retaken += 1
                    events.append(lease_event("retaken", lease, "locked again after a gap"))
                    if first_retake:
                        first_retake = False
                        failpoint.hit("recovery.mid-replay")
            if reason is not None:
                lease.apply(Event.LOSE)
                lease.continuity = "lost"
                lease.lost = (time.time(), reason)
                report.lost += 1
                writes.append(set_lease_state(lease.token, "lost"))
                events.append(lease_event("lost", lease, reason))
                to_fence.setdefault(owner.uuid, []).append(lease)
                log.error(
                    "lease on %s of owner %s lost: %s",
                    lease.resource,
                    owner.name,
                    reason,
                    extra={
                        "LOCKD_RESOURCE": lease.resource,
                        "LOCKD_OWNER": owner.uuid,
                        "LOCKD_TOKEN": lease.token,
                        "LOCKD_EVENT": "lost",
                    },
                )
        table.add(lease)

    dead = [o for u, o in owners.items() if not alive[u]]
    for owner in dead:
        writes += delete_owner(owner.uuid)
        events.append(
            owner_event("owner-dead", owner.uuid, owner.pid, "owner exited while lockd was down")
        )
    for u, o in owners.items():
        if alive[u]:
            table.add_owner(o)
    # state changes, then the events in one run (one executemany for thousands of leases)
    writes += events
    writes.append(set_meta("boot_id", boot))
    writes.append(set_meta("last_token", str(last_token)))
    journal.commit(writes)
    report.duration_ms = (time.monotonic() - t0) * 1000
    return Outcome(table, report, last_token, to_fence, pending)
