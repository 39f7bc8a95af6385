"""serve_journal: a prediction journal for Ray Serve.

Every call of a ``@journaled`` deployment leaves one minimal, privacy-safe entry (schema in
``serve_journal.schema``), captured off the request path and persisted as Parquet.

What users call:

- on the deployment: :func:`journaled`, :func:`annotate`, :func:`load_model` (load a registered
  model so entries name exactly the version, run and artifact that serve);
- from the driver: :func:`flush_journal`, :func:`producer_reports`, :func:`shutdown_journal`,
  :func:`subject_tokenizer` (subject id -> the token entries carry), :func:`caller_tokenizer`
  (caller id -> the caller token entries carry with ``caller_privacy="token"``);
- reading the journal: :class:`JournalQuery`, :func:`verify_journal`, :func:`journal_stats`,
  :func:`replay`, :func:`forget_subject`;
- outcomes that arrive later: :func:`record_outcomes`, :func:`load_outcomes`,
  :func:`latest_outcomes`, :func:`find_outcomes`, :func:`join_outcomes`, :func:`outcome_performance`;
- evidence for an examiner: :func:`export_evidence` (a bundle of entries with their proofs),
  :func:`verify_evidence` (checks one offline);
- the registry: :func:`resolve_model`, :func:`dataset_manifest`,
  :func:`register_dataset_manifest`;
- other engines: :func:`publish_iceberg` (the live files as an Apache Iceberg table, configured
  by :class:`IcebergSettings`; docs/iceberg.md);
- operations: :func:`check_deployment` (what ``serve-journal doctor`` checks); long work reports
  its progress through ``serve_journal.progress`` (silent until ``progress.enable()``).

Everything else lives in subpackages (``read``, ``replay``, ``maintain``, ``privacy``, ``sink``,
``transport``, ``storage``, ``catalog``, ``integrity``); ``_private`` is the replica's inside.
"""

from serve_journal.api import (
    JournaledModel,
    annotate,
    caller_tokenizer,
    flush_journal,
    journaled,
    load_model,
    producer_reports,
    shutdown_journal,
    subject_tokenizer,
)
from serve_journal.catalog.iceberg import IcebergSettings, publish_iceberg
from serve_journal.config import JournalConfig
from serve_journal.doctor import check_deployment
from serve_journal.errors import ConfigError, JournalUnavailableError, ModelNotFoundError
from serve_journal.evidence.export import export_evidence
from serve_journal.evidence.verify import verify_evidence
from serve_journal.outcomes.join import find_outcomes, join_outcomes, latest_outcomes
from serve_journal.outcomes.performance import performance as outcome_performance
from serve_journal.outcomes.record import load_outcomes, record_outcomes
from serve_journal.privacy.forget import forget_subject
from serve_journal.read.query import JournalQuery
from serve_journal.read.stats import stats as journal_stats
from serve_journal.read.verify import verify_journal
from serve_journal.registry import (
    ModelInfo,
    dataset_manifest,
    register_dataset_manifest,
    resolve_model,
)
from serve_journal.replay import replay
from serve_journal.schema import ENTRY_SCHEMA, SCHEMA_VERSION

__version__ = "0.1.0"

__all__ = [
    "ENTRY_SCHEMA",
    "SCHEMA_VERSION",
    "ConfigError",
    "IcebergSettings",
    "JournalConfig",
    "JournalQuery",
    "JournalUnavailableError",
    "JournaledModel",
    "ModelInfo",
    "ModelNotFoundError",
    "annotate",
    "caller_tokenizer",
    "check_deployment",
    "dataset_manifest",
    "export_evidence",
    "find_outcomes",
    "join_outcomes",
    "flush_journal",
    "forget_subject",
    "journal_stats",
    "journaled",
    "latest_outcomes",
    "load_model",
    "load_outcomes",
    "outcome_performance",
    "producer_reports",
    "publish_iceberg",
    "record_outcomes",
    "register_dataset_manifest",
    "replay",
    "resolve_model",
    "shutdown_journal",
    "subject_tokenizer",
    "verify_evidence",
    "verify_journal",
]
