"""Faults beyond crashes, produced for real (issue 4, "Fault injection beyond crashes").

Theory of operation: every fault here is the real thing, not a mock.

- ENOSPC: the state directory lives on a 2 MiB tmpfs mounted for the test; a filler file takes
  the rest of it, so SQLite's next WAL append fails with SQLITE_FULL.
- EIO: the state directory lives on an ext4 file system on a loop device; the test shuts it
  down with ``EXT4_IOC_SHUTDOWN`` (the ioctl xfstests' ``godown`` uses), after which every
  write returns EIO. (device-mapper's ``dm-error``/``dm-flakey`` would be the classic tool, but
  this kernel has no device-mapper; the ext4 shutdown gives the same errno from the same
  place, the file system under SQLite.)
- A corrupt journal (garbage, a valid header over garbage, a truncated file, a garbage page)
  and one from a newer lockd (an unknown row in ``_sqlite_migrations``).
- Too many open files: the daemon runs under ``prlimit --nofile=N:N``, so it cannot raise its
  soft limit, and a client acquires until the fds run out.
- MemoryError: ``prlimit --pid --as=`` caps the running daemon's address space at its current
  size + 16 MiB, then a thousand connections each send 60 KB of an unfinished message (which
  the daemon must buffer): an allocation fails, the daemon must abort (SIGABRT), and a restart
  must bring every lease back.

Every held/free check is :func:`~e2e.probe` from outside the daemon; the journal is read with
SQLite directly (:func:`~e2e.journal_leases`) where what matters is what was committed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e import Conn, Daemon, Owners, journal_leases, make_files, probe, wait_until
from loadkit import loop_device, mounted, raise_nofile, run, vm_kb

from lockd import errors

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and prlimit need root")


def fill(directory: Path) -> Path:
    """Write a file in ``directory`` until the file system says ENOSPC."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
        with pytest.raises(OSError) as ei:
            os.write(fd, b"\0" * 4096)
        assert ei.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def this_start(d: Daemon) -> list[str]:
    """Non-empty stderr lines of the daemon's most recent start."""
    text = d.stderr_text().rsplit("===== start #", 1)[-1]
    return [line for line in text.splitlines()[1:] if line.strip()]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted at teardown."""
    with contextlib.ExitStack() as stack:
        try:
            opts = ("-t", "tmpfs", "-o", "size=2m,mode=0700", "lockd-test-enospc")
            mnt = stack.enter_context(mounted(*opts, target=tmp_path / "tiny"))
        except OSError as exc:
            pytest.skip(f"cannot mount a tmpfs here: {exc}")
        yield mnt


# --- ENOSPC -----------------------------------------------------------------------------------


def test_enospc_refuses_grants_keeps_locks_and_recovers(
    make_daemon: Callable[..., Daemon], owners: Owners, tiny_fs: Path, tmp_path: Path
) -> None:
    """A full journal file system: every acquire is refused with io.lockd.JournalError and its
    kernel lock dropped; a release or an owner death that cannot be journaled keeps the lock
    (DESIGN §4 rule 2); the daemon stays up, serves again once space is freed, and a crash
    afterwards recovers exactly what the clients were told they hold."""
    files = make_files(tmp_path / "res", 40)
    d = make_daemon(state_dir=tiny_fs / "state")
    a = d.register(owners.spawn().pid, name="a")["uuid"]
    pb = owners.spawn()
    b = d.register(pb.pid, name="b")["uuid"]
    c = d.connect()
    told: dict[str, int] = {}  # resource -> token: what the clients were told they hold
    for f in files[:3]:
        told[str(f)] = c.call("io.lockd.Acquire", {"resource": str(f), "owner": a})["lease"][
            "token"
        ]
    b_lease = c.call("io.lockd.Acquire", {"resource": str(files[3]), "owner": b})["lease"]

    filler = fill(tiny_fs)
    refused = 0
    for f in files[4:30]:
        try:
            lease = c.call("io.lockd.Acquire", {"resource": str(f), "owner": a})["lease"]
        except errors.JournalError as exc:
            refused += 1
            assert probe(f) == "free", f"{f}: refused ({exc}) but the kernel lock is held"
        else:
            told[str(f)] = lease["token"]
            assert probe(f) == "exclusive"
    assert refused >= 20, f"only {refused} of 26 acquires refused on a full file system"
    print(f"\nENOSPC: {refused} of 26 acquires refused with io.lockd.JournalError")

    # a release that cannot be journaled must not drop the lock
    try:
        c.call("io.lockd.Release", {"resource": str(files[0]), "owner": a})
    except errors.JournalError:
        assert probe(files[0]) == "exclusive", "release not journaled, lock dropped anyway"
    else:
        told.pop(str(files[0]))
        assert probe(files[0]) == "free"

    # an owner death that cannot be journaled keeps its locks until it can
    Owners.kill(pb)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        if probe(files[3]) == "free":
            assert (b, str(files[3])) not in journal_leases(d.state_dir), (
                "owner death dropped a lock before journaling it"
            )
        time.sleep(0.05)
    d.assert_alive()
    assert c.call("io.lockd.Inquire", {"owner": a})["owner"]["uuid"] == a

    # space again: everything works, the dead owner's lease goes
    os.unlink(filler)
    lease = c.call("io.lockd.Acquire", {"resource": str(files[30]), "owner": a})["lease"]
    assert lease["token"] > max(told.values())  # tokens never go back, refusals or not
    told[str(files[30])] = lease["token"]
    assert probe(files[30]) == "exclusive"
    wait_until(lambda: probe(files[3]) == "free", 10, what="the dead owner's lease to go")
    c.close()

    # a crash now: recovery brings back exactly what the clients were told
    d.kill()
    d.start()
    held = {x["resource"]: x["token"] for x in d.leases() if x["state"] == "held"}
    assert held == told
    for f in files:
        assert probe(f) == ("exclusive" if str(f) in told else "free"), f
    assert b_lease["token"] not in held.values()


# --- EIO --------------------------------------------------------------------------------------

EXT4_IOC_SHUTDOWN = 0x8004587D  # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2


@pytest.fixture
def ext4_fs(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A 16 MiB ext4 on a loop device, mounted; (mount point, device)."""
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    with contextlib.ExitStack() as stack:
        try:
            out = run("mkfs.ext4", "-q", "-F", image)
            if out.returncode != 0:
                raise OSError(f"mkfs.ext4: {out.stderr.strip()}")
            dev = stack.enter_context(loop_device(image))
            mnt = stack.enter_context(mounted("-t", "ext4", dev, target=tmp_path / "ext4"))
        except (OSError, FileNotFoundError) as exc:
            pytest.skip(f"no ext4 on a loop device here: {exc}")
        yield mnt, dev


