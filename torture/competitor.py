"""The competitor: another lock holder that grabs whatever lockd leaves free.

Theory of operation: a separate process (like a second lock manager, or a QEMU that does
its own locking) that every few milliseconds tries ``F_OFD_SETLK`` on byte 0 of a random
pool file it does not hold, exclusive (F_WRLCK) or shared (F_RDLCK), never waiting, and
holds what it gets for a random short time. It holds at most ``--max-held`` files at once,
so it takes some of the resources a dead daemon drops, not all of them: after a crash some
leases are re-taken and some are lost, and each loss must be one the competitor really took.

It logs every hold as an interval ``[path, mode, t_from, t_to]`` in CLOCK_MONOTONIC (one clock
for all processes of the host): ``t_from`` is read *before* the SETLK and ``t_to`` *after*
the close, so each interval contains the true holding time. The harness drives it over
stdin/stdout with JSON lines: ``"pause"`` freezes it (no grab, no release: the kernel view
stays still while the checker reads it) and answers ``{"held": {path: mode}, "intervals":
[...]}`` with the intervals closed since the last report plus the open ones (``t_to`` null);
``"resume"`` lets it go on; end of input releases everything and exits.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import random
import select
import sys
import time
from typing import Any

from torture.kernel import F_OFD_SETLK, flock


class Competitor:
    def __init__(self, files: list[str], args: argparse.Namespace) -> None:
        self.files = files
        self.rng = random.Random(args.seed)
        self.max_held = args.max_held
        self.tick = args.tick
        self.hold = (args.hold_min, args.hold_max)
        self.p_exclusive = args.p_exclusive
        # path -> (fd, mode, t_from, release_at)
        self.held: dict[str, tuple[int, str, float, float]] = {}
        self.closed: list[list[Any]] = []
        self.grabs = 0

    def grab(self) -> None:
        free = [p for p in self.files if p not in self.held]
        if not free or len(self.held) >= self.max_held:
            return
        path = self.rng.choice(free)
        exclusive = self.rng.random() < self.p_exclusive
        t_from = time.monotonic()
        fd = os.open(path, (os.O_RDWR if exclusive else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            fcntl.fcntl(fd, F_OFD_SETLK, flock(fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK))
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return
        mode = "exclusive" if exclusive else "shared"
        self.held[path] = (fd, mode, t_from, time.monotonic() + self.rng.uniform(*self.hold))
        self.grabs += 1

    def release(self, path: str) -> None:
        fd, mode, t_from, _ = self.held.pop(path)
        os.close(fd)  # the last fd of the open file description: the OFD lock goes
        self.closed.append([path, mode, t_from, time.monotonic()])

    def expire(self) -> None:
        now = time.monotonic()
        for path in [p for p, h in self.held.items() if h[3] <= now]:
            self.release(path)

    def report(self) -> dict[str, Any]:
        intervals = self.closed + [[p, h[1], h[2], None] for p, h in self.held.items()]
        self.closed = []
        return {
            "held": {p: h[1] for p, h in self.held.items()},
            "intervals": intervals,
            "grabs": self.grabs,
        }

    def run(self) -> None:
        paused = False
        stdin = sys.stdin.fileno()
        buf = b""
        while True:
            r, _, _ = select.select([stdin], [], [], None if paused else self.tick)
            if r:
                chunk = os.read(stdin, 4096)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    cmd = line.decode().strip()
                    if cmd == "pause":
                        paused = True
                        reply: dict[str, Any] = self.report()
                    elif cmd == "resume":
                        paused = False
                        reply = {"ok": True}
                    else:
                        reply = {"error": cmd}
                    sys.stdout.write(json.dumps(reply) + "\n")
                    sys.stdout.flush()
            if not paused:
                self.expire()
                self.grab()
        for path in list(self.held):
            self.release(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="torture.competitor")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-held", type=int, default=2)
    p.add_argument("--tick", type=float, default=0.003)
    p.add_argument("--hold-min", type=float, default=0.005)
    p.add_argument("--hold-max", type=float, default=0.080)
    p.add_argument("--p-exclusive", type=float, default=0.75)
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    Competitor(args.files, args).run()


if __name__ == "__main__":
    main()


class CompetitorProc:
    """The harness's handle on the competitor process."""

    def __init__(self, files: list[str], seed: int, max_held: int) -> None:
        import subprocess

        from torture.daemonctl import REPO

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torture.competitor", "--seed", str(seed),
             "--max-held", str(max_held), *files],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.grabs = 0

    def _ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the competitor died (rc {self.proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def pause(self) -> dict[str, Any]:
        report = self._ask("pause")
        self.grabs = int(report["grabs"])
        return report

    def resume(self) -> None:
        self._ask("resume")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
