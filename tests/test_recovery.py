"""Start-up: one daemon per state directory, journals from another boot, clean and unclean
restarts (issue item 5, DESIGN §4.3 and §5)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from e2e import (
    TREE,
    Conn,
    Daemon,
    Owners,
    make_files,
    probe,
    probe_setlk_elsewhere,
    wait_until,
)


@pytest.mark.parametrize("sockets", ["same-sockets", "other-sockets"])
def test_second_daemon_on_same_state_dir_is_refused(
    daemon: Daemon, owners: Owners, files: list[Path], runtime_dir: Path, sockets: str
) -> None:
    o = daemon.register(owners.spawn().pid)["uuid"]
    daemon.acquire(files[0], owner=o)
    daemon.acquire(files[1], owner=o, shared=True)
    argv = daemon.argv()
    if sockets == "other-sockets":
        argv[argv.index("--socket") + 1] = str(runtime_dir / "second.sock")
        argv[argv.index("--admin-socket") + 1] = str(runtime_dir / "second-admin.sock")
    second = subprocess.run(
        argv,
        cwd=TREE,
        env=daemon.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 3, (second.returncode, second.stderr)
    assert str(daemon.pid) in second.stderr, f"message must name pid {daemon.pid}: {second.stderr}"
    assert str(daemon.state_dir) in second.stderr or "state" in second.stderr.lower()
    # the first one is untouched: its locks, its sockets, its journal
    assert daemon.running
    assert probe(files[0]) == "exclusive"
    assert probe(files[1]) == "shared"
    assert probe_setlk_elsewhere(files[0]) == "held"
    with Conn(daemon.admin_socket) as c:
        assert c.call("io.lockd.Admin.Status")["status"]["pid"] == daemon.pid
    with Conn(daemon.socket) as c:
        assert c.call("io.lockd.Inquire", {"owner": o})["leases"][0]["state"] == "held"
    assert daemon.acquire(files[2], owner=o)["state"] == "held"


def _set_boot_id(journal: Path, value: str) -> None:
    db = sqlite3.connect(journal)
    try:
        with db:
            n = db.execute("UPDATE meta SET value = ? WHERE key = 'boot_id'", (value,)).rowcount
        assert n == 1, "meta has no boot_id row"
    finally:
        db.close()


def test_journal_from_another_boot_is_not_replayed(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    owner = owners.spawn()
    o = daemon.register(owner.pid)["uuid"]
    tokens = [daemon.acquire(f, owner=o)["token"] for f in files[:3]]
    daemon.acquire(files[3], owner=o, shared=True)
    daemon.kill()
    journal = daemon.state_dir / "journal.sqlite"
    assert journal.exists()
    _set_boot_id(journal, str(uuid.uuid4()))
    daemon.start()
    assert {probe(f) for f in files} == {"free"}
    assert [x for x in daemon.leases() if x["state"] in ("held", "lost")] == []
    events = daemon.history(limit=200)
    rebooted = [e for e in events if e["event"] == "host-rebooted"]
    assert rebooted, events
    assert daemon.status()["recovery"]["host_rebooted"] == 4
    assert not [e for e in events if e["event"] in ("retaken", "lost")]
    assert owner.poll() is None, "no fencing for a journal from another boot"
    # tokens never go back, and the journal now carries this boot's id (read after a stop:
    # the running daemon holds the journal exclusively)
    o2 = daemon.register(owner.pid)["uuid"]
    assert daemon.acquire(files[0], owner=o2)["token"] > max(tokens)
    daemon.stop()
    db = sqlite3.connect(journal)
    try:
        (boot,) = db.execute("SELECT value FROM meta WHERE key = 'boot_id'").fetchone()
    finally:
        db.close()
    assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_restart_retakes_leases(
    daemon: Daemon, owners: Owners, files: list[Path], how: str
) -> None:
    """Without systemd's fd store the leases are re-taken at start, with a gap."""
    o = daemon.register(owners.spawn().pid)["uuid"]
    ex = daemon.acquire(files[0], owner=o)
    sh = daemon.acquire(files[1], owner=o, shared=True)
    if how == "SIGTERM":
        daemon.stop()
    else:
        assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
    assert probe(files[0]) == probe(files[1]) == "free"  # nobody holds them in the gap
    daemon.start()
    assert probe(files[0]) == "exclusive"
    assert probe(files[1]) == "shared"
    leases = {x["resource"]: x for x in daemon.leases()}
    assert leases[str(files[0])]["token"] == ex["token"]
    assert leases[str(files[1])]["token"] == sh["token"]
    assert {x["continuity"] for x in leases.values()} == {"retaken"}
    rec = daemon.status()["recovery"]
    assert (rec["retaken"], rec["lost"], rec["released"]) == (2, 0, 0)
    assert {e["resource"] for e in daemon.history(limit=50) if e["event"] == "retaken"} >= {
        str(files[0]),
        str(files[1]),
    }