def test_eio_refuses_grants_keeps_locks(
    make_daemon: Callable[..., Daemon], owners: Owners, ext4_fs: tuple[Path, str], tmp_path: Path
) -> None:
    """The journal's file system returns EIO on every write: acquires are refused with
    io.lockd.JournalError and their kernel locks dropped, releases and owner deaths keep their
    locks (they cannot be journaled), the daemon stays up; after the file system is repaired
    (remounted) a restart recovers what was journaled before the fault."""
    mnt, dev = ext4_fs
    files = make_files(tmp_path / "res", 8)
    d = make_daemon(state_dir=mnt / "state")
    a = d.register(owners.spawn().pid, name="a")["uuid"]
    pb = owners.spawn()
    b = d.register(pb.pid, name="b")["uuid"]
    c = d.connect()
    told = {
        str(f): c.call("io.lockd.Acquire", {"resource": str(f), "owner": a})["lease"]["token"]
        for f in files[:2]
    }
    c.call("io.lockd.Acquire", {"resource": str(files[2]), "owner": b})

    shutdown_fs(mnt)
    reasons = set()
    for f in files[3:6]:
        with pytest.raises(errors.JournalError) as je:
            c.call("io.lockd.Acquire", {"resource": str(f), "owner": a})
        reasons.add(je.value.parameters.get("reason"))
        assert probe(f) == "free", f"{f}: refused but the kernel lock is held"
    print(f"\nEIO: acquires refused with io.lockd.JournalError, reasons {sorted(reasons)}")
    with pytest.raises(errors.JournalError):
        c.call("io.lockd.Release", {"resource": str(files[0]), "owner": a})
    assert probe(files[0]) == "exclusive", "release not journaled, lock dropped anyway"
    Owners.kill(pb)
    time.sleep(1.5)  # owner death retries its commit every 0.5 s: it can never succeed here
    assert probe(files[2]) == "exclusive", "owner death dropped a lock it could not journal"
    d.assert_alive()
    assert {str(f) for f in files[:2]} <= {x["resource"] for x in d.leases()}
    c.close()

    # repair: the daemon dies, the file system is remounted, recovery reads the journal
    d.kill()
    assert run("umount", mnt).returncode == 0
    assert run("mount", "-t", "ext4", dev, mnt).returncode == 0
    d.start()
    held = {x["resource"]: x["token"] for x in d.leases() if x["state"] == "held"}
    assert held == told, "recovery after EIO does not match what was journaled before it"
    assert [probe(f) for f in files[:6]] == ["exclusive"] * 2 + ["free"] * 4


