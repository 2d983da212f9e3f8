"""The workload: owner processes, client threads, and the model of what clients were told.

Theory of operation: each :class:`ClientThread` has its own ``lockd.client.Client`` (one
connection, retried across daemon restarts) and its own owners: real processes (``sleep``),
some with a short lifetime, so they die on their own during the run, some long-lived. An
owner is used by one thread only, so the operations on one owner are sequential and the
model of its leases is exact; owners of different threads compete through the kernel.

The :class:`Model` is the *clients'* view: for each owner, the leases acknowledged and not
released, with their tokens (``leases``), the token of the last acknowledged release of
each resource (``released``: a repeated Release must answer the same), and acquires whose
outcome stays unknown (``maybe``: an error after a daemon crash, where the first attempt may
have been journaled). An operation in flight when the daemon dies is *not* left ambiguous:
``lockd.client`` resends it after the restart and, Acquire and Release being idempotent per
(owner, resource), that answer is definite. Each answer is checked on arrival: a repeated
grant keeps its token, a new grant's token is above every token acknowledged before it was
sent and never seen before, no two live owners hold conflicting leases, NotHeld never
answers a release of a held lease, NoSuchOwner only names a dead owner.

:class:`Gate` pauses the threads between operations: ``pause`` lets each finish the call it
is in (which, across a crash, means after the restart) and ``wait_paused`` returns when all
are idle, so the checker sees a quiescent daemon.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import threading
import time
import traceback
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lockd import errors
from lockd.client import Client

LONG_LIFE = 1800.0  # seconds: "never" within a run (only a fence ends it), yet bounded


class RunLog:
    """The reproduction log (one line per event) and the list of violations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: TextIO = open(path, "w", buffering=1 << 16)  # noqa: SIM115
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.cycle = 0
        self.violations: list[str] = []

    def write(self, text: str) -> None:
        with self.lock:
            if not self.file.closed:  # an abandoned client thread may outlive the run
                self.file.write(f"{time.monotonic() - self.t0:9.4f} [{self.cycle}] {text}\n")

    def violation(self, kind: str, detail: str) -> None:
        line = f"VIOLATION {kind}: {detail}"
        with self.lock:
            self.violations.append(f"cycle {self.cycle}: {kind}: {detail}")
        self.write(line)

    def close(self) -> None:
        with self.lock:
            self.file.close()


@dataclass(eq=False)
class Owner:
    name: str
    proc: subprocess.Popen[bytes]
    pidfd: int
    lifetime: float
    uuid: str | None = None
    rc: int | None = None
    died_at: float | None = None
    leases: dict[str, tuple[str, int]] = field(default_factory=dict)  # path -> (mode, token)
    released: dict[str, int] = field(default_factory=dict)  # path -> token last released
    released_at: dict[str, float] = field(default_factory=dict)  # path -> time.time() of it
    maybe: dict[str, str] = field(default_factory=dict)  # path -> mode, outcome unknown
    releasing: set[str] = field(default_factory=set)  # releases in flight
    lost_told: set[str] = field(default_factory=set)  # LeaseLost answers
    accounted: bool = False  # the checker has judged its death

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def fenced(self) -> bool:
        return self.rc == -signal.SIGKILL

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, sig)


