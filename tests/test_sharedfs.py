"""Two hosts on real shared storage (issue 10): one lockd per "host", GlusterFS between them.

Theory of operation: one :class:`gluster_harness.GlusterBed` for the whole module (port 24007
allows one): a real GlusterFS volume mounted twice through FUSE, mount A and mount B, which
the brick treats as two hosts. Each test runs one lockd per mount, each with its own state
directory and sockets and an indirect lockspace ``shared`` in its own mount of one volume
directory, so one resource is one lease file seen by both. Every assertion about a lock is
made from outside: a probe on the *other* mount (``F_OFD_GETLK`` from the test process, or
another process trying ``F_OFD_SETLK``), byte 0, as DESIGN §2 fixes it.

The volume starts with ``client.strict-locks on`` (the setting lockd requires); the test of
the default (``off``) switches it and remounts. A client reconnect is produced for real:
``ss -K`` resets mount A's TCP connection to the brick, the brick drops every lock of that
client at once, and the client reconnects ~3 s later (the recipe's finding).

Every two-host test runs ``lockctl verify`` on each host's lockd (:func:`assert_no_drift`): any
drift between a daemon's leases and what the storage holds fails it. The kernel keeps no
record of a lock GlusterFS's FUSE client arbitrates, so verify checks those leases by the
filesystem's answers (lockd/ctl/verify.py); every held lease here must have been checked so.

Measured figures (gaps, detection times) are printed at the end of the module.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gluster_harness as gh
import pytest
import sd_harness as sd
import vlharness as vl
from e2e import Conn, Daemon, Owners, is_free, message, probe, probe_setlk_elsewhere, wait_until
from measured import Figures, printed_at_end
from test_verify import EXIT_DRIFT, setlk, steal_fd, systemd_verify

from lockd import errors

RESOURCE = "vm-{}-disk"


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    yield from printed_at_end(request, "lockd on GlusterFS: measured")


@pytest.fixture(scope="module")
def bed(figures: Figures) -> Iterator[gh.GlusterBed]:
    reason = gh.unavailable()
    if reason is not None:
        pytest.skip(f"cannot run a GlusterFS test bed here: {reason}")
    with gh.GlusterBed(options={"client.strict-locks": "on"}) as b:
        t = b.timings
        figures.add(
            f"bed: glusterd up {t['glusterd_up_s']:.1f} s, volume up {t['volume_up_s']:.2f} s, "
            f"two mounts, set up in {t['setup_s']:.1f} s"
        )
        yield b
    figures.add(f"bed: torn down in {b.timings['teardown_s']:.1f} s, nothing left")


@dataclass
class Host:
    """One "host": a lockd whose lockspace ``shared`` is a volume directory via its mount."""

    name: str
    leases: Path
    daemon: Daemon

    def lease_file(self, resource: str) -> Path:
        return self.leases / hashlib.sha256(resource.encode()).hexdigest()

    def register(self, pid: int, **kw: Any) -> str:
        return str(self.daemon.register(pid, **kw)["uuid"])

    def acquire(self, resource: str, owner: str, shared: bool = False) -> dict[str, Any]:
        return self.daemon.acquire(resource, owner=owner, lockspace="shared", shared=shared)

    def release(self, resource: str, owner: str) -> dict[str, Any]:
        return self.daemon.release(resource, owner=owner, lockspace="shared")

    def lease(self, resource: str) -> dict[str, Any]:
        found = [
            x for x in self.daemon.lockctl_json("locks")["leases"] if x["resource"] == resource
        ]
        assert len(found) == 1, found
        return found[0]


@pytest.fixture
def hosts(
    bed: gh.GlusterBed, make_daemon: Callable[..., Daemon], request: pytest.FixtureRequest
) -> Callable[..., tuple[Host, Host]]:
    """``hosts(extra_config="", start=True)``: host A on mount A, host B on mount B, their
    lockspace one fresh directory of the volume."""

    def make(extra: str = "", extra_b: str | None = None) -> tuple[Host, Host]:
        sub = f"ls-{request.node.name}".replace("[", "-").replace("]", "")[:60]
        (bed.mount("a") / sub).mkdir()
        out = []
        for name, cfg in (("a", extra), ("b", extra if extra_b is None else extra_b)):
            leases = bed.mount(name) / sub
            config = f'{cfg}\n[lockspaces]\nshared = "{leases}"\n'
            out.append(Host(name, leases, make_daemon(config=config)))
        return out[0], out[1]

    return make


def no_drift(report: dict[str, Any], what: str) -> dict[str, Any]:
    """A verify report without drift, in which every held lease on the volume was checked
    by the filesystem's answers (the kernel has no record of them: lockd/ctl/verify.py)."""
    assert report["drift"] == [], f"{what}: {report}"
    assert report["remote"] == report["held"], f"{what}: {report}"
    return report


