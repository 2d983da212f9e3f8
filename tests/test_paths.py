"""Path tricks (issue 4, "Hostile input"): symlinks, ``..``, very long paths, device nodes,
FIFOs, directories, files the daemon may not open.

Theory of operation: each request names a path built to mislead; the answer must be the
same resource as the path's target (a symlink is the file it leads to) or a named error,
fast, with no lock left behind and nothing created; a FIFO must never block the daemon, which
is checked by timing another client's calls while FIFOs are being asked for (and swapped in
for a regular file under the daemon's feet). test_semantics.py already covers the plain
cases (missing, relative, NUL, ``..``, ``.``, ``//``, a directory, a FIFO, hard links and one
symlink); these go further. Every held/free check is a probe from this process.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e import Conn, Daemon, Owners, make_files, probe
from loadkit import acquire_release_latencies, loop_device, mounted, run

from lockd import errors


@pytest.fixture
def owner(daemon: Daemon, owners: Owners) -> str:
    return str(daemon.register(owners.spawn().pid)["uuid"])


def refused(daemon: Daemon, owner: str, resource: str, shared: bool = False) -> str:
    """The named error an acquire of ``resource`` gets (it must get one, within 5 s)."""
    t0 = time.monotonic()
    with Conn(daemon.socket) as c:
        reply = c.call_raw(
            "io.lockd.Acquire",
            {"resource": resource, "owner": owner, "mode": "shared" if shared else "exclusive"},
        )
    assert time.monotonic() - t0 < 5, f"{resource!r} took {time.monotonic() - t0:.1f} s"
    assert "error" in reply, f"{resource!r} was granted: {reply}"
    assert reply["error"] in errors.WIRE_ERRORS, reply
    return str(reply["error"])


def test_symlinks(daemon: Daemon, owner: str, tmp_path: Path, files: list[Path]) -> None:
    d = tmp_path / "links"
    d.mkdir()
    f = files[0]
    # a chain of links and a symlinked directory lead to the target: one resource
    os.symlink(f, d / "one")
    os.symlink(d / "one", d / "two")
    os.symlink(f.parent, d / "dirlink")
    first = daemon.acquire(d / "two", owner=owner)
    assert daemon.acquire(d / "dirlink" / f.name, owner=owner)["token"] == first["token"]
    assert daemon.acquire(f, owner=owner)["token"] == first["token"]
    assert probe(f) == "exclusive" and len(daemon.leases(owner=owner)) == 1
    daemon.release(f, owner=owner)
    assert probe(f) == "free"

    # loops, dangling links, links to what may not be locked: named errors, nothing created
    os.symlink(d / "loop-b", d / "loop-a")
    os.symlink(d / "loop-a", d / "loop-b")
    os.symlink(d / "nowhere.img", d / "dangling")
    os.mkfifo(d / "fifo")
    os.symlink(d / "fifo", d / "to-fifo")
    os.symlink(tmp_path, d / "to-dir")
    os.symlink("/dev/null", d / "to-null")
    for name in ("loop-a", "dangling", "to-fifo", "to-dir", "to-null"):
        for shared in (False, True):
            assert refused(daemon, owner, str(d / name), shared) == "io.lockd.InvalidResource"
    assert not (d / "nowhere.img").exists()
    assert stat.S_ISFIFO(os.stat(d / "fifo").st_mode)
    daemon.assert_alive()


def test_dot_dot_and_odd_names(daemon: Daemon, owner: str, files: list[Path]) -> None:
    f = str(files[0])
    for path in (
        "/..", "/../" + f.lstrip("/"), f + "/..", f + "/", f + "/.", "/./" + f.lstrip("/"),
        f.replace("/res/", "/res/../res/"), "..", "~/x", "",
    ):  # fmt: skip
        assert refused(daemon, owner, path) == "io.lockd.InvalidResource", path
    assert probe(files[0]) == "free"
    # "..." is an ordinary name, not a trick: it must not be taken for ".."
    weird = files[0].parent / "..."
    weird.write_bytes(b"\0")
    assert daemon.acquire(weird, owner=owner)["state"] == "held"
    assert probe(weird) == "exclusive"


def test_leading_double_slash_is_refused(daemon: Daemon, owner: str, files: list[Path]) -> None:
    assert refused(daemon, owner, "/" + str(files[0])) == "io.lockd.InvalidResource"
    assert probe(files[0]) == "free"


def deep_file(base: Path, total: int) -> Path:
    """A real file whose absolute path is exactly ``total`` bytes (components <= 200)."""
    path = base
    while len(os.fsencode(path)) + 201 < total:
        path = path / ("d" * 200)
    left = total - len(os.fsencode(path)) - 1
    assert 0 < left <= 255
    path.mkdir(parents=True, exist_ok=True)
    path = path / ("f" * left)
    path.write_bytes(b"\0")
    assert len(os.fsencode(path)) == total
    return path


def test_long_paths(daemon: Daemon, owner: str, tmp_path: Path) -> None:
    longest = deep_file(tmp_path / "deep", 4095)  # PATH_MAX - 1: the kernel's longest
    assert daemon.acquire(longest, owner=owner)["state"] == "held"
    assert probe(longest) == "exclusive"
    daemon.release(longest, owner=owner)
    name255 = tmp_path / ("n" * 255)  # NAME_MAX exactly
    name255.write_bytes(b"\0")
    assert daemon.acquire(name255, owner=owner)["state"] == "held"

    too_long = str(longest) + "x"  # 4096 bytes: no such path can be opened
    name256 = str(tmp_path / ("n" * 256))
    name_utf8 = str(tmp_path / ("\u00e9" * 128))  # 128 characters, 256 bytes
    huge = "/" + "a" * 60_000
    for path in (too_long, name256, name_utf8, "/" + "a/" * 3000, huge):
        err = refused(daemon, owner, path)
        assert err in ("io.lockd.InvalidResource", "org.varlink.service.InvalidParameter"), path
    daemon.assert_alive()


def test_device_nodes(daemon: Daemon, owner: str, tmp_path: Path) -> None:
    """Character devices are refused before they are opened (an open may act on them); a block
    device (an LVM volume's kind) is a resource like a file."""
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    for path in ("/dev/null", "/dev/zero", "/dev/tty", "/dev/ptmx", str(tmp_path / "null")):
        if os.path.exists(path):
            for shared in (False, True):
                assert refused(daemon, owner, path, shared) == "io.lockd.InvalidResource", path
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    with contextlib.ExitStack() as stack:
        try:
            dev = stack.enter_context(loop_device(image))
        except OSError as exc:
            pytest.skip(f"no loop device: {exc}")
        assert stat.S_ISBLK(os.stat(dev).st_mode)
        lease = daemon.acquire(dev, owner=owner)
        assert lease["state"] == "held" and probe(dev) == "exclusive"
        daemon.release(dev, owner=owner)
        assert probe(dev) == "free"
        assert daemon.acquire(dev, owner=owner, shared=True)["mode"] == "shared"
        assert probe(dev) == "shared"
        daemon.release(dev, owner=owner)


def test_fifos_never_block_the_daemon(
    daemon: Daemon, owners: Owners, owner: str, tmp_path: Path
) -> None:
    """While clients keep asking for FIFOs (directly, through symlinks, and at a path that is
    swapped between a regular file and a FIFO under the daemon's feet), another client's
    acquire + release round trips all stay well under a second."""
    reg, fifo = tmp_path / "reg.img", tmp_path / "fifo"
    reg.write_bytes(b"\0" * 512)
    os.mkfifo(fifo)
    os.symlink(fifo, tmp_path / "to-fifo")
    swapped = tmp_path / "swapped.img"
    os.link(reg, swapped)
    stop = threading.Event()
    outcomes: dict[str, int] = {}
    failures: list[BaseException] = []

    def swapper() -> None:
        tmp = tmp_path / "swap.tmp"
        while not stop.is_set():
            for src in (reg, fifo):
                os.link(src, tmp)
                os.rename(tmp, swapped)  # atomic replace; a no-op if both name one inode
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def asker(paths: list[Path]) -> None:
        o = daemon.register(owners.spawn().pid)["uuid"]
        try:
            with Conn(daemon.socket, timeout=5) as c:
                while not stop.is_set():
                    for p in paths:
                        r = c.call_raw("io.lockd.Acquire", {"resource": str(p), "owner": o})
                        key = r.get("error", "granted")
                        outcomes[key] = outcomes.get(key, 0) + 1
                        if "error" not in r:
                            assert probe(reg) == "exclusive"  # the regular file, of course
                            c.call("io.lockd.Release", {"resource": str(p), "owner": o})
                        else:
                            assert r["error"] == "io.lockd.InvalidResource", r
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=swapper, daemon=True),
        threading.Thread(target=asker, args=([fifo, tmp_path / "to-fifo"],), daemon=True),
        threading.Thread(target=asker, args=([swapped],), daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        [f] = make_files(tmp_path / "other", 1)
        with Conn(daemon.socket) as c:
            lat = acquire_release_latencies(c, owner, f, 200)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not failures, failures
    print(
        f"\nFIFO tricks: {outcomes}; another client's acquire+release max "
        f"{max(lat) * 1e3:.1f} ms over {len(lat)} round trips"
    )
    assert outcomes.get("io.lockd.InvalidResource", 0) > 0
    assert max(lat) < 1.0
    assert probe(reg) == "free" and stat.S_ISFIFO(os.stat(fifo).st_mode)
    daemon.assert_alive()


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Path]:
    f = tmp_path / "immutable.img"
    f.write_bytes(b"\0" * 512)
    out = run("chattr", "+i", f)
    if out.returncode != 0:
        pytest.skip(f"chattr +i: {out.stderr.strip()}")
    yield f
    run("chattr", "-i", f)


