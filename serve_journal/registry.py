"""Model metadata from the MLflow registry, model artifact identities, and dataset manifests.

A replica resolves its model once at start, never per request; a deployment that loads its model
through :func:`serve_journal.load_model` pins what it loaded instead (``_private/models.py``).
A model's identity is its registered name and version, the run id of that version (immutable:
a registry admin can delete a version and recreate its number for other weights, never a run id)
and a digest of its artifact: ``sha256:<hex>`` over the manifest (path, size, SHA-256) of every
file of the artifact as downloaded (:func:`artifact_digest`), or, for a deployment that loads
the model itself, ``mlmodel-sha256:<hex>`` of the ``MLmodel`` file alone
(:func:`mlmodel_digest`: it names the logged model's uuid and run, not the weights).
:func:`fetch_model` downloads an exact version and digests what it downloaded;
:func:`check_artifact` tells replay whether the registry still holds the journaled artifact. The dataset manifest hash ties a model version to the exact files it
was trained on: a SHA-256 over a manifest listing every file's path, size and SHA-256. It is
logged as an artifact of the version's run and set as a tag on the model version; when a version
has no such tag, a hash over the run's MLflow dataset-input digests is used, and the entry records
which source it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from serve_journal.errors import ModelNotFoundError

DATASET_HASH_TAG = "serve_journal.dataset_hash"
MANIFEST_ARTIFACT = "serve_journal/dataset_manifest.json"

SOURCE_TAG = "tag"
SOURCE_MLFLOW_INPUTS = "mlflow_inputs"
SOURCE_NONE = "none"

ARTIFACT_DIGEST_PREFIX = "sha256:"
MLMODEL_DIGEST_PREFIX = "mlmodel-sha256:"
REGISTRY_META_FILE = "registered_model_meta"
"""Written into a download by MLflow's registry (the name and version it was fetched as): not
part of the artifact, so left out of its digest."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a name plus an alias, a version, or neither (latest)."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, model: str, version: str | None = None) -> ModelRef:
        """Parse ``models:/name@alias``, ``models:/name/version`` or a plain ``name``."""
        text = model.strip()
        if text.startswith("models:/"):
            body = text[len("models:/"):]
            if "@" in body:
                name, alias = body.split("@", 1)
                if not name or not alias:
                    raise ValueError(f"model URI must look like models:/<name>@<alias>, got {model!r}")
                return cls(name=name, alias=alias)
            name, _, ver = body.partition("/")
            if not name:
                raise ValueError(f"model URI must look like models:/<name>/<version>, got {model!r}")
            return cls(name=name, version=ver or version)
        if "/" in text or "@" in text:
            raise ValueError(f"model must be a registered name or a models:/ URI, got {model!r}")
        return cls(name=text, version=version)

    def __str__(self) -> str:
        if self.alias:
            return f"models:/{self.name}@{self.alias}"
        if self.version:
            return f"models:/{self.name}/{self.version}"
        return f"models:/{self.name}"


@dataclass(frozen=True)
class ModelInfo:
    """What an entry records about the model that decided."""

    name: str
    version: str
    dataset_hash: str | None
    dataset_hash_source: str
    run_id: str | None = None
    source: str | None = None
    """The artifact URI of the version (replay loads the model from it)."""
    digest: str | None = None
    """Identity of the artifact (:func:`artifact_digest` or :func:`mlmodel_digest`); ``None``
    when it could not be read."""

    @property
    def uri(self) -> str:
        """``models:/<name>/<version>``: this exact version, never an alias."""
        return f"models:/{self.name}/{self.version}"


