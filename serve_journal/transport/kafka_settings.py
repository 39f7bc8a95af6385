"""Settings and partitioning of the Kafka transport's producer side.

:class:`KafkaSettings` is validated when built (on the driver) and turned into aiokafka client
arguments in the replica; :class:`ModelBucketShardPartitioner` routes each entry by
``(model, time bucket, shard)``. The transport itself is :mod:`serve_journal.transport.kafka`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from serve_journal.transport.kafka_security import KafkaSecurity


@dataclass(frozen=True)
class KafkaSettings(KafkaSecurity):
    """Producer side of the Kafka path; validated on construction, clients built at start."""

    bootstrap_servers: str
    """Comma-separated ``host:port`` list."""
    topic: str = "serve-journal"
    enable_idempotence: bool = True
    """Keep on for real Kafka; the tansu test broker lacks InitProducerId, so tests set False."""
    num_partitions: int | None = None
    """Partitions to route over; ``None`` asks the broker's metadata for the topic."""
    shards_per_model: int = 4
    """How many partitions one model spreads over within one time bucket."""
    bucket_seconds: int = 60
    """Width of a time bucket; a model's partitions rotate from bucket to bucket."""
    linger_ms: int = 5
    max_batch_size: int = 1024 * 1024
    compression_type: str | None = None
    request_timeout_ms: int = 10_000
    send_timeout_s: float = 10.0
    """Unacknowledged after this long: the entries go to the spool."""
    queue_max_batches: int = 256
    """Batches waiting for the background loop; at it ``has_room()`` is false (backpressure)."""
    spool_dir: str | None = None
    """One directory per producer process (a lock enforces it); default below the temp dir."""
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_segment_bytes: int = 16 * 1024 * 1024
    retry_backoff_s: float = 0.25
    retry_backoff_max_s: float = 5.0
    adopt_orphan_spools: bool = True
    """Drain the spools that dead producers of the same brokers and topic left beside ours."""
    orphan_scan_interval_s: float = 30.0
    """How often to look for such spools (also once at start)."""
    client_id: str = "serve-journal"

    def __post_init__(self) -> None:
        if not isinstance(self.bootstrap_servers, str) or not self.bootstrap_servers.strip():
            raise ValueError("bootstrap_servers must be a non-empty 'host:port[,host:port]' string")
        if not isinstance(self.topic, str) or not self.topic or not all(
            c.isalnum() or c in "._-" for c in self.topic
        ):
            raise ValueError(f"topic must be a Kafka topic name of [A-Za-z0-9._-], got {self.topic!r}")
        for name in ("shards_per_model", "bucket_seconds", "queue_max_batches", "spool_max_bytes",
                     "spool_segment_bytes", "max_batch_size", "request_timeout_ms"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_partitions is not None and (not isinstance(self.num_partitions, int) or self.num_partitions < 1):
            raise ValueError(f"num_partitions must be a positive integer or None, got {self.num_partitions!r}")
        for name in ("send_timeout_s", "retry_backoff_s", "retry_backoff_max_s", "orphan_scan_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.retry_backoff_s > self.retry_backoff_max_s:
            raise ValueError(f"retry_backoff_s ({self.retry_backoff_s}) must not exceed "
                             f"retry_backoff_max_s ({self.retry_backoff_max_s})")
        if self.linger_ms < 0:
            raise ValueError(f"linger_ms must be >= 0, got {self.linger_ms!r}")
        super().__post_init__()  # the TLS/SASL fields

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> KafkaSettings:
        """Build from a plain mapping (e.g. ``JournalConfig.extra["kafka"]``); unknown keys refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown Kafka setting(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    @property
    def spool_label(self) -> str:
        """What marks this deployment's spools, so only they are adopted (brokers and topic)."""
        return f"kafka {self.bootstrap_servers} {self.topic}"

    def resolved_spool_dir(self) -> str:
        """``spool_dir``, or ``<temp dir>/serve-journal-spool/<topic>/<client_id>``."""
        if self.spool_dir:
            return self.spool_dir
        return os.path.join(tempfile.gettempdir(), "serve-journal-spool", self.topic, self.client_id)

    def producer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``aiokafka.AIOKafkaProducer`` (acks is always ``"all"``)."""
        return {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "acks": "all",
            "enable_idempotence": self.enable_idempotence,
            "linger_ms": self.linger_ms,
            "max_batch_size": self.max_batch_size,
            "max_request_size": max(self.max_batch_size, 1024 * 1024),
            "compression_type": self.compression_type,
            "request_timeout_ms": self.request_timeout_ms,
            **self.client_kwargs(),
        }


def stable_hash(data: bytes) -> int:
    """A hash that is the same in every process and Python version (unlike ``hash()``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


@dataclass(frozen=True)
class ModelBucketShardPartitioner:
    """Routes an entry by ``(model, time bucket, shard)``.

    ``shard = stable_hash(request_id) % shards_per_model``; the partition is
    ``(stable_hash(model|bucket) + shard) % num_partitions``: the shards of one model and bucket
    take *consecutive* partitions from a hashed start, so they never collide (a hash per shard
    would put two shards of a hot model on one partition about a third of the time), and the
    start moves with every bucket, so over time every model uses every partition.
    """

    shards_per_model: int = 4
    bucket_seconds: int = 60

    def key(self, model: str, ts_us: int, request_id: str) -> bytes:
        """The message key: ``<model>|<bucket>|<shard>``."""
        bucket = ts_us // (self.bucket_seconds * 1_000_000)
        shard = stable_hash(request_id.encode()) % self.shards_per_model
        return f"{model}|{bucket}|{shard}".encode()

    def partition(self, key: bytes, num_partitions: int) -> int:
        """The partition of a key made by :meth:`key`."""
        head, _, shard = key.rpartition(b"|")
        return (stable_hash(head) + int(shard)) % num_partitions


__all__ = ["KafkaSettings", "ModelBucketShardPartitioner", "stable_hash"]