def test_recovery_waits_in_backlog(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    """A client that connects before READY=1 is answered after recovery, never with a
    half-recovered table (DESIGN §5.6)."""
    o = daemon.register(owners.spawn().pid)["uuid"]
    for f in files[:4]:
        daemon.acquire(f, owner=o)
    daemon.kill()
    daemon.spawn()
    deadline = time.monotonic() + 15
    while True:
        try:
            c = Conn(daemon.socket, timeout=15)
            break
        except (FileNotFoundError, ConnectionRefusedError):
            assert time.monotonic() < deadline
            time.sleep(0.002)
    with c:
        leases = c.call("io.lockd.Inquire", {"owner": o})["leases"]
    assert sorted(x["resource"] for x in leases) == sorted(str(f) for f in files[:4])
    assert {x["state"] for x in leases} == {"held"}
    daemon.wait_ready()
    assert {probe(f) for f in files[:4]} == {"exclusive"}


def test_state_dir_files(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    """The journal is SQLite in WAL mode in the state directory, locked exclusively by the
    running daemon (no other process can stall its commits) and readable once it is down."""
    o = daemon.register(owners.spawn().pid)["uuid"]
    daemon.acquire(files[0], owner=o)
    journal = daemon.state_dir / "journal.sqlite"
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=0.2)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db.execute("SELECT count(*) FROM leases").fetchone()
    db.close()
    daemon.kill()
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "meta" in tables
        assert db.execute("SELECT count(*) FROM leases").fetchone()[0] == 1
    finally:
        db.close()
    assert os.stat(daemon.state_dir).st_mode & 0o002 == 0


def test_symlink_retargeted_while_down(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    """A lease taken through a symlink is a lease on the file it led to (one inode, one
    resource; Lease.path is "the file that carries the kernel lock"). If the symlink is
    pointed elsewhere while lockd is down, recovery locks that same file again: it must
    neither lock the symlink's new target nor declare the lease lost (and fence the owner)
    while the locked file is intact and free."""
    owner = owners.spawn()
    o = daemon.register(owner.pid)["uuid"]  # fence kill: a wrong "lost" kills the VM
    link = files[0].parent / "vm-disk.img"
    os.symlink(files[0], link)
    lease = daemon.acquire(link, owner=o)
    assert os.path.realpath(lease["path"]) == str(files[0])
    daemon.kill()
    os.unlink(link)
    os.symlink(files[1], link)
    daemon.start()
    time.sleep(0.2)
    assert probe(files[1]) == "free", "recovery locked the symlink's new target"
    assert owner.poll() is None, "owner fenced although its file was intact"
    assert probe(files[0]) == "exclusive"
    [x] = daemon.leases()
    assert x["state"] == "held" and x["token"] == lease["token"], x


def test_journal_of_schema_002_is_migrated_with_its_leases(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    """A journal as lockd left it before migration 003 (leases keyed by id, a resources
    table): the new daemon migrates it and re-takes its leases with their tokens, and the
    last token of a resource that only history remembers still gates a hand-off."""
    from lockd.journaling.migrations import apply as _apply_migrations

    o = daemon.register(owners.spawn().pid, name="vm-old")["uuid"]
    daemon.stop()
    journal = daemon.state_dir / "journal.sqlite"
    db = sqlite3.connect(journal)
    # the columns the owners table had in schema 002 (migration 004 added domain_id)
    owner = db.execute(
        "SELECT uuid, name, pid, start_time, boot_id, uid, fence, registered_at FROM owners"
        " WHERE uuid = ?",
        (o,),
    ).fetchone()
    (boot,) = db.execute("SELECT value FROM meta WHERE key = 'boot_id'").fetchone()
    db.close()
    for p in daemon.state_dir.glob("journal.sqlite*"):
        p.unlink()

    db = sqlite3.connect(journal, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    _apply_migrations(db, {"001_initial", "002_fewer_pages"})
    now = time.time()

    def rkey(f: Path) -> str:
        st = f.stat()
        return f"{st.st_dev}:{st.st_ino}"

    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("boot_id", boot), ("last_token", "1033"), ("created_at", str(now))],
    )
    db.execute("INSERT INTO owners VALUES (?, ?, ?, ?, ?, ?, ?, ?)", owner)
    held = [(files[0], "exclusive", 7), (files[1], "shared", 9)]
    for i, (f, mode, token) in enumerate(held):
        db.execute(
            "INSERT INTO leases (id, owner, lockspace, rkey, resource, path, mode, token, state,"
            " acquired_at, fdname) VALUES (?, ?, '', ?, ?, ?, ?, ?, 'held', ?, ?)",
            (i + 1, o, rkey(f), str(f), str(f), mode, token, now, f"l{i}"),
        )
    # files[2]: granted token 3 once, released since; only history and resources know it
    for f, mode, token in [*held, (files[2], "exclusive", 3)]:
        db.execute("INSERT INTO resources VALUES ('', ?, ?, ?)", (rkey(f), token, now))
        db.execute(
            "INSERT INTO events (at, event, lockspace, resource, rkey, owner, pid, token, mode)"
            " VALUES (?, 'acquire', '', ?, ?, ?, ?, ?, ?)",  # '': the direct lockspace
            (now, str(f), rkey(f), o, owner[2], token, mode),
        )
    db.execute("COMMIT")
    db.close()

    daemon.start()
    assert probe(files[0]) == "exclusive" and probe(files[1]) == "shared"
    assert probe_setlk_elsewhere(files[0]) == "held"
    got = {x["resource"]: (x["mode"], x["token"]) for x in daemon.inquire(owner=o)["leases"]}
    assert got == {str(f): (mode, token) for f, mode, token in held}
    # the fencing sequence continues above the stored bound
    assert daemon.acquire(files[3], owner=o)["token"] > 1033
    # a hand-off expecting another token than 3 is refused, expecting 3 is granted
    with Conn(daemon.socket) as c:
        err = c.call_raw("io.lockd.Acquire", {"owner": o, "resource": str(files[2]), "token": 4})
        assert err["error"] == "io.lockd.TokenMismatch", err
    assert daemon.acquire(files[2], owner=o, token=3)["state"] == "held"
    daemon.stop()
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        migrations = {r[0] for r in db.execute("SELECT name FROM _sqlite_migrations")}
    finally:
        db.close()
    assert "resources" not in tables and "events" not in tables
    assert {"history", "grants"} <= tables
    assert {"003_token_keys", "006_packed_history"} <= migrations


def test_history_is_pruned_to_its_retention(
    make_daemon: Callable[..., Daemon], owners: Owners, files: list[Path]
) -> None:
    """Bounded growth (DESIGN §4.5): history keeps the newest ``history_retention`` events,
    on disk too, even when a burst leaves more than one pruning batch (5,000) behind; the
    fencing tokens keep growing past what was pruned."""
    retention = 100
    d = make_daemon(config=f"history_retention = {retention}\n")
    o = d.register(owners.spawn().pid)["uuid"]
    n, window = 3000, 100  # 6,000 events, pipelined a hundred pairs at a time
    acq = json.dumps(
        {"method": "io.lockd.Acquire", "parameters": {"owner": o, "resource": str(files[0])}}
    )
    rel = json.dumps(
        {"method": "io.lockd.Release", "parameters": {"owner": o, "resource": str(files[0])}}
    )
    with Conn(d.socket) as c:
        for _ in range(n // window):
            c.send_raw((acq + "\0" + rel + "\0").encode() * window)
            replies = [c.recv_message() for _ in range(2 * window)]
            assert not [r for r in replies if "error" in r], replies[:2]
    t0 = time.monotonic()
    wait_until(lambda: len(d.history(limit=100_000)) <= retention, 15, what="history pruned")
    print(f"\n{2 * n} events pruned to {retention} within {time.monotonic() - t0:.2f} s")
    assert d.acquire(files[1], owner=o)["token"] > n
    d.stop()
    db = sqlite3.connect(f"file:{d.state_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        (kept,) = db.execute("SELECT sum(json_array_length(events)) FROM history").fetchone()
    finally:
        db.close()
    assert kept <= retention + 1, kept


def test_release_is_idempotent_after_its_grant_left_history(
    make_daemon: Callable[..., Daemon], owners: Owners, files: list[Path]
) -> None:
    """A lease held for longer than history keeps (its grant event pruned): releasing it
    twice, as a client whose first reply was lost would, answers the same both times."""
    d = make_daemon(config="history_retention = 10\n")
    o = d.register(owners.spawn().pid)["uuid"]
    token = d.acquire(files[0], owner=o)["token"]
    for _ in range(10):
        d.acquire(files[1], owner=o)
        d.release(files[1], owner=o)
    wait_until(
        lambda: not [e for e in d.history(limit=100) if e["token"] == token],
        10,
        what="the grant to leave history",
    )
    first = d.release(files[0], owner=o)
    again = d.release(files[0], owner=o)
    assert first["state"] == "released" and first["token"] == token
    assert again == first
    assert probe(files[0]) == "free"


def test_grants_are_forgotten_with_their_history(
    make_daemon: Callable[..., Daemon], owners: Owners, tmp_path: Path
) -> None:
    """What answers a hand-off and a repeated Release (each owner's newest grant on each
    resource) is bounded like history: a grant whose events all left history is forgotten,
    unless its lease is still held. Within history, both answers stay exact."""
    retention = 20
    files = make_files(tmp_path / "many", 40)
    d = make_daemon(config=f"history_retention = {retention}\n")
    o = d.register(owners.spawn().pid)["uuid"]
    held = d.acquire(files[0], owner=o)["token"]
    tokens = {}
    for f in files[1:]:  # two events per file: only the last few files stay in history
        tokens[f] = d.acquire(f, owner=o)["token"]
        d.release(f, owner=o)
    wait_until(lambda: len(d.history(limit=1000)) <= retention, 10, what="history pruned")
    last = files[-1]
    assert d.release(last, owner=o)["token"] == tokens[last]  # still remembered
    with Conn(d.socket) as c:
        err = c.call_raw(
            "io.lockd.Acquire", {"owner": o, "resource": str(last), "token": tokens[last] + 1}
        )
        assert err["error"] == "io.lockd.TokenMismatch", err
    d.stop()
    db = sqlite3.connect(f"file:{d.state_dir / 'journal.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT token FROM grants").fetchall()
    finally:
        db.close()
    remembered = {t for (t,) in rows}
    assert held in remembered, "the grant of a held lease was forgotten"
    assert tokens[files[1]] not in remembered, "a grant outlived its history"
    assert len(remembered) <= retention // 2 + 2, remembered