class Model:
    def __init__(self, log: RunLog) -> None:
        self.lock = threading.RLock()
        self.log = log
        self.owners: list[Owner] = []
        self.max_token = 0
        self.tokens: dict[int, tuple[str, str]] = {}  # token -> (owner uuid, path)
        self.stats: Counter[str] = Counter()
        self.deaths = 0  # daemon deaths so far: an op that saw it change spanned a crash

    def count(self, what: str) -> None:
        with self.lock:
            self.stats[what] += 1

    def poll(self, owner: Owner) -> bool:
        """Reap the owner if it exited; True if it is dead."""
        with self.lock:
            if owner.rc is None:
                rc = owner.proc.poll()
                if rc is not None:
                    # the pidfd stays open (closed by prune): its number must not be reused
                    # by another owner's pidfd while someone may still signal this one
                    owner.rc = rc
                    owner.died_at = time.monotonic()
                    self.stats["owner deaths"] += 1
                    self.stats["owners fenced" if owner.fenced else "owners exited"] += 1
                    self.log.write(f"owner {owner.name} pid {owner.pid} died rc {rc}")
            return owner.rc is not None

    def wait_dead(self, owner: Owner, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.poll(owner):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def live(self) -> list[Owner]:
        with self.lock:
            return [o for o in self.owners if o.rc is None and o.uuid is not None]

    def prune(self) -> None:
        """Forget owners whose death the checker has judged (the clients are paused)."""
        with self.lock:
            keep = []
            for o in self.owners:
                if o.rc is not None and o.accounted:
                    os.close(o.pidfd)
                else:
                    keep.append(o)
            self.owners = keep


class Gate:
    """Pause/resume the client threads between operations."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running = False
        self.stopping = False
        self.idle = 0

    def checkpoint(self) -> bool:
        """Called between operations: blocks while paused; False when stopping."""
        with self.cond:
            if self.running and not self.stopping:
                return True
            self.idle += 1
            self.cond.notify_all()
            while not self.running and not self.stopping:
                self.cond.wait()
            self.idle -= 1
            return not self.stopping

    def resume(self) -> None:
        with self.cond:
            self.running = True
            self.cond.notify_all()

    def pause(self) -> None:
        with self.cond:
            self.running = False

    def wait_paused(self, threads: Sequence[threading.Thread], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.idle < sum(t.is_alive() for t in threads):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.05))
        return True

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()


@dataclass
class Context:
    socket: Path
    files: list[str]
    model: Model
    log: RunLog
    gate: Gate
    seed: int
    owners_per_client: int = 2
    p_short_life: float = 0.4
    short_life: float = 6.0  # a short-lived owner exits on its own within this many seconds
    call_timeout: float = 60.0
    # the multi-host mode (torture/multihost.py): resources are names in this indirect
    # lockspace on shared storage, not files
    lockspace: str | None = None
    # check at every grant that no other live owner of this model holds the resource (off in
    # the multi-host mode: after a storage reconnect a lock is gone before lockd finds out,
    # so the kernel may grant it again in that window; the checker judges it after settling)
    grant_conflicts: bool = True
    # InvalidResource answers are expected (the shared storage was unreachable: ENOTCONN)
    storage_errors: bool = False


class ClientThread(threading.Thread):
    def __init__(self, idx: int, ctx: Context) -> None:
        super().__init__(name=f"client-{idx}", daemon=True)
        self.idx = idx
        self.ctx = ctx
        self.m = ctx.model
        self.rng = random.Random(f"{ctx.seed}-client-{idx}")
        self.client = Client(ctx.socket, timeout=ctx.call_timeout)
        self.owners: list[Owner] = []
        self.spawned = 0

    def run(self) -> None:
        try:
            while self.ctx.gate.checkpoint():
                self.step()
        except BaseException:
            self.ctx.log.violation("harness", f"{self.name} crashed:\n{traceback.format_exc()}")
        finally:
            self.client.close()

    def say(self, text: str) -> None:
        self.ctx.log.write(f"c{self.idx} {text}")

    # -- owners --------------------------------------------------------------------------
    def spawn_owner(self) -> Owner | None:
        if self.ctx.gate.stopping:
            return None
        self.spawned += 1
        name = f"c{self.idx}o{self.spawned}"
        short = self.rng.random() < self.ctx.p_short_life
        life = self.rng.uniform(0.05, self.ctx.short_life) if short else LONG_LIFE
        proc = subprocess.Popen(["sleep", f"{life:.3f}"], stdin=subprocess.DEVNULL)
        owner = Owner(name, proc, os.pidfd_open(proc.pid), life)
        with self.m.lock:
            self.m.owners.append(owner)
            self.m.stats["owners spawned"] += 1
        try:
            reply = self.client.register(proc.pid, name=name)
        except errors.NoSuchOwner:
            self.no_such_owner(owner, "Register", spanned=False)
            return None
        except errors.LockdError as exc:
            self._unexpected(owner, f"register pid {proc.pid}", exc)
            owner.signal(signal.SIGTERM)
            self.m.wait_dead(owner, 5.0)
            return None
        with self.m.lock:
            owner.uuid = str(reply["uuid"])
        self.say(f"register {name} pid {proc.pid} -> {owner.uuid} fence {reply.get('fence')}")
        return owner

    def pick_owner(self) -> Owner | None:
        self.owners = [o for o in self.owners if not self.m.poll(o)]
        if len(self.owners) < self.ctx.owners_per_client:
            new = self.spawn_owner()
            if new is not None:
                self.owners.append(new)
            return None
        return self.rng.choice(self.owners)

    def no_such_owner(self, owner: Owner, what: str, spanned: bool) -> None:
        self.m.count("answers NoSuchOwner")
        if not self.m.wait_dead(owner, 2.0):
            self.ctx.log.violation(
                "owner-forgotten",
                f"{what} for {owner.name} pid {owner.pid} ({owner.uuid}) answered NoSuchOwner, "
                "but the process is alive and was never fenced",
            )
            owner.signal(signal.SIGTERM)  # retire it so the run can go on
            self.m.wait_dead(owner, 5.0)
        if owner in self.owners:
            self.owners.remove(owner)

    # -- operations ----------------------------------------------------------------------
    def step(self) -> None:
        owner = self.pick_owner()
        if owner is None:
            return
        rng, files = self.rng, self.ctx.files
        held = owner.leases
        r = rng.random()
        if r < 0.04:
            self.release_all(owner)
        elif held and r < 0.45:
            self.release(owner, rng.choice(sorted(held)))
        elif r < 0.50:
            self.release(owner, rng.choice(files))  # NotHeld, or an idempotent repeat
        else:
            path = rng.choice(files)
            if path in held:  # an idempotent repeat
                self.acquire(owner, path, held[path][0])
            else:
                self.acquire(owner, path, "shared" if rng.random() < 0.4 else "exclusive")

    def _call(self, owner: Owner, what: str, fn: Any) -> tuple[Any, BaseException | None, bool]:
        """Run one client call; (reply, error, spanned a daemon crash)."""
        before = self.m.deaths
        self.m.count("operations")
        try:
            reply, err = fn(), None
        except errors.LockdError as exc:
            reply, err = None, exc
        spanned = self.m.deaths != before
        if isinstance(err, errors.NoSuchOwner):
            self.no_such_owner(owner, what, spanned)
        elif isinstance(err, errors.DaemonUnreachable):
            self.ctx.log.violation("unreachable", f"{what} for {owner.name}: {err}")
        return reply, err, spanned

    def _unexpected(self, owner: Owner, what: str, err: BaseException) -> None:
        self.ctx.log.violation(
            "unexpected-error", f"{what} for {owner.name}: {type(err).__name__}: {err}"
        )

    def acquire(self, owner: Owner, path: str, mode: str) -> None:
        m, uuid = self.m, owner.uuid
        assert uuid is not None
        with m.lock:
            floor = m.max_token
        prev = owner.leases.get(path)
        what = f"acquire {path} {mode}"
        reply, err, spanned = self._call(
            owner,
            what,
            lambda: self.client.acquire(
                path, owner=uuid, shared=mode == "shared", lockspace=self.ctx.lockspace
            ),
        )
        tag = (" (repeat)" if prev else "") + (" (spanned a crash)" if spanned else "")
        if err is not None:
            self.say(f"{owner.name} {what} -> {type(err).__name__}{tag}")
            if isinstance(err, errors.ResourceBusy):
                m.count("answers busy")
                if prev is not None and prev[0] == mode:
                    self.ctx.log.violation(
                        "repeat-busy", f"{owner.name} {what}: held (token {prev[1]}), got busy"
                    )
            elif isinstance(err, errors.LeaseLost):
                m.count("answers LeaseLost")
                owner.lost_told.add(path)
                if prev is None:
                    if spanned:  # the first attempt was granted, then lost in the gap
                        owner.maybe[path] = mode
                    else:
                        self.ctx.log.violation(
                            "lost-not-granted", f"{owner.name} {what}: LeaseLost, never granted"
                        )
            elif isinstance(err, errors.NoSuchOwner | errors.DaemonUnreachable):
                if spanned or isinstance(err, errors.DaemonUnreachable):
                    owner.maybe[path] = mode
            elif isinstance(err, errors.InvalidResource) and self.ctx.storage_errors:
                m.count("answers storage unreachable")
            else:
                self._unexpected(owner, what, err)
            return
        token = int(reply["token"])
        self.say(f"{owner.name} {what} -> token {token}{tag}")
        where = "resource" if self.ctx.lockspace else "path"  # indirect: path is the lease file
        if reply.get("state") != "held" or reply.get("mode") != mode or reply.get(where) != path:
            self.ctx.log.violation("bad-grant", f"{owner.name} {what}: answer {reply}")
        with m.lock:
            if prev is not None:
                m.stats["grants repeated"] += 1
                if prev != (mode, token):
                    self.ctx.log.violation(
                        "idempotency",
                        f"{owner.name} {what}: held as {prev}, repeat answered {mode} {token}",
                    )
            else:
                m.stats["grants"] += 1
                seen = m.tokens.get(token)
                if seen is not None and seen != (uuid, path):
                    self.ctx.log.violation(
                        "token-reused", f"{owner.name} {what}: token {token} was {seen}"
                    )
                elif seen is None and token <= floor and path not in owner.maybe:
                    self.ctx.log.violation(
                        "token-went-back",
                        f"{owner.name} {what}: new token {token} <= {floor}, the highest "
                        "token acknowledged before the request was sent",
                    )
            m.tokens[token] = (uuid, path)
            m.max_token = max(m.max_token, token)
            owner.leases[path] = (mode, token)
            owner.maybe.pop(path, None)
            owner.lost_told.discard(path)
        if prev is None and self.ctx.grant_conflicts:
            self.check_conflicts(owner, path, mode, token)

    def check_conflicts(self, owner: Owner, path: str, mode: str, token: int) -> None:
        """No other live owner may hold a conflicting lease the model believes held."""
        with self.m.lock:
            others = [
                (o, o.leases[path])
                for o in self.m.owners
                if o is not owner
                and path in o.leases
                and (mode == "exclusive" or o.leases[path][0] == "exclusive")
                and path not in o.releasing
                and path not in o.lost_told
            ]
        # a fenced owner (its lease lost, the file then taken by us) may not be reaped yet
        others = [(o, lease) for o, lease in others if not self.m.wait_dead(o, 0.5)]
        for o, (omode, otoken) in others:
            self.ctx.log.violation(
                "conflicting-grant",
                f"{owner.name} got {path} {mode} token {token} while {o.name} (pid {o.pid}, "
                f"alive) holds it {omode} token {otoken}, never released",
            )

    def release(self, owner: Owner, path: str) -> None:
        prev = owner.leases.get(path)
        what = f"release {path}"
        owner.releasing.add(path)
        try:
            self._release(owner, path, prev, what)
        finally:
            # only after the model forgot the lease: until then another thread's
            # check_conflicts must not count it as held
            owner.releasing.discard(path)

    def _release(self, owner: Owner, path: str, prev: tuple[str, int] | None, what: str) -> None:
        m, uuid = self.m, owner.uuid
        assert uuid is not None
        reply, err, spanned = self._call(
            owner, what, lambda: self.client.release(path, owner=uuid, lockspace=self.ctx.lockspace)
        )
        tag = " (spanned a crash)" if spanned else ""
        if err is not None:
            self.say(f"{owner.name} {what} -> {type(err).__name__}{tag}")
            if isinstance(err, errors.NotHeld):
                m.count("answers NotHeld")
                if prev is not None or path in owner.released:
                    self.ctx.log.violation(
                        "release-not-held",
                        f"{owner.name} {what}: answered NotHeld, but the lease "
                        + (f"is held (token {prev[1]})" if prev else "was released before"),
                    )
            elif isinstance(err, errors.NoSuchOwner | errors.DaemonUnreachable):
                pass
            else:
                self._unexpected(owner, what, err)
            return
        self.say(f"{owner.name} {what} -> {reply.get('state')} token {reply.get('token')}{tag}")
        self._released(owner, path, reply, what)

    def _released(self, owner: Owner, path: str, reply: dict[str, Any], what: str) -> None:
        token = reply.get("token")
        prev = owner.leases.get(path)
        expected = prev[1] if prev else owner.released.get(path)
        if reply.get("state") not in ("released", "lost"):
            self.ctx.log.violation("bad-release", f"{owner.name} {what}: answer {reply}")
        if expected is not None and token != expected:
            self.ctx.log.violation(
                "idempotency", f"{owner.name} {what}: token {token}, expected {expected}"
            )
        elif expected is None and path not in owner.maybe:
            self.ctx.log.violation("released-never-granted", f"{owner.name} {what}: answer {reply}")
        with self.m.lock:
            self.m.stats["releases"] += 1
            owner.leases.pop(path, None)
            owner.maybe.pop(path, None)
            owner.lost_told.discard(path)
            if isinstance(token, int):
                owner.released[path] = token
                owner.released_at[path] = time.time()

    def release_all(self, owner: Owner) -> None:
        before = dict(owner.leases)
        owner.releasing.update(before)
        try:
            self._release_all(owner, before)
        finally:
            # only after the model forgot the leases (see release)
            owner.releasing.clear()

    def _release_all(self, owner: Owner, before: dict[str, tuple[str, int]]) -> None:
        uuid = owner.uuid
        assert uuid is not None
        reply, err, spanned = self._call(
            owner, "release-all", lambda: self.client.release_all(owner=uuid)
        )
        tag = " (spanned a crash)" if spanned else ""
        if err is not None:
            self.say(f"{owner.name} release-all -> {type(err).__name__}{tag}")
            if not isinstance(err, errors.NoSuchOwner | errors.DaemonUnreachable):
                self._unexpected(owner, "release-all", err)
            return
        got = {str(r.get("resource")): r for r in reply}
        self.say(f"{owner.name} release-all -> {sorted(got)}{tag}")
        self.m.count("release-alls")
        if not spanned and not set(before) <= set(got):
            self.ctx.log.violation(
                "release-all-incomplete",
                f"{owner.name}: held {sorted(before)}, ReleaseAll answered {sorted(got)}",
            )
        for path, r in got.items():
            self._released(owner, path, r, f"release-all ({path})")
        with self.m.lock:
            for path, (_mode, token) in before.items():
                if owner.leases.pop(path, None) is not None:
                    owner.released[path] = token
                    owner.released_at[path] = time.time()
            owner.maybe.clear()


def kill_owners(model: Model) -> None:
    with model.lock:
        owners = list(model.owners)
    for o in owners:
        if o.rc is None:
            o.signal(signal.SIGKILL)
            o.proc.wait(10)
            model.poll(o)
