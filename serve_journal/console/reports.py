"""Verify and replay summaries on disk: ``<prefix><UTC time>.json`` files in a reports directory.

The CLI's ``verify`` and ``replay`` commands and the console's "run verify now" write them with
:func:`write_report`; the console's reports page shows the newest of each kind.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from typing import Any

VERIFY_REPORT_PREFIX = "verify-"
REPLAY_REPORT_PREFIX = "replay-"


def write_report(directory: str, prefix: str, document: dict[str, Any]) -> str:
    """Write a ``<prefix><UTC time>.json`` summary the console shows as the latest one."""
    os.makedirs(directory, exist_ok=True)
    name = f"{prefix}{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}.json"
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1, sort_keys=True, default=str)
    return path


def latest_report(directory: str | None, prefix: str) -> tuple[str, dict[str, Any]] | None:
    """``(file name, document)`` of the newest readable ``<prefix>*.json`` in ``directory``."""
    if not directory or not os.path.isdir(directory):
        return None
    names = sorted(n for n in os.listdir(directory) if n.startswith(prefix) and n.endswith(".json"))
    for name in reversed(names):
        try:
            with open(os.path.join(directory, name), encoding="utf-8") as handle:
                return name, json.load(handle)
        except (OSError, ValueError):
            continue
    return None


__all__ = ["REPLAY_REPORT_PREFIX", "VERIFY_REPORT_PREFIX", "latest_report", "write_report"]
