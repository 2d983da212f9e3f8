"""Lockspaces on shared storage: what filesystem each one is on, whether that mount can drop
a lock without telling, and the periodic verification of the leases held there.

Theory of operation. Several hosts that share storage are kept apart by the shared
filesystem's own lock manager, through indirect lockspaces on it (DESIGN §2). Such a lock
manager can drop a lock that lockd holds: the storage connection breaks, the server releases
the client's locks, and another host takes the resource. Three things here:

1. **Classification** (:func:`classify`), at start-up and on every verification: the mount
   that holds the lockspace's directory, from ``/proc/self/mountinfo`` (matched by device
   number, then by the longest mount point). A lockspace is *shared* if its filesystem type
   is a network, cluster or FUSE filesystem (:data:`SHARED_FSTYPES`, any ``fuse.*``), or if
   the configuration says so (``shared_lockspaces``). Local lockspaces are never looked at
   again and cost nothing. That is every configured lockspace, and every *named* one
   (lockspace.py): those libvirtd creates over virtlockd's protocol (CREATE_LOCKSPACE for
   its ``file_lockspace_dir``, whose whole point is lease files on shared storage), named by
   their directory, journaled, classified again at each start-up from the journal and when
   they are created or asked for again (:meth:`Verifier.admit_lockspace`).

2. **Mounts that drop locks silently are refused.** A GlusterFS client (``fuse.glusterfs``)
   with ``client.strict-locks off`` -- the default -- reopens its fds after a reconnect
   *without* their locks and tells nobody: the brick released them at the disconnect, another
   host may hold the resource, and both believe they do (measured here with GlusterFS 10.3;
   the option's own description in xlators/protocol/client/src/client.c says why it exists).
   That is the one failure lockd exists to prevent, and the fix is one volume option, so the
   decision is to **refuse**: a new lease in such a lockspace is ``InvalidResource`` naming
   the mount and the fix, and lockd logs an error at start-up and at each refused use
   (at most once a minute per lockspace). Leases already journaled there are still re-taken
   at recovery (refusing them would fence running VMs) and verified. The escape hatch
   ``allow_unsafe_storage = ["name"]`` turns the refusal into warnings (at start-up and at
   use). The option is read from the client itself: its active translator graph under the
   mount's ``.meta/graphs/active/`` (the meta translator, present on every FUSE mount), the
   ``options/strict-locks`` file of each ``protocol/client`` translator; glusterd 10.3 writes
   the option into every client volfile, and a missing file means the default, off. A
   ``gluster volume set`` applied to a running client reconfigures it without updating that
   view (seen here: the client behaved as ``on`` while ``.meta`` still said ``off``), so the
   verdict is the option the mount was made with: remount after changing it. Mounts whose
   fcntl locks never leave this host are refused the same way, from their options in
   mountinfo (:func:`local_locks`: NFS ``nolock`` / ``local_lock=posix|all``, GFS2
   ``localflocks`` / ``lockproto=lock_nolock``; read from the man pages, not tried here).

   A named lockspace on such a mount is refused at its creation too: CREATE_LOCKSPACE (and
   NEW) answer virtlockd's error reply VIR_ERR_OPERATION_UNSUPPORTED ("Operation not
   supported: lockspace DIR is on ..., which ...; fix: ...") and nothing is journaled; the
   same answer when libvirtd asks again for one lockd already has (it does at each of its
   starts), whose leases stay (re-taken at recovery, verified) while its new leases are
   refused as in a configured lockspace. Refusing the lockspace itself, not only its
   leases: it could never grant one, and libvirt's lock driver fails to initialize on an
   error from CREATE_LOCKSPACE (``virLockManagerLockDaemonInit``, lock_driver_lockd.c), so
   the mistake shows in libvirtd's log when it starts, not at some later ``virsh start``.
   ``allow_unsafe_storage`` and ``shared_lockspaces`` name such a lockspace by its
   directory (an absolute path: the name libvirt gives it); allowed, it is created, with a
   warning at creation and at use.

3. **Verification** (:class:`Verifier`), every ``verify_interval`` seconds, of every held
   lease in a shared lockspace, :data:`SLICE` leases at a time in a thread of its own (one
   probe through FUSE costs ~55-90 us here). The probes are system calls on the shared
   mount, which a mount that does not answer holds (a GlusterFS request can wait out the
   client's ping timeout): off the event loop, that stalls the verification, not lockd.
   While its slice is probed a lease counts as busy (``Lease.settled``), so a release or an
   owner's death waits for the probe, as for a commit, and no fd is closed under it.

   - ``F_OFD_GETLK`` on the lease's own fd (:func:`lockd.locks.ofd.conflict`): another holder's
     conflicting lock, or an errno of :data:`lockd.locks.ofd.LOCK_DROPPED_ERRNOS` (EBADFD after a
     GlusterFS reconnect, ENOTCONN, EIO, ESTALE), means the lock is gone;
   - on storage not known to report a drop (everything but GlusterFS with strict-locks on):
     also ``F_OFD_GETLK`` from a fresh fd of the lease file (:func:`lockd.locks.ofd.holder`), which
     sees our own lock too: nobody holding the byte means it was dropped silently.

   A loss takes the one lost path (:meth:`LockService.lease_lost`): HELD -> LOST, journaled
   with an event, the fd closed, Watch told, the owner fenced by its policy. GETLK never
   takes a lock, so a probe never changes what it looks at. Acquire and release there run
   in the lockspace's own thread, with a bound (:class:`lockd.service.sharedio.StorageWorker`,
   registered here for every lockspace classified shared).

Invariants: a local lockspace is never probed; a lease is probed only while it is HELD with
no commit in flight, and nothing closes its fd during the probe (it is marked busy); a lease
is declared lost once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from lockd.config import Config
from lockd.errors import InvalidResource, LimitExceeded
from lockd.locks import ofd
from lockd.locks.leases import Lease, State
from lockd.locks.lockspace import Lockspaces
from lockd.service.service import LockService
from lockd.service.sharedio import StorageWorker

log = logging.getLogger("lockd")
T = TypeVar("T")

# Filesystem types (the mountinfo name) whose locks are granted by a server or a cluster lock
# manager, not by this kernel alone: they are shared storage. Any "fuse.*" is shared too (a
# FUSE daemon decides what a lock means).
SHARED_FSTYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "glusterfs",
        "gfs2",
        "ocfs2",
        "ceph",
        "cifs",
        "smb3",
        "lustre",
        "beegfs",
        "gpfs",
        "9p",
        "afs",
    }
)
GLUSTER_FSTYPE = "fuse.glusterfs"
SLICE = 32  # leases probed between two yields to the event loop
WARN_EVERY = 60.0  # seconds between two warnings about one lockspace at use
_ON = frozenset({"on", "yes", "true", "enable", "1"})


@dataclass(frozen=True, slots=True)
class Mount:
    mountpoint: str
    fstype: str
    source: str
    # the per-mount and the superblock options, together
    options: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Storage:
    """What a lockspace's directory is on, and what lockd makes of it."""

    lockspace: str
    directory: str
    mount: Mount | None
    shared: bool
    # why locks on this mount do not keep hosts apart (GlusterFS with strict-locks off drops
    # them silently; local_lock / localflocks keep them on this host), or None
    unsafe: str | None = None
    # True: a dropped lock shows as an error on the lease's fd (GlusterFS, strict-locks on)
    reports_drops: bool = False
    detail: str = ""

    def describe(self) -> str:
        if self.mount is None:
            return f"{self.directory} (mount unknown)"
        m = self.mount
        return f"{self.directory} on {m.fstype} {m.source} at {m.mountpoint}" + (
            f" ({self.detail})" if self.detail else ""
        )


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal)
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[tuple[int, Mount]]:
    """(device number, Mount) for each line of /proc/PID/mountinfo (proc(5))."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            dev = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        options = frozenset(fields[5].split(",") + (tail[2].split(",") if len(tail) > 2 else []))
        out.append((dev, Mount(_unescape(fields[4]), tail[0], _unescape(tail[1]), options)))
    return out


def mount_of(directory: str, mountinfo: str | None = None) -> Mount | None:
    """The mount that holds ``directory`` (or its nearest existing ancestor)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    mounts = parse_mountinfo(mountinfo)
    path = os.path.realpath(directory)
    probe = path
    dev = None
    while dev is None:
        try:
            dev = os.stat(probe).st_dev
        except (FileNotFoundError, NotADirectoryError):
            if probe == "/":
                break
            probe = os.path.dirname(probe)  # not made yet: its parent is on the same mount
        except OSError:
            # ENOTCONN, EIO: the mount is there but does not answer (a FUSE client cut off
            # from its server); an ancestor's device would name the wrong filesystem
            break

    candidates = [m for d, m in mounts if d == dev and _under(path, m)] or [
        m for _, m in mounts if _under(path, m)
    ]
    # the innermost mount; of equal ones, the last mounted (it hides the others)
    return max(candidates, key=lambda m: len(m.mountpoint), default=None)


