"""``python -m torture``: the crash/restart loop, the killer, and the report.

Theory of operation: one *cycle* is run -> crash -> restart -> check (-> rearm).

- **run**: the client threads and the competitor go; the killer waits.
- **crash**: a seeded plan decides how. Every ``--failpoint-share`` of the cycles crashes at
  the next failpoint of ``lockd.failpoint.POINTS`` in turn; the others kill the daemon at a
  random moment of the run with SIGKILL or SIGABRT. An acquire/release point fires during
  the run (it was armed by the rearm before, ``LOCKD_FAILPOINT=point@N``, N random); an
  owner-death point also needs owners to die, so the killer ends N of them (SIGTERM: a death
  the daemon must notice by itself); a recovery point is armed on the restart instead. An
  armed point not reached within ``--fallback`` seconds is counted and replaced by a
  SIGKILL. Any other death of the daemon (an exception, an unarmed abort) is a violation.
- **restart**: for a recovery point, a start armed with it, which must abort before
  READY=1; then an unarmed start. The client calls in flight are retried by
  ``lockd.client`` and get their definite answers. From the death to READY=1 is a *gap*,
  in which the competitor may take what the daemon held.
- **check**: the clients pause (each after its call is answered), the competitor freezes,
  and :class:`~torture.checker.Checker` compares the three views.
- **rearm**, if the next cycle needs a failpoint armed at start: a clean stop (SIGTERM, which
  must exit 0), an armed start, and a check of that recovery too (a clean stop leaves a gap
  as well). Arming only here, with every call answered, keeps retries from firing the point
  early. An owner-death point may still fire at once (a fenced or exited owner is released
  at start-up): an aborted start counts as the point fired, and an unarmed start follows
  (that cycle then ends with a random kill); a death during the check drops the check, and
  its gaps carry over to the next one.

The run is seeded (``--seed``): the plans, the workload's choices and the competitor's are
reproducible; thread and process timing is not, so a failing seed reproduces the same
*sequence* of crash points and operations, usually the same violation. Exit status: 0 no
violation, 1 violations (the work directory is kept: journal, daemon log, torture.log),
2 the harness itself could not run.
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import lockd.client
from lockd.failpoint import POINTS
from torture.checker import Checker, Gap
from torture.competitor import CompetitorProc
from torture.daemonctl import REPO, Lockd, Spawner, StartFailed, VarlinkError
from torture.workload import ClientThread, Context, Gate, Model, RunLog, kill_owners


@dataclass(frozen=True)
class Plan:
    kind: str  # random | op | owner-death | recovery
    point: str | None = None
    nth: int = 1
    sig: int = signal.SIGKILL
    delay: float = 0.0
    freeze: bool = False  # SIGSTOP/SIGCONT the daemon a few times during the run

    @property
    def armed_at_start(self) -> str | None:
        """The failpoint spec of the start that precedes this cycle's run."""
        if self.kind in ("op", "owner-death"):
            return f"{self.point}@{self.nth}"
        return None

    def describe(self) -> str:
        froze = " (with freezes)" if self.freeze else ""
        if self.kind == "random":
            sig = signal.Signals(self.sig).name
            return f"random {sig} after {self.delay * 1000:.0f} ms{froze}"
        return f"failpoint {self.point}@{self.nth}{froze}"


def kind_of(point: str) -> str:
    if point.startswith(("acquire.", "release.")):
        return "op"
    if point.startswith("owner-death."):
        return "owner-death"
    if point.startswith("recovery."):
        return "recovery"
    raise ValueError(f"the torture harness does not know how to reach failpoint {point!r}")


def make_plans(args: argparse.Namespace) -> list[Plan]:
    rng = random.Random(f"{args.seed}-plans")
    plans, k = [], 0
    for _ in range(args.cycles + 1):
        delay = rng.uniform(0, args.max_delay)
        sig = signal.SIGKILL if rng.random() < 0.7 else signal.SIGABRT
        freeze = rng.random() < args.freeze_share
        if rng.random() < args.failpoint_share:
            point = POINTS[k % len(POINTS)]
            k += 1
            kind = kind_of(point)
            nth = rng.randint(1, {"op": 4, "owner-death": 2}.get(kind, 1))
            plans.append(Plan(kind, point, nth, signal.SIGKILL, delay, freeze))
        else:
            plans.append(Plan("random", None, 1, sig, delay, freeze))
    return plans