def shutdown_fs(mnt: Path) -> None:
    os.sync()  # what was committed before the fault is on the device
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    except OSError as exc:
        pytest.skip(f"EXT4_IOC_SHUTDOWN refused: {exc}")
    finally:
        os.close(fd)
    with pytest.raises(OSError) as ei:
        (mnt / "probe-eio").write_bytes(b"x")
    assert ei.value.errno == errno.EIO, ei.value


def test_lock_kept_for_unjournaled_owner_death_is_listed(
    make_daemon: Callable[..., Daemon], owners: Owners, ext4_fs: tuple[Path, str], tmp_path: Path
) -> None:
    """What the admin sees must match the kernel: a lease whose owner died but whose release
    cannot be journaled is still held, so ListLeases must still list it."""
    mnt, _ = ext4_fs
    [f] = make_files(tmp_path / "res", 1)
    d = make_daemon(state_dir=mnt / "state")
    p = owners.spawn()
    o = d.register(p.pid)["uuid"]
    d.acquire(f, owner=o)
    shutdown_fs(mnt)
    Owners.kill(p)
    time.sleep(1.0)
    assert probe(f) == "exclusive"
    assert [x["resource"] for x in d.leases()] == [str(f)], "held in the kernel, not listed"


# --- a journal the daemon must refuse -----------------------------------------------------------


def journal_files(state: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(state.iterdir())
        if p.name.startswith("journal.sqlite")
    }


@pytest.fixture
def stopped_journal(daemon: Daemon, owners: Owners, files: list[Path]) -> Daemon:
    """A daemon that journaled an owner and three leases, then stopped cleanly."""
    o = daemon.register(owners.spawn().pid)["uuid"]
    for f in files[:3]:
        daemon.acquire(f, owner=o)
    daemon.stop()
    return daemon


CORRUPTIONS: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda good: os.urandom(len(good)),
    "header-over-garbage": lambda good: good[:100] + os.urandom(len(good) - 100),
    "first-page-over-garbage": lambda good: good[:4096] + os.urandom(len(good) - 4096),
    "truncated": lambda good: good[: len(good) // 2],
    "last-page-garbage": lambda good: good[:-4096] + os.urandom(4096),
}


def expect_refusal(d: Daemon, *words: str) -> None:
    before = journal_files(d.state_dir)
    d.spawn()
    rc = d.wait_exit()
    lines = this_start(d)
    assert rc == 1, f"exit {rc}, expected 1\n{d.stderr_tail()}"
    assert len(lines) == 1, f"not one clear line: {lines}"
    assert lines[0].startswith("lockd: ") and str(d.state_dir / "journal.sqlite") in lines[0]
    for w in words:
        assert w in lines[0], lines
    assert journal_files(d.state_dir) == before, "a refused journal was written to"
    print(f"\nrefused: {lines[0]}")


