"""The independent checker: after every recovery, three views must tell one story.

Theory of operation: the checker runs while the client threads are paused (every call
answered, the one in flight at the crash resolved by its retry) and the competitor is frozen.
It first lets the daemon *settle*: owners that died (the harness reaps them, so it knows
exactly which) must disappear from ``ListOwners``, and every lease listed ``lost`` must see
its owner fenced (SIGKILLed by the daemon under the default policy ``kill``). Then it reads,
twice around the kernel reading so that nothing moved in between:

1. the clients' view, :class:`~torture.workload.Model`: acknowledged grants not released,
   per live owner, with tokens;
2. the daemon's view: ``io.lockd.Admin.ListLeases``, ``Status`` and the new ``History``
   events (on the admin socket, with the checker's own Varlink code), and every
   ``--lockctl-every`` checks ``lockctl locks -J`` as well, which must list the same;
3. the kernel's view: ``F_OFD_GETLK`` probes of every pool file from this process, which
   must show exactly the listed held leases combined with what the competitor reports it
   holds, and the OFD locks of the daemon's open files (``/proc/PID/fdinfo``), which must
   be exactly one per listed held lease (:mod:`torture.kernel`).

Invariants (each violation is named, logged and counted):

- ``held-not-granted``: a lease listed held that no client was granted, or was released, or
  whose owner died; ``lease-mismatch``: listed with another mode or token;
- ``silently-missing``: a lease granted to a live, unfenced owner that is not listed;
- ``kernel-mismatch`` / ``probe-mismatch`` / ``foreign-lock``: the daemon's open files do not
  hold exactly one OFD lock on byte 0 per listed held lease (an orphan or missing lock), or
  another process sees byte 0 otherwise than those leases plus the competitor's lock;
- ``lost-without-competitor``: a lease reported lost although the competitor did not hold
  the file (in a conflicting mode) at any moment between the daemon's death and READY=1;
  ``lost-not-granted``: a lost lease no client had; ``lost-not-fenced``: its owner lives on;
  ``fenced-without-loss``: an owner SIGKILLed with no lost lease to show for it;
- ``owner-death-not-released``: a dead owner still registered after ``settle_timeout``;
- ``token-went-back``: ``Status.next_token`` not above every token ever acknowledged;
- ``host-rebooted``: leases closed as if the host had rebooted (same boot: never);
- ``verify-drift`` / ``verify``: at the end, ``lockctl verify`` found drift between the
  daemon's account of its lease fds and the kernel's locks, or could not run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from torture import kernel
from torture.daemonctl import REPO, Lockd, lockctl_verify, varlink_call
from torture.workload import Model, Owner, RunLog

HISTORY_LIMIT = 20_000
Gap = tuple[float, float]  # CLOCK_MONOTONIC: the daemon seen dead, READY=1 of the next one


def _key(lease: dict[str, Any]) -> tuple[str, str]:
    return (str(lease["owner"]["uuid"]), str(lease.get("path") or lease["resource"]))


def _summary(lease: dict[str, Any]) -> tuple[str, str, str, int, str]:
    uuid, path = _key(lease)
    return (uuid, path, str(lease["mode"]), int(lease["token"]), str(lease["state"]))


class Checker:
    def __init__(
        self, lockd: Lockd, model: Model, log: RunLog, files: list[str], settle_timeout: float
    ) -> None:
        self.lockd = lockd
        self.model = model
        self.log = log
        self.files = files
        self.keys = {p: kernel.inode_key(p) for p in files}
        self.settle_timeout = settle_timeout
        self.history_seq = 0
        self.lost_owners: set[str] = set()  # owners with a lost lease reported, ever
        # competitor hold intervals [path, mode, t_from, t_to or None]
        self.closed: list[list[Any]] = []
        self.open: list[list[Any]] = []
        self.stats: Counter[str] = Counter()
        self.checks = 0

    # -- helpers -------------------------------------------------------------------------
    def admin(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return varlink_call(self.lockd.admin_socket, f"io.lockd.Admin.{method}", params)

    def violation(self, kind: str, detail: str) -> None:
        self.stats["violations"] += 1
        self.log.violation(kind, detail)

    def competitor(self, report: dict[str, Any]) -> None:
        now = time.monotonic()
        self.closed = [i for i in self.closed if i[3] > now - 60] + [
            i for i in report["intervals"] if i[3] is not None
        ]
        self.open = [i for i in report["intervals"] if i[3] is None]

    def competitor_held(self, path: str, lease_mode: str, gaps: list[Gap]) -> bool:
        """Did the competitor hold ``path`` in a mode conflicting with ``lease_mode`` at some
        moment of a gap (from a daemon's death to the next READY=1)?"""
        for p, mode, a, b in self.closed + self.open:
            if p != path or (mode == "shared" and lease_mode == "shared"):
                continue
            if any(a <= t_to and (b is None or b >= t_from) for t_from, t_to in gaps):
                return True
        return False

    def _poll_all(self) -> bool:
        with self.model.lock:
            owners = list(self.model.owners)
        died = False
        for o in owners:
            if o.rc is None and self.model.poll(o):
                died = True
        return died

    # -- settle ----------------------------------------------------------------------------
    def settle(self) -> None:
        """Wait until dead owners are forgotten and lost leases' owners are fenced."""
        deadline = time.monotonic() + self.settle_timeout
        t0 = time.monotonic()
        while True:
            self._poll_all()
            listed = {str(o["uuid"]) for o in self.admin("ListOwners")["owners"]}
            leases = self.admin("ListLeases")["leases"]
            with self.model.lock:
                by_uuid = {o.uuid: o for o in self.model.owners if o.uuid}
                dead = [o for o in by_uuid.values() if o.rc is not None and o.uuid in listed]
            lost_alive = [
                lease
                for lease in leases
                if lease["state"] == "lost"
                and (o := by_uuid.get(_key(lease)[0])) is not None
                and o.rc is None
            ]
            if not dead and not lost_alive:
                self.stats["max settle ms"] = max(
                    self.stats["max settle ms"], int((time.monotonic() - t0) * 1000)
                )
                return
            if time.monotonic() > deadline:
                for o in dead:
                    self.violation(
                        "owner-death-not-released",
                        f"{o.name} pid {o.pid} died (rc {o.rc}) "
                        f"{time.monotonic() - (o.died_at or 0):.2f} s ago and is still "
                        f"registered with leases {sorted(o.leases)}",
                    )
                for lease in lost_alive:
                    self.violation(
                        "lost-not-fenced",
                        f"lease {_summary(lease)} is lost; its owner "
                        f"{by_uuid[_key(lease)[0]].name} is alive after "
                        f"{self.settle_timeout} s",
                    )
                return
            time.sleep(0.003)

    def snapshot(
        self, lockctl: bool
    ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
        """ListLeases, Status, kernel locks and probes (and lockctl's list), taken while
        nothing moves: an owner may die on its own at any moment, so all of it is read
        between two equal ListLeases, and read again if an owner died meanwhile."""
        for _ in range(10):
            self.settle()
            before = self.admin("ListLeases")["leases"]
            locks = kernel.held_by(self.lockd.pid, self.keys)
            probes = {p: kernel.probe(p) for p in self.files}
            listed = self._lockctl() if lockctl else None
            after = self.admin("ListLeases")["leases"]
            status = self.admin("Status")["status"]
            if before == after and not self._poll_all():
                return after, status, {"locks": locks, "probes": probes, "lockctl": listed}
            self.stats["snapshot retries"] += 1
        self.violation("unstable", "the lease table kept changing while the harness was idle")
        return after, status, {"locks": locks, "probes": probes, "lockctl": listed}

    # -- the check ---------------------------------------------------------------------------
    def check(self, gaps: list[Gap], competitor: dict[str, Any], lockctl: bool) -> None:
        """Compare the views; ``gaps``: every (death, READY=1) since the last check."""
        self.checks += 1
        self.competitor(competitor)
        leases, status, kern = self.snapshot(lockctl)
        with self.model.lock:
            by_uuid: dict[str, Owner] = {o.uuid: o for o in self.model.owners if o.uuid}
            self._daemon_vs_clients(leases, by_uuid)
            self._kernel(leases, competitor["held"], kern)
            self._history(gaps, by_uuid)
            self._tokens(leases, status)
            for o in by_uuid.values():
                if o.rc is not None:
                    o.accounted = True
        self.model.prune()
        rec = status.get("recovery", {})
        for k in ("retaken", "lost", "released", "adopted"):
            self.stats[f"recovery {k}"] += int(rec.get(k, 0))
        listed = kern["lockctl"]
        if listed is not None and listed != sorted(map(_summary, leases)):
            self.violation(
                "lockctl-mismatch",
                f"lockctl locks -J: {listed}; ListLeases: {sorted(map(_summary, leases))}",
            )

    def _daemon_vs_clients(self, leases: list[dict[str, Any]], by_uuid: dict[str, Owner]) -> None:
        listed: dict[tuple[str, str], dict[str, Any]] = {}
        for lease in leases:
            key = _key(lease)
            if key in listed:
                self.violation("duplicate-lease", f"{_summary(lease)} and {listed[key]}")
            listed[key] = lease
            uuid, path = key
            o = by_uuid.get(uuid)
            s = _summary(lease)
            if o is None:
                self.violation("held-not-granted", f"{s}: no client registered that owner")
                continue
            if o.rc is not None:
                self.violation("held-not-granted", f"{s}: owner {o.name} died (rc {o.rc})")
                continue
            if lease["state"] != "held":
                if lease["state"] != "lost":
                    self.violation("bad-state", f"{s}")
                continue  # a lost lease of a live owner was reported by settle()
            mine = o.leases.get(path)
            if mine is None:
                if path in o.maybe:
                    # an acquire answered by an error after a crash: it had been granted
                    o.leases[path] = (str(lease["mode"]), int(lease["token"]))
                    del o.maybe[path]
                    self.log.write(f"check: {o.name} {path}: uncertain acquire was granted")
                    continue
                why = (
                    f"released (token {o.released[path]})"
                    if path in o.released
                    else "never granted"
                )
                self.violation("held-not-granted", f"{s} of {o.name}: {why}")
            elif mine != (lease["mode"], lease["token"]):
                self.violation("lease-mismatch", f"{s} of {o.name}: clients were told {mine}")
        for o in by_uuid.values():
            if o.rc is not None:
                continue
            for path, (mode, token) in o.leases.items():
                if (o.uuid, path) not in listed:
                    self.violation(
                        "silently-missing",
                        f"{o.name} pid {o.pid} (alive, not fenced) was granted {path} {mode} "
                        f"token {token} and never released it; the daemon lists nothing",
                    )
            for path in [p for p in o.maybe if (o.uuid, p) not in listed]:
                del o.maybe[path]  # the uncertain acquire was not granted (or is gone)
        self.stats["leases held at checks"] += sum(1 for x in leases if x["state"] == "held")

    def _kernel(
        self, leases: list[dict[str, Any]], comp: dict[str, str], kern: dict[str, Any]
    ) -> None:
        for path in self.files:
            holders = [_summary(x) for x in leases if _key(x)[1] == path and x["state"] == "held"]
            sh = sum(1 for h in holders if h[2] == "shared")
            ex = sum(1 for h in holders if h[2] == "exclusive")
            got: kernel.FileLocks = kern["locks"][path]
            what = f"{path}: daemon lists {holders}, competitor holds {comp.get(path, '-')}"
            if got.other:
                self.violation("foreign-lock", f"{what}; daemon fdinfo: {got.other}")
            if (got.shared, got.exclusive) != (sh, ex):
                self.violation(
                    "kernel-mismatch",
                    f"{what}: the daemon's fds hold {got.shared} shared + {got.exclusive} "
                    f"exclusive OFD locks on byte 0, expected {sh} + {ex}",
                )
            c = comp.get(path)
            expected = (
                "exclusive"
                if ex or c == "exclusive"
                else "shared"
                if sh or c == "shared"
                else "free"
            )
            if kern["probes"][path] != expected:
                self.violation("probe-mismatch", f"{what}: F_OFD_GETLK says {kern['probes'][path]}")

    def _history(self, gaps: list[Gap], by_uuid: dict[str, Owner]) -> None:
        limit = 256
        while True:  # History has no "since": ask for more until the last seen one is in
            events = self.admin("History", {"limit": limit})["events"]
            if len(events) < limit or int(events[0]["seq"]) <= self.history_seq + 1:
                break
            if limit >= HISTORY_LIMIT:
                self.log.write(f"check: history events after {self.history_seq} were missed")
                break
            limit *= 4
        new = [e for e in events if int(e["seq"]) > self.history_seq]
        if events:
            self.history_seq = max(self.history_seq, max(int(e["seq"]) for e in events))
        kinds = Counter(str(e["event"]) for e in new)
        for kind in ("lost", "retaken", "owner-dead", "host-rebooted"):
            self.stats[f"events {kind}"] += kinds[kind]
        for e in new:
            if e["event"] == "host-rebooted":
                self.violation("host-rebooted", f"{e}")
            if e["event"] == "retaken" and self.competitor_held(
                str(e["resource"]), str(e["mode"]), gaps
            ):
                # by design (DESIGN §5: "continuity broken"), but worth a figure: another
                # holder had the resource in the gap, and the lease goes on with its token
                self.stats["retaken after a competitor hold"] += 1
            if e["event"] != "lost":
                continue
            uuid, path, token, mode = str(e["owner"]), str(e["resource"]), e["token"], e["mode"]
            self.lost_owners.add(uuid)
            o = by_uuid.get(uuid)
            desc = f"lost {path} {mode} token {token} of {o.name if o else uuid}"
            self.log.write(f"check: {desc}")
            if o is None:
                self.violation("lost-not-granted", f"{desc}: no client registered that owner")
                continue
            # held when the daemon died: granted, or possibly granted by a call that spanned
            # the crash, and not released, or released only after the loss was recorded
            # (a Release acknowledges a lost lease)
            held = o.leases.get(path) == (mode, token) or path in o.maybe
            released_after = o.released.get(path) == token and o.released_at[path] >= e["at"]
            if not held and not released_after:
                self.violation(
                    "lost-not-granted",
                    f"{desc}: clients were told {o.leases}, released {o.released}",
                )
            if not self.competitor_held(path, str(mode), gaps):
                self.violation(
                    "lost-without-competitor",
                    f"{desc}: the competitor did not hold {path} (conflicting) between a "
                    f"daemon's death and the next READY=1 {gaps}",
                )
            if not self.model.wait_dead(o, self.settle_timeout):
                self.violation(
                    "lost-not-fenced",
                    f"{desc}: owner pid {o.pid} is alive after {self.settle_timeout} s",
                )
        for o in by_uuid.values():
            if o.fenced and not o.accounted and o.uuid not in self.lost_owners:
                self.violation(
                    "fenced-without-loss",
                    f"{o.name} pid {o.pid} was SIGKILLed, but no lease of it was reported lost",
                )

    def _tokens(self, leases: list[dict[str, Any]], status: dict[str, Any]) -> None:
        nxt = int(status["next_token"])
        top = max([self.model.max_token] + [int(x["token"]) for x in leases])
        if nxt <= top:
            self.violation(
                "token-went-back",
                f"Status.next_token {nxt} is not above token {top}, already acknowledged",
            )

    def verify(self) -> None:
        """``lockctl verify``: lockd's own account of its fds against the kernel's locks
        (and the fd store under systemd); run once at the end, with everything at rest."""
        self.stats["verify runs"] += 1
        for kind, finding in lockctl_verify(self.lockd.admin_socket, timeout=120)[1]:
            self.violation(kind, finding)

    def _lockctl(self) -> list[tuple[str, str, str, int, str]] | None:
        out = subprocess.run(
            [sys.executable, "-m", "lockd.ctl.cli", "--socket", str(self.lockd.socket),
             "--admin-socket", str(self.lockd.admin_socket), "locks", "-J"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        self.stats["lockctl checks"] += 1
        if out.returncode != 0:
            self.violation("lockctl", f"lockctl locks -J exited {out.returncode}: {out.stderr}")
            return None
        data = json.loads(out.stdout)
        return sorted(_summary(x) for x in data.get("leases", data.get("locks", [])))
