"""Metrics (issue 12): ``lockctl metrics`` and the node_exporter textfile, parsed with
prometheus-client's own parser, against what was really done to a real daemon.

The values are checked against the operations the test made (grants, releases by cause,
conflicts, a lease lost to a real competing lock during a real restart, a fenced owner),
against the table's shape (every lockspace x mode x state, zeros included) and against the
files on disk (the journal's sizes). The daemon must not import prometheus-client unless the
textfile key is set (``python -X importtime`` tells what it imported).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e import Daemon, Owners, hold_lock, probe, wait_until
from prometheus_client.parser import text_string_to_metric_families

import lockd

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(got: Samples, name: str, **labels: str) -> float:
    return got[(name, tuple(sorted(labels.items())))]


def lockctl_metrics(daemon: Daemon) -> Samples:
    out = daemon.lockctl("metrics")
    assert out.returncode == 0, out.stderr
    return samples(out.stdout)


@pytest.fixture
def configured(make_daemon: Callable[..., Daemon], tmp_path: Path) -> Daemon:
    (tmp_path / "leases").mkdir()
    (tmp_path / "textfile").mkdir()
    return make_daemon(
        config=f'metrics_textfile_dir = "{tmp_path / "textfile"}"\nmetrics_interval = 1\n'
        f'[lockspaces]\nls1 = "{tmp_path / "leases"}"\n'
    )


def test_lockctl_metrics_count_what_happened(
    configured: Daemon, owners: Owners, files: list[Path]
) -> None:
    d = configured
    vm1, vm2, vm3 = owners.spawn(), owners.spawn(), owners.spawn()
    u1 = d.register(vm1.pid)["uuid"]
    u2 = d.register(vm2.pid)["uuid"]
    u3 = d.register(vm3.pid)["uuid"]
    d.acquire(files[0], owner=u1)
    d.acquire(files[0], owner=u1)  # an idempotent repeat is not a grant
    d.acquire(files[1], owner=u1, shared=True)
    d.acquire(files[1], owner=u2, shared=True)
    d.acquire("vm1-disk", owner=u1, lockspace="ls1")
    d.acquire(files[2], owner=u2)
    d.acquire(files[3], owner=u3)
    d.acquire(files[4], owner=u3)
    for _ in range(2):
        with pytest.raises(BlockingIOError):
            d.acquire(files[0], owner=u2)
    d.release(files[2], owner=u2)
    d.call("io.lockd.Admin.ForceRelease", {"resource": str(files[3])})
    Owners.kill(vm3)  # its lease on files[4] goes with it
    wait_until(lambda: len(d.owners()) == 2, 10, what="owner death")

    got = lockctl_metrics(d)
    assert value(got, "lockd_leases", lockspace="direct", mode="exclusive", state="held") == 1
    assert value(got, "lockd_leases", lockspace="direct", mode="shared", state="held") == 2
    assert value(got, "lockd_leases", lockspace="ls1", mode="exclusive", state="held") == 1
    for ls in ("direct", "ls1"):  # every series is there, zeros included
        assert value(got, "lockd_leases", lockspace=ls, mode="exclusive", state="lost") == 0
    assert value(got, "lockd_leases", lockspace="ls1", mode="shared", state="held") == 0
    assert value(got, "lockd_owners") == 2
    assert value(got, "lockd_grants_total") == 7
    assert value(got, "lockd_releases_total", cause="client") == 1
    assert value(got, "lockd_releases_total", cause="admin") == 1
    assert value(got, "lockd_releases_total", cause="owner-death") == 1
    assert value(got, "lockd_conflicts_total") == 2
    assert value(got, "lockd_leases_lost_total") == 0
    assert value(got, "lockd_owners_fenced_total") == 0
    db = d.state_dir / "journal.sqlite"
    assert value(got, "lockd_journal_bytes", file="db") == db.stat().st_size
    assert value(got, "lockd_journal_bytes", file="wal") > 0
    assert value(got, "lockd_fd_store_enabled") == 0
    assert value(got, "lockd_fd_store_names_limit_bytes") > 100_000
    assert value(got, "lockd_info", version=lockd.__version__) == 1
    assert 0 <= value(got, "lockd_recovery_duration_seconds") < 30
    # -J is the daemon's snapshot as it came
    snap = d.lockctl_json("metrics")["metrics"]
    assert snap["counters"]["grants"] == 7


def test_recovery_outcome_lost_and_fenced(
    configured: Daemon, owners: Owners, files: list[Path]
) -> None:
    d = configured
    vm = owners.spawn()
    uuid = d.register(vm.pid)["uuid"]
    d.acquire(files[0], owner=uuid)
    d.acquire(files[1], owner=uuid)
    d.kill(signal.SIGKILL)
    with hold_lock(files[0]):  # taken in the gap: lost at the restart
        d.start()
        wait_until(lambda: vm.poll() is not None, 10, what="the owner fenced")
        got = lockctl_metrics(d)
    assert value(got, "lockd_recovery_leases", outcome="lost") == 1
    assert value(got, "lockd_recovery_leases", outcome="retaken") == 1
    assert value(got, "lockd_recovery_leases", outcome="adopted") == 0
    assert value(got, "lockd_leases_lost_total") == 1
    assert value(got, "lockd_owners_fenced_total") == 1
    assert value(got, "lockd_grants_total") == 0  # counters are this process's
    assert probe(files[0]) == "free"


def test_textfile_is_written_and_kept_current(
    configured: Daemon, owners: Owners, files: list[Path], tmp_path: Path
) -> None:
    d = configured
    prom = tmp_path / "textfile" / "lockd.prom"
    wait_until(prom.exists, 15, 0.05, what="the textfile written at start")
    vm = owners.spawn()
    d.acquire(files[0], owner=d.register(vm.pid)["uuid"])

    def current() -> Samples | None:
        got = samples(prom.read_text())
        grants = value(got, "lockd_grants_total")
        return got if grants == 1 else None

    got = wait_until(current, 15, 0.1, what="the textfile to show the grant")
    assert value(got, "lockd_leases", lockspace="direct", mode="exclusive", state="held") == 1
    # the same families and series as lockctl metrics
    assert set(got) == set(lockctl_metrics(d))
    # only the .prom file: the temporary one was renamed over it
    assert sorted(p.name for p in prom.parent.iterdir()) == ["lockd.prom"]


def _imports(d: Daemon) -> str:
    return "\n".join(ln for ln in d.stderr_text().splitlines() if ln.startswith("import time:"))


def test_prometheus_client_only_when_asked(
    make_daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # `python -X importtime`, via the env
    plain = make_daemon()
    text = _imports(plain)
    assert "lockd.frontends.server" in text  # the report is there
    assert "prometheus_client" not in text and "lockd.ctl.exposition" not in text
    (tmp_path / "tf").mkdir()
    with_key = make_daemon(config=f'metrics_textfile_dir = "{tmp_path / "tf"}"\n')
    wait_until(lambda: (tmp_path / "tf" / "lockd.prom").exists(), 15, 0.05, what="textfile")
    assert "prometheus_client" in _imports(with_key)


def test_bad_textfile_dir_is_a_warning(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = make_daemon(config=f'metrics_textfile_dir = "{tmp_path / "missing"}"\n')
    wait_until(lambda: "cannot write metrics" in d.stderr_text(), 15, 0.05, what="the warning")
    d.assert_alive()
    with pytest.raises(AssertionError, match="exited with 2"):
        make_daemon(config='metrics_textfile_dir = "relative"\n')


def test_metrics_conform_to_the_schema(daemon: Daemon) -> None:
    from e2e import conforms, load_interfaces

    admin = load_interfaces()["io.lockd.Admin"]
    reply: dict[str, Any] = daemon.call("io.lockd.Admin.Metrics")
    conforms(reply, admin.methods["Metrics"][1], admin, where="Metrics")
    reply = daemon.call("io.lockd.Admin.ListDescriptors")
    conforms(reply, admin.methods["ListDescriptors"][1], admin, where="ListDescriptors")
    assert reply["pid"] == daemon.pid
