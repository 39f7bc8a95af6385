"""Fail-closed on the Ray writer-actor transport, with real writer actors: a write whose writer
died is sent again to the writer that replaces it, never lost; ``has_room`` is the flusher's gate."""

from __future__ import annotations

import pytest
import ray

from serve_journal.sink.settings import SinkSettings
from serve_journal.transport.actors import RayActorTransport, writer_name
from tests.fixtures.kafka import make_entries
from tests.helpers.journal import read_journal

pytestmark = pytest.mark.timeout(240)

NAMESPACE = "serve_journal_tests"


def test_a_write_to_a_dead_writer_is_sent_again_not_lost(ray_cluster, tmp_path):
    root = str(tmp_path / "journal")
    settings = SinkSettings(journal_uri=root, roll_seconds=0.2)
    transport = RayActorTransport(settings, pool_size=1, namespace=NAMESPACE, producer_id="p1")
    name = writer_name(root, 0)
    try:
        transport.send(make_entries(100, producer_id="p1"))
        assert transport.flush(60)  # written: nothing buffered in the writer we kill next
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        transport.send(make_entries(100, producer_id="p1", start_seq=100))  # to the dead handle
        assert transport.flush(120)
        assert transport.resent >= 1
        assert transport.has_room() and transport.in_flight() == 0
    finally:
        transport.close(30)
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except ValueError:
            pass
    seqs = read_journal(tmp_path / "journal").column("seq").to_pylist()
    assert sorted(seqs) == list(range(200))


def test_a_new_transport_returns_once_its_writers_run(ray_cluster, tmp_path):
    """Entries captured from the replica's first request on reach a running writer: a new pool's
    writers started (the actors are ALIVE, not still being created) before the constructor
    returns. Before, entries of a new pool's first second waited for the writers' processes to
    start, on top of the roll (persistence up to 1.5 s instead of ~0.55 s)."""
    root = str(tmp_path / "journal")
    transport = RayActorTransport(SinkSettings(journal_uri=root), pool_size=2, namespace=NAMESPACE,
                                  producer_id="p1")
    try:
        states = {ray._private.state.actors(writer._actor_id.hex())["State"]
                  for writer in transport._writers}
        assert states == {"ALIVE"}
    finally:
        transport.close(30)
        for i in range(2):
            try:
                ray.kill(ray.get_actor(writer_name(root, i), namespace=NAMESPACE), no_restart=True)
            except ValueError:
                pass
