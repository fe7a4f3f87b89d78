"""Reading a command's JSON object option: inline, from a file or from standard input.

``submit`` and ``call`` take a payload this way, as curl takes a body.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def json_object_arg(value: str, option: str) -> dict[str, Any]:
    """An option's JSON object: inline, ``@FILE`` or ``-`` for standard input (like curl).

    A payload too big for the shell's argument list still fits in a file or a pipe.
    """
    if value == "-":
        text = sys.stdin.read()
    elif value.startswith("@"):
        try:
            with open(value[1:], encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise click.BadParameter(f"cannot read {value[1:]}: {exc}", param_hint=option) from None
    else:
        text = value
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object", param_hint=option)
    return parsed