def assert_no_drift(*hosts: Host) -> None:
    """``lockctl verify`` on each host's lockd (at once) finds no drift (exit status 0)."""
    with ThreadPoolExecutor(len(hosts)) as pool:
        outs = list(pool.map(lambda h: h.daemon.lockctl("verify", "-J"), hosts))
    for h, out in zip(hosts, outs, strict=True):
        assert out.returncode == 0, (
            f"host {h.name}: lockctl verify exited {out.returncode}\n{out.stdout}{out.stderr}"
        )
        no_drift(json.loads(out.stdout)["verify"], f"host {h.name}")


def watch(daemon: Daemon, owner: str) -> tuple[Conn, list[dict[str, Any]], threading.Thread]:
    """A Watch subscription read by a thread into a list (until the connection ends)."""
    conn = daemon.connect(timeout=60)
    conn.send_raw(message("io.lockd.Watch", {"owner": owner}, more=True))
    first = conn.recv_message()
    assert first["parameters"]["event"]["event"] == "watching", first
    events: list[dict[str, Any]] = []

    def read() -> None:
        while True:
            try:
                events.append(conn.recv_message()["parameters"]["event"])
            except Exception:
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return conn, events, t


# --- exclusion across hosts ---------------------------------------------------------------


def test_exclusion_across_hosts(hosts: Callable[..., tuple[Host, Host]], owners: Owners) -> None:
    a, b = hosts()
    va, vb = a.register(owners.spawn().pid), b.register(owners.spawn().pid)
    r = RESOURCE.format(1)
    lease = a.acquire(r, va)
    assert lease["state"] == "held" and lease["path"] == str(a.lease_file(r))
    # seen from host B's mount: held exclusively, and another process cannot take it
    assert probe(b.lease_file(r)) == "exclusive"
    assert probe_setlk_elsewhere(b.lease_file(r)) == "held"
    with pytest.raises(errors.ResourceBusy):
        b.acquire(r, vb)
    with pytest.raises(errors.ResourceBusy):
        b.acquire(r, vb, shared=True)
    a.release(r, va)
    assert probe(b.lease_file(r)) == "free"
    b.acquire(r, vb)  # now B has it, and A is refused: the other direction
    assert probe(a.lease_file(r)) == "exclusive"
    with pytest.raises(errors.ResourceBusy):
        a.acquire(r, va)
    b.release(r, vb)
    # shared: both hosts at once, an exclusive request refused on either
    a.acquire(r, va, shared=True)
    b.acquire(r, vb, shared=True)
    assert probe(a.lease_file(r)) == probe(b.lease_file(r)) == "shared"
    assert probe_setlk_elsewhere(b.lease_file(r)) == "held"
    assert_no_drift(a, b)
    vc = a.register(owners.spawn().pid)
    with pytest.raises(errors.ResourceBusy):
        a.acquire(r, vc)
    a.release(r, va)
    assert probe(a.lease_file(r)) == "shared"  # B's share remains
    b.release(r, vb)
    assert probe(a.lease_file(r)) == "free"


# --- a crash of host A ------------------------------------------------------------------


def test_kill9_of_a_retakes_from_the_journal_and_b_stays_out(
    hosts: Callable[..., tuple[Host, Host]], owners: Owners, figures: Figures
) -> None:
    """Without an fd store, kill -9 leaves a gap (the lock is free until recovery re-takes
    it); once A is READY again, B is refused and sees A's lock."""
    a, b = hosts()
    va, vb = a.register(owners.spawn().pid), b.register(owners.spawn().pid)
    rs = [RESOURCE.format(i) for i in range(4)]
    tokens = {r: a.acquire(r, va, shared=(i == 3))["token"] for i, r in enumerate(rs)}
    t0 = time.monotonic()
    a.daemon.kill(signal.SIGKILL)
    # the gap: no store kept the lock (FUSE releases the dead process's files asynchronously)
    wait_until(lambda: is_free(b.lease_file(rs[0])), 10, 0.001, "the lock free after the kill")
    free_after = time.monotonic() - t0
    a.daemon.start()
    ready = time.monotonic() - t0
    for r in rs[:3]:
        assert probe(b.lease_file(r)) == "exclusive"
        assert probe_setlk_elsewhere(b.lease_file(r)) == "held"
        with pytest.raises(errors.ResourceBusy):
            b.acquire(r, vb, shared=True)
    assert probe(b.lease_file(rs[3])) == "shared"
    listed = {x["resource"]: x for x in a.daemon.lockctl_json("locks")["leases"]}
    assert {r: listed[r]["token"] for r in rs} == tokens
    assert {listed[r]["continuity"] for r in rs} == {"retaken"}
    assert_no_drift(a, b)
    figures.add(
        f"kill -9 of A, no fd store: lock free on B after {free_after * 1000:.0f} ms, A READY "
        f"and holding again {ready * 1000:.0f} ms after the kill (4 leases re-taken)"
    )


