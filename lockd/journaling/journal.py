"""The journal: one SQLite file; the only module that speaks SQL (with
lockd/journaling/migrations.py).

Theory of operation (DESIGN §4): the daemon's state is a few small tables (owners, leases
keyed by token, a meta key/value table) that recovery reads whole; ``grants``, each owner's
newest grant per resource (which answers a resource's last token and a repeated Release),
written by triggers on ``leases`` (migration 007: a grant costs no statement of its own);
and an append-only ``history``, pruned to a retention limit so that neither the file nor
recovery grows with the operations ever done.

- History is written one row per transaction: the events of a batch (:func:`lease_event`,
  :func:`owner_event`) are packed into one JSON array, and the row's ``seq`` is the number
  of its first event. Every event still has a number of its own (``seq`` + its index), the
  retention is counted in events, and a reader sees one event per wire record; but a batch
  of N requests costs SQLite one row, not N rows and N/2 index entries (migration 006).

- WAL mode, ``synchronous=NORMAL`` by default: a commit is in the OS page cache when
  ``COMMIT`` returns, which survives any crash of this process (SIGKILL, abort). It may not
  survive a power loss, and need not: after a reboot every owner is dead and every kernel
  lock gone, so a journal from another boot is closed out, never replayed (§4.3).
- The daemon groups the writes of requests that arrive together into one transaction
  (:meth:`Journal.commit`, driven by the service's group commit) and replies only after
  ``COMMIT`` returned. Writes are data (:data:`Write`, built by the functions below), so a
  batch runs as one ``executemany`` per statement rather than one call per request, and its
  events (the pseudo-statement :data:`EVENT`) as one history row.
- Schema changes are numbered SQL files in ``schema/`` applied by sqlite-utils'
  :class:`~sqlite_utils.migrations.Migrations` (:mod:`lockd.journaling.migrations`), in a child
  process
  and only when one is pending (its import alone costs more time than recovering thousands of
  leases, and more memory than 2,000 leases); a journal carrying a migration this build does
  not know was written by a newer lockd and is refused (never downgraded in place).
  Transactions are plain ``BEGIN``/``COMMIT`` on the connection.

The fencing sequence is ``meta.last_token``: the server allocates tokens in memory and the
batch that grants them stores the new maximum in the same transaction, so a token that was
ever replied is never handed out again, even across crashes.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from lockd.errors import JournalError
from lockd.errors import JournalUnreadable as JournalUnreadable  # importable from here, as before
from lockd.journaling import migrations
from lockd.journaling.migrations import PAGE_SIZE

if TYPE_CHECKING:
    from lockd.locks.leases import Lease


# One journal write: a statement and its parameters. The daemon's hot path builds these with
# the functions below and hands a batch of them to Journal.commit, which runs each run of the
# same statement as one executemany.
Write = tuple[str, tuple[Any, ...]]

_INSERT_LEASE = (
    "INSERT INTO leases (token, owner, lockspace, rkey, resource, path, mode, state,"
    " acquired_at, fdname) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_DELETE_LEASE = "DELETE FROM leases WHERE token = ?"
# (the grants table follows the leases table by triggers: schema/007_grant_triggers.sql)
# Not SQL: a history event, packed with the rest of its batch into one history row
EVENT = "history event"
# an event's fields, in the order of its JSON array
EVENT_FIELDS = ("event", "lockspace", "resource", "owner", "pid", "token", "mode", "reason")
# the events as TEXT (JSON that SQLite's json functions read). The group commit binds them as
# a str (orjson's bytes decoded): the sqlite3 module binds a str directly but runs its adapter
# look-up for bytes (~3k instructions per commit, bench.instructions). Other writers (recovery
# journaling 10,000 events in one row, pruning) bind orjson's bytes and let SQLite CAST them:
# no decoded copy of a large batch beside the bytes (that copy cost ~0.9 MB of RSS once
# 10,000 leases were recovered). CAST of a str is a no-op.
_INSERT_HISTORY = "INSERT INTO history (seq, at, events) VALUES (?, ?, CAST(? AS TEXT))"
# The hot path's statements, which a group commit may regroup (see groupcommit.GroupCommit)
REGROUPED = (_INSERT_LEASE, _DELETE_LEASE, EVENT)
_PUT_OWNER = (
    "INSERT OR REPLACE INTO owners (uuid, name, pid, start_time, boot_id, uid, fence,"
    " registered_at, domain_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def grant_writes(lease: Lease) -> tuple[Write, Write]:
    """A new lease's writes: its row (held: a lease becomes lost only by set_lease_state;
    a trigger writes the owner's newest grant on the resource from it, for hand-offs and
    repeated Releases) and its "acquire" event. One function for both: every grant."""
    owner = lease.owner
    uuid, ls, token, mode, resource = (
        owner.uuid,
        lease.lockspace,
        lease.token,
        lease.mode,
        lease.resource,
    )
    return (
        (_INSERT_LEASE, (token, uuid, ls, lease.rkey, resource, lease.path, mode, "held",
                         lease.acquired_at, lease.fdname)),
        (EVENT, ("acquire", ls, resource, uuid, owner.pid, token, mode, None)),
    )  # fmt: skip


def end_writes(lease: Lease, event: str, reason: str | None) -> tuple[Write, Write]:
    """The end of a lease (``event``: release, force-release): its row deleted (a trigger
    touches its grant row, kept as long as that end is in history), and the event."""
    owner = lease.owner
    return (
        (_DELETE_LEASE, (lease.token,)),
        (EVENT, (event, lease.lockspace, lease.resource, owner.uuid, owner.pid, lease.token,
                 lease.mode, reason)),
    )  # fmt: skip


def set_lease_state(token: int, state: str) -> Write:
    return ("UPDATE leases SET state = ? WHERE token = ?", (state, token))


def lease_event(event: str, lease: Lease, reason: str | None = None) -> Write:
    """A history event about a lease (its fields from the lease itself)."""
    return (
        EVENT,
        (
            event,
            lease.lockspace,
            lease.resource,
            lease.owner.uuid,
            lease.owner.pid,
            lease.token,
            lease.mode,
            reason,
        ),
    )


def owner_event(event: str, owner: str, pid: int, reason: str | None) -> Write:
    """A history event about an owner (register, owner-dead)."""
    return (EVENT, (event, None, None, owner, pid, None, None, reason))


def put_owner(row: dict[str, Any]) -> Write:
    return (_PUT_OWNER, tuple(row[k] for k in _OWNER_COLUMNS))


def delete_owner(uuid: str) -> list[Write]:
    return [
        ("DELETE FROM leases WHERE owner = ?", (uuid,)),
        ("DELETE FROM owners WHERE uuid = ?", (uuid,)),
    ]


def put_lockspace(name: str, directory: str, kind: str = "named") -> Write:
    """A lockspace created at run time (migration 004)."""
    return (
        "INSERT OR REPLACE INTO lockspaces (name, directory, kind, created_at) VALUES (?, ?, ?, ?)",
        (name, directory, kind, time.time()),
    )


def set_meta(key: str, value: str) -> Write:
    return (
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (key, value),
    )


_OWNER_COLUMNS = (
    "uuid",
    "name",
    "pid",
    "start_time",
    "boot_id",
    "uid",
    "fence",
    "registered_at",
    "domain_id",
)


LEASE_COLUMNS = (
    "token",
    "owner",
    "lockspace",
    "rkey",
    "resource",
    "path",
    "mode",
    "state",
    "acquired_at",
    "fdname",
)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything recovery needs. Nothing else writes the journal meanwhile (the daemon
    holds it exclusively and serves nobody yet), so no transaction is needed to read it."""

    meta: dict[str, str]
    owners: list[dict[str, Any]]
    # rows in LEASE_COLUMNS order, read one by one (a cursor, not a list: recovery turns
    # each into a lease at once, and 10,000 rows held at once would stay in the daemon's
    # peak RSS for good)
    leases: Iterator[tuple[Any, ...]]


