"""The public API: the ``@journaled`` decorator and driver-side journal controls.

``journaled`` wraps a deployment class (:mod:`serve_journal._private.wrapper`); ``annotate`` adds
facts to the current call from inside it; ``load_model`` loads a registered model so entries name
exactly the version that serves (:mod:`serve_journal._private.models`). On the driver, ``producer_reports``, ``flush_journal``
and ``shutdown_journal`` talk to a journal root's coordinator and writer actors;
``subject_tokenizer`` and ``caller_tokenizer`` compute subject and caller tokens as the replicas do.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from serve_journal._private.capture import annotate
from serve_journal._private.models import JournaledModel, load_model
from serve_journal._private.wiring import build_privacy
from serve_journal._private.wrapper import wrap_class
from serve_journal.config import JournalConfig
from serve_journal.privacy.keyring import Keyring
from serve_journal.privacy.tokens import CallerTokenizer
from serve_journal.storage import is_local_uri, local_root

FLUSH_POLL_S = 0.05
"""How often ``flush_journal`` reads the producers' reports while it waits for them to settle."""


def journaled(model: str | None = None, **options: Any) -> Callable[[Any], Any]:
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
    if is_local_uri(config.journal_uri):
        # Replicas and writer actors run elsewhere: pin a local root to an absolute path now.
        config = config.with_overrides(journal_uri=local_root(config.journal_uri))

    def decorate(target: Any) -> Any:
        from ray.serve.deployment import Deployment  # inside: imports Ray (~2 s)

        if isinstance(target, Deployment):
            return target.options(func_or_class=wrap_class(target.func_or_class, config))
        return wrap_class(target, config)

    return decorate


def _root(journal_uri: str) -> str:
    """A local journal root as an absolute path (as the replicas name it); remote URIs as given."""
    return local_root(journal_uri) or journal_uri


def producer_reports(journal_uri: str = "./journal", namespace: str = "serve_journal") -> dict[str, dict]:
    """The latest counters every replica of a journal root reported (captured, dropped, ...)."""
    import ray  # inside: Ray takes ~2 s to import; `import serve_journal` stays Ray-free

    from serve_journal._private.coordinator import get_coordinator  # inside: imports Ray
    from serve_journal.transport.actors import pool_id  # inside: imports Ray

    coordinator = get_coordinator(pool_id(_root(journal_uri)), namespace)
    return ray.get(coordinator.producers.remote())


def _writers(uri: str, namespace: str, pool_size: int | None = None) -> list[tuple[str, Any]]:
    """(name, handle) of the writer actors of a journal root that exist, in pool order."""
    import ray  # inside: Ray takes ~2 s to import; `import serve_journal` stays Ray-free

    from serve_journal.transport.actors import writer_name  # inside: imports Ray

    writers = []
    index = 0
    while pool_size is None or index < pool_size:
        name = writer_name(uri, index)
        try:
            writers.append((name, ray.get_actor(name, namespace=namespace)))
        except ValueError:
            break
        index += 1
    return writers


def flush_journal(journal_uri: str = "./journal", timeout: float = 30.0, *,
                  namespace: str = "serve_journal", pool_size: int | None = None) -> bool:
    """From the driver: make everything captured so far durable (actor transport).

    Waits until every live replica reported, after this call began, that it holds nothing
    unsent, then makes the writer actors write their open files. ``True`` when done in time.
    """
    import ray  # inside: Ray takes ~2 s to import; `import serve_journal` stays Ray-free

    from serve_journal._private.coordinator import producers_settled  # inside: imports Ray

    uri = _root(journal_uri)
    since = time.time()
    deadline = time.monotonic() + timeout
    while True:
        reports = producer_reports(uri, namespace)
        if producers_settled(reports, since, time.time()):
            break
        if time.monotonic() > deadline:
            return False
        time.sleep(FLUSH_POLL_S)  # a deadline-bounded wait on remote reports, not a retry
    refs = [handle.flush.remote() for _, handle in _writers(uri, namespace, pool_size)]
    remaining = max(0.0, deadline - time.monotonic())
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=remaining)
    return len(ready) == len(refs) and all(left == 0 for left in ray.get(ready))


def subject_tokenizer(journal_uri: str = "./journal", **options: Any) -> Callable[[str], str | None]:
    """``subject id -> token`` as the replicas of ``journal_uri`` compute it, for lookups.

    Returns ``None`` for a subject never seen or forgotten (its key is gone); never creates a key.
    """
    options.setdefault("model", "unused")
    config = JournalConfig.resolve(journal_uri=_root(journal_uri), **options)
    return build_privacy(config)[0].token_for


def caller_tokenizer(journal_uri: str = "./journal", **options: Any) -> Callable[[str], str | None]:
    """``caller id -> caller token`` as replicas with ``caller_privacy="token"`` record it, for
    lookups (``JournalQuery(..., caller_tokenizer=...)``).

    ``anonymous`` stays ``anonymous``. Returns ``None`` while no replica of the journal has
    tokenized a caller (the keyring has no caller-token key yet); never adds a key.
    """
    options.setdefault("model", "unused")
    config = JournalConfig.resolve(journal_uri=_root(journal_uri), **options)
    return CallerTokenizer(Keyring.local_default(config.resolved_privacy_dir()), create=False)


def shutdown_journal(journal_uri: str = "./journal", *, namespace: str = "serve_journal",
                     timeout: float = 30.0) -> None:
    """Flush, then stop the writer actors and coordinator of a journal root."""
    import ray  # inside: Ray takes ~2 s to import; `import serve_journal` stays Ray-free

    from serve_journal._private.coordinator import coordinator_name  # inside: imports Ray
    from serve_journal.transport.actors import pool_id  # inside: imports Ray

    uri = _root(journal_uri)
    flush_journal(uri, timeout, namespace=namespace)
    names = [coordinator_name(pool_id(uri))] + [name for name, _ in _writers(uri, namespace)]
    for name in names:
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=namespace))


__all__ = [
    "JournaledModel", "annotate", "caller_tokenizer", "flush_journal", "journaled", "load_model",
    "producer_reports", "shutdown_journal",
    "subject_tokenizer",
]
