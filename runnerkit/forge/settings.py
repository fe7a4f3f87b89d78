"""The forge's settings: one table of every knob, its default and its meaning.

A setting named ``X`` is read from ``config["RUNNERKIT_FORGE_X"]`` (the mapping given to
``create_app``), then from the environment variable ``RUNNERKIT_FORGE_X``, then falls back to
its default. This mirrors :mod:`runnerkit.config`; every default is documented here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runnerkit.service.jsonbody import DEFAULT_MAX_DEPTH, DEFAULT_MAX_KEYS
from runnerkit.service.settings import (
    ConfigError,
    ResolvedSettings,
    Setting,
    parse_bool,
    parse_nonnegative_float,
    parse_nonnegative_int,
    parse_positive_float,
    parse_positive_int,
    parse_str,
    refuse_placeholder,
    resolve,
)

PREFIX = "RUNNERKIT_FORGE_"


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "DB_PATH",
        "./var/forge.sqlite3",
        parse_str,
        "The SQLite file holding runners, jobs, events and assertions (created on first "
        "start, with its directory). The dispatcher lock is '<DB_PATH>.dispatcher.lock' "
        "(with DB_URL a PostgreSQL advisory lock instead; the path still names the forge's "
        "local files: '<DB_PATH>.wake', the metrics).",
    ),
    Setting(
        "DB_URL",
        "",
        parse_str,
        "A PostgreSQL database for runners, jobs, events and assertions instead of the "
        "SQLite file (postgresql://user:password@host:5432/dbname; libpq's options such as "
        "?sslmode=require or ?options=-csearch_path%3Dforge pass through). Empty: SQLite at "
        "DB_PATH. The schema is created or upgraded at start; see docs/postgresql.md.",
    ),
    Setting(
        "DB_POOL_SIZE",
        10,
        parse_positive_int,
        "With DB_URL: the most PostgreSQL connections each forge process opens.",
    ),
    Setting(
        "TOKEN",
        "",
        parse_str,
        "Bearer token every route but /health requires (Authorization: Bearer ..., or the "
        "dashboard's login session); runners register with it. Empty: the forge serves "
        "loopback peers only (others get 403 FORGE_LOOPBACK_ONLY).",
    ),
    Setting(
        "RUNNER_TOKEN",
        "",
        parse_str,
        "Bearer token the dispatcher sends to runners on POST /execute; empty sends none.",
    ),
    Setting(
        "SIGNING_SECRET",
        "",
        parse_str,
        "When set, every POST /execute is signed with the ControlPlane webhook scheme "
        "(x-webhook-signature/-timestamp/-event-id, HMAC-SHA256; see runnerkit.signing). "
        "The runner's RUNNERKIT_SIGNING_SECRET is read too, so one env file serves both.",
        ("RUNNERKIT_SIGNING_SECRET",),
    ),
    Setting(
        "HEARTBEAT_INTERVAL_MS",
        30_000,
        parse_positive_int,
        "heartbeatIntervalMs given to runners at registration.",
    ),
    Setting(
        "OFFLINE_AFTER_MISSED",
        3,
        parse_positive_int,
        "A runner is 'offline' after this many heartbeat intervals without a heartbeat; its "
        "running jobs are then requeued.",
    ),
    Setting(
        "ASYNC_THRESHOLD_MS",
        10_000,
        parse_nonnegative_int,
        "Jobs whose timeoutMs is above this are sent with 'Prefer: respond-async'.",
    ),
    Setting(
        "DISPATCH_MARGIN_MS",
        5_000,
        parse_nonnegative_int,
        "Added to a job's timeoutMs for the HTTP read timeout of POST /execute (and for how "
        "long an async job may take before its result is overdue).",
    ),
    Setting(
        "CONNECT_TIMEOUT_MS",
        3_000,
        parse_positive_int,
        "Connect timeout of POST /execute.",
    ),
    Setting(
        "DISPATCH_THREADS",
        32,
        parse_positive_int,
        "Executions in flight at once (the dispatcher's thread pool).",
    ),
    Setting(
        "POLL_INTERVAL_MS",
        100,
        parse_positive_int,
        "How often the dispatcher looks for work (it is also woken by new jobs and results).",
    ),
    Setting(
        "NOTIFY_GAP_MS",
        10,
        parse_nonnegative_int,
        "PostgreSQL: at most one NOTIFY to the dispatcher per this many ms from one forge "
        "process; a wake-up asked for meanwhile goes out when the gap ends, so under load "
        "one NOTIFY carries many submissions (0: one per write).",
    ),
    Setting(
        "DISPATCHER",
        True,
        parse_bool,
        "Run the dispatcher thread in this process (it still dispatches only while it holds "
        "the dispatcher lock); false makes an API-only forge.",
    ),
    Setting(
        "DISPATCHER_STALE_MS",
        5_000,
        parse_positive_int,
        "/health reports the dispatcher unhealthy when its holder has not ticked for this long.",
    ),
    Setting(
        "SERVICE_NAME",
        "jobforge",
        parse_str,
        "'service' of every envelope, event and health answer; 'source' of status assertions.",
    ),
    Setting(
        "MAX_PAGE_SIZE",
        500,
        parse_positive_int,
        "Largest 'limit' accepted by the list endpoints (larger is a 400); a TruthQuery's "
        "larger limit is cut to it (its hasMore says so).",
    ),
    Setting(
        "MAX_JSON_DEPTH",
        DEFAULT_MAX_DEPTH,
        parse_positive_int,
        "Deepest JSON nesting accepted in a request body or a runner's answer; deeper gets 400.",
    ),
    Setting(
        "MAX_JSON_KEYS",
        DEFAULT_MAX_KEYS,
        parse_positive_int,
        "Most object keys in one request body or runner answer; more gets 400.",
    ),
    Setting(
        "HISTORY_RETENTION_HOURS",
        168.0,
        parse_nonnegative_float,
        "Finished jobs (completed, failed, cancelled) last updated longer ago than this are "
        "deleted, with their events, by the dispatcher's housekeeping (at most 1000 a minute); "
        "0 keeps them all. TruthCore assertions have ASSERTION_RETENTION_HOURS.",
    ),
    Setting(
        "ASSERTION_RETENTION_HOURS",
        168.0,
        parse_nonnegative_float,
        "TruthCore assertions recorded longer ago than this, and those whose expiresAt has "
        "passed, are deleted by the dispatcher's housekeeping (at most 1000 a minute); 0 "
        "keeps them (expired ones are still deleted).",
    ),
    Setting(
        "UNMATCHED_JOB_EXPIRY_S",
        900.0,
        parse_nonnegative_float,
        "A job queued this long while no registered runner (other than offline ones) lists "
        "its type fails with RESOURCE_NOT_FOUND / NO_RUNNER_FOR_TYPE; 0 lets it wait forever.",
    ),
    Setting(
        "MAX_BODY_BYTES",
        1024 * 1024,
        parse_positive_int,
        "Largest request body the forge reads (async results included); larger gets 413.",
    ),
    Setting(
        "MAX_ANSWER_BYTES",
        16 * 1024 * 1024,
        parse_positive_int,
        "Largest answer to POST /execute the dispatcher reads; a larger one fails the "
        "attempt with RUNNER_ERROR / ANSWER_TOO_LARGE (not retried).",
    ),
    Setting(
        "ALLOWED_RUNNER_NETWORKS",
        "",
        parse_str,
        "Comma-separated CIDRs and/or host names runners may be dispatched to (checked at "
        "registration and on the address each send connects to). Empty: any address but "
        "link-local and cloud metadata ones (169.254.0.0/16, fe80::/10, fd00:ec2::254), "
        "which are refused unless listed here.",
    ),
    Setting(
        "TRUST_RUNNER_IDS",
        False,
        parse_bool,
        "Accept the shared TOKEN (or, without one, nothing) instead of a runner's own "
        "runnerToken on heartbeats, deregistration, results and events: only for runners "
        "that cannot keep the runnerToken given at registration.",
    ),
    Setting(
        "STRICT",
        False,
        parse_bool,
        "Fail an attempt whose answer to POST /execute breaks the RunnerExecutionResponse "
        "(or ErrorEnvelope) contract, with SCHEMA_MISMATCH / CONTRACT_VIOLATION (not "
        "retried; an answer that is not JSON at all, a proxy's HTML 502 say, keeps its "
        "retries). Off: the answer is used and the violation recorded and shown (dashboard, "
        "runnerkit runners, the forge's log), as every refused registration, heartbeat, "
        "event and result always is.",
    ),
    Setting(
        "RETRY_AFTER_CAP_S",
        3600.0,
        parse_positive_float,
        "Upper bound on a runner's retryAfter honoured by the dispatcher.",
    ),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class ForgeSettings(ResolvedSettings):
    """Resolved forge settings: attribute access by setting name, lower-cased."""

    prefix = PREFIX

    @classmethod
    def load(
        cls, config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> ForgeSettings:
        """Resolve every setting from ``config``, then the environment, then the default.

        ``config`` keys may be given with the ``RUNNERKIT_FORGE_`` prefix or without it.
        """
        values = resolve(SETTINGS, PREFIX, config, environ, bare_keys=True)
        if not str(values["DB_PATH"]).strip():
            raise ConfigError(f"{PREFIX}DB_PATH must not be empty")
        url = str(values["DB_URL"]).strip()
        if url and not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                f"{PREFIX}DB_URL must be a postgresql:// URL; leave it empty for SQLite at "
                f"{PREFIX}DB_PATH"
            )
        for secret_key in ("TOKEN", "RUNNER_TOKEN", "SIGNING_SECRET"):
            refuse_placeholder(PREFIX + secret_key, str(values[secret_key]))
        return cls(values)


def setting(name: str) -> Setting:
    """The documented forge setting called ``name`` (without prefix)."""
    return _BY_NAME[name]
