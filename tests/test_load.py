"""Load (issue 4): 1,000 concurrent connections, 10,000 leases at once, slow and non-reading
clients that must not delay others, and clients that vanish mid-request.

Theory of operation: the real daemon, real sockets, real files; every held/free check is a
probe from this process. Timings are printed, never asserted as speed targets: the only
timing assertion is a generous ratio (a client's median acquire + release latency while
hostile clients run stays under 20x its median without them), which a daemon that lets one
peer block the event loop fails by orders of magnitude.
"""

from __future__ import annotations

import contextlib
import random
import socket
import statistics
import struct
import threading
import time
from pathlib import Path

import pytest
from e2e import Conn, ConnectionLost, Daemon, Owners, make_files, probe, wait_until
from loadkit import acquire_release_latencies, message, pipeline, raise_nofile, summary, vm_kb


@pytest.fixture(autouse=True)
def _nofile() -> None:
    if raise_nofile(4096) < 2100:
        pytest.skip("needs RLIMIT_NOFILE >= 2100 for this process")


def test_thousand_concurrent_connections(daemon: Daemon, owners: Owners, tmp_path: Path) -> None:
    """1,000 connections open at once, then each acquires its own file (all calls in flight
    together); every one is answered and the kernel holds all 1,000 locks."""
    n = 1000
    files = make_files(tmp_path / "res", n)
    o = daemon.register(owners.spawn().pid)["uuid"]
    t0 = time.monotonic()
    conns = [Conn(daemon.socket, timeout=60) for _ in range(n)]
    t_open = time.monotonic() - t0
    try:
        # connect() returns once the kernel queued the connection; the loop accepts the
        # backlog over a few iterations (uvloop takes fewer per iteration than asyncio)
        wait_until(lambda: daemon.status()["connections"] >= n + 1, 10, what="accepts")
        t0 = time.monotonic()
        for c, f in zip(conns, files, strict=True):
            c.send_raw(message("io.lockd.Acquire", {"resource": str(f), "owner": o}))
        replies = [c.recv_message() for c in conns]
        t_calls = time.monotonic() - t0
        assert all(r["parameters"]["lease"]["state"] == "held" for r in replies), [
            r for r in replies if "error" in r
        ][:3]
        assert len({r["parameters"]["lease"]["token"] for r in replies}) == n
        # a second round: every connection still usable
        for c in conns:
            c.send_raw(message("org.varlink.service.GetInfo"))
        assert all("io.lockd" in c.recv_message()["parameters"]["interfaces"] for c in conns)
    finally:
        for c in conns:
            c.close()
    print(
        f"\n1,000 connections: opened in {t_open:.2f} s; 1,000 concurrent acquires answered in "
        f"{t_calls:.2f} s"
    )
    assert all(probe(f) == "exclusive" for f in files)
    wait_until(lambda: daemon.status()["connections"] == 1, 10, what="connections to close")
    assert daemon.status()["leases"] == n  # closing a connection releases nothing


def test_ten_thousand_leases(daemon: Daemon, owners: Owners, tmp_path: Path) -> None:
    """10,000 leases held at once by four owners: listed, held in the kernel (spot-probed),
    re-taken after a crash, and released."""
    n, k = 10_000, 4
    files = make_files(tmp_path / "res", n + 50)
    leased, spare = files[:n], files[n:]
    ids = [daemon.register(owners.spawn().pid, name=f"vm{i}")["uuid"] for i in range(k)]
    conns = [daemon.connect() for _ in range(k)]
    results: list[list[dict]] = [[] for _ in range(k)]

    def work(i: int) -> None:
        mine = leased[i::k]
        calls = [("io.lockd.Acquire", {"resource": str(f), "owner": ids[i]}) for f in mine]
        results[i] = pipeline(conns[i], calls)

    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    t_acq = time.monotonic() - t0
    errs = [r for rs in results for r in rs if "error" in r]
    assert not errs, errs[:3]
    assert sum(len(rs) for rs in results) == n
    rss = vm_kb(daemon.pid)

    t0 = time.monotonic()
    listed = daemon.leases()
    t_list = time.monotonic() - t0
    assert len(listed) == n and {x["state"] for x in listed} == {"held"}
    assert {x["resource"] for x in listed} == {str(f) for f in leased}
    assert daemon.status()["leases"] == n
    rng = random.Random(4)
    sample = rng.sample(leased, 200)
    assert all(probe(f) == "exclusive" for f in sample)
    assert all(probe(f) == "free" for f in spare)

    # a crash with 10,000 leases: recovery re-takes them all, same tokens
    tokens = {x["resource"]: x["token"] for x in listed}
    daemon.kill()
    t0 = time.monotonic()
    daemon.start(timeout=120)
    t_restart = time.monotonic() - t0
    status = daemon.status()
    assert status["leases"] == n and status["recovery"]["retaken"] == n, status["recovery"]
    relisted = daemon.leases()
    assert {x["resource"]: x["token"] for x in relisted} == tokens
    assert all(probe(f) == "exclusive" for f in rng.sample(leased, 200))

    t0 = time.monotonic()
    with daemon.connect(timeout=120) as c:
        released = [len(c.call("io.lockd.ReleaseAll", {"owner": o})["leases"]) for o in ids]
    t_rel = time.monotonic() - t0
    assert sum(released) == n
    assert all(probe(f) == "free" for f in sample)
    for c in conns:
        c.close()
    print(
        f"\n10,000 leases: acquired in {t_acq:.2f} s (4 owners, 4 pipelined connections), "
        f"daemon RSS {rss} kB; ListLeases {t_list:.2f} s; restart + recovery {t_restart:.2f} s "
        f"(recovery {status['recovery']['duration_ms']:.0f} ms); ReleaseAll {t_rel:.2f} s"
    )