def test_abort_under_systemd_with_the_fd_store_never_lets_b_in(
    bed: gh.GlusterBed,
    hosts: Callable[..., tuple[Host, Host]],
    owners: Owners,
    figures: Figures,
    tmp_path: Path,
) -> None:
    """Host A is lockd under the project's units (systemd --user, the fd store): aborted, it
    is restarted and adopts its fds; a probe process on mount B polls the lease files the
    whole time and never sees one free, and B's lockd is refused before and after."""
    reason = sd.unavailable()
    if reason is not None:
        pytest.skip(f"cannot run a private systemd here: {reason}")
    _, b = hosts()
    sub = b.leases.name  # the same volume directory, reached through mount A
    a_leases = bed.mount("a") / sub
    # the user manager copies the mount table when it starts: the FUSE mounts are in it
    with sd.UserManager() as m:
        conf = m.w / "lockd.conf"
        conf.write_text(f'verify_interval = 0\n[lockspaces]\nshared = "{a_leases}"\n')
        wrapper = m.bindir / "lockd"
        wrapper.write_text(wrapper.read_text().replace('"$@"', f'--config {conf} "$@"'))
        rs = [RESOURCE.format(i) for i in range(8)]
        with m.client() as c:
            vm_a = owners.spawn()
            va = c.register(vm_a.pid, name="vm-a")["uuid"]
            for r in rs:
                c.acquire(r, owner=va, lockspace="shared")
        assert int(m.prop(sd.SERVICE, "NFileDescriptorStore") or 0) == len(rs)
        vb = b.register(owners.spawn().pid)
        files_b = [b.lease_file(r) for r in rs]
        restarts = []
        for sig in (signal.SIGABRT, signal.SIGKILL):
            with sd.Observer(files_b) as obs:
                time.sleep(0.05)
                restarts.append(m.kill_and_wait(sig))
                with pytest.raises(errors.ResourceBusy):
                    b.acquire(rs[0], vb, shared=True)
                seen = obs.stop()
            assert seen.free == 0, f"seen free on mount B: {seen.free_examples}"
            in_gap, longest = seen.during(restarts[-1].killed_at, restarts[-1].ready_at)
            assert in_gap >= 1, "the observer did not poll during the restart"
            figures.add(
                f"{signal.Signals(sig).name} of A under systemd with the fd store, {len(rs)} "
                f"leases: kill -> READY {restarts[-1].to_ready * 1000:.0f} ms; observer on "
                f"mount B: {seen.summary()}, {in_gap} sweeps in the restart"
            )
            listed = m.lockctl_json("locks")["leases"]
            assert {x["continuity"] for x in listed} == {"kept"} and len(listed) == len(rs)
            _, report = systemd_verify(m)
            assert no_drift(report, "host A")["fd_store"] == len(rs), report
        for f in files_b:
            assert probe_setlk_elsewhere(f) == "held"
        # The storage drops A's locks while they sit in the store (no verifier here:
        # verify_interval = 0), B takes one, and A dies: the new instance is handed fds whose
        # locks are gone (EBADFD, or ENOTCONN while the client reconnects). Those leases are
        # lost, not "kept": someone may have held the resource meanwhile, as B does.
        bed.reset_connection("a")
        wait_until(lambda: is_free(files_b[0]), 10, 0.005, "A's locks dropped by the brick")
        b.acquire(rs[0], vb)
        # lockd on A still lists them held; once A's client is back, lockctl verify sees that
        # the storage does not: B's lockd holds the first, nobody the others
        bed.wait_reconnected("a")
        wait_until(lambda: _answers(a_leases / files_b[0].name), 30, 0.1, "mount A answering")
        rc, report = systemd_verify(m)
        assert rc == EXIT_DRIFT, report
        found = {f["resource"]: f for f in report["drift"]}
        assert set(found) == set(rs), report
        assert found[rs[0]]["kind"] == "lock-missing", report
        assert f"pid {b.daemon.pid} holds byte 0" in found[rs[0]]["detail"], report
        assert {found[r]["kind"] for r in rs[1:]} == {"probe"}, report["drift"]
        figures.add(
            f"lockctl verify on A after that reset, its {len(rs)} leases still listed held: "
            f"drift on all ({found[rs[0]]['detail']}; {len(rs) - 1} seen free)"
        )
        r = m.kill_and_wait(signal.SIGKILL)
        status = m.lockctl_json("status")["status"]["recovery"]
        assert (status["adopted"], status["lost"]) == (0, len(rs)), status
        lost = [e for e in m.lockctl_json("history")["events"] if e["event"] == "lost"]
        assert {e["resource"] for e in lost} == set(rs)
        assert all("the filesystem dropped the lock" in e["reason"] for e in lost), lost
        assert vm_a.wait(15) == -signal.SIGKILL  # fenced: the default policy
        assert probe_setlk_elsewhere(files_b[0]) == "held" and b.lease(rs[0])["state"] == "held"
        _, report = systemd_verify(m)  # nothing held, nothing left in the store
        assert no_drift(report, "host A")["fd_store"] == 0, report
        assert_no_drift(b)
        figures.add(
            f"A's storage connection reset while its {len(rs)} leases sat in the fd store, "
            f"then kill -9: the new instance found them dropped at adoption, all lost, owner "
            f"fenced (kill -> READY {r.to_ready * 1000:.0f} ms)"
        )
        bed.wait_reconnected("a")


