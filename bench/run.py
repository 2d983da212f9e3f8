"""``make bench``: lockd against its floors and against virtlockd, in one run.

Per repetition (default 3; ``--quick``: 1, shorter), in this order:

floors    OFD lock+unlock; SQLite WAL commit (NORMAL, FULL); the do-nothing Varlink server
          on uvloop (lockd's loop): spawn->READY, RSS, 1 connection and 16/64 client
          processes doing pairs, its CPU per pair;
          open+OFD-lock of 1,000/5,000/10,000 files (what recovery must redo)
lockd     a fresh daemon: 1 connection doing acquire+release pairs with the raw client
          (:mod:`bench.wire`, the floor's client) and once with ``lockd.client.Client``;
          16/64 client processes on distinct files, one owner each
          then a second fresh daemon: RSS idle; hold 1,000 / 5,000 / 10,000 leases (RSS,
          acquire rate); after each step ``kill -9`` and restart: kill->READY, recovery time
          reported by the daemon, leases re-taken
virtlockd the same workloads against a private virtlockd (when installed), no recovery: it
          keeps no state across a crash
lockd-vl  lockd's virtlockd front end driven by virtlockd's client: 1 connection, 16 clients

Once per run: the journal after a million operations (acquire or release, each journaled)
through the daemon by 16 clients, its size on disk at 10% and at 100%, then a restart
with that history (READY time); ``--profile``: py-spy profiles of the daemon under the
1-connection and 16-client workloads (not in the measured repetitions: sampling slows it).

Every figure is the median over repetitions; the table gives its ratio to a floor of the
same run and to virtlockd. Owners are real processes (``sleep``) registered with
io.lockd.Register. Results: ``$OUT`` or ``results/`` (JSON with every repetition, and the
table as Markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import floors, report, vl
from bench.procs import (
    REPO,
    FloorServer,
    LeanServer,
    Lockd,
    Owners,
    compile_tree,
    compiled_tree,
    register,
)
from bench.stats import linear_fit
from bench.wire import PairDriver, Raw
from bench.workloads import Driver, concurrent, sequential


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_files(d: Path, n: int) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = d / f"disk{i:05d}.img"
        p.write_bytes(b"\0" * 512)
        out.append(p)
    return out


class ClientDriver:
    """The same pair through the library VM managers use (``lockd.client.Client``)."""

    def __init__(self, socket_path: Path, owner: str, resource: str) -> None:
        from lockd.client import Client

        self.c = Client(socket_path)
        self.owner = owner
        self.resource = resource

    def acquire(self) -> None:
        self.c.acquire(self.resource, owner=self.owner)

    def release(self) -> None:
        self.c.release(self.resource, owner=self.owner)

    def close(self) -> None:
        self.c.close()


class Ctx:
    def __init__(self, args: argparse.Namespace, work: Path, files: list[Path]) -> None:
        self.args = args
        self.work = work
        self.files = files
        self.owners = Owners()
        self.n = 0

    def base(self, name: str) -> Path:
        self.n += 1
        return self.work / f"{name}{self.n}"

    def lockd(self, name: str) -> Lockd:
        a = self.args
        return Lockd(self.base(name), a.lockd_src, a.lockd_python, a.lockd_config)


def _conc_drivers(sock: str, owners: list[str], files: list[Path]) -> Callable[[int], Driver]:
    def make(i: int) -> Driver:
        return PairDriver(Raw(sock), owners[i], str(files[i]))

    return make


# -- floors ---------------------------------------------------------------------------------


def run_floors(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    out: dict[str, Any] = {}
    out["ofd"] = floors.ofd(ctx.files[0], a.floor_n)
    out["sqlite_normal"] = floors.sqlite(ctx.work, "NORMAL", a.sqlite_n)
    out["sqlite_full"] = floors.sqlite(ctx.work, "FULL", max(50, a.sqlite_n // 10))
    out["open_lock_s"] = {str(n): floors.open_lock(ctx.files[:n]) for n in a.steps}
    srv = FloorServer(ctx.base("floor"))
    try:
        starts = []
        for _ in range(3):
            starts.append(srv.start())
            if len(starts) < 3:
                srv.stop()
        out["start_s"] = sorted(starts)[1]
        time.sleep(0.2)
        out["rss_kb"] = srv.rss_kb()
        conn = Raw(str(srv.socket))
        out["seq"] = sequential(
            PairDriver(conn, "owner", str(ctx.files[0])), a.seq_n, srv.pid, a.warm
        )
        conn.close()
        for n in a.clients:
            make = _conc_drivers(str(srv.socket), ["owner"] * n, ctx.files[1 : 1 + n])
            out[f"conc{n}"] = concurrent(make, n, dur=a.dur, server_pid=srv.pid)
    finally:
        srv.close()
    out["lean"] = run_lean(ctx)
    return out


def run_lean(ctx: Ctx) -> dict[str, Any]:
    """The lean prototype (bench/lean.py) under lockd's 1-connection and N-client workloads."""
    a = ctx.args
    out: dict[str, Any] = {}
    srv = LeanServer(ctx.base("lean"))
    try:
        srv.start()
        conn = Raw(str(srv.socket))
        owner = register(conn, ctx.owners.spawn(1)[0], "seq")
        drv = PairDriver(conn, owner, str(ctx.files[0]))
        out["seq"] = sequential(drv, a.seq_n, srv.pid, a.warm)
        for n in a.clients:
            uuids = [register(conn, p, f"w{n}-{i}") for i, p in enumerate(ctx.owners.spawn(n))]
            make = _conc_drivers(str(srv.socket), uuids, ctx.files[1 : 1 + n])
            out[f"conc{n}"] = concurrent(make, n, dur=a.dur, server_pid=srv.pid)
        conn.close()
    finally:
        srv.close()
        ctx.owners.close()
    return out