def _client(tracking_uri: str | None):
    from mlflow.tracking import MlflowClient  # inside: MLflow takes 1.4 s to import

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def _model_version(client: Any, ref: ModelRef, tracking_uri: str | None) -> Any:
    try:
        if ref.alias:
            mv = client.get_model_version_by_alias(ref.name, ref.alias)
        elif ref.version:
            mv = client.get_model_version(ref.name, ref.version)
        else:
            versions = client.search_model_versions(f"name = '{ref.name}'")
            if not versions:
                raise ModelNotFoundError(f"registered model {ref.name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
    except ModelNotFoundError:
        raise
    except Exception as exc:  # MlflowException: RESOURCE_DOES_NOT_EXIST and friends
        raise ModelNotFoundError(
            f"model {ref} was not found in the MLflow registry at "
            f"{tracking_uri or os.environ.get('MLFLOW_TRACKING_URI') or 'the default tracking URI'}: "
            f"register it (mlflow.register_model) or fix the name/alias/version"
        ) from exc
    return mv


def _info(client: Any, mv: Any, digest: str | None = None) -> ModelInfo:
    dataset_hash, source = _dataset_hash(client, mv)
    return ModelInfo(
        name=mv.name,
        version=str(mv.version),
        dataset_hash=dataset_hash,
        dataset_hash_source=source,
        run_id=mv.run_id or None,
        source=mv.source,
        digest=digest,
    )


def resolve_model(model: str, version: str | None = None, tracking_uri: str | None = None, *,
                  with_digest: bool = False) -> ModelInfo:
    """Resolve a model reference to a version, its run id and dataset hash.

    With ``with_digest`` also the :func:`mlmodel_digest` of the version (one small download);
    ``digest`` stays ``None`` when that download fails (the version is still resolved).
    """
    ref = ModelRef.parse(model, version)
    client = _client(tracking_uri)
    mv = _model_version(client, ref, tracking_uri)
    info = _info(client, mv)
    if with_digest:
        try:
            with tempfile.TemporaryDirectory(prefix="serve-journal-mlmodel-") as tmp:
                path = _download_version(client, mv, tracking_uri, tmp, "MLmodel")
                info = replace(info, digest=mlmodel_digest(path))
        except Exception:  # noqa: BLE001 - an unreadable artifact leaves the digest unknown
            pass
    return info


def _download(artifact_uri: str, tracking_uri: str | None, dst: str) -> str:
    import mlflow.artifacts  # inside: MLflow takes 1.4 s to import

    # The registry URI too: models:/ URIs resolve through the registry, which otherwise is the
    # process-global one (whatever mlflow.set_registry_uri last named), not ``tracking_uri``.
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst,
                                               tracking_uri=tracking_uri,
                                               registry_uri=tracking_uri)


def _download_version(client: Any, mv: Any, tracking_uri: str | None, dst: str,
                      path: str = "") -> str:
    """Download the artifact (or the file ``path`` in it) of exactly the model version ``mv``.

    Through the version's download URI, not ``models:/<name>/<version>``: MLflow resolves a
    models:/ URI with the process-global registry URI (whatever ``mlflow.set_registry_uri`` last
    named, in a Ray worker the default), and by name again, so a version recreated between the
    lookup and the download would be fetched instead of the one looked up."""
    uri = client.get_model_version_download_uri(mv.name, str(mv.version))
    return _download(f"{uri.rstrip('/')}/{path}" if path else uri, tracking_uri, dst)


