"""``serve-journal doctor``: check a deployment's configuration and say what is wrong.

Each check looks at one thing a deployment depends on and reports ``ok``, ``problem`` (with what
is wrong and what would be right) or ``skipped`` (not configured, so not checked):

- ``keys``: each privacy folder (one per node, e.g. the folder each node mounts) holds a keyring
  that opens under its KEK (``SERVE_JOURNAL_KEK`` or the ``kek`` file), with owner-only modes
  (0600 files, 0700 folder), and resolves every data key id the journal's entries name;
- ``keys-consistent``: every node's keyring holds the same data key ids with the same current key;
- ``counters-key``: the replicas' counters key in each privacy folder is owner-only and certified
  in the journal by the signing key;
- ``signing-key``: the manifest signing key is owner-only, is the key the pinned public key
  (``public_key``) or fingerprint (``key_fingerprint``) names and the key exported beside a local
  journal, and signed the journal's newest checkpoint;
- ``object-lock``: an ``s3://`` journal's bucket has Object Lock enabled (GetObjectLockConfiguration);
- ``broker``: the Kafka bootstrap servers answer a metadata request (and hold ``topic``);
- ``registry``: the MLflow tracking/registry URI answers a registered-model search.

Nothing here writes: a missing keyring, KEK or database is reported, never created. Reports hold
paths, key ids and fingerprints, never key bytes, subject ids or feature values.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from serve_journal import progress
from serve_journal.catalog import live_files
from serve_journal.integrity.certificates import (
    COUNTERS_KEY_FILE,
    PURPOSE_COUNTERS,
    certified_keys,
)
from serve_journal.integrity.manifest import (
    CHECKPOINT_PREFIX,
    SIGNING_KEY_FILE,
    Checkpoint,
    ManifestSigner,
    load_public_key,
)
from serve_journal.integrity.trust import (
    MIN_FINGERPRINT_DIGITS,
    exported_public_key_path,
    key_fingerprint,
    signing_dir,
)
from serve_journal.privacy.keyring import KEK_ENV, EnvKek, FileKek, Keyring
from serve_journal.storage import JournalStorage, open_storage

__all__ = ["DoctorCheck", "DoctorReport", "check_deployment"]

OK = "ok"
PROBLEM = "problem"
SKIPPED = "skipped"
DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class DoctorCheck:
    """The outcome of one check: ``status`` is ``ok``, ``problem`` or ``skipped``."""

    check: str
    status: str
    detail: str

    @property
    def ok(self) -> bool:
        return self.status != PROBLEM


@dataclass
class DoctorReport:
    """Every check of one ``doctor`` run; :attr:`ok` when none found a problem."""

    journal_uri: str
    checks: list[DoctorCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def problems(self) -> list[DoctorCheck]:
        return [c for c in self.checks if c.status == PROBLEM]

    def to_dict(self) -> dict[str, Any]:
        return {"journal": self.journal_uri, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def format_text(self) -> str:
        """One line per check, problems first, and a verdict."""
        order = {PROBLEM: 0, OK: 1, SKIPPED: 2}
        lines = [f"{c.status.upper():8} {c.check}: {c.detail}"
                 for c in sorted(self.checks, key=lambda c: order[c.status])]
        lines.append(f"{len(self.problems)} problem(s)" if self.problems else "all checks passed")
        return "\n".join(lines)

    def _add(self, check: str, status: str, detail: str) -> None:
        self.checks.append(DoctorCheck(check, status, detail))


def check_deployment(
    journal_uri: str,
    *,
    privacy_dirs: Sequence[str] = (),
    signing_key_file: str | None = None,
    public_key: str | None = None,
    key_fingerprint: str | None = None,
    bootstrap: str | None = None,
    topic: str | None = None,
    tracking_uri: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> DoctorReport:
    """Check the deployment of the journal at ``journal_uri`` (see the module docstring).

    ``privacy_dirs``: the privacy (keyring) folder of each node; none given means the default
    beside a local journal. ``signing_key_file``: the manifest signing key (default
    ``journal-signing/manifest-signing.pem`` beside a local journal). ``timeout`` bounds each
    network check, in seconds."""
    report = DoctorReport(journal_uri)
    # s3:// opens the write-once backend (boto3) even without ?worm=1: doctor asks the bucket.
    is_s3 = urllib.parse.urlparse(journal_uri).scheme == "s3"
    storage = open_storage(journal_uri, worm=True if is_s3 else None)
    signer = _check_signing_key(report, storage, journal_uri, signing_key_file, public_key,
                                key_fingerprint)
    folders = list(privacy_dirs) or _default_privacy_dirs(journal_uri)
    if folders:
        _check_keys(report, storage, folders, signer)
    else:
        report._add("keys", PROBLEM, "a remote journal needs --privacy-dir (the keyring folder "
                                     "of each node) to check its key material")
    _check_object_lock(report, storage)
    _check_broker(report, bootstrap, topic, timeout)
    _check_registry(report, tracking_uri, timeout)
    return report


# -- key material ---------------------------------------------------------------------------------


def _default_privacy_dirs(journal_uri: str) -> list[str]:
    folder = signing_dir(journal_uri)  # beside a local journal, like journal-keys
    return [] if folder is None else [os.path.join(os.path.dirname(folder), "journal-keys")]


def _loose_mode(path: str, allowed: int = 0o600) -> str | None:
    """What is wrong with ``path``'s mode (group or others may use it), else ``None``."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        return f"{path} has mode {mode:04o}; it must be {allowed:04o} (owner only: chmod {allowed:o})"
    return None


