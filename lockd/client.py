"""Python client of lockd: :class:`Client` speaks Varlink to the daemon and rides over its restarts.

Theory of operation
-------------------
lockd may be ``kill -9``-ed at any moment and comes back (systemd, through its socket) with
the leases of its journal. Leases belong to owner *processes*, not to connections, so a lost
connection loses nothing and the client just asks again: when connecting fails (``ENOENT``: no
socket file yet; ``ECONNREFUSED``: nobody listens; ``EAGAIN``: backlog full) or the connection
breaks (``EPIPE``/``ECONNRESET``, EOF before the reply), it reconnects and resends the *same*
call, backing off from 10 ms to 200 ms.

That is safe because every io.lockd method is idempotent (DESIGN §3): a repeated Acquire or
Release per (owner, lockspace, resource) gives the same answer and token, Register the same
owner; ReleaseAll and Inquire report the current state. Admin methods are reads, except
ForceRelease, whose repeat lists nothing (the lost first reply had the leases). An *error
reply* is an answer and is never retried. ``call(..., retry=False)`` resends a call only if it
never reached the kernel, for a method that must not run twice.

``timeout`` bounds each call from its start to its reply, all retries included: a daemon that
stays away, or accepts and does not answer (hung, or recovering while clients wait in the
backlog, DESIGN §5.6), for that long gives :class:`~lockd.errors.DaemonUnreachable`, naming the
socket and the time waited.

:meth:`Client.watch` subscribes on a connection of its own, so the Client can make calls while
iterating. A broken stream is re-subscribed within ``timeout`` and the daemon's new
``watching`` event is yielded: events in the gap may be missed, :meth:`Client.inquire`
resynchronises. Waiting for events has no timeout.

A Client makes one request at a time and is not thread-safe (one per thread), except that
:meth:`Client.close` may be called from another thread to end a blocked :class:`Watch`.
Replies are plain dicts with the wire shapes of ``schema/io.lockd*.varlink``.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
from collections import deque
from collections.abc import Iterator
from errno import EAGAIN, ECONNABORTED, ECONNREFUSED, ECONNRESET, ENOENT, ENOTCONN, EPIPE, ETIMEDOUT
from pathlib import Path
from typing import Any, TypeVar

from lockd.calls import Reply, Request, reply_object, requests, unwrap
from lockd.config import default_admin_socket, default_socket
from lockd.errors import DaemonUnreachable, PermissionDenied, ProtocolError
from lockd.wire.varlink import Call, Decoder

__all__ = ["Attempts", "Client", "Reply", "Request", "Watch", "requests"]

T = TypeVar("T")

RECV_SIZE = 65536
BACKOFF_START = 0.010
BACKOFF_MAX = 0.200
# Replies are not bounded like requests (ListLeases of 65536 leases is ~26 MB); this only
# keeps a peer that is not lockd from growing us without bound.
MAX_REPLY = 128 * 1024 * 1024
# lockd binds its socket and then chmods/chowns it for socket_group: a group member connecting
# in between gets EACCES, so EACCES is retried this long before it counts as an answer.
EACCES_GRACE = 1.0

# Failures after which a new connection may well work: the daemon is starting (ENOENT), dead
# and not yet restarted (ECONNREFUSED), swamped by reconnecting clients (EAGAIN: an AF_UNIX
# connect does not wait for backlog room), or died under an open connection (the rest).
_TRANSIENT = frozenset({ENOENT, ECONNREFUSED, EAGAIN, EPIPE, ECONNRESET, ECONNABORTED, ENOTCONN})


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(ETIMEDOUT, "timed out")
    return left


def endpoint(
    socket_path: str | os.PathLike[str] | None, timeout: float, admin: bool
) -> tuple[Path, float]:
    """A client's socket and timeout from its arguments, the same for both clients: the path
    given, else ``$LOCKD_SOCKET`` (``$LOCKD_ADMIN_SOCKET``) or the default; ValueError for a
    timeout that is not > 0."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout!r}")
    if socket_path is None:
        socket_path = default_admin_socket() if admin else default_socket()
    return Path(socket_path), float(timeout)


