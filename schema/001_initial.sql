-- lockd journal, migration 001: the initial schema.
--
-- The current state is three small tables (owners, leases, resources); history is the
-- append-only events table, pruned to a retention limit (DESIGN §4.5), so recovery reads
-- only current state and its time does not grow with history.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
-- keys: boot_id (of the daemon that last wrote), last_token (the fencing sequence),
-- created_at

CREATE TABLE owners (
    uuid          TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    pid           INTEGER NOT NULL,
    start_time    INTEGER NOT NULL,  -- field 22 of /proc/PID/stat
    boot_id       TEXT NOT NULL,
    uid           INTEGER NOT NULL,
    fence         TEXT NOT NULL CHECK (fence IN ('kill', 'term', 'none')),
    registered_at REAL NOT NULL
);

CREATE TABLE leases (
    id          INTEGER PRIMARY KEY,
    owner       TEXT NOT NULL REFERENCES owners (uuid),
    lockspace   TEXT NOT NULL,
    rkey        TEXT NOT NULL,  -- identity: "dev:ino" (direct) or sha256 of the resource
    resource    TEXT NOT NULL,
    path        TEXT NOT NULL,  -- the file that carries the kernel lock
    mode        TEXT NOT NULL CHECK (mode IN ('exclusive', 'shared')),
    token       INTEGER NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('held', 'lost')),
    acquired_at REAL NOT NULL,
    fdname      TEXT NOT NULL,  -- FDNAME in systemd's fd store
    UNIQUE (owner, lockspace, rkey)
);

-- The last token granted per resource, for hand-offs (Acquire's expected token).
CREATE TABLE resources (
    lockspace  TEXT NOT NULL,
    rkey       TEXT NOT NULL,
    last_token INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (lockspace, rkey)
) WITHOUT ROWID;

CREATE TABLE events (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    at        REAL NOT NULL,
    event     TEXT NOT NULL,
    lockspace TEXT,
    resource  TEXT,
    rkey      TEXT,
    owner     TEXT,
    pid       INTEGER,
    token     INTEGER,
    mode      TEXT,
    reason    TEXT
);
CREATE INDEX events_by_owner ON events (owner, lockspace, rkey);
