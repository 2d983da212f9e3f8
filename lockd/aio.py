"""asyncio client of lockd: :class:`Client`, the same calls as :class:`lockd.client.Client`.

Theory of operation: the same API, the same errors and the same ride over daemon restarts
as the blocking client, without a thread per call. What is shared, not copied: the calls
(:class:`lockd.calls.requests`: method, parameters and how each reply is read), the retry
policy (:class:`lockd.client.Attempts`: which failures are retried, the backoff, the
timeout, the errors raised), and the Varlink codec (:mod:`lockd.wire.varlink`). Only the I/O
differs: the event loop's ``sock_connect`` / ``sock_sendall`` / ``sock_recv`` on a
non-blocking socket.

Concurrency: any number of tasks may call one Client at once. Each call borrows an idle
connection or opens one and gives it back when answered, so concurrent calls run on
parallel connections (Varlink answers one call at a time per connection, in order) and a
burst of calls costs a few connections, not one each (``MAX_IDLE`` are kept). A call
cancelled mid-flight drops its connection: a late reply must never answer the next call.

:meth:`Client.watch` subscribes on a connection of its own and returns an :class:`Watch`,
an async iterator of events, re-subscribed after a restart like the blocking one.
:meth:`Client.close` (from any task) closes the idle connections and ends every Watch; a
later call reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from errno import ECONNRESET
from typing import Any, TypeVar

from lockd.calls import Reply, Request, reply_object, requests, unwrap
from lockd.client import _TRANSIENT, MAX_REPLY, RECV_SIZE, Attempts, endpoint
from lockd.errors import ProtocolError
from lockd.wire.varlink import Call, Decoder

__all__ = ["Client", "Watch"]

T = TypeVar("T")
MAX_IDLE = 4


class _Conn:
    """One connected non-blocking socket with its decoder; on any failure, dropped whole."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = Decoder(max_message=MAX_REPLY)
        self.inbox: deque[Reply] = deque()
        self.closing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def send(self, data: bytes, tries: Attempts) -> None:
        async with asyncio.timeout_at(_loop_deadline(tries)):
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def receive(self, tries: Attempts | None) -> Reply:
        loop = asyncio.get_running_loop()
        while not self.inbox:
            recv: asyncio.Future[Any] = asyncio.ensure_future(loop.sock_recv(self.sock, RECV_SIZE))
            timeout = None if tries is None else max(0.0, tries.deadline - time.monotonic())
            waiting: set[asyncio.Future[Any]] = {recv, self.closing}
            try:
                done, _ = await asyncio.wait(
                    waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
            except BaseException:
                # cancelled: the pending sock_recv must go too, before the socket is closed,
                # or its reader would linger on an fd number the next socket may get
                recv.cancel()
                raise
            if recv not in done:
                recv.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await recv
                if self.closing.done():
                    raise _Closed
                raise TimeoutError
            data = recv.result()
            if not data:
                raise ConnectionResetError(ECONNRESET, "lockd closed the connection")
            self.inbox.extend(self.decoder.feed(data))
        return self.inbox.popleft()

    @property
    def idle(self) -> bool:
        return not self.inbox and not self.decoder.pending

    def close(self) -> None:
        if not self.closing.done():
            self.closing.set_result(None)
        self.sock.close()


class _Closed(Exception):
    """The connection was closed by Client.close() (a Watch ends)."""


def _loop_deadline(tries: Attempts) -> float:
    # Attempts counts in time.monotonic(); the loop in loop.time() (also monotonic, but not
    # necessarily the same origin)
    loop = asyncio.get_running_loop()
    return loop.time() + max(0.0, tries.deadline - time.monotonic())


class Client:
    """An asyncio connection pool to lockd (``io.lockd``; ``admin=True``: ``io.lockd.Admin``).

    Same arguments as :class:`lockd.client.Client`; use it as ``async with Client() as c``.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 30.0,
        admin: bool = False,
    ) -> None:
        self.socket_path, self.timeout = endpoint(socket_path, timeout, admin)
        self._idle: list[_Conn] = []
        self._streams: set[_Conn] = set()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"aio.Client({str(self.socket_path)!r}, timeout={self.timeout:g})"

    async def close(self) -> None:
        """Close the idle connections and end every :class:`Watch`; the next call reconnects."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        for conn in list(self._streams):
            conn.close()
        self._streams.clear()

    # -- generic call, with the retry loop ----------------------------------------------------

    async def call(
        self, method: str, parameters: dict[str, Any] | None = None, *, retry: bool = True
    ) -> Reply:
        """Call ``method`` (fully qualified) and return the reply's parameters (see
        :meth:`lockd.client.Client.call`)."""
        conn, msg = await self._exchange(Call(method, parameters or {}), retry=retry, stream=False)
        if msg.get("continues") or not conn.idle or len(self._idle) >= MAX_IDLE:
            conn.close()  # out of step (more than one reply), or enough kept already
        else:
            self._idle.append(conn)
        return unwrap(msg)

    async def _open(self, tries: Attempts) -> _Conn:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            async with asyncio.timeout_at(_loop_deadline(tries)):
                await asyncio.get_running_loop().sock_connect(sock, os.fspath(self.socket_path))
        except BaseException:
            sock.close()
            raise
        return _Conn(sock)

    async def _exchange(self, call: Call, *, retry: bool, stream: bool) -> tuple[_Conn, Reply]:
        """Send ``call`` and return its connection and first reply, riding over restarts:
        the loop of :meth:`lockd.client.Client._exchange`, with the same Attempts (which
        decides what each failure means)."""
        data = call.encode()
        tries = Attempts(self.socket_path, self.timeout, call)
        while True:
            tries.attempts += 1
            sent = False
            conn = None if stream or not self._idle else self._idle.pop()
            reused = conn is not None
            try:
                if conn is None:
                    conn = await self._open(tries)
                if stream:
                    self._streams.add(conn)
                await conn.send(data, tries)
                sent = True
                return conn, await conn.receive(tries)
            except BaseException as exc:
                # the connection goes, whatever failed (cancelled too): a reply may still
                # come on it and must not be taken for the answer to another call
                self._drop(conn)
                tries.after_failure(exc, sent, retry)
                if reused:
                    continue  # a kept connection broke: lockd restarted since the last call
            await asyncio.sleep(tries.backoff())

    def _drop(self, conn: _Conn | None) -> None:
        if conn is not None:
            conn.close()
            self._streams.discard(conn)

    # -- io.lockd (the arguments and replies of lockd.client.Client) ----------------------------

    async def _do(self, req: Request[T]) -> T:
        return req.read(await self.call(req.method, req.params))

    async def register(
        self,
        pid: int,
        *,
        uuid: str | None = None,
        name: str | None = None,
        fence: str | None = None,
    ) -> Reply:
        return await self._do(requests.register(pid, uuid=uuid, name=name, fence=fence))

    async def unregister(self, *, owner: str | None = None, pid: int | None = None) -> None:
        await self._do(requests.unregister(owner=owner, pid=pid))

    async def acquire(
        self,
        resource: str | os.PathLike[str],
        *,
        owner: str | None = None,
        pid: int | None = None,
        lockspace: str | None = None,
        shared: bool = False,
        token: int | None = None,
    ) -> Reply:
        return await self._do(
            requests.acquire(
                resource, owner=owner, pid=pid, lockspace=lockspace, shared=shared, token=token
            )
        )

    async def release(
        self,
        resource: str | os.PathLike[str],
        *,
        owner: str | None = None,
        pid: int | None = None,
        lockspace: str | None = None,
    ) -> Reply:
        return await self._do(requests.release(resource, owner=owner, pid=pid, lockspace=lockspace))

    async def release_all(self, *, owner: str | None = None, pid: int | None = None) -> list[Reply]:
        return await self._do(requests.release_all(owner=owner, pid=pid))

    async def inquire(self, *, owner: str | None = None, pid: int | None = None) -> Reply:
        return await self._do(requests.inquire(owner=owner, pid=pid))

    async def watch(self, *, owner: str | None = None, pid: int | None = None) -> Watch:
        """Subscribe to the owner's events; returns once subscribed (``async for``)."""
        call = requests.watch(owner=owner, pid=pid)
        conn, first = await self._exchange(call, retry=True, stream=True)
        return Watch(self, call, conn, first)

    # -- io.lockd.Admin and org.varlink.service ----------------------------------------------

    async def status(self) -> Reply:
        return await self._do(requests.status())

    async def list_leases(
        self, lockspace: str | None = None, owner: str | None = None
    ) -> list[Reply]:
        return await self._do(requests.list_leases(lockspace, owner))

    async def list_owners(self) -> list[Reply]:
        return await self._do(requests.list_owners())

    async def history(
        self, limit: int | None = None, owner: str | None = None, resource: str | None = None
    ) -> list[Reply]:
        return await self._do(requests.history(limit, owner, resource))

    async def force_release(
        self,
        resource: str | os.PathLike[str],
        lockspace: str | None = None,
        owner: str | None = None,
    ) -> list[Reply]:
        return await self._do(requests.force_release(resource, lockspace, owner))

    async def metrics(self) -> Reply:
        return await self._do(requests.metrics())

    async def get_info(self) -> Reply:
        return await self._do(requests.get_info())

    async def get_interface_description(self, interface: str) -> str:
        return await self._do(requests.get_interface_description(interface))


class Watch(AsyncIterator[Reply]):
    """The events of one Watch subscription (see :class:`lockd.client.Watch`): ``async for``
    waits for the next; a broken stream is re-subscribed (its new ``watching`` event is
    yielded); it ends when the daemon ends the stream, on :meth:`close` or the Client's."""

    def __init__(self, client: Client, call: Call, conn: _Conn, first: Reply) -> None:
        self._client = client
        self._call = call
        self._conn: _Conn | None = conn
        self._first: Reply | None = first

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._client._drop(self._conn)
        self._conn = self._first = None

    async def __anext__(self) -> Reply:
        msg, self._first = self._first, None
        while msg is None:
            conn = self._conn
            if conn is None or conn.closing.done():
                self.close()
                raise StopAsyncIteration
            try:
                msg = await conn.receive(None)
            except _Closed:
                continue
            except ProtocolError:
                self.close()
                raise
            except OSError as exc:
                if conn.closing.done():
                    continue
                self.close()
                if exc.errno not in _TRANSIENT:
                    raise
                self._conn, msg = await self._client._exchange(self._call, retry=True, stream=True)
        if not msg.get("continues"):
            self.close()
        return reply_object(unwrap(msg), "event")
