"""Running Kafka sinks, always with manifest records: :class:`KafkaSinkRunner` and its flavours.

:class:`KafkaSinkRunner` is the one way to run a :class:`~serve_journal.sink.kafka.KafkaSink`: it
gives the sink a manifest chain of its own (:func:`sink_manifest_hook`), so that every file the
sink writes, or finds written by a run that died before recording it, gets a record; it
checkpoints (signs) the chain every ``checkpoint_interval_s`` and when the sink stops. So
``serve-journal verify`` covers the Kafka path exactly like the actor path. Every sink consumes
a fixed set of partitions (manual assignment, no group rebalancing) and writes Parquet through
create-only deterministic names. Three ways to run one, all through the runner:

* :func:`run_journal_sink`: the ``serve-journal sink`` command, in the foreground until
  SIGINT/SIGTERM;
* :class:`KafkaSinkActor`: the body of an async Ray actor
  (``ray.remote(KafkaSinkActor).options(name=..., max_restarts=-1).remote(settings, uri)``);
* :func:`app_builder`: the Serve application (``deployments/kafka-sink.yaml``), one deployment per
  partition group, each with one replica (:class:`KafkaSinkReplica`) that consumes in a background
  thread, plus a small ingress (:class:`SinkStatus`) answering ``GET /`` with every sink's offsets
  and lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from serve_journal.catalog.layout import HOT
from serve_journal.errors import ManifestError
from serve_journal.integrity.manifest import (
    ManifestLog,
    ManifestRecord,
    build_file_record,
    record_path,
)
from serve_journal.metrics import JournalMetrics
from serve_journal.sink.kafka import (
    DEFAULT_ROLL_SECONDS,
    KafkaSink,
    KafkaSinkSettings,
    parse_partitions,
)
from serve_journal.sink.offsets import unsigned_tails
from serve_journal.sink.settings import (
    ManifestHook,
    SinkSettings,
    manifest_hook,
    publish_table_quietly,
)
from serve_journal.storage import JournalStorage, StoredObject

logger = logging.getLogger(__name__)


def _sink_chain(settings: SinkSettings, storage: JournalStorage, topic: str,
                partitions: Sequence[int]) -> ManifestLog:
    """A new manifest chain ``k-<topic>-p<first>-<last>-<random>`` for one run of one sink."""
    chain_id = f"k-{topic}-p{min(partitions)}-{max(partitions)}-{uuid.uuid4().hex[:8]}"
    return settings.manifest(storage, chain_id)


def sink_manifest_hook(journal_uri: str, topic: str, partitions: tuple[int, ...],
                       **sink_options: Any) -> tuple[ManifestLog, ManifestHook]:
    """A manifest chain of its own for one sink process, and the hook that records its files.

    ``sink_options`` are further :class:`SinkSettings` fields (``witness_uri``, ...).
    """
    settings = SinkSettings(journal_uri=journal_uri, **sink_options)
    log = _sink_chain(settings, settings.storage(), topic, partitions)
    return log, manifest_hook(log)


METRICS_DEPLOYMENT = "kafka-sink"
"""The ``deployment`` label of a Kafka sink's metrics (``replica``: its chain id, ``model``: ``*``)."""

METRICS_REPORT_S = 5.0
"""How often a running sink hands its metrics to Ray."""

SEAL_ATTEMPTS = 12
"""Checkpoints (after its rebuilds) at which a run tries to sign a dead run's unsigned tail."""

_CHAIN_FIELDS = ("created", "chain_id", "index", "prev_hash", "record_hash")


class KafkaSinkRunner:
    """One sink with its manifest chain: the one way to run a Kafka sink (module docstring).

    Call :meth:`start`, then :meth:`run` until a stop event; :meth:`close` (also at the end of
    :meth:`run`) stops consuming and checkpoints. A new runner after a crash or a restart
    recovers its offsets from the signed records in storage and starts a new chain.
    :attr:`metrics` counts the rows it writes and their persistence lag (entry time to durable),
    reported to Ray every :data:`METRICS_REPORT_S` when the process is connected to Ray.
    """

    def __init__(self, settings: KafkaSinkSettings, journal: SinkSettings) -> None:
        storage = journal.storage()
        self.journal = journal
        self.log = _sink_chain(journal, storage, settings.topic, settings.partitions)
        self.metrics = JournalMetrics("*", METRICS_DEPLOYMENT, self.log.chain_id)
        self.sink = KafkaSink(settings, storage, on_file_written=self._record,
                              public_key=self.log.signer.public_key,
                              on_rows_durable=self._observe_file)
        self.checkpoint_interval_s = journal.checkpoint_interval_s
        self._tails: dict[str, int] = {}
        self._recorded: dict[str, ManifestRecord] = {}
        self._seal_attempts = 0
        self._published_length = 0

    def _record(self, stored: StoredObject, table: pa.Table) -> None:
        record = self.log.append(build_file_record(stored, table, HOT, self.log.chain_id))
        if self._tails:  # kept only while a dead run's tail may still be signed
            self._recorded[record.path] = record

    def __repr__(self) -> str:
        return f"KafkaSinkRunner({self.sink!r}, chain={self.log.chain_id!r})"

    async def start(self) -> dict[int, int]:
        """Recover the offsets from storage and connect; returns where each partition resumes."""
        settings = self.sink.settings
        self._tails = await asyncio.to_thread(
            unsigned_tails, self.sink.storage, settings.topic, settings.partitions,
            self.log.signer.public_key, self.log.chain_id)
        await self.sink.start()
        return dict(self.sink.next_offsets)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, checkpointing every ``checkpoint_interval_s`` and
        reporting metrics; then :meth:`close`, also when consuming failed."""
        background = [asyncio.create_task(self._checkpoints()), asyncio.create_task(self._reports())]
        try:
            await self.sink.run(stop)
        finally:
            for task in background:
                task.cancel()
            await self.close()

    async def close(self) -> None:
        """Stop consuming, checkpoint the chain and report metrics; closing twice is harmless.
        Chunks not yet written are consumed again by the next run."""
        await self.sink.stop()
        await asyncio.to_thread(self.checkpoint)
        await asyncio.to_thread(self.metrics.report)

    def _observe_file(self, stored: StoredObject, table: pa.Table) -> None:
        """Rows, bytes and per-entry persistence lag of a file this sink made durable."""
        self.metrics.observe_sink_file(table.column("ts").cast(pa.int64()).to_pylist(),
                                       stored.size, time.time_ns() // 1000)

    async def _reports(self) -> None:
        while True:
            await asyncio.sleep(METRICS_REPORT_S)  # a period, not a wait for state
            await asyncio.to_thread(self.metrics.report)

    def checkpoint(self) -> None:
        """Sign the chain's head if it grew, then (once the rebuilds are done) the tails of dead
        runs this run re-derived; a failure is logged and retried next time."""
        try:
            signed = self.log.length
            self.log.checkpoint()
            if self._tails and self.sink.rebuilt:
                self._seal_dead_tails(signed)
        except Exception:  # noqa: BLE001 - retried at the next interval; verify shows the lag
            logger.warning("kafka sink: manifest checkpoint of %s failed", self.log.chain_id,
                           exc_info=True)
            return
        # Signed files go to the Iceberg table (when configured); retried at the next checkpoint.
        if self.journal.iceberg is not None and signed != self._published_length \
                and publish_table_quietly(self.journal, self.sink.storage, "sink"):
            self._published_length = signed

    def _seal_dead_tails(self, signed_length: int) -> None:
        """Sign the unsigned tail of a dead run's chain when each of its records describes,
        field for field, a file this run recorded (and so checked against Kafka) under a
        signature of its own: then the dead chain vouches for nothing new, and verify no longer
        reports its tail once the grace period is over. Tried :data:`SEAL_ATTEMPTS` times."""
        self._seal_attempts += 1
        storage = self.sink.storage
        for chain_id, signed in sorted(self._tails.items()):
            try:
                dead = self.journal.manifest(storage, chain_id)
                tail = [ManifestRecord.from_json(storage.read(record_path(chain_id, i)))
                        for i in range(signed, dead.length)]
            except (ManifestError, OSError):
                continue
            if all(self._matches_recorded(record, signed_length) for record in tail):
                dead.checkpoint()
                logger.info("kafka sink: signed the %d-record tail of dead run %s (every file "
                            "re-derived from Kafka)", len(tail), chain_id)
                del self._tails[chain_id]
        if not self._tails or self._seal_attempts >= SEAL_ATTEMPTS:
            self._tails.clear()
            self._recorded.clear()

    def _matches_recorded(self, record: ManifestRecord, signed_length: int) -> bool:
        ours = self._recorded.get(record.path)
        if ours is None or ours.index >= signed_length:
            return False
        # Field for field as values, not as stored: a dead run of an earlier release wrote its
        # records in format 1 (runs as lists), this run writes format 2 (runs packed).
        return all(getattr(record, f.name) == getattr(ours, f.name)
                   for f in dataclasses.fields(ManifestRecord)
                   if f.name not in _CHAIN_FIELDS and f.name != "format")

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_interval_s)  # a period, not a wait for state
            await asyncio.to_thread(self.checkpoint)

    def lag_state(self) -> dict[str, Any]:
        """The sink's next offsets and counters."""
        return self.sink.lag_state()


