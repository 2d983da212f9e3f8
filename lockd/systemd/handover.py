"""Re-exec in place: the daemon executes itself again, keeping every fd open.

Theory of operation (DESIGN §5, upgrades): ``execve`` keeps the pid and every fd without
``FD_CLOEXEC``, and an OFD lock belongs to its open file description, so a lease fd that
crosses the exec keeps its lock with no gap at all. The listening sockets cross too:
connections that arrive meanwhile wait in their backlog and are accepted by the new image.

What crosses is described by a JSON map (``{"sockets": {name: fd}, "leases": {FDNAME: fd},
"fd_store": bool}``) in a memfd whose number is in ``$LOCKD_HANDOVER_FD``. A memfd rather
than the environment because the map has one entry per lease and a single environment
string is capped at 128 KiB (MAX_ARG_STRLEN); virtlockd's re-exec state, capped at 10 MiB,
loses every lock past it. The map has no such cap.

The journal is the state; the map only says which fd is which. The new image runs the
normal recovery with the handed-over fds as if they came from systemd's fd store: every
lease is adopted (continuity ``kept``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import NoReturn

import orjson

ENV = "LOCKD_HANDOVER_FD"


@dataclass
class Handover:
    sockets: dict[str, int] = field(default_factory=dict)
    leases: dict[str, int] = field(default_factory=dict)
    fd_store: bool = False


def reexec(handover: Handover) -> NoReturn:
    """Replace this process with a fresh lockd that inherits ``handover``'s fds."""
    data = orjson.dumps(
        {"sockets": handover.sockets, "leases": handover.leases, "fd_store": handover.fd_store}
    )
    mfd = os.memfd_create("lockd-handover", 0)  # no MFD_CLOEXEC: it must cross the exec
    os.write(mfd, data)
    os.lseek(mfd, 0, os.SEEK_SET)
    for fd in (*handover.sockets.values(), *handover.leases.values()):
        os.set_inheritable(fd, True)
    env = dict(os.environ)
    env[ENV] = str(mfd)
    # sys.orig_argv is the command line this interpreter was started with (python -m
    # lockd.daemon ..., or the console script): the new image starts exactly as we did.
    os.execve(sys.executable, sys.orig_argv, env)


def take() -> Handover | None:
    """The fds handed over by a previous image, or None if this is a fresh start."""
    value = os.environ.pop(ENV, None)
    if value is None:
        return None
    mfd = int(value)
    chunks = []
    while chunk := os.read(mfd, 1 << 20):
        chunks.append(chunk)
    os.close(mfd)
    raw = orjson.loads(b"".join(chunks))
    h = Handover(
        sockets={str(k): int(v) for k, v in raw["sockets"].items()},
        leases={str(k): int(v) for k, v in raw["leases"].items()},
        fd_store=bool(raw["fd_store"]),
    )
    for fd in (*h.sockets.values(), *h.leases.values()):
        os.set_inheritable(fd, False)  # back to close-on-exec, like every fd we open
    return h