def test_corrupt_journal_refused_untouched(stopped_journal: Daemon) -> None:
    """Each corruption in turn (one daemon start each): exit 1, one line naming the journal,
    and not a byte of the journal changed."""
    d = stopped_journal
    path = d.state_dir / "journal.sqlite"
    good = path.read_bytes()
    for kind, corrupt in CORRUPTIONS.items():
        path.write_bytes(corrupt(good))
        print(f"\n{kind}:", end="")
        expect_refusal(d)
    path.write_bytes(good)  # and the good journal still starts, with its leases
    d.start()
    assert len(d.leases()) == 3


@pytest.mark.parametrize(
    "table",
    ["history", "grants", "leases"],
)
def test_journal_with_a_corrupt_table_is_refused_at_start(
    stopped_journal: Daemon, table: str
) -> None:
    """A corrupt page anywhere in the journal is a corrupt journal: refused at start (exit 1,
    one line), not discovered by the first client."""
    d = stopped_journal
    path = d.state_dir / "journal.sqlite"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    if page is None:
        pytest.skip(f"this journal schema has no {table}")
    data = bytearray(path.read_bytes())
    data[(page[0] - 1) * size : page[0] * size] = os.urandom(size)
    path.write_bytes(bytes(data))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    d.spawn()
    try:
        rc = d.proc.wait(5) if d.proc is not None else None
    except subprocess.TimeoutExpired:
        rc = None
    started = rc is None
    d.kill()  # SIGKILL: leaves an empty -wal and the -shm, which change nothing
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before, "the journal was written to"
    wal = d.state_dir / "journal.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0, "a WAL was written over a corrupt journal"
    assert not started, f"lockd started on a journal with a corrupt {table} page"
    assert rc == 1 and len(this_start(d)) == 1, this_start(d)


def add_future_migration(path: Path, exit_without_close: bool = False) -> None:
    """Record a migration this lockd does not know, as a newer lockd would have. With
    ``exit_without_close`` the writer dies without closing (no checkpoint): its commit stays
    in the WAL, as after a crash of that newer lockd."""
    code = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1])\n"
        'db.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at)'
        " VALUES ('lockd', '999_from_the_future', '2031-01-01')\")\n"
        "db.commit()\n"
        "if sys.argv[2] == '1':\n"
        "    os._exit(0)\n"
        "db.close()\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(path), "1" if exit_without_close else "0"],
        check=True,
        timeout=30,
    )


def test_newer_journal_refused_untouched(stopped_journal: Daemon) -> None:
    d = stopped_journal
    add_future_migration(d.state_dir / "journal.sqlite")
    expect_refusal(d, "newer lockd", "999_from_the_future")


REFUSAL_WRITES = (
    "a newer lockd's journal left with its last commit in the WAL: the read-only schema check "
    "has to open it with -shm, and SQLite's read-only WAL reader rewrites the -shm index"
)


@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            "newer-crashed-with-wal",
            marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=REFUSAL_WRITES),
        ),
        "newer-rollback-mode",
        "foreign",
    ],
)
def test_refused_journal_is_not_rewritten(
    daemon: Daemon, owners: Owners, files: list[Path], kind: str
) -> None:
    """A newer lockd that crashed (its last commit still in the WAL), or one that uses a
    rollback journal, or an SQLite file that is not a lockd journal: refusing it must not
    write a byte of it (a downgrade must leave the newer journal as the newer lockd left it)."""
    path = daemon.state_dir / "journal.sqlite"
    o = daemon.register(owners.spawn().pid)["uuid"]
    daemon.acquire(files[0], owner=o)
    if kind == "newer-crashed-with-wal":
        daemon.kill()
        add_future_migration(path, exit_without_close=True)
        assert (daemon.state_dir / "journal.sqlite-wal").stat().st_size > 0
        words: tuple[str, ...] = ("newer lockd",)
    elif kind == "newer-rollback-mode":
        daemon.stop()
        db = sqlite3.connect(path)
        db.execute("PRAGMA journal_mode=DELETE")
        db.close()
        add_future_migration(path)
        words = ("newer lockd",)
    else:
        daemon.stop()
        for p in daemon.state_dir.glob("journal.sqlite*"):
            p.unlink()
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE guests (name TEXT)")
        db.execute("INSERT INTO guests VALUES ('not lockd')")
        db.commit()
        db.close()
        words = ("not a lockd journal",)
    expect_refusal(daemon, *words)


