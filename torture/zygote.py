"""The fork server ("zygote") that starts lockd daemons in a few milliseconds.

Theory of operation: a fresh ``python -m lockd.daemon`` spends ~0.3 s importing (sqlite_utils,
asyncio) before it does anything; at a thousand crash/restart cycles, twice per cycle for the
recovery failpoints, that is most of the torture budget. This process imports
:mod:`lockd.daemon` once, single-threaded, and then forks one child per start. The child
sets the daemon's environment, re-reads the failpoint spec (``lockd.failpoint`` parses
``$LOCKD_FAILPOINT`` at import, so it is reloaded), points stdout/stderr at the daemon log and
calls ``lockd.daemon.main(argv)`` exactly as ``python -m lockd.daemon`` would; an uncaught
exception prints its traceback and exits 1, as the interpreter does. Nothing else in lockd
reads the environment at import time. The child asks for SIGKILL when the zygote dies
(``PR_SET_PDEATHSIG``), and the zygote exits when the harness closes its stdin, so no daemon
outlives a harness that was itself killed.

Protocol (JSON lines on stdin/stdout): ``{"spawn": {"argv", "env", "log"}}`` answers
``{"pid": N}``; ``{"reap": N}`` blocks in ``waitpid`` and answers ``{"rc": R}`` with
subprocess's convention (negative: killed by that signal). A child is reaped only when the
harness asks, so its pid cannot be reused while the harness holds it (it uses a pidfd).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import traceback
from typing import Any

PR_SET_PDEATHSIG = 1


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    try:
        # die with the zygote (which dies with the harness): no daemon outlives a killed run
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        os.close(null)
        os.environ.clear()
        os.environ.update(env)
        from lockd import daemon, failpoint

        importlib.reload(failpoint)
        rc = daemon.main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        rc = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc)


def main() -> None:
    import lockd.ctl.cli  # noqa: F401  (warm imports the daemon may make lazily)
    import lockd.daemon  # noqa: F401

    for line in sys.stdin:
        req: dict[str, Any] = json.loads(line)
        if "spawn" in req:
            spec = req["spawn"]
            pid = os.fork()
            if pid == 0:
                _child(spec["argv"], spec["env"], spec["log"])
            reply: dict[str, Any] = {"pid": pid}
        elif "reap" in req:
            _, status = os.waitpid(int(req["reap"]), 0)
            reply = {"rc": os.waitstatus_to_exitcode(status)}
        else:
            reply = {"error": f"bad request {req!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
