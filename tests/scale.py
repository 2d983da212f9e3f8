"""How big the tests are: small in ``make test``, full size in ``make test-scale``.

A test marked ``@pytest.mark.scale`` runs in both. ``make test`` runs every path at a size
that takes seconds (a maintainer reruns the whole suite; CI's budget is 8 minutes on a fresh
machine); ``make test-scale`` sets ``LOCKD_TEST_SCALE=1`` and runs only the marked tests, at
the size the figures in the docs were measured at (10,000 leases under systemd, a 20-second
symlink race, 100,000 fuzzed messages). The same assertions hold at both sizes.
"""

from __future__ import annotations

import os

FULL = os.environ.get("LOCKD_TEST_SCALE") == "1"


def size(fast: int, full: int) -> int:
    """``full`` under ``make test-scale``, ``fast`` otherwise."""
    return full if FULL else fast
