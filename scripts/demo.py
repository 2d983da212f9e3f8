"""`make demo`: lockd survives its own abort under a real systemd, and no lock is ever free.

What it does, in about ten seconds, without touching the host's init or /usr/local/bin:

1. starts a private, real ``systemd --user`` (systemd 252, in a mount namespace of its own)
   with the project's unit files, unchanged (tests/sd_harness.py, the tests' own harness);
2. makes three owner processes (stand-ins for VMs' QEMU) and takes two disk leases for each
   with ``lockctl acquire``: the first connection starts lockd through its socket;
3. starts a probe in another process that asks the kernel about byte 0 of every disk
   (F_OFD_GETLK) every millisecond, then aborts lockd with SIGABRT;
4. systemd restarts lockd, which gets its lock fds back from systemd's fd store; the probe
   reports whether it ever saw a disk unlocked, and ``lockctl locks`` shows the same leases
   with the same tokens;
5. stops everything it started.

Needs root (namespaces, cgroups). Run it as ``make demo`` (which sets up .venv first).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import sd_harness as sd  # noqa: E402

BOLD, DIM, GREEN, RED, OFF = (
    ("\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m")
    if sys.stdout.isatty()
    else ("", "", "", "", "")
)


def step(text: str) -> None:
    print(f"\n{BOLD}== {text}{OFF}", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def shell(m: sd.Manager, *args: str) -> str:
    """Run lockctl as a user would, echo the command and its output."""
    print(f"{DIM}   $ lockctl {' '.join(args)}{OFF}", flush=True)
    out = m.lockctl(*args)
    if out.returncode != 0:
        raise SystemExit(f"lockctl {' '.join(args)} failed ({out.returncode}): {out.stderr}")
    for line in out.stdout.rstrip("\n").splitlines():
        print(f"   {line}")
    return out.stdout


def main() -> int:
    reason = sd.unavailable()
    if reason is not None:
        print(f"demo: cannot run a private systemd here: {reason}", file=sys.stderr)
        return 1
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # we abort lockd on purpose
    t_start = time.monotonic()
    with sd.UserManager() as m, sd.Owners() as owners:
        step("A private systemd --user with the project's units (systemd/*.socket, *.service)")
        say(f"manager pid {m.manager_pid()}, work directory {m.w}")
        for unit in ("lockd.socket", "lockd-admin.socket", "lockd.service"):
            s = m.show(unit, "ActiveState", "SubState")
            say(f"{unit:<20} {s['ActiveState']} ({s['SubState']})")
        say(f"sockets: {m.socket}, {m.admin_socket}")

        step("Three VMs take two disks each (the first connection starts lockd)")
        disks = sd.make_files(m.w / "images", 6, prefix="vm-disk")
        for i in range(3):
            vm = owners.spawn()
            for disk in disks[2 * i : 2 * i + 2]:
                out = m.lockctl("acquire", disk, "--pid", str(vm.pid), "--name", f"vm{i + 1}")
                if out.returncode != 0:
                    raise SystemExit(f"lockctl acquire failed ({out.returncode}): {out.stderr}")
            names = ", ".join(Path(d).name for d in disks[2 * i : 2 * i + 2])
            say(f"vm{i + 1} (pid {vm.pid}): {names}")
        # lockd refreshes its STATUS= line every 2 s
        m.wait_for(lambda: m.prop(sd.SERVICE, "StatusText").startswith("6 leases"), timeout=5)
        s = m.show(sd.SERVICE, "ActiveState", "MainPID", "StatusText", "NFileDescriptorStore")
        say(f"lockd.service {s['ActiveState']}, pid {s['MainPID']}")
        say(f"STATUS: {s['StatusText']}")
        say(f"lock fds parked in systemd's fd store: {s['NFileDescriptorStore']}")
        before = json.loads(m.lockctl("locks", "-J").stdout)["leases"]
        shell(m, "locks", "-o", "RESOURCE,OWNER,PID,TOKEN,STATE,CONTINUITY")

        step("Abort lockd (SIGABRT) while a probe in another process polls every disk")
        with sd.Observer(disks, interval=0.001) as probe:
            time.sleep(0.1)
            pid = m.main_pid()
            say(f"kill -ABRT {pid}")
            r = m.kill_and_wait(signal.SIGABRT)
            time.sleep(0.1)
            seen = probe.stop()
        in_gap, longest = seen.during(r.killed_at, r.ready_at)
        say(f"systemd restarted it: new pid {r.new_pid}, READY {r.to_ready * 1000:.0f} ms later")
        log = m.journal("-o", "cat", "--user-unit", sd.SERVICE)
        for line in log.splitlines():
            if "status=6/ABRT" in line:
                say(f"journal: {line.strip()}")
        say(
            f"probe: {seen.probes} F_OFD_GETLK probes in {len(seen.sweeps)} sweeps over the "
            f"{len(disks)} disks; {in_gap} sweeps from the abort to READY, at most "
            f"{longest * 1000:.1f} ms apart"
        )
        verdict = (
            f"{GREEN}never saw a disk unlocked{OFF}"
            if seen.free == 0
            else f"{RED}saw a disk unlocked {seen.free} times: {seen.free_examples}{OFF}"
        )
        say(f"probe: {verdict}")

        step("After the restart: the same leases, the same tokens")
        shell(m, "locks", "-o", "RESOURCE,OWNER,PID,TOKEN,STATE,CONTINUITY")
        after = json.loads(m.lockctl("locks", "-J").stdout)["leases"]

        def key(leases: list[dict[str, object]]) -> dict[object, object]:
            return {x["resource"]: (x["token"], x["owner"]) for x in leases}

        same = key(before) == key(after)
        kept = all(x["continuity"] == "kept" for x in after)
        say(
            f"tokens unchanged: {GREEN + 'yes' if same else RED + 'NO'}{OFF}; continuity kept "
            f"(fds adopted from the fd store): {GREEN + 'yes' if kept else RED + 'NO'}{OFF}"
        )
        say(f"STATUS: {m.prop(sd.SERVICE, 'StatusText')}")

        step("Stopping everything")
    say(f"owners killed, private systemd stopped ({time.monotonic() - t_start:.1f} s in all)")
    ok = seen.free == 0 and same and kept
    print(f"\n{BOLD}{GREEN + 'OK' if ok else RED + 'FAILED'}{OFF}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.pop("LOCKD_SOCKET", None)
    os.environ.pop("LOCKD_ADMIN_SOCKET", None)
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        sys.exit(1)
