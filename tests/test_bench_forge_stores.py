"""`make bench`'s forge part on SQLite and PostgreSQL: the duplicate-dispatch count read from
the runners' logs, the PostgreSQL stacks that cannot run, and the report's rows and verdicts.

No timing is measured here: the figures are made up, what is checked is what the bench does
with them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import report
from bench.forge_bench import PG_STACKS, dispatch_counts, postgres_stacks
from bench.postgres import BenchPostgres
from tests.support.procs import free_port

JOB_A = "0a0a0a0a-0000-4000-8000-00000000000a"
JOB_B = "0b0b0b0b-0000-4000-8000-00000000000b"
JOB_C = "0c0c0c0c-0000-4000-8000-00000000000c"


def _job_line(job_id: str, outcome: str, status: int) -> str:
    return json.dumps(
        {
            "level": "info",
            "message": "job",
            "component": "runnerkit.job",
            "jobId": job_id,
            "outcome": outcome,
            "status": status,
        }
    )


def test_a_job_the_runner_received_twice_is_counted_once_as_dispatched_twice(
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "runner-0.log", tmp_path / "runner-1.log"
    first.write_text(
        "\n".join(
            [
                "[2026-01-01 00:00:00 +0000] [1] [INFO] Booting worker with pid: 2",
                _job_line(JOB_A, "success", 200),
                _job_line(JOB_B, "success", 200),
                _job_line(JOB_C, "rate_limit", 429),  # refused for capacity: the forge retries
                '{"component": "runnerkit.job", "truncated',
            ]
        )
        + "\n"
    )
    # The second runner instance of the stack got job A again (its ledger would replay it on
    # the same instance; here it is another one) and job C's retry.
    second.write_text(_job_line(JOB_A, "success", 200) + "\n" + _job_line(JOB_C, "success", 200))

    counts = dispatch_counts([first, second, tmp_path / "never-started.log"])

    assert counts["dispatched_twice"] == 1
    assert counts["examples"] == [JOB_A]
    assert counts["jobs"] == 3
    assert counts["executions"] == 4
    assert counts["refused"] == 1


def test_a_replay_from_the_ledger_is_a_second_dispatch(tmp_path: Path) -> None:
    log = tmp_path / "runner.log"
    log.write_text(_job_line(JOB_A, "success", 200) + "\n" + _job_line(JOB_A, "replayed", 200))

    assert dispatch_counts([log])["dispatched_twice"] == 1


def test_the_postgresql_stacks_say_why_when_the_server_does_not_answer(tmp_path: Path) -> None:
    port = free_port()
    closed = f"postgresql://postgres:hunter2@127.0.0.1:{port}/postgres"
    notes: dict[str, Any] = {}

    started = postgres_stacks(BenchPostgres(closed), tmp_path, notes)

    assert started == []
    assert set(notes["not_measured"]) == set(PG_STACKS)
    for reason in notes["not_measured"].values():
        assert f"postgres:***@127.0.0.1:{port}/postgres does not answer" in reason
        assert "hunter2" not in reason


def _burst(jobs_per_s: float, **cpu: float) -> dict[str, Any]:
    return {
        "jobs_per_s": jobs_per_s,
        "p50_ms": 40.0,
        "p99_ms": 90.0,
        "submit_rate": jobs_per_s,
        "queue_p50_ms": 1.0,
        "queue_p90_ms": 2.0,
        "queued_over_50ms": 0.0,
        "run_p50_ms": 3.0,
        "retried": 0,
        "not_completed": 0,
        "cpu_ms_per_job": {"forge": 2.0, "runners": 1.0, "load generator": 0.2, **cpu},
    }


def _results(forge: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": {
            "quick": True,
            "started": "2026-01-01 00:00:00 UTC",
            "seconds": 1.0,
            "python": "3.11",
            "cpus": 2,
            "load_average_at_start": [0.0, 0.0, 0.0],
            "load_average_at_end": [0.0, 0.0, 0.0],
        },
        "forge": forge,
    }


def test_the_report_has_a_row_per_stack_and_the_ratios_against_their_targets() -> None:
    forge = {
        "forge_workers": 3,
        "burst": {
            "1 runner": _burst(400.0),
            "PostgreSQL, 1 forge": {
                **_burst(300.0, **{"PostgreSQL server": 1.5}),
                "pg_whole_server_ms_per_job": 1.75,
            },
        },
        "paced": {},
        "serial": {},
        "stacks": {
            "1 runner": {"store": "SQLite", "forges": 1, "runners": 1},
            "PostgreSQL, 1 forge": {"store": "PostgreSQL", "forges": 1, "runners": 1},
        },
        "postgres": {
            "stacks": list(PG_STACKS),
            "baseline": "1 runner",
            "not_measured": {"PostgreSQL, 2 forges": "RuntimeError: gunicorn exited with 3\nlog"},
            "ratio_pg1_to_sqlite": 0.75,
            "ratio_pg2_to_pg1": float("nan"),
        },
        "dispatch": {
            "1 runner": {"jobs": 1000, "dispatched_twice": 0},
            "PostgreSQL, 1 forge": {"jobs": 900, "dispatched_twice": 2},
        },
    }

    text = report.markdown(_results(forge))

    assert (
        "| PostgreSQL, 1 forge | PostgreSQL | 1 | 1 | 300 | 40.0 | 90.0 | 2.0 | 1.5 (1.8) | 1.0 "
        "| 2 of 900 |" in text
    )
    assert "| 1 runner | SQLite | 1 | 1 | 400 | 40.0 | 90.0 | 2.0 | - | 1.0 | 0 of 1,000 |" in text
    assert (
        "| PostgreSQL, 2 forges | PostgreSQL | - | - | not measured: RuntimeError: gunicorn "
        "exited with 3 log |" in text
    )
    assert (
        "- PostgreSQL, 1 forge / 1 runner (SQLite) burst jobs/s: 0.75x, target ≥ 0.7x: **met**"
        in text
    )
    assert (
        "- PostgreSQL, 2 forges / PostgreSQL, 1 forge burst jobs/s: not measured, target ≥ 1.0x: "
        "**not measured**" in text
    )
    assert "- jobs dispatched twice: 2 of 1,900 jobs, target 0: **not met**" in text
    assert "| 0 jobs dispatched twice (every stack) | 2 of 1,900 | FAIL |" in text
    # The SQLite-era absolute target does not judge the PostgreSQL stack.
    assert "| forge ≥ 500 jobs/s end to end (PostgreSQL, 1 forge) | 300 jobs/s | info |" in text
    assert "| forge ≥ 500 jobs/s end to end (1 runner) | 400 jobs/s | FAIL |" in text


def test_results_from_before_the_postgresql_stacks_still_render() -> None:
    forge = {
        "forge_workers": 3,
        "burst": {"1 runner": _burst(600.0)},
        "paced": {},
        "serial": {},
    }

    text = report.markdown(_results(forge))

    assert "| forge ≥ 500 jobs/s end to end (1 runner) | 600 jobs/s | PASS |" in text
    assert "### SQLite and PostgreSQL" not in text


def test_the_report_says_how_the_jobs_were_spread_over_two_forge_instances() -> None:
    forge = {
        "forge_workers": 3,
        "burst": {"PostgreSQL, 2 forges": {**_burst(250.0), "accepted_by_instance": [1501, 1499]}},
        "paced": {},
        "serial": {},
        "stacks": {"PostgreSQL, 2 forges": {"store": "PostgreSQL", "forges": 2, "runners": 1}},
        "postgres": {"stacks": list(PG_STACKS), "baseline": "1 runner"},
    }

    text = report.markdown(_results(forge))

    assert "PostgreSQL, 2 forges: the instances took 1,501 / 1,499 of the bursts' jobs." in text
    assert "| PostgreSQL, 2 forges | PostgreSQL | 2 | 1 | 250 |" in text
