"""Floors: what the parts of a lock manager cost with nothing around them, measured in-run.

- ``ofd``: ``F_OFD_SETLK`` write lock + unlock of byte 0 on an open fd (the kernel's share);
- ``open_lock``: open + ``F_OFD_SETLK`` of N files, one fd each (what recovery must redo);
- ``sqlite``: one ``BEGIN; INSERT; COMMIT`` in WAL mode at ``synchronous=NORMAL`` / ``FULL``
  (the cheapest journal write there is);
- the Varlink round trip and the interpreter start come from :class:`bench.procs.FloorServer`
  (see :mod:`bench.wire`) through the same workloads as lockd.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any

from bench.stats import latency

F_OFD_SETLK: int = getattr(fcntl, "F_OFD_SETLK", 37)
_FLOCK = "hhqqi4x"
WR0 = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
UN0 = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 1, 0)


def ofd(path: Path, n: int) -> dict[str, Any]:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    pc = time.perf_counter
    lat = []
    try:
        t0 = pc()
        for _ in range(n):
            t = pc()
            fcntl.fcntl(fd, F_OFD_SETLK, WR0)
            fcntl.fcntl(fd, F_OFD_SETLK, UN0)
            lat.append(pc() - t)
        wall = pc() - t0
    finally:
        os.close(fd)
    return latency(lat, wall)


def open_lock(files: list[Path]) -> float:
    """Seconds to open and OFD-lock every file (then unlock and close them, untimed)."""
    fds = []
    t0 = time.perf_counter()
    for p in files:
        fd = os.open(p, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        fcntl.fcntl(fd, F_OFD_SETLK, WR0)
        fds.append(fd)
    dt = time.perf_counter() - t0
    for fd in fds:
        os.close(fd)
    return dt


def sqlite(directory: Path, synchronous: str, n: int) -> dict[str, Any]:
    """``n`` one-row transactions on a fresh WAL database."""
    path = directory / f"floor-{synchronous.lower()}.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, at REAL, what TEXT)")
        pc = time.perf_counter
        lat = []
        row = "/tmp/lkbench/files/disk00000.img exclusive"
        t0 = pc()
        for _ in range(n):
            t = pc()
            conn.execute("BEGIN")
            conn.execute("INSERT INTO t (at, what) VALUES (?, ?)", (t, row))
            conn.execute("COMMIT")
            lat.append(pc() - t)
        wall = pc() - t0
    finally:
        conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    out = latency(lat, wall)
    out["mean_us"] = wall / n * 1e6
    return out
