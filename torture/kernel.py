"""The kernel's view of the resource files, taken from outside the daemon.

Theory of operation: two independent readings of byte 0 of every pool file.

- :func:`probe`: ``F_OFD_GETLK`` on a fresh fd in this process (which holds no lock on any
  pool file). GETLK reports a conflicting lock without taking one, so probing never disturbs
  what it observes. Asking for F_WRLCK finds any lock; if there is one, asking for F_RDLCK
  tells whether it is exclusive. An OFD lock reports ``l_pid == -1``; anything else would be a
  process-owned POSIX lock, which lockd must never use (DESIGN §2).
- :func:`held_by`: ``/proc/PID/fdinfo/FD`` lists the locks each open file description of
  the daemon holds (``/proc/locks`` would say the same, but it lists every lock of the host
  and costs ~100 ms on a busy one). lockd holds one open file description per lease, so
  the number of READ (WRITE) OFD locks on byte 0 of a file is exactly the number of its
  shared (exclusive) leases held there: that count catches a leaked (orphan) lock that
  GETLK alone would hide behind another shared one, or behind the competitor's.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass, field

F_OFD_GETLK = 36
F_OFD_SETLK = 37
FLOCK = "hhqqi4x"  # struct flock on x86_64/aarch64: type, whence, start, len, pid


def flock(l_type: int) -> bytes:
    return struct.pack(FLOCK, l_type, os.SEEK_SET, 0, 1, 0)


def _getlk(fd: int, l_type: int) -> tuple[int, int]:
    got_type, _whence, _start, _len, got_pid = struct.unpack(
        FLOCK, fcntl.fcntl(fd, F_OFD_GETLK, flock(l_type))
    )
    return got_type, got_pid


def probe(path: str) -> str:
    """``free``, ``shared`` or ``exclusive``; ``posix`` if a non-OFD lock is there."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        wr_type, wr_pid = _getlk(fd, fcntl.F_WRLCK)
        if wr_type == fcntl.F_UNLCK:
            return "free"
        if wr_pid != -1:
            return "posix"
        rd_type, _ = _getlk(fd, fcntl.F_RDLCK)
        return "shared" if rd_type == fcntl.F_UNLCK else "exclusive"
    finally:
        os.close(fd)


@dataclass
class FileLocks:
    """The locks one process holds on byte 0 of one file."""

    shared: int = 0
    exclusive: int = 0
    other: list[str] = field(default_factory=list)  # non-OFD or other ranges: never expected

    def state(self) -> str:
        if self.exclusive:
            return "exclusive"
        return "shared" if self.shared else "free"


def inode_key(path: str) -> str:
    """The ``MAJOR:MINOR:INODE`` (hex device) that lock listings of the kernel use."""
    st = os.stat(path)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def held_by(pid: int, keys: dict[str, str]) -> dict[str, FileLocks]:
    """path -> the locks that process ``pid``'s open files hold on it (path -> inode_key).

    Every ``/proc/PID/fdinfo/FD`` lists, as ``lock:`` lines, the locks that belong to that
    open file description; an OFD lock shows as ``OFDLCK`` with pid -1.
    """
    by_key = {k: p for p, k in keys.items()}
    out = {p: FileLocks() for p in keys}
    base = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(base):
        try:
            with open(f"{base}/{fd}") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # closed meanwhile
        for line in text.splitlines():
            if not line.startswith("lock:"):
                continue
            parts = line.split()
            # lock:  1: OFDLCK ADVISORY  WRITE -1 fe:00:2149683 0 0
            kind, access, key, start, end = parts[2], parts[4], parts[6], parts[7], parts[8]
            path = by_key.get(key)
            if path is None:
                continue
            if kind != "OFDLCK" or (start, end) != ("0", "0"):
                out[path].other.append(f"fd {fd}: {line}")
            elif access == "READ":
                out[path].shared += 1
            else:
                out[path].exclusive += 1
    return out
