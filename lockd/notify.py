"""systemd glue: readiness, status, watchdog, the fd store, and inherited fds.

Theory of operation: everything here is a no-op outside systemd (no ``$NOTIFY_SOCKET``), so
the daemon runs the same code in a terminal, in tests and under systemd.

- ``READY=1`` is sent once recovery is complete (DESIGN §5.6); ``STATUS=`` says what is held.
- ``WATCHDOG=1`` keep-alives are sent from the event loop itself at half of
  ``$WATCHDOG_USEC``, so a hung loop (not just a dead process) is noticed and aborted by
  systemd (``WatchdogSec=``), and comes back through recovery like any other crash.
- The fd store (``FDSTORE=1`` + ``FDNAME=``, systemd 219+, needs ``FileDescriptorStoreMax=``
  in the unit) keeps a copy of every lease fd in the service manager. An OFD lock lives as
  long as any fd of its open file description, so the lock survives our death: the gap is
  zero. ``FDSTOREREMOVE=1`` (systemd 236+) drops systemd's copy after a release is journaled.
- On start, systemd passes the listening sockets and the stored fds in ``LISTEN_FDS`` with
  their names in ``LISTEN_FDNAMES``; stored fds come after the sockets, newest first, so they
  are matched by name, never by position.
"""

from __future__ import annotations

import os

import systemd.daemon as sd_daemon

# FileDescriptorName= of the two socket units
MAIN_SOCKET_NAME = "lockd"
ADMIN_SOCKET_NAME = "lockd-admin"


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(message: str) -> None:
    if under_systemd():
        sd_daemon.notify(message)


def listen_fds() -> dict[str, int]:
    """FDNAME -> fd handed over by systemd (sockets and stored lease fds); unsets the env."""
    named = sd_daemon.listen_fds_with_names(True)
    fds: dict[str, int] = {}
    for fd, name in named.items():
        os.set_inheritable(fd, False)  # systemd hands them over without FD_CLOEXEC
        if name in fds:  # two fds under one name: keep the first, close the extra copy
            os.close(fd)
            continue
        fds[name] = fd
    return fds


def watchdog_interval() -> float | None:
    """Seconds between keep-alives (half the watchdog timeout), or None if not asked."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not under_systemd() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def store_announced() -> bool:
    """systemd 254+ tells us the store's size in $FDSTORE; 252 says nothing."""
    return os.environ.get("FDSTORE", "0") not in ("", "0")


class FdStore:
    """systemd's fd store, or nothing when it is not enabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and under_systemd()

    def add(self, name: str, fd: int) -> None:
        if self.enabled:
            sd_daemon.notify(f"FDSTORE=1\nFDNAME={name}", fds=[fd])

    def remove(self, name: str) -> None:
        if self.enabled:
            sd_daemon.notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
