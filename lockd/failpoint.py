"""Failpoints: abort the daemon at a named step, so tests can crash it exactly there.

Theory of operation: ``LOCKD_FAILPOINT`` names one or more points, comma-separated; ``name@N``
fires on the N-th time the point is reached (default: the first). When an armed point is
reached, the daemon calls :func:`os.abort` (SIGABRT, like a real abort on OOM) without
flushing or closing anything. The environment is read once, at import; unarmed, ``hit`` is
the dictionary's own ``get`` (one lookup, no Python frame), which is all a production daemon
pays.

Every point the daemon has is listed in ``POINTS``; tests iterate over it, so a new point
cannot be added without being tested. The names follow the crash protocol (DESIGN §4–5).
"""

from __future__ import annotations

import os
from collections.abc import Callable

POINTS: tuple[str, ...] = (
    "acquire.before-lock",
    "acquire.after-lock",  # kernel lock held, nothing journaled
    "acquire.after-commit",  # journaled, no reply sent
    "release.before-commit",
    "release.after-commit",  # release journaled, fd still open (the kernel lock still held)
    "release.after-close",  # fd closed, no reply sent
    "owner-death.before-commit",
    "owner-death.after-commit",
    "recovery.before-replay",
    "recovery.mid-replay",  # after the first journaled lease was locked again
    "recovery.before-ready",
)

ENV = "LOCKD_FAILPOINT"


def _parse(spec: str) -> dict[str, int]:
    armed: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, nth = item.partition("@")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown failpoint {name!r} (known: {', '.join(POINTS)})")
        armed[name] = int(nth) if nth else 1
    return armed


def armed_from_env() -> dict[str, int]:
    """The armed points; ValueError names an unknown one (the daemon refuses to start)."""
    return _parse(os.environ.get(ENV, ""))


try:
    _armed: dict[str, int] = armed_from_env()
except ValueError:
    _armed = {}  # lockd.daemon calls armed_from_env() again and reports the error


def _hit(name: str) -> None:
    """Abort here if ``name`` is armed and this is its N-th hit."""
    left = _armed.get(name)
    if left is None:
        return
    if left > 1:
        _armed[name] = left - 1
        return
    os.abort()


# ``hit(name)``: with no failpoint armed (always, outside tests) the dictionary's own get, a
# call into C that returns None, not a Python function: the request path passes six
# failpoints per acquire+release pair
hit: Callable[[str], object] = _hit if _armed else _armed.get
