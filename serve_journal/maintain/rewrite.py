"""Rewriting a set of journal files into sorted files in bounded memory (compaction, lifecycle).

A finished day can hold tens of millions of entries, far more than fit in memory. A rewrite
therefore never holds the day as one table:

1. each input is read from the storage once, checked against its manifest record, and its
   checked bytes are spooled to a private temporary folder (journal files hold tokens and HMACs,
   never raw values);
2. DuckDB sorts the spooled files by subject token then time (``fileformat.sort_for_lookup``'s
   order; ties keep the input order, as that stable sort does) under a ``memory_limit``. A day
   whose estimated size in memory does not fit DuckDB's share of the limit is sorted in K range
   passes (:meth:`RewriteWorkspace.passes`): K-1 boundary subject tokens are taken from a
   reservoir sample of that column, each pass sorts the rows of one token range with the same
   ORDER BY (filtered from the inputs while there are few ranges; from :data:`_SCATTER_FROM`
   ranges on, one streaming scan first scatters every row, with its input position, into a
   spill file of its range). Equal tokens never straddle two ranges and NULL tokens are in the
   last one, so the passes' outputs, one after the other, are the one sort's output byte for byte. One
   token whose entries alone exceed the limit cannot be split: it is refused
   (:class:`~serve_journal.errors.RewriteMemoryError`), nothing is written. Inputs already in
   that order (a day compacted into consecutive files, moved to the cold tier) are not sorted
   at all: :func:`in_lookup_order` reads their two key columns, and the files are streamed
   as they are, which is what the sort would give;
3. the sorted rows stream into :class:`~serve_journal.fileformat.SortedParquetWriter` a row
   group at a time, split into files of at most ``max_rows_per_file`` rows;
4. each written file is summarized by streaming it back 64k rows at a time
   (:class:`FileSummary`: row count, time range, sequence ranges, Merkle root over its rows in
   file order), which is what its manifest record promises.

The entries' fingerprint (:meth:`RewriteWorkspace.fingerprint`) is taken the same way: DuckDB
sorts the files into the fingerprint's order (entry id ``(producer_id, seq)``, then input order)
under the limit, in range passes of entry ids when the day is too big, and the sorted rows
stream into one Arrow IPC spill file per column, hashed a chunk at a time. Files are copied to
and from the storage in 8 MiB chunks. Peak memory is the interpreter and its libraries
(~240 MiB), DuckDB's share of the limit (one pass's rows, its readers' row groups) and one row
group being written; it does not grow with the day. Nor does the work per entry once a sort
has :data:`_SCATTER_FROM` ranges or more: the spooled inputs are then read by the boundary
sample and one scatter, and each range's spill file once, however many ranges (before, every
pass read every input: 50M entries took 52 s per million against 27 at 10M). See
docs/benchmarks.md, "Compaction and lifecycle in bounded memory".
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serve_journal.errors import RewriteMemoryError, UnrecordedInputError
from serve_journal.fileformat import (
    DICTIONARY_IF_FEW,
    SORT_KEYS,
    ParquetOptions,
    SortedParquetWriter,
)
from serve_journal.integrity.fingerprint import (
    Fingerprint,
    fingerprint_local_files,
    fingerprint_ordered,
)
from serve_journal.integrity.summary import BATCH_ROWS
from serve_journal.schema import ENTRY_SCHEMA, conform_entries, restore_output_scores
from serve_journal.storage import JournalStorage

DEFAULT_MEMORY_LIMIT = 2 * 1024**3
"""Bytes a compaction or lifecycle run may use for sorting (``--memory-limit``,
``SERVE_JOURNAL_MEMORY_LIMIT``): 2 GiB."""
MIN_MEMORY_LIMIT = 64 * 1024**2
MEMORY_LIMIT_ENV = "SERVE_JOURNAL_MEMORY_LIMIT"

_SORT_SHARE = 0.45
"""Share of the limit given to DuckDB's sort (which overshoots it by up to a quarter); the rest
holds the row group being written (:data:`_GROUP_SHARE`), the interpreter and its libraries
(~240 MiB) and the fingerprint's chunk of one column."""
_GROUP_SHARE = 0.28
"""Share of the limit one row group may take in Arrow form before it is written (a cold file's
1M-row groups are ~0.5 GiB of Arrow; under a smaller limit a rewrite writes smaller groups)."""
_BATCH_ROWS = BATCH_ROWS
_PASS_SHARE = 0.35
"""Arrow bytes of the rows one sort pass may take, as a share of what DuckDB's part of the limit
leaves after its readers (:data:`_SORT_FIXED` and the compressed bytes of the largest row group
per thread: DuckDB reads a column chunk whole); a day estimated larger is sorted in several
passes, one range of the sort key each (:meth:`RewriteWorkspace._ranges`). DuckDB's rows take
about twice their Arrow bytes: at 0.7 a 10M-entry lifecycle move at 2 GiB peaked at 2.15 GiB
(~620 MB passes beside a 1M-row cold row group); 200k bench entries (112 MB of Arrow) need
about 4 passes at 128 MiB and 8 at 96 MiB."""
_SORT_FIXED = 24 * 1024**2
"""DuckDB's own memory in a sort besides the rows and the row groups being read."""
_SCATTER_FROM = 4
"""Ranges from which a sort scatters the rows into a spill file per range in one scan rather
than filtering every input once per range (:meth:`RewriteWorkspace._partitions`). Measured on
2 cores, 2M entries sorted by subject token: 8 ranges took 16.8 s filtered and 11.8 s
scattered, 32 ranges 50.1 against 16.4, one pass 7.0 (the scatter then wrote Parquet; it now
writes Arrow IPC, cheaper still)."""
_SAMPLE_ROWS = 20_000
"""Sort keys sampled (reservoir) to choose the passes' range boundaries."""
_FORCED_PASSES: int | None = None
"""Tests only: sort in this many passes whatever the size (``None``: from the estimate)."""

