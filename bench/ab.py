"""``python -m bench.ab``: A/B two lockd trees on the daemon's CPU, alternating in one sitting.

On a shared machine wall-clock throughput swings by ±20% from one minute to the next, so a
change to the daemon is judged by what it costs the daemon itself, measured with A and B
taking turns (A B B A A B ...) so that both see the same load:

- ``seq``: one connection, acquire+release pairs back to back: the daemon's CPU per pair
  (schedstat of all its threads) and the pair's p50;
- ``conc``: ``--clients`` processes (default 16), one owner and file each, for ``--dur``
  seconds: pairs/s and the daemon's CPU per pair (batches grow with the load, so this is the
  figure the group commit moves);
- ``restart`` (``--leases N``): N leases held by one owner, ``kill -9``, start again: the new
  daemon's CPU from exec to ``READY=1`` (schedstat read at READY), kill -> READY, the
  recovery time it reports, and its RSS once recovered;

``--proto virtlockd`` runs ``seq`` and ``conc`` through lockd's virtlockd-protocol front end
instead (``virtlockd_socket``), driven by virtlockd's own client as ``make bench`` drives it
(:mod:`bench.vl`: the anchor's ``LockdClient``, one owner per connection).

Instruction counts would be steadier than CPU time, but this machine has neither hardware
counters for ``perf stat -e instructions`` (a VM) nor a valgrind that knows ``pidfd_open``
(Debian 12's 3.19 answers ENOSYS, so Register fails under callgrind).

A tree is a git commit (``git archive`` into a temporary directory) or a directory holding a
``lockd`` package, or ``mypyc:`` and one of those for its optional compiled build; each runs
bytecode-compiled, as installed. Prints the medians per variant and B/A; ``--json`` writes
every round. Examples, the working tree against its last commit, and compiled against not::

    python -m bench.ab HEAD . --rounds 5
    python -m bench.ab . mypyc:.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import vl
from bench.procs import REPO, Lockd, Owners, compile_tree, compiled_tree, register
from bench.run import make_files
from bench.wire import PairDriver, Raw
from bench.workloads import Driver, concurrent, sequential


def materialize(spec: str, into: Path) -> Path:
    """A directory with the ``lockd`` package of ``spec`` (a commit, or a directory; with
    ``mypyc:`` in front, its optional compiled build)."""
    if spec.startswith("mypyc:"):
        return compiled_tree(materialize(spec[len("mypyc:") :], into / "src"), into / "mypyc")
    if Path(spec, "lockd", "__init__.py").exists():
        return Path(spec).resolve()
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", spec, "lockd", "schema"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):  # what a compiled build needs
        data = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{spec}:{name}"], capture_output=True
        ).stdout
        (into / name).write_bytes(data)
    return into


def run_vl_seq(vsock: Path, d: Lockd, owners: Owners, files: list[Path], n: int) -> dict[str, Any]:
    drv = vl.VLDriver(str(vsock), owners.spawn(1)[0], str(files[0]))
    res = sequential(drv, n, d.pid, 0.5)
    drv.close()
    return {"cpu_us": res["server_cpu_us_per_pair"], "p50_us": res["p50_us"]}


def run_vl_conc(
    vsock: Path, d: Lockd, owners: Owners, files: list[Path], clients: int, dur: float
) -> dict[str, Any]:
    pids = owners.spawn(clients)

    def make(i: int) -> Driver:
        return vl.VLDriver(str(vsock), pids[i], str(files[1 + i]))

    res = concurrent(make, clients, dur=dur, server_pid=d.pid)
    return {"cpu_us": res["server_cpu_us_per_pair"], "per_s": res["per_s"], "p50_us": res["p50_us"]}


def run_seq(d: Lockd, owners: Owners, files: list[Path], n: int) -> dict[str, Any]:
    conn = d.connect()
    owner = register(conn, owners.spawn(1)[0], "ab-seq")
    drv = PairDriver(conn, owner, str(files[0]))
    res = sequential(drv, n, d.pid, 0.5)
    conn.close()
    return {"cpu_us": res["server_cpu_us_per_pair"], "p50_us": res["p50_us"]}


def run_conc(
    d: Lockd, owners: Owners, files: list[Path], clients: int, dur: float
) -> dict[str, Any]:
    conn = d.connect()
    uuids = [register(conn, p, f"ab-{i}") for i, p in enumerate(owners.spawn(clients))]
    conn.close()

    def make(i: int) -> Driver:
        return PairDriver(Raw(str(d.socket)), uuids[i], str(files[1 + i]))

    res = concurrent(make, clients, dur=dur, server_pid=d.pid)
    return {"cpu_us": res["server_cpu_us_per_pair"], "per_s": res["per_s"], "p50_us": res["p50_us"]}


def run_restart(d: Lockd, owners: Owners, files: list[Path], n: int) -> dict[str, Any]:
    conn = d.connect()
    owner = register(conn, owners.spawn(1)[0], "ab-hold")
    for p in files[:n]:
        conn.call("io.lockd.Acquire", {"owner": owner, "resource": str(p)})
    conn.close()
    t = time.perf_counter()
    d.kill9()
    d.start()
    kill_to_ready = time.perf_counter() - t
    cpu = d.cpu_s()  # at READY: the daemon is idle from here on
    time.sleep(0.2)
    rss_mb = d.rss_kb() / 1024
    st = d.status()
    if st["recovery"]["retaken"] != n:
        raise RuntimeError(f"re-took {st['recovery']} of {n} leases")
    return {
        "cpu_ms": cpu * 1e3,
        "kill_to_ready_ms": kill_to_ready * 1e3,
        "recovery_ms": st["recovery"]["duration_ms"],
        "rss_mb": rss_mb,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    p.add_argument("a", help="tree A: a git commit or a directory with lockd/")
    p.add_argument("b", help="tree B")
    p.add_argument("--rounds", type=int, default=5, help="A/B rounds (default 5)")
    p.add_argument("--seq-n", type=int, default=3000, help="pairs on one connection")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--dur", type=float, default=2.0, help="seconds per concurrent run")
    p.add_argument("--leases", type=int, default=0, help="also restart with N leases")
    p.add_argument("--only", nargs="+", default=["seq", "conc"], choices=["seq", "conc", "restart"])
    p.add_argument(
        "--proto",
        choices=["varlink", "virtlockd"],
        default="varlink",
        help="the front end seq and conc drive (virtlockd: virtlockd's client, bench.vl)",
    )
    p.add_argument("--json", type=Path, help="write every round here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lkab.", dir="/tmp"))
    owners = Owners()
    rounds: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    try:
        trees = {
            "A": materialize(a.a, work / "treeA"),
            "B": materialize(a.b, work / "treeB"),
        }
        for tree in trees.values():
            compile_tree(tree)
        files = make_files(work / "files", max(a.leases, a.clients + 1))
        if a.leases and "restart" not in a.only:
            a.only.append("restart")
        n = 0
        for r in range(a.rounds):
            order = "AB" if r % 2 == 0 else "BA"
            for v in order:
                n += 1
                base = work / f"{v}{n}"
                res: dict[str, Any] = {}
                vsock = base / "vl.sock"
                config = f'virtlockd_socket = "{vsock}"\n' if a.proto == "virtlockd" else None
                d = Lockd(base, trees[v], config=config)
                try:
                    d.start()
                    if "seq" in a.only:
                        res["seq"] = (
                            run_vl_seq(vsock, d, owners, files, a.seq_n)
                            if config
                            else run_seq(d, owners, files, a.seq_n)
                        )
                    if "conc" in a.only:
                        res["conc"] = (
                            run_vl_conc(vsock, d, owners, files, a.clients, a.dur)
                            if config
                            else run_conc(d, owners, files, a.clients, a.dur)
                        )
                    if "restart" in a.only and a.leases:
                        res["restart"] = run_restart(d, owners, files, a.leases)
                finally:
                    d.close()
                owners.close()
                rounds[v].append(res)
                print(f"round {r + 1} {v}: {json.dumps(res)}", file=sys.stderr, flush=True)
    finally:
        owners.close()
        shutil.rmtree(work, ignore_errors=True)
    print(summary(rounds, a))
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "rounds": rounds}))
    return 0


def _paths(res: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for k, v in res.items():
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
        else:
            out.append((*prefix, k))
    return out


def _get(res: dict[str, Any], path: tuple[str, ...]) -> float:
    for k in path:
        res = res[k]
    return float(res)  # type: ignore[arg-type]


def summary(rounds: dict[str, list[dict[str, Any]]], a: argparse.Namespace) -> str:
    lines = [f"A = {a.a}, B = {a.b}, {a.rounds} rounds, {a.proto}, medians (min-max)", ""]
    lines.append(f"{'figure':<28} {'A':>24} {'B':>24} {'B/A':>7}")
    if not rounds["A"]:
        return "\n".join(lines)
    for path in _paths(rounds["A"][0]):
        cols = []
        meds = []
        for v in "AB":
            xs = [_get(r, path) for r in rounds[v]]
            med = statistics.median(xs)
            meds.append(med)
            cols.append(f"{med:,.1f} ({min(xs):,.1f}-{max(xs):,.1f})")
        ratio = meds[1] / meds[0] if meds[0] else float("nan")
        lines.append(f"{'.'.join(path):<28} {cols[0]:>24} {cols[1]:>24} {ratio:>7.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