# --- too many open files --------------------------------------------------------------------------


class NofileDaemon(Daemon):
    """lockd started under ``prlimit --nofile=N:N``: soft = hard, so it cannot raise it."""

    nofile = 48

    def argv(self, *extra: str) -> list[str]:
        return ["prlimit", f"--nofile={self.nofile}:{self.nofile}", *super().argv(*extra)]


@pytest.fixture
def nofile_daemon(tmp_path: Path, runtime_dir: Path) -> Iterator[NofileDaemon]:
    d = NofileDaemon(tmp_path / "nofile", runtime_dir)
    try:
        d.start()
        yield d
    finally:
        d.close()


def exhaust_fds(d: Daemon, c: Conn, owner: str, files: list[Path]) -> tuple[list[Path], Path]:
    """Acquire on ``c`` until the daemon runs out of fds; (granted, the refused file)."""
    granted = []
    for f in files:
        try:
            c.call("io.lockd.Acquire", {"resource": str(f), "owner": owner})
        except errors.LimitExceeded as exc:
            assert exc.parameters.get("limit") == "open-files", exc.parameters
            return granted, f
        granted.append(f)
    raise AssertionError(f"{len(granted)} leases under a limit of {NofileDaemon.nofile} fds")


def test_out_of_fds_is_limit_exceeded(
    nofile_daemon: NofileDaemon, owners: Owners, tmp_path: Path
) -> None:
    """At the fd limit an acquire gets io.lockd.LimitExceeded (limit "open-files") with no
    lock left behind; the daemon does not crash, keeps serving its connections, and accepts
    new ones again as soon as fds are free."""
    d = nofile_daemon
    assert f"fd limit {d.nofile}" in d.stderr_text()
    files = make_files(tmp_path / "res", 2 * d.nofile)
    admin = d.connect(admin=True)  # opened before the fds run out: accept needs an fd too
    c = d.connect()
    o = c.call("io.lockd.Register", {"pid": owners.spawn().pid})["owner"]["uuid"]
    granted, refused = exhaust_fds(d, c, o, files)
    print(f"\nfd limit {d.nofile}: {len(granted)} leases, then io.lockd.LimitExceeded")
    assert probe(refused) == "free"
    assert all(probe(f) == "exclusive" for f in granted)
    for _ in range(3):  # again and again: still a named error, never a crash
        with pytest.raises(errors.LimitExceeded):
            c.call("io.lockd.Acquire", {"resource": str(refused), "owner": o})
    assert probe(refused) == "free"
    assert d.running
    assert len(c.call("io.lockd.Inquire", {"owner": o})["leases"]) == len(granted)
    listed = admin.call("io.lockd.Admin.ListLeases")["leases"]
    assert {x["resource"] for x in listed} == {str(f) for f in granted}

    # free two fds: a brand-new connection is accepted (asyncio retries accept after EMFILE)
    for f in granted[:2]:
        c.call("io.lockd.Release", {"resource": str(f), "owner": o})
    with Conn(d.socket, timeout=15) as fresh:
        lease = fresh.call("io.lockd.Acquire", {"resource": str(refused), "owner": o})["lease"]
    assert lease["state"] == "held" and probe(refused) == "exclusive"
    assert probe(granted[0]) == "free"
    c.close()
    # one fd short again until the daemon has closed those connections: a connect now
    # would be dropped at once (libuv closes what it cannot accept at EMFILE; asyncio left
    # it in the backlog), which lockd.client retries, but this raw check would not
    wait_until(
        lambda: admin.call("io.lockd.Admin.Status")["status"]["connections"] == 1,
        10,
        what="closed connections to be reaped",
    )
    d.assert_alive()
    admin.close()


