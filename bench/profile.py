"""Sampling profiles of the daemon with py-spy (``pip install py-spy``; needs ptrace, i.e. root).

:func:`record` attaches ``py-spy record --format raw`` to a pid for the length of a ``with``
block; :func:`summarize` turns the collapsed stacks into the top functions by self and by
inclusive samples, which is what the benchmark prints and stores next to the raw stacks (load
them into speedscope or flamegraph.pl for a picture).
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def record(pid: int, out: Path, rate: int = 250, native: bool = False) -> Iterator[None]:
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
    argv = [exe, "record", "-p", str(pid), "-r", str(rate), "--format", "raw", "-o", str(out)]
    # --native unwinds C frames, which needs the process paused while sampling
    argv += ["--native"] if native else ["--nonblocking"]
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)  # the profile runs before the results are written
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=err, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not out.exists():
        raise RuntimeError(f"py-spy wrote no profile: {log.read_text()[-2000:]}")


def _frame(name: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    func, _, where = name.partition(" (")
    return f"{func} ({where.rsplit('/', 1)[-1]}" if where else func


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    self_n: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    by_func: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_n[frames[-1]] += n
        by_func[frames[-1].split(" (")[0]] += n
        for f in set(frames):
            incl[f] += n

    def share(c: collections.Counter[str]) -> list[tuple[float, str]]:
        return [(round(100 * v / total, 1), k) for k, v in c.most_common(top)] if total else []

    return {
        "samples": total,
        "self": share(self_n),
        "self_by_function": share(by_func),
        "inclusive": share(incl),
    }


def render(title: str, summary: dict[str, Any], top: int = 15) -> str:
    lines = [
        f"### {title} ({summary['samples']} samples)",
        "",
        "| self % | function |",
        "|---|---|",
    ]
    lines += [f"| {p} | `{f}` |" for p, f in summary["self"][:top]]
    lines += ["", "| inclusive % | function |", "|---|---|"]
    lines += [f"| {p} | `{f}` |" for p, f in summary["inclusive"][:top]]
    return "\n".join(lines)
