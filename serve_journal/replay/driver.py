"""Reproduce journaled decisions: the :func:`replay` entry point, its report and its command.

The journal holds no raw features. :func:`replay` reads the selected journal partitions (the live
files :func:`serve_journal.catalog.live_files` names) with Ray Data; each task
(:func:`serve_journal.replay.tasks.replay_batch`) fetches each entry's features from a
:class:`~serve_journal.replay.featurestore.FeatureStore` *as of the entry's timestamp*, recomputes
the canonical encoding and the HMAC with the entry's key (a
:class:`~serve_journal.replay.verifiers.Verifier`) and classifies the entry
(:data:`~serve_journal.replay.statuses.STATUSES`). With ``rescore=True`` it also loads the exact
model version the entry names (``models:/<name>/<version>``, never the alias) with a
:class:`~serve_journal.replay.rescore.Rescorer` and compares score and decision.

Linking entries to entities: the journal has only ``subject_token``. Replay takes the subject ids
to check (default: every entity id of the feature store), turns them into tokens with the
verifier (the same keys the replicas use) and joins entries on the token. This happens inside the
Ray tasks: raw subject ids and raw features never enter Ray's object store, the output or a log
line; the per-entry results carry tokens, statuses and scores only.

This module also holds the ``serve-journal replay`` command (:data:`replay_command`,
:func:`run_replay_cli`). See docs/replay.md for statuses, the CLI and running it as a Ray job.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import click
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serve_journal import progress as progress_report
from serve_journal.catalog import TIERS, live_files
from serve_journal.cli_input import expand_subjects
from serve_journal.errors import ArchivedObjectError
from serve_journal.replay.featurestore import (
    FeatureStore,
    ParquetFeatureStore,
    default_feature_store_uri,
)
from serve_journal.replay.report import ArtifactMismatch, ArtifactTally, ReplayReport
from serve_journal.replay.rescore import NEGATIVE, POSITIVE, MlflowRescorer, Rescorer
from serve_journal.replay.tasks import JOURNAL_COLUMNS, RESULT_SCHEMA, TaskSpec, replay_batch
from serve_journal.replay.verifiers import StaticKeyVerifier, VaultVerifier, Verifier
from serve_journal.schema import ENTRY_SCHEMA
from serve_journal.storage import JournalStorage, local_root, open_storage
from serve_journal.storage.archive import raise_if_archived
from serve_journal.times import as_utc, to_micros

__all__ = [
    "RESULT_SCHEMA",
    "ArtifactMismatch",
    "ReplayReport",
    "ensure_ray",
    "replay",
    "replay_command",
    "run_replay_cli",
]

logger = logging.getLogger(__name__)

_READ_SCHEMA = pa.schema([ENTRY_SCHEMA.field(name) for name in JOURNAL_COLUMNS])
"""What replay reads of every file: columns a file of an earlier schema version lacks are null."""


def ensure_ray() -> None:
    """Connect to the cluster when ``RAY_ADDRESS`` is set (``ray job submit``), else start locally."""
    import ray  # inside: Ray takes seconds to import, and the CLI loads this module for every command

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto", log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False)


def _journal_files(storage: JournalStorage, model: str, since: dt.datetime | None,
                   until: dt.datetime | None, tier: str) -> list[str]:
    """Full paths of the live files of ``model`` whose hours overlap ``[since, until)``;
    :class:`~serve_journal.errors.ArchivedObjectError` (restore needed, with the command) when
    some of them are archived and not restored, before any task starts."""
    out = []
    relative = []
    for f in live_files(storage, tier=tier, model=model):
        start = f.key.start
        if until is not None and start >= until:
            continue
        if since is not None and f.key.end <= since:
            continue
        out.append(storage.full_path(f.path))
        relative.append(f.path)
    if relative:
        raise_if_archived(storage, relative)
    return out


def _progress_bar(total: int | None) -> Any:
    return progress_report.start("replay entries", total)  # silent unless the CLI enabled it


def replay(
    journal_uri: str,
    *,
    model: str,
    since: dt.datetime | str | None = None,
    until: dt.datetime | str | None = None,
    decision: str | None = None,
    rescore: bool = False,
    feature_store: FeatureStore | None = None,
    verifier: Verifier | None = None,
    tracking_uri: str | None = None,
    output: str | os.PathLike[str] | None = None,
    tolerance: float = 1e-6,
    subjects: Sequence[str] | None = None,
    tier: str = "all",
    rescorer: Rescorer | None = None,
    feature_names: Sequence[str] | None = None,
    decision_labels: tuple[str, str] = (POSITIVE, NEGATIVE),
    batch_size: int = 32_768,
    progress: bool = True,
    keep_results: bool = True,
) -> ReplayReport:
    """Reproduce the journaled decisions of ``model`` as a Ray Data pipeline.

    ``feature_store`` defaults to the :class:`ParquetFeatureStore` beside a local journal,
    ``verifier`` to the :class:`VaultVerifier` of the journal's keyring and vault. ``subjects``
    restricts replay to those subject ids (default: every entity of the feature store; entries of
    other tokens are then ``missing`` or ``shredded``). ``since`` is inclusive, ``until``
    exclusive. With ``rescore`` the journaled model version is loaded from ``tracking_uri`` by an
    :class:`MlflowRescorer` taking the model's inputs in the order ``feature_names`` (default: the
    order of the model version's MLflow signature) and deciding ``decision_labels[0]`` at or above
    the entry's threshold, else ``decision_labels[1]``; or by ``rescorer``. Per-entry results go to
    ``output`` (one Parquet file) and, with ``keep_results``, into the report.
    """
    started = time.monotonic()
    if not isinstance(model, str) or not model:
        raise ValueError("model must be the registered model name whose entries to replay")
    if tier not in (*TIERS, "all"):
        raise ValueError(f"tier must be 'hot', 'cold' or 'all', got {tier!r}")
    if not (isinstance(tolerance, int | float) and tolerance >= 0):
        raise ValueError(f"tolerance must be a non-negative number, got {tolerance!r}")
    if rescorer is not None and (feature_names is not None
                                 or tuple(decision_labels) != (POSITIVE, NEGATIVE)):
        raise ValueError("feature_names and decision_labels configure the default MlflowRescorer; "
                         "with rescorer= give them to that rescorer instead")
    since_utc, until_utc = as_utc(since, "since"), as_utc(until, "until")
    if feature_store is None:
        feature_store = ParquetFeatureStore(default_feature_store_uri(journal_uri))
    if verifier is None:
        verifier = VaultVerifier.from_journal(journal_uri)
    if rescore and rescorer is None:
        if len(decision_labels) != 2 or not all(isinstance(x, str) and x for x in decision_labels):
            raise ValueError("decision_labels must be two labels: (at or above the threshold, "
                             f"below it), got {decision_labels!r}")
        rescorer = MlflowRescorer(tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
                                  feature_names=feature_names, positive=decision_labels[0],
                                  negative=decision_labels[1])
    flush = getattr(feature_store, "flush", None)
    if flush is not None:
        flush()  # rows the caller buffered must be visible to the tasks

    tokens: frozenset[str] | None = None
    without_key = 0
    if subjects is not None:
        subjects = list(subjects)
        found = verifier.tokens_for(subjects)
        tokens = frozenset(t for t in found if t is not None)
        without_key = sum(1 for t in found if t is None)

    storage = open_storage(journal_uri)
    files = _journal_files(storage, model, since_utc, until_utc, tier)
    spec = TaskSpec(uuid.uuid4().hex, feature_store, verifier, rescorer if rescore else None,
                    tokens, to_micros(since_utc), to_micros(until_utc), decision, float(tolerance))
    counts: dict[str, int] = {}
    artifacts = ArtifactTally()
    total = 0
    kept: list[pa.Table] = []
    writer = None
    output_path = None if output is None else os.fspath(output)
    if files and (tokens is None or tokens):
        import ray.data  # inside: Ray takes seconds to import; replay of nothing runs without it

        ensure_ray()
        context = ray.data.DataContext.get_current()
        bar = _progress_bar(None) if progress else None
        context.enable_progress_bars = bool(progress and bar is None)
        ds = ray.data.read_parquet(files, filesystem=storage.filesystem, columns=JOURNAL_COLUMNS,
                                   schema=_READ_SCHEMA, partitioning=None)
        ds = ds.map_batches(functools.partial(replay_batch, spec=spec), batch_format="pyarrow",
                            batch_size=batch_size, zero_copy_batch=True)
        try:
            for out in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if out.num_rows == 0:
                    continue
                out = out.cast(RESULT_SCHEMA)
                total += out.num_rows
                for item in pc.value_counts(out["status"]).to_pylist():
                    counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
                artifacts.add(out)
                if output_path is not None:
                    if writer is None:
                        writer = _open_writer(output_path)
                    writer.write_table(out)
                if keep_results:
                    kept.append(out)
                if bar is not None:
                    bar.advance(out.num_rows)
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
    if output_path is not None and writer is None:
        _open_writer(output_path).close()  # an empty result is a file too
    results = None
    if keep_results:
        results = pa.concat_tables(kept) if kept else RESULT_SCHEMA.empty_table()
    report = ReplayReport(journal_uri=journal_uri, model=model, total=total, counts=counts,
                          rescored=bool(rescore), files=len(files),
                          elapsed_s=time.monotonic() - started, output=output_path,
                          subjects_requested=None if subjects is None else len(subjects),
                          subjects_without_key=without_key, results=results,
                          artifacts=artifacts.counts, several_models=artifacts.several,
                          artifact_mismatches=artifacts.mismatches())
    logger.info("replay of %s: %d entries, %s, artifacts %s", model, total, counts,
                artifacts.counts)
    return report


def _open_writer(path: str) -> pq.ParquetWriter:
    """A Parquet writer of ``RESULT_SCHEMA`` rows to a local path or a ``pyarrow.fs`` URI."""
    root = local_root(path)
    if root is None:
        filesystem, target = pafs.FileSystem.from_uri(path)
    else:
        filesystem, target = pafs.LocalFileSystem(), root
        os.makedirs(os.path.dirname(target), exist_ok=True)
    return pq.ParquetWriter(target, RESULT_SCHEMA, filesystem=filesystem, compression="zstd")


# -- command line ------------------------------------------------------------------------------


def run_replay_cli(
    *,
    model: str,
    journal_uri: str = "./journal",
    since: str | None = None,
    until: str | None = None,
    decision: str | None = None,
    rescore: bool = False,
    features_uri: str | None = None,
    feature_store: str = "parquet",
    feast_repo: str | None = None,
    feast_features: Sequence[str] | None = None,
    feast_feature_service: str | None = None,
    tracking_uri: str | None = None,
    feature_names: Sequence[str] | None = None,
    decision_labels: tuple[str, str] | None = None,
    output: str | None = None,
    subjects: Sequence[str] = (),
    privacy_dir: str | None = None,
    vault_url: str | None = None,
    static_key_file: str | None = None,
    tolerance: float = 1e-6,
    tier: str = "all",
    as_json: bool = False,
    echo: Callable[[str], Any] = print,
) -> int:
    """What ``serve-journal replay`` runs: prints the summary (``as_json``: :meth:`ReplayReport.
    to_dict` as JSON), returns the exit code (0 = all verified).

    ``feature_store="feast"`` reads the features through the Feast repository ``feast_repo``
    (:class:`~serve_journal.replay.feast_store.FeastFeatureStore`): the references
    ``feast_features``, the feature service ``feast_feature_service``, or else the model's
    ``feature_names`` looked up in its registry."""
    store: FeatureStore
    if feature_store == "feast":
        from serve_journal.replay.feast_store import FeastFeatureStore  # inside: Feast is optional

        if not feast_repo:
            raise ValueError("feature_store='feast' needs feast_repo, the folder of "
                             "feature_store.yaml (--feast-repo PATH)")
        store = FeastFeatureStore(feast_repo, features=feast_features or None,
                                  feature_service=feast_feature_service,
                                  feature_names=feature_names or None)
    elif feature_store == "parquet":
        store = ParquetFeatureStore(features_uri or default_feature_store_uri(journal_uri))
    else:
        raise ValueError(f"feature_store must be 'parquet' or 'feast', got {feature_store!r}")
    if static_key_file:
        verifier: Verifier = StaticKeyVerifier.from_key_file(static_key_file)
    else:
        verifier = VaultVerifier.from_journal(journal_uri, privacy_dir=privacy_dir,
                                              vault_url=vault_url)
    if output is None:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        output = os.path.abspath(f"replay-{model}-{stamp}.parquet")
    report = replay(journal_uri, model=model, since=since, until=until, decision=decision,
                    rescore=rescore, feature_store=store, verifier=verifier,
                    tracking_uri=tracking_uri, feature_names=feature_names or None,
                    decision_labels=decision_labels or (POSITIVE, NEGATIVE), output=output,
                    tolerance=tolerance, subjects=list(subjects) or None, tier=tier,
                    keep_results=False)
    echo(json.dumps(report.to_dict(), sort_keys=True) if as_json else report.format_summary())
    return report.exit_code


def _split_names(ctx: click.Context, param: click.Parameter, value: str | None
                 ) -> tuple[str, ...] | None:
    """``--feature-names amount,hour,...`` as a tuple of names."""
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(","))
    if not all(names):
        raise click.BadParameter("give the model's input features in order, separated by commas, "
                                 "e.g. amount,hour,merchant_risk")
    return names


def _split_labels(ctx: click.Context, param: click.Parameter, value: str | None
                  ) -> tuple[str, str] | None:
    """``--decision-labels block,allow`` as a pair."""
    if value is None:
        return None
    labels = tuple(n.strip() for n in value.split(","))
    if len(labels) != 2 or not all(labels):
        raise click.BadParameter("give two labels, at or above the threshold first: block,allow")
    return labels  # type: ignore[return-value]


@click.command("replay")
@click.option("--model", required=True, help="Registered model name whose entries to replay.")
@click.option("--journal", "journal_uri", default="./journal", show_default=True)
@click.option("--since", default=None, help="ISO time, inclusive (UTC).")
@click.option("--until", default=None, help="ISO time, exclusive (UTC).")
@click.option("--decision", default=None, help="Only entries with this decision.")
@click.option("--rescore", is_flag=True,
              help="Also re-run the journaled model version and compare score and decision.")
@click.option("--features", "features_uri", default=None,
              help="Feature store folder (default: 'features' beside a local journal).")
@click.option("--feature-store", "feature_store", default="parquet", show_default=True,
              type=click.Choice(["parquet", "feast"]),
              help="Where the features come from: the built-in Parquet store (--features) or "
                   "Feast's historical retrieval (--feast-repo).")
@click.option("--feast-repo", default=None,
              help="With --feature-store feast: the Feast repository (folder of "
                   "feature_store.yaml).")
@click.option("--feast-features", default=None, callback=_split_names,
              help="With --feature-store feast: Feast references view:feature, comma-separated, "
                   "in the model's order (default: --feature-names looked up in the registry).")
@click.option("--feast-feature-service", default=None,
              help="With --feature-store feast: fetch the features of this feature service.")
@click.option("--tracking-uri", default=None, help="MLflow registry (default MLFLOW_TRACKING_URI).")
@click.option("--feature-names", default=None, callback=_split_names,
              help="With --rescore: the model's input features in order, comma-separated "
                   "(default: the input names of the model version's MLflow signature).")
@click.option("--decision-labels", default=None, callback=_split_labels,
              help="With --rescore: the decisions at or above the threshold and below it, "
                   "comma-separated, e.g. block,allow (default: positive,negative).")
@click.option("--output", default=None, help="Per-entry results Parquet file.")
@click.option("--subject", "subjects", multiple=True,
              help="Only this subject id (repeatable; never stored or logged). '-' reads ids "
                   "from standard input, one per line, keeping them out of shell history.")
@click.option("--privacy-dir", default=None, envvar="SERVE_JOURNAL_PRIVACY_DIR", help="Keyring folder (default beside a local journal).")
@click.option("--vault-url", default=None, envvar="SERVE_JOURNAL_VAULT_URL", help="postgresql://... subject key vault (or env SERVE_JOURNAL_VAULT_URL).")
@click.option("--static-key-file", default=None,
              help="Verify a journal written with one static HMAC key (hex file).")
@click.option("--tolerance", default=1e-6, show_default=True, type=float)
@click.option("--tier", default="all", show_default=True,
              type=click.Choice(["hot", "cold", "all"]))
@click.option("--json", "as_json", is_flag=True,
              help="Print the report (counts, artifact checks, mismatches) as one JSON object.")
def replay_command(**options: Any) -> None:
    """Reproduce decisions: features as of each entry, HMAC check, optional re-scoring.

    With --rescore, entries that name their model artifact (run id, digest) are re-scored only
    with exactly that artifact; a mismatch is `artifact_mismatch`, named in the summary.
    Exit code 0 only when every selected entry verified (1 otherwise, e.g. any
    `artifact_mismatch`); 3 when archived journal files must be restored first
    (`serve-journal restore`). Runs on the cluster named by RAY_ADDRESS (e.g. under
    `ray job submit`), else on a local Ray.
    """
    options["subjects"] = tuple(expand_subjects(options.get("subjects") or ()))
    if options.get("feature_store") == "feast":
        if not options.get("feast_repo"):
            raise click.UsageError("--feature-store feast needs --feast-repo PATH (the folder "
                                   "of feature_store.yaml)")
        if options.get("features_uri"):
            raise click.UsageError("--features is the Parquet store's folder; with "
                                   "--feature-store feast give --feast-repo instead")
        if not (options.get("feast_features") or options.get("feast_feature_service")
                or options.get("feature_names")):
            raise click.UsageError("--feature-store feast needs the features to fetch: "
                                   "--feast-features view:feature,..., --feast-feature-service "
                                   "NAME, or --feature-names (looked up in the registry)")
    elif any(options.get(o) for o in ("feast_repo", "feast_features", "feast_feature_service")):
        raise click.UsageError("--feast-repo, --feast-features and --feast-feature-service "
                               "need --feature-store feast")
    stdout = sys.stdout
    ray_was_up = _ray_connected()
    try:
        # Ray's driver prints raylet notices ("N worker processes have been started ...") to
        # whatever sys.stdout is when they arrive, log_to_driver or not: while replay runs, that
        # is stderr, so the summary (or --json report) stays alone on stdout.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                code = run_replay_cli(**options, echo=functools.partial(click.echo, file=stdout))
            finally:
                if not ray_was_up and _ray_connected():
                    import ray  # inside: already imported when connected

                    # A Ray this command started prints nothing after the report; the report
                    # stands whatever its shutdown does.
                    with contextlib.suppress(Exception):
                        ray.shutdown()
    except ArchivedObjectError as exc:
        click.echo(f"error: {exc}", err=True)
        code = 3
    sys.exit(code)


def _ray_connected() -> bool:
    """Whether this process is connected to Ray, without importing it (seconds) when it is not."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())