def _journal_key_ids(storage: JournalStorage) -> tuple[set[str], int]:
    """Data key ids the journal's live entries name, and how many files could not be read."""
    ids: set[str] = set()
    unread = 0
    files = live_files(storage, tier="all")
    for f in progress.track(files, "doctor: key ids of journal files"):
        try:
            column = pq.read_table(storage.full_path(f.path), filesystem=storage.filesystem,
                                   columns=["key_id"]).column("key_id")
        except (OSError, KeyError, ValueError):  # archived, or a file without the column
            unread += 1
            continue
        ids.update(v for v in column.unique().to_pylist() if v)
    return ids, unread


def _check_keys(report: DoctorReport, storage: JournalStorage, folders: list[str],
                signer: ManifestSigner | None) -> None:
    journal_ids, unread = _journal_key_ids(storage)
    seen: list[tuple[str, tuple[str, ...], str]] = []  # (folder, key ids, current) per node
    for folder in folders:
        problems = _keyring_problems(folder, journal_ids, seen)
        if problems:
            report._add("keys", PROBLEM, f"{folder}: " + "; ".join(problems))
        else:
            _, ids, current = seen[-1]
            report._add("keys", OK, (
                f"{folder}: keyring opens, owner-only modes, {len(ids)} data key(s) (current "
                f"{current}) resolve the {len(journal_ids)} key id(s) the journal's entries name"
                + (f" ({unread} file(s) unreadable, e.g. archived: not checked)" if unread else "")))
        _check_counters_key(report, storage, folder, signer)
    if len(folders) > 1:
        distinct = {(ids, current) for _, ids, current in seen}
        if len(seen) < len(folders):
            report._add("keys-consistent", PROBLEM,
                        "some nodes' keyrings could not be opened (see 'keys'), so the nodes "
                        "cannot be compared")
        elif len(distinct) > 1:
            described = "; ".join(f"{folder}: {', '.join(ids)} (current {current})"
                                  for folder, ids, current in seen)
            report._add("keys-consistent", PROBLEM,
                        f"the nodes' keyrings differ (copy one keyring file to every node): "
                        f"{described}")
        else:
            report._add("keys-consistent", OK,
                        f"{len(folders)} nodes hold the same data keys and current key")


def _keyring_problems(folder: str, journal_ids: set[str],
                      seen: list[tuple[str, tuple[str, ...], str]]) -> list[str]:
    keys = os.path.join(folder, "keys")
    keyring_file = os.path.join(keys, "keyring.json")
    if not os.path.isdir(keys):
        return [f"no key folder {keys} (run serve-journal init-keys, or copy the keyring there)"]
    problems = [p for p in (_loose_mode(keys, 0o700),) if p]
    if not os.path.isfile(keyring_file):
        return [*problems, f"no keyring file {keyring_file}"]
    problems += [p for p in (_loose_mode(keyring_file),) if p]
    if os.environ.get(KEK_ENV):
        kek: Any = EnvKek()
    else:
        kek_file = os.path.join(keys, "kek")
        if not os.path.isfile(kek_file):
            return [*problems, f"no KEK: {KEK_ENV} is not set and there is no KEK file {kek_file}"]
        loose = _loose_mode(kek_file)
        if loose:
            return [*problems, loose]
        kek = FileKek(kek_file)
    try:
        keyring = Keyring(keyring_file, kek, create=False)
        ids = tuple(keyring.key_ids())
        current = keyring.current_key_id
    except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
        return [*problems, f"the keyring does not open: {type(exc).__name__}: {exc}"]
    seen.append((folder, ids, current))
    missing = sorted(journal_ids - set(ids))
    if missing:
        problems.append(f"the journal's entries name data key id(s) this keyring lacks: "
                        f"{', '.join(missing)} (features of those entries cannot be verified here)")
    return problems


