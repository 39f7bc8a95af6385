"""Where journal files live: the partition spec, one object, not string formatting scattered around.

Layout (hive style, so DuckDB, Spark and pyarrow.dataset prune partitions)::

    <root>/<tier>/model=<model>/date=<YYYY-MM-DD>/hour=<HH>/<file name>.parquet
    <root>/<tier>/model=<model>/date=<YYYY-MM-DD>/hour=all/<file name>.parquet   (a whole day)

Writers always write hour partitions. Compaction merges a finished day into the day partition
``hour=all`` (``PartitionKey(hour=None)``) so that one subject's day sits in one row group; use
:attr:`PartitionKey.end` (not ``start + 1 hour``) for the end of a partition's time range.

Tiers are ``hot`` (recent, for investigations) and ``cold`` (long retention).

Outcomes (labels and realised values that arrive after the decision, :mod:`serve_journal.outcomes`)
have their own append-only area, partitioned by the UTC day they were recorded
(:data:`OUTCOME_SPEC`)::

    <root>/outcomes/date=<YYYY-MM-DD>/<file name>.parquet
"""

from __future__ import annotations

import datetime as dt
import re
import urllib.parse
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

HOT = "hot"
COLD = "cold"
TIERS = (HOT, COLD)
PARQUET_SUFFIX = ".parquet"
DAY_HOUR = "all"
"""The ``hour=`` value of a day partition."""

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+\-]+$")


def escape_value(value: str) -> str:
    """Hive-escape a partition value so that ``/``, ``=`` and friends cannot change the path."""
    return urllib.parse.quote(value, safe="-_.+")


def unescape_value(value: str) -> str:
    """Inverse of :func:`escape_value`."""
    return urllib.parse.unquote(value)


@dataclass(frozen=True, order=True)
class PartitionKey:
    """One journal partition: a model and one UTC hour, or a whole UTC day (``hour=None``).

    Do not sort hour and day keys together (``None`` does not compare with ``int``); sort by
    :meth:`sort_key`.
    """

    model: str
    date: str  # YYYY-MM-DD
    hour: int | None

    def path(self, tier: str = HOT) -> str:
        """Relative directory of this partition in ``tier``."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
        hour = DAY_HOUR if self.hour is None else f"{self.hour:02d}"
        return f"{tier}/model={escape_value(self.model)}/date={self.date}/hour={hour}"

    @property
    def is_day(self) -> bool:
        """True for a day partition (``hour=all``)."""
        return self.hour is None

    @property
    def start(self) -> dt.datetime:
        """First instant of the partition (UTC)."""
        day = dt.date.fromisoformat(self.date)
        return dt.datetime(day.year, day.month, day.day, self.hour or 0, tzinfo=dt.UTC)

    @property
    def end(self) -> dt.datetime:
        """First instant after the partition (UTC): one hour, or one day for a day partition."""
        return self.start + (dt.timedelta(days=1) if self.hour is None else dt.timedelta(hours=1))

    def day(self) -> PartitionKey:
        """The day partition this partition's hour belongs to (itself for a day partition)."""
        return PartitionKey(self.model, self.date, None)

    def sort_key(self) -> tuple[str, str, int]:
        """Sort key that orders hour and day keys together (a day before its hours)."""
        return (self.model, self.date, -1 if self.hour is None else self.hour)


@dataclass(frozen=True)
class PartitionSpec:
    """Maps an entry's model and timestamp to its partition; parses partition paths back."""

    def key_for(self, model: str, ts: dt.datetime) -> PartitionKey:
        """Partition of an entry of ``model`` decided at ``ts`` (aware or UTC-naive)."""
        if ts.tzinfo is not None:
            ts = ts.astimezone(dt.UTC)
        return PartitionKey(model=model, date=ts.strftime("%Y-%m-%d"), hour=ts.hour)

    def key_for_micros(self, model: str, ts_us: int) -> PartitionKey:
        """Partition of an entry whose timestamp is given in microseconds since the epoch."""
        ts = dt.datetime.fromtimestamp(ts_us / 1_000_000, tz=dt.UTC)
        return self.key_for(model, ts)

    def parse(self, relative_dir: str) -> tuple[str, PartitionKey]:
        """Parse ``<tier>/model=../date=../hour=..`` (a file path below it is fine too);
        ``hour=all`` gives a day key (``hour=None``)."""
        parts = relative_dir.strip("/").split("/")
        if len(parts) < 4 or parts[0] not in TIERS:
            raise ValueError(f"not a journal partition path: {relative_dir!r}")
        fields = {}
        for part in parts[1:4]:
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"not a journal partition path: {relative_dir!r}")
            fields[name] = value
        try:
            hour = fields["hour"]
            key = PartitionKey(
                model=unescape_value(fields["model"]),
                date=fields["date"],
                hour=None if hour == DAY_HOUR else int(hour),
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"not a journal partition path: {relative_dir!r}") from exc
        return parts[0], key

    def file_path(self, key: PartitionKey, file_name: str, tier: str = HOT) -> str:
        """Relative path of a data file named ``file_name`` (without suffix) in ``key``."""
        if not _SAFE_NAME.match(file_name):
            raise ValueError(f"file name must match {_SAFE_NAME.pattern}, got {file_name!r}")
        return f"{key.path(tier)}/{file_name}{PARQUET_SUFFIX}"

    def glob(self, tier: str = HOT) -> str:
        """Relative glob matching every data file of a tier."""
        return f"{tier}/model=*/date=*/hour=*/*{PARQUET_SUFFIX}"


