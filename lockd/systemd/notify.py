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

import array
import logging
import os
import socket
from typing import TYPE_CHECKING

import systemd.daemon as sd_daemon

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("lockd")

# FileDescriptorName= of the socket units
MAIN_SOCKET_NAME = "lockd"
ADMIN_SOCKET_NAME = "lockd-admin"
# FileDescriptorName= of lockd-virtlockd.socket (virtlockd's protocol, for libvirt)
VIRTLOCKD_SOCKET_NAME = "lockd-virtlockd"
SOCKET_NAMES = (MAIN_SOCKET_NAME, ADMIN_SOCKET_NAME, VIRTLOCKD_SOCKET_NAME)


def under_systemd() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


class _Notifier:
    """sd_notify(3) on one non-blocking datagram socket.

    systemd-python's notify() blocks when the receiver's queue is full
    (net.unix.max_dgram_qlen, 10 by default): a supervisor that stops reading would freeze
    the event loop. Here a STATUS or WATCHDOG message meets a full queue with EAGAIN at
    once and is dropped (the next one follows shortly). FDSTORE must not be dropped, and
    systemd 252 can be slow to read it (it compares each new fd with every stored one), so
    it waits for room, up to FDSTORE_TIMEOUT; past that the caller refuses the acquire
    rather than grant a lease that is not parked.
    """

    FDSTORE_TIMEOUT = 10.0

    def __init__(self) -> None:
        # two sockets: one that waits (FDSTORE), one that never does. A socket with a timeout
        # turns EAGAIN into "poll, then retry" inside CPython, even for MSG_DONTWAIT, and a
        # full datagram receiver still polls writable: that was a busy loop of up to
        # FDSTORE_TIMEOUT per STATUS message (found by the two-host torture, whose harness
        # reads its notify socket only at start-up)
        self.waiting: socket.socket | None = None
        self.at_once: socket.socket | None = None
        self.address = ""

    def send(self, message: str, fds: list[int] | None = None, wait: bool = False) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        if not address:
            return
        if self.waiting is None or self.at_once is None or address != self.address:
            self.waiting = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.waiting.settimeout(self.FDSTORE_TIMEOUT)  # bounds the waiting sends
            self.at_once = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.at_once.setblocking(False)  # EAGAIN is BlockingIOError at once
            self.address = address
        # "@name" is an abstract socket (sd_notify(3))
        target = "\0" + address[1:] if address.startswith("@") else address
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        sock = self.waiting if wait else self.at_once
        sock.sendmsg([message.encode()], ancillary, 0, target)


_notifier = _Notifier()


def notify(message: str) -> bool:
    """A state message, sent at once or not at all (False: the receiver's queue is full, or
    the send failed). STATUS may be dropped: the next one follows; see :func:`deliver` for
    the messages that must arrive."""
    try:
        _notifier.send(message)
    except OSError as exc:
        log.debug("sd_notify dropped %r: %s", message.split("=", 1)[0], exc)
        return False
    return True


RETRY = 0.05


def deliver(loop: asyncio.AbstractEventLoop, message: str, within: float = 10.0) -> None:
    """Send a message that must reach systemd (READY, RELOADING, STOPPING, WATCHDOG),
    retrying from the event loop every 50 ms while the queue is full, for up to ``within``
    seconds; the loop is never blocked. Why: while lockd parks fds, systemd 252 reads its
    notify queue slowly (it compares each stored fd with every other one: ~4 ms each at
    10,000, tests/test_systemd.py), so the queue is often full right when recovery has
    parked its re-taken leases and READY=1 follows; dropped, READY=1 would leave the start
    to time out, and WATCHDOG=1 dropped for WatchdogSec= would get lockd aborted."""
    deadline = loop.time() + within

    def attempt() -> None:
        if not notify(message) and loop.time() + RETRY < deadline:
            loop.call_later(RETRY, attempt)

    attempt()


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
        """Park fd in the store; OSError (EAGAIN: systemd is not reading) if it was not."""
        if self.enabled:
            _notifier.send(f"FDSTORE=1\nFDNAME={name}", [fd], wait=True)

    def remove(self, name: str) -> None:
        if not self.enabled:
            return
        try:
            _notifier.send(f"FDSTOREREMOVE=1\nFDNAME={name}", wait=True)
        except OSError as exc:
            # The release is journaled and the lock dropped (F_UNLCK on the shared open file
            # description); systemd keeps a stale, unlocked fd that the next start closes as
            # a stray.
            log.warning("FDSTOREREMOVE of %s not sent: %s", name, exc)
