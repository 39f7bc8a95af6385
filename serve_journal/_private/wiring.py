"""Wiring of one replica's journal: the parts a :class:`~serve_journal.config.JournalConfig` implies.

:func:`wire` builds them once, at replica start, in a fixed order: the model (resolved in the
registry first, so an unknown model fails replica start with a clear message), the replica's
identity, privacy (keyring, subject-key vault, pseudonymizer, sampling key, caller tokenizer), the
risk policy, metrics, storage and exact counters, the transport, the entry finalizer and the caller
verifier.
Nothing here runs on the request path; :mod:`~serve_journal._private.runtime` assembles the
parts into a running journal.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve_journal.config import ConfigError, JournalConfig
from serve_journal.integrity.certificates import (
    COUNTERS_KEY_FILE,
    PURPOSE_COUNTERS,
    is_published,
    provision_key,
)
from serve_journal.integrity.manifest import ManifestSigner
from serve_journal.metrics import JournalMetrics
from serve_journal.policy import RiskPolicy, build_policy
from serve_journal.privacy.identity import JwtVerifier
from serve_journal.privacy.keyring import KEK_ENV, PURPOSE_SAMPLING, Keyring
from serve_journal.privacy.subjects import VaultPseudonymizer
from serve_journal.privacy.tokens import CallerTokenizer
from serve_journal.privacy.vault import SubjectVault
from serve_journal.registry import ModelInfo, resolve_model
from serve_journal.sampling import Sampler, derive_sampling_key
from serve_journal.sink.settings import SinkSettings
from serve_journal.storage import JournalStorage, open_storage
from serve_journal.transport import Transport
from serve_journal.transport.memory import InMemoryTransport

from .counters import ReplicaCounters
from .entries import EntryFinalizer, ReplicaIdentity

TransportDropHook = Callable[[str, int, Any], None]
"""``on_drop(reason, count, entries)``: a transport dropped entries it had accepted."""


@dataclass
class ReplicaParts:
    """Everything the config implies for one replica process, built by :func:`wire`."""

    model: ModelInfo
    identity: ReplicaIdentity
    policy: RiskPolicy
    metrics: JournalMetrics
    storage: JournalStorage
    counters: ReplicaCounters
    transport: Transport
    finalizer: EntryFinalizer
    jwt: JwtVerifier | None


def replica_names() -> tuple[str | None, str, str]:
    """(app, deployment, replica) of this Serve replica; ``(None, "local", "pid<N>")`` outside
    Serve (a plain instance, tests)."""
    try:
        from ray import serve  # inside: imports Ray (~2 s); `import serve_journal` stays Ray-free

        ctx = serve.get_replica_context()
        rid = ctx.replica_id
        return ctx.app_name, rid.deployment_id.name, rid.unique_id
    except Exception:  # noqa: BLE001 - outside Serve (plain class, tests)
        return None, "local", f"pid{os.getpid()}"


def build_transport(config: JournalConfig, producer_id: str,
                    on_drop: TransportDropHook | None = None,
                    metrics: JournalMetrics | None = None) -> Transport:
    """The transport the config names, built inside the replica.

    ``on_drop(reason, count, entries)`` hears of entries a transport accepted and then dropped;
    ``metrics`` receives the transport's own gauges (the Kafka spool's depth and bytes).
    """
    if config.transport == "actors":
        from serve_journal.transport.actors import RayActorTransport  # inside: imports Ray (~2 s)

        return RayActorTransport(
            SinkSettings.from_config(config), pool_size=config.writer_pool_size,
            namespace=config.writer_namespace, producer_id=producer_id,
        )
    if config.transport == "memory":
        return InMemoryTransport.shared(config.extra.get("memory_transport", "default"))
    if config.transport == "kafka":
        try:
            from serve_journal.transport import kafka  # inside: the Kafka stack, only when used
        except ImportError as exc:  # pragma: no cover
            raise ConfigError("transport='kafka' needs aiokafka: pip install aiokafka") from exc
        settings = dict(config.extra.get("kafka", {}))
        # One spool per replica process: a spool directory is never shared. The live replicas
        # on a node drain the spools that dead ones left in the same base directory.
        base = settings.pop("spool_dir", None) or os.path.join(
            os.path.expanduser("~"), ".serve_journal", "spool")
        settings["spool_dir"] = os.path.join(base, producer_id)
        settings.setdefault("client_id", producer_id)
        return kafka.KafkaTransport(kafka.KafkaSettings.from_mapping(settings), on_drop=on_drop,
                                    metrics=metrics)
    raise ConfigError(f"unknown transport {config.transport!r}")


def require_key_material(directory: str) -> None:
    """Outside development mode a replica never makes its own keys (each node would make
    different ones, and tokens would differ between nodes): the KEK (``SERVE_JOURNAL_KEK`` or
    ``<dir>/keys/kek``) and the keyring must be provisioned (``serve-journal init-keys``)."""
    keys = os.path.join(directory, "keys")
    missing = []
    if not os.environ.get(KEK_ENV) and not os.path.exists(os.path.join(keys, "kek")):
        missing.append(f"a KEK ({KEK_ENV} or {os.path.join(keys, 'kek')})")
    if not os.path.exists(os.path.join(keys, "keyring.json")):
        missing.append(f"a keyring ({os.path.join(keys, 'keyring.json')})")
    if missing:
        raise ConfigError(
            f"no key material: missing {' and '.join(missing)}; provision it with "
            "`serve-journal init-keys` and ship it to every node, or set dev_mode=True "
            "(SERVE_JOURNAL_DEV_MODE=1) to generate it (development only)")


def counters_key_path(config: JournalConfig) -> str:
    """Where the replicas' counters key is: ``counters_key_file`` or
    ``<privacy_dir>/keys/counters-signing.pem``."""
    return config.counters_key_file or os.path.join(config.resolved_privacy_dir(), "keys",
                                                    COUNTERS_KEY_FILE)


def build_counters_signer(config: JournalConfig, storage: JournalStorage) -> ManifestSigner:
    """The key a replica signs its exact counters with, certified by the journal's manifest key.

    Outside development mode it must be provisioned (``serve-journal init-keys``) and its
    certificate be in the journal; in development mode a missing one is made and certified with
    the journal's signing key. A replica never holds the manifest key itself otherwise."""
    path = counters_key_path(config)
    if config.dev_mode:
        return provision_key(path, SinkSettings.from_config(config).signer(), storage)
    if not os.path.exists(path):
        raise ConfigError(
            f"no counters signing key at {path}: provision it with `serve-journal init-keys` "
            "and ship it with the keyring, or set dev_mode=True (development only)")
    signer = ManifestSigner.from_pem_file(path)
    if not is_published(storage, PURPOSE_COUNTERS, signer.public_key):
        raise ConfigError(
            f"the counters key at {path} has no certificate in the journal: run "
            "`serve-journal init-keys` against this journal (verify would reject its counters)")
    return signer