log = logging.getLogger(__name__)
"""Each phase of a rewrite at DEBUG (what a memory or time profile lines up against)."""

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_memory_limit(value: int | str | None) -> int:
    """Bytes from ``value`` (``2147483648``, ``"2GiB"``, ``"512MB"``); ``None``: the
    ``SERVE_JOURNAL_MEMORY_LIMIT`` environment variable, else :data:`DEFAULT_MEMORY_LIMIT`."""
    if value is None:
        value = os.environ.get(MEMORY_LIMIT_ENV) or DEFAULT_MEMORY_LIMIT
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"memory limit must be bytes or a size like '2GiB' or '512MB', "
                             f"got {value!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_MEMORY_LIMIT:
        raise ValueError(f"memory limit must be at least {MIN_MEMORY_LIMIT} bytes (64MiB), "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class SpooledFile:
    """A journal file checked against its record and copied to a local path."""

    path: str
    """Its path in the storage."""
    local: str
    size: int
    sha256: str


_PREFIX = "serve-journal-rewrite-"


def remove_stale_workspaces(temp_dir: str | None = None) -> list[str]:
    """Remove the workspaces of rewrite processes that died (``kill -9`` skips their cleanup:
    spooled copies and spill files would pile up); returns the folders removed."""
    parent = temp_dir or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        match = re.fullmatch(re.escape(_PREFIX) + r"(\d+)-.+", name)
        if not match or _alive(int(match.group(1))):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        removed.append(os.path.join(parent, name))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RewriteWorkspace:
    """A private temporary folder holding spooled inputs, DuckDB's spill files and new files
    before they are stored; removed on exit (use as a context manager)."""

    def __init__(self, memory_limit: int | str | None = None, temp_dir: str | None = None) -> None:
        self.memory_limit = parse_memory_limit(memory_limit)
        remove_stale_workspaces(temp_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{_PREFIX}{os.getpid()}-", dir=temp_dir)
        self.root = self._tmp.name
        for sub in ("in", "out", "spill"):
            os.makedirs(os.path.join(self.root, sub))

    def __enter__(self) -> RewriteWorkspace:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()

    def out_path(self, name: str) -> str:
        """Where the new file ``name`` is written before it is stored."""
        return os.path.join(self.root, "out", f"{name}.parquet")

    def spool(self, storage: JournalStorage, paths: Sequence[str],
              recorded: dict | None = None) -> list[SpooledFile]:
        """Copy ``paths`` (in this order) to the workspace, one file in memory at a time. With
        ``recorded`` (``{path: {sha256}}``), each file's bytes must match one of its manifest
        records (:class:`UnrecordedInputError` otherwise): the copy is of the bytes checked."""
        out = []
        log.debug("spool %d files", len(paths))
        for i, path in enumerate(paths):
            local = os.path.join(self.root, "in", f"{i:08d}.parquet")
            copied = storage.copy_to_local(path, local)
            if recorded is not None and copied.sha256 not in recorded.get(path, ()):
                raise UnrecordedInputError(
                    f"input {path} does not match its manifest record (altered, or never "
                    "recorded); run `serve-journal verify`; it was not rewritten"
                )
            out.append(SpooledFile(path, local, copied.size, copied.sha256))
        return out

    def fetch(self, storage: JournalStorage, path: str, name: str) -> SpooledFile:
        """Copy the stored file ``path`` to :meth:`out_path` ``(name)`` (an earlier run wrote it)."""
        local = self.out_path(name)
        with contextlib.suppress(FileNotFoundError):
            os.remove(local)  # this run's own copy: the stored bytes are what counts
        copied = storage.copy_to_local(path, local)
        return SpooledFile(path, local, copied.size, copied.sha256)

    # -- sorting ---------------------------------------------------------------------------

    def _out_of_memory(self, exc: BaseException, rows: int) -> RewriteMemoryError | None:
        """A :class:`RewriteMemoryError` for DuckDB's out-of-memory failure (raised by DuckDB, or
        by the Arrow reader it feeds as an ``OSError``), else ``None``."""
        if "Out of Memory Error" not in str(exc):
            return None
        return RewriteMemoryError(
            f"sorting {rows:,} entries needs more memory than the limit of "
            f"{self.memory_limit / 1024**2:,.0f} MiB allows (DuckDB gets "
            f"{_SORT_SHARE:.0%} of it: a day is sorted in passes of one key range each, but one "
            "key's entries, or DuckDB's readers, did not fit); nothing was written: raise "
            "--memory-limit (SERVE_JOURNAL_MEMORY_LIMIT)")

    def _connect(self):  # -> duckdb.DuckDBPyConnection
        import duckdb  # inside: seconds of start-up, only maintenance sorts with it

        con = duckdb.connect(config={
            "memory_limit": f"{int(self.memory_limit * _SORT_SHARE) // 1024**2}MiB",
            "temp_directory": os.path.join(self.root, "spill"),
            "threads": self._threads(),
            "preserve_insertion_order": False,
        })
        con.execute("SET enable_progress_bar = false")  # it would print to our stdout
        return con

    def _sql(self, con, rows: int, query: str) -> None:
        """Run ``query``; DuckDB running out of memory is a :class:`RewriteMemoryError`."""
        self._fetch(con, rows, query, fetch=False)

    def _fetch(self, con, rows: int, query: str, fetch: bool = True) -> list[tuple]:
        """Run ``query`` and return its rows; out of memory is a :class:`RewriteMemoryError`."""
        import duckdb  # inside: as in _connect (its exception class only)

        try:
            result = con.execute(query)
            return result.fetchall() if fetch else []
        except duckdb.OutOfMemoryException as exc:
            raise self._out_of_memory(exc, rows) or exc from None

    def _reader(self, con, rows: int, query: str) -> Iterator[pa.RecordBatch]:
        """The rows of ``query`` in batches of at most 64k rows; out of memory (raised by DuckDB,
        or by the Arrow stream it feeds as an ``OSError``) is a :class:`RewriteMemoryError`."""
        import duckdb  # inside: as in _connect (its exception class only)

        try:
            reader = con.sql(query).to_arrow_reader(_BATCH_ROWS)
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    return
                yield batch
        except (duckdb.OutOfMemoryException, OSError) as exc:
            raise self._out_of_memory(exc, rows) or exc from None

    @staticmethod
    def _source(files: Sequence[SpooledFile] | Sequence[str]) -> str:
        # Workspace paths are ours (digits under a temp folder): no glob character to escape.
        listed = ", ".join(_literal(f if isinstance(f, str) else f.local) for f in files)
        # hive_partitioning off: a path's "key=value" folders are not columns of its entries
        return (f"read_parquet([{listed}], union_by_name = true, filename = true, "
                "file_row_number = true, hive_partitioning = false)")

    def passes(self, paths: Sequence[str], rows: int) -> int:
        """Passes a sort of ``rows`` entries of ``paths`` takes: one while their estimated size
        in memory (Arrow bytes per row of a sample row group, times ``rows``) fits
        :data:`_PASS_SHARE` of DuckDB's part of the limit, else enough that each pass's range
        does."""
        if _FORCED_PASSES is not None:
            return _FORCED_PASSES
        reading = max((sum(group.column(i).total_compressed_size
                            for i in range(group.num_columns))
                        for path in paths for group in _row_groups(path)), default=0)
        budget = self.memory_limit * _SORT_SHARE - _SORT_FIXED - self._threads() * reading
        if budget <= 0:  # not even a pass of one row fits: DuckDB's refusal says so
            return 1
        return max(1, math.ceil(rows * _bytes_per_row(paths) / (budget * _PASS_SHARE)))

    def _threads(self) -> int:
        """DuckDB's threads: one under 1 GiB (each thread reads and sorts a share of its own)."""
        return 1 if self.memory_limit < 1024**3 else max(1, min(os.cpu_count() or 1, 2))

    def _bounds(self, con, source: str, keys: Sequence[str], passes: int,
                rows: int) -> list[tuple]:
        """At most ``passes - 1`` increasing boundary keys splitting the rows of ``source`` into
        consecutive ranges of ``keys`` (in ``ORDER BY keys ASC NULLS LAST`` order); none for one
        pass, or when every sampled key is the same (one key is never split).

        The boundaries are keys of a reservoir sample of the key columns, sorted by DuckDB;
        a range holds every row whose key is at or after its lower boundary and before its upper
        one, so equal keys never straddle two ranges (ties keep their input order) and rows with
        a NULL key part fall where the ORDER BY puts them (NULL keys: the last range)."""
        if passes <= 1:
            return []
        columns = ", ".join(f'"{k}"' for k in keys)
        present = " AND ".join(f'"{k}" IS NOT NULL' for k in keys)
        sample = self._fetch(con, rows,
            f"SELECT {columns} FROM (SELECT {columns} FROM {source} USING SAMPLE "
            f"reservoir({_SAMPLE_ROWS} ROWS) REPEATABLE (17)) WHERE {present} ORDER BY {columns}")
        bounds: list[tuple] = []
        for i in range(1, passes):
            key = tuple(sample[i * len(sample) // passes]) if sample else None
            if key is not None and (not bounds or key != bounds[-1]) and key != tuple(sample[0]):
                bounds.append(key)
        return bounds

    def _ranges(self, con, source: str, keys: Sequence[str], passes: int, rows: int) -> list[str]:
        """SQL conditions selecting the rows of each range of :meth:`_bounds` (``[""]``: one
        range, every row)."""
        return _wheres(keys, self._bounds(con, source, keys, passes, rows))

    def _partitions(self, con, paths: Sequence[str], keys: Sequence[str],
                    rows: int) -> Iterator[str]:
        """The rows of the local files ``paths`` as SQL sources of one key range each, in key
        order, every row with its input position (``__file``: its file's place in ``paths``,
        ``__row``: its row in that file), so each range sorts alone into the order one sort
        of all rows gives (ties by input position).

        One range (the day fits one pass, :meth:`passes`) is the files themselves. Fewer than
        :data:`_SCATTER_FROM` ranges are the files filtered to each range (each range costs one
        more read of every input: ~0.7 us per entry on 2 cores). From :data:`_SCATTER_FROM`
        ranges, one scan scatters the rows into a spill file per range (:meth:`_scatter`, ~1.7
        us per entry) and each range reads only its own file, so the work per entry stops
        growing with the day (filtering every input per range made a 50M-entry day take 52 s
        per million entries against 27 at 10M)."""
        source = self._source(paths)
        listed = ", ".join(_literal(p) for p in paths)
        positioned = (f"(SELECT * EXCLUDE (filename, file_row_number), "
                      f"list_position([{listed}], filename) AS __file, "
                      f"file_row_number AS __row FROM {source})")
        bounds = self._bounds(con, source, keys, self.passes(paths, rows), rows)
        if not bounds:
            log.debug("sort %d rows by %s in one pass", rows, ", ".join(keys))
            yield positioned
            return
        if len(bounds) + 1 < _SCATTER_FROM:
            for i, where in enumerate(_wheres(keys, bounds)):
                log.debug("sort range %d of %d (filtered)", i + 1, len(bounds) + 1)
                yield f"(SELECT * FROM {positioned} {where})"
            return
        log.debug("scatter %d rows into %d ranges of %s", rows, len(bounds) + 1, ", ".join(keys))
        parts = self._scatter(con, positioned, keys, bounds, rows)
        try:
            for i, part in enumerate(parts):
                if part is None:
                    continue
                log.debug("sort range %d of %d", i + 1, len(parts))
                name = f"range_{uuid.uuid4().hex}"
                with pa.OSFile(part) as f:
                    con.register(name, pa.ipc.open_stream(f))  # scanned once, by the sort
                    try:
                        yield name
                    finally:
                        con.unregister(name)
                os.remove(part)
        finally:
            for part in parts:
                if part is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(part)

    def _scatter(self, con, source: str, keys: Sequence[str], bounds: Sequence[tuple],
                 rows: int) -> list[str | None]:
        """Write the rows of ``source`` to one spill file per key range of ``bounds`` (``None``
        for a range without rows) in one streaming scan. DuckDB computes each row's range (a
        binary search over the boundaries, :func:`_range_of`); each batch of 64k rows is put in
        range order with one ``take`` and its slices are appended to their ranges' files as
        Arrow IPC record batches (LZ4), so nothing waits in memory. The spill files hold what
        the journal files hold: tokens and HMACs, never raw values."""
        tag = uuid.uuid4().hex
        paths = [os.path.join(self.root, "spill", f"range-{tag}-{i:05d}.arrow")
                 for i in range(len(bounds) + 1)]
        options = pa.ipc.IpcWriteOptions(compression="lz4")
        with contextlib.ExitStack() as stack:
            writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
            try:
                query = f"SELECT *, {_range_of(keys, bounds)} AS __range FROM {source}"
                for batch in self._reader(con, rows, query):
                    ranges = batch.column(batch.num_columns - 1).to_numpy(zero_copy_only=False)
                    order = np.argsort(ranges, kind="stable")
                    values, starts = np.unique(ranges[order], return_index=True)
                    batch = batch.drop_columns(["__range"]).take(pa.array(order))
                    ends = [*starts[1:], len(order)]
                    for value, start, end in zip(values.tolist(), starts, ends, strict=True):
                        if value not in writers:
                            sink = stack.enter_context(pa.OSFile(paths[value], "wb"))
                            writers[value] = stack.enter_context(
                                pa.ipc.new_stream(sink, batch.schema, options=options))
                        writers[value].write_batch(batch.slice(start, end - start))
            except BaseException:
                stack.close()
                for path in paths:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                raise
        return [path if i in writers else None for i, path in enumerate(paths)]

    def distinct_counts(self, files: Sequence[SpooledFile], columns: Sequence[str]) -> dict[str, int]:
        """Estimated distinct values of ``columns`` over ``files`` (HyperLogLog: bloom filter
        sizes only, so an estimate is enough and memory stays small)."""
        if not files or not columns:
            return {}
        con = self._connect()
        try:
            top = [c for c in columns if "." not in c]
            out: dict[str, int] = {}
            if top:
                select = ", ".join(f'approx_count_distinct("{c}")' for c in top)
                row = con.execute(f"SELECT {select} FROM {self._source(files)}").fetchone()
                out.update({c: int(v or 0) for c, v in zip(top, row, strict=True)})
            for column in columns:
                if "." in column:  # a list's struct field, "outputs.list.element.score"
                    name, _, _, field = column.split(".")
                    row = con.execute(
                        f'SELECT approx_count_distinct(o."{field}") FROM '
                        f'(SELECT unnest("{name}") AS o FROM {self._source(files)})').fetchone()
                    out[column] = int(row[0] or 0)
        finally:
            con.close()
        return out

    def fingerprint(self, paths: Sequence[str]) -> Fingerprint:
        """:func:`~serve_journal.integrity.fingerprint.fingerprint` of the entries of the local
        journal files ``paths`` (in this order) in bounded memory: DuckDB sorts them into the
        fingerprint's canonical order (entry id, then input order) under the workspace's limit,
        one range of entry ids at a time when the day is too big for one pass (:meth:`passes`),
        and the sorted rows stream into one spill file per column (Arrow IPC, LZ4), which the
        hash then reads a chunk at a time, as often as it needs without decoding Parquet again
        (hashing a column reads it 3 to 8 times: its validity, lengths and values)."""
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
        if not rows:
            return fingerprint_local_files(paths)
        folder = os.path.join(self.root, "spill", f"fingerprint-{uuid.uuid4().hex}")
        os.makedirs(folder)
        try:
            columns = self._sorted_columns(paths, rows, folder)
            log.debug("hash the fingerprint of %d rows", rows)

            def column(name: str):
                def chunks() -> Iterator[pa.Array]:
                    with pa.OSFile(columns[name]) as f:
                        for batch in pa.ipc.open_stream(f):
                            yield batch.column(0)
                return chunks

            return fingerprint_ordered(rows, column)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _sorted_columns(self, paths: Sequence[str], rows: int, folder: str) -> dict[str, str]:
        """Write the entries of ``paths`` in the fingerprint's order to one Arrow IPC file per
        entry-schema column under ``folder`` (a column the files lack: nulls); returns the
        files by column."""
        schemas = {name: pa.schema([ENTRY_SCHEMA.field(name)]) for name in ENTRY_SCHEMA.names}
        files = {name: os.path.join(folder, f"{i:03d}.arrow")
                 for i, name in enumerate(ENTRY_SCHEMA.names)}
        options = pa.ipc.IpcWriteOptions(compression="lz4")
        with contextlib.ExitStack() as stack:
            writers = {name: stack.enter_context(pa.ipc.new_stream(
                           stack.enter_context(pa.OSFile(files[name], "wb")), schemas[name],
                           options=options))
                       for name in ENTRY_SCHEMA.names}
            con = self._connect()
            stack.callback(con.close)
            for part in self._partitions(con, paths, _ID_KEYS, rows):
                query = (f"SELECT * EXCLUDE (__file, __row) FROM {part} "
                         "ORDER BY producer_id ASC NULLS LAST, seq ASC NULLS LAST, __file, __row")
                for batch in self._reader(con, rows, query):
                    batch = restore_output_scores(pa.Table.from_batches([batch]))
                    present = set(batch.schema.names)
                    for name, writer in writers.items():
                        typ = schemas[name].field(0).type
                        array = (batch.column(name).cast(typ) if name in present
                                 else pa.nulls(batch.num_rows, typ))
                        writer.write(pa.table([array], schema=schemas[name]))
        return files

    def sorted_tables(self, files: Sequence[SpooledFile]) -> Iterator[pa.Table]:
        """The entries of ``files`` in lookup order (subject token, then time, nulls last; ties
        in input order: file, then row), as entry-schema tables of 64k rows in one chunk (the
        last one the rest), however they were read: a Parquet page ends where a chunk does, so
        the same rows in other chunks would be written as other bytes. A day too big to sort in
        one pass (:meth:`passes`) is sorted one range of subject tokens at a time, each range
        with the same ORDER BY, so the rows come out as one sort gives them; inputs already in
        that order (:func:`in_lookup_order`) are streamed as they are."""
        return _in_batches(self._sorted_tables(files), _BATCH_ROWS)

    def _sorted_tables(self, files: Sequence[SpooledFile]) -> Generator[pa.Table, None, None]:
        if not files:
            return
        order = ", ".join(f'"{name}" {"ASC" if how == "ascending" else "DESC"} NULLS LAST'
                          for name, how, _ in SORT_KEYS)
        paths = [f.local for f in files]
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
        if in_lookup_order(paths):
            # The sort's output would be the inputs themselves (ties keep input order): a day
            # compacted into consecutive files, moved to the cold tier, is streamed, not sorted.
            log.debug("stream %d rows already in lookup order (no sort)", rows)
            for path in paths:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS):
                    yield conform_entries(pa.Table.from_batches([batch]), stored=True)
            return
        con = self._connect()
        try:
            for part in self._partitions(con, paths, [SORT_KEYS[0][0]], rows):
                query = (f"SELECT * EXCLUDE (__file, __row) FROM {part} "
                         f"ORDER BY {order}, __file, __row")
                for batch in self._reader(con, rows, query):
                    # DuckDB's list/struct names and string types differ from the entry schema's
                    yield conform_entries(pa.Table.from_batches([batch]), stored=True)
        finally:
            con.close()

    def row_group_rows(self, files: Sequence[SpooledFile], options: ParquetOptions) -> int:
        """Rows per row group of a rewrite: ``options.row_group_size``, or fewer when that many
        rows in Arrow form (estimated from the first input's first row group) would take more
        than :data:`_GROUP_SHARE` of the memory limit; at least 64k rows."""
        if not any(pq.ParquetFile(f.local).metadata.num_rows for f in files):
            return options.row_group_size
        per_row = _bytes_per_row([f.local for f in files])
        fits = int(self.memory_limit * _GROUP_SHARE) // per_row
        return max(min(_BATCH_ROWS, options.row_group_size), min(options.row_group_size, fits))

    def write_sorted(self, files: Sequence[SpooledFile], names: Sequence[str],
                     options: ParquetOptions, rows_per_file: int) -> list[str]:
        """Write the entries of ``files`` sorted into local files named ``names`` (of
        ``rows_per_file`` rows, the last one the rest); returns their local paths."""
        total = sum(pq.ParquetFile(f.local).metadata.num_rows for f in files)
        bloom = options.bloom_columns if options.bloom_filters else ()
        scores = DICTIONARY_IF_FEW if options.column_encoding else ()
        distinct = self.distinct_counts(files, (*bloom, *scores))
        paths = [self.out_path(name) for name in names]
        log.debug("write %d rows sorted into %d files", total, len(paths))
        options = dataclasses.replace(options, row_group_size=self.row_group_rows(files, options))
        tables = self.sorted_tables(files)
        pending: pa.Table | None = None
        for i, local in enumerate(paths):
            want = min(rows_per_file, total - i * rows_per_file)
            # bloom filters: a sorted column's share of the values; scores: all of them (the
            # dictionary choice must not under-estimate)
            share = {c: n if c in scores else -(-n * want // total)
                     for c, n in distinct.items()} if total else {}
            with SortedParquetWriter(local, options, rows=want, distinct=share) as writer:
                while writer.rows < want:
                    if pending is None:
                        pending = next(tables, None)
                        if pending is None:
                            break
                    take = want - writer.rows
                    writer.write(pending.slice(0, take))
                    pending = pending.slice(take) if pending.num_rows > take else None
        return paths


_ID_KEYS = ("producer_id", "seq")
"""The fingerprint's sort key (entry id); its passes split it by range."""


def _literal(value: str | int) -> str:
    """``value`` as a SQL literal (a string quoted, its quotes doubled)."""
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


def _before(keys: Sequence[str], bound: tuple) -> str:
    """SQL true for a row whose ``keys`` sort before ``bound`` (non-null values) in
    ``ORDER BY keys ASC NULLS LAST`` order: a NULL key part sorts after every value."""
    expr = f'"{keys[-1]}" < {_literal(bound[-1])}'
    for key, value in zip(reversed(keys[:-1]), reversed(bound[:-1]), strict=True):
        expr = f'"{key}" < {_literal(value)} OR ("{key}" = {_literal(value)} AND ({expr}))'
    return f"COALESCE({expr}, false)"


def _wheres(keys: Sequence[str], bounds: Sequence[tuple]) -> list[str]:
    """SQL conditions selecting the rows of each range ``bounds`` split (``[""]``: none)."""
    if not bounds:
        return [""]
    before = [_before(keys, b) for b in bounds]
    ranges = []
    for i in range(len(bounds) + 1):
        parts = ([f"NOT {before[i - 1]}"] if i else []) + (
            [before[i]] if i < len(bounds) else [])
        ranges.append("WHERE " + " AND ".join(parts))
    return ranges


def _range_of(keys: Sequence[str], bounds: Sequence[tuple]) -> str:
    """SQL giving a row's range among those ``bounds`` split (0 to ``len(bounds)``; a NULL key
    part: the last, as ``ORDER BY keys ASC NULLS LAST`` puts it): a binary search, one
    comparison of keys per level."""
    before = [_before(keys, b) for b in bounds]

    def search(lo: int, hi: int) -> str:
        if lo == hi:
            return str(lo)
        mid = (lo + hi + 1) // 2  # range < mid exactly when the key sorts before bounds[mid-1]
        return f"CASE WHEN {before[mid - 1]} THEN {search(lo, mid - 1)} ELSE {search(mid, hi)} END"

    return search(0, len(bounds))


def _in_batches(tables: Generator[pa.Table, None, None], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` re-cut into tables of ``rows`` rows (the last one the rest), each
    in one chunk (a copy of one batch at a time)."""
    pending: list[pa.Table] = []
    count = 0
    with contextlib.closing(tables):  # a reader stopped early closes the sort's (spill files)
        for table in tables:
            while table.num_rows:
                take = min(rows - count, table.num_rows)
                pending.append(table.slice(0, take))
                count += take
                table = table.slice(take)
                if count == rows:
                    yield pa.concat_tables(pending).combine_chunks()
                    pending, count = [], 0
    if count:
        yield pa.concat_tables(pending).combine_chunks()


def in_lookup_order(paths: Sequence[str]) -> bool:
    """Whether the rows of the local journal files ``paths``, read one file after the other,
    are already in lookup order (``ORDER BY subject_token ASC NULLS LAST, ts ASC NULLS LAST``,
    equal keys allowed), so that sorting them would give them back unchanged. Reads the two key
    columns only, a row group at a time, and stops at the first row out of order (files
    written by many producers fail on their second file's first rows)."""
    if [name for name, how, nulls in SORT_KEYS] != ["subject_token", "ts"] or any(
            how != "ascending" or nulls != "at_end" for _, how, nulls in SORT_KEYS):
        return False  # the check below is written for this order only
    last: pa.Table | None = None
    for path in paths:
        parquet = pq.ParquetFile(path)
        if not {"subject_token", "ts"} <= set(parquet.schema_arrow.names):
            return False
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=["subject_token", "ts"]):
            keys = pa.Table.from_batches([batch])
            if last is not None:
                try:
                    keys = pa.concat_tables([last, keys.cast(last.schema)])
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    return False  # files of other key types: the sort reconciles them
            if not _keys_ascending(keys.column("subject_token"), keys.column("ts")):
                return False
            last = keys.slice(keys.num_rows - 1)
    return True


def _keys_ascending(tokens: pa.ChunkedArray, ts: pa.ChunkedArray) -> bool:
    """Whether each row's ``(token, ts)`` is at or after the row before it, NULLs last in both."""
    n = len(tokens)
    if n < 2:
        return True
    a, b = tokens.slice(0, n - 1), tokens.slice(1)
    a_null, b_null = pc.is_null(a), pc.is_null(b)
    token_before = pc.or_(pc.fill_null(pc.less(a, b), False), pc.and_(pc.invert(a_null), b_null))
    token_same = pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(a_null, b_null))
    ts_a, ts_b = ts.slice(0, n - 1), ts.slice(1)
    ts_ok = pc.or_(pc.fill_null(pc.less_equal(ts_a, ts_b), False), pc.is_null(ts_b))
    return bool(pc.all(pc.or_(token_before, pc.and_(token_same, ts_ok))).as_py())


def _row_groups(path: str) -> Iterator[pq.RowGroupMetaData]:
    metadata = pq.ParquetFile(path).metadata
    return (metadata.row_group(i) for i in range(metadata.num_row_groups))


def _bytes_per_row(paths: Sequence[str]) -> int:
    """Arrow bytes per row of the first row group of the first non-empty file of ``paths``."""
    for path in paths:
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows:
            first = parquet.read_row_group(0)
            return max(1, first.nbytes // max(1, first.num_rows))
    return 1


__all__ = ["DEFAULT_MEMORY_LIMIT", "MEMORY_LIMIT_ENV", "RewriteWorkspace", "SpooledFile",
           "parse_memory_limit"]
