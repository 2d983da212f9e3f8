"""lockctl's output: columns, tables, ``key: value`` lines and JSON, from reply objects.

Theory of operation: a subcommand of :mod:`lockd.ctl.cli` returns a reply and the key of its
object(s); :func:`render` prints it, in the style of lslocks(8). With ``-J`` the reply itself
as JSON (its top-level key names the objects, as lslocks' ``{"locks": [...]}``); otherwise
the reply's objects as a table whose columns are described once per object type by
:class:`Column` (name, getter, formatter), or, for a reply that is not a table, ``key:
value`` lines. The few subcommands whose text is neither (``metrics``, ``verify``, ``dump``)
have a renderer of their own in :data:`TEXT`; their JSON stays JSON.

Invariants: nothing here talks to the daemon or reads a file (rendering is a pure function of
the reply and the options); every value in a table or a ``key: value`` line passes through
:func:`escape`, so a resource name with a newline or a control character cannot forge a row
or a terminal sequence;
``-o`` with ``-J`` keeps only the selected columns (keys in lower case, raw values).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Obj = dict[str, Any]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _localtime(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        return _text(value)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))


def _field(key: str) -> Callable[[Obj], Any]:
    return lambda obj: obj.get(key)


def _owner_field(key: str) -> Callable[[Obj], Any]:
    return lambda obj: (obj.get("owner") or {}).get(key)


def _lockspace(obj: Obj) -> Any:
    ls = obj.get("lockspace")
    return "direct" if ls == "" else ls


@dataclass(frozen=True)
class Column:
    name: str  # the header; -o takes it in any case; JSON with -o uses it in lower case
    get: Callable[[Obj], Any]
    fmt: Callable[[Any], str] = _text
    right: bool = False  # numbers align right, as in lslocks
    default: bool = True  # shown without -o


LEASE_COLUMNS = (
    Column("LOCKSPACE", _lockspace),
    Column("RESOURCE", _field("resource")),
    Column("MODE", _field("mode")),
    Column("OWNER", lambda o: _owner_field("name")(o) or _owner_field("uuid")(o)),
    Column("PID", _owner_field("pid"), right=True),
    Column("TOKEN", _field("token"), right=True),
    Column("STATE", _field("state")),
    Column("SINCE", _field("acquired_at"), _localtime),
    Column("PATH", _field("path"), default=False),
    Column("UUID", _owner_field("uuid"), default=False),
    Column("NAME", _owner_field("name"), default=False),
    Column("CONTINUITY", _field("continuity"), default=False),
)
OWNER_COLUMNS = (
    Column("UUID", _field("uuid")),
    Column("NAME", _field("name")),
    Column("PID", _field("pid"), right=True),
    # the VM manager's number for the owner (libvirt's domain id), empty if it gave none
    Column("DOMID", _field("domain_id"), right=True),
    Column("UID", _field("uid"), right=True),
    Column("FENCE", _field("fence")),
    Column("LEASES", _field("leases"), right=True),
    Column("SINCE", _field("registered_at"), _localtime),
    Column("START", _field("start_time"), right=True, default=False),
)
EVENT_COLUMNS = (
    Column("SEQ", _field("seq"), right=True),
    Column("TIME", _field("at"), _localtime),
    Column("EVENT", _field("event")),
    Column("LOCKSPACE", _lockspace),
    Column("RESOURCE", _field("resource")),
    Column("OWNER", _field("owner")),
    Column("PID", _field("pid"), right=True),
    Column("TOKEN", _field("token"), right=True),
    Column("REASON", _field("reason")),
    Column("MODE", _field("mode"), default=False),
)


def select_columns(spec: str | None, columns: Sequence[Column]) -> list[Column]:
    """The columns named by -o (comma-separated, any case; "+A,B" appends to the defaults)."""
    defaults = [c for c in columns if c.default]
    if spec is None:
        return defaults
    by_name = {c.name: c for c in columns}
    chosen = defaults if spec.startswith("+") else []
    for name in spec.removeprefix("+").split(","):
        col = by_name.get(name.strip().upper())
        if col is None:
            valid = ", ".join(by_name)
            raise ValueError(f"unknown column {name.strip()!r} (valid columns: {valid})")
        chosen.append(col)
    return chosen


def escape(value: str, *, raw: bool) -> str:
    """Non-printable characters as \\xHH (per UTF-8 byte); with raw also space and backslash."""
    out = []
    for ch in value:
        if ch.isprintable() and not (raw and ch in " \\"):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def render_table(
    objs: Sequence[Obj], columns: Sequence[Column], *, headings: bool = True, raw: bool = False
) -> str:
    """lslocks' table: one space between columns, aligned unless raw; no trailing blanks."""
    rows = [[escape(c.fmt(c.get(obj)), raw=raw) for c in columns] for obj in objs]
    if headings:
        rows.insert(0, [c.name for c in columns])
    if raw:
        return "".join(" ".join(row) + "\n" for row in rows)
    widths = [max((len(row[i]) for row in rows), default=0) for i in range(len(columns))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(w) if col.right else cell.ljust(w)
            for cell, w, col in zip(row, widths, columns, strict=True)
        ]
        lines.append(" ".join(cells).rstrip() + "\n")
    return "".join(lines)