def _check_counters_key(report: DoctorReport, storage: JournalStorage, folder: str,
                        signer: ManifestSigner | None) -> None:
    path = os.path.join(folder, "keys", COUNTERS_KEY_FILE)
    if not os.path.isfile(path):
        report._add("counters-key", PROBLEM,
                    f"no counters key {path} (run serve-journal init-keys and ship it with the "
                    "keyring)")
        return
    try:
        key = ManifestSigner.from_pem_file(path)
    except (OSError, ValueError) as exc:
        report._add("counters-key", PROBLEM, str(exc))
        return
    if signer is None:
        report._add("counters-key", SKIPPED,
                    f"{path} loads; its certificate is not checked without the signing key")
        return
    certified, _ = certified_keys(storage, signer.public_key, PURPOSE_COUNTERS)
    if key.key_id not in certified:
        report._add("counters-key", PROBLEM,
                    f"{path} (key id {key.key_id}) has no certificate in the journal signed by "
                    f"the signing key {signer.key_id}; run serve-journal init-keys")
    else:
        report._add("counters-key", OK, f"{path} (key id {key.key_id}) is certified by the "
                                        f"signing key")


def _check_signing_key(report: DoctorReport, storage: JournalStorage, journal_uri: str,
                       signing_key_file: str | None, public_key: str | None,
                       fingerprint: str | None) -> ManifestSigner | None:
    if signing_key_file is None:
        folder = signing_dir(journal_uri)
        if folder is None:
            report._add("signing-key", SKIPPED, "a remote journal: give --signing-key-file to "
                                                "check the signing key")
            return None
        signing_key_file = os.path.join(folder, SIGNING_KEY_FILE)
    if not os.path.isfile(signing_key_file):
        report._add("signing-key", PROBLEM, f"no signing key {signing_key_file}")
        return None
    try:
        signer = ManifestSigner.from_pem_file(signing_key_file)
    except (OSError, ValueError) as exc:  # a loose mode is a PermissionError naming the mode
        report._add("signing-key", PROBLEM, str(exc))
        return None
    actual = key_fingerprint(signer.public_key)
    problems: list[str] = []
    if public_key is not None:
        try:
            pinned = load_public_key(public_key)
        except (OSError, ValueError) as exc:
            problems.append(f"cannot read the pinned public key {public_key}: {exc}")
        else:
            if key_fingerprint(pinned) != actual:
                problems.append(f"{signing_key_file} (fingerprint {actual[:16]}...) is not the "
                                f"key of the pinned public key {public_key} (fingerprint "
                                f"{key_fingerprint(pinned)[:16]}...): auditors would reject "
                                "every signature")
    if fingerprint is not None:
        pin = fingerprint.strip().lower()
        if len(pin) < MIN_FINGERPRINT_DIGITS or not actual.startswith(pin):
            problems.append(f"{signing_key_file} has fingerprint {actual[:16]}..., not the pinned "
                            f"{pin[:16]}... (pin at least {MIN_FINGERPRINT_DIGITS} hex digits)")
    exported = exported_public_key_path(journal_uri)
    if exported is not None and os.path.isfile(exported) and signing_key_file.startswith(
            os.path.dirname(exported) + os.sep):
        try:
            if key_fingerprint(load_public_key(exported)) != actual:
                problems.append(f"the public key exported at {exported} is not {signing_key_file}'s "
                                "(run serve-journal init-keys to export it again)")
        except (OSError, ValueError) as exc:
            problems.append(f"cannot read the exported public key {exported}: {exc}")
    newest = _newest_checkpoint(storage)
    if newest is not None and newest.key_id != signer.key_id:
        problems.append(f"the journal's newest checkpoint ({newest.chain_id}, {newest.time}) was "
                        f"signed by key id {newest.key_id}, not by this key ({signer.key_id})")
    if problems:
        report._add("signing-key", PROBLEM, "; ".join(problems))
    else:
        pinned_by = ("the pinned public key" if public_key else
                     "the pinned fingerprint" if fingerprint else "nothing pinned (give "
                     "--public-key or --key-fingerprint to check it against the auditors' pin)")
        report._add("signing-key", OK, f"{signing_key_file}: owner-only, fingerprint "
                                       f"{actual[:16]}..., matches {pinned_by}")
    return signer


