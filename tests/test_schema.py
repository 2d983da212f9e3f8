"""Every reply and error on the wire has the shape schema/*.varlink declares (DESIGN §6).

The schema is read from the repository's own .varlink files by e2e.Interface, so a field
renamed in the daemon but not in the schema (or the reverse) fails here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from e2e import Conn, Daemon, Owners, conforms, hold_lock, load_interfaces

from lockd import errors

IFACES = load_interfaces()
MAIN = IFACES["io.lockd"]
ADMIN = IFACES["io.lockd.Admin"]


def check_reply(iface: Any, method: str, reply: dict[str, Any]) -> None:
    _ins, outs = iface.methods[method]
    conforms(reply, outs, iface, where=f"{iface.name}.{method}")


def check_objects(objs: list[dict[str, Any]], *type_names: str, where: str) -> None:
    """Admin's []object replies have the shapes of io.lockd types (any of ``type_names``)."""
    for i, obj in enumerate(objs):
        problems = []
        for name in type_names:
            try:
                conforms(obj, MAIN.types[name], MAIN, where=f"{where}[{i}]")
                break
            except AssertionError as exc:
                problems.append(str(exc))
        else:
            raise AssertionError(" / ".join(problems))


def test_schema_files_parse_and_match_the_package_copy() -> None:
    assert set(IFACES) == {"io.lockd", "io.lockd.Admin"}
    pkg = Path(__file__).resolve().parent.parent / "lockd" / "schema"
    for name in IFACES:
        shipped = pkg / f"{name}.varlink"
        if shipped.exists():
            top = Path(__file__).resolve().parent.parent / "schema" / f"{name}.varlink"
            assert shipped.read_text() == top.read_text(), f"{shipped} differs from {top}"
    assert set(MAIN.errors) >= {
        "ResourceBusy",
        "NoSuchOwner",
        "NotHeld",
        "InvalidResource",
        "PermissionDenied",
        "LimitExceeded",
        "TokenMismatch",
    }
    # every wire error of the schema has its class in lockd.errors, and the reverse
    declared = {f"io.lockd.{e}" for e in MAIN.errors}
    classes = {n for n in errors.WIRE_ERRORS if n.startswith("io.lockd.")}
    assert declared <= classes, declared - classes


def test_getinterfacedescription_is_the_schema(daemon: Daemon) -> None:
    root = Path(__file__).resolve().parent.parent / "schema"
    with daemon.connect() as c:
        desc = c.call("org.varlink.service.GetInterfaceDescription", {"interface": "io.lockd"})
    assert desc["description"].strip() == (root / "io.lockd.varlink").read_text().strip()
    with daemon.connect(admin=True) as c:
        desc = c.call(
            "org.varlink.service.GetInterfaceDescription", {"interface": "io.lockd.Admin"}
        )
    assert desc["description"].strip() == (root / "io.lockd.Admin.varlink").read_text().strip()


