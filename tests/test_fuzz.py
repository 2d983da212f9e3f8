"""Hostile input (issue 4): property tests of the codec, property tests of the methods'
parameters against a live daemon, and a raw-bytes fuzzer of 100,000 malformed messages.

Theory of operation:

- The codec (:mod:`lockd.wire.varlink`) is sans-IO, so hypothesis drives it in-process: arbitrary
  bytes in arbitrary chunks, arbitrary JSON-ish messages and parameter values may only ever
  raise ``ProtocolError`` or ``InvalidParameter``; anything the encoder writes, cut anywhere,
  decodes back to the same calls.
- The live property test keeps one daemon for all examples (the ``@given`` function is defined
  inside the test) and sends typed-but-hostile parameters to every method of both sockets:
  every reply must be a result or an error from the schema's named set (never lockd's
  generic ``io.lockd.Error``, which means an unexpected exception), and the connection stays
  usable.
- The raw fuzzer is one thread multiplexing 48 connections with ``selectors``: each
  connection sends a pipelined script of "soft" malformed calls (well-framed JSON with wrong
  types, unknown methods, huge strings, nesting, bad paths: named errors, the connection
  stays) usually ended by one "hard" one (garbage, truncated JSON, non-objects, too deep, too
  big, bad UTF-8: the daemon answers ProtocolError and closes), reads every reply, and is
  replaced when the daemon closes it. Afterwards the daemon runs, its RSS stayed bounded,
  and a bystander's leases are held exactly as before (probe). ``LOCKD_FUZZ_MESSAGES=N``
  (default 25,000; 100,000 under ``make test-scale``) and ``LOCKD_FUZZ_SEED=S`` (default 1)
  scale and vary the run, e.g.
  ``LOCKD_FUZZ_MESSAGES=1000000 .venv/bin/python -m pytest tests/test_fuzz.py -k raw -s``.
"""

from __future__ import annotations

import functools
import json
import os
import random
import selectors
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from e2e import Conn, Daemon, Owners, held_by_journal, make_files, probe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loadkit import vm_kb
from scale import size

from lockd import errors
from lockd.errors import InvalidParameter, ProtocolError
from lockd.wire.varlink import (
    MAX_DEPTH,
    Call,
    Decoder,
    Params,
    encode_error,
    encode_reply,
    loads,
)

NAMED = set(errors.WIRE_ERRORS)  # every error a client may see, by name
PID_MAX = int(Path("/proc/sys/kernel/pid_max").read_text())

