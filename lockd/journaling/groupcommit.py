"""Group commit: the journal writes of requests that arrive together, in one transaction.

Theory of operation: every request queues its writes with :meth:`GroupCommit.add`, with its
post-commit step and the function that gets its answer. The first request of a batch
schedules :meth:`GroupCommit.flush` with ``call_soon``, so the flush runs after every request
that arrived in the same loop iteration has queued its writes: one transaction, one
``COMMIT`` (DESIGN §4: nothing is replied before its commit). Then, in submission order,
each request's post-commit step runs (``then(arg, error)``: settle the lease, drop a released
lock) and its answer goes to ``done(answer, failure)``: a front end's reply leaves right
there, in the iteration of the commit. No future, no task per request: the only wait is the
commit. Callers that await (owner death, registration, a lockspace) use :meth:`submit`, whose
future is resolved the same way.

The token sequence lives here too: tokens are allocated in memory (:meth:`next_token`) and
the batch that grants one stores a bound a block ahead (``meta.last_token``), so a token that
was ever replied is never handed out again, even across crashes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from lockd.errors import JournalError
from lockd.journaling.journal import REGROUPED, Journal, Write, set_meta

log = logging.getLogger("lockd")

TOKEN_BLOCK = 1024
T = TypeVar("T")
# a request's step after the commit: then(arg, error) -> its answer (error: the JournalError
# that rolled the commit back, or None); it may raise the request's refusal
Then = Callable[[Any, JournalError | None], Any]
# who gets the answer: done(answer, None), or done(None, the exception)
Done = Callable[[Any, BaseException | None], None]


def resolving(fut: asyncio.Future[Any]) -> Done:
    """A ``done`` that resolves ``fut`` with the answer (or its exception), unless it was
    cancelled meanwhile (its caller went away): how a caller that awaits waits."""

    def done(answer: Any, failure: BaseException | None) -> None:
        if not fut.done():
            if failure is None:
                fut.set_result(answer)
            else:
                fut.set_exception(failure)

    return done


def _no_step(arg: Any, error: JournalError | None) -> Any:
    if error is not None:
        raise error
    return arg


class GroupCommit:
    """Batch the journal writes of requests that arrive together into one transaction.

    Within a batch, the writes of the hot path (lease inserts and deletes, grant rows,
    history events) are gathered per statement, so that N requests cost four
    ``executemany`` calls and one history row rather than 3N ``execute``; every other write
    runs first, in submission order. Regrouping is safe because no two of them in one batch
    touch the same row: a release waits until its lease's acquire has settled (so a lease is
    never inserted and deleted, nor its grant row written and touched, in one batch), an
    owner's death waits for its leases to settle and forgets the owner first (so no insert
    races the owner's ``DELETE ... WHERE owner``), and events keep their relative order.
    """

    def __init__(self, journal: Journal, loop: asyncio.AbstractEventLoop) -> None:
        self.journal = journal
        self.loop = loop
        self._writes: list[Write] = []  # in submission order
        # the hot path's statements: their parameters, each statement's in submission order
        self._runs: dict[str, list[tuple[Any, ...]]] = {sql: [] for sql in REGROUPED}
        # the batch's requests, in submission order: (then, arg, done)
        self._steps: list[tuple[Then, Any, Done]] = []
        self._scheduled = False
        # the token sequence: allocated in memory, stored by the batch that grants it
        self.last_token = 0
        self._stored_token = 0

    def next_token(self) -> int:
        self.last_token += 1
        return self.last_token

    def add(self, writes: tuple[Write, ...], then: Then, arg: Any, done: Done) -> None:
        """Queue writes for the next commit; after it, ``done(then(arg, error), None)`` in
        submission order (or ``done(None, exc)`` if ``then`` raised ``exc``). ``then`` runs
        even when nobody waits for the answer any more: it settles a lease that other
        requests may be waiting for."""
        runs = self._runs
        for sql, params in writes:
            run = runs.get(sql)
            if run is None:
                self._writes.append((sql, params))
            else:
                run.append(params)
        self._steps.append((then, arg, done))
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def submit(self, *writes: Write) -> asyncio.Future[None]:
        """:meth:`add` for a caller that awaits: the future resolves once the writes are
        journaled, or raises the JournalError that rolled them back."""
        fut: asyncio.Future[None] = self.loop.create_future()
        self.add(writes, _no_step, None, resolving(fut))
        return fut

    def flush(self) -> None:
        writes, steps = self._writes, self._steps
        self._writes, self._steps, self._scheduled = [], [], False
        if not steps:
            return
        token = self.last_token
        reserve = self._stored_token
        if token > reserve:
            # Store a bound a block ahead, not every token: one meta write per TOKEN_BLOCK
            # grants. Recovery starts above the bound, so a token that was ever replied is
            # never reused; a crash skips the rest of a block.
            reserve = token + TOKEN_BLOCK
            writes.append(set_meta("last_token", str(reserve)))
        error: JournalError | None = None
        runs = self._runs
        try:
            self.journal.commit(writes, runs)
        except JournalError as exc:
            log.error("journal commit failed: %s", exc, extra={"LOCKD_EVENT": "journal-error"})
            error = exc
        else:
            self._stored_token = reserve
        finally:
            for run in runs.values():
                if run:
                    run.clear()
        for then, arg, done in steps:
            # the request's step after the commit, then its answer to whoever waits for it
            failure: Exception | None = None
            try:
                answer = then(arg, error)
            except Exception as exc:  # the request's refusal (or a bug: an internal error)
                answer, failure = None, exc
            try:
                done(answer, failure)
            except Exception as exc:  # the caller's bug; the other requests go on
                self.loop.call_exception_handler(
                    {"message": "error after a commit", "exception": exc}
                )
