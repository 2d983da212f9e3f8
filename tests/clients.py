"""Both client libraries behind one blocking interface, so one set of tests covers both.

Theory of operation: ``lockd.client.Client`` is used as it is. ``lockd.aio.Client`` runs on
an event loop of its own in a thread (:class:`AioBridge`): each method call is submitted to
that loop with ``run_coroutine_threadsafe`` and waited for, and a Watch's ``__anext__`` the
same way, so every test of the blocking client (real daemon, real restarts, calls from
other threads, ``close()`` from another thread ending a Watch) runs unchanged against the
asyncio one. The bridge adds no logic: retries, timeouts and errors are the aio client's.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from lockd import aio
from lockd.client import Client


class AioBridge:
    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 30.0,
        admin: bool = False,
    ) -> None:
        self._client = aio.Client(socket_path, timeout=timeout, admin=admin)
        self.socket_path = self._client.socket_path
        self.timeout = self._client.timeout
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, daemon=True).start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._client, name)
        return lambda *args, **kw: self.run(method(*args, **kw))

    def __enter__(self) -> AioBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.run(self._client.close())

    def watch(self, **kw: Any) -> BridgedWatch:
        return BridgedWatch(self, self.run(self._client.watch(**kw)))


class BridgedWatch(Iterator[dict[str, Any]]):
    def __init__(self, bridge: AioBridge, watch: aio.Watch) -> None:
        self.bridge, self.watch = bridge, watch

    def __next__(self) -> dict[str, Any]:
        async def step() -> dict[str, Any]:
            return await self.watch.__anext__()

        try:
            return self.bridge.run(step())  # type: ignore[no-any-return]
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self.watch.close()


CLIENTS: dict[str, Callable[..., Any]] = {"sync": Client, "aio": AioBridge}