# --- owner death on A -------------------------------------------------------------------


def test_owner_death_on_a_frees_the_resource_for_b(
    hosts: Callable[..., tuple[Host, Host]], owners: Owners, figures: Figures
) -> None:
    a, b = hosts()
    vm = owners.spawn()
    va, vb = a.register(vm.pid), b.register(owners.spawn().pid)
    r = RESOURCE.format(1)
    a.acquire(r, va)
    assert probe(b.lease_file(r)) == "exclusive"
    t0 = time.monotonic()
    Owners.kill(vm)
    wait_until(lambda: is_free(b.lease_file(r)), 10, 0.001, "the dead owner's lock freed")
    freed = time.monotonic() - t0
    b.acquire(r, vb)
    assert probe(a.lease_file(r)) == "exclusive"
    assert_no_drift(a, b)
    figures.add(f"owner killed on A: free on mount B {freed * 1000:.1f} ms later")


# --- a lease taken by B in A's gap ---------------------------------------------------------


def test_lease_taken_by_b_in_a_gap_is_lost_and_fenced(
    hosts: Callable[..., tuple[Host, Host]], owners: Owners
) -> None:
    a, b = hosts()
    quiet, killed = owners.spawn(), owners.spawn()
    vq = a.register(quiet.pid, name="vm-report", fence="none")
    vk = a.register(killed.pid, name="vm-fenced", fence="kill")
    vb = b.register(owners.spawn().pid)
    r1, r2, r3 = (RESOURCE.format(i) for i in (1, 2, 3))
    t1 = a.acquire(r1, vq)["token"]
    a.acquire(r2, vk)
    a.acquire(r3, vq)
    a.daemon.kill(signal.SIGKILL)  # no fd store: the gap
    wait_until(lambda: is_free(b.lease_file(r2)), 10, 0.001, "the lock free after the kill")
    b.acquire(r1, vb)
    b.acquire(r2, vb)
    a.daemon.start()
    assert killed.wait(15) == -signal.SIGKILL
    assert quiet.poll() is None
    assert a.lease(r1)["state"] == "lost" and a.lease(r1)["token"] == t1
    assert a.lease(r3)["state"] == "held" and probe(b.lease_file(r3)) == "exclusive"
    # B still holds what it took: A did not grab it back
    for r in (r1, r2):
        assert probe(a.lease_file(r)) == "exclusive"
        assert b.lease(r)["state"] == "held"
    out = a.daemon.lockctl("locks", "-o", "RESOURCE,STATE", "-n")
    assert f"{r1} lost" in " ".join(out.stdout.split()), out.stdout
    lost = [e for e in a.daemon.history(limit=100) if e["event"] == "lost"]
    assert {e["resource"] for e in lost} == {r1, r2}
    assert all("taken by another holder" in e["reason"] for e in lost)
    conn, events, _ = watch(a.daemon, vq)  # a watcher is told at once of its lost lease
    wait_until(lambda: events, 10, what="a Watch event")
    assert events[0]["event"] == "lost" and events[0]["resource"] == r1
    conn.close()
    assert_no_drift(a, b)


# --- locks dropped behind lockd's back ------------------------------------------------------


def _wait_lost(host: Host, resource: str, timeout: float = 30.0) -> float:
    t0 = time.monotonic()
    wait_until(lambda: host.lease(resource)["state"] == "lost", timeout, 0.05, f"{resource} lost")
    return time.monotonic() - t0


