"""``python -m bench.instructions``: instructions per acquire+release pair, counted by callgrind.

CPU time on a shared machine moves by a few percent from one minute to the next, which is
the size of most single changes to the request path. Instruction counts do not move: this
runs the daemon's request path in one process under ``valgrind --tool=callgrind`` and counts
the instructions one pair costs, for one lockd tree or two (A/B).

What runs: the real :class:`~lockd.service.service.LockService`, journal (SQLite, WAL, in a
temporary directory), lockspaces and a real file, behind the protocol's own connection class
(``--proto varlink``: lockd.frontends.server's; ``virtlockd``: lockd.frontends.virtlockd_server's;
``lean``: the
prototype's of :mod:`bench.lean`, lockd's work without its layers) fed the wire
bytes of an Acquire and a Release, whose replies go to a stub transport. One request per
group commit (the single-connection case); no sockets, so no kernel time for them, and the
client costs nothing. The owner is put in the table by hand, without a pidfd: Debian 12's
valgrind 3.19 answers ENOSYS to ``pidfd_open``. Each tree runs twice, with ``--pairs``
N1 and N2 pairs after a warm-up, and the figure is (Ir(N2) - Ir(N1)) / (N2 - N1): start-up,
imports and the warm-up cancel out; with ``PYTHONHASHSEED=0`` repeated runs agree to ~0.1%.

Trees are given as for ``bench.ab``: a git commit or a directory with ``lockd/``. Examples::

    python -m bench.instructions HEAD .                  # the working tree against its commit
    python -m bench.instructions main . --proto virtlockd
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.ab import materialize
from bench.procs import REPO, compile_tree

WARM = 300
GC_YOUNG_THRESHOLD = 10_000  # lockd.daemon's (not imported: the daemon module is not timed)


class _Transport:
    """What the connection writes to: the replies are counted, never sent."""

    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return False

    def is_reading(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _pairs(proto: str, n: int) -> None:
    from lockd.config import Config
    from lockd.journaling.journal import Journal
    from lockd.locks.leases import LeaseTable, Owner
    from lockd.locks.lockspace import Lockspaces
    from lockd.locks.process import Peer
    from lockd.service.service import GroupCommit, LockService
    from lockd.systemd.notify import FdStore

    tmp = Path(tempfile.mkdtemp(prefix="lkinstr.", dir="/tmp"))
    disk = tmp / "disk.img"
    disk.write_bytes(b"\0" * 512)
    loop = asyncio.get_running_loop()
    config = Config(state_dir=tmp)
    journal = Journal(tmp / "journal.sqlite")
    table = LeaseTable()
    service = LockService(
        config, journal, GroupCommit(journal, loop), Lockspaces({}), table, FdStore(False), loop
    )
    peer = Peer(os.getpid(), 0, frozenset({0}))
    owner = Owner(
        uuid=str(uuid.uuid4()), name="bench", pid=os.getpid(), uid=0, start_time=1,
        boot_id="bench", fence="none", registered_at=time.time(),
    )  # fmt: skip
    table.add_owner(owner)
    transport = _Transport()
    conn: Any
    if proto == "lean":  # bench/lean.py: lockd's work without its layers (its own journal)
        from bench.lean import Lean, LeanConnection
        from lockd.wire.varlink import Call

        lean = Lean(tmp / "lean")
        conn = LeanConnection(lean)
        params = {"owner": lean.register(os.getpid(), "bench"), "resource": str(disk)}
        acquire = Call("io.lockd.Acquire", params).encode()
        release = Call("io.lockd.Release", params).encode()
    elif proto == "virtlockd":
        from lockd.frontends.virtlockd_server import VirtlockdConnection, VirtlockdServer
        from lockd.wire import virtlockd_rpc as rpc

        conn = VirtlockdConnection(VirtlockdServer(config, service))
        conn.owner = owner
        args = rpc.ResourceArgs("", str(disk), 0)
        acquire = rpc.encode_call(rpc.Proc.ACQUIRE_RESOURCE, 1, args)
        release = rpc.encode_call(rpc.Proc.RELEASE_RESOURCE, 2, args)
    else:
        from lockd.frontends.server import Connection, Server
        from lockd.service.recovery import Report
        from lockd.wire.varlink import Call

        conn = Connection(Server(config, service, Report(), lambda: None), False)
        params = {"owner": owner.uuid, "resource": str(disk)}
        acquire = Call("io.lockd.Acquire", params).encode()
        release = Call("io.lockd.Release", params).encode()
    conn.transport, conn.peer = transport, peer
    out = transport.out

    async def pairs(k: int) -> None:
        for _ in range(k):
            for data in (acquire, release):
                conn.data_received(data)
                while not out:  # the reply leaves with the commit, an iteration later
                    await asyncio.sleep(0)
                out.clear()

    await pairs(WARM)
    gc.collect()  # as lockd.daemon does once recovered
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD)
    await pairs(n)
    journal.close()
    shutil.rmtree(tmp, ignore_errors=True)


def child(proto: str, n: int) -> None:
    """One run, in the process callgrind watches (the daemon's event loop: uvloop)."""
    import uvloop

    uvloop.install()
    asyncio.run(_pairs(proto, n))


def count(tree: Path, proto: str, n: int, work: Path) -> int:
    """Instructions of one run of ``n`` pairs (after the warm-up) with ``tree``'s lockd."""
    out = work / f"callgrind.{os.getpid()}.{tree.name}.{n}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = f"{tree}:{REPO}"  # the tree's lockd, this checkout's bench
    env["PYTHONHASHSEED"] = "0"  # the same dict layouts (probe counts) in every run
    code = f"from bench.instructions import child; child({proto!r}, {n})"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    subprocess.run(
        [*argv, sys.executable, "-c", code],
        cwd=work,  # not this checkout: "-c" puts the working directory first on sys.path
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    m = re.search(r"^summary: (\d+)", out.read_text(), re.M)
    if m is None:
        raise RuntimeError(f"no summary in {out}")
    return int(m.group(1))


def per_pair(tree: Path, proto: str, n1: int, n2: int, work: Path) -> float:
    return (count(tree, proto, n2, work) - count(tree, proto, n1, work)) / (n2 - n1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.instructions", description=__doc__.split("\n")[0]
    )
    p.add_argument("trees", nargs="+", help="one or two lockd trees: a git commit or a directory")
    # lean: bench/lean.py (the tree's lockd.locks.ofd and lockd.journaling.journal, the prototype's
    # layers)
    p.add_argument("--proto", choices=["varlink", "virtlockd", "lean"], default="varlink")
    p.add_argument("--pairs", type=int, nargs=2, default=[200, 700], metavar=("N1", "N2"))
    a = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="lkinstr.", dir="/tmp"))
    try:
        trees = [materialize(spec, work / f"tree{i}") for i, spec in enumerate(a.trees)]
        for tree in trees:
            compile_tree(tree)
        compile_tree(REPO, package="bench")  # or the first run compiles it, and counts that
        n1, n2 = a.pairs
        figures = [per_pair(tree, a.proto, n1, n2, work) for tree in trees]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for spec, ir in zip(a.trees, figures, strict=True):
        print(f"{spec:<24} {a.proto:<10} {ir:>12,.0f} instructions per pair")
    if len(figures) == 2:
        print(f"B/A {figures[1] / figures[0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
