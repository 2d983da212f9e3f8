"""Fixtures for the end-to-end tests (the harness itself is in tests/e2e.py)."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from e2e import Daemon, Owners, make_files  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    # Failpoints abort the daemon on purpose: no core files for those.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


# Files whose tests take a machine-wide resource: glusterd's fixed port 24007
# (gluster_harness), the containers with systemd as PID 1 and libvirtd, the package
# installs, the README's namespaces. `make test` runs every other file on two xdist
# workers, then these (marker `machine_wide`) one after another in one process: under two
# workers they met each other's beds and overlays (test_sharedfs found port 24007 taken, two
# package tests found lockctl gone from their host's overlay).
MACHINE_WIDE = {
    "test_cluster.py",
    "test_deb.py",
    "test_libvirt.py",
    "test_readme.py",
    "test_sharedfs.py",
    "test_systemd.py",
    "test_torture_multihost.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.name in MACHINE_WIDE:
            item.add_marker(pytest.mark.machine_wide)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A short directory for UNIX sockets (sun_path is 108 bytes; tmp_path can be longer)."""
    d = Path(tempfile.mkdtemp(prefix="lkd", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def make_daemon(
    request: pytest.FixtureRequest, tmp_path: Path, runtime_dir: Path
) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``make_daemon(config=None, start=True)``; every daemon is killed at teardown,
    and its stderr is printed if the test failed."""
    made: list[Daemon] = []

    def make(
        config: str | None = None, start: bool = True, state_dir: Path | None = None
    ) -> Daemon:
        n = len(made)
        base = tmp_path / f"daemon{n}"
        run = runtime_dir / str(n)
        base.mkdir()
        run.mkdir()
        d = Daemon(base, run, config=config, state_dir=state_dir)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    failed = getattr(request.node, "rep_call", None)
    for d in made:
        if failed is not None and failed.failed:
            print(f"\n{d.base}:\n{d.stderr_tail(200)}")
        d.close()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    """A running lockd with the default config."""
    return make_daemon()


@pytest.fixture
def owners() -> Iterator[Owners]:
    o = Owners()
    yield o
    o.close()


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    """Eight resource files (stand-ins for disk images)."""
    return make_files(tmp_path / "res", 8)
