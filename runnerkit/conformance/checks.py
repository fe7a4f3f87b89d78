"""The black-box conformance suite: what any runner, in any language, must answer over HTTP.

Each check sends one or two requests to the runner under test and judges the answers against
the wire contracts (CONTRACTS.md): the health document, a valid ``/execute`` for every
advertised capability, malformed requests refused with the right error category, a redelivered
``jobId`` (advisory), and, given the signing secret, the signature checks. Nothing here knows
how the runner is written; runnerkit's own runners are held to the same suite.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from .answers import contract_findings, describe_error, error_answer, json_answer
from .probe import Probe, Reply
from .report import Check, Report
from .samples import SampleError, sample_for, schema_problems
from .sources import Advertised

MODULE_ID = "runnerkit-conformance"
DEFAULT_TIMEOUT_MS = 30_000.0
#: Added to a capability's ``timeoutMs`` before the suite stops waiting for its answer.
ANSWER_MARGIN_S = 10.0


class Suite:
    """One run of the suite against one runner; :meth:`run` returns the :class:`Report`."""

    def __init__(
        self,
        probe: Probe,
        advertised: Advertised,
        *,
        samples: Mapping[str, list[Any]] | None = None,
    ) -> None:
        self.probe = probe
        self.advertised = advertised
        self.samples = dict(samples or {})
        self.report = Report(probe.base_url)
        #: A request the runner completed, and its answer, for the redelivery check.
        self._completed: tuple[dict[str, Any], Reply] | None = None
        self._saw_401 = False

    # -- the run ------------------------------------------------------------------------

    def run(self) -> Report:
        self._check(f"the advertised document ({self.advertised.origin})", self._document)
        self._check("GET /health answers a HealthCheck", self._health)
        capabilities = self.advertised.capabilities
        for capability in capabilities:
            for index, payload in enumerate(self._payloads(capability)):
                label = "" if index == 0 else f" (sample {index + 1})"
                self._check(
                    f"POST /execute {capability['id']}{label}: a valid request is answered "
                    "with a RunnerExecutionResponse",
                    partial(self._execute, capability=capability, payload=payload),
                )
        if capabilities:
            self._malformed(capabilities)
            self._check(
                "a redelivered jobId is answered with the first answer or 409",
                self._redelivery,
                required=False,
            )
        if self.probe.signing_secret and capabilities:
            self._signing(capabilities[0])
        if self._saw_401 and not self.probe.signing_secret:
            hint = Check("signed requests", required=True)
            hint.fail(
                "the runner refused requests as unauthenticated (401): it checks signatures; "
                "give its secret with --signing-secret so the suite can sign"
            )
            self.report.checks.append(hint)
        return self.report

    def _check(self, name: str, body: Callable[[Check], None], *, required: bool = True) -> Check:
        check = Check(name, required=required)
        started = time.monotonic()
        try:
            body(check)
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a finding, not a crash
            check.fail(f"the check could not be completed: {type(exc).__name__}: {exc}")
        check.seconds = time.monotonic() - started
        self.report.checks.append(check)
        return check

    # -- what the runner advertises -----------------------------------------------------

    def _document(self, check: Check) -> None:
        contract_findings(check, self.advertised.contract, self.advertised.document)
        if not self.advertised.capabilities:
            check.fail("no capability is advertised, so no job can be sent", "capabilities")

    def _payloads(self, capability: Mapping[str, Any]) -> list[Any]:
        given = self.samples.get(capability["id"])
        if given:
            return list(given)
        schema = capability.get("inputSchema")
        if not isinstance(schema, Mapping):
            return [_Unsampled("the capability has no inputSchema object")]
        try:
            return [sample_for(schema)]
        except SampleError as exc:
            return [_Unsampled(str(exc))]

    # -- health -------------------------------------------------------------------------

    def _health(self, check: Check) -> None:
        reply = self.probe.get("/health")
        if not json_answer(check, reply):
            return
        if not contract_findings(check, "HealthCheck", reply.body):
            return
        status = reply.body["status"]
        expected = 503 if status == "unhealthy" else 200
        if status != "unknown" and reply.status != expected:
            check.fail(
                f"HTTP {reply.status} for status {status!r}; expected {expected}", "(status)"
            )

    # -- valid requests -----------------------------------------------------------------

    def request(self, capability: Mapping[str, Any], payload: Any) -> dict[str, Any]:
        """A valid RunnerExecutionRequest for ``capability`` with a fresh jobId."""
        timeout_ms = capability.get("timeoutMs")
        if not isinstance(timeout_ms, (int, float)) or isinstance(timeout_ms, bool):
            timeout_ms = DEFAULT_TIMEOUT_MS
        return {
            "jobId": str(uuid.uuid4()),
            "moduleId": MODULE_ID,
            "capabilityId": capability["id"],
            "payload": payload,
            "timeoutMs": timeout_ms,
            "metadata": {"correlationId": str(uuid.uuid4())},
        }

    def _send(self, document: dict[str, Any], **options: Any) -> Reply:
        wait_s = float(document.get("timeoutMs") or DEFAULT_TIMEOUT_MS) / 1000 + ANSWER_MARGIN_S
        reply = self.probe.post_json("/execute", document, timeout_s=wait_s, **options)
        if reply.status == 401 and options.get("signed", True):
            self._saw_401 = True
        return reply

    def _execute(self, check: Check, *, capability: Mapping[str, Any], payload: Any) -> None:
        if isinstance(payload, _Unsampled):
            check.fail(f"no sample input: {payload.reason}", "payload")
            return
        if not isinstance(payload, dict):
            check.fail("a sample must be a JSON object", "payload")
            return
        document = self.request(capability, payload)
        reply = self._send(document)
        if not json_answer(check, reply):
            return
        contract_findings(check, "RunnerExecutionResponse", reply.body)
        body = reply.body if isinstance(reply.body, dict) else {}
        if reply.status != 200 or body.get("success") is not True:
            check.fail(
                f"HTTP {reply.status}, success {body.get('success')!r}: the sample was refused "
                f"({describe_error(body)})"
            )
            return
        if body.get("jobId") != document["jobId"]:
            check.fail(f"{body.get('jobId')!r}, not the request's {document['jobId']}", "jobId")
        assigned = (
            self.advertised.document.get("id")
            if self.advertised.contract == "RunnerMetadata"
            else None
        )
        if assigned and body.get("runnerId") != assigned:
            check.fail(
                f"{body.get('runnerId')!r}, but the forge knows this runner as {assigned}",
                "runnerId",
            )
        output_schema = capability.get("outputSchema")
        if isinstance(output_schema, Mapping) and "data" in body:
            for problem in schema_problems(output_schema, body["data"]):
                check.fail(f"does not match the advertised outputSchema: {problem}", "data")
        if body.get("jobId") == document["jobId"] and self._completed is None:
            self._completed = (document, reply)

    # -- malformed requests -------------------------------------------------------------

    def _malformed(self, capabilities: list[dict[str, Any]]) -> None:
        first = capabilities[0]
        # Each malformed request is a valid one with one defect, so a refusal can only be
        # for that defect.
        sample = next(iter(self._payloads(first)), None)
        valid_payload = sample if isinstance(sample, dict) else {}
        base = self.request(first, valid_payload)

        def refused(
            name: str, body: bytes | Callable[[], dict[str, Any]], category: str, status: int
        ) -> None:
            def run(check: Check) -> None:
                if isinstance(body, bytes):
                    raw, job_id = body, None
                else:
                    document = body()
                    raw, job_id = json.dumps(document).encode(), document.get("jobId")
                    job_id = job_id if isinstance(job_id, str) and _is_uuid(job_id) else None
                wait_s = float(base["timeoutMs"]) / 1000 + ANSWER_MARGIN_S
                reply = self.probe.post_raw("/execute", raw, timeout_s=wait_s)
                if reply.status == 401:
                    self._saw_401 = True
                error_answer(check, reply, category, status, job_id)

            self._check(f"{name}: refused with {category}", run)

        def changed(**fields: Any) -> Callable[[], dict[str, Any]]:
            return lambda: {**self.request(first, valid_payload), **fields}

        refused("invalid JSON", b'{"jobId": "', "VALIDATION_ERROR", 400)
        refused("a JSON array instead of an object", b"[]", "VALIDATION_ERROR", 400)
        refused(
            "missing jobId",
            lambda: {k: v for k, v in self.request(first, valid_payload).items() if k != "jobId"},
            "VALIDATION_ERROR",
            400,
        )
        refused("a jobId that is not a uuid", changed(jobId="job-1"), "VALIDATION_ERROR", 400)
        refused(
            "payload of the wrong type (a string)", changed(payload="text"), "VALIDATION_ERROR", 400
        )
        refused(
            'timeoutMs as a string ("5000")', changed(timeoutMs="5000"), "VALIDATION_ERROR", 400
        )
        refused(
            "an unknown capabilityId",
            changed(capabilityId=f"no-such-capability-{uuid.uuid4().hex[:8]}"),
            "RESOURCE_NOT_FOUND",
            404,
        )
        for capability in capabilities:
            payloads = self._payloads(capability)
            sample = payloads[0] if payloads else None
            if not isinstance(sample, dict):
                continue
            schema = capability.get("inputSchema") or {}
            properties = schema.get("properties") or {}
            number = next(
                (n for n, s in properties.items() if isinstance(s, Mapping) and _numeric(s)), None
            )
            if number is not None:
                value = sample.get(number, _numeric_value(properties[number]))
                refused(
                    f'{capability["id"]}: payload.{number} as a string ("{value}")',
                    partial(self.request, capability, {**sample, number: str(value)}),
                    "VALIDATION_ERROR",
                    400,
                )
            required = [r for r in schema.get("required") or [] if r in sample]
            if required:
                refused(
                    f"{capability['id']}: payload without its required {required[0]}",
                    partial(
                        self.request,
                        capability,
                        {k: v for k, v in sample.items() if k != required[0]},
                    ),
                    "VALIDATION_ERROR",
                    400,
                )

    # -- redelivery ---------------------------------------------------------------------

    def _redelivery(self, check: Check) -> None:
        if self._completed is None:
            check.fail("no valid request completed, so redelivery could not be tried")
            return
        document, first = self._completed
        reply = self._send(document)
        if not json_answer(check, reply):
            return
        body = reply.body if isinstance(reply.body, dict) else {}
        if reply.status == 409:
            error_answer(check, reply, "RESOURCE_CONFLICT", 409, document["jobId"])
        elif reply.status != 200 or body != first.body:
            changed = sorted(
                k for k in set(body) | set(first.body) if body.get(k) != first.body.get(k)
            )
            check.fail(
                f"answered HTTP {reply.status} with another answer (changed: "
                f"{', '.join(changed) or 'the status'}): the job may have run twice; JobForge "
                "redelivers a jobId whose answer it lost"
            )

    # -- signing ------------------------------------------------------------------------

    def _signing(self, capability: dict[str, Any]) -> None:
        payload = next(iter(self._payloads(capability)), None)
        payload = payload if isinstance(payload, dict) else {}
        secret = self.probe.signing_secret

        def refused(name: str, headers: Callable[[bytes], dict[str, str]], required: bool) -> None:
            def run(check: Check) -> None:
                document = self.request(capability, payload)
                raw = json.dumps(document).encode()
                wait_s = float(document["timeoutMs"]) / 1000 + ANSWER_MARGIN_S
                reply = self.probe.post_raw(
                    "/execute", raw, signed=False, timeout_s=wait_s, headers=headers(raw)
                )
                error_answer(check, reply, "AUTHENTICATION_ERROR", 401, document["jobId"])

            self._check(f"{name}: refused with AUTHENTICATION_ERROR", run, required=required)

        from runnerkit.service.signing import TIMESTAMP_HEADER, sign

        refused("an unsigned request", lambda raw: {}, True)
        refused(
            "a request signed with another secret",
            lambda raw: sign(raw, secret + "-not-the-secret"),
            True,
        )
        refused(
            "a request signed 10 minutes ago",
            lambda raw: sign(raw, secret, timestamp_ms=int(time.time() * 1000) - 600_000),
            True,
        )
        refused(
            "a signed request without its timestamp header",
            lambda raw: {k: v for k, v in sign(raw, secret).items() if k != TIMESTAMP_HEADER},
            False,
        )


class _Unsampled:
    """A capability the suite has no valid input for, and why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _numeric(schema: Mapping[str, Any]) -> bool:
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    return ("integer" in kinds or "number" in kinds) and "string" not in kinds


def _numeric_value(schema: Mapping[str, Any]) -> Any:
    try:
        return sample_for(schema)
    except SampleError:
        return 5


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return len(value) == 36
