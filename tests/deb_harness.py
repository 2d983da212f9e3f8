"""The Debian package under test: built once per source tree, installed in a private host.

- :func:`built` -- ``make deb``'s script (``scripts/build-deb.sh``) run on this checkout,
  twice: as ``lockd.__version__`` and as a higher version (``+test1``), the upgrade's
  package. Both go to ``build/deb/<hash of the tracked sources>/``, so a second test run on an
  unchanged tree builds nothing (both builds, side by side: 79 s measured with a warm pip
  cache; lintian is left to ``make deb``).
- :class:`PackageHost` -- :class:`sd_harness.SystemManager` (systemd 252 as PID 1 in private
  namespaces) with ``OVERLAY=1``: ``/usr`` and ``/var`` are overlays of the host's, so ``dpkg``
  and ``apt-get`` install, upgrade, remove and purge for real while the host's dpkg database,
  ``/usr`` and ``/etc`` are never written (the upper layers and the copy of ``/etc`` live in
  the manager's work directory, removed at the end). None of lockd's units is there until
  the package installs them.
- :func:`debs_from_debian` -- Debian's own packages (needrestart and what it needs, the
  libraries lockd maps) fetched with ``apt-get download`` into ``build/deb/debian/``: the
  private host has no network, and installing them on the host is not ours to do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import sd_harness as sd

REPO = sd.REPO
BUILD = REPO / "build" / "deb"
SCRIPT = REPO / "scripts" / "build-deb.sh"


def current_version() -> str:
    for line in (REPO / "lockd" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__ = "):
            return line.split('"')[1]
    raise AssertionError("no __version__ in lockd/__init__.py")


def source_hash() -> str:
    """A hash of what the package is built from: every file build-deb.sh copies."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.split(b"\0")  # fmt: skip
    h = hashlib.sha256()
    for name in sorted(n for n in names if n):
        p = REPO / os.fsdecode(name)
        h.update(name + b"\0")
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def built() -> tuple[Path, Path]:
    """(the package as this tree's version, the same as a higher version); the two builds
    run side by side."""
    out = BUILD / source_hash()
    versions = (current_version(), f"{current_version()}+test1")
    runs = {}
    for version in versions:
        if not list(out.glob(f"lockd_{version}_*.deb")):
            env = dict(os.environ, OUT=str(out), LOCKD_VERSION=version, LOCKD_NO_LINTIAN="1")
            runs[version] = subprocess.Popen(
                ["sh", str(SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
    for version, proc in runs.items():
        log, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"make deb ({version}) failed:\n{log}"
    for stale in BUILD.glob("?" * 16):  # the packages of trees that are gone
        if stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    old, new = (sorted(out.glob(f"lockd_{v}_*.deb"))[0] for v in versions)
    return old, new


def debs_from_debian(*packages: str) -> list[Path]:
    """Debian's .debs of ``packages`` (the versions apt would install), downloaded once."""
    where = BUILD / "debian"
    where.mkdir(parents=True, exist_ok=True)
    missing = [p for p in packages if not list(where.glob(f"{p}_*.deb"))]
    if missing:
        r = subprocess.run(
            ["apt-get", "download", *missing], cwd=where, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download {' '.join(missing)}: {r.stderr.strip()}")
    return [sorted(where.glob(f"{p}_*.deb"))[-1] for p in packages]


class PackageHost(sd.SystemManager):
    """A private Debian 12 host under systemd 252 on which packages really install."""

    def __init__(self) -> None:
        super().__init__()
        for name in sd.UNITS:  # the package brings lockd's units
            (self.units / name).unlink()
        self.debs = self.shared / "debs"
        self.debs.mkdir()

    def script_env(self) -> dict[str, str]:
        return dict(super().script_env(), OVERLAY="1", BIN_DIR="")

    def apt(
        self, *args: str, env: str = "", check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``apt-get ARGS`` inside, never asking and with no recommends (there is no network
        there); ``env``: ``VAR=value ...`` for it."""
        cmd = f"{env} DEBIAN_FRONTEND=noninteractive apt-get -y -q --no-install-recommends"
        return self.run_inside("/bin/sh", "-c", f"{cmd} {' '.join(args)}", check=check)

    def offer(self, deb: Path) -> str:
        """Put ``deb`` where the host sees it; its path inside."""
        shutil.copy(deb, self.debs / deb.name)
        return str(self.debs / deb.name)

    def status_inside(self) -> dict[str, object]:
        """The packaged ``lockctl status -J``, run inside."""
        import json

        out = self.run_inside("lockctl", "status", "-J")
        st: dict[str, object] = json.loads(out.stdout)["status"]
        return st
