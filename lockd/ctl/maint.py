"""What the Debian package's maintainer scripts ask the running daemon (DESIGN §11).

    python3 -I -m lockd.ctl.maint reexec         re-execute a running lockd into the installed
                                             version and wait until it answers as that version
    python3 -I -m lockd.ctl.maint check-remove   refuse (exit 1) while lockd holds leases, naming
                                             them, unless LOCKD_FORCE_REMOVE=1

Both talk to the daemon only if systemd says ``lockd.service`` is active: connecting to the
socket of a stopped lockd would start it (socket activation) just to ask it something.

``reexec`` is the package's upgrade and the needrestart hook's restart: ``systemctl reload``
(SIGUSR1) makes lockd execute its own file again with every lease fd and both listeners kept
(lockd/systemd/handover.py), so no lock is ever free. The reload returns as soon as the signal is
sent; the new image has answered when Status shows a later ``started_at`` (each image sets its
own) and this module's version, which is the version just unpacked. A re-exec that failed
leaves the old image serving ("re-exec failed" in the journal), and this command says so and
exits 1, so that dpkg reports the package as not configured rather than pretend.

``check-remove``: removing the package stops lockd, and a stopped lockd releases every kernel
lock it held (the journal keeps the leases; they are taken again at the next start). A VM
whose disk is unlocked can then be started twice. A careful administrator wants to know which
leases that is before it happens, and to say so explicitly: ``LOCKD_FORCE_REMOVE=1 apt-get
remove lockd``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from lockd import __version__, errors
from lockd.client import Client

SERVICE = "lockd.service"
FORCE = "LOCKD_FORCE_REMOVE"
# recovery of the new image adopts every lease fd; 1,000 leases take well under a second
# (README, "Install on a host"), 33,000 (the fd store's limit) a few seconds
REEXEC_TIMEOUT = 120.0


class MaintError(RuntimeError):
    """A maintainer-script step that must not pass silently (one line, exit 1)."""


def active() -> bool:
    return (
        subprocess.run(["systemctl", "is-active", "--quiet", SERVICE], check=False).returncode == 0
    )


def policy_forbids(action: str) -> bool:
    """Whether the local policy (policy-rc.d(8), as deb-systemd-invoke asks it) forbids
    ``action`` on lockd: exit 101, as container images ship it."""
    policy = "/usr/sbin/policy-rc.d"
    if not os.access(policy, os.X_OK):
        return False
    return subprocess.run([policy, SERVICE, action], check=False).returncode == 101


def reexec(timeout: float = REEXEC_TIMEOUT) -> str:
    if not active():
        return f"lockd is not running; its next start runs {__version__}"
    if policy_forbids("reload"):
        return (
            f"policy-rc.d forbids reloading lockd: it keeps running its old version until "
            f"`systemctl reload {SERVICE}`"
        )
    with Client(admin=True, timeout=30.0) as admin:
        before = admin.status()
        t0 = time.monotonic()
        subprocess.run(["systemctl", "reload", SERVICE], check=True)
        deadline = t0 + timeout
        while True:
            try:
                now = admin.status()
                if now["started_at"] != before["started_at"] and now["version"] == __version__:
                    return (
                        f"lockd re-executed in place: {before['version']} -> {now['version']}, "
                        f"pid {now['pid']}, {now['leases']} leases kept, "
                        f"{time.monotonic() - t0:.2f} s"
                    )
                if now["started_at"] != before["started_at"]:
                    raise MaintError(
                        f"lockd re-executed but answers as {now['version']}, not {__version__}"
                    )
            except errors.DaemonUnreachable:
                pass  # between the exec and the new image's first answer
            if time.monotonic() > deadline:
                raise MaintError(
                    f"lockd did not answer as {__version__} within {timeout:.0f} s of "
                    f"`systemctl reload {SERVICE}`; the running image is unchanged "
                    f"(see journalctl -u {SERVICE})"
                )
            admin.close()
            time.sleep(0.05)


def check_remove() -> str:
    if not active():
        return "lockd is not running: removing it releases no lock"
    with Client(admin=True, timeout=30.0) as admin:
        leases = admin.list_leases()
    held = [x for x in leases if x.get("state") != "lost"]
    if not held:
        return "lockd holds no lease: stopping it releases no lock"
    lines = [
        f"  {x['resource']}  token {x['token']}  owner {x['owner'].get('name') or ''} "
        f"{x['owner']['uuid']} pid {x['owner'].get('pid', '?')}"
        for x in held[:20]
    ]
    if len(held) > 20:
        lines.append(f"  ... and {len(held) - 20} more (lockctl locks)")
    what = (
        f"lockd holds {len(held)} lease(s); stopping it releases their kernel locks, so "
        f"another process or host can take these files until lockd starts again:\n"
        + "\n".join(lines)
    )
    if os.environ.get(FORCE) == "1":
        return f"{what}\n{FORCE}=1: removing lockd anyway (the journal keeps the leases)"
    raise MaintError(
        f"{what}\nrefusing to remove lockd. Release the leases first (stop the VMs), or run "
        f"`{FORCE}=1 apt-get remove lockd` to remove it anyway"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    commands = {"reexec": reexec, "check-remove": check_remove}
    if len(args) != 1 or args[0] not in commands:
        print(f"usage: python3 -m lockd.ctl.maint {'|'.join(commands)}", file=sys.stderr)
        return 2
    try:
        print(commands[args[0]]())
    except (MaintError, errors.LockdError, subprocess.CalledProcessError) as exc:
        print(f"lockd: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