DEFAULT_SPEC = PartitionSpec()


OUTCOMES_AREA = "outcomes"
"""Top-level folder of the outcome partition (beside the ``hot`` and ``cold`` tiers)."""


@dataclass(frozen=True)
class OutcomePartitionSpec:
    """Where outcome files live: ``outcomes/date=<YYYY-MM-DD>/<name>.parquet``, the day being the
    UTC date the outcomes were recorded (not the decision's nor the outcome's own time), so a
    late label lands in a new file of a new day and no file is ever rewritten."""

    area: str = OUTCOMES_AREA

    @property
    def prefix(self) -> str:
        """Relative prefix of every outcome file (``outcomes/``)."""
        return f"{self.area}/"

    def date_for(self, recorded_at: dt.datetime) -> str:
        """The ``date=`` value of outcomes recorded at ``recorded_at`` (aware or UTC-naive)."""
        if recorded_at.tzinfo is not None:
            recorded_at = recorded_at.astimezone(dt.UTC)
        return recorded_at.strftime("%Y-%m-%d")

    def file_path(self, recorded_at: dt.datetime, file_name: str) -> str:
        """Relative path of an outcome file named ``file_name`` (without suffix)."""
        if not _SAFE_NAME.match(file_name):
            raise ValueError(f"file name must match {_SAFE_NAME.pattern}, got {file_name!r}")
        return f"{self.area}/date={self.date_for(recorded_at)}/{file_name}{PARQUET_SUFFIX}"

    def contains(self, path: str) -> bool:
        """Whether the relative ``path`` is an outcome data file's path."""
        parts = path.strip("/").split("/")
        return (len(parts) == 3 and parts[0] == self.area and parts[1].startswith("date=")
                and parts[2].endswith(PARQUET_SUFFIX))


OUTCOME_SPEC = OutcomePartitionSpec()


_US_PER_HOUR = 3_600_000_000


def split_by_partition(
    rows: pa.RecordBatch | pa.Table, spec: PartitionSpec = DEFAULT_SPEC,
) -> list[tuple[PartitionKey, pa.RecordBatch | pa.Table]]:
    """Group journal entries by their hour partition (``model_name``, UTC hour of ``ts``).

    Returns ``(key, rows of that partition)`` pairs in the order each partition first appears,
    rows in their original order; ``rows`` itself when it all belongs to one partition (the
    common case), nothing when it is empty.
    """
    if rows.num_rows == 0:
        return []
    ts = rows.column("ts").cast(pa.int64())
    # Floor division (pc.divide truncates toward zero): an instant before 1970 keeps its own hour.
    hours = pc.divide(pc.subtract(ts, pc.if_else(pc.less(ts, 0), _US_PER_HOUR - 1, 0)),
                      _US_PER_HOUR)
    models = rows.column("model_name")
    lo, hi = pc.min_max(hours).values()
    if lo == hi and pc.count_distinct(models).as_py() == 1:
        return [(spec.key_for_micros(models[0].as_py(), lo.as_py() * _US_PER_HOUR), rows)]
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (model, hour) in enumerate(zip(models.to_pylist(), hours.to_pylist(), strict=True)):
        groups.setdefault((model, hour), []).append(i)
    return [(spec.key_for_micros(model, hour * _US_PER_HOUR), rows.take(pa.array(indices, pa.int64())))
            for (model, hour), indices in groups.items()]
