"""The catalog: where journal files live (``layout``) and which of them are live (``live``).

Every reader and every maintenance tool asks :func:`live_files`; nothing else decides.
"""

from serve_journal.catalog.layout import (
    COLD,
    DEFAULT_SPEC,
    HOT,
    PARQUET_SUFFIX,
    TIERS,
    PartitionKey,
    PartitionSpec,
)
from serve_journal.catalog.live import (
    COMMITS_PREFIX,
    COMPACTED_PREFIX,
    CommitMarker,
    DataFile,
    MarkerCache,
    MarkerSigner,
    commit,
    is_derived,
    live_files,
    load_markers,
    marker_checks,
    marker_path,
    reader_cache,
    resolve_live,
    set_name,
)

__all__ = [
    "COLD",
    "COMMITS_PREFIX",
    "COMPACTED_PREFIX",
    "DEFAULT_SPEC",
    "HOT",
    "PARQUET_SUFFIX",
    "TIERS",
    "CommitMarker",
    "DataFile",
    "MarkerCache",
    "MarkerSigner",
    "PartitionKey",
    "PartitionSpec",
    "commit",
    "is_derived",
    "live_files",
    "load_markers",
    "marker_checks",
    "marker_path",
    "reader_cache",
    "resolve_live",
    "set_name",
]
