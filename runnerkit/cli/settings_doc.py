"""``make docs``: the settings tables of docs/configuration.md, written from the code.

It reads both tables, the runner's and the forge's, so it lives with the commands, above both.
"""

from __future__ import annotations

from runnerkit.forge.settings import PREFIX as FORGE_PREFIX
from runnerkit.forge.settings import SETTINGS as FORGE_SETTINGS
from runnerkit.runner.config import PREFIX, SETTINGS
from runnerkit.service.settings import settings_table


def write_settings_doc(path: str) -> bool:
    """Rewrite the runner and forge settings tables of docs/configuration.md (``make docs``).

    The tables sit between ``<!-- runner-settings:start/end -->`` and ``<!-- forge-settings:
    start/end -->`` markers; a test checks them against the code. True when the file changed.
    """
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    updated = text
    for name, table in (
        ("runner-settings", settings_table(SETTINGS, PREFIX)),
        ("forge-settings", settings_table(FORGE_SETTINGS, FORGE_PREFIX)),
    ):
        start, end = f"<!-- {name}:start -->\n", f"\n<!-- {name}:end -->"
        head, found, rest = updated.partition(start)
        _, closed, tail = rest.partition(end)
        if not (found and closed):
            raise ValueError(f"{path} has no {name} section")
        updated = head + start + table + end + tail
    if updated != text:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(updated)
    return updated != text
