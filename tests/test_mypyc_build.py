"""The optional compiled build (setup.py, LOCKD_MYPYC=1) still builds and serves.

`make test` runs lockd in pure Python; `make test-mypyc` runs the suite against the compiled
build, and `make bench BENCH_ARGS=--mypyc` measures it. Neither is part of CI, so a change
that mypyc cannot compile went unnoticed once (a `reversed()` over a list of dicts:
"internal mypyc error", at the bench). This test builds it with scripts/build-mypyc.sh at
gcc -O0 (``LOCKD_MYPYC_OPT=0``: the same C from mypyc, compiled in about a third of the time
of the -O3 build that bench and test-mypyc use), starts that daemon, checks from /proc that
it runs the compiled modules, and takes and releases a lock, probed from outside.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import e2e
import pytest
from e2e import Daemon, Owners, make_files, probe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compiled_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    dest = tmp_path_factory.mktemp("mypyc") / "tree"
    build = subprocess.run(
        [str(REPO / "scripts" / "build-mypyc.sh"), str(REPO), str(dest)],
        env=dict(os.environ, LOCKD_MYPYC_OPT="0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    return dest


def test_compiled_build_serves(
    compiled_tree: Path,
    make_daemon: Callable[..., Daemon],
    owners: Owners,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(e2e, "TREE", compiled_tree)  # the daemon's cwd: first on its sys.path
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
