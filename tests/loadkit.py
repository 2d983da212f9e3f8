"""Small helpers shared by the fault, fuzz, load and access tests (no daemon code imported).

- :func:`vm_kb` reads a process's ``VmRSS``/``VmSize`` from ``/proc/PID/status``;
- :func:`raise_nofile` lifts this test process's soft ``RLIMIT_NOFILE`` (1,000 connections and
  10,000 probes need more than the usual 1,024);
- :func:`pipeline` sends many calls on one :class:`~e2e.Conn` without waiting for each reply
  (a writer thread sends while this thread reads, so neither side's socket buffer can fill up
  and deadlock the exchange) and returns the replies in order;
- :func:`latencies` times acquire + release round trips of one client, for the load tests;
- :func:`mounted` mounts a file system for one test and always unmounts it (lazily if a
  process still has it open), :func:`loop_device` attaches a loop device and detaches it.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from e2e import Conn, message  # message: re-exported for the load tests


def vm_kb(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def raise_nofile(want: int) -> int:
    """Soft RLIMIT_NOFILE of this process to at least ``want`` (capped by the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pipeline(conn: Conn, calls: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Send every call at once (pipelined) and read one reply per call, in order."""
    data = b"".join(message(m, p) for m, p in calls)
    failure: list[BaseException] = []

    def write() -> None:
        try:
            conn.sock.sendall(data)
        except BaseException as exc:  # reported by the reader
            failure.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        replies = [conn.recv_message() for _ in calls]
    finally:
        writer.join(60)
    assert not failure, failure
    return replies


def acquire_release_latencies(conn: Conn, owner: str, path: Path, n: int) -> list[float]:
    """Seconds of ``n`` acquire + release round trips of one client on one file."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        lease = conn.call("io.lockd.Acquire", {"resource": str(path), "owner": owner})
        conn.call("io.lockd.Release", {"resource": str(path), "owner": owner})
        out.append(time.perf_counter() - t0)
        assert lease["lease"]["state"] == "held", lease
    return out


def summary(samples: list[float]) -> str:
    qs = statistics.quantiles(samples, n=100)
    return f"p50 {qs[49] * 1e3:.2f} ms, p99 {qs[98] * 1e3:.2f} ms, max {max(samples) * 1e3:.2f} ms"


def run(*argv: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def mounted(*mount_args: str | os.PathLike[str], target: Path) -> Iterator[Path]:
    """``mount ARGS... target`` for the duration; unmounted (lazily if busy) afterwards.

    Raises ``OSError`` if the mount fails (callers turn that into a skip with the reason)."""
    target.mkdir(parents=True, exist_ok=True)
    out = run("mount", *mount_args, target)
    if out.returncode != 0:
        raise OSError(f"mount {' '.join(map(str, mount_args))}: {out.stderr.strip()}")
    try:
        yield target
    finally:
        if run("umount", target).returncode != 0:
            run("umount", "-l", target)


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    out = run("losetup", "--find", "--show", image)
    if out.returncode != 0:
        raise OSError(f"losetup: {out.stderr.strip()}")
    dev = out.stdout.strip()
    try:
        yield dev
    finally:
        run("losetup", "-d", dev)
