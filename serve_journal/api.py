"""The public API: the ``@journaled`` decorator and driver-side journal controls."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from serve_journal._private.wrapper import annotate, wrap_class
from serve_journal.config import JournalConfig


def journaled(model: str | None = None, **options: Any):
    """Journal every call of a Ray Serve deployment.

    Apply it above or below ``@serve.deployment``::

        @journaled(model="models:/fraud@champion", threshold=0.75)
        @serve.deployment
        class FraudModel:
            async def __call__(self, request): ...

    Options are the fields of :class:`~serve_journal.config.JournalConfig`; they are validated
    here, on the driver, and the replica builds its buffer, flusher and transport when it starts.
    A model that is not in the MLflow registry fails replica start with a clear message.
    """
    arguments = dict(options)
    if model is not None:
        arguments["model"] = model
    config = JournalConfig.resolve(**arguments)
    uri = config.journal_uri
    if "://" not in uri or uri.startswith("file://"):
        # Replicas and writer actors run elsewhere: pin a local root to an absolute path now.
        config = config.with_overrides(journal_uri=os.path.abspath(uri.removeprefix("file://")))

    def decorate(target: Any) -> Any:
        from ray.serve.deployment import Deployment

        if isinstance(target, Deployment):
            return target.options(func_or_class=wrap_class(target.func_or_class, config))
        return wrap_class(target, config)

    return decorate


def _local_uri(journal_uri: str) -> str:
    if "://" not in journal_uri or journal_uri.startswith("file://"):
        return os.path.abspath(journal_uri.removeprefix("file://"))
    return journal_uri


def producer_reports(journal_uri: str = "./journal", namespace: str = "serve_journal") -> dict[str, dict]:
    """The latest counters every replica of a journal root reported (captured, dropped, ...)."""
    import ray

    from serve_journal._private.coordinator import get_coordinator
    from serve_journal.transport.actors import pool_id

    coordinator = get_coordinator(pool_id(_local_uri(journal_uri)), namespace)
    return ray.get(coordinator.producers.remote())


def flush_journal(journal_uri: str = "./journal", timeout: float = 30.0, *,
                  namespace: str = "serve_journal", pool_size: int | None = None) -> bool:
    """From the driver: make everything captured so far durable (actor transport).

    Waits until every live replica reported, after this call began, that it holds nothing
    unsent, then makes the writer actors write their open files. ``True`` when done in time.
    """
    import ray

    from serve_journal._private.coordinator import producers_settled
    from serve_journal.transport.actors import writer_name

    uri = _local_uri(journal_uri)
    since = time.time()
    deadline = time.monotonic() + timeout
    while True:
        reports = producer_reports(uri, namespace)
        if producers_settled(reports, since, time.time()):
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # poll interval of a deadline-bounded wait on remote reports
    writers = []
    index = 0
    while pool_size is None or index < pool_size:
        try:
            writers.append(ray.get_actor(writer_name(uri, index), namespace=namespace))
        except ValueError:
            break
        index += 1
    refs = [w.flush.remote() for w in writers]
    remaining = max(0.0, deadline - time.monotonic())
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=remaining)
    return len(ready) == len(refs) and all(left == 0 for left in ray.get(ready))


def subject_tokenizer(journal_uri: str = "./journal", **options: Any):
    """``subject id -> token`` as the replicas of ``journal_uri`` compute it, for lookups.

    Returns ``None`` for a subject never seen or forgotten (its key is gone); never creates a key.
    """
    from serve_journal._private.wrapper import build_privacy

    options.setdefault("model", "unused")
    config = JournalConfig.resolve(journal_uri=_local_uri(journal_uri), **options)
    return build_privacy(config)[0].token_for


def shutdown_journal(journal_uri: str = "./journal", *, namespace: str = "serve_journal",
                     timeout: float = 30.0) -> None:
    """Flush, then stop the writer actors and coordinator of a journal root."""
    import ray

    from serve_journal._private.coordinator import coordinator_name
    from serve_journal.transport.actors import pool_id, writer_name

    uri = _local_uri(journal_uri)
    flush_journal(uri, timeout, namespace=namespace)
    names = [coordinator_name(pool_id(uri))]
    index = 0
    while True:
        name = writer_name(uri, index)
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            break
        names.append(name)
        index += 1
    for name in names:
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=namespace))


__all__ = [
    "annotate", "flush_journal", "journaled", "producer_reports", "shutdown_journal",
    "subject_tokenizer",
]
