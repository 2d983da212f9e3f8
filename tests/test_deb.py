"""The Debian package on a host (issue 16): install, upgrade by re-exec, needrestart, restart,
remove with leases held, purge, reinstall.

One private host for the module (:class:`deb_harness.PackageHost`: systemd 252 as PID 1, the
host's /usr and /var as overlays, so dpkg really installs and the host's dpkg database, /usr
and /etc are never written). The tests run in order on it, each starting from what the
previous one left, as an administrator's session would: the packaged sockets start lockd,
1,000 leases are taken for ten owner processes, and then every package operation is watched
by an :class:`sd_harness.Observer`, a separate process that probes byte 0 of every lease
file over and over and counts each moment it found one free.

Time: 134 s measured (the machine busy with other work; most of it apt and dpkg runs and
the observer's sweeps) when the packages are cached in build/deb/<hash>/; a tree never built
before adds the two builds (79 s side by side with a warm pip cache, more from nothing).
Figures are printed at the end.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import deb_harness as dh
import pytest
import sd_harness as sd
from e2e import is_free
from measured import Figures, printed_at_end

N = 1_000
OWNERS = 10
NEEDRESTART = ("needrestart", "libsort-naturally-perl", "libmodule-find-perl", "libintl-perl",
               "libproc-processtable-perl", "libterm-readkey-perl")  # fmt: skip


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    yield from printed_at_end(request, "the Debian package: measured")


@pytest.fixture(scope="module")
def debs(figures: Figures) -> tuple[Path, Path]:
    reason = sd.unavailable()
    if reason is not None:
        pytest.skip(f"cannot run a private systemd here: {reason}")
    t0 = time.monotonic()
    old, new = dh.built()
    figures.add(
        f"packages: {old.name} {old.stat().st_size // 1024} KiB, {new.name} "
        f"({time.monotonic() - t0:.1f} s to build or find them in {old.parent.name})"
    )
    return old, new


@pytest.fixture(scope="module")
def host(debs: tuple[Path, Path]) -> Iterator[dh.PackageHost]:
    with dh.PackageHost() as h:
        yield h


@pytest.fixture(scope="module")
def held(host: dh.PackageHost) -> Iterator[dict[str, Any]]:
    """Lease files, owner processes inside the host, and what the tests took for them."""
    procs = [host.spawn_inside("sleep", "100000") for _ in range(OWNERS)]
    state: dict[str, Any] = {"files": sd.make_files(host.shared / "disks", N), "procs": procs}
    yield state
    for p, _ in procs:
        p.kill()
        p.wait(10)


def lockctl_json(host: dh.PackageHost, *args: str) -> Any:
    return json.loads(host.run_inside("lockctl", *args, "-J").stdout)


def tokens(host: dh.PackageHost) -> dict[str, tuple[int, str]]:
    """resource -> (token, continuity), from the packaged lockctl."""
    leases = lockctl_json(host, "locks")["leases"]
    return {x["resource"]: (x["token"], x["continuity"]) for x in leases}


def dpkg_status(host: dh.PackageHost) -> str:
    out = host.run_inside("dpkg-query", "-W", "-f", "${Status} ${Version}", "lockd", check=False)
    return out.stdout.strip()


def apt_observed(
    host: dh.PackageHost, files: list[str], *args: str, env: str = ""
) -> tuple[Any, sd.Observation, float]:
    """``apt-get ARGS`` inside while an observer sweeps ``files``; (result, what was seen,
    seconds). A sweep every 10 ms, not the default 2: a sweep of 1,000 files takes about as
    long, and apt and dpkg need the machine's second core more than the observer does."""
    with sd.Observer(files, interval=0.01) as obs:
        time.sleep(0.05)
        t0 = time.monotonic()
        out = host.apt(*args, env=env, check=False)
        took = time.monotonic() - t0
        time.sleep(0.05)
        return out, obs.stop(), took


