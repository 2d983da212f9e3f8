"""What the lock service counts as it goes: plain integers, incremented on the hot path.

Theory of operation: one attribute add per grant or release, no locks, no label look-ups, no
library; :mod:`lockd.service.metrics` reads them (with the lease table, the journal's files
and the last recovery) when ``io.lockd.Admin.Metrics`` asks. Kept apart from that snapshot so
that the service, which increments them, does not import what reads the service.

Invariant: counters only grow while the process lives (Prometheus' counter semantics).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Counters:
    """Cumulative since this daemon process started."""

    grants: int = 0  # new leases journaled (an idempotent repeat is not a grant)
    releases: int = 0  # released by their owner's client
    owner_releases: int = 0  # released because their owner process died
    force_releases: int = 0  # released by an administrator (ForceRelease)
    conflicts: int = 0  # Acquire answered ResourceBusy
    # leases that became lost: at this process's recovery (recovery.Report.lost) or while it
    # ran (a shared filesystem dropped the lock: LockService.lease_lost)
    lost: int = 0
    fenced: int = 0  # owners signalled by their fence policy
