"""Crash at every failpoint, restart, and check the kernel's locks against the model (item 2).

Theory of operation: a seeded random workload (three live owners, eight files, shared and
exclusive leases, idempotent repeats, releases, ReleaseAll) runs against a daemon armed with
``LOCKD_FAILPOINT=point@N``. A :class:`Model` records only what the daemon *acknowledged*;
every reply is checked against it as it comes (busy iff another owner's lease conflicts, a new
grant's token above every earlier one, a repeat's token equal). When the daemon dies at the
failpoint (it must be SIGABRT) the call in flight is ambiguous: after the restart the same
call is sent again and, the methods being idempotent, its answer must be the one the model
predicts whether or not the first attempt took effect. Then, from outside the daemon:

- while the daemon is down no file is locked (its locks died with it; we are no fd store);
- after the restart each file is held iff the model says so, in the model's mode (probe);
- ``lockctl locks -J`` lists exactly the model's leases with their tokens, and agrees with
  the kernel file by file (before and after resolving the ambiguous call);
- no token goes back: a fresh grant's token is above every token acknowledged before.

Owner-death points are reached by SIGKILLing an owner that holds leases; recovery points by a
SIGKILL, then a start that must abort before READY=1, then a clean start.
"""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from e2e import Conn, ConnectionLost, Daemon, Owners, failpoints, held_by_journal, probe

from lockd import errors

POINTS = failpoints()
SEEDS = (1, 2)


def kind_of(point: str) -> str:
    if point.startswith(("acquire.", "release.")):
        return "op"
    if point.startswith("owner-death."):
        return "owner-death"
    if point.startswith("recovery."):
        return "recovery"
    raise AssertionError(f"no workload reaches failpoint {point!r}: teach test_failpoints")


@dataclass
class Model:
    files: list[Path]
    # (owner uuid, path) -> (mode, token): acknowledged and not released
    leases: dict[tuple[str, str], tuple[str, int]] = field(default_factory=dict)
    # (owner uuid, path) -> token of the lease it last released there: a repeated Release
    # answers the same (idempotency), until the owner acquires it again
    released: dict[tuple[str, str], int] = field(default_factory=dict)
    max_token: int = 0
    granted: int = 0

    def busy(self, owner: str, path: str, mode: str) -> bool:
        return any(
            p == path and o != owner and (m == "exclusive" or mode == "exclusive")
            for (o, p), (m, _t) in self.leases.items()
        )

    def state(self, path: str) -> str:
        modes = {m for (_o, p), (m, _t) in self.leases.items() if p == path}
        if "exclusive" in modes:
            return "exclusive"
        return "shared" if modes else "free"

    def of(self, owner: str) -> dict[str, tuple[str, int]]:
        return {p: v for (o, p), v in self.leases.items() if o == owner}

    def drop_owner(self, owner: str) -> None:
        for key in [k for k in self.leases if k[0] == owner]:
            del self.leases[key]
        for key in [k for k in self.released if k[0] == owner]:
            del self.released[key]


@dataclass
class Op:
    kind: str  # acquire | release | release-all
    owner: str
    path: str = ""
    mode: str = "exclusive"

    def call(self) -> tuple[str, dict[str, Any]]:
        if self.kind == "acquire":
            return "io.lockd.Acquire", {
                "resource": self.path,
                "owner": self.owner,
                "mode": self.mode,
            }
        if self.kind == "release":
            return "io.lockd.Release", {"resource": self.path, "owner": self.owner}
        return "io.lockd.ReleaseAll", {"owner": self.owner}