def _under(path: str, m: Mount) -> bool:
    return path == m.mountpoint or path.startswith(m.mountpoint.rstrip("/") + "/")


def is_shared(fstype: str) -> bool:
    return fstype in SHARED_FSTYPES or fstype.startswith("fuse.")


def storage_workers(
    config: Config, lockspaces: Lockspaces, loop: asyncio.AbstractEventLoop
) -> dict[str, StorageWorker]:
    """A :class:`StorageWorker` for every lockspace on shared storage by its directory's name
    alone (the innermost mount in mountinfo that holds it, compared as strings) or by the
    configuration: found without a system call on the mount, which may not answer. Made
    before recovery touches a lease file; the verifier adds any it finds shared later (a
    directory reached through a symlink)."""
    directories = {**config.lockspaces, **lockspaces.named}
    try:
        mounts = [m for _, m in parse_mountinfo(Path("/proc/self/mountinfo").read_text())]
    except OSError:
        mounts = []
    out = {}
    for ls, directory in directories.items():
        path = os.path.normpath(directory)
        inner = max((m for m in mounts if _under(path, m)), key=lambda m: len(m.mountpoint),
                    default=None)  # fmt: skip
        if ls in config.shared_lockspaces or (inner is not None and is_shared(inner.fstype)):
            out[ls] = StorageWorker(ls, loop, path)
    return out


