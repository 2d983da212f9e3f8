"""lockd.aio on its own terms: many tasks, one Client, no threads, against the real daemon.

The behaviour it shares with the blocking client (retries, timeouts, errors, Watch over
restarts) is tested by test_client_unit.py and test_client_restart.py, parametrized over
both. Here: what only an asyncio client has to get right, each checked from outside (the
kernel's view of the files, the daemon's list).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from e2e import Daemon, Owners, probe

from lockd import aio, errors


def test_concurrent_calls_from_many_tasks(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    async def main() -> None:
        async with aio.Client(daemon.socket, timeout=20) as c:
            procs = [owners.spawn() for _ in files]
            regs = await asyncio.gather(*(c.register(p.pid) for p in procs))
            leases = await asyncio.gather(
                *(c.acquire(f, owner=r["uuid"]) for f, r in zip(files, regs, strict=True))
            )
            assert len({lease["token"] for lease in leases}) == len(files)
            assert all(probe(f) == "exclusive" for f in files)
            # one resource, many owners at once: exactly one wins, the others are busy
            target = files[0].with_name("contended.img")
            target.write_bytes(b"\0")
            results = await asyncio.gather(
                *(c.acquire(target, owner=r["uuid"]) for r in regs), return_exceptions=True
            )
            won = [r for r in results if isinstance(r, dict)]
            busy = [r for r in results if isinstance(r, errors.ResourceBusy)]
            assert (len(won), len(busy)) == (1, len(regs) - 1), results
            # the pool: a burst opens parallel connections, and only a few are kept
            assert 1 <= len(c._idle) <= aio.MAX_IDLE
            released = await asyncio.gather(*(c.release_all(owner=r["uuid"]) for r in regs))
            assert sum(len(x) for x in released) == len(files) + 1
        assert all(probe(f) == "free" for f in [*files, target])

    asyncio.run(main())


def test_cancelled_call_leaves_no_stale_reply(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    """A call cancelled before its reply drops its connection: the reply that comes later
    cannot be taken for the answer to the next call."""

    async def main() -> None:
        c = aio.Client(daemon.socket, timeout=20)
        uuid = (await c.register(owners.spawn().pid))["uuid"]
        daemon.proc.send_signal(signal.SIGSTOP)  # the daemon will answer only later
        try:
            task = asyncio.create_task(c.acquire(files[0], owner=uuid))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        inquired = await c.inquire(owner=uuid)
        assert set(inquired) == {"owner", "leases"}  # not an Acquire's {"lease": ...}
        await c.close()

    asyncio.run(main())
    # the cancelled acquire was sent, so the daemon may have granted it: either way the
    # journal and the kernel agree
    held = [x for x in daemon.leases() if x["resource"] == str(files[0])]
    assert probe(files[0]) == ("exclusive" if held else "free")


def test_watch_events_and_close_from_another_task(
    daemon: Daemon, owners: Owners, files: list[Path]
) -> None:
    async def main() -> None:
        async with aio.Client(daemon.socket, timeout=20) as c:
            vm = owners.spawn()
            uuid = (await c.register(vm.pid))["uuid"]
            await c.acquire(files[0], owner=uuid)
            admin = aio.Client(daemon.admin_socket, admin=True, timeout=20)
            watch = await c.watch(owner=uuid)
            seen = [await watch.__anext__()]
            assert seen[0]["event"] == "watching"
            await admin.force_release(files[0])
            seen.append(await asyncio.wait_for(watch.__anext__(), 20))
            assert (seen[1]["event"], seen[1]["resource"]) == ("force-release", str(files[0]))
            # a second watch, ended by close() from another task while it waits
            other = await c.watch(pid=vm.pid)
            assert (await other.__anext__())["event"] == "watching"

            async def drain() -> list[str]:
                return [e["event"] async for e in other]

            waiting = asyncio.create_task(drain())
            await asyncio.sleep(0.1)
            assert not waiting.done()
            await c.close()
            assert await asyncio.wait_for(waiting, 10) == []
            # the owner's death ends the first watch's stream (a new subscription: the
            # Client reconnects after close)
            third = await c.watch(owner=uuid)
            assert (await third.__anext__())["event"] == "watching"
            Owners.kill(vm)
            events = [e["event"] async for e in third]
            assert events == ["owner-dead"], events
            await admin.close()

    asyncio.run(main())


def test_errors_are_the_same_classes(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    async def main() -> None:
        async with aio.Client(daemon.socket, timeout=5) as c:
            vm = owners.spawn()
            with pytest.raises(errors.NoSuchOwner):
                await c.acquire(files[0], pid=vm.pid)
            uuid = (await c.register(vm.pid))["uuid"]
            with pytest.raises(errors.InvalidResource):
                await c.acquire("relative/path", owner=uuid)
            await c.acquire(files[0], owner=uuid)
            with pytest.raises(errors.ResourceBusy) as busy:
                await c.acquire(files[0], owner=uuid, shared=True)
            assert isinstance(busy.value, BlockingIOError)
            assert busy.value.parameters["reason"].startswith("already held exclusive")
            with pytest.raises(errors.MethodNotFound):
                await c.call("io.lockd.Nope")
        daemon.kill(signal.SIGKILL)
        async with aio.Client(daemon.socket, timeout=0.5) as c:
            with pytest.raises(errors.DaemonUnreachable, match="did not answer"):
                await c.get_info()

    asyncio.run(main())
