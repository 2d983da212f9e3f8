"""lockctl end to end: the real command against the real daemon (DESIGN §7)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from e2e import Daemon, Owners, lockctl, probe

LEASE_KEYS = {"lockspace", "resource", "mode", "owner", "token", "state", "acquired_at"}


def one_line_error(out) -> None:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lockctl: "), out.stderr
    assert "Traceback" not in out.stderr


def test_acquire_release_locks(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    vm1, vm2 = owners.spawn(), owners.spawn()
    f = str(files[0])
    out = daemon.lockctl("acquire", f, "--pid", str(vm1.pid), "--name", "vm1", "-J")
    assert out.returncode == 0, out.stderr
    lease = json.loads(out.stdout)["lease"]
    assert lease["resource"] == f and lease["mode"] == "exclusive"
    assert probe(f) == "exclusive"

    listed = daemon.lockctl_json("locks")["leases"]
    assert len(listed) == 1
    x = listed[0]
    assert set(x) >= LEASE_KEYS, x
    assert x["owner"]["pid"] == vm1.pid and x["owner"]["name"] == "vm1"
    assert x["token"] == lease["token"] and x["state"] == "held"
    # global options may come before the subcommand too
    out = daemon.lockctl("-J", "locks")
    assert out.returncode == 0 and json.loads(out.stdout)["leases"] == listed

    table = daemon.lockctl("locks")
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0].split()
    assert header == ["LOCKSPACE", "RESOURCE", "MODE", "OWNER", "PID", "TOKEN", "STATE", "SINCE"]
    assert f in table.stdout and str(vm1.pid) in table.stdout

    # busy: exit 3, for exclusive and shared alike
    for extra in ([], ["--shared"]):
        out = daemon.lockctl("acquire", f, "--pid", str(vm2.pid), *extra)
        assert out.returncode == 3, (out.returncode, out.stderr)
        one_line_error(out)
    assert probe(f) == "exclusive"

    # shared leases for two owners
    g = str(files[1])
    for p in (vm1, vm2):
        out = daemon.lockctl("acquire", g, "--pid", str(p.pid), "--shared")
        assert out.returncode == 0, out.stderr
    assert probe(g) == "shared"

    owners_json = daemon.lockctl_json("owners")["owners"]
    assert {o["pid"] for o in owners_json} == {vm1.pid, vm2.pid}

    out = daemon.lockctl("release", f, "--pid", str(vm1.pid), "-J")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["lease"]["token"] == lease["token"]
    assert probe(f) == "free"
    out = daemon.lockctl("release", f, "--pid", str(vm1.pid))  # idempotent
    assert out.returncode == 0, out.stderr
    # not held by that owner, and no such owner: 5
    out = daemon.lockctl("release", f, "--pid", str(vm2.pid))
    assert out.returncode == 5, (out.returncode, out.stderr)
    one_line_error(out)
    stranger = owners.spawn()
    out = daemon.lockctl("release", g, "--pid", str(stranger.pid))
    assert out.returncode == 5, (out.returncode, out.stderr)
    assert probe(g) == "shared"

    events = daemon.lockctl_json("history", "--limit", "100")["events"]
    kinds = [(e["event"], e.get("resource")) for e in events]
    assert ("acquire", f) in kinds and ("release", f) in kinds
    status = daemon.lockctl_json("status")["status"]
    assert status["pid"] == daemon.pid
    assert status["leases"] == 2  # g, twice

    out = daemon.lockctl("force-release", g, "-J")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["leases"]) == 2
    assert probe(g) == "free"


def test_unreachable_is_exit_4(daemon: Daemon, runtime_dir: Path, files: list[Path]) -> None:
    nowhere = str(runtime_dir / "nothing.sock")
    for args in (["locks"], ["status"], ["acquire", str(files[0]), "--pid", "1"]):
        out = lockctl("--socket", nowhere, "--admin-socket", nowhere, "--timeout", "0.5", *args)
        assert out.returncode == 4, (args, out.returncode, out.stderr)
        one_line_error(out)
    daemon.kill(signal.SIGKILL)
    out = daemon.lockctl("--timeout", "0.5", "locks", "-J")
    assert out.returncode == 4, (out.returncode, out.stderr)


def test_usage_errors_are_exit_2(daemon: Daemon, files: list[Path]) -> None:
    for args in (
        [],
        ["frobnicate"],
        ["acquire", str(files[0])],  # no --pid
        ["locks", "-o", "NOSUCHCOLUMN"],
        ["locks", "-J", "-r"],
        ["acquire", str(files[0]), "--pid", "zero"],
    ):
        out = daemon.lockctl(*args)
        assert out.returncode == 2, (args, out.returncode, out.stderr)
        assert "Traceback" not in out.stderr
    assert probe(files[0]) == "free"


def test_dump_while_lockd_runs_says_so(daemon: Daemon) -> None:
    """The running daemon holds its journal exclusively: dump names that, without a trace."""
    out = lockctl("dump", "--state-dir", str(daemon.state_dir))
    assert out.returncode == 1, out
    assert "in use by a running lockd" in out.stderr and "Traceback" not in out.stderr
    daemon.assert_alive()


def test_dump_with_daemon_down(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    p = owners.spawn()
    o = daemon.register(p.pid, name="vm-dump")["uuid"]
    t0 = daemon.acquire(files[0], owner=o)["token"]
    t1 = daemon.acquire(files[1], owner=o, shared=True)["token"]
    daemon.kill(signal.SIGKILL)
    out = lockctl("dump", "--state-dir", str(daemon.state_dir), "-J")
    assert out.returncode == 0, out.stderr
    dumped = json.loads(out.stdout)
    got = {x["resource"]: (x["mode"], x["token"]) for x in dumped["leases"]}
    assert got == {str(files[0]): ("exclusive", t0), str(files[1]): ("shared", t1)}
    assert all(x["owner"]["uuid"] == o for x in dumped["leases"])
    # the dump did not lock anything, nor start anything
    assert probe(files[0]) == probe(files[1]) == "free"
    # and the daemon starts fine after it
    daemon.start()
    assert probe(files[0]) == "exclusive"
    out = lockctl("dump", "--state-dir", str(daemon.base / "no-such-dir"), "-J")
    assert out.returncode == 1, (out.returncode, out.stderr)
    one_line_error(out)
