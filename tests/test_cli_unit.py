"""lockctl without a daemon: parsing, rendering, exit codes (a fake client stands in)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from lockd import errors
from lockd.ctl import cli, cli_output

LEASE = {
    "lockspace": "",
    "resource": "/images/vm 1.img",
    "path": "/images/vm 1.img",
    "mode": "exclusive",
    "owner": {"uuid": "u-1", "name": "", "pid": 42},
    "token": 7,
    "state": "held",
    "acquired_at": 1700000000.0,
    "continuity": "new",
}


class FakeClient:
    """Answers from a {method: reply or exception} table and records the calls."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies, self.calls = replies, []

    def call(self, method: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        self.calls.append((method, parameters))
        reply = self.replies[method]
        if isinstance(reply, Exception):
            raise reply
        return reply


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeClient:
    client = FakeClient({})
    for name in ("main.sock", "admin.sock"):  # session() fails fast on a missing socket path
        (tmp_path / name).touch()
    monkeypatch.setenv("LOCKD_SOCKET", str(tmp_path / "main.sock"))
    monkeypatch.setenv("LOCKD_ADMIN_SOCKET", str(tmp_path / "admin.sock"))

    @contextmanager
    def open_client(path: Path, timeout: float, admin: bool) -> Iterator[FakeClient]:
        yield client

    monkeypatch.setattr(cli, "_open_client", open_client)
    return client


def test_global_options_before_or_after_the_subcommand() -> None:
    args, _ = cli.parse(["--timeout", "2", "locks", "--socket", "/s", "-J"])
    assert (args.timeout, args.socket, args.json, args.raw) == (2.0, "/s", True, False)
    args, _ = cli.parse(["-J", "locks"])
    assert args.json and args.timeout == cli.DEFAULT_TIMEOUT


@pytest.mark.parametrize(
    "argv",
    [["acquire", "/x"], ["acquire", "/x", "--pid", "0"], ["locks", "--bogus"], [],
     ["acquire", "/x", "--pid", "1", "--fence", "maim"], ["--timeout", "0", "status"],
     ["status", "-o", "pid"], ["locks", "-J", "-r"]],
)  # fmt: skip
def test_usage_errors_exit_2_with_one_line(argv: list[str], capsys: Any) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("lockctl: ") and err.count("\n") == 1


def test_output_columns_any_case_and_unknown(capsys: Any) -> None:
    _, cols = cli.parse(["locks", "-o", "resource,Token"])
    assert [c.name for c in cols] == ["RESOURCE", "TOKEN"]
    _, cols = cli.parse(["owners", "-o", "+start"])
    assert [c.name for c in cols][-2:] == ["SINCE", "START"]
    assert cli.main(["locks", "-o", "resource,nope"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "'nope'" in err and "LOCKSPACE, RESOURCE" in err


def test_table_raw_and_noheadings() -> None:
    cols = cli_output.select_columns("lockspace,resource,pid,since", cli_output.LEASE_COLUMNS)
    other = {**LEASE, "resource": "/r", "owner": {"uuid": "u", "name": "n", "pid": 31337}}
    table = cli_output.render_table([LEASE, other], cols).splitlines()
    assert table[0] == "LOCKSPACE RESOURCE           PID SINCE"  # PID right-aligned
    assert table[2].startswith("direct    /r               31337 ")
    raw = cli_output.render_table([LEASE], cols, headings=False, raw=True)
    assert raw.startswith("direct /images/vm\\x201.img 42 ") and "\\x20" in raw.split()[-1]
    assert cli_output.escape("a\\b\nc", raw=True) == "a\\x5cb\\x0ac"


def test_locks_table_and_json(fake: FakeClient, capsys: Any) -> None:
    fake.replies["io.lockd.Admin.ListLeases"] = {"leases": [LEASE]}
    assert cli.main(["locks", "--lockspace", "ls1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["LOCKSPACE", "RESOURCE", "MODE", "OWNER", "PID", "TOKEN",
                              "STATE", "SINCE"]  # fmt: skip
    assert " u-1 " in out[1]  # no name: the uuid
    assert fake.calls == [("io.lockd.Admin.ListLeases", {"lockspace": "ls1"})]
    assert cli.main(["locks", "-J"]) == 0
    assert json.loads(capsys.readouterr().out) == {"leases": [LEASE]}
    assert cli.main(["locks", "-J", "-o", "resource,token"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "leases": [{"resource": "/images/vm 1.img", "token": 7}]
    }


def test_acquire_registers_then_acquires(fake: FakeClient, capsys: Any) -> None:
    fake.replies["io.lockd.Inquire"] = {"owner": {"uuid": "u-1"}, "leases": []}
    fake.replies["io.lockd.Register"] = {"owner": {"uuid": "u-1"}}
    fake.replies["io.lockd.Acquire"] = {"lease": LEASE}
    assert cli.main(["acquire", "/images/vm 1.img", "--pid", "42", "--shared", "-J"]) == 0
    assert json.loads(capsys.readouterr().out) == {"lease": LEASE}
    assert fake.calls == [
        ("io.lockd.Inquire", {"pid": 42}),  # already an owner? (else undone on failure)
        ("io.lockd.Register", {"pid": 42}),
        ("io.lockd.Acquire", {"resource": "/images/vm 1.img", "owner": "u-1", "mode": "shared"}),
    ]


@pytest.mark.parametrize(
    ("exc", "code", "words"),
    [
        (errors.ResourceBusy(lockspace="", resource="/x.img", mode="exclusive"), 3,
         "/x.img is busy"),
        (errors.NotHeld(lockspace="ls", resource="r"), 5, "r in lockspace ls is not held"),
        (errors.NoSuchOwner(owner="u-9"), 5, "no such owner: u-9"),
        (errors.LeaseLost(lockspace="", resource="/x", token=3), 6, "was lost"),
        (errors.InvalidResource(resource="x", reason="not absolute"), 1, "not absolute"),
        (errors.from_wire("io.lockd.Future", {"why": "new"}), 1, "io.lockd.Future: why new"),
        (errors.DaemonUnreachable("lockd at /s did not answer", socket="/s"), 4, "/s did not"),
        (FileNotFoundError(2, "No such file or directory"), 4, "No such file"),
        (PermissionError(13, "Permission denied"), 4, "permission denied"),
    ],
)  # fmt: skip
def test_errors_map_to_exit_codes_and_one_line(
    fake: FakeClient, capsys: Any, exc: Exception, code: int, words: str
) -> None:
    fake.replies["io.lockd.Release"] = exc
    assert cli.main(["release", "/x.img", "--pid", "42"]) == code
    err = capsys.readouterr().err
    assert err.startswith("lockctl: ") and words in err and err.count("\n") == 1


def test_reexec_not_implemented(fake: FakeClient, capsys: Any) -> None:
    fake.replies["io.lockd.Admin.Reexec"] = errors.MethodNotFound(method="io.lockd.Admin.Reexec")
    assert cli.main(["reexec"]) == cli.EXIT_FAILURE
    assert "does not implement Reexec" in capsys.readouterr().err


def test_unreachable_socket_path(tmp_path: Path, capsys: Any) -> None:
    sock = tmp_path / "nothing.sock"
    assert cli.main(["--admin-socket", str(sock), "--timeout", "0.5", "status"]) == 4
    assert str(sock) in capsys.readouterr().err
    sock.touch()  # a file nobody listens on: the real client retries until the timeout
    assert cli.main(["--admin-socket", str(sock), "--timeout", "0.3", "status"]) == 4


def test_dump_missing_dir(tmp_path: Path, capsys: Any) -> None:
    pytest.importorskip("lockd.journaling.journal")
    assert cli.main(["dump", "--state-dir", str(tmp_path / "none")]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == f"lockctl: no lockd journal in {tmp_path / 'none'}\n"
