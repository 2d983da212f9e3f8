"""lockctl: the command-line client of lockd, in the style of lslocks(8).

Theory of operation: argparse turns the command line into a Namespace; a subcommand handler
makes one or two Varlink calls through :class:`lockd.client.Client` (the admin socket for
status, locks, owners, history, force-release and reexec; the main socket for acquire and
release) and returns the reply parameters unchanged with the key of its object(s). One
renderer prints any reply (:func:`lockd.ctl.cli_output.render`: JSON with ``-J``, else a table
of the columns each object type has there). ``dump`` reads the journal through
:func:`lockd.journaling.journal.dump` instead of the daemon, so it works while lockd is down.

Invariants: a user's mistake or a daemon's refusal prints exactly one line on stderr
(``lockctl: <what is wrong>``) and exits with one of the codes below; only a bug tracebacks.
``-o`` is checked before any socket is opened, so a usage error never touches the daemon.

Decisions where DESIGN §7 is silent: the direct lockspace's ``""`` is shown as ``direct``;
a relative RESOURCE in the direct lockspace is made absolute against the current directory;
``-o +COLS`` appends to the default columns and ``-o`` with ``-J`` keeps only those columns
(keys in lower case, raw values); ``force-release`` that releases nothing exits 5.

Exit status:
  0  success
  1  other failure (any other lockd error, an unreadable journal)
  2  usage error
  3  resource busy (io.lockd.ResourceBusy)
  4  daemon unreachable (no socket, permission denied, no answer within --timeout)
  5  not held / no such owner (io.lockd.NotHeld, io.lockd.NoSuchOwner)
  6  lease lost: taken while lockd was down, or dropped by shared storage (io.lockd.LeaseLost)
  7  verify found drift between lockd's leases and the kernel's locks or systemd's fd store
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, Protocol

from lockd import __version__, errors
from lockd.config import FENCE_POLICIES, default_admin_socket, default_socket
from lockd.ctl.cli_output import (
    EVENT_COLUMNS,
    LEASE_COLUMNS,
    OWNER_COLUMNS,
    Column,
    Obj,
    render,
    select_columns,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BUSY, EXIT_UNREACHABLE, EXIT_NOT_HELD, EXIT_LOST = range(7)
EXIT_DRIFT = 7
EXIT_STATUS = __doc__.split("Exit status:\n", 1)[1] if __doc__ else ""
DEFAULT_TIMEOUT = 5.0  # seconds: a dead daemon must fail fast, the library's 30 s is for VMs
ADMIN, MAIN = "io.lockd.Admin.", "io.lockd."


class Caller(Protocol):
    def call(self, method: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]: ...


# --- talking to the daemon ----------------------------------------------------------------


def _open_client(
    path: Path, timeout: float, admin: bool
) -> contextlib.AbstractContextManager[Caller]:
    from lockd.client import Client  # imported late: lockctl --help must work without it

    return Client(path, timeout=timeout, admin=admin)


@contextlib.contextmanager
def session(args: argparse.Namespace, *, admin: bool) -> Iterator[Caller]:
    """A client on the main or admin socket; any failure to reach it is DaemonUnreachable."""
    path = (
        (args.admin_socket or default_admin_socket())
        if admin
        else (args.socket or default_socket())
    )
    try:
        os.stat(path)
    except FileNotFoundError:
        # the library waits for a missing socket (a restart may be under way); lockctl says
        # at once that nothing is there: a crashed daemon leaves its socket file behind
        raise errors.DaemonUnreachable(f"cannot reach lockd at {path}: no such socket") from None
    except OSError:
        pass  # connecting will say what is wrong
    try:
        with _open_client(Path(path), args.timeout, admin) as client:
            yield client
    except errors.DaemonUnreachable as exc:
        reason = str(exc) if exc.parameters else "no answer"
        raise errors.DaemonUnreachable(
            reason if str(path) in reason else f"cannot reach lockd at {path}: {reason}"
        ) from exc
    except (errors.PermissionDenied, PermissionError) as exc:
        # the client raises PermissionDenied from the socket's EACCES; the daemon's has no cause
        if isinstance(exc, errors.PermissionDenied) and exc.__cause__ is None:
            raise
        hint = " (the admin socket is root only)" if admin else ""
        raise errors.DaemonUnreachable(
            f"cannot connect to {path}: permission denied{hint}"
        ) from exc
    except errors.LockdError:
        raise
    except OSError as exc:  # the client maps these itself; this is the belt to its braces
        reason = exc.strerror or str(exc)
        raise errors.DaemonUnreachable(f"cannot reach lockd at {path}: {reason}") from exc


def _call(args: argparse.Namespace, method: str, params: Obj | None = None) -> Obj:
    with session(args, admin=method.startswith(ADMIN)) as client:
        return client.call(method, params)


def _params(**values: Any) -> Obj:
    """Varlink optional parameters: leave out what the user did not give."""
    return {k: v for k, v in values.items() if v is not None}


def _resource(args: argparse.Namespace) -> str:
    """A relative path in the direct lockspace means one relative to the current directory."""
    res: str = args.resource
    direct = getattr(args, "lockspace", None) in (None, "", "direct")
    return os.path.abspath(res) if direct and res and not res.startswith("/") else res


# --- subcommands: each returns the reply and the key of its object(s) in it ------------------

Result = tuple[Obj, str]  # the reply, and the key of its object(s) ("": all of it)


def cmd_status(args: argparse.Namespace) -> Result:
    return _call(args, ADMIN + "Status"), "status"


def cmd_locks(args: argparse.Namespace) -> Result:
    params = _params(lockspace=args.lockspace, owner=args.owner)
    return _call(args, ADMIN + "ListLeases", params), "leases"


def cmd_owners(args: argparse.Namespace) -> Result:
    return _call(args, ADMIN + "ListOwners"), "owners"


def cmd_history(args: argparse.Namespace) -> Result:
    params = _params(limit=args.limit, owner=args.owner, resource=args.resource)
    return _call(args, ADMIN + "History", params), "events"


def cmd_acquire(args: argparse.Namespace) -> Result:
    with session(args, admin=False) as client:
        # An owner this command registers and then cannot give a lease to is unregistered
        # again: a failed `lockctl acquire` leaves nothing behind. (Inquire first: Register
        # is idempotent and does not say whether it created the owner.)
        try:
            client.call(MAIN + "Inquire", {"pid": args.pid})
            created = False
        except errors.NoSuchOwner:
            created = True
        reg = _params(pid=args.pid, uuid=args.uuid, name=args.name, fence=args.fence)
        try:
            owner = client.call(MAIN + "Register", reg)["owner"]
        except errors.NoSuchOwner:
            raise UserError(_no_process(args.pid), EXIT_NOT_HELD) from None
        mode = "shared" if args.shared else "exclusive"
        acq = _params(resource=_resource(args), owner=owner["uuid"], lockspace=args.lockspace,
                      mode=mode, token=args.token)  # fmt: skip
        try:
            return client.call(MAIN + "Acquire", acq), "lease"
        except errors.LockdError:
            if created:
                # refused (InvalidParameter) if a lease was granted to it meanwhile
                with contextlib.suppress(errors.LockdError):
                    client.call(MAIN + "Unregister", {"owner": owner["uuid"]})
            raise


def _no_process(pid: int | str) -> str:
    if os.path.exists(f"/proc/{pid}"):
        return f"process {pid} cannot be registered as an owner"
    return f"process {pid} does not exist"


def cmd_release(args: argparse.Namespace) -> Result:
    params = _params(resource=_resource(args), pid=args.pid, lockspace=args.lockspace)
    return _call(args, MAIN + "Release", params), "lease"


def cmd_force_release(args: argparse.Namespace) -> Result:
    resource = _resource(args)
    params = _params(resource=resource, lockspace=args.lockspace, owner=args.owner)
    reply = _call(args, ADMIN + "ForceRelease", params)
    if not reply.get("leases"):
        raise errors.NotHeld(lockspace=args.lockspace or "", resource=resource)
    return reply, "leases"


def cmd_reexec(args: argparse.Namespace) -> Result:
    try:
        return _call(args, ADMIN + "Reexec"), ""
    except errors.MethodNotFound:
        raise errors.LockdError(
            "this lockd does not implement Reexec (io.lockd.Admin.Reexec); upgrade it first"
        ) from None


class UserError(Exception):
    """A failure worth one line and an exit status (1 unless said), not a daemon error."""

    def __init__(self, message: str, status: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.status = status


def cmd_metrics(args: argparse.Namespace) -> Result:
    return _call(args, ADMIN + "Metrics"), "metrics"


def cmd_verify(args: argparse.Namespace) -> Result:
    from lockd.ctl import verify

    with session(args, admin=True) as client:
        try:
            report = verify.verify(
                lambda: client.call(ADMIN + "ListDescriptors"), args.unit, args.user
            )
        except errors.MethodNotFound:
            raise UserError(
                "this lockd does not implement ListDescriptors (io.lockd.Admin); upgrade it"
            ) from None
        except verify.VerifyError as exc:
            raise UserError(f"cannot verify: {exc}") from None
    return {"verify": report.wire()}, "verify"


def cmd_dump(args: argparse.Namespace) -> Result:
    from lockd.journaling import journal  # imported late: the journal pulls in sqlite-utils

    state_dir = Path(args.state_dir)
    try:
        return journal.dump(state_dir, history=args.history), "leases"
    except FileNotFoundError:
        raise UserError(f"no lockd journal in {state_dir}") from None
    # JournalError: the journal's name for a failed sqlite3 read, too; OSError: EACCES, EIO
    except (journal.JournalUnreadable, errors.JournalError, sqlite3.Error, OSError) as exc:
        raise UserError(f"cannot read the journal in {state_dir}: {exc}") from None


# --- errors -------------------------------------------------------------------------------


def _where(p: Obj) -> str:
    ls = p.get("lockspace")
    return f"{p.get('resource', '?')}" + (f" in lockspace {ls}" if ls not in ("", None) else "")


def _no_owner(owner: str) -> str:
    if owner.isdigit() and not os.path.exists(f"/proc/{owner}"):
        return f"{_no_process(owner)} (so it has no lease)"
    return f"no such owner: {owner} (not registered with lockd)"


def _invalid(p: Obj) -> str:
    if p.get("reason") == "unknown lockspace":  # the daemon names the lockspace as resource
        return f"unknown lockspace {p.get('resource', '')!r} (not in lockd.conf's [lockspaces])"
    return f"invalid resource {p.get('resource', '')!r}: {p.get('reason', '?')}"


# (class, exit status, one line from the error's parameters)
ERRORS: tuple[tuple[type[errors.LockdError], int, Callable[[Obj], str]], ...] = (
    (errors.ResourceBusy, EXIT_BUSY,
     lambda p: f"{_where(p)} is busy ("
     + (p.get("reason") or f"locked by another holder; {p.get('mode', '')} lease refused") + ")"),
    (errors.NotHeld, EXIT_NOT_HELD, lambda p: f"{_where(p)} is not held"),
    (errors.NoSuchOwner, EXIT_NOT_HELD, lambda p: _no_owner(str(p.get("owner", "?")))),
    (errors.LeaseLost, EXIT_LOST,
     lambda p: f"the lease on {_where(p)} (token {p.get('token', '?')}) was lost while lockd"
     " was down; release it to acknowledge"),
    (errors.InvalidResource, EXIT_FAILURE, lambda p: _invalid(p)),
    (errors.PermissionDenied, EXIT_FAILURE, lambda p: f"permission denied: {p.get('reason', '?')}"),
    (errors.LimitExceeded, EXIT_FAILURE,
     lambda p: f"limit exceeded: {p.get('limit', '?')} (at {p.get('value', '?')})"),
    (errors.TokenMismatch, EXIT_FAILURE,
     lambda p: f"token mismatch: expected {p.get('expected', '?')}, but the last grant has"
     f" token {p.get('current', '?')}"),
    (errors.JournalError, EXIT_FAILURE,
     lambda p: f"lockd's journal refused the write, nothing was done: {p.get('reason', '?')}"),
    (errors.InvalidParameter, EXIT_FAILURE,
     lambda p: f"lockd refused parameter {p.get('parameter', '?')!r}"),
    (errors.MethodNotFound, EXIT_FAILURE,
     lambda p: f"this lockd does not implement {p.get('method', 'that method')}"),
    (errors.InterfaceNotFound, EXIT_FAILURE,
     lambda p: f"this lockd does not provide interface {p.get('interface', '?')}"),
)  # fmt: skip


def describe(exc: errors.LockdError) -> tuple[int, str]:
    """The exit status and the one line for a lockd error."""
    if isinstance(exc, errors.DaemonUnreachable):
        return EXIT_UNREACHABLE, str(exc)
    for cls, status, words in ERRORS:
        if isinstance(exc, cls):
            return status, words(exc.parameters)
    if not exc.parameters:  # raised with a message of its own
        return EXIT_FAILURE, str(exc)
    fields = ", ".join(f"{k} {v}" for k, v in exc.parameters.items())
    return EXIT_FAILURE, f"lockd error {exc.wire_name}: {fields}"


# --- the command line ---------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str, prog: str | None = None) -> NoReturn:
        self.exit(EXIT_USAGE, f"lockctl: {message} (see '{prog or self.prog} --help')\n")


def _number(kind: Callable[[str], Any], minimum: float, strict: bool) -> Callable[[str], Any]:
    what = f"a number {'>' if strict else '>='} {minimum:g}"

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return convert


# defaults of the options that may come before or after the subcommand
GLOBAL_DEFAULTS: Obj = {
    "socket": None, "admin_socket": None, "timeout": DEFAULT_TIMEOUT,
    "json": False, "output": None, "noheadings": False, "raw": False,
}  # fmt: skip


def _options(connection: bool = True, table: bool = True) -> _Parser:
    """The options that may come before or after the subcommand: a subcommand is offered
    only those it uses (dump talks to no daemon; status and the like print no table)."""
    # SUPPRESS: an option left out after the subcommand must not reset one given before it
    s = argparse.SUPPRESS
    p = _Parser(add_help=False)
    # fmt: off
    if connection:
        g = p.add_argument_group("connection")
        g.add_argument("--socket", metavar="PATH", default=s, help="main socket ($LOCKD_SOCKET)")
        g.add_argument("--admin-socket", metavar="PATH", default=s,
                       help="admin socket ($LOCKD_ADMIN_SOCKET)")
        g.add_argument("--timeout", metavar="SECONDS", type=_number(float, 0, strict=True),
                       default=s,
                       help=f"give up on the daemon after this long (default {DEFAULT_TIMEOUT:g})")
    o = p.add_argument_group("output")
    o.add_argument("-J", "--json", action="store_true", default=s, help="JSON output")
    if table:
        o.add_argument("-o", "--output", metavar="COLS", default=s,
                       help="comma-separated columns ('+COLS' adds to the default ones)")
        o.add_argument("-n", "--noheadings", action="store_true", default=s,
                       help="no header line")
        o.add_argument("-r", "--raw", action="store_true", default=s,
                       help="raw output: unaligned, blanks escaped as \\x20")
    # fmt: on
    return p


# subcommand -> (handler, columns of its table or None, help)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], Result], tuple[Column, ...] | None, str]]
COMMANDS = {
    "status": (cmd_status, None, "show the daemon's status"),
    "locks": (cmd_locks, LEASE_COLUMNS, "list leases"),
    "owners": (cmd_owners, OWNER_COLUMNS, "list registered owners"),
    "history": (cmd_history, EVENT_COLUMNS, "show the journal's latest events"),
    "acquire": (cmd_acquire, LEASE_COLUMNS, "register PID as an owner and take a lease for it"),
    "release": (cmd_release, LEASE_COLUMNS, "release a lease of PID"),
    "force-release": (cmd_force_release, LEASE_COLUMNS, "release leases whoever holds them"),
    "dump": (cmd_dump, LEASE_COLUMNS, "read the journal directly (while lockd is down)"),
    "reexec": (cmd_reexec, None, "re-execute the daemon in place, keeping every lock"),
    "metrics": (cmd_metrics, None, "print the daemon's metrics (Prometheus text format)"),
    "verify": (cmd_verify, None,
               "compare lockd's leases with the kernel's locks and systemd's fd store"),
}  # fmt: skip


def build_parser() -> _Parser:
    common = _options()
    parents = {
        "dump": _options(connection=False),
        **{name: _options(table=False) for name, cmd in COMMANDS.items() if cmd[1] is None},
    }
    parser = _Parser(
        prog="lockctl",
        description="Inspect and drive lockd, the crash-safe lock manager.",
        epilog="exit status:\n" + EXIT_STATUS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"lockctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cmds: dict[str, argparse.ArgumentParser] = {}
    for name, (_, columns, summary) in COMMANDS.items():
        epilog = None
        if columns:
            epilog = "columns: " + " ".join(c.name + ("" if c.default else "*") for c in columns)
            epilog += "\n  (* not shown by default)"
        cmds[name] = sub.add_parser(
            name, parents=[parents.get(name, common)], help=summary, description=summary,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
    pos, count = _number(int, 0, strict=True), _number(int, 0, strict=False)
    cmds["locks"].add_argument("--lockspace", metavar="LS", help="only this lockspace")
    cmds["locks"].add_argument("--owner", metavar="UUID", help="only this owner's leases")
    h = cmds["history"]
    h.add_argument("--limit", metavar="N", type=pos, default=50, help="events (default 50)")
    h.add_argument("--owner", metavar="UUID", help="only this owner's events")
    h.add_argument("--resource", metavar="RESOURCE", help="only this resource's events")
    for name in ("acquire", "release", "force-release"):
        cmds[name].add_argument("resource", metavar="RESOURCE", help="path or lease name")
        cmds[name].add_argument("--lockspace", metavar="LS", help="lockspace (default: direct)")
    for name in ("acquire", "release"):
        cmds[name].add_argument("--pid", metavar="PID", type=pos, required=True, help="owner")
    a = cmds["acquire"]
    a.add_argument("--name", metavar="N", help="owner name (e.g. the VM's)")
    a.add_argument("--uuid", metavar="U", help="owner uuid (default: derived from the pid)")
    a.add_argument("--shared", action="store_true", help="a shared lease (default exclusive)")
    a.add_argument("--fence", choices=FENCE_POLICIES, help="what to do to PID if it is lost")
    a.add_argument("--token", metavar="T", type=count, help="expected last token")
    cmds["force-release"].add_argument("--owner", metavar="UUID", help="only this owner's leases")
    d = cmds["dump"]
    d.add_argument("--state-dir", metavar="DIR", required=True, help="lockd's state directory")
    d.add_argument(
        "--history",
        metavar="N",
        type=count,
        default=50,
        help="events to include, after the leases (default 50; 0: none)",
    )
    v = cmds["verify"]
    v.add_argument(
        "--unit", metavar="UNIT", help="lockd's systemd unit (default: read from its cgroup)"
    )
    v.add_argument(
        "--user",
        action="store_true",
        default=None,
        help="the unit is in the user's service manager (default: from its cgroup)",
    )
    # fmt: skip
    return parser


def parse(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[Column]]:
    """The options and the selected columns; SystemExit(2) on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in GLOBAL_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    prog = f"lockctl {args.command}"
    if args.json and args.raw:
        parser.error("-J/--json and -r/--raw cannot be used together", prog)
    columns = COMMANDS[args.command][1]
    if columns is None:
        if args.output is not None:
            parser.error(f"{args.command} has no columns to select with -o", prog)
        return args, []
    try:
        return args, select_columns(args.output, columns)
    except ValueError as exc:
        parser.error(str(exc), prog)


def main(argv: list[str] | None = None) -> int:
    try:
        args, columns = parse(argv)
    except SystemExit as exc:  # argparse: 0 after --help, 2 on a usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        reply, key = COMMANDS[args.command][0](args)
        sys.stdout.write(render(args, reply, key, columns))
        sys.stdout.flush()
        if key == "verify" and reply[key]["drift"]:
            return EXIT_DRIFT
    except errors.LockdError as exc:
        status, line = describe(exc)
        print(f"lockctl: {line}", file=sys.stderr)
        return status
    except UserError as exc:
        print(f"lockctl: {exc}", file=sys.stderr)
        return exc.status
    except BrokenPipeError:  # `lockctl locks | head`: the reader left; do not traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
