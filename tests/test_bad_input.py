"""Malformed Varlink over a raw socket (issue item 7, DESIGN §8).

Each case is sent on a fresh connection by a hostile peer while another client (the
``bystander``) holds leases. Afterwards: the bad connection got a named error or was closed,
the daemon is still up (a brand-new connection is answered), and the bystander's leases are
held exactly as before, checked in the kernel.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e import Conn, ConnectionLost, Daemon, Owners, make_files, module_daemon, probe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scale import size

MAX_MESSAGE = 64 * 1024


# One daemon for the whole module: every hostile input below hits the same process, so the
# checks after each case also see what the earlier cases left behind.
@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with module_daemon(tmp_path_factory.mktemp("bad-input")) as d:
        yield d


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_files(tmp_path_factory.mktemp("bad-input-res"), 8)


@pytest.fixture(scope="module")
def bystander(daemon: Daemon, files: list[Path]) -> Iterator[dict[str, Any]]:
    owners = Owners()
    try:
        o = daemon.register(owners.spawn().pid, name="bystander")
        daemon.acquire(files[0], owner=o["uuid"])
        daemon.acquire(files[1], owner=o["uuid"], shared=True)
        yield o
    finally:
        owners.close()


def untouched(daemon: Daemon, bystander: dict[str, Any], files: list[Path]) -> None:
    daemon.assert_alive()
    assert probe(files[0]) == "exclusive"
    assert probe(files[1]) == "shared"
    leases = daemon.inquire(owner=bystander["uuid"])["leases"]
    assert sorted((x["resource"], x["state"]) for x in leases) == [
        (str(files[0]), "held"),
        (str(files[1]), "held"),
    ]


def send_and_expect_close(daemon: Daemon, data: bytes) -> list[dict[str, Any]]:
    """Send ``data``; the daemon must close the connection (within 10 s). Returns what it
    said before closing, which may only be error replies."""
    c = Conn(daemon.socket, timeout=10)
    try:
        try:
            c.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return []  # closed while we were still sending: closed indeed
        assert c.closed_by_peer(10), f"connection left open after {data[:60]!r}..."
        raw = b"".join(c.before_eof)
    finally:
        c.close()
    out = []
    for part in raw.split(b"\0"):
        if part:
            msg = json.loads(part)
            assert "error" in msg, f"a non-error reply to garbage: {msg}"
            out.append(msg)
    return out


CLOSE_CASES = {
    "garbage-nul": b"\xff\xfe garbage \x00",
    "garbage-then-valid": b"}{\x00" + b'{"method":"org.varlink.service.GetInfo"}\x00',
    "empty-message": b"\x00",
    "json-array": b"[1, 2, 3]\x00",
    "json-string": b'"io.lockd.Acquire"\x00',
    "json-number": b"5\x00",
    "json-null": b"null\x00",
    "truncated-object": b'{"method": "io.lockd.Acquire", "parameters": {\x00',
    "invalid-utf8": b'{"method":"io.lockd.Acquire","parameters":{"resource":"/\xff\xfe"}}\x00',
    "method-not-string": b'{"method": 5}\x00',
    "no-method": b'{"parameters": {}}\x00',
    "unterminated-over-64k": b"a" * (MAX_MESSAGE + 4096),
    "unterminated-json-over-64k": b'{"method":"io.lockd.Acquire","parameters":{"resource":"/'
    + b"a" * (MAX_MESSAGE + 100),
    "terminated-json-over-64k": (
        b'{"method":"io.lockd.Acquire","parameters":{"resource":"/'
        + b"a" * (MAX_MESSAGE + 100)
        + b'"}}\x00'
    ),
    "deep-nesting-20000": b'{"method":"io.lockd.Acquire","parameters":{"resource":'
    + b"[" * 20000
    + b"]" * 20000
    + b"}}\x00",
}


@pytest.mark.parametrize("case", list(CLOSE_CASES))
def test_unparseable_input_closes_connection(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path], case: str
) -> None:
    replies = send_and_expect_close(daemon, CLOSE_CASES[case])
    # at most the one error explaining the close; nothing after the bad bytes is interpreted
    assert len(replies) <= 1, replies
    untouched(daemon, bystander, files)


def test_peer_vanishes_mid_message(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path]
) -> None:
    for _ in range(20):
        c = Conn(daemon.socket)
        c.sock.sendall(b'{"method":"io.lockd.Acquire","parameters":{"resou')
        c.close()
    c = Conn(daemon.socket)
    c.sock.sendall(b'{"method":"io.lockd.Acquire"')
    c.sock.shutdown(socket.SHUT_WR)
    assert c.closed_by_peer(10)
    c.close()
    untouched(daemon, bystander, files)


BAD_PARAMS = {
    "resource-int": ("io.lockd.Acquire", {"resource": 5}),
    "resource-list": ("io.lockd.Acquire", {"resource": ["/a"]}),
    "resource-missing": ("io.lockd.Acquire", {"pid": 1}),
    "pid-string": ("io.lockd.Acquire", {"resource": "/tmp/x", "pid": "1"}),
    "pid-bool": ("io.lockd.Register", {"pid": True}),
    "pid-negative": ("io.lockd.Register", {"pid": -1}),
    "pid-huge": ("io.lockd.Register", {"pid": 2**80}),
    "pid-float": ("io.lockd.Register", {"pid": 1.5}),
    "mode-unknown": ("io.lockd.Acquire", {"resource": "/tmp/x", "pid": 1, "mode": "both"}),
    "token-string": ("io.lockd.Acquire", {"resource": "/tmp/x", "pid": 1, "token": "7"}),
    "fence-unknown": ("io.lockd.Register", {"pid": 1, "fence": "explode"}),
    "owner-and-pid": ("io.lockd.Acquire", {"resource": "/tmp/x", "pid": 1, "owner": "x"}),
    "neither-owner-nor-pid": ("io.lockd.Release", {"resource": "/tmp/x"}),
    "string-too-long": ("io.lockd.Register", {"pid": 1, "name": "n" * 10000}),
    "parameters-not-object": ("io.lockd.Acquire", [1, 2]),
    "deep-but-parseable": ("io.lockd.Acquire", {"resource": json.loads("[" * 100 + "]" * 100)}),
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_wrong_parameters_are_named_errors(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path], case: str
) -> None:
    method, params = BAD_PARAMS[case]
    with Conn(daemon.socket) as c:
        if case == "deep-but-parseable":
            # too deep for lockd's limit (DESIGN §8): a named error, then either the
            # connection stays usable (InvalidParameter) or is closed (ProtocolError)
            try:
                reply = c.call_raw(method, params)  # type: ignore[arg-type]
            except ConnectionLost:
                reply = {"error": "closed"}
            assert reply.get("error") in (
                "org.varlink.service.InvalidParameter",
                "io.lockd.ProtocolError",
                "closed",
            ), reply
            if reply["error"] != "org.varlink.service.InvalidParameter":
                assert c.closed_by_peer(10)
                return untouched(daemon, bystander, files)
        else:
            reply = c.call_raw(method, params)  # type: ignore[arg-type]
            assert reply.get("error") == "org.varlink.service.InvalidParameter", reply
        # the connection stays usable after a named error
        again = c.call("org.varlink.service.GetInfo")
        assert "io.lockd" in again["interfaces"]
    untouched(daemon, bystander, files)


def test_wrong_types_acquire_exact(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path]
) -> None:
    """The issue's example, byte for byte."""
    with Conn(daemon.socket) as c:
        c.send_raw(b'{"method":"io.lockd.Acquire","parameters":{"resource":5}}\0')
        reply = c.recv_message()
    assert reply["error"] == "org.varlink.service.InvalidParameter", reply
    untouched(daemon, bystander, files)


