"""The journal's schema: numbered migrations, applied forward only, in a child process.

Theory of operation: the schema is the SQL files ``schema/NNN_name.sql``, applied in file-name
order by sqlite-utils' :class:`~sqlite_utils.migrations.Migrations`, which records each one
in the journal's ``_sqlite_migrations`` table (migration set ``lockd``). :func:`pending`
compares that record with the files this build has and says which are still to apply; a
journal that records a migration this build does not know was written by a newer lockd and is
refused, and an SQLite file without the record but with tables is not a lockd journal and is
refused too. Refused means :class:`~lockd.errors.JournalUnreadable`, with the file left as it
was: :class:`lockd.journaling.journal.Journal` judges an existing file read-only first.

Pending migrations run in a short-lived child (:func:`migrate_in_child`), never in the
daemon: importing sqlite-utils (click, dateutil, ctypes, ...) costs ~0.1-0.25 s of start-up,
which every restart after a crash would pay, and ~3 MB of RSS that would stay for good; a
migration is needed once per schema change. The child creates a new journal with
:data:`PAGE_SIZE` and in WAL mode; the daemon opens the file only once the child is gone.

Each file runs statement by statement (``sqlite3.complete_statement`` finds their ends, past
comments and strings) inside the migration's own transaction, so a migration and its record
commit together: a crash or an error mid-migration leaves the journal at the one before.

Invariants: a journal is only ever migrated forward, to the files this build carries; a
journal this build refuses is not written at all.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from lockd.errors import JournalUnreadable

MIGRATION_SET = "lockd"
PAGE_SIZE = 1024  # for new journals: see Journal.__init__

# lockd is installed as files (setuptools, never zipped): the schema is beside this module.
# (importlib.resources would say the same and cost ~3 ms of every start to import.)
SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"


def _names() -> list[str]:
    sql_files = sorted(p.name for p in SCHEMA_DIR.iterdir() if p.name.endswith(".sql"))
    return [n.removesuffix(".sql") for n in sql_files]


def files() -> list[tuple[str, str]]:
    """(name, SQL) of every migration this build has, in the order they apply."""
    return [(n, (SCHEMA_DIR / f"{n}.sql").read_text()) for n in _names()]


def known() -> set[str]:
    """The names of the migrations this build has (every start asks, up to three times:
    the names only, the SQL is read only by the migrating child)."""
    return set(_names())


def applied(conn: sqlite3.Connection) -> set[str]:
    """Names of the migrations recorded in the journal (sqlite-utils' own table)."""
    if not conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlite_migrations'"
    ).fetchone():
        return set()
    rows = conn.execute(
        "SELECT name FROM _sqlite_migrations WHERE migration_set = ?", (MIGRATION_SET,)
    )
    return {str(r[0]) for r in rows}


def pending(conn: sqlite3.Connection, path: Path) -> set[str]:
    """The known migrations not yet applied to the journal at ``path`` (open as ``conn``);
    refuses a journal from a newer lockd, or an SQLite file that is not a lockd journal."""
    names = known()
    done = applied(conn)
    newer = sorted(done - names)
    if newer:
        raise JournalUnreadable(
            f"{path} was written by a newer lockd (schema {', '.join(newer)}); refusing to use it"
        )
    if not done and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
        raise JournalUnreadable(f"{path} is an SQLite file, but not a lockd journal")
    return names - done


def apply(conn: sqlite3.Connection, names: set[str]) -> None:
    """Apply the migrations ``names`` (in file-name order) on ``conn``: the child's work."""
    # sqlite-utils is imported only here, in the migrating child: it costs ~0.1-0.25 s of
    # start-up, which every restart after a crash would pay, and ~3 MB that would stay.
    import sqlite_utils
    from sqlite_utils.migrations import Migrations

    migrations = Migrations(MIGRATION_SET)
    for name, sql in files():
        if name not in names:
            continue

        def run(db: sqlite_utils.Database, sql: str = sql) -> None:
            # executescript would COMMIT the migration's transaction; run statement by
            # statement instead so the migration and its record commit together.
            statement = ""
            for line in sql.splitlines(keepends=True):
                statement += line
                # complete_statement knows comments and strings: a ';' in them ends nothing
                if sqlite3.complete_statement(statement):
                    db.execute(statement)
                    statement = ""

        migrations(name=name)(run)
    migrations.apply(sqlite_utils.Database(conn))


def migrate_in_child(path: Path, names: set[str]) -> None:
    """Apply migrations in a short-lived child process (:func:`_migrate_main`).

    sqlite-utils, and what it imports (click, dateutil, ctypes, ...), would otherwise stay
    in the daemon's memory for good after its first start: ~3 MB of RSS for a step taken
    once per schema change. The child creates a new journal with the daemon's page size and
    in WAL mode; the daemon opens the file only once the child is gone (it then holds the
    file's lock for its whole life)."""
    proc = subprocess.run(
        # -c, not -m lockd.journaling.migrations: runpy cannot run a module compiled with mypyc
        [sys.executable, "-c", _MIGRATE_CHILD, str(path), *sorted(names)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise JournalUnreadable(f"cannot migrate the lockd journal {path}: {lines[-1]}")


_MIGRATE_CHILD = (
    "import sys; from lockd.journaling.migrations import _migrate_main; sys.exit(_migrate_main())"
)


def _migrate_main(argv: list[str] | None = None) -> int:
    """The child of :func:`migrate_in_child`: PATH MIGRATION..."""
    if argv is None:
        argv = sys.argv[1:]
    conn = sqlite3.connect(argv[0], isolation_level=None)
    try:
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        apply(conn, set(argv[1:]))
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(_migrate_main(sys.argv[1:]))
