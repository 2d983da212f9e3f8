"""systemd glue: readiness and status notifications, and the file descriptor store.

Theory of operation: everything here is a no-op outside systemd (no ``$NOTIFY_SOCKET``), so
the daemon runs the same code path in a terminal, in tests and under systemd.

- ``READY=1`` is sent once recovery is complete (DESIGN §5.6); ``STATUS=`` lines summarize.
- The fd store (``FDSTORE=1`` + ``FDNAME=``, systemd 219+; needs ``FileDescriptorStoreMax=``
  in the unit) keeps a copy of every lease fd in the service manager, so the OFD lock
  survives our death (an OFD lock lives as long as any fd of its open file description).
  ``FDSTOREREMOVE=1`` (systemd 236+) drops systemd's copy after a release is journaled.
"""

from __future__ import annotations

import logging
import os

import systemd.daemon as sd_daemon

log = logging.getLogger("lockd")


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(message: str) -> None:
    if under_systemd():
        sd_daemon.notify(message)


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
