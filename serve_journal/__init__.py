"""serve_journal: a prediction journal for Ray Serve.

Every call of a ``@journaled`` deployment leaves one minimal, privacy-safe entry (schema in
``serve_journal.schema``), captured off the request path and persisted as Parquet.
"""

from serve_journal.api import annotate, flush_journal, journaled, producer_reports, shutdown_journal
from serve_journal.config import ConfigError, JournalConfig
from serve_journal.registry import (
    ModelInfo,
    ModelNotFoundError,
    dataset_manifest,
    register_dataset_manifest,
    resolve_model,
)
from serve_journal.schema import ENTRY_SCHEMA, SCHEMA_VERSION

__version__ = "0.1.0"

__all__ = [
    "ENTRY_SCHEMA",
    "SCHEMA_VERSION",
    "ConfigError",
    "JournalConfig",
    "ModelInfo",
    "ModelNotFoundError",
    "annotate",
    "dataset_manifest",
    "flush_journal",
    "journaled",
    "producer_reports",
    "register_dataset_manifest",
    "resolve_model",
    "shutdown_journal",
]