# -- lockd ----------------------------------------------------------------------------------


def run_lockd(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    out: dict[str, Any] = {}
    d = ctx.lockd("lockd")
    try:
        out["start_s"] = d.start()
        conn = d.connect()
        pid = ctx.owners.spawn(1)[0]
        owner = register(conn, pid, "seq")
        drv = PairDriver(conn, owner, str(ctx.files[0]))
        out["seq"] = sequential(drv, a.seq_n, d.pid, a.warm)
        cdrv = ClientDriver(d.socket, owner, str(ctx.files[0]))
        out["seq_client"] = sequential(cdrv, max(200, a.seq_n // 5), d.pid, a.warm / 2)
        cdrv.close()
        for n in a.clients:
            pids = ctx.owners.spawn(n)
            uuids = [register(conn, p, f"w{n}-{i}") for i, p in enumerate(pids)]
            make = _conc_drivers(str(d.socket), uuids, ctx.files[1 : 1 + n])
            out[f"conc{n}"] = concurrent(make, n, dur=a.dur, server_pid=d.pid)
        conn.close()
        out["rss_kb_after_bench"] = d.rss_kb()
        out["journal_bytes_after_bench"] = d.journal_bytes()
    finally:
        d.close()
    out.update(run_lockd_hold(ctx))
    return out


def run_fdstore(ctx: Ctx) -> dict[str, Any]:
    """kill -9 -> READY with the lease fds in systemd's fd store: lockd as deployed (the
    project's units, socket-activated, ``FileDescriptorStoreMax=``) under a real ``systemd
    --user``, run by the tests' harness (``tests/sd_harness.py``). For the first and the last
    of ``--steps``: a fresh state, one owner, N leases, ``SIGKILL`` to the main process, and
    systemd's own timestamps (the kill to the new instance's READY=1, its exec to READY=1).
    Once per run: filling the store is slow under systemd 252 (it compares every new entry
    with each stored one), ~40 s for 10,000 leases."""
    sys.path.insert(0, str(REPO / "tests"))
    import sd_harness as sd

    why = sd.unavailable()
    if why is not None:
        return {"skipped": why}
    steps: dict[str, dict[str, Any]] = {}
    with sd.UserManager() as m, sd.Owners() as owners:
        for n in sorted({ctx.args.steps[0], ctx.args.steps[-1]}):
            m.reset()
            files = sd.make_files(m.w / f"res{n}", n)
            with m.client() as c:
                owner = c.register(owners.spawn().pid, name="holder")["uuid"]
            t = time.monotonic()
            sd.bulk_acquire(m.socket, [(owner, f) for f in files], connections=4)
            fill_s = time.monotonic() - t
            r = m.kill_and_wait(signal.SIGKILL)
            with m.client(admin=True, timeout=60) as admin:
                status = admin.status()
            rec = status["recovery"]
            steps[str(n)] = {
                "leases": n,
                "fill_s": fill_s,
                "kill_to_ready_s": r.to_ready,
                "exec_to_ready_s": r.start_to_ready,
                "recovery_ms": rec["duration_ms"],
                "adopted": rec["adopted"],
                "retaken": rec["retaken"],
                "lost": rec["lost"],
                "leases_after": status["leases"],
            }
            log(f"fd store, {n} leases: {steps[str(n)]}")
        m.reset()
    return {"steps": steps}


def run_lockd_hold(ctx: Ctx) -> dict[str, Any]:
    """RSS with N leases, and kill -9 -> READY with N leases to re-take from the journal."""
    a = ctx.args
    d = ctx.lockd("hold")
    steps: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {"steps": steps}
    try:
        d.start()
        time.sleep(0.2)
        out["rss_kb_idle"] = d.rss_kb()
        pid = ctx.owners.spawn(1)[0]
        conn = d.connect()
        owner = register(conn, pid, "holder")
        # 0 leases: the restart floor of the daemon itself (interpreter, imports, journal)
        conn.close()
        t = time.perf_counter()
        d.kill9()
        d.start()
        out["restart0_s"] = time.perf_counter() - t
        out["restart0_recovery_ms"] = d.status()["recovery"]["duration_ms"]
        time.sleep(0.2)
        out["rss_kb_idle_restarted"] = d.rss_kb()
        have = 0
        for n in a.steps:
            conn = d.connect()
            t = time.perf_counter()
            for p in ctx.files[have:n]:
                conn.call("io.lockd.Acquire", {"owner": owner, "resource": str(p)})
            dt = time.perf_counter() - t
            step: dict[str, Any] = {"leases": n, "acquire_per_s": (n - have) / dt}
            have = n
            time.sleep(0.2)
            step["rss_kb"] = d.rss_kb()
            conn.close()
            t = time.perf_counter()
            d.kill9()
            spawn_s = d.start()
            step["kill_to_ready_s"] = time.perf_counter() - t
            step["spawn_to_ready_s"] = spawn_s
            st = d.status()
            step["recovery_ms"] = st["recovery"]["duration_ms"]
            step["retaken"] = st["recovery"]["retaken"]
            step["leases_after"] = st["leases"]
            step["lost"] = st["recovery"]["lost"]
            time.sleep(0.2)
            step["rss_kb_after_recovery"] = d.rss_kb()
            if step["leases_after"] != n or step["retaken"] != n:
                log(f"lockd recovery with {n} leases: {st['recovery']}, {st['leases']} held")
            steps[str(n)] = step
    finally:
        d.close()
    return out


# -- virtlockd ------------------------------------------------------------------------------


def run_virtlockd(ctx: Ctx) -> dict[str, Any]:
    a = ctx.args
    out: dict[str, Any] = {"version": vl.version()}
    v = vl.Virtlockd(ctx.base("vl"))
    try:
        v.start()
        time.sleep(0.2)
        out["rss_kb_idle"] = v.rss_kb()
        pid = ctx.owners.spawn(1)[0]
        drv = vl.VLDriver(v.sock, pid, str(ctx.files[0]))
        out["seq"] = sequential(drv, a.seq_n, v.pid, a.warm)
        drv.close()
        for n in a.clients:
            pids = ctx.owners.spawn(n)
            files = ctx.files[1 : 1 + n]

            def make(i: int, pids: list[int] = pids, files: list[Path] = files) -> Driver:
                return vl.VLDriver(v.sock, pids[i], str(files[i]))

            out[f"conc{n}"] = concurrent(make, n, dur=a.dur, server_pid=v.pid)
        # hold N locks on one connection, like lockd's hold test
        holder = vl.VLDriver(v.sock, ctx.owners.spawn(1)[0], "")
        steps: dict[str, dict[str, Any]] = {}
        have = 0
        for n in a.steps:
            t = time.perf_counter()
            for p in ctx.files[have:n]:
                holder.acquire_path(str(p))
            rate = (n - have) / (time.perf_counter() - t)
            have = n
            time.sleep(0.2)
            steps[str(n)] = {"leases": n, "acquire_per_s": rate, "rss_kb": v.rss_kb()}
        out["steps"] = steps
        for p in ctx.files[:have]:
            holder.release_path(str(p))
        holder.close()
    finally:
        v.close()
    return out


def run_lockd_vl(ctx: Ctx) -> dict[str, Any]:
    """lockd's virtlockd-protocol front end driven by the same client as virtlockd (the
    anchor's), so lockd ÷ virtlockd compares one protocol with itself: 1 connection, and the
    concurrent run with the smallest ``--clients`` (16 by default)."""
    a = ctx.args
    base = ctx.base("lockdvl")
    sock = base / "vl.sock"
    config = (a.lockd_config or "") + f'\nvirtlockd_socket = "{sock}"\n'
    d = Lockd(base, a.lockd_src, a.lockd_python, config)
    out: dict[str, Any] = {}
    try:
        d.start()
        drv = vl.VLDriver(str(sock), ctx.owners.spawn(1)[0], str(ctx.files[0]))
        out["seq"] = sequential(drv, a.seq_n, d.pid, a.warm)
        drv.close()
        n = min(a.clients)
        pids = ctx.owners.spawn(n)
        files = ctx.files[1 : 1 + n]

        def make(i: int) -> Driver:
            return vl.VLDriver(str(sock), pids[i], str(files[i]))

        out[f"conc{n}"] = concurrent(make, n, dur=a.dur, server_pid=d.pid)
    finally:
        d.close()
    return out


# -- once per run ---------------------------------------------------------------------------


def run_journal(ctx: Ctx) -> dict[str, Any]:
    """Journal size after ``--journal-ops`` operations through the daemon (16 clients)."""
    a = ctx.args
    nc = a.journal_clients
    d = ctx.lockd("journal")
    out: dict[str, Any] = {"ops_target": a.journal_ops, "clients": nc, "checkpoints": []}
    try:
        d.start()
        conn = d.connect()
        pids = ctx.owners.spawn(nc)
        uuids = [register(conn, p, f"j{i}") for i, p in enumerate(pids)]
        conn.close()
        make = _conc_drivers(str(d.socket), uuids, ctx.files[1 : 1 + nc])
        done_ops = 0
        t0 = time.perf_counter()
        for frac in (0.1, 1.0):
            target = int(a.journal_ops * frac)
            pairs_each = max(1, (target - done_ops) // (2 * nc))
            r = concurrent(make, nc, pairs_each=pairs_each, server_pid=d.pid)
            done_ops += 2 * r["pairs"]
            cp = {"ops": done_ops, "elapsed_s": time.perf_counter() - t0, "per_s": r["per_s"]}
            cp.update({k: r[k] for k in ("p50_us", "p99_us", "max_us", "server_cpu_us_per_pair")})
            cp.update(d.journal_bytes())
            cp["total_bytes"] = sum(v for k, v in cp.items() if k.startswith("journal.sqlite"))
            cp["events"] = _count_events(d.state_dir / "journal.sqlite")
            out["checkpoints"].append(cp)
            log(
                f"journal: {done_ops:,} ops, {cp['total_bytes'] / 1e6:.1f} MB, "
                f"{cp['events']:,} events"
            )
        d.stop()
        out["restart_s"] = d.start()
        st = d.status()
        out["restart_recovery_ms"] = st["recovery"]["duration_ms"]
        out["after_restart"] = d.journal_bytes()
        out["events_after_restart"] = _count_events(d.state_dir / "journal.sqlite")
        d.kill9()
        out["restart_kill9_s"] = d.start()
    finally:
        d.close()
    return out


def _count_events(path: Path) -> int | None:
    """History rows in the journal; read from a copy, as the running daemon holds the
    journal's exclusive lock."""
    import shutil
    import sqlite3
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for src in (path, path.with_name(path.name + "-wal")):
            if src.exists():
                shutil.copyfile(src, Path(tmp) / src.name)
        try:
            conn = sqlite3.connect(Path(tmp) / path.name)
            try:
                # one history row per commit (migration 006), its events a JSON array
                row = conn.execute("SELECT sum(json_array_length(events)) FROM history")
                return int(row.fetchone()[0] or 0)
            finally:
                conn.close()
        except sqlite3.Error:
            return None


def run_profile(ctx: Ctx, outdir: Path) -> dict[str, Any]:
    """py-spy profiles of the daemon: 1 connection, then 16 clients."""
    from bench import profile

    a = ctx.args
    res: dict[str, Any] = {}
    d = ctx.lockd("profile")
    try:
        d.start()
        conn = d.connect()
        owner = register(conn, ctx.owners.spawn(1)[0], "prof")
        drv = PairDriver(conn, owner, str(ctx.files[0]))
        sequential(drv, 1000, None, 0.5)
        raw = outdir / "profile-seq.txt"
        with profile.record(d.pid, raw, native=a.profile_native):
            res["seq_run"] = sequential(drv, a.seq_n, d.pid, 0)
        res["seq"] = profile.summarize(raw)
        n = 16
        uuids = [register(conn, p, f"p{i}") for i, p in enumerate(ctx.owners.spawn(n))]
        make = _conc_drivers(str(d.socket), uuids, ctx.files[1 : 1 + n])
        raw = outdir / "profile-conc16.txt"
        with profile.record(d.pid, raw, native=a.profile_native):
            res["conc16_run"] = concurrent(make, n, dur=a.dur, server_pid=d.pid)
        res["conc16"] = profile.summarize(raw)
        conn.close()
    finally:
        d.close()
    return res


# -- driver ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark lockd against its floors and virtlockd (see bench/README.md).",
    )
    p.add_argument("--quick", action="store_true", help="about a minute: 1 repetition, short runs")
    p.add_argument("--reps", type=int, help="repetitions (default 3; --quick 1)")
    p.add_argument("--seq-n", type=int, help="pairs on one connection (default 6000)")
    p.add_argument("--dur", type=float, help="seconds per concurrent run (default 4)")
    p.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    p.add_argument("--steps", type=int, nargs="+", default=[1000, 5000, 10000])
    p.add_argument("--floor-n", type=int, help="OFD lock+unlock iterations (default 200000)")
    p.add_argument("--sqlite-n", type=int, help="SQLite NORMAL commits (FULL: a tenth)")
    p.add_argument("--warm", type=float, help="warm-up seconds before a timed loop (default 1)")
    p.add_argument("--journal-ops", type=int, help="journaled operations (default 1,000,000)")
    p.add_argument("--journal-clients", type=int, default=16)
    p.add_argument(
        "--skip",
        nargs="+",
        default=[],
        choices=["floors", "lockd", "virtlockd", "lockd-vl", "journal", "fdstore"],
        help="parts to leave out",
    )
    p.add_argument("--profile", action="store_true", help="also record py-spy profiles")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames)")
    p.add_argument("--lockd-src", type=Path, help="run the daemon from this lockd tree")
    p.add_argument(
        "--mypyc",
        action="store_true",
        help="run the daemon compiled with mypyc (setup.py's optional build; ~1 min to build)",
    )
    p.add_argument("--lockd-python", default=sys.executable, help="interpreter for the daemon")
    p.add_argument("--lockd-config", help="TOML text for the daemon's --config")
    p.add_argument("--out", type=Path, help="results directory (default $OUT or results/)")
    p.add_argument("--keep-work", action="store_true", help="keep /tmp/lkbench.* (daemon logs)")
    a = p.parse_args(argv)
    quick = a.quick
    defaults = {
        "reps": 1 if quick else 3,
        "seq_n": 2000 if quick else 6000,
        "dur": 2.0 if quick else 4.0,
        "floor_n": 50_000 if quick else 200_000,
        "sqlite_n": 2000 if quick else 10000,
        "warm": 0.5 if quick else 1.0,
        "journal_ops": 100_000 if quick else 1_000_000,
    }
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.out is None:
        a.out = Path(os.environ.get("OUT") or REPO / "results")
    if a.lockd_src is not None:
        a.lockd_src = a.lockd_src.resolve()
        sys.path.insert(0, str(a.lockd_src))
    return a


def machine() -> dict[str, Any]:
    def cmd(argv: list[str]) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()
        return ""

    import sqlite3

    import lockd

    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "lockd": str(Path(lockd.__file__).parent),
        "lockd_git": cmd(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < max(a.steps) + 500:
        print(f"bench: RLIMIT_NOFILE hard limit {hard} is below {max(a.steps) + 500}")
        return 2
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    why_not_vl = vl.unavailable() if "virtlockd" not in a.skip else "skipped"
    work = Path(tempfile.mkdtemp(prefix="lkbench.", dir="/tmp"))
    if a.mypyc:
        log("building the daemon with mypyc (scripts/build-mypyc.sh)")
        a.lockd_src = compiled_tree(a.lockd_src, work / "mypyc")
    # as deployed: the daemon (and the floor server) run on compiled bytecode
    compile_tree(a.lockd_src)
    compile_tree(REPO, package="bench")
    nfiles = max(max(a.steps), max(a.clients) + 1, a.journal_clients + 1)
    files = make_files(work / "files", nfiles)
    ctx = Ctx(a, work, files)
    meta = machine()
    meta["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}
    # the fd-store rows run the installed lockd under systemd: the editable tree, pure Python
    meta["build"] = "compiled with mypyc (except the fd-store rows)" if a.mypyc else "pure Python"
    meta["virtlockd"] = vl.version() if why_not_vl is None else f"not measured: {why_not_vl}"
    log(f"lockd from {meta['lockd']}; virtlockd: {meta['virtlockd']}; work dir {work}")
    reps: list[dict[str, Any]] = []
    once: dict[str, Any] = {}
    t_start = time.perf_counter()
    try:
        for r in range(a.reps):
            rep: dict[str, Any] = {}
            if "floors" not in a.skip:
                log(f"rep {r + 1}/{a.reps}: floors")
                rep["floor"] = run_floors(ctx)
            if "lockd" not in a.skip:
                log(f"rep {r + 1}/{a.reps}: lockd")
                rep["lockd"] = run_lockd(ctx)
            if why_not_vl is None:
                log(f"rep {r + 1}/{a.reps}: virtlockd")
                rep["virtlockd"] = run_virtlockd(ctx)
                if "lockd-vl" not in a.skip:
                    log(f"rep {r + 1}/{a.reps}: lockd on virtlockd's protocol")
                    rep["lockd_vl"] = run_lockd_vl(ctx)
            ctx.owners.close()
            reps.append(rep)
            log(f"rep {r + 1}/{a.reps}: {report.one_line(rep)}")
        if "journal" not in a.skip:
            log(f"journal: {a.journal_ops:,} operations through the daemon")
            once["journal"] = run_journal(ctx)
            ctx.owners.close()
        if "fdstore" not in a.skip:
            log("fd store: kill -9 with the lease fds in systemd's store")
            once["fdstore"] = run_fdstore(ctx)
            ctx.owners.close()
        if a.profile:
            log("profiling the daemon with py-spy")
            once["profile"] = run_profile(ctx, a.out)
    finally:
        ctx.owners.close()
        if a.keep_work:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta["duration_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    rows = report.rows(reps, once, a.steps, a.clients)
    fits = report.recovery_fit(reps, a.steps, linear_fit)
    table = report.render(rows, fits, once, meta)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {"meta": meta, "rows": rows, "recovery_fit": fits, "reps": reps, "once": once}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"bench-{stamp}.json").write_text(json.dumps(result, indent=1, default=str))
    (a.out / f"bench-{stamp}.md").write_text(table + "\n")
    print(table)
    log(f"wrote {a.out / f'bench-{stamp}.json'} and .md ({meta['duration_s']:.0f} s)")
    return 0
