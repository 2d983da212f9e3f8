"""Owner processes: identity that survives pid reuse, and death notification.

Theory of operation (DESIGN §3): a pid alone does not name a process for long; the kernel
reuses it. An owner is (pid, start time, boot id): the start time is field 22 of
``/proc/PID/stat`` (clock ticks since boot), and the boot id is
``/proc/sys/kernel/random/boot_id``. Two processes with one pid never share a start time
within one boot, and after a reboot every owner is dead.

While the daemon runs, a pidfd (``pidfd_open``, Linux 5.3) becomes readable when its process
exits, so the event loop learns of an owner's death without polling and without racing pid
reuse; :func:`signal_owner` signals through the pidfd for the same reason.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
from dataclasses import dataclass, field
from functools import cache


@cache
def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if there is no such process (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) is in parentheses and may itself contain spaces and ')': split after
    # the last ')'. The rest starts at field 3 (state), so field 22 is index 19.
    rest = data[data.rindex(b")") + 2 :].split()
    if rest[0] == b"Z":  # a zombie has exited: it owns nothing any more
        return None
    return int(rest[19])


def uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except FileNotFoundError:
        return None


def is_same_process(pid: int, expected_start: int, expected_boot: str) -> bool:
    """True if ``pid`` is still the process that was registered (same boot, same start)."""
    return expected_boot == boot_id() and start_time(pid) == expected_start


def open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def signal_owner(pidfd: int | None, pid: int, start: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to the owner if it is still that process. True if sent."""
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
            return True
        # No pidfd (the owner was adopted from the journal before we opened one): check
        # the start time right before kill(2); the window for reuse is microseconds.
        if start_time(pid) == start:
            os.kill(pid, sig)
            return True
    except ProcessLookupError:
        pass
    return False


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a connection (SO_PEERCRED, taken at accept)."""

    pid: int
    uid: int
    gids: frozenset[int]
    # uid 0: a field, not a property (read on every Acquire: a property is a Python call)
    root: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", self.uid == 0)  # frozen

    @classmethod
    def of_socket(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        return cls(pid, uid, frozenset({gid, *_supplementary_groups(pid)}))

    def may_search(self, path: str) -> bool:
        """Whether the peer could reach ``path``: search (x) permission on every directory
        above it, both as written and with symlinks resolved. Checked before anything is
        looked up, so a refusal says nothing about whether the file exists."""
        for full in (path, os.path.realpath(path)):
            parent = os.path.dirname(full)
            while True:
                try:
                    st = os.stat(parent)
                except OSError:
                    break  # does not exist: the lookup proper reports it
                if not self._allowed(st, 0o1):
                    return False
                if parent == "/":
                    break
                parent = os.path.dirname(parent)
        return True

    def _allowed(self, st: os.stat_result, need: int) -> bool:
        if self.root:
            return True
        if st.st_uid == self.uid:
            return bool(st.st_mode & (need << 6))
        if st.st_gid in self.gids:
            return bool(st.st_mode & (need << 3))
        return bool(st.st_mode & need)

    def may_open(self, st: os.stat_result, write: bool) -> bool:
        """Whether the peer itself could open a file of this mode for reading or writing.

        The daemon runs as root and could lock any file; a non-root client must not make it
        lock one it could not open itself (another user's disk image, /etc/shadow): that
        would let it deny others their own files. Classic mode bits only (no ACLs).
        """
        return self._allowed(st, 0o2 if write else 0o4)


_PEERCRED = struct.Struct("3i")


def _supplementary_groups(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return [int(g) for g in line.split()[1:]]
    except OSError:
        pass
    return []