def test_files_the_daemon_may_not_open(
    daemon: Daemon, owner: str, tmp_path: Path, immutable: Path
) -> None:
    """Even root may not open some files for writing: an immutable file (EPERM) and a file on
    a read-only mount (EROFS). An exclusive lease (O_RDWR) is a named error, a shared one
    (O_RDONLY) is granted."""
    assert refused(daemon, owner, str(immutable)) == "io.lockd.PermissionDenied"
    assert probe(immutable) == "free"
    assert daemon.acquire(immutable, owner=owner, shared=True)["state"] == "held"
    assert probe(immutable) == "shared"
    daemon.release(immutable, owner=owner)

    src = tmp_path / "rosrc"
    [f] = make_files(src, 1)
    with contextlib.ExitStack() as stack:
        try:
            ro = stack.enter_context(mounted("--bind", "-o", "ro", src, target=tmp_path / "ro"))
        except OSError as exc:
            pytest.skip(str(exc))
        if run("mount", "-o", "remount,bind,ro", ro).returncode != 0:
            pytest.skip("cannot make the bind mount read-only")
        rof = ro / f.name
        assert refused(daemon, owner, str(rof)) == "io.lockd.InvalidResource"
        assert probe(rof) == "free"
        assert daemon.acquire(rof, owner=owner, shared=True)["state"] == "held"
        assert probe(f) == "shared"  # the same inode as seen through the writable path
        daemon.release(rof, owner=owner)
    daemon.assert_alive()
