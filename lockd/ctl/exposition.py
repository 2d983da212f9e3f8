"""Prometheus text exposition of lockd's metrics, with the official ``prometheus-client``.

Theory of operation: :func:`render` turns one ``Metrics`` snapshot (the reply of
``io.lockd.Admin.Metrics``, built by :func:`lockd.service.metrics.snapshot`) into the text format
through a custom collector in a private registry (nothing global, no process or platform
metrics of the *caller*: ``lockctl metrics`` describes the daemon, not itself).
:func:`write_textfile` writes the same text for node_exporter's textfile collector
(``--collector.textfile.directory``) with the library's ``write_to_textfile``: a temporary
file beside the target, then ``rename(2)``, so a scrape never reads half a file (the
temporary name does not end in ``.prom``, which the collector ignores).

Used by ``lockctl metrics`` and, only when ``metrics_textfile_dir`` is set, by the daemon's
timer: importing this module imports prometheus-client, which the daemon otherwise never
loads.

Metric names follow Prometheus' conventions (a ``lockd_`` prefix, ``_total`` counters,
base units: seconds, bytes). What each one means is in its HELP text, which is the
documentation (``lockctl metrics`` prints it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest, write_to_textfile
from prometheus_client.registry import Collector, CollectorRegistry

TEXTFILE_NAME = "lockd.prom"
RECOVERY_OUTCOMES = ("adopted", "retaken", "lost", "released", "host_rebooted")


class _Snapshot(Collector):
    def __init__(self, metrics: dict[str, Any]) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        info = GaugeMetricFamily("lockd_info", "lockd's version", labels=["version"])
        info.add_metric([str(m["version"])], 1)
        yield info
        yield GaugeMetricFamily(
            "lockd_start_time_seconds", "when this lockd process started (Unix time)",
            value=m["started_at"],
        )  # fmt: skip
        leases = GaugeMetricFamily(
            "lockd_leases",
            "leases by lockspace, mode and state (held: locked; lost: taken while lockd was"
            " down, kept until acknowledged)",
            labels=["lockspace", "mode", "state"],
        )
        for row in m["leases"]:
            leases.add_metric([row["lockspace"], row["mode"], row["state"]], row["leases"])
        yield leases
        yield GaugeMetricFamily("lockd_owners", "registered owners", value=m["owners"])
        yield GaugeMetricFamily(
            "lockd_connections", "open client connections", value=m["connections"]
        )
        c = m["counters"]
        yield CounterMetricFamily(
            "lockd_grants", "leases granted (journaled) by this process", value=c["grants"]
        )
        released = CounterMetricFamily(
            "lockd_releases",
            "leases released by this process, by cause (client: its owner's client; "
            "owner-death: the owner process died; admin: ForceRelease)",
            labels=["cause"],
        )
        released.add_metric(["client"], c["releases"])
        released.add_metric(["owner-death"], c["owner_releases"])
        released.add_metric(["admin"], c["force_releases"])
        yield released
        yield CounterMetricFamily(
            "lockd_conflicts",
            "Acquire calls answered ResourceBusy (another holder, or the owner in the other mode)",
            value=c["conflicts"],
        )
        yield CounterMetricFamily(
            "lockd_leases_lost",
            "leases that became lost: at this process's recovery (taken by another holder in"
            " the gap, or not lockable again) or while it ran (a shared filesystem dropped the"
            " lock)",
            value=c["lost"],
        )
        yield CounterMetricFamily(
            "lockd_owners_fenced",
            "owners signalled by their fence policy (kill: SIGKILL, term: SIGTERM)",
            value=c["fenced"],
        )
        journal = GaugeMetricFamily(
            "lockd_journal_bytes", "size of the journal's files", labels=["file"]
        )
        journal.add_metric(["db"], m["journal_bytes"])
        journal.add_metric(["wal"], m["wal_bytes"])
        yield journal
        r = m["recovery"]
        yield GaugeMetricFamily(
            "lockd_recovery_duration_seconds",
            "how long the last recovery took (start-up until the leases were settled)",
            value=r["duration_ms"] / 1000,
        )
        yield GaugeMetricFamily(
            "lockd_recovery_timestamp_seconds",
            "when the last recovery ran (Unix time)",
            value=r["at"],
        )
        outcome = GaugeMetricFamily(
            "lockd_recovery_leases",
            "what the last recovery did with the journaled leases (adopted: fd from systemd's "
            "fd store, no gap; retaken: locked again after a gap; lost: taken in the gap; "
            "released: owner dead; host_rebooted: journal of another boot)",
            labels=["outcome"],
        )
        for name in RECOVERY_OUTCOMES:
            outcome.add_metric([name], r[name])
        yield outcome
        fd = m["fd_store"]
        yield GaugeMetricFamily(
            "lockd_fd_store_enabled",
            "1 if lease fds are parked in systemd's fd store",
            value=int(fd["enabled"]),
        )
        yield GaugeMetricFamily(
            "lockd_fd_store_fds", "lease fds parked in systemd's fd store", value=fd["fds"]
        )
        yield GaugeMetricFamily(
            "lockd_fd_store_names_bytes",
            "bytes of LISTEN_FDNAMES the parked fds' names take",
            value=fd["names_bytes"],
        )
        yield GaugeMetricFamily(
            "lockd_fd_store_names_limit_bytes",
            "LISTEN_FDNAMES budget (one environment string is capped at 128 KiB); a lease "
            "that would pass it is refused",
            value=fd["names_limit"],
        )


def registry(metrics: dict[str, Any]) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Snapshot(metrics))
    return reg


def render(metrics: dict[str, Any]) -> str:
    """The Prometheus text exposition of one ``Metrics`` snapshot."""
    return generate_latest(registry(metrics)).decode()


def write_textfile(directory: Path, metrics: dict[str, Any]) -> Path:
    """Write ``DIRECTORY/lockd.prom`` atomically (temporary file + rename)."""
    path = directory / TEXTFILE_NAME
    write_to_textfile(str(path), registry(metrics))
    return path