def close_stray(fd: int, workers: dict[str, StorageWorker]) -> None:
    """Unlock and close a stored fd that no lease claims: in the thread of the shared
    lockspace its file is in, if any (a close there waits as long as a lock would)."""
    path = ofd.real_path(fd) or ""
    for worker in workers.values():
        if path.startswith(worker.directory + "/"):
            worker.detach(functools.partial(ofd.unlock_and_close, fd))
            return
    ofd.unlock_and_close(fd)


def gluster_strict_locks(mountpoint: str) -> tuple[bool | None, str]:
    """Whether every client translator of a GlusterFS mount has strict-locks on, read from
    the mount's active graph (``.meta``). None when it cannot be read."""
    graph = Path(mountpoint, ".meta", "graphs", "active")
    values: list[str] = []
    try:
        for xl in sorted(graph.iterdir()):
            try:
                kind = (xl / "type").read_text().strip()
            except (NotADirectoryError, FileNotFoundError):
                continue
            if kind != "protocol/client":
                continue
            try:
                values.append((xl / "options" / "strict-locks").read_text().strip().lower())
            except FileNotFoundError:
                values.append("off")  # the translator's default (client.c: "off")
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return None, f"cannot read the client graph under {graph}: {name}"
    if not values:
        return None, f"no protocol/client translator under {graph}"
    on = all(v in _ON for v in values)
    return on, "client.strict-locks " + ("on" if on else "off")


GLUSTER_UNSAFE = (
    "can drop a lock without telling (a reconnect reopens files without their locks: "
    "client.strict-locks off); fix: gluster volume set VOLUME client.strict-locks on, then "
    "remount"
)