class Attempts:
    """The retry policy of one call, sans-IO: shared by :class:`Client` and
    :class:`lockd.aio.Client`, so both give up, retry and back off alike."""

    def __init__(self, socket_path: Path, timeout: float, call: Call) -> None:
        self.socket_path, self.timeout, self.call = socket_path, timeout, call
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.delay = BACKOFF_START
        self.attempts = 0
        self.last = ""

    def timed_out(self, sent: bool) -> DaemonUnreachable:
        return self.unreachable(
            "connected, no reply" if sent else (self.last or "connect timed out")
        )

    def after_failure(self, exc: BaseException, sent: bool, retry: bool) -> None:
        """An attempt failed (its connection is dropped): raise what the caller gets, or
        return to try again. A timeout is DaemonUnreachable; a connection failure is judged
        by :meth:`failed`; anything else (a ProtocolError, KeyboardInterrupt, a task's
        cancellation) goes to the caller as it is."""
        if isinstance(exc, TimeoutError):
            raise self.timed_out(sent) from None
        if not isinstance(exc, OSError):
            raise exc
        self.failed(exc, sent, retry)

    def failed(self, exc: OSError, sent: bool, retry: bool) -> None:
        """Raise what ``exc`` means for the caller, or note it and return (retry)."""
        denied = isinstance(exc, PermissionError)
        if denied and time.monotonic() - self.start >= min(EACCES_GRACE, self.timeout / 2):
            raise PermissionDenied(
                f"cannot connect to lockd at {self.socket_path}: {exc.strerror}",
                reason=f"{self.socket_path}: {exc.strerror}",
            ) from exc
        if not denied and exc.errno not in _TRANSIENT:
            raise DaemonUnreachable(
                f"talking to lockd at {self.socket_path} failed: {exc}",
                socket=str(self.socket_path),
                method=self.call.method,
            ) from exc
        if sent and not retry:
            raise self.unreachable(f"{exc}; sent once, not resent") from exc
        self.last = str(exc)

    def backoff(self) -> float:
        """Seconds to wait before the next attempt; DaemonUnreachable past the deadline."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.unreachable(self.last)
        # jitter: after a restart every client reconnects at once; spread them out
        pause = min(left, self.delay * random.uniform(0.5, 1.0))
        self.delay = min(self.delay * 2, BACKOFF_MAX)
        return pause

    def unreachable(self, last: str) -> DaemonUnreachable:
        waited = time.monotonic() - self.start
        return DaemonUnreachable(
            f"lockd at {self.socket_path} did not answer {self.call.method} within {waited:.2f} s "
            f"(timeout {self.timeout:g} s, {self.attempts} attempt(s); last: {last})",
            socket=str(self.socket_path),
            method=self.call.method,
            waited=round(waited, 3),
        )


class _Conn:
    """One connected socket with its decoder; on any failure it is dropped whole."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.decoder = Decoder(max_message=MAX_REPLY)
        self.inbox: deque[Reply] = deque()
        self.cancelled = False

    def send(self, data: bytes, deadline: float | None) -> None:
        self.sock.settimeout(_remaining(deadline))
        self.sock.sendall(data)

    def receive(self, deadline: float | None) -> Reply:
        while not self.inbox:
            self.sock.settimeout(_remaining(deadline))
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionResetError(ECONNRESET, "lockd closed the connection")
            # the Decoder scans only new bytes for the NUL, so a multi-megabyte reply read
            # 64 KiB at a time stays linear
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.popleft()

    @property
    def idle(self) -> bool:
        return not self.inbox and not self.decoder.pending

    def close(self, shutdown: bool = False) -> None:
        # close() alone does not wake a recv() blocked in another thread; shutdown does, but
        # it would also cut the connection for a parent that we were forked from
        if shutdown and self.pid == os.getpid():
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class Client:
    """A blocking connection to lockd (``io.lockd``; with ``admin=True`` ``io.lockd.Admin``).

    The socket is ``socket_path``, else ``$LOCKD_SOCKET`` (``$LOCKD_ADMIN_SOCKET`` for admin),
    else the default under ``/run/lockd`` or ``$XDG_RUNTIME_DIR/lockd``. The connection is made
    on the first call. Not thread-safe: one request at a time, one Client per thread.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 30.0,
        admin: bool = False,
    ) -> None:
        self.socket_path, self.timeout = endpoint(socket_path, timeout, admin)
        self._conn: _Conn | None = None
        self._streams: set[_Conn] = set()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({str(self.socket_path)!r}, timeout={self.timeout:g})"

    def close(self) -> None:
        """Close the connection and end every open :class:`Watch`; the next call reconnects."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for conn in list(self._streams):
            conn.cancelled = True
            conn.close(shutdown=True)
        self._streams.clear()

    # -- generic call, with the retry loop ----------------------------------------------------

    def call(
        self, method: str, parameters: dict[str, Any] | None = None, *, retry: bool = True
    ) -> Reply:
        """Call ``method`` (fully qualified) and return the reply's parameters.

        An error reply raises its :mod:`lockd.errors` class; no answer within ``timeout``
        raises :class:`~lockd.errors.DaemonUnreachable`.
        """
        conn, msg = self._exchange(Call(method, parameters or {}), retry=retry, stream=False)
        if msg.get("continues") or not conn.idle:
            # more than one reply to a single call: the stream is out of step, start afresh
            self._drop(conn)
        return unwrap(msg)

    def _open(self, deadline: float) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(_remaining(deadline))
            sock.connect(os.fspath(self.socket_path))
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    def _drop(self, conn: _Conn | None) -> None:
        if conn is None:
            return
        conn.close()
        self._streams.discard(conn)
        if conn is self._conn:
            self._conn = None

    def _exchange(self, call: Call, *, retry: bool, stream: bool) -> tuple[_Conn, Reply]:
        """Send ``call`` and return its connection and first reply, riding over restarts."""
        data = call.encode()
        tries = Attempts(self.socket_path, self.timeout, call)
        while True:
            tries.attempts += 1
            sent = False
            conn = None if stream else self._conn
            if conn is not None and conn.pid != os.getpid():
                # inherited over fork(): the parent owns this stream; closing our copy of the
                # fd does not shut it down for the parent
                self._drop(conn)
                conn = None
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._open(tries.deadline)
                    if stream:
                        self._streams.add(conn)
                    else:
                        self._conn = conn
                conn.send(data, tries.deadline)
                sent = True
                return conn, conn.receive(tries.deadline)
            except BaseException as exc:
                # the connection goes, whatever failed: after a timeout or KeyboardInterrupt
                # the reply may still come and would be taken for the answer to the next call
                self._drop(conn)
                tries.after_failure(exc, sent, retry)
                if reused:
                    # a connection kept from an earlier call broke: lockd restarted in
                    # between, and a new one may answer at once
                    continue
            time.sleep(tries.backoff())

    # -- io.lockd -------------------------------------------------------------------------------

    def _do(self, req: Request[T]) -> T:
        return req.read(self.call(req.method, req.params))

    def register(
        self,
        pid: int,
        *,
        uuid: str | None = None,
        name: str | None = None,
        fence: str | None = None,
    ) -> Reply:
        """Register (idempotently) process ``pid`` as an owner; returns the Owner."""
        return self._do(requests.register(pid, uuid=uuid, name=name, fence=fence))

    def unregister(self, *, owner: str | None = None, pid: int | None = None) -> None:
        """Forget an owner that holds no lease (InvalidParameter if it holds some)."""
        self._do(requests.unregister(owner=owner, pid=pid))

    def acquire(
        self,
        resource: str | os.PathLike[str],
        *,
        owner: str | None = None,
        pid: int | None = None,
        lockspace: str | None = None,
        shared: bool = False,
        token: int | None = None,
    ) -> Reply:
        """Take a lease for the owner (its uuid, or its pid); returns the Lease.

        ``token``: the token the resource's last grant must carry (hand-off), else
        TokenMismatch. A busy resource raises ResourceBusy (also a BlockingIOError).
        """
        return self._do(
            requests.acquire(
                resource, owner=owner, pid=pid, lockspace=lockspace, shared=shared, token=token
            )
        )

    def release(
        self,
        resource: str | os.PathLike[str],
        *,
        owner: str | None = None,
        pid: int | None = None,
        lockspace: str | None = None,
    ) -> Reply:
        """Release a lease (also acknowledges a lost one); returns the released Lease."""
        return self._do(requests.release(resource, owner=owner, pid=pid, lockspace=lockspace))

    def release_all(self, *, owner: str | None = None, pid: int | None = None) -> list[Reply]:
        """Release every lease of the owner; returns the released Leases."""
        return self._do(requests.release_all(owner=owner, pid=pid))

    def inquire(self, *, owner: str | None = None, pid: int | None = None) -> Reply:
        """The owner and its leases: ``{"owner": Owner, "leases": [Lease, ...]}``."""
        return self._do(requests.inquire(owner=owner, pid=pid))

    def watch(self, *, owner: str | None = None, pid: int | None = None) -> Watch:
        """Subscribe to the owner's events; returns once subscribed (see :class:`Watch`)."""
        return Watch(self, requests.watch(owner=owner, pid=pid))

    # -- io.lockd.Admin (admin socket: Client(admin=True)) and org.varlink.service -------------

    def status(self) -> Reply:
        return self._do(requests.status())

    def list_leases(self, lockspace: str | None = None, owner: str | None = None) -> list[Reply]:
        return self._do(requests.list_leases(lockspace, owner))

    def list_owners(self) -> list[Reply]:
        return self._do(requests.list_owners())

    def history(
        self, limit: int | None = None, owner: str | None = None, resource: str | None = None
    ) -> list[Reply]:
        return self._do(requests.history(limit, owner, resource))

    def force_release(
        self,
        resource: str | os.PathLike[str],
        lockspace: str | None = None,
        owner: str | None = None,
    ) -> list[Reply]:
        """Release a resource's leases whatever their owner; returns them (see module doc)."""
        return self._do(requests.force_release(resource, lockspace, owner))

    def metrics(self) -> Reply:
        """The daemon's counters and gauges (``lockctl metrics`` renders them)."""
        return self._do(requests.metrics())

    def get_info(self) -> Reply:
        """vendor, product, version, url, interfaces."""
        return self._do(requests.get_info())

    def get_interface_description(self, interface: str) -> str:
        return self._do(requests.get_interface_description(interface))


