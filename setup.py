"""The optional compiled build: ``LOCKD_MYPYC=1`` compiles lockd's hot path with mypyc.

Everything else about the package is in pyproject.toml; this file only adds extension
modules, and only when asked. By default (and for every editable install, so ``make test``
runs the source you edit) lockd is pure Python. With ``LOCKD_MYPYC=1`` the modules below,
every step from a Varlink call's bytes to its journal commit and recovery, are compiled to
C extensions from the same source, type-checked by ``mypy --strict`` as they are:

    LOCKD_MYPYC=1 pip install --no-build-isolation .   # needs mypy (the [test] extra) and gcc

``LOCKD_MYPYC_OPT`` sets mypyc's C optimization level (default 3; 0 compiles ~3x faster).

The other modules (the entry points, configuration, errors, the client) stay interpreted:
``python -m`` cannot run a compiled module, and exception classes must stay Python classes.
bench/README.md has the measured difference; ``make test-mypyc`` runs the tests against it.
"""

from __future__ import annotations

import os

from setuptools import setup

# the request path of both front ends, the journal and recovery (lockd/<name>.py)
MYPYC_MODULES = (
    "frontends/connection",
    "wire/varlink",
    "wire/virtlockd_rpc",
    "frontends/virtlockd_server",
    "locks/leases",
    "locks/lockspace",
    "locks/ofd",
    "journaling/journal",
    "journaling/groupcommit",
    "service/service",
    "service/owners",  # LockService's base class: a native class needs native bases
    "frontends/server",
    "service/recovery",
)

ext_modules = []
if os.environ.get("LOCKD_MYPYC") == "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(
        [f"lockd/{name}.py" for name in MYPYC_MODULES],
        opt_level=os.environ.get("LOCKD_MYPYC_OPT", "3"),
    )

setup(ext_modules=ext_modules)
