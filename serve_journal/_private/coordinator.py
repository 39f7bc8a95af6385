"""A small detached actor per journal root that replicas report to.

Each replica's flusher sends a heartbeat (fire-and-forget) every half second with its counters:
captured, exported, dropped per reason, buffered. The driver-side ``flush_journal`` uses the
heartbeats as a barrier: every live producer must report an empty buffer after the flush began,
then the writers roll their files. The counters are also what the demo and stats print.
"""

from __future__ import annotations

import time
from typing import Any

import ray

HEARTBEAT_INTERVAL_S = 0.5
STALE_AFTER_S = 10.0


def coordinator_name(pool: str) -> str:
    """The actor name of the coordinator of writer pool ``pool``."""
    return f"sj-coordinator-{pool}"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class JournalCoordinator:
    """Last heartbeat of every producer (replica process) of one journal root."""

    def __init__(self) -> None:
        self._producers: dict[str, dict[str, Any]] = {}

    def heartbeat(self, producer_id: str, report: dict[str, Any]) -> None:
        """Keep ``report`` as the producer's latest, stamped with the time received."""
        report = dict(report)
        report["received_at"] = time.time()
        self._producers[producer_id] = report

    def producers(self) -> dict[str, dict[str, Any]]:
        """The latest report of every producer that sent one."""
        return dict(self._producers)


def get_coordinator(pool: str, namespace: str) -> ray.actor.ActorHandle:
    """The coordinator of ``pool`` (a detached actor), created on first use."""
    return JournalCoordinator.options(
        name=coordinator_name(pool), namespace=namespace, lifetime="detached", get_if_exists=True,
    ).remote()


def producers_settled(reports: dict[str, dict[str, Any]], since: float, now: float) -> bool:
    """True when every live producer reported, after ``since``, that it holds nothing unsent."""
    for report in reports.values():
        if report.get("closed"):
            continue
        if now - report["received_at"] > STALE_AFTER_S:
            continue  # a dead replica: nothing more will come from it
        if report["as_of"] < since or report["buffered"] > 0 or report["unacked"]:
            return False
    return True
