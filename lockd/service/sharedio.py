"""Lockspaces on shared storage that stop answering: their blocking file operations off
the event loop, with a bound.

Theory of operation. The kernel's ``open`` and ``fcntl`` on a network or FUSE mount do not
time out: a GlusterFS brick that stops answering
holds them until the client's ``network.ping-timeout`` (42 s by default), an NFS hard mount
for ever. On the event loop that stalls every client of lockd, local disks included, and
systemd's watchdog aborts a daemon that hangs again in recovery. So the blocking file
operations of lockspaces on shared storage (the indirect and named ones
:class:`lockd.service.sharedfs.Verifier` classifies as shared) run in one thread per lockspace, in
order, and each acquire waits at most :data:`SHARED_IO_TIMEOUT` seconds: then it fails with
``LimitExceeded`` (limit ``shared-storage-timeout``) naming the lockspace, and while that
thread is still stuck, later ones fail at once the same way (one thread per hung lockspace,
no queue growing behind it). A lock that arrives after its caller gave up is closed in that
thread; nothing was granted. Releases there close their fd in that thread too (after the
release is journaled, as DESIGN §4 orders). Local lockspaces and the direct lockspace never
go through it: their path is unchanged, one dictionary lookup more for an indirect request.

Recovery uses the same threads before the loop serves (:meth:`StorageWorker.call_sync`): a
stored fd whose check does not answer is adopted unchecked (the verifier probes it later), and
a lease that must be locked again and cannot be in time stays *recovering*
(:func:`retake_in_background`): its lockspace's thread locks it once the storage answers
(held, continuity ``retaken``) or finds it taken (lost, fenced); requests for it wait
meanwhile, as for a commit in flight. Nothing is declared lost because storage was slow.

Invariants: a lock that arrives after its caller gave up is unlocked and closed in the thread,
never granted; one thread per lockspace, so a hung one holds one thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from lockd.errors import InvalidResource, LimitExceeded, PermissionDenied, ResourceBusy
from lockd.journaling.groupcommit import Done, GroupCommit, resolving
from lockd.journaling.journal import lease_event
from lockd.locks import ofd
from lockd.locks.leases import Event, Lease, LeaseTable
from lockd.locks.lockspace import Lockspaces
from lockd.systemd.notify import FdStore

log = logging.getLogger("lockd")
T = TypeVar("T")
# seconds an acquire waits for shared storage: well under the clients' own timeouts (lockctl
# 30 s) and GlusterFS's ping-timeout (42 s), so the caller hears why before it gives up
SHARED_IO_TIMEOUT = 10
RECOVERY_WAIT = 1.0  # seconds, at start-up (StorageWorker.call_sync)
RETRY_EVERY = 1.0  # seconds between two tries of a background re-take

# the thread's way to hand a result (or an exception) back to the caller
Deliver = Callable[[Any, "BaseException | None"], None]


class LockService(Protocol):
    """What this module uses of :class:`lockd.service.service.LockService`, which calls it
    (described here rather than imported, so the two modules do not import each other)."""

    loop: asyncio.AbstractEventLoop
    lockspaces: Lockspaces
    table: LeaseTable
    commit: GroupCommit
    fdstore: FdStore
    in_flight: asyncio.Future[None]
    shared_io: dict[str, StorageWorker]

    async def acquire(self, *request: Any) -> Lease: ...

    def busy(self, ls: str, resource: str, mode: str) -> ResourceBusy: ...

    def grant(self, *args: Any) -> None: ...

    def lease_lost(self, lease: Lease, reason: str) -> asyncio.Task[None]: ...

    def settle(self, lease: Lease) -> None: ...

    def settled(self, lease: Lease) -> asyncio.Future[None]: ...


class _Job:
    __slots__ = ("fn", "deliver", "abandon", "state")

    def __init__(
        self, fn: Callable[[], Any], deliver: Deliver | None, abandon: Callable[[Any], None] | None
    ) -> None:
        self.fn, self.deliver, self.abandon = fn, deliver, abandon
        self.state = "pending"  # -> "done" (the thread delivers) or "expired" (the caller gave up)


class StorageWorker:
    """The blocking file operations of one lockspace on shared storage, in a thread of its
    own (the module docstring). Its thread starts at the first call."""

    def __init__(
        self, lockspace: str, loop: asyncio.AbstractEventLoop, directory: str = ""
    ) -> None:
        self.lockspace = lockspace
        self.loop = loop
        self.directory = directory
        self.timeout: float = SHARED_IO_TIMEOUT
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._guard = threading.Lock()  # a job's state: the caller's timeout and the thread race
        self._thread: threading.Thread | None = None
        # when the call in progress began (None: idle): a stuck thread fails new calls at once
        self.busy_since: float | None = None
        # lease -> its unlock in progress here, which the release's reply waits for
        self.closing: dict[Lease, asyncio.Future[None]] = {}

    def _timeout_error(self, what: str) -> LimitExceeded:
        return LimitExceeded(
            f"lockspace {self.lockspace}: its shared storage {what}; "
            "nothing was granted, retry once the storage answers",
            limit="shared-storage-timeout",
            value=int(self.timeout),
            lockspace=self.lockspace,
        )

    def _check_stuck(self, timeout: float) -> None:
        since = self.busy_since
        if since is not None and time.monotonic() - since > timeout:
            raise self._timeout_error(
                f"has not answered a call for {time.monotonic() - since:.0f} s"
            )

    def _expire(self, job: _Job) -> bool:
        """The caller gives up on ``job``: True if it was still pending (then the thread
        abandons its result), False if the thread delivered first."""
        with self._guard:
            if job.state != "pending":
                return False
            job.state = "expired"
            return True

    def call(
        self, fn: Callable[[], T], abandon: Callable[[T], None] | None = None
    ) -> asyncio.Future[T]:
        """``fn()`` in the thread; the future fails with LimitExceeded after ``timeout``
        seconds, and ``abandon(result)`` then runs in the thread if ``fn`` returns later."""
        self._check_stuck(self.timeout)
        fut: asyncio.Future[T] = self.loop.create_future()

        def deliver(result: Any, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        def hand_over(result: Any, exc: BaseException | None) -> None:  # in the thread
            self.loop.call_soon_threadsafe(deliver, result, exc)

        job = _Job(fn, hand_over, abandon)
        self._put(job)

        def expire() -> None:
            if self._expire(job) and not fut.done():
                fut.set_exception(self._timeout_error(f"did not answer within {self.timeout:g} s"))

        handle = self.loop.call_later(self.timeout, expire)
        fut.add_done_callback(lambda _: handle.cancel())
        return fut

    def call_sync(
        self,
        fn: Callable[[], T],
        abandon: Callable[[T], None] | None = None,
        timeout: float = RECOVERY_WAIT,
    ) -> T:
        """:meth:`call` for a caller without the event loop (recovery and the classification
        at start-up, before lockd serves: clients wait in the backlog meanwhile, so the bound
        is short; what does not answer is taken care of in the background)."""
        self._check_stuck(timeout)
        done = threading.Event()
        out: list[Any] = []

        def deliver(result: Any, exc: BaseException | None) -> None:
            out.extend((result, exc))
            done.set()

        job = _Job(fn, deliver, abandon)
        self._put(job)
        if not done.wait(timeout):
            if self._expire(job):
                raise self._timeout_error(f"did not answer within {timeout:g} s")
            done.wait()  # the thread delivered just now
        result, exc = out
        if exc is not None:
            raise exc
        return result  # type: ignore[no-any-return]

    # -- what the lock service does here (lockd/service/service.py) --------------------------------

    def acquire(
        self, service: LockService, request: tuple[Any, ...], ls: str, rkey: str, done: Done
    ) -> None:
        """An acquire's lock taken here, then granted as any other: ``done(lease, None)``
        once journaled, ``done(None, error)`` if refused (as LockService.acquire_nowait)."""

        async def run() -> None:
            try:
                lease = await self._acquire(service, request, ls, rkey)
            except Exception as exc:
                done(None, exc)
            else:
                done(lease, None)

        self.loop.create_task(run())

    async def _acquire(
        self, service: LockService, request: tuple[Any, ...], ls: str, rkey: str
    ) -> Lease:
        """The table is looked at again after the lock: it may have changed while the
        storage answered."""
        owner, _, resource, mode = request[:4]
        lock = functools.partial(service.lockspaces.lock, ls, resource, rkey, mode == "exclusive")
        try:
            locked = await self.call(lock, abandon=lambda got: ofd.unlock_and_close(got.fd))
        except ResourceBusy:
            if (ls, rkey) in owner.leases:  # a repeat of a request granted meanwhile
                return await service.acquire(*request)
            raise service.busy(ls, resource, mode) from None
        if owner.uuid not in service.table.owners or (ls, rkey) in owner.leases:
            # the owner died, or a repeat was granted, meanwhile: answer as for those
            self.detach(functools.partial(ofd.unlock_and_close, locked.fd))
            return await service.acquire(*request)
        granted: asyncio.Future[Lease] = self.loop.create_future()
        service.grant(owner, ls, resource, rkey, mode, locked, resolving(granted))
        return await granted

    def close(self, lease: Lease, fd: int) -> None:
        """A released (or lost) lease's unlock and close, here; a release's reply waits for
        it (:meth:`replied`)."""
        close = functools.partial(ofd.unlock_and_close, fd)
        try:
            closed = self.call(close)
        except LimitExceeded:  # stuck: closed once the storage answers
            self.detach(close)
            return
        self.closing[lease] = closed

        def done(f: asyncio.Future[None]) -> None:
            self.closing.pop(lease, None)
            if not f.cancelled():
                f.exception()  # retrieved: the reply does not depend on it

        closed.add_done_callback(done)

    def after_close(self, lease: Lease, done: Done) -> Done:
        """A release's ``done``, called after the unlock here (DESIGN §4 rule 2) or after
        the bound: a storage that does not answer keeps the lock until it does (held
        longer, never shorter), and the release stands (journaled)."""

        def after(answer: Any, failure: BaseException | None) -> None:
            # the group commit calls this after the release's step, which queued the close
            closed = self.closing.get(lease)
            if closed is None or failure is not None:
                done(answer, failure)
            else:
                closed.add_done_callback(lambda _: done(answer, None))

        return after

    def detach(self, fn: Callable[[], object]) -> None:
        """``fn()`` in the thread, nobody waiting (a close after a release was journaled)."""
        self._put(_Job(fn, None, None))

    def _put(self, job: _Job) -> None:
        self._jobs.put(job)
        if self._thread is None:
            # a daemon thread: a stop must not wait for a hung mount (an executor's would)
            self._thread = threading.Thread(
                target=self._run, name=f"lockd-storage {self.lockspace}", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            self.busy_since = time.monotonic()
            result: Any = None
            exc: BaseException | None = None
            try:
                result = job.fn()
            except BaseException as e:  # delivered to the caller
                exc = e
            self.busy_since = None
            if job.deliver is None:
                continue
            with self._guard:
                expired = job.state == "expired"
                job.state = "done"
            if expired:
                if exc is None and job.abandon is not None:
                    # a failed close (the storage gone) took the lock with it
                    with contextlib.suppress(OSError):
                        job.abandon(result)
                continue
            try:
                job.deliver(result, exc)
            except RuntimeError:  # the loop closed meanwhile
                return


def retake_in_background(service: LockService, lease: Lease) -> asyncio.Task[None]:
    """A lease recovery could not lock again in time (module docstring): it stays
    recovering, busy for requests (``settled``), until its lockspace's thread locks it or
    finds it taken."""
    lease.settled = service.in_flight
    return service.loop.create_task(_retake(service, lease))


async def _retake(service: LockService, lease: Lease) -> None:
    worker = service.shared_io[lease.lockspace]
    args = (lease.lockspace, lease.resource, lease.rkey, lease.exclusive, lease.path)
    lock = functools.partial(service.lockspaces.lock, *args)
    while True:
        try:
            locked = await worker.call(lock, abandon=lambda got: ofd.unlock_and_close(got.fd))
            break
        except LimitExceeded:  # still no answer: try again (at once refused while stuck)
            await asyncio.sleep(RETRY_EVERY)
        except (ResourceBusy, InvalidResource, PermissionDenied, OSError) as exc:
            why = "taken by another holder" if isinstance(exc, ResourceBusy) else str(exc)
            waiting = service.settled(lease)  # lease_lost settles what was in flight
            lease.settled = None
            await service.lease_lost(lease, f"cannot lock again once the storage answered: {why}")
            if not waiting.done():
                waiting.set_result(None)
            return
    lease.fd = locked.fd
    service.fdstore.add(lease.fdname, locked.fd)
    lease.apply(Event.RETAKE)
    lease.continuity = "retaken"
    while True:
        try:
            await service.commit.submit(
                lease_event("retaken", lease, "locked again once its storage answered")
            )
            break
        except OSError:  # JournalError: the lock is held either way; the record must be made
            await asyncio.sleep(0.5)
    service.settle(lease)
    log.info(
        "lease on %s of owner %s re-taken once its storage answered",
        lease.resource,
        lease.owner.name,
        extra={"LOCKD_RESOURCE": lease.resource, "LOCKD_EVENT": "retaken"},
    )