def test_install_puts_lockd_where_debian_users_look(
    host: dh.PackageHost, debs: tuple[Path, Path], figures: Figures
) -> None:
    old, _ = debs
    root = Path(f"/proc/{host.pid1}/root")
    t0 = time.monotonic()
    host.apt("install", host.offer(old))
    installed = time.monotonic()
    st = host.status_inside()  # the first connection starts lockd through the packaged socket
    answered = time.monotonic()
    figures.add(
        f"install: apt-get install ./{old.name} {installed - t0:.1f} s, then the first "
        f"answer (socket activation, lockctl status) {answered - installed:.2f} s"
    )
    assert dpkg_status(host) == f"install ok installed {dh.current_version()}"
    assert st["version"] == dh.current_version() and st["state_dir"] == "/var/lib/lockd"
    for path in ("usr/sbin/lockd", "usr/bin/lockctl", "usr/share/man/man8/lockd.8.gz",
                 "usr/share/man/man1/lockctl.1.gz", "usr/share/man/man5/lockd.conf.5.gz",
                 "usr/share/bash-completion/completions/lockctl", "usr/share/doc/lockd/README.md",
                 "usr/share/doc/lockd/docs/architecture.md",
                 "etc/needrestart/restart.d/lockd.service"):  # fmt: skip
        assert (root / path).exists(), path
    unit = (root / "lib/systemd/system/lockd.service").read_text()
    assert "ExecStart=/usr/sbin/lockd\n" in unit and "Documentation=man:lockd(8)" in unit
    conffiles = host.run_inside("dpkg-query", "-W", "-f", "${Conffiles}", "lockd").stdout
    assert "/etc/lockd/lockd.conf " in conffiles
    assert host.prop(sd.SERVICE, "ExecMainPID") != "0"
    for unit_name, enabled in (("lockd.socket", "enabled"), ("lockd-admin.socket", "enabled"),
                               ("lockd-virtlockd.socket", "disabled")):  # fmt: skip
        got = host.run_inside("systemctl", "is-enabled", unit_name, check=False).stdout.strip()
        assert got == enabled, (unit_name, got)
    # nothing installed names a source checkout or the build tree
    listing = host.run_inside("dpkg-query", "-L", "lockd").stdout.split()
    texts = [root / p.lstrip("/") for p in listing if (root / p.lstrip("/")).is_file()]
    assert not [p for p in texts if str(dh.REPO).encode() in p.read_bytes()]


def test_upgrade_reexecutes_with_every_lock_kept(
    host: dh.PackageHost, debs: tuple[Path, Path], held: dict[str, Any], figures: Figures
) -> None:
    _, new = debs
    files, procs = held["files"], held["procs"]
    t0 = time.monotonic()
    with host.client() as c:
        owners = [c.register(pid, name=f"vm{i}")["uuid"] for i, (_, pid) in enumerate(procs)]
    taken = sd.bulk_acquire(host.socket, [(owners[i % OWNERS], f) for i, f in enumerate(files)])
    figures.add(f"{N} leases taken through the packaged units in {time.monotonic() - t0:.1f} s")
    before = host.status_inside()
    out, seen, took = apt_observed(host, files, "install", host.offer(new))
    assert out.returncode == 0, out.stdout + out.stderr
    after = host.status_inside()
    said = re.search(r"lockd re-executed in place: .*", out.stdout + out.stderr)
    assert said, out.stdout + out.stderr
    figures.add(f"upgrade with {N} leases: apt-get install ./{new.name} {took:.1f} s; {said[0]}")
    figures.add(f"  observer during the upgrade: {seen.summary()}")
    assert seen.free == 0, seen.free_examples
    assert after["version"] == new.name.split("_")[1] and after["pid"] == before["pid"]
    assert after["leases"] == N
    now = tokens(host)
    assert {r: t for r, (t, _) in now.items()} == taken
    assert {c for _, c in now.values()} == {"kept"}
    assert new.name.split("_")[1] in host.run_inside("lockctl", "status").stdout
    with host.client() as c:  # org.varlink.service.GetInfo on the main socket
        assert c.get_info()["version"] == after["version"]


def test_library_updates_reexec_lockd_never_restart_it(
    host: dh.PackageHost, held: dict[str, Any], figures: Figures
) -> None:
    """A new libsqlite3 re-executes lockd through the package's dpkg trigger; a new
    libsystemd0 (no trigger) leaves lockd mapping a replaced library, and Debian's real
    needrestart, run by apt's hook in automatic mode, hands it to the package's restart.d
    hook, which re-executes it too. Neither restarts it: the pid and every lock stay."""
    files = held["files"]
    nr = dh.debs_from_debian(*NEEDRESTART, "libsqlite3-0", "libsystemd0")
    offered = [host.offer(d) for d in nr]
    host.apt("install", *offered[: len(NEEDRESTART)])
    for deb, what in ((offered[-2], "trigger"), (offered[-1], "needrestart")):
        before = host.status_inside()
        out, seen, took = apt_observed(
            host, files, "install", "--reinstall", deb, env="NEEDRESTART_MODE=a"
        )
        assert out.returncode == 0, out.stdout + out.stderr
        after = host.status_inside()
        log = out.stdout + out.stderr
        figures.add(f"apt-get install --reinstall ./{Path(deb).name} ({what}): {took:.1f} s; "
                    f"observer: {seen.summary()}")  # fmt: skip
        assert seen.free == 0, seen.free_examples
        assert after["pid"] == before["pid"] and after["leases"] == N
        assert after["started_at"] != before["started_at"], log  # a new image: re-executed
        assert "lockd re-executed in place" in log, log
        hook_ran = "/etc/needrestart/restart.d/lockd.service" in log
        if what == "trigger":  # re-executed by dpkg; needrestart then finds nothing for lockd
            assert "Processing triggers for lockd" in log and not hook_ran, log
        else:
            assert hook_ran, log
    assert {c for _, c in tokens(host).values()} == {"kept"}