def drip(path: Path, data: bytes, stop: threading.Event, period: float = 1.0) -> None:
    """A slow client: one byte of ``data`` per ``period`` until stopped or done."""
    with Conn(path, timeout=30) as c:
        for i in range(len(data)):
            if stop.wait(period):
                return
            c.send_raw(data[i : i + 1])
        with contextlib.suppress(TimeoutError, ConnectionLost):
            c.recv_message()


def test_slow_and_non_reading_clients_do_not_delay_others(
    daemon: Daemon, owners: Owners, tmp_path: Path
) -> None:
    """50 clients sending a byte a second, then also 20 clients that pipeline 300 calls with
    ~4 KB replies each and never read them: another client's median acquire + release latency
    stays within 20x of what it is without them."""
    files = make_files(tmp_path / "res", 2)
    o = daemon.register(owners.spawn().pid)["uuid"]
    with daemon.connect() as c:
        acquire_release_latencies(c, o, files[0], 30)  # warm-up
        base = acquire_release_latencies(c, o, files[0], 300)
    rss0 = vm_kb(daemon.pid)

    stop = threading.Event()
    slow_call = message("io.lockd.Acquire", {"resource": str(files[1]), "owner": o})
    slow = [
        threading.Thread(target=drip, args=(daemon.socket, slow_call, stop), daemon=True)
        for _ in range(50)
    ]
    for t in slow:
        t.start()
    call = message("org.varlink.service.GetInterfaceDescription", {"interface": "io.lockd"})
    deaf: list[socket.socket] = []
    try:
        time.sleep(1.5)  # every slow client has sent a byte or two
        with daemon.connect() as c:
            with_slow = acquire_release_latencies(c, o, files[0], 300)
        deaf = non_readers(daemon, 20, call * 300)
        with daemon.connect() as c:
            with_both = acquire_release_latencies(c, o, files[0], 300)
        rss1 = vm_kb(daemon.pid)
        daemon.assert_alive()
    finally:
        stop.set()
        for s in deaf:
            s.close()
        for t in slow:
            t.join(5)
    b50 = statistics.median(base)
    print(
        f"\nacquire+release latency, alone:                {summary(base)}\n"
        f"with 50 clients sending a byte a second:       {summary(with_slow)}\n"
        f"... and 20 clients never reading 300 replies:  {summary(with_both)}\n"
        f"daemon RSS {rss0} -> {rss1} kB"
    )
    for loaded in (with_slow, with_both):
        l50 = statistics.median(loaded)
        assert l50 < 20 * b50, f"median {l50 * 1e3:.2f} ms vs {b50 * 1e3:.2f} ms unloaded"
    assert probe(files[0]) == "free"
    assert probe(files[1]) == "free"  # the slow clients' Acquire never completed


def non_readers(daemon: Daemon, n: int, data: bytes) -> list[socket.socket]:
    """``n`` connections that send ``data`` (as much as the socket takes) and never read."""
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.connect(str(daemon.socket))
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.send(data)
        out.append(s)
    return out


