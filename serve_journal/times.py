"""The one UTC time parser: every option, query filter and CLI flag that takes a time uses it."""

from __future__ import annotations

import datetime as dt

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def as_utc(value: dt.datetime | str | None, name: str = "time") -> dt.datetime | None:
    """``value`` as an aware UTC datetime; ``None`` stays ``None`` (no bound).

    Strings are ISO 8601 (``2025-01-15T10:00:00Z``, ``2025-01-15T10:00:00+02:00``,
    ``2025-01-15``); a time without an offset, string or datetime, is taken as UTC. ``name``
    names the parameter in the error. An empty string is an error, not "no bound": a form
    field left empty is the caller's to turn into ``None``.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise ValueError(
                f"{name} must be an ISO-8601 time like 2025-01-15T10:00:00Z, got {shown!r}"
            ) from None
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime or ISO-8601 string, got {type(value).__name__}")
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def to_micros(value: dt.datetime | str | None, name: str = "time") -> int | None:
    """Microseconds since the epoch of :func:`as_utc` of ``value`` (the journal's ``ts`` unit)."""
    utc = as_utc(value, name)
    if utc is None:
        return None
    delta = utc - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def utc_now_iso() -> str:
    """Now, as ISO 8601 in UTC with microseconds (``2025-01-15T10:00:00.123456+00:00``)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