def artifact_digest(directory: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` over the manifest of every file of a downloaded model artifact (its
    registry metadata file left out): the same files give the same digest wherever they sit."""
    manifest = dataset_manifest(directory)
    files = tuple(row for row in manifest.files if row[0] != REGISTRY_META_FILE)
    return DatasetManifest(files).digest


def mlmodel_digest(path: str | os.PathLike[str]) -> str:
    """``mlmodel-sha256:<hex>`` of a model's ``MLmodel`` file (names its uuid, run and flavors)."""
    with open(path, "rb") as handle:
        return MLMODEL_DIGEST_PREFIX + hashlib.sha256(handle.read()).hexdigest()


def fetch_model(model: str, dst: str | os.PathLike[str], version: str | None = None,
                tracking_uri: str | None = None) -> tuple[ModelInfo, str]:
    """Resolve ``model`` (an alias is resolved once, here), download that exact version into
    ``dst`` and digest the files downloaded: ``(info with digest, local artifact directory)``.

    Load the model from the returned directory, so the digest is of the bytes that serve.
    """
    ref = ModelRef.parse(model, version)
    client = _client(tracking_uri)
    mv = _model_version(client, ref, tracking_uri)
    info = _info(client, mv)
    local = _download_version(client, mv, tracking_uri, str(dst))
    return replace(info, digest=artifact_digest(local)), local


@dataclass(frozen=True)
class ArtifactCheck:
    """Whether the registry still holds the artifact an entry names (:func:`check_artifact`)."""

    ok: bool
    reason: str | None = None
    """Why not, naming what differs (never a feature value)."""
    path: str | None = None
    """The downloaded artifact directory (``ok`` and a full digest), to load the model from."""
    differs: str | None = None
    """What differs when not ``ok``: ``"run_id"`` or ``"digest"``."""


def check_artifact(name: str, version: str, run_id: str | None, digest: str | None, dst: str,
                   tracking_uri: str | None = None) -> ArtifactCheck:
    """Download ``models:/<name>/<version>`` into ``dst`` and compare it with the identity an
    entry recorded: the version's run id, then the digest of the same kind. A field the entry
    does not carry (schema version 1, or unknown when journaled) is not compared."""
    client = _client(tracking_uri)
    mv = _model_version(client, ModelRef(name=name, version=str(version)), tracking_uri)
    if run_id and mv.run_id != run_id:
        return ArtifactCheck(False, f"models:/{name}/{version} now belongs to run "
                                    f"{mv.run_id!r}, the entry names run {run_id!r}",
                             differs="run_id")
    uri = f"models:/{name}/{version}"
    # The files of the version whose run id was just compared (not the name looked up again).
    if digest and digest.startswith(MLMODEL_DIGEST_PREFIX):
        found = mlmodel_digest(_download_version(client, mv, tracking_uri, dst, "MLmodel"))
        path = None
    else:
        path = _download_version(client, mv, tracking_uri, dst)
        found = artifact_digest(path)
    if digest and found != digest:
        return ArtifactCheck(False, f"the artifact of {uri} has digest {found}, the entry "
                                    f"names {digest}", differs="digest")
    return ArtifactCheck(True, None, path)


def _dataset_hash(client: Any, mv: Any) -> tuple[str | None, str]:
    tag = (mv.tags or {}).get(DATASET_HASH_TAG)
    if tag:
        return tag, SOURCE_TAG
    if mv.run_id:
        try:
            run = client.get_run(mv.run_id)
        except Exception:  # noqa: BLE001 - a deleted run leaves the hash unknown, not the replica dead
            return None, SOURCE_NONE
        digests = sorted(
            d.dataset.digest for d in (run.inputs.dataset_inputs or []) if d.dataset.digest
        )
        if digests:
            joined = "\n".join(digests).encode()
            return "sha256:" + hashlib.sha256(joined).hexdigest(), SOURCE_MLFLOW_INPUTS
    return None, SOURCE_NONE


@dataclass(frozen=True)
class DatasetManifest:
    """Every file of a dataset with its size and SHA-256, and the hash over that list."""

    files: tuple[tuple[str, int, str], ...]

    @property
    def digest(self) -> str:
        """``sha256:<hex>`` over the canonical JSON of the file list."""
        return "sha256:" + hashlib.sha256(self.to_json().encode()).hexdigest()

    def to_json(self) -> str:
        rows = [{"path": p, "size": s, "sha256": h} for p, s, h in self.files]
        return json.dumps({"version": 1, "files": rows}, sort_keys=True, separators=(",", ":"))


def dataset_manifest(paths: list[str | os.PathLike[str]] | str | os.PathLike[str]) -> DatasetManifest:
    """Build the manifest of the files under ``paths`` (files or directories, recursively).

    Paths in the manifest are relative to the directory given (or the file's name), so the
    same data in another place hashes the same.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    rows: list[tuple[str, int, str]] = []
    for given in paths:
        root = Path(given)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file())
            names = [(p, p.relative_to(root).as_posix()) for p in files]
        elif root.is_file():
            names = [(root, root.name)]
        else:
            raise FileNotFoundError(f"dataset path does not exist: {given}")
        for path, name in names:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            rows.append((name, path.stat().st_size, digest.hexdigest()))
    rows.sort()
    return DatasetManifest(tuple(rows))


def register_dataset_manifest(
    name: str, version: str, paths: list[str | os.PathLike[str]] | str | os.PathLike[str],
    tracking_uri: str | None = None,
) -> DatasetManifest:
    """Compute the manifest, log it as an artifact of the version's run, tag the version."""
    manifest = dataset_manifest(paths)
    client = _client(tracking_uri)
    mv = client.get_model_version(name, version)
    if mv.run_id:
        client.log_dict(mv.run_id, json.loads(manifest.to_json()), MANIFEST_ARTIFACT)
    client.set_model_version_tag(name, version, DATASET_HASH_TAG, manifest.digest)
    return manifest
