"""lockd.client against a scripted in-test Varlink peer (NUL-terminated JSON over AF_UNIX).

The real daemon is exercised by the end-to-end tests; here the peer "crashes" on cue
(listener closed, socket file left: ECONNREFUSED; or the connection cut mid-call) to pin
down the client's retry, timeout and Watch re-subscription rules.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from clients import CLIENTS

from lockd.errors import DaemonUnreachable, ResourceBusy
from lockd.wire.varlink import Decoder, dumps

Msg = dict[str, Any]
# returns the replies to send (possibly none: a hung daemon), or None to cut the connection
Handler = Callable[[Msg, int], list[Msg] | None]


@pytest.fixture(params=sorted(CLIENTS))
def make_client(request: pytest.FixtureRequest) -> Any:
    """Each test runs with lockd.client.Client and lockd.aio.Client (tests/clients.py)."""
    return CLIENTS[request.param]


class FakeLockd:
    def __init__(self, path: Path, handler: Handler, chunk: int = 0) -> None:
        self.path, self.handler, self.chunk = path, handler, chunk
        self.calls: list[Msg] = []
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None

    def start(self) -> FakeLockd:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        self.listener.listen(16)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()
        return self

    def crash(self) -> None:
        """Like kill -9 without systemd: the socket file stays, nobody listens."""
        for s in [*self.conns, self.listener]:
            assert s is not None
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        decoder = Decoder()
        with contextlib.suppress(OSError):  # crash() closed it under us
            while data := conn.recv(65536):
                for msg in decoder.feed(data):
                    self.calls.append(msg)
                    replies = self.handler(msg, len(self.calls))
                    if replies is None:
                        conn.close()
                        return
                    out = b"".join(dumps(r) for r in replies)
                    step = self.chunk or len(out) or 1
                    for i in range(0, len(out), step):
                        conn.sendall(out[i : i + step])


def lease(params: Msg) -> Msg:
    return {"parameters": {"lease": {"resource": params["resource"], "token": 7}}}


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "lockd.sock"


def test_call_shapes_and_split_replies(sock: Path, make_client: Any) -> None:
    fake = FakeLockd(sock, lambda m, n: [lease(m["parameters"])], chunk=3).start()
    with make_client(sock) as c:
        assert c.acquire(Path("/img/a"), pid=42, shared=True) == {"resource": "/img/a", "token": 7}
        assert c.acquire("/img/b", owner="u")["token"] == 7
    assert fake.calls[0] == {
        "method": "io.lockd.Acquire",
        "parameters": {"resource": "/img/a", "pid": 42, "mode": "shared"},
    }
    assert fake.calls[1]["parameters"] == {"resource": "/img/b", "owner": "u", "mode": "exclusive"}


def test_error_reply_is_raised_typed_and_not_retried(sock: Path, make_client: Any) -> None:
    busy = {"error": "io.lockd.ResourceBusy", "parameters": {"resource": "/a", "mode": "x"}}
    fake = FakeLockd(sock, lambda m, n: [busy]).start()
    with make_client(sock) as c, pytest.raises(ResourceBusy) as info:
        c.acquire("/a", pid=1)
    assert isinstance(info.value, BlockingIOError) and info.value.parameters["resource"] == "/a"
    assert len(fake.calls) == 1


def test_daemon_starting_late_is_waited_for(sock: Path, make_client: Any) -> None:
    fake = FakeLockd(sock, lambda m, n: [{"parameters": {"owner": {"pid": 1}}}])
    threading.Timer(0.2, fake.start).start()
    t0 = time.monotonic()
    with make_client(sock, timeout=5) as c:
        assert c.register(1) == {"pid": 1}
    assert time.monotonic() - t0 >= 0.2


def test_crash_mid_call_resends_same_call(sock: Path, make_client: Any) -> None:
    fake = FakeLockd(sock, lambda m, n: None if n == 1 else [lease(m["parameters"])]).start()
    with make_client(sock, timeout=5) as c:
        assert c.release("/a", pid=1)["resource"] == "/a"
    assert fake.calls[0] == fake.calls[1]


def test_restart_between_calls(sock: Path, make_client: Any) -> None:
    fake = FakeLockd(sock, lambda m, n: [lease(m["parameters"])]).start()
    with make_client(sock, timeout=5) as c:
        c.acquire("/a", pid=1)
        fake.crash()  # the kept connection is dead and the socket refuses for a while
        threading.Timer(0.15, fake.start).start()
        assert c.acquire("/a", pid=1)["token"] == 7


def test_retry_false_is_not_resent(sock: Path, make_client: Any) -> None:
    fake = FakeLockd(sock, lambda m, n: None).start()
    with make_client(sock, timeout=5) as c, pytest.raises(DaemonUnreachable, match="not resent"):
        c.call("io.lockd.Admin.Reexec", retry=False)
    assert len(fake.calls) == 1


@pytest.mark.parametrize("hung", [False, True])
def test_timeout_gives_daemon_unreachable(sock: Path, hung: bool, make_client: Any) -> None:
    if hung:
        FakeLockd(sock, lambda m, n: []).start()
    t0 = time.monotonic()
    with make_client(sock, timeout=0.3) as c, pytest.raises(DaemonUnreachable) as info:
        c.inquire(pid=1)
    assert 0.3 <= time.monotonic() - t0 < 1.5
    assert str(sock) in str(info.value)
    assert ("no reply" in str(info.value)) == hung


def test_watch_resubscribes_and_client_stays_usable(sock: Path, make_client: Any) -> None:
    def handler(m: Msg, n: int) -> list[Msg]:
        if m["method"] != "io.lockd.Watch":
            return [{"parameters": {"owner": {}, "leases": []}}]
        assert m["more"] is True
        ev = [{"parameters": {"event": {"event": "watching"}}, "continues": True}]
        return ev + [{"parameters": {"event": {"event": "release"}}, "continues": n == 1}]

    fake = FakeLockd(sock, handler).start()
    with make_client(sock, timeout=5) as c:
        events = c.watch(pid=1)
        assert [next(events)["event"], next(events)["event"]] == ["watching", "release"]
        assert c.inquire(pid=1) == {"owner": {}, "leases": []}  # own connection for calls
        fake.crash()
        threading.Timer(0.1, fake.start).start()
        assert [e["event"] for e in events] == ["watching", "release"]


def test_close_from_another_thread_ends_watch(sock: Path, make_client: Any) -> None:
    ev = {"parameters": {"event": {"event": "watching"}}, "continues": True}
    FakeLockd(sock, lambda m, n: [ev]).start()
    c = make_client(sock)
    events = c.watch(owner="u")
    assert next(events)["event"] == "watching"
    threading.Timer(0.1, c.close).start()
    assert list(events) == []


def test_large_reply_and_env_socket(
    sock: Path, monkeypatch: pytest.MonkeyPatch, make_client: Any
) -> None:
    big = [{"resource": f"/img/{i}", "pad": "x" * 200} for i in range(20_000)]
    FakeLockd(sock, lambda m, n: [{"parameters": {"leases": big}}]).start()
    monkeypatch.setenv("LOCKD_ADMIN_SOCKET", str(sock))
    with make_client(admin=True) as c:
        assert c.socket_path == sock
        assert c.list_leases() == big
