"""virtlockd, driven through the anchor's own client and helper (imported at run time).

``../shared/anchors/virtlockd`` (or ``$VIRTLOCKD_ANCHOR``) holds ``virtlockd_client.py`` (its
RPC protocol) and ``vlhelper.py`` (a private virtlockd in a mount namespace: its socket path is
fixed). They are imported from there, never copied, so both benchmarks measure virtlockd the
same way. Owners are real ``sleep`` processes, as for lockd.
"""

from __future__ import annotations

import importlib
import os
import sys
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.procs import REPO

VIRTLOCKD = "/usr/sbin/virtlockd"


def anchor_dir() -> Path:
    env = os.environ.get("VIRTLOCKD_ANCHOR")
    return Path(env) if env else REPO.parent / "shared" / "anchors" / "virtlockd"


def unavailable() -> str | None:
    """Why virtlockd cannot be measured here, or None."""
    if not os.access(VIRTLOCKD, os.X_OK):
        return f"{VIRTLOCKD} not installed (apt-get install --no-install-recommends libvirt-daemon)"
    if os.geteuid() != 0:
        return "needs root (a private mount namespace)"
    if not (anchor_dir() / "virtlockd_client.py").exists():
        return f"anchor client not found in {anchor_dir()} (set VIRTLOCKD_ANCHOR)"
    return None


def _modules() -> tuple[ModuleType, ModuleType]:
    d = str(anchor_dir())
    if d not in sys.path:
        sys.path.append(d)
    return importlib.import_module("virtlockd_client"), importlib.import_module("vlhelper")


def version() -> str:
    return os.popen(f"{VIRTLOCKD} -V").read().strip()


class Virtlockd:
    """A private virtlockd (the anchor's ``PrivateVirtlockd``)."""

    def __init__(self, base: Path) -> None:
        _, helper = _modules()
        base.mkdir(parents=True, exist_ok=True)
        self.d: Any = helper.PrivateVirtlockd(base=str(base))

    def start(self) -> None:
        self.d.start()

    @property
    def pid(self) -> int:
        return int(self.d.pid)

    @property
    def sock(self) -> str:
        return str(self.d.sock)

    def rss_kb(self) -> int:
        return int(self.d.rss_kb())

    def close(self) -> None:
        self.d.stop()


class VLDriver:
    """One virtlockd connection with a registered owner, locking one file."""

    def __init__(self, sock: str, owner_pid: int, path: str) -> None:
        client, _ = _modules()
        self.c: Any = client.LockdClient(sock)
        self.c.register(uuid.uuid4(), f"owner-{owner_pid}", 1, owner_pid)
        self.path = path

    def acquire(self) -> None:
        self.c.acquire(self.path)

    def release(self) -> None:
        self.c.release(self.path)

    def acquire_path(self, path: str) -> None:
        self.c.acquire(path)

    def release_path(self, path: str) -> None:
        self.c.release(path)

    def close(self) -> None:
        self.c.close()