# --- the codec, in-process ----------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
# JSON-ish: what a hostile peer can put in a message after JSON parsing (any depth, any type)
anything = st.recursive(
    scalars | st.integers(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
PIECES = [b"\0", b"{", b"}", b"[", b"]", b'"method"', b":", b",", b'"', b"\\", b"\xff", b"1e999"]
byte_chunks = st.lists(
    st.one_of(st.binary(max_size=64), st.sampled_from(PIECES)), min_size=1, max_size=30
)


@settings(max_examples=400, deadline=None)
@given(chunks=byte_chunks, limit=st.sampled_from([1024, 4096, 64 * 1024]))
def test_decoder_bytes_only_protocol_errors(chunks: list[bytes], limit: int) -> None:
    dec = Decoder(limit)
    try:
        for chunk in chunks:
            for msg in dec.feed(chunk):
                assert isinstance(msg, dict)
            assert dec.pending <= limit  # memory bound: never more than one message held
    except ProtocolError:
        # poisoned: nothing after a framing error is ever interpreted
        with pytest.raises(ProtocolError):
            dec.feed(b'{"method":"org.varlink.service.GetInfo"}\0')


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_loads_only_protocol_errors(raw: bytes) -> None:
    try:
        obj = loads(raw)
    except ProtocolError:
        return
    assert isinstance(obj, dict)


@settings(max_examples=100, deadline=None)
@given(depth=st.integers(min_value=1, max_value=3000))
def test_nesting_depth_is_bounded(depth: int) -> None:
    raw = b'{"method":"m","parameters":{"x":' + b"[" * depth + b"]" * depth + b"}}"
    if depth + 2 > MAX_DEPTH:
        with pytest.raises(ProtocolError):
            loads(raw)
    else:
        assert loads(raw)["method"] == "m"


messages = st.one_of(
    st.dictionaries(st.text(max_size=10), anything, max_size=5),
    st.fixed_dictionaries(
        {},
        optional={
            "method": st.text(max_size=300) | anything,
            "parameters": st.dictionaries(st.text(max_size=10), anything, max_size=6) | anything,
            "more": anything,
            "oneway": anything,
        },
    ),
)
PARAM_NAMES = ["resource", "owner", "pid", "mode", "lockspace", "token", "fence", "name", "x"]


@settings(max_examples=300, deadline=None)
@given(msg=messages)
def test_call_and_params_only_named_errors(msg: dict[str, Any]) -> None:
    try:
        call = Call.from_message(msg)
    except (ProtocolError, InvalidParameter):
        return
    assert isinstance(call.method, str) and 0 < len(call.method) <= 255
    assert isinstance(call.parameters, dict)
    assert isinstance(call.more, bool) and isinstance(call.oneway, bool)
    p = Params(call.parameters)
    for name in PARAM_NAMES:
        for get in (
            functools.partial(p.string, name),
            functools.partial(p.string, name, "dflt", 16),
            functools.partial(p.opt_string, name, 64),
            functools.partial(p.opt_int, name, 1, 2**22),
            functools.partial(p.integer, name),
        ):
            try:
                v = get()
            except InvalidParameter as exc:
                assert exc.parameters.get("parameter") == name
                continue
            assert v is None or (isinstance(v, str | int) and not isinstance(v, bool))


calls = st.builds(
    Call,
    method=st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=60),
    parameters=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    more=st.booleans(),
    oneway=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(
    batch=st.lists(calls, min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=12),
    limit=st.none() | st.integers(min_value=0, max_value=3),
)
def test_framing_round_trips(batch: list[Call], cuts: list[int], limit: int | None) -> None:
    """Encoded calls, cut anywhere and fed with or without a per-feed limit (the server
    decodes at most a queue's worth at a time), decode back to the same calls in order."""
    data = b"".join(c.encode() for c in batch)
    assert data.count(b"\0") == len(batch)  # a NUL inside a string is escaped, never raw
    dec = Decoder()
    out: list[dict[str, Any]] = []
    prev = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        got = dec.feed(data[prev:cut], limit=limit)
        assert limit is None or len(got) <= limit
        out += got
        prev = cut
    while len(out) < len(batch) and limit:  # drain what the limit left buffered
        more = dec.feed(b"", limit=limit)
        assert more, "complete calls left in the buffer"
        out += more
    assert dec.pending == 0 or limit == 0
    if limit != 0:
        assert [Call.from_message(m) for m in out] == batch


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(sorted(errors.WIRE_ERRORS)),
    params=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    reply=st.dictionaries(st.text(max_size=8), json_values, max_size=4),
)
def test_replies_and_errors_round_trip(
    name: str, params: dict[str, Any], reply: dict[str, Any]
) -> None:
    err = errors.WIRE_ERRORS[name](**params)
    [wire_err, wire_reply, wire_more] = Decoder().feed(
        encode_error(err) + encode_reply(reply) + encode_reply(reply, True)
    )
    back = errors.from_wire(wire_err["error"], wire_err.get("parameters"))
    assert type(back) is type(err) and back.parameters == params
    assert wire_reply == {"parameters": reply}
    assert wire_more == {"parameters": reply, "continues": True}


# --- the methods' parameters, against a live daemon ---------------------------------------------


@pytest.fixture
def bystander(daemon: Daemon, owners: Owners, files: list[Path]) -> dict[str, Any]:
    """Another client's owner with an exclusive lease on files[0] and a shared one on
    files[1]; the fuzzing never learns its uuid or pid."""
    o = daemon.register(owners.spawn().pid, name="bystander")
    daemon.acquire(files[0], owner=o["uuid"])
    daemon.acquire(files[1], owner=o["uuid"], shared=True)
    return o


def untouched(daemon: Daemon, bystander: dict[str, Any], files: list[Path]) -> None:
    daemon.assert_alive()
    assert probe(files[0]) == "exclusive"
    assert probe(files[1]) == "shared"
    leases = daemon.inquire(owner=bystander["uuid"])["leases"]
    assert sorted((x["resource"], x["mode"], x["state"]) for x in leases) == [
        (str(files[0]), "exclusive", "held"),
        (str(files[1]), "shared", "held"),
    ]


def dead_pid(owners: Owners) -> int:
    p = owners.spawn()
    Owners.kill(p)
    return p.pid


def check_reply(reply: dict[str, Any], what: Any) -> str:
    """'ok' or the error name; fails on anything that is not a result or a named error."""
    if "error" in reply:
        assert reply["error"] in NAMED, f"unnamed error {reply} for {what}"
        assert reply["error"] != "io.lockd.ProtocolError", f"{reply} for a well-formed {what}"
        return str(reply["error"])
    assert isinstance(reply.get("parameters"), dict), (reply, what)
    return "ok"


def test_method_parameters_property(
    make_daemon: Any, owners: Owners, tmp_path: Path, files: list[Path]
) -> None:
    """Hypothesis over every method's parameters (typed values, wrong types, bounds, bad
    paths, other owners, unknown lockspaces) on one connection per socket."""
    lsdir = tmp_path / "ls1"
    lsdir.mkdir()
    d: Daemon = make_daemon(config=f'[lockspaces]\nls1 = "{lsdir}"\n')
    by = d.register(owners.spawn().pid, name="bystander")
    d.acquire(files[0], owner=by["uuid"])
    d.acquire(files[1], owner=by["uuid"], shared=True)
    fuzz_proc = owners.spawn()
    fuzz = d.register(fuzz_proc.pid, name="fuzz")
    gone = dead_pid(owners)
    adir = tmp_path / "adir"
    adir.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    paths = [str(f) for f in files] + [
        str(adir), str(fifo), "/dev/null", "/", "relative/path", str(files[2]) + "/..",
        str(tmp_path / "missing.img"), "/" + "x" * 300, "/" + "a/" * 2100, "", "\0",
    ]  # fmt: skip

    def not_a_live_pid(v: Any) -> bool:  # never another client's process (the bystander's)
        return not (
            isinstance(v, int)
            and not isinstance(v, bool)
            and 1 < v <= PID_MAX
            and v != fuzz_proc.pid
            and os.path.exists(f"/proc/{v}")
        )

    pids = st.sampled_from([fuzz_proc.pid, gone, 0, 1, -1, PID_MAX + 1, 2**22, 2**22 + 1]) | (
        st.integers(min_value=PID_MAX + 1, max_value=2**70) | st.integers(max_value=0)
    )
    values = {
        "resource": st.sampled_from(paths) | st.text(max_size=40) | anything,
        "owner": st.sampled_from([fuzz["uuid"], "00000000-0000-4000-8000-000000000000"])
        | st.uuids().map(str)
        | st.text(max_size=70)
        | anything,
        "pid": pids | anything.filter(not_a_live_pid),
        "mode": st.sampled_from(["exclusive", "shared", "both", "", "EXCLUSIVE"]) | anything,
        "lockspace": st.sampled_from(["", "direct", "ls1", "nope", "../ls1", "ls1/"])
        | st.text(max_size=70)
        | anything,
        "token": st.integers(min_value=-(2**63), max_value=2**64) | anything,
        "fence": st.sampled_from(["kill", "term", "none", "explode"]) | anything,
        "name": st.text(max_size=300) | anything,
        "uuid": st.uuids().map(str) | st.text(max_size=40) | anything,
        "interface": st.sampled_from(["io.lockd", "io.lockd.Admin", "org.varlink.service"])
        | st.text(max_size=20),
        "limit": st.integers(min_value=-5, max_value=200_000) | anything,
    }
    main_methods = {
        "io.lockd.Register": ["pid", "uuid", "name", "fence"],
        "io.lockd.Acquire": ["resource", "owner", "pid", "mode", "lockspace", "token"],
        "io.lockd.Release": ["resource", "owner", "pid", "lockspace"],
        "io.lockd.ReleaseAll": ["owner", "pid"],
        "io.lockd.Inquire": ["owner", "pid"],
        "io.lockd.Watch": ["owner", "pid"],  # without "more": always InvalidParameter
        "org.varlink.service.GetInfo": [],
        "org.varlink.service.GetInterfaceDescription": ["interface"],
        "io.lockd.Admin.Status": [],  # not on the main socket
    }
    admin_methods = {
        "io.lockd.Admin.Status": [],
        "io.lockd.Admin.ListLeases": ["lockspace", "owner"],
        "io.lockd.Admin.ListOwners": [],
        "io.lockd.Admin.History": ["limit", "owner", "resource"],
        # never the bystander's files: an administrator may release anything
        "io.lockd.Admin.ForceRelease": ["resource", "lockspace", "owner"],
        "io.lockd.Acquire": ["resource"],  # not on the admin socket
    }

    def call_st(methods: dict[str, list[str]]) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
        return st.sampled_from(sorted(methods)).flatmap(
            lambda m: st.tuples(
                st.just(m),
                st.fixed_dictionaries({}, optional={k: values[k] for k in methods[m]}),
            )
        )

    seen: dict[str, int] = {}
    main, admin = d.connect(), d.connect(admin=True)

    @settings(
        max_examples=250,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(call=call_st(main_methods), admin_call=call_st(admin_methods))
    def fuzz_once(call: tuple[str, dict[str, Any]], admin_call: tuple[str, dict[str, Any]]) -> None:
        method, p = call
        outcome = check_reply(main.call_raw(method, p), call)
        seen[outcome] = seen.get(outcome, 0) + 1
        method, p = admin_call
        if method == "io.lockd.Admin.ForceRelease" and p.get("resource") in (
            str(files[0]),
            str(files[1]),
        ):
            p["resource"] = str(files[2])
        outcome = check_reply(admin.call_raw(method, p), admin_call)
        seen[outcome] = seen.get(outcome, 0) + 1

    try:
        fuzz_once()
    finally:
        main.close()
        admin.close()
    print(f"\nparameter fuzzing outcomes: {seen}")
    untouched(d, by, files)
    # what the daemon says the fuzz owner holds is what the kernel says
    held = held_by_journal(d.leases(owner=fuzz["uuid"]))
    for f in files[2:]:
        assert probe(f) == held.get(str(f), "free"), f


# --- the raw-bytes fuzzer -----------------------------------------------------------------------

FUZZ_MESSAGES = int(os.environ.get("LOCKD_FUZZ_MESSAGES", size(25_000, 100_000)))
FUZZ_CONNECTIONS = 48
MAX_MESSAGE = 64 * 1024

_METHODS = [
    "io.lockd.Register", "io.lockd.Acquire", "io.lockd.Release", "io.lockd.ReleaseAll",
    "io.lockd.Inquire", "io.lockd.Watch", "org.varlink.service.GetInterfaceDescription",
    "io.lockd.Admin.ForceRelease", "io.lockd.Admin.Reexec", "io.lockd.acquire", "io.lockd.",
    "org.varlink.service.GetInfo.", "x", "io.lockd.Acquire\u0000", "\u00e9t\u00e9.Acquire",
]  # fmt: skip
_KEYS = ["resource", "owner", "pid", "mode", "lockspace", "token", "fence", "name", "uuid"]


class Generator:
    """Seeded malformed messages. ``soft()`` is well-framed JSON with a string method (a named
    error, the connection stays); ``hard()`` is a framing error (the connection is closed)."""

    def __init__(self, seed: int, files: list[str]) -> None:
        self.r = random.Random(seed)
        self.files = files

    def value(self, depth: int = 0) -> Any:
        r = self.r
        k = r.randrange(12 if depth < 6 else 9)
        if k == 0:
            return None
        if k == 1:
            return r.choice([True, False])
        if k == 2:
            # never a small positive int: that could be a real pid (a kernel thread)
            return r.choice([0, -1, 1, 2**22 + 1, 2**31, 2**63 - 1, -(2**63), -r.randrange(9)])
        if k == 3:
            return r.choice([0.5, -1e300, 1e-300, 3.0])
        if k == 4:
            return "".join(chr(r.randrange(1, 0x2FF)) for _ in range(r.randrange(12)))
        if k == 5:
            return r.choice(self.files) + r.choice(["", "/..", "/.", "//", "\u0000x"])
        if k == 6:
            return r.choice(["exclusive", "shared", "kill", "direct", "", "/", "/dev/null"])
        if k == 7:
            return "/" + "a" * r.choice([255, 256, 4095, 4096, 5000, 20_000])
        if k == 8:
            return str(r.getrandbits(128))
        if k == 9:
            return [self.value(depth + 1) for _ in range(r.randrange(4))]
        return {r.choice(_KEYS): self.value(depth + 1) for _ in range(r.randrange(4))}

    def soft(self) -> bytes:
        r = self.r
        k = r.randrange(10)
        msg: dict[str, Any] = {"method": r.choice(_METHODS)}
        if k < 6:
            msg["parameters"] = {r.choice(_KEYS): self.value() for _ in range(r.randrange(5))}
        elif k == 6:
            msg["parameters"] = self.value()  # may not be an object at all
        elif k == 7:  # "oneway": true would be a call without a reply: not malformed
            flag = self.value()
            msg[r.choice(["more", "oneway"])] = "true" if flag is True else flag
        elif k == 8:
            msg["parameters"] = {"resource": "/" + "b" * r.randrange(4097, 60_000)}
        else:
            nest: Any = "/x"
            for _ in range(r.randrange(1, MAX_DEPTH - 2)):
                nest = [nest] if r.random() < 0.5 else {"resource": nest}
            msg["parameters"] = {"resource": nest}
        raw = json.dumps(msg).encode()
        return raw + b"\0" if len(raw) < MAX_MESSAGE else self.soft()

    def hard(self) -> bytes:
        r = self.r
        k = r.randrange(9)
        if k == 0:
            return (
                bytes(r.randrange(256) for _ in range(r.randrange(1, 200))).replace(b"\0", b"\1")
                + b"\0"
            )
        if k == 1:
            good = json.dumps({"method": "io.lockd.Acquire", "parameters": {"resource": "/a"}})
            return good.encode()[: r.randrange(len(good))] + b"\0"
        if k == 2:
            return json.dumps(self.value()).encode().lstrip(b"{") + b"\0"  # rarely an object
        if k == 3:
            d = r.randrange(MAX_DEPTH, 5000)
            return b'{"method":"io.lockd.Acquire","parameters":' + b"[" * d + b"]" * d + b"}\0"
        if k == 4:
            return b'{"method":"io.lockd.Acquire","parameters":{"resource":"/' + b"z" * (
                MAX_MESSAGE + r.randrange(1, 5000)
            )
        if k == 5:
            return b'{"method":"io.lockd.Acquire","parameters":{"resource":"/\xc3\x28"}}\0'
        if k == 6:
            return json.dumps({"parameters": {"resource": "/a"}}).encode() + b"\0"
        if k == 7:
            return json.dumps({"method": r.choice([5, None, "", "m" * 256, []])}).encode() + b"\0"
        return b'{"method":"io.lockd.Inquire","parameters":{"pid":1}' + b"\0" + b"}\0"


class FuzzConn:
    """One fuzzing connection: pipelined soft messages (each answered), then maybe one hard
    message after every soft one was answered (so none of them is lost to the close)."""

    def __init__(self, path: Path, soft: list[bytes], hard: bytes | None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.connect(str(path))
        self.sock.setblocking(False)
        self.data = b"".join(soft)
        self.soft = len(soft)
        self.hard = hard
        self.in_hard = False
        self.sent = 0
        self.replies = 0

    def messages(self) -> int:
        return self.soft + (1 if self.in_hard else 0)


def raw_fuzz(daemon: Daemon, files: list[str], total: int, seed: int = 1) -> dict[str, int]:
    """Send ``total`` malformed messages over many connections; return figures."""
    gen = Generator(seed, files)
    sel = selectors.DefaultSelector()
    stats = dict.fromkeys(["messages", "connections", "replies", "hard", "rss_max"], 0)
    scheduled = 0
    last_rss = 0.0

    def new_conn() -> None:
        nonlocal scheduled
        soft = [gen.soft() for _ in range(gen.r.randrange(1, 300))]
        hard = gen.hard() if gen.r.random() < 0.8 else None
        scheduled += len(soft) + (hard is not None)
        c = FuzzConn(daemon.socket, soft, hard)
        stats["connections"] += 1
        sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)

    def finish(c: FuzzConn) -> None:
        sel.unregister(c.sock)
        c.sock.close()
        stats["messages"] += c.messages()
        stats["replies"] += c.replies
        stats["hard"] += c.in_hard
        if scheduled < total:
            new_conn()

    for _ in range(FUZZ_CONNECTIONS):
        new_conn()
    deadline = time.monotonic() + 600
    while sel.get_map():
        assert time.monotonic() < deadline, "fuzzer made no progress for 10 minutes"
        assert daemon.running, daemon.stderr_tail()
        if time.monotonic() - last_rss > 0.25:
            stats["rss_max"] = max(stats["rss_max"], vm_kb(daemon.pid))
            last_rss = time.monotonic()
        ready = sel.select(timeout=1)
        assert ready or daemon.running
        for key, events in ready:
            c: FuzzConn = key.data
            if events & selectors.EVENT_WRITE and c.sent < len(c.data):
                try:
                    c.sent += c.sock.send(c.data[c.sent : c.sent + 262144])
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    assert c.in_hard, "the daemon closed a connection over a soft message"
                    finish(c)
                    continue
                if c.sent == len(c.data):
                    sel.modify(c.sock, selectors.EVENT_READ, c)
            if not events & selectors.EVENT_READ:
                continue
            try:
                chunk = c.sock.recv(262144)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                assert c.in_hard, f"closed after {c.replies} of {c.soft} soft messages"
                finish(c)
                continue
            c.replies += chunk.count(b"\0")
            if not c.in_hard and c.replies >= c.soft:
                assert c.replies == c.soft, "more replies than calls"
                if c.hard is None:
                    finish(c)
                    continue
                c.in_hard, c.data, c.sent = True, c.hard, 0
                sel.modify(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
    stats["rss_max"] = max(stats["rss_max"], vm_kb(daemon.pid))
    return stats


@pytest.mark.scale
def test_raw_fuzz(
    daemon: Daemon, bystander: dict[str, Any], owners: Owners, tmp_path: Path, files: list[Path]
) -> None:
    """FUZZ_MESSAGES malformed messages (at least): the daemon stays up, its RSS stays under
    twice its start + 8 MiB, and the bystander's leases are untouched."""
    mine = make_files(tmp_path / "fuzzres", 4)
    paths = [str(f) for f in mine] + [str(files[0]), str(files[1]), "/dev/null", str(tmp_path)]
    raw_fuzz(daemon, paths, 3000, seed=0)  # warm-up: the allocator's and caches' steady state
    rss0 = vm_kb(daemon.pid)
    t0 = time.monotonic()
    stats = raw_fuzz(daemon, paths, FUZZ_MESSAGES, seed=int(os.environ.get("LOCKD_FUZZ_SEED", 1)))
    took = time.monotonic() - t0
    rss1 = vm_kb(daemon.pid)
    print(
        f"\nraw fuzz: {stats['messages']} malformed messages on {stats['connections']} "
        f"connections in {took:.1f} s ({stats['replies']} replies; {stats['hard']} framing "
        f"errors, each closed by the daemon); RSS {rss0} kB before, {rss1} kB after, "
        f"{stats['rss_max']} kB max"
    )
    assert stats["messages"] >= FUZZ_MESSAGES, stats
    assert stats["replies"] >= stats["messages"] - stats["hard"], stats
    assert stats["rss_max"] < 2 * rss0 + 8192, (rss0, stats)
    untouched(daemon, bystander, files)
    with Conn(daemon.socket) as c:  # and a well-behaved client is served normally
        o = c.call("io.lockd.Register", {"pid": owners.spawn().pid})["owner"]["uuid"]
        c.call("io.lockd.Acquire", {"resource": str(mine[0]), "owner": o})
    assert probe(mine[0]) == "exclusive"
