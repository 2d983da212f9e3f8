"""A front end's connection: calls answered one at a time, in order. What every protocol shares.

Theory of operation: a :class:`CallConnection` is an :class:`asyncio.Protocol` (no stream
wrappers, no task per connection). Bytes go through the protocol's sans-IO decoder
(:class:`CallDecoder`: lockd.wire.varlink's or lockd.wire.virtlockd_rpc's) into a queue of calls,
and
the queued calls are answered **from** ``data_received``, in the same loop iteration, one
after another. Each protocol says what a call does (:meth:`CallConnection.start`) and what its
answer is (:meth:`CallConnection.finish`); this class does the rest:

- a call that needs no wait (a refusal, an idempotent repeat, an administrative query) is
  answered at once, and the next one is started;
- a call that waits (the service's ``acquire_nowait``/``release_nowait``, or a task for a
  call that awaits more than the journal: :meth:`CallConnection.run`) is answered through
  :meth:`CallConnection.answered`, which the service calls inside the group commit's flush,
  right after that request's own post-commit step (no future: the service takes
  ``answered`` as its ``done``), or a task's done callback; nothing else on this connection
  starts until it is answered, so replies leave in call order (Varlink requires it;
  libvirt's client waits for each reply anyway) while the calls of different connections
  interleave and share group commits;
- after MAX_QUEUED_CALLS calls answered in one go (calls that need no wait), the other
  connections get a turn first (``call_soon``), as a task's ``sleep(0)`` used to give: a peer
  pipelining thousands of them cannot hold the event loop;
- flow control (DESIGN §8): reading stops once MAX_QUEUED_CALLS calls are queued, an
  unfinished message is longer than the protocol allows, or the peer does not read its
  replies (the transport above its high-water mark, ``pause_writing``), and resumes when
  none of these holds; ``pause_reading``/``resume_reading`` are called only on a change;
- a connection that closes mid-call does not cancel the call: it completes and is
  journaled, only the reply is dropped (a client's retry after reconnecting gets the same
  answer).

Invariants: at most one call of a connection is being answered at any time; a call is
answered (or dropped with a closed connection) exactly once, in the order of arrival; no
reply is written to a closed transport.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Generic, Protocol, TypeVar, cast

from lockd.errors import ProtocolError
from lockd.locks.process import Peer

MAX_QUEUED_CALLS = 64

C = TypeVar("C")  # what the protocol's decoder makes of the bytes: a call (or an event)


class CallDecoder(Protocol[C]):
    """A sans-IO decoder: bytes in, calls out (at most ``limit``; the rest stay buffered and
    come out of a later ``feed``, which may pass ``b""``); ProtocolError on a framing error."""

    def feed(self, data: bytes, limit: int | None = None) -> list[C]: ...

    @property
    def pending(self) -> int: ...  # bytes buffered and not yet returned as calls


class CallConnection(asyncio.Protocol, Generic[C]):
    """One connection of a front end (see the module docstring). Subclasses define
    :meth:`start`, :meth:`finish` and :meth:`framing_error`."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        decoder: CallDecoder[C],
        max_pending: int,
        connections: set[Any],
    ) -> None:
        self.loop = loop
        self.decoder = decoder
        self.max_pending = max_pending  # bytes of an unfinished message, at most
        self.connections = connections  # the listener's, this one included while open
        self.queue: collections.deque[C] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = loop.create_future()
        self.peer = Peer(-1, -1, frozenset())
        self._waiting = False  # a call's answer is awaited (nothing else starts meanwhile)
        # set while the peer does not read its replies (transport above its high-water mark)
        self._peer_behind = False
        self._paused = False  # whether we paused reading
        self._yielded = False  # a turn given to the other connections (see _answer_queued)
        # the service's ``done`` for this connection's calls, bound once (not per call)
        self.answered: Callable[[Any, BaseException | None], None] = self._answered

    # -- what each protocol defines ----------------------------------------------------------
    def start(self, call: C) -> bool:
        """Run a call: answer it now and return False, or return True when its answer comes
        later, to :attr:`answered` (keeping whatever :meth:`finish` needs to shape it)."""
        raise NotImplementedError

    def finish(self, answer: Any, failure: BaseException | None) -> None:
        """Answer the call :meth:`start` left waiting: its answer, or the exception."""
        raise NotImplementedError

    def framing_error(self, exc: ProtocolError) -> None:
        """The byte stream cannot be trusted any more: say so if the protocol can, close."""
        raise NotImplementedError

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # an asyncio.Transport (or uvloop's equivalent, which is not a subclass)
        self.transport = cast(asyncio.Transport, transport)
        self.connections.add(self)
        self.peer = Peer.of_socket(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        if self._waiting or self.queue or self._yielded or self._peer_behind:
            self._decode(data)  # behind the call being answered, or held back: queued
            self._answer_queued()
        else:
            # Nothing queued: a read that is one whole call (the usual case: a client waits
            # for each reply) is started without the queue. With the Varlink decoder's own
            # shortcut for such a read, 3% fewer instructions per pair (bench.instructions).
            try:
                calls = self.decoder.feed(data, MAX_QUEUED_CALLS)
            except ProtocolError as exc:
                self.framing_error(exc)
                return
            if len(calls) == 1 and not self.decoder.pending:
                if self.start(calls[0]):  # _begin, inline
                    self._waiting = True
                # nothing queued or held, the peer reads: reading goes on (_flow has
                # nothing to change unless we had paused)
                if self._paused:
                    self._flow()
                return
            self.queue.extend(calls)
            self._answer_queued()
        self._flow()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.queue.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._peer_behind = True
        self._flow()

    def resume_writing(self) -> None:
        self._peer_behind = False
        self._answer_queued()
        self._flow()

    # -- for the protocols --------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def run(self, coro: Coroutine[Any, Any, Any]) -> bool:
        """Answer a call from a task (it awaits more than the journal); :meth:`start`
        returns what this returns (True: the answer comes later)."""
        self.loop.create_task(coro).add_done_callback(self._task_done)
        return True

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():  # only at shutdown: nothing to answer
            self._waiting = False
            return
        failure = task.exception()
        self._answered(None if failure is not None else task.result(), failure)

    # -- internals ----------------------------------------------------------------------------
    def _decode(self, data: bytes) -> None:
        # Decode only up to the queue's bound: a single read may carry thousands of small
        # calls, and their replies must not pile up in memory for a peer that does not read.
        room = max(0, MAX_QUEUED_CALLS - len(self.queue))
        try:
            self.queue.extend(self.decoder.feed(data, room))
        except ProtocolError as exc:
            self.queue.clear()
            self.framing_error(exc)

    def _flow(self) -> None:
        """Stop reading from a peer that is ahead of us, resume when it is not."""
        ahead = (
            self._peer_behind
            or len(self.queue) >= MAX_QUEUED_CALLS
            or self.decoder.pending > self.max_pending  # calls not yet queued
        )
        if ahead is self._paused:  # the common case: reading, and nothing to pause for
            return
        t = self.transport
        if t is None or t.is_closing():
            return
        if ahead:
            t.pause_reading()
        else:
            t.resume_reading()
        self._paused = ahead

    def _answer_queued(self) -> None:
        """Answer the queued calls in order: each one that needs no wait at once; at the
        first that waits, stop until it is answered (:meth:`_answered` comes back here).
        Nothing more is answered while the peer does not read, nor to a closed peer; and
        after MAX_QUEUED_CALLS answered in one go, the other connections get their turn
        first."""
        queue = self.queue
        budget = MAX_QUEUED_CALLS
        while (
            not self._waiting
            and not self._yielded
            and not self._peer_behind
            and not self.closed.done()
        ):
            if not queue:
                if not self.decoder.pending:
                    return
                self._decode(b"")  # calls left buffered in the decoder
                if not queue:
                    return
            if budget == 0:
                self._yielded = True
                self.loop.call_soon(self._resume)
                return
            budget -= 1
            self._begin(queue.popleft())

    def _begin(self, call: C) -> None:
        """Start a call: answered at once, or ``_waiting`` for its answer (:attr:`answered`)."""
        if self.start(call):
            self._waiting = True

    def _resume(self) -> None:
        self._yielded = False
        self._answer_queued()
        self._flow()

    def _answered(self, answer: Any, failure: BaseException | None) -> None:
        self._waiting = False
        self.finish(answer, failure)
        # Usually nothing more is queued and reading goes on: then neither step has work
        # (answering cannot fill the queue; a full write buffer calls pause_writing itself).
        if self.queue or self.decoder.pending:
            self._answer_queued()
            self._flow()
        elif self._paused:
            self._flow()


class Listener:
    """What a front end's listener shares: its connections, its sockets' servers, closing
    them, and counting connections across front ends (max_connections and Status count
    every connection lockd holds)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.connections: set[Any] = set()
        self.servers: list[asyncio.AbstractServer] = []
        # the other front end's connections, set by the daemon when both listen
        self.count_others: Callable[[], int] = lambda: 0

    def count_connections(self) -> int:
        return len(self.connections) + self.count_others()

    async def listen(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]) -> None:
        srv = await self.loop.create_unix_server(factory, sock=sock, backlog=1024)
        self.servers.append(srv)

    async def close(self) -> None:
        for srv in self.servers:
            srv.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
