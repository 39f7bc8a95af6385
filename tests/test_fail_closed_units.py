"""Fail-closed building blocks without Ray or a broker: the flusher's backpressure gate and the
``annotate(attributes=...)`` source of attribute rules."""

from __future__ import annotations

import threading

import pytest

from serve_journal import annotate
from serve_journal._private.batching import BatchWorker, PeriodicTask
from serve_journal._private.capture import _ANNOTATIONS
from serve_journal.policy import RiskPolicy
from tests.fixtures.kafka import wait_for


def test_a_closed_gate_keeps_items_buffered_while_periodic_tasks_run_and_flush_waits():
    room = threading.Event()
    exported: list = []
    drops: list = []
    ticks: list = []
    worker = BatchWorker(exported.extend, capacity=6, batch_size=2, interval_s=0.01,
                         on_drop=lambda items, reason: drops.extend(items), ready=room.is_set,
                         periodic=[PeriodicTask("tick", 0.01, lambda: ticks.append(1))])
    offered = [worker.offer(i, report_drop=False) for i in range(10)]
    assert offered == [True] * 6 + [False] * 4  # the buffer filled: the caller's policy applies
    assert worker.flush(timeout=0.3) is False  # held back, and flush says so
    wait_for(lambda: len(ticks) >= 3, 10, message="periodic tasks run while the gate is closed")
    assert exported == [] and drops == [] and len(worker) == 6
    room.set()
    assert worker.flush(timeout=10)
    assert exported == list(range(6)) and drops == []
    assert worker.close(timeout=5)


def test_a_gate_that_raises_does_not_stop_exports():
    exported: list = []

    def broken() -> bool:
        raise RuntimeError("gate broke")

    worker = BatchWorker(exported.extend, capacity=10, batch_size=5, interval_s=0.01,
                         on_drop=lambda items, reason: None, ready=broken)
    worker.offer(1)
    assert worker.flush(timeout=10) and exported == [1]
    worker.close(timeout=5)


def test_annotate_attributes_add_up_and_must_be_strings():
    scope: dict = {}
    token = _ANNOTATIONS.set(scope)
    try:
        annotate(attributes={"region": "eu"})
        annotate(attributes={"channel": "app"}, caller="partner-a")
        assert scope == {"attributes": {"region": "eu", "channel": "app"}, "caller": "partner-a"}
        with pytest.raises(TypeError, match="mapping of attribute names to string"):
            annotate(attributes={"region": 3})
        with pytest.raises(TypeError, match="mapping of attribute names to string"):
            annotate(attributes=["eu"])
    finally:
        _ANNOTATIONS.reset(token)
    annotate(attributes={"region": "eu"})  # outside a journaled call: nothing happens


def test_attribute_and_caller_rules_need_their_values():
    policy = RiskPolicy.from_dict({
        "tiers": {"high": {"overflow": "refuse"}, "low": {"sample_rate": 0.1}},
        "rules": [{"tier": "high", "caller": "partner-a", "attributes": {"region": ["eu"]}}],
        "default_tier": "low",
    })
    assert policy.classify(caller="partner-a", attributes={"region": "eu"}).name == "high"
    assert policy.classify(caller="partner-a", attributes={"region": "us"}).name == "low"
    assert policy.classify(caller=None, attributes={"region": "eu"}).name == "low"
    assert policy.classify(caller="partner-a").name == "low"
