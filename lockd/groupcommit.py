"""Group commit: the journal writes of requests that arrive together, in one transaction.

Theory of operation: every request queues its writes with :meth:`GroupCommit.submit` and
gets a future. The first submit of a batch schedules :meth:`GroupCommit.flush` with
``call_soon``, so the flush runs after every request that arrived in the same loop iteration
has queued its writes: one transaction, one ``COMMIT`` (DESIGN §4: nothing is replied before
its commit). Then, in submission order, each request's post-commit step (``then``) runs and
its future resolves; a front end that registered with :meth:`~GroupCommit.call_after_commit`
answers right there, in the iteration of the commit.

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
from lockd.journal import REGROUPED, Journal, Write, set_meta

log = logging.getLogger("lockd")

TOKEN_BLOCK = 1024
T = TypeVar("T")
# what follows a commit: called with None, or with the JournalError that rolled it back
Then = Callable[[JournalError | None], T]


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
        # the batch's futures, in submission order, with their post-commit steps
        self._waiters: dict[asyncio.Future[Any], Then[Any] | None] = {}
        # what to call as soon as one of them is resolved (see call_after_commit)
        self._after: dict[asyncio.Future[Any], Callable[[asyncio.Future[Any]], None]] = {}
        self._scheduled = False
        # the token sequence: allocated in memory, stored by the batch that grants it
        self.last_token = 0
        self._stored_token = 0

    def next_token(self) -> int:
        self.last_token += 1
        return self.last_token

    def submit(self, *writes: Write, then: Then[T] | None = None) -> asyncio.Future[T]:
        """Queue writes for the next commit. The future resolves once they are journaled
        (or raises the JournalError that rolled them back); with ``then``, to what
        ``then(error)`` returns or raises, called right after the commit in submission
        order: the step that must follow a commit runs before any reply is sent, without a
        task to wake up."""
        fut: asyncio.Future[T] = self.loop.create_future()
        runs = self._runs
        for sql, params in writes:
            run = runs.get(sql)
            if run is None:
                self._writes.append((sql, params))
            else:
                run.append(params)
        self._waiters[fut] = then
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)
        return fut

    def call_after_commit(
        self, fut: asyncio.Future[T], fn: Callable[[asyncio.Future[T]], None]
    ) -> bool:
        """Have ``fn(fut)`` called as soon as the flush has resolved ``fut`` (a future from
        :meth:`submit` not flushed yet): in the flush itself, right after that request's own
        step and before the next request's. A done callback would run one loop iteration
        later; this is how a front end sends its reply in the iteration of the commit.
        False if ``fut`` is not waiting for a flush (a task, a resolved future): then use
        ``fut.add_done_callback``."""
        if fut not in self._waiters:
            return False
        self._after[fut] = fn
        return True

    def flush(self) -> None:
        writes, waiters, after = self._writes, self._waiters, self._after
        self._writes, self._waiters, self._after, self._scheduled = [], {}, {}, False
        if not waiters:
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
                run.clear()
        for fut, then in waiters.items():
            # the request's step after the commit, then its future resolved with the answer;
            # the step runs even when nobody waits for the answer any more (a cancelled
            # future): it settles a lease that other requests may be waiting for
            answer: Any = None
            failure: Exception | None = error
            if then is not None:
                try:
                    answer, failure = then(error), None
                except Exception as exc:  # the request's refusal (or a bug: an internal error)
                    failure = exc
            if not fut.done():
                if failure is None:
                    fut.set_result(answer)
                else:
                    fut.set_exception(failure)
            fn = after.get(fut)
            if fn is not None:
                try:
                    fn(fut)
                except Exception as exc:  # the caller's bug; the other requests go on
                    self.loop.call_exception_handler(
                        {"message": "error after a commit", "exception": exc, "future": fut}
                    )
