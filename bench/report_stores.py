"""Part 2's stores side by side in the report: the forge on SQLite and on PostgreSQL.

The PostgreSQL stacks (``bench.forge_bench.PG_STACKS``) answer one question on a 2-core
machine, where more forge instances cannot add throughput: does anything collapse? Hence
ratios against a baseline measured in the same rounds, not absolute rates.
"""

from __future__ import annotations

import math
from typing import Any

#: PostgreSQL with one forge instance against SQLite's jobs/s (same runner count).
PG1_TO_SQLITE_TARGET = 0.7
#: Two forge instances on one database against one.
PG2_TO_PG1_TARGET = 1.0


def _f(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _x(value: Any) -> str:
    """A ratio, or why there is none."""
    text = _f(value, 2)
    return "not measured" if text == "n/a" else f"{text}x"


def _ratio_ok(value: Any, target: float) -> bool | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return bool(value >= target)


def ratios(forge: dict[str, Any]) -> list[tuple[str, Any, float, bool | None]]:
    """(what, measured, target, met: None when not measured) for each ratio target."""
    notes = forge.get("postgres") or {}
    names = notes.get("stacks") or ["PostgreSQL, 1 forge", "PostgreSQL, 2 forges"]
    baseline = notes.get("baseline", "1 runner")
    pg1 = notes.get("ratio_pg1_to_sqlite")
    pg2 = notes.get("ratio_pg2_to_pg1")
    return [
        (
            f"{names[0]} / {baseline} (SQLite) burst jobs/s",
            pg1,
            PG1_TO_SQLITE_TARGET,
            _ratio_ok(pg1, PG1_TO_SQLITE_TARGET),
        ),
        (
            f"{names[1]} / {names[0]} burst jobs/s",
            pg2,
            PG2_TO_PG1_TARGET,
            _ratio_ok(pg2, PG2_TO_PG1_TARGET),
        ),
    ]


def dispatched_twice(forge: dict[str, Any]) -> tuple[int, int] | None:
    """(jobs dispatched more than once, jobs seen) over every stack; None when not counted."""
    dispatch = forge.get("dispatch")
    if not dispatch:
        return None
    return (
        sum(d["dispatched_twice"] for d in dispatch.values()),
        sum(d["jobs"] for d in dispatch.values()),
    )


def target_rows(forge: dict[str, Any], ok: Any) -> list[str]:
    """Rows of the report's targets table (``ok`` renders a verdict: PASS, FAIL or n/a)."""
    if "postgres" not in forge:
        return []
    rows = [
        f"| {what} ≥ {target:.1f}x (the forge on PostgreSQL) | {_x(value)} | {ok(met)} |"
        for what, value, target, met in ratios(forge)
    ]
    twice = dispatched_twice(forge)
    if twice is not None:
        rows.append(
            f"| 0 jobs dispatched twice (every stack) | {twice[0]:,} of {twice[1]:,} "
            f"| {ok(twice[0] == 0)} |"
        )
    return rows


def section(forge: dict[str, Any]) -> list[str]:
    """The table of every stack's burst figures by store, and the ratios with their targets."""
    notes = forge.get("postgres")
    if notes is None:  # results from before the PostgreSQL stacks
        return []
    stacks = forge.get("stacks") or {}
    dispatch = forge.get("dispatch") or {}
    lines = [
        "### SQLite and PostgreSQL",
        "",
        "The burst figures above, by store. The PostgreSQL stacks keep the forge's store in a "
        "database of their own on the local PostgreSQL server, with one runner instance; "
        '"2 forges" are two forge instances (each `runnerkit forge`\'s gunicorn settings) on '
        "different ports sharing that database, the runner given both URLs "
        "(`RUNNERKIT_JOBFORGE_URL=a,b`) and the submissions spread over both (one wrk per "
        "instance). CPU ms per completed job, over the load window (psutil, user + system): "
        "forge = every gunicorn process (master and workers) of every forge instance of the "
        "stack; PG server = the server's backends connected to the stack's database plus the "
        "server's shared background processes (WAL writer, checkpointer, background writer, "
        "autovacuum launcher), not other databases' backends (the whole server's figure, "
        "whatever else it served meanwhile, is in brackets); runner = the runner instances' "
        "gunicorn processes (sentinels excluded). Dup dispatches: jobs a runner received "
        "`POST /execute` for more than once during the whole part (every pattern, warm-up "
        "included), counted from runnerkit's per-job log line; a job refused for capacity "
        "(429, 503) and sent again is a retry and not counted.",
        "",
        "| stack | store | forges | runners | jobs/s | p50 ms | p99 ms | CPU ms/job forge "
        "| PG server | runner | dup dispatches |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, data in (forge.get("burst") or {}).items():
        about = stacks.get(name) or {}
        cpu = data.get("cpu_ms_per_job") or {}
        server = "-"
        if "PostgreSQL server" in cpu:
            server = (
                f"{_f(cpu['PostgreSQL server'], 1)} "
                f"({_f(data.get('pg_whole_server_ms_per_job'), 1)})"
            )
        twice = dispatch.get(name)
        dups = "n/a" if twice is None else f"{twice['dispatched_twice']} of {twice['jobs']:,}"
        lines.append(
            f"| {name} | {about.get('store', 'SQLite')} | {about.get('forges', 1)} "
            f"| {about.get('runners', 'n/a')} | {_f(data['jobs_per_s'])} "
            f"| {_f(data['p50_ms'], 1)} | {_f(data['p99_ms'], 1)} | {_f(cpu.get('forge'), 1)} "
            f"| {server} | {_f(cpu.get('runners'), 1)} "
            f"| {dups} |"
        )
    for name, reason in (notes.get("not_measured") or {}).items():
        lines.append(f"| {name} | PostgreSQL | - | - | not measured: {_one_line(reason)} |")
    lines.append("")
    for name, data in (forge.get("burst") or {}).items():
        taken = data.get("accepted_by_instance") or []
        if len(taken) > 1:
            lines.append(
                f"{name}: the instances took {' / '.join(f'{n:,}' for n in taken)} of the "
                "bursts' jobs."
            )
    lines += ["", "Targets (median over rounds of the per-round ratio; stacks take turns):", ""]
    for what, value, target, met in ratios(forge):
        verdict = "not measured" if met is None else ("met" if met else "not met")
        lines.append(f"- {what}: {_x(value)}, target ≥ {target:.1f}x: **{verdict}**")
    twice_all = dispatched_twice(forge)
    if twice_all is not None:
        lines.append(
            f"- jobs dispatched twice: {twice_all[0]:,} of {twice_all[1]:,} jobs, target 0: "
            f"**{'met' if twice_all[0] == 0 else 'not met'}**"
        )
    lines += [
        "",
        "This machine has 2 cores shared by every forge, runner, load generator and the "
        "PostgreSQL server: a second forge instance cannot add throughput here, and what the "
        "ratios show is whether anything collapses.",
        "",
    ]
    return lines


def _one_line(text: str) -> str:
    """A reason fit for a table cell."""
    return " ".join(str(text).split()).replace("|", "/")
