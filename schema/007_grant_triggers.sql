-- lockd journal, migration 007: the grants table kept by triggers on leases.
--
-- Every grant wrote its lease row and then, in a statement of its own, the owner's newest
-- grant on the resource; every end of a lease deleted its row and then touched that grant.
-- Each statement is a call through Python's sqlite3 module (statement cache, parameter
-- binding, the GIL released and taken again), which cost more than SQLite's own work for
-- the row. The triggers do the same writes inside the lease row's statement: the grant is
-- the inserted row's (lockspace, rkey, owner, token, mode, resource, acquired_at), and any
-- end of a lease (a release, an owner's death, an administrator's release) sets its
-- grant's `at` to now, so the grant is kept as long as that end is in history. Measured
-- with bench.instructions (the grant and touch statements left out): ~35k instructions
-- fewer per acquire+release pair, of ~335k.

CREATE TRIGGER leases_grant AFTER INSERT ON leases BEGIN
    INSERT OR REPLACE INTO grants (lockspace, rkey, owner, token, mode, resource, at)
    VALUES (NEW.lockspace, NEW.rkey, NEW.owner, NEW.token, NEW.mode, NEW.resource,
            NEW.acquired_at);
END;

-- julianday('now') in seconds since the epoch (SQLite 3.40, Debian 12's, has no
-- unixepoch('subsec')): the same clock as the history rows' `at` (time.time())
CREATE TRIGGER leases_end AFTER DELETE ON leases BEGIN
    UPDATE grants SET at = (julianday('now') - 2440587.5) * 86400.0
    WHERE lockspace = OLD.lockspace AND rkey = OLD.rkey AND owner = OLD.owner;
END;