@pytest.mark.parametrize(
    "method",
    [
        "io.lockd.Frobnicate",
        "io.lockd.acquire",
        "org.varlink.service.Nope",
        "io.lockd.Admin.Status",  # exists, but not on the main socket
    ],
)
def test_unknown_method(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path], method: str
) -> None:
    with Conn(daemon.socket) as c:
        reply = c.call_raw(method, {})
        if method == "io.lockd.Admin.Status":
            assert reply.get("error") in (
                "org.varlink.service.MethodNotFound",
                "org.varlink.service.InterfaceNotFound",
                "io.lockd.PermissionDenied",
            ), reply
        else:
            assert reply.get("error") == "org.varlink.service.MethodNotFound", reply
        assert "io.lockd" in c.call("org.varlink.service.GetInfo")["interfaces"]
    untouched(daemon, bystander, files)


def test_unknown_interface(daemon: Daemon, bystander: dict[str, Any], files: list[Path]) -> None:
    with Conn(daemon.socket) as c:
        reply = c.call_raw("com.example.Nothing.Method", {})
        assert reply.get("error") in (
            "org.varlink.service.InterfaceNotFound",
            "org.varlink.service.MethodNotFound",
        ), reply
        reply = c.call_raw("org.varlink.service.GetInterfaceDescription", {"interface": "nope"})
        assert reply.get("error") == "org.varlink.service.InterfaceNotFound", reply
    untouched(daemon, bystander, files)


