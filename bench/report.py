"""From repetitions to the table: medians, ratios to the floors and to virtlockd, targets.

Each row names where its values live in a repetition (a path into the nested dicts that
:mod:`bench.run` writes), so the JSON and the table cannot disagree. Ratios are of medians.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from bench.stats import median

Key = tuple[str, ...]
Rep = dict[str, Any]
Check = Callable[[float, float | None, float | None], bool]

MS = 1e3  # seconds -> ms
MB = 1 / 1024  # kB -> MB
RTT = "Varlink RTT×2, do-nothing uvloop server"
F, L, V = ("floor",), ("lockd",), ("virtlockd",)
LEAN = ("floor", "lean")  # bench/lean.py: lockd's work without its layers (a prototype)
LEAN_NAME = "lean prototype (bench/lean.py, lockd's work without its layers)"
CPU = "server_cpu_us_per_pair"


def get(d: Any, key: Key) -> Any:
    for k in key:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def per_rep(reps: Sequence[Rep], key: Key | None, scale: float = 1.0) -> list[float]:
    if key is None:
        return []
    return [v * scale for r in reps if isinstance(v := get(r, key), (int, float))]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


class Table:
    def __init__(self, reps: Sequence[Rep]) -> None:
        self.reps = reps
        self.rows: list[dict[str, Any]] = []
        self.section = ""

    def med(self, key: Key | None, scale: float = 1.0) -> float | None:
        vs = per_rep(self.reps, key, scale)
        return median(vs) if vs else None

    def row(
        self,
        figure: str,
        unit: str,
        value: Key | float | None,
        floor: tuple[str, Key | float | None] | None = None,
        vl: Key | None = None,
        scale: float = 1.0,
        target: str = "",
        check: Check | None = None,
        cpu: tuple[Key | None, Key | None, Key | None] | None = None,
    ) -> None:
        """``value``/``floor``: a key into each repetition (median taken) or a number.
        ``cpu``: keys of the server's CPU per pair (lockd, floor, virtlockd), shown beside a
        throughput figure: pairs/s alone cannot say whether the server or its clients (on
        the same cores) were the limit."""
        if isinstance(value, tuple):
            lv, reps = self.med(value, scale), per_rep(self.reps, value, scale)
        else:
            lv, reps = value, []
        floor_name, fkey = floor if floor is not None else (None, None)
        fv = self.med(fkey, scale) if isinstance(fkey, tuple) else fkey
        vv = self.med(vl, scale)
        met = check(lv, fv, vv) if check is not None and lv is not None else None
        self.rows.append(
            {
                "section": self.section,
                "figure": figure,
                "unit": unit,
                "lockd": lv,
                "lockd_reps": reps,
                "floor_name": floor_name,
                "floor": fv,
                "vs_floor": ratio(lv, fv),
                "virtlockd": vv,
                "vs_virtlockd": ratio(lv, vv),
                "target": target,
                "met": met,
                "cpu": None if cpu is None else [self.med(k) for k in cpu],
            }
        )


def _virtlockd_protocol_rows(t: Table, n: int) -> None:
    """lockd's virtlockd front end and virtlockd, driven by the same (virtlockd's) client: the
    lockd column is the front end, the virtlockd column the same workload against virtlockd;
    the floor is the Varlink one (another wire, the same Python client and server costs)."""
    lv = ("lockd_vl",)
    t.section = "virtlockd's protocol, the same client for both (lockd's front end vs virtlockd)"
    t.row("1 connection: pair, p50", "µs", lv + ("seq", "p50_us"),
          (f"{RTT}, p50", F + ("seq", "p50_us")), V + ("seq", "p50_us"))  # fmt: skip
    t.row("1 connection: pair, p99", "µs", lv + ("seq", "p99_us"), vl=V + ("seq", "p99_us"))
    t.row("1 connection: pairs/s", "pairs/s", lv + ("seq", "per_s"), vl=V + ("seq", "per_s"))
    c = f"conc{n}"
    t.row(f"{n} clients: pairs/s", "pairs/s", lv + (c, "per_s"),
          (f"{RTT}, {n} clients", F + (c, "per_s")), V + (c, "per_s"))  # fmt: skip
    t.row(f"{n} clients: pair, p50", "µs", lv + (c, "p50_us"), vl=V + (c, "p50_us"))
    t.row(f"{n} clients: server CPU per pair", "µs", lv + (c, "server_cpu_us_per_pair"),
          vl=V + (c, "server_cpu_us_per_pair"))  # fmt: skip


def rows(reps: list[Rep], once: dict[str, Any], steps: list[int], clients: list[int]) -> list[Rep]:
    t = Table(reps)

    t.section = "floors (the value column is the floor itself)"
    t.row("OFD lock+unlock (F_OFD_SETLK byte 0), p50", "µs", F + ("ofd", "p50_us"))
    t.row(f"{RTT}, 1 connection, p50", "µs", F + ("seq", "p50_us"))
    t.row(
        f"{RTT}, 1 connection", "pairs/s", F + ("seq", "per_s"), cpu=(F + ("seq", CPU), None, None)
    )
    for n in clients:
        c = f"conc{n}"
        t.row(f"{RTT}, {n} clients", "pairs/s", F + (c, "per_s"), cpu=(F + (c, CPU), None, None))
    t.row("SQLite WAL commit, synchronous=NORMAL, p50", "µs", F + ("sqlite_normal", "p50_us"))
    t.row("SQLite WAL commit, synchronous=NORMAL, mean", "µs", F + ("sqlite_normal", "mean_us"))
    t.row("SQLite WAL commit, synchronous=FULL, p50", "µs", F + ("sqlite_full", "p50_us"))
    t.row("do-nothing server: spawn → READY", "ms", F + ("start_s",), scale=MS)
    t.row("do-nothing server: RSS", "MB", F + ("rss_kb",), scale=MB)
    for n in steps:
        t.row(f"open + OFD-lock {n:,} files", "ms", F + ("open_lock_s", str(n)), scale=MS)

    t.section = "1 connection, acquire+release pairs"
    t.row(
        "pair, p50",
        "µs",
        L + ("seq", "p50_us"),
        (f"{RTT}, p50", F + ("seq", "p50_us")),
        V + ("seq", "p50_us"),
        target="≤ 2× virtlockd",
        check=lambda lv, fv, vv: vv is not None and lv <= 2 * vv,
    )
    t.row(
        "pair, p99",
        "µs",
        L + ("seq", "p99_us"),
        ("p99", F + ("seq", "p99_us")),
        V + ("seq", "p99_us"),
    )
    t.row(
        "pairs/s",
        "pairs/s",
        L + ("seq", "per_s"),
        (RTT, F + ("seq", "per_s")),
        V + ("seq", "per_s"),
        cpu=(L + ("seq", CPU), F + ("seq", CPU), V + ("seq", CPU)),
    )
    t.row("acquire, p50", "µs", L + ("seq", "acquire_p50_us"), vl=V + ("seq", "acquire_p50_us"))
    t.row("release, p50", "µs", L + ("seq", "release_p50_us"), vl=V + ("seq", "release_p50_us"))
    t.row(
        "server CPU per pair",
        "µs",
        L + ("seq", "server_cpu_us_per_pair"),
        ("do-nothing server", F + ("seq", "server_cpu_us_per_pair")),
        V + ("seq", "server_cpu_us_per_pair"),
    )
    t.row(f"{LEAN_NAME}: pair, p50", "µs", LEAN + ("seq", "p50_us"),
          (f"{RTT}, p50", F + ("seq", "p50_us")), V + ("seq", "p50_us"))  # fmt: skip
    t.row(
        "pair through lockd.client.Client, p50",
        "µs",
        L + ("seq_client", "p50_us"),
        (f"{RTT}, p50 (raw client)", F + ("seq", "p50_us")),
    )

    for n in clients:
        c = f"conc{n}"
        t.section = f"{n} client processes, distinct files"
        t.row(
            "pairs/s (all clients)",
            "pairs/s",
            L + (c, "per_s"),
            (f"{RTT}, {n} clients", F + (c, "per_s")),
            V + (c, "per_s"),
            target="≥ 0.6× virtlockd",
            check=lambda lv, fv, vv: vv is not None and lv >= 0.6 * vv,
            cpu=(L + (c, CPU), F + (c, CPU), V + (c, CPU)),
        )
        t.row(
            f"{LEAN_NAME}: pairs/s",
            "pairs/s",
            LEAN + (c, "per_s"),
            (f"{RTT}, {n} clients", F + (c, "per_s")),
            V + (c, "per_s"),
            cpu=(LEAN + (c, CPU), F + (c, CPU), V + (c, CPU)),
        )
        t.row("pair, p50", "µs", L + (c, "p50_us"), ("p50", F + (c, "p50_us")), V + (c, "p50_us"))
        t.row("pair, p99", "µs", L + (c, "p99_us"), ("p99", F + (c, "p99_us")), V + (c, "p99_us"))
        t.row(
            "server CPU per pair",
            "µs",
            L + (c, "server_cpu_us_per_pair"),
            ("do-nothing server", F + (c, "server_cpu_us_per_pair")),
            V + (c, "server_cpu_us_per_pair"),
        )

    _virtlockd_protocol_rows(t, min(clients))

    t.section = "memory"
    rss_floor = ("do-nothing server", F + ("rss_kb",))
    t.row(
        "RSS idle (first start)",
        "MB",
        L + ("rss_kb_idle",),
        rss_floor,
        V + ("rss_kb_idle",),
        scale=MB,
    )
    t.row("RSS idle (restarted)", "MB", L + ("rss_kb_idle_restarted",), rss_floor, scale=MB)
    for n in steps:
        s = ("steps", str(n))
        target, check = ("≤ 40 MB", lambda lv, fv, vv: lv <= 40) if n == 10000 else ("", None)
        t.row(
            f"RSS holding {n:,} leases",
            "MB",
            L + s + ("rss_kb",),
            rss_floor,
            V + s + ("rss_kb",),
            scale=MB,
            target=target,
            check=check,
        )
    last = ("steps", str(steps[-1]))
    after_target = ("≤ 40 MB", lambda lv, fv, vv: lv <= 40) if steps[-1] == 10000 else ("", None)
    t.row(
        f"RSS after recovering {steps[-1]:,} leases",
        "MB",
        L + last + ("rss_kb_after_recovery",),
        rss_floor,
        scale=MB,
        target=after_target[0],
        check=after_target[1],
    )
    t.row(
        f"acquire rate while filling to {steps[-1]:,} (1 connection)",
        "acquires/s",
        L + last + ("acquire_per_s",),
        vl=V + last + ("acquire_per_s",),
    )

    t.section = "restart: kill -9 → READY=1, leases re-taken from the journal"
    t.row(
        "0 leases",
        "ms",
        L + ("restart0_s",),
        ("do-nothing server spawn → READY", F + ("start_s",)),
        scale=MS,
    )
    t.row("0 leases: recovery inside the daemon", "ms", L + ("restart0_recovery_ms",))
    start = t.med(F + ("start_s",), MS)
    for n in steps:
        s = ("steps", str(n))
        open_lock = t.med(F + ("open_lock_s", str(n)), MS)
        floor = start + open_lock if start is not None and open_lock is not None else None
        target, check = ("≤ 300 ms", lambda lv, fv, vv: lv <= 300) if n == 10000 else ("", None)
        t.row(
            f"{n:,} leases",
            "ms",
            L + s + ("kill_to_ready_s",),
            ("spawn → READY + open+lock N", floor),
            scale=MS,
            target=target,
            check=check,
        )
        t.row(
            f"{n:,} leases: recovery inside the daemon",
            "ms",
            L + s + ("recovery_ms",),
            ("open+lock N files", open_lock),
        )
        t.row(f"{n:,} leases: re-taken", "leases", L + s + ("retaken",))
    fd = once.get("fdstore") or {"skipped": "skipped (--skip fdstore)"}
    if fd.get("steps"):
        t.section = "restart: kill -9 → READY=1 under systemd, lease fds kept in its fd store"
        for n, s in fd["steps"].items():
            t.row(
                f"{int(n):,} leases (one run)",
                "ms",
                s["kill_to_ready_s"] * 1000,
                ("do-nothing server spawn → READY", start),
            )
            target, check = (
                ("≤ 400 ms", lambda lv, fv, vv: lv <= 400) if n == "10000" else ("", None)
            )
            t.row(
                f"{int(n):,} leases: exec → READY",
                "ms",
                s["exec_to_ready_s"] * 1000,
                target=target,
                check=check,
            )
            t.row(f"{int(n):,} leases: recovery inside the daemon", "ms", s["recovery_ms"])
            t.row(f"{int(n):,} leases: adopted from the store (no gap)", "leases", s["adopted"])
    else:
        t.row(
            "fd-store path (systemd keeps the lease fds)",
            "ms",
            None,
            target=f"not measured: {fd.get('skipped')}",
        )

    j = once.get("journal")
    if j and j.get("checkpoints"):
        first, last_cp = j["checkpoints"][0], j["checkpoints"][-1]
        t.section = "journal (one run, not repeated)"
        t.row(
            f"size on disk after {last_cp['ops']:,} ops (db + WAL + shm)",
            "MB",
            last_cp["total_bytes"] / 1e6,
            (f"after {first['ops']:,} ops", first["total_bytes"] / 1e6),
            target="bounded (retention)",
        )
        t.row(
            f"history events kept after {last_cp['ops']:,} ops",
            "events",
            last_cp.get("events"),
            (f"after {first['ops']:,} ops", first.get("events")),
        )
        t.row(f"ops/s while writing it ({j['clients']} clients)", "ops/s", 2 * last_cp["per_s"])
        t.row("server CPU per pair while writing it", "µs", last_cp.get(CPU))
        t.row("slowest pair while writing it", "µs", last_cp.get("max_us"))
        t.row(
            "restart to READY with that journal (SIGTERM, start)",
            "ms",
            j["restart_s"] * MS,
            ("0 leases, fresh journal", t.med(L + ("restart0_s",), MS)),
            target="does not grow with history",
        )
    return t.rows


def recovery_fit(
    reps: list[Rep],
    steps: list[int],
    fit: Callable[[Sequence[float], Sequence[float]], dict[str, float]],
) -> dict[str, Any]:
    """Least-squares line through (leases, median time) for kill->READY and in-daemon recovery."""
    t = Table(reps)
    points = [(0, t.med(L + ("restart0_s",), MS), t.med(L + ("restart0_recovery_ms",)))]
    for n in steps:
        s = L + ("steps", str(n))
        points.append((n, t.med(s + ("kill_to_ready_s",), MS), t.med(s + ("recovery_ms",))))
    points = [p for p in points if p[1] is not None and p[2] is not None]
    xs = [float(p[0]) for p in points]
    return {
        "leases": xs,
        "kill_to_ready_ms": fit(xs, [p[1] for p in points if p[1] is not None]),
        "recovery_ms": fit(xs, [p[2] for p in points if p[2] is not None]),
    }


# -- rendering -------------------------------------------------------------------------------


def fmt(v: float | None, unit: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if unit in ("pairs/s", "ops/s", "acquires/s", "events", "leases"):
        return f"{v:,.0f}"
    if unit in ("µs", "ms"):
        return f"{v:,.0f}" if v >= 10 else f"{v:.1f}"
    return f"{v:.1f}"


def _cpu(us: float | None) -> str:
    """The server's CPU per pair, beside a throughput."""
    return "" if us is None or math.isnan(us) else f" · CPU {us:,.0f} µs/pair"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else (f"{r:.2f}×" if r < 10 else f"{r:.0f}×")


