"""The optional compiled build (setup.py, LOCKD_MYPYC=1) still translates, and serves.

`make test` runs lockd in pure Python; `make test-mypyc` runs the suite against the compiled
build, and `make bench BENCH_ARGS=--mypyc` measures it. A change that mypyc cannot compile
went unnoticed once (a `reversed()` over a list of dicts: "internal mypyc error", at the
bench), so `make test` has mypyc translate the compiled modules to C, in a copy of the tree,
as setup.py does: that is where such an error shows, in about a third of the time of a
whole build (gcc compiling the C is the rest, and it does not fail on what mypyc wrote).
Under `make test-mypyc`, whose daemons run from the compiled tree, a second test checks from
/proc that the daemon really runs the compiled modules, and takes and releases a lock,
probed from outside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import e2e
import pytest
from e2e import Daemon, Owners, make_files, probe

REPO = Path(__file__).resolve().parent.parent


def test_mypyc_translates_the_compiled_modules(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("lockd", "schema", "setup.py", "pyproject.toml", "README.md"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, tree / name, symlinks=True)
        else:
            shutil.copy2(src, tree / name)
    # importing setup.py with LOCKD_MYPYC=1 runs mypycify: type check, IR, C; `--name`
    # then ends setup() without building anything
    out = subprocess.run(
        [sys.executable, "setup.py", "-q", "--name"],
        cwd=tree,
        env=dict(os.environ, LOCKD_MYPYC="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert list((tree / "build").glob("__native*.c")), "mypyc wrote no C"


def test_compiled_build_serves(
    make_daemon: Callable[..., Daemon], owners: Owners, tmp_path: Path
) -> None:
    if e2e.TREE == REPO:
        pytest.skip("the compiled build serving: make test-mypyc (LOCKD_E2E_TREE)")
    d = make_daemon()
    maps = Path(f"/proc/{d.pid}/maps").read_text()
    assert "__mypyc" in maps, "the daemon did not load the compiled modules"
    (disk,) = make_files(tmp_path, 1)
    owner = d.register(owners.spawn().pid)["uuid"]
    lease = d.acquire(disk, owner=owner)
    assert probe(disk) == "exclusive"
    d.kill()
    d.start()  # recovery, compiled too
    assert probe(disk) == "exclusive"
    assert d.release(disk, owner=owner)["token"] == lease["token"]
    assert probe(disk) == "free"
