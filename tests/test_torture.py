"""The crash-torture harness, short runs: every violation it can name must be zero.

Theory of operation: ``python -m torture`` (see torture/__init__.py) runs in a subprocess of
its own (it starts threads, owner processes, a competitor and a zygote, and sets lockd.client's
backoff), with a fixed seed so that a failure names a plan to replay
(``make torture TORTURE_ARGS='--seed S --cycles N'``). Forty cycles cross every failpoint of
``lockd.failpoint.POINTS`` at least once; a few more start the daemon the way systemd does
(``--spawn exec``) instead of through the zygote. On failure the harness's report, the
violations and the tail of its log are shown, and the work directory is left in tmp_path.

Below them, each race the harness found, reduced to a deterministic reproduction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from e2e import Daemon, Owners

REPO = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("TORTURE_SEED", "1"))


def run_torture(workdir: Path, *args: str, timeout: float = 300) -> str:
    cmd = [sys.executable, "-m", "torture", "--seed", str(SEED), "--workdir", str(workdir)]
    out = subprocess.run(
        [*cmd, "--progress", "0", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if out.returncode != 0:
        log = workdir / "torture.log"
        tail = "\n".join(log.read_text().splitlines()[-80:]) if log.exists() else ""
        pytest.fail(
            f"torture exited {out.returncode}\n{out.stdout}\n{out.stderr}\n"
            f"----- torture.log (tail) -----\n{tail}"
        )
    return out.stdout


def figure(report: str, name: str) -> int:
    line = next(ln for ln in report.splitlines() if ln.startswith(name))
    return int(line.split()[1])


@pytest.mark.slow
def test_torture_short_run(tmp_path: Path) -> None:
    from lockd.failpoint import POINTS

    report = run_torture(tmp_path / "run", "--cycles", "40", "--lockctl-every", "10")
    assert figure(report, "violations") == 0
    assert figure(report, "cycles") == 40
    # every failpoint was armed at least once ("name fired/armed, ..."), and most fired (one
    # not reached in time is replaced by a SIGKILL and counted as armed only)
    line = next(ln for ln in report.splitlines() if ln.startswith("failpoints"))
    counts = dict(item.rsplit(" ", 1) for item in line.split(": ", 1)[1].split(", "))
    assert set(counts) == set(POINTS), line
    fired = armed = 0
    for point, fa in counts.items():
        f, a = map(int, fa.split("/"))
        assert a >= 1, f"{point} never armed: {line}"
        fired, armed = fired + f, armed + a
    assert fired >= armed - 2, line
    assert figure(report, "crashes") >= 40
    assert "lockctl verify 1," in report  # run at the end, and found no drift (violations 0)
    assert figure(report, "operations") > 500


@pytest.mark.slow
def test_torture_exec_spawn(tmp_path: Path) -> None:
    """The same checks with ``python -m lockd.daemon`` started afresh for every restart."""
    report = run_torture(tmp_path / "run", "--cycles", "6", "--spawn", "exec")
    assert figure(report, "violations") == 0
    assert figure(report, "cycles") == 6


def wait_stopped(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in "tT":
            return
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.001)


def test_release_all_racing_owner_death(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    """ReleaseAll and the owner's death seen in one event-loop iteration.

    The daemon is frozen (SIGSTOP) while the ReleaseAll is queued on an already accepted
    connection and the owner is killed, so that when it runs again the socket and then the
    owner's pidfd are ready together: the ReleaseAll handler resolves the owner and yields in
    gather(), owner_died() runs, then the gathered release() calls find the leases RELEASING.
    The answer must be the released leases or NoSuchOwner, never an internal error.
    """
    owner = owners.spawn()
    uuid = daemon.register(owner.pid)["uuid"]
    for f in files[:2]:
        daemon.acquire(f, owner=uuid)
    with daemon.connect() as c:
        c.call("org.varlink.service.GetInfo")  # accepted: the loop now reads this connection
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            wait_stopped(daemon.pid)  # kill(2) returns before the target has stopped
            call = {"method": "io.lockd.ReleaseAll", "parameters": {"owner": uuid}}
            c.send_raw(json.dumps(call).encode() + b"\0")
            Owners.kill(owner)
            time.sleep(0.05)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        reply = c.recv_message()
    assert reply.get("error") in (None, "io.lockd.NoSuchOwner"), reply
    daemon.assert_alive()