def test_pipelining_non_readers_cannot_grow_memory_or_stall_others(daemon: Daemon) -> None:
    """10 peers each pipeline 2,000 calls with ~4 KB replies and never read. server.py
    promises they are paused once their queue (64 calls) or our write buffer is full, "so it
    cannot grow our memory or delay other connections": RSS may grow by < 32 MiB in all, and
    another client's call is answered within 1 s. (Before 0e849c5 one such peer cost ~8 MB
    and ten stalled everyone else for ~9 s.)"""
    daemon.assert_alive()
    rss0 = vm_kb(daemon.pid)
    call = message("org.varlink.service.GetInterfaceDescription", {"interface": "io.lockd"})
    deaf = non_readers(daemon, 10, call * 2000)
    try:
        t0 = time.monotonic()
        daemon.assert_alive()  # a new connection, one call
        stall = time.monotonic() - t0
        time.sleep(0.5)
        rss1 = vm_kb(daemon.pid)
    finally:
        for s in deaf:
            s.close()
    print(f"\n10 pipelining non-readers: another call took {stall:.2f} s; RSS {rss0} -> {rss1} kB")
    assert stall < 1.0, f"another client waited {stall:.1f} s"
    assert rss1 - rss0 < 32 * 1024, f"RSS grew by {(rss1 - rss0) >> 10} MiB"


def test_flooding_peer_that_reads_cannot_grow_memory(daemon: Daemon) -> None:
    """A peer writes pipelined calls as fast as the socket takes them and reads every reply:
    it must be slowed to the daemon's pace (the socket buffer is the queue), not buffered by
    the daemon. Over 3 s the daemon's RSS may grow by < 32 MiB."""
    daemon.assert_alive()
    rss0 = vm_kb(daemon.pid)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.connect(str(daemon.socket))
    chunk = message("org.varlink.service.GetInfo") * 5000
    stop = threading.Event()
    counts = {"sent": 0, "answered": 0}

    def write() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                s.sendall(chunk)
                counts["sent"] += 5000

    def read() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                data = s.recv(1 << 20)
                if not data:
                    return
                counts["answered"] += data.count(b"\0")

    threads = [threading.Thread(target=f, daemon=True) for f in (write, read)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        rss1 = vm_kb(daemon.pid)
        daemon.assert_alive()
    finally:
        stop.set()
        s.shutdown(socket.SHUT_RDWR)
        s.close()
        for t in threads:
            t.join(10)
    print(
        f"\nflooding reader: {counts['sent']} calls sent, {counts['answered']} answered in 3 s; "
        f"RSS {rss0} -> {rss1} kB"
    )
    assert rss1 - rss0 < 32 * 1024, f"RSS grew by {(rss1 - rss0) >> 10} MiB"


def test_disconnect_mid_request_loses_nothing(
    daemon: Daemon, owners: Owners, tmp_path: Path
) -> None:
    """A client sends Acquire (or Release) and closes at once (FIN or RST). Whatever happened
    is consistent: held in the kernel iff listed; a retry gives the same token (acquire) or
    the same answer (release)."""
    n = 60
    files = make_files(tmp_path / "res", n)
    o = daemon.register(owners.spawn().pid)["uuid"]

    def hit_and_run(method: str, f: Path, rst: bool) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.connect(str(daemon.socket))
        if rst:  # close with unread data pending on the daemon's side: a reset
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(message(method, {"resource": str(f), "owner": o}))
        s.close()

    for i, f in enumerate(files):
        hit_and_run("io.lockd.Acquire", f, rst=bool(i % 2))
    time.sleep(0.5)
    listed = {x["resource"]: x["token"] for x in daemon.leases(owner=o)}
    for f in files:
        assert (str(f) in listed) == (probe(f) == "exclusive"), f
    with daemon.connect() as c:
        for f in files:
            lease = c.call("io.lockd.Acquire", {"resource": str(f), "owner": o})["lease"]
            if str(f) in listed:
                assert lease["token"] == listed[str(f)], "a retry got another token"
    tokens = {x["resource"]: x["token"] for x in daemon.leases(owner=o)}
    assert len(tokens) == n and all(probe(f) == "exclusive" for f in files)
    print(f"\nhit-and-run acquires: {len(listed)} of {n} had taken effect before the retry")

    for i, f in enumerate(files):
        hit_and_run("io.lockd.Release", f, rst=bool(i % 2))
    time.sleep(0.5)
    left = {x["resource"] for x in daemon.leases(owner=o)}
    for f in files:
        assert (str(f) in left) == (probe(f) == "exclusive"), f
    with daemon.connect() as c:
        for f in files:
            rel = c.call("io.lockd.Release", {"resource": str(f), "owner": o})["lease"]
            assert rel["state"] == "released" and rel["token"] == tokens[str(f)], rel
    assert all(probe(f) == "free" for f in files)
    assert daemon.leases(owner=o) == []
    print(f"hit-and-run releases: {n - len(left)} of {n} had taken effect before the retry")