class Torture:
    def __init__(self, args: argparse.Namespace, base: Path, runtime: Path) -> None:
        self.args = args
        self.base = base
        self.log = RunLog(base / "torture.log")
        self.model = Model(self.log)
        self.stats: Counter[str] = Counter()
        self.fired: Counter[str] = Counter()
        self.missed: Counter[str] = Counter()
        self.rng = random.Random(f"{args.seed}-killer")
        fdir = base / "files"
        fdir.mkdir()
        self.files = []
        for i in range(args.files):
            f = fdir / f"disk{i}.img"
            f.write_bytes(b"\0" * 512)
            self.files.append(str(f))
        self.spawner = Spawner(args.spawn)
        self.lockd = Lockd(base, runtime, self.spawner)
        self.competitor = CompetitorProc(self.files, args.seed, args.competitor_max_held)
        self.gate = Gate()
        ctx = Context(
            socket=self.lockd.socket,
            files=self.files,
            model=self.model,
            log=self.log,
            gate=self.gate,
            seed=args.seed,
            owners_per_client=args.owners_per_client,
            p_short_life=args.p_short_life,
            short_life=args.short_life,
        )
        self.threads = [ClientThread(i, ctx) for i in range(args.clients)]
        self.checker = Checker(self.lockd, self.model, self.log, self.files, args.settle_timeout)
        self.recovery_ms: list[float] = []
        self.gaps: list[Gap] = []  # since the last complete check
        self.armed: str | None = None  # the failpoint spec the running daemon started with
        self.timing: dict[str, float] = {}  # seconds spent per phase

    def violation(self, kind: str, detail: str) -> None:
        self.log.violation(kind, detail)

    # -- daemon life -------------------------------------------------------------------------
    def start(self, failpoint: str | None) -> float | None:
        """Start; READY time, or None if it died first (the violation is logged)."""
        self.armed = failpoint
        try:
            return self.lockd.start(failpoint)
        except StartFailed as exc:
            self.violation("start-failed", f"failpoint {failpoint or '-'}: {exc}")
            self.log.write(self.lockd.tail())
            return None

    def end_owners(self, n: int) -> None:
        """SIGTERM the n live owners with the most leases: deaths the daemon must notice."""
        live = self.model.live()
        with self.model.lock:
            live.sort(key=lambda o: -len(o.leases))
        for o in live[:n]:
            self.log.write(f"killer: SIGTERM owner {o.name} pid {o.pid}")
            self.stats["owners ended by the killer"] += 1
            o.signal(signal.SIGTERM)

    def freeze(self, end_owner: bool) -> None:
        """SIGSTOP the daemon for a few ms, maybe ending an owner meanwhile: requests queue
        up with the death, and one turn of its event loop then sees them all together (the
        interleaving that found the ReleaseAll race)."""
        proc = self.lockd.proc
        assert proc is not None
        proc.signal(signal.SIGSTOP)
        try:
            time.sleep(0.001)  # kill(2) returns before the target has stopped
            if end_owner:
                self.end_owners(1)
            time.sleep(self.rng.uniform(0.002, 0.02))
        finally:
            proc.signal(signal.SIGCONT)
        self.stats["freezes"] += 1

    def wait_run(self, plan: Plan) -> bool:
        """Let the run go on for the plan's delay (freezing now and then if it says so);
        True if the daemon died meanwhile."""
        deadline = time.monotonic() + plan.delay
        while plan.freeze:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.lockd.died(self.rng.uniform(0, left)):
                return True
            self.freeze(end_owner=self.rng.random() < 0.5)
        return self.lockd.died(plan.delay)

    def crash(self, plan: Plan) -> float:
        """Run until the plan's crash; returns the monotonic time the death was seen."""
        lockd = self.lockd
        if plan.kind == "owner-death":
            time.sleep(self.rng.uniform(0, 0.03))
            if plan.freeze and lockd.proc is not None:
                proc = lockd.proc
                proc.signal(signal.SIGSTOP)
                try:
                    self.end_owners(plan.nth)
                    time.sleep(self.rng.uniform(0.002, 0.02))
                finally:
                    proc.signal(signal.SIGCONT)
                self.stats["freezes"] += 1
            else:
                self.end_owners(plan.nth)
        if plan.kind in ("op", "owner-death") and self.armed == plan.armed_at_start:
            if lockd.died(self.args.fallback):
                rc = lockd.reap()
                if rc == -signal.SIGABRT:
                    self.fired[str(plan.point)] += 1
                else:
                    self.violation("daemon-died", f"armed {plan.point}: exited {rc}")
            else:
                self.missed[str(plan.point)] += 1
                rc = lockd.kill(signal.SIGKILL)
                self.stats["crashes SIGKILL"] += 1
        elif self.wait_run(plan):
            rc = lockd.reap()
            self.violation("daemon-died", f"unarmed daemon exited {rc} on its own")
            self.log.write(lockd.tail())
        else:
            rc = lockd.kill(plan.sig)
            self.stats[f"crashes {signal.Signals(plan.sig).name}"] += 1
            if rc != -plan.sig:
                self.violation("daemon-died", f"killed with {plan.sig}, exited {rc}")
        self.stats["crashes"] += 1
        t = time.monotonic()
        self.log.write(f"killer: daemon dead (rc {rc}) after {plan.describe()}")
        return t

    def restart(self, plan: Plan) -> float | None:
        if plan.kind == "recovery":
            try:
                self.lockd.start(f"{plan.point}")
                self.missed[str(plan.point)] += 1  # not reached (nothing to re-take)
                self.log.write(f"killer: {plan.point} not reached; the start became ready")
                self.lockd.kill(signal.SIGKILL)
                self.stats["crashes"] += 1
                self.stats["crashes SIGKILL"] += 1
            except StartFailed as exc:
                if exc.rc != -signal.SIGABRT:
                    self.violation("start-failed", f"armed {plan.point}: {exc}")
                    return None
                self.fired[str(plan.point)] += 1
                self.stats["crashes"] += 1
                self.log.write(f"killer: start aborted at {plan.point}")
        t0 = time.monotonic()
        t = self.start(None)
        if t is not None:
            self.recovery_ms.append((t - t0) * 1000)
            self.stats["recoveries"] += 1
        return t

    def rearm(self, plan: Plan | None) -> bool:
        """Arm the next cycle's failpoint: a clean stop (SIGTERM must exit 0) and an armed
        start, checked like any recovery. Arming happens only here, with every client call
        answered, so that no retry of a call from before the crash can fire it."""
        armed = plan.armed_at_start if plan else None
        if armed is None:
            return True
        self.competitor.resume()  # the clean stop's gap is a gap too
        t_stop = time.monotonic()
        rc = self.lockd.kill(signal.SIGTERM)
        self.stats["clean stops"] += 1
        if rc != 0:
            self.violation("clean-stop", f"SIGTERM: exited {rc}")
        try:
            self.armed = armed
            t: float | None = self.lockd.start(armed)
        except StartFailed as exc:
            if exc.rc != -signal.SIGABRT or plan is None or plan.kind != "owner-death":
                self.violation("start-failed", f"failpoint {armed}: {exc}")
                return False
            # an owner died while lockd was down, and releasing it at start-up got there
            self.fired[str(plan.point)] += 1
            self.stats["crashes"] += 1
            self.log.write(f"killer: start aborted at {plan.point} (an owner died meanwhile)")
            t = self.start(None)
        if t is None:
            return False
        self.stats["recoveries"] += 1
        self.gaps.append((t_stop, t))
        self.check(lockctl=False)
        return True

    def check(self, lockctl: bool) -> None:
        try:
            self.checker.check(self.gaps, self.competitor.pause(), lockctl)
        except (OSError, VarlinkError):
            # an armed owner-death point fires at any owner death, a fence's included
            if not self.lockd.died(1.0):
                raise
            self.log.write("check: the armed daemon died during the check; its gaps carry over")
            return
        self.gaps = []

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        plans = make_plans(args)
        t_start = time.monotonic()
        if self.start(plans[0].armed_at_start) is None:
            return 2
        self.check(lockctl=True)
        for t in self.threads:
            t.start()
        cycle = 0
        for cycle in range(1, args.cycles + 1):
            if args.duration and time.monotonic() - t_start > args.duration:
                cycle -= 1
                break
            self.log.cycle = cycle
            plan = plans[cycle - 1]
            self.log.write(f"cycle {cycle}: {plan.describe()}")
            self.competitor.resume()
            self.gate.resume()
            t0 = time.monotonic()
            self.gaps.append((self.crash(plan), 0.0))
            with self.model.lock:
                self.model.deaths += 1
            self.gate.pause()
            t1 = time.monotonic()
            t_ready = self.restart(plan)
            if t_ready is None:
                break
            self.gaps[-1] = (self.gaps[-1][0], t_ready)
            t2 = time.monotonic()
            if not self.gate.wait_paused(self.threads, 120):
                self.violation("stuck", "client calls unanswered 120 s after the restart")
                break
            t3 = time.monotonic()
            lockctl = args.lockctl_every > 0 and cycle % args.lockctl_every == 0
            self.check(lockctl)
            t4 = time.monotonic()
            if self.log.violations:
                if not args.keep_going:
                    break
                self.keep_journal()
            if not self.rearm(plans[cycle]):
                break
            t5 = time.monotonic()
            for name, a, b in (("run", t0, t1), ("restart", t1, t2), ("drain", t2, t3),
                               ("check", t3, t4), ("rearm", t4, t5)):  # fmt: skip
                self.timing[name] = self.timing.get(name, 0.0) + b - a
            if args.progress and cycle % args.progress == 0:
                self.progress(cycle, t_start)
        self.stats["cycles"] = cycle
        return self.finish(t_start)

    def finish(self, t_start: float) -> int:
        """A clean stop (SIGTERM must exit 0), one more recovery and its check."""
        self.gate.pause()
        if self.lockd.proc is not None and not self.log.violations:
            self.gate.wait_paused(self.threads, 120)
            if self.armed and self.lockd.died():
                # the last cycle's armed failpoint fired (an owner died): a crash, not a stop
                rc = self.lockd.reap()
                self.stats["crashes"] += 1
                if rc != -signal.SIGABRT:
                    self.violation("armed-death", f"armed daemon exited {rc}, not SIGABRT")
            else:
                rc = self.lockd.kill(signal.SIGTERM)
                self.stats["clean stops"] += 1
                if rc != 0:
                    self.violation("clean-stop", f"SIGTERM: exited {rc}")
            t = time.monotonic()
            ready = self.start(None)
            if ready is not None:
                self.stats["recoveries"] += 1
                self.gaps.append((t, ready))
                self.check(lockctl=True)
                if not self.log.violations:
                    self.checker.verify()
        self.stats["wall ms"] = int((time.monotonic() - t_start) * 1000)
        return 1 if self.log.violations else 0

    def keep_journal(self) -> None:
        """With --keep-going: the journal as it was at the first violation."""
        dest = self.base / "journal-at-first-violation"
        if not dest.exists():
            dest.mkdir()
            for f in self.lockd.state_dir.glob("journal.sqlite*"):
                shutil.copy2(f, dest / f.name)

    def teardown(self) -> None:
        """Always: no daemon, owner, competitor or zygote may outlive the harness."""
        self.gate.stop()
        for t in self.threads:  # blocked in a retry only if the daemon is gone: abandon
            t.join(0 if self.lockd.proc is None else 10)
        self.lockd.close()
        self.competitor.close()
        kill_owners(self.model)
        self.spawner.close()
        self.log.write(f"end: {dict(self.stats)}")
        self.log.close()

    def progress(self, cycle: int, t_start: float) -> None:
        print(
            f"torture: cycle {cycle}, {self.model.stats['operations']} operations, "
            f"{self.stats['crashes']} crashes, {len(self.log.violations)} violations, "
            f"{time.monotonic() - t_start:.0f} s",
            flush=True,
        )

    def report(self) -> str:
        s, m, c = self.stats, self.model.stats, self.checker.stats
        rec = sorted(self.recovery_ms) or [0.0]
        points = ", ".join(f"{p} {self.fired[p]}/{self.fired[p] + self.missed[p]}" for p in POINTS)
        lines = [
            f"cycles      {s['cycles']}",
            f"operations  {m['operations']} (grants {m['grants']}, repeats "
            f"{m['grants repeated']}, releases {m['releases']}, release-alls "
            f"{m['release-alls']}, busy {m['answers busy']}, NotHeld {m['answers NotHeld']}, "
            f"NoSuchOwner {m['answers NoSuchOwner']}, LeaseLost {m['answers LeaseLost']})",
            f"crashes     {s['crashes']} (SIGKILL {s['crashes SIGKILL']}, SIGABRT "
            f"{s['crashes SIGABRT']}, failpoints {sum(self.fired.values())})",
            f"failpoints  fired/armed: {points}",
            f"recoveries  {s['recoveries']} (READY after {rec[len(rec) // 2]:.0f} ms median, "
            f"{rec[-1]:.0f} ms max; leases re-taken {c['recovery retaken']} (of which "
            f"{c['retaken after a competitor hold']} after the competitor held the file in "
            f"the gap), lost {c['events lost']}, released for dead owners "
            f"{c['recovery released']})",
            f"owners      {m['owners spawned']} spawned, {m['owners exited']} died on their own "
            f"({s['owners ended by the killer']} ended by the killer), {m['owners fenced']} "
            f"fenced; competitor grabs {self.competitor.grabs}",
            f"freezes     {s['freezes']} (SIGSTOP a few ms during a run)",
            f"checks      {self.checker.checks} (lockctl {c['lockctl checks']}, "
            f"lockctl verify {c['verify runs']}, "
            f"leases held at checks {c['leases held at checks']}, max settle "
            f"{c['max settle ms']} ms)",
            "phases      "
            + ", ".join(f"{k} {v / max(1, s['cycles']) * 1000:.0f}" for k, v in self.timing.items())
            + " ms per cycle",
            f"violations  {len(self.log.violations)}",
            f"wall time   {s['wall ms'] / 1000:.1f} s",
        ]
        return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m torture",
        description="Crash-torture lockd: crash it at random and at every failpoint, restart "
        "it, and check after every recovery that clients, daemon and kernel agree.",
        epilog="Exit status: 0 no violation; 1 violations (the work directory is kept); "
        "2 the harness could not run. See torture/__init__.py.",
    )
    p.add_argument("--cycles", type=int, default=1000, help="crash/restart cycles (1000)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--seed", type=int, help="random seed (default: from the clock; printed)")
    p.add_argument("--clients", type=int, default=4, help="client threads (4)")
    p.add_argument("--owners-per-client", type=int, default=2, help="owners per client (2)")
    p.add_argument("--files", type=int, default=12, help="resource files in the pool (12)")
    p.add_argument(
        "--p-short-life", type=float, default=0.4, help="share of owners that exit soon (0.4)"
    )
    p.add_argument("--short-life", type=float, default=6.0, help="... within this many seconds (6)")
    p.add_argument(
        "--failpoint-share", type=float, default=0.5, help="share of failpoint cycles (0.5)"
    )
    p.add_argument(
        "--max-delay", type=float, default=0.15, help="random kill within this run time (0.15 s)"
    )
    p.add_argument(
        "--freeze-share",
        type=float,
        default=0.3,
        help="share of cycles whose run SIGSTOPs the daemon a few ms, now and then (0.3)",
    )
    p.add_argument(
        "--fallback", type=float, default=1.0, help="SIGKILL if a failpoint waits longer (1 s)"
    )
    p.add_argument("--competitor-max-held", type=int, default=2, help="files it holds at most (2)")
    p.add_argument(
        "--client-backoff",
        type=float,
        default=0.02,
        help="cap of lockd.client's reconnect backoff (0.02 s; the library's is 0.2 s)",
    )
    p.add_argument("--settle-timeout", type=float, default=2.0, help="owner death/fence (2 s)")
    p.add_argument("--lockctl-every", type=int, default=25, help="lockctl -J every N checks")
    p.add_argument("--spawn", choices=["fork", "exec"], default="fork", help="(fork: zygote)")
    p.add_argument("--workdir", type=Path, help="default: results/torture/<time>-seed<S>")
    p.add_argument("--keep", action="store_true", help="keep the work directory on success")
    p.add_argument("--keep-going", action="store_true", help="do not stop at a violation")
    p.add_argument("--progress", type=int, default=100, help="a progress line every N cycles")
    p.add_argument(
        "--hosts",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: two lockds on one GlusterFS volume, crashes and storage resets of either "
        "(torture/multihost.py; root, the glusterfs packages, port 24007)",
    )
    p.add_argument(
        "--reset-share", type=float, default=0.3, help="--hosts 2: share of storage resets (0.3)"
    )
    p.add_argument("--verify-interval", type=float, default=0.2, help="--hosts 2: lockd's (0.2 s)")
    args = p.parse_args(argv)
    if args.seed is None:
        args.seed = int(time.time() * 1000) % 1_000_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # aborts on purpose: no core files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # tear down as on Ctrl-C
    # The clients reconnect through lockd.client's own retry loop; only its pace changes: a
    # 200 ms backoff cap would add ~100 ms of idle waiting to every one of a thousand cycles.
    lockd.client.BACKOFF_MAX = args.client_backoff
    if args.hosts == 2:
        from torture import multihost

        return multihost.main(args)
    base = workdir(args, "")
    runtime = Path(tempfile.mkdtemp(prefix="ltt", dir="/tmp"))  # sun_path: 108 bytes
    print(f"torture: seed {args.seed}, {args.cycles} cycles, work directory {base}", flush=True)
    torture = Torture(args, base, runtime)
    try:
        rc = drive(torture, base)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    return conclude(torture, rc, base, args, "journal, daemon log", "")