def connect_ray_for_metrics() -> bool:
    """Connect to the Ray cluster this process runs under (``RAY_ADDRESS``: set for a
    ``ray job submit`` entrypoint), so the sink's metrics reach Ray's Prometheus endpoint.
    ``False`` (metrics kept locally only) outside a Ray job or when connecting fails."""
    if not os.environ.get("RAY_ADDRESS"):
        return False
    try:
        import ray  # inside: imports Ray (~2 s), only for a sink started as a Ray job

        if not ray.is_initialized():
            ray.init(log_to_driver=False)
    except Exception:  # noqa: BLE001 - metrics are best effort; the sink runs all the same
        logger.warning("kafka sink: could not connect to Ray at RAY_ADDRESS; metrics stay local",
                       exc_info=True)
        return False
    return True


KAFKA_PASSWORD_ENV = {"sasl_plain_password": "SERVE_JOURNAL_KAFKA_SASL_PASSWORD",
                      "ssl_password": "SERVE_JOURNAL_KAFKA_SSL_PASSWORD"}
"""Where a sink takes Kafka secrets from when its settings do not hold them (never a YAML file)."""


def sink_settings(bootstrap_servers: str, topic: str, partitions: str, journal_uri: str, *,
                  roll_seconds: float = DEFAULT_ROLL_SECONDS,
                  checkpoint_interval_s: float = 5.0,
                  kafka: Mapping[str, Any] | None = None,
                  journal: Mapping[str, Any] | None = None,
                  ) -> tuple[KafkaSinkSettings, SinkSettings]:
    """The consumer's and the writer's settings of one sink, from flat options: ``kafka`` holds
    :class:`~serve_journal.transport.kafka_security.KafkaSecurity` fields (TLS, SASL; passwords
    from :data:`KAFKA_PASSWORD_ENV` when not given), ``journal`` :class:`SinkSettings` fields
    (``signing_key_file``, ``witness_uri``, ``retention``: needed for ``s3://``)."""
    security = dict(kafka or {})
    for name, env in KAFKA_PASSWORD_ENV.items():
        if security.get(name) is None and os.environ.get(env):
            security[name] = os.environ[env]
    consumer = KafkaSinkSettings(bootstrap_servers=bootstrap_servers, topic=topic,
                                 partitions=parse_partitions(partitions),
                                 roll_seconds=roll_seconds, **security)
    writer = SinkSettings(journal_uri, checkpoint_interval_s=checkpoint_interval_s,
                          **dict(journal or {}))
    return consumer, writer


def run_journal_sink(bootstrap_servers: str, topic: str, partitions: str, journal_uri: str,
                     *, roll_seconds: float = DEFAULT_ROLL_SECONDS,
                     kafka: Mapping[str, Any] | None = None,
                     journal: Mapping[str, Any] | None = None) -> None:
    """The ``serve-journal sink`` command: consume until SIGINT/SIGTERM, recording manifests
    (see :func:`sink_settings` for ``kafka`` and ``journal``). Run as a Ray job, it reports its
    metrics to the cluster (:func:`connect_ray_for_metrics`)."""
    connect_ray_for_metrics()
    runner = KafkaSinkRunner(*sink_settings(bootstrap_servers, topic, partitions, journal_uri,
                                            roll_seconds=roll_seconds, kafka=kafka,
                                            journal=journal))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await runner.start()
            await runner.run(stop)
        finally:
            await runner.close()

    asyncio.run(main())


