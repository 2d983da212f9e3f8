"""The crash protocol's ordering rules, observed at the failpoint itself (DESIGN §4.1, §4.2, §5).

test_failpoints checks what a restart makes of a crash; this checks the order of the steps
that lead to it. The daemon is traced (e2e.AbortCatcher): when it aborts at a failpoint it is
held in signal-delivery-stop with every fd still open, and the test reads both sides of the
rule at that very instant: the kernel (probe) and the committed journal (SQLite, read-only).

- acquire: lock -> commit -> reply. At ``after-lock`` the kernel lock is held and no journal
  row exists; at ``after-commit`` both.
- release: commit -> close -> reply. At ``before-commit`` the lock is held and the row is
  there; at ``after-commit`` the row is gone and the lock *still held* (never drop a lock
  before its release is journaled); at ``after-close`` both gone.
- owner death is a release: the same two steps.
- recovery: nothing is locked before replay, exactly one lease at ``mid-replay``, all of
  them at ``before-ready``, and READY=1 has not been sent.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from e2e import (
    AbortCatcher,
    Conn,
    Daemon,
    Owners,
    failpoints,
    journal_leases,
    message,
    probe,
)

POINTS = failpoints()


def send_without_waiting(daemon: Daemon, method: str, params: dict) -> Conn:
    c = Conn(daemon.socket)
    c.send_raw(message(method, params))
    return c


@pytest.mark.parametrize("point", POINTS)
def test_state_at_failpoint(make_daemon, owners: Owners, files: list[Path], point: str) -> None:
    d: Daemon = make_daemon(start=False)
    f0, f1, f2 = (str(f) for f in files[:3])
    stage, _, step = point.partition(".")
    arm = {"acquire": f"{point}@3", "release": f"{point}@1", "owner-death": f"{point}@1"}
    d.start(failpoint=arm.get(stage))
    a, b = owners.spawn(), owners.spawn()
    ua = d.register(a.pid, name="a")["uuid"]
    ub = d.register(b.pid, name="b")["uuid"]
    d.acquire(f0, owner=ua)
    d.acquire(f1, owner=ua, shared=True)
    conn = None

    if stage == "recovery":
        d.acquire(f2, owner=ub)
        d.kill()
        proc = d.spawn(point)
        os.kill(proc.pid, signal.SIGSTOP)  # hold it before recovery while we attach
        catcher = AbortCatcher(proc.pid)
        os.kill(proc.pid, signal.SIGCONT)
    else:
        catcher = AbortCatcher(d.pid)
        if stage == "acquire":
            conn = send_without_waiting(d, "io.lockd.Acquire", {"resource": f2, "owner": ub})
        elif stage == "release":
            conn = send_without_waiting(d, "io.lockd.Release", {"resource": f0, "owner": ua})
        else:
            a.kill()
            a.wait()
    try:
        assert catcher.wait_abort(), f"{point} never aborted\n{d.stderr_tail()}"
        kernel = {f: probe(f) for f in (f0, f1, f2)}
        journal = journal_leases(d.state_dir)
        rows = {r for (_o, r) in journal}
        where = f"at {point}: kernel {kernel}, journal rows {sorted(rows)}"

        if stage == "acquire":
            assert kernel[f0] == "exclusive" and kernel[f1] == "shared", where
            assert (ua, f0) in journal and (ua, f1) in journal, where
            if step == "before-lock":
                assert kernel[f2] == "free" and f2 not in rows, where
            elif step == "after-lock":
                assert kernel[f2] == "exclusive", where
                assert f2 not in rows, f"committed before the reply step was reached; {where}"
            else:
                assert kernel[f2] == "exclusive" and journal.get((ub, f2), ("",))[0] == "exclusive"
        elif stage in ("release", "owner-death"):
            assert kernel[f1] == "shared", where
            if stage == "owner-death":
                gone = {f0, f1}
            else:
                gone = {f0}
                assert (ua, f1) in journal, where
            if step == "before-commit":
                assert kernel[f0] == "exclusive", f"lock dropped before the commit; {where}"
                assert gone <= rows, where
            elif step == "after-commit":
                assert not (gone & rows), f"release not committed at {point}; {where}"
                assert kernel[f0] == "exclusive", (
                    f"lock dropped before {point} was reached (fd closed early); {where}"
                )
            else:
                assert not (gone & rows) and kernel[f0] == "free", where
        else:
            assert rows == {f0, f1, f2}, f"recovery changed the journal early; {where}"
            held = [f for f, s in kernel.items() if s != "free"]
            if step == "before-replay":
                assert held == [], where
            elif step == "mid-replay":
                assert len(held) == 1, where
            else:
                assert kernel == {f0: "exclusive", f1: "shared", f2: "exclusive"}, where
                d.drain_notify()
                assert not any(
                    pid == d.pid and "READY=1" in text.split("\n") for pid, text in d.notify_log
                ), "READY=1 sent before recovery was complete"
    finally:
        catcher.let_die()
        catcher.close()
        if conn is not None:
            conn.close()
    assert d.wait_exit() == -signal.SIGABRT
    assert {probe(f) for f in (f0, f1, f2)} == {"free"}

    # after a clean start the journal and the kernel agree on every file
    d.start()
    time.sleep(0.05)
    journal = journal_leases(d.state_dir)
    for f in (f0, f1, f2):
        modes = {m for (_o, r), (m, _t, s) in journal.items() if r == f and s == "held"}
        expect = "exclusive" if "exclusive" in modes else "shared" if modes else "free"
        assert probe(f) == expect, (f, journal)