def local_locks(mount: Mount) -> str | None:
    """Why fcntl locks on a network or cluster mount stay on this host, from its options, or
    None: NFS with ``nolock`` or ``local_lock=posix|all`` (nfs(5): "applications can lock
    files, but such locks provide exclusion only against other applications running on the
    same client"), GFS2 with ``localflocks`` or ``lockproto=lock_nolock`` (gfs2(5))."""
    o = mount.options
    if mount.fstype in ("nfs", "nfs4"):
        for opt in ("nolock", "local_lock=posix", "local_lock=all"):
            if opt in o:
                return f"locks only on this host ({opt}); fix: remount without it"
    if mount.fstype == "gfs2":
        for opt in ("localflocks", "lockproto=lock_nolock"):
            if opt in o:
                return f"locks only on this host ({opt}); fix: remount without it"
    return None


def classify(lockspace: str, directory: str, forced_shared: bool = False) -> Storage:
    mount = mount_of(directory)
    if mount is None:
        return Storage(lockspace, directory, None, forced_shared, detail="mount not found")
    fstype = mount.fstype
    shared = forced_shared or is_shared(fstype)
    storage = Storage(lockspace, directory, mount, shared, unsafe=local_locks(mount))
    if fstype == GLUSTER_FSTYPE:
        strict, detail = gluster_strict_locks(mount.mountpoint)
        storage = replace(
            storage,
            unsafe=None if strict else GLUSTER_UNSAFE,
            reports_drops=strict is True,
            detail=detail,
        )
    return storage


