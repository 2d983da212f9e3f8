"""Every snippet in the README and in docs/ runs as written (issue 12), against a real lockd;
every relative link there names a file of the repository.

Theory of operation: a page's fenced ```sh and ```python blocks are taken in order and
run verbatim in a private mount namespace (``unshare --mount``) where the default paths the
README uses are private: a tmpfs on ``/run`` (sockets), an overlay on ``/var/lib`` (the
journal in ``/var/lib/lockd``; the rest of ``/var/lib`` reads through), an empty directory
on ``/var/tmp`` (the tour's image). Nothing on the host is read or written there, and every
process started is killed at the end by its process group.

- A ``sh`` block that is exactly ``make run`` is the README's "first terminal": lockd is
  (re)started in the background with ``make run`` and waited for (its admin socket answers
  GetInfo); when it dies (the tour kills it), the next such block starts it again.
- Every other ``sh`` block runs in one bash (the "second terminal": variables such as
  ``$VM`` live on) with ``set -e``: any failing command fails the test, naming the block.
- A ``python`` block runs with the project's interpreter (``.venv/bin/python``).
- A block preceded by ``<!-- no-test: REASON -->`` on the line before its fence is skipped:
  use it for snippets that need special machines (libvirt, several hosts, shared storage),
  always with the reason. Blocks in other languages are not run.

The test itself then checks what the tour promises: the lease came back ``retaken`` with its
token, and ``lockctl verify`` found no drift.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
NO_TEST = re.compile(r"<!--\s*no-test:\s*(.+?)\s*-->\s*$")


def blocks(readme: str) -> list[tuple[str, str, str | None]]:
    """(language, code, reason to skip or None) of every fenced block, in order."""
    out = []
    for m in FENCE.finditer(readme):
        before = readme[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = NO_TEST.search(before)
        out.append((m.group(1), m.group(2), skip.group(1) if skip else None))
    return out


# --- the runner: inside the private namespace ---------------------------------------------------


def _mount_private(work: Path) -> None:
    for d in ("upper", "overlay-work", "vartmp"):
        (work / d).mkdir()
    for argv in (
        ["mount", "-t", "tmpfs", "-o", "mode=755", "lockd-readme", "/run"],
        ["mount", "-t", "overlay", "lockd-readme", "-o",
         f"lowerdir=/var/lib,upperdir={work / 'upper'},workdir={work / 'overlay-work'}",
         "/var/lib"],
        ["mount", "--bind", str(work / "vartmp"), "/var/tmp"],
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, text=True)


def _answers(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(path)
        s.sendall(b'{"method":"org.varlink.service.GetInfo"}\0')
        return b"io.lockd" in s.recv(65536)
    except OSError:
        return False
    finally:
        s.close()


def run(readme: Path, work: Path) -> int:
    """Run every block; write work/report.json; exit status 0 if all ran."""
    _mount_private(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCKD_", "NOTIFY_"))}
    env.pop("RUNTIME_DIRECTORY", None)
    env.pop("STATE_DIRECTORY", None)
    report: list[dict[str, object]] = []
    daemon: subprocess.Popen[bytes] | None = None
    shell = subprocess.Popen(
        ["bash", "--norc", "--noprofile"], cwd=REPO, env=env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert shell.stdin is not None and shell.stdout is not None
    # set -e: a failing command ends the shell, and the EXIT trap says so (the end of its
    # output cannot: `sleep 1000 &` keeps the pipe open)
    shell.stdin.write("set -e\ntrap 'echo __README_SHELL_EXIT__ $?' EXIT\n")
    status = 0
    for n, (lang, code, skip) in enumerate(blocks(readme.read_text())):
        entry: dict[str, object] = {"n": n, "lang": lang, "code": code}
        report.append(entry)
        if skip is not None or lang not in ("sh", "python"):
            entry["skipped"] = skip or f"language {lang or 'none'}"
            continue
        if lang == "sh" and code.strip() == "make run":
            if daemon is not None:
                daemon.wait(60)
            log = open(work / f"make-run-{n}.log", "wb")  # noqa: SIM115 - kept by the child
            daemon = subprocess.Popen(["make", "run"], cwd=REPO, env=env, stdout=log, stderr=log)
            deadline = time.monotonic() + 120
            while not _answers("/run/lockd/lockd-admin.sock"):
                if daemon.poll() is not None or time.monotonic() > deadline:
                    entry.update(rc=daemon.poll(), output=(work / f"make-run-{n}.log").read_text())
                    status = 1
                    break
                time.sleep(0.05)
            else:
                entry["rc"] = 0
            if status:
                break
            continue
        if lang == "python":
            script = work / f"block{n}.py"
            script.write_text(code)
            out = subprocess.run(
                [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True,
                text=True, timeout=120,
            )  # fmt: skip
            entry.update(rc=out.returncode, output=out.stdout + out.stderr)
        else:
            marker = f"__README_BLOCK_{n}_DONE__"
            shell.stdin.write(f"{code}\necho {marker}\n")
            shell.stdin.flush()
            lines, rc = [], 0
            for text in shell.stdout:
                if text.strip() == marker:
                    break
                if text.startswith("__README_SHELL_EXIT__"):
                    rc = int(text.split()[1]) or 1
                    break
                lines.append(text)
            else:
                rc = 1
            entry.update(rc=rc, output="".join(lines))
        if entry["rc"] != 0:
            status = 1
            break
    (work / "report.json").write_text(json.dumps(report, indent=1))
    shell.stdin.close()
    return status


# --- the test ---------------------------------------------------------------------------------


def run_page(page: Path) -> list[dict[str, object]]:
    """Run every block of ``page`` in a private namespace (see the module docstring) and
    return the runner's report; fail the test, naming the block, if one failed."""
    work = Path(tempfile.mkdtemp(prefix="lkd-readme.", dir="/tmp"))
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", sys.executable, __file__, "run",
         str(page), str(work)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        # everything the snippets started (lockd, `sleep 1000 &`) is in this process group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    report = (
        json.loads((work / "report.json").read_text()) if (work / "report.json").exists() else []
    )
    shutil.rmtree(work, ignore_errors=True)
    assert proc.returncode == 0, (
        f"a snippet of {page.name} failed (runner exit {proc.returncode}):\n{out}\n"
        + "\n".join(f"--- block {e['n']} ({e['lang']}), rc {e.get('rc')}:\n{e['code']}"
                    f"--- output:\n{e.get('output', '')}" for e in report if e.get("rc"))
    )  # fmt: skip
    skipped = [e for e in report if "skipped" in e and not str(e["skipped"]).startswith("lang")]
    assert all(e["skipped"] for e in skipped)  # a reason for each
    return report


