"""``python -m bench.sharedfs``: what verifying held leases on shared storage costs.

Theory of operation: a real GlusterFS volume (``tests/gluster_harness.py``) mounted through
FUSE; one lockd (``tests/e2e.py``'s harness: a real daemon subprocess) holds ``--leases``
exclusive leases in an indirect lockspace on it and verifies them every ``--interval``
seconds (``verify_interval``). Two figures per setting, each over ``--seconds`` of an idle
daemon (no client calls):

- **wall time of one sweep**, from the daemon's own DEBUG line ("verified N leases on shared
  storage in X ms"): how long the event loop is busy with it (one probe is a system call
  that goes through FUSE to the brick and back);
- **CPU time** of the daemon (utime + stime from /proc/PID/stat) per sweep, against the
  same daemon with ``verify_interval = 0`` over the same time: what it costs the host.

Settings: GlusterFS with ``client.strict-locks on`` (one ``F_OFD_GETLK`` on the lease's own
fd), GlusterFS with ``off`` allowed by ``allow_unsafe_storage`` (the same plus a GETLK from
a fresh fd of the lease file, which sees a silent drop), and a local ext4 directory forced
shared (``shared_lockspaces``), for the floor. Needs root, the glusterfs packages and TCP
port 24007 (one bed per machine).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import gluster_harness as gh  # noqa: E402
from e2e import Daemon  # noqa: E402

SWEEP = re.compile(r"verified (\d+) leases on shared storage in ([0-9.]+) ms")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(lockspace_dir: Path, extra: str, n: int, interval: float, seconds: float) -> dict:
    """Start lockd with n leases in ``lockspace_dir``; sweep wall times and CPU per sweep."""
    out: dict[str, float] = {}
    owner = subprocess.Popen(["sleep", "100000"])
    with tempfile.TemporaryDirectory(prefix="lkd-bench.") as tmp:
        base = Path(tmp)
        run = Path(tempfile.mkdtemp(prefix="lbs", dir="/tmp"))
        try:
            for verify in (0.0, interval):
                (run / f"v{verify}").mkdir()
                d = Daemon(
                    base / f"v{verify}",
                    run / f"v{verify}",
                    config=f'verify_interval = {verify}\nlog_level = "DEBUG"\n{extra}\n'
                    f'[lockspaces]\nshared = "{lockspace_dir}"\n',
                )
                try:
                    d.start()
                    uuid = d.register(owner.pid)["uuid"]
                    with d.connect() as c:
                        for i in range(n):
                            c.call(
                                "io.lockd.Acquire",
                                {"resource": f"vm{i}", "owner": uuid, "lockspace": "shared"},
                            )
                    time.sleep(interval)  # a sweep may still be running the first batch
                    c0 = cpu_seconds(d.pid)
                    time.sleep(seconds)
                    out[f"cpu_{verify}"] = cpu_seconds(d.pid) - c0
                    sweeps = [
                        (int(m.group(1)), float(m.group(2)))
                        for m in SWEEP.finditer(d.stderr_text())
                        if int(m.group(1)) == n
                    ]
                    if verify:
                        out["sweeps"] = len(sweeps)
                        out["sweep_ms"] = statistics.median(ms for _, ms in sweeps)
                    with d.connect() as c:
                        c.call("io.lockd.ReleaseAll", {"owner": uuid})
                finally:
                    d.close()
        finally:
            owner.kill()
            owner.wait()
            subprocess.run(["rm", "-rf", str(run)], check=False)
    n_sweeps = out["sweeps"] or 1
    out["cpu_per_sweep_ms"] = (out[f"cpu_{interval}"] - out["cpu_0.0"]) / n_sweeps * 1000
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sharedfs", description=__doc__)
    p.add_argument("--leases", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--interval", type=float, default=1.0, help="verify_interval (1 s)")
    p.add_argument("--seconds", type=float, default=10.0, help="idle time measured (10 s)")
    a = p.parse_args(argv)
    reason = gh.unavailable()
    if reason is not None:
        print(f"bench.sharedfs: cannot run a GlusterFS bed here: {reason}", file=sys.stderr)
        return 2
    rows = []
    with gh.GlusterBed(options={"client.strict-locks": "on"}) as bed:
        for setting in ("gluster strict-locks on", "gluster strict-locks off (allowed)", "ext4"):
            if setting.startswith("gluster strict-locks off"):
                bed.set_option("client.strict-locks", "off")
                bed.remount("a")
            for n in a.leases:
                if setting == "ext4":
                    where = Path(tempfile.mkdtemp(prefix="lkd-bench-local."))
                    extra = 'shared_lockspaces = ["shared"]'
                else:
                    where = bed.mount("a") / f"ls-{len(rows)}"
                    where.mkdir()
                    extra = 'allow_unsafe_storage = ["shared"]' if "off" in setting else ""
                r = measure(where, extra, n, a.interval, a.seconds)
                rows.append((setting, n, r))
                print(
                    f"{setting:38s} {n:6d} leases: sweep {r['sweep_ms']:8.2f} ms wall "
                    f"({r['sweep_ms'] / n * 1000:6.1f} us/lease), CPU {r['cpu_per_sweep_ms']:8.2f}"
                    f" ms/sweep ({r['cpu_per_sweep_ms'] / n * 1000:6.1f} us/lease), "
                    f"{int(r['sweeps'])} sweeps",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