def one_line(rep: Rep) -> str:
    parts = []
    for who in ("floor", "lockd", "virtlockd", "lockd_vl"):
        p50 = get(rep, (who, "seq", "p50_us"))
        c16 = get(rep, (who, "conc16", "per_s"))
        if p50 is not None:
            parts.append(f"{who} p50 {p50:.0f} µs, 16 clients {c16 or 0:,.0f} pairs/s")
    return "; ".join(parts)


def render(
    rows: list[Rep], fits: dict[str, Any], once: dict[str, Any], meta: dict[str, Any]
) -> str:
    lines = [
        f"lockd benchmark {meta['when']}: {meta['cpus']} CPUs, kernel {meta['kernel']}, "
        f"Python {meta['python']}, SQLite {meta['sqlite']}, lockd {meta['lockd_git']} "
        f"({meta['lockd']}, {meta.get('build', 'pure Python')}); virtlockd: {meta['virtlockd']}; "
        f"{meta['args']['reps']} "
        f"repetition(s), medians; load average {' '.join(meta['loadavg'])} at the start, "
        f"{' '.join(meta.get('loadavg_end', []))} at the end.",
        "",
        "| figure | value | floor (same run) | ÷ floor | virtlockd | lockd ÷ virtlockd "
        "| target | met | per rep |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    section = None
    for r in rows:
        if r["section"] != section:
            section = r["section"]
            lines.append(f"| **{section}** | | | | | | | | |")
        unit = r["unit"]
        value = "–" if r["lockd"] is None else f"{fmt(r['lockd'], unit)} {unit}"
        floor = "–"
        if r["floor_name"]:
            floor = f"{fmt(r['floor'], unit)} ({r['floor_name']})"
        vl = fmt(r["virtlockd"], unit)
        if r.get("cpu"):
            lc, fc, vc = r["cpu"]
            value += _cpu(lc)
            floor += _cpu(fc) if floor != "–" else ""
            vl += _cpu(vc) if vl != "–" else ""
        met = {True: "yes", False: "**no**", None: ""}[r["met"]]
        spread = r["lockd_reps"]
        per = " / ".join(fmt(v, unit) for v in spread) if len(spread) > 1 else ""
        lines.append(
            f"| {r['figure']} | {value} | {floor} | {fmt_ratio(r['vs_floor'])} | "
            f"{vl} | {fmt_ratio(r['vs_virtlockd'])} | {r['target']} | "
            f"{met} | {per} |"
        )
    if len(fits.get("leases", [])) >= 2:
        k, i = fits["kill_to_ready_ms"], fits["recovery_ms"]
        lines += [
            "",
            f"Restart against leases ({', '.join(f'{x:,.0f}' for x in fits['leases'])}): "
            f"kill -9 → READY ≈ {k['intercept']:.0f} ms + {k['slope'] * 1000:.1f} ms per 1,000 "
            f"leases (R² {k['r2']:.3f}); recovery inside the daemon ≈ {i['intercept']:.1f} ms + "
            f"{i['slope'] * 1000:.1f} ms per 1,000 (R² {i['r2']:.3f}).",
        ]
    j = once.get("journal")
    if j and j.get("checkpoints"):
        last = j["checkpoints"][-1]
        files = ", ".join(
            f"{k} {v / 1e6:.1f} MB" for k, v in last.items() if k.startswith("journal.sqlite")
        )
        after = ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in j.get("after_restart", {}).items())
        lines.append(
            f"Journal run: {last['ops']:,} operations through the daemon (measured, not "
            f"extrapolated) in {last['elapsed_s']:.0f} s; files: {files}; after a restart "
            f"{j.get('events_after_restart')} events kept, {after}."
        )
    prof = once.get("profile")
    if prof:
        from bench.profile import render as render_profile

        lines += ["", render_profile("daemon profile, 1 connection", prof["seq"])]
        lines += ["", render_profile("daemon profile, 16 clients", prof["conc16"])]
    return "\n".join(lines)
