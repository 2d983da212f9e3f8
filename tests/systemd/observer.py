"""The observer: polls byte 0 of many files with F_OFD_GETLK and counts what it sees free.

    python observer.py LISTFILE [INTERVAL]

LISTFILE holds one path a line. The observer opens each file once (read-only, so it can never
hold a lock that matters: F_OFD_GETLK only asks), prints ``ready N``, then sweeps all of them,
sleeps INTERVAL seconds (default 0.002), and again, until a line ``stop`` (or EOF) arrives on
stdin; it then prints one JSON line: the sweeps' CLOCK_MONOTONIC (start, end), how many
probes found byte 0 free (no lock conflicting with F_WRLCK), a few of those files, and the
fewest locked files seen in one sweep. It imports nothing of lockd: it sees only the kernel.
"""

import fcntl
import json
import os
import select
import struct
import sys
import time

F_OFD_GETLK = 36
FLOCK = "hhqqi4x"  # struct flock on x86_64/aarch64: type, whence, start, len, pid
QUERY = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)


def main() -> None:
    with open(sys.argv[1]) as f:
        paths = [line.rstrip("\n") for line in f if line.strip()]
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.002
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK) for p in paths]
    unlck = fcntl.F_UNLCK
    getlk = fcntl.fcntl
    unpack = struct.unpack
    sweeps: list[tuple[float, float]] = []
    free = 0
    examples: list[str] = []
    min_held = len(fds)
    print(f"ready {len(fds)}", flush=True)
    while True:
        t0 = time.monotonic()
        held = 0
        for i, fd in enumerate(fds):
            if unpack(FLOCK, getlk(fd, F_OFD_GETLK, QUERY))[0] == unlck:
                free += 1
                if len(examples) < 10:
                    examples.append(f"{paths[i]} at {time.monotonic():.6f}")
            else:
                held += 1
        t1 = time.monotonic()
        sweeps.append((t0, t1))
        min_held = min(min_held, held)
        r, _, _ = select.select([sys.stdin], [], [], interval)
        if r:
            line = sys.stdin.readline()
            if not line or line.strip() == "stop":
                break
    print(
        json.dumps(
            {
                "files": len(fds),
                "probes": len(fds) * len(sweeps),
                "sweeps": sweeps,
                "free": free,
                "free_examples": examples,
                "min_held": min_held,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
