"""The example runner: text statistics, checksums, and a long job that honours cancellation.

Serve it with ``gunicorn app:app`` (or ``make run``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import Counter
from typing import Any

from marshmallow import Schema, fields, validate

from runnerkit import Capability, Context, Runner, ValidationFailed
from runnerkit.contracts import fields as strict

_WORD_RE = re.compile(r"\w+(?:['\u2019]\w+)*", re.UNICODE)
_SENTENCE_RE = re.compile(r"[.!?]+(?:\s|$)")
ALGORITHMS = ("sha256", "sha512", "sha1", "md5", "blake2b")


class TextStats(Capability):
    """Counts characters, words, sentences and the most frequent words of a text."""

    id = "text-stats"
    version = "1.0.0"
    job_types = ["text.stats"]
    max_concurrency = 8
    timeout_ms = 5_000
    examples = [
        {
            "input": {"text": "Hello world. Hello!", "top": 1},
            "output": {
                "characters": 19,
                "words": 3,
                "sentences": 2,
                "lines": 1,
                "top_words": [{"word": "hello", "count": 2}],
            },
        }
    ]

    class Input(Schema):
        text = strict.StrictString(required=True, validate=validate.Length(max=1_000_000))
        top = strict.StrictInteger(load_default=5, validate=validate.Range(min=0, max=100))

    class Output(Schema):
        class WordCount(Schema):
            word = fields.String(required=True)
            count = fields.Integer(required=True)

        characters = fields.Integer(required=True)
        words = fields.Integer(required=True)
        sentences = fields.Integer(required=True)
        lines = fields.Integer(required=True)
        top_words = fields.List(fields.Nested(WordCount), required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        text: str = payload["text"]
        words = [w.lower() for w in _WORD_RE.findall(text)]
        sentences = len(_SENTENCE_RE.findall(text)) or (1 if text.strip() else 0)
        common = Counter(words).most_common(payload["top"])
        return {
            "characters": len(text),
            "words": len(words),
            "sentences": sentences,
            "lines": text.count("\n") + 1 if text else 0,
            "top_words": [{"word": w, "count": c} for w, c in common],
        }


class Checksum(Capability):
    """A cryptographic digest of the given data (UTF-8 text or base64 bytes)."""

    id = "checksum"
    version = "1.0.0"
    job_types = ["data.checksum"]
    max_concurrency = 8
    timeout_ms = 5_000

    examples = [
        {
            "input": {"data": "abc"},
            "output": {
                "algorithm": "sha256",
                "digest": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                "bytes": 3,
            },
        },
        {"input": {"data": "YWJj", "encoding": "base64", "algorithm": "md5"}},
    ]

    class Input(Schema):
        data = strict.StrictString(required=True)
        encoding = strict.StrictString(
            load_default="utf-8", validate=validate.OneOf(["utf-8", "base64"])
        )
        algorithm = strict.StrictString(
            load_default="sha256",
            validate=validate.OneOf(ALGORITHMS),
        )

    class Output(Schema):
        algorithm = fields.String(required=True)
        digest = fields.String(required=True)
        bytes = fields.Integer(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        if payload["encoding"] == "base64":
            try:
                raw = base64.b64decode(payload["data"], validate=True)
            except (binascii.Error, ValueError):
                raise ValidationFailed(
                    "data is not valid base64",
                    code="INVALID_BASE64",
                    details=[{"message": "Not valid base64", "path": ["payload", "data"]}],
                ) from None
        else:
            raw = payload["data"].encode("utf-8")
        digest = hashlib.new(payload["algorithm"], raw).hexdigest()
        return {"algorithm": payload["algorithm"], "digest": digest, "bytes": len(raw)}


class SlowCount(Capability):
    """A long job: counts to ``steps``, sleeping between steps, and stops when cancelled."""

    id = "slow-count"
    version = "1.0.0"
    job_types = ["demo.slow"]
    max_concurrency = 4
    timeout_ms = 60_000

    class Input(Schema):
        steps = strict.StrictInteger(required=True, validate=validate.Range(min=1, max=10_000))
        step_ms = strict.StrictInteger(load_default=100, validate=validate.Range(min=0, max=10_000))

    class Output(Schema):
        completed_steps = fields.Integer(required=True)
        cancelled = fields.Boolean(required=True)

    def run(self, payload: dict[str, Any], ctx: Context) -> dict[str, Any]:
        done = 0
        for step in range(payload["steps"]):
            if ctx.wait(payload["step_ms"] / 1000.0):
                ctx.logger.info("cancelled after %d steps", done)
                break
            done = step + 1
            ctx.progress(100.0 * done / payload["steps"], f"step {done}")
        return {"completed_steps": done, "cancelled": ctx.cancelled}


runner = Runner(
    "example-runner",
    version="1.0.0",
    capabilities=[TextStats(), Checksum(), SlowCount()],
    tags=["example"],
)
app = runner.create_app()