def test_pipelined_calls_answered_in_order(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path]
) -> None:
    with Conn(daemon.socket) as c:
        batch = b"".join(
            json.dumps(
                {"method": "io.lockd.Inquire", "parameters": {"owner": bystander["uuid"]}}
            ).encode()
            + b"\0"
            if i % 2
            else b'{"method":"io.lockd.Nope"}\0'
            for i in range(100)
        )
        c.send_raw(batch)
        for i in range(100):
            msg = c.recv_message()
            if i % 2:
                assert len(msg["parameters"]["leases"]) == 2
            else:
                assert msg["error"] == "org.varlink.service.MethodNotFound"
    untouched(daemon, bystander, files)


def test_bad_input_after_good_keeps_the_lease(
    daemon: Daemon, owners: Owners, bystander: dict[str, Any], files: list[Path]
) -> None:
    """Garbage on a connection that acquired a lease closes it; the lease stays (leases
    belong to owners, not connections), and so do the bystander's."""
    c = Conn(daemon.socket)
    o = c.call("io.lockd.Register", {"pid": owners.spawn().pid})["owner"]
    c.call("io.lockd.Acquire", {"resource": str(files[2]), "owner": o["uuid"]})
    c.sock.sendall(b"\x00\x01\x02 not json \x00")
    assert c.closed_by_peer(10)
    c.close()
    assert probe(files[2]) == "exclusive"
    untouched(daemon, bystander, files)


def test_idle_connections_do_not_block_others(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path]
) -> None:
    idle = [Conn(daemon.socket) for _ in range(64)]
    try:
        for c in idle[::2]:
            c.sock.sendall(b'{"method":"io.lockd.Inq')  # half a message, then nothing
        t0 = time.monotonic()
        untouched(daemon, bystander, files)
        assert time.monotonic() - t0 < 10
    finally:
        for c in idle:
            c.close()


def test_admin_socket_bad_input(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path]
) -> None:
    c = Conn(daemon.admin_socket, timeout=10)
    c.sock.sendall(b"\xff" * 100 + b"\x00")
    assert c.closed_by_peer(10)
    c.close()
    with Conn(daemon.admin_socket) as c:
        reply = c.call_raw("io.lockd.Admin.History", {"limit": "all"})
        assert reply.get("error") == "org.varlink.service.InvalidParameter", reply
        reply = c.call_raw("io.lockd.Admin.ForceRelease", {"resource": 7})
        assert reply.get("error") == "org.varlink.service.InvalidParameter", reply
    untouched(daemon, bystander, files)


# --- fuzzing ----------------------------------------------------------------------------------

METHODS = [
    "io.lockd.Register",
    "io.lockd.Acquire",
    "io.lockd.Release",
    "io.lockd.ReleaseAll",
    "io.lockd.Inquire",
    "org.varlink.service.GetInfo",
    "org.varlink.service.GetInterfaceDescription",
    "io.lockd.Nope",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=40)
    | st.sampled_from(["/", "/tmp", "/dev/null", "shared", "exclusive", "kill", "none"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
params_st = st.dictionaries(
    st.sampled_from(["resource", "owner", "pid", "mode", "lockspace", "token", "fence", "name"]),
    json_values,
    max_size=5,
)
message_st = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda m, p, more: (
            json.dumps({"method": m, "parameters": p, "more": more}).encode() + b"\0"
        ),
        st.sampled_from(METHODS),
        params_st,
        json_values,
    ),
    st.builds(lambda v: json.dumps(v).encode() + b"\0", json_values),
)


@pytest.mark.scale
@settings(
    max_examples=size(40, 120),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(chunks=st.lists(message_st, min_size=1, max_size=4))
def test_fuzz_never_crashes(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path], chunks: list[bytes]
) -> None:
    c = Conn(daemon.socket, timeout=10)
    try:
        try:
            for chunk in chunks:
                c.sock.sendall(chunk)
            c.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        # after our EOF the daemon answers what it can and closes
        assert c.closed_by_peer(10), f"connection left open after {chunks!r}"
        for part in b"".join(c.before_eof).split(b"\0"):
            if part:
                msg = json.loads(part)
                assert isinstance(msg, dict) and ("parameters" in msg or "error" in msg), msg
    finally:
        c.close()
    assert daemon.running, daemon.stderr_tail()
    assert probe(files[0]) == "exclusive"
    assert probe(files[1]) == "shared"


def test_fuzz_left_daemon_sane(
    daemon: Daemon, bystander: dict[str, Any], files: list[Path]
) -> None:
    """A burst of random garbage on many connections at once, then the usual checks."""
    import random

    rng = random.Random(7)
    conns = []
    for _ in range(32):
        c = Conn(daemon.socket)
        conns.append(c)
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000)))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            c.sock.sendall(data)
    for c in conns:
        c.close()
    untouched(daemon, bystander, files)