class Verifier:
    """Classifies the indirect and named lockspaces, guards new leases (and new named
    lockspaces) on unsafe mounts, and verifies held leases on shared ones on a timer (see the
    module docstring)."""

    def __init__(self, config: Config, service: LockService) -> None:
        self.config = config
        self.service = service
        self.loop = service.loop
        self.storage: dict[str, Storage] = {}
        self._warned: dict[str, float] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[int] | None = None
        # the last sweep: leases probed, seconds, losses found (also logged at DEBUG)
        self.last_sweep: tuple[int, float, int] = (0, 0.0, 0)

    # -- classification -------------------------------------------------------------------
    def start(self) -> None:
        """At start-up, after recovery: every configured lockspace, and every named one the
        journal holds (created over virtlockd's protocol before the restart)."""
        for ls, directory in self.config.lockspaces.items():
            self.storage[ls] = self._classify(ls, str(directory))
        for ls, directory in self.service.lockspaces.named.items():
            self.storage[ls] = self._classify(ls, str(directory))
        if any(s.unsafe for s in self.storage.values()):
            self.service.admit_indirect = self.admit
        self.service.admit_lockspace = self.admit_lockspace
        self._schedule()

    def _schedule(self) -> None:
        if self._handle is None and self.config.verify_interval > 0 and self.shared():
            self._handle = self.loop.call_later(self.config.verify_interval, self._tick)

    def shared(self) -> list[str]:
        return [ls for ls, s in self.storage.items() if s.shared]

    def admit_lockspace(self, ls: str, directory: str) -> None:
        """Before a named lockspace is created at run time (virtlockd's CREATE_LOCKSPACE:
        libvirt's file_lockspace_dir), and when it is asked for again (libvirtd sends it at
        every start of its own): its directory's mount, classified afresh (a remount may have
        changed it). On a mount whose locks do not keep hosts apart it is refused with the
        reason (InvalidResource), unless allow_unsafe_storage names the directory: such a
        lockspace could only ever refuse its leases, and libvirt's lock driver fails to load
        on the error, so the mistake shows when libvirtd starts. One that lockd already has
        keeps its leases (re-taken, verified) either way; its new ones are refused as in a
        configured lockspace. On shared storage its leases are verified from now on."""
        new = self._classify(ls, directory, "create")
        if ls in self.service.lockspaces.named or not new.unsafe or self._allowed(ls):
            self.storage[ls] = new
        if new.unsafe:
            self.service.admit_indirect = self.admit
            if not self._allowed(ls):
                raise self._refusal(new)
        self._schedule()

    def _allowed(self, ls: str) -> bool:
        return ls in self.config.allow_unsafe_storage

    def _classify(self, ls: str, directory: str, when: str = "start") -> Storage:
        forced = ls in self.config.shared_lockspaces
        worker = self.service.shared_io.get(ls)
        if worker is None:
            new = classify(ls, directory, forced)
        else:  # shared by its name: the mount may not answer (lockd/service/sharedio.py)
            try:
                new = worker.call_sync(functools.partial(classify, ls, directory, forced))
            except LimitExceeded as exc:  # shared, its mount unknown until a restart
                new = Storage(ls, directory, None, True, detail=str(exc))
        if new.shared and ls not in self.service.shared_io:  # its file operations off the loop
            path = os.path.normpath(directory)
            self.service.shared_io[ls] = StorageWorker(ls, self.loop, path)
        if new.unsafe:
            self._unsafe(new, when)
        elif new.shared:
            log.info(
                "lockspace %s: shared storage, %s; held leases verified every %g s",
                ls,
                new.describe(),
                self.config.verify_interval,
                extra={"LOCKD_EVENT": "shared-storage", "LOCKD_LOCKSPACE": ls},
            )
        return new

    def _refresh(self, ls: str, strict: bool | None, detail: str) -> None:
        """A GlusterFS mount's strict-locks as read again (a remount may have changed it).
        The mount and its sharedness stay as found at start-up: a mount that does not answer
        for a while must not pass for a local filesystem, nor an unreadable option for a
        change."""
        old = self.storage[ls]
        if strict is None or strict == old.reports_drops:
            return
        new = replace(
            old, unsafe=None if strict else GLUSTER_UNSAFE, reports_drops=strict, detail=detail
        )
        self.storage[ls] = new
        if new.unsafe:
            self._unsafe(new, "change")
            self.service.admit_indirect = self.admit
        else:
            log.info(
                "lockspace %s: %s; new leases accepted again",
                ls,
                new.describe(),
                extra={"LOCKD_EVENT": "shared-storage", "LOCKD_LOCKSPACE": ls},
            )

    def _unsafe(self, storage: Storage, when: str) -> None:
        allowed = self._allowed(storage.lockspace)
        refused = "its creation is refused" if when == "create" else "new leases there are refused"
        log.log(
            logging.WARNING if allowed else logging.ERROR,
            "lockspace %s: %s %s; %s",
            storage.lockspace,
            storage.describe(),
            storage.unsafe,
            "allowed by allow_unsafe_storage" if allowed else refused,
            extra={
                "LOCKD_EVENT": "unsafe-storage",
                "LOCKD_LOCKSPACE": storage.lockspace,
                "LOCKD_WHEN": when,
            },
        )

    def admit(self, ls: str) -> None:
        """Before a new lease in an indirect lockspace: refuse (or warn about) storage whose
        locks do not keep hosts apart. A dictionary lookup for every other lockspace."""
        storage = self.storage.get(ls)
        if storage is None or not storage.unsafe:
            return
        now = time.monotonic()
        last = self._warned.get(ls)
        if last is None or now - last >= WARN_EVERY:  # the first use, then once a minute
            self._warned[ls] = now
            self._unsafe(storage, "use")
        if not self._allowed(ls):
            raise self._refusal(storage)

    @staticmethod
    def _refusal(storage: Storage) -> InvalidResource:
        ls = storage.lockspace
        reason = (
            f"lockspace {ls} is on {storage.describe()}, which {storage.unsafe}; "
            "or list it in allow_unsafe_storage"
        )
        return InvalidResource(reason, resource=ls, reason=reason)

    # -- verification ---------------------------------------------------------------------
    def _tick(self) -> None:
        self._handle = self.loop.call_later(self.config.verify_interval, self._tick)
        if self._task is None or self._task.done():
            self._task = self.loop.create_task(self.sweep())

    async def sweep(self) -> int:
        """Probe every held lease on shared storage once; returns how many were lost."""
        t0 = time.perf_counter()
        shared = set(self.shared())
        gluster = {
            ls: m.mountpoint
            for ls in shared
            if (m := self.storage[ls].mount) is not None and m.fstype == GLUSTER_FSTYPE
        }
        if gluster:  # the option may have changed with a remount
            verdicts = await self._in_thread(
                lambda: {ls: gluster_strict_locks(mp) for ls, mp in gluster.items()}
            )
            for ls, (strict, detail) in verdicts.items():
                self._refresh(ls, strict, detail)
        leases = [x for x in self.service.table.leases() if x.lockspace in shared]
        probed = lost = 0
        for i in range(0, len(leases), SLICE):
            # checked at each slice: a lease may have been released meanwhile
            batch = [
                x
                for x in leases[i : i + SLICE]
                if x.state is State.HELD and x.settled is None and x.fd is not None
            ]
            if not batch:
                continue
            # While a slice is probed in the thread, its leases count as busy: a release or an
            # owner's death waits for the probe (as for a commit), so no fd is closed under it
            for lease in batch:
                lease.settled = self.loop.create_future()
            try:
                reasons = await self._in_thread(functools.partial(self.probe_all, batch))
            finally:
                for lease in batch:
                    self.service.settle(lease)
            probed += len(batch)
            for lease, reason in zip(batch, reasons, strict=True):
                # before anyone woken above runs: nothing can have changed the lease
                if reason is not None and lease.state is State.HELD and lease.settled is None:
                    lost += 1
                    self.service.lease_lost(lease, reason)
        self.last_sweep = (probed, time.perf_counter() - t0, lost)
        log.debug(
            "verified %d leases on shared storage in %.1f ms: %d lost",
            probed,
            self.last_sweep[1] * 1000,
            lost,
            extra={"LOCKD_EVENT": "verify"},
        )
        return lost

    def _in_thread(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` in a thread of its own and wait for it on the loop.

        The probes are system calls on the shared mount, and a mount that does not answer
        holds them (a GlusterFS request can wait out the client's ping timeout, 42 s by
        default): off the event loop, that stalls the verification, not every client of
        lockd, nor systemd's watchdog. A daemon thread, not an executor: the interpreter
        joins executor threads at exit, and a stop must not wait for a hung mount."""
        fut: asyncio.Future[T] = self.loop.create_future()

        def deliver(result: T | None, exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)  # type: ignore[arg-type]

        def run() -> None:
            try:
                result, exc = fn(), None
            except BaseException as e:  # delivered to the awaiting task
                result, exc = None, e
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self.loop.call_soon_threadsafe(deliver, result, exc)

        threading.Thread(target=run, name="lockd-verify", daemon=True).start()
        return fut

    def probe_all(self, leases: list[Lease]) -> list[str | None]:
        return [self.probe(lease) for lease in leases]

    def probe(self, lease: Lease) -> str | None:
        """Why the lease's lock is gone, or None if it still looks held."""
        assert lease.fd is not None
        try:
            other = ofd.conflict(lease.fd, lease.exclusive)
        except OSError as exc:
            if exc.errno in ofd.LOCK_DROPPED_ERRNOS:
                return (
                    f"the filesystem dropped the lock "
                    f"({errno.errorcode[exc.errno]} on the lease's file)"
                )
            log.warning(
                "cannot verify the lease on %s: %s",
                lease.resource,
                exc,
                extra={"LOCKD_RESOURCE": lease.resource, "LOCKD_EVENT": "verify-error"},
            )
            return None
        if other is not None:
            return f"the filesystem dropped the lock: another holder has it ({other})"
        if not self.storage[lease.lockspace].reports_drops:
            seen: str | None = "unknown"
            with contextlib.suppress(OSError):
                seen = ofd.holder(lease.path)
            if seen is None:
                return "the filesystem dropped the lock: nobody holds it any more"
        return None

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._task is not None:
            self._task.cancel()
