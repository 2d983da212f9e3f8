"""The crash torture's two-host mode, a short run: every violation it can name must be zero.

Theory of operation: ``python -m torture --hosts 2`` (torture/multihost.py) in a subprocess
with a fixed seed: two lockds on one real GlusterFS volume (its own test bed, so this module
must not run while another holds port 24007; pytest runs modules one after another), crashes
and storage resets of either, judged from both mounts after every cycle. On failure the
report, the violations and the tail of the run's log are shown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gluster_harness as gh
import pytest

REPO = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("TORTURE_SEED", "1"))


@pytest.mark.slow
def test_torture_two_hosts_short_run(tmp_path: Path) -> None:
    reason = gh.unavailable()
    if reason is not None:
        pytest.skip(f"cannot run a GlusterFS test bed here: {reason}")
    work = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torture",
            "--hosts",
            "2",
            "--cycles",
            "10",
            "--seed",
            str(SEED),
            "--workdir",
            str(work),
            "--progress",
            "0",
        ],  # fmt: skip
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        log = work / "torture.log"
        tail = "\n".join(log.read_text().splitlines()[-60:]) if log.exists() else ""
        pytest.fail(f"torture exited {out.returncode}\n{out.stdout}\n{out.stderr}\n{tail}")
    lines = {ln.split()[0]: ln for ln in out.stdout.splitlines() if ln and ln[0].isalpha()}
    assert lines["violations"].split()[1] == "0", out.stdout
    assert lines["cycles"].split()[1] == "10", out.stdout
    # the run did what it is for: crashes and storage resets, leases lost and re-taken
    assert "resets of" in lines["crashes"], out.stdout
    assert int(lines["crashes"].split()[1].rstrip(";")) > 0, out.stdout
    # lockctl verify ran on both hosts at the end and found no drift (violations 0)
    assert "lockctl verify 2 at the end" in lines["checks"], out.stdout
    print(out.stdout)
