"""lockd/systemd/notify.py against a supervisor that stops reading its notify socket, or reads it
slowly.

A datagram receiver whose queue is full (net.unix.max_dgram_qlen) answers EAGAIN. No message
may then block the event loop: STATUS is dropped at once (it used to spin in CPython's retry
loop for up to FDSTORE_TIMEOUT, 10 s, per message: the two-host torture's harness, which
reads its notify socket only at start-up, found lockd unresponsive). READY, WATCHDOG and the
other messages that must arrive are retried from the loop until the queue has room: systemd
252 reads slowly while it takes fd-store entries, and a dropped READY=1 would leave the
start to time out.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from lockd.systemd import notify


def test_status_to_a_full_notify_queue_is_dropped_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))  # never read
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setattr(notify, "_notifier", notify._Notifier())
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    try:
        for i in range(qlen + 20):  # past the queue's length: the last ones meet EAGAIN
            t0 = time.monotonic()
            notify.notify(f"STATUS=message {i}")
            took = time.monotonic() - t0
            assert took < 1.0, f"notify #{i} blocked {took:.1f} s on a full queue"
        got = 0
        receiver.setblocking(False)
        while True:
            try:
                receiver.recv(4096)
            except BlockingIOError:
                break
            got += 1
        assert 0 < got < qlen + 20  # some arrived, the rest were dropped
    finally:
        receiver.close()


def test_watchdog_to_a_full_queue_arrives_once_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setattr(notify, "_notifier", notify._Notifier())
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())

    async def scenario() -> list[bytes]:
        loop = asyncio.get_running_loop()
        while notify.notify("STATUS=filling"):  # until the queue is full
            pass
        t0 = time.monotonic()
        notify.deliver(loop, "WATCHDOG=1", within=5.0)
        assert time.monotonic() - t0 < 0.5, "deliver blocked the loop"
        await asyncio.sleep(0.3)  # several retries meet the full queue
        receiver.recv(4096)  # the supervisor reads one message: room for one
        await asyncio.sleep(0.3)  # the next retry gets in
        got = []
        while True:
            try:
                got.append(receiver.recv(4096))
            except BlockingIOError:
                return got

    try:
        got = asyncio.run(scenario())
    finally:
        receiver.close()
    # the queue full again: the STATUS messages left, then the WATCHDOG in the room made
    assert got.count(b"WATCHDOG=1") == 1 and got[-1] == b"WATCHDOG=1", got
    assert len(got) >= qlen - 1