def _newest_checkpoint(storage: JournalStorage) -> Checkpoint | None:
    newest: Checkpoint | None = None
    for path in storage.list_files(f"{CHECKPOINT_PREFIX}/", ".json"):
        try:
            checkpoint = Checkpoint.from_json(storage.read(path))
        except (OSError, ValueError):
            continue  # verify reports unreadable checkpoints
        if newest is None or (checkpoint.time, checkpoint.chain_id) > (newest.time,
                                                                      newest.chain_id):
            newest = checkpoint
    return newest


# -- services -------------------------------------------------------------------------------------


def _check_object_lock(report: DoctorReport, storage: JournalStorage) -> None:
    bucket = getattr(storage, "bucket", None)
    client = getattr(storage, "client", None)
    if bucket is None or client is None:
        report._add("object-lock", SKIPPED, "not an s3:// journal")
        return
    try:
        response = client.get_object_lock_configuration(Bucket=bucket)
    except Exception as exc:  # noqa: BLE001 - botocore's errors name the code; any is the finding
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) or \
            type(exc).__name__
        report._add("object-lock", PROBLEM,
                    f"bucket {bucket} has no Object Lock configuration ({code}): journal files "
                    "could be overwritten or deleted; create the bucket with Object Lock enabled")
        return
    config = response.get("ObjectLockConfiguration", {})
    if config.get("ObjectLockEnabled") != "Enabled":
        report._add("object-lock", PROBLEM,
                    f"bucket {bucket}: Object Lock is not enabled ({config or 'no configuration'})")
        return
    rule = config.get("Rule", {}).get("DefaultRetention")
    report._add("object-lock", OK, f"bucket {bucket}: Object Lock enabled"
                + (f", default retention {rule}" if rule else
                   " (retention is set per object by the journal's policy)"))


def _check_broker(report: DoctorReport, bootstrap: str | None, topic: str | None,
                  timeout: float) -> None:
    if not bootstrap:
        report._add("broker", SKIPPED, "no --bootstrap given")
        return
    try:
        topics = asyncio.run(asyncio.wait_for(_broker_topics(bootstrap, timeout), timeout * 2))
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, timed out: the finding
        report._add("broker", PROBLEM, f"Kafka at {bootstrap} does not answer a metadata request "
                                       f"within {timeout:g} s ({type(exc).__name__}: {exc})")
        return
    if topic is not None and topic not in topics:
        report._add("broker", PROBLEM, f"Kafka at {bootstrap} answers but has no topic {topic!r}")
        return
    report._add("broker", OK, f"Kafka at {bootstrap} answers ({len(topics)} topic(s)"
                + (f", {topic!r} among them)" if topic else ")"))


async def _broker_topics(bootstrap: str, timeout: float) -> set[str]:
    from aiokafka import AIOKafkaClient  # inside: only doctor --bootstrap needs it

    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000),
                            connections_max_idle_ms=int(timeout * 2000) + 1000)
    try:
        await client.bootstrap()
        return set(client.cluster.topics())
    finally:
        await client.close()


def _check_registry(report: DoctorReport, tracking_uri: str | None, timeout: float) -> None:
    if not tracking_uri:
        report._add("registry", SKIPPED, "no --tracking-uri given")
        return
    scheme = urllib.parse.urlparse(tracking_uri).scheme
    try:
        if scheme in ("http", "https"):
            url = (tracking_uri.rstrip("/")
                   + "/api/2.0/mlflow/registered-models/search?max_results=1")
            with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - http(s) only
                json.loads(response.read())
        else:
            if scheme == "sqlite":
                path = tracking_uri.split(":///", 1)[-1]
                if not os.path.isfile(path):  # MLflow would create an empty registry there
                    raise FileNotFoundError(f"no registry database {path}")
            from mlflow.tracking import MlflowClient  # inside: ~1 s to import

            MlflowClient(tracking_uri=tracking_uri,
                         registry_uri=tracking_uri).search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure to answer is the finding
        report._add("registry", PROBLEM, f"the MLflow registry at {_redacted(tracking_uri)} does "
                                         f"not answer ({type(exc).__name__}: {exc})")
        return
    report._add("registry", OK, f"the MLflow registry at {_redacted(tracking_uri)} answers")


def _redacted(uri: str) -> str:
    """``uri`` without a password (``user:secret@host`` -> ``user:***@host``)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri
