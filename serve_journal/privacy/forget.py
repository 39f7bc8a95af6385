"""The right to be forgotten by crypto-shredding: destroy a subject's key, never rewrite the journal.

:func:`forget` computes the subject's token while the key still exists, counts the journal
entries carrying it (and which model versions decided about the subject), deletes the key from
the vault (which records a tombstone so running replicas evict their cached copy), calls the
feature store's purge hook and the operator's forget hook when configured, and writes a receipt
under ``<journal root>/_receipts/``. The receipt names the destroyed key by its random key
reference, never the subject id or token.

Counting goes through the index (:mod:`serve_journal.read.pruning`): each live file's footer
statistics and bloom filters on ``subject_token`` rule out the files and row groups that cannot
hold the subject, and only the candidate row groups are read. Archived files (S3 Glacier, not
restored) cannot be read: the receipt then says the count is incomplete, names them and the
restore command (the key is destroyed all the same, which makes their entries unlinkable too).

Outcomes (:mod:`serve_journal.outcomes`) carry no subject id: they reach a subject only through
the entries with their request id, whose token is the subject's. The count reads those entries'
request ids, and the receipt counts the outcome records about them (``outcomes_unlinkable``):
once the key is gone, neither the entries nor their outcomes can be found by the subject.

Hooks are configured by name (:class:`ForgetHooks`): ``--purge-hook`` /
``SERVE_JOURNAL_PURGE_HOOK`` and ``--retraining-hook`` / ``SERVE_JOURNAL_RETRAINING_HOOK``, each
``module:function``; ``features:PATH`` is the built-in purge of the project's Parquet feature
store (:class:`serve_journal.replay.featurestore.FeatureStorePurge`). The receipt records which
hooks ran (``hook_targets``), their status (``hooks``) and a numeric result (``hook_results``,
e.g. the feature rows purged).
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from serve_journal.catalog import live_files
from serve_journal.errors import ArchivedObjectError, ConfigError, ForgetIncompleteError
from serve_journal.outcomes.record import load_outcomes
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.tokens import check_subject_token
from serve_journal.privacy.vault import SubjectVault
from serve_journal.read.pruning import open_index
from serve_journal.retry import retry_call
from serve_journal.storage import JournalStorage, open_storage
from serve_journal.storage.archive import archive_states, archived_error, restore_command

__all__ = [
    "FEATURES_HOOK_PREFIX",
    "PURGE_HOOK_ENV",
    "RECEIPTS_PREFIX",
    "RETRAINING_HOOK_ENV",
    "ForgetEvent",
    "ForgetHooks",
    "ForgetIncompleteError",
    "ForgetReceipt",
    "SubjectCount",
    "count_subject_entries",
    "count_subject_index",
    "forget",
    "forget_subject",
    "resolve_hook",
]

log = logging.getLogger(__name__)

RECEIPTS_PREFIX = "_receipts"

PURGE_HOOK_ENV = "SERVE_JOURNAL_PURGE_HOOK"
RETRAINING_HOOK_ENV = "SERVE_JOURNAL_RETRAINING_HOOK"
FEATURES_HOOK_PREFIX = "features:"
"""``features:PATH``: the built-in purge of the Parquet feature store in the folder PATH."""

_COUNT_COLUMNS = ("model_name", "model_version", "request_id")


@dataclass(frozen=True)
class ForgetEvent:
    """What the forget hook receives: enough to trigger retraining, no raw identifier."""

    subject_token: str | None
    """The token the subject's journal entries carry (now unlinkable to the subject)."""
    model_versions: tuple[tuple[str, str], ...]
    """(model_name, model_version) pairs that decided about the subject."""
    subject_key_ref: str | None
    forgotten_at: str
    versions_complete: bool = True
    """False when archived files could not be read: ``model_versions`` may then miss some."""


@dataclass(frozen=True)
class ForgetReceipt:
    """Proof of a forget; written as JSON, contains no raw identifier and no token."""

    receipt_id: str
    forgotten_at: str
    subject_key_ref: str | None
    """Random id of the destroyed key; ``None`` when the subject had no key."""
    status: str
    """``shredded`` (a key was destroyed) or ``no_key`` (nothing in the vault for that subject)."""
    entries_unlinkable: int | None
    """Entries of the subject in the journal's live files; ``None`` when the journal could not be
    read, or not all of it (archived files: see ``uncounted_files``). The key is destroyed all
    the same: counting never stands in the way of erasure."""
    model_versions: list[dict[str, str]]
    hooks: dict[str, str] = field(default_factory=dict)
    """``purge`` / ``forget`` (the retraining hook) -> ``ok``, ``not_configured`` or
    ``failed:<ExceptionType>``."""
    hook_targets: dict[str, str] = field(default_factory=dict)
    """Which hook ran for ``purge`` / ``forget``: its configured name (``module:function``,
    ``features:PATH``) or the callable's qualified name."""
    hook_results: dict[str, int] = field(default_factory=dict)
    """A hook's result when it is a number (the built-in purge: feature rows removed)."""
    entries_counted: int | None = None
    """Entries found in the files that could be read (equals ``entries_unlinkable`` when the
    count is complete)."""
    uncounted_files: list[str] = field(default_factory=list)
    """Archived files (S3 Glacier, not restored) the count could not read: restore needed."""
    restore_command: str | None = None
    """The command restoring ``uncounted_files`` (S3 RestoreObject), when there are any."""
    outcomes_unlinkable: int | None = None
    """Outcome records about the subject's counted entries (by request id), which no longer link
    to the subject; ``None`` when they could not be counted."""
    path: str | None = None
    """Where the receipt was written (relative to the journal root, or an absolute path)."""

    @property
    def complete(self) -> bool:
        """True when every configured hook succeeded."""
        return not any(v.startswith("failed") for v in self.hooks.values())

    def to_json(self) -> str:
        doc = asdict(self)
        doc.pop("path")
        return json.dumps(doc, indent=1, sort_keys=True)


@dataclass(frozen=True)
class SubjectCount:
    """A subject's entries counted through the index, and what the count had to read."""

    entries: int
    model_versions: list[tuple[str, str]]
    """(model_name, model_version) pairs of those entries, sorted."""
    files: int
    """Live data files whose footer (statistics, bloom filters) was consulted."""
    files_read: int
    """Files where at least one row group could hold the subject and was read."""
    row_groups_read: int
    archived: tuple[str, ...] = ()
    """Files not read: archived, restore needed. The count is complete only without them."""
    request_ids: tuple[str, ...] = ()
    """Request ids of the counted entries, sorted (their outcomes link to the subject through them)."""

    @property
    def complete(self) -> bool:
        return not self.archived


def count_subject_index(storage: JournalStorage, subject_token: str) -> SubjectCount:
    """Count the entries carrying ``subject_token`` in the live files of the hot and cold tiers
    (the catalog's view, so a compacted or moved entry counts once) through the index: per file,
    the footer's row-group statistics and bloom filters on ``subject_token``
    (:mod:`serve_journal.read.pruning`) rule out row groups, and only the candidates' token and
    model columns are read. Archived files are skipped and named in ``archived``.

    ``subject_token`` must have a subject token's format (``TokenFormatError`` otherwise). A
    compaction or lifecycle run may delete a replaced file after the listing; the next listing
    sees the committed rewrite instead, so the whole count is retried.
    """
    check_subject_token(subject_token, "subject_token")
    return retry_call(lambda: _count_once(storage, subject_token), attempts=3, delay_s=0.01,
                      max_delay_s=0.05, retry_on=FileNotFoundError)