class KafkaSinkActor:
    """Body of an async Ray actor running one sink through :class:`KafkaSinkRunner`.

    Use ``ray.remote(KafkaSinkActor).options(name=..., max_restarts=-1).remote(settings, uri)``
    then ``await actor.start.remote()``; the actor consumes in the background until ``stop``.
    A restarted actor recovers its offsets from storage, so ``max_restarts`` is safe.
    ``sink_options`` are further :class:`SinkSettings` fields (``witness_uri``, ...).
    """

    def __init__(self, settings: KafkaSinkSettings, journal_uri: str, **sink_options: Any) -> None:
        self._runner = KafkaSinkRunner(settings, SinkSettings(journal_uri, **sink_options))
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> dict[int, int]:
        """Connect and start consuming; returns the offsets it resumes from."""
        if self._task is None:
            await self._runner.start()
            self._task = asyncio.create_task(self._runner.run(self._stop))
        return dict(self._runner.sink.next_offsets)

    async def stats(self) -> dict[str, Any]:
        """The sink's next offsets and counters; raises what stopped its loop, if anything did."""
        if self._task is not None and self._task.done():
            self._task.result()  # surface a crashed loop to the caller
        return self._runner.lag_state()

    async def stop(self) -> None:
        """Stop consuming and checkpoint."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await self._task
        await self._runner.close()


class KafkaSinkReplica:
    """A Serve replica that runs one sink over its partitions in a background thread."""

    def __init__(self, bootstrap_servers: str, topic: str, partitions: str, journal_uri: str,
                 roll_seconds: float = DEFAULT_ROLL_SECONDS, checkpoint_interval_s: float = 5.0,
                 kafka: Mapping[str, Any] | None = None,
                 journal: Mapping[str, Any] | None = None) -> None:
        self.runner = KafkaSinkRunner(*sink_settings(
            bootstrap_servers, topic, partitions, journal_uri, roll_seconds=roll_seconds,
            checkpoint_interval_s=checkpoint_interval_s, kafka=kafka, journal=journal))
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-journal-kafka-sink", daemon=True)
        self._thread.start()
        self._started.wait(60)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.runner.start()
            self._started.set()
            await self.runner.run(self._stop)

        asyncio.run(main())

    def stats(self) -> dict[str, Any]:
        """The sink's next offsets and counters, and this replica's process id."""
        return {"pid": os.getpid(), **self.runner.lag_state()}

    def __del__(self) -> None:
        # getattr: __init__ may have failed before these existed (bad settings), and Serve
        # still runs the graceful shutdown of such a replica.
        loop, stop = getattr(self, "_loop", None), getattr(self, "_stop", None)
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)
        thread = getattr(self, "_thread", None)
        if thread is not None:
            thread.join(timeout=30)


class SinkStatus:
    """The sink app's ingress: offsets and lag of every sink."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    async def __call__(self, request: Any) -> dict[str, Any]:
        """Every sink replica's :meth:`KafkaSinkReplica.stats`."""
        states = [await sink.stats.remote() for sink in self.sinks]
        return {"sinks": states}


def app_builder(args: dict[str, Any]) -> Any:
    """Serve config entry point: ``bootstrap``, ``topic``, ``journal_uri`` and ``partitions``
    (groups separated by ``;``, e.g. ``"0-3;4-7"``: one sink deployment per group); optional
    ``kafka`` (TLS/SASL fields, passwords from the environment, see :data:`KAFKA_PASSWORD_ENV`)
    and ``journal`` (``signing_key_file``, ``witness_uri``, ``retention``), mappings or JSON."""
    from ray import serve  # inside: ray.serve takes seconds to import; the CLI imports this module

    groups = [g.strip() for g in args["partitions"].split(";") if g.strip()]
    sinks = []
    for i, group in enumerate(groups):
        deployment = serve.deployment(KafkaSinkReplica, name=f"KafkaSink{i}", num_replicas=1,
                                      ray_actor_options={"num_cpus": float(args.get("num_cpus", 0.5))})
        sinks.append(deployment.bind(args["bootstrap"], args["topic"], group, args["journal_uri"],
                                     float(args.get("roll_seconds", DEFAULT_ROLL_SECONDS)),
                                     kafka=_mapping(args, "kafka"),
                                     journal=_mapping(args, "journal")))
    return serve.deployment(SinkStatus, name="SinkStatus").bind(*sinks)


def _mapping(args: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    value = args.get(name)
    if value is None or isinstance(value, Mapping):
        return None if value is None else dict(value)
    parsed = json.loads(value)
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a mapping (or its JSON), got {value!r}")
    return parsed


__all__ = [
    "KafkaSinkActor",
    "KafkaSinkReplica",
    "KafkaSinkRunner",
    "SinkStatus",
    "app_builder",
    "connect_ray_for_metrics",
    "KAFKA_PASSWORD_ENV",
    "METRICS_DEPLOYMENT",
    "run_journal_sink",
    "sink_manifest_hook",
    "sink_settings",
]
