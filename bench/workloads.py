"""Workloads, written once and run against any server through a :class:`Driver`.

A driver does one acquire and one release of *its* resource over *its* connection; lockd's
(:class:`bench.wire.PairDriver`), the do-nothing floor server's (the same class) and
virtlockd's (:mod:`bench.vl`) differ only in the wire. Concurrent clients are forked
processes (one connection, one owner, one distinct file each), released together through a
pipe, each timing its own pairs; the parent reads the server's CPU time around the run.
"""

from __future__ import annotations

import array
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from bench.procs import cpu_s
from bench.stats import latency


class Driver(Protocol):
    def acquire(self) -> None: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


def warm(drv: Driver, seconds: float) -> int:
    """Run pairs for ``seconds`` (this machine's ping-pong latency needs a second to settle)."""
    end = time.perf_counter() + seconds
    n = 0
    while time.perf_counter() < end:
        for _ in range(50):
            drv.acquire()
            drv.release()
        n += 50
    return n


def sequential(
    drv: Driver, n: int, server_pid: int | None = None, warm_s: float = 1.0
) -> dict[str, Any]:
    """``n`` acquire+release pairs back to back on one connection."""
    warm(drv, warm_s)
    pc = time.perf_counter
    lat = array.array("d")
    la = array.array("d")
    lr = array.array("d")
    cpu0 = cpu_s(server_pid) if server_pid else 0.0
    t0 = pc()
    for _ in range(n):
        t = pc()
        drv.acquire()
        t1 = pc()
        drv.release()
        t2 = pc()
        lat.append(t2 - t)
        la.append(t1 - t)
        lr.append(t2 - t1)
    wall = pc() - t0
    out = latency(lat, wall)
    out["acquire_p50_us"] = latency(la)["p50_us"]
    out["release_p50_us"] = latency(lr)["p50_us"]
    if server_pid:
        cpu = cpu_s(server_pid) - cpu0
        out["server_cpu_us_per_pair"] = cpu / n * 1e6
        out["server_cpu_pct"] = 100 * cpu / wall
    return out


def _worker(
    make: Callable[[int], Driver],
    i: int,
    go_r: int,
    ready_w: int,
    dur: float | None,
    pairs: int | None,
    out: str,
) -> None:
    try:
        drv = make(i)
        for _ in range(20):
            drv.acquire()
            drv.release()
        os.write(ready_w, b"r")
        os.read(go_r, 1)
        pc = time.perf_counter
        lat = array.array("d")
        t0 = pc()
        end = t0 + dur if dur is not None else float("inf")
        left = pairs if pairs is not None else -1
        while left != 0:
            t = pc()
            if t >= end:
                break
            drv.acquire()
            drv.release()
            lat.append(pc() - t)
            left -= 1
        wall = pc() - t0
        drv.close()
        with open(out, "wb") as f:
            f.write(orjson.dumps({"n": len(lat), "wall": wall, "lat": lat.tolist()}))
        os._exit(0)
    except BaseException:
        with open(out, "wb") as f:
            f.write(orjson.dumps({"error": traceback.format_exc()[-2000:]}))
        os._exit(1)


def concurrent(
    make: Callable[[int], Driver],
    nclients: int,
    dur: float | None = None,
    pairs_each: int | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """``nclients`` processes doing pairs for ``dur`` seconds (or ``pairs_each`` pairs)."""
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    tmp = tempfile.mkdtemp(prefix="lkw", dir="/tmp")
    pids: list[int] = []
    outs: list[str] = []
    for i in range(nclients):
        out = os.path.join(tmp, f"w{i:03d}.json")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(go_w)
            os.close(ready_r)
            _worker(make, i, go_r, ready_w, dur, pairs_each, out)
        pids.append(pid)
        outs.append(out)
    os.close(ready_w)
    os.close(go_r)
    started = 0
    while started < nclients:
        got = os.read(ready_r, nclients)
        if not got:
            break  # every worker died before getting ready
        started += len(got)
    cpu0 = cpu_s(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    os.write(go_w, b"g" * nclients)
    for pid in pids:
        os.waitpid(pid, 0)
    wall = time.perf_counter() - t0
    cpu = (cpu_s(server_pid) - cpu0) if server_pid else 0.0
    os.close(go_w)
    os.close(ready_r)
    total = 0
    walls: list[float] = []
    lat: list[float] = []
    errors: list[str] = []
    for out in outs:
        try:
            with open(out, "rb") as f:
                w = orjson.loads(f.read())
            os.unlink(out)
        except FileNotFoundError:
            errors.append("worker wrote no result")
            continue
        if "error" in w:
            errors.append(w["error"])
            continue
        total += w["n"]
        walls.append(w["wall"])
        lat.extend(w["lat"])
    os.rmdir(tmp)
    if errors:
        raise RuntimeError(f"{len(errors)} of {nclients} workers failed; first:\n{errors[0]}")
    span = max(walls) if walls else wall
    res = latency(lat)
    res.update({"clients": nclients, "pairs": total, "per_s": total / span, "wall_s": span})
    if server_pid:
        res["server_cpu_us_per_pair"] = cpu / total * 1e6 if total else None
        res["server_cpu_pct"] = 100 * cpu / wall
    return res