class Watch(Iterator[Reply]):
    """The events (wire ``Event`` dicts) of one Watch subscription, on its own connection.

    Iterating blocks until the next event. A broken stream is re-subscribed within the
    Client's timeout (else DaemonUnreachable), and the new subscription's ``watching`` event
    is yielded. Iteration ends when the daemon ends the stream or on :meth:`close` (or the
    Client's close, from any thread); an error reply is raised.
    """

    def __init__(self, client: Client, call: Call) -> None:
        self._client = client
        self._call = call
        conn, first = client._exchange(call, retry=True, stream=True)
        self._conn: _Conn | None = conn
        self._first: Reply | None = first

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client._drop(self._conn)
        self._conn = self._first = None

    def __next__(self) -> Reply:
        msg, self._first = self._first, None
        while msg is None:
            conn = self._conn
            if conn is None or conn.cancelled:
                self.close()
                raise StopIteration
            try:
                msg = conn.receive(None)
            except ProtocolError:
                self.close()
                raise
            except OSError as exc:
                if conn.cancelled:
                    continue
                self.close()
                if exc.errno not in _TRANSIENT:
                    raise
                self._conn, msg = self._client._exchange(self._call, retry=True, stream=True)
        if not msg.get("continues"):
            self.close()
        return reply_object(unwrap(msg), "event")