def test_reconnect_with_strict_locks_is_a_lost_lease(
    bed: gh.GlusterBed,
    hosts: Callable[..., tuple[Host, Host]],
    owners: Owners,
    figures: Figures,
) -> None:
    """client.strict-locks on: mount A's connection is reset; the brick drops A's locks at
    once (B gets in), A's fds answer EBADFD, and A's verifier turns the leases lost: HELD ->
    LOST journaled, Watch told, the owner fenced, lockctl shows it; lockd keeps serving."""
    a, b = hosts("verify_interval = 0.5\n")
    assert "shared storage, " in a.daemon.stderr_text()  # classified at start-up
    assert "client.strict-locks on" in a.daemon.stderr_text()
    quiet, killed = owners.spawn(), owners.spawn()
    vq = a.register(quiet.pid, name="vm-report", fence="none")
    vk = a.register(killed.pid, name="vm-fenced", fence="kill")
    vb = b.register(owners.spawn().pid)
    r1, r2 = RESOURCE.format(1), RESOURCE.format(2)
    t1 = a.acquire(r1, vq)["token"]
    a.acquire(r2, vk, shared=True)
    conn, events, _ = watch(a.daemon, vq)
    assert probe(b.lease_file(r1)) == "exclusive"
    t0 = time.monotonic()
    bed.reset_connection("a")
    # the brick let go of A's locks: B can take r1 while A's lockd still has its fd
    wait_until(lambda: is_free(b.lease_file(r1)), 10, 0.005, "r1 free on B after the reset")
    b_in = time.monotonic() - t0
    b.acquire(r1, vb)
    detected = _wait_lost(a, r1)
    assert killed.wait(15) == -signal.SIGKILL
    assert quiet.poll() is None
    fenced = time.monotonic() - t0
    lease = a.lease(r1)
    assert (lease["token"], lease["continuity"]) == (t1, "lost")
    hist = [e for e in a.daemon.history(limit=100) if e["event"] == "lost"]
    assert {e["resource"] for e in hist} == {r1, r2}
    assert all("dropped the lock" in e["reason"] for e in hist), hist
    wait_until(lambda: any(e["event"] == "lost" for e in events), 10, what="Watch: lost")
    ev = next(e for e in events if e["event"] == "lost")
    assert (ev["resource"], ev["token"]) == (r1, t1) and "dropped" in ev["reason"]
    conn.close()
    with pytest.raises(errors.LeaseLost):
        a.acquire(r1, vq)
    a.daemon.assert_alive()
    # once A's client is back: B holds r1 untouched, and A serves new leases on the volume
    reconnected = bed.wait_reconnected("a")
    wait_until(lambda: _answers(a.lease_file(r1)), 30, 0.1, "mount A answering again")
    assert probe_setlk_elsewhere(a.lease_file(r1)) == "held"
    r3 = RESOURCE.format(3)
    wait_until(lambda: _try_acquire(a, r3, vq), 30, 0.1, "a new lease on A after reconnecting")
    assert probe(b.lease_file(r3)) == "exclusive"
    a.release(r1, vq)  # the owner acknowledges the loss
    assert b.lease(r1)["state"] == "held" and probe(a.lease_file(r1)) == "exclusive"
    # a second cut: the lockspace is still verified (its mount did not answer for seconds,
    # which must not make it pass for local storage)
    bed.reset_connection("a")
    again = _wait_lost(a, r3)
    assert "dropped the lock" in next(
        e["reason"] for e in a.daemon.history() if e["event"] == "lost" and e["resource"] == r3
    )
    bed.wait_reconnected("a")
    wait_until(lambda: _answers(a.lease_file(r1)), 30, 0.1, "mount A answering again")
    assert_no_drift(a, b)
    figures.add(
        f"ss -K of A's brick connection (strict-locks on, verify_interval 0.5 s): B could lock "
        f"after {b_in * 1000:.0f} ms; A found the loss {(b_in + detected) * 1000:.0f} ms "
        f"after the reset (owner fenced by {fenced * 1000:.0f} ms); A's client reconnected "
        f"{reconnected:.1f} s after that; a second cut found lost {again * 1000:.0f} ms after it"
    )