def _need_namespace() -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare (a private mount namespace for the default paths)")


def test_every_readme_snippet_runs() -> None:
    _need_namespace()
    report = run_page(REPO / "README.md")
    ran = [e for e in report if "skipped" not in e]
    assert len(ran) >= 6 and all(e["rc"] == 0 for e in ran), report
    # what the tour promises, from the outputs of its blocks
    outputs = "".join(str(e.get("output", "")) for e in ran)
    acquired = re.search(r"exclusive\s+vm1\s+\d+\s+(\d+)\s+held", outputs)
    assert acquired, outputs
    assert re.search(rf"vm1\s+\d+\s+{acquired.group(1)}\s+held\s.*retaken", outputs), outputs
    assert "no drift" in outputs and "fencing token" in outputs, outputs


DOCS = sorted((REPO / "docs").glob("*.md"))


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_every_docs_snippet_runs(page: Path) -> None:
    """docs/ is held to the README's rule: every ``sh`` and ``python`` block runs as written,
    or says on the line before it why it cannot run here."""
    runnable = [b for b in blocks(page.read_text()) if b[0] in ("sh", "python") and b[2] is None]
    if not runnable:
        return
    _need_namespace()
    report = run_page(page)
    assert all(e.get("rc") == 0 for e in report if "skipped" not in e), report


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize(
    "page", [REPO / "README.md", *DOCS], ids=["README.md", *(p.name for p in DOCS)]
)
def test_every_link_resolves(page: Path) -> None:
    """Every relative link of the README and of docs/ names a file of this repository."""
    text = FENCE.sub("", page.read_text())
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to nothing: {broken}"


if __name__ == "__main__" and sys.argv[1:2] == ["run"]:
    sys.exit(run(Path(sys.argv[2]), Path(sys.argv[3])))
