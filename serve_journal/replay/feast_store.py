"""Replay through Feast: the features of a decision from Feast's point-in-time historical retrieval.

:class:`FeastFeatureStore` implements :class:`~serve_journal.replay.featurestore.FeatureStore` over
a Feast repository (the folder holding ``feature_store.yaml``). Every :meth:`~FeastFeatureStore.
get_as_of` call is **one** ``feast.FeatureStore.get_historical_features`` retrieval: the entity
dataframe carries one row per distinct (subject id, decision time) with ``event_timestamp`` set to
the decision time, so Feast's point-in-time join picks, per feature view, the latest row at or
before it (within the view's TTL). With ``created_cutoff`` (the default) a row whose
``created_timestamp_column`` is later than the decision is ignored too: a backfill written after
the decision is not what the model saw.

Feast returns typed columns through pandas, where an integer column with a gap becomes floats.
The adapter rebuilds exactly the mapping the model received: keys are the model's feature names,
in the model's order, and each value is converted by the Feast type declared in the feature
view's schema (``Int64`` -> ``int``, ``Float64`` -> ``float``, ``Bool`` -> ``bool``, ``String``
-> ``str``, ``Array`` of those -> ``list``), so its canonical encoding is the one the replica
hashed. A position with no row in any requested view (or with every feature null) is ``None``:
replay calls the entry ``missing``.

Feast is optional (``pip install 'serve-journal[feast]'``) and imported on first use. The adapter
pickles as its settings only; each Ray worker opens the repository itself. Errors from the
retrieval never carry a feature value or a subject id: they are replaced by a
:class:`~serve_journal.errors.ReplayDataError` naming the stage and the exception's type.
See docs/replay.md, "Feast".
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.errors import ConfigError, ReplayDataError
from serve_journal.replay.featurestore import Timestamp, _read_failed, _to_micros

__all__ = ["FeastFeatureStore", "import_feast"]

_POSITION = "__serve_journal_position"
"""The entity dataframe's column that carries each row's place in the request back through Feast
(Feast returns the rows in another order and drops those with no feature row at all)."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def import_feast() -> Any:
    """The ``feast`` module; a :class:`ConfigError` with the install hint when it is missing."""
    try:
        import feast  # inside: optional, and it takes seconds to import
    except ImportError as exc:
        raise ConfigError("the Feast feature store needs Feast: pip install "
                          "'serve-journal[feast]'") from exc
    return feast


def _converter(kind: Any, feature: str) -> Callable[[Any], Any]:
    """The function turning a value Feast returned into the Python type ``kind`` declares."""
    from feast.types import Array, PrimitiveFeastType  # inside: feast is optional

    if isinstance(kind, Array):
        inner = _converter(kind.base_type, feature)
        return lambda value: [None if _is_null(v) else inner(v) for v in list(value)]
    scalar: dict[Any, Callable[[Any], Any]] = {
        PrimitiveFeastType.INT32: int, PrimitiveFeastType.INT64: int,
        PrimitiveFeastType.FLOAT32: float, PrimitiveFeastType.FLOAT64: float,
        PrimitiveFeastType.BOOL: bool, PrimitiveFeastType.STRING: str,
        PrimitiveFeastType.BYTES: bytes,
    }
    convert = scalar.get(kind)
    if convert is None:
        raise ConfigError(f"Feast feature {feature!r} has type {kind}; replay can rebuild Int32, "
                          "Int64, Float32, Float64, Bool, String, Bytes and Array of those")
    return convert


def _is_null(value: Any) -> bool:
    """None, NaN, pandas NA/NaT: what a gap in a Feast result column looks like."""
    import pandas as pd  # inside: a dependency of Feast, not of serve_journal

    if value is None:
        return True
    if isinstance(value, list | tuple | bytes | str) or getattr(value, "ndim", 0):
        return False
    return bool(pd.isna(value))


@dataclass(frozen=True)
class _Plan:
    """What the registry says about the requested features, resolved once per process."""

    refs: tuple[str, ...]
    names: tuple[str, ...]
    columns: tuple[str, ...]
    converters: tuple[Callable[[Any], Any], ...]
    full_names: bool
    join_key: str
    entity_type: Callable[[str], Any]
    views: tuple[Any, ...]


