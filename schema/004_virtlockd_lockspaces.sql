-- lockd journal, migration 004: the libvirt drop-in (issue 9).
--
-- Named lockspaces are directories of lease files named by the client (libvirt hashes disk
-- paths itself for file_lockspace_dir). libvirtd creates them with virtlockd's
-- CREATE_LOCKSPACE only when libvirtd starts, so lockd must remember them across its own
-- restarts: a later ACQUIRE in one must still find it, and recovery re-takes leases in it
-- from each lease's journaled path. The lockspace's name is its directory.
CREATE TABLE lockspaces (
    name       TEXT PRIMARY KEY,
    directory  TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('named')),
    created_at REAL NOT NULL
) WITHOUT ROWID;

-- The VM manager's own number for an owner, if it gave one (libvirt: the domain id, 1, 2,
-- ... per start), shown beside the owner's name and uuid.
ALTER TABLE owners ADD COLUMN domain_id INTEGER;
