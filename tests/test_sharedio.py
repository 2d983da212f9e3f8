"""The storage threads of shared lockspaces (lockd/service/sharedio.py): a call that blocks in the
kernel is given up after its bound with a named error, the thread stuck on it refuses later
calls at once, and what it returns after its caller gave up is abandoned (closed), never
delivered.

The blocking call is real: ``open`` of a FIFO for reading waits in the kernel until a writer
opens it (fifo(7)), as ``open`` on a mount whose server stopped answering does; the test
opens the writer end to "bring the storage back". (The hung GlusterFS brick itself is
scenario 7 of tests/test_cluster.py, under ``make cluster``.)
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from lockd.errors import LimitExceeded
from lockd.service.sharedio import StorageWorker


def _wait_for(pred: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_blocked_call_times_out_then_is_abandoned(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    abandoned: list[int] = []

    async def scenario() -> tuple[float, float]:
        worker = StorageWorker("hung", asyncio.get_running_loop())
        worker.timeout = 0.3
        t0 = time.monotonic()
        with pytest.raises(LimitExceeded) as info:
            await worker.call(lambda: os.open(fifo, os.O_RDONLY), abandoned.append)
        waited = time.monotonic() - t0
        assert info.value.parameters["limit"] == "shared-storage-timeout"
        assert info.value.parameters["lockspace"] == "hung"
        await asyncio.sleep(0.4)  # the thread has been stuck longer than the bound now
        t1 = time.monotonic()
        with pytest.raises(LimitExceeded, match="has not answered a call"):
            worker.call(lambda: 0)
        refused = time.monotonic() - t1
        # the storage answers: the late open is abandoned, the thread serves again
        writer = os.open(fifo, os.O_WRONLY)
        try:
            while not abandoned:
                await asyncio.sleep(0.01)
            assert await worker.call(lambda: 42) == 42
        finally:
            os.close(writer)
        return waited, refused

    waited, refused = asyncio.run(scenario())
    assert 0.3 <= waited < 5.0
    assert refused < 0.3  # at once, without queueing behind the stuck call
    assert len(abandoned) == 1 and abandoned[0] >= 0  # the fd it got, handed to abandon
    os.close(abandoned[0])


def test_call_sync_bound_and_result(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    abandoned: list[int] = []
    loop = asyncio.new_event_loop()
    try:
        worker = StorageWorker("hung", loop)
        assert worker.call_sync(lambda: "ok") == "ok"
        with pytest.raises(ValueError):
            worker.call_sync(lambda: int("x"))
        with pytest.raises(LimitExceeded):
            worker.call_sync(lambda: os.open(fifo, os.O_RDONLY), abandoned.append, timeout=0.2)
        writer = os.open(fifo, os.O_WRONLY)
        try:
            assert worker.call_sync(lambda: "again", timeout=5) == "again"
        finally:
            os.close(writer)
        _wait_for(lambda: abandoned)
    finally:
        loop.close()
    assert len(abandoned) == 1
    os.close(abandoned[0])


def test_storage_workers_by_name_alone(tmp_path: Path) -> None:
    """Which lockspaces get a storage thread at start-up, before anything on their mounts
    is touched: those forced shared by the configuration, and those whose directory lies (by
    name) on a network or FUSE mount in this process's mountinfo; a local one gets none."""
    from lockd.config import Config
    from lockd.locks.lockspace import Lockspaces
    from lockd.service.sharedfs import is_shared, parse_mountinfo, storage_workers

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = Config(lockspaces={"local": tmp_path / "a", "forced": tmp_path / "b"},
                    shared_lockspaces=("forced",)).validate()  # fmt: skip
    mounts = [m for _, m in parse_mountinfo(Path("/proc/self/mountinfo").read_text())]
    shared = next((m.mountpoint for m in mounts if is_shared(m.fstype)), None)
    named = {"named": Path(shared) / "leases"} if shared else {}
    loop = asyncio.new_event_loop()
    try:
        workers = storage_workers(config, Lockspaces(config.lockspaces, named), loop)
    finally:
        loop.close()
    assert set(workers) == {"forced", *named}, (workers, shared)
    assert workers["forced"].directory == str(tmp_path / "b")