def _count_once(storage: JournalStorage, subject_token: str) -> SubjectCount:
    files = [f.path for f in live_files(storage, tier="all")]
    blocked = {p for p, s in archive_states(storage).items() if not s.readable} if files else set()
    counts: dict[tuple[str, str], int] = {}
    request_ids: set[str] = set()
    archived: list[str] = []
    consulted = files_read = groups_read = 0
    for path in files:
        if path in blocked:
            archived.append(path)
            continue
        try:
            index = open_index(storage, path)
        except OSError as exc:
            typed = archived_error(storage, path, exc)
            if typed is None:
                raise
            archived.append(path)
            continue
        try:
            consulted += 1
            groups = index.candidates("subject_token", subject_token)
            if not groups:
                continue
            files_read += 1
            groups_read += len(groups)
            rows = index.read_matching("subject_token", subject_token, _COUNT_COLUMNS, groups)
        finally:
            index.handle.close()
        if rows is None:
            continue
        for name, version in zip(rows["model_name"].to_pylist(),
                                 rows["model_version"].to_pylist(), strict=True):
            counts[(name, version)] = counts.get((name, version), 0) + 1
        request_ids.update(rows["request_id"].to_pylist())
    return SubjectCount(sum(counts.values()), sorted(counts), consulted, files_read, groups_read,
                        tuple(archived), tuple(sorted(request_ids)))


def count_subject_entries(storage: JournalStorage, subject_token: str) -> tuple[int, list[tuple[str, str]]]:
    """Entries carrying ``subject_token`` in the live files and their model versions, counted
    through the index (:func:`count_subject_index`). Raises
    :class:`~serve_journal.errors.ArchivedObjectError` (restore needed, with the command) when
    archived files keep the count from being complete."""
    count = count_subject_index(storage, subject_token)
    if not count.complete:
        raise ArchivedObjectError(count.archived, restore_command(storage))
    return count.entries, count.model_versions


