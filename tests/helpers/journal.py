"""Reading a local journal folder the blunt way: every hot Parquet file, for end-to-end tests."""

from __future__ import annotations

import glob
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from serve_journal.schema import ENTRY_SCHEMA


def read_journal(root: Path) -> pa.Table:
    """Every row of every hot data file below ``root`` (no catalog: tests compare against it)."""
    files = sorted(glob.glob(str(root / "hot" / "**" / "*.parquet"), recursive=True))
    tables = [pq.ParquetFile(f).read() for f in files]
    return pa.concat_tables(tables) if tables else ENTRY_SCHEMA.empty_table()