def _answers(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError:  # ENOTCONN until the client has reconnected
        return False
    return True


def _try_acquire(host: Host, resource: str, owner: str) -> bool:
    try:
        host.acquire(resource, owner)
    except errors.InvalidResource:  # ENOTCONN while the client reconnects
        return False
    return True


@pytest.fixture
def strict_off(bed: gh.GlusterBed) -> Iterator[gh.GlusterBed]:
    """The volume with GlusterFS's default, client.strict-locks off, both mounts remade."""
    bed.set_option("client.strict-locks", "off")
    bed.remount("a")
    bed.remount("b")
    try:
        yield bed
    finally:
        bed.set_option("client.strict-locks", "on")
        bed.remount("a")
        bed.remount("b")


def test_strict_locks_off_is_refused_or_allowed_with_warnings(
    strict_off: gh.GlusterBed,
    hosts: Callable[..., tuple[Host, Host]],
    owners: Owners,
    figures: Figures,
) -> None:
    """The default client.strict-locks off: a reconnect reopens A's fd without its lock and
    tells nobody. lockd refuses new leases there (an error at start-up and at use); with
    allow_unsafe_storage it warns instead, and its verifier still finds the silent drop:
    A frozen (SIGSTOP) across the reset and the reconnect, so that its first probe after it
    sees a healthy-looking fd whose lock nobody holds any more."""
    bed = strict_off
    a, b = hosts(
        'verify_interval = 0.5\nallow_unsafe_storage = ["shared"]\n', "verify_interval = 0.5\n"
    )
    # B refuses: an error at start-up, and a named error (and a log line) at use
    assert "can drop a lock without telling" in b.daemon.stderr_text()
    assert "client.strict-locks off" in b.daemon.stderr_text()
    vb = b.register(owners.spawn().pid)
    with pytest.raises(errors.InvalidResource) as ei:
        b.acquire(RESOURCE.format(9), vb)
    assert "strict-locks on" in str(ei.value.parameters.get("reason")), ei.value.parameters
    assert b.daemon.stderr_text().count("can drop a lock without telling") >= 2  # at use too
    # A is allowed: warnings, not refusals
    assert "allowed by allow_unsafe_storage" in a.daemon.stderr_text()
    vm = owners.spawn()
    va = a.register(vm.pid, fence="none")
    r1, r2 = RESOURCE.format(1), RESOURCE.format(2)
    a.acquire(r1, va)
    a.acquire(r2, va, shared=True)
    assert probe(b.lease_file(r1)) == "exclusive"
    os.kill(a.daemon.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        bed.reset_connection("a")
        bed.wait_reconnected("a")
        time.sleep(0.5)  # the client reopens its fds after the handshake
        reopened = time.monotonic() - t0
        # A's fd is open again and A still "holds" both, but the brick has no lock of A's
        assert probe(b.lease_file(r1)) == "free" and probe(b.lease_file(r2)) == "free"
    finally:
        os.kill(a.daemon.pid, signal.SIGCONT)
    t1 = time.monotonic()
    _wait_lost(a, r1)
    _wait_lost(a, r2)
    found = time.monotonic() - t1
    reasons = {e["resource"]: e["reason"] for e in a.daemon.history() if e["event"] == "lost"}
    assert reasons == {
        r1: "the filesystem dropped the lock: nobody holds it any more",
        r2: "the filesystem dropped the lock: nobody holds it any more",
    }
    assert vm.poll() is None  # fence none: reported only
    assert_no_drift(a, b)
    figures.add(
        f"strict-locks off: A's client reconnected and reopened its fds without their locks "
        f"{reopened:.1f} s after the reset, silently; A's verifier found both drops "
        f"{found * 1000:.0f} ms after A ran again"
    )


# --- a lockspace created over virtlockd's protocol (libvirt's file_lockspace_dir) -----------


def libvirt_lease(disk: str) -> str:
    """The lease file libvirt names for a disk in file_lockspace_dir: sha256 of its path."""
    return hashlib.sha256(disk.encode()).hexdigest()


def test_libvirt_lockspace_on_the_volume_is_verified_and_fenced(
    bed: gh.GlusterBed,
    hosts: Callable[..., tuple[Host, Host]],
    owners: Owners,
    runtime_dir: Path,
    figures: Figures,
) -> None:
    """libvirt's ``file_lockspace_dir`` on the volume: the lockspace libvirtd creates with
    CREATE_LOCKSPACE (then ACQUIRE with AUTOCREATE) on host A is classified and verified as
    a configured one. Host B, whose configured lockspace is the same directory (the same
    lease files), is kept out; lockctl verify checks it; it is back after a restart of lockd;
    a storage reset makes its lease lost: journaled, the owner fenced."""
    sock = runtime_dir / "vl.sock"
    a, b = hosts(f'verify_interval = 0.5\nvirtlockd_socket = "{sock}"\n', "verify_interval = 0.5\n")
    lockspace = str(a.leases)  # the volume directory, through mount A
    disk = "/var/lib/libvirt/images/vm-a.img"
    name = libvirt_lease(disk)
    vm = owners.spawn()
    with vl.Conn(sock) as hook:
        assert hook.create_lockspace(lockspace).ok
        assert hook.register(uuid.uuid4().bytes, "vm-a", 1, vm.pid).ok
        got = hook.acquire(name, lockspace, vl.AUTOCREATE)
        assert got.ok, got.error
    classified = f"lockspace {lockspace}: shared storage, {lockspace} on fuse.glusterfs"
    assert classified in a.daemon.stderr_text()
    assert probe(b.lease_file(disk)) == "exclusive"
    vb = b.register(owners.spawn().pid)
    with pytest.raises(errors.ResourceBusy):
        b.acquire(disk, vb)
    assert_no_drift(a)
    # lockd restarted: the lockspace comes back from the journal, classified again at start-up
    a.daemon.kill()
    a.daemon.start()
    assert a.daemon.stderr_text().count(classified) == 2
    lease = a.lease(name)
    assert (lease["lockspace"], lease["state"], lease["continuity"]) == (
        lockspace,
        "held",
        "retaken",
    )
    # the storage drops A's locks: B gets in, A's verifier finds the lease lost and fences
    t0 = time.monotonic()
    bed.reset_connection("a")
    wait_until(lambda: is_free(b.lease_file(disk)), 10, 0.005, "the lease free on B")
    b.acquire(disk, vb)
    assert vm.wait(15) == -signal.SIGKILL  # found lost, fenced (then released: it died)
    found = time.monotonic() - t0
    hist = a.daemon.history()
    lost = [e for e in hist if e["event"] == "lost" and e["resource"] == name]
    assert len(lost) == 1 and "dropped the lock" in lost[0]["reason"], hist
    assert lost[0]["lockspace"] == lockspace
    bed.wait_reconnected("a")
    wait_until(lambda: _answers(a.lease_file(disk)), 30, 0.1, "mount A answering again")
    assert_no_drift(a, b)
    figures.add(
        f"a lockspace created over virtlockd's protocol on the volume: classified at creation "
        f"and at restart; ss -K of A's connection: lease lost and owner fenced "
        f"{found * 1000:.0f} ms after the reset"
    )


def test_libvirt_lockspace_on_unsafe_storage_is_refused(
    strict_off: gh.GlusterBed,
    hosts: Callable[..., tuple[Host, Host]],
    owners: Owners,
    runtime_dir: Path,
) -> None:
    """client.strict-locks off: CREATE_LOCKSPACE in a directory of the volume is refused
    (libvirt's error reply, naming the mount and the fix), and nothing is journaled; with
    allow_unsafe_storage naming the directory it is created, with warnings. Restarted
    without that allowance, lockd keeps the lockspace and re-takes its lease, but refuses the
    lockspace when libvirtd asks for it again and every new lease in it."""
    bed = strict_off
    sub = f"libvirt-{uuid.uuid4().hex[:8]}"
    (bed.mount("a") / sub).mkdir()
    dir_a, dir_b = str(bed.mount("a") / sub), str(bed.mount("b") / sub)
    sock_a, sock_b = runtime_dir / "vla.sock", runtime_dir / "vlb.sock"
    allow = f'allow_unsafe_storage = ["{dir_b}"]\n'
    a, b = hosts(f'virtlockd_socket = "{sock_a}"\n', f'virtlockd_socket = "{sock_b}"\n{allow}')
    vm = owners.spawn()
    with vl.Conn(sock_a) as hook:
        refused = hook.create_lockspace(dir_a)
        assert refused.code == 84, refused.error  # VIR_ERR_OPERATION_UNSUPPORTED
        assert refused.message is not None
        assert refused.message.startswith(f"Operation not supported: lockspace {dir_a} is on ")
        assert "client.strict-locks on" in refused.message and "allow_unsafe_storage" in (
            refused.message
        )
        assert hook.register(uuid.uuid4().bytes, "vm-a", 1, vm.pid).ok
        missing = hook.acquire(libvirt_lease("/d1"), dir_a, vl.AUTOCREATE)
        assert missing.message == f"internal error: Lockspace for path {dir_a} does not exist"
    assert f"lockspace {dir_a}: " in a.daemon.stderr_text()
    assert "its creation is refused" in a.daemon.stderr_text()
    # allowed: created, with a warning, and its lease taken
    vm_b = uuid.uuid4().bytes
    with vl.Conn(sock_b) as hook:
        assert hook.create_lockspace(dir_b).ok
        assert hook.register(vm_b, "vm-b", 1, vm.pid).ok
        assert hook.acquire(libvirt_lease("/d1"), dir_b, vl.AUTOCREATE).ok
    assert "allowed by allow_unsafe_storage" in b.daemon.stderr_text()
    assert probe(Path(dir_a) / libvirt_lease("/d1")) == "exclusive"
    # restarted without the allowance: the lockspace and its lease stay, new ones are refused
    assert b.daemon.config_path is not None
    b.daemon.config_path.write_text(b.daemon.config_path.read_text().replace(allow, ""))
    b.daemon.kill()
    b.daemon.start()
    assert b.lease(libvirt_lease("/d1"))["continuity"] == "retaken"
    assert f"lockspace {dir_b}: " in b.daemon.stderr_text().rsplit("===== start", 1)[1]
    with vl.Conn(sock_b) as hook:
        again = hook.create_lockspace(dir_b)
        assert again.code == 84 and "strict-locks on" in str(again.message), again.error
        assert hook.register(vm_b, "vm-b", 1, vm.pid).ok
        more = hook.acquire(libvirt_lease("/d2"), dir_b, vl.AUTOCREATE)
        assert not more.ok and "strict-locks on" in str(more.message), more.error
    assert probe(Path(dir_a) / libvirt_lease("/d1")) == "exclusive"
    assert_no_drift(a, b)


def test_verifier_leaves_healthy_leases_alone(
    hosts: Callable[..., tuple[Host, Host]], owners: Owners
) -> None:
    """No false loss: several verification rounds over held leases of both modes."""
    a, b = hosts("verify_interval = 0.2\n")
    va, vb = a.register(owners.spawn().pid), b.register(owners.spawn().pid)
    a.acquire("x", va)
    a.acquire("y", va, shared=True)
    b.acquire("y", vb, shared=True)
    b.acquire("z", vb)
    time.sleep(1.5)
    assert {x["state"] for x in a.daemon.leases() + b.daemon.leases()} == {"held"}
    assert not [e for e in a.daemon.history() + b.daemon.history() if e["event"] == "lost"]
    assert_no_drift(a, b)


# --- local lockspaces: classified, never probed unless configured -------------------------


def test_local_lockspace_is_not_shared_unless_configured(
    make_daemon: Callable[..., Daemon], owners: Owners, tmp_path: Path
) -> None:
    (tmp_path / "l1").mkdir()
    (tmp_path / "l2").mkdir()
    d = make_daemon(
        config=f'verify_interval = 0.1\nshared_lockspaces = ["forced"]\n[lockspaces]\n'
        f'local = "{tmp_path / "l1"}"\nforced = "{tmp_path / "l2"}"\n'
    )
    text = d.stderr_text()
    assert "lockspace forced: shared storage" in text
    assert "lockspace local:" not in text
    o = d.register(owners.spawn().pid)["uuid"]
    d.acquire("r", owner=o, lockspace="forced")
    d.acquire("r", owner=o, lockspace="local")
    time.sleep(0.5)  # a few verification rounds of the forced one
    assert {x["state"] for x in d.leases()} == {"held"}


def test_named_lockspace_forced_shared_is_verified(
    make_daemon: Callable[..., Daemon], owners: Owners, tmp_path: Path, runtime_dir: Path
) -> None:
    """A lockspace created over virtlockd's protocol is classified at creation and its
    leases verified, here on local storage named shared by its directory: a lock dropped
    behind lockd's back (unlocked through a copy of lockd's own fd) is found, journaled as
    lost and its owner fenced. A local one not named is never verified."""
    shared, local = tmp_path / "libvirt-shared", tmp_path / "libvirt-local"
    sock = runtime_dir / "vl.sock"
    d = make_daemon(
        config=f'verify_interval = 0.1\nvirtlockd_socket = "{sock}"\n'
        f'shared_lockspaces = ["{shared}"]\n'
    )
    vm = owners.spawn()
    with vl.Conn(sock) as hook:
        assert hook.create_lockspace(str(shared)).ok and hook.create_lockspace(str(local)).ok
        assert hook.register(uuid.uuid4().bytes, "vm", 1, vm.pid).ok
        for ls in (shared, local):
            assert hook.acquire(libvirt_lease("/d"), str(ls), vl.AUTOCREATE).ok
    assert f"lockspace {shared}: shared storage" in d.stderr_text()
    assert f"lockspace {local}:" not in d.stderr_text()
    fds = {x["lockspace"]: x for x in d.call("io.lockd.Admin.ListDescriptors")["descriptors"]}
    fd = steal_fd(d.pid, fds[str(shared)]["fd"])
    try:
        setlk(fd, fcntl.F_UNLCK)
    finally:
        os.close(fd)
    assert vm.wait(15) == -signal.SIGKILL  # found lost, fenced
    lost = [e for e in d.history() if e["event"] == "lost"]
    assert [(e["lockspace"], e["reason"]) for e in lost] == [
        (str(shared), "the filesystem dropped the lock: nobody holds it any more")
    ]


def test_config_keys_are_checked(make_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    for bad, what in (
        ("verify_interval = -1\n", "verify_interval must be >= 0"),
        ('shared_lockspaces = ["nope"]\n', "shared_lockspaces: 'nope' is not a configured"),
        ('allow_unsafe_storage = "x"\n', "allow_unsafe_storage has the wrong type"),
        ("shared_lockspaces = [1]\n", "shared_lockspaces must be a list of lockspace names"),
        ('allow_unsafe_storage = ["/a/../b"]\n', "nor a directory (an absolute, normalized"),
    ):
        d = make_daemon(config=bad, start=False)
        proc = d.spawn()
        assert proc.wait(30) == 2
        assert what in d.stderr_text(), (bad, d.stderr_text())
    # a directory names a lockspace created over virtlockd's protocol (none exists yet)
    make_daemon(config='shared_lockspaces = ["/srv/leases"]\nallow_unsafe_storage = ["/srv/x"]\n')
