"""``python -m torture --hosts 2``: the crash torture on shared storage, two hosts.

Theory of operation: a real GlusterFS volume (``tests/gluster_harness.py``: a private
glusterd, one brick, ``client.strict-locks on``) mounted twice through FUSE; each mount is a
*host* with its own lockd (own state directory, sockets, log) whose indirect lockspace
``shared`` is the same volume directory ``pool`` reached through its own mount. Each host has
its own client threads and owners (:mod:`torture.workload`, resources are names in
``shared``), and the two hosts compete for the same names through the brick's locks: the
other host plays the competitor of the one-host torture.

One *cycle*: run -> disrupt -> recover -> settle -> check. A seeded plan picks the
disruption and the host: SIGKILL or SIGABRT of its lockd (restarted at once, from the
journal: no fd store, so the lock is free in the gap and the other host may take it), or a
reset of its mount's TCP connection to the brick (``ss -K``: the brick drops every lock of
that client at once, the other host may take them, the client reconnects ~3 s later and its
lease fds answer EBADFD; lockd's verifier must turn every such lease lost and fence its
owner). The checker then waits until both daemons settled (dead owners forgotten, lost
leases' owners fenced, and a few verification intervals after the disruption), and judges
both hosts from outside:

- ``conflicting-holders``: two leases listed *held* (by either daemon) conflict on one
  resource: the one thing shared storage must never allow;
- ``probe-mismatch``: ``F_OFD_GETLK`` on the lease file, through mount A and through mount B,
  does not show exactly the union of the leases both daemons list held (a lock dropped
  silently shows here: listed held, seen free);
- ``held-not-granted`` / ``silently-missing`` / ``lease-mismatch``: a daemon's list against
  what its own clients were told (as in the one-host checker);
- ``lost-without-disruption``: a lease reported lost although its host was neither crashed
  nor cut off from the storage since the previous check; ``lost-not-fenced``,
  ``fenced-without-loss``, ``owner-death-not-released``: as in the one-host checker;
- ``token-went-back``: per daemon (each host has its own token sequence);
- ``verify-drift`` / ``verify``: at the end, ``lockctl verify`` on each host found drift
  between its daemon's leases and what the storage holds (lockd/ctl/verify.py checks leases on
  the volume by GlusterFS's own answers: the kernel keeps no record of them);
- plus every violation the client threads name as they go (idempotency, token reuse, ...).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torture import kernel
from torture.daemonctl import (
    REPO,
    Lockd,
    Spawner,
    StartFailed,
    VarlinkError,
    lockctl_verify,
    varlink_call,
)
from torture.run import conclude, drive, workdir
from torture.workload import ClientThread, Context, Gate, Model, Owner, RunLog, kill_owners

sys.path.insert(0, str(REPO / "tests"))
import gluster_harness as gh  # noqa: E402

LOCKSPACE = "shared"
HISTORY_LIMIT = 20_000


@dataclass
class Host:
    name: str
    mount: Path
    lockd: Lockd
    model: Model
    gate: Gate = field(default_factory=Gate)
    threads: list[ClientThread] = field(default_factory=list)
    # (what, wall-clock start, wall-clock end) of every crash or storage cut since the start
    disruptions: list[tuple[str, float, float]] = field(default_factory=list)
    history_seq: int = 0
    lost_owners: set[str] = field(default_factory=set)
    recovery_ms: list[float] = field(default_factory=list)

    def lease_file(self, pool: str, name: str) -> str:
        import hashlib

        return str(self.mount / pool / hashlib.sha256(name.encode()).hexdigest())

    def admin(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return varlink_call(self.lockd.admin_socket, f"io.lockd.Admin.{method}", params, 60.0)

    def blocked_in(self) -> str:
        """What the daemon's main thread waits in (the kernel's view), for the log."""
        pid = self.lockd.pid
        out = []
        for name in ("syscall", "wchan", "stack"):
            try:
                text = Path(f"/proc/{pid}/{name}").read_text().strip()
            except OSError as exc:
                text = f"({exc.strerror})"
            out.append(f"{name}: {' | '.join(text.splitlines()[:8])}")
        return "; ".join(out)


class MultiHost:
    def __init__(
        self, args: argparse.Namespace, base: Path, runtime: Path, bed: gh.GlusterBed
    ) -> None:
        self.args = args
        self.base = base
        self.log = RunLog(base / "torture.log")
        self.rng = random.Random(f"{args.seed}-killer")
        self.stats: Counter[str] = Counter()
        self.bed = bed
        self.pool = "pool"
        (self.bed.mount("a") / self.pool).mkdir()
        self.names = [f"vm{i}-disk" for i in range(args.files)]
        self.spawner = Spawner(args.spawn)
        self.hosts: list[Host] = []
        for i, name in enumerate(("a", "b")):
            (base / name).mkdir()
            (runtime / name).mkdir()
            mount = self.bed.mount(name)
            config = (
                f"verify_interval = {args.verify_interval}\n"
                f'[lockspaces]\n{LOCKSPACE} = "{mount / self.pool}"\n'
            )
            host = Host(name, mount, Lockd(base / name, runtime / name, self.spawner, config),
                        Model(self.log))  # fmt: skip
            ctx = Context(
                socket=host.lockd.socket,
                files=self.names,
                model=host.model,
                log=self.log,
                gate=host.gate,
                seed=args.seed * 10 + i,
                owners_per_client=args.owners_per_client,
                p_short_life=args.p_short_life,
                short_life=args.short_life,
                lockspace=LOCKSPACE,
                # a daemon blocked in a storage call for a while (see responsive()) is slow,
                # not unreachable
                call_timeout=300.0,
                grant_conflicts=False,
                storage_errors=True,
            )
            host.threads = [ClientThread(i * 100 + k, ctx) for k in range(args.clients)]
            self.hosts.append(host)
        self.last_check_wall = time.time()
        self.checks = 0
        self.wall_start = time.monotonic()

    def violation(self, kind: str, detail: str) -> None:
        self.log.violation(kind, detail)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> int:
        args = self.args
        for h in self.hosts:
            h.lockd.start(timeout=300.0)
        self.check()
        for h in self.hosts:
            for t in h.threads:
                t.start()
        cycle = 0
        for cycle in range(1, args.cycles + 1):
            if args.duration and time.monotonic() - self.wall_start > args.duration:
                cycle -= 1
                break
            self.log.cycle = cycle
            host = self.rng.choice(self.hosts)
            r = self.rng.random()
            kind = "reset" if r < args.reset_share else "abort" if r < 0.6 else "kill"
            delay = self.rng.uniform(0, args.max_delay)
            # half of the storage resets cut a host whose clients are paused: its leases then
            # stay held (as far as it knows) until the check, which must find them lost
            quiet = kind == "reset" and self.rng.random() < 0.5
            self.log.write(
                f"cycle {cycle}: {kind} of host {host.name} after {delay * 1000:.0f} ms"
                + (" (its clients paused)" if quiet else "")
            )
            for h in self.hosts:
                h.gate.resume()
            time.sleep(delay)
            for h in self.hosts:
                if h.lockd.died():
                    self.violation("daemon-died", f"host {h.name}: lockd died on its own")
                    self.log.write(h.lockd.tail())
                    return 1
            if quiet and not self.pause(host):
                break
            if not self.disrupt(host, kind):
                break
            if not all(self.pause(h) for h in self.hosts):
                break
            self.check()
            if self.log.violations and not args.keep_going:
                break
            if args.progress and cycle % args.progress == 0:
                self.progress(cycle)
        self.stats["cycles"] = cycle
        for h in self.hosts:
            h.gate.pause()
        if not self.log.violations:  # everything at rest after the last check
            for h in self.hosts:
                self.verify(h)
        self.stats["wall ms"] = int((time.monotonic() - self.wall_start) * 1000)
        return 1 if self.log.violations else 0

    def pause(self, host: Host) -> bool:
        host.gate.pause()
        if host.gate.wait_paused(host.threads, 120):
            return True
        self.violation("stuck", f"host {host.name}: client calls unanswered after 120 s")
        return False

    def disrupt(self, host: Host, kind: str) -> bool:
        t0 = time.time()
        if kind == "reset":
            ports = self.bed.reset_connection(host.name)
            self.stats[f"resets of {host.name}"] += 1
            self.log.write(f"killer: reset host {host.name}'s brick connection {ports}")
            self.bed.wait_reconnected(host.name, 60)
            deadline = time.monotonic() + 30
            while not gh.answers(host.mount / self.pool):
                if time.monotonic() > deadline:
                    self.violation("harness", f"mount {host.name} did not come back")
                    return False
                time.sleep(0.05)
        else:
            sig = signal.SIGABRT if kind == "abort" else signal.SIGKILL
            rc = host.lockd.kill(sig)
            with host.model.lock:  # a call in flight now spans a crash (its answer may differ)
                host.model.deaths += 1
            self.stats[f"crashes {signal.Signals(sig).name} of {host.name}"] += 1
            self.stats["crashes"] += 1
            if rc != -sig:
                self.violation("daemon-died", f"host {host.name}: killed with {sig}, rc {rc}")
            t1 = time.monotonic()
            try:
                ready = host.lockd.start(timeout=300.0)  # recovery may wait on the storage
            except StartFailed as exc:
                self.violation("start-failed", f"host {host.name}: {exc}")
                self.log.write(host.lockd.tail())
                return False
            host.recovery_ms.append((ready - t1) * 1000)
        host.disruptions.append((kind, t0, time.time()))
        return True

    # -- the check ---------------------------------------------------------------------------
    def settle(self) -> None:
        """Both daemons quiet: a few verification rounds after the last disruption, dead
        owners forgotten, lost leases' owners fenced."""
        last = max((d[2] for h in self.hosts for d in h.disruptions), default=0.0)
        wait = last + 3 * self.args.verify_interval + 0.1 - time.time()
        if wait > 0:
            time.sleep(wait)
        for h in self.hosts:
            deadline = time.monotonic() + self.args.settle_timeout
            while True:
                with h.model.lock:
                    owners = list(h.model.owners)
                for o in owners:
                    h.model.poll(o)
                listed = {str(o["uuid"]) for o in h.admin("ListOwners")["owners"]}
                by_uuid = {o.uuid: o for o in owners if o.uuid}
                dead = [o for o in by_uuid.values() if o.rc is not None and o.uuid in listed]
                lost_alive = [
                    x
                    for x in h.admin("ListLeases")["leases"]
                    if x["state"] == "lost"
                    and (o := by_uuid.get(x["owner"]["uuid"])) is not None
                    and o.rc is None
                ]
                if not dead and not lost_alive:
                    break
                if time.monotonic() > deadline:
                    for o in dead:
                        self.violation(
                            "owner-death-not-released",
                            f"host {h.name}: {o.name} pid {o.pid} died and is still registered",
                        )
                    for x in lost_alive:
                        self.violation(
                            "lost-not-fenced", f"host {h.name}: {x['resource']} lost, owner alive"
                        )
                    break
                time.sleep(0.01)

    def snapshot(self) -> tuple[list[list[dict[str, Any]]], dict[str, dict[str, str]]]:
        for _ in range(10):
            self.settle()
            before = [h.admin("ListLeases")["leases"] for h in self.hosts]
            probes = {
                h.name: {n: _probe(h.lease_file(self.pool, n)) for n in self.names}
                for h in self.hosts
            }
            after = [h.admin("ListLeases")["leases"] for h in self.hosts]
            died = False
            for h in self.hosts:
                with h.model.lock:
                    died |= any(o.rc is None and h.model.poll(o) for o in h.model.owners)
            if before == after and not died:
                return after, probes
            self.stats["snapshot retries"] += 1
        self.violation("unstable", "the lease tables kept changing while the harness was idle")
        return after, probes

    def responsive(self) -> None:
        """Each daemon answers a call within 2 s, or the stall is measured and logged, with the
        system call its event loop is blocked in: a shared-storage operation that the
        filesystem holds (a GlusterFS request after a reset can wait out its ping timeout)
        blocks a single-threaded daemon. That is a limit on availability, reported as a
        figure; the safety checks follow once the daemon answers."""
        for h in self.hosts:
            t0 = time.monotonic()
            try:
                varlink_call(h.lockd.admin_socket, "org.varlink.service.GetInfo", None, 2.0)
                continue
            except TimeoutError:
                self.log.write(f"stall: host {h.name} blocked in {h.blocked_in()}")
            varlink_call(h.lockd.admin_socket, "org.varlink.service.GetInfo", None, 300.0)
            stalled = time.monotonic() - t0
            self.stats["daemon stalls over 2 s"] += 1
            self.stats["longest stall ms"] = max(
                self.stats["longest stall ms"], int(stalled * 1000)
            )
            self.log.write(f"stall: host {h.name} answered after {stalled:.1f} s")

    def check(self) -> None:
        self.checks += 1
        started = time.time()
        try:
            self.responsive()
            leases, probes = self.snapshot()
        except (OSError, VarlinkError) as exc:
            self.violation("check-failed", f"{type(exc).__name__}: {exc}")
            return
        held: dict[str, list[tuple[str, str, int]]] = {n: [] for n in self.names}
        for h, listed in zip(self.hosts, leases, strict=True):
            for x in listed:
                if x["state"] == "held":
                    held.setdefault(x["resource"], []).append((h.name, x["mode"], x["token"]))
            with h.model.lock:
                by_uuid = {o.uuid: o for o in h.model.owners if o.uuid}
                self._daemon_vs_clients(h, listed, by_uuid)
                self._history(h, by_uuid)
                status = h.admin("Status")["status"]
                top = max([h.model.max_token] + [int(x["token"]) for x in listed])
                if int(status["next_token"]) <= top:
                    self.violation(
                        "token-went-back", f"host {h.name}: next_token {status['next_token']}"
                    )
                for o in by_uuid.values():
                    if o.rc is not None:
                        o.accounted = True
            h.model.prune()
            self.stats["leases held at checks"] += sum(1 for x in listed if x["state"] == "held")
            self.stats["leases lost at checks"] += sum(1 for x in listed if x["state"] == "lost")
        for name, holders in held.items():
            ex = sum(1 for _, mode, _ in holders if mode == "exclusive")
            if ex and len(holders) > 1:
                self.violation("conflicting-holders", f"{name}: listed held by {holders}")
            expected = "exclusive" if ex else "shared" if holders else "free"
            for h in self.hosts:
                seen = probes[h.name][name]
                if seen != expected:
                    self.violation(
                        "probe-mismatch",
                        f"{name}: daemons list {holders}; F_OFD_GETLK through mount "
                        f"{h.name} says {seen}",
                    )
        self.last_check_wall = started

    def _daemon_vs_clients(
        self, h: Host, leases: list[dict[str, Any]], by_uuid: dict[str | None, Owner]
    ) -> None:
        listed = {(x["owner"]["uuid"], x["resource"]): x for x in leases}
        for (uuid, name), x in listed.items():
            o = by_uuid.get(uuid)
            s = f"host {h.name}: {name} {x['mode']} token {x['token']} {x['state']}"
            if o is None or o.rc is not None:
                self.violation("held-not-granted", f"{s}: owner unknown or dead")
                continue
            if x["state"] != "held":
                continue
            mine = o.leases.get(name)
            if mine is None:
                if name in o.maybe:
                    o.leases[name] = (str(x["mode"]), int(x["token"]))
                    del o.maybe[name]
                    continue
                self.violation("held-not-granted", f"{s} of {o.name}: not granted, or released")
            elif mine != (x["mode"], x["token"]):
                self.violation("lease-mismatch", f"{s} of {o.name}: clients were told {mine}")
        for o in by_uuid.values():
            if o.rc is not None:
                continue
            for name, (mode, token) in o.leases.items():
                if (o.uuid, name) not in listed:
                    self.violation(
                        "silently-missing",
                        f"host {h.name}: {o.name} holds {name} {mode} token {token}; not listed",
                    )
            for name in [n for n in o.maybe if (o.uuid, n) not in listed]:
                del o.maybe[name]

    def _history(self, h: Host, by_uuid: dict[str | None, Owner]) -> None:
        limit = 256
        while True:
            events = h.admin("History", {"limit": limit})["events"]
            if len(events) < limit or int(events[0]["seq"]) <= h.history_seq + 1:
                break
            if limit >= HISTORY_LIMIT:
                break
            limit *= 4
        new = [e for e in events if int(e["seq"]) > h.history_seq]
        if events:
            h.history_seq = max(h.history_seq, max(int(e["seq"]) for e in events))
        for e in new:
            if e["event"] == "retaken":
                self.stats["leases re-taken"] += 1
            if e["event"] != "lost":
                continue
            self.stats["leases lost"] += 1
            reason = str(e.get("reason") or "")
            self.stats["lost: taken in a gap" if "taken" in reason else "lost: dropped"] += 1
            uuid = str(e["owner"])
            h.lost_owners.add(uuid)
            desc = f"host {h.name}: lost {e['resource']} token {e['token']} ({reason})"
            self.log.write(f"check: {desc}")
            if not any(
                t0 <= float(e["at"]) and t1 >= self.last_check_wall - 1.0
                for _, t0, t1 in h.disruptions
            ):
                self.violation("lost-without-disruption", f"{desc}: {h.disruptions[-3:]}")
            o = by_uuid.get(uuid)
            if o is not None and not h.model.wait_dead(o, self.args.settle_timeout):
                self.violation("lost-not-fenced", f"{desc}: owner pid {o.pid} alive")
        for o in by_uuid.values():
            if o.fenced and not o.accounted and o.uuid not in h.lost_owners:
                self.violation("fenced-without-loss", f"host {h.name}: {o.name} was SIGKILLed")

    def verify(self, h: Host) -> None:
        """``lockctl verify`` of one host's lockd: its leases against the storage's locks."""
        self.stats["verify runs"] += 1
        report, findings = lockctl_verify(h.lockd.admin_socket, timeout=300)
        for kind, finding in findings:
            self.violation(kind, f"host {h.name}: {finding}")
        if report is not None:
            self.stats["leases verified at the end"] += report["held"]
            self.log.write(f"verify: host {h.name}: {report}")

    # -- reporting and teardown --------------------------------------------------------------
    def progress(self, cycle: int) -> None:
        ops = sum(h.model.stats["operations"] for h in self.hosts)
        print(
            f"torture --hosts 2: cycle {cycle}, {ops} operations, {self.stats['crashes']} "
            f"crashes, {sum(v for k, v in self.stats.items() if k.startswith('resets'))} "
            f"resets, {len(self.log.violations)} violations, "
            f"{time.monotonic() - self.wall_start:.0f} s",
            flush=True,
        )

    def report(self) -> str:
        s = self.stats
        m = Counter[str]()
        for h in self.hosts:
            m.update(h.model.stats)
        rec = sorted(x for h in self.hosts for x in h.recovery_ms) or [0.0]
        per_host = ", ".join(
            f"{k} {v}" for k, v in sorted(s.items()) if k.startswith(("crashes S", "resets"))
        )
        return "\n".join(
            [
                f"cycles      {s['cycles']} (two hosts on one GlusterFS volume)",
                f"operations  {m['operations']} (grants {m['grants']}, releases {m['releases']}"
                f", busy {m['answers busy']}, LeaseLost {m['answers LeaseLost']}, storage "
                f"unreachable {m['answers storage unreachable']}, NoSuchOwner "
                f"{m['answers NoSuchOwner']})",
                f"crashes     {s['crashes']}; {per_host}",
                f"recoveries  READY after {rec[len(rec) // 2]:.0f} ms median, {rec[-1]:.0f} ms "
                f"max; leases re-taken {s['leases re-taken']}, lost {s['leases lost']} (taken "
                f"by the other host in a gap {s['lost: taken in a gap']}, dropped by the "
                f"storage {s['lost: dropped']})",
                f"owners      {m['owners spawned']} spawned, {m['owners exited']} exited, "
                f"{m['owners fenced']} fenced",
                f"stalls      {s['daemon stalls over 2 s']} checks found a daemon blocked over 2 s "
                f"in a storage call (longest {s['longest stall ms'] / 1000:.1f} s)",
                f"checks      {self.checks} (leases held at checks {s['leases held at checks']}"
                f", lost at checks {s['leases lost at checks']}; lockctl verify {s['verify runs']}"
                f" at the end, {s['leases verified at the end']} leases held)",
                f"violations  {len(self.log.violations)}",
                f"wall time   {s['wall ms'] / 1000:.1f} s",
            ]
        )

    def teardown(self) -> None:
        for h in self.hosts:
            h.gate.stop()
        for h in self.hosts:
            for t in h.threads:
                t.join(0 if h.lockd.proc is None else 10)
        for h in self.hosts:
            h.lockd.close()
            kill_owners(h.model)
        self.spawner.close()
        self.log.write(f"end: {dict(self.stats)}")
        self.log.close()


def _probe(path: str) -> str:
    """What another process sees on byte 0 of a lease file (none yet: nobody took it)."""
    try:
        return kernel.probe(path)
    except FileNotFoundError:
        return "free"


def main(args: argparse.Namespace) -> int:
    reason = gh.unavailable()
    if reason is not None:
        print(f"torture --hosts 2: cannot run a GlusterFS bed here: {reason}", file=sys.stderr)
        return 2
    base = workdir(args, "-hosts2")
    runtime = Path(tempfile.mkdtemp(prefix="ltm", dir="/tmp"))
    print(f"torture: seed {args.seed}, {args.cycles} cycles, two hosts, work directory {base}")
    try:
        with gh.GlusterBed(options={"client.strict-locks": "on"}) as bed:
            torture = MultiHost(args, base, runtime, bed)
            rc = drive(torture, base)
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    return conclude(torture, rc, base, args, "journals, daemon logs", "--hosts 2 ")
