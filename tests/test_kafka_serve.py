"""The durable path end to end: a journaled Serve app with transport="kafka" -> a real tansu
broker -> a Kafka sink with manifests -> Parquet that verify accepts."""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
import requests
from ray import serve

from serve_journal import journaled, producer_reports
from serve_journal.examples.fraud import MODEL_NAME
from serve_journal.read.verify import verify_journal
from serve_journal.sink.kafka import KafkaSink, KafkaSinkSettings
from serve_journal.sink.kafka_app import sink_manifest_hook
from serve_journal.storage import open_storage
from tests.helpers.deployments import Rules
from tests.helpers.journal import read_journal

from .fixtures.kafka import wait_for

pytestmark = pytest.mark.timeout(300)

TOPIC = "journal-e2e"
PARTITIONS = 4


class SinkThread:
    """A KafkaSink consuming in a background thread, stopped at the end of the test."""

    def __init__(self, bootstrap: str, journal_uri: str) -> None:
        parts = tuple(range(PARTITIONS))
        self.log, hook = sink_manifest_hook(journal_uri, TOPIC, parts)
        settings = KafkaSinkSettings(bootstrap_servers=bootstrap, topic=TOPIC, partitions=parts,
                                     roll_seconds=0.3)
        self.sink = KafkaSink(settings, open_storage(journal_uri), on_file_written=hook)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(60), "sink did not start"

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()
        await self.sink.start()
        self.ready.set()
        try:
            await self.sink.run(self.stop_event)
        finally:
            await self.sink.stop()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(60)
        self.log.checkpoint()


def test_serve_to_kafka_to_parquet_loses_nothing_and_verifies(serve_instance, mlflow_registry,
                                                            kafka_broker, tmp_path):
    tracking_uri, _ = mlflow_registry
    kafka_broker.create_topic(TOPIC, PARTITIONS)
    root = tmp_path / "journal"
    app = f"k{uuid.uuid4().hex[:8]}"
    kafka = {"bootstrap_servers": kafka_broker.bootstrap, "topic": TOPIC,
             "enable_idempotence": False, "num_partitions": PARTITIONS,
             "spool_dir": str(tmp_path / "spool")}
    dep = journaled(model=f"models:/{MODEL_NAME}@champion", tracking_uri=tracking_uri,
                    journal_uri=str(root), threshold=0.5, transport="kafka",
                    extra={"kafka": kafka})(Rules)
    sink = SinkThread(kafka_broker.bootstrap, str(root))
    try:
        serve.run(dep.bind(), name=app, route_prefix=f"/{app}")
        ids = [f"kafka-{i}" for i in range(150)]
        for i, rid in enumerate(ids):
            r = requests.post(f"{serve_instance}/{app}", json={"subject_id": f"s{i % 5}",
                              "features": {"amount": float(i % 100)}},
                              headers={"x-request-id": rid}, timeout=60)
            assert r.status_code == 200
        serve.delete(app)  # the replica flushes its transport on shutdown

        def persisted() -> bool:
            return read_journal(root).num_rows >= len(ids)

        wait_for(persisted, timeout=60, message="entries persisted by the Kafka sink")
    finally:
        sink.stop()
    rows = read_journal(root).to_pylist()
    assert sorted(r["request_id"] for r in rows) == sorted(ids)
    assert all(r["model_name"] == MODEL_NAME and r["subject_token"] for r in rows)
    reports = producer_reports(str(root))
    assert sum(r["captured"] for r in reports.values()) == len(ids)
    storage = open_storage(str(root))
    public_key = str(root.parent / "journal-signing" / "manifest-signing.pub.pem")
    report = verify_journal(storage, public_key=public_key)
    assert report.ok, report.to_json()
