"""lockd/notify.py against a supervisor that stops reading its notify socket.

A datagram receiver whose queue is full (net.unix.max_dgram_qlen) answers EAGAIN. A STATUS
or WATCHDOG message must then be dropped at once: the event loop sends them. (It used to
spin in CPython's retry loop for up to FDSTORE_TIMEOUT, 10 s, per message: the two-host
torture's harness, which reads its notify socket only at start-up, found lockd unresponsive.)
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from lockd import notify


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