def test_main_interface_replies_conform(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    p = owners.spawn()
    with daemon.connect() as c:
        reply = c.call("io.lockd.Register", {"pid": p.pid, "name": "vm"})
        check_reply(MAIN, "Register", reply)
        u = reply["owner"]["uuid"]
        reply = c.call("io.lockd.Acquire", {"resource": str(files[0]), "owner": u})
        check_reply(MAIN, "Acquire", reply)
        reply = c.call(
            "io.lockd.Acquire", {"resource": str(files[1]), "pid": p.pid, "mode": "shared"}
        )
        check_reply(MAIN, "Acquire", reply)
        check_reply(MAIN, "Inquire", c.call("io.lockd.Inquire", {"owner": u}))
        reply = c.call("io.lockd.Release", {"resource": str(files[0]), "owner": u})
        check_reply(MAIN, "Release", reply)
        check_reply(
            MAIN, "Release", c.call("io.lockd.Release", {"resource": str(files[0]), "owner": u})
        )
        check_reply(MAIN, "ReleaseAll", c.call("io.lockd.ReleaseAll", {"pid": p.pid}))
        check_reply(MAIN, "ReleaseAll", c.call("io.lockd.ReleaseAll", {"pid": p.pid}))
        info = c.call("org.varlink.service.GetInfo")
    for key in ("vendor", "product", "version", "url", "interfaces"):
        assert key in info, info


def test_admin_replies_conform(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    a, b = owners.spawn(), owners.spawn()
    ua = daemon.register(a.pid, fence="none")["uuid"]
    ub = daemon.register(b.pid)["uuid"]
    daemon.acquire(files[0], owner=ua)
    daemon.acquire(files[1], owner=ua, shared=True)
    daemon.acquire(files[1], owner=ub, shared=True)
    daemon.release(files[1], owner=ub)
    daemon.kill()
    with hold_lock(files[0]):  # a lost lease, a retaken one, an owner-dead one
        b.kill()
        b.wait()
        daemon.start()
    with daemon.connect(admin=True) as c:
        check_reply(ADMIN, "Status", c.call("io.lockd.Admin.Status"))
        leases = c.call("io.lockd.Admin.ListLeases")
        check_reply(ADMIN, "ListLeases", leases)
        assert {x["state"] for x in leases["leases"]} == {"held", "lost"}
        check_objects(leases["leases"], "Lease", where="ListLeases")
        owners_ = c.call("io.lockd.Admin.ListOwners")
        check_reply(ADMIN, "ListOwners", owners_)
        check_objects(owners_["owners"], "Owner", where="ListOwners")
        hist = c.call("io.lockd.Admin.History", {"limit": 100})
        check_reply(ADMIN, "History", hist)
        check_objects(hist["events"], "Event", where="History")
        kinds = {e["event"] for e in hist["events"]}
        assert {"register", "acquire", "release", "lost", "retaken"} <= kinds, kinds
        forced = c.call("io.lockd.Admin.ForceRelease", {"resource": str(files[1])})
        check_reply(ADMIN, "ForceRelease", forced)
        check_objects(forced["leases"], "Released", "Lease", where="ForceRelease")
        seqs = [e["seq"] for e in c.call("io.lockd.Admin.History", {"limit": 100})["events"]]
        assert len(set(seqs)) == len(seqs)


def test_errors_conform(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    a, b = owners.spawn(), owners.spawn()
    ua = daemon.register(a.pid, fence="none")["uuid"]
    ub = daemon.register(b.pid)["uuid"]
    daemon.acquire(files[0], owner=ua)
    daemon.acquire(files[2], owner=ua)
    daemon.kill()
    with hold_lock(files[2]):
        daemon.start()
        calls = {
            "ResourceBusy": ("io.lockd.Acquire", {"resource": str(files[0]), "owner": ub}),
            "NoSuchOwner": ("io.lockd.Acquire", {"resource": str(files[0]), "pid": 1}),
            "NotHeld": ("io.lockd.Release", {"resource": str(files[1]), "owner": ub}),
            "InvalidResource": ("io.lockd.Acquire", {"resource": "rel", "owner": ub}),
            "TokenMismatch": (
                "io.lockd.Acquire",
                {"resource": str(files[3]), "owner": ub, "token": 999999},
            ),
            "LeaseLost": ("io.lockd.Acquire", {"resource": str(files[2]), "owner": ua}),
        }
        with Conn(daemon.socket) as c:
            for name, (method, params) in calls.items():
                reply = c.call_raw(method, params)
                assert reply.get("error") == f"io.lockd.{name}", (name, reply)
                conforms(reply.get("parameters", {}), MAIN.errors[name], MAIN, where=name)
            # Varlink's own errors carry their standard parameter
            reply = c.call_raw("io.lockd.Acquire", {"resource": 5})
            assert reply["error"] == "org.varlink.service.InvalidParameter"
            assert isinstance(reply.get("parameters", {}).get("parameter"), str), reply
            reply = c.call_raw("io.lockd.Nope", {})
            assert reply["error"] == "org.varlink.service.MethodNotFound"
            assert reply.get("parameters", {}).get("method") == "io.lockd.Nope", reply


def _events(c: Conn, n: int, timeout: float = 10.0, last: bool = False) -> list[dict[str, Any]]:
    """n stream replies; with ``last`` the final one must end the stream (no "continues")."""
    out = []
    c.sock.settimeout(timeout)
    for i in range(n):
        msg = c.recv_message()
        ends = last and i == n - 1
        assert msg.get("continues") is (None if ends else True), msg
        out.append(msg["parameters"])
    return out


def test_watch_stream_conforms(daemon: Daemon, owners: Owners, files: list[Path]) -> None:
    p = owners.spawn()
    u = daemon.register(p.pid, name="watched")["uuid"]
    daemon.acquire(files[0], owner=u)
    c = daemon.connect()
    c.send_raw(
        json.dumps({"method": "io.lockd.Watch", "parameters": {"owner": u}, "more": True}).encode()
        + b"\0"
    )
    first = _events(c, 1)[0]
    check_reply(MAIN, "Watch", first)
    assert first["event"]["event"] == "watching"
    daemon.call("io.lockd.Admin.ForceRelease", {"resource": str(files[0])})
    ev = _events(c, 1)[0]
    assert ev["event"]["event"] == "force-release"
    assert ev["event"]["resource"] == str(files[0])
    check_reply(MAIN, "Watch", ev)
    # owner death is reported on the stream too
    daemon.acquire(files[1], owner=u)
    p.kill()
    p.wait()
    time.sleep(0.2)
    ev = _events(c, 1, last=True)[0]  # the owner's death ends its Watch
    check_reply(MAIN, "Watch", ev)
    assert ev["event"]["event"] == "owner-dead", ev
    c.close()


@pytest.mark.parametrize("method", sorted(MAIN.methods))
def test_every_method_answers(daemon: Daemon, owners: Owners, method: str) -> None:
    """Every method of the schema exists on the main socket (no MethodNotFound)."""
    p = owners.spawn()
    with daemon.connect() as c:
        reply = c.call_raw(f"io.lockd.{method}", {"pid": p.pid}, more=method == "Watch")
    assert reply.get("error") != "org.varlink.service.MethodNotFound", reply


@pytest.mark.parametrize("method", sorted(ADMIN.methods))
def test_every_admin_method_exists(daemon: Daemon, method: str) -> None:
    if method == "Reexec":
        pytest.skip("Reexec is exercised in test_reexec.py")
    with daemon.connect(admin=True) as c:
        reply = c.call_raw(f"io.lockd.Admin.{method}", {})
    assert reply.get("error") != "org.varlink.service.MethodNotFound", reply
