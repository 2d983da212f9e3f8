"""The rough edges a new user met (issue 12), each against the real daemon and real lockctl.

Each test names the edge it pins down: the daemon's own words reach the user, lockctl leaves
no owner behind when its acquire fails, options are offered only where they work, the state
directory holds what docs/decisions.md says (no ``lockd.pid`` after a clean stop, no ``-shm``
after a crash), and GetInfo names no invented URL.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
from pathlib import Path

from e2e import Daemon, Owners, lockctl, probe

from lockd import errors


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lockctl: "), out.stderr
    return lines[0]


def dead_pid(owners: Owners) -> int:
    p = owners.spawn()
    Owners.kill(p)
    return p.pid


def test_shared_on_own_exclusive_says_why(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    vm = owners.spawn()
    assert daemon.lockctl("acquire", str(files[0]), "--pid", str(vm.pid)).returncode == 0
    out = daemon.lockctl("acquire", str(files[0]), "--pid", str(vm.pid), "--shared")
    assert out.returncode == 3
    line = one_line(out)
    assert "already held exclusive by this owner; release it first" in line, line
    assert "another" not in line
    # a real conflict still says so
    other = owners.spawn()
    out = daemon.lockctl("acquire", str(files[0]), "--pid", str(other.pid))
    assert out.returncode == 3 and "locked by another holder" in one_line(out)
    assert probe(files[0]) == "exclusive"


def test_pid_that_does_not_exist(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    pid = dead_pid(owners)
    for args in (["acquire", str(files[0])], ["release", str(files[0])]):
        out = daemon.lockctl(*args, "--pid", str(pid))
        assert out.returncode == 5, (args, out.stderr)
        line = one_line(out)
        assert f"process {pid} does not exist" in line and "not registered" not in line, line
    assert daemon.owners() == []


def test_unknown_lockspace_is_named(daemon: Daemon, owners: Owners) -> None:
    vm = owners.spawn()
    out = daemon.lockctl("acquire", "vm1-disk", "--lockspace", "bogus", "--pid", str(vm.pid))
    assert out.returncode == 1
    line = one_line(out)
    assert "unknown lockspace 'bogus'" in line and "invalid resource" not in line, line
    daemon.register(vm.pid)
    out = daemon.lockctl("release", "vm1-disk", "--lockspace", "bogus", "--pid", str(vm.pid))
    assert "unknown lockspace 'bogus'" in one_line(out)


def test_failed_acquire_leaves_no_owner(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    holder, vm = owners.spawn(), owners.spawn()
    assert daemon.lockctl("acquire", str(files[0]), "--pid", str(holder.pid)).returncode == 0
    for args, code in (
        ([str(files[0].parent / "missing.img")], 1),  # no such file
        ([str(files[0])], 3),  # busy
        ([str(files[0]), "--shared"], 3),
        (["x", "--lockspace", "bogus"], 1),
    ):
        out = daemon.lockctl("acquire", *args, "--pid", str(vm.pid), "--name", "vm")
        assert out.returncode == code, (args, out.returncode, out.stderr)
        assert [o["pid"] for o in daemon.owners()] == [holder.pid], args
    # an owner that existed before the failed acquire is not the command's to remove
    assert daemon.lockctl("acquire", str(files[1]), "--pid", str(vm.pid)).returncode == 0
    daemon.release(files[1], pid=vm.pid)
    out = daemon.lockctl("acquire", str(files[0]), "--pid", str(vm.pid))
    assert out.returncode == 3
    assert {o["pid"] for o in daemon.owners()} == {holder.pid, vm.pid}
    events = [e["event"] for e in daemon.history(limit=100)]
    assert events.count("unregister") == 4, events


def test_unregister_on_the_wire(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    vm = owners.spawn()
    uuid = daemon.register(vm.pid)["uuid"]
    daemon.acquire(files[0], owner=uuid)
    try:
        daemon.call("io.lockd.Unregister", {"owner": uuid})
        raise AssertionError("an owner with a lease was unregistered")
    except errors.InvalidParameter as exc:
        assert exc.parameters == {"parameter": "owner"}
    assert probe(files[0]) == "exclusive"
    daemon.release(files[0], owner=uuid)
    assert daemon.call("io.lockd.Unregister", {"pid": vm.pid}) == {}
    assert daemon.owners() == []
    try:
        daemon.call("io.lockd.Unregister", {"owner": uuid})
        raise AssertionError("unregistered twice")
    except errors.NoSuchOwner:
        pass
    # the journal forgot it too: a restart brings back no owner
    daemon.restart()
    assert daemon.owners() == []


def test_options_offered_are_the_options_taken(daemon: Daemon) -> None:
    for cmd in ("status", "reexec", "metrics", "verify"):
        help_text = daemon.lockctl(cmd, "--help").stdout
        assert "--output" not in help_text and "--raw" not in help_text, cmd
        out = daemon.lockctl(cmd, "-o", "pid")
        assert out.returncode == 2, (cmd, out.stderr)
    dump_help = lockctl("dump", "--help").stdout
    for unused in ("--socket", "--admin-socket", "--timeout"):
        assert unused not in dump_help
    assert "--history" in dump_help and "--state-dir" in dump_help


def test_status_rounds_milliseconds(daemon: Daemon) -> None:
    out = daemon.lockctl("status")
    assert out.returncode == 0, out.stderr
    durations = re.findall(r"duration_ms: (\S+)", out.stdout)
    assert durations and all(re.fullmatch(r"\d+\.\d", d) for d in durations), out.stdout


def test_dump_table_history_and_json_types(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    vm = owners.spawn()
    uuid = daemon.register(vm.pid, name="vm")["uuid"]
    token = daemon.acquire(files[0], owner=uuid)["token"]
    daemon.stop()
    state = str(daemon.state_dir)
    table = lockctl("dump", "--state-dir", state, "--history", "5")
    assert table.returncode == 0, table.stderr
    leases, events = table.stdout.split("\n\n")
    assert leases.splitlines()[0].split()[:2] == ["LOCKSPACE", "RESOURCE"]
    assert str(files[0]) in leases
    assert events.splitlines()[0].split()[:3] == ["SEQ", "TIME", "EVENT"]
    assert len(events.strip().splitlines()) == 1 + 2  # the header; register, acquire
    assert "\n\n" not in lockctl("dump", "--state-dir", state, "--history", "0").stdout
    dumped = json.loads(lockctl("dump", "--state-dir", state, "-J").stdout)
    assert isinstance(dumped["meta"]["last_token"], int)
    assert dumped["meta"]["last_token"] >= token
    assert isinstance(dumped["meta"]["created_at"], float)


def test_pid_file_and_shm(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    state = daemon.state_dir
    vm = owners.spawn()
    daemon.acquire(files[0], pid=daemon.register(vm.pid)["pid"])
    assert (state / "lockd.pid").read_text().strip() == str(daemon.pid)
    daemon.kill(signal.SIGKILL)
    assert (state / "journal.sqlite-wal").exists()  # what a crash leaves
    # a reader of the crashed journal (lockctl dump) makes a -shm: SQLite needs one to read
    # a WAL; the next start removes it
    assert lockctl("dump", "--state-dir", str(state)).returncode == 0
    assert (state / "journal.sqlite-shm").exists()
    daemon.start()
    assert not (state / "journal.sqlite-shm").exists()
    assert probe(files[0]) == "exclusive"
    daemon.kill(signal.SIGKILL)
    daemon.start()  # the start's own read-only look at the crashed journal leaves none
    assert not (state / "journal.sqlite-shm").exists()
    daemon.stop()
    left = sorted(p.name for p in state.iterdir())
    assert left == ["journal.sqlite", "lockd.pid.lock"], left
    # and the journal is whole
    db = sqlite3.connect(state / "journal.sqlite")
    assert db.execute("SELECT count(*) FROM leases").fetchone() == (1,)
    db.close()


def test_getinfo_invents_no_url(daemon: Daemon) -> None:
    for admin in (False, True):
        with daemon.connect(admin=admin) as c:
            info = c.call("org.varlink.service.GetInfo")
        assert info["url"] == "", info