_LEASE_WIRE_SQL = """
SELECT l.lockspace, l.resource, l.path, l.mode, l.token, l.state, l.acquired_at,
       o.uuid, o.name, o.pid
FROM leases l JOIN owners o ON o.uuid = l.owner
"""


def _lease_wire(row: sqlite3.Row | tuple[Any, ...]) -> dict[str, Any]:
    ls, resource, path, mode, token, state, at, uuid, name, pid = tuple(row)
    return {
        "lockspace": ls,
        "resource": resource,
        "path": path,
        "mode": mode,
        "owner": {"uuid": uuid, "name": name, "pid": pid},
        "token": token,
        "state": state,
        "acquired_at": at,
        "continuity": "journal",
    }


def _event_wire(seq: int, at: float, fields: list[Any]) -> dict[str, Any]:
    """One history event as the wire shows it: its number, its batch's time, its fields."""
    return {"seq": seq, "at": at, **dict(zip(EVENT_FIELDS, fields, strict=True))}


class Journal:
    def __init__(self, path: Path, synchronous: str = "NORMAL", readonly: bool = False) -> None:
        self.path = path
        try:
            if readonly:
                # Without a -wal file there is nothing to recover: immutable=1 reads the
                # file without creating -shm/-wal beside it (reading must leave no trace).
                wal = path.with_name(path.name + "-wal").exists()
                uri = f"file:{path}?mode=ro" + ("" if wal else "&immutable=1")
                conn = sqlite3.connect(uri, uri=True)
            else:
                pending = migrations.known()
                if path.exists() and path.stat().st_size:
                    # Judge an existing file read-only first: a journal we refuse (newer,
                    # foreign, corrupt) must be left byte for byte as it was, and switching
                    # it to WAL or closing a writer on it would already rewrite it.
                    judged = Journal(path, readonly=True)
                    pending = migrations.pending(judged.conn, path)
                    judged.close()
                if pending:
                    migrations.migrate_in_child(path, pending)
                conn = sqlite3.connect(str(path))
            # We issue BEGIN/COMMIT ourselves (group commit); no implicit transactions.
            conn.isolation_level = None
            self.conn: sqlite3.Connection = conn
            self.next_seq = 1  # the number of the next history event (set once migrated)
            # the group commit's statements run on one cursor: Connection.execute makes a
            # cursor object per call (~0.15 µs each, 5 calls per commit)
            self._cursor = conn.cursor()
            if not readonly:
                # A commit writes every page it touched, whole, to the WAL: a grant touches a
                # handful of rows in as many tables, so small pages mean fewer bytes per
                # commit (only a new file takes it; a WAL database keeps its page size).
                conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
                # Exclusive locking, set before the first WAL access: SQLite then keeps the
                # WAL index in our heap instead of a -shm file and takes the file lock once,
                # not ~6 fcntl() calls per transaction (strace of bench/ pairs: 30% of the
                # daemon's syscall time). It also means no other process can hold a read
                # lock that stalls our checkpoints or commits; readers (lockctl dump, tests)
                # read while lockd is down, or a copy of the files.
                conn.execute("PRAGMA locking_mode=EXCLUSIVE")
                conn.execute("PRAGMA journal_mode=WAL")
                # A -shm beside the file is a reader's (the read-only look above, or `lockctl
                # dump`, at a journal that a crash left with a -wal): SQLite must map one to
                # read a WAL. We hold the file's exclusive lock from the pragma above on, and
                # in this mode SQLite never uses a -shm, so nobody can: remove the leftover.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path.with_name(path.name + "-shm"))
                conn.execute(f"PRAGMA synchronous={synchronous}")
                # a checkpoint resets the WAL; without a limit it keeps its largest size
                conn.execute("PRAGMA journal_size_limit=8388608")
                # 512 KiB of page cache instead of 2 MiB: the hot pages (the leases table,
                # the ends of events and its index) fit, and bench/ showed no loss in pairs/s
                # while the daemon's RSS with 10,000 leases fell by ~1.5 MB
                conn.execute("PRAGMA cache_size=-512")
                self._migrate()
                self.next_seq = self._read_next_seq()
            else:
                migrations.pending(conn, path)
                # corruption a schema read does not touch (a page of a table) shows here
                if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise JournalUnreadable(f"{path} is corrupt (PRAGMA quick_check)")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                # the running daemon's exclusive lock (see the PRAGMA above)
                raise JournalUnreadable(
                    f"{path} is in use by a running lockd; ask it (lockctl locks, lockctl"
                    " history) or stop it first"
                ) from None
            raise JournalUnreadable(f"cannot use the lockd journal {path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise JournalUnreadable(f"cannot use the lockd journal {path}: {exc}") from None

    # -- schema -------------------------------------------------------------------------
    def _migrate(self) -> None:
        pending = migrations.pending(self.conn, self.path)
        if pending:  # the child said it applied them; it did not
            raise JournalUnreadable(f"{self.path}: migrations {sorted(pending)} not applied")
        if self.get_meta("created_at") is None:
            with self.transaction():
                self.set_meta("created_at", str(time.time()))
                self.set_meta("last_token", "0")

    # -- transactions -------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic batch; a failed commit (ENOSPC, EIO, ...) becomes JournalError."""
        # Plain BEGIN/COMMIT on the connection (isolation_level None), without sqlite-utils'
        # atomic() generator and savepoint bookkeeping.
        seq = self.next_seq
        try:
            self.conn.execute("BEGIN")
            try:
                yield
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self.next_seq = seq  # the events of a rolled-back batch were never numbered
            raise JournalError(f"journal write failed: {exc}", reason=str(exc)) from None

    def write(self, writes: Iterable[Write]) -> None:
        """Run writes inside the current transaction, in order; a run of one statement is one
        executemany (a batch of grants costs one call into SQLite, not one per grant), and
        the events among them become one history row."""
        events: list[tuple[Any, ...]] = []
        for sql, run in itertools.groupby(writes, key=operator.itemgetter(0)):
            if sql == EVENT:
                events += [fields for _, fields in run]
            else:
                self.conn.executemany(sql, [params for _, params in run])
        if events:
            seq = self.next_seq
            self.conn.execute(_INSERT_HISTORY, (seq, time.time(), orjson.dumps(events)))
            self.next_seq = seq + len(events)

    def commit(
        self, writes: Iterable[Write], runs: dict[str, list[tuple[Any, ...]]] | None = None
    ) -> None:
        """The writes, then ``runs`` (statement -> its parameter lists, as the group commit
        gathers the hot path's writes; :data:`EVENT`'s become one history row), as one
        transaction; JournalError if it failed (nothing was written). The group commit's
        path: :meth:`transaction` without its generator."""
        conn, cur, seq = self.conn, self._cursor, self.next_seq
        try:
            cur.execute("BEGIN")
            try:
                if writes:
                    self.write(writes)
                if runs is not None:
                    for sql, params in runs.items():
                        if not params:
                            continue
                        if sql == EVENT:
                            first = self.next_seq
                            cur.execute(
                                _INSERT_HISTORY, (first, time.time(), orjson.dumps(params).decode())
                            )
                            self.next_seq = first + len(params)
                        else:
                            cur.executemany(sql, params)
                cur.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self.next_seq = seq
            raise JournalError(f"journal write failed: {exc}", reason=str(exc)) from None

    def close(self) -> None:
        self.conn.close()

    # -- meta -----------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute(*set_meta(key, value))

    # -- state ----------------------------------------------------------------------------
    def load(self) -> Snapshot:
        meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        owners = self._dicts("SELECT * FROM owners")
        # tuples, not dicts or sqlite3.Row: a fifth of the memory, no lookup by name
        leases = self.conn.execute(f"SELECT {', '.join(LEASE_COLUMNS)} FROM leases ORDER BY token")
        return Snapshot(meta, owners, leases)

    def has_leases(self) -> bool:
        return bool(self.conn.execute("SELECT EXISTS (SELECT 1 FROM leases)").fetchone()[0])

    def _dicts(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def lockspaces(self) -> list[tuple[str, str, str]]:
        """(name, directory, kind) of the lockspaces created at run time."""
        rows = self.conn.execute("SELECT name, directory, kind FROM lockspaces ORDER BY name")
        return [(str(n), str(d), str(k)) for n, d, k in rows]

    def resource_token(self, lockspace: str, rkey: str) -> int:
        """The last token granted on a resource, as far as history remembers."""
        row = self.conn.execute(
            "SELECT max(token) FROM grants WHERE lockspace = ? AND rkey = ?", (lockspace, rkey)
        ).fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    def close_all(self, event: str, reason: str) -> int:
        """Close out every lease and owner (a journal from another boot). Returns leases."""
        rows = self.conn.execute(
            "SELECT l.lockspace, l.resource, l.owner, o.pid, l.token, l.mode"
            " FROM leases l JOIN owners o ON o.uuid = l.owner ORDER BY l.token"
        ).fetchall()
        self.write(
            [
                (EVENT, (event, ls, res, owner, pid, token, mode, reason))
                for ls, res, owner, pid, token, mode in rows
            ]
        )
        self.conn.execute("DELETE FROM leases")
        self.conn.execute("DELETE FROM owners")
        return len(rows)

    # -- history --------------------------------------------------------------------------
    def last_release(self, owner: str, lockspace: str, rkey: str) -> dict[str, Any] | None:
        """The owner's newest lease on the resource, if history still knows it: for
        idempotent Release (repeating a release whose reply was lost answers the same). The
        caller asks only about a lease it no longer holds, so that lease has ended."""
        row = self.conn.execute(
            "SELECT token, mode, resource FROM grants"
            " WHERE lockspace = ? AND rkey = ? AND owner = ?",
            (lockspace, rkey, owner),
        ).fetchone()
        if row is None:
            return None
        return {"token": row[0], "mode": row[1], "resource": row[2]}

    def history(
        self, limit: int = 50, owner: str | None = None, resource: str | None = None
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` events (of ``owner``, on ``resource``), oldest first."""
        out: list[dict[str, Any]] = []
        # rows whose JSON text does not even contain the names are skipped by SQLite itself
        needles = [orjson.dumps(v).decode() for v in (owner, resource) if v is not None]
        where = " AND ".join(["instr(events, ?)"] * len(needles)) or "1"
        rows = self.conn.execute(
            f"SELECT seq, at, events FROM history WHERE {where} ORDER BY seq DESC", needles
        )
        for seq, at, packed in rows:
            events = orjson.loads(packed)
            for i in range(len(events) - 1, -1, -1):
                fields = events[i]
                if (owner is None or fields[3] == owner) and (
                    resource is None or fields[2] == resource
                ):
                    out.append(_event_wire(seq + i, at, fields))
                    if len(out) >= limit:
                        out.reverse()
                        return out
        out.reverse()
        return out

    def _read_next_seq(self) -> int:
        row = self.conn.execute(
            "SELECT seq + json_array_length(events) FROM history ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return 1 if row is None else int(row[0])

    def prune(self, retention: int, batch: int = 5000) -> int:
        """Delete at most about ``batch`` of the events beyond the newest ``retention``, and
        the grants that only they remembered; returns how many events went. Small batches:
        this runs on the event loop, and a large DELETE would stall every client (and grow
        the WAL) for as long as it takes."""
        keep = self.next_seq - retention  # the oldest event number to keep
        with self.transaction():
            first = self.conn.execute("SELECT min(seq) FROM history").fetchone()[0]
            if first is None or first >= keep:
                return 0
            upto = min(keep, first + batch)
            # the row holding event `upto` (it may begin before it): the rows before it go
            # whole, and it loses its events before `upto`
            seq, at, packed = self.conn.execute(
                "SELECT seq, at, events FROM history WHERE seq <= ? ORDER BY seq DESC LIMIT 1",
                (upto,),
            ).fetchone()
            self.conn.execute("DELETE FROM history WHERE seq < ?", (seq,))
            if seq < upto:
                events = orjson.loads(packed)[upto - seq :]
                self.conn.execute("DELETE FROM history WHERE seq = ?", (seq,))
                if events:
                    self.conn.execute(_INSERT_HISTORY, (upto, at, orjson.dumps(events)))
            # a grant (or the end of its lease) older than all history left is forgotten,
            # unless the lease is still held: its release must answer with its token
            self.conn.execute(
                "DELETE FROM grants WHERE at < (SELECT at FROM history ORDER BY seq LIMIT 1)"
                " AND token NOT IN (SELECT token FROM leases)"
            )
        return int(upto - first)

    # -- read-only views (lockctl dump) ---------------------------------------------------
    def wire_leases(self) -> list[dict[str, Any]]:
        return [_lease_wire(r) for r in self.conn.execute(_LEASE_WIRE_SQL + " ORDER BY l.token")]

    def wire_owners(self) -> list[dict[str, Any]]:
        return self._dicts(
            "SELECT o.uuid, o.name, o.pid, o.uid, o.start_time, o.fence, o.registered_at,"
            " o.domain_id,"
            " (SELECT count(*) FROM leases l WHERE l.owner = o.uuid) AS leases FROM owners o"
            " ORDER BY o.registered_at"
        )


# meta's values are TEXT in the table; in a dump, numbers are numbers
_META_TYPES: dict[str, type] = {"last_token": int, "created_at": float}


def dump(state_dir: Path, history: int = 50) -> dict[str, Any]:
    """The journal's content in wire shapes, read-only (the daemon may be down)."""
    from lockd.config import JOURNAL_NAME

    path = state_dir / JOURNAL_NAME
    if not path.exists():
        raise FileNotFoundError(f"no lockd journal at {path}")
    journal = Journal(path, readonly=True)
    try:
        with journal.transaction():
            meta = {
                key: _META_TYPES.get(key, str)(value)
                for key, value in journal.conn.execute("SELECT key, value FROM meta")
            }
            return {
                "meta": meta,
                "leases": journal.wire_leases(),
                "owners": journal.wire_owners(),
                "events": journal.history(history),
            }
    finally:
        journal.close()
