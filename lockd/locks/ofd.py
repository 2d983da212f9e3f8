"""The lock primitive: OFD locks on byte 0. The only module that calls ``fcntl``.

Theory of operation (DESIGN §2):

- Open file description (OFD) locks, ``F_OFD_SETLK`` (Linux 3.15). A POSIX ``F_SETLK`` lock
  belongs to the process, so closing *any* fd of the file drops it (the bug virtlockd has
  when one owner reaches an image through a symlink); an OFD lock belongs to the open file
  description and goes away only when its last fd is closed or it is unlocked. One open file
  description per lease, so the kernel arbitrates between our own owners too.
- Byte 0, length 1: virtlockd's convention (so lockd and virtlockd exclude each other on one
  image), clear of QEMU's image locks on bytes 100-103 and 200-203.
- Never ``F_OFD_SETLKW``: it would block the event loop. A conflict is EAGAIN (or EACCES,
  which POSIX allows for the same thing) and becomes :class:`ResourceBusy` at once.
- Opening never blocks or creates in the direct lockspace: paths that are not regular files
  or block devices are refused before ``open`` (a FIFO would block ``open`` without
  O_NONBLOCK; a character device may act on open), and the type is checked again with
  ``fstat`` after it, because the path may have been swapped in between.
- Shared leases open ``O_RDONLY`` (``F_RDLCK`` needs read access), exclusive ones ``O_RDWR``
  (``F_WRLCK`` needs write access).

Invariant: a function here either returns an fd that holds the requested lock, or raises a
named error with no fd left open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from typing import NamedTuple

from lockd.errors import (
    InvalidResource,
    LimitExceeded,
    LockdError,
    PermissionDenied,
    ResourceBusy,
)

# Linux values (include/uapi/asm-generic/fcntl.h); fcntl exports them from Python 3.9 on
# most builds, but not everywhere.
F_OFD_GETLK: int = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)

# struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
_FLOCK = "hhqqi4x"
LOCK_START = 0
LOCK_LEN = 1
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
# An indirect lease file replaced under us (unlinked and recreated) is retried this often.
_REPLACED_RETRIES = 8


def _flock(ltype: int) -> bytes:
    # l_pid must be 0 for OFD requests (fcntl(2): EINVAL otherwise)
    return struct.pack(_FLOCK, ltype, os.SEEK_SET, LOCK_START, LOCK_LEN, 0)


_WR = _flock(fcntl.F_WRLCK)
_RD = _flock(fcntl.F_RDLCK)
_UN = _flock(fcntl.F_UNLCK)


class Locked(NamedTuple):
    """A lock taken: its fd and the file's identity. A named tuple, not a frozen dataclass
    (whose ``__init__`` pays an ``object.__setattr__`` call per field): one per grant."""

    fd: int
    dev: int
    ino: int


# Disk images are regular files or block devices (LVM volumes, multipath maps): the file
# types (S_IFMT of st_mode) a lease may lock. A set looked up inline, not a function: it is
# checked twice on every grant.
_LOCKABLE = frozenset((stat.S_IFREG, stat.S_IFBLK))
_S_IFMT = stat.S_IFMT


# InvalidResource's reason for an errno of open(2); a front end that must report the errno
# itself (virtlockd's protocol carries it) maps the reason back
OPEN_ERRORS = {
    errno.ENOENT: "does not exist",
    errno.ENOTDIR: "a path component is not a directory",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "too many symbolic links",
    errno.ENAMETOOLONG: "path too long",
    errno.EROFS: "read-only filesystem (an exclusive lease needs write access)",
    errno.ENXIO: "no such device",
}


def _os_error(exc: OSError, resource: str) -> Exception:
    code = exc.errno
    if code in (errno.EMFILE, errno.ENFILE):
        return LimitExceeded("out of file descriptors", limit="open-files", value=0)
    if code in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{resource}: permission denied", reason="open")
    reason = OPEN_ERRORS.get(code or 0, os.strerror(code or errno.EIO))
    return InvalidResource(f"{resource}: {reason}", resource=resource, reason=reason)


def _close_quietly(fd: int) -> None:
    # Linux releases the descriptor even when close() fails (close(2)); through FUSE a close
    # reports the filesystem's flush error (ENOTCONN from a GlusterFS client cut off from its
    # brick), which must not replace the error that made us close it.
    try:  # noqa: SIM105
        os.close(fd)
    except OSError:
        pass


def _named(exc: BaseException, resource: str) -> BaseException:
    """An OSError from opening or locking as the named error a client gets (a lock refused
    for a reason other than a conflict: ENOTCONN, EIO from shared storage, ...)."""
    if isinstance(exc, OSError) and not isinstance(exc, LockdError):
        return _os_error(exc, resource)
    return exc


def _set(fd: int, exclusive: bool, resource: str) -> None:
    try:
        fcntl.fcntl(fd, F_OFD_SETLK, _WR if exclusive else _RD)
    except OSError as exc:
        raise _refused(exc, exclusive, resource) from None


def _refused(exc: OSError, exclusive: bool, resource: str) -> Exception:
    """What a failed F_OFD_SETLK means: the byte is held (ResourceBusy), or another error."""
    if exc.errno in (errno.EAGAIN, errno.EACCES):
        return ResourceBusy(
            f"{resource} is locked by another holder",
            lockspace="",
            resource=resource,
            mode="exclusive" if exclusive else "shared",
        )
    return exc


def lock_existing(
    path: str,
    exclusive: bool,
    inode: tuple[int, int] | None = None,
    check: Callable[[os.stat_result], None] | None = None,
    seen: os.stat_result | None = None,
) -> Locked:
    """Open an existing regular file or block device and lock byte 0 (direct lockspace).

    With ``inode`` = (dev, ino), the opened file must be that one, checked *before* locking:
    a path that now leads elsewhere must not get a lock, even for an instant. The type is
    checked by ``stat`` before ``open`` (opening a device can have side effects; ``seen`` is
    that stat when the caller just made it) and again by ``fstat`` after.
    """
    try:
        st = seen if seen is not None else os.stat(path)
    except OSError as exc:
        raise _os_error(exc, path) from None
    if _S_IFMT(st.st_mode) not in _LOCKABLE:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file or block device"
        raise InvalidResource(f"{path}: {kind}", resource=path, reason=kind)
    try:
        fd = os.open(path, _OPEN_FLAGS | (os.O_RDWR if exclusive else os.O_RDONLY))
    except OSError as exc:
        raise _os_error(exc, path) from None
    try:
        st = os.fstat(fd)
        if _S_IFMT(st.st_mode) not in _LOCKABLE:
            raise InvalidResource(
                f"{path}: replaced by something that is not a file while opening",
                resource=path,
                reason="not a regular file or block device",
            )
        if inode is not None and (st.st_dev, st.st_ino) != inode:
            raise InvalidResource(
                f"{path}: now another file", resource=path, reason="the path leads to another file"
            )
        if check is not None:
            check(st)  # on the file actually opened: the path may have been swapped since
        try:  # _set, inline (every grant)
            fcntl.fcntl(fd, F_OFD_SETLK, _WR if exclusive else _RD)
        except OSError as exc:
            raise _refused(exc, exclusive, path) from None
    except BaseException as exc:
        _close_quietly(fd)
        named = _named(exc, path)
        if named is exc:
            raise
        raise named from None
    return Locked(fd, st.st_dev, st.st_ino)


def lock_lease_file(path: str, exclusive: bool, resource: str) -> Locked:
    """Open (creating 0600) and lock an indirect lease file, surviving an unlink race.

    Another host (on shared storage) or an administrator may unlink the lease file between
    our open and our lock; we would then hold a lock on an orphan inode nobody else can see.
    After locking, ``fstat(fd)`` must match ``stat(path)``; otherwise retry on the new file.
    """
    for _ in range(_REPLACED_RETRIES):
        try:
            fd = os.open(path, _OPEN_FLAGS | os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise _os_error(exc, resource) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidResource(
                    f"lease file {path} is not a regular file",
                    resource=resource,
                    reason="lease file is not a regular file",
                )
            _set(fd, exclusive, resource)
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return Locked(fd, st.st_dev, st.st_ino)
        except BaseException as exc:
            _close_quietly(fd)
            named = _named(exc, resource)
            if named is exc:
                raise
            raise named from None
        _close_quietly(fd)
    raise ResourceBusy(
        f"lease file {path} keeps being replaced",
        lockspace="",
        resource=resource,
        mode="exclusive" if exclusive else "shared",
    )


# /proc/self/fd as a directory fd, opened on first use: readlinkat(dirfd, "N") spares the
# kernel the walk of /proc/self/fd/ on every grant (2.2 instead of 3.3 µs here). A forked
# child must not use its parent's (the numbers would name the parent's fds).
_proc_fd: int | None = None


def _forget_proc_fd() -> None:
    global _proc_fd
    _proc_fd = None


os.register_at_fork(after_in_child=_forget_proc_fd)


def real_path(fd: int) -> str | None:
    """The path the kernel has for an open file (symlinks resolved), if it still has one."""
    global _proc_fd
    try:
        if _proc_fd is None:
            try:
                _proc_fd = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:  # out of fds (EMFILE) this once: the long way
                path = os.readlink(f"/proc/self/fd/{fd}")
        if _proc_fd is not None:
            path = os.readlink(str(fd), dir_fd=_proc_fd)
    except OSError:
        return None
    return None if path.endswith(" (deleted)") else path


def relock(fd: int, exclusive: bool, resource: str) -> None:
    """Lock byte 0 on an fd we already have (adopted from systemd's fd store)."""
    _set(fd, exclusive, resource)


def unlock_and_close(fd: int) -> None:
    """Drop the lock, then the fd.

    Unlocking explicitly matters because the open file description may still be referenced
    elsewhere (a copy in systemd's fd store, or inherited across re-exec): closing our fd
    alone would leave the lock held there.
    """
    # try/except, not contextlib.suppress (an object per call): this runs on every release
    try:  # noqa: SIM105
        fcntl.fcntl(fd, F_OFD_SETLK, _UN)
    except OSError:  # EBADF: nothing left to unlock
        pass
    try:  # noqa: SIM105
        os.close(fd)
    except OSError:
        pass


# What an fcntl on a held lease's fd answers when the filesystem dropped the lock behind our
# back. GlusterFS 10.3 (seen here, and in client_get_remote_fd of its client translator):
# EBADFD once its client lost the brick connection, which made the brick drop every lock of
# that client; with client.strict-locks=on the fd is never reopened, so the error stays.
# ENOTCONN while the client is cut off or dead. EIO: Linux's NFSv4 client fails I/O on a lock
# state it marked lost (NFS_LOCK_LOST; kernel commit "NFSv4: always set NFS_LOCK_LOST when a
# lock is lost"), and its CephFS client makes "further file lock syscall return -EIO" once its
# MDS session dropped the locks (fs/ceph/mds_client.c). ESTALE: the file is gone on the server.
LOCK_DROPPED_ERRNOS = frozenset({errno.EBADFD, errno.ENOTCONN, errno.EIO, errno.ESTALE})


def conflict(fd: int, exclusive: bool) -> str | None:
    """``F_OFD_GETLK`` on a lease's own fd: the mode of a lock that another open file
    description holds against ours ("exclusive" or "shared"), or None.

    Our own lock never conflicts with itself (the kernel, and GlusterFS's locks translator,
    compare lock owners, and an OFD lock's owner is its open file description), so a conflict
    means our lock is gone and someone else has the byte. GETLK takes nothing, so a probe
    never changes what it looks at. OSError (EBADFD, ENOTCONN, ...) propagates: the caller
    judges it with :data:`LOCK_DROPPED_ERRNOS`.
    """
    res = fcntl.fcntl(fd, F_OFD_GETLK, _WR if exclusive else _RD)
    ltype = struct.unpack(_FLOCK, res)[0]
    if ltype == fcntl.F_UNLCK:
        return None
    return "exclusive" if ltype == fcntl.F_WRLCK else "shared"


def holder(path: str) -> str | None:
    """Who holds byte 0 of ``path`` as another process sees it: "exclusive", "shared", None.

    Uses ``F_OFD_GETLK``, which reports a conflicting lock without taking one, so probing
    never disturbs the lock it looks at.
    """
    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    try:
        res = fcntl.fcntl(fd, F_OFD_GETLK, _WR)
        ltype = struct.unpack(_FLOCK, res)[0]
    finally:
        _close_quietly(fd)
    if ltype == fcntl.F_UNLCK:
        return None
    return "exclusive" if ltype == fcntl.F_WRLCK else "shared"


def holder_pid(path: str) -> tuple[str | None, int]:
    """Who holds byte 0 of ``path``, and the pid the filesystem names as its holder.

    Classic ``F_GETLK`` (a process-owned probe: this process holds no lock there, so any
    lock is reported), because ``F_OFD_GETLK`` always reports pid -1. The kernel's own
    locks report -1 for an OFD lock too; a FUSE filesystem that arbitrates locks itself
    reports the pid its server recorded with the lock (GlusterFS 10.3: the pid of the
    process whose ``F_OFD_SETLK`` took it last, translated into our PID namespace; measured
    here), which is how ``lockctl verify`` tells lockd's lock from another's there. 0 or
    -1: unknown.
    """
    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    try:
        res = fcntl.fcntl(fd, fcntl.F_GETLK, _WR)
    finally:
        _close_quietly(fd)
    ltype, _whence, _start, _len, pid = struct.unpack(_FLOCK, res)
    if ltype == fcntl.F_UNLCK:
        return None, 0
    return ("exclusive" if ltype == fcntl.F_WRLCK else "shared"), pid