def build_privacy(config: JournalConfig) -> tuple[VaultPseudonymizer, bytes]:
    """(pseudonymizer, sampling key) of a replica: the keyring and the per-subject key vault."""
    directory = config.resolved_privacy_dir()
    if not config.dev_mode:
        require_key_material(directory)
    keyring = Keyring.local_default(directory)
    if config.vault_url:
        vault = SubjectVault.open(config.vault_url, keyring)
    else:
        vault = SubjectVault.local_default(directory, keyring)
    return (VaultPseudonymizer(keyring, vault),
            derive_sampling_key(keyring.purpose_key(PURPOSE_SAMPLING)))


def build_caller_tokenizer(config: JournalConfig, keyring: Keyring) -> CallerTokenizer | None:
    """With ``caller_privacy="token"``: the caller tokenizer, its key loaded (or added to the
    keyring) now, so a keyring problem fails replica start rather than a flush."""
    if config.caller_privacy != "token":
        return None
    tokenizer = CallerTokenizer(keyring)
    tokenizer.tokenize_many([])
    return tokenizer


def build_jwt(config: JournalConfig) -> JwtVerifier | None:
    """The verifier of callers' bearer tokens, when the config names a public key."""
    if config.caller_jwt_public_key is None:
        return None
    return JwtVerifier(config.jwt_public_key_pem(), issuer=config.caller_jwt_issuer,
                       audience=config.caller_jwt_audience)


def wire(config: JournalConfig) -> ReplicaParts:
    """Build every part of one replica's journal from its config (see the module docstring)."""
    # With the MLmodel digest: a deployment that loads its model itself still records which
    # logged model the version named at replica start (load_model pins the full digest).
    model = resolve_model(config.model, config.model_version, config.tracking_uri,
                          with_digest=True)
    app, deployment, replica = replica_names()
    identity = ReplicaIdentity(
        producer_id=f"{deployment}-{replica}-{uuid.uuid4().hex[:8]}",
        app_name=app, deployment=deployment, replica=replica,
    )
    pseudonymizer, sampling_key = build_privacy(config)
    policy = build_policy(config.risk_policy)
    metrics = JournalMetrics(model.name, deployment, replica)
    storage = open_storage(config.journal_uri, retention=config.retention)
    counters = ReplicaCounters(identity.producer_id, metrics, policy.default_tier.name, storage,
                               build_counters_signer(config, storage))
    transport = build_transport(config, identity.producer_id, counters.transport_drops, metrics)
    finalizer = EntryFinalizer(config, pseudonymizer, identity, Sampler(policy, sampling_key),
                               build_caller_tokenizer(config, pseudonymizer.keyring))
    return ReplicaParts(model=model, identity=identity, policy=policy, metrics=metrics,
                        storage=storage, counters=counters, transport=transport,
                        finalizer=finalizer, jwt=build_jwt(config))