def resolve_hook(spec: str) -> Callable[[Any], Any]:
    """The hook a configured name stands for: ``module:function`` (a callable attribute path,
    ``pkg.mod:Class.method`` works too) or ``features:PATH`` (the built-in purge of the Parquet
    feature store in folder PATH). :class:`ConfigError` names what is wrong."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a forget hook must be 'module:function' or '{FEATURES_HOOK_PREFIX}PATH'"
                          f", got {spec!r}")
    spec = spec.strip()
    if spec.startswith(FEATURES_HOOK_PREFIX):
        # inside: replay/ sits above privacy/ and is only needed when this hook is configured
        from serve_journal.replay import featurestore  # inside: see above


        root = spec[len(FEATURES_HOOK_PREFIX):]
        if not root:
            raise ConfigError(f"'{FEATURES_HOOK_PREFIX}PATH' needs the feature store folder")
        return featurestore.FeatureStorePurge(root)
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"a forget hook must be 'module:function' or '{FEATURES_HOOK_PREFIX}PATH'"
                          f", got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"forget hook {spec!r} cannot be loaded ({type(exc).__name__}: {exc})"
                          ) from None
    if not callable(target):
        raise ConfigError(f"forget hook {spec!r} is not callable")
    return target


@dataclass(frozen=True)
class ForgetHooks:
    """The purge and retraining hooks forget calls, by name (picklable: a console or Ray job
    resolves them where it runs). Precedence: argument, then ``SERVE_JOURNAL_PURGE_HOOK`` /
    ``SERVE_JOURNAL_RETRAINING_HOOK``, then none."""

    purge: str | None = None
    """``module:function`` called with the subject id, or ``features:PATH``."""
    retraining: str | None = None
    """``module:function`` called with a :class:`ForgetEvent` (no raw identifier)."""

    @classmethod
    def resolve(cls, purge: str | None = None, retraining: str | None = None,
                environ: Mapping[str, str] | None = None) -> ForgetHooks:
        """From arguments, then the environment; each name is checked (loaded) here."""
        env = os.environ if environ is None else environ
        hooks = cls(purge or env.get(PURGE_HOOK_ENV) or None,
                    retraining or env.get(RETRAINING_HOOK_ENV) or None)
        hooks.callables()
        return hooks

    def callables(self) -> tuple[Callable[[str], Any] | None, Callable[[ForgetEvent], Any] | None]:
        """``(purge_hook, forget_hook)`` for :func:`forget`, names kept for the receipt."""
        return (_named(resolve_hook(self.purge), self.purge) if self.purge else None,
                _named(resolve_hook(self.retraining), self.retraining) if self.retraining else None)


class _NamedHook:
    """A resolved hook that remembers its configured name (what the receipt records)."""

    def __init__(self, hook: Callable[[Any], Any], name: str) -> None:
        self.hook = hook
        self.hook_name = name

    def __call__(self, argument: Any) -> Any:
        return self.hook(argument)


def _named(hook: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
    return _NamedHook(hook, name)


def _hook_name(hook: Callable[[Any], Any] | None) -> str | None:
    if hook is None:
        return None
    name = getattr(hook, "hook_name", None)
    if isinstance(name, str):
        return name
    module = getattr(hook, "__module__", None) or type(hook).__module__
    qualname = getattr(hook, "__qualname__", None) or type(hook).__qualname__
    return f"{module}:{qualname}"


def forget(
    subject_id: str,
    *,
    vault: SubjectVault,
    keyring: Keyring | None = None,
    journal_storage: JournalStorage | None = None,
    purge_hook: Callable[[str], Any] | None = None,
    forget_hook: Callable[[ForgetEvent], Any] | None = None,
    receipts_dir: str | os.PathLike[str] | None = None,
) -> ForgetReceipt:
    """Crypto-shred ``subject_id`` and return the receipt (also written to storage).

    The receipt goes to ``<journal_storage root>/_receipts/`` (create-only), or to
    ``receipts_dir`` when given; at least one of them is required. ``purge_hook(subject_id)``
    deletes the subject's features in the feature store; ``forget_hook(event)`` lets an operator
    act on models that decided about the subject. When a hook fails the key is still destroyed
    and the receipt written; :class:`ForgetIncompleteError` then carries the receipt.
    ``keyring`` is accepted for symmetry with the CLI (the vault holds its own).
    """
    if journal_storage is None and receipts_dir is None:
        raise ValueError("forget needs journal_storage or receipts_dir to write the receipt to")
    if keyring is not None and keyring is not vault.keyring and keyring.path != vault.keyring.path:
        raise ValueError("keyring must be the vault's keyring (same keyring file)")
    now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    key = vault.get_many([subject_id]).get(subject_id)
    token = key.token if key is not None else None  # before the key is gone
    entries: int | None = 0
    counted: int | None = 0
    versions: list[tuple[str, str]] = []
    uncounted: tuple[str, ...] = ()
    outcomes: int | None = 0
    if token is not None and journal_storage is not None:
        try:
            count = count_subject_index(journal_storage, token)
        except Exception as exc:  # noqa: BLE001 - an unreadable journal must not block erasure
            log.warning("forget: could not count the subject's entries (%s); shredding the key "
                        "anyway", type(exc).__name__)
            entries = counted = outcomes = None  # not counted: never a confident 0
        else:
            versions, counted, uncounted = count.model_versions, count.entries, count.archived
            entries = count.entries if count.complete else None
            outcomes = _count_outcomes(journal_storage, count.request_ids)
            if uncounted:
                log.warning("forget: %d archived file(s) not counted (restore needed: %s); "
                            "shredding the key anyway", len(uncounted),
                            restore_command(journal_storage))
    key_ref = vault.forget(subject_id)
    if key_ref is None and key is not None:
        key_ref = key.key_ref  # a concurrent forget destroyed it between our read and delete
    results: dict[str, int] = {}
    event = ForgetEvent(token, tuple(versions), key_ref, now, versions_complete=not uncounted)
    hooks = {
        "purge": _call(purge_hook, "purge", subject_id, results),
        "forget": _call(forget_hook, "forget", event, results),
    }
    targets = {name: target for name, target in (("purge", _hook_name(purge_hook)),
                                                 ("forget", _hook_name(forget_hook)))
               if target is not None}
    receipt = ForgetReceipt(
        receipt_id=secrets.token_hex(8),
        forgotten_at=now,
        subject_key_ref=key_ref,
        status="shredded" if key_ref is not None else "no_key",
        entries_unlinkable=entries,
        model_versions=[{"model_name": n, "model_version": v} for n, v in versions],
        hooks=hooks,
        hook_targets=targets,
        hook_results=results,
        entries_counted=counted,
        uncounted_files=list(uncounted),
        outcomes_unlinkable=outcomes,
        restore_command=restore_command(journal_storage) if uncounted and journal_storage else None,
    )
    receipt = _write_receipt(receipt, journal_storage, receipts_dir)
    if not receipt.complete:
        raise ForgetIncompleteError(receipt)
    return receipt


def _count_outcomes(storage: JournalStorage, request_ids: tuple[str, ...]) -> int | None:
    """Outcome records about ``request_ids``; ``None`` when they cannot be read."""
    if not request_ids:
        return 0
    try:
        return load_outcomes(storage, request_ids).num_rows
    except Exception as exc:  # noqa: BLE001 - an unreadable partition must not block erasure
        log.warning("forget: could not count the subject's outcomes (%s)", type(exc).__name__)
        return None


def _call(hook: Callable[[Any], Any] | None, name: str, argument: Any,
          results: dict[str, int]) -> str:
    if hook is None:
        return "not_configured"
    try:
        result = hook(argument)
    except Exception as exc:  # noqa: BLE001 - recorded in the receipt, raised after it is written
        log.error("forget: %s hook failed with %s", name, type(exc).__name__)  # never the message
        return f"failed:{type(exc).__name__}"
    if isinstance(result, int) and not isinstance(result, bool):
        results[name] = result  # a count only: a hook's other results may name the subject
    return "ok"


def _write_receipt(receipt: ForgetReceipt, storage: JournalStorage | None,
                   receipts_dir: str | os.PathLike[str] | None) -> ForgetReceipt:
    stamp = receipt.forgotten_at[:19].replace(":", "").replace("-", "")
    name = f"forget-{stamp}-{receipt.receipt_id}.json"
    data = receipt.to_json().encode("utf-8")
    if receipts_dir is not None:
        directory = os.fspath(receipts_dir)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    else:
        assert storage is not None
        path = f"{RECEIPTS_PREFIX}/{name}"
        storage.put_new(path, data)
    return ForgetReceipt(**{**asdict(receipt), "path": path})


def forget_subject(
    subject_id: str,
    *,
    journal_uri: str,
    privacy_dir: str | os.PathLike[str],
    vault_url: str | None = None,
    purge_hook: Callable[[str], Any] | None = None,
    forget_hook: Callable[[ForgetEvent], Any] | None = None,
    hooks: ForgetHooks | None = None,
) -> ForgetReceipt:
    """What ``serve-journal forget --subject ID`` calls.

    Opens the keyring with :meth:`Keyring.local_default` (``privacy_dir``; the KEK from
    ``SERVE_JOURNAL_KEK`` when set), the vault at ``vault_url`` (default
    ``<privacy_dir>/vault.sqlite3``) and the journal at ``journal_uri``, then runs :func:`forget`.
    ``hooks`` (by name, see :class:`ForgetHooks`) fill in ``purge_hook`` / ``forget_hook`` when
    those are not given.
    """
    if hooks is not None:
        named_purge, named_retraining = hooks.callables()
        purge_hook = purge_hook or named_purge
        forget_hook = forget_hook or named_retraining
    keyring = Keyring.local_default(privacy_dir)
    if vault_url is None:
        vault = SubjectVault.local_default(privacy_dir, keyring)
    else:
        vault = SubjectVault.open(vault_url, keyring)
    try:
        return forget(subject_id, vault=vault, keyring=keyring,
                      journal_storage=open_storage(journal_uri),
                      purge_hook=purge_hook, forget_hook=forget_hook)
    finally:
        vault.close()
