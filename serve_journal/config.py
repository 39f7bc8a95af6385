"""Typed, frozen, validated configuration.

Validated when ``@journaled`` is applied (on the driver), shipped to replicas by pickling, and
turned into clients and threads only when a replica starts. Precedence for every field: the
argument, then the ``SERVE_JOURNAL_<FIELD>`` environment variable, then the default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve_journal.errors import ConfigError
from serve_journal.policy import build_policy
from serve_journal.privacy.identity import JwtVerifier
from serve_journal.storage import local_root

ENV_PREFIX = "SERVE_JOURNAL_"

TRANSPORTS = ("actors", "kafka", "memory")
CALLER_PRIVACY = ("plain", "token")
OVERFLOW_POLICIES = ("drop_newest",)


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


_MISSING = object()


FLUSH_INTERVAL_S = 0.1
"""The flusher's default interval (Kafka and the other transports)."""
ACTOR_FLUSH_INTERVAL_S = 0.25
"""The flusher's default interval on the actor path (see :meth:`JournalConfig.flush_interval`)."""


@dataclass(frozen=True)
class JournalConfig:
    """Everything ``@journaled`` needs, validated.

    Extractor hooks are plain picklable callables; ``None`` selects the built-in extractor that
    understands the common JSON shape ``{"subject_id": ..., "features": {...}}`` in and
    ``{"score": ..., "decision": ...}`` (or ``{"scores": {label: score}}``) out.
    """

    model: str
    """``models:/<name>@<alias>``, ``models:/<name>/<version>`` or a plain registered name."""
    model_version: str | None = None
    """Pin a version when ``model`` is a plain name; ``None`` means the latest version."""
    threshold: float | None = None
    journal_uri: str = "./journal"
    """Root of the journal: a local path or any ``pyarrow.fs`` URI (``s3://bucket/prefix``)."""
    tracking_uri: str | None = None
    """MLflow tracking/registry URI; ``None`` uses MLflow's own resolution (MLFLOW_TRACKING_URI)."""
    registry_refresh_s: float = 300.0
    """Re-resolve the model alias this often (seconds); also on every Serve reconfigure."""
    methods: tuple[str, ...] = ("__call__",)
    caller_header: str = "x-caller-id"
    subject_field: str = "subject_id"
    features_field: str = "features"
    caller_jwt_public_key: str | None = None
    """PEM public key (or a path to one): when set, HTTP callers must present a signed JWT
    (``Authorization: Bearer``); its ``sub`` is the caller identity."""
    caller_jwt_issuer: str | None = None
    caller_jwt_audience: str | None = None
    on_invalid_caller: str = "refuse"
    """``refuse`` (HTTP 401, journaled as outcome ``rejected`` with the reason) or ``anonymous``."""
    caller_privacy: str = "plain"
    """``plain`` records the caller identity as given; ``token`` records a keyed caller token
    (``ct-<hex>``, see :mod:`serve_journal.privacy.tokens`) instead, for callers who are people."""
    caller: Callable[..., str | None] | None = None
    subject: Callable[..., Any] | None = None
    features: Callable[..., Any] | None = None
    outputs: Callable[[Any], Any] | None = None
    top_k: int = 3
    buffer_capacity: int = 100_000
    flush_interval_s: float | None = None
    """How often the flusher sends what the replica buffered (a batch also goes as soon as
    ``flush_batch_size`` entries wait). ``None``: per transport (:meth:`flush_interval`)."""
    flush_batch_size: int = 2_000
    overflow: str = "drop_newest"
    transport: str = "actors"
    writer_pool_size: int = 2
    writer_namespace: str = "serve_journal"
    roll_seconds: float = 0.5
    roll_bytes: int = 64 * 1024 * 1024
    risk_policy: Any = None
    """Risk tiers and sampling: a mapping (see ``serve_journal.policy.RiskPolicy.from_dict``),
    ``"default"`` for the fraud example's policy, or ``None`` (keep everything, drop-newest when
    full)."""
    reserve_capacity: int = 1_000
    """Extra buffer room only refusal entries may use, so a fail-closed refusal is journaled too."""
    retention: str | None = None
    """Named retention policy for write-once storage (e.g. "SEC 17a-4"); ``extra["retention"]``
    takes a per-tier mapping. Selecting one on ``s3://`` turns on Object Lock writes."""
    witness_uri: str | None = None
    """Second location that receives a copy of every signed manifest checkpoint."""
    signing_key_file: str | None = None
    """Ed25519 PEM key (0600) that signs manifest checkpoints; default next to a local journal."""
    checkpoint_interval_s: float = 5.0
    counters_key_file: str | None = None
    """Ed25519 PEM key (0600) replicas sign their exact counters with: a narrow key the manifest
    key certifies (``serve-journal init-keys``); default ``<privacy_dir>/keys/counters-signing.pem``."""
    privacy_dir: str | None = None
    """Folder of the keyring (data keys wrapped under the KEK) and of the SQLite subject vault;
    default ``<journal>/../journal-keys`` for a local journal. The KEK comes from
    ``SERVE_JOURNAL_KEK`` or ``<privacy_dir>/keys/kek`` (0600)."""
    vault_url: str | None = None
    """Subject key vault: ``postgresql://...`` in production; default SQLite in ``privacy_dir``."""
    dev_mode: bool = False
    """Development mode: a replica or writer that finds no key material generates it (a KEK
    file, a keyring, a manifest signing key). Off, they refuse to start instead: provision keys
    with ``serve-journal init-keys`` or ``SERVE_JOURNAL_KEK`` and ``signing_key_file``."""
    gc_freeze: bool = True
    """Once the replica's ``__init__`` (the user's too) finished, move the start-up heap out of
    the garbage collector's reach (``gc.freeze()``), so that full collections, which otherwise
    walk every object the model and the libraries allocated, stall the replica for milliseconds
    instead of a tenth of a second. Turn off for code that relies on collecting start-up cycles."""
    iceberg_catalog: str | None = None
    """Publish the journal as an Apache Iceberg table in this catalog (``sqlite:///<file>``, a
    SQLAlchemy URL, ``https://<REST catalog>``, ``glue``, or a JSON object of pyiceberg catalog
    properties); sinks publish their files at every checkpoint. See docs/iceberg.md."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Settings for pluggable parts (e.g. ``{"kafka": {...}}``), validated where they are used."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError(f"model must be a registered model name or models:/ URI, got {self.model!r}")
        if self.threshold is not None and not (isinstance(self.threshold, int | float)):
            raise ConfigError(f"threshold must be a number, got {self.threshold!r}")
        _positive("registry_refresh_s", self.registry_refresh_s)
        if self.flush_interval_s is not None:
            _positive("flush_interval_s", self.flush_interval_s)
        _positive("roll_seconds", self.roll_seconds)
        _positive("checkpoint_interval_s", self.checkpoint_interval_s)
        for name in ("buffer_capacity", "flush_batch_size", "writer_pool_size", "roll_bytes", "top_k",
                     "reserve_capacity"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.risk_policy is not None:
            build_policy(self.risk_policy)  # raises ConfigError naming the wrong field
        if not isinstance(self.dev_mode, bool):
            raise ConfigError(f"dev_mode must be True or False, got {self.dev_mode!r}")
        if not isinstance(self.gc_freeze, bool):
            raise ConfigError(f"gc_freeze must be True or False, got {self.gc_freeze!r}")
        if self.on_invalid_caller not in ("refuse", "anonymous"):
            raise ConfigError(
                f"on_invalid_caller must be 'refuse' or 'anonymous', got {self.on_invalid_caller!r}")
        if self.caller_privacy not in CALLER_PRIVACY:
            raise ConfigError(
                f"caller_privacy must be one of {CALLER_PRIVACY}, got {self.caller_privacy!r}")
        if self.caller_jwt_public_key is not None:
            try:
                JwtVerifier(self.jwt_public_key_pem())
            except Exception as exc:
                raise ConfigError(
                    "caller_jwt_public_key must be a PEM public key or the path of one") from exc
        if self.iceberg_catalog is not None and not isinstance(self.iceberg_catalog, str):
            raise ConfigError("iceberg_catalog must be a catalog URI or a JSON object of catalog "
                              f"properties, got {type(self.iceberg_catalog).__name__}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        if not self.methods or not all(isinstance(m, str) for m in self.methods):
            raise ConfigError(f"methods must be a non-empty tuple of method names, got {self.methods!r}")
        for hook in ("caller", "subject", "features", "outputs"):
            value = getattr(self, hook)
            if value is not None and not callable(value):
                raise ConfigError(f"{hook} must be a callable or None, got {type(value).__name__}")

    def flush_interval(self) -> float:
        """The flusher's interval: ``flush_interval_s``, or by default 0.25 s on the actor path
        and 0.1 s on the others. Each batch costs a saturated replica CPU (finalize's and the
        send's fixed part: docs/benchmarks.md, Serving overhead), so fewer, larger batches serve
        more requests. The actor path's writers roll a file ``roll_seconds`` after its oldest
        entry's *capture*, so its interval sits inside that budget; the Kafka sink counts from
        the *send*, where the interval adds to persistence latency, so it stays short there."""
        if self.flush_interval_s is not None:
            return self.flush_interval_s
        return ACTOR_FLUSH_INTERVAL_S if self.transport == "actors" else FLUSH_INTERVAL_S

    @classmethod
    def resolve(cls, **arguments: Any) -> JournalConfig:
        """Build a config: arguments first, then ``SERVE_JOURNAL_*`` variables, then defaults."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(arguments) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; known options: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, spec in known.items():
            value = arguments.get(name, _MISSING)
            if value is None and name in arguments:
                value = _MISSING
            if value is _MISSING:
                raw = os.environ.get(_env_name(name))
                if raw is not None and raw != "":
                    value = _parse_env(name, spec, raw)
            if value is not _MISSING:
                if name == "methods" and isinstance(value, str):
                    value = (value,)
                elif name == "methods":
                    value = tuple(value)
                values[name] = value
        if "model" not in values:
            raise ConfigError("model is required: pass model='models:/<name>@<alias>' or set SERVE_JOURNAL_MODEL")
        return cls(**values)

    def jwt_public_key_pem(self) -> bytes:
        """The caller-JWT public key as PEM bytes (read from the file when a path was given)."""
        value = self.caller_jwt_public_key or ""
        if "-----BEGIN" in value:
            return value.encode()
        with open(value, "rb") as handle:
            return handle.read()

    def resolved_privacy_dir(self) -> str:
        """Where the keyring (and the default vault) live."""
        if self.privacy_dir:
            return os.path.abspath(self.privacy_dir)
        root = local_root(self.journal_uri)
        if root is None:
            raise ConfigError(
                "a remote journal needs privacy_dir (the keyring folder, present on every node) "
                "and usually vault_url=postgresql://... for the subject key vault"
            )
        return os.path.join(os.path.dirname(root), "journal-keys")

    def with_overrides(self, **changes: Any) -> JournalConfig:
        """A copy with some fields replaced, validated again."""
        return dataclasses.replace(self, **changes)


def dev_mode_from_env() -> bool:
    """``SERVE_JOURNAL_DEV_MODE`` as a bool (false when unset), for tools built without a
    :class:`JournalConfig` (sinks, compaction, lifecycle)."""
    raw = os.environ.get(_env_name("dev_mode"), "")
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")


def _parse_env(name: str, spec: dataclasses.Field, raw: str) -> Any:
    typ = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
    if typ.startswith("bool"):
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{_env_name(name)} must be true or false (1/0), got {raw!r}")
    try:
        if typ.startswith("int"):
            return int(raw)
        if typ.startswith("float"):
            return float(raw)
        if typ.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{_env_name(name)} must be a {typ.split(' ')[0]}, got {raw!r}") from exc
    if "Callable" in typ or typ.startswith("dict"):
        raise ConfigError(f"{name} cannot be set from the environment")
    return raw