class FeastFeatureStore:
    """A :class:`~serve_journal.replay.featurestore.FeatureStore` backed by a Feast repository.

    ``repo_path`` is the folder holding ``feature_store.yaml``. The features to fetch are, in the
    model's order, either ``features`` (references ``"view:feature"``), the features of the
    feature service ``feature_service``, or, when neither is given, ``feature_names`` looked up
    in the registry (each name must belong to exactly one feature view). ``feature_names`` are the
    names the model received (default: the feature part of each reference). Every view must be
    keyed by one join key, the subject id (string or integer); ``join_key`` names it when the
    views have several entities. ``created_cutoff`` ignores rows created after the decision
    (Feast's ``filter_by_created_timestamp``). ``max_rows`` splits a very large request into
    several retrievals of at most that many distinct (subject, time) rows.
    """

    def __init__(self, repo_path: str | os.PathLike[str], *,
                 features: Sequence[str] | None = None, feature_service: str | None = None,
                 feature_names: Sequence[str] | None = None, join_key: str | None = None,
                 created_cutoff: bool = True, max_rows: int = 1_000_000) -> None:
        if features is not None and feature_service is not None:
            raise ValueError("give the features either as references (features=) or as a "
                             "feature service (feature_service=), not both")
        if features is not None:
            features = tuple(features)
            if not features or not all(isinstance(r, str) and r.count(":") == 1 and
                                       all(r.split(":")) for r in features):
                raise ValueError(f"features must be Feast references 'view:feature', got "
                                 f"{list(features)!r}")
        if feature_names is not None:
            feature_names = tuple(feature_names)
            if not feature_names or not all(isinstance(n, str) and n for n in feature_names):
                raise ValueError("feature_names must be the model's input names, in order")
            if features is not None and len(features) != len(feature_names):
                raise ValueError(f"feature_names must name each of the {len(features)} "
                                 f"features, got {len(feature_names)} names")
        if features is None and feature_service is None and feature_names is None:
            raise ValueError("name the features to fetch: features=['view:feature', ...], "
                             "feature_service='name' or feature_names=[model input names]")
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
        self.repo_path = os.path.abspath(os.fspath(repo_path))
        self.features = features
        self.feature_service = feature_service
        self.feature_names = feature_names
        self.join_key = join_key
        self.created_cutoff = bool(created_cutoff)
        self.max_rows = max_rows
        self.retrievals = 0
        """How many ``get_historical_features`` calls this process made (one per batch)."""
        self._lock = threading.RLock()
        self._store: Any = None
        self._plan: _Plan | None = None

    def __repr__(self) -> str:
        return f"FeastFeatureStore({self.repo_path!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.repo_path, self._settings()))

    def _settings(self) -> dict[str, Any]:
        return {"features": self.features, "feature_service": self.feature_service,
                "feature_names": self.feature_names, "join_key": self.join_key,
                "created_cutoff": self.created_cutoff, "max_rows": self.max_rows}

    # -- the repository ------------------------------------------------------------------------

    def feast_store(self) -> Any:
        """The ``feast.FeatureStore`` of ``repo_path`` (opened once per process)."""
        with self._lock:
            if self._store is None:
                feast = import_feast()
                if not os.path.isfile(os.path.join(self.repo_path, "feature_store.yaml")):
                    raise ConfigError(f"{self.repo_path} is not a Feast repository: it has no "
                                      "feature_store.yaml")
                self._store = feast.FeatureStore(repo_path=self.repo_path)
            return self._store

    def plan(self) -> _Plan:
        """The feature references, model names, types and join key (resolved once)."""
        with self._lock:
            if self._plan is None:
                self._plan = self._resolve()
            return self._plan

    def _resolve(self) -> _Plan:
        store = self.feast_store()
        views = {v.name: v for v in store.list_feature_views()}
        if self.feature_service is not None:
            service = store.get_feature_service(self.feature_service)
            refs = tuple(f"{p.name_to_use()}:{f.name}" for p in service.feature_view_projections
                         for f in p.features)
        elif self.features is not None:
            refs = self.features
        else:
            found = []
            for name in self.feature_names or ():
                owners = sorted(v for v, view in views.items()
                                if any(f.name == name for f in view.features))
                if len(owners) != 1:
                    where = f"in views {owners}" if owners else "in no feature view"
                    raise ConfigError(f"model feature {name!r} is {where} of the Feast registry; "
                                      "pass the references explicitly (features=['view:feature'])")
                found.append(f"{owners[0]}:{name}")
            refs = tuple(found)
        names = self.feature_names or tuple(r.split(":")[1] for r in refs)
        if len(names) != len(refs):
            raise ConfigError(f"feature_names names {len(names)} features, the feature service "
                              f"{self.feature_service!r} has {len(refs)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"the model's feature names repeat: {list(names)!r}")
        used: dict[str, Any] = {}
        converters = []
        for ref in refs:
            view_name, feature = ref.split(":")
            view = views.get(view_name)
            if view is None:
                raise ConfigError(f"Feast feature view {view_name!r} is not in the registry of "
                                  f"{self.repo_path}; it has {sorted(views)}")
            field = next((f for f in view.features if f.name == feature), None)
            if field is None:
                raise ConfigError(f"Feast feature view {view_name!r} has no feature {feature!r}; "
                                  f"it has {[f.name for f in view.features]}")
            used[view_name] = view
            converters.append(_converter(field.dtype, ref))
        join_key, entity_type = self._join_key(list(used.values()))
        # Two views may both hold a feature of one name: then Feast prefixes the columns.
        short = [r.split(":")[1] for r in refs]
        full = len(set(short)) != len(short)
        columns = tuple(r.replace(":", "__") if full else s for r, s in zip(refs, short, strict=True))
        return _Plan(refs, tuple(names), columns, tuple(converters), full, join_key, entity_type,
                     tuple(used.values()))

    def _join_key(self, views: list[Any]) -> tuple[str, Callable[[str], Any]]:
        """The one join key every view is keyed by (the subject id) and the type to send it as."""
        from feast.types import PrimitiveFeastType  # inside: feast is optional

        keys: dict[str, Any] = {}
        for view in views:
            columns = {c.name: c.dtype for c in view.entity_columns}
            if self.join_key is not None:
                if self.join_key not in columns:
                    raise ConfigError(f"Feast feature view {view.name!r} is not keyed by "
                                      f"{self.join_key!r}; its join keys are {sorted(columns)}")
                keys[self.join_key] = columns[self.join_key]
            elif len(columns) != 1:
                raise ConfigError(f"Feast feature view {view.name!r} has join keys "
                                  f"{sorted(columns)}: name the subject id's with join_key=")
            else:
                keys.update(columns)
        if len(keys) != 1:
            raise ConfigError(f"the requested Feast feature views are keyed by {sorted(keys)}; "
                              "replay needs one join key, the subject id")
        [(key, kind)] = keys.items()
        if kind in (PrimitiveFeastType.INT32, PrimitiveFeastType.INT64):
            return key, int
        if kind == PrimitiveFeastType.STRING:
            return key, str
        raise ConfigError(f"Feast join key {key!r} has type {kind}; the subject id must be a "
                          "String or an integer")

    # -- the FeatureStore protocol -------------------------------------------------------------

    def get_as_of(self, entity_ids: Sequence[str], timestamps: Sequence[Timestamp]
                  ) -> list[dict[str, Any] | None]:
        """Per position: the model's feature mapping as of the timestamp, else ``None``.

        One Feast retrieval per call (per ``max_rows`` distinct (subject, time) pairs).
        """
        if len(entity_ids) != len(timestamps):
            raise ValueError(f"entity_ids and timestamps must have the same length, got "
                             f"{len(entity_ids)} and {len(timestamps)}")
        micros = [_to_micros(t, f"timestamps[{i}]") for i, t in enumerate(timestamps)]
        if not micros:
            return []
        plan = self.plan()
        # Feast keeps one result row per (join key, event_timestamp): ask each pair once.
        pairs: dict[tuple[str, int], int] = {}
        slots = [pairs.setdefault((e, t), len(pairs)) for e, t in zip(entity_ids, micros,
                                                                      strict=True)]
        ordered = list(pairs)
        found: list[dict[str, Any] | None] = []
        for start in range(0, len(ordered), self.max_rows):
            found.extend(self._retrieve(plan, ordered[start:start + self.max_rows]))
        return [None if found[s] is None else dict(found[s]) for s in slots]  # type: ignore[arg-type]

    def _retrieve(self, plan: _Plan, pairs: list[tuple[str, int]]) -> list[dict[str, Any] | None]:
        """One ``get_historical_features`` call for ``pairs``; per pair its mapping or None."""
        import pandas as pd  # inside: a dependency of Feast, not of serve_journal

        try:
            keys = [plan.entity_type(e) for e, _ in pairs]
        except ValueError:
            raise ReplayDataError(f"an entity id is not a valid value of the integer Feast join "
                                  f"key {plan.join_key!r}") from None
        entity_df = pd.DataFrame({
            plan.join_key: keys,
            "event_timestamp": pd.to_datetime([t for _, t in pairs], unit="us", utc=True),
            _POSITION: range(len(pairs)),
        })
        store = self.feast_store()
        failed: BaseException | None = None
        try:
            job = store.get_historical_features(
                entity_df=entity_df, features=list(plan.refs),
                full_feature_names=plan.full_names,
                filter_by_created_timestamp=self.created_cutoff)
            frame = job.to_df()
        except Exception as exc:  # noqa: BLE001 - re-raised below without its message
            failed = exc
        if failed is not None:
            raise _read_failed("Feast historical retrieval", failed)
        self.retrievals += 1
        out: list[dict[str, Any] | None] = [None] * len(pairs)
        positions = frame[_POSITION].tolist()
        values = [frame[c].tolist() for c in plan.columns]
        for row, position in enumerate(positions):
            raw = [column[row] for column in values]
            if all(_is_null(v) for v in raw):
                continue  # no feature row at or before the time: missing, as in the Parquet store
            mapping: dict[str, Any] = {}
            for name, value, convert in zip(plan.names, raw, plan.converters, strict=True):
                mapping[name] = None if _is_null(value) else _convert(convert, value, name)
            out[int(position)] = mapping
        return out

    def entity_ids(self) -> list[str]:
        """Every subject id with at least one row in a requested view's offline source, sorted."""
        from feast.infra.offline_stores.offline_utils import (  # inside: feast is optional
            get_offline_store_from_config,
        )

        plan = self.plan()
        store = self.feast_store()
        ids: set[str] = set()
        failed: BaseException | None = None
        try:
            offline = get_offline_store_from_config(store.config.offline_store)
            for view in plan.views:
                source = view.batch_source
                column = _source_column(source, plan.join_key)
                job = offline.pull_all_from_table_or_query(
                    config=store.config, data_source=source, join_key_columns=[column],
                    feature_name_columns=[], timestamp_field=source.timestamp_field,
                    created_timestamp_column=source.created_timestamp_column or None,
                    start_date=_EPOCH, end_date=dt.datetime.now(dt.UTC))
                ids.update(str(v) for v in job.to_arrow().column(column).unique().to_pylist()
                           if v is not None)
        except Exception as exc:  # noqa: BLE001 - re-raised below without its message
            failed = exc
        if failed is not None:
            raise _read_failed("Feast entity ids", failed)
        return sorted(ids)

    def purge(self, subject: str) -> int:
        """Delete every row of ``subject`` from the requested views' local Parquet sources.

        Returns the rows removed. Only ``FileSource`` views on local files can be rewritten here;
        any other source raises :class:`ConfigError` naming it (delete the rows in that store).
        Rows already materialized to the online store are not touched: materialize again or let
        the view's TTL expire them.
        """
        if not isinstance(subject, str) or not subject:
            raise TypeError("subject must be a non-empty string (the subject id)")
        plan = self.plan()
        try:
            key = plan.entity_type(subject)
        except ValueError:
            return 0  # not a value of an integer key: it has no rows
        removed = 0
        for path, column in self._local_files(plan):
            table = pq.read_table(path)
            kept = table.filter(pc.invert(pc.fill_null(pc.equal(table[column], key), False)))
            if kept.num_rows == table.num_rows:
                continue
            removed += table.num_rows - kept.num_rows
            tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}.parquet")
            pq.write_table(kept, tmp)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        return removed

    def _local_files(self, plan: _Plan) -> list[tuple[str, str]]:
        """(path, join key column) of every local Parquet file behind the requested views."""
        from feast import FileSource  # inside: feast is optional

        out: dict[str, str] = {}
        for view in plan.views:
            source = view.batch_source
            path = getattr(source, "path", None) if isinstance(source, FileSource) else None
            if path and not os.path.isabs(path) and "://" not in path:
                path = os.path.join(self.repo_path, path)
            if not path or "://" in path or not os.path.exists(path):
                raise ConfigError(f"Feast feature view {view.name!r} reads "
                                  f"{type(source).__name__} {path or source.name!r}, which this "
                                  "adapter cannot rewrite: delete the subject's rows there")
            column = _source_column(source, plan.join_key)
            if os.path.isdir(path):
                for folder, _, names in os.walk(path):
                    for name in sorted(names):
                        if name.endswith(".parquet") and not name.startswith("."):
                            out[os.path.join(folder, name)] = column
            else:
                out[path] = column
        return sorted(out.items())


def _convert(convert: Callable[[Any], Any], value: Any, name: str) -> Any:
    try:
        return convert(value)
    except (TypeError, ValueError):
        raise ReplayDataError(f"Feast returned feature {name!r} as a {type(value).__name__}, "
                              "which does not convert to its declared type") from None


def _source_column(source: Any, join_key: str) -> str:
    """The source's column that holds ``join_key`` (the source may rename it)."""
    mapping = getattr(source, "field_mapping", None) or {}
    return next((src for src, dest in mapping.items() if dest == join_key), join_key)


def _rebuild(repo_path: str, settings: dict[str, Any]) -> FeastFeatureStore:
    return FeastFeatureStore(repo_path, **settings)
