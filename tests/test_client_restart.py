"""lockd.client.Client rides over daemon restarts (issue item 6).

The daemon is really killed (SIGKILL, or SIGABRT at a failpoint) and really restarted; the
answers are checked against the kernel (probe) and the journal.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from clients import CLIENTS
from e2e import Daemon, Owners, probe

from lockd import errors


@pytest.fixture(params=sorted(CLIENTS))
def make_client(request: pytest.FixtureRequest) -> Any:
    """Each test runs with lockd.client.Client and lockd.aio.Client (tests/clients.py)."""
    return CLIENTS[request.param]


class Call(threading.Thread):
    """Run one client call in a thread; keep its result or exception."""

    def __init__(self, fn: Any, *args: Any, **kw: Any) -> None:
        super().__init__(daemon=True)
        self.fn, self.args, self.kw = fn, args, kw
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kw)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
        self.finished_at = time.monotonic()

    def outcome(self, timeout: float = 30) -> Any:
        self.join(timeout)
        assert not self.is_alive(), "client call still blocked"
        if self.error is not None:
            raise self.error
        return self.result


def test_kill9_between_calls(
    daemon: Daemon, owners: Owners, files: list[Path], make_client: Any
) -> None:
    with make_client(daemon.socket, timeout=20) as c:
        owner = c.register(owners.spawn().pid, name="vm")
        first = c.acquire(files[0], owner=owner["uuid"])
        daemon.kill(signal.SIGKILL)
        daemon.start()
        # the next call on the same Client just works, on a new connection
        second = c.acquire(files[1], owner=owner["uuid"], shared=True)
        assert second["token"] > first["token"]
        again = c.acquire(files[0], owner=owner["uuid"])
        assert again["token"] == first["token"]
        inq = c.inquire(owner=owner["uuid"])
        assert {x["resource"]: x["state"] for x in inq["leases"]} == {
            str(files[0]): "held",
            str(files[1]): "held",
        }
    assert probe(files[0]) == "exclusive"
    assert probe(files[1]) == "shared"


def test_call_while_daemon_down(
    daemon: Daemon, owners: Owners, files: list[Path], make_client: Any
) -> None:
    """A call made while lockd is dead is answered once it is back (within the timeout)."""
    c = make_client(daemon.socket, timeout=20)
    owner = c.register(owners.spawn().pid)
    daemon.kill()
    call = Call(c.acquire, files[0], owner=owner["uuid"])
    call.start()
    time.sleep(0.5)
    assert call.is_alive(), f"returned while lockd was down: {call.result!r} {call.error!r}"
    assert probe(files[0]) == "free"
    daemon.start()
    lease = call.outcome()
    assert lease["state"] == "held"
    assert probe(files[0]) == "exclusive"
    assert [x["token"] for x in daemon.leases()] == [lease["token"]]
    c.close()


def test_kill9_during_a_call(
    daemon: Daemon, owners: Owners, files: list[Path], make_client: Any
) -> None:
    """The call is sent and unanswered (the daemon is stopped) when lockd is SIGKILLed; the
    client resends it to the restarted daemon and returns the right answer."""
    c = make_client(daemon.socket, timeout=20)
    owner = c.register(owners.spawn().pid)
    c.acquire(files[0], owner=owner["uuid"])  # connection established
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        call = Call(c.acquire, files[1], owner=owner["uuid"], shared=True)
        call.start()
        time.sleep(0.3)
        assert call.is_alive()
    finally:
        daemon.kill(signal.SIGKILL)
    daemon.start()
    lease = call.outcome()
    assert lease["mode"] == "shared" and lease["state"] == "held"
    assert probe(files[1]) == "shared"
    assert probe(files[0]) == "exclusive"
    listed = {x["resource"]: x["token"] for x in daemon.leases()}
    assert listed[str(files[1])] == lease["token"]
    c.close()


@pytest.mark.parametrize("point", ["acquire.after-commit", "acquire.after-lock"])
def test_abort_during_a_call(
    daemon: Daemon, owners: Owners, files: list[Path], point: str, make_client: Any
) -> None:
    """lockd aborts in the middle of Acquire (committed or not); the client's retry on the
    restarted daemon returns the lease, with the token the journal has."""
    c = make_client(daemon.socket, timeout=30)
    owner = c.register(owners.spawn().pid)
    before = c.acquire(files[0], owner=owner["uuid"])
    daemon.stop()
    daemon.start(failpoint=point)
    call = Call(c.acquire, files[1], owner=owner["uuid"])
    call.start()
    assert daemon.wait_exit() == -signal.SIGABRT
    daemon.start()
    lease = call.outcome()
    assert lease["state"] == "held"
    assert lease["token"] > before["token"]
    assert probe(files[1]) == "exclusive"
    listed = {x["resource"]: x["token"] for x in daemon.leases()}
    assert listed == {str(files[0]): before["token"], str(files[1]): lease["token"]}
    c.close()


def test_release_during_abort(
    daemon: Daemon, owners: Owners, files: list[Path], make_client: Any
) -> None:
    c = make_client(daemon.socket, timeout=30)
    owner = c.register(owners.spawn().pid)
    lease = c.acquire(files[0], owner=owner["uuid"])
    daemon.stop()
    daemon.start(failpoint="release.after-commit")
    call = Call(c.release, files[0], owner=owner["uuid"])
    call.start()
    assert daemon.wait_exit() == -signal.SIGABRT
    daemon.start()
    released = call.outcome()
    assert released["token"] == lease["token"]
    assert probe(files[0]) == "free"
    c.close()


def test_unreachable_after_timeout(
    daemon: Daemon, owners: Owners, files: list[Path], make_client: Any
) -> None:
    c = make_client(daemon.socket, timeout=1.0)
    owner = c.register(owners.spawn().pid)
    daemon.kill()
    t0 = time.monotonic()
    with pytest.raises(errors.DaemonUnreachable):
        c.acquire(files[0], owner=owner["uuid"])
    elapsed = time.monotonic() - t0
    assert 0.9 <= elapsed < 10, elapsed
    # a daemon that accepts but never answers (stopped) is unreachable too
    daemon.start()
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.DaemonUnreachable):
            c.inquire(owner=owner["uuid"])
        assert time.monotonic() - t0 < 10
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    # no socket at all
    with pytest.raises(errors.DaemonUnreachable):
        make_client(daemon.runtime / "nothing.sock", timeout=0.5).inquire(owner=owner["uuid"])
    c.close()


def test_admin_client(daemon: Daemon, owners: Owners, files: list[Path], make_client: Any) -> None:
    c = make_client(daemon.socket, timeout=10)
    a = make_client(daemon.admin_socket, admin=True, timeout=10)
    owner = c.register(owners.spawn().pid, name="vm")
    c.acquire(files[0], owner=owner["uuid"])
    assert a.status()["pid"] == daemon.pid
    assert [x["resource"] for x in a.list_leases()] == [str(files[0])]
    assert [x["uuid"] for x in a.list_owners()] == [owner["uuid"]]
    assert any(e["event"] == "acquire" for e in a.history(limit=10))
    forced = a.force_release(files[0])
    assert [x["resource"] for x in forced] == [str(files[0])]
    assert probe(files[0]) == "free"
    assert any(e["event"] == "force-release" for e in a.history(limit=10))
    c.close()
    a.close()