def test_systemctl_restart_on_systemd_252(
    host: dh.PackageHost, held: dict[str, Any], figures: Figures
) -> None:
    """What `systemctl restart lockd` does (the package never does it), measured: systemd 252
    keeps the fd store across a restart (only `systemctl stop` flushes it), so the new
    process adopts every lease fd and no lock is free; a restart still drops every client
    connection, which a reload (re-exec) keeps the listeners for."""
    files = held["files"]
    taken = {r: t for r, (t, _) in tokens(host).items()}
    old = host.main_pid()
    with sd.Observer(files) as obs:
        time.sleep(0.05)
        t0 = time.monotonic()
        host.systemctl("restart", sd.SERVICE)
        host.wait_running(not_pid=old)
        ready = time.monotonic()
        host.status_inside()
        time.sleep(0.05)
        seen = obs.stop()
    after = tokens(host)
    continuity = sorted({c for _, c in after.values()})
    figures.add(
        f"systemctl restart lockd with {N} leases (systemd "
        f"{host.run_inside('systemctl', '--version').stdout.split()[1]}): "
        f"{ready - t0:.2f} s to active again; continuity after: {continuity}; "
        f"observer: {seen.summary()}"
    )
    assert {r: t for r, (t, _) in after.items()} == taken
    assert seen.free == 0 and continuity == ["kept"], (seen.summary(), continuity)


def test_remove_refuses_while_leases_are_held_then_purge(
    host: dh.PackageHost, debs: tuple[Path, Path], held: dict[str, Any], figures: Figures
) -> None:
    _, new = debs
    files = held["files"]
    root = Path(f"/proc/{host.pid1}/root")
    pid = host.main_pid()
    out, seen, _ = apt_observed(host, files, "remove", "lockd")
    log = out.stdout + out.stderr
    assert out.returncode != 0 and "refusing to remove lockd" in log, log
    assert f"lockd holds {N} lease(s)" in log and files[0] in log, log
    assert seen.free == 0 and host.main_pid() == pid, seen.summary()
    assert dpkg_status(host).startswith("install ok installed")
    figures.add("apt-get remove lockd with leases held: refused, naming them:\n    " +
                "\n    ".join(x for x in log.splitlines() if "lockd" in x)[:900])  # fmt: skip

    out = host.apt("remove", "lockd", env="LOCKD_FORCE_REMOVE=1")
    assert dpkg_status(host).startswith("deinstall ok config-files")
    assert all(is_free(f) for f in files)  # stopping lockd released the kernel locks
    assert (root / "var/lib/lockd").is_dir() and (root / "etc/lockd/lockd.conf").is_file()

    host.apt("install", host.offer(new))  # a reinstall takes back what the journal holds
    back = tokens(host)
    assert len(back) == N and {c for _, c in back.values()} == {"retaken"}
    assert not any(is_free(f) for f in files)

    host.apt("purge", "lockd", env="LOCKD_FORCE_REMOVE=1")
    assert dpkg_status(host) == "" or dpkg_status(host).startswith("unknown ok not-installed")
    assert not (root / "var/lib/lockd").exists() and not (root / "etc/lockd").exists()
    host.apt("install", host.offer(new))
    assert host.status_inside()["leases"] == 0  # purged: a fresh journal


def test_readme_libvirt_switch_on_the_packaged_install(host: dh.PackageHost) -> None:
    """The README's switch from virtlockd to lockd and back, on the packaged install: the
    drop-in from /usr/share/lockd, the packaged lockctl, the packaged units."""
    from test_systemd import switch_debian_libvirt_host

    switch_debian_libvirt_host(
        host, "/usr/share/lockd/virtlockd.socket.d/50-lockd.conf", "/usr/bin/lockctl"
    )
