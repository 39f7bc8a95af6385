"""The access log: every query of the journal is itself recorded beside the journal.

One create-only JSON object per query at ``_access/date=<YYYY-MM-DD>/<HHMMSS.ffffff>-<uuid>.json``
with who asked, when, the filter (a subject only as its token, never the raw id), the tiers and
files scanned and how many rows came back. Auditors are audited too.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

from serve_journal.storage import JournalStorage, StoredObject

ACCESS_PREFIX = "_access"


def record_access(
    storage: JournalStorage,
    *,
    actor: str,
    filters: dict[str, Any],
    rows: int,
    tier: str,
    files_scanned: int,
    elapsed_ms: float,
    now: dt.datetime | None = None,
) -> StoredObject:
    """Append one access record (create-only). ``filters`` must already hold tokens, not raw ids."""
    now = now or dt.datetime.now(dt.UTC)
    record = {
        "actor": actor,
        "at": now.isoformat(),
        "filters": filters,
        "rows": rows,
        "tier": tier,
        "files_scanned": files_scanned,
        "elapsed_ms": round(elapsed_ms, 3),
    }
    path = (
        f"{ACCESS_PREFIX}/date={now:%Y-%m-%d}/{now:%H%M%S.%f}-{uuid.uuid4().hex}.json"
    )
    return storage.put_new(path, json.dumps(record, sort_keys=True, default=str).encode())


def read_access_log(storage: JournalStorage, date: str | None = None) -> list[dict[str, Any]]:
    """Access records, oldest first; ``date`` (``YYYY-MM-DD``) limits them to one day."""
    prefix = f"{ACCESS_PREFIX}/date={date}" if date else ACCESS_PREFIX
    out = []
    for path in storage.list_files(prefix, suffix=".json"):
        record = json.loads(storage.read(path))
        record["path"] = path
        out.append(record)
    out.sort(key=lambda r: (r["at"], r["path"]))
    return out
