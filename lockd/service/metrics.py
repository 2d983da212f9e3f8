"""What the daemon counts, and the one snapshot of it that ``io.lockd.Admin.Metrics`` answers.

Theory of operation: the lock service keeps :class:`lockd.service.counters.Counters`, plain
integer attributes that the hot path increments (one attribute add per grant or release: no
locks, no label lookups, no library), and everything else a metric needs is read when
asked: the lease table (leases by lockspace, mode and state; owners), the journal's files
(``os.stat``), the last recovery's report and the fd store's bookkeeping. :func:`snapshot`
builds the wire object of ``schema/io.lockd.Admin.varlink``'s ``Metrics`` type from them.

Rendering in Prometheus' text format is :mod:`lockd.ctl.exposition`'s job, with the official
``prometheus-client``; this module never imports it, so a daemon that does not write a
node_exporter textfile never loads it (start-up time after a crash matters).

Invariants: counters only grow while the process lives (Prometheus' counter semantics; a
restart resets them, which ``rate()`` handles); every (lockspace, mode, state) combination of
the configured lockspaces appears in ``leases``, with 0 when none, so a series never
vanishes when its last lease goes.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lockd import __version__
from lockd.locks.leases import WIRE_STATE, FdNames

if TYPE_CHECKING:
    from lockd.service.recovery import Report
    from lockd.service.service import LockService

MODES = ("exclusive", "shared")
STATES = ("held", "lost")


def lockspace_label(lockspace: str) -> str:
    return "direct" if lockspace == "" else lockspace


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def snapshot(service: LockService, report: Report, started_at: float, connections: int) -> Any:
    """The ``Metrics`` wire object (see the module docstring)."""
    counts: dict[tuple[str, str, str], int] = {
        (ls, mode, state): 0
        for ls in ["direct", *service.lockspaces.indirect]
        for mode in MODES
        for state in STATES
    }
    fds = 0
    for lease in service.table.leases():
        key = (lockspace_label(lease.lockspace), lease.mode, WIRE_STATE[lease.state])
        counts[key] = counts.get(key, 0) + 1
        fds += lease.fd is not None
    journal = service.config.journal_path
    store = service.fdstore.enabled
    return {
        "version": __version__,
        "started_at": started_at,
        "at": time.time(),
        "leases": [
            {"lockspace": ls, "mode": mode, "state": state, "leases": n}
            for (ls, mode, state), n in counts.items()
        ],
        "owners": len(service.table.owners),
        "connections": connections,
        "counters": asdict(service.counters),
        "journal_bytes": _size(journal),
        "wal_bytes": _size(journal.with_name(journal.name + "-wal")),
        "recovery": report.wire(),
        "fd_store": {
            "enabled": store,
            "fds": fds if store else 0,
            "names_bytes": service.fdnames.used_bytes if store else 0,
            "names_limit": FdNames.BUDGET,
        },
    }
