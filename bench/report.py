"""The results as Markdown (bench/results/latest.md) and a chart (latest.png)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench import report_stores

#: Budget: runnerkit's server CPU per successful /execute above the bare Flask echo's (µs).
OVERHEAD_BUDGET_US = 200.0
#: Target: runnerkit's /execute throughput as a share of the bare Flask echo's.
THROUGHPUT_TARGET = 0.6
#: The names of the signature check's price, and of its HMAC's, in the step-price pass.
SIGNATURE_STEP = "signature check (signing on: HMAC, replay record)"
HMAC_STEP = "of the signature check: the HMAC (and the age check)"
#: Targets of the end-to-end forge path.
JOBS_PER_S_TARGET = 500.0
HALF_LOAD_P50_TARGET_MS = 10.0

#: What to do about each measured cost (ablation variant → suggestion).
SUGGESTIONS: dict[str, tuple[str, str]] = {
    "no job thread (run inline)": (
        "the job thread",
        "The price of answering at the deadline off gunicorn (this in-process pass calls the "
        "app without a server's `write` callable): the capability runs on a pooled job thread "
        "so the request thread can answer `TIMEOUT` when the code overruns. Under gunicorn the "
        "execute lane runs it on the request's thread instead, its deadline watched by one "
        "thread per process (`runnerkit/runner/deadlines.py`), priced in section 1. Each job "
        "is two cross-thread wake-ups (about 40 µs of CPU in a bare Python round trip), and the "
        "rest is the job running on the other core (see the one-CPU pass above). Done: "
        "reused daemon threads, a held lock instead of an Event, `GUNICORN_PIN_WORKERS=1` "
        '(opt-in), `isolation = "inline"` (opt-in per capability, for code that never '
        "blocks: no job thread, no answer before the code returns; measured in section 1). "
        "Left: pinning only a job thread to its request thread's CPU (threads a capability "
        "starts would inherit the pin).",
    ),
    "no idempotency ledger": (
        "the idempotency ledger",
        "A synchronous job is one SQLite read at claim and one write (the answer) at "
        "completion; who runs a jobId is an OFD lock on a hashed byte. Left: the "
        "`finished` index costs part of each write (prune and `completed_since` use it); "
        "`PRAGMA synchronous=OFF` would save a little more but a machine crash could then "
        "corrupt the file, not just lose recent answers.",
    ),
    "no output re-load (dump only)": (
        "validating the output twice",
        "`Capability.dump_output` dumps the result through `Output` and loads the dump again: "
        "`dump` does not validate, and the second pass is what turns a wrong result into "
        "`SCHEMA_MISMATCH` instead of a contract violation on the wire. Left: an opt-out for "
        "trusted capabilities.",
    ),
    "no marshmallow at all": (
        "marshmallow",
        "The RunnerExecutionRequest envelope takes a hand-written path checked against the "
        "schema (property tests); what is left is the capability's own `Input` load and "
        "`Output` dump+load, which grow with its schemas and are the validation runnerkit "
        "promises.",
    ),
    "no job log line": (
        "the per-job JSON log line",
        "The per-job line is the runner's access log. Done: no caller lookup, one reused "
        "encoder, redaction of the added fields only. `RUNNERKIT_LOG_LEVEL=WARNING` drops "
        "it for those who do not want it.",
    ),
    "no metrics": (
        "metrics",
        "Done: labelled children are cached; values are counted in process memory (an "
        "addition under one lock) and written out by a background thread once a second.",
    ),
    "runner_id computed once": (
        "runner_id per answer",
        "`Runner.runner_id` reads the instance identity (an `os.stat` of identity.json, cached "
        "by mtime) for every answer.",
    ),
    "no concurrency slot locks": (
        "the concurrency slot's OFD locks",
        "The concurrency slot is one `F_OFD_SETLK` on a free byte and one release per job.",
    ),
}


def _f(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _ok(passed: bool | None) -> str:
    return "n/a" if passed is None else ("PASS" if passed else "FAIL")


def _error(part: dict[str, Any] | None) -> str | None:
    if not part:
        return "not run"
    return part.get("error")


# --------------------------------------------------------------------------- sections


def _extra_contender(
    http: dict[str, Any], name: str, ratio_key: str, label: str, intro: str
) -> list[str]:
    """The table of one extra /execute contender against Flask and the default runner."""
    levels = [(level, data) for level, data in http["levels"].items() if ratio_key in data]
    if not levels:
        return []
    lines = [
        intro,
        "",
        f"| conns | {label} ok req/s | Flask req/s | ratio | {label} p50 / p99 ms "
        f"| CPU µs/req {label} / default / Flask |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for level, data in levels:
        c, r, f = data[name], data["runnerkit"], data["flask"]
        lines.append(
            f"| {level} | {_f(c['ok_rps'])} | {_f(f['ok_rps'])} "
            f"| {_f(data[ratio_key], 2)}x | {_f(c['p50_ms'], 1)} / {_f(c['p99_ms'], 1)} "
            f"| {_f(c['cpu_us_per_req'])} / {_f(r['cpu_us_per_req'])} "
            f"/ {_f(f['cpu_us_per_req'])} |"
        )
    return [*lines, ""]


def _signed_pct(change: float) -> str:
    return f"{change * 100:+.1f} %"


def _summary(results: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    http = results.get("http") or {}
    if not _error(http):
        for level, data in http["levels"].items():
            over = _overhead(data)
            lines.append(
                f"| /execute CPU ≤ bare Flask's + {OVERHEAD_BUDGET_US:.0f} µs, {level} "
                f"connections | +{_f(over)} µs | {_ok(over <= OVERHEAD_BUDGET_US)} |"
            )
        for level, data in http["levels"].items():
            ratio = data["ratio"]
            lines.append(
                f"| /execute throughput ≥ {THROUGHPUT_TARGET}x bare Flask, {level} connections "
                f"| {_f(ratio, 2)}x | {_ok(ratio >= THROUGHPUT_TARGET)} |"
            )
        if http.get("against"):
            for level, data in http["levels"].items():
                if "cpu_change_vs_against" in data:
                    lines.append(
                        f"| /execute CPU per request against {http['against']['rev'][:7]} "
                        f"(same rounds), {level} connections "
                        f"| {_signed_pct(data['cpu_change_vs_against'])} | info |"
                    )
        for level, data in http["levels"].items():
            refused = data["runnerkit"]["non200_total"]
            lines.append(
                f"| 0 non-200 answers when maxConcurrency (64) covers the connections, {level} "
                f"connections | {refused:,} of {data['runnerkit']['requests_total']:,} "
                f"| {_ok(refused == 0)} |"
            )
        prices = (http.get("steps") or {}).get("prices") or {}
        # Two readings of "the budget + the measured cost of the HMAC": all that signing
        # adds (its check, its replay record, its headers), or the HMAC's check alone.
        for name, what in ((SIGNATURE_STEP, "signing's whole"), (HMAC_STEP, "the HMAC check's")):
            price = prices.get(name)
            for level, data in http["levels"].items():
                if "runnerkit signed" in data and price is not None:
                    over = data["runnerkit signed"]["cpu_overhead_us"]
                    allowed = OVERHEAD_BUDGET_US + max(0.0, price["us"])
                    lines.append(
                        f"| signed requests: CPU ≤ bare Flask's + {OVERHEAD_BUDGET_US:.0f} µs + "
                        f"{what} measured {_f(price['us'])} µs, {level} connections "
                        f"| +{_f(over)} µs | {_ok(over <= allowed)} |"
                    )
        for level, data in http["levels"].items():
            if "inline_ratio" in data:
                lines.append(
                    f'| the same with the capability\'s `isolation = "inline"` (opt-in, no '
                    f"at-deadline answer), {level} connections | "
                    f"{_f(data['inline_ratio'], 2)}x | info |"
                )
        for level, data in http["levels"].items():
            if "stripped_ratio" in data:
                lines.append(
                    "| the ceiling: runnerkit with ledger, job thread, job log, metrics, slots "
                    f"and marshmallow all taken away (bench only), {level} connections | "
                    f"{_f(data['stripped_ratio'], 2)}x | info |"
                )
        pinned = (http.get("pinned") or {}).get("levels") or {}
        for level, data in pinned.items():
            lines.append(
                f"| the same with {http['pinned']['env']} for both (not the default), {level} "
                f"connections | {_f(data['ratio'], 2)}x | info |"
            )
    forge = results.get("forge") or {}
    if not _error(forge):
        default_workers = forge.get("forge_workers", 2)
        stacks = forge.get("stacks") or {}
        for name, data in forge["burst"].items():
            rate = data["jobs_per_s"]
            # The target is for the forge as served (its default workers) with one and with
            # two runner instances; the single-worker stack is there for comparison, and the
            # PostgreSQL stacks have their targets relative to SQLite (below).
            diagnostic = "forge worker" in name and default_workers != 1
            on_pg = (stacks.get(name) or {}).get("store") == "PostgreSQL"
            verdict = "info" if diagnostic or on_pg else _ok(rate >= JOBS_PER_S_TARGET)
            lines.append(
                f"| forge ≥ {JOBS_PER_S_TARGET:.0f} jobs/s end to end ({name}"
                f"{', not the default' if diagnostic else ''}) | {_f(rate)} jobs/s | {verdict} |"
            )
        for name, data in forge["paced"].items():
            on_pg = (stacks.get(name) or {}).get("store") == "PostgreSQL"
            verdict = "info" if on_pg else _ok(data["p50_ms"] < HALF_LOAD_P50_TARGET_MS)
            lines.append(
                f"| p50 < {HALF_LOAD_P50_TARGET_MS:.0f} ms at half of peak ({name}, "
                f"{_f(data['rate'])} jobs/s offered) | {_f(data['p50_ms'], 1)} ms | {verdict} |"
            )
        lines += report_stores.target_rows(forge, _ok)
    memory = results.get("memory") or {}
    if not _error(memory):
        lines.append(
            f"| worker RSS growth over {memory['jobs']:,} jobs (no target) | "
            f"{_f(memory['growth_mb'], 1, ' MB')} per worker | info |"
        )
    control = results.get("control") or {}
    if not _error(control):
        rates = [_heartbeat_rate(r) for r in control["rows"]]
        regs = {r["registrations_total"] for r in control["rows"]}
        ids = {r["runner_ids"] for r in control["rows"]}
        # The same rate within 5 % (scheduler jitter), one registration and one runnerId.
        same = bool(rates) and max(rates) <= 1.05 * min(rates) and regs == {1} and ids == {1}
        lines.append(
            "| control traffic identical for 1/2/4/8 workers | "
            + ", ".join(
                f"{r['workers']}w: {r['registrations_total']} reg, {_f(_heartbeat_rate(r))} hb/min"
                for r in control["rows"]
            )
            + f" | {_ok(same)} |"
        )
    return [*lines, ""]


def _overhead(level: dict[str, Any]) -> float:
    """runnerkit's CPU µs per request above Flask's at one level (median of per-round
    differences; from the medians for results written before it was recorded)."""
    if "cpu_overhead_us" in level:
        return float(level["cpu_overhead_us"])
    return float(level["runnerkit"]["cpu_us_per_req"] - level["flask"]["cpu_us_per_req"])


def headline(results: dict[str, Any]) -> list[str]:
    """The first line of the report: the overhead above bare Flask, against the budget."""
    http = results.get("http") or {}
    if _error(http) or not http.get("levels"):
        return []
    levels = http["levels"]
    overs = " / ".join(f"+{_f(_overhead(d))}" for d in levels.values())
    ratios = " / ".join(f"{_f(d['ratio'], 2)}x" for d in levels.values())
    return [
        f"**runnerkit `/execute`: {overs} µs of server CPU per request above bare Flask at "
        f"{' / '.join(levels)} connections** (budget + {OVERHEAD_BUDGET_US:.0f} µs, every "
        f"promise on); throughput {ratios} of Flask's (target ≥ {THROUGHPUT_TARGET}x).",
        "",
    ]


def _steps(http: dict[str, Any]) -> list[str]:
    """The price of each promise, measured under gunicorn by taking it away alone."""
    steps = http.get("steps") or {}
    if not steps.get("prices"):
        return []
    lines = [
        f"### What each promise costs (under gunicorn, {steps['connections']} connections)",
        "",
        "The same runner with everything on against, in the same rounds (contenders taking "
        "turns), one runner per step with only that step taken away (`BENCH_ECHO_WITHOUT`, "
        "`bench/ablations.py`; bench only, not a setting); the signature check is the signed "
        "runner (`RUNNERKIT_SIGNING_SECRET` set, every request signed beforehand: "
        "`bench/wrk_signed.lua`) against the unsigned one, and its parts the signed runner "
        "against the same without that part. Price = median over rounds of the "
        "per-round CPU difference; a range that spans 0 is within the noise. Steps interact "
        "(the GIL, the job thread's wake-ups), so the prices need not add up to the overhead.",
        "",
        f"Everything on: {_f(steps['runnerkit']['cpu_us_per_req'])} CPU µs per request.",
        "",
        "| step | CPU µs per request | range over rounds |",
        "| --- | ---: | ---: |",
    ]
    for name, price in sorted(steps["prices"].items(), key=lambda item: -item[1]["us"]):
        low, high = price["range"]
        lines.append(f"| {name} | {_f(price['us'])} | {_f(low)} to {_f(high)} |")
    return [*lines, ""]


def _level_rows(levels: dict[str, Any]) -> list[str]:
    rows = []
    for level, data in levels.items():
        r, f = data["runnerkit"], data["flask"]
        rows.append(
            f"| {level} | {_f(r['ok_rps'])} | {_f(f['ok_rps'])} | {_f(data['ratio'], 2)}x "
            f"| {_f(r['p50_ms'], 1)} / {_f(r['p99_ms'], 1)} "
            f"| {_f(f['p50_ms'], 1)} / {_f(f['p99_ms'], 1)} "
            f"| {r['non200_total']:,} of {r['requests_total']:,} "
            f"| {_f(r['cpu_us_per_req'])} / {_f(f['cpu_us_per_req'])} |"
        )
    return rows


def _http(http: dict[str, Any]) -> list[str]:
    lines = ["## 1. `POST /execute`: runnerkit vs bare Flask", ""]
    if _error(http):
        return [*lines, f"Not measured: {_error(http)}", ""]
    lines += [
        f"Trivial `echo` capability vs a bare Flask route doing the same JSON echo, both under "
        f"deploy/gunicorn.conf.py (gthread, 2 workers) at the same time, load from "
        f"`{http['load_tool']}` in its own process, {http['duration_s']:g} s per round, "
        f"contenders alternating (A B C, C B A …). Medians over rounds; the ratio is the median of "
        f"per-round ratios of successful (200) req/s. CPU µs/req is the server processes' "
        f"user+system CPU per request (psutil), the least noise-sensitive figure here.",
        "",
        "| conns | runnerkit ok req/s | Flask req/s | ratio | runnerkit p50 / p99 ms "
        "| Flask p50 / p99 ms | runnerkit non-200 | CPU µs/req runnerkit / Flask |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += _level_rows(http["levels"])
    lines += [
        "",
        "The runner's workers may start as many request threads as its capabilities need (the "
        "echo's maxConcurrency 64 plus 2 reserved for health checks; `fit_threads` in "
        "`runnerkit/runner/thread_fitting.py`), so every job within maxConcurrency gets a "
        "thread; they keep 8 busy (like Flask's) and start more only while long jobs hold "
        "those (`runnerkit/service/request_threads.py`), so these short jobs queue for the 8. "
        "Any non-200 would be a refusal (excluded from 'ok req/s').",
        "",
    ]
    lines += _extra_contender(
        http,
        "runnerkit inline",
        "inline_ratio",
        "inline",
        '**With `isolation = "inline"`** (opt-in, a third contender in the same rounds): '
        "the echo capability runs on the request's thread, with no job thread to hand it "
        "to, and the caller is answered when the code returns (a late answer is still "
        "`TIMEOUT`).",
    )
    lines += _extra_contender(
        http,
        "runnerkit stripped",
        "stripped_ratio",
        "stripped",
        "**The ceiling** (a fourth contender in the same rounds, `BENCH_ECHO_STRIPPED=1`, "
        "not a runnerkit setting): the same runner with every step `bench/ablations.py` "
        "can take away replaced by a no-op in its workers: no idempotency ledger, no job "
        "thread, no job log line, no metrics, no concurrency slots, no marshmallow. What "
        "is left is the rest of the pipeline (routing, signature and body-limit checks, "
        "admission, `Context`, the response envelope). Its ratio bounds what removing "
        "costs from those steps could ever give.",
    )
    lines += _extra_contender(
        http,
        "runnerkit signed",
        "signed_ratio",
        "signed",
        "**Signed requests** (a fifth contender in the same rounds): `RUNNERKIT_SIGNING_SECRET` "
        "set and every request signed as JobForge's dispatcher signs it (signature, timestamp, "
        "event id; signed beforehand, `bench/wrk_signed.lua`): the HMAC check and the record "
        "of each signed request that reaches a run.",
    )
    against = http.get("against")
    if against:
        lines += _extra_contender(
            http,
            "runnerkit against",
            "against_ratio",
            "against",
            f"**Against another checkout** (`--against`, a sixth contender in the same rounds): "
            f"the same runner served from `{against['dir']}` (commit {against['rev']}) with its "
            "own virtualenv. This checkout's CPU per request over that one's, the median of "
            "the rounds' ratios: "
            + ", ".join(
                f"{_signed_pct(data['cpu_change_vs_against'])} at {level}"
                for level, data in http["levels"].items()
                if "cpu_change_vs_against" in data
            )
            + " connections.",
        )
    lines += _steps(http)
    pinned = http.get("pinned") or {}
    if pinned.get("levels"):
        lines += [
            f"**With `{pinned['env']}`** (each gunicorn worker pinned to one CPU, for both "
            "contenders; off by default, see `runnerkit/service/affinity.py`): a worker's "
            "request and job threads then hand the GIL to each other on one CPU instead of "
            "across CPUs.",
            "",
            "| conns | runnerkit ok req/s | Flask req/s | ratio | runnerkit p50 / p99 ms "
            "| Flask p50 / p99 ms | runnerkit non-200 | CPU µs/req runnerkit / Flask |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            *_level_rows(pinned["levels"]),
            "",
        ]
    profile = http.get("profile") or {}
    lines += ["### Where a request's CPU goes (py-spy, under gunicorn)", ""]
    if profile.get("error"):
        return [*lines, f"Not profiled: {profile['error']}", ""]
    total = max(1, profile["samples"])
    per_req = profile.get("cpu_us_per_req") or float("nan")
    lines += [
        f"`py-spy record --gil --subprocesses` on the runner's master at "
        f"{profile['concurrency']} connections: {profile['samples']:,} samples, each in the "
        f"first bucket with a matching frame. µs/req = share x the {_f(per_req)} µs of CPU "
        f"per request measured above at 16 connections. Raw stacks: `{profile['raw']}`.",
        "",
        "| bucket | share of CPU | ≈ µs per request |",
        "| --- | ---: | ---: |",
    ]
    for name, count in profile["buckets"].items():
        lines.append(
            f"| {name} | {_f(100.0 * count / total, 1)} % | {_f(count / total * per_req)} |"
        )
    lines += ["", "Hottest leaf functions:", ""]
    for name, count in profile["top_leaf_functions"][:10]:
        lines.append(f"- `{name}`: {_f(100.0 * count / total, 1)} %")
    return [*lines, ""]


def _inprocess(data: dict[str, Any]) -> list[str]:
    lines = ["### What each step costs, measured by removing it (in-process)", ""]
    if _error(data):
        return [*lines, f"Not measured: {_error(data)}", ""]
    per = data["us_per_request"]
    base = per["baseline"]
    savings = data["saving_us"]
    ranges = data.get("saving_range_us", {})
    wall = data.get("wall_us_per_request", {})
    wall_savings = data.get("wall_saving_us", {})
    lines += [
        f"Each app called as WSGI (no server, no sockets), one thread, "
        f"{data['requests_per_round']:,} requests per run, "
        f"{data['rounds']} rounds; every variant run right after its own baseline run, the "
        f"step replaced by a no-op in the benchmark process only. Saving = median over rounds "
        f"of (baseline - variant) within those pairs, with the range over rounds: a range "
        f"that spans 0 is noise. CPU µs counts every thread of the process (job threads "
        f"included) and is what the ranking uses; wall µs adds scheduler waits (thread start, "
        f"hand-back), which grow with the machine's load.",
        "",
        "| variant | CPU µs / request | saving (range) | share of baseline "
        "| wall µs / request | wall saving |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| baseline (everything on) | {_f(base)} | - | - | {_f(wall.get('baseline'))} | - |",
    ]
    for name, value in per.items():
        if name == "baseline":
            continue
        low, high = ranges.get(name, [float("nan"), float("nan")])
        lines.append(
            f"| {name} | {_f(value)} | {_f(savings.get(name))} ({_f(low)} to {_f(high)}) "
            f"| {_f(100.0 * savings.get(name, float('nan')) / base, 0, ' %')} "
            f"| {_f(wall.get(name))} | {_f(wall_savings.get(name))} |"
        )
    one_cpu = data.get("one_cpu") or {}
    inline = "no job thread (run inline)"
    if not _error(one_cpu) and inline in one_cpu.get("saving_us", {}):
        lines += [
            "",
            f"The same process on one CPU (every thread pinned to it): baseline "
            f"{_f(one_cpu['us_per_request']['baseline'])} µs, and running the job inline saves "
            f"{_f(one_cpu['saving_us'][inline])} µs instead of {_f(savings.get(inline))}. "
            f"The hand-off itself is cheap; what costs is the job thread waking on the other "
            f"core (cross-core wake-ups, cold caches for the job's objects). "
            f"`GUNICORN_PIN_WORKERS=1` gets this back for a whole worker (table above), at the "
            f"price of the parallelism of code that runs outside the GIL.",
        ]
    return [*lines, ""]


def _suggestions(results: dict[str, Any]) -> list[str]:
    lines = ["### Suggestions, ranked by measured cost", ""]
    data = results.get("inprocess") or {}
    if _error(data):
        return [*lines, "No ranking: the in-process measurement did not run.", ""]
    savings = data["saving_us"]
    ranked = sorted((name for name in SUGGESTIONS if name in savings), key=lambda n: -savings[n])
    base = data["us_per_request"]["baseline"]
    ranges = data.get("saving_range_us", {})
    for index, name in enumerate(ranked, 1):
        low = ranges.get(name, [float("nan")])[0]
        noise = " (within noise: a round saw no saving)" if not low > 0 else ""
        lines.append(
            f"{index}. **{SUGGESTIONS[name][0]}**: ≈ {_f(savings[name])} CPU µs/request "
            f"({_f(100.0 * savings[name] / base, 0)} % of the in-process path){noise}. "
            f"{SUGGESTIONS[name][1]}"
        )
    singles = sum(
        savings[n] for n in SUGGESTIONS if n in savings and n != "no output re-load (dump only)"
    )
    together = savings.get("all of the above off", float("nan"))
    floor = data["us_per_request"].get("bare Flask echo", float("nan"))
    rest = data["us_per_request"].get("all of the above off", float("nan"))
    lines += [
        "",
        f"The single removals add up to ≈ {_f(singles)} µs; removing all of them together "
        f"saves {_f(together)} µs. What is left ({_f(rest)} µs against the bare Flask echo's "
        f"{_f(floor)} µs) is the rest of the pipeline: the `Context`, the signature and "
        f"body-limit checks, the request-metrics hooks, the draining and admission checks "
        f"and the larger response document.",
        "",
    ]
    return lines


def _forge(forge: dict[str, Any]) -> list[str]:
    lines = ["## 2. End to end through the forge", ""]
    if _error(forge):
        return [*lines, f"Not measured: {_error(forge)}", ""]
    lines += [
        "Submit → completed, from the submitter's clock before `POST /jobs` to the forge's "
        "`result.metadata.completedAt` (ms resolution); queue = submit → `startedAt`, run = "
        f"`startedAt` → `completedAt`. Forge: gthread, {forge.get('forge_workers', 2)} workers, "
        "16 threads, default settings "
        "(POLL_INTERVAL_MS 100, DISPATCH_THREADS 32). Runners: deploy/gunicorn.conf.py, `echo` "
        "with maxConcurrency 6. Burst: N jobs as fast as 8 connections submit (wrk with "
        "bench/wrk_submit.lua when installed: its submit time is the `metadata.createdAt` it "
        "stamps); paced: open loop at half of that stack's burst jobs/s (Python); serial: one "
        "job at a time.",
        "",
        "| stack | load | jobs/s | submit/s | p50 ms | p99 ms | queue p50 / p90 ms "
        "| queued ≥ 50 ms | run p50 ms | CPU ms/job forge / runners / loadgen | retried "
        "| not completed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for kind in ("burst", "paced", "serial"):
        for name, data in forge.get(kind, {}).items():
            cpu = data.get("cpu_ms_per_job", {})
            label = kind if kind != "paced" else f"paced {_f(data['rate'])}/s"
            lines.append(
                f"| {name} | {label} | {_f(data['jobs_per_s'])} | {_f(data['submit_rate'])} "
                f"| {_f(data['p50_ms'], 1)} | {_f(data['p99_ms'], 1)} "
                f"| {_f(data['queue_p50_ms'], 1)} / {_f(data.get('queue_p90_ms'), 1)} "
                f"| {_f(100.0 * data.get('queued_over_50ms', float('nan')), 0, ' %')} "
                f"| {_f(data['run_p50_ms'], 1)} "
                f"| {_f(cpu.get('forge'), 1)} / {_f(cpu.get('runners'), 1)} / "
                f"{_f(cpu.get('load generator'), 1)} "
                f"| {data['retried']} | {data['not_completed']} |"
            )
    lines += ["", f"2 runners / 1 runner burst jobs/s: {_f(forge.get('ratio_2_to_1'), 2)}x.", ""]
    for name, data in forge.get("burst", {}).items():
        cpu = data.get("cpu_ms_per_job") or {}
        total = sum(cpu.values())
        servers = total - cpu.get("load generator", 0.0)
        if total and servers:
            parts = ", ".join(f"{party} {_f(ms, 1)}" for party, ms in cpu.items())
            lines.append(
                f"- {name}: every completed job cost {_f(total, 1)} ms of CPU in all "
                f"({parts}), so 2 CPUs cannot complete more "
                f"than ≈ {_f(2000.0 / total)} jobs/s, {_f(2000.0 / servers)} "
                f"without the load generator on the same machine."
            )
    lines.append("")
    lines += report_stores.section(forge)
    serial = forge.get("serial", {})
    default, solo = serial.get("1 runner"), serial.get("1 runner, 1 forge worker")
    if default and solo:
        lines += [
            f"Serial latency: with the default {forge.get('forge_workers', 2)} forge workers "
            f"{_f(100.0 * default.get('queued_over_50ms', float('nan')), 0)} % of jobs waited "
            f"≥ 50 ms before being dispatched (queue p50 / p90 "
            f"{_f(default['queue_p50_ms'], 1)} / {_f(default.get('queue_p90_ms'), 1)} ms, "
            f"submit → completed p50 {_f(default['p50_ms'], 1)} ms); with 1 forge worker "
            f"{_f(100.0 * solo.get('queued_over_50ms', float('nan')), 0)} % did (queue p50 / "
            f"p90 {_f(solo['queue_p50_ms'], 1)} / {_f(solo.get('queue_p90_ms'), 1)} ms, p50 "
            f"{_f(solo['p50_ms'], 1)} ms). `POST /jobs` wakes the dispatcher at once, in "
            f"whichever worker it runs, with a datagram on the forge's wake-up socket "
            f"(`runnerkit/forge/wakeup.py`).",
            "",
        ]
    paced = forge.get("paced", {})
    default, solo = paced.get("1 runner"), paced.get("1 runner, 1 forge worker")
    if default and solo:
        lines += [
            f"At half of peak: queue p50 / p90 {_f(default['queue_p50_ms'], 1)} / "
            f"{_f(default.get('queue_p90_ms'), 1)} ms and p50 {_f(default['p50_ms'], 1)} ms "
            f"with {forge.get('forge_workers', 2)} forge workers; {_f(solo['queue_p50_ms'], 1)} / "
            f"{_f(solo.get('queue_p90_ms'), 1)} ms and p50 {_f(solo['p50_ms'], 1)} ms with 1.",
            "",
        ]
    profile = forge.get("profile") or {}
    if profile and not profile.get("error"):
        total = max(1, profile["samples"])
        lines += [
            "Where the forge's CPU goes during a burst (py-spy `--gil` on both forge "
            f"workers, {profile['samples']:,} samples; raw: `{profile['raw']}`):",
            "",
            "| bucket | share |",
            "| --- | ---: |",
        ]
        for name, count in profile["buckets"].items():
            lines.append(f"| {name} | {_f(100.0 * count / total, 1)} % |")
        lines.append("")
    elif profile.get("error"):
        lines += [f"Forge not profiled: {profile['error']}", ""]
    return lines


def _memory(memory: dict[str, Any]) -> list[str]:
    lines = ["## 3. Memory of a runner worker", ""]
    if _error(memory):
        return [*lines, f"Not measured: {_error(memory)}", ""]
    lines += [
        "RSS of each of the 2 workers (psutil) of a fresh runner, idle and after N jobs via "
        "`POST /execute` (4 connections).",
        "",
        "| jobs | RSS per worker MB | mean MB | ledger (db + wal) MB |",
        "| ---: | --- | ---: | ---: |",
    ]
    for point in memory["checkpoints"]:
        each = ", ".join(_f(v, 1) for v in point["rss_mb"].values())
        lines.append(
            f"| {point['jobs']:,} | {each} | {_f(point['mean_rss_mb'], 1)} "
            f"| {_f(point['ledger_mb'], 2)} |"
        )
    lines += [
        "",
        f"Growth: {_f(memory['growth_mb'], 1)} MB per worker over {memory['jobs']:,} jobs "
        f"(idle {_f(memory['idle_mean_rss_mb'], 1)} MB → {_f(memory['final_mean_rss_mb'], 1)} "
        f"MB); over the last checkpoint interval "
        f"{_f(memory.get('late_slope_mb_per_1k'), 2)} MB per 1,000 jobs. "
        f"Failed requests: {memory['failed_requests']}.",
        "",
    ]
    if memory.get("note"):
        lines += [f"Note: {memory['note']}", ""]
    return lines


def _heartbeat_rate(row: dict[str, Any]) -> float:
    """Heartbeats per minute from first to last beat (older results: the window count)."""
    return float(row.get("heartbeat_rate_per_min") or row["heartbeats_per_min"])


def _control(control: dict[str, Any]) -> list[str]:
    lines = ["## 4. Control traffic per instance", ""]
    if _error(control):
        return [*lines, f"Not measured: {_error(control)}", ""]
    lines += [
        f"JobForgeStub handing out heartbeatIntervalMs {control['interval_ms']}; counted over a "
        f"window after every worker serves, scaled to a minute (expected "
        f"{_f(control['expected_heartbeats_per_min'])} heartbeats/min). The verdict compares "
        "the rate from the first to the last heartbeat in the window (within 5 %): the "
        "window's count alone is off by one whenever a beat falls just outside it.",
        "",
        "| workers | registrations (lifetime) | registrations/min (window) | heartbeats in "
        "window | heartbeats/min (window) | heartbeats/min (first to last) "
        "| runnerIds heartbeating | deregistrations at stop |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in control["rows"]:
        lines.append(
            f"| {row['workers']} | {row['registrations_total']} | "
            f"{_f(row['registrations_per_min'], 1)} | {row['heartbeats']} "
            f"| {_f(row['heartbeats_per_min'], 1)} | {_f(_heartbeat_rate(row), 1)} "
            f"| {row['runner_ids']} | {row['deregistrations_at_stop']} |"
        )
    return [*lines, ""]


def _findings(results: dict[str, Any]) -> list[str]:
    lines = ["## Possible bugs seen during the run", ""]
    found = False
    probe = (results.get("inprocess") or {}).get("metrics_label_probe")
    if probe and probe["after"] > 2 * probe["before"]:
        found = True
        lines.append(
            f"- Metric labels from request input: {probe['requests']} `/execute` calls with "
            f"unknown `capabilityId`s (404) grew `GET /metrics` from {probe['before']:,} to "
            f"{probe['after']:,} bytes. `Executor._run` labels `jobs_received` with the "
            f"request's capabilityId before checking it exists, and `_count` labels "
            f"`jobs_completed`/`jobs_failed`/`job_duration` with it too: unbounded series (and "
            f"multiprocess files) from whoever can reach `/execute`. Label unknown ones as one "
            f"value (e.g. `unknown`)."
        )
    for error in results.get("server_errors") or []:
        found = True
        lines.append(
            f'- `{error["server"]}` logged {error["count"]}x "{error["message"]}"'
            + (f": `{error['exception']}`" if error["exception"] else "")
        )
    if not found:
        lines.append("None detected automatically.")
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# runnerkit benchmarks",
        "",
        *headline(results),
        f"{'Quick smoke run' if meta['quick'] else 'Full run'} started {meta['started']}, "
        f"{_f(meta.get('seconds'))} s; Python {meta['python']}, {meta['cpus']} CPUs, "
        f"load average {', '.join(f'{v:.1f}' for v in meta['load_average_at_start'])} at "
        f"start and {', '.join(f'{v:.1f}' for v in meta.get('load_average_at_end', ()))} at "
        f"the end. Servers and load generators share these CPUs: absolute figures are "
        f"noisy; ratios are measured in the same run, contenders alternating.",
        "",
        *_summary(results),
        *_http(results.get("http") or {}),
        *_inprocess(results.get("inprocess") or {}),
        *_suggestions(results),
        *_forge(results.get("forge") or {}),
        *_memory(results.get("memory") or {}),
        *_control(results.get("control") or {}),
        *_findings(results),
    ]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- chart


def chart(results: dict[str, Any], path: Path) -> bool:
    """A PNG of the main figures; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    fig.suptitle("runnerkit benchmarks" + (" (quick run)" if results["meta"]["quick"] else ""))
    http = results.get("http") or {}
    if not _error(http):
        levels = list(http["levels"])
        x = range(len(levels))
        r = [http["levels"][lv]["runnerkit"]["ok_rps"] for lv in levels]
        f = [http["levels"][lv]["flask"]["ok_rps"] for lv in levels]
        ax = axes[0][0]
        series = [("runnerkit /execute (200s)", r)]
        for name, label in (
            ("runnerkit inline", 'the same, isolation="inline"'),
            ("runnerkit stripped", "the same, every removable step off"),
        ):
            values = [http["levels"][lv].get(name, {}).get("ok_rps") for lv in levels]
            if all(v is not None for v in values):
                series.append((label, values))
        series.append(("bare Flask echo", f))
        width = 0.8 / len(series)
        for index, (label, values) in enumerate(series):
            offset = (index - (len(series) - 1) / 2) * width
            ax.bar([i + offset for i in x], values, width, label=label)
        ax.set_xticks(list(x), [f"{lv} conns\n{http['levels'][lv]['ratio']:.2f}x" for lv in levels])
        ax.set_ylabel("requests/s (median)")
        ax.set_title("/execute throughput")
        ax.legend()
        ax = axes[0][1]
        for name in ("runnerkit", "flask"):
            ax.plot(
                levels,
                [http["levels"][lv][name]["p50_ms"] for lv in levels],
                "o-",
                label=f"{name} p50",
            )
            ax.plot(
                levels,
                [http["levels"][lv][name]["p99_ms"] for lv in levels],
                "s--",
                label=f"{name} p99",
            )
        ax.set_yscale("log")
        ax.set_xlabel("connections")
        ax.set_ylabel("latency ms (median of rounds)")
        ax.set_title("/execute latency")
        ax.legend()
    inprocess = results.get("inprocess") or {}
    if not _error(inprocess):
        ax = axes[0][2]
        savings = {k: v for k, v in inprocess["saving_us"].items() if k != "bare Flask echo"}
        names = sorted(savings, key=lambda k: savings[k])
        ax.barh(names, [savings[n] for n in names])
        ax.set_xlabel("µs/request saved by removing (in-process)")
        ax.set_title(
            f"cost of each step (baseline {inprocess['us_per_request']['baseline']:.0f} µs)"
        )
    forge = results.get("forge") or {}
    if not _error(forge):
        ax = axes[1][0]
        names = list(forge["burst"])
        ax.bar(
            [n.replace(", ", ",\n") for n in names],
            [forge["burst"][n]["jobs_per_s"] for n in names],
        )
        ax.axhline(JOBS_PER_S_TARGET, color="red", linestyle="--", label="target 500 jobs/s")
        ax.set_ylabel("jobs/s (burst, median)")
        ax.set_title("forge end to end")
        ax.legend()
        ax = axes[1][1]
        rows = [(f"{k} {n}", forge[k][n]) for k in ("paced", "serial") for n in forge[k]]
        ax.barh([r[0] for r in rows], [r[1]["p50_ms"] for r in rows], label="p50")
        ax.barh(
            [r[0] for r in rows], [r[1]["queue_p50_ms"] for r in rows], label="queue p50", alpha=0.6
        )
        ax.axvline(HALF_LOAD_P50_TARGET_MS, color="red", linestyle="--", label="10 ms")
        ax.set_xscale("log")
        ax.set_xlabel("submit → completed ms")
        ax.set_title("forge latency")
        ax.legend()
    memory = results.get("memory") or {}
    if not _error(memory):
        ax = axes[1][2]
        jobs = [p["jobs"] for p in memory["checkpoints"]]
        pids = list(memory["checkpoints"][0]["rss_mb"])
        for pid in pids:
            ax.plot(
                jobs,
                [p["rss_mb"].get(pid) for p in memory["checkpoints"]],
                "o-",
                label=f"worker {pid}",
            )
        ax.set_ylim(bottom=0)
        ax.set_xlabel("jobs")
        ax.set_ylabel("RSS MB")
        ax.set_title("runner worker memory")
        ax.legend()
    for row in axes:
        for ax in row:
            if not ax.has_data():
                ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


if __name__ == "__main__":
    import json
    import sys

    source = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json")
    data = json.loads(source.read_text())
    source.with_suffix(".md").write_text(markdown(data))
    chart(data, source.with_suffix(".png"))
    print(f"rewrote {source.with_suffix('.md')} and {source.with_suffix('.png')} from {source}")