class Runner(Protocol):
    """A torture run (:class:`Torture`, or torture.multihost's): what :func:`drive` and
    :func:`conclude` use of it."""

    log: RunLog

    def run(self) -> int: ...

    def teardown(self) -> None: ...

    def report(self) -> str: ...


def workdir(args: argparse.Namespace, suffix: str) -> Path:
    """The run's own new directory (journals, logs, torture.log)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base: Path = args.workdir or REPO / "results" / "torture" / f"{stamp}-seed{args.seed}{suffix}"
    base.mkdir(parents=True, exist_ok=False)
    return base


def drive(torture: Runner, base: Path) -> int:
    """Run it; whatever happens, tear it down (a harness error is logged, then raised)."""
    try:
        return torture.run()
    except BaseException:
        torture.log.write(f"harness error:\n{traceback.format_exc()}")
        print(f"torture: harness error; see {base / 'torture.log'}", file=sys.stderr)
        raise
    finally:
        torture.teardown()


def conclude(
    torture: Runner, rc: int, base: Path, args: argparse.Namespace, kept: str, flags: str
) -> int:
    """Print the report, and the first violations with how to reproduce them; the work
    directory stays only when something was found (or with --keep)."""
    print(torture.report())
    if rc:
        print(f"\n{len(torture.log.violations)} violation(s); first ones:")
        for v in torture.log.violations[:10]:
            print(f"  {v}")
        print(f"\n{kept} and torture.log kept in {base}")
        print(
            f"reproduce: make torture TORTURE_ARGS='{flags}--seed {args.seed} "
            f"--cycles {args.cycles}'"
        )
    elif not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
