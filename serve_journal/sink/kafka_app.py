"""Running Kafka sinks: the ``serve-journal sink`` command and a Serve application.

Every sink consumes a fixed set of partitions (manual assignment, no group rebalancing), writes
Parquet through create-only deterministic names and records each file in its own manifest chain,
so ``serve-journal verify`` covers the Kafka path exactly like the actor path.

The Serve application (``deployments/kafka-sink.yaml``) runs one deployment per partition group,
each with one replica that consumes in a background thread, plus a small ingress answering
``GET /`` with every sink's offsets and lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import uuid
from typing import Any

from serve_journal.sink.kafka import (
    DEFAULT_ROLL_SECONDS,
    KafkaSink,
    KafkaSinkSettings,
    parse_partitions,
    run_sink,
)
from serve_journal.sink.settings import SinkSettings, manifest_hook


def sink_manifest_hook(journal_uri: str, topic: str, partitions: tuple[int, ...], **sink_options: Any):
    """A manifest chain of its own for one sink process, and the hook that records its files."""
    settings = SinkSettings(journal_uri=journal_uri, **sink_options)
    storage = settings.storage()
    first, last = min(partitions), max(partitions)
    chain_id = f"k-{topic}-p{first}-{last}-{uuid.uuid4().hex[:8]}"
    log = settings.manifest(storage, chain_id)
    return log, manifest_hook(log)


def run_journal_sink(bootstrap_servers: str, topic: str, partitions: str, journal_uri: str,
                     *, roll_seconds: float = DEFAULT_ROLL_SECONDS, witness_uri: str | None = None,
                     signing_key_file: str | None = None) -> None:
    """The ``serve-journal sink`` command: consume until SIGINT/SIGTERM, recording manifests."""
    parts = parse_partitions(partitions)
    log, hook = sink_manifest_hook(journal_uri, topic, parts, witness_uri=witness_uri,
                                   signing_key_file=signing_key_file)
    try:
        run_sink(bootstrap_servers, topic, parts, journal_uri, on_file_written=hook,
                 roll_seconds=roll_seconds)
    finally:
        with contextlib.suppress(Exception):
            log.checkpoint()


class KafkaSinkReplica:
    """A Serve replica that runs one sink over its partitions in a background thread."""

    def __init__(self, bootstrap_servers: str, topic: str, partitions: str, journal_uri: str,
                 roll_seconds: float = DEFAULT_ROLL_SECONDS, checkpoint_interval_s: float = 5.0) -> None:
        parts = parse_partitions(partitions)
        self.log, hook = sink_manifest_hook(journal_uri, topic, parts,
                                            checkpoint_interval_s=checkpoint_interval_s)
        settings = KafkaSinkSettings(bootstrap_servers=bootstrap_servers, topic=topic,
                                     partitions=parts, roll_seconds=roll_seconds)
        self.sink = KafkaSink(settings, SinkSettings(journal_uri).storage(), on_file_written=hook)
        self._checkpoint_interval_s = checkpoint_interval_s
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
            await self.sink.start()
            self._started.set()
            checkpoints = asyncio.create_task(self._checkpoints())
            try:
                await self.sink.run(self._stop)
            finally:
                checkpoints.cancel()
                await self.sink.stop()
                with contextlib.suppress(Exception):
                    self.log.checkpoint()

        asyncio.run(main())

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(self._checkpoint_interval_s)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.log.checkpoint)

    def stats(self) -> dict[str, Any]:
        """The sink's next offsets and counters, and this replica's process id."""
        return {"pid": os.getpid(), **self.sink.lag_state()}

    def __del__(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)


class SinkStatus:
    """The sink app's ingress: offsets and lag of every sink."""

    def __init__(self, *sinks) -> None:
        self.sinks = sinks

    async def __call__(self, request) -> dict[str, Any]:
        states = [await sink.stats.remote() for sink in self.sinks]
        return {"sinks": states}


def app_builder(args: dict[str, str]):
    """Serve config entry point: ``bootstrap``, ``topic``, ``journal_uri`` and ``partitions``
    (groups separated by ``;``, e.g. ``"0-3;4-7"``: one sink deployment per group)."""
    from ray import serve

    groups = [g.strip() for g in args["partitions"].split(";") if g.strip()]
    sinks = []
    for i, group in enumerate(groups):
        deployment = serve.deployment(KafkaSinkReplica, name=f"KafkaSink{i}", num_replicas=1,
                                      ray_actor_options={"num_cpus": float(args.get("num_cpus", 0.5))})
        sinks.append(deployment.bind(args["bootstrap"], args["topic"], group, args["journal_uri"],
                                     float(args.get("roll_seconds", DEFAULT_ROLL_SECONDS))))
    return serve.deployment(SinkStatus, name="SinkStatus").bind(*sinks)