def test_register_out_of_fds_is_limit_exceeded(
    nofile_daemon: NofileDaemon, owners: Owners, tmp_path: Path
) -> None:
    d = nofile_daemon
    files = make_files(tmp_path / "res", 2 * d.nofile)
    c = d.connect()
    o = c.call("io.lockd.Register", {"pid": owners.spawn().pid})["owner"]["uuid"]
    exhaust_fds(d, c, o, files)
    reply = c.call_raw("io.lockd.Register", {"pid": owners.spawn().pid})
    assert d.running
    assert reply.get("error") == "io.lockd.LimitExceeded", reply


# --- MemoryError ------------------------------------------------------------------------------


def test_memory_error_aborts_and_recovery_restores(
    make_daemon: Callable[..., Daemon],
    owners: Owners,
    files: list[Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of memory for real: the daemon aborts (SIGABRT) instead of limping on, and the
    restart re-takes every lease with its token. faulthandler (PYTHONFAULTHANDLER) prints
    where the abort came from: it must be one of lockd's own ``os.abort()`` calls."""
    raise_nofile(4096)
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")
    daemon = make_daemon()
    o = daemon.register(owners.spawn().pid)["uuid"]
    tokens = {str(f): daemon.acquire(f, owner=o)["token"] for f in files[:4]}
    size_kb = vm_kb(daemon.pid, "VmSize")
    limit = (size_kb + 16 * 1024) * 1024
    out = run("prlimit", "--pid", str(daemon.pid), f"--as={limit}:{limit}")
    if out.returncode != 0:
        pytest.skip(f"prlimit --pid --as: {out.stderr.strip()}")

    # Each connection sends most of a 64 KB message and no NUL: the daemon must hold it.
    payload = b'{"method":"io.lockd.Acquire","parameters":{"resource":"/' + b"a" * 60_000
    socks: list[socket.socket] = []
    t0 = time.monotonic()
    try:
        while daemon.running and len(socks) < 3000 and time.monotonic() - t0 < 30:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            socks.append(s)
            s.settimeout(5)
            try:
                s.connect(str(daemon.socket))
                s.sendall(payload)
            except OSError:
                break  # the daemon is gone
        rc = daemon.wait_exit(30)
    finally:
        for s in socks:
            s.close()
    print(
        f"\nMemoryError: VmSize {size_kb} kB, RLIMIT_AS {limit >> 10} kB; died with {rc} "
        f"after {len(socks)} connections of 60 KB"
    )
    assert rc == -signal.SIGABRT, f"exit {rc}, expected SIGABRT\n{daemon.stderr_tail()}"
    err = daemon.stderr_text()
    assert "Fatal Python error: Aborted" in err, daemon.stderr_tail()
    # faulthandler's traceback, most recent call first: the abort is one of lockd's
    # MemoryError handlers (each calls os.abort() for a MemoryError and nothing else)
    # (the aborting thread is "Current thread"; the journal thread is listed too)
    after = err.split("Fatal Python error: Aborted", 1)[1]
    frames = after.split("Current thread", 1)[1].split("most recent call first):")[1]
    where = frames.strip().splitlines()[0].strip()
    print(f"aborted at: {where}")
    assert re.search(
        r'/lockd/(daemon|server)\.py", line \d+ in '
        r"(_loop_exception|main|_handle|_failed|_abort_on_memory_error)$",
        where,
    ), daemon.stderr_tail()
    assert all(probe(f) == "free" for f in files[:4])  # no fd store: the locks died with it
    daemon.start()
    held = {x["resource"]: x["token"] for x in daemon.leases() if x["state"] == "held"}
    assert held == tokens
    assert all(probe(f) == "exclusive" for f in files[:4])