class Workload:
    def __init__(self, daemon: Daemon, model: Model, owner_ids: list[str], seed: int) -> None:
        self.d = daemon
        self.m = model
        self.owner_ids = owner_ids
        self.rng = random.Random(seed)
        self.conn: Conn | None = None
        self.log: list[str] = []

    def connection(self) -> Conn:
        if self.conn is None:
            self.conn = self.d.connect()
        return self.conn

    def drop_connection(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def next_op(self) -> Op:
        rng, m = self.rng, self.m
        owner = rng.choice(self.owner_ids)
        held = m.of(owner)
        r = rng.random()
        if r < 0.03:
            return Op("release-all", owner)
        if held and r < 0.45:
            return Op("release", owner, rng.choice(sorted(held)))
        if r < 0.50:  # release of something not held: NotHeld, and a no-op
            free = [str(f) for f in m.files if str(f) not in held]
            if free:
                return Op("release", owner, rng.choice(free))
        path = str(rng.choice(m.files))
        if path in held:  # an idempotent repeat, same mode
            return Op("acquire", owner, path, held[path][0])
        return Op("acquire", owner, path, "shared" if rng.random() < 0.4 else "exclusive")

    def run(self, op: Op, retry: bool = False) -> None:
        """Send ``op`` and check the answer against the model (ConnectionLost propagates)."""
        method, params = op.call()
        self.log.append(f"{'RETRY ' if retry else ''}{method} {params}")
        m = self.m
        key = (op.owner, op.path)
        try:
            reply = self.connection().call(method, params)
        except ConnectionLost:
            self.drop_connection()
            raise
        except errors.ResourceBusy:
            assert op.kind == "acquire" and m.busy(op.owner, op.path, op.mode), (
                f"unexpected ResourceBusy for {op}; model {m.leases}"
            )
            return
        except errors.NotHeld:
            assert op.kind == "release" and key not in m.leases and key not in m.released, (
                f"unexpected NotHeld for {op}; model {m.leases}, released {m.released}"
            )
            return
        if op.kind == "acquire":
            assert not m.busy(op.owner, op.path, op.mode), f"granted {op} despite {m.leases}"
            lease = reply["lease"]
            assert lease["state"] == "held" and lease["mode"] == op.mode, lease
            token = lease["token"]
            if key in m.leases:
                assert token == m.leases[key][1], f"repeat of {op} changed the token"
            elif retry:
                # the first attempt may have been granted (and committed) before the crash:
                # its token was then above every acknowledged one all the same
                assert token > m.max_token, (token, m.max_token)
            else:
                assert token > m.max_token, f"token {token} not above {m.max_token}"
            m.leases[key] = (op.mode, token)
            m.released.pop(key, None)
            m.max_token = max(m.max_token, token)
            m.granted += 1
        elif op.kind == "release":
            lease = reply["lease"]
            if key in m.leases:
                assert lease["token"] == m.leases[key][1], reply
                m.released[key] = m.leases.pop(key)[1]
            else:
                # a repeat: the same answer as the release it repeats
                assert key in m.released, f"released {op}, which the model never held"
                assert lease["token"] == m.released[key], (reply, m.released[key])
            assert lease["state"] == "released", lease
        else:
            mine = m.of(op.owner)
            got = {lease["resource"]: lease["token"] for lease in reply["leases"]}
            for path, token in got.items():
                assert path in mine and mine[path][1] == token, (got, mine)
            if not retry:
                assert set(got) == set(mine), (got, mine)
            for path, token in mine.items():
                del m.leases[(op.owner, path)]
                m.released[(op.owner, path)] = token[1]


def possible_states(m: Model, op: Op | None) -> dict[str, set[str]]:
    """For the files an ambiguous call touches: the states the kernel may show, whether the
    call took effect or not (ReleaseAll lease by lease)."""
    if op is None:
        return {}
    if op.kind == "release-all":
        keys = [(op.owner, p) for p in m.of(op.owner)]
    else:
        keys = [(op.owner, op.path)]
    out: dict[str, set[str]] = {}
    for key in keys:
        other = Model(m.files, dict(m.leases), dict(m.released))
        if op.kind == "acquire":
            if not m.busy(op.owner, op.path, op.mode):
                other.leases[key] = (op.mode, 0)
        else:
            other.leases.pop(key, None)
        out[key[1]] = {m.state(key[1]), other.state(key[1])}
    return out


def check_state(
    d: Daemon,
    m: Model,
    ambiguous: dict[str, set[str]] | None = None,
    lockctl: bool = False,
) -> None:
    """Kernel vs model, and the daemon's list (``lockctl locks -J`` if ``lockctl``, else
    ListLeases, which is what lockctl shows) vs kernel and model. Files in ``ambiguous`` may
    be in any of the states given, but the list must still agree with the kernel on them."""
    ambiguous = ambiguous or {}
    kernel = {str(f): probe(f) for f in m.files}
    for path, state in kernel.items():
        allowed = ambiguous.get(path, {m.state(path)})
        assert state in allowed, f"{path}: kernel {state}, model {allowed}"
    listed = d.lockctl_json("locks")["leases"] if lockctl else d.leases()
    assert not [x for x in listed if x["state"] == "lost"], listed
    by_journal = held_by_journal(listed)
    for path, state in kernel.items():
        assert by_journal.get(path, "free") == state, (
            f"{path}: lockctl says {by_journal.get(path, 'free')}, kernel {state}"
        )
    held = {
        (x["owner"]["uuid"], x["resource"]): (x["mode"], x["token"])
        for x in listed
        if x["state"] == "held" and x["resource"] not in ambiguous
    }
    expected = {k: v for k, v in m.leases.items() if k[1] not in ambiguous}
    assert held == expected, f"lockctl {held}\nmodel {expected}"


def assert_all_free(m: Model, why: str) -> None:
    states = {str(f): probe(f) for f in m.files}
    assert set(states.values()) == {"free"}, f"{why}: {states}"


def fresh_token_check(d: Daemon, m: Model, owner: str) -> None:
    free = [f for f in m.files if m.state(str(f)) == "free"]
    assert free, "workload left no file free"
    lease = d.acquire(free[0], owner=owner)
    assert lease["token"] > m.max_token, f"token went back: {lease['token']} <= {m.max_token}"
    m.leases[(owner, str(free[0]))] = ("exclusive", lease["token"])
    m.max_token = lease["token"]
    assert d.status()["next_token"] > m.max_token


def ensure_holds(w: Workload, owner: str, n: int) -> None:
    """Give ``owner`` at least ``n`` leases (exclusive, on files free in the model)."""
    for f in w.m.files:
        if len(w.m.of(owner)) >= n:
            return
        if w.m.state(str(f)) == "free":
            w.run(Op("acquire", owner, str(f), "exclusive"))
    assert len(w.m.of(owner)) >= n


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("point", POINTS)
def test_crash_at_failpoint(
    make_daemon, owners: Owners, files: list[Path], point: str, seed: int
) -> None:
    kind = kind_of(point)
    rng = random.Random(f"{point}/{seed}")
    nth = rng.randint(3, 8) if point.startswith("acquire.") else rng.randint(2, 5)
    d = make_daemon(start=False)
    d.start(
        failpoint=f"{point}@{nth}"
        if kind == "op"
        else f"{point}@1"
        if kind == "owner-death"
        else None
    )
    procs = [owners.spawn() for _ in range(3)]
    ids = [d.register(p.pid, name=f"vm{i}")["uuid"] for i, p in enumerate(procs)]
    model = Model(files)
    w = Workload(d, model, ids, seed)
    inflight: Op | None = None
    victim: str | None = None

    if kind == "op":
        for _ in range(400):
            op = w.next_op()
            try:
                w.run(op)
            except ConnectionLost:
                inflight = op
                break
        assert inflight is not None, f"{point}@{nth} never fired in 400 operations\n" + "\n".join(
            w.log[-20:]
        )
    else:
        for _ in range(40):
            w.run(w.next_op())
        ensure_holds(w, ids[0], 2)
        ensure_holds(w, ids[1], 1)
        w.drop_connection()
        if kind == "owner-death":
            victim = ids[0]
            Owners.kill(procs[0])  # the daemon aborts while releasing its leases
            model.drop_owner(victim)
            w.owner_ids = ids[1:]
        else:
            assert d.kill(signal.SIGKILL) == -signal.SIGKILL
            assert_all_free(model, "daemon killed")
            d.expect_abort_at_start(point)

    if kind != "recovery":
        rc = d.wait_exit()
        assert rc == -signal.SIGABRT, f"expected SIGABRT at {point}, got {rc}\n{d.stderr_tail()}"
    w.drop_connection()
    assert_all_free(model, f"daemon dead after {point}")

    d.start()
    # the call in flight may or may not have happened: the kernel and the journal must agree
    # on it either way, and everything else must be exactly the model
    check_state(d, model, possible_states(model, inflight))
    if inflight is not None:
        w.run(inflight, retry=True)
    check_state(d, model, lockctl=True)
    if victim is not None:
        events = [e for e in d.history(limit=1000) if e["event"] == "owner-dead"]
        assert any(e.get("owner") == victim for e in events), events
    # tokens never go back
    fresh_token_check(d, model, ids[1])
    # and the daemon carries on normally
    for _ in range(20):
        w.run(w.next_op())
    check_state(d, model)
    for owner in ids:
        if owner != victim:
            w.run(Op("release-all", owner))
    w.drop_connection()
    assert_all_free(model, "after ReleaseAll of every owner")
    assert [x for x in d.leases() if x["state"] == "held"] == []