def _value(key: str, value: Any) -> str:
    """A value as a person reads it: times in local time, durations to 0.1 ms."""
    if key == "at" or key.endswith("_at"):
        return _localtime(value)
    if isinstance(value, float) and key.endswith("_ms"):
        return f"{value:.1f}"
    return _text(value)


def render_keyvalues(obj: Obj, indent: str = "") -> str:
    """`key: value` lines (nested objects indented), times shown in local time."""
    lines = []
    for key, value in obj.items():
        if isinstance(value, dict):
            lines.append(f"{indent}{key}:\n{render_keyvalues(value, indent + '  ')}")
        else:
            lines.append(f"{indent}{key}: {escape(_value(key, value), raw=False)}\n")
    return "".join(lines)


def render(args: argparse.Namespace, reply: Obj, key: str, columns: list[Column]) -> str:
    """The output of one subcommand: JSON, a table of reply[key], or key: value lines."""
    objs = reply.get(key) if key else reply  # the subcommand's object(s)
    rows: list[Obj] = [objs] if isinstance(objs, dict) else objs if isinstance(objs, list) else []
    if args.json:
        if columns and args.output is not None:
            projected = [{c.name.lower(): c.get(row) for c in columns} for row in rows]
            reply = {**reply, key: projected[0] if isinstance(objs, dict) else projected}
        return json.dumps(reply, indent=2, ensure_ascii=False, default=str) + "\n"
    if args.command in TEXT:
        return TEXT[args.command](reply, args)
    if not columns:  # not a table: key: value lines
        return render_keyvalues(objs) if isinstance(objs, dict) and objs else "done\n"
    return render_table(rows, columns, headings=not args.noheadings, raw=args.raw)


def render_metrics(reply: Obj, args: argparse.Namespace) -> str:
    from lockd.ctl import exposition  # imported late: prometheus-client only for this command

    return exposition.render(reply["metrics"])


def render_verify(reply: Obj, args: argparse.Namespace) -> str:
    r = reply["verify"]
    store = "" if r["fd_store"] is None else f", {r['fd_store']} fds in systemd's fd store"
    lines = [
        f"lockd pid {r['pid']}: {r['leases']} leases ({r['held']} held), {r['locks']} OFD "
        f"locks on byte 0 held by its fds{store}: "
        + (f"{len(r['drift'])} drift" if r["drift"] else "no drift")
    ]
    for f in r["drift"]:
        where = f" {f['resource']} (token {f['token']})" if "token" in f else ""
        lines.append(f"drift: {f['kind']}:{where} {f['detail']}")
    return "".join(escape(line, raw=False) + "\n" for line in lines)


def render_dump(reply: Obj, args: argparse.Namespace) -> str:
    """The leases (-o selects their columns) and, with --history N, the last N events."""
    columns = select_columns(args.output, LEASE_COLUMNS)
    table = render_table(reply["leases"], columns, headings=not args.noheadings, raw=args.raw)
    if not args.history:
        return table
    events = select_columns(None, EVENT_COLUMNS)
    return (
        table
        + "\n"
        + render_table(reply["events"], events, headings=not args.noheadings, raw=args.raw)
    )


# subcommands whose text output is not one table: renderer(reply, args) (JSON stays JSON)
TEXT: dict[str, Callable[[Obj, argparse.Namespace], str]] = {
    "metrics": render_metrics,
    "verify": render_verify,
    "dump": render_dump,
}
